"""What each KFP component does inside its pod: its arguments -> the component's overrides -> outputs.

The KFP components (pipeline/kfp_components.py) hand their arguments here by name. The pipeline
parameters among them are checked by the parameter table and set their Hydra keys from it
(`sam3_core.pipeline_parameters.hydra_overrides`); the others are the wiring between components
(dataset, checkpoint and run URIs, the pipeline run id). This runs the same way on a cluster and
under `sam3pipe run --local`.

In a sweep a component also gets its trial's item (`trial`, pipeline/sweep.py): the trial's
settings go on top of the pipeline parameters, its runs nest under the trial's MLflow run, and a
failure is recorded in the store instead of failing the component, so the other trials go on.

Output artifacts are pointers: the data stays in the object store, and each KFP artifact records
its URI in its metadata and in a small JSON file, so the KFP UI links every run to its data.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pipeline import distributed, sweep
from pipeline.dispatch import component_module
from pipeline.parameters import checked, pod_gpus
from sam3_core import pipeline_parameters as table
from sam3_core import storage
from sam3_core.errors import InputError, Sam3PipeError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# the exported video model in a training run's folder: `<run>/export/sam3_video.pt`
VIDEO_CHECKPOINT = "sam3_video.pt"
# the tracker stage (`tracker_steps`): its registry entry, beside the detector's `sam3-video`, and the metric
# of its best.pt (the tracker on the validation videos, each object prompted by its first-frame mask)
TRACKER_MODEL_NAME = "sam3-video-tracker"
TRACKER_BEST_METRIC = "val/vos_JF_mean"


class SweepFailedError(Sam3PipeError):
    """No trial of a sweep succeeded; the sweep table says why each failed."""


class PointerArtifact(Protocol):
    """The part of a KFP output artifact a component uses (kept free of kfp imports)."""

    path: str
    metadata: dict[str, Any]


class MetricsArtifact(Protocol):
    def log_metric(self, metric: str, value: float) -> None: ...


def store_root(store: str) -> str:
    """The store the components share: the parameter, else the pod's default (`storage.default_store`)."""
    return store or storage.default_store()


def set_tracking_env(pipeline_run_id: str, mlflow_experiment: str) -> dict[str, str]:
    """Group this component's MLflow run under the pipeline run; torchrun workers inherit the env."""
    env = {"SAM3PIPE_PIPELINE_RUN_ID": pipeline_run_id, "MLFLOW_EXPERIMENT_NAME": mlflow_experiment}
    os.environ.update(env)
    return env


def publish_pointer(artifact: PointerArtifact, values: dict[str, Any]) -> None:
    artifact.metadata.update(values)
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps(values, sort_keys=True), encoding="utf-8")


def wired(key: str, value: str, name: str) -> str:
    """An override of a key the pipeline wires itself (a URI or id passed between components)."""
    return f"{key}={table.hydra_literal(value, name)}"


@dataclass(frozen=True)
class Arguments:
    """A KFP component's arguments: the pipeline parameters, checked (with a sweep trial's settings
    on top, and the store resolved), the wiring, and the trial's item ({} outside a sweep)."""

    params: dict[str, Any]
    wiring: dict[str, Any]
    trial: dict[str, Any]

    @classmethod
    def of(cls, arguments: Mapping[str, Any]) -> Arguments:
        trial = dict(arguments.get("trial") or {})
        params = {name: value for name, value in arguments.items() if name in table.BY_NAME}
        params = checked(sweep.parameters(trial, params) if trial else params)
        if "store" in params:
            params["store"] = store_root(params["store"])
        wiring = {name: value for name, value in arguments.items() if name not in table.BY_NAME and name != "trial"}
        if trial:
            wiring.update(dataset_uri=trial["dataset_uri"], pipeline_run_id=trial["pipeline_run_id"])
        return cls(params, wiring, trial)

    def extra(self, component: str) -> list[str]:
        """The user's extra overrides of `component`, then a trial's own: its settings (train) and its MLflow runs."""
        out = list(self.params[f"{component}_overrides"])
        if self.trial:
            if component == "train":
                out += sweep.hydra_overrides(self.trial)
            out += trial_tracking(self.trial, self.trial["registered_model"])
        return out

    def run(self, component: str, work: Callable[[], T], failed: T, pointer: PointerArtifact | None = None) -> T:
        """`work()`; in a sweep, a failure is recorded for the trial and `failed` returned (and published)."""
        if not self.trial:
            return work()
        outcome = run_trial_component(self.trial, component, self.params["store"], work)
        if outcome is None:
            if pointer is not None:
                publish_pointer(pointer, {"uri": "", "trial_id": self.trial["trial_id"], "status": "failed"})
            return failed
        return outcome


