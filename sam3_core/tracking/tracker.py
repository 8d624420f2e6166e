"""A component's handle on its MLflow run.

    with component_run(cfg.tracking, "train", cfg, dataset_id=ds_id, output_uri=run_uri) as run:
        run.log_metrics(train_step_metrics(loss, terms, lr, clips, frames, seconds), step)
        run.log_checkpoint("best", best_uri, step)
        run.register_model(best_uri)

Tracking never stops a component: off (disabled, or rank != 0) every call is a no-op;
metrics go through a background sender; an MLflow failure is a warning; values that
never reached the server are recorded next to the outputs (`mlflow_unsent.jsonl`).
If the server cannot be reached at start, the component runs with tracking offline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import posixpath
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import requests
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

from sam3_core import storage
from sam3_core.config import flatten
from sam3_core.errors import ConfigError, StorageError
from sam3_core.tracking.metrics import eval_metrics
from sam3_core.tracking.redact import (
    describe_error,
    redact_params,
    redact_text,
    redact_tree,
    redact_value,
    truncate,
)
from sam3_core.tracking.registry import register_checkpoint
from sam3_core.tracking.runs import OpenRuns, RunSpec, close_runs, open_runs
from sam3_core.tracking.sender import OfflineBuffer, Pending, Sender, is_transient
from sam3_core.tracking.settings import (
    HOME,
    TrackingConfig,
    fail_fast_http,
    is_local_store,
    local_artifact_root,
    rank,
    tracking_uri,
)
from sam3_core.tracking.unsent import UNSENT_FILE, record_unsent

if TYPE_CHECKING:
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

logger = logging.getLogger(__name__)

T = TypeVar("T")
TAG_GIT_COMMIT = "sam3pipe.git_commit"
TAG_IMAGE = "sam3pipe.image"
TAG_DATASET_ID = "sam3pipe.dataset_id"
TAG_SAM3_VERSION = "sam3pipe.sam3_version"
CHECKPOINT_TAG = "sam3pipe.checkpoint.{name}"
# Checkpoints that get a pointer tag; periodic ones are only referenced as artifacts.
POINTER_CHECKPOINTS = ("best", "last")
TRACKING_ERRORS = (MlflowException, requests.RequestException, OSError)


def git_commit() -> str:
    """The code's commit: SAM3PIPE_GIT_COMMIT (set in the image), else git, else 'unknown'."""
    if os.environ.get("SAM3PIPE_GIT_COMMIT"):
        return os.environ["SAM3PIPE_GIT_COMMIT"]
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def sam3_version() -> str:
    try:
        return importlib.metadata.version("sam3")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def lineage_tags() -> dict[str, str]:
    """Tags that say what code produced a run: commit, image, model library."""
    commit = git_commit()
    tags = {TAG_GIT_COMMIT: commit, MLFLOW_GIT_COMMIT: commit, TAG_SAM3_VERSION: sam3_version()}
    if os.environ.get("SAM3PIPE_IMAGE"):
        tags[TAG_IMAGE] = os.environ["SAM3PIPE_IMAGE"]
    return {key: truncate(str(redact_value(key, value))) for key, value in tags.items()}


def _plain(config: Any) -> dict[str, Any]:
    """A config dataclass (or mapping) as JSON-able nested dicts."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return json.loads(json.dumps(data, default=str))


def _retrying(fn: Callable[[], T], cfg: TrackingConfig, timeout_s: float) -> T:
    """Call `fn`, retrying transient MLflow failures with backoff for up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    delay = cfg.retry_initial_s
    while True:
        try:
            return fn()
        except TRACKING_ERRORS as exc:
            if not is_transient(exc) or time.monotonic() + delay > deadline:
                raise
            logger.debug("MLflow call failed (%s); retrying in %.1fs", describe_error(exc), delay)
            time.sleep(delay)
            delay = min(delay * 2, cfg.retry_max_s)


