"""What each KFP step does inside its pod: pipeline parameters -> component overrides -> outputs.

The KFP component functions (pipeline/kfp_components.py) only forward their arguments here, so
the mapping from pipeline parameters to each component's Hydra overrides lives in one readable
place and runs the same way on a cluster and under `sam3pipe run --local`. Output artifacts are
pointers: the data stays in the object store, and each KFP artifact records its URI in its
metadata and in a small JSON file, so the KFP UI links every run to its data.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pipeline import distributed
from pipeline.dispatch import component_module
from sam3_core import storage
from sam3_core.errors import InputError, Sam3PipeError

logger = logging.getLogger(__name__)

TRAINING_MODES = ("pod", "pytorchjob", "trainjob")
DEFAULT_STORE = ".sam3pipe/store"
# training defaults of every pipeline (run, sweep trial, Katib trial): what `make demo` trains,
# measured to reach bbox_AP50 and segm_AP50 >= 0.5 on the default synthetic data (docs/training.md)
DEFAULT_MAX_STEPS = 400
DEFAULT_LR = 1e-3
# the tiny model's masks plateau by step ~250 while its boxes still improve: chosen by val/segm_AP,
# one demo kept step 250 (bbox_AP50 0.40; step 400 of that run: 0.62). A train_overrides entry wins.
DEFAULT_BEST_METRIC = "val/bbox_AP"


class SweepFailedError(Sam3PipeError):
    """No trial of a sweep succeeded; the sweep table says why each failed."""


class PointerArtifact(Protocol):
    """The part of a KFP output artifact a step uses (kept free of kfp imports)."""

    path: str
    metadata: dict[str, Any]


class MetricsArtifact(Protocol):
    def log_metric(self, metric: str, value: float) -> None: ...


def hydra_value(value: str, parameter: str) -> str:
    """Quote a value for Hydra's override grammar (URIs contain ':' and '/'; IDs may contain ',')."""
    if "'" in value or "\\" in value:
        raise InputError("pipeline parameters", parameter, f"quotes and backslashes are not supported: {value!r}")
    return f"'{value}'"


def hydra_list(values: list[str], parameter: str) -> str:
    return "[" + ",".join(hydra_value(v, parameter) for v in values) + "]"


def store_root(store: str) -> str:
    """The store the steps share: the parameter, else SAM3PIPE_STORE, else the local default."""
    return store or os.environ.get("SAM3PIPE_STORE") or DEFAULT_STORE


def set_tracking_env(pipeline_run_id: str, mlflow_experiment: str) -> dict[str, str]:
    """Group this step's MLflow run under the pipeline run; torchrun workers inherit the env."""
    env = {"SAM3PIPE_PIPELINE_RUN_ID": pipeline_run_id, "MLFLOW_EXPERIMENT_NAME": mlflow_experiment}
    os.environ.update(env)
    return env


def publish_pointer(artifact: PointerArtifact, values: dict[str, Any]) -> None:
    artifact.metadata.update(values)
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps(values, sort_keys=True), encoding="utf-8")


def plan_data_prep(
    source: str, annotations: str, frames_root: str, store: str, extra: list[str], shards: int
) -> tuple[str, list[int]]:
    """Check the data source and split its videos into `shards` (the fan-out width); return plan and shard indices."""
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise InputError("pipeline parameters", "data_prep_shards", f"must be an integer >= 1, got {shards!r}")
    overrides = [f"source={hydra_value(source, 'source')}"]
    if annotations:
        overrides.append(f"annotations={hydra_value(annotations, 'annotations')}")
    if frames_root:
        overrides.append(f"frames_root={hydra_value(frames_root, 'frames_root')}")
    overrides.append(f"store={hydra_value(store_root(store), 'store')}")
    outputs = component_module("data-prep").plan([*overrides, *extra], shards)
    return outputs["plan_uri"], outputs["shards"]


def prepare_data_shard(plan_uri: str, index: int) -> str:
    """Stage one shard of the plan in this pod; its part goes to the store next to the plan."""
    return component_module("data-prep").shard(plan_uri, index)["part_uri"]


