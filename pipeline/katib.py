"""A sweep as a Katib Experiment, for clusters with Katib: `sam3pipe compile-experiment`.

Katib searches the sweep's grid itself (algorithm `grid`, every setting a categorical list) and runs
each trial as a Kubernetes Job: one pod that trains (torchrun over its GPUs), predicts and evaluates
with the same component code as the pipeline, on a dataset prepared beforehand (`--dataset-uri`). The
trial prints its evaluation metrics on stdout as `sam3pipe-metric <name>=<value>`, which Katib's
StdOut collector reads (a prefix no other log line has); Katib picks the best trial by the sweep's
metric. In MLflow the trials nest under one sweep run named after the experiment, as in a pipeline
sweep. A failed trial fails its Job; the experiment fails only when every trial failed.

    python -m pipeline.katib --experiment NAME --trial TRIAL --base JSON key=<json value> ...

is a trial's entry point (the Job's command).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline import component_bodies, sweep
from pipeline.arguments import parse_arguments
from pipeline.jobs import secret_env
from pipeline.settings import PipelineSettings
from sam3_core import pipeline_parameters as table
from sam3_core.errors import InputError, Sam3PipeError

logger = logging.getLogger(__name__)

API_VERSION, KIND = "kubeflow.org/v1beta1", "Experiment"
CONTAINER = "training"
METRIC_PREFIX = "sam3pipe-metric"
# Katib's StdOut collector: group 1 the name, group 2 the value
METRICS_FORMAT = rf"{METRIC_PREFIX} ([\w|-]+)=([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"
ENTRY_MODULE = "pipeline.katib"
TRIAL_NAME = "trialName"
# the Experiment's objective: Katib's, not a parameter its trials take
OBJECTIVE = ("sweep_metric", "sweep_mode")
# the pipeline parameters a Katib trial takes (it runs in one pod: no data prep, no jobs), at their defaults
BASE_PARAMETERS = {name: value for name, value in table.defaults(table.KATIB).items() if name not in OBJECTIVE}


def parse_parameters(pairs: list[str]) -> tuple[dict[str, Any], str, str]:
    """`name=value` pairs typed and checked by the parameter table (lists as JSON): (base, metric, mode)."""
    values = {**table.defaults(table.KATIB), **parse_arguments(table.KATIB, pairs)}
    metric, mode = (values.pop(name) for name in OBJECTIVE)
    return base_parameters(values), metric, mode


def parameter_name(key: str) -> str:
    """A setting's name in Katib's search space (`optim.weight_decay` -> `optim_weight_decay`)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", key)


def base_parameters(values: Mapping[str, Any]) -> dict[str, Any]:
    """The trials' shared pipeline parameters: the defaults with `values` on top, unknown names refused."""
    unknown = sorted(set(values) - set(BASE_PARAMETERS))
    if unknown:
        raise InputError(
            "command line", unknown[0], f"not a parameter of a Katib trial; choose from {sorted(BASE_PARAMETERS)}"
        )
    return {**BASE_PARAMETERS, **values}


