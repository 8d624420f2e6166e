"""The data-prep component: prepare a dataset and publish it to the store, in one process or sharded across pods.

`python -m components.data_prep source=synthetic synthetic.num_videos=4` prints
{"dataset_id": ..., "dataset_uri": ...} as one JSON line. The pipeline runs the same work as
`plan` (split the videos into shards), one `shard` per pod and `merge`; each returns its
outputs as a dict like `execute`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from components.runner import Usage, run_cli
from sam3_core.config import load_config
from sam3_core.data.prep import DataPrepConfig, prepare_dataset
from sam3_core.data.shards import merge_shards, plan_shards, prepare_shard

logger = logging.getLogger(__name__)


def execute(overrides: list[str]) -> dict[str, Any]:
    """Compose the config from Hydra overrides, prepare and publish; return the dataset's URI and id."""
    cfg = load_config("data_prep", DataPrepConfig, overrides)
    prepared = prepare_dataset(cfg)
    logger.info("dataset %s at %s", prepared.dataset_id, prepared.uri)
    return {"dataset_uri": prepared.uri, "dataset_id": prepared.dataset_id}


def plan(overrides: list[str], shards: int) -> dict[str, Any]:
    """Check the source and split its videos into `shards`; return the plan's URI and the shard indices."""
    cfg = load_config("data_prep", DataPrepConfig, overrides)
    planned = plan_shards(cfg, shards)
    return {"plan_uri": planned.uri, "shards": list(range(planned.shards))}


def shard(plan_uri: str, index: int) -> dict[str, Any]:
    """Stage one shard of a plan and publish its part; return the part's URI."""
    return {"part_uri": prepare_shard(plan_uri, index)}


def merge(plan_uri: str) -> dict[str, Any]:
    """Publish the dataset from every shard's part; return its URI and id."""
    prepared = merge_shards(plan_uri)
    return {"dataset_uri": prepared.uri, "dataset_id": prepared.dataset_id}


def main(argv: list[str] | None = None) -> int:
    return run_cli(execute, argv, Usage(__doc__ or "", "data_prep", DataPrepConfig))


if __name__ == "__main__":
    sys.exit(main())
