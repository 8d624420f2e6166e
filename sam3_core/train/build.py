"""`build_trainer`: the SAM3 video-clip trainer assembled from a `TrainConfig`; `train` runs it.

Building is where every decision about the run is taken, in this order: threads and process
group (via `sam3_core.comm`), the run folder (refused if it holds another config; leftovers of
a killed checkpoint write removed), data, model (initial weights, LoRA adapters, frozen
prefixes), DDP, loss, optimizer and schedule, validators, and the hooks. The `Trainer` then
only runs steps.

Everything a run writes goes to `<store>/runs/<run_name>/`: `config.yaml`, `metrics.jsonl`,
`checkpoints/{last,step_XXXXXXX}.pt` (full training state) and `checkpoints/best.pt` (the
exported weights of the best step, adapters merged). Rerunning the same command resumes from
`last.pt` with the model, optimizer, schedule, RNG states, data position and hook states it
saved, so an interrupted run ends with the same weights as an uninterrupted one (bit for bit
with `train.num_threads=1` on CPU, or deterministic kernels on GPU).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from sam3_core import comm, storage
from sam3_core.config import to_yaml
from sam3_core.data.clips import ClipDataset
from sam3_core.data.datapoints import collate_clips
from sam3_core.data.frames import FrameReader
from sam3_core.data.loading import PinningCollate
from sam3_core.data.tracker_clips import JointClipDataset, JointCollate, TrackerClipDataset, collate_tracker_clips
from sam3_core.data.ytvis import VideoDataset
from sam3_core.model import lora
from sam3_core.model.build import build_detector, freeze
from sam3_core.model.checkpoint import load_model_weights, remove_stale_writes
from sam3_core.model.tracker_training import (
    TrackingSettings,
    VideoClipModel,
    build_video_clip_model,
    load_video_clip_weights,
    prepare_tracker,
)
from sam3_core.model.video_detector import VideoClipDetector
from sam3_core.train.config import TrainConfig
from sam3_core.train.data import MicroBatches, load_ahead_fits
from sam3_core.train.diagnostics import diagnose
from sam3_core.train.hooks import (
    BestCheckpoint,
    CheckpointCallback,
    MetricLogger,
    ModelStats,
    NonFiniteGuard,
    PeriodicCheckpoint,
    Validation,
    Validator,
)
from sam3_core.train.loss import build_loss
from sam3_core.train.optim import build_optimizer, build_scheduler
from sam3_core.train.run import RunFolder, check_same_config, run_uri_for, write_config
from sam3_core.train.stages import freeze_all, train_tracker_preset
from sam3_core.train.task import ClipTask
from sam3_core.train.tracker_loss import TrackerLoss
from sam3_core.train.tracker_task import JointTask, JointTurns, TrackerTask, TrackerValidationLoss, VosMetrics
from sam3_core.train.trainer import (
    MetricsCallback,
    Task,
    Trainer,
    TrainResult,
    autocast_context,
    seed_everything,
)
from sam3_core.train.validation import DetectionMetrics, ValidationLoss

log = logging.getLogger(__name__)


class _FrameArrays:
    """Picklable frame loader for DataLoader workers: file name -> uint8 HxWx3."""

    def __init__(self, reader: FrameReader) -> None:
        self.reader = reader

    def __call__(self, file_name: str) -> np.ndarray:
        return np.array(self.reader.image(file_name))


def _prepare_run(cfg: TrainConfig, run: RunFolder) -> bool:
    """Check the folder may hold this run and clear leftovers; True when resuming."""
    check_same_config(cfg, run)
    resuming = cfg.train.resume and storage.exists(run.last_uri)
    if comm.is_main():
        remove_stale_writes(run.checkpoints_uri)
    return resuming


def _initial_weights(module: VideoClipDetector, uri: str) -> None:
    """Load `model.uri` (a checkpoint, or a `models:/` registry entry resolved first)."""
    from sam3_core.mlflow_records import resolve_model_uri

    load_model_weights(module, resolve_model_uri(uri))


def _train_detector_as_configured(cfg: TrainConfig, module: VideoClipDetector) -> None:
    """The detector's LoRA adapters and frozen prefixes (`model.lora`, `model.freeze`)."""
    if cfg.model.lora.rank > 0:
        lora.add_adapters(module.detector, cfg.model.lora)
    if cfg.model.freeze:
        frozen = freeze(module.detector, cfg.model.freeze)
        log.info("froze %.2fM parameters under %s", frozen / 1e6, cfg.model.freeze)


def _build_module(cfg: TrainConfig, resuming: bool) -> VideoClipDetector:
    if cfg.train.stage != "detector":
        return _build_tracking_module(cfg, resuming)
    module = VideoClipDetector(build_detector(cfg.model))
    if cfg.model.uri and not resuming:
        _initial_weights(module, cfg.model.uri)
    _train_detector_as_configured(cfg, module)
    return module


