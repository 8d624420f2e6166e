"""Decoder anchors for training the detector from scratch: boxes tiled over the image, attention kept inside them.

sam3's decoder gives each query a learned reference box and biases the query's attention to the
image by where each image token lies relative to that box (boxRPB). Its defaults assume trained
weights: reference boxes start as sigmoid(N(0, 1)) (large boxes around the centre) and the
attention bias as a random MLP. From scratch that starts every query looking at almost the same,
mostly-background image, so the decoder returns one vector for all queries: on the synthetic set
the mean pairwise cosine of the last-layer queries went from 0.77 to 0.999 in 100 steps, no query
localised an object, and the score could not tell the queries apart.

`init: grid` starts each query at its own cell of a grid over the image (a box of side `size`)
and turns the attention bias into a penalty that grows with a token's distance outside the
query's box, one strength per head, doubling from head to head (`attention_prior` at head
heads // 2): some heads keep to the box, others see its surroundings. Each query then sees its
own part of the image from the first step, the matcher pairs an object with the query whose cell
holds it, and both the box and the score of that query learn from what it sees. Loaded weights
(a checkpoint, `model.uri`) replace all of this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sam3_core.config_checks import check_choice, check_float
from sam3_core.errors import ConfigError

ANCHOR_INITS = ("random", "grid")


@dataclass
class AnchorConfig:
    """Key `model.anchors`: how the decoder's reference boxes and box attention bias start."""

    # "random": sam3's own initialisation; "grid": boxes tiled over the image (see module doc)
    init: str = "random"
    # side of each grid box, as a fraction of the image side
    size: float = 0.3
    # strength of the outside-the-box attention penalty at the middle head (0: keep sam3's random bias)
    attention_prior: float = 4.0

    def __post_init__(self) -> None:
        check_choice("model.anchors.init", self.init, ANCHOR_INITS)
        check_float("model.anchors.size", self.size, 0.0, 1.0, low_open=True)
        check_float("model.anchors.attention_prior", self.attention_prior, 0.0, 64.0)


def grid_boxes(count: int, size: float) -> torch.Tensor:
    """`count` boxes (normalised cxcywh) centred on the cells of a near-square grid, row by row."""
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    index = torch.arange(count)
    cx = ((index % cols).float() + 0.5) / cols
    cy = ((index // cols).float() + 0.5) / rows
    side = torch.full((count,), float(size))
    return torch.stack([cx, cy, side, side], dim=1)


def _inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


def head_strengths(num_heads: int, strength: float) -> torch.Tensor:
    """Penalty per head: doubling from head to head, `strength` at the middle one."""
    return strength * 2.0 ** (torch.arange(num_heads, dtype=torch.float32) - num_heads // 2)


def _box_attention_prior(mlp: nn.Module, strength: float) -> None:
    """Make boxRPB's MLP (inputs: a token's signed, log-scaled offsets from the box's low and high edge)
    output `-strength_h x (distance below the low edge + distance above the high edge)` per head.

    Two hidden units measure the distances (ReLU of -offset_low and of offset_high); the other
    units keep their random weights, with outputs scaled down tenfold so the prior leads.
    """
    first, last = mlp.layers[0], mlp.layers[-1]
    penalty = head_strengths(last.weight.shape[0], strength)
    first.weight[:2] = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])
    first.bias[:2] = 0.0
    last.weight.mul_(0.1)
    last.weight[:, 0] = -penalty
    last.weight[:, 1] = -penalty
    last.bias.zero_()


@torch.no_grad()
def init_anchors(detector: nn.Module, cfg: AnchorConfig) -> None:
    """Apply `cfg` to a freshly built `Sam3Image` (a no-op for `init: random`)."""
    if cfg.init == "random":
        return
    decoder = detector.transformer.decoder
    reference = decoder.reference_points.weight
    reference.copy_(_inverse_sigmoid(grid_boxes(reference.shape[0], cfg.size)))
    if cfg.attention_prior > 0 and decoder.boxRPB != "none":
        if decoder.boxRPB != "log":
            raise ConfigError(f"model.anchors.attention_prior needs the decoder's log boxRPB, not {decoder.boxRPB!r}")
        for mlp in (decoder.boxRPB_embed_x, decoder.boxRPB_embed_y):
            _box_attention_prior(mlp, cfg.attention_prior)
