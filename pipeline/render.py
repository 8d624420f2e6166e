"""`sam3pipe render-job trainjob|pytorchjob`: the training job the train component would create, as YAML.

For review, and for GitOps (commit it, let Argo CD or Flux apply it): the manifest is built by the
same code as the launcher's (pipeline/jobs.py with pipeline/trainjob.py or pipeline/pytorchjob.py),
from the same compile-time settings (`--set key=value`) and pipeline parameters (`name=value`,
checked by the parameter table, `profile=` included), plus two values a pipeline run supplies itself:

- `dataset_uri=`: the prepared dataset (data prep's output); without it the job trains on the
  placeholder `<dataset_uri>`, which is for review only;
- `pipeline_run_id=`: names the job and its run folder (default `render`).

Differences from a launched job, on purpose: a namespace is set only when the settings name one
(`--set trainjob.namespace=...`; otherwise `kubectl apply -n`/the GitOps tool decides), and a local
store is a warning rather than an error (the job's pods need an s3:// store to share outputs).
Nothing is sent to a cluster; the TrainJob's CRD version check happens at launch only.
"""

from __future__ import annotations

import logging
from typing import Any

import yaml

from pipeline import component_bodies, jobs, pytorchjob, trainjob
from pipeline.arguments import SOURCE, parse_arguments
from pipeline.jobs import LaunchSettings
from pipeline.settings import PipelineSettings
from sam3_core import pipeline_parameters as table
from sam3_core import storage
from sam3_core.errors import InputError

logger = logging.getLogger(__name__)

KINDS = {"trainjob": trainjob, "pytorchjob": pytorchjob}
DATASET_PLACEHOLDER = "<dataset_uri>"
# values a pipeline run supplies itself (data prep's output, KFP's run id), settable here
RUN_VALUES = {"dataset_uri": DATASET_PLACEHOLDER, "pipeline_run_id": "render"}


def _split(pairs: list[str]) -> tuple[dict[str, str], list[str]]:
    """The run values (`dataset_uri=`, `pipeline_run_id=`) apart from the pipeline parameters."""
    run_values, parameters = dict(RUN_VALUES), []
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if sep and name in RUN_VALUES:
            run_values[name] = value
        else:
            parameters.append(pair)
    return run_values, parameters


def pipeline_parameters(mode: str, pairs: list[str]) -> dict[str, Any]:
    """Every parameter of the pipeline run, checked by the parameter table, with `training_mode` = `mode`."""
    chosen = parse_arguments(table.RUN, pairs, given={"training_mode": mode})
    if chosen["training_mode"] != mode:
        raise InputError(SOURCE, "training_mode", f"the job kind is the command's argument ({mode}); leave it out")
    params = {**table.defaults(table.RUN), **chosen}
    params["store"] = component_bodies.store_root(params["store"])
    return params


def train_overrides(params: dict[str, Any], dataset_uri: str, pipeline_run_id: str) -> list[str]:
    """The train component's Hydra overrides, composed as `component_bodies._train` composes them
    outside a sweep: the table's train overrides, the wiring, then the user's `train_overrides`."""
    return [
        *table.hydra_overrides("train", params),
        component_bodies.wired("data.uri", dataset_uri, "dataset_uri"),
        component_bodies.wired("output.run_name", component_bodies.run_name(pipeline_run_id), "pipeline_run_id"),
        *params["train_overrides"],
    ]


def render_job(mode: str, settings: PipelineSettings, pairs: list[str]) -> dict[str, Any]:
    """The job manifest of `mode` ("trainjob" or "pytorchjob") for these settings and parameters."""
    module = KINDS[mode]
    run_values, parameter_pairs = _split(pairs)
    params = pipeline_parameters(mode, parameter_pairs)
    store = params["store"]
    if not storage.is_remote(store):
        logger.warning("%s; the manifest below names it as it is", jobs.local_store_message(module.KIND, store))
    if run_values["dataset_uri"] == DATASET_PLACEHOLDER:
        logger.warning("no dataset_uri=: the job trains on the placeholder %s (review only)", DATASET_PLACEHOLDER)
    launch = LaunchSettings.from_settings(settings, getattr(settings, mode))
    # the env the train component gives a launched job: the pipeline run (MLflow parent), experiment and image
    env = {
        "SAM3PIPE_PIPELINE_RUN_ID": run_values["pipeline_run_id"],
        "MLFLOW_EXPERIMENT_NAME": params["mlflow_experiment"],
        "SAM3PIPE_IMAGE": launch.image,
    }
    overrides = train_overrides(params, run_values["dataset_uri"], run_values["pipeline_run_id"])
    job, _ = jobs.training_job(
        module.build_job,
        overrides,
        launch,
        run_values["pipeline_run_id"],
        params["nodes"],
        params["gpus"],
        store,
        env,
        launch.namespace,
    )
    if not launch.namespace:
        job["metadata"].pop("namespace", None)
    return job


def to_yaml(job: dict[str, Any]) -> str:
    """The manifest as YAML, fields in the template's order."""
    return yaml.safe_dump(job, sort_keys=False, width=120)
