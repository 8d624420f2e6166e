"""`sam3pipe render-job`: the printed TrainJob / PyTorchJob is the one the train component would create.

The printed YAML is checked against the vendored CRDs (Kubeflow Trainer v2.3.0's TrainJob, the
Training Operator v1.9.0's PyTorchJob), against the shipped ClusterTrainingRuntime it references,
and against what the train component itself hands the launcher for the same parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import yaml

from pipeline import component_bodies, jobs
from pipeline.cli import main
from pipeline.settings import load_settings
from sam3_core import pipeline_parameters as table
from tests.fixtures.paths import REPO
from tests.fixtures.strategic_merge import merge

RUNTIME_MANIFEST = REPO / "manifests/trainer-v2/cluster-training-runtime.yaml"
STORE = "s3://mlpipeline/sam3pipe"


def render(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["render-job", *argv]) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.fixture(autouse=True)
def cluster_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAM3PIPE_STORE", STORE)


def test_rendered_trainjob_validates_against_trainer_v2_3(capsys, trainjob_schema) -> None:
    job = render(capsys, "trainjob")

    assert job["kind"] == "TrainJob" and trainjob_schema.errors(job) == []
    assert "namespace" not in job["metadata"]


def test_rendered_trainjob_references_the_runtime_manifest_and_patches_it(capsys) -> None:
    job = render(capsys, "trainjob", "nodes=2", "gpus=8")
    runtime = yaml.safe_load(RUNTIME_MANIFEST.read_text(encoding="utf-8"))
    (patch,) = job["spec"]["runtimePatches"]

    merged = merge(runtime["spec"]["template"]["spec"], patch["trainingRuntimeSpec"]["template"]["spec"])

    assert job["spec"]["runtimeRef"]["name"] == runtime["metadata"]["name"]
    assert [r["name"] for r in merged["replicatedJobs"]] == ["node"]
    pod = merged["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "sam3pipe-trainer" and pod["securityContext"]["runAsUser"] == 10001
    assert (job["spec"]["trainer"]["numNodes"], job["spec"]["trainer"]["numProcPerNode"]) == (2, 8)


def test_rendered_pytorchjob_validates_against_the_training_operator_crd(capsys, pytorchjob_schema) -> None:
    job = render(capsys, "pytorchjob", "nodes=3", "gpus=4")

    assert job["kind"] == "PyTorchJob" and pytorchjob_schema.errors(job) == []
    # one Worker pod per node, joined by torchrun's rendezvous (no Master replica)
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Worker"]
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3


def test_settings_and_parameters_shape_the_job(capsys, trainjob_schema) -> None:
    job = render(
        capsys,
        "trainjob",
        "--set",
        "image=registry.example.com/sam3pipe-cuda:1.0",
        "--set",
        "trainjob.namespace=team-a",
        "max_steps=50",
        "dataset_uri=s3://mlpipeline/sam3pipe/datasets/abc",
        "pipeline_run_id=nightly-7",
    )

    assert trainjob_schema.errors(job) == []
    assert job["metadata"] == {**job["metadata"], "name": "sam3pipe-nightly-7", "namespace": "team-a"}
    trainer = job["spec"]["trainer"]
    assert trainer["image"] == "registry.example.com/sam3pipe-cuda:1.0"
    assert "data.uri='s3://mlpipeline/sam3pipe/datasets/abc'" in trainer["args"]
    assert "train.max_steps=50" in trainer["args"]
    assert f"{STORE}/pipeline-runs/sam3pipe-nightly-7/train-outputs.json" in trainer["args"]


def test_without_a_dataset_the_placeholder_is_named_in_a_warning(capsys, caplog) -> None:
    job = render(capsys, "trainjob")

    assert "data.uri='<dataset_uri>'" in job["spec"]["trainer"]["args"]
    assert "no dataset_uri=" in caplog.text


def test_the_rendered_job_is_the_one_the_train_component_would_create(capsys, monkeypatch) -> None:
    launched: dict[str, Any] = {}

    def capture(
        kind, build_job, overrides, launch, run_id, nodes, gpus, store, env, api=None, stage=""
    ) -> dict[str, str]:
        launched["job"], _ = jobs.training_job(
            build_job, overrides, launch, run_id, nodes, gpus, store, env, launch.namespace, stage
        )
        return {"run_uri": "r", "best_checkpoint_uri": "b", "last_checkpoint_uri": "l"}

    monkeypatch.setattr(jobs, "launch_training", capture)
    monkeypatch.setattr(component_bodies, "publish_pointer", lambda artifact, values: None)
    # the train component sets these for its child processes; restored after the test
    for name in ("SAM3PIPE_PIPELINE_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(["trainjob.namespace=team-a"])
    launch = {"trainjob": dataclasses.asdict(jobs.LaunchSettings.from_settings(settings, settings.trainjob))}
    params = {
        **table.defaults(table.RUN),
        "checkpoint": "s3://c/ckpt.pt",
        "max_steps": 30,
        "lr": 3e-4,
        "frames_per_clip": 4,
        "freeze_prefixes": ["backbone"],
        "store": STORE,
        "mlflow_experiment": "exp",
        "training_mode": "trainjob",
        "gpus": 8,
        "nodes": 2,
        "train_overrides": ["train.log_every=5"],
    }
    wiring = {"launch": launch, "model": None, "dataset_uri": "s3://d/ds", "pipeline_run_id": "run-9"}
    component_bodies.train({**params, **wiring})
    rendered = render(
        capsys,
        "trainjob",
        "--set",
        "trainjob.namespace=team-a",
        "dataset_uri=s3://d/ds",
        "checkpoint=s3://c/ckpt.pt",
        "max_steps=30",
        "lr=0.0003",
        "frames_per_clip=4",
        'freeze_prefixes=["backbone"]',
        "gpus=8",
        "nodes=2",
        "pipeline_run_id=run-9",
        "mlflow_experiment=exp",
        'train_overrides=["train.log_every=5"]',
    )

    assert rendered == launched["job"]


def test_an_unknown_parameter_is_one_error_line(capsys) -> None:
    assert main(["render-job", "trainjob", "max_stepz=5"]) == 2


def test_a_conflicting_training_mode_is_refused(capsys) -> None:
    assert main(["render-job", "trainjob", "training_mode=pytorchjob"]) == 2
