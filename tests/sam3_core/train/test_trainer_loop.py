"""The training loop and its hooks, driven by a toy regression model: milliseconds per run.

The toy has dropout (so resuming must restore the random stream), gradient accumulation and
an epoch that does not divide into micro-batches (so the data cursor crosses epochs mid-step).
Two-rank behaviour (means over ranks, throughput, a NaN on one rank) runs under gloo in
spawned processes.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from sam3_core import comm, storage
from sam3_core.errors import ConfigError
from sam3_core.model.checkpoint import CheckpointRef, load_checkpoint
from sam3_core.train.build import result_of
from sam3_core.train.data import MicroBatches
from sam3_core.train.hooks import (
    AwaitUploads,
    BestCheckpoint,
    MetricLogger,
    NonFiniteGuard,
    PeriodicCheckpoint,
    Validation,
    Validator,
)
from sam3_core.train.optim import OptimConfig, build_optimizer, build_scheduler
from sam3_core.train.run import RunFolder
from sam3_core.train.trainer import HookBase, Trainer, TrainingDiverged, seed_everything
from sam3_core.train.uploads import BackgroundUploads
from tests.fixtures.network import free_port
from tests.fixtures.paths import REPO

SAMPLES = 10
BATCH = 3
MAX_STEPS = 12


class ToyData(Dataset):
    """SAMPLES fixed points of a noisy linear function."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(SAMPLES, 4, generator=generator)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(SAMPLES, generator=generator)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        return index, self.x[index], self.y[index]


def collate(items: list[tuple[int, torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        "index": torch.tensor([i for i, _, _ in items]),
        "x": torch.stack([x for _, x, _ in items]),
        "y": torch.stack([y for _, _, y in items]),
    }


class ToyTask:
    """MSE (+ MAE as a logged term); `poison` makes the loss of one optimizer step non-finite."""

    def __init__(self, scale: float = 1.0, poison: dict[int, float] | None = None) -> None:
        self.scale, self.poison, self.calls = scale, dict(poison or {}), 0
        self.local_losses: list[float] = []
        # dataset indices of every sample a loss was computed on, in order
        self.trained: list[int] = []

    def to_device(self, batch: Any) -> Any:
        return batch

    def losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls += 1
        self.trained += batch["index"].tolist()
        error = model(batch["x"]).squeeze(-1) - batch["y"]
        loss = self.scale * error.pow(2).mean()
        step = self.calls  # one micro-batch per step in the poisoned runs
        if step in self.poison:
            loss = loss * self.poison[step]
        self.local_losses.append(loss.item())
        return {"loss": loss, "mae": error.abs().mean()}

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"samples": int(batch["x"].shape[0])}


class Recorder(HookBase):
    """Per step: the reduced statistics and counts, and how many samples the task has trained on so far."""

    def __init__(self) -> None:
        self.stats: list[dict[str, float]] = []
        self.counts: list[dict[str, float]] = []
        self.trained: list[int] = []

    def after_step(self) -> None:
        self.stats.append(dict(self.trainer.last_stats))
        self.counts.append(dict(self.trainer.last_counts))
        self.trained.append(len(self.trainer.task.trained))


def toy_model(width: int = 16) -> nn.Module:
    seed_everything(0)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Dropout(0.2), nn.Linear(width, 1))


def scripted(values: dict[int, float], name: str = "score") -> Validator:
    """A validator returning `values[step]` under `name`."""

    def validate(module: nn.Module, val_set: Any, step: int) -> dict[str, float]:
        return {name: values[step]}

    return validate


