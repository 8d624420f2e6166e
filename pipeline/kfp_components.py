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
from kfp.dsl import Artifact, Dataset, Metrics, Model, Output
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
        dataset_uri, model_preset, checkpoint, max_steps, lr, batch_size, frames_per_clip, freeze_prefixes,
        store, training_mode, gpus, nodes, pipeline_run_id, mlflow_experiment, overrides, launch, model,
    )  # fmt: skip


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
        dataset_uri, model_preset, checkpoint_uri, run_uri, gpus, pipeline_run_id, mlflow_experiment, overrides,
        predictions,
    )  # fmt: skip
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


@dataclass(frozen=True)
class Components:
    data_prep_plan: PythonComponent
    data_prep_shard: PythonComponent
    data_prep_merge: PythonComponent
    plan_training: PythonComponent
    train: PythonComponent
    predict: PythonComponent
    evaluate: PythonComponent


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
    )
