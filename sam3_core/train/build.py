"""`build_trainer`: the SAM3 video-clip trainer assembled from a `TrainConfig`; `train` runs it.

Building is where every decision about the run is taken, in this order: threads and process
group (via `sam3_core.comm`), the run folder (refused if it holds another config; leftovers of
a killed checkpoint write removed), data, model (initial weights, LoRA adapters, frozen
prefixes), DDP, loss, optimizer and schedule, validators, and the hooks. The `Trainer` then
only runs steps. `train.stage` picks what trains: the detector (sam3's loss on its clips), SAM3's
tracker (SAM2's prompts and loss on tracker clips, the detector frozen) or both (joint).

Everything a run writes goes to `<store>/runs/<run_name>/`: `config.yaml`, `metrics.jsonl`,
`checkpoints/{last,step_XXXXXXX}.pt` (full training state) and `checkpoints/best.pt` (the
exported weights of the best step, adapters merged). Rerunning the same command resumes from
`last.pt` with the model, optimizer, schedule, RNG states, data position and hook states it
saved, so an interrupted run ends with the same weights as an uninterrupted one: bit for bit
with `train.num_threads=1` on CPU; on a GPU up to float rounding (docs/training.md).

Under DDP: the starting weights (`model.uri`) are read by rank 0 alone (DDP's construction copies
rank 0's parameters and buffers to every rank); the parameters sam3's loss never reaches are
frozen, so DDP needs no per-step search for unused ones; buffers are constants (RoPE tables,
masks) and are not broadcast before every forward.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from sam3_core import comm, numerics
from sam3_core.config import to_yaml
from sam3_core.data.clips import ClipDataset
from sam3_core.data.datapoints import collate_clips
from sam3_core.data.frames import FrameReader
from sam3_core.data.loading import PinningCollate
from sam3_core.data.tracker_clips import JointClipDataset, JointCollate, TrackerClipDataset, collate_tracker_clips
from sam3_core.data.ytvis import VideoDataset
from sam3_core.errors import Sam3PipeError
from sam3_core.model import lora
from sam3_core.model.build import build_detector, freeze
from sam3_core.model.checkpoint import load_model_weights, remove_stale_writes
from sam3_core.model.chunked_detection import DetectionConfig, check_prompts_fit
from sam3_core.model.tracker_training import (
    TrackingSettings,
    VideoClipModel,
    build_video_clip_model,
    load_tracker_weights,
    load_video_clip_weights,
    prepare_tracker,
)
from sam3_core.model.video_detector import VideoClipDetector
from sam3_core.train.config import TrainConfig
from sam3_core.train.data import MicroBatches, load_ahead_fits
from sam3_core.train.determinism import use_deterministic_kernels
from sam3_core.train.ema import WeightEma
from sam3_core.train.hooks import (
    AwaitUploads,
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
from sam3_core.train.run import RunFolder, prepare_run, run_uri_for, write_config
from sam3_core.train.stages import freeze_all, train_tracker_preset
from sam3_core.train.task import ClipTask
from sam3_core.train.tracker_loss import TrackerLoss
from sam3_core.train.tracker_task import JointTask, JointTurns, TrackerTask, TrackerValidationLoss, VosMetrics
from sam3_core.train.trainer import (
    HookBase,
    MetricsCallback,
    Task,
    Trainer,
    TrainResult,
    autocast_context,
    seed_everything,
)
from sam3_core.train.trainjob_status import trainjob_status_hook
from sam3_core.train.uploads import BackgroundUploads
from sam3_core.train.validation import DetectionMetrics, ValidationLoss

log = logging.getLogger(__name__)
# Detector parameters (names under `detector.`) that sam3's training loss never reaches: the neck
# level that SAM3VLBackbone(scalp=1) drops, the pixel decoder's conv and norm for that level (it
# uses one fewer than it builds), and the text encoder's pooled projection (the detector reads
# token features). Frozen in training, so DDP need not search for them every step; they still load
# and save. tests/sam3_core/train/test_trainer.py fails if sam3 starts (or stops) reaching them.
UNREACHED = (
    "backbone.vision_backbone.convs.3.",
    "segmentation_head.pixel_decoder.conv_layers.2.",
    "segmentation_head.pixel_decoder.norms.2.",
    "backbone.language_backbone.encoder.text_projection",
)
# ... and without mask targets: the mask head, and the neck's 4x and 2x levels that only it reads
UNREACHED_WITHOUT_MASKS = (
    "segmentation_head.",
    "backbone.vision_backbone.convs.0.",
    "backbone.vision_backbone.convs.1.",
)
# DataLoader workers per rank that `data.num_workers=null` chooses on a GPU at most
AUTO_WORKERS = 4


class _FrameArrays:
    """Picklable frame loader for DataLoader workers: file name -> uint8 HxWx3."""

    def __init__(self, reader: FrameReader) -> None:
        self.reader = reader

    def __call__(self, file_name: str) -> np.ndarray:
        return np.array(self.reader.image(file_name))


def _prepare_run(cfg: TrainConfig, run: RunFolder) -> bool:
    """Check the folder may hold this run and clear leftovers; True when resuming."""
    resuming = prepare_run(cfg, run)
    if comm.is_main():
        remove_stale_writes(run.checkpoints_uri)
    return resuming


def _warn_about(cfg: TrainConfig) -> None:
    """Settings that are valid but almost certainly not what was meant."""
    if cfg.optim.warmup_steps > cfg.train.max_steps:
        log.warning(
            "optim.warmup_steps=%d is more than train.max_steps=%d: the learning rate never reaches optim.lr "
            "(at most %.3g of it)",
            cfg.optim.warmup_steps,
            cfg.train.max_steps,
            cfg.train.max_steps / cfg.optim.warmup_steps,
        )


def _initial_weights(module: VideoClipDetector, uri: str, load: Callable[[Any, str], Any] = load_model_weights) -> None:
    """Load `model.uri` (a checkpoint, or a `models:/` registry entry resolved first) on rank 0 with `load`.

    Under DDP the other ranks neither download nor read it: DDP's construction broadcasts rank
    0's parameters and buffers. A failure is raised on every rank, so none waits for the others.
    """
    from sam3_core.mlflow_records import resolve_model_uri

    failure: Sam3PipeError | None = None
    if comm.is_main():
        try:
            load(module, resolve_model_uri(uri))
        except Sam3PipeError as exc:
            failure = exc
    failure = comm.broadcast_object(failure)
    if failure is not None:
        raise failure


def _train_detector_as_configured(cfg: TrainConfig, module: VideoClipDetector) -> None:
    """The detector's LoRA adapters and frozen prefixes (`model.lora`, `model.freeze`, and what its loss never reaches)."""
    if cfg.model.lora.rank > 0:
        lora.add_adapters(module.detector, cfg.model.lora)
    if cfg.model.freeze:
        frozen = freeze(module.detector, cfg.model.freeze)
        log.info("froze %.2fM parameters under %s", frozen / 1e6, cfg.model.freeze)
    with_masks = cfg.model.enable_segmentation and cfg.data.clips.with_masks
    freeze(module.detector, [*UNREACHED] if with_masks else [*UNREACHED, *UNREACHED_WITHOUT_MASKS])


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
    stage, settings = cfg.train.stage, cfg.tracker_train
    module = build_video_clip_model(cfg.model, frozen_detector=stage == "tracker")
    if cfg.model.uri and not resuming:
        _initial_weights(module, cfg.model.uri, load_video_clip_weights)
    if settings.tracker_uri and not resuming:
        _initial_weights(module, settings.tracker_uri, load_tracker_weights)
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


