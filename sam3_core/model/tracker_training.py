"""SAM3's tracker run over training clips: prompts, memory and corrective clicks, as SAM2 trains its tracker.

sam3 0.1.4's `Sam3TrackerBase` keeps SAM2's training hooks (`forward_tracking`,
`init_cond_frames`, `frames_to_add_correction_pt`, teacher-forced object scores) but cannot train:
`forward` raises NotImplementedError and `forward_tracking` calls `track_step` with arguments it
no longer takes. This module is that training loop, written after SAM2's ``SAM2Train``
(``training/model/sam2.py``) on top of the tracker's own building blocks
(`_prepare_memory_conditioned_features`, `_forward_sam_heads`, `_use_mask_as_output`,
`_encode_new_memory`), for a `TrackerClip`:

1. the frames' features come from the detector's backbone (its SAM2 neck, as in SAM3's video
   model), the two high-resolution levels projected by the mask decoder's ``conv_s0`` / ``conv_s1``;
2. the conditioning frames go first: a mask prompt is used as the output itself (SAM2's
   ``use_mask_input_as_output_without_sam``), a point or box prompt goes through the SAM heads
   without memory; their outputs become the conditioning memory;
3. every other frame, in order, attends to that memory and to the memory of the frames before it
   (the tracker's ``num_maskmem`` window) and its object pointers, then predicts;
4. on the frames chosen for correction, ``correction_points`` clicks are added one at a time, each
   sampled from the error between the prediction so far and the ground truth (or, where the clip
   says so, from the ground truth), the previous mask logits fed back with it; every intermediate
   prediction is kept for the loss, the last one is the frame's output and goes to memory;
5. with ``teacher_force_obj_scores`` the ground truth, not the predicted object score, decides
   whether a frame's memory holds the object (sam3's ``teacher_force_obj_scores_for_mem``).

The objects of a clip are one batch for the tracker; the clips of a training batch are tracked one
after the other (each has its own conditioning frames and prompts) over features computed once.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sam3_core.data.tracker_clips import NEGATIVE, POSITIVE, JointBatch, PointPrompt, TrackerBatch, TrackerClip
from sam3_core.model import cpu_compat
from sam3_core.model.tracker import TRACKER_NECK_PREFIX, TRACKER_PREFIX, build_tracker, load_video_model_weights
from sam3_core.model.video_detector import VideoClipDetector

if TYPE_CHECKING:
    from sam3_core.model.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass
class FrameSteps:
    """A frame's predictions at every interactive step (one step without corrective clicks).

    ``multimasks[s]``: [N, M, S, S] mask logits at input resolution (M = 3 with multimask output,
    else 1); ``ious[s]``: [N, M] predicted IoUs; ``object_scores[s]``: [N, 1] object score logits.
    """

    multimasks: list[torch.Tensor]
    ious: list[torch.Tensor]
    object_scores: list[torch.Tensor]

    @property
    def final_mask(self) -> torch.Tensor:
        """[N, S, S] logits of the frame's output: the last step's best mask (by predicted IoU)."""
        masks, ious = self.multimasks[-1], self.ious[-1]
        best = ious.argmax(dim=1)
        return masks[torch.arange(masks.shape[0], device=masks.device), best]


def tracker_features(
    backbone: nn.Module, tracker: nn.Module, images: torch.Tensor, backbone_grad: bool = True
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
    """The tracker's per-level features of `images` ([B, 3, S, S]): (HW)BC feature and position lists, sizes.

    `backbone` is the detector's `SAM3VLBackbone`; its neck's SAM2 branch gives the features SAM3's
    video model hands its tracker (computed without autograd unless `backbone_grad`), and the
    tracker's mask decoder projects the two finest levels.
    """
    with torch.set_grad_enabled(backbone_grad and torch.is_grad_enabled()):
        out = backbone.forward_image(images)["sam2_backbone_out"]
    decoder = tracker.sam_mask_decoder
    fpn = list(out["backbone_fpn"])
    fpn[0], fpn[1] = decoder.conv_s0(fpn[0]), decoder.conv_s1(fpn[1])
    levels = {"backbone_fpn": fpn, "vision_pos_enc": list(out["vision_pos_enc"])}
    _, feats, pos, sizes = tracker._prepare_backbone_features(levels)
    return feats, pos, sizes


def add_tracker_neck(detector: nn.Module, replace: bool = False) -> None:
    """Give the detector the tracker's neck (`sam2_convs`): a copy of its own neck, as sam3 builds it.

    `replace`: copy the neck again (after loading weights that had no tracker neck).
    """
    neck = detector.backbone.vision_backbone
    if neck.sam2_convs is None or replace:
        neck.sam2_convs = copy.deepcopy(neck.convs)


def error_click(
    gt: torch.Tensor, pred: torch.Tensor | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One click per object ([N, 1, S, S] bool masks): uniform over the error pixels, labelled to correct them.

    A false-negative pixel gives a positive click, a false-positive one a negative click; with
    `pred` None every ground-truth pixel is a false negative (a click from the ground truth). Where
    the prediction is already right everywhere, a negative click on the background. Same
    semantics as SAM2's ``sample_random_points_from_errors``. Returns [N, 1, 2] (x, y) and [N, 1].
    """
    pred = torch.zeros_like(gt) if pred is None else pred
    negatives = ~gt & pred
    positives = gt & ~pred
    right = (gt == pred).flatten(1).all(dim=1)[:, None, None, None]
    negatives = negatives | (right & ~gt)
    count, _, height, width = gt.shape
    noise = torch.rand(count, 2, height, width, generator=generator, device=gt.device)
    weights = noise * torch.cat([negatives, positives], dim=1)
    flat = weights.flatten(1).argmax(dim=1)
    labels = torch.where(flat >= height * width, POSITIVE, NEGATIVE).to(torch.int32)
    pixel = flat % (height * width)
    points = torch.stack([pixel % width, pixel // width], dim=1).to(torch.float32)
    return points[:, None], labels[:, None]


@dataclass
class TrackingSettings:
    """How the tracker is driven in training (SAM2's defaults; the prompts themselves come with each clip)."""

    # the ground truth decides whether a frame's memory and object pointer hold the object
    teacher_force_obj_scores: bool = True
    # probability of dropping a random part of the spatial memory when tracking a frame (sam3's knob; 0: off)
    spatial_memory_dropout: float = 0.0


def prepare_tracker(tracker: nn.Module, settings: TrackingSettings, seed: int) -> None:
    """Set the training attributes sam3's tracker reads but does not define (`teacher_force_obj_scores_for_mem`, ...).

    `rng` drives sam3's spatial-memory dropout; seeded, so every rank drops alike.
    """
    import numpy as np

    tracker.teacher_force_obj_scores_for_mem = settings.teacher_force_obj_scores
    tracker.prob_to_dropout_spatial_mem = settings.spatial_memory_dropout
    tracker.rng = np.random.default_rng(seed)


def _concat_points(prompt: dict[str, torch.Tensor] | None, points: torch.Tensor, labels: torch.Tensor) -> dict:
    if prompt is None:
        return {"point_coords": points, "point_labels": labels}
    return {
        "point_coords": torch.cat([prompt["point_coords"], points], dim=1),
        "point_labels": torch.cat([prompt["point_labels"], labels], dim=1),
    }


class ClipTracker:
    """Tracks the objects of one clip through its frames with `tracker`; `run` returns every frame's steps."""

    def __init__(
        self,
        tracker: nn.Module,
        feats: list[torch.Tensor],
        pos: list[torch.Tensor],
        sizes: list[tuple[int, int]],
        clip: TrackerClip,
        first_image: int,
    ) -> None:
        self.tracker, self.clip, self.sizes = tracker, clip, sizes
        self.feats, self.pos, self.first_image = feats, pos, first_image
        self.count = len(clip.track_ids)
        self.generator = torch.Generator(device=clip.masks.device).manual_seed(clip.seed)
        self.output: dict[str, dict[int, dict[str, Any]]] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}

    def _frame_features(self, t: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Frame t's features repeated for every object: (HW, N, C) per level."""
        index = torch.full((self.count,), self.first_image + t, dtype=torch.long, device=self.feats[0].device)
        return [x[:, index] for x in self.feats], [x[:, index] for x in self.pos]

    def _point_inputs(self, prompt: PointPrompt | None) -> dict[str, torch.Tensor] | None:
        if prompt is None:
            return None
        device = self.clip.masks.device
        return {"point_coords": prompt.coords.to(device), "point_labels": prompt.labels.to(device)}

    def run(self) -> dict[int, FrameSteps]:
        clip = self.clip
        cond = clip.cond_frames
        order = cond + [t for t in range(clip.num_frames) if t not in cond]
        steps: dict[int, FrameSteps] = {}
        for t in order:
            prompt = clip.prompts[cond.index(t)] if t in cond else None
            steps[t] = self._step(t, t in cond, prompt)
        return steps

    def _step(self, t: int, is_cond: bool, prompt: PointPrompt | None) -> FrameSteps:
        tracker, clip = self.tracker, self.clip
        feats, pos = self._frame_features(t)
        count, channels = self.count, tracker.hidden_dim
        high_res = [x.permute(1, 2, 0).reshape(count, x.shape[2], *s) for x, s in zip(feats[:-1], self.sizes[:-1])]
        gt = clip.masks[t][:, None]  # [N, 1, S, S]
        points = self._point_inputs(prompt) if is_cond else None
        mask_input = gt.float() if is_cond and prompt is None else None
        if mask_input is not None:
            pix = feats[-1].permute(1, 2, 0).reshape(count, channels, *self.sizes[-1])
            outputs = tracker._use_mask_as_output(pix, high_res, mask_input)
        else:
            with cpu_compat.cuda_calls_on_cpu():  # the memory read moves memories to "cuda"
                pix = tracker._prepare_memory_conditioned_features(
                    frame_idx=t,
                    is_init_cond_frame=is_cond,
                    current_vision_feats=feats[-1:],
                    current_vision_pos_embeds=pos[-1:],
                    feat_sizes=self.sizes[-1:],
                    output_dict=self.output,
                    num_frames=clip.num_frames,
                )
            outputs = tracker._forward_sam_heads(
                backbone_features=pix,
                point_inputs=points,
                mask_inputs=None,
                high_res_features=high_res,
                multimask_output=tracker._use_multimask(is_cond, points),
                gt_masks=gt,
            )
        _, high_multi, ious, low, high, obj_ptr, scores = outputs
        frame = FrameSteps([high_multi], [ious], [scores])
        if t in clip.correct_frames:
            points, high, obj_ptr = self._correct(t, is_cond, points, pix, high_res, gt, (low, high, obj_ptr), frame)
        self._remember(t, is_cond, feats, points, high, obj_ptr, frame)
        return frame

    def _correct(
        self,
        t: int,
        is_cond: bool,
        points: dict[str, torch.Tensor] | None,
        pix: torch.Tensor,
        high_res: list[torch.Tensor],
        gt: torch.Tensor,
        predicted: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        frame: FrameSteps,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Corrective clicks one at a time, each with the previous logits fed back; every step kept in `frame`.

        `predicted`: the frame's low-res logits, input-size logits and object pointer so far; the
        points (with the clicks), the final input-size logits and object pointer are returned.
        """
        tracker = self.tracker
        low, high, obj_ptr = predicted
        for use_gt in self.clip.gt_clicks[self.clip.correct_frames.index(t)].tolist():
            click, label = error_click(gt, None if use_gt else high > 0, self.generator)
            points = _concat_points(points, click, label)
            _, high_multi, ious, low, high, obj_ptr, scores = tracker._forward_sam_heads(
                backbone_features=pix,
                point_inputs=points,
                mask_inputs=low,
                high_res_features=high_res,
                multimask_output=tracker._use_multimask(is_cond, points),
                gt_masks=gt,
            )
            frame.multimasks.append(high_multi)
            frame.ious.append(ious)
            frame.object_scores.append(scores)
        return points, high, obj_ptr

    def _remember(
        self,
        t: int,
        is_cond: bool,
        feats: list[torch.Tensor],
        points: dict[str, torch.Tensor] | None,
        high: torch.Tensor,
        obj_ptr: torch.Tensor,
        frame: FrameSteps,
    ) -> None:
        """The frame's final prediction encoded into memory; conditioning frames (and corrected ones) as conditioning.

        With SAM3's memory selection the frame's memory score (object score x predicted IoU) is kept
        too, as sam3's `track_step` keeps it: later frames choose their memories by it.
        """
        tracker = self.tracker
        scores = frame.object_scores[-1]
        features, position = tracker._encode_new_memory(
            image=None,
            current_vision_feats=feats,
            feat_sizes=self.sizes,
            pred_masks_high_res=high,
            object_score_logits=scores,
            is_mask_from_pts=points is not None,
        )
        out = {"obj_ptr": obj_ptr, "maskmem_features": features, "maskmem_pos_enc": position}
        if tracker.use_memory_selection:
            out["eff_iou_score"] = tracker.cal_mem_score(scores, frame.ious[-1].max(-1)[0])
        kind = "cond_frame_outputs" if is_cond or t in self.clip.correct_frames else "non_cond_frame_outputs"
        self.output[kind][t] = out


def track_clips(
    backbone: nn.Module, tracker: nn.Module, batch: TrackerBatch, backbone_grad: bool
) -> list[dict[int, FrameSteps]]:
    """Every clip of the batch tracked; per clip, frame position -> its steps.

    The backbone runs once on all frames, with autograd only if `backbone_grad` (stage joint).
    """
    feats, pos, sizes = tracker_features(backbone, tracker, batch.images, backbone_grad)
    results = []
    first = 0
    for clip in batch.clips:
        results.append(ClipTracker(tracker, feats, pos, sizes, clip, first).run())
        first += clip.num_frames
    return results


class VideoClipModel(VideoClipDetector):
    """The detector and SAM3's tracker in training; the state dict is SAM3's layout (`detector.*`, `tracker.*`).

    One forward for DDP whatever the stage: a detector clip batch gives the detector's stages (as
    `VideoClipDetector`), a `TrackerBatch` the tracked clips, a `JointBatch` both. With
    `frozen_detector` (stage tracker) the detector stays in eval mode when the model trains, so
    the tracker sees the features it will see in inference (no drop-path or dropout).
    """

    def __init__(self, detector: nn.Module, tracker: nn.Module, frozen_detector: bool = False) -> None:
        super().__init__(detector)
        self.tracker = tracker
        self.frozen_detector = frozen_detector

    def train(self, mode: bool = True) -> VideoClipModel:
        super().train(mode)
        if self.frozen_detector:
            self.detector.eval()
        return self

    def track(self, batch: TrackerBatch) -> list[dict[int, FrameSteps]]:
        backbone_grad = any(p.requires_grad for p in self.detector.backbone.vision_backbone.parameters())
        return track_clips(self.detector.backbone, self.tracker, batch, backbone_grad)

    def forward(self, batch: Any, with_targets: bool | None = None) -> Any:
        if isinstance(batch, TrackerBatch):
            return self.track(batch)
        if isinstance(batch, JointBatch):
            return super().forward(batch.detector, with_targets), self.track(batch.tracker)
        return super().forward(batch, with_targets)


def build_video_clip_model(cfg: ModelConfig, frozen_detector: bool = False) -> VideoClipModel:
    """The detector (with its tracker's neck) and SAM3's tracker at the sizes of `cfg`, weights initialised."""
    from sam3_core.model.build import build_detector

    detector = build_detector(cfg)
    add_tracker_neck(detector)
    return VideoClipModel(detector, build_tracker(cfg, predictor=False), frozen_detector=frozen_detector)


def load_video_clip_weights(module: VideoClipModel, uri: str) -> None:
    """A checkpoint's `detector.*` and `tracker.*` weights, whichever it has (ours, an export, SAM3's).

    A checkpoint without the tracker's neck (a detector trained here) leaves it a copy of the
    loaded detector neck, as sam3 builds it; one without `tracker.*` leaves the tracker as built.
    """
    report, _ = load_video_model_weights(module, uri)
    if any(key.startswith(TRACKER_NECK_PREFIX) for key in report.missing):
        add_tracker_neck(module.detector, replace=True)
        log.info("%s has no tracker neck: it starts as a copy of the detector's neck", uri)


def load_tracker_weights(module: VideoClipModel, uri: str) -> None:
    """The whole tracker of a checkpoint in SAM3's layout (SAM3's sam3.pt, an export, a tracker run's best.pt):
    its `tracker.*` and the tracker's neck, every one of them, nothing of the detector."""
    from sam3_core.errors import InputError
    from sam3_core.model.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(uri, mmap=True)
    state = checkpoint.get("model", checkpoint)
    tracker = {
        key: value
        for key, value in state.items()
        if key.startswith((TRACKER_PREFIX, TRACKER_NECK_PREFIX)) and isinstance(value, torch.Tensor)
    }
    own = {
        key: value
        for key, value in module.state_dict().items()
        if key.startswith((TRACKER_PREFIX, TRACKER_NECK_PREFIX))
    }
    absent = sorted(set(own) - set(tracker))
    if absent:
        raise InputError(
            uri,
            absent[0],
            f"missing, with {len(absent) - 1} more tracker weights: pass a checkpoint in SAM3's video layout "
            "(sam3.pt, an export, the best.pt of a tracker run)",
        )
    for key, value in tracker.items():
        if key not in own:
            raise InputError(uri, key, "is not a weight of SAM3's tracker at this preset; check model.tracker")
        if own[key].shape != value.shape:
            raise InputError(
                uri, key, f"shape {tuple(value.shape)} does not fit the tracker's {tuple(own[key].shape)}; check model"
            )
    module.load_state_dict(tracker, strict=False)
    log.info("loaded the tracker (%d tensors, its neck included) from %s", len(tracker), uri)
