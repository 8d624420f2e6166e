"""Where tracking goes and how patiently it talks to the server.

The tracking URI is MLflow's own `MLFLOW_TRACKING_URI`; without it everything lands in a
sqlite file under `.sam3pipe/` (`SAM3PIPE_HOME` moves that folder), so the demo and a laptop
need no server. The knobs a user turns live in `MlflowConfig`, which every component embeds
as `mlflow:`.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from sam3_core import comm, pipeline_parameters
from sam3_core.errors import ConfigError

DEFAULT_EXPERIMENT = "sam3pipe"
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
# Both end up quoted inside MLflow search filters, so quotes and backticks are kept out.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:@-]*$")
_SAFE_NAME = re.compile(r"^[\w .-]+$")
# MLflow's own rule for metric and param names (letters, digits and _ - . space : /).
_METRIC_NAME = re.compile(r"^[\w\-. :/]+$")
_DOTTED_KEY = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_MAX_TIMEOUT_S = 24 * 3600.0

# What a comparison of pipeline runs needs on the parent row: parent param -> config key of
# the component that knows it (a key naming a section logs each of its leaves as `<param>.<leaf>`).
# The compared pipeline parameters (their table marks them), then config keys no parameter sets.
DEFAULT_PARENT_PARAMS = {**pipeline_parameters.parent_params(), "lora": "model.lora", "seed": "train.seed"}
# Copied onto the parent when a component finishes, where that component logged them. `val/*`
# values are the best checkpoint's (logged at its step), `eval/*` the final evaluation's.
DEFAULT_HEADLINE_METRICS = [
    "val/segm_AP",
    "val/bbox_AP",
    "val/loss",
    "eval/segm_AP",
    "eval/bbox_AP",
    "eval/video_mask_mAP_50_95",
    "eval/video_bbox_mAP_50_95",
    "eval/video_mask_demo_cgf1_micro_50_95",
    "eval/video_mask_all_phrase_HOTA",
]


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name) or default


def home() -> Path:
    """The local state folder (`SAM3PIPE_HOME`, default `.sam3pipe` in the working directory)."""
    return Path(_env("SAM3PIPE_HOME", ".sam3pipe"))


@dataclass
class MlflowConfig:
    """MLflow tracking of one component run; a knob per field, defaults fit the local demo."""

    # Off: every tracking call is a no-op (the component still writes its outputs).
    enabled: bool = True
    experiment_name: str = field(default_factory=lambda: _env("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT))
    # Groups the component runs of one pipeline run under one parent; KFP passes its run id.
    # Empty: a new id is made, so a component run alone gets its own parent.
    pipeline_run_id: str = field(default_factory=lambda: _env("SAM3PIPE_PIPELINE_RUN_ID"))
    # Display name of the parent run; empty means "pipeline-<pipeline_run_id>".
    pipeline_run_name: str = ""
    # Set for the trials of a sweep: the parent run of this pipeline run (one trial) is nested
    # under the sweep's run (sam3_core/mlflow_records/sweeps.py). Empty: no sweep.
    sweep_id: str = field(default_factory=lambda: _env("SAM3PIPE_SWEEP_ID"))
    # A run someone else owns, to log into instead of opening runs of our own: KFP 2.17's backend
    # (KEP-12862) creates a nested run per task and sets MLFLOW_RUN_ID to it. Its parent (its
    # `mlflow.parentRunId`) is the pipeline run's row; neither run is ended here (KFP ends them).
    run_id: str = field(default_factory=lambda: _env("MLFLOW_RUN_ID"))
    registered_model_name: str = "sam3-video"
    model_alias: str = "candidate"
    # Parent-run params for comparing pipeline runs: name -> config key (see DEFAULT_PARENT_PARAMS).
    parent_params: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PARENT_PARAMS))
    # Metrics copied from a finished component onto the parent row (see DEFAULT_HEADLINE_METRICS).
    headline_metrics: list[str] = field(default_factory=lambda: list(DEFAULT_HEADLINE_METRICS))
    # Metrics are sent in batches from a background thread this often.
    flush_interval_s: float = 2.0
    # Backoff between failed sends: doubles from initial to max while the server is away.
    retry_initial_s: float = 1.0
    retry_max_s: float = 30.0
    # One HTTP request's timeout (MLflow's own retries are turned off: we retry ourselves).
    request_timeout_s: int = 10
    # How long run setup keeps trying before the component goes on with tracking offline.
    connect_timeout_s: float = 30.0
    # A look-up the component cannot go on without (`model.uri=models:/...`): total deadline.
    lookup_timeout_s: float = 15.0
    # At the end, how long to keep sending what is still buffered before recording it locally.
    final_flush_timeout_s: float = 60.0
    # Artifact uploads run on this many threads, so a component's last files go up together.
    upload_workers: int = 4
    # CPU/memory/disk/network (and GPU) samples as `system/*` metrics, when psutil is present.
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0
    # MLflow's own usage telemetry (MLFLOW_DISABLE_TELEMETRY); off: pods often have no egress.
    mlflow_telemetry: bool = False
    # Import MLflow, open its store and the runs, and send everything from a helper process, so
    # none of it holds the component (seconds on a short one); false: all in this process.
    background: bool = True

    def __post_init__(self) -> None:
        _check_bool("enabled", self.enabled)
        _check_bool("system_metrics", self.system_metrics)
        _check_bool("mlflow_telemetry", self.mlflow_telemetry)
        _check_bool("background", self.background)
        if not isinstance(self.experiment_name, str) or not self.experiment_name.strip():
            raise ConfigError(
                f"mlflow.experiment_name={self.experiment_name!r}: must be a non-empty name "
                "(or set MLFLOW_EXPERIMENT_NAME)"
            )
        if len(self.experiment_name) > 500 or "\n" in self.experiment_name:
            raise ConfigError(f"mlflow.experiment_name={self.experiment_name[:40]!r}...: one line, <= 500 characters")
        for key in ("pipeline_run_id", "sweep_id", "run_id", "model_alias"):
            value = getattr(self, key)
            if not isinstance(value, str) or not _SAFE_ID.match(value) or len(value) > 200:
                raise ConfigError(f"mlflow.{key}={value!r}: use letters, digits and . _ : @ - only (<= 200)")
        if not self.model_alias:
            raise ConfigError("mlflow.model_alias='': name the registry alias, e.g. candidate")
        if not isinstance(self.pipeline_run_name, str) or "\n" in self.pipeline_run_name:
            raise ConfigError(f"mlflow.pipeline_run_name={self.pipeline_run_name!r}: must be one line of text")
        if not isinstance(self.registered_model_name, str) or not _SAFE_NAME.match(self.registered_model_name):
            raise ConfigError(
                f"mlflow.registered_model_name={self.registered_model_name!r}: use letters, digits, space and . _ -"
            )
        for name, key in dict(self.parent_params).items():
            if not isinstance(name, str) or not _METRIC_NAME.match(name) or not isinstance(key, str):
                raise ConfigError(
                    f"mlflow.parent_params.{name}={key!r}: the param name may hold letters, digits, _ - . / :"
                )
            if not _DOTTED_KEY.match(key):
                raise ConfigError(f"mlflow.parent_params.{name}={key!r}: must be a dotted config key, e.g. optim.lr")
        for name in self.headline_metrics:
            if not isinstance(name, str) or not _METRIC_NAME.match(name):
                raise ConfigError(
                    f"mlflow.headline_metrics: {name!r} is not an MLflow metric name (letters, digits, _ - . / :)"
                )
        for key in (
            "flush_interval_s",
            "retry_initial_s",
            "retry_max_s",
            "request_timeout_s",
            "connect_timeout_s",
            "lookup_timeout_s",
            "final_flush_timeout_s",
            "system_metrics_interval_s",
        ):
            _check_seconds(key, getattr(self, key))
        if self.retry_max_s < self.retry_initial_s:
            raise ConfigError(
                f"mlflow.retry_max_s={self.retry_max_s!r}: must be >= mlflow.retry_initial_s={self.retry_initial_s!r}"
            )
        if isinstance(self.upload_workers, bool) or not isinstance(self.upload_workers, int):
            raise ConfigError(f"mlflow.upload_workers={self.upload_workers!r}: must be an integer")
        if not 1 <= self.upload_workers <= 64:
            raise ConfigError(f"mlflow.upload_workers={self.upload_workers!r}: must be between 1 and 64")
        if self.enabled:
            check_tracking_uri(tracking_uri())


def _check_bool(key: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"mlflow.{key}={value!r}: must be true or false")


def _check_seconds(key: str, value: object) -> None:
    """A duration: a finite positive number of seconds, at most a day."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"mlflow.{key}={value!r}: must be a number of seconds")
    if not math.isfinite(value) or not 0 < value <= _MAX_TIMEOUT_S:
        raise ConfigError(f"mlflow.{key}={value!r}: must be a finite number of seconds in (0, {_MAX_TIMEOUT_S:.0f}]")


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, or the local sqlite store under the local state folder."""
    return _env("MLFLOW_TRACKING_URI") or f"sqlite:///{(home() / 'mlflow.db').resolve()}"


# what MLflow's client opens (a database URI may name its driver: postgresql+psycopg2://)
_TRACKING_SCHEMES = ("", "file", "http", "https", "databricks", "databricks-uc", "uc", *_DATABASE_SCHEMES)


def check_tracking_uri(uri: str) -> None:
    """A tracking URI MLflow can open: refused up front, not as a traceback from inside MLflow at the first log."""
    scheme = urlparse(uri).scheme.split("+", 1)[0].lower()
    if scheme not in _TRACKING_SCHEMES:
        from sam3_core.mlflow_records.redact import redact_text

        raise ConfigError(
            f"MLFLOW_TRACKING_URI={redact_text(uri)!r}: MLflow has no tracking store for the scheme {scheme!r}; use "
            "http(s)://<server>, sqlite:///<file.db>, a database URI, or unset it for the local store "
            "(or set mlflow.enabled=false)"
        )


def is_local_store(uri: str) -> bool:
    """True when the URI is a database this process opens itself (no tracking server)."""
    return uri.split(":", 1)[0].split("+", 1)[0] in _DATABASE_SCHEMES


def local_artifact_root(uri: str | None = None) -> str:
    """Artifacts of a local sqlite store: `mlartifacts/` next to its database file.

    Beside the database rather than in the working directory, so a store in a temporary
    folder keeps its artifacts there too (and `mlflow server` on that file finds them).
    """
    uri = uri or tracking_uri()
    parsed = urlparse(uri)
    if parsed.scheme.split("+", 1)[0] == "sqlite" and parsed.path not in ("", "/", "/:memory:"):
        database = Path(unquote(parsed.path[1:]))  # sqlite:///rel.db is relative, sqlite:////abs.db absolute
        return (database.resolve().parent / "mlartifacts").as_uri()
    return (home() / "mlartifacts").resolve().as_uri()


def rank() -> int:
    """This process's rank under torchrun / PyTorchJob; only rank 0 tracks."""
    return comm.rank()


