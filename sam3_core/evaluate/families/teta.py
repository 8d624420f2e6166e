"""``teta``: TETA (Track Every Thing Accuracy, Li et al., ECCV 2022) on masks, as sam3's SA-Co/VEval suite runs it.

The definition is sam3's ``VideoTetaEvaluator(use_mask=True, is_exhaustive=True)`` with its
vendored TETA toolkit (COCO dataset class, threshold 50); what that amounts to:

- a sequence is a video; classes are the categories with a GT box in some frame, identified by
  name; predictions count from score 0.5 (inclusive), in frames where their box is set and not
  all zeros; GT counts where its box is set (crowd included);
- only frames with at least one GT object take part: predictions on other frames are ignored;
- a prediction "overlaps" a class in a frame when its mask IoU with a GT of that class is >= 0.5,
  less those the class-agnostic matching of the frame (alpha 0.5) gave to GT of other classes;
- per class and sequence: localisation TP / FN / FP and association (AssocA/Re/Pr) from HOTA-style
  matching at alphas 0, 0.05 .. 0.95; classification TP / FN from the class of the matched
  predictions at alphas >= 0.5, class FP from wrongly classed matches, from predictions of the
  class in frames without its GT (exhaustive annotation) and from its unmatched predictions;
- sequences combine per class (counts summed, association weighted by TP), classes average with
  equal weight (classes without any localisation count left out);
- reported: ``teta, loc_a, assoc_a, cls_a, loc_re, loc_pr, assoc_re, assoc_pr, cls_re, cls_pr``,
  each the mean over alphas, in percent, rounded to 5 significant digits as sam3's summary table
  formats them (sam3 reads its numbers back from that table).

Classes a video has neither GT nor predictions of contribute exactly zero to every sum, so only
the classes present in a video are evaluated there: cost follows the data, not the vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sam3_core.errors import InputError
from sam3_core.evaluate.family import FamilyResult, VideoContext, VideoFamily
from sam3_core.evaluate.lsap import linear_sum_assignment
from sam3_core.evaluate.videodata import Masklet, VideoSet, require

ALPHAS = np.arange(0.0, 0.99, 0.05)  # 20 localisation thresholds
CLS_ALPHAS = np.arange(0.5, 0.99, 0.05)  # 10 classification thresholds: ALPHAS[10:]
CLS_OFFSET = 10
EPS = np.finfo("float").eps
OVERLAP = 0.5  # the toolkit's overlap threshold (thr 50)
REPORTED = ("teta", "loc_a", "assoc_a", "cls_a", "loc_re", "loc_pr", "assoc_re", "assoc_pr", "cls_re", "cls_pr")
_FIELDS = ("TETA", "LocA", "AssocA", "ClsA", "LocRe", "LocPr", "AssocRe", "AssocPr", "ClsRe", "ClsPr")


@dataclass(frozen=True)
class Frame:
    """One frame of a video with GT: GT and prediction track ids, their classes, mask IoU [G, D]."""

    gt_ids: np.ndarray
    gt_classes: np.ndarray
    tracker_ids: np.ndarray
    tracker_classes: np.ndarray
    similarity: np.ndarray


@dataclass
class Counts:
    """One class's TETA counts (per alpha) and association scores for one sequence or many."""

    loc_tp: np.ndarray = field(default_factory=lambda: np.zeros(len(ALPHAS)))
    loc_fn: np.ndarray = field(default_factory=lambda: np.zeros(len(ALPHAS)))
    loc_fp: np.ndarray = field(default_factory=lambda: np.zeros(len(ALPHAS)))
    cls_tp: np.ndarray = field(default_factory=lambda: np.zeros(len(CLS_ALPHAS)))
    cls_fn: np.ndarray = field(default_factory=lambda: np.zeros(len(CLS_ALPHAS)))
    cls_fp: np.ndarray = field(default_factory=lambda: np.zeros(len(CLS_ALPHAS)))
    assoc_a: np.ndarray = field(default_factory=lambda: np.zeros(len(ALPHAS)))
    assoc_re: np.ndarray = field(default_factory=lambda: np.zeros(len(ALPHAS)))
    assoc_pr: np.ndarray = field(default_factory=lambda: np.zeros(len(ALPHAS)))

    def fields(self) -> dict[str, np.ndarray | float]:
        """The toolkit's final fields: localisation per alpha, classification averaged over its alphas."""
        tp, fn, fp = self.loc_tp, self.loc_fn, self.loc_fp
        loc_a = tp / np.maximum(1, tp + fn + fp)
        cls_a = float(np.mean(self.cls_tp / np.maximum(1, self.cls_tp + self.cls_fn + self.cls_fp)))
        return {
            "TETA": (loc_a + self.assoc_a + cls_a) / 3,
            "LocA": loc_a,
            "AssocA": self.assoc_a,
            "ClsA": cls_a,
            "LocRe": tp / np.maximum(1, tp + fn),
            "LocPr": tp / np.maximum(1, tp + fp),
            "AssocRe": self.assoc_re,
            "AssocPr": self.assoc_pr,
            "ClsRe": float(np.mean(self.cls_tp / np.maximum(1, self.cls_tp + self.cls_fn))),
            "ClsPr": float(np.mean(self.cls_tp / np.maximum(1, self.cls_tp + self.cls_fp))),
        }

    def empty(self) -> bool:
        return not (self.loc_tp + self.loc_fn + self.loc_fp > 0 + EPS).any()


