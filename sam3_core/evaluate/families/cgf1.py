"""``cgf1``: video cgF1 (the "demo" family), thresholded predictions matched one-to-one per (video, phrase) pair.

Definitions (SAM3 paper; sam3's ``VideoCGF1Evaluator`` on ``CGF1Eval``): every (video, phrase)
pair is an "image": the pairs with GT or predictions and, with SA-Co/VEval GT, the negative pairs
of ``video_np_pairs``. In each, predictions scoring >= 0.5 are matched to the non-crowd GT
masklets by the Hungarian algorithm on masklet IoU; at each IoU threshold 0.50:0.05:0.95 a match
at or above it is a TP, the other predictions FPs, the other GT FNs. Then:

- precision / recall / F1 from the summed TP / FP / FN (``+1e-4`` in every denominator);
- pmF1: F1 over the positive pairs only (GT and predictions, or GT alone) -- micro from their summed
  counts (``positive_micro_f1``), macro as the mean of their per-pair F1 (``pmf1``, pairs without
  predictions left out of the count; ``pmf1_w0dt`` keeps them);
- IL_MCC: Matthews correlation of "the pair has GT" vs "the pair has predictions" over all pairs;
- cgF1 = pmF1 x IL_MCC (``cgf1_micro`` with the micro pmF1, ``cgf1`` with the macro one);
- each at IoU 0.5:0.95 (mean over thresholds), 0.5 and 0.75.

Names and provenance. Pinned sam3 0.1.4 reports ``video_{bbox,mask}_demo_`` +
``cgf1_micro``, ``ilmcc``, ``positive_micro_f1`` (x ``_50_95``, ``_50``, ``_75``), only when the
GT has ``video_np_pairs``. The upstream evaluator built on ``DemoEval``
(facebookresearch/sam3 ``sam3/eval/saco_veval_evaluators.py``, ``VideoDemoF1Evaluator``) also
reports ``precision``, ``recall``, ``f1`` (always), ``pmf1``, ``cgf1`` (x 3 thresholds) and
``pmf1_w0dt_50_95``, ``cgf1_w0dt_50_95``; those come from the same per-pair counts with the
definitions above. Where both define a key they agree, except ``ilmcc_50`` / ``ilmcc_75`` when a
pmF1 is 0: pinned divides ``cgf1_micro`` by the micro pmF1, upstream ``cgf1`` by the macro one, so
the 0/0 (NaN) appears in different cases; the pinned form is kept.

Per pair, ``video_np_results`` gets ``{bbox,mask}_{TP,FP,FN,F1}_{50_95,50,75}`` with
F1 = 2TP / (2TP + FP + FN), 1 when the pair has neither GT nor predictions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sam3_core.evaluate.family import KIND, FamilyResult, VideoContext, VideoFamily, require_iou_types
from sam3_core.evaluate.lsap import linear_sum_assignment
from sam3_core.evaluate.videodata import Pair, VideoSet

# COCO's params.iouThrs; 0.5 and 0.75 are found in it by equality, as the reference does
THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
I50 = int(np.flatnonzero(THRESHOLDS == 0.5)[0])
I75 = int(np.flatnonzero(THRESHOLDS == 0.75)[0])


@dataclass(frozen=True)
class PairCounts:
    """One (video, phrase) pair at one IoU type: counts per IoU threshold and the image-level outcome."""

    num_gt: int
    num_dt: int
    tp: np.ndarray  # [thresholds] int

    @property
    def fp(self) -> np.ndarray:
        return self.num_dt - self.tp

    @property
    def fn(self) -> np.ndarray:
        return self.num_gt - self.tp

    @property
    def local_f1(self) -> np.ndarray:
        """The pair's F1 per threshold (CGF1Eval's local F1, with its 1e-4 smoothing)."""
        precision = self.tp / (self.tp + self.fp + 1e-4)
        recall = self.tp / (self.tp + self.fn + 1e-4)
        return 2 * precision * recall / (precision + recall + 1e-4)

    def video_np_result(self, prefix: str) -> dict[str, float]:
        """This pair's row of video_np_results: TP / FP / FN / F1 at 0.5:0.95 (mean), 0.5 and 0.75."""
        tp, fp, fn = self.tp, self.fp, self.fn
        denominator = 2 * tp + fp + fn
        f1 = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 1.0)
        out = {}
        for suffix, pick in (("50_95", np.mean), ("50", lambda v: v[I50]), ("75", lambda v: v[I75])):
            for name, values in (("TP", tp), ("FP", fp), ("FN", fn), ("F1", f1)):
                out[f"{prefix}_{name}_{suffix}"] = float(pick(values))
        return out


def match_pair(ious: np.ndarray) -> PairCounts:
    """Hungarian matching of one pair: ``ious`` is [thresholded predictions, non-crowd GT]."""
    num_dt, num_gt = ious.shape
    if num_dt and num_gt:
        rows, cols = linear_sum_assignment(-ious)
        matched = ious[rows, cols]
        tp = (matched[None, :] >= THRESHOLDS[:, None]).sum(1)
    else:
        tp = np.zeros(len(THRESHOLDS), dtype=np.int64)
    return PairCounts(num_gt=num_gt, num_dt=num_dt, tp=tp.astype(np.int64))


def _mean_valid(values: np.ndarray | float, index: int | None = None) -> float:
    """CGF1Eval.summarize: the mean of the values > -1 (at one threshold if given), -1 if none."""
    s = np.atleast_1d(np.asarray(values, dtype=float))
    if index is not None:
        s = s[[index]]
    valid = s[s > -1]
    return float(np.mean(valid)) if len(valid) else -1.0


