"""Where tracking goes and how patiently it talks to the server.

The tracking URI is MLflow's own `MLFLOW_TRACKING_URI`; without it everything lands in a
sqlite file under `.sam3pipe/`, so the demo and a laptop need no server. The knobs a user
turns live in `TrackingConfig`, which every component embeds as `tracking:`.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sam3_core import comm
from sam3_core.errors import ConfigError

HOME = Path(".sam3pipe")
DEFAULT_EXPERIMENT = "sam3pipe"
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
# Both end up quoted inside MLflow search filters, so quotes and backticks are kept out.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:@-]*$")
_SAFE_NAME = re.compile(r"^[\w .-]+$")


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name) or default


@dataclass
class TrackingConfig:
    """MLflow tracking of one component run; a knob per field, defaults fit the local demo."""

    # Off: every tracking call is a no-op (the component still writes its outputs).
    enabled: bool = True
    experiment_name: str = field(default_factory=lambda: _env("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT))
    # Groups the component runs of one pipeline run under one parent; KFP passes its run id.
    # Empty: a new id is made, so a component run alone gets its own parent.
    pipeline_run_id: str = field(default_factory=lambda: _env("SAM3PIPE_PIPELINE_RUN_ID"))
    # Display name of the parent run; empty means "pipeline-<pipeline_run_id>".
    pipeline_run_name: str = ""
    registered_model_name: str = "sam3-video"
    model_alias: str = "candidate"
    # Metrics are sent in batches from a background thread this often.
    flush_interval_s: float = 2.0
    # Backoff between failed sends: doubles from initial to max while the server is away.
    retry_initial_s: float = 1.0
    retry_max_s: float = 30.0
    # One HTTP request's timeout (MLflow's own retries are turned off: we retry ourselves).
    request_timeout_s: int = 10
    # How long run setup keeps trying before the component goes on with tracking offline.
    connect_timeout_s: float = 30.0
    # At the end, how long to keep sending what is still buffered before recording it locally.
    final_flush_timeout_s: float = 60.0
    # CPU/memory/disk/network (and GPU) samples as `system/*` metrics, when psutil is present.
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if not _SAFE_ID.match(self.pipeline_run_id):
            raise ConfigError(
                f"tracking.pipeline_run_id={self.pipeline_run_id!r}: use letters, digits and . _ : @ - only"
            )
        if not _SAFE_NAME.match(self.registered_model_name):
            raise ConfigError(
                f"tracking.registered_model_name={self.registered_model_name!r}: use letters, digits, space and . _ -"
            )
        for name in ("flush_interval_s", "retry_initial_s", "retry_max_s", "request_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"tracking.{name}={getattr(self, name)!r}: must be positive")


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, or the local sqlite store under `.sam3pipe/`."""
    return _env("MLFLOW_TRACKING_URI") or f"sqlite:///{(HOME / 'mlflow.db').resolve()}"


def is_local_store(uri: str) -> bool:
    """True when the URI is a database this process opens itself (no tracking server)."""
    return uri.split(":", 1)[0].split("+", 1)[0] in _DATABASE_SCHEMES


def local_artifact_root() -> str:
    """Artifacts of the local store: next to its database, readable by `mlflow server`."""
    return (HOME / "mlartifacts").resolve().as_uri()


def rank() -> int:
    """This process's rank under torchrun / PyTorchJob; only rank 0 tracks."""
    return comm.rank()


def fail_fast_http(cfg: TrackingConfig) -> None:
    """Make MLflow's client give up quickly, since our sender retries with its own backoff.

    MLflow reads these variables on every request; its defaults (7 retries, 120 s timeout)
    would hold a call for minutes while the server is down. Values a user set win.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(cfg.request_timeout_s)))


def ui_command(port: int = 5000) -> list[str]:
    """argv of an `mlflow server` on the local store (what `sam3pipe ui` runs).

    Creates `.sam3pipe/` so the server starts on a fresh checkout too.
    """
    uri = tracking_uri()
    if not is_local_store(uri):
        raise ConfigError(
            "MLFLOW_TRACKING_URI points at a tracking server already; open it in a browser, "
            "or unset MLFLOW_TRACKING_URI to browse the local store"
        )
    HOME.mkdir(parents=True, exist_ok=True)
    return [
        sys.executable,
        *("-m", "mlflow", "server"),
        *("--backend-store-uri", uri),
        *("--artifacts-destination", local_artifact_root()),
        *("--host", "127.0.0.1"),
        *("--port", str(port)),
    ]
