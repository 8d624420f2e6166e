"""Video mAP on masklets (YouTube-VIS style), numerically the same as SAM3's own evaluator.

The reference is ``sam3.eval.saco_veval_evaluators.YTVISPredFileEvaluator``: COCO matching and
accumulation where an "image" is a video and an object is a whole track. We reimplement it with
vectorised numpy because the reference computes mask IoU with one Python call per (prediction,
ground truth, frame) triple. What it does, and so what we do:

- IoU of a predicted and a GT track = sum over frames of intersection / sum over frames of union;
  a null box or mask is an empty region; a pair that is empty in every frame has IoU 1.
- Per (video, category), predictions are sorted by score (stable) and cut at ``max_dets[-1]``;
  greedy COCO matching at IoU .50:.05:.95; ``iscrowd`` GT tracks are ignored (a prediction
  matched to one is neither true nor false positive); categories are those of the GT file.
- Area ranges use the track's *mean* per-frame area with YT-VIS bounds (128², 256²). GT area is
  the mean of its ``areas`` (null = 0); a prediction's area is the mean of its box areas (null =
  0), the mask area only when it has no boxes, as the reference's ``loadRes`` does.
- Metric names are the reference's (``video_bbox_mAP_50_95``, ``video_mask_mAP_50_95``), plus
  ``_50`` and ``_75`` named like its phrase-AP evaluator.

Deliberate differences, none of which changes results on valid inputs: box IoU is float64 (the
reference uses float32 torch tensors, so an IoU within ~1e-7 of a threshold may round the other
way); an empty predictions list scores 0 (the reference raises); a GT track with id 0 counts as
matched (pycocotools tests the id's truthiness); malformed input is an InputError naming the field.
"""

from __future__ import annotations

import functools
import logging
import numbers
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from sam3_core.errors import ConfigError, InputError
from sam3_core.evaluate.coco import (
    IOU_TYPES,
    EvalArrays,
    Evaluation,
    check_box,
    check_max_dets,
    compress_rle,
    summarize,
)

logger = logging.getLogger(__name__)

# Mean track area in pixels: all, small (< 128²), medium (< 256²), large, as in YT-VIS.
VIDEO_AREA_RANGES = np.array([[0.0, 1e5**2], [0.0, 128.0**2], [128.0**2, 256.0**2], [256.0**2, 1e5**2]])
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
METRIC_PREFIX = {"bbox": "video_bbox", "segm": "video_mask"}


@dataclass
class Track:
    """One GT or predicted object over a video: per-frame boxes (zeros where null) and masks."""

    boxes: np.ndarray | None  # [frames, 4] xywh
    masks: list[dict[str, Any] | None] | None
    area: float
    score: float = 0.0
    crowd: bool = False


@dataclass(frozen=True)
class _Video:
    length: int
    size: list[int]  # [height, width], what every mask of the video has


def _videos(gt: dict[str, Any], source: str) -> dict[int, _Video]:
    videos = gt.get("videos")
    if not isinstance(videos, list):
        raise InputError(source, "videos", "missing or not a list; a YTVIS file needs videos, annotations, categories")
    out = {}
    for i, video in enumerate(videos):
        where = f"videos[{i}]"
        if not isinstance(video, dict) or not isinstance(video.get("id"), int):
            raise InputError(source, f"{where}.id", "missing or not an integer")
        names = video.get("file_names")
        length = len(names) if isinstance(names, list) else video.get("length")
        if not isinstance(length, int) or length < 1:
            raise InputError(source, where, "needs file_names (or length) with at least one frame")
        for key in ("height", "width"):
            if not isinstance(video.get(key), int) or video[key] < 1:
                raise InputError(source, f"{where}.{key}", "missing or not a positive integer (masks must match it)")
        out[video["id"]] = _Video(length, [video["height"], video["width"]])
    return out


def _frames(track: dict[str, Any], key: str, video: _Video, source: str, where: str) -> list[Any]:
    values = track.get(key)
    if not isinstance(values, list):
        raise InputError(source, f"{where}.{key}", "missing or not a list (one entry or null per frame)")
    if len(values) != video.length:
        raise InputError(source, f"{where}.{key}", f"has {len(values)} entries but the video has {video.length} frames")
    return values