def _build_tracking_module(cfg: TrainConfig, resuming: bool) -> VideoClipModel:
    """Stages tracker and joint: the detector with its tracker's neck, and SAM3's tracker (see `load_video_clip_weights`)."""
    from sam3_core.mlflow_records import resolve_model_uri

    stage, settings = cfg.train.stage, cfg.tracker_train
    module = build_video_clip_model(cfg.model, frozen_detector=stage == "tracker")
    if cfg.model.uri and not resuming:
        load_video_clip_weights(module, resolve_model_uri(cfg.model.uri))
    tracking = TrackingSettings(settings.teacher_force_obj_scores, settings.spatial_memory_dropout)
    prepare_tracker(module.tracker, tracking, cfg.train.seed)
    if stage == "tracker":
        freeze_all(module.detector)
    else:
        _train_detector_as_configured(cfg, module)
    trained = train_tracker_preset(module.detector, module.tracker, settings.trainable)
    log.info("stage %s: %.2fM tracker parameters train (preset %s)", stage, trained / 1e6, settings.trainable)
    if settings.lora.rank > 0:
        lora.add_adapters(module.tracker, settings.lora)
    return module.train()


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    on = cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and device.type == "cuda")
    return torch.bfloat16 if on else None


def _validators(
    cfg: TrainConfig,
    reader: FrameReader,
    frames: _FrameArrays,
    train_videos: VideoDataset,
    task: Task,
    amp: torch.dtype | None,
    device: torch.device,
) -> list[Validator]:
    """The built-in validators of the stage: the detector's (not in stage tracker), then the tracker's."""
    loop = cfg.train
    autocast = functools.partial(autocast_context, device, amp)
    validators: list[Validator] = []
    detector_task = task.detector if isinstance(task, JointTask) else task
    if loop.stage != "tracker" and isinstance(detector_task, ClipTask):
        if loop.val_max_clips > 0:
            validators.append(ValidationLoss(detector_task, loop.val_max_clips, cfg.data.clips.with_masks, autocast))
        if loop.val_max_frames > 0:
            validators.append(
                DetectionMetrics(
                    reader, loop.val_max_frames, cfg.model.image_size, with_masks=cfg.model.enable_segmentation
                )
            )
        if loop.diagnostics:
            # training clips without augmentation: the train/val gap of diag/*_top_box_iou is memorisation
            seen = ClipDataset(train_videos, frames, cfg.data.clips, cfg.model.image_size, loop.seed, train=False)
            validators.append(functools.partial(diagnose, train_dataset=seen))
    tracker_task = task.tracker if isinstance(task, JointTask) else task
    if isinstance(tracker_task, TrackerTask) and loop.val_max_clips > 0:
        clips = TrackerClipDataset(
            reader.dataset("val"), frames, cfg.data.tracker_clips, cfg.model.image_size, loop.seed, train=False
        )
        local = TrackerTask(TrackerLoss(cfg.tracker_train.loss, over_ranks=False), device)
        validators.append(TrackerValidationLoss(local, clips, loop.val_max_clips, autocast))
    if isinstance(tracker_task, TrackerTask) and loop.val_max_videos > 0:
        validators.append(VosMetrics(reader, loop.val_max_videos, cfg.model.image_size))
    return validators


def _training_data(cfg: TrainConfig, videos: VideoDataset, frames: _FrameArrays) -> tuple[Any, Any]:
    """The training clips of the stage and their collate function."""
    size, seed = cfg.model.image_size, cfg.train.seed
    detector_collate = functools.partial(collate_clips, with_masks=cfg.data.clips.with_masks)
    if cfg.train.stage == "detector":
        return ClipDataset(videos, frames, cfg.data.clips, size, seed, train=True), detector_collate
    tracker_clips = TrackerClipDataset(videos, frames, cfg.data.tracker_clips, size, seed, train=True)
    if cfg.train.stage == "tracker":
        return tracker_clips, collate_tracker_clips
    detector_clips = ClipDataset(videos, frames, cfg.data.clips, size, seed, train=True)
    return JointClipDataset(detector_clips, tracker_clips), JointCollate(detector_collate)


def _task(cfg: TrainConfig, module: VideoClipDetector, device: torch.device) -> Task:
    """What the loop minimises at the stage: sam3's detector loss, SAM2's tracker loss, or their sum."""
    with_masks = cfg.model.enable_segmentation and cfg.data.clips.with_masks
    tracker = TrackerTask(TrackerLoss(cfg.tracker_train.loss), device)
    if cfg.train.stage == "tracker":
        return tracker
    detector = ClipTask(module, build_loss(cfg.loss, cfg.model.num_queries, with_masks), device)
    if cfg.train.stage == "detector":
        return detector
    return JointTask(detector, tracker, cfg.tracker_train.tracker_weight, cfg.tracker_train.joint)