def merge_data_prep(plan_uri: str, parts: list[str], dataset: PointerArtifact) -> tuple[str, str]:
    """Check every shard's part and publish the dataset, manifest last."""
    logger.info("merging %d shard part(s) of %s", len(parts), plan_uri)
    outputs = component_module("data-prep").merge(plan_uri)
    publish_pointer(dataset, {"uri": outputs["dataset_uri"], "dataset_id": outputs["dataset_id"]})
    return outputs["dataset_uri"], outputs["dataset_id"]


def plan_training(training_mode: str, gpus: int, nodes: int) -> int:
    """Check the training knobs before any work starts; return the GPUs the train pod itself needs.

    In pytorchjob and trainjob modes the train pod only launches and watches the job, so it asks for no GPU.
    """
    if training_mode not in TRAINING_MODES:
        raise InputError(
            "pipeline parameters", "training_mode", f"must be one of {TRAINING_MODES}, got {training_mode!r}"
        )
    if gpus < 0:
        raise InputError("pipeline parameters", "gpus", f"must be >= 0, got {gpus}")
    if nodes < 1:
        raise InputError("pipeline parameters", "nodes", f"must be >= 1, got {nodes}")
    if training_mode == "pod" and nodes != 1:
        raise InputError(
            "pipeline parameters",
            "nodes",
            "training_mode=pod runs on one node; use training_mode=pytorchjob or trainjob",
        )
    return gpus if training_mode == "pod" else 0


def run_name(pipeline_run_id: str) -> str:
    """One run folder per pipeline run, so a retried train step resumes it from last.pt."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", pipeline_run_id).strip("-")
    if not slug:
        raise InputError("pipeline parameters", "pipeline_run_id", "empty; cannot name the training run")
    return f"pipeline-{slug}"


def train(
    dataset_uri: str,
    model_preset: str,
    checkpoint: str,
    max_steps: int,
    lr: float,
    batch_size: int,
    frames_per_clip: int,
    freeze_prefixes: list[str],
    store: str,
    training_mode: str,
    gpus: int,
    nodes: int,
    pipeline_run_id: str,
    mlflow_experiment: str,
    extra: list[str],
    launch: dict[str, Any],
    model: PointerArtifact,
) -> tuple[str, str, str]:
    """Train in this pod (torchrun over its GPUs), or as a multi-node PyTorchJob or TrainJob.

    `launch` holds the launch settings of each job mode, by mode name.
    """
    plan_training(training_mode, gpus, nodes)
    overrides = [
        f"data.uri={hydra_value(dataset_uri, 'dataset_uri')}",
        f"model={model_preset}",
        f"train.max_steps={max_steps}",
        f"optim.lr={lr}",
        f"data.batch_size={batch_size}",
        f"data.clips.frames_per_clip={frames_per_clip}",
        f"model.freeze={hydra_list(freeze_prefixes, 'freeze_prefixes')}",
        f"output.store={hydra_value(store_root(store), 'store')}",
        f"output.run_name={hydra_value(run_name(pipeline_run_id), 'pipeline_run_id')}",
        f"train.best_metric={DEFAULT_BEST_METRIC}",
    ]
    if checkpoint:
        overrides.append(f"model.uri={hydra_value(checkpoint, 'checkpoint')}")
    overrides.extend(extra)
    env = set_tracking_env(pipeline_run_id, mlflow_experiment)
    if training_mode == "pod":
        outputs = distributed.run_in_pod("train", overrides, gpus)
    else:
        # the kubernetes client is needed in these modes only
        from pipeline import jobs, pytorchjob, trainjob

        kind = {"pytorchjob": pytorchjob, "trainjob": trainjob}[training_mode]
        settings = jobs.LaunchSettings(**launch[training_mode])
        env["SAM3PIPE_IMAGE"] = settings.image
        outputs = jobs.launch_training(
            kind.KIND, kind.build_job, overrides, settings, pipeline_run_id, nodes, gpus, store_root(store), env
        )
    publish_pointer(model, {"uri": outputs["best_checkpoint_uri"], **outputs})
    return outputs["run_uri"], outputs["best_checkpoint_uri"], outputs["last_checkpoint_uri"]


def train_with_params(
    params: dict[str, Any],
    dataset_uri: str,
    store: str,
    training_mode: str,
    gpus: int,
    nodes: int,
    pipeline_run_id: str,
    mlflow_experiment: str,
    overrides: list[str],
    launch: dict[str, Any],
    model: PointerArtifact,
) -> tuple[str, str, str]:
    """`train` with a trial's training knobs taken from its pipeline parameters (`sweep.parameters`)."""
    return train(
        dataset_uri,
        params["model_preset"],
        params["checkpoint"],
        params["max_steps"],
        params["lr"],
        params["batch_size"],
        params["frames_per_clip"],
        params["freeze_prefixes"],
        store,
        training_mode,
        gpus,
        nodes,
        pipeline_run_id,
        mlflow_experiment,
        overrides,
        launch,
        model,
    )


