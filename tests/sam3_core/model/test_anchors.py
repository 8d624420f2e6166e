"""Grid anchors for from-scratch training: reference boxes tile the image, attention stays inside each box."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from sam3_core.errors import ConfigError
from sam3_core.model.anchors import AnchorConfig, grid_boxes, head_strengths
from sam3_core.model.build import build_detector
from sam3_core.model.config import ModelConfig

GRID = AnchorConfig(init="grid", size=0.25, attention_prior=4.0)


def tiny(anchors: AnchorConfig, num_queries: int = 16) -> torch.nn.Module:
    return build_detector(
        ModelConfig(image_size=56, vit_pretrain_img_size=56, num_queries=num_queries, anchors=anchors)
    )


@pytest.fixture(scope="module")
def grid_detector(torch_single_thread: None) -> torch.nn.Module:
    return tiny(GRID)


def test_grid_boxes_tile_the_image_row_by_row_with_the_given_side() -> None:
    boxes = grid_boxes(6, 0.2)
    centres = [[1 / 6, 0.25], [0.5, 0.25], [5 / 6, 0.25], [1 / 6, 0.75], [0.5, 0.75], [5 / 6, 0.75]]
    assert torch.allclose(boxes[:, :2], torch.tensor(centres))
    assert boxes[:, 2:].unique().tolist() == pytest.approx([0.2])
    assert len({tuple(b) for b in grid_boxes(64, 0.3)[:, :2].tolist()}) == 64


def test_head_strengths_double_from_head_to_head_around_the_middle_one() -> None:
    assert head_strengths(4, 4.0).tolist() == [1.0, 2.0, 4.0, 8.0]


def test_grid_init_starts_every_query_at_its_grid_box(grid_detector: torch.nn.Module) -> None:
    reference = grid_detector.transformer.decoder.reference_points.weight.sigmoid()
    assert torch.allclose(reference, grid_boxes(16, 0.25), atol=1e-5)


def test_grid_init_biases_each_querys_attention_against_tokens_outside_its_box(grid_detector: torch.nn.Module) -> None:
    decoder = grid_detector.transformer.decoder
    box = torch.tensor([[[0.5, 0.5, 0.25, 0.25]]])  # [queries, batch, cxcywh]
    with torch.no_grad():
        bias = decoder._get_rpb_matrix(box, (8, 8))[0, :, 0].reshape(-1, 8, 8)  # [heads, H, W]
    # sam3 places token j at j / 8: the box [0.375, 0.625) holds tokens 3 and 4, token 6 is one token outside
    inside, next_to, far = bias[:, 3:5, 3:5], bias[:, 3:5, 6], bias[:, 0, 0]
    strengths = head_strengths(bias.shape[0], GRID.attention_prior)
    for head, strength in enumerate(strengths.tolist()):
        # one token (1/8 of the image) outside costs log2(2) / 3 = 0.33 x strength, three tokens in x and y 1.33 x
        assert inside[head].max() - inside[head].min() < 0.1 * strength
        assert next_to[head].max() < inside[head].min() - 0.2 * strength
        assert far[head] < next_to[head].min() - 0.8 * strength


def test_random_init_is_sam3s_own(torch_single_thread: None) -> None:
    default, explicit = tiny(AnchorConfig()), tiny(AnchorConfig(init="random", size=0.5))
    for (name, a), (_, b) in zip(default.state_dict().items(), explicit.state_dict().items()):
        assert torch.equal(a, b), name
    reference = default.transformer.decoder.reference_points.weight.sigmoid()
    assert not torch.allclose(reference, grid_boxes(16, 0.3), atol=0.05)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"init": "uniform"}, "init"),
        ({"size": 0.0}, "size"),
        ({"size": 1.5}, "size"),
        ({"size": float("nan")}, "size"),
        ({"attention_prior": -1.0}, "attention_prior"),
        ({"attention_prior": float("inf")}, "attention_prior"),
    ],
)
def test_bad_anchor_values_are_config_errors_naming_the_key(changes: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"model\.anchors\.{key} must be "):
        dataclasses.replace(AnchorConfig(), **changes)
