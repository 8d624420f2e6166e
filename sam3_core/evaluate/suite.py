"""The video metric families of ``evaluate.metrics`` on one GT and one predictions file.

``sam3.eval.saco_veval_eval.VEvalEvaluator`` runs five evaluators, each re-reading the files and
recomputing overlaps in Python; here the families (one class each, registered in
:mod:`.families`) share one parse (:mod:`.videodata`) and, per video, one context
(:class:`.family.VideoContext`) holding the table of per-frame mask IoU (:mod:`.overlaps`) and the
other overlaps several families read.

Work is split by video: everything a (video, phrase) pair or a prompted object needs lives in its
video, so each video is one task (run in worker processes when ``workers`` > 1) where every family
computes its part; then each family reduces its parts to dataset metrics, in the reference's
order. Nothing is sized by the category list.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from sam3_core.errors import ConfigError
from sam3_core.evaluate.coco import IOU_TYPES, Evaluation, check_max_dets
from sam3_core.evaluate.families import CLASSES, FAMILIES
from sam3_core.evaluate.family import Scoring, VideoContext, VideoFamily, VideoTask
from sam3_core.evaluate.videodata import Pair, VideoSet

logger = logging.getLogger(__name__)

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

    @property
    def scoring(self) -> Scoring:
        return Scoring(iou_types=self.iou_types, max_dets=self.max_dets, threshold=self.threshold)


@dataclass(frozen=True)
class SuiteResult:
    """Dataset metrics (sam3's names), AP evaluations (for the table and PR plot), per-pair results, files."""

    metrics: dict[str, float]
    evaluations: list[Evaluation]
    # sam3's per-(video, phrase) results; None when no family that writes them ran
    video_np_results: list[dict[str, Any]] | None
    # name -> text of the files the families publish beside metrics.json
    files: dict[str, str] = field(default_factory=dict)


def _evaluate_video(task: VideoTask) -> dict[str, Any]:
    """Every family's part of one video (runs in a worker process when there are several)."""
    video = VideoContext(task)
    return {family.name: family.evaluate_video(video) for family in task.families}


def _cpus() -> int:
    """CPUs this process may run on (its affinity where the OS tells, else all of them)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def _run(tasks: list[VideoTask], workers: int) -> list[dict[str, Any]]:
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


def _tasks(data: VideoSet, families: tuple[VideoFamily, ...]) -> list[VideoTask]:
    gts, predictions = data.videos_of(data.gt), data.videos_of(data.predictions)
    asked: dict[int, list[int]] = {v: [] for v in data.videos}
    for video_id, category_id in data.asked or []:
        asked[video_id].append(category_id)
    return [VideoTask(video, gts[v], predictions[v], asked[v], families) for v, video in data.videos.items()]


def evaluate_suite(data: VideoSet, settings: SuiteSettings) -> SuiteResult:
    """Every requested family (in registry order, whatever the order asked), with sam3's metric names."""
    scoring = settings.scoring
    families = tuple(cls(scoring) for cls in CLASSES if cls.name in settings.families)
    for family in families:
        family.prepare(data)
    tasks = _tasks(data, families)
    logger.info(
        "video families %s: %d videos, %d GT masklets, %d predicted masklets, %d categories in the GT",
        ",".join(f.name for f in families),
        len(tasks),
        len(data.gt),
        len(data.predictions),
        len(data.category_names),
    )
    parts = dict(zip(data.videos, _run(tasks, settings.workers)))
    metrics: dict[str, float] = {}
    evaluations: list[Evaluation] = []
    per_pair: dict[Pair, dict[str, float]] = {}
    files: dict[str, str] = {}
    for family in families:
        result = family.reduce(data, {v: part[family.name] for v, part in parts.items()})
        metrics.update(result.metrics)
        evaluations += result.evaluations
        for pair, values in result.per_pair.items():
            per_pair.setdefault(pair, {}).update(values)
        files.update(result.files)
    rows = None
    if any(f.per_pair_results for f in families):
        rows = [{"video_id": v, "category_id": c, **values} for (v, c), values in sorted(per_pair.items())]
    return SuiteResult(metrics=metrics, evaluations=evaluations, video_np_results=rows, files=files)
