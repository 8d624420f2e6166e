"""Video-clip training of the SAM3 detector: one process per GPU (or CPU), DDP, resumable.

Everything a run writes goes to `<store>/runs/<run_name>/`: `config.yaml`, `metrics.jsonl`,
`checkpoints/{last,best,step_XXXXXXX}.pt`. Rerunning the same command resumes from `last.pt`
with the model, optimiser, schedule, RNG states and data position it saved, so an interrupted
run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from sam3_core import storage
from sam3_core.config import to_yaml
from sam3_core.data.clips import ClipDataset
from sam3_core.data.datapoints import collate_clips
from sam3_core.data.frames import FrameReader
from sam3_core.data.loading import PinningCollate
from sam3_core.model.build import build_detector, freeze
from sam3_core.model.checkpoint import (
    CheckpointRef,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)
from sam3_core.model.video_detector import VideoClipDetector
from sam3_core.train import distributed as dist
from sam3_core.train.config import TrainJobConfig
from sam3_core.train.loss import build_loss
from sam3_core.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)
LOSS_TERMS = ("loss_bbox", "loss_giou", "loss_ce", "presence_loss", "loss_mask", "loss_dice")
MetricsCallback = Callable[[int, dict[str, float]], None]
CheckpointCallback = Callable[[str, CheckpointRef], None]


@dataclass
class TrainResult:
    run_uri: str
    last_checkpoint_uri: str
    best_checkpoint_uri: str
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)


def run_name_for(cfg: TrainJobConfig) -> str:
    """A name derived from everything that shapes the run, so the same command finds its run again.

    Tracking settings shape no weights: under another experiment or pipeline run id the
    same command still resumes the same folder.
    """
    shaped = replace(cfg, output=replace(cfg.output, run_name=""), train=replace(cfg.train, resume=True))
    node = OmegaConf.structured(shaped)
    untracked = OmegaConf.masked_copy(node, [key for key in node if key != "tracking"])
    return "train-" + hashlib.sha256(OmegaConf.to_yaml(untracked).encode()).hexdigest()[:12]


def run_uri_for(cfg: TrainJobConfig) -> str:
    return storage.join(cfg.output.store, "runs", cfg.output.run_name or run_name_for(cfg))


class _FrameArrays:
    """Picklable frame loader for DataLoader workers: file name -> uint8 HxWx3."""

    def __init__(self, reader: FrameReader) -> None:
        self.reader = reader

    def __call__(self, file_name: str) -> np.ndarray:
        return np.array(self.reader.image(file_name))


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Trainer:
    def __init__(
        self,
        cfg: TrainJobConfig,
        on_metrics: MetricsCallback | None = None,
        on_checkpoint: CheckpointCallback | None = None,
    ) -> None:
        self.cfg = cfg
        self.on_metrics = on_metrics
        self.on_checkpoint = on_checkpoint
        self.env = dist.init_process_group(cfg.train.dist_timeout_s)
        self.device = dist.device_for(self.env)
        self.run_uri = run_uri_for(cfg)
        self.ckpt_dir = storage.join(self.run_uri, "checkpoints")
        torch.manual_seed(cfg.train.seed + self.env.rank)
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)

        self.reader = FrameReader(cfg.data.uri, cfg.data.cache_dir, cfg.data.cache_bytes)
        frames = _FrameArrays(self.reader)
        self.train_set = ClipDataset(
            self.reader.dataset("train"), frames, cfg.data.clips, cfg.model.image_size, cfg.train.seed, train=True
        )
        self.val_set = (
            ClipDataset(self.reader.dataset("val"), frames, cfg.data.clips, cfg.model.image_size, cfg.train.seed, train=False)
            if cfg.train.val_every > 0
            else None
        )

        self.module = VideoClipDetector(build_detector(cfg.model))
        if cfg.model.uri:
            load_model_weights(self.module, cfg.model.uri)
        if cfg.model.freeze:
            n = freeze(self.module.detector, cfg.model.freeze)
            log.info("froze %.2fM parameters under %s", n / 1e6, cfg.model.freeze)
        self.module.to(self.device)
        self.model: torch.nn.Module = self.module
        if self.env.distributed:
            self.model = DistributedDataParallel(
                self.module,
                device_ids=[self.env.local_rank] if self.device.type == "cuda" else None,
                # not static_graph: its first-step all-reduce hooks onto output tensors found by
                # pytree, which cannot see into SAM3Output (a list subclass), so gradients were
                # never averaged. Some parameters (e.g. the unused 0.5x neck level) get no gradient.
                find_unused_parameters=True,
            )
        self.loss_fn = build_loss(cfg.loss, cfg.model.num_queries, cfg.model.enable_segmentation and cfg.data.clips.with_masks)
        self.optimizer = build_optimizer(self.module, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.max_steps)
        self.amp = cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and self.device.type == "cuda")

        self.step = 0
        self.epoch = 0
        self.micro_in_epoch = 0
        self.best = math.inf
        self.history: list[dict[str, float]] = []

    # ---------------------------------------------------------------- state
    def _state(self) -> dict[str, Any]:
        rng_states = dist.all_gather_object(_rng_state())
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "micro_in_epoch": self.micro_in_epoch,
            "best": self.best,
            "rng": rng_states,
            "world_size": self.env.world_size,
            "history": json.dumps(self.history),
            "config": to_yaml(self.cfg),
        }

    def _resume(self) -> None:
        last = storage.join(self.ckpt_dir, "last.pt")
        if not (self.cfg.train.resume and storage.exists(last)):
            return
        state = load_checkpoint(last)
        if state["world_size"] != self.env.world_size:
            log.warning("resuming a %d-process run on %d processes: data order changes", state["world_size"], self.env.world_size)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.micro_in_epoch, self.best = int(state["micro_in_epoch"]), float(state["best"])
        self.history = json.loads(state["history"])
        rng = state["rng"]
        _set_rng_state(rng[self.env.rank] if self.env.rank < len(rng) else rng[0])
        log.info("resumed %s at step %d", last, self.step)

    def _checkpoint(self, score: float) -> None:
        state = self._state()  # collective: every rank takes part
        if self.env.is_main:
            improved = score < self.best
            if improved:
                self.best = state["best"] = score
            step_uri = storage.join(self.ckpt_dir, f"step_{self.step:07d}.pt")
            last_uri = storage.join(self.ckpt_dir, "last.pt")
            first_uri = step_uri if self.cfg.train.keep_step_checkpoints else last_uri
            ref = save_checkpoint(state, first_uri, self.step)
            refs = {"step" if first_uri == step_uri else "last": ref}
            if first_uri != last_uri:
                storage.copy(first_uri, last_uri)
                refs["last"] = replace(ref, uri=last_uri)
            if improved:
                best_uri = storage.join(self.ckpt_dir, "best.pt")
                storage.copy(first_uri, best_uri)
                refs["best"] = replace(ref, uri=best_uri)
            storage.write_text(
                storage.join(self.run_uri, "metrics.jsonl"), "".join(json.dumps(h) + "\n" for h in self.history)
            )
            if self.on_checkpoint:
                for kind, r in refs.items():
                    self.on_checkpoint(kind, r)
        self.best = dist.broadcast_object(self.best)
        dist.barrier()

    # ---------------------------------------------------------------- data
    def _micro_batches(self) -> Iterator[Any]:
        """Endless micro-batches; (epoch, micro_in_epoch) always points at the next one."""
        bs = self.cfg.data.batch_size
        collate: Any = functools.partial(collate_clips, with_masks=self.cfg.data.clips.with_masks)
        pin = self.device.type == "cuda"
        if pin:
            collate = PinningCollate(collate)
        while True:
            sampler = DistributedSampler(
                self.train_set,
                num_replicas=self.env.world_size,
                rank=self.env.rank,
                shuffle=True,
                seed=self.cfg.train.seed,
                drop_last=False,
            )
            sampler.set_epoch(self.epoch)
            self.train_set.set_epoch(self.epoch)
            indices = list(sampler)[self.micro_in_epoch * bs :]
            # its own generator: a loader draws a seed when iterated, and a resumed run iterates a
            # new loader mid-epoch, so drawing from the global stream would shift dropout after a resume
            loader = DataLoader(
                self.train_set,
                batch_size=bs,
                sampler=indices,
                collate_fn=collate,
                num_workers=self.cfg.data.num_workers,
                prefetch_factor=self.cfg.data.prefetch_factor if self.cfg.data.num_workers > 0 else None,
                pin_memory=pin,
                generator=torch.Generator().manual_seed(self.cfg.train.seed + self.epoch),
            )
            for batch in loader:
                self.micro_in_epoch += 1
                yield batch
            self.epoch += 1
            self.micro_in_epoch = 0

    def _to_device(self, batch: Any) -> Any:
        from sam3.model.utils.misc import copy_data_to_device

        return batch if self.device.type == "cpu" else copy_data_to_device(batch, self.device, non_blocking=True)

    # ---------------------------------------------------------------- steps
    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    def _losses(self, model: torch.nn.Module, batch: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        with self._autocast():
            out = model(batch, **kwargs)
            targets = [self.module.detector.back_convert(t) for t in batch.find_targets]
            return self.loss_fn(out, targets)

    def _optimizer_step(self, batches: Iterator[Any]) -> dict[str, float]:
        accum = self.cfg.train.grad_accum_steps
        totals = {k: 0.0 for k in ("loss", *LOSS_TERMS)}
        clips = frames = 0
        for micro in range(accum):
            batch = self._to_device(next(batches))
            sync = micro == accum - 1 or not self.env.distributed
            with contextlib.nullcontext() if sync else self.model.no_sync():
                losses = self._losses(self.model, batch)
                (losses["core_loss"] / accum).backward()
            totals["loss"] += losses["core_loss"].item() / accum
            for k in LOSS_TERMS:
                if k in losses:
                    totals[k] += losses[k].item() / accum
            frames += batch.img_batch.shape[0]
            clips += batch.img_batch.shape[0] // len(batch.find_inputs)
        if self.cfg.optim.grad_clip > 0:
            totals["grad_norm"] = float(
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.grad_clip)
            )
        totals["lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals["clips"], totals["frames"] = clips, frames
        return totals

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean loss over the first val clips, split across ranks, dropout off."""
        assert self.val_set is not None
        n = min(len(self.val_set), self.cfg.train.val_max_clips)
        mine = list(range(self.env.rank, n, self.env.world_size))
        self.module.eval()
        total = torch.zeros(2, dtype=torch.float64)
        for i in mine:
            batch = self._to_device(collate_clips([self.val_set[i]], with_masks=self.cfg.data.clips.with_masks))
            total[0] += self._losses(self.module, batch, with_targets=True)["core_loss"].item()
            total[1] += 1
        self.module.train()
        dist.all_reduce_sum(total)
        return float(total[0] / max(total[1], 1))

    # ---------------------------------------------------------------- run
    def fit(self) -> TrainResult:
        cfg = self.cfg.train
        self._resume()
        if self.env.is_main and self.step == 0:
            storage.write_text(storage.join(self.run_uri, "config.yaml"), to_yaml(self.cfg))
        self.module.train()
        batches = self._micro_batches()
        window: dict[str, float] = {}
        window_start = time.perf_counter()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", disable=not self.env.is_main, unit="step")
        while self.step < cfg.max_steps:
            stats = self._optimizer_step(batches)
            self.step += 1
            bar.update(1)
            for k, v in stats.items():
                window[k] = window.get(k, 0.0) + v
            window["n"] = window.get("n", 0) + 1
            last = self.step == cfg.max_steps
            if self.step % cfg.log_every == 0 or last:
                elapsed = time.perf_counter() - window_start
                n = window.pop("n")
                metrics = {f"train/{k}": v / n for k, v in window.items() if k not in ("clips", "frames")}
                metrics["train/clips_per_s"] = window["clips"] * self.env.world_size / elapsed
                metrics["train/frames_per_s"] = window["frames"] * self.env.world_size / elapsed
                if self.device.type == "cuda":
                    metrics["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                self._log(metrics)
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")
                window, window_start = {}, time.perf_counter()
            score = self.history[-1]["train/loss"] if self.history else math.inf
            if self.val_set is not None and (self.step % cfg.val_every == 0 or last):
                score = self.validation_loss()
                self._log({"val/loss": score})
            if self.step % cfg.checkpoint_every == 0 or last:
                self._checkpoint(score)
        bar.close()
        return TrainResult(
            run_uri=self.run_uri,
            last_checkpoint_uri=storage.join(self.ckpt_dir, "last.pt"),
            best_checkpoint_uri=storage.join(self.ckpt_dir, "best.pt"),
            steps=self.step,
            history=self.history,
        )

    def _log(self, metrics: dict[str, float]) -> None:
        if not self.env.is_main:
            return
        record = {"step": self.step, **metrics}
        if self.history and self.history[-1]["step"] == self.step:
            self.history[-1].update(metrics)
        else:
            self.history.append(record)
        log.info("step %d %s", self.step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if self.on_metrics:
            self.on_metrics(self.step, metrics)


def train(
    cfg: TrainJobConfig,
    on_metrics: MetricsCallback | None = None,
    on_checkpoint: CheckpointCallback | None = None,
) -> TrainResult:
    return Trainer(cfg, on_metrics, on_checkpoint).fit()
