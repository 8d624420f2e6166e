"""Per-frame detections of a video -> masklets in YTVIS results format."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from sam3_core.errors import ConfigError
from sam3_core.predict.association import AssociationConfig, associate, match
from sam3_core.predict.postprocess import FrameDetections, encode_mask

HEIGHT, WIDTH = 40, 60
Detection = tuple[int, float, tuple[int, int, int, int]]  # category, score, integer xyxy box


def _frame(image_id: int, detections: list[Detection], with_masks: bool = True) -> FrameDetections:
    """A frame whose masks are exactly the detections' rectangles."""
    rles, areas = [], []
    for _, _, (x0, y0, x1, y1) in detections:
        mask = torch.zeros(HEIGHT, WIDTH, dtype=torch.bool)
        mask[y0:y1, x0:x1] = True
        rles.append(encode_mask(mask))
        areas.append((x1 - x0) * (y1 - y0))
    return FrameDetections(
        image_id=image_id,
        height=HEIGHT,
        width=WIDTH,
        scores=[score for _, score, _ in detections],
        category_ids=[cat for cat, _, _ in detections],
        boxes_xyxy=[[float(v) for v in box] for _, _, box in detections],
        rles=rles if with_masks else None,
        areas=areas if with_masks else None,
    )


def _box_of(rle: dict) -> list[float]:
    return [float(v) for v in mask_utils.toBbox(rle)]


def _moving_pair(with_masks: bool = True) -> list[FrameDetections]:
    """Object A slides right along the top, object B slides down on the left; listed in varying order."""
    frames = []
    for t in range(4):
        a: Detection = (1, 0.9, (10 + 3 * t, 2, 20 + 3 * t, 12))
        b: Detection = (1, 0.6, (2, 15 + 3 * t, 12, 25 + 3 * t))
        frames.append(_frame(t, [a, b] if t % 2 == 0 else [b, a], with_masks))
    return frames


def test_two_moving_objects_become_two_masklets_spanning_every_frame() -> None:
    results = associate(_moving_pair(), video_id=5, cfg=AssociationConfig())
    assert len(results) == 2
    first, second = results
    assert (first["video_id"], first["category_id"], second["category_id"]) == (5, 1, 1)
    assert [box[0] for box in first["bboxes"]] == [10.0, 13.0, 16.0, 19.0]
    assert [box[1] for box in second["bboxes"]] == [15.0, 18.0, 21.0, 24.0]
    assert [_box_of(rle) for rle in first["segmentations"]] == first["bboxes"]
    assert first["areas"] == [100, 100, 100, 100]


def test_a_masklets_box_is_its_masks_box_not_the_box_head_of_the_query_that_painted_it() -> None:
    frames = [_frame(t, [(1, 0.9, (2 + t, 2, 12 + t, 12))]) for t in range(3)]
    for frame in frames:
        frame.boxes_xyxy[0] = [30.0, 20.0, 50.0, 38.0]  # a box head that looks elsewhere
    (result,) = associate(frames, video_id=0, cfg=AssociationConfig())
    assert result["bboxes"] == [[2.0 + t, 2.0, 10.0, 10.0] for t in range(3)]


def test_without_masks_a_masklets_box_is_the_detectors_box() -> None:
    (result,) = associate(
        [_frame(0, [(1, 0.9, (2, 2, 12, 12))], with_masks=False)], video_id=0, cfg=AssociationConfig()
    )
    assert result["bboxes"] == [[2.0, 2.0, 10.0, 10.0]]


def test_masklet_score_is_the_mean_of_its_frame_scores() -> None:
    frames = [_frame(0, [(1, 0.9, (0, 0, 10, 10))]), _frame(1, [(1, 0.5, (1, 0, 11, 10))])]
    (result,) = associate(frames, video_id=0, cfg=AssociationConfig())
    assert result["score"] == pytest.approx(0.7)