def check_parameters(arguments: Mapping[str, Any]) -> int:
    """Check every parameter of this pipeline run (its first component); the GPUs the train pod requests."""
    pipeline = arguments["pipeline"]
    params = checked({parameter.name: arguments[parameter.name] for parameter in table.of_pipeline(pipeline)})
    logger.info("the %d parameters of this %s pipeline run are valid", len(params), pipeline)
    return pod_gpus(params["training_mode"], params["gpus"])


def plan_training(arguments: Mapping[str, Any]) -> int:
    """Check the training knobs; the GPUs the train pod requests (none when it only launches a job)."""
    params = checked(arguments)
    return pod_gpus(params["training_mode"], params["gpus"])


def plan_data_prep(arguments: Mapping[str, Any]) -> tuple[str, list[int]]:
    """Check the data source and split its videos into shards (the fan-out width); return plan and shard indices."""
    args = Arguments.of(arguments)
    overrides = [*table.hydra_overrides("data_prep", args.params), *args.extra("data_prep")]
    outputs = component_module("data-prep").plan(overrides, args.params["data_prep_shards"])
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


def run_name(pipeline_run_id: str) -> str:
    """One run folder per pipeline run, so a retried train component resumes it from last.pt."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", pipeline_run_id).strip("-")
    if not slug:
        raise InputError(table.SOURCE, "pipeline_run_id", "empty; cannot name the training run")
    return f"pipeline-{slug}"


def train(arguments: Mapping[str, Any]) -> tuple[str, str, str]:
    """Train in this pod (torchrun over its GPUs), or as a multi-node PyTorchJob or TrainJob.

    `launch` holds the launch settings of each job mode, by mode name. A sweep trial whose
    training fails returns ("", "", ""), so its predict and evaluate skip.
    """
    args = Arguments.of(arguments)
    model = args.wiring["model"]
    if args.trial:
        logger.info("sweep trial %s: training with %s", args.trial["trial_id"], sweep.settings(args.trial))
    return args.run("train", lambda: _train(args, model), ("", "", ""), model)


def _train(args: Arguments, model: PointerArtifact) -> tuple[str, str, str]:
    params, pipeline_run_id = args.params, args.wiring["pipeline_run_id"]
    overrides = [
        *table.hydra_overrides("train", params),
        wired("data.uri", args.wiring["dataset_uri"], "dataset_uri"),
        wired("output.run_name", run_name(pipeline_run_id), "pipeline_run_id"),
        *args.extra("train"),
    ]
    return _launch_training(args, overrides, model)


def _launch_training(
    args: Arguments, overrides: list[str], model: PointerArtifact, stage: str = ""
) -> tuple[str, str, str]:
    """Run the train component with `overrides` as `training_mode` says; publish and return its outputs.

    `stage` names a later training of the same pipeline run (its job gets its own name)."""
    params, pipeline_run_id = args.params, args.wiring["pipeline_run_id"]
    env = set_tracking_env(pipeline_run_id, params["mlflow_experiment"])
    mode, gpus = params["training_mode"], params["gpus"]
    if mode == "pod":
        outputs = distributed.run_in_pod("train", overrides, gpus)
    else:
        # the kubernetes client is needed in these modes only
        from pipeline import jobs, pytorchjob, trainjob

        kind = {"pytorchjob": pytorchjob, "trainjob": trainjob}[mode]
        settings = jobs.LaunchSettings(**args.wiring["launch"][mode])
        env["SAM3PIPE_IMAGE"] = settings.image
        outputs = jobs.launch_training(
            kind.KIND,
            kind.build_job,
            overrides,
            settings,
            pipeline_run_id,
            params["nodes"],
            gpus,
            params["store"],
            env,
            stage=stage,
        )
    publish_pointer(model, {"uri": outputs["best_checkpoint_uri"], **outputs})
    return outputs["run_uri"], outputs["best_checkpoint_uri"], outputs["last_checkpoint_uri"]


def train_tracker(arguments: Mapping[str, Any]) -> tuple[str, str, str]:
    """SAM3's tracker trained after the detector (`tracker_steps` > 0): the detector's best checkpoint, frozen,
    with the tracker of `base_checkpoint` (random without one); ("", "", "") when there is no tracker stage."""
    args = Arguments.of(arguments)
    model, steps = args.wiring["model"], args.params["tracker_steps"]
    if steps == 0:
        skipped(model, {}, "tracker_steps=0: no tracker stage")
        return "", "", ""
    params, pipeline_run_id = args.params, args.wiring["pipeline_run_id"]
    shared = {name: params[name] for name in ("model_preset", "batch_size", "store")}
    base = params["base_checkpoint"]
    tracker_start = [wired("tracker_train.tracker_uri", base, "base_checkpoint")] if base else []
    overrides = [
        *table.hydra_overrides("train", shared),
        "train.stage=tracker",
        f"train.best_metric={TRACKER_BEST_METRIC}",
        f"train.max_steps={steps}",
        wired("mlflow.registered_model_name", TRACKER_MODEL_NAME, "tracker_steps"),
        wired("model.uri", args.wiring["checkpoint_uri"], "checkpoint_uri"),
        *tracker_start,
        wired("data.uri", args.wiring["dataset_uri"], "dataset_uri"),
        wired("output.run_name", f"{run_name(pipeline_run_id)}-tracker", "pipeline_run_id"),
        *params["tracker_overrides"],
    ]
    return _launch_training(args, overrides, model, stage="tracker")


def role_overrides(role: str) -> list[str]:
    """A component's second run beside the fine-tuned model's (`role="base"`): its own MLflow run."""
    return [wired("mlflow.run_role", role, "role")] if role else []


def run_folder(run_uri: str, role: str, name: str) -> str:
    """Where a component writes `name` in the training run's folder: `<run>/<name>`, or `<run>/<role>/<name>`."""
    return storage.join(run_uri, role, name) if role else storage.join(run_uri, name)


