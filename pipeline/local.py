"""Run the whole pipeline on this machine with kfp.local, in the current Python environment.

Each component runs as a subprocess of this interpreter (SubprocessRunner(use_venv=False)), exactly
the component code that runs in the cluster's pods; or, with a DockerRunner (pipeline/docker_runner.py),
as a container of the project's image. kfp.local reads only the pipeline spec: the
kfp-kubernetes settings (secrets, GPUs, node placement, timeouts) apply on a cluster and are
ignored here, and components see this shell's environment (SAM3PIPE_STORE, MLFLOW_TRACKING_URI, AWS_*).
"""

from __future__ import annotations

import builtins
import dataclasses
import logging
import re
import warnings
from pathlib import Path
from typing import Any

from kfp import local as kfp_local
from kfp.dsl.graph_component import GraphComponent

from pipeline.arguments import parse_arguments
from pipeline.pipeline import build_pipeline, build_sweep_pipeline
from pipeline.settings import ComponentSettings, PipelineSettings
from sam3_core import pipeline_parameters as table
from sam3_core import storage
from sam3_core.errors import Sam3PipeError
from sam3_core.mlflow_records.settings import home

logger = logging.getLogger(__name__)


class LocalRunError(Sam3PipeError):
    """A component of the local run failed; its own log lines above say why."""


# kfp.local's folder for component outputs, below the local state folder
PIPELINE_ROOT_NAME = "kfp-local"


def default_pipeline_root() -> Path:
    """`<SAM3PIPE_HOME, default .sam3pipe>/kfp-local`: the local state stays where SAM3PIPE_HOME says."""
    return home() / PIPELINE_ROOT_NAME


def run_pipeline(
    pipeline: GraphComponent,
    arguments: dict[str, Any],
    pipeline_root: Path | None,
    runner: kfp_local.DockerRunner | None = None,
) -> Any:
    """Run a pipeline with kfp.local in this environment; the finished pipeline task (its outputs).

    `pipeline_root` None: `default_pipeline_root()`.

    kfp.local indents a component's output by swapping `builtins.print` for its duration; components
    of a ParallelFor run in threads, and one can restore another's swap, leaving every later print
    of the process indented (a CLI's JSON line included). The print of before the run is put back.
    """
    print_before = builtins.print
    try:
        return _run(pipeline, arguments, pipeline_root or default_pipeline_root(), runner)
    finally:
        builtins.print = print_before


def _run(
    pipeline: GraphComponent, arguments: dict[str, Any], pipeline_root: Path, runner: kfp_local.DockerRunner | None
) -> Any:
    pipeline_root.mkdir(parents=True, exist_ok=True)
    kfp_local.init(
        runner=runner or kfp_local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        raise_on_error=True,
    )
    with warnings.catch_warnings():
        # kfp.local warns that the project image "may not be a Python image"; locally no image is used
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        try:
            task = pipeline(**arguments)
        except (RuntimeError, ValueError) as exc:
            # a failed component ends kfp.local with RuntimeError; one that runs after a failure
            # (the sweep's last component) with ValueError "Tried to get output ... from task ..."
            if "finished with status" not in str(exc) and "Tried to get output" not in str(exc):
                raise
            plain = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # kfp.local colours its messages
            raise LocalRunError(f"local run: {plain}; the failing component's log is above") from exc
    return task


def without_retries(settings: PipelineSettings) -> PipelineSettings:
    """The settings with every component run once: retries (with minutes of backoff) are for a cluster's
    transient failures, such as a preempted node; on this machine a failure repeats."""
    pods = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    once = {
        name: dataclasses.replace(pod, retries=0) for name, pod in pods.items() if isinstance(pod, ComponentSettings)
    }
    return dataclasses.replace(settings, **once)


def run_local(
    settings: PipelineSettings,
    pairs: list[str],
    pipeline_root: Path | None,
    runner: kfp_local.DockerRunner | None = None,
) -> dict[str, float]:
    """Run every component here (or in containers) with `pairs` as pipeline parameters; return the evaluation metrics."""
    arguments = parse_arguments(table.RUN, pairs)
    return dict(run_pipeline(build_pipeline(without_retries(settings)), arguments, pipeline_root, runner).output)


def run_local_sweep(
    settings: PipelineSettings, spec: dict[str, Any], pairs: list[str], pipeline_root: Path | None
) -> dict[str, Any]:
    """Run a sweep here: `spec` (sweep.load_spec) as the trials, `pairs` as the other parameters.

    Returns the last component's outcome (best trial, metric, checkpoint, table URI), as it wrote it to
    the store (KFP's own copy of a dict output turns every number into a float).
    """
    arguments = parse_arguments(table.SWEEP, pairs, spec)
    outcome = run_pipeline(build_sweep_pipeline(without_retries(settings), spec), arguments, pipeline_root).output
    return storage.read_json(outcome["outcome_uri"])


def metrics_table(metrics: dict[str, Any]) -> str:
    """The metrics as an aligned two-column text table, sorted by name."""
    if not metrics:
        return "(no metrics)"
    width = max(len(name) for name in metrics)
    rows = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    rows += [f"{name:<{width}}  {float(value):.4f}" for name, value in sorted(metrics.items())]
    return "\n".join(rows)
