"""The weight average (`train.ema_decay`): its arithmetic, what validation and best.pt see, exact resume.

Driven by the toy regression model of test_trainer_loop.py (milliseconds per run), wired the way
`build_trainer` wires it: the average updates after every step, validation scores it and best.pt
exports it, and training goes on with its own weights.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from sam3_core.model.checkpoint import load_checkpoint
from sam3_core.train.data import MicroBatches
from sam3_core.train.ema import WeightEma, warmed_up_decay
from sam3_core.train.hooks import (
    AwaitUploads,
    BestCheckpoint,
    MetricLogger,
    PeriodicCheckpoint,
    Validation,
    Validator,
)
from sam3_core.train.optim import OptimConfig, build_optimizer, build_scheduler
from sam3_core.train.run import RunFolder
from sam3_core.train.trainer import HookBase, Trainer
from sam3_core.train.uploads import BackgroundUploads
from tests.sam3_core.train.test_trainer_loop import BATCH, MAX_STEPS, ToyData, ToyTask, collate, same_weights, toy_model

DECAY = 0.9


class WeightsAfterStep(HookBase):
    """The module's trained weights after every step, before the average and the other hooks see them."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def after_step(self) -> None:
        self.weights.append({k: v.detach().clone() for k, v in self.trainer.module.named_parameters()})


def ema_toy(
    store: Path,
    *,
    run_name: str = "run",
    decay: float = DECAY,
    val_every: int = 0,
    validators: Sequence[Validator] = (),
    best_metric: str = "train/loss",
    best_mode: str = "min",
) -> Trainer:
    """The toy with the average wired as build_trainer wires it; a checkpoint after every step."""
    run = RunFolder(str(store / "runs" / run_name))
    module = toy_model()
    cfg = OptimConfig(lr=0.05, warmup_steps=2)
    optimizer = build_optimizer(module, cfg)
    recorder = WeightsAfterStep()
    hooks: list[HookBase] = [recorder, MetricLogger(2)]
    validated: Any = None
    export = module.state_dict
    if decay > 0:
        ema = WeightEma(decay)
        hooks.append(ema)
        validated = ema.swapped_in
        export = lambda: ema.exported(module.state_dict)  # noqa: E731 - as build_trainer composes it
    uploads = BackgroundUploads()
    hooks += [
        Validation(val_every, validators, None, *([validated] if validated else [])),
        BestCheckpoint(best_metric, best_mode, run, export, uploads),
        PeriodicCheckpoint(1, run, uploads, extra={"config": "toy"}),
        AwaitUploads(uploads, timeout_s=60),
    ]
    return Trainer(
        model=module,
        module=module,
        task=ToyTask(),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg, MAX_STEPS),
        data=MicroBatches(ToyData(), BATCH, collate, seed=3),
        max_steps=MAX_STEPS,
        grad_accum_steps=2,
        grad_clip=1.0,
        hooks=hooks,
    )


def expected_averages(trainer: Trainer, decay: float = DECAY) -> list[dict[str, torch.Tensor]]:
    """The average after each step, computed from the recorded weights with the documented decays."""
    weights = trainer.find_hook(WeightsAfterStep).weights
    average = {k: v.detach().clone() for k, v in toy_model().named_parameters()}
    out = []
    for n, step_weights in enumerate(weights, start=1):
        d = warmed_up_decay(decay, n)
        average = {k: d * average[k] + (1 - d) * step_weights[k] for k in average}
        out.append(average)
    return out


def test_the_decay_is_short_at_first_and_reaches_the_configured_one() -> None:
    assert warmed_up_decay(0.99, 1) == pytest.approx(2 / 11)
    assert warmed_up_decay(0.99, 80) == pytest.approx(81 / 90)
    assert warmed_up_decay(0.99, 10_000) == 0.99


def test_after_every_step_the_average_moves_towards_the_weights_by_one_minus_the_decay(tmp_path: Path) -> None:
    trainer = ema_toy(tmp_path).fit()
    ema = trainer.find_hook(WeightEma)
    assert ema is not None and ema.updates == MAX_STEPS
    final = expected_averages(trainer)[-1]
    for name, average in ema.average.items():
        torch.testing.assert_close(average, final[name], rtol=1e-6, atol=1e-7)


def test_the_average_does_not_change_the_trained_weights(tmp_path: Path) -> None:
    plain = ema_toy(tmp_path, run_name="plain", decay=0.0, val_every=3, validators=[lambda m, v, s: {"x": 0.0}]).fit()
    averaged = ema_toy(tmp_path, run_name="ema", val_every=3, validators=[lambda m, v, s: {"x": 0.0}]).fit()
    assert same_weights(plain.module.state_dict(), averaged.module.state_dict())


def test_validation_scores_the_average_and_training_goes_on_with_its_own_weights(tmp_path: Path) -> None:
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def spy(module: nn.Module, val_set: Any, step: int) -> dict[str, float]:
        seen[step] = {k: v.detach().clone() for k, v in module.named_parameters()}
        return {}

    trainer = ema_toy(tmp_path, val_every=4, validators=[spy]).fit()
    averages = expected_averages(trainer)
    weights = trainer.find_hook(WeightsAfterStep).weights
    assert sorted(seen) == [4, 8, 12]
    for step, validated in seen.items():
        for name, value in validated.items():
            torch.testing.assert_close(value, averages[step - 1][name], rtol=1e-6, atol=1e-7)
    assert same_weights(dict(trainer.module.named_parameters()), weights[-1])


def test_the_best_checkpoint_holds_the_average_of_its_step(tmp_path: Path) -> None:
    values = {4: 0.2, 8: 0.6, 12: 0.4}
    trainer = ema_toy(
        tmp_path,
        val_every=4,
        validators=[lambda m, v, s: {"score": values[s]}],
        best_metric="val/score",
        best_mode="max",
    ).fit()
    run = RunFolder(str(tmp_path / "runs" / "run"))
    best = load_checkpoint(run.best_uri)
    assert best["step"] == 8
    saved_average = load_checkpoint(run.step_uri(8))["hooks"]["WeightEma"]["average"]
    assert same_weights({k: best["model"][k] for k in saved_average}, saved_average)
    assert not same_weights(saved_average, dict(trainer.find_hook(WeightsAfterStep).weights[7]))


@pytest.mark.parametrize("stop", [1, 5, 11])
def test_a_resumed_run_ends_with_the_uninterrupted_average_and_best_checkpoint(tmp_path: Path, stop: int) -> None:
    values = {4: 0.2, 8: 0.6, 12: 0.4}
    validators = [lambda m, v, s: {"score": values[s]}]
    straight = ema_toy(tmp_path, val_every=4, validators=validators, best_metric="val/score", best_mode="max").fit()
    source = RunFolder(str(tmp_path / "runs" / "run"))
    resumed_run = RunFolder(str(tmp_path / "runs" / "resumed"))
    Path(resumed_run.checkpoints_uri).mkdir(parents=True)
    shutil.copy(source.step_uri(stop), resumed_run.last_uri)

    resumed = ema_toy(
        tmp_path, run_name="resumed", val_every=4, validators=validators, best_metric="val/score", best_mode="max"
    ).fit()
    assert resumed.start_step == stop
    assert same_weights(resumed.find_hook(WeightEma).average, straight.find_hook(WeightEma).average)
    if stop < 8:  # the resumed run reaches the best step itself
        assert same_weights(load_checkpoint(resumed_run.best_uri)["model"], load_checkpoint(source.best_uri)["model"])
