"""`sam3pipe reproduce <MLflow run id | pipeline run id>`: rerun a recorded run, compare its metrics.

Locally, each recorded component run (train, predict, evaluate of a pipeline run, or one of
them) is rerun as its own process with the exact recorded config, the recorded process count
and thread settings, into new output folders and a new MLflow pipeline run tagged
`sam3pipe.reproduces_run_id=<original>`; then every model metric is compared with the original's.
With `--host`, the whole pipeline run is submitted to Kubeflow Pipelines with the parameters
rebuilt from the recorded configs (and the recorded image); `--wait` waits for it and compares.
The checks and command building live in `sam3_core.mlflow_records.reproduce`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from sam3_core import pipeline_parameters as table
from sam3_core import storage
from sam3_core.config import flatten
from sam3_core.mlflow_records import MlflowConfig, tracking_uri
from sam3_core.mlflow_records.datasets import MANIFEST
from sam3_core.mlflow_records.lineage import REPRODUCES_ENV
from sam3_core.mlflow_records.redact import describe_error, redact_text
from sam3_core.mlflow_records.reproduce import (
    Difference,
    Plan,
    RecordedRun,
    ReproduceError,
    check,
    command,
    compare,
    hydra_value,
    moved_outputs,
    new_runs,
    overrides_for,
    plan,
)
from sam3_core.mlflow_records.runs import PIPELINE
from sam3_core.mlflow_records.settings import fail_fast_http

logger = logging.getLogger(__name__)

# Keys the pipeline's own components set (from their wiring or KFP), never passed as extra overrides.
_WIRED = {
    "train": ("data.uri", "output.store", "output.run_name", "mlflow."),
    "predict": ("data.uri", "model.uri", "output.uri", "output.store", "mlflow."),
    "evaluate": ("gt", "frames_gt", "predictions", "output", "mlflow."),
}


def reproduce(
    ident: str,
    *,
    allow_other_commit: bool = False,
    dry_run: bool = False,
    host: str | None = None,
    wait: bool = False,
    parameters: list[str] | None = None,
    existing_token: str | None = None,
) -> dict[str, Any]:
    """Rebuild, check and rerun the run `ident`; the result as the CLI's JSON line."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    cfg = MlflowConfig()
    # MLflow's own defaults retry a silent server 7 times, 120 s each: each request is bounded instead
    fail_fast_http(cfg)
    client = MlflowClient(tracking_uri())
    try:
        plan_ = plan(client, ident, cfg.experiment_name)
        check(plan_, allow_other_commit)
        if host:
            return _submit(client, plan_, host, parameters or [], wait, existing_token)
        if parameters:
            raise ReproduceError(f"pipeline parameters ({' '.join(parameters)}) only apply with --host")
        return _run_here(client, plan_, dry_run)
    except (MlflowException, requests.RequestException) as exc:
        raise ReproduceError(
            f"the tracking server at {redact_text(tracking_uri())} failed or did not answer within "
            f"mlflow.request_timeout_s={cfg.request_timeout_s} s ({describe_error(exc)}); check MLFLOW_TRACKING_URI "
            "and that the server is up"
        ) from exc


# ---------------------------------------------------------------------------- here


def _environment(plan_: Plan, run: RecordedRun) -> dict[str, str]:
    """This environment with the recorded thread settings, marked as a reproduction."""
    env = {**os.environ, **run.record.env, REPRODUCES_ENV: plan_.original_id}
    env.pop("SAM3PIPE_PIPELINE_RUN_ID", None)
    return env


