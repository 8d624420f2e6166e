"""``map``: YT-VIS class mAP on masklets, ``video_{bbox,mask}_mAP_50_95`` (+ ``_50``, ``_75``).

sam3's ``YTVISPredFileEvaluator``: COCO AP where an image is a video and an object a whole
masklet, categories kept apart (the matching and accumulation are in :mod:`..ap`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sam3_core.evaluate import ap
from sam3_core.evaluate.family import FamilyResult, VideoContext, VideoFamily, require_iou_types
from sam3_core.evaluate.videodata import VideoSet


class ClassMap(VideoFamily):
    name = "map"

    def prepare(self, data: VideoSet) -> None:
        require_iou_types(data, self.scoring.iou_types)

    def evaluate_video(self, video: VideoContext) -> dict[tuple[int, str], ap.Matches]:
        return ap.video_matches(video, self.scoring)

    def reduce(self, data: VideoSet, parts: Mapping[int, Any]) -> FamilyResult:
        evaluations = [
            ap.class_map(ap.matches_of(parts, iou_type), iou_type, self.scoring.max_dets)
            for iou_type in self.scoring.iou_types
        ]
        return FamilyResult({k: v for e in evaluations for k, v in e.metrics.items()}, evaluations)