def toy_trainer(
    store: Path | str,
    *,
    run_name: str = "run",
    max_steps: int = MAX_STEPS,
    log_every: int = 2,
    val_every: int = 0,
    checkpoint_every: int = 3,
    validators: Sequence[Validator] = (),
    best_metric: str = "train/loss",
    best_mode: str = "min",
    grad_accum_steps: int = 2,
    task: ToyTask | None = None,
    resume: bool = True,
    on_metrics: Callable[[int, dict[str, float]], None] | None = None,
    on_checkpoint: Callable[[str, CheckpointRef], None] | None = None,
    upload_timeout_s: float = 60,
    width: int = 16,
) -> Trainer:
    """The real hooks around the toy, writing into `<store>/runs/<run_name>` (a folder or a store URI)."""
    run = RunFolder(storage.join(str(store), "runs", run_name))
    module = toy_model(width)
    cfg = OptimConfig(lr=0.05, warmup_steps=2)
    optimizer = build_optimizer(module, cfg)
    data = MicroBatches(ToyData(), BATCH, collate, seed=3, rank=comm.rank(), world_size=comm.world_size())
    model: nn.Module = module
    if comm.world_size() > 1:
        model = nn.parallel.DistributedDataParallel(module)
    uploads = BackgroundUploads()
    hooks = [
        NonFiniteGuard(run.last_uri),
        MetricLogger(log_every),
        Validation(val_every, validators, val_dataset=None),
        BestCheckpoint(best_metric, best_mode, run, module.state_dict, uploads, on_checkpoint=on_checkpoint),
        PeriodicCheckpoint(
            checkpoint_every, run, uploads, resume=resume, extra={"config": "toy"}, on_checkpoint=on_checkpoint
        ),
        AwaitUploads(uploads, timeout_s=upload_timeout_s),
    ]
    return Trainer(
        model=model,
        module=module,
        task=task or ToyTask(),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg, max_steps),
        data=data,
        max_steps=max_steps,
        grad_accum_steps=grad_accum_steps,
        grad_clip=1.0,
        hooks=hooks,
        on_metrics=on_metrics,
    )


def steps_logged(history: list[dict[str, float]], name: str) -> list[int]:
    return [int(record["step"]) for record in history if name in record]


def due(every: int, max_steps: int = MAX_STEPS) -> list[int]:
    return sorted({*range(every, max_steps + 1, every), max_steps}) if every else []


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


TIMING = ("train/samples_per_s",)


def without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in record.items() if k not in TIMING} for record in history]


# ---------------------------------------------------------------------------- periods


@pytest.mark.parametrize(
    ("log_every", "val_every", "checkpoint_every"),
    [(1, 1, 1), (2, 3, 5), (3, 2, 4), (4, 6, 5), (5, 0, 3), (7, 3, 2), (12, 12, 12), (20, 25, 30)],
)
def test_any_combination_of_log_val_and_checkpoint_periods_acts_at_its_multiples_and_the_last_step(
    tmp_path: Path, log_every: int, val_every: int, checkpoint_every: int
) -> None:
    saved: list[tuple[str, int]] = []
    trainer = toy_trainer(
        tmp_path,
        log_every=log_every,
        val_every=val_every,
        checkpoint_every=checkpoint_every,
        validators=[lambda module, val_set, step: {"score": float(step)}],
        on_checkpoint=lambda kind, ref: saved.append((kind, ref.step)),
    ).fit()
    assert steps_logged(trainer.history, "train/loss") == due(log_every)
    assert steps_logged(trainer.history, "val/score") == due(val_every)
    assert [step for kind, step in saved if kind == "last"] == due(checkpoint_every)
    step_files = sorted(f for f in storage.list_files(str(tmp_path / "runs" / "run")) if "step_" in f)
    assert step_files == [f"checkpoints/step_{s:07d}.pt" for s in due(checkpoint_every)]


def test_a_window_of_logged_train_metrics_averages_its_steps(tmp_path: Path) -> None:
    recorder = Recorder()
    trainer = toy_trainer(tmp_path, log_every=4, max_steps=8)
    trainer.register(recorder)
    trainer.fit()
    per_step = [stats["loss"] for stats in recorder.stats]
    logged = [record["train/loss"] for record in trainer.history if "train/loss" in record]
    assert logged == pytest.approx([sum(per_step[:4]) / 4, sum(per_step[4:]) / 4])


# ---------------------------------------------------------------------------- best checkpoint


VALUES = {2: 0.3, 4: 0.5, 6: 0.4, 8: 0.5, 10: 0.1, 12: 0.2}


