"""The train component's config: model, data, optimiser, loss, loop, output, tracking."""

from __future__ import annotations

from dataclasses import dataclass, field

from sam3_core.data.clips import ClipConfig
from sam3_core.errors import ConfigError
from sam3_core.model.config import ModelConfig
from sam3_core.tracking.settings import TrackingConfig
from sam3_core.train.loss import LossConfig
from sam3_core.train.optim import OptimConfig


@dataclass
class DataConfig:
    # URI of a dataset published by data_prep (`<store>/datasets/<id>`)
    uri: str = "???"
    cache_dir: str | None = None
    # most bytes of frames a remote dataset keeps in the local cache (least recently used evicted); 0 = no limit
    cache_bytes: int = 0
    clips: ClipConfig = field(default_factory=ClipConfig)
    # clips per process per micro-batch
    batch_size: int = 2
    num_workers: int = 0
    # batches each DataLoader worker loads ahead (with num_workers > 0)
    prefetch_factor: int = 2

    def __post_init__(self) -> None:
        for key in ("cache_bytes", "prefetch_factor"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"config train: data.{key}: must be an integer, got {value!r}")
        if self.cache_bytes < 0:
            raise ConfigError(f"config train: data.cache_bytes: must be >= 0 (0 = no limit), got {self.cache_bytes}")
        if self.prefetch_factor < 1:
            raise ConfigError(f"config train: data.prefetch_factor: must be >= 1, got {self.prefetch_factor}")


AMP_MODES = ("auto", "bf16", "off")


@dataclass
class LoopConfig:
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
    # validation loss every N steps on val clips (0: never); best.pt follows it, else train loss
    val_every: int = 0
    val_max_clips: int = 16
    resume: bool = True
    dist_timeout_s: int = 1800
    # torch CPU threads per process; 0 keeps torch's default (one per core). Processes sharing
    # cores (several ranks on one CPU machine) run far faster with 1
    num_threads: int = 0

    def __post_init__(self) -> None:
        if self.amp not in AMP_MODES:
            raise ConfigError(f"train.amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.max_steps < 1 or self.grad_accum_steps < 1 or self.log_every < 1 or self.checkpoint_every < 1:
            raise ConfigError("train.max_steps, grad_accum_steps, log_every and checkpoint_every must be >= 1")


@dataclass
class OutputConfig:
    store: str = ".sam3pipe/store"
    # run folder name under <store>/runs/; empty: derived from the config, so rerunning the
    # same command resumes the same run
    run_name: str = ""


@dataclass
class TrainJobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # where the run is tracked in MLflow; leaves the run folder name alone (see run_name_for)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
