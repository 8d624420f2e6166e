"""Pipeline step 2: fine-tune the SAM3 detector on video clips.

One process, `torchrun --nproc_per_node N -m components.train ...`, or a PyTorchJob: the launcher's
environment decides. Rerunning the same command resumes from the run's `last.pt`.
`python -m components.train data.uri=<dataset_uri> model=tiny train.max_steps=50` prints
{"run_uri", "best_checkpoint_uri", "last_checkpoint_uri"} as one JSON line (rank 0).
"""

from __future__ import annotations

import sys
from typing import Any

from components.runner import run_cli
from sam3_core.config import load_config
from sam3_core.train.config import TrainJobConfig
from sam3_core.train.distributed import shutdown
from sam3_core.train.trainer import train


def execute(overrides: list[str]) -> dict[str, Any]:
    cfg = load_config("train", TrainJobConfig, overrides)
    try:
        result = train(cfg)
    finally:
        shutdown()
    return {
        "run_uri": result.run_uri,
        "best_checkpoint_uri": result.best_checkpoint_uri,
        "last_checkpoint_uri": result.last_checkpoint_uri,
    }


def main(argv: list[str] | None = None) -> int:
    return run_cli(execute, argv)


if __name__ == "__main__":
    sys.exit(main())
