"""The compiled sweep pipeline: one data prep, a ParallelFor over the planned trials with the
configured parallelism, a last component that runs even after failed trials, and no secret values."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.compile import compile_pipeline
from pipeline.pipeline import build_pipeline, build_sweep_pipeline
from pipeline.settings import load_settings
from pipeline.sweep import load_spec

PLANTED_SECRET = "planted-secret-value-5e4d3c"
SPEC = '{"lr": [0.0001, 0.0003], "frames_per_clip": [2, 4]}'


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    monkeypatch = pytest.MonkeyPatch()
    # secrets present in the compiling shell must not leak into the package
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED_SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://user:{PLANTED_SECRET}@mlflow.example.com")
    try:
        settings = load_settings(["image=registry.example.com/sam3pipe:1.2.3", "sweep.parallelism=3"])
        path = compile_pipeline(settings, tmp_path_factory.mktemp("sweep") / "sweep.yaml", load_spec(SPEC))
    finally:
        monkeypatch.undo()
    text = path.read_text()
    assert PLANTED_SECRET not in text
    return list(yaml.safe_load_all(text))


@pytest.fixture(scope="module")
def spec(compiled: list[dict[str, Any]]) -> dict[str, Any]:
    return compiled[0]


@pytest.fixture(scope="module")
def executors(compiled: list[dict[str, Any]]) -> dict[str, Any]:
    return compiled[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def root_tasks(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["root"]["dag"]["tasks"]


def loop_task(spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    (name,) = [name for name, task in root_tasks(spec).items() if "parameterIterator" in task]
    return name, root_tasks(spec)[name]


def test_one_data_prep_then_a_parallel_for_over_the_planned_trials(spec) -> None:
    name, loop = loop_task(spec)

    assert set(root_tasks(spec)) == {
        "check-parameters",
        "data-prep-plan",
        "data-prep",
        "plan-sweep",
        name,
        "select-best",
    }
    assert root_tasks(spec)["data-prep-plan"]["dependentTasks"] == ["check-parameters"]
    assert root_tasks(spec)["plan-sweep"]["dependentTasks"] == ["data-prep"]
    assert loop["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--plan-sweep-Output"}
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    # a trial runs the pipeline's own train, predict and evaluate components
    assert set(body) == {"plan-training", "train", "predict", "evaluate"}
    assert "train" in body["predict"]["dependentTasks"]
    assert "predict" in body["evaluate"]["dependentTasks"]


def test_the_trials_run_with_the_configured_parallelism(spec) -> None:
    assert loop_task(spec)[1]["iteratorPolicy"] == {"parallelismLimit": 3}


def test_the_best_trial_is_picked_after_the_loop_even_when_trials_failed(spec) -> None:
    select = root_tasks(spec)["select-best"]

    assert loop_task(spec)[0] in select["dependentTasks"]
    assert select["triggerPolicy"] == {"strategy": "ALL_UPSTREAM_TASKS_COMPLETED"}


def test_the_spec_is_the_default_of_the_sweep_parameters(spec) -> None:
    params = spec["root"]["inputDefinitions"]["parameters"]

    assert params["sweep_grid"]["defaultValue"] == {"lr": [0.0001, 0.0003], "frames_per_clip": [2, 4]}
    assert params["sweep_trials"].get("defaultValue", []) == []
    assert params["sweep_metric"]["defaultValue"] == "video_mask_mAP_50_95"
    assert params["sweep_mode"]["defaultValue"] == "max"


def test_only_the_data_prep_plan_is_cached(spec) -> None:
    _, loop = loop_task(spec)
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    tasks = {**root_tasks(spec), **body}
    caching = {
        name: task.get("cachingOptions", {}).get("enableCache", False)
        for name, task in tasks.items()
        if name != loop_task(spec)[0]
    }

    # the shards and the merge inside "data-prep" reuse the plan's published dataset themselves
    assert caching == {name: name == "data-prep-plan" for name in caching}


def test_trial_components_get_secrets_by_name_and_gpus_on_gpu_nodes(executors) -> None:
    for component in (
        "exec-plan-sweep",
        "exec-train",
        "exec-predict",
        "exec-evaluate",
        "exec-select-best",
    ):
        names = {s["secretName"] for s in executors[component]["secretAsEnv"]}
        assert names == {"mlpipeline-minio-artifact", "sam3pipe-mlflow"}, component
    for component in ("exec-train", "exec-predict"):
        assert executors[component]["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
        assert executors[component]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_trial_training_launches_jobs_with_secret_references(spec) -> None:
    _, loop = loop_task(spec)
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    launch = body["train"]["inputs"]["parameters"]["launch"]["runtimeValue"]["constant"]

    for mode in ("pytorchjob", "trainjob"):
        refs = {e["name"]: e["valueFrom"] for e in launch[mode]["env"]}
        assert refs["MLFLOW_TRACKING_URI"] == {
            "secretKeyRef": {"name": "sam3pipe-mlflow", "key": "MLFLOW_TRACKING_URI"}
        }


def test_the_sweep_pipeline_shares_the_pipeline_parameters_and_their_defaults() -> None:
    settings = load_settings()
    plain = inspect.signature(build_pipeline(settings).pipeline_func).parameters
    sweep = inspect.signature(build_sweep_pipeline(settings).pipeline_func).parameters

    shared = set(plain) & set(sweep)

    assert {name: plain[name].default for name in shared} == {name: sweep[name].default for name in shared}
    assert set(plain) - shared == {"base_checkpoint", "tracker_steps", "tracker_overrides"}


def test_without_a_spec_the_sweep_is_the_demo_grid() -> None:
    params = build_sweep_pipeline(load_settings()).component_spec.inputs

    assert params["sweep_grid"].default == {"lr": [5e-4, 1e-3]}


def test_a_negative_parallelism_is_refused() -> None:
    from sam3_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"sweep.parallelism=-1: must be >= 0"):
        load_settings(["sweep.parallelism=-1"])


def test_compiled_sweep_loads_back_with_kfp(tmp_path: Path) -> None:
    from kfp import components

    path = compile_pipeline(load_settings(), tmp_path / "sweep.yaml", load_spec('[{"lr": 0.001}]'))

    loaded = components.load_component_from_file(str(path))
    assert loaded.name == "sam3-video-finetune-sweep"
    assert {"sweep_trials", "sweep_grid", "sweep_metric", "lr"} <= set(loaded.component_spec.inputs)