def predict(
    dataset_uri: str,
    model_preset: str,
    checkpoint_uri: str,
    run_uri: str,
    gpus: int,
    pipeline_run_id: str,
    mlflow_experiment: str,
    extra: list[str],
    predictions: PointerArtifact,
) -> str:
    """Predict the validation split with the trained checkpoint, into the training run's folder."""
    set_tracking_env(pipeline_run_id, mlflow_experiment)
    overrides = [
        f"data.uri={hydra_value(dataset_uri, 'dataset_uri')}",
        # the architecture the checkpoint was trained with
        f"model={model_preset}",
        f"model.uri={hydra_value(checkpoint_uri, 'checkpoint_uri')}",
        f"output.uri={hydra_value(storage.join(run_uri, 'predictions'), 'run_uri')}",
    ]
    outputs = distributed.run_in_pod("predict", [*overrides, *extra], gpus)
    publish_pointer(predictions, {"uri": outputs["predictions_uri"]})
    return outputs["predictions_uri"]


def evaluate(
    dataset_uri: str,
    predictions_uri: str,
    run_uri: str,
    pipeline_run_id: str,
    mlflow_experiment: str,
    extra: list[str],
    metrics: MetricsArtifact,
) -> tuple[str, dict[str, float]]:
    """Score the predictions against the dataset's validation ground truth (video and frame level)."""
    set_tracking_env(pipeline_run_id, mlflow_experiment)
    overrides = [
        f"gt={hydra_value(storage.join(dataset_uri, 'val.json'), 'dataset_uri')}",
        f"frames_gt={hydra_value(storage.join(dataset_uri, 'val_frames_coco.json'), 'dataset_uri')}",
        f"predictions={hydra_value(predictions_uri, 'predictions_uri')}",
        f"output={hydra_value(storage.join(run_uri, 'evaluation', 'metrics.json'), 'run_uri')}",
    ]
    outputs = distributed.run_in_pod("evaluate", [*overrides, *extra], 1)
    values = {name: float(value) for name, value in outputs["metrics"].items()}
    for name, value in values.items():
        if math.isfinite(value):  # sam3's suite gives NaN by definition (e.g. ilmcc_75 with no match); KFP's JSON can't
            metrics.log_metric(name, value)
    logger.info("metrics at %s", outputs["metrics_uri"])
    return outputs["metrics_uri"], values


# ---------------------------------------------------------------------- sweeps (pipeline/sweep.py)


def plan_sweep(
    sweep_trials: list[dict[str, Any]],
    sweep_grid: dict[str, Any],
    dataset_uri: str,
    sweep_id: str,
    sweep_metric: str,
    sweep_mode: str,
    parallelism: int,
    training_mode: str,
    gpus: int,
    nodes: int,
    store: str,
    mlflow_experiment: str,
) -> list[dict[str, Any]]:
    """Check the spec and the training knobs, record the plan in the store, open the sweep's MLflow run.

    Returns the trials (the ParallelFor's items); a bad spec or knob fails here, before any trial runs.
    """
    from pipeline import sweep
    from sam3_core.mlflow_records import (
        sweeps,  # mlflow: imported by the steps that track only
    )

    sets = sweep.expand(sweep_trials, sweep_grid)
    metric = sweep.check_objective(sweep_metric, sweep_mode)
    plan_training(training_mode, gpus, nodes)
    trials = sweep.plan_trials(sets, dataset_uri, sweep_id)
    storage.write_json(storage.join(sweep.sweep_root(store_root(store), sweep_id), "trials.json"), trials)
    params = {
        "sweep.metric": metric,
        "sweep.mode": sweep_mode,
        "sweep.trials": len(trials),
        "sweep.parallelism": parallelism,
        "sweep.dataset_uri": dataset_uri,
    }
    sweeps.open_sweep(mlflow_experiment, sweep_id, params, {"sweep_trials": sweep_trials, "sweep_grid": sweep_grid})
    for trial in trials:
        logger.info("sweep %s: trial %s", sweep_id, trial["run_name"])
    return trials