@pytest.mark.parametrize(("mode", "best_step"), [("max", 4), ("min", 10)])
def test_best_checkpoint_is_the_step_where_the_named_metric_was_best(tmp_path: Path, mode: str, best_step: int) -> None:
    # max: 0.5 at steps 4 and 8, a tie keeps the earlier step; min: 0.1 at step 10
    trainer = toy_trainer(
        tmp_path,
        val_every=2,
        checkpoint_every=2,
        validators=[scripted(VALUES)],
        best_metric="val/score",
        best_mode=mode,
    ).fit()
    run = RunFolder(str(tmp_path / "runs" / "run"))
    best = load_checkpoint(run.best_uri)
    assert best["step"] == best_step
    assert best["best"] == {"metric": "val/score", "mode": mode, "value": VALUES[best_step], "step": best_step}
    assert best["metrics"] == {"val/score": VALUES[best_step]}
    assert same_weights(best["model"], load_checkpoint(run.step_uri(best_step))["model"])
    result = result_of(trainer, run)
    assert (result.best_metric, result.best_value, result.best_step) == ("val/score", VALUES[best_step], best_step)


def test_the_best_checkpoint_ref_carries_the_validation_metrics_of_its_step(tmp_path: Path) -> None:
    refs: list[tuple[str, CheckpointRef]] = []
    toy_trainer(
        tmp_path,
        val_every=2,
        checkpoint_every=4,
        validators=[scripted(VALUES), scripted({s: -s for s in VALUES}, "diag/x")],
        best_metric="val/score",
        best_mode="max",
        on_checkpoint=lambda kind, ref: refs.append((kind, ref)),
    ).fit()
    best = [ref for kind, ref in refs if kind == "best"]
    assert [ref.step for ref in best] == [2, 4]
    assert best[-1].metrics == {"val/score": 0.5, "diag/x": -4.0}
    assert [ref.metrics for kind, ref in refs if kind == "last"] == [
        {"val/score": VALUES[s], "diag/x": -s} for s in (4, 8, 12)
    ]


def test_best_by_train_loss_follows_the_logged_window_means(tmp_path: Path) -> None:
    trainer = toy_trainer(tmp_path, log_every=3, best_metric="train/loss", best_mode="min").fit()
    logged = {int(r["step"]): r["train/loss"] for r in trainer.history if "train/loss" in r}
    best = load_checkpoint(str(tmp_path / "runs" / "run" / "checkpoints" / "best.pt"))
    assert best["step"] == min(logged, key=logged.__getitem__)


def test_a_best_metric_that_validation_does_not_give_is_a_config_error_naming_what_it_gives(tmp_path: Path) -> None:
    trainer = toy_trainer(tmp_path, val_every=2, validators=[scripted(VALUES)], best_metric="val/scroe")
    with pytest.raises(ConfigError, match=r"train.best_metric=val/scroe: not logged; val/\* metrics are val/score"):
        trainer.fit()


# ---------------------------------------------------------------------------- validation


def test_validators_see_the_unwrapped_module_in_eval_mode_without_gradients(tmp_path: Path) -> None:
    seen: list[tuple[bool, bool, int]] = []

    def spy(module: nn.Module, val_set: Any, step: int) -> dict[str, float]:
        seen.append((module.training, torch.is_grad_enabled(), step))
        return {}

    trainer = toy_trainer(tmp_path, val_every=5, validators=[spy]).fit()
    assert seen == [(False, False, 5), (False, False, 10), (False, False, 12)]
    assert trainer.module.training


def test_validators_names_without_a_group_are_logged_under_val_and_others_as_given(tmp_path: Path) -> None:
    logged: dict[int, dict[str, float]] = {}
    toy_trainer(
        tmp_path,
        val_every=6,
        validators=[lambda m, v, s: {"loss": 1.0, "diag/query_cosine": 0.5}],
        on_metrics=lambda step, metrics: logged.setdefault(step, {}).update(metrics),
    ).fit()
    assert {"val/loss": 1.0, "diag/query_cosine": 0.5}.items() <= logged[6].items()


