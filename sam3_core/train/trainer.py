"""The training loop: optimizer steps, and hooks around them for everything else.

Shaped like detectron2's `TrainerBase` + hooks and torchtitan's small components: `Trainer`
knows nothing of SAM3, of files or of MLflow. It takes ready objects (the model to call, its
unwrapped module, a `Task` that turns a batch into losses, optimizer, scheduler, a resumable
micro-batch stream) and runs optimizer steps; logging, validation, best selection,
checkpointing and the NaN/Inf guard are hooks (`sam3_core.train.hooks`). `build_trainer`
(`sam3_core.train.build`) assembles the SAM3 one; a toy model and task drive it in tests.

Under DDP every rank runs the same loop: the per-step statistics (losses, gradient norm,
item counts) are all-reduced once per step, so what is logged is the mean over ranks and
throughput counts every rank's items, and every rank takes the same decisions.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from sam3_core import comm
from sam3_core.errors import Sam3PipeError
from sam3_core.train.script_execution import loaded_script_functions, unoptimized_script_execution

log = logging.getLogger(__name__)
MetricsCallback = Callable[[int, dict[str, float]], None]
H = TypeVar("H", bound="HookBase")


class TrainingDiverged(Sam3PipeError):
    """The loss or the gradient became NaN/Inf: the run stops before that update is applied."""


class Task(Protocol):
    """What the loop needs from a model family."""

    def to_device(self, batch: Any) -> Any: ...

    def losses(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """`loss` (what is minimised) and any other scalar terms to log."""
        ...

    def counts(self, batch: Any) -> dict[str, int]:
        """Items in the batch by kind (e.g. clips, frames); each is logged as `<kind>_per_s`."""
        ...


class Stream(Protocol):
    """An endless, resumable iterator of micro-batches."""

    def __next__(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None:
        """Release what loads ahead (threads, workers); the stream may be iterated again after."""
        ...


@dataclass
class TrainResult:
    run_uri: str
    last_checkpoint_uri: str
    best_checkpoint_uri: str
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    # the metric best.pt was chosen by, its value there and that step
    best_metric: str = ""
    best_value: float = float("nan")
    best_step: int = 0


class HookBase:
    """Called by `Trainer.fit` at fixed points; `self.trainer` is set when the hook is registered.

    A hook with state worth resuming returns it from `state_dict` (saved in every checkpoint)
    and takes it back in `load_state_dict`.
    """

    trainer: Trainer

    def before_train(self) -> None:
        """Once, before the first step (after a resume, before the first new step)."""

    def after_backward(self, stats: dict[str, float]) -> None:
        """Every step, gradients ready and statistics reduced over ranks, before the optimizer step."""

    def after_step(self) -> None:
        """Every step, after the optimizer step; `trainer.step` is the number of steps done."""

    def after_train(self) -> None:
        """Once, after the last step."""

    def close(self) -> None:
        """Once, when `fit` ends, after `after_train` or on an error: release what the hook holds."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what `state_dict` gave."""


