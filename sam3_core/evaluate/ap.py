"""COCO average precision on masklets: YT-VIS class mAP and video phrase AP, as sam3 computes them.

The reference is sam3's ``YTVISeval`` (pycocotools' COCOeval where an "image" is a video and an
object a whole masklet), used by ``YTVISPredFileEvaluator`` (class mAP: categories kept apart) and
``VideoPhraseApEvaluator`` (phrase AP: every (video, phrase) pair an image of one category). Both
start from the same per-(video, category) matching, computed once:

- predictions sorted by score (stable) and cut at ``max_dets[-1]``; greedy matching at IoU
  .50:.05:.95 against the GT of the pair, crowd GT ignored (a prediction matched to one is neither
  TP nor FP), ties between equal IoUs resolved as COCO's loop does;
- area ranges on the masklet's *mean* per-frame area with YT-VIS bounds (128², 256²): GT from its
  ``areas`` (null = 0), predictions from their boxes (sam3's ``loadRes``), see :mod:`.videodata`.

sam3 computes the masklet IoU with one Python call per (prediction, GT, frame) and runs COCOeval
over every category of the GT file (51,248 for SA-Co) x every video; here matching is vectorised
over area ranges and thresholds, and only (video, category) pairs with GT or predictions exist.
Categories without GT have no precision (-1) and are left out of every mean, as in COCO.

Deliberate differences, none of which changes results on valid inputs: box IoU is float64 (the
reference sums float32 torch tensors, so an IoU within ~1e-7 of a threshold may round the other
way); an empty predictions list scores 0 (the reference raises); a GT masklet with id 0 counts as
matched (pycocotools tests the id's truthiness).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from sam3_core.evaluate.coco import EvalArrays, Evaluation, summarize
from sam3_core.evaluate.family import Scoring, VideoContext
from sam3_core.evaluate.videodata import Masklet

# Mean masklet area in pixels: all, small (< 128²), medium (< 256²), large, as in YT-VIS.
VIDEO_AREA_RANGES = np.array([[0.0, 1e5**2], [0.0, 128.0**2], [128.0**2, 256.0**2], [256.0**2, 1e5**2]])
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
METRIC_PREFIX = {"bbox": "video_bbox", "segm": "video_mask"}


@dataclass(frozen=True)
class Matches:
    """Greedy COCO matching of one (video, category) for every area range and IoU threshold."""

    scores: np.ndarray  # [D] sorted descending
    matched: np.ndarray  # [A, T, D]
    ignored: np.ndarray  # [A, T, D]
    gt_ignored: np.ndarray  # [A, G]


def sorted_predictions(predictions: Sequence[Masklet], max_det: int) -> list[Masklet]:
    """Highest score first (stable, as COCO's mergesort), at most ``max_det``."""
    order = np.argsort([-p.score for p in predictions], kind="mergesort")[:max_det]
    return [predictions[i] for i in order]


def _last_best(candidates: np.ndarray, ious: np.ndarray) -> np.ndarray:
    """Per [A, T]: index of the highest-IoU candidate, the last one on ties (as COCO's loop); -1 if none."""
    scored = np.where(candidates, ious, -np.inf)
    best = scored.max(-1, keepdims=True)
    is_best = candidates & (scored == best)
    last = ious.shape[-1] - 1 - np.argmax(is_best[..., ::-1], axis=-1)
    return np.where(candidates.any(-1), last, -1)


def match_group(dts: Sequence[Masklet], gts: Sequence[Masklet], ious: np.ndarray) -> Matches:
    """COCO's evaluateImg for all area ranges and thresholds at once; ``dts`` sorted by score."""
    n_areas, n_thrs, n_dt, n_gt = len(VIDEO_AREA_RANGES), len(IOU_THRESHOLDS), len(dts), len(gts)
    lo, hi = VIDEO_AREA_RANGES[:, :1], VIDEO_AREA_RANGES[:, 1:]
    gt_area = np.array([t.area for t in gts])[None]
    crowd = np.array([t.crowd for t in gts], dtype=bool)
    gt_ignored = crowd[None] | (gt_area < lo) | (gt_area > hi)  # [A, G]
    thresholds = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)[None, :, None]
    taken = np.zeros((n_areas, n_thrs, n_gt), dtype=bool)
    matched = np.zeros((n_areas, n_thrs, n_dt), dtype=bool)
    ignored = np.zeros((n_areas, n_thrs, n_dt), dtype=bool)
    area_idx, thr_idx = np.meshgrid(np.arange(n_areas), np.arange(n_thrs), indexing="ij")
    # a prediction below the lowest threshold against every GT cannot match: skip it
    candidates = np.flatnonzero(ious.max(axis=1) >= thresholds.min()) if n_gt and n_dt else []
    for d in candidates:
        iou = np.broadcast_to(ious[d], (n_areas, n_thrs, n_gt))
        free = (iou >= thresholds) & ~(taken & ~crowd)
        regular = _last_best(free & ~gt_ignored[:, None], iou)
        fallback = _last_best(free & gt_ignored[:, None], iou)
        m = np.where(regular >= 0, regular, fallback)
        hit = m >= 0
        matched[:, :, d] = hit
        ignored[:, :, d] = hit & gt_ignored[area_idx, np.maximum(m, 0)]
        taken[area_idx[hit], thr_idx[hit], m[hit]] = True
    dt_area = np.array([t.area for t in dts])[None]
    outside = (dt_area < lo) | (dt_area > hi)  # [A, D]
    ignored |= ~matched & outside[:, None]
    return Matches(np.array([t.score for t in dts], dtype=float), matched, ignored, gt_ignored)


