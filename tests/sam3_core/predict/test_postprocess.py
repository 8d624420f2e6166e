"""Detector outputs -> frame detections -> COCO results."""

from __future__ import annotations

import json
import math

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
import torch.nn.functional as F

from sam3_core.errors import ConfigError, InputError
from sam3_core.predict.postprocess import (
    FrameDetections,
    PostprocessConfig,
    batched_frame_detections,
    coco_bbox_results,
    coco_segm_results,
    frame_detections,
)

HEIGHT, WIDTH = 60, 80


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _outputs(probs: list[list[float]], presence: list[float], with_masks: bool = True) -> dict[str, torch.Tensor]:
    """Detector outputs for P prompts x Q queries with the given probabilities (before presence)."""
    num_prompts, num_queries = len(probs), len(probs[0])
    generator = torch.Generator().manual_seed(0)
    outputs = {
        "pred_logits": torch.tensor([[[_logit(p)] for p in row] for row in probs]),
        "pred_boxes": torch.rand(num_prompts, num_queries, 4, generator=generator) * 0.4 + 0.2,
        "presence_logit_dec": torch.tensor([[_logit(p)] for p in presence]),
    }
    if with_masks:
        outputs["pred_masks"] = torch.randn(num_prompts, num_queries, 8, 8, generator=generator) * 4
    return outputs


def test_scores_multiply_query_and_presence_probabilities() -> None:
    outputs = _outputs([[0.8, 0.4]], presence=[0.5])
    dets = frame_detections(outputs, [7], image_id=1, original_size=(HEIGHT, WIDTH), cfg=PostprocessConfig())
    assert dets.scores == pytest.approx([0.4, 0.2])


def test_presence_can_be_ignored() -> None:
    outputs = _outputs([[0.8, 0.4]], presence=[0.5])
    del outputs["presence_logit_dec"]
    cfg = PostprocessConfig(use_presence=False)
    dets = frame_detections(outputs, [7], image_id=1, original_size=(HEIGHT, WIDTH), cfg=cfg)
    assert dets.scores == pytest.approx([0.8, 0.4])


def test_missing_presence_logits_name_the_field_and_the_fix() -> None:
    outputs = _outputs([[0.8]], presence=[0.5])
    del outputs["presence_logit_dec"]
    with pytest.raises(InputError, match=r"presence_logit_dec.*use_presence=false"):
        frame_detections(outputs, [7], image_id=1, original_size=(HEIGHT, WIDTH), cfg=PostprocessConfig())


def test_boxes_are_in_original_pixel_coordinates() -> None:
    outputs = _outputs([[0.9]], presence=[0.9])
    outputs["pred_boxes"] = torch.tensor([[[0.5, 0.25, 0.2, 0.1]]])
    dets = frame_detections(outputs, [7], image_id=1, original_size=(HEIGHT, WIDTH), cfg=PostprocessConfig())
    assert dets.boxes_xyxy == [pytest.approx([32.0, 12.0, 48.0, 18.0])]
    assert dets.boxes_xywh == [pytest.approx([32.0, 12.0, 16.0, 6.0])]


def test_top_k_keeps_the_best_detections_over_all_prompts_best_first() -> None:
    outputs = _outputs([[0.3, 0.9, 0.1], [0.7, 0.2, 0.8]], presence=[0.99, 0.99])
    cfg = PostprocessConfig(top_k=3)
    dets = frame_detections(outputs, [4, 9], image_id=1, original_size=(HEIGHT, WIDTH), cfg=cfg)
    assert dets.scores == pytest.approx([0.9 * 0.99, 0.8 * 0.99, 0.7 * 0.99])
    assert dets.category_ids == [4, 9, 9]


def test_score_threshold_drops_weak_detections() -> None:
    outputs = _outputs([[0.3, 0.9, 0.1]], presence=[0.99])
    cfg = PostprocessConfig(score_threshold=0.2)
    dets = frame_detections(outputs, [4], image_id=1, original_size=(HEIGHT, WIDTH), cfg=cfg)
    assert dets.scores == pytest.approx([0.9 * 0.99, 0.3 * 0.99])