class Tracker:
    """One component run; see the module doc. Build it with `component_run`."""

    def __init__(
        self,
        cfg: TrackingConfig,
        spec: RunSpec | None = None,
        client: MlflowClient | None = None,
        runs: OpenRuns | None = None,
        unsent_uri: str = "",
        monitor: SystemMetricsMonitor | None = None,
    ) -> None:
        self._cfg, self._spec, self._client, self._runs = cfg, spec, client, runs
        self._unsent_uri, self._monitor = unsent_uri, monitor
        self._buffer: Sender | OfflineBuffer | None = None
        if runs is not None and client is not None:
            self._buffer = Sender(client, runs.run_id, cfg)
        elif spec is not None:
            self._buffer = OfflineBuffer()
        self._active = self._buffer is not None
        self._warned_offline = False
        # After a call failed for good, the next ones try once: a down server must not add a
        # full retry window per artifact.
        self._server_down = False

    @property
    def active(self) -> bool:
        """False when tracking is off: disabled, or not rank 0."""
        return self._active

    @property
    def run_id(self) -> str | None:
        return self._runs.run_id if self._runs else None

    @property
    def parent_run_id(self) -> str | None:
        return self._runs.parent_run_id if self._runs else None

    @property
    def resumed(self) -> bool:
        """True when this continues an unfinished run of the same config, so it holds the earlier values."""
        return self._runs is not None and self._runs.resumed

    # ------------------------------------------------------------------ values (buffered)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue metrics at a global step; returns at once."""
        if self._buffer is None:
            return
        now = int(time.time() * 1000)
        self._buffer.add(metrics=[Metric(key, float(value), now, int(step)) for key, value in metrics.items()])

    def log_eval(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Evaluator results as `eval/<name>`."""
        self.log_metrics(eval_metrics(metrics), step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params, with credentials masked and values cut to MLflow's limit."""
        if self._buffer is not None:
            self._buffer.add(params=[Param(key, value) for key, value in redact_params(params).items()])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Tags, with credentials masked."""
        if self._buffer is not None:
            masked = {key: truncate(str(redact_value(key, value))) for key, value in tags.items()}
            self._buffer.add(tags=[RunTag(key, value) for key, value in masked.items()])

    def set_dataset_id(self, dataset_id: str) -> None:
        """Tag this run and its pipeline's parent with the dataset (data prep knows it only at the end)."""
        value = str(redact_value(TAG_DATASET_ID, dataset_id))
        self.set_tags({TAG_DATASET_ID: value})
        parent = self.parent_run_id
        if parent is not None:
            self._call("tagging the parent run", lambda c, r: c.set_tag(parent, TAG_DATASET_ID, value))

    # ------------------------------------------------------------------ artifacts (sent now)

    def _call(self, what: str, fn: Callable[[MlflowClient, str], Any]) -> Any:
        """Run one artifact / registry call; a failure is a warning, never the component's end."""
        if self._buffer is None:
            return None
        if self._runs is None or self._client is None:
            if not self._warned_offline:
                logger.warning(
                    "tracking is offline: %s and later artifacts are not sent (outputs are in the store)", what
                )
                self._warned_offline = True
            return None
        client, run_id = self._client, self._runs.run_id
        try:
            result = _retrying(
                lambda: fn(client, run_id), self._cfg, 0 if self._server_down else self._cfg.connect_timeout_s
            )
        except TRACKING_ERRORS as exc:
            self._server_down = is_transient(exc)
            logger.warning("MLflow: %s failed (%s); the component goes on without it", what, describe_error(exc))
            return None
        self._server_down = False
        return result

    def log_text(self, text: str, artifact_file: str) -> None:
        masked = redact_text(text)
        self._call(f"logging {artifact_file}", lambda c, r: c.log_text(r, masked, artifact_file))

    def log_json(self, obj: Any, artifact_file: str) -> None:
        masked = redact_tree(obj)
        self._call(f"logging {artifact_file}", lambda c, r: c.log_dict(r, masked, artifact_file))

    def log_config(self, config: Any) -> None:
        """The resolved config as `config.yaml`, credentials masked."""
        self.log_text(yaml.safe_dump(redact_tree(_plain(config)), sort_keys=False), "config.yaml")

    def log_summary(self, title: str, values: Mapping[str, Any]) -> None:
        """A short human-readable `summary.txt`: a title and one aligned `name: value` per line."""
        width = max((len(name) for name in values), default=0)
        lines = [title, "=" * len(title), *(f"{name:<{width}}  {value}" for name, value in values.items())]
        self.log_text("\n".join(lines) + "\n", "summary.txt")

    def log_table(self, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
        """Rows (e.g. per-category AP) as an MLflow table, shown as a grid in the UI."""
        masked = redact_tree([dict(row) for row in rows])
        columns = list(dict.fromkeys(key for row in masked for key in row))
        data = {column: [row.get(column) for row in masked] for column in columns}
        self._call(f"logging {artifact_file}", lambda c, r: c.log_table(r, data=data, artifact_file=artifact_file))

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure (the PR plot) as an image artifact."""
        self._call(f"logging {artifact_file}", lambda c, r: c.log_figure(r, figure, artifact_file))

    def log_image(self, image: Any, artifact_file: str) -> None:
        """A PIL image or array, e.g. a frame from `draw_masks`."""
        self._call(f"logging {artifact_file}", lambda c, r: c.log_image(r, image, artifact_file=artifact_file))

    def log_file(self, uri: str, artifact_path: str | None = None) -> None:
        """A file from the store (dataset manifest, metrics.json); text is checked for credentials."""
        if self._buffer is None:
            return
        data = storage.read_bytes(uri)
        try:
            data = redact_text(data.decode("utf-8")).encode("utf-8")
        except UnicodeDecodeError:
            logger.debug("%s is binary; logged as is", uri)
        with tempfile.TemporaryDirectory(prefix="sam3pipe-artifact-") as tmp:
            local = Path(tmp) / posixpath.basename(uri.rstrip("/"))
            local.write_bytes(data)
            self._call(f"logging {uri}", lambda c, r: c.log_artifact(r, str(local), artifact_path))

    # ------------------------------------------------------------------ checkpoints and registry

    def log_checkpoint(
        self, name: str, uri: str, step: int, sha256: str | None = None, size_bytes: int | None = None
    ) -> None:
        """Reference a checkpoint already in the object store: `checkpoints/<name>.json` + pointer tag.

        The bytes never go through the tracking server. Without `sha256`/`size_bytes` they are
        computed here (a remote checkpoint is fetched into the local cache for that).
        """
        if self._buffer is None:
            return
        if sha256 is None or size_bytes is None:
            path = storage.cached_path(uri)
            sha256 = sha256 or storage.sha256_file(path)
            size_bytes = path.stat().st_size if size_bytes is None else size_bytes
        reference = {"name": name, "uri": uri, "step": int(step), "size_bytes": int(size_bytes), "sha256": sha256}
        self.log_json(reference, f"checkpoints/{name}.json")
        if name in POINTER_CHECKPOINTS:
            self.set_tags({CHECKPOINT_TAG.format(name=name): uri})

    def register_model(self, checkpoint_uri: str) -> str | None:
        """Register the checkpoint as this pipeline run's model version with the alias; its version."""
        if self._spec is None:
            return None
        cfg, pipeline_run_id = self._cfg, self._spec.pipeline_run_id
        version = self._call(
            f"registering {checkpoint_uri} as {cfg.registered_model_name}",
            lambda c, r: register_checkpoint(
                c, cfg.registered_model_name, cfg.model_alias, checkpoint_uri, r, pipeline_run_id
            ),
        )
        return version.version if version is not None else None

    # ------------------------------------------------------------------ end

    def finish(self, status: str = "FINISHED") -> None:
        """Flush (bounded by `final_flush_timeout_s`), record what did not arrive, end the runs."""
        if self._buffer is None or self._spec is None:
            return
        buffer, self._buffer = self._buffer, None
        if self._monitor is not None:
            self._monitor.finish()
        left = buffer.close(self._cfg.final_flush_timeout_s)
        if len(left):
            self._record(self._spec, left, status)
        if self._runs is not None and self._client is not None:
            client, runs = self._client, self._runs
            try:
                _retrying(lambda: close_runs(client, runs, status), self._cfg, self._cfg.final_flush_timeout_s)
            except TRACKING_ERRORS as exc:
                logger.warning("MLflow: could not mark run %s %s (%s)", runs.run_id, status, describe_error(exc))

    def _record(self, spec: RunSpec, left: Pending, status: str) -> None:
        """Into the record under the outputs; into `.sam3pipe/unsent/` when the store fails too."""
        fallback = str((HOME / "unsent" / f"{spec.pipeline_run_id}-{spec.component}.jsonl").resolve())
        for uri in dict.fromkeys([self._unsent_uri or fallback, fallback]):
            try:
                record_unsent(uri, spec, self.run_id, status, left)
            except StorageError as exc:
                logger.error("could not record unsent tracking values at %s: %s", uri, exc)
                continue
            logger.warning(
                "%d values of %s never reached the MLflow tracking server; recorded in %s. "
                "Send them once it is back with: MLFLOW_TRACKING_URI=<server> python -m sam3_core.tracking replay %s",
                len(left),
                spec.component,
                uri,
                uri,
            )
            return

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


def _system_monitor(cfg: TrackingConfig, runs: OpenRuns, uri: str) -> SystemMetricsMonitor | None:
    """MLflow's own system-metrics sampler on the component run, where psutil is installed."""
    if not cfg.system_metrics or importlib.util.find_spec("psutil") is None:
        return None
    # Imported here: the module needs psutil at import time.
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    try:
        monitor = SystemMetricsMonitor(
            runs.run_id, sampling_interval=cfg.system_metrics_interval_s, resume_logging=runs.resumed, tracking_uri=uri
        )
    except TRACKING_ERRORS as exc:
        logger.warning("MLflow system metrics not started: %s", describe_error(exc))
        return None
    monitor.start()
    return monitor


def _open_runs(client: MlflowClient, spec: RunSpec, cfg: TrackingConfig, uri: str) -> OpenRuns | None:
    """The component's runs; None (tracking offline) when the server stays unreachable."""
    artifact_location = local_artifact_root() if is_local_store(uri) else None
    try:
        return _retrying(lambda: open_runs(client, spec, artifact_location), cfg, cfg.connect_timeout_s)
    except TRACKING_ERRORS as exc:
        if not is_transient(exc):
            raise ConfigError(
                f"MLflow at {redact_text(uri)} refused to open the {spec.component} run: {describe_error(exc)}; "
                "fix the tracking settings or set tracking.enabled=false"
            ) from exc
        logger.warning(
            "MLflow tracking server %s unreachable (%s); %s runs with tracking offline, metrics are recorded locally",
            redact_text(uri),
            describe_error(exc),
            spec.component,
        )
        return None


def component_run(
    cfg: TrackingConfig,
    component: str,
    config: Any = None,
    *,
    dataset_id: str = "",
    output_uri: str | None = None,
) -> Tracker:
    """Open (or resume) the component's nested run under its pipeline run; use it with `with`.

    `config` (the component's resolved config) becomes params and `config.yaml`; values
    that never reached the server are recorded under `output_uri`.
    """
    if not cfg.enabled:
        logger.info("MLflow tracking disabled (tracking.enabled=false)")
        return Tracker(cfg)
    if rank() != 0:
        return Tracker(cfg)
    fail_fast_http(cfg)
    uri = tracking_uri()
    pipeline_run_id = cfg.pipeline_run_id or uuid.uuid4().hex
    if not cfg.pipeline_run_id:
        logger.info("no tracking.pipeline_run_id given; this %s run starts pipeline run %s", component, pipeline_run_id)
    params = redact_params(flatten(_plain(config))) if config is not None else {}
    config_sha256 = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    spec = RunSpec(
        cfg.experiment_name, pipeline_run_id, cfg.pipeline_run_name, component, config_sha256, lineage_tags(),
        sweep_id=cfg.sweep_id,
    )
    client = MlflowClient(uri)
    runs = _open_runs(client, spec, cfg, uri)
    tracker = Tracker(
        cfg,
        spec,
        client if runs else None,
        runs,
        unsent_uri=storage.join(output_uri, UNSENT_FILE) if output_uri else "",
        monitor=_system_monitor(cfg, runs, uri) if runs else None,
    )
    if runs:
        logger.info(
            "MLflow run %s (%s) of pipeline run %s at %s", runs.run_id, component, pipeline_run_id, redact_text(uri)
        )
    tracker.log_params(params)
    if dataset_id:
        tracker.set_dataset_id(dataset_id)
    if config is not None:
        tracker.log_config(config)
    return tracker
