"""The pipeline's KFP components: lightweight Python components running the project's image.

KFP reads a component's inputs from its function's signature and copies the function's source
into the compiled pipeline, where the pod runs it; so these signatures are literal. An argument
named like a pipeline parameter is that parameter (its type is the table's, which
tests/pipeline/test_parameters.py checks); the others are the wiring between components. Each body
hands its arguments by name (`locals()`, taken first) to `pipeline.component_bodies`, imported
inside the body from the image, where nothing is pip-installed at run time. The image is a
compile-time setting, hence `build_components(settings)`. (No postponed annotations here: KFP
reads these functions' annotations as types.)
"""

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Markdown, Metrics, Model, Output
from kfp.dsl.python_component import PythonComponent

from pipeline.settings import PipelineSettings


def check_parameters(
    pipeline: str,
    source: str,
    annotations: str,
    frames_root: str,
    data_prep_shards: int,
    model_preset: str,
    checkpoint: str,
    base_checkpoint: str,
    max_steps: int,
    lr: float,
    batch_size: int,
    frames_per_clip: int,
    freeze_prefixes: list,
    best_metric: str,
    store: str,
    mlflow_experiment: str,
    training_mode: str,
    gpus: int,
    nodes: int,
    predict_gpus: int,
    data_prep_overrides: list,
    train_overrides: list,
    predict_overrides: list,
    evaluate_overrides: list,
    tracker_steps: int,
    tracker_overrides: list,
    sweep_trials: list,
    sweep_grid: dict,
    sweep_metric: str,
    sweep_mode: str,
    registered_model: str,
) -> NamedTuple("CheckedParameters", [("pod_gpus", int)]):
    """Check every parameter of the pipeline run before any work; the GPUs the train pod requests."""
    arguments = dict(locals())
    from pipeline import component_bodies

    return (component_bodies.check_parameters(arguments),)


def data_prep_plan(
    source: str,
    annotations: str,
    frames_root: str,
    store: str,
    data_prep_shards: int,
    data_prep_overrides: list,
) -> NamedTuple("DataPrepPlan", [("plan_uri", str), ("shards", list)]):
    """Check the source data and split its videos into shards for the data-prep pods."""
    arguments = dict(locals())
    from pipeline import component_bodies

    return component_bodies.plan_data_prep(arguments)


def data_prep_shard(plan_uri: str, index: int) -> NamedTuple("DataPrepShard", [("part_uri", str)]):
    """Stage one shard of videos (frames decoded, resized, masks resampled) and write its part to the store."""
    from pipeline import component_bodies

    return (component_bodies.prepare_data_shard(plan_uri, index),)


def data_prep_merge(
    plan_uri: str,
    parts: list,
    dataset: Output[Dataset],
) -> NamedTuple("DataPrepOutputs", [("dataset_uri", str), ("dataset_id", str)]):
    """Check every shard's part and publish the content-addressed dataset, manifest last."""
    from pipeline import component_bodies

    return component_bodies.merge_data_prep(plan_uri, parts, dataset)


def plan_training(training_mode: str, gpus: int, nodes: int) -> NamedTuple("TrainingPlan", [("pod_gpus", int)]):
    """Check the training knobs; the GPUs the train pod requests (none when it only launches a job)."""
    arguments = dict(locals())
    from pipeline import component_bodies

    return (component_bodies.plan_training(arguments),)


def train(
    model_preset: str,
    checkpoint: str,
    max_steps: int,
    lr: float,
    batch_size: int,
    frames_per_clip: int,
    freeze_prefixes: list,
    best_metric: str,
    store: str,
    mlflow_experiment: str,
    training_mode: str,
    gpus: int,
    nodes: int,
    train_overrides: list,
    launch: dict,
    model: Output[Model],
    dataset_uri: str = "",
    pipeline_run_id: str = "",
    trial: dict = {},
) -> NamedTuple("TrainOutputs", [("run_uri", str), ("best_checkpoint_uri", str), ("last_checkpoint_uri", str)]):
    """Fine-tune SAM3 with torchrun in this pod, or as a multi-node job; in a sweep, one trial (its item in `trial`)."""
    arguments = dict(locals())
    from pipeline import component_bodies

    return component_bodies.train(arguments)


def train_tracker(
    model_preset: str,
    base_checkpoint: str,
    batch_size: int,
    store: str,
    mlflow_experiment: str,
    training_mode: str,
    gpus: int,
    nodes: int,
    tracker_steps: int,
    tracker_overrides: list,
    launch: dict,
    checkpoint_uri: str,
    model: Output[Model],
    dataset_uri: str = "",
    pipeline_run_id: str = "",
) -> NamedTuple("TrackerOutputs", [("run_uri", str), ("best_checkpoint_uri", str), ("last_checkpoint_uri", str)]):
    """Train SAM3's tracker on the fine-tuned detector, frozen (train.stage=tracker); skipped when tracker_steps=0."""
    arguments = dict(locals())
    from pipeline import component_bodies

    return component_bodies.train_tracker(arguments)