def build_trainer(
    cfg: TrainConfig,
    on_metrics: MetricsCallback | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    validators: Sequence[Validator] = (),
) -> Trainer:
    """The trainer of `cfg`, ready to `fit()`; `validators` run after the built-in ones at validation."""
    threads = comm.set_num_threads(cfg.train.num_threads)
    env = comm.init_process_group(cfg.train.dist_timeout_s)
    device = comm.device()
    log.info("rank %d/%d on %s, %d torch thread(s)", env.rank, env.world_size, device, threads)
    run = RunFolder(run_uri_for(cfg))
    resuming = _prepare_run(cfg, run)
    seed_everything(cfg.train.seed + env.rank)

    reader = FrameReader(cfg.data.uri, cfg.data.cache_dir, cfg.data.cache_bytes)
    frames = _FrameArrays(reader)
    # parsed once: SA-V-scale annotation files take seconds to read
    train_videos = reader.dataset("train")
    train_set, collate = _training_data(cfg, train_videos, frames)
    pin = device.type == "cuda"
    data = MicroBatches(
        train_set,
        cfg.data.batch_size,
        PinningCollate(collate) if pin else collate,
        seed=cfg.train.seed,
        num_workers=cfg.data.num_workers,
        prefetch_factor=cfg.data.prefetch_factor,
        load_ahead=load_ahead_fits(device.type, threads, comm.cores_per_process()),
        pin_memory=pin,
        rank=env.rank,
        world_size=env.world_size,
    )

    module = _build_module(cfg, resuming).to(device)
    # written once the data and the starting weights have loaded: a run that cannot start leaves no folder
    if comm.is_main() and not resuming:
        write_config(cfg, run)
    model: torch.nn.Module = module
    if env.distributed:
        model = DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            # not static_graph: its first-step all-reduce hooks onto output tensors found by
            # pytree, which cannot see into SAM3Output (a list subclass), so gradients were
            # never averaged. Some parameters (e.g. the unused 0.5x neck level) get no gradient.
            find_unused_parameters=True,
        )
    task = _task(cfg, module, device)
    optimizer = build_optimizer(module, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    amp = _amp_dtype(cfg, device)

    all_validators = (
        [*_validators(cfg, reader, frames, train_videos, task, amp, device), *validators] if cfg.train.val_every else []
    )
    val_set = (
        ClipDataset(reader.dataset("val"), frames, cfg.data.clips, cfg.model.image_size, cfg.train.seed, train=False)
        if all_validators and cfg.train.stage != "tracker"
        else None
    )
    extra: dict[str, Any] = {"config": to_yaml(cfg), "lora": lora.lora_settings(cfg.model.lora)}
    export = functools.partial(lora.merged_state_dict, module)
    hooks = [
        NonFiniteGuard(run.last_uri),
        ModelStats(),
        MetricLogger(cfg.train.log_every),
        Validation(cfg.train.val_every, all_validators, val_set),
        BestCheckpoint(
            cfg.train.best_metric, cfg.train.best_mode, run, export, {"config": extra["config"]}, on_checkpoint
        ),
        PeriodicCheckpoint(
            cfg.train.checkpoint_every,
            run,
            keep_steps=cfg.train.keep_step_checkpoints,
            resume=cfg.train.resume,
            extra=extra,
            on_checkpoint=on_checkpoint,
        ),
    ]
    if isinstance(task, JointTask):
        # last: it reads the step count a resume restores in PeriodicCheckpoint.before_train
        hooks.append(JointTurns(task))
    trainer = Trainer(
        model=model,
        module=module,
        task=task,
        optimizer=optimizer,
        scheduler=scheduler,
        data=data,
        max_steps=cfg.train.max_steps,
        grad_accum_steps=cfg.train.grad_accum_steps,
        grad_clip=cfg.optim.grad_clip,
        amp_dtype=amp,
        device=device,
        hooks=hooks,
        on_metrics=on_metrics,
    )
    return trainer


def result_of(trainer: Trainer, run: RunFolder) -> TrainResult:
    best = trainer.find_hook(BestCheckpoint)
    return TrainResult(
        run_uri=run.uri,
        last_checkpoint_uri=run.last_uri,
        best_checkpoint_uri=run.best_uri,
        steps=trainer.step,
        history=trainer.history,
        best_metric=best.metric if best else "",
        best_value=best.value if best else float("nan"),
        best_step=best.step if best else 0,
    )


def train(
    cfg: TrainConfig,
    on_metrics: MetricsCallback | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    validators: Sequence[Validator] = (),
) -> TrainResult:
    """Build the trainer of `cfg` and run it to `train.max_steps`."""
    trainer = build_trainer(cfg, on_metrics, on_checkpoint, validators)
    return result_of(trainer.fit(), RunFolder(run_uri_for(cfg)))
