"""Rebuild a recorded run's exact command from MLflow, check it can still be reproduced, compare results.

A component run's `reproduce.json` (see lineage.py) holds its resolved config; the command
that reruns it is that config as Hydra overrides (every leaf, so defaults changed since do not
matter), with its outputs sent to a new place and its tracking to a new pipeline run. A whole
pipeline run is its train, predict and evaluate runs in that order, each later one rewired to
the outputs of the earlier reruns (the predict step reads the new best checkpoint, evaluate
the new predictions). The published dataset is reused, not prepared again: it is
content-addressed, and its bytes are checked against its manifest first.

Refused, with the reason, when what the run needs is gone or differs: the dataset's bytes,
the checkpoint a component started from, the code (git commit, sam3 version; allowed with
`allow_other_commit`), or a config value that was masked as a credential when recorded.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sam3_core.config import flatten, quote_value
from sam3_core.errors import Sam3PipeError, StorageError
from sam3_core.mlflow_records import mlflow_api
from sam3_core.mlflow_records.datasets import DatasetRef, changed_files
from sam3_core.mlflow_records.lineage import (
    RECORD_FILE,
    TAG_OUTPUT,
    RunRecord,
    content_sha256,
    git_commit,
    sam3_version,
)
from sam3_core.mlflow_records.redact import MASK
from sam3_core.mlflow_records.runs import PIPELINE, TAG_COMPONENT, TAG_PIPELINE_RUN_ID

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

# The order a pipeline's components run in; data prep is not rerun (its dataset is reused).
PIPELINE_ORDER = ("train", "predict", "evaluate")
COMPONENT_MODULES = {"train": "train", "predict": "predict", "evaluate": "evaluate"}
# The key that names where each component writes, and the output its value is derived from.
OUTPUT_KEYS = {"train": "output.run_name", "predict": "output.uri", "evaluate": "output"}
# Metrics that measure the machine, not the model: left out of the comparison.
_TIMING = re.compile(r"^system/|_per_s$|_seconds$|_time_s$|gpu_mem|^best_step$")
# A reproduction registers its model under this alias, so `candidate` stays where it was.
REPRODUCED_ALIAS = "reproduced"


class ReproduceError(Sam3PipeError):
    """The run cannot be reproduced as recorded; the message says why and what to do."""


@dataclass
class RecordedRun:
    """One component run as MLflow holds it."""

    run_id: str
    component: str
    record: RunRecord
    metrics: dict[str, float]
    outputs: dict[str, str]
    start_time: int


@dataclass
class Plan:
    """What `sam3pipe reproduce` will run: the recorded runs and the new pipeline run's identity."""

    experiment_id: str
    original_id: str  # the MLflow run id asked for (parent or component)
    runs: list[RecordedRun]
    whole_pipeline: bool
    parent_name: str
    pipeline_run_id: str = field(default_factory=lambda: f"reproduce-{uuid.uuid4().hex[:10]}")


@dataclass(frozen=True)
class Difference:
    component: str
    metric: str
    original: float | None
    reproduced: float | None

    @property
    def delta(self) -> float | None:
        if self.original is None or self.reproduced is None:
            return None
        return self.reproduced - self.original


# ---------------------------------------------------------------------------- finding the runs


def _outputs(run: Run) -> dict[str, str]:
    prefix = TAG_OUTPUT.format(name="")
    return {key[len(prefix) :]: value for key, value in run.data.tags.items() if key.startswith(prefix)}


def _load_record(client: MlflowClient, run: Run) -> RunRecord:
    with tempfile.TemporaryDirectory(prefix="sam3pipe-reproduce-") as tmp:
        try:
            path = client.download_artifacts(run.info.run_id, RECORD_FILE, tmp)
        except (mlflow_api.MlflowException, OSError) as exc:
            raise ReproduceError(
                f"MLflow run {run.info.run_id} ({run.info.run_name}) has no {RECORD_FILE}: it was made before "
                "sam3pipe recorded lineage, or its upload failed; it cannot be rebuilt from MLflow"
            ) from exc
        return RunRecord.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def _recorded(client: MlflowClient, run: Run) -> RecordedRun:
    component = run.data.tags.get(TAG_COMPONENT, "")
    if component not in COMPONENT_MODULES:
        raise ReproduceError(
            f"MLflow run {run.info.run_id} is a {component or 'untracked'} run; reproduce rebuilds "
            f"{', '.join(PIPELINE_ORDER)} runs or the pipeline run that holds them"
        )
    return RecordedRun(
        run.info.run_id,
        component,
        _load_record(client, run),
        dict(run.data.metrics),
        _outputs(run),
        run.info.start_time,
    )