def _num_workers(cfg: TrainConfig, device: torch.device) -> int:
    """`data.num_workers`, or when null: on a GPU this rank's spare cores (up to AUTO_WORKERS), else 0."""
    if cfg.data.num_workers is not None:
        return cfg.data.num_workers
    if device.type != "cuda" or cfg.data.prefetch_factor == 0:
        return 0
    return min(AUTO_WORKERS, comm.cores_per_process() - 1)


def _validators(
    cfg: TrainConfig,
    reader: FrameReader,
    frames: _FrameArrays,
    train_videos: VideoDataset,
    module: VideoClipDetector,
    amp: torch.dtype | None,
    device: torch.device,
) -> list[Validator]:
    """The built-in validators of the stage: the detector's (not in stage tracker), then the tracker's.

    Validation items are shared out unevenly over ranks: their losses have no collective inside.
    """
    loop = cfg.train
    autocast = functools.partial(autocast_context, device, amp)
    validators: list[Validator] = []
    if loop.stage != "tracker":
        if loop.val_max_clips > 0:
            with_masks = cfg.model.enable_segmentation and cfg.data.clips.with_masks
            loss = build_loss(cfg.loss, cfg.model.num_queries, with_masks, per_rank=True)
            validators.append(
                ValidationLoss(ClipTask(module, loss, device), loop.val_max_clips, cfg.data.clips.with_masks, autocast)
            )
        if loop.val_max_frames > 0:
            validators.append(
                DetectionMetrics(
                    reader,
                    loop.val_max_frames,
                    cfg.model.image_size,
                    with_masks=cfg.model.enable_segmentation,
                    detection=DetectionConfig(amp=loop.amp),
                )
            )
        if loop.diagnostics:
            # imported here: it imports torchvision (1.3 s), which a config error should not wait for
            from sam3_core.train.diagnostics import diagnose

            # training clips without augmentation: the train/val gap of diag/*_top_box_iou is memorisation
            seen = ClipDataset(train_videos, frames, cfg.data.clips, cfg.model.image_size, loop.seed, train=False)
            validators.append(functools.partial(diagnose, train_dataset=seen))
    if loop.stage != "detector" and loop.val_max_clips > 0:
        clips = TrackerClipDataset(
            reader.dataset("val"), frames, cfg.data.tracker_clips, cfg.model.image_size, loop.seed, train=False
        )
        local = TrackerTask(TrackerLoss(cfg.tracker_train.loss, over_ranks=False), device)
        validators.append(TrackerValidationLoss(local, clips, loop.val_max_clips, autocast))
    if loop.stage != "detector" and loop.val_max_videos > 0:
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
    run: RunFolder | None = None,
) -> Trainer:
    """The trainer of `cfg`, ready to `fit()`; `validators` run after the built-in ones at validation.

    `run` is the run folder when the caller has derived it already (the train component, to
    name its MLflow run); otherwise it is derived here from the config.
    """
    threads = comm.set_num_threads(cfg.train.num_threads)
    env = comm.init_process_group(cfg.train.dist_timeout_s)
    device = comm.device()
    numerics.use_fast_matmul(device)
    deterministic = use_deterministic_kernels(cfg.train.deterministic, device)
    log.info(
        "rank %d/%d on %s, %d torch thread(s), %s kernels",
        env.rank,
        env.world_size,
        device,
        threads,
        "deterministic" if deterministic else "torch's default",
    )
    run = run or RunFolder(run_uri_for(cfg))
    _warn_about(cfg)
    resuming = _prepare_run(cfg, run)
    seed_everything(cfg.train.seed + env.rank)

    reader = FrameReader(cfg.data.uri, cfg.data.cache_dir, cfg.data.cache_bytes)
    frames = _FrameArrays(reader)
    # parsed once: SA-V-scale annotation files take seconds to read
    train_videos = reader.dataset("train")
    if cfg.train.val_every and cfg.train.val_max_frames and cfg.train.stage != "tracker":
        # in-loop detection metrics prompt every category on each validation frame
        check_prompts_fit(
            len(train_videos.categories),
            cfg.model,
            f"{cfg.data.uri}/val_frames_coco.json",
            device,
            DetectionConfig().prompt_batch,
        )
    train_set, collate = _training_data(cfg, train_videos, frames)
    pin = device.type == "cuda"
    data = MicroBatches(
        train_set,
        cfg.data.batch_size,
        PinningCollate(collate) if pin else collate,
        seed=cfg.train.seed,
        num_workers=_num_workers(cfg, device),
        prefetch_factor=cfg.data.prefetch_factor,
        load_ahead=load_ahead_fits(device.type, threads, comm.cores_per_process()),
        pin_memory=pin,
        rank=env.rank,
        world_size=env.world_size,
    )

    module = _build_module(cfg, resuming).to(device)
    model: torch.nn.Module = module
    # DDP whenever a process group is up (torchrun's, or one a caller made, e.g. one nccl rank)
    if comm.is_initialized():
        model = DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            # not static_graph: its first-step all-reduce hooks onto output tensors found by
            # pytree, which cannot see into SAM3Output (a list subclass), so gradients were
            # never averaged. The tracker's parameters that get a gradient change from step to step
            # (mask or point prompts, corrected frames or none), so its stages always search
            find_unused_parameters=cfg.train.ddp_find_unused_parameters or cfg.train.stage != "detector",
            # sam3's buffers are constants (RoPE tables, attention masks) that DDP's construction
            # already copied from rank 0; no broadcast before every forward
            broadcast_buffers=False,
            # the gradients are views into DDP's all-reduce buckets: one copy of them, not two
            gradient_as_bucket_view=True,
        )
    task = _task(cfg, module, device)
    optimizer = build_optimizer(module, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    amp = numerics.amp_dtype(cfg.train.amp, device)

    all_validators = (
        [*_validators(cfg, reader, frames, train_videos, module, amp, device), *validators]
        if cfg.train.val_every
        else []
    )
    val_set = (
        ClipDataset(reader.dataset("val"), frames, cfg.data.clips, cfg.model.image_size, cfg.train.seed, train=False)
        if all_validators and cfg.train.stage != "tracker"
        else None
    )
    extra: dict[str, Any] = {"config": to_yaml(cfg), "lora": lora.lora_settings(cfg.model.lora)}
    export: Callable[[], dict[str, torch.Tensor]] = functools.partial(lora.merged_state_dict, module)
    averaging: list[HookBase] = []
    validated_weights: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    if cfg.train.ema_decay > 0:
        ema = WeightEma(cfg.train.ema_decay)
        averaging.append(ema)
        validated_weights = ema.swapped_in
        export = functools.partial(ema.exported, export)
    uploads = BackgroundUploads()
    hooks = [
        NonFiniteGuard(run.last_uri),
        ModelStats(),
        MetricLogger(cfg.train.log_every),
        *averaging,
        Validation(cfg.train.val_every, all_validators, val_set, validated_weights),
        BestCheckpoint(
            cfg.train.best_metric,
            cfg.train.best_mode,
            run,
            export,
            uploads,
            {"config": extra["config"]},
            on_checkpoint,
        ),
        PeriodicCheckpoint(
            cfg.train.checkpoint_every,
            run,
            uploads,
            keep_steps=cfg.train.keep_step_checkpoints,
            resume=cfg.train.resume,
            extra=extra,
            on_checkpoint=on_checkpoint,
        ),
        AwaitUploads(uploads, cfg.train.upload_timeout_s),
    ]
    if isinstance(task, JointTask):
        # after PeriodicCheckpoint: it reads the step count a resume restores in its before_train
        hooks.append(JointTurns(task))
    # last: it reports what the hooks before it logged at the step
    progress = trainjob_status_hook(cfg.train.trainjob_status_every_s)
    if progress is not None:
        hooks.append(progress)
    # written once everything is built (data, starting weights, hooks): a run that cannot start leaves no folder
    if comm.is_main() and not resuming:
        write_config(cfg, run)
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
    run: RunFolder | None = None,
) -> TrainResult:
    """Build the trainer of `cfg` and run it to `train.max_steps`, in `run` (see `build_trainer`)."""
    trainer = build_trainer(cfg, on_metrics, on_checkpoint, validators, run)
    checkpoints = trainer.find_hook(PeriodicCheckpoint)
    assert checkpoints is not None, "build_trainer always adds the periodic checkpoint"
    return result_of(trainer.fit(), checkpoints.run)