def _boxes(values: list[Any], source: str, field: str) -> np.ndarray:
    """[frames, 4] float boxes, null frames as zeros; validated in one numpy pass."""
    filled = [box if box is not None else (0.0, 0.0, 0.0, 0.0) for box in values]
    try:
        boxes = np.array(filled, dtype=float)
        valid = boxes.shape == (len(values), 4) and np.isfinite(boxes).all() and (boxes[:, 2:] >= 0).all()
    except (TypeError, ValueError):
        valid = False
    if not valid:
        # check_box is stricter than numpy's conversion, so it names the first bad box
        for t, box in enumerate(values):
            if box is not None:
                check_box(box, source, f"{field}[{t}]")
        raise InputError(source, field, "expected one [x, y, width, height] or null per frame")
    return boxes


def _masks(values: list[Any], video: _Video, source: str, field: str) -> list[dict[str, Any] | None]:
    masks: list[dict[str, Any] | None] = []
    for t, rle in enumerate(values):
        if rle is None or (type(rle) is dict and type(rle.get("counts")) is str and rle.get("size") == video.size):
            masks.append(rle)  # the common case, already compressed and the right size
            continue
        rle = compress_rle(rle, source, f"{field}[{t}]")
        if list(rle["size"]) != video.size:
            raise InputError(source, f"{field}[{t}].size", f"{rle['size']} is not the video's [h, w] {video.size}")
        masks.append(rle)
    return masks


def _mask_areas(masks: list[dict[str, Any] | None]) -> np.ndarray:
    present = [m for m in masks if m is not None]
    areas = np.zeros(len(masks))
    if present:
        areas[[t for t, m in enumerate(masks) if m is not None]] = mask_utils.area(present)
    return areas


def _read_track(
    raw: Any, video: _Video, iou_types: Sequence[str], source: str, where: str, is_gt: bool
) -> Track:
    """Boxes / masks the IoU types need, and the track's mean area (see module docstring)."""
    boxes = masks = None
    if "bbox" in iou_types or "bboxes" in raw:
        boxes = _boxes(_frames(raw, "bboxes", video, source, where), source, f"{where}.bboxes")
    if "segm" in iou_types or (is_gt and "areas" not in raw and "segmentations" in raw):
        masks = _masks(_frames(raw, "segmentations", video, source, where), video, source, f"{where}.segmentations")
    if is_gt and "areas" in raw:
        areas = _frames(raw, "areas", video, source, where)
        if not all(a is None or (isinstance(a, numbers.Real) and not isinstance(a, bool)) for a in areas):
            raise InputError(source, f"{where}.areas", "expected numbers or null, one per frame")
        area = float(np.mean([a if a is not None else 0.0 for a in areas]))
    elif masks is not None and (is_gt or boxes is None):
        area = float(np.mean(_mask_areas(masks)))
    else:
        area = float(np.mean(boxes[:, 2] * boxes[:, 3]))
    return Track(boxes=boxes, masks=masks, area=area)


def _group_gt(
    gt: dict[str, Any], videos: dict[int, _Video], category_ids: set[int], iou_types: Sequence[str], source: str
) -> dict[tuple[int, int], list[Track]]:
    annotations = gt.get("annotations")
    if not isinstance(annotations, list):
        raise InputError(source, "annotations", "missing or not a list")
    groups: dict[tuple[int, int], list[Track]] = defaultdict(list)
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]"
        if not isinstance(ann, dict):
            raise InputError(source, where, "expected an object")
        video_id, category_id = ann.get("video_id"), ann.get("category_id")
        if video_id not in videos:
            raise InputError(source, f"{where}.video_id", f"unknown video id {video_id!r}")
        if category_id not in category_ids:
            raise InputError(source, f"{where}.category_id", f"unknown category id {category_id!r}")
        track = _read_track(ann, videos[video_id], iou_types, source, where, is_gt=True)
        track.crowd = bool(ann.get("iscrowd", 0))
        groups[video_id, category_id].append(track)
    return groups


def _group_predictions(
    predictions: Any, videos: dict[int, _Video], category_ids: set[int], iou_types: Sequence[str], source: str
) -> dict[tuple[int, int], list[Track]]:
    if not isinstance(predictions, list):
        raise InputError(source, "(root)", f"expected a list of video predictions, got {type(predictions).__name__}")
    groups: dict[tuple[int, int], list[Track]] = defaultdict(list)
    for i, pred in enumerate(predictions):
        where = f"[{i}]"
        if not isinstance(pred, dict):
            raise InputError(source, where, "expected an object")
        video_id, category_id, score = pred.get("video_id"), pred.get("category_id"), pred.get("score")
        if video_id not in videos:
            raise InputError(source, f"{where}.video_id", f"unknown video id {video_id!r}: not in the ground truth")
        if category_id not in category_ids:
            raise InputError(source, f"{where}.category_id", f"category {category_id!r} is not in the ground truth")
        if not isinstance(score, numbers.Real) or isinstance(score, bool):
            raise InputError(source, f"{where}.score", "missing or not a number")
        track = _read_track(pred, videos[video_id], iou_types, source, where, is_gt=False)
        track.score = float(score)
        groups[video_id, category_id].append(track)
    return groups