def trial_tracking(trial: dict[str, Any], registered_model: str) -> list[str]:
    """Overrides that put a trial's component runs under its own parent run, nested in the sweep's run.

    A trial registers its checkpoint under the alias `sweep-trial`: `candidate` is the best trial's,
    set by the sweep's last step.
    """
    return [
        f"mlflow.sweep_id={hydra_value(trial['sweep_id'], 'sweep_id')}",
        f"mlflow.pipeline_run_name={hydra_value(trial['run_name'], 'sweep')}",
        f"mlflow.registered_model_name={hydra_value(registered_model, 'registered_model')}",
        "mlflow.model_alias=sweep-trial",
    ]


T = TypeVar("T")


def run_trial_step(trial: dict[str, Any], step: str, store: str, work: Callable[[], T]) -> T | None:
    """Run one step of a trial; if it fails, record why and return None so the sweep goes on.

    Any Exception is caught on purpose: one trial's bad settings, divergence or crash must not end
    the other trials. Not caught, so that KFP retries the step: a terminated pod (SIGTERM, OOM kill)
    and errors marked `retry_step` (a launcher that lost the Kubernetes API and left its job running
    for the retried step to adopt).
    """
    from pipeline import sweep

    try:
        return work()
    except Exception as exc:  # see the docstring
        if getattr(exc, "retry_step", False):
            raise
        logger.exception("sweep trial %s: %s failed; the sweep goes on without it", trial["trial_id"], step)
        sweep.write_record(store_root(store), trial, sweep.failed(step, exc))
        return None


def train_trial(
    trial: dict[str, Any],
    base: dict[str, Any],
    store: str,
    training_mode: str,
    gpus: int,
    nodes: int,
    mlflow_experiment: str,
    registered_model: str,
    extra: list[str],
    launch: dict[str, Any],
    model: PointerArtifact,
) -> tuple[str, str, str]:
    """Train one trial: the base pipeline parameters with the trial's settings on top.

    Returns ("", "", "") when training failed (its record says why), so predict and evaluate skip.
    """
    from pipeline import sweep

    params = sweep.parameters(trial, base)
    overrides = [*extra, *sweep.hydra_overrides(trial, hydra_value), *trial_tracking(trial, registered_model)]
    logger.info("sweep trial %s: training with %s", trial["trial_id"], params)

    def work() -> tuple[str, str, str]:
        return train_with_params(
            params,
            trial["dataset_uri"],
            store,
            training_mode,
            gpus,
            nodes,
            trial["pipeline_run_id"],
            mlflow_experiment,
            overrides,
            launch,
            model,
        )

    outputs = run_trial_step(trial, "train", store, work)
    if outputs is None:
        publish_pointer(model, {"uri": "", "trial_id": trial["trial_id"], "status": "failed"})
        return "", "", ""
    return outputs


def predict_trial(
    trial: dict[str, Any],
    model_preset: str,
    checkpoint_uri: str,
    run_uri: str,
    gpus: int,
    store: str,
    mlflow_experiment: str,
    registered_model: str,
    extra: list[str],
    predictions: PointerArtifact,
) -> str:
    """Predict with one trial's checkpoint; "" when its training failed or prediction fails."""
    from pipeline import sweep

    if not checkpoint_uri:
        logger.info("sweep trial %s: no checkpoint (training failed); prediction skipped", trial["trial_id"])
        publish_pointer(predictions, {"uri": "", "trial_id": trial["trial_id"], "status": "skipped"})
        return ""
    preset = sweep.settings(trial).get("model_preset", model_preset)
    overrides = [*extra, *trial_tracking(trial, registered_model)]

    def work() -> str:
        return predict(
            trial["dataset_uri"],
            preset,
            checkpoint_uri,
            run_uri,
            gpus,
            trial["pipeline_run_id"],
            mlflow_experiment,
            overrides,
            predictions,
        )

    uri = run_trial_step(trial, "predict", store, work)
    if uri is None:
        publish_pointer(predictions, {"uri": "", "trial_id": trial["trial_id"], "status": "failed"})
    return uri or ""


