"""The SAM3 clip task: what the generic loop needs to train the detector on collated clips."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sam3_core.model.video_detector import VideoClipDetector

LOSS_TERMS = ("loss_bbox", "loss_giou", "loss_ce", "presence_loss", "loss_mask", "loss_dice")


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
        return self.stage_losses(model(batch, **forward), batch)

    def stage_losses(self, outputs: Any, batch: Any) -> dict[str, torch.Tensor]:
        """The losses of the model's per-frame stages `outputs` for `batch`."""
        targets = [self.module.detector.back_convert(target) for target in batch.find_targets]
        raw = self.loss_fn(outputs, targets)
        return {"loss": raw["core_loss"], **{term: raw[term] for term in LOSS_TERMS if term in raw}}

    def counts(self, batch: Any) -> dict[str, int]:
        frames = int(batch.img_batch.shape[0])
        return {"clips": frames // len(batch.find_inputs), "frames": frames}