def _ratio(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """inter / union; a pair that is empty in every frame agrees perfectly (IoU 1)."""
    return np.divide(inter, union, out=np.ones_like(inter, dtype=float), where=union > 0)


def box_track_iou(dts: Sequence[Track], gts: Sequence[Track]) -> np.ndarray:
    """[D, G] track IoU of xywh boxes summed over frames."""
    d = np.stack([t.boxes for t in dts])[:, None]  # [D, 1, T, 4]
    g = np.stack([t.boxes for t in gts])[None]  # [1, G, T, 4]
    width = np.minimum(d[..., 0] + d[..., 2], g[..., 0] + g[..., 2]) - np.maximum(d[..., 0], g[..., 0])
    height = np.minimum(d[..., 1] + d[..., 3], g[..., 1] + g[..., 3]) - np.maximum(d[..., 1], g[..., 1])
    inter = (np.clip(width, 0, None) * np.clip(height, 0, None)).sum(-1)
    area_d = (d[..., 2] * d[..., 3]).sum(-1)
    area_g = (g[..., 2] * g[..., 3]).sum(-1)
    return _ratio(inter, area_d + area_g - inter)


@functools.lru_cache(maxsize=16)
def _empty_rle(height: int, width: int) -> dict[str, Any]:
    """The all-background mask, standing in for a null frame so every frame is one full C call."""
    return mask_utils.frPyObjects({"size": [height, width], "counts": [height * width]}, height, width)


def mask_track_iou(dts: Sequence[Track], gts: Sequence[Track]) -> np.ndarray:
    """[D, G] track IoU of RLE masks summed over frames, one C call per frame.

    pycocotools gives per-frame IoU, not intersection; with integer areas a and b, the
    intersection is iou * (a + b) / (1 + iou), recovered exactly by rounding.
    """
    area_d = np.stack([_mask_areas(t.masks) for t in dts])  # [D, T]
    area_g = np.stack([_mask_areas(t.masks) for t in gts])  # [G, T]
    size = next((m["size"] for t in (*dts, *gts) for m in t.masks if m is not None), None)
    if size is None:  # no mask in any frame: nothing intersects
        return _ratio(np.zeros((len(dts), len(gts))), area_d.sum(1)[:, None] + area_g.sum(1)[None, :])
    empty = _empty_rle(*size)  # every mask of a video has its size (checked on reading)
    frames_d = [[m if m is not None else empty for m in frame] for frame in zip(*(t.masks for t in dts))]
    frames_g = [[m if m is not None else empty for m in frame] for frame in zip(*(t.masks for t in gts))]
    no_crowd = [0] * len(gts)
    iou = np.stack([
        np.asarray(mask_utils.iou(d, g, no_crowd), dtype=float).reshape(len(dts), len(gts))
        for d, g in zip(frames_d, frames_g)
    ])  # [T, D, G]
    both = area_d.T[:, :, None] + area_g.T[:, None, :]
    inter = np.rint(iou * both / (1.0 + iou)).sum(0)
    union = area_d.sum(1)[:, None] + area_g.sum(1)[None, :] - inter
    return _ratio(inter, union)


@dataclass(frozen=True)
class _Matches:
    """Greedy COCO matching of one (video, category) for every area range and IoU threshold."""

    scores: np.ndarray  # [D] sorted descending
    matched: np.ndarray  # [A, T, D]
    ignored: np.ndarray  # [A, T, D]
    gt_ignored: np.ndarray  # [A, G]


def _last_best(candidates: np.ndarray, ious: np.ndarray) -> np.ndarray:
    """Per [A, T]: index of the highest-IoU candidate, the last one on ties (as COCO's loop); -1 if none."""
    scored = np.where(candidates, ious, -np.inf)
    best = scored.max(-1, keepdims=True)
    is_best = candidates & (scored == best)
    last = ious.shape[-1] - 1 - np.argmax(is_best[..., ::-1], axis=-1)
    return np.where(candidates.any(-1), last, -1)


def match_group(dts: Sequence[Track], gts: Sequence[Track], ious: np.ndarray) -> _Matches:
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
    candidates = np.flatnonzero(ious.max(axis=1) >= thresholds.min()) if n_gt else []
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
    return _Matches(np.array([t.score for t in dts]), matched, ignored, gt_ignored)


def _precision_recall(group_matches: Sequence[_Matches], max_det: int) -> tuple[np.ndarray, np.ndarray]:
    """COCO's accumulate for one category and max_det over all videos: precision [T, R, A], recall [T, A]."""
    n_areas, n_thrs, n_rec = len(VIDEO_AREA_RANGES), len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)
    precision = -np.ones((n_thrs, n_rec, n_areas))
    recall = -np.ones((n_thrs, n_areas))
    scores = np.concatenate([g.scores[:max_det] for g in group_matches])
    order = np.argsort(-scores, kind="mergesort")
    for a in range(n_areas):
        n_pos = int(sum(np.count_nonzero(~g.gt_ignored[a]) for g in group_matches))
        if n_pos == 0:
            continue
        matched = np.concatenate([g.matched[a, :, :max_det] for g in group_matches], axis=1)[:, order]
        ignored = np.concatenate([g.ignored[a, :, :max_det] for g in group_matches], axis=1)[:, order]
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