def build_experiment(
    settings: PipelineSettings,
    name: str,
    namespace: str,
    grid: Mapping[str, list[Any]],
    dataset_uri: str,
    base: Mapping[str, Any],
    metric: str,
    mode: str,
) -> dict[str, Any]:
    """The Experiment: the grid as Katib's search space, one Job per trial, the metric from stdout."""
    if not grid:
        raise InputError("sweep", "sweep_grid", "Katib searches a grid: give the spec as {setting: [values]}")
    combinations = sweep.expand([], grid)
    objective = sweep.check_objective(metric, mode)
    names = {key: parameter_name(key) for key in grid}
    search_space = [
        {
            "name": names[key],
            "parameterType": "categorical",
            # JSON, so a trial gets numbers, strings and lists back exactly
            "feasibleSpace": {"list": list(dict.fromkeys(json.dumps(c[key]) for c in combinations))},
        }
        for key in grid
    ]
    trial_parameters = [
        {"name": TRIAL_NAME, "reference": "${trialSpec.Name}", "description": "the trial's name"},
        *({"name": names[key], "reference": names[key], "description": f"the trial's {key}"} for key in grid),
    ]
    command = [
        "python",
        "-m",
        ENTRY_MODULE,
        "--experiment",
        name,
        "--trial",
        f"${{trialParameters.{TRIAL_NAME}}}",
        "--dataset-uri",
        dataset_uri,
        "--metric",
        objective,
        "--base",
        json.dumps(dict(base), sort_keys=True),
        *(f"{key}=${{trialParameters.{names[key]}}}" for key in grid),
    ]
    parallel = settings.sweep.parallelism or len(combinations)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            **({"namespace": namespace} if namespace else {}),
            "labels": {"app.kubernetes.io/name": "sam3pipe"},
        },
        "spec": {
            "objective": {
                "type": "maximize" if mode == "max" else "minimize",
                "objectiveMetricName": objective,
                "additionalMetricNames": [m for m in sweep.HEADLINE_METRICS if m != objective],
            },
            "algorithm": {"algorithmName": "grid"},
            "parallelTrialCount": min(parallel, len(combinations)),
            "maxTrialCount": len(combinations),
            # the experiment fails only when every trial failed
            "maxFailedTrialCount": len(combinations) - 1,
            "parameters": search_space,
            "metricsCollectorSpec": {
                "collector": {"kind": "StdOut"},
                "source": {"filter": {"metricsFormat": [METRICS_FORMAT]}},
            },
            "trialTemplate": {
                "primaryContainerName": CONTAINER,
                "trialParameters": trial_parameters,
                "trialSpec": _trial_job(settings, command, int(base["gpus"])),
            },
        },
    }


def _trial_job(settings: PipelineSettings, command: list[str], gpus: int) -> dict[str, Any]:
    """A trial: one pod that trains, predicts and evaluates (a batch/v1 Job, as Katib runs it)."""
    gpu, pod_settings = settings.gpu, settings.train
    limits: dict[str, Any] = {"memory": pod_settings.memory}
    if gpus > 0:
        limits[gpu.accelerator_type] = gpus
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": settings.trainjob.service_account,
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001},
        "containers": [
            {
                "name": CONTAINER,
                "image": settings.image,
                "command": command,
                "env": [*secret_env(settings), {"name": "SAM3PIPE_IMAGE", "value": settings.image}],
                "resources": {"requests": {"cpu": pod_settings.cpu, "memory": pod_settings.memory}, "limits": limits},
                "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
            }
        ],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": gpu.shm_size}}],
    }
    if gpu.node_selector:
        pod["nodeSelector"] = dict(gpu.node_selector)
    if gpu.tolerations:
        pod["tolerations"] = [{k: v for k, v in dataclasses.asdict(t).items() if v} for t in gpu.tolerations]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "spec": {"backoffLimit": 0, "activeDeadlineSeconds": pod_settings.timeout_s, "template": {"spec": pod}},
    }


class _LocalArtifact:
    """Where a component writes its output pointer; a Katib trial keeps them in a temporary folder."""

    def __init__(self, path: Path) -> None:
        self.path, self.metadata = str(path), {}


class _Metrics:
    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def log_metric(self, metric: str, value: float) -> None:
        self.values[metric] = value