def _execute(run: RecordedRun, argv: list[str], env: Mapping[str, str]) -> dict[str, Any]:
    """Run one component process (its log goes to our stderr); its outputs (the last stdout line)."""
    logger.info("reproducing %s run %s: %s", run.component, run.run_id, " ".join(argv[:6]) + " ...")
    done = subprocess.run(argv, env=dict(env), stdout=subprocess.PIPE, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise ReproduceError(f"the reproduced {run.component} run failed (exit {done.returncode}); its log is above")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        raise ReproduceError(f"the reproduced {run.component} run printed no outputs line: {lines[-1][:200]}") from exc


def _run_here(client: MlflowClient, plan_: Plan, dry_run: bool) -> dict[str, Any]:
    moved: dict[str, str] = {}
    commands: list[list[str]] = []
    for run in plan_.runs:
        overrides = overrides_for(run, moved, plan_.pipeline_run_id, plan_.pipeline_run_id, plan_.parent_name)
        argv = command(run, overrides, sys.executable)
        commands.append(argv)
        if not dry_run:
            moved.update(moved_outputs(run, _execute(run, argv, _environment(plan_, run))))
    if dry_run:
        return {"pipeline_run_id": plan_.pipeline_run_id, "commands": commands}
    return _report(client, plan_, plan_.pipeline_run_id)


def _report(client: MlflowClient, plan_: Plan, pipeline_run_id: str) -> dict[str, Any]:
    """Metric differences between the original runs and the reproduction's, logged and returned."""
    reproduced = new_runs(client, plan_.experiment_id, pipeline_run_id)
    differences: list[Difference] = []
    compared = 0
    for run in plan_.runs:
        new = reproduced.get(run.component)
        if new is None:
            raise ReproduceError(f"the reproduction {pipeline_run_id} has no {run.component} run in MLflow")
        differences += compare(run.metrics, new.data.metrics, run.component)
        compared += len(set(run.metrics) | set(new.data.metrics))
    if plan_.whole_pipeline and PIPELINE in reproduced:
        original = client.get_run(plan_.original_id).data.metrics
        differences += compare(original, reproduced[PIPELINE].data.metrics, PIPELINE)
    for diff in differences:
        logger.warning(
            "%s %s: original %s, reproduced %s (difference %s)",
            diff.component,
            diff.metric,
            diff.original,
            diff.reproduced,
            diff.delta,
        )
    if not differences:
        logger.info("reproduced %s: all %d metrics identical", plan_.original_id, compared)
    return {
        "original": plan_.original_id,
        "pipeline_run_id": pipeline_run_id,
        "runs": {name: run.info.run_id for name, run in reproduced.items()},
        "identical": not differences,
        "differences": [
            {
                "component": d.component,
                "metric": d.metric,
                "original": d.original,
                "reproduced": d.reproduced,
                "delta": d.delta,
            }
            for d in differences
        ],
    }


# ---------------------------------------------------------------------------- on Kubeflow


def _extra(run: RecordedRun) -> list[str]:
    """The recorded config as a component's extra overrides, less what the pipeline wires itself."""
    wired = _WIRED[run.component]
    return [
        f"{key}={hydra_value(value)}"
        for key, value in flatten(run.record.config).items()
        if not any(key == w or (w.endswith(".") and key.startswith(w)) for w in wired)
    ]


def _data_prep_arguments(train: RecordedRun) -> dict[str, Any]:
    """Data prep's pipeline parameters, from the dataset's manifest (synthetic sources only)."""
    dataset = train.record.dataset or {}
    manifest = storage.read_json(storage.join(dataset["uri"], MANIFEST)) if dataset else {}
    source = manifest.get("source") or {}
    if source.get("kind") != "synthetic":
        raise ReproduceError(
            f"the dataset {dataset.get('dataset_id')} came from a {source.get('kind', 'unknown')} source whose input "
            "URIs are not recorded; pass them: sam3pipe reproduce ID --host URL source=... annotations=... frames_root=..."
        )
    split = manifest.get("split") or {}
    overrides = [f"synthetic.{key}={hydra_value(value)}" for key, value in flatten(source["synthetic"]).items()]
    overrides.append(f"resize_max_side={int(source.get('resize_max_side', 0))}")
    if "val_fraction" in split:
        overrides.append(f"val_fraction={hydra_value(split['val_fraction'])}")
    if "seed" in split:
        overrides.append(f"split_seed={int(split['seed'])}")
    return {"source": "synthetic", "data_prep_overrides": overrides}


def pipeline_arguments(plan_: Plan, given: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """The pipeline parameters that rerun the recorded pipeline run on Kubeflow.

    Data prep's come from the dataset's manifest unless the user `given` `source` (and its inputs).
    """
    if not plan_.whole_pipeline:
        raise ReproduceError("--host reproduces a whole pipeline run; pass its id (or rerun this component here)")
    train, predict, evaluate = plan_.runs
    recorded = flatten(train.record.config)
    # every parameter the train config records (model.uri may be None: "" is random init)
    arguments: dict[str, Any] = {
        parameter.name: parameter.default if recorded[key] is None else recorded[key]
        for parameter in table.of_pipeline(table.RUN)
        if (key := parameter.config_key()) in recorded
    }
    arguments.update(
        {f"{run.component}_overrides": _extra(run) for run in (train, predict, evaluate)},
    )
    if "source" not in given:
        arguments.update(_data_prep_arguments(train))
    return arguments


def _submit(
    client: MlflowClient, plan_: Plan, host: str, parameters: list[str], wait: bool, existing_token: str | None
) -> dict[str, Any]:
    from pipeline.settings import load_settings
    from pipeline.submit import submit

    image = plan_.runs[0].record.image
    if not image:
        raise ReproduceError("the recorded run names no container image (SAM3PIPE_IMAGE); it did not run from one")
    arguments = pipeline_arguments(plan_, {pair.partition("=")[0] for pair in parameters})
    pairs = [f"{name}={value if isinstance(value, str) else json.dumps(value)}" for name, value in arguments.items()]
    pairs += parameters  # the user's name=value pairs come last and win
    result = submit(
        load_settings([f"image={image}"]), host, pairs, run_name=plan_.parent_name, existing_token=existing_token
    )
    out: dict[str, Any] = {"original": plan_.original_id, "kfp_run_id": result["run_id"], "url": result["url"]}
    if wait:
        _wait(host, result["run_id"], existing_token)
        out.update(_report(client, plan_, result["run_id"]))
    return out


def _wait(host: str, run_id: str, existing_token: str | None) -> None:
    import kfp

    from pipeline.submit import auth_kwargs, bounded_waits, request_timeout_s

    with bounded_waits(request_timeout_s()):
        kfp.Client(host=host, **auth_kwargs(existing_token)).wait_for_run_completion(run_id, timeout=7 * 24 * 3600)