def _scores_sorted(tracks: list[Track], max_det: int) -> list[Track]:
    order = np.argsort([-t.score for t in tracks], kind="mergesort")[:max_det]
    return [tracks[i] for i in order]


def evaluate_videos(
    gt: dict[str, Any],
    predictions: Any,
    iou_types: Sequence[str],
    *,
    max_dets: Sequence[int],
    gt_source: str,
    predictions_source: str,
) -> list[Evaluation]:
    """Video mAP for each IoU type ("bbox" -> video_bbox_*, "segm" -> video_mask_*)."""
    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown or not iou_types:
        raise ConfigError(f"evaluate: iou_types must be a non-empty subset of {list(IOU_TYPES)}; got {list(iou_types)}")
    dets = check_max_dets(max_dets)
    if not isinstance(gt, dict):
        raise InputError(gt_source, "(root)", "expected a YTVIS object with videos, annotations, categories")
    videos = _videos(gt, gt_source)
    categories = gt.get("categories")
    if not isinstance(categories, list) or not all(isinstance(c, dict) and isinstance(c.get("id"), int)
                                                   for c in categories):
        raise InputError(gt_source, "categories", "missing, or an entry without an integer id")
    category_ids = sorted({c["id"] for c in categories})
    gt_groups = _group_gt(gt, videos, set(category_ids), iou_types, gt_source)
    dt_groups = _group_predictions(predictions, videos, set(category_ids), iou_types, predictions_source)
    logger.info("video mAP: %d videos, %d categories, %d predictions", len(videos), len(category_ids), len(predictions))
    return [
        _evaluate_type(iou_type, gt_groups, dt_groups, sorted(videos), category_ids, dets) for iou_type in iou_types
    ]


def _evaluate_type(
    iou_type: str,
    gt_groups: dict[tuple[int, int], list[Track]],
    dt_groups: dict[tuple[int, int], list[Track]],
    video_ids: list[int],
    category_ids: list[int],
    max_dets: tuple[int, int, int],
) -> Evaluation:
    track_iou = box_track_iou if iou_type == "bbox" else mask_track_iou
    shape = (len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(category_ids), len(VIDEO_AREA_RANGES), len(max_dets))
    precision, recall = -np.ones(shape), -np.ones((shape[0], *shape[2:]))
    for k, category_id in enumerate(tqdm(category_ids, desc=f"video {iou_type} mAP", unit="category", disable=None)):
        group_matches = []
        for video_id in video_ids:
            gts = gt_groups.get((video_id, category_id), [])
            dts = _scores_sorted(dt_groups.get((video_id, category_id), []), max_dets[-1])
            if not gts and not dts:
                continue
            ious = track_iou(dts, gts) if gts and dts else np.zeros((len(dts), len(gts)))
            group_matches.append(match_group(dts, gts, ious))
        if not group_matches:
            continue
        for m, max_det in enumerate(max_dets):
            precision[:, :, k, :, m], recall[:, k, :, m] = _precision_recall(group_matches, max_det)
    arrays = EvalArrays(
        precision=precision,
        recall=recall,
        iou_thrs=IOU_THRESHOLDS,
        rec_thrs=RECALL_THRESHOLDS,
        category_ids=tuple(category_ids),
        max_dets=max_dets,
    )
    stats = summarize(arrays)
    prefix = METRIC_PREFIX[iou_type]
    metrics = {
        f"{prefix}_mAP_50_95": stats["AP"],
        f"{prefix}_mAP_50": stats["AP50"],
        f"{prefix}_mAP_75": stats["AP75"],
    }
    return Evaluation(name=prefix, metrics=metrics, arrays=arrays)