def test_rle_decodes_to_the_upsampled_thresholded_mask() -> None:
    outputs = _outputs([[0.9, 0.6]], presence=[0.9])
    cfg = PostprocessConfig(mask_threshold=0.7)
    dets = frame_detections(outputs, [4], image_id=1, original_size=(HEIGHT, WIDTH), cfg=cfg)
    upsampled = F.interpolate(
        outputs["pred_masks"][0][:, None], size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False
    )[:, 0]
    expected = (upsampled.sigmoid() > 0.7).numpy()
    assert 0 < expected.sum() < expected.size
    assert dets.rles is not None and dets.areas is not None
    for k, rle in enumerate(dets.rles):
        assert isinstance(rle["counts"], str)
        assert rle["size"] == [HEIGHT, WIDTH]
        np.testing.assert_array_equal(mask_utils.decode(rle), expected[k].astype(np.uint8))
        assert dets.areas[k] == int(expected[k].sum())


def test_outputs_without_masks_give_detections_without_rles() -> None:
    outputs = _outputs([[0.9]], presence=[0.9], with_masks=False)
    dets = frame_detections(outputs, [4], image_id=1, original_size=(HEIGHT, WIDTH), cfg=PostprocessConfig())
    assert dets.rles is None and dets.areas is None
    with pytest.raises(ConfigError, match="no pred_masks"):
        coco_segm_results([dets])


def test_prompt_count_must_match_category_ids() -> None:
    outputs = _outputs([[0.9], [0.8]], presence=[0.9, 0.9])
    with pytest.raises(InputError, match="2 prompts but 1 category ids"):
        frame_detections(outputs, [4], image_id=1, original_size=(HEIGHT, WIDTH), cfg=PostprocessConfig())


def _split(outputs: dict[str, torch.Tensor], sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    """The outputs as the detector gives them in prompt batches of `sizes`."""
    parts = {key: value.split(sizes) for key, value in outputs.items()}
    return [{key: parts[key][i] for key in outputs} for i in range(len(sizes))]


@pytest.mark.parametrize("sizes", [[1, 1, 1, 1, 1], [2, 3], [4, 1]])
def test_prompt_batches_keep_the_detections_of_all_prompts_at_once(sizes: list[int]) -> None:
    # ties (0.6 on prompts 0, 2 and 4) are ordered by prompt then query however the prompts are batched
    probs = [[0.6, 0.1, 0.9], [0.2, 0.8, 0.3], [0.6, 0.7, 0.05], [0.95, 0.5, 0.4], [0.6, 0.6, 0.2]]
    outputs = _outputs(probs, presence=[0.99] * 5)
    cfg = PostprocessConfig(top_k=7, score_threshold=0.3)
    ids = [10, 11, 12, 13, 14]
    whole = frame_detections(outputs, ids, image_id=1, original_size=(HEIGHT, WIDTH), cfg=cfg)
    batched = batched_frame_detections(_split(outputs, sizes), ids, image_id=1, original_size=(HEIGHT, WIDTH), cfg=cfg)
    assert batched == whole
    assert whole.category_ids == [13, 10, 11, 12, 10, 12, 14]


def test_prompt_batches_must_add_up_to_the_category_ids() -> None:
    outputs = _outputs([[0.9], [0.8], [0.7]], presence=[0.9] * 3)
    with pytest.raises(InputError, match="3 prompts but 2 category ids"):
        batched_frame_detections(_split(outputs, [2, 1]), [4, 5], 1, (HEIGHT, WIDTH), PostprocessConfig())


def _frame() -> FrameDetections:
    rle = mask_utils.encode(np.asfortranarray(np.ones((10, 20), dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return FrameDetections(
        image_id=3,
        height=40,
        width=50,
        scores=[0.75],
        category_ids=[2],
        boxes_xyxy=[[1.0, 2.0, 21.0, 12.0]],
        rles=[rle],
        areas=[200],
    )


def test_coco_bbox_results_use_xywh_boxes() -> None:
    assert coco_bbox_results([_frame()]) == [
        {"image_id": 3, "category_id": 2, "bbox": [1.0, 2.0, 20.0, 10.0], "score": 0.75}
    ]


def test_coco_segm_results_carry_rle_area_fraction_and_box_as_json() -> None:
    frame = _frame()
    (result,) = coco_segm_results([frame])
    assert result["segmentation"] == frame.rles[0]  # type: ignore[index]
    assert result["area"] == pytest.approx(200 / (40 * 50))
    assert result["bbox"] == [1.0, 2.0, 20.0, 10.0]
    assert (result["image_id"], result["category_id"], result["score"]) == (3, 2, 0.75)
    assert json.loads(json.dumps(result)) == result


@pytest.mark.parametrize("field, value", [("top_k", 0), ("mask_threshold", 1.0), ("score_threshold", -0.1)])
def test_invalid_knobs_are_config_errors(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"postprocess.{field}"):
        PostprocessConfig(**{field: value})
