"""`python -m sam3_core.mlflow_records replay <uri>`: send values recorded while the server was away."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from sam3_core.console import configure_console
from sam3_core.errors import Sam3PipeError
from sam3_core.mlflow_records.unsent import replay_unsent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sam3_core.mlflow_records")
    commands = parser.add_subparsers(dest="command", required=True)
    replay = commands.add_parser("replay", help="send an mlflow_unsent.jsonl record to MLFLOW_TRACKING_URI")
    replay.add_argument("uri", help="path or URI of the record (printed in the warning that created it)")
    args = parser.parse_args(argv)
    configure_console(sys.argv[1:] if argv is None else argv, fmt="%(levelname)s %(name)s: %(message)s")
    try:
        sent = replay_unsent(args.uri)
    except Sam3PipeError as exc:
        logging.getLogger("sam3pipe").error("error: %s", exc)
        return 2
    print(json.dumps({"replayed_metrics": sent}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
