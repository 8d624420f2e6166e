"""``phrase_ap``: video phrase AP, ``video_{bbox,mask}_phrase_ap_{50_95,50,75}``.

sam3's ``VideoPhraseApEvaluator``: COCO AP where every (video, phrase) pair is an image of a
single category. It reads the same per-video matching as class mAP (:func:`..ap.video_matches`),
computed once when both run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sam3_core.evaluate import ap
from sam3_core.evaluate.family import FamilyResult, VideoContext, VideoFamily, require_iou_types
from sam3_core.evaluate.videodata import VideoSet


class PhraseAp(VideoFamily):
    name = "phrase_ap"

    def prepare(self, data: VideoSet) -> None:
        require_iou_types(data, self.scoring.iou_types)

    def evaluate_video(self, video: VideoContext) -> dict[tuple[int, str], ap.Matches]:
        return ap.video_matches(video, self.scoring)

    def reduce(self, data: VideoSet, parts: Mapping[int, Any]) -> FamilyResult:
        evaluations = [
            ap.phrase_ap(ap.matches_of(parts, iou_type), iou_type, self.scoring.max_dets)
            for iou_type in self.scoring.iou_types
        ]
        return FamilyResult({k: v for e in evaluations for k, v in e.metrics.items()}, evaluations)
