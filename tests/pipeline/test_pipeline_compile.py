"""The compiled Kubeflow pipeline: tasks, parameters, caching, GPUs, secrets, and what it must not hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp import components

from pipeline.compile import compile_pipeline
from pipeline.component_bodies import plan_training
from pipeline.settings import load_settings
from sam3_core.errors import ConfigError, InputError

PLANTED_SECRET = "planted-secret-value-9f8e7d"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    monkeypatch = pytest.MonkeyPatch()
    # secrets present in the compiling shell must not leak into the package
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED_SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://user:{PLANTED_SECRET}@mlflow.example.com")
    try:
        settings = load_settings(["image=registry.example.com/sam3pipe:1.2.3", "gpu.node_selector.pool=a100"])
        return compile_pipeline(settings, tmp_path_factory.mktemp("compiled") / "pipeline.yaml")
    finally:
        monkeypatch.undo()


@pytest.fixture(scope="module")
def spec(compiled: Path) -> dict[str, Any]:
    return next(yaml.safe_load_all(compiled.read_text()))


@pytest.fixture(scope="module")
def platform(compiled: Path) -> dict[str, Any]:
    docs = list(yaml.safe_load_all(compiled.read_text()))
    assert len(docs) == 2, "expected the pipeline spec and the Kubernetes platform spec"
    return docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def tasks(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["root"]["dag"]["tasks"]


def container(spec: dict[str, Any], task: str) -> dict[str, Any]:
    executor = spec["components"][f"comp-{task}"]["executorLabel"]
    return spec["deploymentSpec"]["executors"][executor]["container"]


def test_package_loads_back_with_kfp(compiled: Path) -> None:
    loaded = components.load_component_from_file(str(compiled))

    assert loaded.name == "sam3-video-finetune"
    assert {"source", "max_steps", "training_mode", "gpus"} <= set(loaded.component_spec.inputs)


def test_dag_is_checks_then_data_prep_train_predict_evaluate(spec) -> None:
    dag = tasks(spec)

    assert {"check-parameters", "data-prep-plan", "data-prep", "train", "predict", "evaluate"} <= set(dag)
    assert dag["data-prep-plan"]["dependentTasks"] == ["check-parameters"]
    assert set(dag["train"]["dependentTasks"]) == {"data-prep", "check-parameters"}
    assert "train" in dag["predict"]["dependentTasks"]
    assert "predict" in dag["evaluate"]["dependentTasks"]


def test_the_base_model_is_predicted_evaluated_compared_and_the_best_checkpoint_exported(spec) -> None:
    dag = tasks(spec)
    base_predict, base_evaluate = dag["predict-2"], dag["evaluate-2"]

    assert set(dag) - {"check-parameters", "data-prep-plan", "data-prep", "train", "predict", "evaluate"} == {
        "train-tracker",
        "predict-2",
        "evaluate-2",
        "compare",
        "export",
    }
    assert base_predict["inputs"]["parameters"]["role"]["runtimeValue"]["constant"] == "base"
    assert base_predict["inputs"]["parameters"]["checkpoint_uri"]["componentInputParameter"] == "base_checkpoint"
    assert "predict-2" in base_evaluate["dependentTasks"]
    assert {"evaluate", "evaluate-2"} <= set(dag["compare"]["dependentTasks"])
    assert dag["export"]["inputs"]["parameters"]["checkpoint_uri"]["taskOutputParameter"] == {
        "outputParameterKey": "best_checkpoint_uri",
        "producerTask": "train",
    }


def test_the_tracker_stage_trains_on_the_detectors_best_checkpoint_and_feeds_the_export(spec) -> None:
    dag = tasks(spec)
    tracker = dag["train-tracker"]["inputs"]["parameters"]

    assert tracker["checkpoint_uri"]["taskOutputParameter"] == {
        "outputParameterKey": "best_checkpoint_uri",
        "producerTask": "train",
    }
    assert tracker["tracker_steps"]["componentInputParameter"] == "tracker_steps"
    assert dag["export"]["inputs"]["parameters"]["tracker_checkpoint_uri"]["taskOutputParameter"] == {
        "outputParameterKey": "best_checkpoint_uri",
        "producerTask": "train-tracker",
    }


def test_pipeline_parameters_default_to_the_demo(spec) -> None:
    params = spec["root"]["inputDefinitions"]["parameters"]

    assert params["source"]["defaultValue"] == "synthetic"
    assert params["model_preset"]["defaultValue"] == "tiny"
    assert params["training_mode"]["defaultValue"] == "pod"
    assert params["base_checkpoint"]["defaultValue"] == ""
    assert params["tracker_steps"]["defaultValue"] == 0
    assert params["gpus"]["parameterType"] == "NUMBER_INTEGER"
    assert {"lr", "batch_size", "frames_per_clip", "freeze_prefixes", "store", "mlflow_experiment", "nodes"} <= set(
        params
    )


def test_only_data_prep_is_cached(spec) -> None:
    caching = {name: task["cachingOptions"].get("enableCache", False) for name, task in tasks(spec).items()}

    # the shards and the merge inside "data-prep" reuse the plan's published dataset themselves
    assert caching == {
        "check-parameters": False,
        "data-prep-plan": True,
        "data-prep": False,
        "train": False,
        "train-tracker": False,
        "predict": False,
        "evaluate": False,
        "predict-2": False,
        "evaluate-2": False,
        "compare": False,
        "export": False,
    }


def test_train_gpus_come_from_the_plan_and_predict_gpus_from_a_parameter(spec) -> None:
    train_gpus = container(spec, "train")["resources"]["accelerator"]
    predict_gpus = container(spec, "predict")["resources"]["accelerator"]

    assert train_gpus["resourceType"] == predict_gpus["resourceType"] == "nvidia.com/gpu"
    assert tasks(spec)["train"]["inputs"]["parameters"]["pipelinechannel--check-parameters-pod_gpus"][
        "taskOutputParameter"
    ] == {
        "outputParameterKey": "pod_gpus",
        "producerTask": "check-parameters",
    }
    assert "predict_gpus" in predict_gpus["resourceCount"]
    for component in ("data-prep-plan", "data-prep-shard", "data-prep-merge"):
        assert "accelerator" not in container(spec, component).get("resources", {})


def test_gpu_components_get_node_placement_and_shared_memory(platform) -> None:
    for component in ("exec-train", "exec-train-tracker", "exec-predict"):
        assert platform[component]["nodeSelector"]["labels"] == {"pool": "a100"}
        assert platform[component]["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert platform[component]["emptyDirMounts"] == [
            {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "16Gi", "volumeName": "dshm"}
        ]
    assert "nodeSelector" not in platform["exec-evaluate"]


def test_every_component_gets_object_store_credentials_from_the_kfp_secret(platform) -> None:
    for component in (
        "exec-data-prep-plan",
        "exec-data-prep-shard",
        "exec-data-prep-merge",
        "exec-train",
        "exec-predict",
        "exec-evaluate",
    ):
        secrets = {s["secretName"]: s for s in platform[component]["secretAsEnv"]}
        keys = {m["secretKey"]: m["envVar"] for m in secrets["mlpipeline-minio-artifact"]["keyToEnv"]}
        assert keys == {"accesskey": "AWS_ACCESS_KEY_ID", "secretkey": "AWS_SECRET_ACCESS_KEY"}
        assert platform[component]["configMapAsEnv"][0]["configMapName"] == "sam3pipe-env"


def test_mlflow_uri_comes_from_a_secret_for_the_tracked_components(platform) -> None:
    tracked = {
        component
        for component, config in platform.items()
        if any(s["secretName"] == "sam3pipe-mlflow" for s in config.get("secretAsEnv", []))
    }

    assert tracked == {
        "exec-train",
        "exec-train-tracker",
        "exec-predict",
        "exec-evaluate",
        "exec-predict-2",
        "exec-evaluate-2",
        "exec-compare",
        "exec-export",
    }


def test_package_holds_no_secret_value(compiled: Path) -> None:
    text = compiled.read_text()

    assert PLANTED_SECRET not in text
    assert "AKIA" not in text


def test_components_run_the_configured_image_and_install_nothing(spec) -> None:
    for executor in spec["deploymentSpec"]["executors"].values():
        component = executor["container"]
        assert component["image"] == "registry.example.com/sam3pipe:1.2.3"
        assert "pip install" not in " ".join(component["command"] + component.get("args", []))


def test_timeouts_and_retries_follow_the_settings(spec, platform) -> None:
    settings = load_settings()

    assert platform["exec-train"]["activeDeadlineSeconds"] == str(settings.train.timeout_s)
    assert tasks(spec)["train"]["retryPolicy"]["maxRetryCount"] == settings.train.retries
    assert tasks(spec)["data-prep-plan"]["retryPolicy"]["maxRetryCount"] == settings.data_prep.retries
    assert "retryPolicy" not in tasks(spec)["check-parameters"]


@pytest.mark.parametrize("mode", ["pytorchjob", "trainjob"])
def test_job_launch_settings_reference_secrets_by_name(spec, mode: str) -> None:
    launch = tasks(spec)["train"]["inputs"]["parameters"]["launch"]["runtimeValue"]["constant"][mode]

    assert launch["image"] == "registry.example.com/sam3pipe:1.2.3"
    refs = {e["name"]: e["valueFrom"] for e in launch["env"]}
    assert refs["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "mlpipeline-minio-artifact", "key": "secretkey"}}


def test_trainjob_launch_settings_name_the_runtime(spec) -> None:
    launch = tasks(spec)["train"]["inputs"]["parameters"]["launch"]["runtimeValue"]["constant"]

    assert launch["trainjob"]["runtime"] == load_settings().trainjob.runtime
    assert launch["pytorchjob"]["backoff_limit"] == load_settings().pytorchjob.backoff_limit


@pytest.mark.parametrize(("mode", "gpus", "pod_gpus"), [("pod", 4, 4), ("pytorchjob", 4, 0), ("trainjob", 4, 0)])
def test_the_train_pod_requests_gpus_only_when_it_trains_itself(mode: str, gpus: int, pod_gpus: int) -> None:
    assert plan_training({"training_mode": mode, "gpus": gpus, "nodes": 1}) == pod_gpus


@pytest.mark.parametrize(
    ("mode", "gpus", "nodes", "field"),
    [
        ("slurm", 1, 1, "training_mode"),
        ("pod", -1, 1, "gpus"),
        ("pod", 1, 2, "nodes"),
        ("pytorchjob", 1, 0, "nodes"),
        ("trainjob", 1, 0, "nodes"),
    ],
)
def test_bad_training_parameters_are_refused_before_training(mode: str, gpus: int, nodes: int, field: str) -> None:
    with pytest.raises(InputError, match=f"pipeline parameters: {field}:"):
        plan_training({"training_mode": mode, "gpus": gpus, "nodes": nodes})


def test_the_launchers_give_up_on_their_job_before_kfp_kills_the_train_component() -> None:
    settings = load_settings()

    assert settings.pytorchjob.timeout_s < settings.train.timeout_s
    assert settings.trainjob.timeout_s < settings.train.timeout_s


@pytest.mark.parametrize("mode", ["pytorchjob", "trainjob"])
def test_a_job_timeout_not_below_the_train_component_timeout_is_refused(mode: str) -> None:
    with pytest.raises(ConfigError, match=rf"{mode}.timeout_s \(7200\) must be smaller than train.timeout_s \(3600\)"):
        load_settings(
            ["pytorchjob.timeout_s=60", "trainjob.timeout_s=60", f"{mode}.timeout_s=7200", "train.timeout_s=3600"]
        )
