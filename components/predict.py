"""Pipeline step 3: predictions of a checkpoint on a dataset split, in COCO and YTVIS formats.

`python -m components.predict model.uri=<checkpoint> data.uri=<dataset_uri>` (or under
`torchrun --nproc_per_node N`) prints {"predictions_uri"} as one JSON line.
"""

from __future__ import annotations

import sys
from typing import Any

from components.runner import run_cli
from sam3_core.config import load_config
from sam3_core.predict.predictor import PredictConfig, predict
from sam3_core.train.distributed import shutdown


def execute(overrides: list[str]) -> dict[str, Any]:
    cfg = load_config("predict", PredictConfig, overrides)
    try:
        return {"predictions_uri": predict(cfg)}
    finally:
        shutdown()


def main(argv: list[str] | None = None) -> int:
    return run_cli(execute, argv)


if __name__ == "__main__":
    sys.exit(main())