def skipped(artifact: PointerArtifact, trial: Mapping[str, Any], why: str) -> None:
    """A component with nothing to do (no checkpoint, no predictions, no base model) says so and publishes nothing."""
    logger.info("%s; skipped", why)
    publish_pointer(artifact, {"uri": "", "status": "skipped", **({"trial_id": trial["trial_id"]} if trial else {})})


def predict(arguments: Mapping[str, Any]) -> str:
    """Predict the validation split with the trained checkpoint (or, `role="base"`, the base one) into the
    training run's folder.

    "" when there is no checkpoint (a sweep trial whose training failed, no base model) or a trial's prediction fails.
    """
    args = Arguments.of(arguments)
    predictions = args.wiring["predictions"]
    if not args.wiring["checkpoint_uri"]:
        why = f"sweep trial {args.trial['trial_id']}: training failed" if args.trial else "no base_checkpoint given"
        skipped(predictions, args.trial, f"{why}: no checkpoint to predict with")
        return ""
    return args.run("predict", lambda: _predict(args, predictions), "", predictions)


def _predict(args: Arguments, predictions: PointerArtifact) -> str:
    set_tracking_env(args.wiring["pipeline_run_id"], args.params["mlflow_experiment"])
    role = args.wiring.get("role", "")
    overrides = [
        # the architecture the checkpoint was trained with
        *table.hydra_overrides("predict", args.params),
        wired("data.uri", args.wiring["dataset_uri"], "dataset_uri"),
        wired("model.uri", args.wiring["checkpoint_uri"], "checkpoint_uri"),
        wired("output.uri", run_folder(args.wiring["run_uri"], role, "predictions"), "run_uri"),
        *role_overrides(role),
        *args.extra("predict"),
    ]
    outputs = distributed.run_in_pod("predict", overrides, args.params["predict_gpus"])
    publish_pointer(predictions, {"uri": outputs["predictions_uri"]})
    return outputs["predictions_uri"]


def evaluate(arguments: Mapping[str, Any]) -> tuple[str, dict[str, float]]:
    """Score the predictions against the dataset's validation ground truth (video and frame level).

    A sweep trial's outcome is recorded for the sweep's last component; ("", {}) when it has none.
    """
    args = Arguments.of(arguments)
    if not args.wiring["predictions_uri"]:
        why = f"sweep trial {args.trial['trial_id']}: an earlier component failed" if args.trial else "no base model"
        logger.info("%s: no predictions to evaluate; skipped", why)
        return "", {}
    metrics_uri, values = args.run("evaluate", lambda: _evaluate(args), ("", {}))
    if args.trial and metrics_uri:
        record = sweep.succeeded(values, args.wiring["checkpoint_uri"], args.wiring["run_uri"], metrics_uri)
        sweep.write_record(args.params["store"], args.trial, record)
    return metrics_uri, values


