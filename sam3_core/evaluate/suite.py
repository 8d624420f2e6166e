"""The video metric suite of sam3's SA-Co/VEval evaluator, on one GT and one predictions file.

``sam3.eval.saco_veval_eval.VEvalEvaluator`` runs five evaluators, each re-reading the files and
recomputing overlaps in Python; here the families share one parse (:mod:`.videodata`) and one
table of per-frame mask IoU per video (:mod:`.overlaps`):

- ``map``: YT-VIS class mAP, ``video_{bbox,mask}_mAP_50_95`` (+ ``_50``, ``_75``) -- :mod:`.ap`
- ``phrase_ap``: video phrase AP, ``video_{bbox,mask}_phrase_ap_{50_95,50,75}`` -- :mod:`.ap`
- ``teta``: TETA on masks, ``video_mask_{teta,loc_a,assoc_a,cls_a,...}`` -- :mod:`.teta`
- ``hota``: phrase HOTA, ``video_{bbox,mask}_all_phrase_{HOTA,DetA,AssA,...}`` -- :mod:`.hota`
- ``cgf1``: cgF1 / demo F1, ``video_{bbox,mask}_demo_{cgf1_micro,ilmcc,pmf1,...}_{50_95,50,75}`` -- :mod:`.cgf1`

Work is split by video: everything a (video, phrase) pair needs lives in its video, so each video
is one task (run in worker processes when ``workers`` > 1) and the results are combined in the
reference's order. Nothing is sized by the category list.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from sam3_core.errors import ConfigError, InputError
from sam3_core.evaluate import ap, cgf1, hota, teta
from sam3_core.evaluate.coco import IOU_TYPES, Evaluation, check_max_dets
from sam3_core.evaluate.overlaps import VideoOverlaps, box_track_iou, frame_box_iou
from sam3_core.evaluate.videodata import Masklet, Pair, Video, VideoSet, require

logger = logging.getLogger(__name__)

FAMILIES: tuple[str, ...] = ("map", "phrase_ap", "teta", "hota", "cgf1")
KIND = {"bbox": "bbox", "segm": "mask"}
# workers=0 starts processes only when there is this much work (masklet-frames) to repay their start-up
AUTO_PARALLEL_MIN_FRAMES = 20_000


@dataclass(frozen=True)
class SuiteSettings:
    """What to compute: families, IoU types, COCO max detections, the detection score threshold."""

    families: tuple[str, ...]
    iou_types: tuple[str, ...] = IOU_TYPES
    max_dets: tuple[int, int, int] = (1, 10, 100)
    # cgF1 and TETA keep predictions scoring >= this, HOTA those scoring above it (sam3: 0.5)
    threshold: float = 0.5
    workers: int = 1

    def __post_init__(self) -> None:
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ConfigError(
                f"evaluate.metrics must be a non-empty subset of {list(FAMILIES)}; got {list(self.families)}"
            )
        if not self.iou_types or any(t not in IOU_TYPES for t in self.iou_types):
            raise ConfigError(
                f"evaluate.iou_types must be a non-empty subset of {list(IOU_TYPES)}; got {list(self.iou_types)}"
            )
        check_max_dets(self.max_dets)
        if not 0.0 <= self.threshold <= 1.0:  # NaN fails this too
            raise ConfigError(f"evaluate.score_threshold={self.threshold!r}: must be a number in [0, 1]")
        if self.workers < 0:
            raise ConfigError(f"evaluate.workers={self.workers!r}: must be >= 0 (0 = one per CPU core)")


@dataclass(frozen=True)
class SuiteResult:
    """Dataset metrics (sam3's names), AP evaluations (for the table and PR plot), per-pair results."""

    metrics: dict[str, float]
    evaluations: list[Evaluation]
    video_np_results: list[dict[str, Any]]


@dataclass
class _Task:
    """One video and everything the families need to score it on their own."""

    video: Video
    gts: list[Masklet]
    predictions: list[Masklet]
    asked: list[int]  # categories asked of this video (SA-Co video_np_pairs)
    teta_rank: dict[int, int]  # TETA's class list (category -> position), empty without teta
    settings: SuiteSettings


@dataclass
class _VideoResult:
    matches: dict[tuple[int, str], ap.Matches] = field(default_factory=dict)
    cgf1: dict[tuple[int, str], cgf1.PairCounts] = field(default_factory=dict)
    hota: dict[tuple[int, str], hota.SequenceResult] = field(default_factory=dict)
    teta: dict[int, teta.Counts] = field(default_factory=dict)


def _by_category(masklets: Iterable[Masklet]) -> dict[int, list[Masklet]]:
    out: dict[int, list[Masklet]] = {}
    for m in masklets:
        out.setdefault(m.category_id, []).append(m)
    return out


class _Scorer:
    """Masklet IoU of one video for either IoU type, from the shared mask table or the boxes."""

    def __init__(self, task: _Task, overlaps: VideoOverlaps | None) -> None:
        self.overlaps = overlaps
        self.gt_pos = {id(m): j for j, m in enumerate(task.gts)}
        self.pred_pos = {id(m): i for i, m in enumerate(task.predictions)}

    def rows(self, predictions: Sequence[Masklet]) -> np.ndarray:
        return np.array([self.pred_pos[id(p)] for p in predictions], dtype=np.int64)

    def cols(self, gts: Sequence[Masklet]) -> np.ndarray:
        return np.array([self.gt_pos[id(g)] for g in gts], dtype=np.int64)

    def track_iou(self, iou_type: str, predictions: Sequence[Masklet], gts: Sequence[Masklet]) -> np.ndarray:
        if not predictions or not gts:
            return np.zeros((len(predictions), len(gts)))
        if iou_type == "bbox":
            return box_track_iou(predictions, gts)
        assert self.overlaps is not None
        return self.overlaps.track_iou(self.rows(predictions), self.cols(gts))


def _hota_present(p: Masklet) -> np.ndarray:
    """sam3's HOTA drops a predicted frame whose area is 0 or whose box is null or all zeros."""
    area = p.areas if p.areas is not None else p.mask_areas
    return ~(p.box_zero | (area == 0))


def _hota_pair(
    scorer: _Scorer, iou_type: str, gts: list[Masklet], predictions: list[Masklet], length: int
) -> hota.SequenceResult:
    if iou_type == "segm":
        gt_present = np.array([[m is not None for m in g.masks] for g in gts], dtype=bool).reshape(len(gts), length)
    else:
        gt_present = np.array([~g.box_null for g in gts], dtype=bool).reshape(len(gts), length)
    tracker_present = np.array([_hota_present(p) for p in predictions], dtype=bool).reshape(len(predictions), length)
    gt_track_ids = np.array([g.track_id for g in gts], dtype=np.int64)
    rows, cols = scorer.rows(predictions), scorer.cols(gts)
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
            assert scorer.overlaps is not None
            sims.append(scorer.overlaps.frame_iou(int(t), rows[d], cols[g]).T)
    gt_labels, num_gt = hota.relabel(gt_ids)
    tracker_labels, num_tracker = hota.relabel(tracker_ids)
    frames = [hota.Frame(g, d, s) for g, d, s in zip(gt_labels, tracker_labels, sims)]
    return hota.evaluate_sequence(frames, num_gt, num_tracker)


def _teta_video(task: _Task, scorer: _Scorer) -> dict[int, teta.Counts]:
    length, threshold = task.video.length, task.settings.threshold
    gts = task.gts
    trackers = [p for p in task.predictions if p.score >= threshold]
    gt_present = np.array([~g.box_null for g in gts], dtype=bool).reshape(len(gts), length)
    tracker_present = np.array([~p.box_zero for p in trackers], dtype=bool).reshape(len(trackers), length)
    gt_ids = np.array([g.track_id for g in gts], dtype=np.int64)
    gt_classes = np.array([g.category_id for g in gts], dtype=np.int64)
    tracker_classes = np.array([p.category_id for p in trackers], dtype=np.int64)
    rows, cols = scorer.rows(trackers), scorer.cols(gts)
    assert scorer.overlaps is not None
    frames, classes = [], set()
    for t in np.flatnonzero(gt_present.any(axis=0)):  # frames without GT are not part of the sequence
        g, d = np.flatnonzero(gt_present[:, t]), np.flatnonzero(tracker_present[:, t])
        frames.append(
            teta.Frame(
                gt_ids[g], gt_classes[g], d, tracker_classes[d], scorer.overlaps.frame_iou(int(t), rows[d], cols[g]).T
            )
        )
        classes.update(gt_classes[g].tolist(), tracker_classes[d].tolist())
    known = set(task.teta_rank)
    ordered = sorted(classes & known, key=task.teta_rank.__getitem__)
    return teta.evaluate_video(frames, ordered, known)


def _evaluate_video(task: _Task) -> _VideoResult:
    """Every family's per-video part (runs in a worker process when there are several)."""
    s = task.settings
    families = set(s.families)
    masks_needed = "teta" in families or ("segm" in s.iou_types and families & {"map", "phrase_ap", "cgf1", "hota"})
    overlaps = VideoOverlaps(task.predictions, task.gts, task.video.length) if masks_needed else None
    scorer = _Scorer(task, overlaps)
    gts, predictions = _by_category(task.gts), _by_category(task.predictions)
    out = _VideoResult()
    if families & {"map", "phrase_ap"}:
        for category in sorted(set(gts) | set(predictions)):
            dts = ap.sorted_predictions(predictions.get(category, []), s.max_dets[-1])
            group = gts.get(category, [])
            for iou_type in s.iou_types:
                out.matches[category, iou_type] = ap.match_group(dts, group, scorer.track_iou(iou_type, dts, group))
    if "cgf1" in families:
        for category in set(gts) | set(predictions) | set(task.asked):
            group = [g for g in gts.get(category, []) if not g.crowd]
            dts = [p for p in predictions.get(category, []) if p.score >= s.threshold]
            for iou_type in s.iou_types:
                out.cgf1[category, iou_type] = cgf1.match_pair(scorer.track_iou(iou_type, dts, group))
    if "hota" in families:
        confident = {c: [p for p in ps if p.score > s.threshold] for c, ps in predictions.items()}
        for category in set(gts) | {c for c, ps in confident.items() if ps}:
            for iou_type in s.iou_types:
                out.hota[category, iou_type] = _hota_pair(
                    scorer, iou_type, gts.get(category, []), confident.get(category, []), task.video.length
                )
    if "teta" in families:
        out.teta = _teta_video(task, scorer)
    return out


def _cpus() -> int:
    """CPUs this process may run on (its affinity where the OS tells, else all of them)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def _run(tasks: list[_Task], workers: int) -> list[_VideoResult]:
    frames = sum(t.video.length * (len(t.gts) + len(t.predictions)) for t in tasks)
    if workers == 0:
        workers = _cpus() if frames >= AUTO_PARALLEL_MIN_FRAMES else 1
    workers = min(workers, len(tasks))
    progress = {"desc": "videos", "unit": "video", "total": len(tasks), "disable": None}
    if workers <= 1:
        return [_evaluate_video(task) for task in tqdm(tasks, **progress)]
    logger.info("evaluating %d videos in %d processes", len(tasks), workers)
    # forkserver: safe when the parent runs threads (MLflow's sender); the server imports this module once
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(tqdm(pool.map(_evaluate_video, tasks), **progress))


def _check_masks(data: VideoSet, settings: SuiteSettings) -> None:
    """Frames that HOTA / TETA count as detections must have a mask (sam3 would crash on them)."""
    families = set(settings.families)
    checks = []
    if "teta" in families:
        checks += [
            ("annotations", data.gt_source, data.gt, lambda m: ~m.box_null, "TETA"),
            (
                "",
                data.predictions_source,
                [p for p in data.predictions if p.score >= settings.threshold],
                lambda m: ~m.box_zero,
                "TETA",
            ),
        ]
    if "hota" in families and "segm" in settings.iou_types:
        checks.append(
            (
                "",
                data.predictions_source,
                [p for p in data.predictions if p.score > settings.threshold],
                _hota_present,
                "HOTA",
            )
        )
    for prefix, source, masklets, counted, family in checks:
        for m in masklets:
            missing = np.flatnonzero(counted(m) & np.array([mask is None for mask in m.masks]))
            if len(missing):
                raise InputError(
                    source,
                    f"{prefix}[{m.index}].segmentations[{missing[0]}]",
                    f"null in a frame where the box is set: {family} compares the masks of every frame with a box",
                )


def _teta_classes(data: VideoSet) -> dict[int, int]:
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


def _tasks(data: VideoSet, settings: SuiteSettings, rank: dict[int, int]) -> list[_Task]:
    gts, predictions = data.videos_of(data.gt), data.videos_of(data.predictions)
    asked: dict[int, list[int]] = {v: [] for v in data.videos}
    for video_id, category_id in data.asked or []:
        asked[video_id].append(category_id)
    return [_Task(video, gts[v], predictions[v], asked[v], rank, settings) for v, video in data.videos.items()]


def _cgf1_images(data: VideoSet, pairs: Iterable[Pair]) -> list[Pair]:
    """sam3's order of cgF1 images: pairs with GT or predictions sorted, then the other asked pairs."""
    present = sorted(set(pairs))
    seen = set(present)
    extra = [p for p in dict.fromkeys(data.asked or []) if p not in seen]
    return present + extra


def evaluate_suite(data: VideoSet, settings: SuiteSettings) -> SuiteResult:
    """Every requested family, with sam3's metric names (see the module docstring)."""
    families = set(settings.families)
    for iou_type in settings.iou_types:
        if families & {"map", "phrase_ap", "cgf1", "hota"}:
            require(data, "bboxes" if iou_type == "bbox" else "segmentations", f"{iou_type} evaluation")
    if families & {"teta", "hota"}:
        require(data, "bboxes", "HOTA / TETA (a frame counts where its box is set)")
    if "teta" in families:
        require(data, "segmentations", "TETA (on masks)")
    _check_masks(data, settings)
    teta_rank = _teta_classes(data) if "teta" in families else {}
    tasks = _tasks(data, settings, teta_rank)
    logger.info(
        "video suite %s: %d videos, %d GT masklets, %d predicted masklets, %d categories in the GT",
        ",".join(settings.families),
        len(tasks),
        len(data.gt),
        len(data.predictions),
        len(data.category_names),
    )
    results = dict(zip(data.videos, _run(tasks, settings.workers)))
    metrics: dict[str, float] = {}
    evaluations: list[Evaluation] = []
    per_pair: dict[Pair, dict[str, float]] = {}
    for iou_type in settings.iou_types:
        matches = {(v, c): m for v, r in results.items() for (c, t), m in r.matches.items() if t == iou_type}
        for family, build in (("map", ap.class_map), ("phrase_ap", ap.phrase_ap)):
            if family in families:
                evaluation = build(matches, iou_type, settings.max_dets)
                evaluations.append(evaluation)
                metrics.update(evaluation.metrics)
        kind = KIND[iou_type]
        if "hota" in families:
            metrics.update(_hota_metrics(data, results, iou_type, per_pair))
        if "cgf1" in families:
            counts = {(v, c): p for v, r in results.items() for (c, t), p in r.cgf1.items() if t == iou_type}
            images = _cgf1_images(data, counts)
            metrics.update(cgf1.summarize([counts[p] for p in images], f"video_{kind}_demo", data.is_saco))
            for pair in images:
                per_pair.setdefault(pair, {}).update(counts[pair].video_np_result(kind))
    if "teta" in families:
        combined = [teta.combine(r.teta[c] for r in results.values() if c in r.teta) for c in teta_rank]
        metrics.update({f"video_mask_{name}": value for name, value in teta.summary(combined).items()})
    rows = [{"video_id": v, "category_id": c, **values} for (v, c), values in sorted(per_pair.items())]
    return SuiteResult(metrics=metrics, evaluations=evaluations, video_np_results=rows)


def _hota_metrics(
    data: VideoSet, results: dict[int, _VideoResult], iou_type: str, per_pair: dict[Pair, dict[str, float]]
) -> dict[str, float]:
    kind = KIND[iou_type]
    sequences = {(v, c): s for v, r in results.items() for (c, t), s in r.hota.items() if t == iou_type}
    ordered = sorted(sequences)
    for pair in ordered:
        per_pair.setdefault(pair, {}).update({f"{kind}_{k}": v for k, v in sequences[pair].means().items()})
    out = {f"video_{kind}_all_phrase_{k}": v for k, v in hota.combine([sequences[p] for p in ordered]).means().items()}
    if data.gt and all(g.has_tags for g in data.gt):  # sam3 then also combines the challenging pairs
        challenging = {(g.video_id, g.category_id) for g in data.gt if hota.CHALLENGING_TAG in g.tags}
        chosen = [sequences[p] for p in ordered if p in challenging]
        if chosen:
            combined = hota.combine(chosen).means()
            out.update({f"video_{kind}_challenging_phrase_{k}": v for k, v in combined.items()})
        else:
            logger.warning("every annotation has tags but none is %r: no challenging HOTA", hota.CHALLENGING_TAG)
    return out
