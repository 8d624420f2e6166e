"""The tracker's tasks for the generic loop: stage tracker (`TrackerTask`) and stage joint (`JointTask`).

Logged names: the tracker's terms are ``tracker_loss_mask``, ``tracker_loss_dice``,
``tracker_loss_iou``, ``tracker_loss_class`` and its weighted total ``tracker_loss``; in stage
joint ``loss`` is the detector's core loss plus ``tracker_train.tracker_weight`` x ``tracker_loss``,
and the detector's terms keep their names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sam3_core import comm
from sam3_core.data.frames import FrameReader
from sam3_core.data.loading import pin_tensors
from sam3_core.data.tracker_clips import JointBatch, TrackerBatch, TrackerClipDataset, collate_tracker_clips
from sam3_core.data.ytvis import to_json
from sam3_core.predict.vos import VideoPropagation, frame_images
from sam3_core.train.task import ClipTask, matcher_divergence
from sam3_core.train.tracker_loss import TERMS, TrackerLoss
from sam3_core.train.trainer import HookBase
from sam3_core.train.validation import spread


def _named(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tracker loss's terms under their logged names."""
    return {"tracker_loss": losses["loss"], **{f"tracker_{term}": losses[term] for term in TERMS}}


def _tracker_counts(batch: TrackerBatch) -> dict[str, int]:
    return {
        "clips": len(batch.clips),
        "frames": int(batch.images.shape[0]),
        "objects": sum(len(clip.track_ids) for clip in batch.clips),
    }


class TrackerTask:
    """SAM2's tracker loss on the clips a `VideoClipModel` tracked (stage tracker)."""

    def __init__(self, loss: TrackerLoss, device: torch.device) -> None:
        self.loss, self.device = loss, device

    def to_device(self, batch: TrackerBatch) -> TrackerBatch:
        if self.device.type == "cpu":
            return batch
        return pin_tensors(batch, lambda tensor: tensor.to(self.device, non_blocking=True))

    def tracked_losses(self, tracked: list, batch: TrackerBatch) -> dict[str, torch.Tensor]:
        return _named(self.loss(tracked, [clip.masks for clip in batch.clips]))

    def losses(self, model: nn.Module, batch: TrackerBatch) -> dict[str, torch.Tensor]:
        named = self.tracked_losses(model(batch), batch)
        return {"loss": named["tracker_loss"], **named}

    def counts(self, batch: TrackerBatch) -> dict[str, int]:
        return _tracker_counts(batch)


class JointTask:
    """Stage joint: the detector's loss on its clips and the tracker's on its clips, from one forward.

    ``sum`` (`tracker_train.joint`): every step, the detector's loss plus the weighted tracker loss.
    ``alternate``: steps take turns (`turn`, set by the `JointTurns` hook from the step count): even
    steps the detector's loss alone, odd steps the weighted tracker loss alone; only ``loss`` is
    logged then, as the two kinds of step have different terms.
    """

    def __init__(self, detector: ClipTask, tracker: TrackerTask, tracker_weight: float, mode: str = "sum") -> None:
        self.detector, self.tracker, self.tracker_weight, self.mode = detector, tracker, tracker_weight, mode
        self.turn = 0

    def to_device(self, batch: JointBatch) -> JointBatch:
        return JointBatch(self.detector.to_device(batch.detector), self.tracker.to_device(batch.tracker))

    def losses(self, model: nn.Module, batch: JointBatch) -> dict[str, torch.Tensor]:
        if self.mode == "alternate":
            if self.turn == 0:
                return {"loss": self.detector.losses(model, batch.detector)["loss"]}
            tracked = self.tracker.tracked_losses(model(batch.tracker), batch.tracker)
            return {"loss": self.tracker_weight * tracked["tracker_loss"]}
        with matcher_divergence():
            stages, tracked = model(batch)
            detector = self.detector.stage_losses(stages, batch.detector)
        tracker = self.tracker.tracked_losses(tracked, batch.tracker)
        total = detector["loss"] + self.tracker_weight * tracker["tracker_loss"]
        return {**detector, "detector_loss": detector["loss"], **tracker, "loss": total}

    def counts(self, batch: JointBatch) -> dict[str, int]:
        detector, tracker = self.detector.counts(batch.detector), _tracker_counts(batch.tracker)
        if self.mode == "alternate":
            return detector if self.turn == 0 else tracker
        return {**detector, "tracker_clips": tracker["clips"], "objects": tracker["objects"]}


class JointTurns(HookBase):
    """Stage joint, ``alternate``: whose turn the next step is, from the steps done (so a resumed run keeps turns)."""

    def __init__(self, task: JointTask) -> None:
        self.task = task

    def before_train(self) -> None:
        self.task.turn = self.trainer.step % 2

    def after_step(self) -> None:
        self.task.turn = self.trainer.step % 2


class TrackerValidationLoss:
    """`tracker_loss`: the mean tracker loss of the first `max_clips` validation clips (first-frame mask prompts)."""

    def __init__(
        self, task: TrackerTask, dataset: TrackerClipDataset, max_clips: int, autocast: Callable[[], Any]
    ) -> None:
        self.task, self.dataset, self.max_clips, self.autocast = task, dataset, max_clips, autocast

    def __call__(self, module: nn.Module, val_set: Any, step: int) -> dict[str, float]:
        count = min(len(self.dataset), self.max_clips)
        total = torch.zeros(2, dtype=torch.float64)
        for index in range(comm.rank(), count, comm.world_size()):
            batch = self.task.to_device(collate_tracker_clips([self.dataset[index]]))
            with self.autocast():
                total[0] += float(self.task.losses(module, batch)["loss"])
            total[1] += 1
        total = comm.all_reduce_sum(total)
        return {"tracker_loss": float(total[0] / total[1])} if total[1] > 0 else {}


class VosMetrics:
    """`vos_J_mean`, `vos_F_mean`, `vos_JF_mean` (...) of up to `max_videos` validation videos.

    The same path as ``predict inference=vos`` then ``evaluate`` with the ``vos`` family: each GT
    object prompted by its first-frame mask and propagated (`VideoPropagation`), scored by DAVIS's
    J and F. Videos spread evenly over the split, and over the ranks.
    """

    def __init__(self, reader: FrameReader, max_videos: int, image_size: int) -> None:
        val = reader.dataset("val")
        chosen = [val.videos[i] for i in spread(len(val.videos), max_videos)]
        self.dataset = val.subset([v.id for v in chosen])
        self.reader, self.image_size = reader, image_size
        self.source = f"{reader.dataset_uri}/val.json"

    def __call__(self, module: nn.Module, val_set: Any, step: int) -> dict[str, float]:
        from sam3_core.evaluate.suite import SuiteSettings, evaluate_suite
        from sam3_core.evaluate.videodata import read_video_set

        masklets: list[dict] = []
        for video in self.dataset.videos[comm.rank() :: comm.world_size()]:
            images = frame_images(self.reader.image, video, self.image_size)
            propagation = VideoPropagation(module, video, self.dataset.tracks_of(video.id), images)
            propagation.run()
            masklets.extend(propagation.masklets())
        parts = comm.gather_object(masklets)
        if parts is None:
            return {}
        data = read_video_set(
            to_json(self.dataset),
            [m for part in parts for m in part],
            gt_source=self.source,
            predictions_source=f"in-loop VOS validation at step {step}",
        )
        result = evaluate_suite(data, SuiteSettings(families=("vos",), iou_types=("segm",)))
        return {name: value for name, value in result.metrics.items() if name.startswith("vos_")}
