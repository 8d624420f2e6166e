"""What records one component run in MLflow: the work behind `ComponentRun` (component_runs.py).

A `Recorder` is opened by `open_recorder`, in the component's own process or in the helper
process of background.py (`mlflow.background`, the default), and takes the component's calls in
order. Tracking never stops a component: metrics go through a background sender, artifacts
through a small upload pool; checkpoint records, registrations, dataset inputs and the pipeline
run's summary are records that are kept while the server is away and sent when it is back; an
MLflow failure is a warning; whatever never reached the server is recorded next to the outputs
(`mlflow_unsent.jsonl`) and the component says what is pending. If the server cannot be reached
at start, the component runs with tracking offline.

Two ways to get runs (docs/mlflow.md): our own (a parent per pipeline run, a nested run per
component, found again by tags, ended here), or runs someone else owns (`mlflow.run_id`, which
KFP 2.17's backend sets through MLFLOW_RUN_ID): we log into that run and its parent, create none
and end none.

The pipeline (parent) run gets what comparing pipeline runs needs: the params named by
`mlflow.parent_params` (lr, max_steps, ...) plus dataset id, image and git commit, and,
when a component finishes, its `mlflow.headline_metrics` (the best checkpoint's `val/*`
at its step, the evaluation's `eval/*`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import posixpath
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from sam3_core import storage
from sam3_core.errors import ConfigError, StorageError
from sam3_core.mlflow_records import datasets, mlflow_api
from sam3_core.mlflow_records.lineage import (
    RECORD_FILE,
    TAG_DATASET_ID,
    TAG_GIT_COMMIT,
    TAG_IMAGE,
    TAG_OUTPUT,
    checkpoint_input,
    lineage_tags,
    run_record,
)
from sam3_core.mlflow_records.metrics import eval_metrics
from sam3_core.mlflow_records.models import model_name
from sam3_core.mlflow_records.records import Target, apply_record, describe_pending
from sam3_core.mlflow_records.redact import (
    describe_error,
    mask_console,
    redact_params,
    redact_text,
    redact_tree,
    redact_value,
    truncate,
)
from sam3_core.mlflow_records.runs import OpenRuns, RunSpec, adopt_runs, close_runs, open_runs
from sam3_core.mlflow_records.sender import OfflineBuffer, Pending, Sender, is_transient, tracking_errors
from sam3_core.mlflow_records.settings import (
    MlflowConfig,
    fail_fast_http,
    home,
    is_local_store,
    local_artifact_root,
    tracking_uri,
)
from sam3_core.mlflow_records.ui import runs_table_url, view_tags
from sam3_core.mlflow_records.unsent import UNSENT_FILE, record_unsent

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

logger = logging.getLogger(__name__)

T = TypeVar("T")
# The config key naming the checkpoint a component starts from (train) or predicts with.
CHECKPOINT_INPUT_KEY = "model.uri"
# The parent param of each lineage tag, so the runs table shows them as columns.
LINEAGE_PARAMS = {TAG_GIT_COMMIT: "git_commit", TAG_IMAGE: "image"}
BEST_STEP = "best_step"
# A short component must not wait for a system-metrics sample; joined this long at most at the end.
MONITOR_JOIN_S = 2.0


def _metric_json(metric: Metric) -> dict[str, Any]:
    return {"key": metric.key, "value": metric.value, "step": metric.step, "timestamp": metric.timestamp}


def _plain(config: Any) -> dict[str, Any]:
    """A config dataclass (or mapping) as JSON-able nested dicts."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return json.loads(json.dumps(data, default=str))


