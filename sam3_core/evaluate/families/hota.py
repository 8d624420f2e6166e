"""``hota``: phrase HOTA, HOTA (Luiten et al., IJCV 2020) on every (video, phrase) pair as its own sequence.

The definition is sam3's ``VideoPhraseHotaEvaluator``, which runs its vendored TrackEval
(YouTubeVIS dataset, HOTA metric) on the pairs remapped to sequences of one class:

- sequences are the (video, phrase) pairs with a GT masklet or a prediction scoring above the
  threshold (0.5, strictly); a prediction's frame counts only if its box is set and non-zero and
  its ``areas`` entry is not 0, so dense dumps' empty frames are no false positives;
- GT frames count where the mask (segm) or the box (bbox) is not null; crowd GT is a plain GT;
- similarities are pycocotools' mask IoU (segm) or TrackEval's float32 box IoU (bbox);
- sequences combine by summing the TP / FN / FP counts, AssA / AssRe / AssPr and LocA weighted by
  TP; a metric is the mean over the 19 alphas 0.05 .. 0.95; the per-pair values go to
  ``video_np_results`` as ``{bbox,mask}_<metric>``;
- when every GT annotation has ``tags``, the pairs with a ``tracking_challenging_pair`` annotation
  are combined again as ``..._challenging_phrase_*``.

TrackEval loops over the 19 alphas for every frame; here the assignment of a frame is computed
once and the alphas are thresholds on it, in numpy. Float32 box similarities are summed the way
TrackEval sums them (same shapes, sequential per frame), so bbox results match to the last digits.
The PyPI ``trackeval`` package (1.3.0 supports numpy 2) is not used: it requires the GUI
``opencv-python`` (which clashes with the ``opencv-python-headless`` sam3 needs) and imports
matplotlib and every dataset class on import, and its HOTA is the per-alpha loop above.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sam3_core.errors import InputError
from sam3_core.evaluate.family import KIND, FamilyResult, VideoContext, VideoFamily, require_iou_types
from sam3_core.evaluate.lsap import linear_sum_assignment
from sam3_core.evaluate.overlaps import frame_box_iou
from sam3_core.evaluate.videodata import Masklet, Pair, VideoSet, require

logger = logging.getLogger(__name__)

ALPHAS = np.arange(0.05, 0.99, 0.05)  # TrackEval's array_labels: 19 thresholds
EPS = np.finfo("float").eps
METRICS = ("HOTA", "DetA", "AssA", "DetRe", "DetPr", "AssRe", "AssPr", "LocA", "OWTA")
CHALLENGING_TAG = "tracking_challenging_pair"


@dataclass(frozen=True)
class Frame:
    """One frame of a sequence: relabelled GT and tracker ids present, and their similarity [G, D]."""

    gt_ids: np.ndarray
    tracker_ids: np.ndarray
    similarity: np.ndarray


@dataclass
class SequenceResult:
    """HOTA's per-alpha counts and scores of one sequence (or of a combination of sequences)."""

    tp: np.ndarray
    fn: np.ndarray
    fp: np.ndarray
    ass_a: np.ndarray
    ass_re: np.ndarray
    ass_pr: np.ndarray
    loc_a: np.ndarray

    def metrics(self) -> dict[str, np.ndarray]:
        """Every HOTA field per alpha, derived from the counts and association scores."""
        det_re = self.tp / np.maximum(1, self.tp + self.fn)
        det_pr = self.tp / np.maximum(1, self.tp + self.fp)
        det_a = self.tp / np.maximum(1, self.tp + self.fn + self.fp)
        return {
            "HOTA": np.sqrt(det_a * self.ass_a),
            "DetA": det_a,
            "AssA": self.ass_a,
            "DetRe": det_re,
            "DetPr": det_pr,
            "AssRe": self.ass_re,
            "AssPr": self.ass_pr,
            "LocA": self.loc_a,
            "OWTA": np.sqrt(det_re * self.ass_a),
        }

    def means(self) -> dict[str, float]:
        """Each metric averaged over the alphas: what sam3 reports."""
        return {name: float(np.mean(values)) for name, values in self.metrics().items()}


def _zeros() -> np.ndarray:
    return np.zeros(len(ALPHAS))