def evaluate_trial(
    trial: dict[str, Any],
    predictions_uri: str,
    run_uri: str,
    checkpoint_uri: str,
    store: str,
    mlflow_experiment: str,
    registered_model: str,
    extra: list[str],
    metrics: MetricsArtifact,
) -> tuple[str, dict[str, float]]:
    """Evaluate one trial and record its outcome for the sweep's last step; ("", {}) when it has none."""
    from pipeline import sweep

    if not predictions_uri:
        logger.info("sweep trial %s: no predictions (an earlier step failed); evaluation skipped", trial["trial_id"])
        return "", {}
    overrides = [*extra, *trial_tracking(trial, registered_model)]

    def work() -> tuple[str, dict[str, float]]:
        return evaluate(
            trial["dataset_uri"],
            predictions_uri,
            run_uri,
            trial["pipeline_run_id"],
            mlflow_experiment,
            overrides,
            metrics,
        )

    outputs = run_trial_step(trial, "evaluate", store, work)
    if outputs is None:
        return "", {}
    metrics_uri, values = outputs
    sweep.write_record(store_root(store), trial, sweep.succeeded(values, checkpoint_uri, run_uri, metrics_uri))
    return metrics_uri, values


def select_best(
    trials: list[dict[str, Any]],
    sweep_id: str,
    sweep_metric: str,
    sweep_mode: str,
    store: str,
    mlflow_experiment: str,
    registered_model: str,
    table: PointerArtifact,
    metrics: MetricsArtifact,
) -> dict[str, Any]:
    """Read every trial's outcome, write the sweep table, register the best trial; fail only if none succeeded."""
    from pipeline import sweep
    from sam3_core.mlflow_records import sweeps
    from sam3_core.mlflow_records.settings import MlflowConfig

    metric = sweep.check_objective(sweep_metric, sweep_mode)
    if not trials:
        raise SweepFailedError(f"sweep {sweep_id}: no trials ran; the plan sweep step failed (see its log)")
    root = sweep.sweep_root(store_root(store), sweep_id)
    results = sweep.read_results(store_root(store), trials)
    try:
        best = sweep.best_trial(results, metric, sweep_mode)
        wrong_metric = None
    except InputError as exc:  # trials succeeded but none reports the metric: keep their table, then fail
        best, wrong_metric = None, exc
    rows = sweep.table(results, metric, best)
    summary = sweep.markdown(rows, metric, sweep_mode)
    table_uri, summary_uri = storage.join(root, "sweep_table.json"), storage.join(root, "sweep_table.md")
    storage.write_json(table_uri, rows)
    storage.write_text(summary_uri, summary)
    Path(table.path).parent.mkdir(parents=True, exist_ok=True)
    Path(table.path).write_text(summary, encoding="utf-8")
    table.metadata.update({"uri": table_uri})
    version = sweeps.record_sweep(
        mlflow_experiment, sweep_id, results, best, rows, summary, registered_model, MlflowConfig().model_alias
    )
    if wrong_metric is not None:
        raise wrong_metric
    if best is None:
        errors = "; ".join(f"{r.trial_id}: {r.error}" for r in results)
        raise SweepFailedError(f"sweep {sweep_id}: all {len(results)} trials failed ({errors}); table at {table_uri}")
    for name, value in best.metrics.items():
        metrics.log_metric(name, value)
    outcome = {
        "best_trial": best.trial_id,
        "best_run_name": best.run_name,
        "metric": metric,
        "value": best.metrics[metric],
        "checkpoint_uri": best.checkpoint_uri,
        "model_version": str(version or ""),
        "table_uri": table_uri,
        "summary_uri": summary_uri,
        "outcome_uri": storage.join(root, "best.json"),
        "succeeded": sum(r.succeeded for r in results),
        "trials": len(results),
    }
    storage.write_json(outcome["outcome_uri"], outcome)
    logger.info("sweep %s: best trial %s (%s=%.4f)", sweep_id, best.run_name, metric, best.metrics[metric])
    return outcome