def predict(
    model_preset: str,
    store: str,
    mlflow_experiment: str,
    predict_gpus: int,
    predict_overrides: list,
    checkpoint_uri: str,
    run_uri: str,
    predictions: Output[Artifact],
    dataset_uri: str = "",
    pipeline_run_id: str = "",
    trial: dict = {},
    role: str = "",
) -> NamedTuple("PredictOutputs", [("predictions_uri", str)]):
    """Dump COCO frame predictions and YTVIS masklets for the validation videos (skipped without a checkpoint:
    a failed trial, no base model); `role="base"` predicts the base model beside the fine-tuned one."""
    arguments = dict(locals())
    from pipeline import component_bodies

    return (component_bodies.predict(arguments),)


def evaluate(
    mlflow_experiment: str,
    store: str,
    evaluate_overrides: list,
    predictions_uri: str,
    run_uri: str,
    checkpoint_uri: str,
    metrics: Output[Metrics],
    dataset_uri: str = "",
    pipeline_run_id: str = "",
    trial: dict = {},
    role: str = "",
) -> NamedTuple("EvaluateOutputs", [("metrics_uri", str), ("metric_values", dict)]):
    """Score the predictions (COCO frame metrics and video metrics) and log them as KFP metrics; record a trial's
    outcome; skipped without predictions."""
    arguments = dict(locals())
    from pipeline import component_bodies

    return component_bodies.evaluate(arguments)


def export(
    model_preset: str,
    base_checkpoint: str,
    mlflow_experiment: str,
    checkpoint_uri: str,
    tracker_checkpoint_uri: str,
    run_uri: str,
    video_model: Output[Model],
    pipeline_run_id: str = "",
) -> NamedTuple("ExportOutputs", [("video_model_uri", str)]):
    """The fine-tuned detector with the trained tracker (else the base's) as SAM3's video checkpoint, registered
    (skipped without a base)."""
    arguments = dict(locals())
    from pipeline import component_bodies

    return (component_bodies.export(arguments),)


def compare(
    mlflow_experiment: str,
    base_metrics_uri: str,
    metrics_uri: str,
    run_uri: str,
    comparison: Output[Markdown],
    dataset_uri: str = "",
    pipeline_run_id: str = "",
) -> NamedTuple("CompareOutputs", [("comparison_uri", str)]):
    """Base against fine-tuned on the same split, with the difference and SAM3's published row (skipped without a base)."""
    arguments = dict(locals())
    from pipeline import component_bodies

    return (component_bodies.compare(arguments),)


def plan_sweep(
    sweep_trials: list,
    sweep_grid: dict,
    sweep_metric: str,
    sweep_mode: str,
    registered_model: str,
    store: str,
    mlflow_experiment: str,
    dataset_uri: str,
    sweep_id: str,
    parallelism: int,
) -> list:
    """Expand the sweep spec into trials (the ParallelFor's items) and open the sweep's MLflow run."""
    arguments = dict(locals())
    from pipeline import component_bodies

    return component_bodies.plan_sweep(arguments)


def select_best(
    sweep_metric: str,
    sweep_mode: str,
    registered_model: str,
    store: str,
    mlflow_experiment: str,
    sweep_id: str,
    table: Output[Markdown],
    metrics: Output[Metrics],
    trials: list = [],
) -> dict:
    """Pick the best trial by the metric, register its checkpoint, write the sweep table."""
    arguments = dict(locals())
    from pipeline import component_bodies

    return component_bodies.select_best(arguments)


@dataclass(frozen=True)
class Components:
    """The components, each built from the function of its name above."""

    check_parameters: PythonComponent
    data_prep_plan: PythonComponent
    data_prep_shard: PythonComponent
    data_prep_merge: PythonComponent
    plan_training: PythonComponent
    train: PythonComponent
    train_tracker: PythonComponent
    predict: PythonComponent
    evaluate: PythonComponent
    export: PythonComponent
    compare: PythonComponent
    plan_sweep: PythonComponent
    select_best: PythonComponent


def build_components(settings: PipelineSettings) -> Components:
    """The components on the configured image, with no run-time pip install (not even of kfp)."""

    def make(func: Callable[..., Any]) -> PythonComponent:
        return dsl.component(func, base_image=settings.image, packages_to_install=[], install_kfp_package=False)

    return Components(**{f.name: make(globals()[f.name]) for f in fields(Components)})
