"""Run under torchrun by tests/sam3_core/train/test_train_distributed.py: train, then record what this rank ended with.

`python -m torch.distributed.run --nproc_per_node N tests/sam3_core/train/train_worker.py OUT_DIR key=value ...`
trains with the `train` overrides and writes, per rank, `OUT_DIR/rank<r>.pt` (the final model
state dict) and `OUT_DIR/rank<r>.json` (the train-clip indices this rank loaded, per epoch, and the
metrics it reported: only rank 0 reports).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from sam3_core import comm
from sam3_core.config import load_config
from sam3_core.data.clips import ClipDataset
from sam3_core.train.build import build_trainer
from sam3_core.train.config import TrainConfig


class RecordingClips(torch.utils.data.Dataset):
    """The trainer's clip dataset, noting which index it serves in which epoch."""

    def __init__(self, clips: ClipDataset) -> None:
        self.clips = clips
        self.seen: dict[int, list[int]] = {}

    def set_epoch(self, epoch: int) -> None:
        self.clips.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> Any:
        self.seen.setdefault(self.clips.epoch, []).append(index)
        return self.clips[index]


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    metrics: list[dict[str, float]] = []
    trainer = build_trainer(
        load_config("train", TrainConfig, argv[1:]), on_metrics=lambda step, m: metrics.append({"step": step, **m})
    )
    recorder = RecordingClips(trainer.data.dataset)
    trainer.data.dataset = recorder
    trainer.fit()
    rank = comm.rank()
    torch.save(trainer.module.state_dict(), out / f"rank{rank}.pt")
    record = {"world_size": comm.world_size(), "seen": recorder.seen, "metrics": metrics}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    comm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