def evaluate_sequence(frames: Sequence[Frame], num_gt_ids: int, num_tracker_ids: int) -> SequenceResult:
    """HOTA of one sequence; ids in ``frames`` are 0..num_*_ids-1."""
    num_gt_dets = sum(len(f.gt_ids) for f in frames)
    num_tracker_dets = sum(len(f.tracker_ids) for f in frames)
    if num_tracker_dets == 0 or num_gt_dets == 0:  # TrackEval's early exit: LocA 1, nothing matched
        fn = np.full(len(ALPHAS), float(num_gt_dets if num_tracker_dets == 0 else 0))
        fp = np.full(len(ALPHAS), float(num_tracker_dets if num_tracker_dets and not num_gt_dets else 0))
        return SequenceResult(_zeros(), fn, fp, _zeros(), _zeros(), _zeros(), np.ones(len(ALPHAS)))
    potential = np.zeros((num_gt_ids, num_tracker_ids))
    gt_count = np.zeros((num_gt_ids, 1))
    tracker_count = np.zeros((1, num_tracker_ids))
    for f in frames:
        sim = f.similarity
        if sim.size:
            denom = sim.sum(0)[np.newaxis, :] + sim.sum(1)[:, np.newaxis] - sim
            sim_iou = np.zeros_like(sim)
            valid = denom > 0 + EPS
            sim_iou[valid] = sim[valid] / denom[valid]
            potential[f.gt_ids[:, np.newaxis], f.tracker_ids[np.newaxis, :]] += sim_iou
        gt_count[f.gt_ids] += 1
        tracker_count[0, f.tracker_ids] += 1
    alignment = potential / (gt_count + tracker_count - potential)
    tp, fn, fp, loc = _zeros(), _zeros(), _zeros(), _zeros()
    matches = np.zeros((len(ALPHAS), num_gt_ids, num_tracker_ids))
    thresholds = (ALPHAS - EPS)[:, None]
    for f in frames:
        if not len(f.gt_ids) or not len(f.tracker_ids):
            fp += len(f.tracker_ids)
            fn += len(f.gt_ids)
            continue
        score = alignment[f.gt_ids[:, np.newaxis], f.tracker_ids[np.newaxis, :]] * f.similarity
        rows, cols = linear_sum_assignment(-score)
        matched = f.similarity[rows, cols]
        kept = matched[None, :] >= thresholds  # [alphas, matches]
        count = kept.sum(1)
        tp += count
        fn += len(f.gt_ids) - count
        fp += len(f.tracker_ids) - count
        # TrackEval adds the kept similarities one by one in their own precision (float32 for boxes)
        loc += np.cumsum(np.where(kept, matched[None, :], matched.dtype.type(0)), axis=1)[:, -1]
        a, k = np.nonzero(kept)
        np.add.at(matches, (a, f.gt_ids[rows[k]], f.tracker_ids[cols[k]]), 1)
    ass_a, ass_re, ass_pr = _zeros(), _zeros(), _zeros()
    for a in range(len(ALPHAS)):
        m = matches[a]
        ass_a[a] = np.sum(m * (m / np.maximum(1, gt_count + tracker_count - m))) / np.maximum(1, tp[a])
        ass_re[a] = np.sum(m * (m / np.maximum(1, gt_count))) / np.maximum(1, tp[a])
        ass_pr[a] = np.sum(m * (m / np.maximum(1, tracker_count))) / np.maximum(1, tp[a])
    loc_a = np.maximum(1e-10, loc) / np.maximum(1e-10, tp)
    return SequenceResult(tp, fn, fp, ass_a, ass_re, ass_pr, loc_a)


def combine(results: Sequence[SequenceResult]) -> SequenceResult:
    """TrackEval's combine_sequences: counts summed, association and localisation weighted by TP."""
    tp = sum((r.tp for r in results), _zeros())
    fn = sum((r.fn for r in results), _zeros())
    fp = sum((r.fp for r in results), _zeros())
    weight = np.maximum(1.0, tp)
    ass = [sum((getattr(r, name) * r.tp for r in results), _zeros()) / weight for name in ("ass_a", "ass_re", "ass_pr")]
    loc_a = np.maximum(1e-10, sum((r.loc_a * r.tp for r in results), _zeros())) / np.maximum(1e-10, tp)
    return SequenceResult(tp, fn, fp, ass[0], ass[1], ass[2], loc_a)


def relabel(ids_per_frame: Sequence[np.ndarray]) -> tuple[list[np.ndarray], int]:
    """Ids mapped to 0..n-1 in sorted order of the ids that occur, as TrackEval relabels them."""
    present = np.unique(np.concatenate(ids_per_frame)) if ids_per_frame else np.zeros(0, dtype=np.int64)
    return [np.searchsorted(present, ids).astype(np.int64) for ids in ids_per_frame], len(present)


def _present(p: Masklet) -> np.ndarray:
    """sam3's HOTA drops a predicted frame whose area is 0 or whose box is null or all zeros."""
    area = p.areas if p.areas is not None else p.mask_areas
    return ~(p.box_zero | (area == 0))


