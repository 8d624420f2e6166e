"""Link one video's per-frame detections into masklets (object tracks) for video mAP.

The detector sees frames independently; video metrics need one track per object. For each
category, every frame's detections are matched to the masklets still active (seen within
`max_missed_frames`) by the IoU of the masklet's last detection, masks when both sides have
them and boxes otherwise. A detection left unmatched starts a new masklet, and a masklet not
matched in a frame gets a null entry there, as the YTVIS results format expects.

A masklet's box in a frame is its mask's bounding box when detections have masks, as SAM3's video
predictor reports it (and `inference=sam3_video`): the masks are what was linked, and the box head
of the query that painted a mask may place its box elsewhere. Without masks it is the detector's box.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import fmean

import numpy as np
import pycocotools.mask as mask_utils
from scipy.optimize import linear_sum_assignment

from sam3_core.config_checks import check_choice, check_float, check_int
from sam3_core.predict.postprocess import FrameDetections, rle_box_xywh, xyxy_to_xywh

logger = logging.getLogger(__name__)

MATCHERS = ("hungarian", "greedy")
SCORE_REDUCTIONS = ("mean", "max")


@dataclass
class AssociationConfig:
    """How detections are linked across frames and which masklets are reported."""

    # "hungarian": best total IoU per frame; "greedy": best pair first
    matcher: str = "hungarian"
    # a detection continues a masklet when their IoU reaches this
    iou_threshold: float = 0.5
    # frames a masklet may go unmatched and still be continued
    max_missed_frames: int = 5
    # a masklet's score from its detections' scores
    score_reduction: str = "mean"
    # masklets reported per (video, category), best first
    top_k: int = 100

    def __post_init__(self) -> None:
        check_choice("association.matcher", self.matcher, MATCHERS)
        check_float("association.iou_threshold", self.iou_threshold, 0.0, 1.0, low_open=True)
        check_int("association.max_missed_frames", self.max_missed_frames, minimum=0)
        check_choice("association.score_reduction", self.score_reduction, SCORE_REDUCTIONS)
        check_int("association.top_k", self.top_k, minimum=1)


@dataclass
class _Masklet:
    hits: dict[int, int] = field(default_factory=dict)  # frame index -> detection index in that frame
    last_frame: int = -1

    def extend(self, frame_index: int, detection: int) -> None:
        self.hits[frame_index] = detection
        self.last_frame = frame_index


def match(iou: np.ndarray, threshold: float, matcher: str) -> list[tuple[int, int]]:
    """(row, column) pairs of a one-to-one matching whose IoUs are all >= threshold.

    Hungarian maximises the total IoU of valid pairs (pairs below the threshold count as
    zero, so they never displace a valid one); greedy takes the best remaining pair first,
    ties going to the lower row, then the lower column.
    """
    if iou.size == 0:
        return []
    if matcher == "hungarian":
        rows, cols = linear_sum_assignment(np.where(iou >= threshold, iou, 0.0), maximize=True)
        return [(int(r), int(c)) for r, c in zip(rows, cols) if iou[r, c] >= threshold]
    pairs: list[tuple[int, int]] = []
    used_rows: set[int] = set()
    used_cols: set[int] = set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        row, col = divmod(int(flat), iou.shape[1])
        if iou[row, col] < threshold:
            break
        if row not in used_rows and col not in used_cols:
            pairs.append((row, col))
            used_rows.add(row)
            used_cols.add(col)
    return pairs


def _iou_to_last(
    frames: Sequence[FrameDetections], masklets: list[_Masklet], frame_index: int, detections: list[int]
) -> np.ndarray:
    """[masklets, detections] IoU between each masklet's last detection and this frame's detections."""
    current = frames[frame_index]
    last = [(frames[m.last_frame], m.hits[m.last_frame]) for m in masklets]
    if current.rles is not None and all(frame.rles is not None for frame, _ in last):
        previous: list | np.ndarray = [frame.rles[j] for frame, j in last]  # type: ignore[index]
        now: list | np.ndarray = [current.rles[j] for j in detections]
    else:
        previous = np.array([xyxy_to_xywh(frame.boxes_xyxy[j]) for frame, j in last], dtype=np.float64)
        now = np.array([xyxy_to_xywh(current.boxes_xyxy[j]) for j in detections], dtype=np.float64)
    iou = mask_utils.iou(previous, now, [0] * len(detections))
    return np.asarray(iou, dtype=np.float64).reshape(len(masklets), len(detections))


def _track_category(frames: Sequence[FrameDetections], category_id: int, cfg: AssociationConfig) -> list[_Masklet]:
    masklets: list[_Masklet] = []
    for t, frame in enumerate(frames):
        detections = [j for j, cat in enumerate(frame.category_ids) if cat == category_id]
        if not detections:
            continue
        active = [m for m in masklets if t - m.last_frame - 1 <= cfg.max_missed_frames]
        matched: set[int] = set()
        if active:
            iou = _iou_to_last(frames, active, t, detections)
            for row, col in match(iou, cfg.iou_threshold, cfg.matcher):
                active[row].extend(t, detections[col])
                matched.add(col)
        for col, detection in enumerate(detections):
            if col not in matched:
                masklet = _Masklet()
                masklet.extend(t, detection)
                masklets.append(masklet)
    return masklets


def _ytvis_result(
    masklet: _Masklet, frames: Sequence[FrameDetections], video_id: int, category_id: int, score_reduction: str
) -> dict:
    bboxes: list[list[float] | None] = []
    segmentations: list[dict | None] = []
    areas: list[float | None] = []
    scores: list[float] = []
    for t, frame in enumerate(frames):
        j = masklet.hits.get(t)
        if j is None:
            bboxes.append(None)
            segmentations.append(None)
            areas.append(None)
            continue
        rle = frame.rles[j] if frame.rles is not None else None
        box = xyxy_to_xywh(frame.boxes_xyxy[j]) if rle is None else rle_box_xywh(rle)
        bboxes.append(box)
        segmentations.append(rle)
        areas.append(frame.areas[j] if frame.areas is not None else box[2] * box[3])
        scores.append(frame.scores[j])
    return {
        "video_id": video_id,
        "category_id": category_id,
        "score": fmean(scores) if score_reduction == "mean" else max(scores),
        "bboxes": bboxes,
        "segmentations": segmentations,
        "areas": areas,
    }


def associate(frames: Sequence[FrameDetections], video_id: int, cfg: AssociationConfig) -> list[dict]:
    """YTVIS results for one video; `frames` holds every frame in order, empty ones included.

    Categories come out in ascending id, each with its `top_k` best masklets by score.
    """
    results: list[dict] = []
    for category_id in sorted({cat for frame in frames for cat in frame.category_ids}):
        masklets = _track_category(frames, category_id, cfg)
        entries = [_ytvis_result(m, frames, video_id, category_id, cfg.score_reduction) for m in masklets]
        entries.sort(key=lambda entry: entry["score"], reverse=True)
        results.extend(entries[: cfg.top_k])
        logger.debug(
            "video %s category %s: %d masklets, kept %d",
            video_id,
            category_id,
            len(entries),
            min(len(entries), cfg.top_k),
        )
    return results
