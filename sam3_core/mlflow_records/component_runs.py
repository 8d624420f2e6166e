"""A component's handle on its MLflow run.

    with component_run(cfg.mlflow, "train", cfg, overrides=argv, dataset_uri=cfg.data.uri,
                       output_uri=run_uri) as run:
        run.log_metrics(train_step_metrics(loss, terms, lr, clips, frames, seconds), step)
        run.log_checkpoint_ref("best", ref)        # a LoggedModel per checkpoint
        run.register_model(best_uri)               # the registry version of the best logged model
        run.set_outputs(outputs)

Tracking must not hold the work: importing MLflow and opening its store cost seconds, which a
short component (evaluate on one video) would otherwise wait for. With `mlflow.background` (the
default) a helper process (background.py) does all of it while the component works; the calls
here are queued to it in order and return at once, except the few that answer (`run_id`,
`parent_run_id`, `resumed`, `pending`, `register_model`, `submit_record`), which wait for it.
Without it, the same `Recorder` (recorder.py: what is recorded, how outages are handled) works in
this process. Off (disabled, or rank != 0) every call is a no-op. This module never imports mlflow.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from sam3_core.config import flatten
from sam3_core.mlflow_records.settings import MlflowConfig, rank

if TYPE_CHECKING:
    from sam3_core.mlflow_records.datasets import DatasetRef
    from sam3_core.mlflow_records.recorder import Recorder

logger = logging.getLogger(__name__)


class Channel(Protocol):
    """Where a handle's calls go: a `Recorder` here, or one in the helper process."""

    def tell(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Call the recorder's `method` (or read an attribute) without waiting for it."""

    def ask(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call the recorder's `method` (or read an attribute) and return its answer."""

    def finish(self, status: str) -> dict[str, Any]:
        """Flush, end the runs (`status`), release the recorder; its `final_state()` then."""


def _call(recorder: Recorder, method: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    value = getattr(recorder, method)
    return value(*args, **kwargs) if callable(value) else value


class LocalChannel:
    """The recorder in this process (`mlflow.background=false`)."""

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder

    def tell(self, method: str, *args: Any, **kwargs: Any) -> None:
        _call(self._recorder, method, args, kwargs)

    def ask(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _call(self._recorder, method, args, kwargs)

    def finish(self, status: str) -> dict[str, Any]:
        self._recorder.finish(status)
        return self._recorder.final_state()


def plain_config(config: Any) -> dict[str, Any]:
    """A config dataclass (or mapping) as JSON-able nested dicts: what the recorder gets of it."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return json.loads(json.dumps(data, default=str))


class ComponentRun:
    """One component run; see the module doc. Build it with `component_run`."""

    def __init__(self, cfg: MlflowConfig, channel: Channel | None = None) -> None:
        self._cfg = cfg
        self._channel = channel
        self._active = channel is not None
        # what the recorder said at its end (run ids, what stayed pending)
        self._final: dict[str, Any] = {}

    @property
    def active(self) -> bool:
        """False when tracking is off: disabled, or not rank 0."""
        return self._active

    def _tell(self, method: str, *args: Any, **kwargs: Any) -> None:
        if self._channel is not None:
            self._channel.tell(method, *args, **kwargs)

    def _ask(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._channel is None:
            return self._final.get(method)
        return self._channel.ask(method, *args, **kwargs)

    @property
    def run_id(self) -> str | None:
        """The component's MLflow run; None when tracking is off or offline."""
        return self._ask("run_id")

    @property
    def parent_run_id(self) -> str | None:
        return self._ask("parent_run_id")

    @property
    def resumed(self) -> bool:
        """True when this continues an unfinished run of the same config, so it holds the earlier values."""
        return bool(self._ask("resumed"))

    @property
    def pending(self) -> list[dict[str, Any]]:
        """Records not yet on the server (checkpoints, registrations, ...), oldest first."""
        return list(self._ask("pending") or [])

    # ------------------------------------------------------------------ values

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Metrics at a global step; returns at once."""
        self._tell("log_metrics", {key: float(value) for key, value in metrics.items()}, int(step))

    def log_eval(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Evaluator results as `eval/<name>`."""
        self._tell("log_eval", {key: float(value) for key, value in metrics.items()}, int(step))

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params, with credentials masked and values cut to MLflow's limit."""
        self._tell("log_params", dict(params))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Tags, with credentials masked."""
        self._tell("set_tags", dict(tags))

    def set_dataset_id(self, dataset_id: str) -> None:
        """Tag this run and its pipeline's parent with the dataset (data prep knows it only at the end)."""
        self._tell("set_dataset_id", dataset_id)

    def log_dataset(self, ref: DatasetRef, context: str) -> None:
        """The dataset as an MLflow dataset input of this run and its parent (the Dataset column)."""
        self._tell("log_dataset", ref, context)

    def set_outputs(self, outputs: Mapping[str, Any]) -> None:
        """The component's outputs as `sam3pipe.output.<name>` tags (what `reproduce` rewires)."""
        self._tell("set_outputs", dict(outputs))

    # ------------------------------------------------------------------ records

    def submit_record(self, record: dict[str, Any]) -> Any:
        """Send a tracking record (recorder.py) after those still pending; what it made, or None."""
        return self._ask("submit_record", record)

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

        The bytes never go through the tracking server; without `sha256`/`size_bytes` the recorder
        computes them. `role` is best / last / step (default: `name` when it is best or last).
        """
        plain_metrics = {key: float(value) for key, value in (metrics or {}).items()}
        self._tell("log_checkpoint", name, uri, int(step), sha256, size_bytes, plain_metrics, role)

    def log_checkpoint_ref(self, kind: str, ref: Any) -> None:
        """What the trainer's `on_checkpoint(kind, ref)` gives (a CheckpointRef: uri, size, sha256, step, metrics)."""
        name = kind if kind != "step" else posixpath.splitext(posixpath.basename(ref.uri))[0]
        self.log_checkpoint(name, ref.uri, ref.step, ref.sha256, ref.size, getattr(ref, "metrics", None), role=kind)

    def register_model(self, checkpoint_uri: str) -> str | None:
        """Register the checkpoint as this pipeline run's model version (linked to the best logged model).

        Returns the version, or None when tracking is off or the registration is pending.
        """
        return self._ask("register_model", checkpoint_uri)

    # ------------------------------------------------------------------ artifacts (uploaded in the background)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._tell("log_text", text, artifact_file)

    def log_json(self, obj: Any, artifact_file: str) -> None:
        self._tell("log_json", obj, artifact_file)

    def log_config(self, config: Any) -> None:
        """The resolved config as `config.yaml`, credentials masked."""
        self._tell("log_config", plain_config(config))

    def log_summary(self, title: str, values: Mapping[str, Any]) -> None:
        """A short human-readable `summary.txt`: a title and one aligned `name: value` per line."""
        self._tell("log_summary", title, dict(values))

    def log_table(self, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> None:
        """Rows (e.g. per-category AP) as an MLflow table, shown as a grid in the UI."""
        self._tell("log_table", [dict(row) for row in rows], artifact_file)

    def log_image(self, image: Any, artifact_file: str) -> None:
        """A PIL image or array, e.g. a frame from `draw_masks`."""
        self._tell("log_image", image, artifact_file)

    def log_file(self, uri: str, artifact_path: str | None = None) -> None:
        """A file from the store (dataset manifest, metrics.json); text is checked for credentials."""
        self._tell("log_file", uri, artifact_path)

    # ------------------------------------------------------------------ end

    def finish(self, status: str = "FINISHED") -> None:
        """Flush (bounded by `final_flush_timeout_s`), record what did not arrive, end the runs."""
        channel, self._channel = self._channel, None
        if channel is not None:
            self._final = channel.finish(status)

    def __enter__(self) -> ComponentRun:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.finish("FINISHED")
            return
        try:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        except Exception as error:  # the component's own error is the one to report
            logger.warning("MLflow: could not record the end of this run: %s", error)


def component_run(
    cfg: MlflowConfig,
    component: str,
    config: Any = None,
    *,
    overrides: Sequence[str] = (),
    dataset_uri: str = "",
    dataset_id: str = "",
    output_uri: str | None = None,
) -> ComponentRun:
    """Open (or resume) the component's nested run under its pipeline run; use it with `with`.

    `config` (the component's resolved config) becomes params, `config.yaml` and the parent's
    comparison params; `overrides` (its command line) and the dataset at `dataset_uri` (a
    published dataset, or a file in one) go into `reproduce.json` and the dataset input.
    Values that never reached the server are recorded under `output_uri`. With `mlflow.run_id`
    (KFP's MLFLOW_RUN_ID) it logs into that run and its parent instead, and opens none.
    """
    if not cfg.enabled:
        logger.info("MLflow tracking disabled (mlflow.enabled=false)")
        return ComponentRun(cfg)
    if rank() != 0:
        return ComponentRun(cfg)
    plain = plain_config(config) if config is not None else None
    opening = {
        "cfg": cfg,
        "component": component,
        "plain": plain,
        # flattened here: the helper process would import Hydra for it
        "flat": flatten(plain) if plain is not None else None,
        "overrides": [str(o) for o in overrides],
        "dataset_uri": dataset_uri,
        "dataset_id": dataset_id,
        "output_uri": output_uri,
    }
    if cfg.background:
        from sam3_core.mlflow_records.background import ProcessChannel

        return ComponentRun(cfg, ProcessChannel(opening))
    from sam3_core.mlflow_records.recorder import open_recorder

    return ComponentRun(cfg, LocalChannel(open_recorder(**opening)))
