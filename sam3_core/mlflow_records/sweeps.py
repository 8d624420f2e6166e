"""A hyper-parameter sweep in MLflow: one run for the sweep, one nested run per trial.

    sweep run      tags sam3pipe.component=sweep, sam3pipe.sweep_id; params sweep.*; the sweep
                   table; the best trial's eval/* metrics; tag sam3pipe.best_trial
      trial run    the pipeline parent run of one trial (tags sam3pipe.component=pipeline,
                   sam3pipe.sweep_id, sam3pipe.trial_id); params = the trial's settings (lr, ...);
                   metrics eval/*
        train, predict, evaluate   the trial's component runs, nested as in any pipeline run

A trial's components create its parent run nested under the sweep run when
`mlflow.sweep_id` (env SAM3PIPE_SWEEP_ID) is set (runs.py); `open_sweep` opens the sweep run
before the trials start, and `record_sweep` writes what the trials compare on once they ended
(`record_trial` one trial, for Katib's trials, which have no sweep step after them):
each trial's params and metrics side by side in the runs table, the sweep table, and the best
trial's checkpoint registered in the Model Registry with the alias (`candidate`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sam3_core.errors import Sam3PipeError
from sam3_core.mlflow_records import mlflow_api
from sam3_core.mlflow_records.metrics import eval_metrics
from sam3_core.mlflow_records.models import RUN_MODEL_TAG
from sam3_core.mlflow_records.redact import (
    describe_error,
    redact_params,
    redact_text,
    truncate,
)
from sam3_core.mlflow_records.registry import register_checkpoint
from sam3_core.mlflow_records.runs import (
    PIPELINE,
    TAG_COMPONENT,
    TAG_PIPELINE_RUN_ID,
    TAG_SWEEP_ID,
    experiment_id,
    find_or_create,
    search_by_tags,
    sweep_run_id,
    sweep_run_name,
)
from sam3_core.mlflow_records.sender import tracking_errors
from sam3_core.mlflow_records.settings import (
    MlflowConfig,
    fail_fast_http,
    is_local_store,
    local_artifact_root,
    tracking_uri,
)
from sam3_core.mlflow_records.ui import view_tags

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

TAG_TRIAL_ID = "sam3pipe.trial_id"
TAG_TRIAL_STATUS = "sam3pipe.trial_status"
TAG_TRIAL_ERROR = "sam3pipe.trial_error"
TAG_BEST_TRIAL = "sam3pipe.best_trial"
TRAIN = "train"
TABLE_ARTIFACT = "sweep_table.json"
SUMMARY_ARTIFACT = "sweep_table.md"
SPEC_ARTIFACT = "sweep_spec.json"


class SweepTrackingError(Sam3PipeError):
    """MLflow refused or could not be reached while recording the sweep."""


@dataclass(frozen=True)
class TrialResult:
    """What the sweep knows of one trial once it ended."""

    trial_id: str
    # the trial's own pipeline run id: its component runs nest under the run of that id
    pipeline_run_id: str
    run_name: str
    params: dict[str, Any]
    succeeded: bool
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint_uri: str = ""
    error: str = ""


def _client() -> tuple[MlflowClient, str]:
    # MLflow's own HTTP retries would hold a call for minutes; a failed sweep step is retried by KFP
    fail_fast_http(MlflowConfig())
    uri = tracking_uri()
    return mlflow_api.MlflowClient(uri), uri


def _experiment(client: MlflowClient, uri: str, name: str) -> str:
    cfg = MlflowConfig()
    return experiment_id(client, name, local_artifact_root(uri) if is_local_store(uri) else None, view_tags(cfg))


def _wrapped(what: str, uri: str, exc: Exception) -> SweepTrackingError:
    return SweepTrackingError(
        f"MLflow at {redact_text(uri)}: {what} failed ({describe_error(exc)}); check MLFLOW_TRACKING_URI"
    )


def open_sweep(experiment_name: str, sweep_id: str, params: Mapping[str, Any], spec: Any) -> str:
    """Open (or find again) the sweep's run with its settings as params and the spec as an artifact."""
    client, uri = _client()
    try:
        exp_id = _experiment(client, uri, experiment_name)
        run_id = sweep_run_id(client, exp_id, sweep_id)
        _log_params(client, run_id, params)
        client.log_dict(run_id, spec, SPEC_ARTIFACT)
        client.update_run(run_id, status="RUNNING")
    except tracking_errors() as exc:
        raise _wrapped(f"opening the run of sweep {sweep_id}", uri, exc) from exc
    logger.info("MLflow sweep run %s (%s) at %s", run_id, sweep_run_name(sweep_id), redact_text(uri))
    return run_id


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Params one by one: a value already logged differently (MLflow params are immutable) is a warning."""
    for key, value in redact_params(dict(params)).items():
        try:
            client.log_param(run_id, key, value)
        except mlflow_api.MlflowException as exc:
            if exc.error_code != "INVALID_PARAMETER_VALUE":
                raise
            logger.warning("MLflow run %s keeps its earlier value of param %s (%s)", run_id, key, describe_error(exc))


def _finite(metrics: Mapping[str, float]) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items() if math.isfinite(float(value))}


def _trial_run_id(client: MlflowClient, exp_id: str, sweep_run: str, sweep_id: str, trial: TrialResult) -> str:
    """The trial's pipeline parent run; created here for a trial that failed before it opened one."""
    wanted = {TAG_PIPELINE_RUN_ID: trial.pipeline_run_id, TAG_COMPONENT: PIPELINE}
    tags = {TAG_SWEEP_ID: sweep_id, mlflow_api.MLFLOW_PARENT_RUN_ID: sweep_run}
    return find_or_create(client, exp_id, wanted, tags, trial.run_name).info.run_id