def test_validating_does_not_change_the_trained_weights(tmp_path: Path) -> None:
    # the toy's dropout draws from torch's global stream; a validator drawing from it too must not shift it
    def noisy(module: nn.Module, val_set: Any, step: int) -> dict[str, float]:
        return {"noise": float(torch.rand(()))}

    plain = toy_trainer(tmp_path, run_name="plain").fit()
    validated = toy_trainer(tmp_path, run_name="validated", val_every=1, validators=[noisy]).fit()
    assert same_weights(plain.module.state_dict(), validated.module.state_dict())


# ---------------------------------------------------------------------------- resume


RESUME_VALUES = {4: 0.2, 8: 0.6, 12: 0.4}


def resumable_toy(store: Path, run_name: str) -> Trainer:
    """Validation every 4 steps (best at step 8), a checkpoint after every step, a recorder last."""
    trainer = toy_trainer(
        store,
        run_name=run_name,
        checkpoint_every=1,
        val_every=4,
        validators=[scripted(RESUME_VALUES)],
        best_metric="val/score",
        best_mode="max",
    )
    trainer.register(Recorder())
    return trainer


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Trainer]:
    """A 12-step toy run with a checkpoint after every step."""
    store = tmp_path_factory.mktemp("toy-store")
    return store, resumable_toy(store, "run").fit()


@pytest.mark.parametrize("stop", range(1, MAX_STEPS))
@pytest.mark.integration
def test_resuming_from_any_checkpoint_ends_with_the_uninterrupted_weights_and_logs(
    uninterrupted: tuple[Path, Trainer], tmp_path: Path, stop: int
) -> None:
    store, straight = uninterrupted
    source = RunFolder(str(store / "runs" / "run"))
    resumed_run = RunFolder(str(tmp_path / "runs" / "resumed"))
    Path(resumed_run.checkpoints_uri).mkdir(parents=True)
    shutil.copy(source.step_uri(stop), resumed_run.last_uri)

    resumed = resumable_toy(tmp_path, "resumed").fit()
    assert resumed.start_step == stop
    assert same_weights(resumed.module.state_dict(), straight.module.state_dict())
    assert same_weights(resumed.optimizer.state_dict()["state"][0], straight.optimizer.state_dict()["state"][0])
    assert without_timing(resumed.history) == without_timing(straight.history)
    # the data cursor: the resumed run trains on exactly what the straight one trained on after `stop` steps
    assert resumed.task.trained == straight.task.trained[straight.find_hook(Recorder).trained[stop - 1] :]
    result = result_of(resumed, resumed_run)
    assert (result.best_value, result.best_step) == (0.6, 8)
    if stop < 8:
        assert load_checkpoint(resumed_run.best_uri)["step"] == 8


def test_rerunning_a_finished_run_does_no_step_and_writes_nothing(uninterrupted: tuple[Path, Trainer]) -> None:
    store, _ = uninterrupted
    last = str(store / "runs" / "run" / "checkpoints" / "last.pt")
    before = storage.sha256_file(last)
    events: list[Any] = []
    again = toy_trainer(
        store, checkpoint_every=1, on_metrics=lambda *a: events.append(a), on_checkpoint=lambda *a: events.append(a)
    ).fit()
    assert (again.step, events) == (MAX_STEPS, [])
    assert storage.sha256_file(last) == before


def test_without_resume_a_run_starts_again_from_step_zero(tmp_path: Path) -> None:
    toy_trainer(tmp_path, max_steps=2).fit()
    fresh = toy_trainer(tmp_path, resume=False, max_steps=3).fit()
    assert (fresh.start_step, fresh.step) == (0, 3)
    assert load_checkpoint(str(tmp_path / "runs" / "run" / "checkpoints" / "last.pt"))["step"] == 3