def run_trial(
    experiment: str, trial_name: str, dataset_uri: str, metric: str, base: Mapping[str, Any], assignments: list[str]
) -> dict[str, float]:
    """Train, predict and evaluate one trial in this pod; record it in MLflow; return its metrics."""
    from sam3_core.mlflow_records import sweeps

    settings: dict[str, Any] = {}
    for pair in assignments:
        key, sep, text = pair.partition("=")
        try:
            if not sep:
                raise ValueError(pair)
            settings[key] = json.loads(text)
        except ValueError:
            raise InputError("command line", key or pair, f"expected key=<JSON value>, got {pair!r}") from None
    overrides = sweep.expand([settings], {})[0] if settings else {}
    trial = {
        "trial_id": trial_name,
        "run_name": f"{trial_name} {sweep.label(overrides)}"[:120],
        "params": overrides,
        "dataset_uri": dataset_uri,
        "sweep_id": experiment,
        "pipeline_run_id": trial_name,
    }
    params = sweep.parameters(trial, base)
    tracking = component_bodies.trial_tracking(trial, params["registered_model"])
    result = sweeps.TrialResult(trial_name, trial_name, trial["run_name"], overrides, succeeded=False)
    # every component as in a pipeline run in one pod, the trial's settings already in `params`
    wiring = {"dataset_uri": dataset_uri, "pipeline_run_id": trial_name, "training_mode": "pod", "nodes": 1}
    with tempfile.TemporaryDirectory(prefix="sam3pipe-trial-") as tmp:
        try:
            run_uri, checkpoint_uri, _ = component_bodies.train(
                {
                    **params,
                    **wiring,
                    "train_overrides": [*params["train_overrides"], *sweep.hydra_overrides(trial), *tracking],
                    "launch": {},
                    "model": _LocalArtifact(Path(tmp, "model")),
                }
            )
            predictions_uri = component_bodies.predict(
                {
                    **params,
                    **wiring,
                    "predict_gpus": params["gpus"],
                    "predict_overrides": [*params["predict_overrides"], *tracking],
                    "checkpoint_uri": checkpoint_uri,
                    "run_uri": run_uri,
                    "predictions": _LocalArtifact(Path(tmp, "pred")),
                }
            )
            _, metrics = component_bodies.evaluate(
                {
                    **params,
                    **wiring,
                    "evaluate_overrides": [*params["evaluate_overrides"], *tracking],
                    "predictions_uri": predictions_uri,
                    "run_uri": run_uri,
                    "checkpoint_uri": checkpoint_uri,
                    "metrics": _Metrics(),
                }
            )
        except Exception as exc:  # recorded in MLflow, then the Job fails and Katib counts the trial failed
            failed = sweep.failed("trial", exc)["error"]
            sweeps.record_trial(params["mlflow_experiment"], experiment, dataclasses.replace(result, error=failed))
            raise
    if metric not in metrics:
        raise InputError("katib", "metric", f"{metric!r} is not an evaluation metric; choose from {sorted(metrics)}")
    done = dataclasses.replace(result, succeeded=True, metrics=metrics, checkpoint_uri=checkpoint_uri)
    sweeps.record_trial(params["mlflow_experiment"], experiment, done)
    return metrics


def metric_lines(metrics: Mapping[str, float]) -> list[str]:
    """What Katib's StdOut collector reads (METRICS_FORMAT)."""
    return [f"{METRIC_PREFIX} {name}={float(value)!r}" for name, value in sorted(metrics.items())]


def main(argv: list[str] | None = None) -> int:
    """A Katib trial's entry point: run the trial, print its metrics; exit 2 on an error the user can fix."""
    parser = argparse.ArgumentParser(prog=f"python -m {ENTRY_MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True, help="the Katib experiment (the MLflow sweep id)")
    parser.add_argument("--trial", required=True, help="the trial's name (its pipeline run id)")
    parser.add_argument("--dataset-uri", required=True)
    parser.add_argument("--metric", required=True, help="the objective metric, which must be reported")
    parser.add_argument("--base", required=True, help="the trials' shared pipeline parameters, JSON")
    parser.add_argument("assignments", nargs="*", metavar="key=<json value>")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        base = base_parameters(json.loads(args.base))
        metrics = run_trial(args.experiment, args.trial, args.dataset_uri, args.metric, base, args.assignments)
    except (Sam3PipeError, ValueError) as exc:
        logger.error("error: %s", exc)
        return 2
    print("\n".join(metric_lines(metrics)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