@dataclass
class _ClassFrame:
    gt_ids: np.ndarray  # relabelled
    tracker_ids: np.ndarray  # relabelled, predictions kept for localisation / association
    tracker_classes: np.ndarray
    similarity: np.ndarray
    overlap: set[int]  # original ids of the predictions overlapping this class here
    class_eval: set[int]  # overlap + predictions of this class here


def _alignment(frames: Sequence[_ClassFrame], num_gt: int, num_tracker: int) -> tuple[np.ndarray, ...]:
    """Global alignment score between GT and prediction tracks (HOTA's), and their detection counts."""
    potential = np.zeros((num_gt, num_tracker))
    gt_count = np.zeros((num_gt, 1))
    tracker_count = np.zeros((1, num_tracker))
    for f in frames:
        sim = f.similarity
        denom = sim.sum(0, keepdims=True) + sim.sum(1, keepdims=True) - sim
        sim_iou = np.zeros_like(sim)
        valid = denom > 0 + EPS
        sim_iou[valid] = sim[valid] / denom[valid]
        potential[f.gt_ids[:, None], f.tracker_ids[None, :]] += sim_iou
        gt_count[f.gt_ids] += 1
        tracker_count[0, f.tracker_ids] += 1
    return potential / (gt_count + tracker_count - potential), gt_count, tracker_count


