"""What every component CLI shares: logging, one-line errors, the outputs as one JSON line."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from sam3_core.errors import Sam3PipeError

log = logging.getLogger("sam3pipe")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_cli(execute: Callable[[list[str]], dict[str, Any]], argv: list[str] | None = None) -> int:
    """Run a component's `execute`; exit 2 with one line on an error the user can fix."""
    configure_logging()
    try:
        outputs = execute(sys.argv[1:] if argv is None else list(argv))
    except Sam3PipeError as exc:
        log.error("error: %s", exc)
        return 2
    print(json.dumps(outputs, sort_keys=True))
    return 0