def video_matches(video: VideoContext, scoring: Scoring) -> dict[tuple[int, str], Matches]:
    """The matching of every (category, IoU type) of one video with GT or predictions.

    Class mAP and phrase AP read the same matching: the first of them to ask computes it.
    """

    def compute() -> dict[tuple[int, str], Matches]:
        gts, predictions = video.gts_by_category, video.predictions_by_category
        out = {}
        for category in sorted(set(gts) | set(predictions)):
            dts = sorted_predictions(predictions.get(category, []), scoring.max_dets[-1])
            group = gts.get(category, [])
            for iou_type in scoring.iou_types:
                out[category, iou_type] = match_group(dts, group, video.track_iou(iou_type, dts, group))
        return out

    return video.shared(("ap_matches", scoring.iou_types, scoring.max_dets[-1]), compute)


def matches_of(parts: Mapping[int, dict[tuple[int, str], Matches]], iou_type: str) -> dict[tuple[int, int], Matches]:
    """Every video's matches of one IoU type, keyed by (video, category)."""
    return {(v, c): m for v, part in parts.items() for (c, t), m in part.items() if t == iou_type}


def precision_recall(group: Sequence[Matches], max_det: int) -> tuple[np.ndarray, np.ndarray]:
    """COCO's accumulate for one category and max_det over its images: precision [T, R, A], recall [T, A]."""
    n_areas, n_thrs, n_rec = len(VIDEO_AREA_RANGES), len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)
    precision = -np.ones((n_thrs, n_rec, n_areas))
    recall = -np.ones((n_thrs, n_areas))
    if not group:
        return precision, recall
    scores = np.concatenate([g.scores[:max_det] for g in group])
    order = np.argsort(-scores, kind="mergesort")
    for a in range(n_areas):
        n_pos = int(sum(np.count_nonzero(~g.gt_ignored[a]) for g in group))
        if n_pos == 0:
            continue
        matched = np.concatenate([g.matched[a, :, :max_det] for g in group], axis=1)[:, order]
        ignored = np.concatenate([g.ignored[a, :, :max_det] for g in group], axis=1)[:, order]
        tp = np.cumsum(matched & ~ignored, axis=1, dtype=float)
        fp = np.cumsum(~matched & ~ignored, axis=1, dtype=float)
        if tp.shape[1] == 0:
            precision[:, :, a], recall[:, a] = 0.0, 0.0
            continue
        rc = tp / n_pos
        pr = np.maximum.accumulate((tp / (fp + tp + np.spacing(1)))[:, ::-1], axis=1)[:, ::-1]
        recall[:, a] = rc[:, -1]
        for t in range(n_thrs):
            at = np.searchsorted(rc[t], RECALL_THRESHOLDS, side="left")
            reached = at < len(rc[t])
            precision[t, :, a] = np.where(reached, pr[t, np.minimum(at, len(rc[t]) - 1)], 0.0)
    return precision, recall


def _arrays(
    groups: Sequence[Sequence[Matches]], category_ids: tuple[int, ...], max_dets: tuple[int, int, int]
) -> EvalArrays:
    shape = (len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(groups), len(VIDEO_AREA_RANGES), len(max_dets))
    precision, recall = -np.ones(shape), -np.ones((shape[0], *shape[2:]))
    for k, group in enumerate(groups):
        for m, max_det in enumerate(max_dets):
            precision[:, :, k, :, m], recall[:, k, :, m] = precision_recall(group, max_det)
    return EvalArrays(
        precision=precision,
        recall=recall,
        iou_thrs=IOU_THRESHOLDS,
        rec_thrs=RECALL_THRESHOLDS,
        category_ids=category_ids,
        max_dets=max_dets,
    )


def class_map(matches: dict[tuple[int, int], Matches], iou_type: str, max_dets: tuple[int, int, int]) -> Evaluation:
    """YT-VIS class mAP from the matches of every (video, category) pair with GT or predictions."""
    by_category: dict[int, list[Matches]] = {}
    for video_id, category_id in sorted(matches):  # images of a category in video id order, as COCO's imgIds
        by_category.setdefault(category_id, []).append(matches[video_id, category_id])
    category_ids = tuple(sorted(by_category))
    arrays = _arrays([by_category[c] for c in category_ids], category_ids, max_dets)
    stats, prefix = summarize(arrays), METRIC_PREFIX[iou_type]
    metrics = {f"{prefix}_mAP_50_95": stats["AP"], f"{prefix}_mAP_50": stats["AP50"], f"{prefix}_mAP_75": stats["AP75"]}
    return Evaluation(name=prefix, metrics=metrics, arrays=arrays)


def phrase_ap(matches: dict[tuple[int, int], Matches], iou_type: str, max_dets: tuple[int, int, int]) -> Evaluation:
    """Video phrase AP: every (video, phrase) pair an image of a single category, in sorted pair order."""
    arrays = _arrays([[matches[pair] for pair in sorted(matches)]], (0,), max_dets)
    stats, prefix = summarize(arrays), f"{METRIC_PREFIX[iou_type]}_phrase_ap"
    metrics = {f"{prefix}_50_95": stats["AP"], f"{prefix}_50": stats["AP50"], f"{prefix}_75": stats["AP75"]}
    return Evaluation(name=prefix, metrics=metrics, arrays=arrays, per_category=False)