def _retrying(fn: Callable[[], T], cfg: MlflowConfig, timeout_s: float) -> T:
    """Call `fn`, retrying transient MLflow failures with backoff for up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    delay = cfg.retry_initial_s
    while True:
        try:
            return fn()
        except tracking_errors() as exc:
            if not is_transient(exc) or time.monotonic() + delay > deadline:
                raise
            logger.debug("MLflow call failed (%s); retrying in %.1fs", describe_error(exc), delay)
            time.sleep(delay)
            delay = min(delay * 2, cfg.retry_max_s)


def parent_params(flat: Mapping[str, Any], mapping: Mapping[str, str]) -> dict[str, Any]:
    """The comparison params of a component's flattened config: `mapping` is param -> config key.

    A key naming a section gives one param per leaf (`lora` -> `lora.rank`, `lora.alpha`);
    keys this component's config lacks are skipped.
    """
    params: dict[str, Any] = {}
    for name, key in mapping.items():
        if key in flat:
            params[name] = flat[key]
        else:
            params.update(
                {name + leaf[len(key) :]: value for leaf, value in flat.items() if leaf.startswith(key + ".")}
            )
    return params


class Recorder:
    """Records one component run; see the module doc. Build it with `open_recorder`."""

    def __init__(
        self,
        cfg: MlflowConfig,
        spec: RunSpec | None = None,
        client: MlflowClient | None = None,
        runs: OpenRuns | None = None,
        unsent_uri: str = "",
        monitor: SystemMetricsMonitor | None = None,
        model_params: Mapping[str, str] | None = None,
    ) -> None:
        self._cfg, self._spec, self._client, self._runs = cfg, spec, client, runs
        self._unsent_uri, self._monitor = unsent_uri, monitor
        # params of every checkpoint's logged model: the run's comparison params (lr, ...)
        self._model_params = dict(model_params or {})
        self._buffer: Sender | OfflineBuffer | None = None
        if runs is not None and client is not None:
            self._buffer = Sender(client, runs.run_id, cfg)
        elif spec is not None:
            self._buffer = OfflineBuffer()
        self._active = self._buffer is not None
        self._warned_offline = False
        # After a call failed for good, the next ones try once: a down server must not add a
        # full retry window per artifact or record.
        self._server_down = False
        self._records: list[dict[str, Any]] = []
        self._uploads: ThreadPoolExecutor | None = None
        self._futures: list[Future[Any]] = []
        self._latest: dict[str, Metric] = {}
        # val/* metrics by step: what a checkpoint of that step scored, when its ref has no metrics
        self._val_by_step: dict[int, dict[str, Metric]] = {}
        self._best: dict[str, Any] | None = None

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

    @property
    def pending(self) -> list[dict[str, Any]]:
        """Records not yet on the server (checkpoints, registrations, ...), oldest first."""
        return list(self._records)

    def final_state(self) -> dict[str, Any]:
        """What the component's handle still answers once this recorder is finished."""
        return {
            "run_id": self.run_id,
            "parent_run_id": self.parent_run_id,
            "resumed": self.resumed,
            "pending": self.pending,
        }

    # ------------------------------------------------------------------ values (buffered)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue metrics at a global step; returns at once."""
        if self._buffer is None:
            return
        now = int(time.time() * 1000)
        batch = [mlflow_api.Metric(key, float(value), now, int(step)) for key, value in metrics.items()]
        for metric in batch:
            self._latest[metric.key] = metric
            if metric.key.startswith("val/"):
                self._val_by_step.setdefault(metric.step, {})[metric.key] = metric
        self._buffer.add(metrics=batch)

    def log_eval(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Evaluator results as `eval/<name>`."""
        self.log_metrics(eval_metrics(metrics), step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params, with credentials masked and values cut to MLflow's limit."""
        if self._buffer is not None:
            self._buffer.add(params=[mlflow_api.Param(key, value) for key, value in redact_params(params).items()])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Tags, with credentials masked."""
        if self._buffer is not None:
            masked = {key: truncate(str(redact_value(key, value))) for key, value in tags.items()}
            self._buffer.add(tags=[mlflow_api.RunTag(key, value) for key, value in masked.items()])

    def set_dataset_id(self, dataset_id: str) -> None:
        """Tag this run and its pipeline's parent with the dataset (data prep knows it only at the end)."""
        value = str(redact_value(TAG_DATASET_ID, dataset_id))
        self.set_tags({TAG_DATASET_ID: value})
        self.log_parent(params={"dataset_id": value}, tags={TAG_DATASET_ID: value})

    def log_dataset(self, ref: datasets.DatasetRef, context: str) -> None:
        """The dataset as an MLflow dataset input of this run and its parent (the Dataset column)."""
        self.set_dataset_id(ref.dataset_id)
        self.submit_record({"kind": "dataset", "dataset": ref.to_json(), "context": context})

    def set_outputs(self, outputs: Mapping[str, Any]) -> None:
        """The component's outputs as `sam3pipe.output.<name>` tags (what `reproduce` rewires)."""
        self.set_tags(
            {TAG_OUTPUT.format(name=k): v for k, v in outputs.items() if isinstance(v, str | int | float | bool)}
        )

    def log_parent(
        self,
        params: Mapping[str, Any] | None = None,
        metrics: Sequence[Metric] = (),
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Values for the pipeline (parent) run: params it lacks, metrics, tags."""
        record: dict[str, Any] = {"kind": "parent"}
        if params:
            record["params"] = redact_params(params)
        if metrics:
            record["metrics"] = [_metric_json(m) for m in metrics]
        if tags:
            record["tags"] = {key: truncate(str(redact_value(key, value))) for key, value in tags.items()}
        self.submit_record(record)

    # ------------------------------------------------------------------ records (kept while the server is away)

    def submit_record(self, record: dict[str, Any]) -> Any:
        """Send a record after those still pending; kept when the server is away. What it made, or None."""
        if self._buffer is None:
            return None
        self._records.append(record)
        if self._runs is None or self._client is None:
            return None
        results = self._drain(0 if self._server_down else self._cfg.connect_timeout_s)
        return results.get(id(record))

    def _drain(self, timeout_s: float) -> dict[int, Any]:
        """Apply pending records in order until one fails transiently; results by record id."""
        assert self._runs is not None and self._client is not None
        client, target = self._client, Target(self._runs.experiment_id, self._runs.parent_run_id, self._runs.run_id)
        results: dict[int, Any] = {}
        while self._records:
            record = self._records[0]
            try:
                results[id(record)] = _retrying(
                    lambda record=record: apply_record(client, target, record), self._cfg, timeout_s
                )
            except tracking_errors() as exc:
                if is_transient(exc):
                    if not self._server_down:
                        logger.warning(
                            "MLflow unreachable (%s); pending until it is back: %s",
                            describe_error(exc),
                            describe_pending(self._records),
                        )
                    self._server_down = True
                    return results
                logger.warning("MLflow refused a %s (%s); dropped", record["kind"], describe_error(exc))
            self._records.pop(0)
            if self._server_down:
                logger.warning("MLflow reachable again; pending tracking records sent")
            self._server_down = False
        return results

    def log_checkpoint(
        self,
        name: str,
        uri: str,
        step: int,
        sha256: str | None = None,
        size_bytes: int | None = None,
        metrics: Mapping[str, float] | None = None,
        role: str | None = None,
    ) -> None:
        """A checkpoint already in the object store as a LoggedModel + `checkpoints/<name>.json`.

        The bytes never go through the tracking server. Without `sha256`/`size_bytes` they are
        computed here (a remote checkpoint is read for that). `role` is best / last / step
        (default: `name` when it is best or last, else step); `metrics` are the validation
        metrics of its step, added to the `val/*` metrics this run logged at that step.
        """
        if self._buffer is None:
            return
        if sha256 is None or size_bytes is None:
            path = storage.cached_path(uri)
            sha256 = sha256 or storage.sha256_file(path)
            size_bytes = path.stat().st_size if size_bytes is None else size_bytes
        role = role or (name if name in ("best", "last") else "step")
        logged = self._val_by_step.get(int(step), {})
        values = {**{key: m.value for key, m in logged.items()}, **(metrics or {})}
        reference = {"name": name, "uri": uri, "step": int(step), "size_bytes": int(size_bytes), "sha256": sha256}
        spec_name = self._spec.parent_name if self._spec else "run"
        record = {
            "kind": "checkpoint",
            **reference,
            "role": role,
            "reference": reference,
            "model_name": model_name(f"{spec_name}/{self._spec.component if self._spec else ''}", step),
            "metrics": values,
            "timestamps": {key: m.timestamp for key, m in logged.items() if key in values},
            "params": self._model_params,
        }
        if role == "best":
            self._best = {"model_name": record["model_name"], "step": int(step), "metrics": values}
        self.submit_record(record)

    def log_checkpoint_ref(self, kind: str, ref: Any) -> None:
        """What the trainer's `on_checkpoint(kind, ref)` gives (a CheckpointRef: uri, size, sha256, step, metrics)."""
        name = kind if kind != "step" else posixpath.splitext(posixpath.basename(ref.uri))[0]
        self.log_checkpoint(name, ref.uri, ref.step, ref.sha256, ref.size, getattr(ref, "metrics", None), role=kind)

    def register_model(self, checkpoint_uri: str) -> str | None:
        """Register the checkpoint as this pipeline run's model version (linked to the best logged model).

        Returns the version, or None when tracking is off or the registration is pending.
        """
        if self._spec is None:
            return None
        record = {
            "kind": "register",
            "model_name": self._cfg.registered_model_name,
            "alias": self._cfg.model_alias,
            "checkpoint_uri": checkpoint_uri,
            "pipeline_run_id": self._spec.pipeline_run_id,
            "best_model_name": self._best["model_name"] if self._best else "",
        }
        return self.submit_record(record)

    # ------------------------------------------------------------------ artifacts (uploaded in the background)

    def _call(self, what: str, fn: Callable[[MlflowClient, str], Any]) -> Future[Any] | None:
        """Upload one artifact on the pool; a failure is a warning, never the component's end."""
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

        def upload() -> Any:
            try:
                result = _retrying(
                    lambda: fn(client, run_id), self._cfg, 0 if self._server_down else self._cfg.connect_timeout_s
                )
            except tracking_errors() as exc:
                self._server_down = is_transient(exc)
                logger.warning("MLflow: %s failed (%s); the component goes on without it", what, describe_error(exc))
                return None
            return result

        if self._uploads is None:
            self._uploads = ThreadPoolExecutor(self._cfg.upload_workers, thread_name_prefix="mlflow-upload")
        future = self._uploads.submit(upload)
        self._futures.append(future)
        return future

    def _log_bytes(self, data: bytes, artifact_file: str) -> None:
        def upload(client: MlflowClient, run_id: str) -> None:
            with tempfile.TemporaryDirectory(prefix="sam3pipe-artifact-") as tmp:
                local = Path(tmp) / posixpath.basename(artifact_file)
                local.write_bytes(data)
                client.log_artifact(run_id, str(local), posixpath.dirname(artifact_file) or None)

        self._call(f"logging {artifact_file}", upload)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._log_bytes(redact_text(text).encode("utf-8"), artifact_file)

    def log_json(self, obj: Any, artifact_file: str) -> None:
        self._log_bytes(json.dumps(redact_tree(obj), indent=2).encode("utf-8"), artifact_file)

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

    def log_image(self, image: Any, artifact_file: str) -> None:
        """A PIL image or array, e.g. a frame from `draw_masks`."""
        from PIL import Image

        picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        self._log_bytes(buffer.getvalue(), artifact_file)

    def log_file(self, uri: str, artifact_path: str | None = None) -> None:
        """A file from the store (dataset manifest, metrics.json); text is checked for credentials."""
        if self._buffer is None:
            return
        data = storage.read_bytes(uri)
        try:
            data = redact_text(data.decode("utf-8")).encode("utf-8")
        except UnicodeDecodeError:
            logger.debug("%s is binary; logged as is", uri)
        name = posixpath.basename(uri.rstrip("/"))
        self._log_bytes(data, posixpath.join(artifact_path, name) if artifact_path else name)

    # ------------------------------------------------------------------ end

    def _summary(self) -> list[dict[str, Any]]:
        """The parent's record of this finished component: headline metrics, the best checkpoint.

        Headline values are the latest ones, except `val/*`: those of the best checkpoint, at its step.
        """
        wanted = set(self._cfg.headline_metrics)
        values = {key: m for key, m in self._latest.items() if key in wanted}
        record: dict[str, Any] = {"kind": "parent"}
        if self._best is not None:
            values = {key: m for key, m in values.items() if not key.startswith("val/")}
            now = int(time.time() * 1000)
            step = self._best["step"]
            for key, value in self._best["metrics"].items():
                if key in wanted:
                    values[key] = mlflow_api.Metric(key, float(value), now, step)
            values[BEST_STEP] = mlflow_api.Metric(BEST_STEP, float(step), now, step)
            record.update(best_model_name=self._best["model_name"], best_step=step)
        if not values:
            return []
        record["metrics"] = [_metric_json(m) for m in values.values()]
        return [record]

    def _stop_monitor(self) -> threading.Thread | None:
        """Stop the system-metrics sampler in the background: its last flush must not hold the end."""
        if self._monitor is None:
            return None
        thread = threading.Thread(target=self._monitor.finish, name="mlflow-monitor-stop", daemon=True)
        thread.start()
        return thread

    def finish(self, status: str = "FINISHED") -> None:
        """Flush (bounded by `final_flush_timeout_s`), record what did not arrive, end the runs."""
        if self._buffer is None or self._spec is None:
            return
        deadline = time.monotonic() + self._cfg.final_flush_timeout_s
        monitor = self._stop_monitor()
        if status == "FINISHED":
            self._records.extend(self._summary())
        buffer, self._buffer = self._buffer, None
        left = buffer.close(self._cfg.final_flush_timeout_s)
        if self._futures:
            wait_futures(self._futures, timeout=max(0.0, deadline - time.monotonic()))
        if self._uploads is not None:
            self._uploads.shutdown(wait=False, cancel_futures=True)
        if self._records and self._runs is not None and self._client is not None:
            self._drain(max(0.0, deadline - time.monotonic()))
        if len(left) or self._records:
            self._record_unsent(self._spec, left, status)
        self._close(status, deadline)
        if monitor is not None:
            monitor.join(timeout=max(0.0, min(MONITOR_JOIN_S, deadline - time.monotonic())))

    def _close(self, status: str, deadline: float) -> None:
        if self._runs is None or self._client is None:
            return
        client, runs = self._client, self._runs
        try:
            _retrying(lambda: close_runs(client, runs, status), self._cfg, max(0.0, deadline - time.monotonic()))
        except tracking_errors() as exc:
            logger.warning("MLflow: could not mark run %s %s (%s)", runs.run_id, status, describe_error(exc))
            return
        uri = tracking_uri()
        if not is_local_store(uri):
            base = redact_text(uri.rstrip("/"))
            name = f"{self._spec.parent_name}/{self._spec.component}" if self._spec else runs.run_id
            logger.info("View run %s at: %s/#/experiments/%s/runs/%s", name, base, runs.experiment_id, runs.run_id)
            logger.info("Compare pipeline runs at: %s", runs_table_url(base, runs.experiment_id))

    def _record_unsent(self, spec: RunSpec, left: Pending, status: str) -> None:
        """Into the record under the outputs; into `<local state>/unsent/` when the store fails too."""
        fallback = str((home() / "unsent" / f"{spec.pipeline_run_id}-{spec.component}.jsonl").resolve())
        records, self._records = self._records, []
        what = ", ".join(
            part
            for part in (f"{len(left)} metric/param/tag values" if len(left) else "", describe_pending(records))
            if part
        )
        for uri in dict.fromkeys([self._unsent_uri or fallback, fallback]):
            try:
                run_id = self.run_id or self._cfg.run_id or None
                record_unsent(uri, spec, run_id, status, left, records, owned=not self._cfg.run_id)
            except StorageError as exc:
                logger.error("could not record unsent tracking values at %s: %s", uri, exc)
                continue
            logger.warning(
                "pending for MLflow (%s): %s never reached the tracking server; recorded in %s. "
                "Send them once it is back with: MLFLOW_TRACKING_URI=<server> python -m sam3_core.mlflow_records replay %s",
                spec.component,
                what,
                uri,
                uri,
            )
            return


def _system_monitor(cfg: MlflowConfig, runs: OpenRuns, uri: str) -> SystemMetricsMonitor | None:
    """MLflow's own system-metrics sampler on the component run, where psutil is installed."""
    import importlib.util

    if not cfg.system_metrics or importlib.util.find_spec("psutil") is None:
        return None
    # Imported here: the module needs psutil at import time.
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    try:
        monitor = SystemMetricsMonitor(
            runs.run_id, sampling_interval=cfg.system_metrics_interval_s, resume_logging=runs.resumed, tracking_uri=uri
        )
    except tracking_errors() as exc:
        logger.warning("MLflow system metrics not started: %s", describe_error(exc))
        return None
    monitor.start()
    return monitor


def _open_runs(client: MlflowClient, spec: RunSpec, cfg: MlflowConfig, uri: str) -> OpenRuns | None:
    """The component's runs (its own, or those named by `mlflow.run_id`); None (tracking offline)
    when the server stays unreachable."""
    artifact_location = local_artifact_root(uri) if is_local_store(uri) else None
    if cfg.run_id:
        opener = lambda: adopt_runs(client, cfg.run_id, spec)  # noqa: E731
    else:
        opener = lambda: open_runs(client, spec, artifact_location, view_tags(cfg))  # noqa: E731
    try:
        return _retrying(opener, cfg, cfg.connect_timeout_s)
    except tracking_errors() as exc:
        if not is_transient(exc):
            if cfg.run_id:
                raise ConfigError(
                    f"MLFLOW_RUN_ID={cfg.run_id}: MLflow at {redact_text(uri)} has no such run to log the "
                    f"{spec.component} run into ({describe_error(exc)}); unset MLFLOW_RUN_ID (mlflow.run_id) "
                    "to let sam3pipe open its own runs"
                ) from exc
            raise ConfigError(
                f"MLflow at {redact_text(uri)} refused to open the {spec.component} run: {describe_error(exc)}; "
                "fix the tracking settings or set mlflow.enabled=false"
            ) from exc
        logger.warning(
            "MLflow tracking server %s unreachable (%s); %s runs with tracking offline, metrics are recorded locally",
            redact_text(uri),
            describe_error(exc),
            spec.component,
        )
        return None


def _lineage_record(
    tracker: Recorder,
    component: str,
    flat: dict[str, Any],
    plain: dict[str, Any],
    overrides: Sequence[str],
    dataset: datasets.DatasetRef | None,
) -> None:
    """`reproduce.json`: what `sam3pipe reproduce` needs to rebuild and check this run."""
    checkpoint = None
    if isinstance(flat.get(CHECKPOINT_INPUT_KEY), str) and flat[CHECKPOINT_INPUT_KEY]:
        try:
            checkpoint = checkpoint_input(CHECKPOINT_INPUT_KEY, flat[CHECKPOINT_INPUT_KEY])
        except StorageError as exc:
            logger.warning("the checkpoint %s is not pinned in the lineage record: %s", flat[CHECKPOINT_INPUT_KEY], exc)
    record = run_record(
        component,
        [redact_text(o) for o in overrides],
        redact_tree(plain),
        dataset.to_json() if dataset else None,
        checkpoint,
    )
    tracker.submit_record({"kind": "artifact", "path": RECORD_FILE, "json": redact_tree(record.to_json())})


def open_recorder(
    cfg: MlflowConfig,
    component: str,
    plain: dict[str, Any] | None = None,
    flat: dict[str, Any] | None = None,
    *,
    overrides: Sequence[str] = (),
    dataset_uri: str = "",
    dataset_id: str = "",
    output_uri: str | None = None,
) -> Recorder:
    """Open (or resume, or adopt) the component's runs and record what is known at its start.

    `plain` (the component's resolved config as plain dicts) becomes `config.yaml`, and `flat` (the
    same with dotted keys, `sam3_core.config.flatten`) params and the parent's comparison params; `overrides` (its command line) and the dataset at `dataset_uri` (a
    published dataset, or a file in one) go into `reproduce.json` and the dataset input. Values
    that never reached the server are recorded under `output_uri`. Raises ConfigError when the
    server refuses the runs (bad credentials, an `mlflow.run_id` it does not know).
    """
    fail_fast_http(cfg)
    mask_console()
    uri = tracking_uri()
    # KFP's runs: the pipeline run id comes from our pipeline, else it is KFP's run (the parent), found on opening.
    pipeline_run_id = cfg.pipeline_run_id or ("" if cfg.run_id else uuid.uuid4().hex)
    if not cfg.pipeline_run_id and not cfg.run_id:
        logger.info("no mlflow.pipeline_run_id given; this %s run starts pipeline run %s", component, pipeline_run_id)
    flat = flat or {}
    params = redact_params(flat)
    config_sha256 = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    tags = lineage_tags()
    spec = RunSpec(
        cfg.experiment_name,
        pipeline_run_id,
        cfg.pipeline_run_name,
        component,
        config_sha256,
        tags,
        sweep_id=cfg.sweep_id,
    )
    dataset = datasets.describe(dataset_uri) if dataset_uri else None
    comparison = parent_params(flat, cfg.parent_params)
    client = mlflow_api.MlflowClient(uri)
    runs = _open_runs(client, spec, cfg, uri)
    if runs is not None and not spec.pipeline_run_id:
        spec = dataclasses.replace(spec, pipeline_run_id=runs.pipeline_run_id)
    tracker = Recorder(
        cfg,
        spec,
        client if runs else None,
        runs,
        unsent_uri=storage.join(output_uri, UNSENT_FILE) if output_uri else "",
        monitor=_system_monitor(cfg, runs, uri) if runs else None,
        model_params=redact_params(comparison),
    )
    if runs:
        owner = "" if runs.owned else ", opened by its pipeline's backend"
        logger.info(
            "MLflow run %s (%s%s) of pipeline run %s at %s",
            runs.run_id,
            component,
            owner,
            spec.pipeline_run_id,
            redact_text(uri),
        )
    tracker.log_params(params)
    lineage = {LINEAGE_PARAMS[key]: value for key, value in tags.items() if key in LINEAGE_PARAMS}
    tracker.log_parent(params={**comparison, **lineage})
    if dataset is not None:
        tracker.log_dataset(dataset, datasets.CONTEXTS.get(component, component))
    elif dataset_id:
        tracker.set_dataset_id(dataset_id)
    if plain is not None:
        tracker.log_config(plain)
        _lineage_record(tracker, component, flat, plain, overrides, dataset)
    return tracker