def test_masklet_score_can_be_the_max_of_its_frame_scores() -> None:
    frames = [_frame(0, [(1, 0.9, (0, 0, 10, 10))]), _frame(1, [(1, 0.5, (1, 0, 11, 10))])]
    (result,) = associate(frames, video_id=0, cfg=AssociationConfig(score_reduction="max"))
    assert result["score"] == pytest.approx(0.9)


def test_a_frame_without_the_object_is_null_in_its_masklet() -> None:
    box = (5, 5, 15, 15)
    frames = [_frame(0, [(1, 0.8, box)]), _frame(1, [(1, 0.8, box)]), _frame(2, []), _frame(3, [(1, 0.8, box)])]
    (result,) = associate(frames, video_id=0, cfg=AssociationConfig(max_missed_frames=1))
    assert result["bboxes"][2] is None and result["segmentations"][2] is None and result["areas"][2] is None
    assert all(result["bboxes"][t] == [5.0, 5.0, 10.0, 10.0] for t in (0, 1, 3))


def test_an_object_gone_longer_than_max_missed_frames_starts_a_new_masklet() -> None:
    box = (5, 5, 15, 15)
    frames = [_frame(0, [(1, 0.9, box)]), _frame(1, []), _frame(2, []), _frame(3, [(1, 0.8, box)])]
    results = associate(frames, video_id=0, cfg=AssociationConfig(max_missed_frames=1))
    assert [[box is not None for box in r["bboxes"]] for r in results] == [
        [True, False, False, False],
        [False, False, False, True],
    ]


def test_boxes_link_frames_when_masks_are_absent() -> None:
    results = associate(_moving_pair(with_masks=False), video_id=5, cfg=AssociationConfig())
    assert [[box[0] for box in r["bboxes"]] for r in results] == [[10.0, 13.0, 16.0, 19.0], [2.0, 2.0, 2.0, 2.0]]
    assert all(segm is None for r in results for segm in r["segmentations"])
    assert results[0]["areas"] == [100.0] * 4


def test_categories_are_tracked_separately() -> None:
    box = (5, 5, 15, 15)
    frames = [_frame(t, [(2, 0.8, box), (1, 0.7, box)]) for t in range(3)]
    results = associate(frames, video_id=0, cfg=AssociationConfig())
    assert [(r["category_id"], sum(b is not None for b in r["bboxes"])) for r in results] == [(1, 3), (2, 3)]


def test_top_k_keeps_the_best_masklets_per_category() -> None:
    frames = [
        _frame(
            0, [(1, 0.2, (0, 0, 5, 5)), (1, 0.9, (20, 20, 25, 25)), (1, 0.5, (40, 0, 45, 5)), (3, 0.1, (0, 30, 5, 35))]
        )
    ]
    results = associate(frames, video_id=0, cfg=AssociationConfig(top_k=2))
    assert [(r["category_id"], r["score"]) for r in results] == [(1, 0.9), (1, 0.5), (3, 0.1)]


def test_hungarian_maximises_total_iou_where_greedy_takes_the_best_pair_first() -> None:
    iou = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert sorted(match(iou, 0.5, "hungarian")) == [(0, 1), (1, 0)]
    assert match(iou, 0.5, "greedy") == [(0, 0)]


def test_matching_never_pairs_below_the_threshold() -> None:
    iou = np.array([[0.3, 0.0], [0.0, 0.6]])
    assert match(iou, 0.5, "hungarian") == [(1, 1)]
    assert match(iou, 0.5, "greedy") == [(1, 1)]


@pytest.mark.parametrize(
    "field, value",
    [
        ("matcher", "nearest"),
        ("iou_threshold", 0.0),
        ("top_k", 0),
        ("score_reduction", "median"),
        ("max_missed_frames", -1),
    ],
)
def test_invalid_knobs_are_config_errors(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"association.{field}"):
        AssociationConfig(**{field: value})