def _evaluate(args: Arguments) -> tuple[str, dict[str, float]]:
    set_tracking_env(args.wiring["pipeline_run_id"], args.params["mlflow_experiment"])
    dataset_uri, run_uri, role = args.wiring["dataset_uri"], args.wiring["run_uri"], args.wiring.get("role", "")
    overrides = [
        wired("gt", storage.join(dataset_uri, "val.json"), "dataset_uri"),
        wired("frames_gt", storage.join(dataset_uri, "val_frames_coco.json"), "dataset_uri"),
        wired("predictions", args.wiring["predictions_uri"], "predictions_uri"),
        wired("output", storage.join(run_folder(run_uri, role, "evaluation"), "metrics.json"), "run_uri"),
        *role_overrides(role),
        *args.extra("evaluate"),
    ]
    outputs = distributed.run_in_pod("evaluate", overrides, 1)
    values = {name: float(value) for name, value in outputs["metrics"].items()}
    metrics: MetricsArtifact = args.wiring["metrics"]
    for name, value in values.items():
        if math.isfinite(value):  # sam3's suite gives NaN by definition (e.g. ilmcc_75 with no match); KFP's JSON can't
            metrics.log_metric(name, value)
    logger.info("metrics at %s", outputs["metrics_uri"])
    return outputs["metrics_uri"], values


def export(arguments: Mapping[str, Any]) -> str:
    """SAM3's video checkpoint (the fine-tuned detector + the tracker of the tracker stage, else the base's) in the
    run's folder, registered as the video model; "" without `base_checkpoint`."""
    args = Arguments.of(arguments)
    video_model, base = args.wiring["video_model"], args.params["base_checkpoint"]
    if not base:
        skipped(video_model, {}, "no base_checkpoint given: no tracker to export the fine-tuned detector with")
        return ""
    set_tracking_env(args.wiring["pipeline_run_id"], args.params["mlflow_experiment"])
    overrides = [
        # the preset the detector was trained with: LoRA adapters are merged on it
        f"model={table.hydra_literal(args.params['model_preset'], 'model_preset')}",
        # the tracker stage's checkpoint holds the detector and the trained tracker; else the detector's alone
        wired("model.uri", args.wiring["tracker_checkpoint_uri"] or args.wiring["checkpoint_uri"], "checkpoint_uri"),
        wired("base.uri", base, "base_checkpoint"),
        wired("output.uri", storage.join(args.wiring["run_uri"], "export", VIDEO_CHECKPOINT), "run_uri"),
    ]
    outputs = distributed.run_in_pod("export", overrides, 1)
    publish_pointer(video_model, {"uri": outputs["video_model_uri"], "sha256": outputs["video_model_sha256"]})
    return outputs["video_model_uri"]


def compare(arguments: Mapping[str, Any]) -> str:
    """The base against the fine-tuned model's metrics, as a table in the run's folder and on the KFP UI;
    "" without the base model's metrics."""
    args = Arguments.of(arguments)
    comparison: PointerArtifact = args.wiring["comparison"]
    base_metrics, metrics = args.wiring["base_metrics_uri"], args.wiring["metrics_uri"]
    if not base_metrics or not metrics:
        logger.info("no base model's metrics to compare with; skipped")
        Path(comparison.path).parent.mkdir(parents=True, exist_ok=True)
        Path(comparison.path).write_text("No base model was evaluated (base_checkpoint was empty).", encoding="utf-8")
        return ""
    set_tracking_env(args.wiring["pipeline_run_id"], args.params["mlflow_experiment"])
    output = storage.join(args.wiring["run_uri"], "comparison")
    overrides = [
        wired("base", base_metrics, "base_metrics_uri"),
        wired("fine_tuned", metrics, "metrics_uri"),
        wired("output", output, "run_uri"),
        wired("dataset", args.wiring["dataset_uri"], "dataset_uri"),
    ]
    comparison_uri = distributed.run_in_pod("compare", overrides, 1)["comparison_uri"]
    from sam3_core.evaluate.comparison import COMPARISON_MD  # numpy: imported in the pod only

    Path(comparison.path).parent.mkdir(parents=True, exist_ok=True)
    Path(comparison.path).write_text(storage.read_text(storage.join(output, COMPARISON_MD)), encoding="utf-8")
    return comparison_uri


# ---------------------------------------------------------------------- sweeps (pipeline/sweep.py)