FIRST_CALL_SCRIPT = """
import torch
from torch import nn
from sam3.model.box_ops import fast_diag_generalized_box_iou
from sam3_core.train.optim import OptimConfig, build_optimizer, build_scheduler
from sam3_core.train.trainer import Trainer

g = torch.Generator().manual_seed(0)
x = torch.rand(64, 4, generator=g)
corner = torch.rand(64, 2, generator=g)
target = torch.cat([corner, corner + 0.5 * torch.rand(64, 2, generator=g)], 1)

class Fixed:
    def __next__(self):
        return x
    def state_dict(self):
        return {}
    def load_state_dict(self, state):
        pass

class Giou:
    def to_device(self, batch):
        return batch
    def losses(self, model, batch):
        box = model(batch).sigmoid()
        xyxy = torch.cat([box[:, :2], box[:, :2] + box[:, 2:]], 1)
        return {"loss": (1 - fast_diag_generalized_box_iou(xyxy, target)).sum()}
    def counts(self, batch):
        return {}

def one_step():
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    cfg = OptimConfig(lr=0.1, warmup_steps=0)
    optimizer = build_optimizer(model, cfg)
    trainer = Trainer(model=model, module=model, task=Giou(), optimizer=optimizer,
                      scheduler=build_scheduler(optimizer, cfg, 1), data=Fixed(), max_steps=1)
    trainer.run_step()
    return [p.detach().clone() for p in model.parameters()]

first = one_step()
# what a prediction or a loss test in the same process does: optimised calls with gradients
for _ in range(3):
    fast_diag_generalized_box_iou(torch.rand(8, 4, requires_grad=True) + torch.tensor([0, 0, 1, 1]), target[:8]).sum().backward()
later = one_step()
print("same" if all(torch.equal(a, b) for a, b in zip(first, later)) else "differ")
"""


@pytest.mark.integration
def test_a_step_through_a_scripted_loss_updates_alike_whatever_ran_before_it_in_the_process() -> None:
    # sam3's GIoU is a TorchScript function: once the executor has optimised it, its gradients round
    # differently from its first call's (a resumed run drifted); a fresh process makes the first
    # step the first GIoU call, and optimised calls come before the second
    proc = subprocess.run(
        [sys.executable, "-c", FIRST_CALL_SCRIPT],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "same"


# ---------------------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize("poison", [math.nan, math.inf], ids=["nan", "inf"])
def test_a_non_finite_loss_stops_the_run_before_the_update_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, poison: float
) -> None:
    trainer = toy_trainer(tmp_path, grad_accum_steps=1, checkpoint_every=3, task=ToyTask(poison={8: poison}))
    run = RunFolder(str(tmp_path / "runs" / "run"))
    with pytest.raises(TrainingDiverged) as raised:
        trainer.fit()
    message = str(raised.value)
    assert message.startswith("step 8: loss=")
    assert run.last_uri in message and "\n" not in message
    last = load_checkpoint(run.last_uri)
    assert last["step"] == 6
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert trainer.step == 7
    assert all(torch.isfinite(p).all() for p in trainer.module.parameters())
    assert not storage.exists(run.step_uri(8))


def test_a_huge_but_finite_loss_does_not_stop_the_run(tmp_path: Path) -> None:
    trainer = toy_trainer(tmp_path, grad_accum_steps=1, task=ToyTask(poison={3: 1e6})).fit()
    assert trainer.step == MAX_STEPS


# ---------------------------------------------------------------------------- two ranks


def _two_rank_run(local_rank: int, store: Path, poison: bool) -> dict[str, Any]:
    logged: list[dict[str, float]] = []
    # each rank its own loss scale, so the ranks' losses differ
    task = ToyTask(scale=1.0 + local_rank, poison={5: math.nan} if poison and local_rank == 1 else None)
    trainer = toy_trainer(
        store,
        max_steps=6,
        log_every=1,
        grad_accum_steps=1,
        task=task,
        on_metrics=lambda step, metrics: logged.append({"step": step, **metrics}),
    )
    recorder = Recorder()
    trainer.register(recorder)
    error = ""
    try:
        trainer.fit()
    except TrainingDiverged as exc:
        error = str(exc)
    return {
        "logged": logged,
        "step": trainer.step,
        "error": error,
        "local_losses": task.local_losses,
        "counts": recorder.counts,
        "weights": [p.sum().item() for p in trainer.module.parameters()],
    }


