"""Video mAP on masklets (YouTube-VIS style), numerically the same as SAM3's own evaluator.

The stable entry point for class mAP alone (``video_bbox_mAP_*``, ``video_mask_mAP_*``); the
matching and accumulation are in :mod:`.ap`, the reading of the files in :mod:`.videodata`, and
the other families of sam3's SA-Co/VEval suite in :mod:`.suite`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sam3_core.errors import ConfigError
from sam3_core.evaluate.coco import IOU_TYPES, Evaluation, check_max_dets
from sam3_core.evaluate.suite import SuiteSettings, evaluate_suite
from sam3_core.evaluate.videodata import read_video_set


def evaluate_videos(
    gt: dict[str, Any],
    predictions: Any,
    iou_types: Sequence[str],
    *,
    max_dets: Sequence[int],
    gt_source: str,
    predictions_source: str,
    workers: int = 1,
) -> list[Evaluation]:
    """Video mAP for each IoU type ("bbox" -> video_bbox_*, "segm" -> video_mask_*)."""
    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown or not iou_types:
        raise ConfigError(f"evaluate: iou_types must be a non-empty subset of {list(IOU_TYPES)}; got {list(iou_types)}")
    settings = SuiteSettings(
        families=("map",), iou_types=tuple(iou_types), max_dets=check_max_dets(max_dets), workers=workers
    )
    data = read_video_set(gt, predictions, gt_source=gt_source, predictions_source=predictions_source)
    return evaluate_suite(data, settings).evaluations
