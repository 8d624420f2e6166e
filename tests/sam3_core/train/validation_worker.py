"""Run under torchrun by test_validation.py: validate 1-5 clips and frames, then train to the end.

`python -m torch.distributed.run --nproc_per_node N tests/sam3_core/train/validation_worker.py OUT key=value ...`
builds the real trainer, runs its validators on the starting weights for every count of clips
(`val/loss`) and frames (COCO metrics) from 1 to `MAX_COUNT`, whatever the number of ranks, then
`fit()`s it (validating at the last step). Rank 0 writes `OUT/metrics.json`: the metrics of each
count, and those logged at the last step.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch

from sam3_core import comm
from sam3_core.config import load_config
from sam3_core.data.frames import FrameReader
from sam3_core.train.build import build_trainer
from sam3_core.train.config import TrainConfig
from sam3_core.train.hooks import Validation
from sam3_core.train.validation import DetectionMetrics, ValidationLoss

MAX_COUNT = 5


def validate_counts(trainer: Any, cfg: TrainConfig) -> dict[int, dict[str, float]]:
    """The loss of the first n val clips and the COCO metrics of n val frames, n = 1..MAX_COUNT."""
    hook = trainer.find_hook(Validation)
    loss = next(v for v in hook.validators if isinstance(v, ValidationLoss))
    frames = next(v for v in hook.validators if isinstance(v, DetectionMetrics))
    reader = FrameReader(cfg.data.uri)
    module = trainer.module
    results: dict[int, dict[str, float]] = {}
    module.eval()
    with torch.no_grad():
        for count in range(1, MAX_COUNT + 1):
            clips = copy.copy(loss)
            clips.max_clips = count
            metrics = clips(module, hook.val_dataset, 0)
            detection = DetectionMetrics(reader, count, cfg.model.image_size, detection=frames.detection)
            metrics.update(detection(module, hook.val_dataset, 0))
            results[count] = metrics
    module.train()
    return results


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    cfg = load_config("train", TrainConfig, argv[1:])
    logged: list[dict[str, float]] = []
    trainer = build_trainer(cfg, on_metrics=lambda step, metrics: logged.append({"step": step, **metrics}))
    per_count = validate_counts(trainer, cfg)
    trainer.fit()
    if comm.is_main():
        final = {k: v for record in logged if record["step"] == trainer.step for k, v in record.items()}
        record = {"world_size": comm.world_size(), "per_count": per_count, "final": final, "steps": trainer.step}
        (out / "metrics.json").write_text(json.dumps(record))
    comm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
