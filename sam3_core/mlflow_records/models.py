"""Checkpoints as MLflow 3 LoggedModels: one per saved checkpoint, the weights stay in the store.

A logged model points at its checkpoint with tags (`sam3pipe.checkpoint_uri`, `.sha256`,
`.size_bytes`, `.step`), carries the validation metrics of its step (linked by model id, so
`mlflow.search_logged_models(order_by=[{"field_name": "metrics.val/segm_AP", ...}])` ranks the
checkpoints), is an output of the train run (the runs table's Models column), and is marked
`sam3pipe.best` / `sam3pipe.last` = "true" while it holds that role. The files of one step
(`step_0000100.pt` and its copy `last.pt` with the training state, `best.pt` with the exported
weights) are one model, each file tagged by its role (`sam3pipe.file.<role>` and its `.sha256`);
the model is found again by its name (`<run name>@step-<step>`), so a replayed record never
duplicates it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sam3_core.mlflow_records import mlflow_api

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModel, Metric

logger = logging.getLogger(__name__)

MODEL_TYPE = "sam3-checkpoint"
TAG_URI = "sam3pipe.checkpoint_uri"
TAG_SHA256 = "sam3pipe.sha256"
TAG_SIZE = "sam3pipe.size_bytes"
TAG_STEP = "sam3pipe.step"
TAG_TRAIN_RUN = "sam3pipe.train_run_id"
TAG_FILE = "sam3pipe.file.{role}"
TAG_FILE_SHA256 = "sam3pipe.file.{role}.sha256"
ROLE_TAG = "sam3pipe.{role}"
RUN_MODEL_TAG = "sam3pipe.checkpoint.{role}_model_id"
# Roles that move from checkpoint to checkpoint; `step` is a checkpoint's permanent file.
MARKED_ROLES = ("best", "last")
# MLflow refuses these characters in a logged model's name.
_NOT_IN_NAMES = re.compile(r"[/:.%\"']")


def model_name(run_name: str, step: int) -> str:
    """The logged model of a run's checkpoint at `step` (unique per run and step): `<run>-step-0000100`."""
    return f"{_NOT_IN_NAMES.sub('-', run_name)}-step-{int(step):07d}"


def find_model(client: MlflowClient, experiment_id: str, run_id: str, name: str) -> LoggedModel | None:
    """The logged model `name` that train run `run_id` made."""
    found = client.search_logged_models(
        [experiment_id], filter_string=f"name = '{name}' AND tags.`{TAG_TRAIN_RUN}` = '{run_id}'", max_results=1
    )
    return found[0] if found else None


def _linked_metrics(
    model_id: str, metrics: Mapping[str, float], step: int, timestamps: Mapping[str, int]
) -> list[Metric]:
    """The step's metrics tied to the model; the trainer's own timestamps keep the run's history free of copies."""
    now = int(time.time() * 1000)
    return [
        mlflow_api.Metric(key, float(value), int(timestamps.get(key) or now), int(step), model_id=model_id)
        for key, value in metrics.items()
    ]


def record_checkpoint(
    client: MlflowClient, experiment_id: str, parent_run_id: str, run_id: str, record: Mapping[str, Any]
) -> str:
    """Create (or find) the checkpoint's logged model, link its metrics, mark its role; its model id.

    One logged model per step; its files are tags by role, each with its sha256: `best` (the
    exported weights) and `step` / `last` (the full training state) of one step are different
    files. A file of a role that differs from the one recorded for that step (a rerun wrote
    another checkpoint there) is left as it is, with a warning.
    """
    step, role = int(record["step"]), str(record["role"])
    sha_tag = TAG_FILE_SHA256.format(role=role)
    model = find_model(client, experiment_id, run_id, record["model_name"])
    if model is None:
        tags = {
            TAG_TRAIN_RUN: run_id,
            TAG_URI: record["uri"],
            TAG_SHA256: record["sha256"],
            TAG_SIZE: str(record["size_bytes"]),
            TAG_STEP: str(step),
            **{ROLE_TAG.format(role=r): "false" for r in MARKED_ROLES},
        }
        model = client.create_logged_model(
            experiment_id,
            name=record["model_name"],
            source_run_id=parent_run_id,
            tags=tags,
            params={key: str(value) for key, value in record.get("params", {}).items()},
            model_type=MODEL_TYPE,
        )
        metrics = _linked_metrics(model.model_id, record.get("metrics", {}), step, record.get("timestamps", {}))
        if metrics:
            client.log_batch(run_id, metrics=metrics)
        client.finalize_logged_model(model.model_id, "READY")
        client.log_outputs(run_id, [mlflow_api.LoggedModelOutput(model.model_id, step)])
        logger.info("checkpoint step %d is logged model %s (%s)", step, model.model_id, record["uri"])
    elif model.tags.get(sha_tag, record["sha256"]) != record["sha256"]:
        logger.warning(
            "checkpoint step %d at %s differs from the %s file of logged model %s (sha256 %s, recorded %s); "
            "left as it is",
            step,
            record["uri"],
            role,
            model.model_id,
            record["sha256"][:12],
            model.tags[sha_tag][:12],
        )
        return model.model_id
    client.set_logged_model_tags(model.model_id, {TAG_FILE.format(role=role): record["uri"], sha_tag: record["sha256"]})
    if role in MARKED_ROLES:
        mark(client, experiment_id, run_id, model.model_id, role)
    return model.model_id


def mark(client: MlflowClient, experiment_id: str, run_id: str, model_id: str, role: str) -> None:
    """`model_id` becomes the run's `role` (best / last); the model that held it before is unmarked."""
    tag = ROLE_TAG.format(role=role)
    holders = client.search_logged_models(
        [experiment_id], filter_string=f"tags.`{TAG_TRAIN_RUN}` = '{run_id}' AND tags.`{tag}` = 'true'"
    )
    for holder in holders:
        if holder.model_id != model_id:
            client.set_logged_model_tags(holder.model_id, {tag: "false"})
    client.set_logged_model_tags(model_id, {tag: "true"})
    client.set_tag(run_id, RUN_MODEL_TAG.format(role=role), model_id)
