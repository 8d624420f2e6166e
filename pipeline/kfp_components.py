"""The pipeline's KFP components: lightweight Python components running the project's image.

Each function body only imports the project (already installed in the image, so nothing is
pip-installed at run time) and forwards to `pipeline.steps`. KFP copies these function bodies
into the compiled pipeline, so they must stay self-contained: imports inside the body.
The image is a compile-time setting, hence `build_components(settings)`. (No postponed
annotations here: KFP reads these functions' annotations as types.)
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Markdown, Metrics, Model, Output
from kfp.dsl.python_component import PythonComponent

from pipeline.settings import PipelineSettings


def data_prep_plan(
    source: str,
    annotations: str,
    frames_root: str,
    store: str,
    overrides: list,
    shards: int,
) -> NamedTuple("DataPrepPlan", [("plan_uri", str), ("shards", list)]):
    """Check the source data and split its videos into shards for the data-prep pods."""
    from pipeline import steps

    return steps.plan_data_prep(source, annotations, frames_root, store, overrides, shards)


def data_prep_shard(plan_uri: str, index: int) -> NamedTuple("DataPrepShard", [("part_uri", str)]):
    """Stage one shard of videos (frames decoded, resized, masks resampled) and write its part to the store."""
    from pipeline import steps

    return (steps.prepare_data_shard(plan_uri, index),)


def data_prep_merge(
    plan_uri: str,
    parts: list,
    dataset: Output[Dataset],
) -> NamedTuple("DataPrepOutputs", [("dataset_uri", str), ("dataset_id", str)]):
    """Check every shard's part and publish the content-addressed dataset, manifest last."""
    from pipeline import steps

    return steps.merge_data_prep(plan_uri, parts, dataset)


def plan_training(training_mode: str, gpus: int, nodes: int) -> NamedTuple("TrainingPlan", [("pod_gpus", int)]):
    """Check the training knobs up front; the GPUs the train pod requests (none when it only launches a job)."""
    from pipeline import steps

    return (steps.plan_training(training_mode, gpus, nodes),)


def train(
    dataset_uri: str,
    model_preset: str,
    checkpoint: str,
    max_steps: int,
    lr: float,
    batch_size: int,
    frames_per_clip: int,
    freeze_prefixes: list,
    store: str,
    training_mode: str,
    gpus: int,
    nodes: int,
    pipeline_run_id: str,
    mlflow_experiment: str,
    overrides: list,
    launch: dict,
    model: Output[Model],
) -> NamedTuple("TrainOutputs", [("run_uri", str), ("best_checkpoint_uri", str), ("last_checkpoint_uri", str)]):
    """Fine-tune SAM3 with torchrun in this pod, or as a multi-node PyTorchJob."""
    from pipeline import steps

    return steps.train(
        dataset_uri,
        model_preset,
        checkpoint,
        max_steps,
        lr,
        batch_size,
        frames_per_clip,
        freeze_prefixes,
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
    overrides: list,
    predictions: Output[Artifact],
) -> NamedTuple("PredictOutputs", [("predictions_uri", str)]):
    """Dump COCO frame predictions and YTVIS masklets for the validation videos."""
    from pipeline import steps

    uri = steps.predict(
        dataset_uri,
        model_preset,
        checkpoint_uri,
        run_uri,
        gpus,
        pipeline_run_id,
        mlflow_experiment,
        overrides,
        predictions,
    )
    return (uri,)


def evaluate(
    dataset_uri: str,
    predictions_uri: str,
    run_uri: str,
    pipeline_run_id: str,
    mlflow_experiment: str,
    overrides: list,
    metrics: Output[Metrics],
) -> NamedTuple("EvaluateOutputs", [("metrics_uri", str), ("metric_values", dict)]):
    """Score the predictions (COCO frame metrics and video mAP) and log them as KFP metrics."""
    from pipeline import steps

    return steps.evaluate(dataset_uri, predictions_uri, run_uri, pipeline_run_id, mlflow_experiment, overrides, metrics)


def plan_sweep(
    sweep_trials: list,
    sweep_grid: dict,
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
) -> list:
    """Expand the sweep spec into trials (the ParallelFor's items) and open the sweep's MLflow run."""
    from pipeline import steps

    return steps.plan_sweep(
        sweep_trials,
        sweep_grid,
        dataset_uri,
        sweep_id,
        sweep_metric,
        sweep_mode,
        parallelism,
        training_mode,
        gpus,
        nodes,
        store,
        mlflow_experiment,
    )