def _two_rank_worker(local_rank: int, port: int, out: str) -> None:
    """A clean 6-step run, then one where rank 1's loss turns NaN at step 5, in one process group."""
    import os

    os.environ.update(
        RANK=str(local_rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    comm.init_process_group(120)
    record = {
        name: _two_rank_run(local_rank, Path(out) / name, poison) for name, poison in (("clean", False), ("nan", True))
    }
    Path(out, f"rank{local_rank}.json").write_text(json.dumps(record))
    comm.shutdown()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """What each of two gloo ranks saw in a clean run and in a run with a NaN on rank 1."""
    out = tmp_path_factory.mktemp("toy-ddp")
    torch.multiprocessing.spawn(_two_rank_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return {name: [rank[name] for rank in ranks] for name in ("clean", "nan")}


@pytest.mark.integration
def test_under_two_ranks_only_rank_zero_reports_metrics(two_ranks: dict[str, list[dict[str, Any]]]) -> None:
    assert [len(r["logged"]) for r in two_ranks["clean"]] == [6, 0]


def test_under_two_ranks_the_logged_loss_is_the_mean_of_the_ranks_losses(
    two_ranks: dict[str, list[dict[str, Any]]],
) -> None:
    first, second = (r["local_losses"] for r in two_ranks["clean"])
    logged = [record["train/loss"] for record in two_ranks["clean"][0]["logged"]]
    assert first != second
    # float32 losses averaged on the wire, compared with their float64 mean: a few ulps apart
    assert logged == pytest.approx([(a + b) / 2 for a, b in zip(first, second)], rel=1e-6)


def test_under_two_ranks_throughput_counts_the_samples_of_both_ranks(
    two_ranks: dict[str, list[dict[str, Any]]],
) -> None:
    # 10 samples split 5 / 5, batches of 3 then 2 per rank: steps load 6, 4, 6, 4, ... samples in all
    clean = two_ranks["clean"]
    assert [counts["samples"] for counts in clean[0]["counts"]] == [6, 4, 6, 4, 6, 4]
    assert clean[0]["counts"] == clean[1]["counts"]


def test_under_two_ranks_the_weights_stay_identical(two_ranks: dict[str, list[dict[str, Any]]]) -> None:
    assert two_ranks["clean"][0]["weights"] == two_ranks["clean"][1]["weights"]


@pytest.mark.integration
def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(two_ranks: dict[str, list[dict[str, Any]]]) -> None:
    ranks = two_ranks["nan"]
    assert [r["step"] for r in ranks] == [4, 4]
    assert all(r["error"].startswith("step 5: loss=nan") for r in ranks)


# ---------------------------------------------------------------------------- slow checkpoint uploads

# collectives wait this long for the other rank; the store takes longer to take rank 0's first checkpoint
SHORT_TIMEOUT_S = 4
SLOW_UPLOAD_S = 3 * SHORT_TIMEOUT_S


def _slow_upload_worker(local_rank: int, port: int, store: str, out: str) -> None:
    """6 steps on two ranks, checkpoints at steps 4 and 6 into `store` (the first one's upload is slow)."""
    os.environ.update(
        RANK=str(local_rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    # joining may take a while on a busy machine; then every collective waits SHORT_TIMEOUT_S at most
    comm.init_process_group(120)
    torch.distributed.group.WORLD._get_backend(torch.device("cpu")).set_timeout(
        datetime.timedelta(seconds=SHORT_TIMEOUT_S)
    )
    published: list[tuple[str, int]] = []
    error = ""
    trainer = toy_trainer(
        store,
        max_steps=6,
        log_every=100,
        checkpoint_every=4,
        grad_accum_steps=1,
        on_checkpoint=lambda kind, ref: published.append((kind, ref.step)),
    )
    try:
        trainer.fit()
    except RuntimeError as exc:  # gloo's timeout
        error = str(exc).splitlines()[0]
    record = {"step": trainer.step, "error": error, "published": published}
    Path(out, f"rank{local_rank}.json").write_text(json.dumps(record))
    os._exit(0)  # after a timeout the group is broken: leave without tearing it down


@pytest.fixture
def slow_uploads(
    s3_bucket: str, s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> tuple[str, list[dict[str, Any]]]:
    """Two ranks training into an object store that takes SLOW_UPLOAD_S to take step 4's checkpoint."""
    from tests.fixtures.fault_proxy import FaultProxy

    store = f"{s3_bucket}/store"
    proxy = FaultProxy(s3_server, fault_rate=0.0, max_latency_s=0.0)
    proxy.slow(lambda method, path: method == "PUT" and path.endswith("/step_0000004.pt"), SLOW_UPLOAD_S)
    proxy.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        torch.multiprocessing.spawn(_slow_upload_worker, args=(free_port(), store, str(tmp_path)), nprocs=2, join=True)
    finally:
        proxy.stop()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    return store, [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.integration
def test_a_checkpoint_slower_to_upload_than_the_collective_timeout_holds_no_rank_and_all_end_published(
    slow_uploads: tuple[str, list[dict[str, Any]]],
) -> None:
    store, ranks = slow_uploads
    assert [(r["step"], r["error"]) for r in ranks] == [(6, ""), (6, "")]
    # recorded in the order saved, once each is in the store; the run ends with all of them there
    assert [tuple(p) for p in ranks[0]["published"]] == [
        ("step", 4),
        ("last", 4),
        ("best", 6),
        ("step", 6),
        ("last", 6),
    ]
    assert load_checkpoint(f"{store}/runs/run/checkpoints/last.pt")["step"] == 6


# ---------------------------------------------------------------------------- resuming on several ranks

# a toy of ~8M float32 parameters: its training state (weights and two AdamW moments) is ~100 MB
WIDE = 1_600_000


def _rss_anon() -> int:
    """This process's private resident memory (anonymous pages), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def _resume_worker(local_rank: int, port: int, store: str, out: str) -> None:
    """Build the toy on two ranks and resume it from the store's last.pt; record what that cost in memory."""
    os.environ.update(
        RANK=str(local_rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    comm.init_process_group(120)
    trainer = toy_trainer(store, max_steps=4, width=WIDE)
    before = _rss_anon()
    trainer.find_hook(PeriodicCheckpoint).before_train()
    grown = _rss_anon() - before
    record = {"step": trainer.step, "private_bytes_grown": grown}
    Path(out, f"rank{local_rank}.json").write_text(json.dumps(record))
    comm.shutdown()


def _resume_on_two_ranks(store: str, out: Path) -> list[dict[str, Any]]:
    """Spawned processes start with this process's environment (the store's settings)."""
    torch.multiprocessing.spawn(_resume_worker, args=(free_port(), store, str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.integration
def test_two_ranks_resume_from_a_local_store_without_a_private_copy_of_the_state(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    toy_trainer(store, max_steps=2, checkpoint_every=2, width=WIDE).fit()
    size = storage.size(storage.join(store, "runs", "run", "checkpoints", "last.pt"))
    ranks = _resume_on_two_ranks(store, tmp_path)
    assert [r["step"] for r in ranks] == [2, 2]
    # torch.load without mmap gave each rank a private copy: the optimizer state alone is 2/3 of `size`
    assert all(r["private_bytes_grown"] < size / 6 for r in ranks), (size, ranks)


@pytest.mark.integration
def test_two_ranks_of_one_machine_download_the_state_from_an_object_store_once(
    s3_bucket: str, s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tests.fixtures.fault_proxy import FaultProxy

    store = f"{s3_bucket}/store"
    toy_trainer(store, max_steps=2, checkpoint_every=2, width=WIDE).fit()
    size = storage.size(f"{store}/runs/run/checkpoints/last.pt")
    proxy = FaultProxy(s3_server, fault_rate=0.0, max_latency_s=0.0)
    proxy.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        # one GET per download (not ranged parts), so GETs count downloads
        monkeypatch.setenv("SAM3PIPE_MULTIPART_THRESHOLD_MB", "1024")
        ranks = _resume_on_two_ranks(store, tmp_path)
    finally:
        proxy.stop()
    assert [r["step"] for r in ranks] == [2, 2]
    reads = [path for method, path, _ in proxy.requests if method == "GET" and path.endswith("/last.pt")]
    assert len(reads) == 1, proxy.requests
    assert all(r["private_bytes_grown"] < size / 6 for r in ranks), (size, ranks)
