"""The train component's config: model, data, optimiser, loss, loop, output, tracking.

Every value is checked when the config is built (`__post_init__`), so a bad override stops the
run before any data is read, with a one-line `ConfigError` naming the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sam3_core import storage
from sam3_core.config_checks import check_bool, check_choice, check_float, check_int, check_str
from sam3_core.data.clips import ClipConfig
from sam3_core.data.tracker_clips import TrackerClipConfig
from sam3_core.errors import ConfigError
from sam3_core.mlflow_records.settings import MlflowConfig
from sam3_core.model.config import ModelConfig
from sam3_core.numerics import AMP_MODES
from sam3_core.train.loss import LossConfig
from sam3_core.train.optim import OptimConfig
from sam3_core.train.stages import STAGES, TrackerTrainConfig


@dataclass
class DataConfig:
    # URI of a dataset published by data_prep (`<store>/datasets/<id>`)
    uri: str = "???"
    cache_dir: str | None = None
    # most bytes of frames a remote dataset keeps in the local cache (least recently used evicted); 0 = no limit
    cache_bytes: int = 0
    clips: ClipConfig = field(default_factory=ClipConfig)
    # stages tracker and joint: the tracker's clips (objects and their prompts)
    tracker_clips: TrackerClipConfig = field(default_factory=TrackerClipConfig)
    # clips per process per micro-batch (stage joint: that many of each kind)
    batch_size: int = 2
    # DataLoader worker processes per rank; null: on a GPU, this rank's spare cores (its share of the
    # machine's cores less one for the step) up to 4, when prefetch_factor > 0; on CPU 0 (workers
    # there cost more than they give, docs/benchmarks.md)
    num_workers: int | None = None
    # batches loaded ahead of the step: by each DataLoader worker (num_workers > 0), or, with num_workers = 0
    # on a GPU or where the torch threads leave a core free, by a background thread (0: loaded in the step)
    prefetch_factor: int = 2

    def __post_init__(self) -> None:
        check_str("data.uri", self.uri, required=True)
        check_str("data.cache_dir", self.cache_dir, optional=True)
        check_int("data.batch_size", self.batch_size, 1, 4096)
        if self.num_workers is not None:
            check_int("data.num_workers", self.num_workers, 0, 256)
        check_int("data.cache_bytes", self.cache_bytes, 0)
        check_int("data.prefetch_factor", self.prefetch_factor, 1 if self.num_workers else 0)


DETERMINISTIC_MODES = ("auto", "on", "off")
BEST_MODES = ("max", "min")
# detection metrics the in-loop validation computes (`val/<iou type>_<stat>`)
DETECTION_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# what the training diagnostics log per split (sam3_core.train.diagnostics.frame_diagnostics)
DIAGNOSTIC_STATS = ("top_box_iou", "matched_box_iou", "matched_is_top", "query_cosine")
_METRIC_NAME = re.compile(r"^(train|val|diag)/[\w.\-]+$")


@dataclass
class LoopConfig:
    # detector: the detector on noun-phrase clips; tracker: SAM3's tracker on object clips, the detector
    # frozen; joint: both, their losses summed (see sam3_core.train.stages)
    stage: str = "detector"
    max_steps: int = 200
    grad_accum_steps: int = 1
    seed: int = 0
    # "auto": bf16 autocast on GPU, full precision on CPU (bf16 gives no speed-up there);
    # "bf16": bf16 autocast on any device; "off": full precision
    amp: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 100
    # also keep checkpoints/step_XXXXXXX.pt at every checkpoint (else only last.pt / best.pt)
    keep_step_checkpoints: bool = True
    # validate every N steps and at the last step (0: never)
    val_every: int = 50
    # val/loss: the mean loss over the first N val clips (0: no validation loss)
    val_max_clips: int = 8
    # val/bbox_* and val/segm_* (COCO, through the predict path): N val frames spread over the
    # split (0: no detection metrics)
    val_max_frames: int = 16
    # stages tracker and joint: val/vos_J_mean, val/vos_F_mean, val/vos_JF_mean (...), as predict
    # inference=vos and evaluate compute them, on N validation videos spread over the split (0: none)
    val_max_videos: int = 8
    # best.pt is the checkpoint of the step where this metric was best: `val/<name>` (a detection
    # metric such as val/segm_AP, or val/loss), `diag/<name>` or `train/<name>`
    best_metric: str = "val/segm_AP"
    # "max" for scores (AP, AR), "min" for losses
    best_mode: str = "max"
    # also log learn's training diagnostics (`diag/*`) at every validation
    diagnostics: bool = False
    resume: bool = True
    # how long a collective waits for the other ranks (nccl's watchdog, and the gloo group)
    dist_timeout_s: int = 1800
    # at the end, how long the other ranks wait for rank 0's last checkpoint uploads (the
    # uploads run beside the training, see sam3_core/train/uploads.py)
    upload_timeout_s: int = 3600
    # DDP searches the autograd graph every step for parameters that got no gradient; off, because
    # build_trainer freezes the parameters sam3's loss never reaches. On only for a model change that
    # leaves other parameters without a gradient (DDP then stops at the second step, naming them)
    ddp_find_unused_parameters: bool = False
    # torch CPU threads per process; 0: OMP_NUM_THREADS if set, else cores / processes on this
    # machine (torch's own default, one per core in every process, oversubscribes shared cores)
    num_threads: int = 0
    # torch's deterministic kernels (torch.use_deterministic_algorithms): "auto" on CPU, where they
    # cost little and make runs with the same thread count bit-identical; "on" on any device; "off"
    deterministic: str = "auto"
    # exponential moving average of the trained weights, validated and exported as best.pt (0: off)
    ema_decay: float = 0.0
    # in a Kubeflow Trainer TrainJob that asks for progress (TrainJobStatus feature gate): rank 0
    # reports percent done, ETA and the latest metrics to status.trainerStatus this often (0: never;
    # the Trainer asks for at most one report per 5 s). Outside such a job nothing is sent.
    trainjob_status_every_s: int = 10

    def __post_init__(self) -> None:
        check_choice("train.stage", self.stage, STAGES)
        check_int("train.max_steps", self.max_steps, 1)
        check_int("train.grad_accum_steps", self.grad_accum_steps, 1, 4096)
        check_int("train.seed", self.seed, 0, 2**31 - 1)
        check_choice("train.amp", self.amp, AMP_MODES)
        check_choice("train.deterministic", self.deterministic, DETERMINISTIC_MODES)
        check_float("train.ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
        for key in ("log_every", "checkpoint_every"):
            check_int(f"train.{key}", getattr(self, key), 1)
        for key in ("val_every", "val_max_clips", "val_max_frames", "val_max_videos", "num_threads"):
            check_int(f"train.{key}", getattr(self, key), 0)
        check_int("train.dist_timeout_s", self.dist_timeout_s, 1)
        check_int("train.upload_timeout_s", self.upload_timeout_s, 1)
        check_int("train.trainjob_status_every_s", self.trainjob_status_every_s, 0)
        if 0 < self.trainjob_status_every_s < 5:
            raise ConfigError(
                f"train.trainjob_status_every_s={self.trainjob_status_every_s}: the Trainer takes at most one "
                "report per 5 s; use 0 (off) or >= 5"
            )
        for key in ("keep_step_checkpoints", "diagnostics", "resume", "ddp_find_unused_parameters"):
            check_bool(f"train.{key}", getattr(self, key))
        check_choice("train.best_mode", self.best_mode, BEST_MODES)
        check_str("train.best_metric", self.best_metric, required=True)
        if not _METRIC_NAME.match(self.best_metric):
            raise ConfigError(
                f"train.best_metric={self.best_metric!r}: name a logged metric, "
                "e.g. val/segm_AP, val/loss or train/loss"
            )
        self._check_best_metric_is_computed()

    def _check_best_metric_is_computed(self) -> None:
        group, name = self.best_metric.split("/", 1)
        if group == "train":
            return
        if self.val_every == 0:
            raise ConfigError(
                f"train.best_metric={self.best_metric} needs validation: set train.val_every > 0 "
                "or choose a train/ metric (train.best_metric=train/loss train.best_mode=min)"
            )
        if group == "val" and name in ("loss", "tracker_loss") and self.val_max_clips == 0:
            raise ConfigError(f"train.best_metric={self.best_metric} needs train.val_max_clips > 0")
        tracker_metric = group == "val" and (name == "tracker_loss" or name.startswith("vos_"))
        if tracker_metric and self.stage == "detector":
            raise ConfigError(f"train.best_metric={self.best_metric} needs train.stage=tracker or joint")
        if group == "val" and name.startswith("vos_") and self.val_max_videos == 0:
            raise ConfigError(f"train.best_metric={self.best_metric} needs train.val_max_videos > 0")
        detector_metric = group == "val" and (name == "loss" or name.startswith(("bbox_", "segm_")))
        if self.stage == "tracker" and (detector_metric or group == "diag"):
            raise ConfigError(
                f"train.best_metric={self.best_metric}: train.stage=tracker leaves the detector unchanged; choose a "
                "tracker metric: train.best_metric=val/vos_JF_mean (or val/tracker_loss with train.best_mode=min)"
            )
        iou_type, _, stat = name.partition("_")
        if group == "val" and not detector_metric and name not in _vos_validation_metrics() | {"tracker_loss"}:
            raise ConfigError(
                f"train.best_metric={self.best_metric}: validation logs val/loss, val/bbox_<stat> and "
                f"val/segm_<stat> (stat: {', '.join(DETECTION_STATS)}); with train.stage=tracker or joint also "
                "val/tracker_loss and val/vos_<J|F>_<mean|recall|decay>, val/vos_JF_mean"
            )
        if group == "diag":
            split, _, measure = name.partition("_")
            if not self.diagnostics:
                raise ConfigError(f"train.best_metric={self.best_metric} needs train.diagnostics=true")
            if split not in ("val", "train") or measure not in DIAGNOSTIC_STATS:
                raise ConfigError(
                    f"train.best_metric={self.best_metric}: diagnostics log diag/val_<name> and diag/train_<name> "
                    f"(name: {', '.join(DIAGNOSTIC_STATS)})"
                )
        if group == "val" and iou_type in ("bbox", "segm"):
            if stat not in DETECTION_STATS:
                raise ConfigError(
                    f"train.best_metric={self.best_metric}: unknown COCO stat {stat!r}; "
                    f"use one of {', '.join(DETECTION_STATS)}"
                )
            if self.val_max_frames == 0:
                raise ConfigError(f"train.best_metric={self.best_metric} needs train.val_max_frames > 0")


def _vos_validation_metrics() -> set[str]:
    """The names the in-loop VOS validation logs (the evaluators' vos family), without the `val/` group."""
    from sam3_core.evaluate.families.vos import STATISTICS

    return {f"vos_{letter}_{stat}" for letter in ("J", "F") for stat in STATISTICS} | {"vos_JF_mean"}


@dataclass
class OutputConfig:
    store: str = field(default_factory=storage.default_store)
    # run folder name under <store>/runs/; empty: derived from the config, so rerunning the
    # same command resumes the same run. A named run resumes only with the config it was started with
    run_name: str = ""
    # replace the run folder's earlier training outputs (another config's, or with train.resume=false):
    # refused otherwise, since logged models and the registry point at them
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_str("output.store", self.store, required=True)
        check_str("output.run_name", self.run_name)
        check_bool("output.overwrite", self.overwrite)
        if self.run_name and (
            not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.run_name) or len(self.run_name) > 128
        ):
            raise ConfigError(
                f"output.run_name={self.run_name!r}: use up to 128 letters, digits, '.', '_' or '-', starting with a "
                "letter or digit"
            )


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # stages tracker and joint: what of SAM3's tracker trains, and its loss
    tracker_train: TrackerTrainConfig = field(default_factory=TrackerTrainConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # where the run is tracked in MLflow; leaves the run folder name alone (see run_name_for)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def __post_init__(self) -> None:
        if self.train.stage == "tracker" and self.model.lora.rank > 0:
            raise ConfigError(
                "model.lora.rank: train.stage=tracker keeps the detector frozen; set model.lora.rank=0 "
                "(or train.stage=joint to adapt the detector too)"
            )
        if self.train.best_metric.startswith("val/segm_") and not self.model.enable_segmentation:
            raise ConfigError(
                f"train.best_metric={self.train.best_metric} needs masks but model.enable_segmentation=false; "
                "use a val/bbox_ metric"
            )
