"""AdamW parameter groups and the learning-rate schedules (warmup, then cosine / linear / constant)."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from torch import nn

from sam3_core.train.optim import (
    OptimConfig,
    build_optimizer,
    build_scheduler,
    lr_factor,
)

MAX_STEPS = 110


def factors(cfg: OptimConfig, max_steps: int = MAX_STEPS) -> list[float]:
    return [lr_factor(step, cfg, max_steps) for step in range(max_steps + 1)]


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Conv1d(8, 2, 3))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_rises_linearly_to_the_full_rate(schedule: str) -> None:
    cfg = OptimConfig(warmup_steps=10, schedule=schedule)
    assert factors(cfg)[:11] == pytest.approx([0.1 * k for k in range(1, 11)] + [1.0])


def test_cosine_decays_from_the_full_rate_to_min_lr_ratio() -> None:
    cfg = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    decay = factors(cfg)[10:]
    assert decay[0] == pytest.approx(1.0)
    assert decay[50] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cosine at pi/2
    assert decay[25] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert decay[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in pairwise(decay))


def test_linear_decays_in_equal_steps_to_min_lr_ratio() -> None:
    cfg = OptimConfig(warmup_steps=10, schedule="linear", min_lr_ratio=0.2)
    decay = factors(cfg)[10:]
    assert decay[25] == pytest.approx(0.2 + 0.8 * 0.75)
    assert decay[-1] == pytest.approx(0.2)
    assert [a - b for a, b in pairwise(decay)] == pytest.approx([0.8 / 100] * 100)


def test_constant_stays_at_the_full_rate_after_warmup() -> None:
    assert factors(OptimConfig(warmup_steps=10, schedule="constant"))[10:] == [1.0] * 101


def test_the_rate_stays_at_the_minimum_past_max_steps() -> None:
    assert lr_factor(MAX_STEPS + 50, OptimConfig(schedule="cosine", min_lr_ratio=0.1), MAX_STEPS) == pytest.approx(0.1)


def test_unknown_schedule_is_rejected_before_training_starts() -> None:
    optimizer = build_optimizer(small_model(), OptimConfig())
    with pytest.raises(ValueError, match=r"optim\.schedule"):
        build_scheduler(optimizer, OptimConfig(schedule="step"), MAX_STEPS)


def test_scheduler_sets_the_optimizer_rate_each_step() -> None:
    cfg = OptimConfig(lr=1e-3, warmup_steps=3, schedule="cosine")
    model = small_model()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, max_steps=10)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([1e-3 * lr_factor(step, cfg, 10) for step in range(10)])


def test_scheduler_resumes_from_its_state_dict() -> None:
    cfg = OptimConfig(lr=1e-3, warmup_steps=3, schedule="cosine")
    first = build_scheduler(build_optimizer(small_model(), cfg), cfg, max_steps=10)
    for _ in range(6):
        first.optimizer.step()
        first.step()
    resumed = build_scheduler(build_optimizer(small_model(), cfg), cfg, max_steps=10)
    resumed.load_state_dict(first.state_dict())
    assert resumed.get_last_lr() == pytest.approx(first.get_last_lr())
    assert resumed.get_last_lr()[0] == pytest.approx(1e-3 * lr_factor(6, cfg, 10))


def test_one_dimensional_parameters_get_no_weight_decay() -> None:
    model = small_model()
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.05))
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        assert decay_of[id(param)] == (0.0 if param.ndim == 1 else 0.05), name


def test_frozen_parameters_are_left_out_of_the_optimizer() -> None:
    model = small_model()
    model[0].requires_grad_(False)
    optimizer = build_optimizer(model, OptimConfig())
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.parameters() if p.requires_grad}


def test_decoupled_weight_decay_shrinks_a_matrix_but_not_a_bias() -> None:
    model = nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(1.0)
    cfg = OptimConfig(lr=0.1, weight_decay=0.5, warmup_steps=1)
    optimizer = build_optimizer(model, cfg)
    model.weight.grad = torch.zeros_like(model.weight)
    model.bias.grad = torch.zeros_like(model.bias)
    optimizer.step()
    assert torch.allclose(model.weight, torch.full((3, 3), 1.0 - 0.1 * 0.5))
    assert torch.equal(model.bias, torch.ones(3))