def _train_run_id(client: MlflowClient, exp_id: str, trial_run: str, pipeline_run_id: str) -> str | None:
    """The trial's (latest, live) train component run: the registered version links to it."""
    wanted = {TAG_PIPELINE_RUN_ID: pipeline_run_id, TAG_COMPONENT: TRAIN, mlflow_api.MLFLOW_PARENT_RUN_ID: trial_run}
    found = search_by_tags(client, exp_id, wanted, newest_first=True)
    return found[0].info.run_id if found else None


def _record_trial(client: MlflowClient, run_id: str, sweep_id: str, trial: TrialResult) -> None:
    _log_params(client, run_id, trial.params)
    metrics = eval_metrics(_finite(trial.metrics))
    for name, value in metrics.items():
        client.log_metric(run_id, name, value)
    tags = {
        TAG_SWEEP_ID: sweep_id,
        TAG_TRIAL_ID: trial.trial_id,
        TAG_TRIAL_STATUS: "succeeded" if trial.succeeded else "failed",
    }
    if trial.error:
        tags[TAG_TRIAL_ERROR] = truncate(redact_text(trial.error))
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    if not trial.succeeded:
        client.set_terminated(run_id, "FAILED")


def record_trial(experiment_name: str, sweep_id: str, trial: TrialResult) -> None:
    """Write one ended trial to its run (a Katib trial, which has no sweep step after it)."""
    client, uri = _client()
    try:
        exp_id = _experiment(client, uri, experiment_name)
        sweep_run = sweep_run_id(client, exp_id, sweep_id)
        _record_trial(client, _trial_run_id(client, exp_id, sweep_run, sweep_id, trial), sweep_id, trial)
    except tracking_errors() as exc:
        raise _wrapped(f"recording trial {trial.trial_id} of sweep {sweep_id}", uri, exc) from exc


def record_sweep(
    experiment_name: str,
    sweep_id: str,
    trials: Sequence[TrialResult],
    best: TrialResult | None,
    table: Sequence[Mapping[str, Any]],
    summary: str,
    model_name: str,
    alias: str,
) -> str | None:
    """Write the ended sweep to MLflow; register the best trial's checkpoint; return its model version.

    Idempotent (a retried step finds the same runs and reuses the model version). The sweep run
    ends FINISHED, or FAILED when no trial succeeded (`best` is None).
    """
    client, uri = _client()
    try:
        exp_id = _experiment(client, uri, experiment_name)
        sweep_run = sweep_run_id(client, exp_id, sweep_id)
        trial_runs = {t.trial_id: _trial_run_id(client, exp_id, sweep_run, sweep_id, t) for t in trials}
        for trial in trials:
            _record_trial(client, trial_runs[trial.trial_id], sweep_id, trial)
        columns = list(dict.fromkeys(key for row in table for key in row))
        client.log_table(
            sweep_run, data={c: [row.get(c) for row in table] for c in columns}, artifact_file=TABLE_ARTIFACT
        )
        client.log_text(sweep_run, summary, SUMMARY_ARTIFACT)
        version = None
        if best is not None:
            client.set_tag(sweep_run, TAG_BEST_TRIAL, best.trial_id)
            for name, value in eval_metrics(_finite(best.metrics)).items():
                client.log_metric(sweep_run, name, value)
            trial_run = trial_runs[best.trial_id]
            source_run = _train_run_id(client, exp_id, trial_run, best.pipeline_run_id) or trial_run
            # the train run names its best checkpoint's logged model: the version links to it
            model_id = client.get_run(source_run).data.tags.get(RUN_MODEL_TAG.format(role="best"))
            version = register_checkpoint(
                client, model_name, alias, best.checkpoint_uri, source_run, best.pipeline_run_id, model_id
            ).version
        client.set_terminated(sweep_run, "FINISHED" if best is not None else "FAILED")
    except tracking_errors() as exc:
        raise _wrapped(f"recording sweep {sweep_id}", uri, exc) from exc
    logger.info(
        "MLflow sweep run %s: %d trials recorded%s",
        sweep_run,
        len(trials),
        f"; best {best.trial_id} registered as {model_name} version {version} (@{alias})" if best else "",
    )
    return version
