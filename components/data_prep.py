"""Pipeline step 1: prepare a dataset and publish it to the store.

`python -m components.data_prep source=synthetic synthetic.num_videos=4` prints
{"dataset_id": ..., "dataset_uri": ...} as one JSON line.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from components.runner import run_cli
from sam3_core.config import load_config
from sam3_core.data.prep import DataPrepConfig, prepare_dataset

logger = logging.getLogger(__name__)


def execute(overrides: list[str]) -> dict[str, Any]:
    """Compose the config from Hydra overrides, prepare and publish; return the dataset's URI and id."""
    cfg = load_config("data_prep", DataPrepConfig, overrides)
    prepared = prepare_dataset(cfg)
    logger.info("dataset %s at %s", prepared.dataset_id, prepared.uri)
    return {"dataset_uri": prepared.uri, "dataset_id": prepared.dataset_id}


def main(argv: list[str] | None = None) -> int:
    return run_cli(execute, argv)


if __name__ == "__main__":
    sys.exit(main())
