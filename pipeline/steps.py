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
from pathlib import Path
from typing import Any, Protocol

from pipeline import distributed
from pipeline.dispatch import component_module
from sam3_core import storage
from sam3_core.errors import InputError

logger = logging.getLogger(__name__)

TRAINING_MODES = ("pod", "pytorchjob")
DEFAULT_STORE = ".sam3pipe/store"


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

    In pytorchjob mode the train pod only launches and watches the job, so it asks for no GPU.
    """
    if training_mode not in TRAINING_MODES:
        raise InputError("pipeline parameters", "training_mode", f"must be one of {TRAINING_MODES}, got {training_mode!r}")
    if gpus < 0:
        raise InputError("pipeline parameters", "gpus", f"must be >= 0, got {gpus}")
    if nodes < 1:
        raise InputError("pipeline parameters", "nodes", f"must be >= 1, got {nodes}")
    if training_mode == "pod" and nodes != 1:
        raise InputError("pipeline parameters", "nodes", "training_mode=pod runs on one node; use training_mode=pytorchjob")
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
    """Train in this pod (torchrun over its GPUs) or as a multi-node PyTorchJob."""
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
    ]
    if checkpoint:
        overrides.append(f"model.uri={hydra_value(checkpoint, 'checkpoint')}")
    overrides.extend(extra)
    env = set_tracking_env(pipeline_run_id, mlflow_experiment)
    if training_mode == "pod":
        outputs = distributed.run_in_pod("train", overrides, gpus)
    else:
        from pipeline import (
            pytorchjob,  # the kubernetes client is needed in this mode only
        )

        env["SAM3PIPE_IMAGE"] = launch["image"]
        settings = pytorchjob.LaunchSettings(**launch)
        outputs = pytorchjob.launch_training(overrides, settings, pipeline_run_id, nodes, gpus, store_root(store), env)
    publish_pointer(model, {"uri": outputs["best_checkpoint_uri"], **outputs})
    return outputs["run_uri"], outputs["best_checkpoint_uri"], outputs["last_checkpoint_uri"]


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
