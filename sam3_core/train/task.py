"""The SAM3 clip task: what the generic loop needs to train the detector on collated clips."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from sam3_core.model.video_detector import VideoClipDetector

LOSS_TERMS = ("loss_bbox", "loss_giou", "loss_ce", "presence_loss", "loss_mask", "loss_dice")


@contextmanager
def matcher_divergence() -> Iterator[None]:
    """Report sam3's Hungarian matcher refusing NaN/Inf outputs (in the forward or the loss) as a divergence."""
    try:
        yield
    except ValueError as exc:
        # sam3's matcher (scipy) refuses a cost matrix holding NaN/Inf: the model's outputs are no longer
        # finite, the divergence the NaN guard reports for losses
        if "invalid numeric entries" not in str(exc):
            raise
        # imported here: importing the trainer with this module changed a resumed run's weights bit-wise
        # (the import order of sam3's modules; tests/sam3_core/train/test_trainer.py's resume tests)
        from sam3_core.train.trainer import TrainingDiverged

        raise TrainingDiverged(
            "the model's outputs became NaN/Inf (the matcher cannot match them): the weights diverged at the "
            "last update. Lower optim.lr or optim.weight_decay, raise optim.warmup_steps or set optim.grad_clip"
        ) from exc


class ClipTask:
    """sam3's loss set on the per-frame outputs of a `VideoClipDetector` for a `collate_clips` batch."""

    def __init__(self, module: VideoClipDetector, loss_fn: nn.Module, device: torch.device) -> None:
        self.module, self.loss_fn, self.device = module, loss_fn, device

    def to_device(self, batch: Any) -> Any:
        if self.device.type == "cpu":
            return batch
        from sam3.model.utils.misc import copy_data_to_device

        return copy_data_to_device(batch, self.device, non_blocking=True)

    def losses(self, model: nn.Module, batch: Any, **forward: Any) -> dict[str, torch.Tensor]:
        """`loss` (sam3's core loss) and the six weighted terms; `forward` goes to the model (e.g. with_targets)."""
        with matcher_divergence():
            return self.stage_losses(model(batch, **forward), batch)

    def stage_losses(self, outputs: Any, batch: Any) -> dict[str, torch.Tensor]:
        """The losses of the model's per-frame stages `outputs` for `batch`."""
        targets = [self.module.detector.back_convert(target) for target in batch.find_targets]
        raw = self.loss_fn(outputs, targets)
        return {"loss": raw["core_loss"], **{term: raw[term] for term in LOSS_TERMS if term in raw}}

    def counts(self, batch: Any) -> dict[str, int]:
        frames = int(batch.img_batch.shape[0])
        return {"clips": frames // len(batch.find_inputs), "frames": frames}
