"""The trainer's hooks: NaN/Inf guard, metric logging, validation, best selection, checkpoints.

Registered in this order by `build_trainer`, so at a step that does everything the guard has
already passed it, the train metrics are logged, validation has run, best.pt follows the new
metrics and the periodic checkpoint then saves all of that (the best state included).
Checkpoints are staged on the training thread and published by `BackgroundUploads`; the hook
after the checkpoint hooks, `AwaitUploads`, raises a failed upload and, at the end, holds every
rank until rank 0's uploads are in the store.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from sam3_core import comm, storage
from sam3_core.errors import ConfigError, InputError
from sam3_core.model.checkpoint import (
    CheckpointRef,
    StagedCheckpoint,
    load_training_state,
    publish_checkpoint,
    stage_checkpoint,
)
from sam3_core.train.run import RunFolder, check_resume_state
from sam3_core.train.trainer import HookBase, TrainingDiverged
from sam3_core.train.uploads import BackgroundUploads, Then

log = logging.getLogger(__name__)
# (kind, ref) once a checkpoint is in the store: kind is best, step or last. Called on rank 0's
# training thread, at the first step after its upload finished (see sam3_core.train.uploads), in
# the order the checkpoints were saved
CheckpointCallback = Callable[[str, CheckpointRef], None]
# (module, val_dataset, step) -> metrics; see Validation
Validator = Callable[[nn.Module, Any, int], dict[str, float]]


def _due(step: int, every: int, last: bool) -> bool:
    return every > 0 and (step % every == 0 or last)


class NonFiniteGuard(HookBase):
    """Stops the run when the loss or the gradient norm is NaN/Inf, before that update is applied.

    The statistics are reduced over ranks first, so every rank stops at the same step; nothing
    is saved after the bad step, so `last.pt` stays the last good checkpoint.
    """

    def __init__(self, last_checkpoint_uri: str = "") -> None:
        self.last_checkpoint_uri = last_checkpoint_uri

    def after_backward(self, stats: dict[str, float]) -> None:
        bad = {
            name: value for name, value in stats.items() if name in ("loss", "grad_norm") and not math.isfinite(value)
        }
        if not bad:
            return
        step = self.trainer.step + 1
        found = ", ".join(f"{name}={value}" for name, value in bad.items())
        kept = (
            f"; last good checkpoint: {self.last_checkpoint_uri}"
            if self.last_checkpoint_uri and storage.exists(self.last_checkpoint_uri)
            else "; no checkpoint was saved before it"
        )
        raise TrainingDiverged(
            f"step {step}: {found}; stopped before applying it{kept}. "
            "Lower optim.lr, raise optim.warmup_steps or set optim.grad_clip, or check the data"
        )


class MetricLogger(HookBase):
    """`train/<stat>` means over each window of `every` steps (and the last step), throughput over ranks."""

    def __init__(self, every: int) -> None:
        self.every = every
        self._sums: dict[str, float] = {}
        self._steps = 0
        self._counts: dict[str, float] = {}
        self._since = time.perf_counter()

    def before_train(self) -> None:
        self._since = time.perf_counter()

    def after_step(self) -> None:
        trainer = self.trainer
        for name, value in trainer.last_stats.items():
            self._sums[name] = self._sums.get(name, 0.0) + value
        for name, count in trainer.last_counts.items():
            self._counts[name] = self._counts.get(name, 0.0) + count
        self._steps += 1
        if not _due(trainer.step, self.every, trainer.is_last_step):
            return
        elapsed = max(time.perf_counter() - self._since, 1e-9)
        metrics = {f"train/{name}": value / self._steps for name, value in self._sums.items()}
        metrics.update({f"train/{name}_per_s": count / elapsed for name, count in self._counts.items()})
        if trainer.device.type == "cuda":
            metrics["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated(trainer.device) / 2**30
        trainer.log(metrics)
        self._sums, self._steps, self._counts = {}, 0, {}
        self._since = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        # the window's sums resume with it, so the first logged means after a resume are the same
        return {"sums": dict(self._sums), "steps": self._steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sums, self._steps = dict(state.get("sums", {})), int(state.get("steps", 0))


class ModelStats(HookBase):
    """Trainable / total parameters, and the optimizer's state size after the first step of a run.

    Logged once per run (a resumed run has them in its history already), at step 1.
    """

    def __init__(self) -> None:
        self._pending: dict[str, float] | None = None

    def before_train(self) -> None:
        module = self.trainer.module
        total = sum(p.numel() for p in module.parameters())
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        log.info("trainable parameters: %.3fM of %.3fM (%.1f%%)", trainable / 1e6, total / 1e6, 100 * trainable / total)
        self._pending = {"model/trainable_params": float(trainable), "model/total_params": float(total)}

    def after_step(self) -> None:
        if self._pending is None or self.trainer.step != 1:
            self._pending = None
            return
        state_bytes = sum(
            value.numel() * value.element_size()
            for per_param in self.trainer.optimizer.state.values()
            for value in per_param.values()
            if isinstance(value, torch.Tensor)
        )
        self._pending["model/optimizer_state_mb"] = state_bytes / 2**20
        log.info("optimizer state: %.1f MiB", state_bytes / 2**20)
        self.trainer.log(self._pending)
        self._pending = None


class Validation(HookBase):
    """Every `every` steps and at the last step: runs the validators and logs what they return.

    A validator is `(module, val_dataset, step) -> {name: value}`, called on every rank with the
    unwrapped module in eval mode under `torch.no_grad`; it may split work over ranks with
    `sam3_core.comm`. Rank 0's results are broadcast, so every rank sees the same metrics. Names
    without a group are logged as `val/<name>`; names like `diag/<name>` are logged as given.
    The random streams are forked around validation: validating never changes the weights.
    """

    def __init__(self, every: int, validators: Sequence[Validator], val_dataset: Any) -> None:
        self.every, self.validators, self.val_dataset = every, list(validators), val_dataset

    def after_step(self) -> None:
        trainer = self.trainer
        if not self.validators or not _due(trainer.step, self.every, trainer.is_last_step):
            return
        module = trainer.module
        was_training = module.training
        devices = [trainer.device.index or 0] if trainer.device.type == "cuda" else []
        metrics: dict[str, float] = {}
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            module.eval()
            try:
                for validator in self.validators:
                    for name, value in validator(module, self.val_dataset, trainer.step).items():
                        metrics[name if "/" in name else f"val/{name}"] = float(value)
            finally:
                module.train(was_training)
        trainer.log(comm.broadcast_object(metrics))


class BestCheckpoint(HookBase):
    """best.pt: the weights of the step where `metric` was best, as exported weights (LoRA merged).

    Checked whenever `metric` is logged; ties keep the earlier step. The value and step are
    saved in every checkpoint (resumed with it) and in best.pt itself. `export()` gives the
    weights to save (staged at once); the upload goes to `uploads`.
    """

    def __init__(
        self,
        metric: str,
        mode: str,
        run: RunFolder,
        export: Callable[[], dict[str, torch.Tensor]],
        uploads: BackgroundUploads,
        extra: dict[str, Any] | None = None,
        on_checkpoint: CheckpointCallback | None = None,
    ) -> None:
        self.metric, self.mode, self.run, self.export = metric, mode, run, export
        self.uploads = uploads
        self.extra = dict(extra or {})
        self.on_checkpoint = on_checkpoint
        self.value = math.nan
        self.step = 0

    def _better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if not math.isfinite(self.value):
            return True
        return value > self.value if self.mode == "max" else value < self.value

    def _check_metric_exists(self, logged: dict[str, float]) -> None:
        group = self.metric.split("/", 1)[0] + "/"
        siblings = sorted(name for name in logged if name.startswith(group))
        if siblings and self.metric not in logged:
            raise ConfigError(
                f"train.best_metric={self.metric}: not logged; {group}* metrics are {', '.join(siblings)}"
            )

    def after_step(self) -> None:
        logged = self.trainer.step_metrics
        self._check_metric_exists(logged)
        if self.metric in logged and self._better(logged[self.metric]):
            self.value, self.step = float(logged[self.metric]), self.trainer.step
            self.save(logged)

    def after_train(self) -> None:
        if self.step == 0:
            log.warning("%s was never finite; best.pt holds the final weights", self.metric)
            self.step = self.trainer.step
            self.save(self.trainer.step_metrics)

    def save(self, logged: dict[str, float]) -> None:
        if not comm.is_main():
            return
        metrics = {name: value for name, value in logged.items() if not name.startswith("train/")}
        state = {
            "model": self.export(),
            "step": self.trainer.step,
            "best": self.state_dict(),
            "metrics": metrics,
            **self.extra,
        }
        staged = stage_checkpoint(state, self.run.best_uri, self.trainer.step, metrics)
        log.info("best %s=%.4g at step %d", self.metric, self.value, self.step)
        self.uploads.submit("best", functools.partial(self._publish, staged))

    def _publish(self, staged: StagedCheckpoint) -> Then:
        ref = publish_checkpoint(staged)
        on_checkpoint = self.on_checkpoint
        return functools.partial(on_checkpoint, "best", ref) if on_checkpoint else None

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode, "value": self.value, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.step = float(state.get("value", math.nan)), int(state.get("step", 0))


class PeriodicCheckpoint(HookBase):
    """Every `every` steps and at the last: the full training state to step_XXXXXXX.pt (if kept) and last.pt.

    With `resume`, `before_train` loads last.pt when there is one (`load_training_state`: mapped,
    one read per machine). `extra` (the config, LoRA settings) is saved alongside. Only rank 0
    writes: it stages the state, and `uploads` publishes it, copies it to last.pt and rewrites
    metrics.jsonl. Gathering the ranks' RNG for the state is collective.
    """

    def __init__(
        self,
        every: int,
        run: RunFolder,
        uploads: BackgroundUploads,
        *,
        keep_steps: bool = True,
        resume: bool = True,
        extra: dict[str, Any] | None = None,
        on_checkpoint: CheckpointCallback | None = None,
    ) -> None:
        self.every, self.run, self.uploads = every, run, uploads
        self.keep_steps, self.resume = keep_steps, resume
        self.extra = dict(extra or {})
        self.on_checkpoint = on_checkpoint

    def before_train(self) -> None:
        """Resume from last.pt, checked first to be a state this model and run can continue from."""
        if not (self.resume and storage.exists(self.run.last_uri)):
            return
        uri = self.run.last_uri
        state = load_training_state(uri)
        check_resume_state(state, uri, self.trainer.max_steps, self.trainer.module.state_dict())
        try:
            self.trainer.load_state_dict(state)
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(
                uri,
                "state",
                f"cannot be resumed ({type(exc).__name__}: {first[:200]}); pass output.overwrite=true to start over",
            ) from exc
        log.info("resumed %s at step %d", uri, self.trainer.step)

    def after_step(self) -> None:
        trainer = self.trainer
        if not _due(trainer.step, self.every, trainer.is_last_step):
            return
        state = trainer.state_dict()  # collective: every rank takes part
        if not comm.is_main():
            return
        metrics = {name: value for name, value in trainer.step_metrics.items() if not name.startswith("train/")}
        state.update(self.extra, metrics=metrics)
        first = self.run.step_uri(trainer.step) if self.keep_steps else self.run.last_uri
        staged = stage_checkpoint(state, first, trainer.step, metrics)
        history = "".join(json.dumps(record) + "\n" for record in trainer.history)
        self.uploads.submit("periodic", functools.partial(self._publish, staged, history))

    def _publish(self, staged: StagedCheckpoint, history: str) -> Then:
        ref = publish_checkpoint(staged)
        refs = {"step" if self.keep_steps else "last": ref}
        if self.keep_steps:
            storage.copy(ref.uri, self.run.last_uri)
            refs["last"] = CheckpointRef(self.run.last_uri, ref.size, ref.sha256, ref.step, ref.metrics)
        storage.write_text(self.run.metrics_uri, history)
        on_checkpoint = self.on_checkpoint
        if on_checkpoint is None:
            return None

        def record() -> None:
            for kind, checkpoint in refs.items():
                on_checkpoint(kind, checkpoint)

        return record


class AwaitUploads(HookBase):
    """Registered after the checkpoint hooks: a failed checkpoint upload stops the run at the next step; the run
    ends with its uploads done.

    At the end rank 0 waits for its uploads, and every rank waits for rank 0 at a barrier through
    gloo (never inside nccl) for at most `timeout_s`: the ranks of a job must not end before its
    last checkpoints are in the store (an elastic PyTorchJob is done once any of its pods is).
    """

    def __init__(self, uploads: BackgroundUploads, timeout_s: float) -> None:
        self.uploads, self.timeout_s = uploads, timeout_s

    def after_step(self) -> None:
        self.uploads.deliver()

    def after_train(self) -> None:
        self.uploads.wait()
        comm.barrier(self.timeout_s)

    def close(self) -> None:
        self.uploads.close()