def fail_fast_http(cfg: MlflowConfig) -> None:
    """Make MLflow's client give up quickly, since our sender retries with its own backoff.

    MLflow reads these variables on every request; its defaults (7 retries, 120 s timeout)
    would hold a call for minutes while the server is down. Its `View run ... at: <url>` line
    goes to stdout (where a component prints its JSON outputs) with any password of the URL:
    we log that line ourselves, masked. Values a user set win.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(cfg.request_timeout_s)))
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if not cfg.mlflow_telemetry:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def ui_command(port: int = 5000) -> list[str]:
    """argv of an `mlflow server` on the local store (what `sam3pipe ui` runs).

    Creates the local state folder so the server starts on a fresh checkout too.
    """
    uri = tracking_uri()
    if not is_local_store(uri):
        raise ConfigError(
            "MLFLOW_TRACKING_URI points at a tracking server already; open it in a browser, "
            "or unset MLFLOW_TRACKING_URI to browse the local store"
        )
    home().mkdir(parents=True, exist_ok=True)
    return [
        sys.executable,
        *("-m", "mlflow", "server"),
        *("--backend-store-uri", uri),
        *("--artifacts-destination", local_artifact_root(uri)),
        *("--host", "127.0.0.1"),
        *("--port", str(port)),
    ]