def _get_run(client: MlflowClient, run_id: str) -> Run | None:
    try:
        return client.get_run(run_id)
    except mlflow_api.MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def plan(client: MlflowClient, ident: str, experiment_name: str) -> Plan:
    """The runs behind `ident`: an MLflow run id (component or pipeline run) or a pipeline run id."""
    run = _get_run(client, ident)
    if run is None:
        experiment = client.get_experiment_by_name(experiment_name)
        found = []
        if experiment is not None:
            found = client.search_runs(
                [experiment.experiment_id],
                f"tags.`{TAG_PIPELINE_RUN_ID}` = '{ident}' and tags.`{TAG_COMPONENT}` = '{PIPELINE}'",
            )
        if not found:
            raise ReproduceError(
                f"{ident}: neither an MLflow run id nor a pipeline run id of experiment {experiment_name!r} "
                "(set MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME to where it was tracked)"
            )
        run = found[0]
    experiment_id = run.info.experiment_id
    if run.data.tags.get(TAG_COMPONENT) != PIPELINE:
        recorded = _recorded(client, run)
        return Plan(experiment_id, run.info.run_id, [recorded], False, f"{run.info.run_name} (reproduced)")
    children = client.search_runs([experiment_id], f"tags.`{mlflow_api.MLFLOW_PARENT_RUN_ID}` = '{run.info.run_id}'")
    by_component = {c.data.tags.get(TAG_COMPONENT): c for c in children}
    missing = [name for name in PIPELINE_ORDER if name not in by_component]
    if missing:
        raise ReproduceError(
            f"pipeline run {run.info.run_name} ({run.info.run_id}) has no finished {', '.join(missing)} run; "
            "reproduce one of its component runs by its MLflow run id instead"
        )
    runs = [_recorded(client, by_component[name]) for name in PIPELINE_ORDER]
    return Plan(experiment_id, run.info.run_id, runs, True, f"{run.info.run_name} (reproduced)")


# ---------------------------------------------------------------------------- checks


def check(plan_: Plan, allow_other_commit: bool = False) -> None:
    """Refuse (ReproduceError naming every reason) when the runs cannot be reproduced as recorded."""
    problems: list[str] = []
    here_commit, here_sam3 = git_commit(), sam3_version()
    checked: set[str] = set()
    produced = {value for run in plan_.runs for value in run.outputs.values()}
    for run in plan_.runs:
        record, what = run.record, f"{run.component} run {run.run_id}"
        if not allow_other_commit:
            if record.git_commit != here_commit or "unknown" in (record.git_commit, here_commit):
                problems.append(
                    f"{what} was made by git commit {record.git_commit}, this checkout is {here_commit}: "
                    f"`git checkout {record.git_commit}` (or pass --allow-other-commit)"
                )
            if record.sam3_version != here_sam3:
                problems.append(
                    f"{what} used sam3 {record.sam3_version}, this environment has {here_sam3} "
                    "(install the locked versions, or pass --allow-other-commit)"
                )
        masked = sorted(
            key for key, value in flatten(record.config).items() if isinstance(value, str) and MASK in value
        )
        if masked:
            problems.append(
                f"{what} has config values masked as credentials when recorded ({', '.join(masked)}); "
                "they cannot be rebuilt from MLflow"
            )
        if record.dataset and record.dataset["uri"] not in checked:
            checked.add(record.dataset["uri"])
            ref = DatasetRef.from_json(record.dataset)
            changed = changed_files(ref)
            if changed:
                shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
                problems.append(
                    f"dataset {ref.dataset_id} at {ref.uri} is not the one {what} read: {shown}. "
                    "Its bytes changed; prepare it again with the recorded data-prep settings"
                )
        if record.checkpoint and record.checkpoint["uri"] not in produced:
            problems.append(_checkpoint_problem(what, record.checkpoint))
    problems = [p for p in problems if p]
    if problems:
        raise ReproduceError(" | ".join(dict.fromkeys(problems)))


def _checkpoint_problem(what: str, checkpoint: Mapping[str, Any]) -> str:
    try:
        now = content_sha256(checkpoint["uri"])
    except StorageError:
        return f"the checkpoint {checkpoint['uri']} that {what} read is gone"
    if now != checkpoint["sha256"]:
        return (
            f"the checkpoint {checkpoint['uri']} that {what} read changed (sha256 {now[:12]}, recorded "
            f"{checkpoint['sha256'][:12]})"
        )
    return ""


