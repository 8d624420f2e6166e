"""Compile-time settings of the Kubeflow pipeline: what the cluster looks like, not what to train.

Run-time knobs (dataset, model, steps, GPUs, training mode) are pipeline parameters chosen per run.
These settings are fixed when the pipeline is compiled because KFP bakes them into the pipeline
spec: the image, Kubernetes secret and ConfigMap *names*, GPU node placement, timeouts, retries
and resource requests. Override them with dotted `key=value` pairs, e.g.
`sam3pipe compile --set image=registry.example.com/sam3pipe:0.1.0 --set train.retries=0`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sam3_core.errors import ConfigError


@dataclass
class ObjectStoreSettings:
    """Where the components find the object store. Defaults wire Kubeflow Pipelines' own artifact store."""

    # Secret holding the S3 credentials; its keys become AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    secret: str = "mlpipeline-minio-artifact"
    access_key_field: str = "accesskey"
    secret_key_field: str = "secretkey"
    # ConfigMap holding the non-secret settings (endpoint, region, store root), one env var per key
    config_map: str = "sam3pipe-env"
    config_map_keys: list[str] = field(
        default_factory=lambda: ["AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "SAM3PIPE_STORE"]
    )


@dataclass
class MlflowSettings:
    """Secret holding the MLflow tracking URI (it may embed credentials, so it is never a literal)."""

    secret: str = "sam3pipe-mlflow"
    uri_field: str = "MLFLOW_TRACKING_URI"


@dataclass
class Toleration:
    key: str = ""
    operator: str = "Exists"
    value: str = ""
    effect: str = ""


@dataclass
class GpuSettings:
    """Placement of the GPU components (training, prediction) and the PyTorchJob replicas."""

    accelerator_type: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[Toleration] = field(
        default_factory=lambda: [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
    )
    # /dev/shm as a memory-backed emptyDir: DataLoader workers and NCCL need more than the 64 MiB default
    shm_size: str = "16Gi"


@dataclass
class ComponentSettings:
    """One component's pod: CPU request (no CPU limit, to avoid throttling), memory request = limit."""

    cpu: str = "2"
    memory: str = "8Gi"
    timeout_s: int = 3600
    retries: int = 2


@dataclass
class JobSettings:
    """How the train component launches and watches a multi-node training job (pytorchjob or trainjob mode)."""

    # "" = the namespace the launcher pod runs in
    namespace: str = ""
    # the ServiceAccount of the job's pods
    service_account: str = "sam3pipe-trainer"
    cpu: str = "8"
    memory: str = "64Gi"
    poll_interval_s: float = 15.0
    # below train.timeout_s, so the launcher times out (and deletes the job) before KFP kills its pod
    timeout_s: int = 3 * 24 * 3600 - 3600
    # keep a failed job (and its pods' logs) for debugging instead of deleting it
    keep_failed: bool = False


@dataclass
class PyTorchJobSettings(JobSettings):
    """training_mode=pytorchjob: a Kubeflow Training Operator (v1) PyTorchJob."""

    # the operator deletes a finished job this long after it ended, should no launcher be left to do it
    ttl_after_finished_s: int = 24 * 3600
    # pod restarts the operator may do before it marks the job Failed
    backoff_limit: int = 2


@dataclass
class TrainJobSettings(JobSettings):
    """training_mode=trainjob: a Kubeflow Trainer v2 TrainJob on a ClusterTrainingRuntime.

    Restarts and the clean-up of finished jobs are the runtime's (manifests/trainer-v2/).
    """

    runtime: str = "sam3pipe-torch-distributed"


@dataclass
class SweepSettings:
    """The sweep pipeline (`sam3pipe compile --sweep`, `sam3pipe sweep`)."""

    # trials running at once; 0 = all. KFP's pipeline spec holds this as a number, not a run parameter
    parallelism: int = 2


@dataclass
class PipelineSettings:
    name: str = "sam3-video-finetune"
    description: str = "Fine-tune SAM3 on video clips: data prep -> training -> prediction -> evaluation"
    # the project's image (docker/build.sh); every component runs the same code from it
    image: str = "localhost/sam3pipe-cuda:0.1.0"
    object_store: ObjectStoreSettings = field(default_factory=ObjectStoreSettings)
    mlflow: MlflowSettings = field(default_factory=MlflowSettings)
    gpu: GpuSettings = field(default_factory=GpuSettings)
    # a few-second check of every parameter before any other component; nothing to retry
    check_parameters: ComponentSettings = field(
        default_factory=lambda: ComponentSettings(cpu="100m", memory="256Mi", timeout_s=600, retries=0)
    )
    data_prep: ComponentSettings = field(
        default_factory=lambda: ComponentSettings(cpu="4", memory="16Gi", timeout_s=4 * 3600)
    )
    # a sweep trial's few-second check of the training knobs; nothing to retry
    plan_training: ComponentSettings = field(
        default_factory=lambda: ComponentSettings(cpu="100m", memory="256Mi", timeout_s=600, retries=0)
    )
    train: ComponentSettings = field(
        default_factory=lambda: ComponentSettings(cpu="8", memory="64Gi", timeout_s=3 * 24 * 3600, retries=1)
    )
    predict: ComponentSettings = field(
        default_factory=lambda: ComponentSettings(cpu="8", memory="32Gi", timeout_s=12 * 3600)
    )
    evaluate: ComponentSettings = field(
        default_factory=lambda: ComponentSettings(cpu="4", memory="16Gi", timeout_s=4 * 3600)
    )
    pytorchjob: PyTorchJobSettings = field(default_factory=PyTorchJobSettings)
    trainjob: TrainJobSettings = field(default_factory=TrainJobSettings)
    sweep: SweepSettings = field(default_factory=SweepSettings)
    # the sweep's plan (expand the spec, open the MLflow sweep run) and its last component (pick, register)
    plan_sweep: ComponentSettings = field(
        default_factory=lambda: ComponentSettings(cpu="250m", memory="1Gi", timeout_s=900)
    )
    select_best: ComponentSettings = field(
        default_factory=lambda: ComponentSettings(cpu="500m", memory="2Gi", timeout_s=1800)
    )


def load_settings(overrides: list[str] | tuple[str, ...] = ()) -> PipelineSettings:
    """Defaults merged with dotted `key=value` overrides, type-checked against the dataclasses."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PipelineSettings), OmegaConf.from_dotlist(list(overrides)))
        settings: PipelineSettings = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except (OmegaConfBaseException, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"pipeline settings: {first_line} (overrides: {list(overrides)})") from exc
    for mode, job in (("pytorchjob", settings.pytorchjob), ("trainjob", settings.trainjob)):
        if job.timeout_s >= settings.train.timeout_s:
            raise ConfigError(
                f"pipeline settings: {mode}.timeout_s ({job.timeout_s}) must be smaller than "
                f"train.timeout_s ({settings.train.timeout_s}), or KFP kills the launcher before it can delete its job"
            )
    if settings.sweep.parallelism < 0:
        raise ConfigError(
            f"pipeline settings: sweep.parallelism={settings.sweep.parallelism}: must be >= 0 (0 = all trials)"
        )
    return settings
