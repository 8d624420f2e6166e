"""What every video metric family implements, and the per-video context the families of a run share.

A family is a class in its own file under :mod:`.families`, registered in one place
(``families/__init__.py``). Like detectron2's ``DatasetEvaluator``, split so that the costly part
can run in worker processes:

- ``prepare(data)``: refuse input the family cannot score (an ``InputError`` naming the file and the
  field), and keep the dataset-level facts its videos need (TETA's class list);
- ``evaluate_video(video)``: the family's part of one video, read from a :class:`VideoContext`; it
  runs in a worker process when ``workers`` > 1, so what it returns must pickle;
- ``reduce(data, parts)``: the dataset metrics from every video's part, as a :class:`FamilyResult`
  that also carries what the report shows: AP evaluations (per-category table and PR plot), rows
  of sam3's per-(video, phrase) ``video_np_results.json``, and files written beside metrics.json.

All the families of a run read one :class:`VideoContext` per video, so what several of them need --
the per-frame mask IoU table (:mod:`.overlaps`), the masklets grouped by category, the AP matching
that class mAP and phrase AP both read -- is computed once per video, and only if one of them asks.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from sam3_core.evaluate.coco import IOU_TYPES, Evaluation
from sam3_core.evaluate.overlaps import VideoOverlaps, box_track_iou
from sam3_core.evaluate.videodata import Masklet, Pair, Video, VideoSet, require

# sam3's metric names call the segm IoU type "mask"
KIND = {"bbox": "bbox", "segm": "mask"}
T = TypeVar("T")


@dataclass(frozen=True)
class Scoring:
    """The knobs families share: IoU types, COCO max detections, the detection score threshold."""

    iou_types: tuple[str, ...] = IOU_TYPES
    max_dets: tuple[int, int, int] = (1, 10, 100)
    # cgF1 and TETA keep predictions scoring >= this, HOTA those scoring above it (sam3: 0.5)
    threshold: float = 0.5


@dataclass(frozen=True)
class FamilyResult:
    """One family's dataset-level output."""

    metrics: dict[str, float]
    # COCO-layout AP results: the per-category table and the PR plot are drawn from them
    evaluations: list[Evaluation] = field(default_factory=list)
    # (video, category) -> values, merged across families into video_np_results.json
    per_pair: dict[Pair, dict[str, float]] = field(default_factory=dict)
    # file name -> text, published beside metrics.json (names listed in the family's ``files``)
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class VideoTask:
    """One video and everything the families need to score it on their own (pickled to a worker)."""

    video: Video
    gts: list[Masklet]
    predictions: list[Masklet]
    asked: list[int]  # categories asked of this video (SA-Co video_np_pairs)
    families: tuple[VideoFamily, ...]


def _by_category(masklets: Iterable[Masklet]) -> dict[int, list[Masklet]]:
    out: dict[int, list[Masklet]] = {}
    for m in masklets:
        out.setdefault(m.category_id, []).append(m)
    return out


class VideoContext:
    """One video's masklets and the shared, lazily computed overlaps every family reads."""

    def __init__(self, task: VideoTask) -> None:
        self.video = task.video
        self.gts = task.gts
        self.predictions = task.predictions
        self.asked = task.asked
        self._gt_pos = {id(m): j for j, m in enumerate(task.gts)}
        self._pred_pos = {id(m): i for i, m in enumerate(task.predictions)}
        self._shared: dict[Hashable, Any] = {}

    @functools.cached_property
    def overlaps(self) -> VideoOverlaps:
        """Per-frame mask IoU of every prediction with every GT masklet (one pycocotools call a frame)."""
        return VideoOverlaps(self.predictions, self.gts, self.video.length)

    @functools.cached_property
    def gts_by_category(self) -> dict[int, list[Masklet]]:
        return _by_category(self.gts)

    @functools.cached_property
    def predictions_by_category(self) -> dict[int, list[Masklet]]:
        return _by_category(self.predictions)

    def shared(self, key: Hashable, compute: Callable[[], T]) -> T:
        """A per-video result several families read: computed by the first that asks, then reused."""
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]  # type: ignore[no-any-return]

    def rows(self, predictions: Sequence[Masklet]) -> np.ndarray:
        """Positions of ``predictions`` among the video's predictions (rows of the overlap table)."""
        return np.array([self._pred_pos[id(p)] for p in predictions], dtype=np.int64)

    def cols(self, gts: Sequence[Masklet]) -> np.ndarray:
        """Positions of ``gts`` among the video's GT masklets (columns of the overlap table)."""
        return np.array([self._gt_pos[id(g)] for g in gts], dtype=np.int64)

    def track_iou(self, iou_type: str, predictions: Sequence[Masklet], gts: Sequence[Masklet]) -> np.ndarray:
        """[len(predictions), len(gts)] masklet IoU, from the boxes or from the shared mask table."""
        if not predictions or not gts:
            return np.zeros((len(predictions), len(gts)))
        if iou_type == "bbox":
            return box_track_iou(predictions, gts)
        return self.overlaps.track_iou(self.rows(predictions), self.cols(gts))


class VideoFamily(ABC):
    """One metric family (see the module docstring); ``name`` is its value in ``evaluate.metrics``."""

    name: ClassVar[str]
    # files the family publishes beside metrics.json (its FamilyResult.files keys)
    files: ClassVar[tuple[str, ...]] = ()
    # whether it adds per-(video, phrase) rows to video_np_results.json
    per_pair_results: ClassVar[bool] = False

    def __init__(self, scoring: Scoring) -> None:
        self.scoring = scoring

    def prepare(self, data: VideoSet) -> None:  # noqa: B027 -- most families need no dataset-level facts
        """Refuse input this family cannot score; keep what every video needs. Runs before any video."""

    @abstractmethod
    def evaluate_video(self, video: VideoContext) -> Any:
        """This family's part of one video (it must pickle: it may come back from a worker process)."""

    @abstractmethod
    def reduce(self, data: VideoSet, parts: Mapping[int, Any]) -> FamilyResult:
        """Dataset metrics from every video's part; ``parts`` maps video ids in GT file order."""


def require_iou_types(data: VideoSet, iou_types: Iterable[str]) -> None:
    """Boxes for bbox and masks for segm, on every GT annotation and prediction."""
    for iou_type in iou_types:
        require(data, "bboxes" if iou_type == "bbox" else "segmentations", f"{iou_type} evaluation")
