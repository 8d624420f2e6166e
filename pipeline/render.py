"""`sam3pipe render-job trainjob|pytorchjob`: the training job the train component would create, as YAML.

For review, and for GitOps (commit it, let Argo CD or Flux apply it): the manifest is built by the
same code as the launcher's (pipeline/jobs.py with pipeline/trainjob.py or pipeline/pytorchjob.py),
from the same compile-time settings (`--set key=value`) and pipeline parameters (`name=value`),
plus two values a pipeline run would supply itself:

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

from pipeline import jobs, pytorchjob, steps, trainjob
from pipeline.arguments import SOURCE, parse_arguments
from pipeline.jobs import LaunchSettings
from pipeline.pipeline import build_pipeline
from pipeline.settings import PipelineSettings
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


def pipeline_parameters(settings: PipelineSettings, pairs: list[str]) -> dict[str, Any]:
    """Every pipeline parameter: its default, or the value given as `name=value`."""
    pipeline = build_pipeline(settings)
    defaults = {name: spec.default for name, spec in (pipeline.component_spec.inputs or {}).items()}
    return {**defaults, **parse_arguments(pipeline, pairs)}


def train_overrides(params: dict[str, Any], dataset_uri: str, store: str, pipeline_run_id: str) -> list[str]:
    """The train component's Hydra overrides for these parameters, as `steps.train` builds them.

    Kept equal to steps.train's list (tests/pipeline/test_render.py compares them); once the
    parameter table owns that list, this reads it from there.
    """
    overrides = [
        f"data.uri={steps.hydra_value(dataset_uri, 'dataset_uri')}",
        f"model={params['model_preset']}",
        f"train.max_steps={params['max_steps']}",
        f"optim.lr={params['lr']}",
        f"data.batch_size={params['batch_size']}",
        f"data.clips.frames_per_clip={params['frames_per_clip']}",
        f"model.freeze={steps.hydra_list(params['freeze_prefixes'], 'freeze_prefixes')}",
        f"output.store={steps.hydra_value(store, 'store')}",
        f"output.run_name={steps.hydra_value(steps.run_name(pipeline_run_id), 'pipeline_run_id')}",
        f"train.best_metric={steps.DEFAULT_BEST_METRIC}",
    ]
    if params["checkpoint"]:
        overrides.append(f"model.uri={steps.hydra_value(params['checkpoint'], 'checkpoint')}")
    return [*overrides, *params["train_overrides"]]


def render_job(mode: str, settings: PipelineSettings, pairs: list[str]) -> dict[str, Any]:
    """The job manifest of `mode` ("trainjob" or "pytorchjob") for these settings and parameters."""
    module = KINDS[mode]
    run_values, parameter_pairs = _split(pairs)
    params = pipeline_parameters(settings, parameter_pairs)
    if params["training_mode"] not in ("pod", mode):
        raise InputError(SOURCE, "training_mode", f"the job kind is the command's argument ({mode}); leave it out")
    steps.plan_training(mode, params["gpus"], params["nodes"])
    store = steps.store_root(params["store"])
    if not storage.is_remote(store):
        logger.warning("%s; the manifest below names it as it is", jobs.local_store_message(module.KIND, store))
    if run_values["dataset_uri"] == DATASET_PLACEHOLDER:
        logger.warning("no dataset_uri=: the job trains on the placeholder %s (review only)", DATASET_PLACEHOLDER)
    launch = LaunchSettings.from_settings(settings, getattr(settings, mode))
    # the env steps.train gives a launched job: the pipeline run (MLflow parent), experiment and image
    env = {
        "SAM3PIPE_PIPELINE_RUN_ID": run_values["pipeline_run_id"],
        "MLFLOW_EXPERIMENT_NAME": params["mlflow_experiment"],
        "SAM3PIPE_IMAGE": launch.image,
    }
    overrides = train_overrides(params, run_values["dataset_uri"], store, run_values["pipeline_run_id"])
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