def train_trial(
    trial: dict,
    model_preset: str,
    checkpoint: str,
    max_steps: int,
    lr: float,
    batch_size: int,
    frames_per_clip: int,
    freeze_prefixes: list,
    store: str,
    training_mode: str,
    gpus: int,
    nodes: int,
    mlflow_experiment: str,
    registered_model: str,
    overrides: list,
    launch: dict,
    model: Output[Model],
) -> NamedTuple("TrialTrainOutputs", [("run_uri", str), ("best_checkpoint_uri", str), ("last_checkpoint_uri", str)]):
    """Train one trial of the sweep (the pipeline parameters with the trial's settings on top)."""
    from pipeline import steps

    base = {
        "model_preset": model_preset,
        "checkpoint": checkpoint,
        "max_steps": max_steps,
        "lr": lr,
        "batch_size": batch_size,
        "frames_per_clip": frames_per_clip,
        "freeze_prefixes": freeze_prefixes,
    }
    return steps.train_trial(
        trial, base, store, training_mode, gpus, nodes, mlflow_experiment, registered_model, overrides, launch, model
    )


def predict_trial(
    trial: dict,
    model_preset: str,
    checkpoint_uri: str,
    run_uri: str,
    gpus: int,
    store: str,
    mlflow_experiment: str,
    registered_model: str,
    overrides: list,
    predictions: Output[Artifact],
) -> NamedTuple("TrialPredictOutputs", [("predictions_uri", str)]):
    """Predict with one trial's checkpoint (skipped when its training failed)."""
    from pipeline import steps

    uri = steps.predict_trial(
        trial,
        model_preset,
        checkpoint_uri,
        run_uri,
        gpus,
        store,
        mlflow_experiment,
        registered_model,
        overrides,
        predictions,
    )
    return (uri,)


def evaluate_trial(
    trial: dict,
    predictions_uri: str,
    run_uri: str,
    checkpoint_uri: str,
    store: str,
    mlflow_experiment: str,
    registered_model: str,
    overrides: list,
    metrics: Output[Metrics],
) -> NamedTuple("TrialEvaluateOutputs", [("metrics_uri", str), ("metric_values", dict)]):
    """Evaluate one trial and record its outcome for the sweep's last step."""
    from pipeline import steps

    return steps.evaluate_trial(
        trial, predictions_uri, run_uri, checkpoint_uri, store, mlflow_experiment, registered_model, overrides, metrics
    )


def select_best(
    sweep_id: str,
    sweep_metric: str,
    sweep_mode: str,
    store: str,
    mlflow_experiment: str,
    registered_model: str,
    table: Output[Markdown],
    metrics: Output[Metrics],
    trials: list = [],
) -> dict:
    """Pick the best trial by the metric, register its checkpoint, write the sweep table."""
    from pipeline import steps

    return steps.select_best(
        trials, sweep_id, sweep_metric, sweep_mode, store, mlflow_experiment, registered_model, table, metrics
    )


@dataclass(frozen=True)
class Components:
    data_prep_plan: PythonComponent
    data_prep_shard: PythonComponent
    data_prep_merge: PythonComponent
    plan_training: PythonComponent
    train: PythonComponent
    predict: PythonComponent
    evaluate: PythonComponent
    plan_sweep: PythonComponent
    train_trial: PythonComponent
    predict_trial: PythonComponent
    evaluate_trial: PythonComponent
    select_best: PythonComponent


def build_components(settings: PipelineSettings) -> Components:
    """The components on the configured image, with no run-time pip install (not even of kfp)."""

    def make(func: Callable[..., Any]) -> PythonComponent:
        return dsl.component(func, base_image=settings.image, packages_to_install=[], install_kfp_package=False)

    return Components(
        data_prep_plan=make(data_prep_plan),
        data_prep_shard=make(data_prep_shard),
        data_prep_merge=make(data_prep_merge),
        plan_training=make(plan_training),
        train=make(train),
        predict=make(predict),
        evaluate=make(evaluate),
        plan_sweep=make(plan_sweep),
        train_trial=make(train_trial),
        predict_trial=make(predict_trial),
        evaluate_trial=make(evaluate_trial),
        select_best=make(select_best),
    )
