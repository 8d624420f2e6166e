"""Learning diagnostics on hand-made detector outputs: query collapse, top-query IoU, matched-is-top."""

from __future__ import annotations

import math

import pytest
import torch

from sam3_core.train.diagnostics import (
    frame_diagnostics,
    matched_box_ious,
    matched_is_top,
    mean_pairwise_cosine,
    top_scored_box_ious,
)

# normalised cxcywh
LEFT = [0.25, 0.5, 0.2, 0.2]
RIGHT = [0.75, 0.5, 0.2, 0.2]
NEAR_LEFT = [0.27, 0.5, 0.2, 0.2]  # IoU with LEFT = 0.18 / 0.22
MISS = [0.5, 0.1, 0.1, 0.1]


def test_identical_queries_have_cosine_one_and_orthogonal_ones_zero() -> None:
    assert mean_pairwise_cosine(torch.ones(5, 8)) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.eye(4)) == pytest.approx(0.0)
    assert math.isnan(mean_pairwise_cosine(torch.ones(1, 8)))


def test_the_highest_scoring_query_is_judged_even_when_a_better_box_scores_lower() -> None:
    boxes = torch.tensor([MISS, LEFT])
    ious = top_scored_box_ious(torch.tensor([2.0, 1.0]), boxes, torch.tensor([LEFT]))
    assert ious.tolist() == [0.0]


def test_top_queries_claim_objects_best_score_first_like_coco_matching() -> None:
    boxes = torch.tensor([NEAR_LEFT, LEFT, RIGHT, MISS])
    scores = torch.tensor([3.0, 2.0, 1.0, 0.0])
    ious = top_scored_box_ious(scores, boxes, torch.tensor([LEFT, RIGHT]))
    # the two best queries are NEAR_LEFT and LEFT: both overlap only LEFT, so RIGHT is left unclaimed
    assert ious[0] == pytest.approx(0.18 / 0.22, abs=1e-5)
    assert ious[1] == 0.0


def test_matched_is_top_asks_whether_the_matched_query_is_among_the_k_best() -> None:
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3])
    assert matched_is_top(scores, torch.tensor([1])).tolist() == [True]
    assert matched_is_top(scores, torch.tensor([2])).tolist() == [False]
    assert matched_is_top(scores, torch.tensor([2, 0])).tolist() == [True, False]


def test_matched_box_ious_pair_each_target_with_its_matched_query() -> None:
    boxes = torch.tensor([RIGHT, LEFT])
    ious = matched_box_ious(boxes, torch.tensor([LEFT, RIGHT]), torch.tensor([1, 0]))
    assert ious.tolist() == pytest.approx([1.0, 1.0])


def test_frame_diagnostics_read_sam3s_packed_targets_and_matcher_output() -> None:
    """Two prompts: the first has no object, the second two objects matched out of target order."""
    outputs = {
        "pred_logits": torch.tensor([[[0.0], [0.0], [0.0]], [[5.0], [1.0], [3.0]]]),
        "pred_boxes": torch.tensor([[MISS, MISS, MISS], [RIGHT, MISS, LEFT]]),
        "queries": torch.stack([torch.ones(3, 4), torch.eye(3, 4)]),
        # sam3's matcher: (prompt of each match, query, packed target index)
        "indices": (torch.tensor([1, 1]), torch.tensor([0, 2]), torch.tensor([1, 0])),
    }
    targets = {"num_boxes": torch.tensor([0, 2]), "boxes": torch.tensor([LEFT, RIGHT])}
    values = frame_diagnostics(outputs, targets)
    assert values["top_box_iou"] == pytest.approx([1.0, 1.0])
    assert values["matched_box_iou"] == pytest.approx([1.0, 1.0])
    assert values["matched_is_top"] == [1.0, 1.0]
    assert values["query_cosine"] == pytest.approx([1.0, 0.0])


def test_frame_diagnostics_without_target_indices_take_matches_in_target_order() -> None:
    outputs = {
        "pred_logits": torch.tensor([[[1.0], [4.0]]]),
        "pred_boxes": torch.tensor([[LEFT, RIGHT]]),
        "queries": torch.eye(2, 4)[None],
        "indices": (torch.tensor([0, 0]), torch.tensor([0, 1]), None),
    }
    values = frame_diagnostics(outputs, {"num_boxes": torch.tensor([2]), "boxes": torch.tensor([LEFT, RIGHT])})
    assert values["matched_box_iou"] == pytest.approx([1.0, 1.0])
    assert values["top_box_iou"] == pytest.approx([1.0, 1.0])