def rng_state() -> dict[str, Any]:
    """torch's, numpy's and Python's global generator states, in types `torch.load(weights_only=True)` reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`; full precision (no context) when `dtype` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """torch, numpy and Python's global generators, so every random choice of a run follows `seed`."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class Trainer:
    """Optimizer steps with gradient accumulation, clipping, AMP and DDP; everything else in hooks."""

    def __init__(
        self,
        *,
        model: nn.Module,
        module: nn.Module,
        task: Task,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        data: Stream,
        max_steps: int,
        grad_accum_steps: int = 1,
        grad_clip: float = 0.0,
        amp_dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        hooks: Sequence[HookBase] = (),
        on_metrics: MetricsCallback | None = None,
    ) -> None:
        self.model, self.module, self.task = model, module, task
        self.optimizer, self.scheduler, self.data = optimizer, scheduler, data
        self.max_steps, self.grad_accum_steps, self.grad_clip = max_steps, grad_accum_steps, grad_clip
        self.amp_dtype = amp_dtype
        self.device = device or torch.device("cpu")
        # fixed once built (freezing and adapters come first): not walked again every step
        self._trainable = [p for p in module.parameters() if p.requires_grad]
        # the TorchScript functions the losses may call (the model's modules are imported by now)
        self._script_functions = loaded_script_functions()
        self.on_metrics = on_metrics
        self.step = 0
        self.start_step = 0
        # every logged record, on the main rank: {"step": n, name: value, ...}
        self.history: list[dict[str, float]] = []
        # what was logged at the current step (on every rank): hooks read each other's results here
        self.step_metrics: dict[str, float] = {}
        # the last step's statistics: means over ranks (losses, grad_norm, lr) and item counts summed over ranks
        self.last_stats: dict[str, float] = {}
        self.last_counts: dict[str, float] = {}
        self.hooks: list[HookBase] = []
        for hook in hooks:
            self.register(hook)

    def register(self, hook: HookBase) -> None:
        hook.trainer = self
        self.hooks.append(hook)

    def find_hook(self, kind: type[H]) -> H | None:
        return next((hook for hook in self.hooks if isinstance(hook, kind)), None)

    @property
    def is_last_step(self) -> bool:
        return self.step == self.max_steps

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, self.amp_dtype)

    # ---------------------------------------------------------------- metrics
    def log(self, metrics: dict[str, float]) -> None:
        """Record metrics of the current step: kept for the other hooks on every rank, reported on rank 0."""
        self.step_metrics.update(metrics)
        if not comm.is_main():
            return
        if self.history and self.history[-1]["step"] == self.step:
            self.history[-1].update(metrics)
        else:
            self.history.append({"step": self.step, **metrics})
        log.info("step %d %s", self.step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if self.on_metrics:
            self.on_metrics(self.step, metrics)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to go on exactly; a collective (gathers every rank's RNG)."""
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "data": self.data.state_dict(),
            "rng": comm.all_gather_object(rng_state()),
            "world_size": comm.world_size(),
            "hooks": {type(hook).__name__: hook.state_dict() for hook in self.hooks},
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] != comm.world_size():
            log.warning(
                "resuming a %d-process run on %d processes: data order and random streams change",
                state["world_size"],
                comm.world_size(),
            )
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = self.start_step = int(state["step"])
        self.data.load_state_dict(state["data"])
        rngs = state["rng"]
        set_rng_state(rngs[comm.rank()] if comm.rank() < len(rngs) else rngs[0])
        for hook in self.hooks:
            hook.load_state_dict(state["hooks"].get(type(hook).__name__, {}))
        self.history = list(state["history"])

    # ---------------------------------------------------------------- steps
    def _micro_batches(self) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, int]]]:
        distributed = comm.world_size() > 1 and hasattr(self.model, "no_sync")
        for micro in range(self.grad_accum_steps):
            batch = self.task.to_device(next(self.data))
            sync = micro == self.grad_accum_steps - 1 or not distributed
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with self.autocast():
                    losses = self.task.losses(self.model, batch)
                (losses["loss"] / self.grad_accum_steps).backward()
            yield losses, self.task.counts(batch)

    def _grad_norm(self) -> torch.Tensor:
        params = [p for p in self._trainable if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        if self.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        return torch.nn.utils.get_total_norm([p.grad for p in params])

    def run_step(self) -> tuple[dict[str, float], dict[str, float]]:
        """One optimizer step; returns its statistics (means over ranks) and item counts (sums over ranks).

        TorchScript functions run unoptimised from a fresh plan (script_execution.py): the step's
        gradients then do not depend on what ran before it in the process, and resume is exact.
        """
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        with unoptimized_script_execution(self._script_functions):
            for losses, batch_counts in self._micro_batches():
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float() / self.grad_accum_steps
                for name, count in batch_counts.items():
                    counts[name] = counts.get(name, 0) + count
        sums["grad_norm"] = self._grad_norm().detach().float()
        names = list(sums)
        # one collective and one device sync per step: means of the losses, sums of the counts
        world = comm.world_size()
        packed = torch.cat(
            [
                torch.stack([sums[name].to(self.device) for name in names]) / world,
                torch.tensor([float(counts[name]) for name in counts], device=self.device),
            ]
        )
        reduced = comm.all_reduce_sum(packed).tolist()
        stats = dict(zip(names, reduced[: len(names)]))
        stats["lr"] = self.scheduler.get_last_lr()[0]
        totals = dict(zip(counts, reduced[len(names) :]))
        for hook in self.hooks:
            hook.after_backward(stats)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats, totals

    def train_step(self) -> None:
        """One step of `fit`: the optimizer step, then every hook's `after_step`."""
        self.step_metrics = {}
        self.last_stats, self.last_counts = self.run_step()
        self.step += 1
        for hook in self.hooks:
            hook.after_step()

    def fit(self) -> Trainer:
        """Run the hooks' `before_train`, steps up to `max_steps`, `after_train`, and in any case `close`."""
        try:
            for hook in self.hooks:
                hook.before_train()
            bar = tqdm(total=self.max_steps, initial=self.step, desc="train", disable=not comm.is_main(), unit="step")
            try:
                while self.step < self.max_steps:
                    self.train_step()
                    bar.update(1)
                    if "train/loss" in self.step_metrics:
                        bar.set_postfix(loss=f"{self.step_metrics['train/loss']:.3f}")
            finally:
                bar.close()
                self.data.close()
            for hook in self.hooks:
                hook.after_train()
        finally:
            for hook in self.hooks:
                hook.close()
        return self