def plan_sweep(arguments: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Check the spec, record the plan in the store, open the sweep's MLflow run.

    Returns the trials (the ParallelFor's items); a bad spec fails here, before any trial runs.
    """
    from sam3_core.mlflow_records import sweeps  # mlflow: imported by the components that track only

    args = Arguments.of(arguments)
    params, sweep_id, dataset_uri = args.params, args.wiring["sweep_id"], args.wiring["dataset_uri"]
    sets = sweep.expand(params["sweep_trials"], params["sweep_grid"])
    metric = sweep.check_objective(params["sweep_metric"], params["sweep_mode"])
    trials = [
        {**trial, "registered_model": params["registered_model"]}
        for trial in sweep.plan_trials(sets, dataset_uri, sweep_id)
    ]
    storage.write_json(storage.join(sweep.sweep_root(params["store"], sweep_id), "trials.json"), trials)
    recorded = {
        "sweep.metric": metric,
        "sweep.mode": params["sweep_mode"],
        "sweep.trials": len(trials),
        "sweep.parallelism": args.wiring["parallelism"],
        "sweep.dataset_uri": dataset_uri,
    }
    spec = {"sweep_trials": params["sweep_trials"], "sweep_grid": params["sweep_grid"]}
    sweeps.open_sweep(params["mlflow_experiment"], sweep_id, recorded, spec)
    for trial in trials:
        logger.info("sweep %s: trial %s", sweep_id, trial["run_name"])
    return trials


def trial_tracking(trial: Mapping[str, Any], registered_model: str) -> list[str]:
    """Overrides that put a trial's component runs under its own parent run, nested in the sweep's run.

    A trial registers its checkpoint under the alias `sweep-trial`: `candidate` is the best trial's,
    set by the sweep's last component.
    """
    return [
        wired("mlflow.sweep_id", trial["sweep_id"], "sweep_id"),
        wired("mlflow.pipeline_run_name", trial["run_name"], "sweep"),
        wired("mlflow.registered_model_name", registered_model, "registered_model"),
        "mlflow.model_alias=sweep-trial",
    ]


def run_trial_component(trial: Mapping[str, Any], component: str, store: str, work: Callable[[], T]) -> T | None:
    """Run one component of a trial; if it fails, record why and return None so the sweep goes on.

    Any Exception is caught on purpose: one trial's bad settings, divergence or crash must not end
    the other trials. Not caught, so that KFP retries the component: a terminated pod (SIGTERM, OOM
    kill) and errors marked `retry_component` (a launcher that lost the Kubernetes API and left its job
    running for the retried component to adopt).
    """
    try:
        return work()
    except Exception as exc:  # see the docstring
        if getattr(exc, "retry_component", False):
            raise
        logger.exception("sweep trial %s: %s failed; the sweep goes on without it", trial["trial_id"], component)
        sweep.write_record(store_root(store), trial, sweep.failed(component, exc))
        return None


def select_best(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Read every trial's outcome, write the sweep table, register the best trial; fail only if none succeeded."""
    from sam3_core.mlflow_records import sweeps
    from sam3_core.mlflow_records.settings import MlflowConfig

    args = Arguments.of(arguments)
    params, sweep_id, trials = args.params, args.wiring["sweep_id"], args.wiring["trials"]
    table_artifact: PointerArtifact = args.wiring["table"]
    metric = sweep.check_objective(params["sweep_metric"], params["sweep_mode"])
    if not trials:
        raise SweepFailedError(f"sweep {sweep_id}: no trials ran; the plan sweep component failed (see its log)")
    root = sweep.sweep_root(params["store"], sweep_id)
    results = sweep.read_results(params["store"], trials)
    try:
        best = sweep.best_trial(results, metric, params["sweep_mode"])
        wrong_metric = None
    except InputError as exc:  # trials succeeded but none reports the metric: keep their table, then fail
        best, wrong_metric = None, exc
    rows = sweep.table(results, metric, best)
    summary = sweep.markdown(rows, metric, params["sweep_mode"])
    table_uri, summary_uri = storage.join(root, "sweep_table.json"), storage.join(root, "sweep_table.md")
    storage.write_json(table_uri, rows)
    storage.write_text(summary_uri, summary)
    Path(table_artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(table_artifact.path).write_text(summary, encoding="utf-8")
    table_artifact.metadata.update({"uri": table_uri})
    version = sweeps.record_sweep(
        params["mlflow_experiment"],
        sweep_id,
        results,
        best,
        rows,
        summary,
        params["registered_model"],
        MlflowConfig().model_alias,
    )
    if wrong_metric is not None:
        raise wrong_metric
    if best is None:
        errors = "; ".join(f"{r.trial_id}: {r.error}" for r in results)
        raise SweepFailedError(f"sweep {sweep_id}: all {len(results)} trials failed ({errors}); table at {table_uri}")
    metrics: MetricsArtifact = args.wiring["metrics"]
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