# ---------------------------------------------------------------------------- commands


def hydra_value(value: Any) -> str:
    """A resolved config value as Hydra override text that parses back to the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return (
            repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
        )
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{hydra_value(item)}" for key, item in value.items()) + "}"
    return quote_value(str(value))


def _redirect(value: str, suffix: str) -> str:
    """A sibling of an output location, so a reproduction never overwrites what it reproduces."""
    folder, name = posixpath.split(value.rstrip("/"))
    return posixpath.join(folder, f"{name}-{suffix}") if folder else f"{name}-{suffix}"


def _rewire(value: Any, moved: Mapping[str, str]) -> Any:
    """A value pointing at an original output (or inside an original output folder) points at the new one."""
    if isinstance(value, list):
        return [_rewire(item, moved) for item in value]
    if not isinstance(value, str):
        return value
    for old, new in moved.items():
        if value == old:
            return new
        if value.startswith(old.rstrip("/") + "/"):
            return new.rstrip("/") + value[len(old.rstrip("/")) :]
    return value


def overrides_for(
    run: RecordedRun, moved: Mapping[str, str], suffix: str, pipeline_run_id: str, name: str
) -> list[str]:
    """The rerun's Hydra overrides: every leaf of the recorded config, outputs and tracking moved."""
    flat = flatten(run.record.config)
    flat = {key: _rewire(value, moved) for key, value in flat.items()}
    out_key = OUTPUT_KEYS[run.component]
    original_out = flatten(run.record.config).get(out_key)
    if flat.get(out_key) == original_out:
        flat[out_key] = _default_output(run, suffix)
    flat["mlflow.pipeline_run_id"] = pipeline_run_id
    flat["mlflow.pipeline_run_name"] = name
    if "mlflow.model_alias" in flat:
        flat["mlflow.model_alias"] = REPRODUCED_ALIAS
    return [f"{key}={hydra_value(value)}" for key, value in flat.items()]


def _default_output(run: RecordedRun, suffix: str) -> str:
    if run.component == "train":
        return posixpath.basename(run.outputs.get("run_uri", "train").rstrip("/")) + f"-{suffix}"
    if run.component == "predict":
        return _redirect(run.outputs.get("predictions_uri") or run.record.config["output"]["uri"], suffix)
    metrics_uri = run.outputs.get("metrics_uri") or run.record.config["output"]
    folder, name = posixpath.split(metrics_uri)
    return posixpath.join(_redirect(folder, suffix), name) if folder else f"{suffix}-{name}"


def command(run: RecordedRun, overrides: list[str], python: str) -> list[str]:
    """argv of the rerun: one process, or torchrun over as many processes as were recorded."""
    module = f"components.{COMPONENT_MODULES[run.component]}"
    if run.record.world_size > 1:
        return [
            python,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={run.record.world_size}",
            "-m",
            module,
            *overrides,
        ]
    return [python, "-m", module, *overrides]


def moved_outputs(original: RecordedRun, outputs: Mapping[str, Any]) -> dict[str, str]:
    """Original output -> reproduced output, for the later components' configs."""
    return {
        value: str(outputs[key])
        for key, value in original.outputs.items()
        if key in outputs and isinstance(value, str) and value and str(outputs[key]) != value
    }


# ---------------------------------------------------------------------------- comparing


def compare(original: Mapping[str, float], reproduced: Mapping[str, float], component: str) -> list[Difference]:
    """Every model metric whose value differs (timing metrics left out); [] when identical."""
    keys = sorted(k for k in set(original) | set(reproduced) if not _TIMING.search(k))
    out = []
    for key in keys:
        a, b = original.get(key), reproduced.get(key)
        same = a is not None and b is not None and (a == b or (math.isnan(a) and math.isnan(b)))
        if not same:
            out.append(Difference(component, key, a, b))
    return out


def new_runs(client: MlflowClient, experiment_id: str, pipeline_run_id: str) -> dict[str, Run]:
    """The reproduction's runs by component (`pipeline` is its parent)."""
    found = client.search_runs([experiment_id], f"tags.`{TAG_PIPELINE_RUN_ID}` = '{pipeline_run_id}'")
    return {run.data.tags.get(TAG_COMPONENT, ""): run for run in found}