def summarize(pairs: Sequence[PairCounts], prefix: str, with_image_level: bool) -> dict[str, float]:
    """The dataset-level family for one IoU type, from every image's counts (see the module docstring)."""
    n = len(THRESHOLDS)
    tps, fps, fns, pm_fps = (np.zeros(n, dtype=np.int64) for _ in range(4))
    local_f1 = np.zeros(n)
    positive_with_dt = positive = 0
    il_tp = il_fp = il_tn = il_fn = 0
    for pair in pairs:
        has_gt, has_dt = pair.num_gt > 0, pair.num_dt > 0
        il_tp += has_gt and has_dt
        il_fp += has_dt and not has_gt
        il_tn += not has_gt and not has_dt
        il_fn += has_gt and not has_dt
        if not has_gt and not has_dt:
            continue
        tps += pair.tp
        fps += pair.fp
        fns += pair.fn
        if has_gt:  # a positive pair, found or not
            local_f1 += pair.local_f1 if has_dt else 0.0
            pm_fps += pair.fp
            positive += 1
            positive_with_dt += has_dt
    precision = tps / (tps + fps + 1e-4)
    recall = tps / (tps + fns + 1e-4)
    f1 = 2 * precision * recall / (precision + recall + 1e-4)
    pm_precision = tps / (tps + pm_fps + 1e-4)
    pm_f1_micro = 2 * pm_precision * recall / (pm_precision + recall + 1e-4)
    with np.errstate(divide="ignore", invalid="ignore"):  # no positive pair: NaN, as the reference
        pm_f1_macro = local_f1 / positive_with_dt
        pm_f1_w0dt = local_f1 / positive
    mcc = float(il_tp * il_tn - il_fp * il_fn) / (
        (float(il_tp + il_fp) * float(il_tp + il_fn) * float(il_tn + il_fp) * float(il_tn + il_fn)) ** 0.5 + 1e-6
    )
    out = {}
    for suffix, index in (("50_95", None), ("50", I50), ("75", I75)):
        out[f"{prefix}_precision_{suffix}"] = _mean_valid(precision, index)
        out[f"{prefix}_recall_{suffix}"] = _mean_valid(recall, index)
        out[f"{prefix}_f1_{suffix}"] = _mean_valid(f1, index)
    if not with_image_level:
        return out
    for suffix, index in (("50_95", None), ("50", I50), ("75", I75)):
        cgf1_micro = _mean_valid(pm_f1_micro * mcc, index)
        pmf1_micro = _mean_valid(pm_f1_micro, index)
        out[f"{prefix}_cgf1_micro_{suffix}"] = cgf1_micro
        out[f"{prefix}_positive_micro_f1_{suffix}"] = pmf1_micro
        out[f"{prefix}_pmf1_{suffix}"] = _mean_valid(pm_f1_macro, index)
        out[f"{prefix}_cgf1_{suffix}"] = _mean_valid(pm_f1_macro * mcc, index)
        if index is None:
            out[f"{prefix}_ilmcc_{suffix}"] = mcc
            out[f"{prefix}_pmf1_w0dt_{suffix}"] = _mean_valid(pm_f1_w0dt, index)
            out[f"{prefix}_cgf1_w0dt_{suffix}"] = _mean_valid(pm_f1_w0dt * mcc, index)
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                out[f"{prefix}_ilmcc_{suffix}"] = float(np.float64(cgf1_micro) / np.float64(pmf1_micro))
    return out


def _images(data: VideoSet, pairs: Iterable[Pair]) -> list[Pair]:
    """sam3's order of cgF1 images: pairs with GT or predictions sorted, then the other asked pairs."""
    present = sorted(set(pairs))
    seen = set(present)
    extra = [p for p in dict.fromkeys(data.asked or []) if p not in seen]
    return present + extra


class Cgf1(VideoFamily):
    name = "cgf1"
    per_pair_results = True

    def prepare(self, data: VideoSet) -> None:
        require_iou_types(data, self.scoring.iou_types)

    def evaluate_video(self, video: VideoContext) -> dict[tuple[int, str], PairCounts]:
        """Counts of every (category, IoU type) with GT, predictions, or asked of the video."""
        gts, predictions = video.gts_by_category, video.predictions_by_category
        out = {}
        for category in set(gts) | set(predictions) | set(video.asked):
            group = [g for g in gts.get(category, []) if not g.crowd]
            dts = [p for p in predictions.get(category, []) if p.score >= self.scoring.threshold]
            for iou_type in self.scoring.iou_types:
                out[category, iou_type] = match_pair(video.track_iou(iou_type, dts, group))
        return out

    def reduce(self, data: VideoSet, parts: Mapping[int, Any]) -> FamilyResult:
        metrics: dict[str, float] = {}
        per_pair: dict[Pair, dict[str, float]] = {}
        for iou_type in self.scoring.iou_types:
            kind = KIND[iou_type]
            counts = {(v, c): p for v, part in parts.items() for (c, t), p in part.items() if t == iou_type}
            images = _images(data, counts)
            metrics.update(summarize([counts[p] for p in images], f"video_{kind}_demo", data.is_saco))
            for pair in images:
                per_pair.setdefault(pair, {}).update(counts[pair].video_np_result(kind))
        return FamilyResult(metrics, per_pair=per_pair)
