"""``inference=vos``: semi-supervised video object segmentation with SAM3's tracker (SAM2's protocol).

Every ground-truth object of the split (a track of ``<split>.json``) is prompted once, by its
mask on its first visible frame, and propagated by the tracker to the end of the video; nothing
else (no detector, no clicks) guides it. This is how SAM2 and DAVIS 2017 evaluate semi-supervised
VOS, and what the ``vos`` family of evaluate scores (J, F, J&F).

Per frame the tracker runs in eval mode with the same building blocks as in training
(`sam3_core.model.tracker_training`): the prompted frame's mask is the output itself and the
conditioning memory; every later frame attends to that memory, to the memories of the frames
before it (SAM3's memory selection when the tracker has it on) and to the object pointers, and
decodes with multimask output, the mask with the best predicted IoU kept. Objects whose first
frame is the same are tracked as one batch; each frame's features are computed once for all of
them (frames are read one at a time). Memory stays bounded on long videos: spatial memories
that can no longer be attended are dropped as the video advances; only the object pointers and
scores of past frames (a vector per object and frame) are kept.

Predictions: one YT-VIS masklet per object, with ``gt_id`` (the track that prompted it),
``category_id`` (its category), ``score`` (its mean object probability over the frames from the
prompt on), and the frame masks at the video's resolution (the low-resolution logits upsampled
bilinearly and thresholded at 0, as SAM3's predictor does); also COCO frame results of those
masks, so frame metrics and previews work too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F
from torch import nn

from sam3_core.data.datapoints import frame_to_tensor, resize_mask
from sam3_core.data.ytvis import Track, Video, rle_to_mask
from sam3_core.model import cpu_compat
from sam3_core.model.tracker_training import tracker_features
from sam3_core.predict.postprocess import FrameDetections, encode_mask, rle_box_xywh, rle_box_xyxy

log = logging.getLogger(__name__)


@dataclass
class _Group:
    """Objects prompted on the same frame, tracked as one batch with one memory bank."""

    first: int
    tracks: list[Track]
    output: dict[str, dict[int, dict[str, Any]]] = field(
        default_factory=lambda: {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    )


def first_visible(track: Track) -> int | None:
    return next((t for t, rle in enumerate(track.segmentations) if rle is not None), None)


def _groups(tracks: list[Track]) -> list[_Group]:
    firsts: dict[int, list[Track]] = {}
    for track in sorted(tracks, key=lambda t: t.id):
        first = first_visible(track)
        if first is not None:
            firsts.setdefault(first, []).append(track)
    return [_Group(first, members) for first, members in sorted(firsts.items())]


class VideoPropagation:
    """One video through the tracker: every GT object prompted on its first frame, followed to the end.

    `image(t)`: frame t as the model's normalised input [3, S, S].
    """

    def __init__(
        self, model: nn.Module, video: Video, tracks: list[Track], image: Callable[[int], torch.Tensor]
    ) -> None:
        self.detector, self.tracker = model.detector, model.tracker
        self.video, self.image = video, image
        self.groups = _groups(tracks)
        self.device = next(model.parameters()).device
        # per object (track id): the frame masks (None where empty) and the object probabilities
        self.masks: dict[int, list[dict | None]] = {}
        self.probs: dict[int, list[float]] = {}
        self.frame_probs: dict[int, dict[int, float]] = {}

    def _prompt(self, group: _Group, t: int) -> torch.Tensor:
        size = self.tracker.image_size
        masks = [resize_mask(rle_to_mask(track.segmentations[t]), size) for track in group.tracks]
        return torch.stack(masks)[:, None].float().to(self.device)

    @torch.no_grad()
    def run(self) -> None:
        for t in range(self.video.length):
            active = [group for group in self.groups if group.first <= t]
            if not active:
                continue
            feats, pos, sizes = tracker_features(
                self.detector.backbone, self.tracker, self.image(t)[None].to(self.device), backbone_grad=False
            )
            for group in active:
                self._step(group, t, feats, pos, sizes)

    def _step(
        self,
        group: _Group,
        t: int,
        feats: list[torch.Tensor],
        pos: list[torch.Tensor],
        sizes: list[tuple[int, int]],
    ) -> None:
        tracker = self.tracker
        count = len(group.tracks)
        index = torch.zeros(count, dtype=torch.long, device=self.device)
        feats, pos = [x[:, index] for x in feats], [x[:, index] for x in pos]
        high_res = [x.permute(1, 2, 0).reshape(count, x.shape[2], *s) for x, s in zip(feats[:-1], sizes[:-1])]
        is_cond = t == group.first
        if is_cond:
            pix = feats[-1].permute(1, 2, 0).reshape(count, tracker.hidden_dim, *sizes[-1])
            outputs = tracker._use_mask_as_output(pix, high_res, self._prompt(group, t))
        else:
            with cpu_compat.cuda_calls_on_cpu():  # the memory read moves memories to "cuda"
                pix = tracker._prepare_memory_conditioned_features(
                    frame_idx=t,
                    is_init_cond_frame=False,
                    current_vision_feats=feats[-1:],
                    current_vision_pos_embeds=pos[-1:],
                    feat_sizes=sizes[-1:],
                    output_dict=group.output,
                    num_frames=self.video.length,
                )
            outputs = tracker._forward_sam_heads(
                backbone_features=pix,
                point_inputs=None,
                mask_inputs=None,
                high_res_features=high_res,
                multimask_output=tracker._use_multimask(False, None),
            )
        _, _, ious, low, high, obj_ptr, scores = outputs
        features, position = tracker._encode_new_memory(
            image=None,
            current_vision_feats=feats,
            feat_sizes=sizes,
            pred_masks_high_res=high,
            object_score_logits=scores,
            is_mask_from_pts=False,
        )
        out = {"obj_ptr": obj_ptr, "maskmem_features": features, "maskmem_pos_enc": position}
        if tracker.use_memory_selection:
            out["eff_iou_score"] = tracker.cal_mem_score(scores, ious.max(-1)[0])
        group.output["cond_frame_outputs" if is_cond else "non_cond_frame_outputs"][t] = out
        self._forget(group, t)
        self._record(group, t, low, scores)

    def _forget(self, group: _Group, t: int) -> None:
        """Drop the spatial memories no later frame can attend: older than the last num_maskmem - 1 candidates.

        Candidates are the past non-conditioning frames (with memory selection, those scoring
        above its threshold, plus the latest frame, which is always attended).
        """
        tracker = self.tracker
        past = group.output["non_cond_frame_outputs"]
        held = [f for f in sorted(past) if "maskmem_features" in past[f]]
        if tracker.use_memory_selection:
            good = [f for f in held if float(past[f]["eff_iou_score"]) > tracker.mf_threshold]
            keep = set(good[-(tracker.num_maskmem - 1) :]) | {t}
        else:
            keep = set(held[-(tracker.num_maskmem - 1) :])
        for f in held:
            if f not in keep:
                past[f] = {key: value for key, value in past[f].items() if not key.startswith("maskmem_")}

    def _record(self, group: _Group, t: int, low: torch.Tensor, scores: torch.Tensor) -> None:
        height, width = self.video.height, self.video.width
        upsampled = F.interpolate(low.float(), size=(height, width), mode="bilinear", align_corners=False)
        probs = torch.sigmoid(scores[:, 0].float()).tolist()
        for k, track in enumerate(group.tracks):
            mask = upsampled[k, 0] > 0
            masks = self.masks.setdefault(track.id, [None] * self.video.length)
            masks[t] = encode_mask(mask) if bool(mask.any()) else None
            self.probs.setdefault(track.id, []).append(probs[k])
            self.frame_probs.setdefault(t, {})[track.id] = probs[k]

    def masklets(self) -> list[dict]:
        """YT-VIS results, one per prompted object, with the id of the track that prompted it."""
        results = []
        for group in self.groups:
            for track in group.tracks:
                rles = self.masks[track.id]
                results.append(
                    {
                        "video_id": self.video.id,
                        "category_id": track.category_id,
                        "gt_id": track.id,
                        "score": float(np.mean(self.probs[track.id])),
                        "segmentations": rles,
                        "bboxes": [None if rle is None else rle_box_xywh(rle) for rle in rles],
                        "areas": [float(mask_utils.area(rle)) if rle is not None else None for rle in rles],
                    }
                )
        return results

    def frames(self, image_ids: dict[tuple[int, int], int]) -> list[FrameDetections]:
        """Every frame's object masks as detections (score: the object's probability on that frame)."""
        categories = {track.id: track.category_id for group in self.groups for track in group.tracks}
        frames = []
        for t in range(self.video.length):
            found = [
                (track_id, self.masks[track_id][t], prob)
                for track_id, prob in sorted(self.frame_probs.get(t, {}).items())
                if self.masks[track_id][t] is not None
            ]
            frames.append(
                FrameDetections(
                    image_id=image_ids[(self.video.id, t)],
                    height=self.video.height,
                    width=self.video.width,
                    scores=[prob for _, _, prob in found],
                    category_ids=[categories[track_id] for track_id, _, _ in found],
                    boxes_xyxy=[rle_box_xyxy(rle) for _, rle, _ in found],
                    rles=[rle for _, rle, _ in found],
                    areas=[int(mask_utils.area(rle)) for _, rle, _ in found],
                )
            )
        return frames


def frame_images(read: Callable[[str], Any], video: Video, image_size: int) -> Callable[[int], torch.Tensor]:
    """Frame t of `video` as the model's input, read when asked."""

    def image(t: int) -> torch.Tensor:
        return frame_to_tensor(np.array(read(video.file_names[t])), image_size)

    return image
