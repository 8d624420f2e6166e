"""Tracking records beyond metrics: checkpoints, registrations, datasets, parent values, lineage.

Each record is a small JSON-able dict with a `kind`; `apply_record` sends it. The tracker
applies a record at once, keeps it while the server is away (like metrics), and writes what
never arrived into the unsent record next to the outputs, whose replay applies it later.
Applying a record again finds what the first attempt made (by name or tag) instead of
making it twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sam3_core.mlflow_records import mlflow_api, models
from sam3_core.mlflow_records.datasets import DatasetRef
from sam3_core.mlflow_records.registry import register_checkpoint

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

# What each kind is called when a component says what is pending.
DESCRIPTIONS = {
    "checkpoint": "checkpoint record",
    "register": "model registration",
    "dataset": "dataset input",
    "parent": "pipeline-run summary",
    "artifact": "lineage record",
}


@dataclass(frozen=True)
class Target:
    """The runs a record goes to."""

    experiment_id: str
    parent_run_id: str
    run_id: str


def describe_pending(records: list[dict[str, Any]]) -> str:
    """`2 checkpoint records, 1 model registration` for a warning line."""
    counts: dict[str, int] = {}
    for record in records:
        counts[record["kind"]] = counts.get(record["kind"], 0) + 1
    parts = []
    for kind, count in counts.items():
        name = DESCRIPTIONS.get(kind, kind)
        parts.append(f"{count} {name}{'s' if count > 1 else ''}")
    return ", ".join(parts)


def _dataset(client: MlflowClient, target: Target, record: Mapping[str, Any]) -> None:
    dataset_input = DatasetRef.from_json(record["dataset"]).as_input(record["context"])
    for run_id in dict.fromkeys([target.run_id, target.parent_run_id]):
        client.log_inputs(run_id, [dataset_input])


def _parent(client: MlflowClient, target: Target, record: Mapping[str, Any]) -> None:
    """Params (those the parent lacks; MLflow refuses to change one), metrics, tags, best model."""
    held = client.get_run(target.parent_run_id).data.params if record.get("params") else {}
    params = []
    for key, value in record.get("params", {}).items():
        if key not in held:
            params.append(mlflow_api.Param(key, str(value)))
        elif held[key] != str(value):
            logger.warning(
                "pipeline run keeps param %s=%s; this component ran with %s (a rerun with other settings?)",
                key,
                held[key],
                value,
            )
    metrics = [
        mlflow_api.Metric(m["key"], float(m["value"]), int(m.get("timestamp") or time.time() * 1000), int(m["step"]))
        for m in record.get("metrics", [])
    ]
    tags = [mlflow_api.RunTag(key, str(value)) for key, value in record.get("tags", {}).items()]
    client.log_batch(target.parent_run_id, metrics=metrics, params=params, tags=tags)
    best = record.get("best_model_name")
    if best:
        found = models.find_model(client, target.experiment_id, target.run_id, best)
        if found is not None:
            client.log_outputs(
                target.parent_run_id, [mlflow_api.LoggedModelOutput(found.model_id, int(record.get("best_step", 0)))]
            )


def _register(client: MlflowClient, target: Target, record: Mapping[str, Any]) -> str:
    model_id = None
    if record.get("best_model_name"):
        found = models.find_model(client, target.experiment_id, target.run_id, record["best_model_name"])
        model_id = found.model_id if found else None
    version = register_checkpoint(
        client,
        record["model_name"],
        record["alias"],
        record["checkpoint_uri"],
        target.run_id,
        record["pipeline_run_id"],
        model_id=model_id,
    )
    return str(version.version)


def _artifact(client: MlflowClient, target: Target, record: Mapping[str, Any]) -> None:
    client.log_dict(target.run_id, record["json"], record["path"])


def apply_record(client: MlflowClient, target: Target, record: Mapping[str, Any]) -> Any:
    """Send one record; returns what it made (a model id, a registry version) or None."""
    kind = record["kind"]
    if kind == "checkpoint":
        model_id = models.record_checkpoint(client, target.experiment_id, target.parent_run_id, target.run_id, record)
        _artifact(client, target, {"json": record["reference"], "path": f"checkpoints/{record['name']}.json"})
        if record["role"] in models.MARKED_ROLES:
            client.set_tag(target.run_id, f"sam3pipe.checkpoint.{record['role']}", record["uri"])
        return model_id
    if kind == "register":
        return _register(client, target, record)
    if kind == "dataset":
        return _dataset(client, target, record)
    if kind == "parent":
        return _parent(client, target, record)
    if kind == "artifact":
        return _artifact(client, target, record)
    raise ValueError(f"unknown tracking record kind {kind!r}")