def _match(f: _ClassFrame, alignment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The frame's optimal GT / prediction assignment (rows, cols into its arrays)."""
    score = alignment[f.gt_ids[:, None], f.tracker_ids[None, :]] * f.similarity
    return linear_sum_assignment(-score)


def _relabel(ids: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    present = np.unique(np.concatenate(ids)) if ids else np.zeros(0, dtype=np.int64)
    return present, [np.searchsorted(present, i).astype(np.int64) for i in ids]


def _class_frames(
    frames: Sequence[Frame], cls: int | None, assigned: Sequence[dict[int, int]] | None
) -> tuple[list[_ClassFrame], np.ndarray, np.ndarray, int]:
    """The toolkit's per-class preprocessing (``cls`` None: every class, for the global assignment).

    Returns the class's frames, the original GT and prediction ids behind the relabelled ones, and
    the number of class-eval detections. Frames with neither GT nor predictions of the class nor
    a prediction kept for it contribute nothing and are left out.
    """
    overlaps: dict[int, set[int]] = {}
    for t, f in enumerate(frames):
        gt_mask = np.ones(len(f.gt_ids), dtype=bool) if cls is None else f.gt_classes == cls
        if not gt_mask.any():
            continue  # no GT of the class: nothing overlaps it here
        close = f.tracker_ids[(f.similarity[gt_mask] >= OVERLAP).any(axis=0)]
        taken = set()
        if assigned is not None:  # predictions the class-agnostic matching gave to GT of other classes
            others = set(assigned[t]) - set(f.gt_ids[gt_mask].tolist())
            taken = {assigned[t][g] for g in others}
        overlaps[t] = set(close.tolist()) - taken
    kept = set().union(*overlaps.values()) if overlaps else set()
    kept_ids = np.array(sorted(kept), dtype=np.int64)
    gt_ids, tracker_ids, parts = [], [], []
    class_dets = 0
    for t, f in enumerate(frames):
        gt_mask = np.ones(len(f.gt_ids), dtype=bool) if cls is None else f.gt_classes == cls
        tracker_mask = np.isin(f.tracker_ids, kept_ids)
        own_mask = np.zeros(len(f.tracker_ids), dtype=bool) if cls is None else f.tracker_classes == cls
        if not (gt_mask.any() or tracker_mask.any() or own_mask.any()):
            continue
        overlap = overlaps.get(t, set())
        gt_ids.append(f.gt_ids[gt_mask])
        tracker_ids.append(f.tracker_ids[tracker_mask])
        class_eval = overlap | set(f.tracker_ids[own_mask].tolist())
        class_dets += len(class_eval)
        parts.append((f.tracker_classes[tracker_mask], f.similarity[gt_mask][:, tracker_mask], overlap, class_eval))
    gt_orig, gt_lab = _relabel(gt_ids)
    tracker_orig, tracker_lab = _relabel(tracker_ids)
    out = [_ClassFrame(g, d, c, s, o, e) for g, d, (c, s, o, e) in zip(gt_lab, tracker_lab, parts)]
    return out, gt_orig, tracker_orig, class_dets


def _global_assignment(frames: Sequence[Frame]) -> list[dict[int, int]]:
    """Class-agnostic GT -> prediction assignment per frame at alpha 0.5 (original ids).

    Every frame has GT (frames without are not part of a sequence), so none is left out here.
    """
    data, gt_orig, tracker_orig, _ = _class_frames(frames, None, None)
    assigned: list[dict[int, int]] = [{} for _ in frames]
    if not sum(len(f.overlap) for f in data) or not sum(len(f.gt_ids) for f in data):
        return assigned
    assert len(data) == len(frames)
    alignment, _, _ = _alignment(data, len(gt_orig), len(tracker_orig))
    for t, f in enumerate(data):
        rows, cols = _match(f, alignment)
        keep = f.similarity[rows, cols] >= OVERLAP - EPS
        gts, trackers = gt_orig[f.gt_ids[rows[keep]]], tracker_orig[f.tracker_ids[cols[keep]]]
        assigned[t] = dict(zip(gts.tolist(), trackers.tolist()))
    return assigned


def evaluate_video(frames: Sequence[Frame], classes: Sequence[int], known: set[int]) -> dict[int, Counts]:
    """TETA counts of one video for each of ``classes`` (in the class list's order), keyed by class.

    ``known`` is the whole class list: a wrongly classed match counts as a class FP only for those.
    Class FPs found while evaluating one class are booked on another, and a class without any
    overlapping prediction resets its own, so the order of ``classes`` matters as in the toolkit.
    """
    assigned = _global_assignment(frames)
    cls_fp = {c: np.zeros(len(CLS_ALPHAS)) for c in classes}
    out: dict[int, Counts] = {}
    for cls in classes:
        data, gt_orig, tracker_orig, class_dets = _class_frames(frames, cls, assigned)
        counts = Counts()
        out[cls] = counts
        num_gt = sum(len(f.gt_ids) for f in data)
        if not sum(len(f.overlap) for f in data) or not num_gt:
            counts.loc_fn[:] = num_gt
            cls_fp[cls] = class_dets * np.ones(len(CLS_ALPHAS))
            continue
        alignment, gt_count, tracker_count = _alignment(data, len(gt_orig), len(tracker_orig))
        matches = np.zeros((len(ALPHAS), len(gt_orig), len(tracker_orig)))
        for f in data:
            if not len(f.gt_ids):
                cls_fp[cls] += len(f.class_eval)
                continue
            cls_fp[cls] += len(f.class_eval) - len(f.overlap)
            rows, cols = _match(f, alignment)
            keep = f.similarity[rows, cols][None, :] >= (ALPHAS - EPS)[:, None]  # [alphas, matches]
            n = keep.sum(1)
            counts.loc_tp += n
            counts.loc_fn += len(f.gt_ids) - n
            in_overlap = np.isin(tracker_orig[f.tracker_ids[cols]], list(f.overlap))
            counts.loc_fp += len(f.overlap) - (keep & in_overlap).sum(1)
            matched_classes = f.tracker_classes[cols]
            right = matched_classes == cls
            counts.cls_tp += (keep & right).sum(1)[CLS_OFFSET:]
            counts.cls_fn += (keep & ~right).sum(1)[CLS_OFFSET:]
            for k in np.flatnonzero(~right):
                if int(matched_classes[k]) in known:
                    cls_fp.setdefault(int(matched_classes[k]), np.zeros(len(CLS_ALPHAS)))
                    cls_fp[int(matched_classes[k])] += keep[CLS_OFFSET:, k]
            a, k = np.nonzero(keep)
            np.add.at(matches, (a, f.gt_ids[rows[k]], f.tracker_ids[cols[k]]), 1)
        for a in range(len(ALPHAS)):
            m, tp = matches[a], np.maximum(1, counts.loc_tp[a])
            counts.assoc_a[a] = np.sum(m * (m / np.maximum(1, gt_count + tracker_count - m))) / tp
            counts.assoc_re[a] = np.sum(m * (m / np.maximum(1, gt_count))) / tp
            counts.assoc_pr[a] = np.sum(m * (m / np.maximum(1, tracker_count))) / tp
    for cls, counts in out.items():
        counts.cls_fp += cls_fp[cls]
    for wrong in set(cls_fp) - set(out):  # booked on a class with no GT or prediction of its own here
        out[wrong] = Counts(cls_fp=cls_fp[wrong])
    return out


def combine(sequences: Iterable[Counts]) -> Counts:
    """One class over several videos: counts summed, association weighted by localisation TP."""
    total = Counts()
    parts = list(sequences)
    for name in ("loc_tp", "loc_fn", "loc_fp", "cls_tp", "cls_fn", "cls_fp"):
        setattr(total, name, sum((getattr(p, name) for p in parts), getattr(total, name)))
    weight = np.maximum(1.0, total.loc_tp)
    for name in ("assoc_a", "assoc_re", "assoc_pr"):
        setattr(total, name, sum((getattr(p, name) * p.loc_tp for p in parts), np.zeros(len(ALPHAS))) / weight)
    return total


def summary(classes: Sequence[Counts]) -> dict[str, float]:
    """The reported numbers: class-averaged fields, mean over alphas, percent, 5 significant digits."""
    fields = [c.fields() for c in classes if not c.empty()]
    out = {}
    for reported, name in zip(REPORTED, _FIELDS):
        mean = np.mean([f[name] for f in fields], axis=0) if fields else np.nan
        out[reported] = float(f"{100 * np.mean(mean):1.5g}")
    return out


def _class_list(data: VideoSet) -> dict[int, int]:
    """TETA's class list: categories with a GT box somewhere, in the GT's category order; names unique."""
    with_gt = {g.category_id for g in data.gt if not g.box_null.all()}
    order = [c for c in data.category_names if c in with_gt]
    owners: dict[str, int] = {}
    for c, name in data.category_names.items():
        if name in owners and (c in with_gt or owners[name] in with_gt):
            raise InputError(
                data.gt_source,
                "categories",
                f"name {name!r} is used by categories {owners[name]} and {c}: TETA tells classes apart "
                "by name (as sam3's toolkit does)",
            )
        owners[name] = c
    return {c: i for i, c in enumerate(order)}


def _check_masks(source: str, prefix: str, masklets: Iterable[Masklet], counted: Callable[[Masklet], Any]) -> None:
    for m in masklets:
        missing = np.flatnonzero(counted(m) & np.array([mask is None for mask in m.masks]))
        if len(missing):
            raise InputError(
                source,
                f"{prefix}[{m.index}].segmentations[{missing[0]}]",
                "null in a frame where the box is set: TETA compares the masks of every frame with a box",
            )


class Teta(VideoFamily):
    name = "teta"

    rank: dict[int, int]  # the class list (category -> position), set by prepare

    def prepare(self, data: VideoSet) -> None:
        """Boxes and masks everywhere, a mask in every counted frame; the class list."""
        require(data, "bboxes", "TETA (a frame counts where its box is set)")
        require(data, "segmentations", "TETA (on masks)")
        _check_masks(data.gt_source, "annotations", data.gt, lambda m: ~m.box_null)
        confident = [p for p in data.predictions if p.score >= self.scoring.threshold]
        _check_masks(data.predictions_source, "", confident, lambda m: ~m.box_zero)
        self.rank = _class_list(data)

    def evaluate_video(self, video: VideoContext) -> dict[int, Counts]:
        length = video.video.length
        gts = video.gts
        trackers = [p for p in video.predictions if p.score >= self.scoring.threshold]
        gt_present = np.array([~g.box_null for g in gts], dtype=bool).reshape(len(gts), length)
        tracker_present = np.array([~p.box_zero for p in trackers], dtype=bool).reshape(len(trackers), length)
        gt_ids = np.array([g.track_id for g in gts], dtype=np.int64)
        gt_classes = np.array([g.category_id for g in gts], dtype=np.int64)
        tracker_classes = np.array([p.category_id for p in trackers], dtype=np.int64)
        rows, cols = video.rows(trackers), video.cols(gts)
        frames, classes = [], set()
        for t in np.flatnonzero(gt_present.any(axis=0)):  # frames without GT are not part of the sequence
            g, d = np.flatnonzero(gt_present[:, t]), np.flatnonzero(tracker_present[:, t])
            similarity = video.overlaps.frame_iou(int(t), rows[d], cols[g]).T
            frames.append(Frame(gt_ids[g], gt_classes[g], d, tracker_classes[d], similarity))
            classes.update(gt_classes[g].tolist(), tracker_classes[d].tolist())
        known = set(self.rank)
        return evaluate_video(frames, sorted(classes & known, key=self.rank.__getitem__), known)

    def reduce(self, data: VideoSet, parts: Mapping[int, Any]) -> FamilyResult:
        combined = [combine(part[c] for part in parts.values() if c in part) for c in self.rank]
        return FamilyResult({f"video_mask_{name}": value for name, value in summary(combined).items()})