def _pair(video: VideoContext, iou_type: str, gts: list[Masklet], predictions: list[Masklet]) -> SequenceResult:
    """HOTA of one (video, phrase) pair as its own sequence."""
    length = video.video.length
    if iou_type == "segm":
        gt_present = np.array([[m is not None for m in g.masks] for g in gts], dtype=bool).reshape(len(gts), length)
    else:
        gt_present = np.array([~g.box_null for g in gts], dtype=bool).reshape(len(gts), length)
    tracker_present = np.array([_present(p) for p in predictions], dtype=bool).reshape(len(predictions), length)
    gt_track_ids = np.array([g.track_id for g in gts], dtype=np.int64)
    rows, cols = video.rows(predictions), video.cols(gts)
    gt_ids, tracker_ids, sims = [], [], []
    for t in np.flatnonzero(gt_present.any(axis=0) | tracker_present.any(axis=0)):  # empty frames add nothing
        g, d = np.flatnonzero(gt_present[:, t]), np.flatnonzero(tracker_present[:, t])
        gt_ids.append(gt_track_ids[g])
        tracker_ids.append(d)
        if not len(g) or not len(d):
            sims.append(np.zeros((len(g), len(d)), dtype=np.float32 if iou_type == "bbox" else float))
        elif iou_type == "bbox":
            sims.append(
                frame_box_iou(np.stack([gts[j].boxes[t] for j in g]), np.stack([predictions[i].boxes[t] for i in d]))
            )
        else:
            sims.append(video.overlaps.frame_iou(int(t), rows[d], cols[g]).T)
    gt_labels, num_gt = relabel(gt_ids)
    tracker_labels, num_tracker = relabel(tracker_ids)
    frames = [Frame(g, d, s) for g, d, s in zip(gt_labels, tracker_labels, sims)]
    return evaluate_sequence(frames, num_gt, num_tracker)


class Hota(VideoFamily):
    name = "hota"
    per_pair_results = True

    def prepare(self, data: VideoSet) -> None:
        """Boxes everywhere (a frame counts where its box is set); masks where a counted prediction is."""
        require_iou_types(data, self.scoring.iou_types)
        require(data, "bboxes", "HOTA (a frame counts where its box is set)")
        if "segm" not in self.scoring.iou_types:
            return
        for p in data.predictions:
            if p.score <= self.scoring.threshold:
                continue
            missing = np.flatnonzero(_present(p) & np.array([mask is None for mask in p.masks]))
            if len(missing):
                raise InputError(
                    data.predictions_source,
                    f"[{p.index}].segmentations[{missing[0]}]",
                    "null in a frame where the box is set: HOTA compares the masks of every frame with a box",
                )

    def evaluate_video(self, video: VideoContext) -> dict[tuple[int, str], SequenceResult]:
        """Every (category, IoU type) with GT or a prediction above the threshold."""
        gts, predictions = video.gts_by_category, video.predictions_by_category
        confident = {c: [p for p in ps if p.score > self.scoring.threshold] for c, ps in predictions.items()}
        out = {}
        for category in set(gts) | {c for c, ps in confident.items() if ps}:
            for iou_type in self.scoring.iou_types:
                out[category, iou_type] = _pair(video, iou_type, gts.get(category, []), confident.get(category, []))
        return out

    def reduce(self, data: VideoSet, parts: Mapping[int, Any]) -> FamilyResult:
        metrics: dict[str, float] = {}
        per_pair: dict[Pair, dict[str, float]] = {}
        for iou_type in self.scoring.iou_types:
            kind = KIND[iou_type]
            sequences = {(v, c): s for v, part in parts.items() for (c, t), s in part.items() if t == iou_type}
            ordered = sorted(sequences)
            for pair in ordered:
                per_pair.setdefault(pair, {}).update({f"{kind}_{k}": v for k, v in sequences[pair].means().items()})
            combined = combine([sequences[p] for p in ordered]).means()
            metrics.update({f"video_{kind}_all_phrase_{k}": v for k, v in combined.items()})
            if data.gt and all(g.has_tags for g in data.gt):  # sam3 then also combines the challenging pairs
                metrics.update(_challenging(data, sequences, ordered, kind))
        return FamilyResult(metrics, per_pair=per_pair)


def _challenging(
    data: VideoSet, sequences: dict[Pair, SequenceResult], ordered: list[Pair], kind: str
) -> dict[str, float]:
    """``..._challenging_phrase_*``: the pairs with an annotation tagged ``tracking_challenging_pair``."""
    challenging = {(g.video_id, g.category_id) for g in data.gt if CHALLENGING_TAG in g.tags}
    chosen = [sequences[p] for p in ordered if p in challenging]
    if not chosen:
        logger.warning("every annotation has tags but none is %r: no challenging HOTA", CHALLENGING_TAG)
        return {}
    return {f"video_{kind}_challenging_phrase_{k}": v for k, v in combine(chosen).means().items()}
