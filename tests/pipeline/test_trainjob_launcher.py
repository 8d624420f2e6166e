"""The TrainJob launcher (training_mode=trainjob, Kubeflow Trainer v2.2+): the TrainJobs it generates,
the check of the cluster's CRD, and the same guarantees as the PyTorchJob launcher (create, watch,
success, failure with the job's reason, SIGTERM clean-up, adoption on retry).

Jobs are checked against Kubeflow Trainer v2.3.0's vendored TrainJob CRD schema (strict about unknown
fields); the runtime patch is merged into the shipped runtime as the Trainer merges it (strategic
merge) and checked against Kubernetes' batch/v1 schema. The launcher talks HTTP to the fake API server
of tests/fixtures/fake_k8s.py serving trainjobs and their CRD, and hands outputs back through a real
(moto) S3 bucket.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
import signal
import subprocess
import sys
import time
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pipeline import jobs, trainjob
from pipeline.jobs import LaunchSettings, TrainingJobError
from pipeline.settings import load_settings
from sam3_core import storage
from sam3_core.errors import ConfigError
from tests.fixtures.fake_k8s import crd_validator
from tests.fixtures.paths import REPO
from tests.fixtures.strategic_merge import merge

RUNTIME_MANIFEST = REPO / "manifests/trainer-v2/cluster-training-runtime.yaml"
# k8s.io/apimachinery's IsDomainPrefixedPath, which the Trainer's webhook applies to a patch's manager
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
HTTP_PATH = re.compile(r"^[A-Za-z0-9/\-._~%!$&'()*+,;=:]+$")


@pytest.fixture
def launch() -> LaunchSettings:
    settings = load_settings(["image=registry.example.com/sam3pipe:1.2.3", "gpu.node_selector.pool=h100"])
    return dataclasses.replace(
        LaunchSettings.from_settings(settings, settings.trainjob),
        namespace="team-a",
        poll_interval_s=0.01,
        timeout_s=30,
    )


def launch_training(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """The train step's launch in trainjob mode."""
    return jobs.launch_training(trainjob.KIND, trainjob.build_job, *args, **kwargs)


def rank0_writes(outputs: dict[str, Any]) -> Any:
    """Play the job's rank 0: write `outputs` where the job's command says to."""

    def write(job: dict[str, Any]) -> None:
        args = job["spec"]["trainer"]["args"]
        storage.write_json(args[args.index("--outputs") + 1], outputs)

    return write


def node_override(job: dict[str, Any]) -> dict[str, Any]:
    """The pod spec of the launcher's (only) runtime patch, for the runtime's `node` job."""
    (patch,) = job["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    return node["template"]["spec"]["template"]["spec"]


def runtime_manifest() -> dict[str, Any]:
    return yaml.safe_load(RUNTIME_MANIFEST.read_text(encoding="utf-8"))


def older_trainer_crd(crd: dict[str, Any]) -> dict[str, Any]:
    """The TrainJob CRD as Trainer v2.1 had it: podSpecOverrides, no runtimePatches."""
    old = copy.deepcopy(crd)
    spec = old["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    del spec["runtimePatches"]
    spec["podSpecOverrides"] = {
        "type": "array",
        "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    }
    return old


def test_template_is_a_valid_trainjob(trainjob_schema) -> None:
    assert trainjob_schema.errors(trainjob.KIND.load_template()) == []


def test_template_uses_runtime_patches_not_the_removed_pod_spec_overrides(trainjob_schema) -> None:
    job = trainjob.KIND.load_template()
    job["spec"]["podSpecOverrides"] = job["spec"].pop("runtimePatches")

    assert any("'podSpecOverrides' was unexpected" in error for error in trainjob_schema.errors(job))


def test_runtime_patch_manager_is_a_domain_prefixed_path() -> None:
    domain, _, path = trainjob.MANAGER.partition("/")

    assert DNS1123_SUBDOMAIN.match(domain) and len(domain) <= 253 and path and HTTP_PATH.match(path)
    assert [p["manager"] for p in trainjob.KIND.load_template()["spec"]["runtimePatches"]] == [trainjob.MANAGER]


def test_runtime_patch_keeps_to_what_the_trainer_lets_a_patch_change(launch) -> None:
    job = trainjob.build_job("sam3pipe-run1", "team-a", ["-m", "x"], 2, 4, launch, {"A": "b"})
    runtime = runtime_manifest()
    containers = {
        r["name"]: {c["name"] for c in r["template"]["spec"]["template"]["spec"]["containers"]}
        for r in runtime["spec"]["template"]["spec"]["replicatedJobs"]
    }

    (patch,) = job["spec"]["runtimePatches"]
    for replicated in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
        pod = replicated["template"]["spec"]["template"]["spec"]
        # the webhook refuses unknown jobs and containers, and env for the node container
        assert {c["name"] for c in pod.get("containers", [])} <= containers[replicated["name"]]
        assert all("env" not in c for c in pod.get("containers", []))


def test_runtime_patch_merged_into_the_runtime_gives_node_pods_placement_account_and_shm(launch) -> None:
    job = trainjob.build_job("sam3pipe-run1", "team-a", ["-m", "x"], 2, 4, launch, {})
    runtime = runtime_manifest()
    (patch,) = job["spec"]["runtimePatches"]

    merged = merge(runtime["spec"]["template"]["spec"], patch["trainingRuntimeSpec"]["template"]["spec"])

    (node,) = merged["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "sam3pipe-trainer" and pod["nodeSelector"] == {"pool": "h100"}
    assert pod["securityContext"]["runAsNonRoot"] is True  # the runtime's, kept
    (container,) = pod["containers"]
    assert container["image"] and {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    batch_job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "node"},
        "spec": node["template"]["spec"],
    }
    kubernetes_validate.validate(batch_job, "1.30", strict=True)


def test_strict_schema_rejects_a_misspelt_trainer_field(trainjob_schema) -> None:
    job = trainjob.KIND.load_template()
    job["spec"]["trainer"]["numProcsPerNode"] = 2
    assert any("numProcsPerNode" in error for error in trainjob_schema.errors(job))


def test_multi_node_job_has_nodes_gpus_image_and_placement(trainjob_schema, launch) -> None:
    job = trainjob.build_job("sam3pipe-run1", "team-a", ["-m", "x"], 3, 4, launch, {"SAM3PIPE_PIPELINE_RUN_ID": "run1"})

    assert trainjob_schema.errors(job) == []
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (3, 4)
    assert trainer["image"] == "registry.example.com/sam3pipe:1.2.3"
    assert trainer["command"] == ["python"] and trainer["args"] == ["-m", "x"]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 4
    assert node_override(job)["nodeSelector"] == {"pool": "h100"}
    assert node_override(job)["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_job_references_the_shipped_cluster_training_runtime(launch) -> None:
    job = trainjob.build_job("sam3pipe-run1", "team-a", ["-m", "x"], 1, 1, launch, {})
    runtime = runtime_manifest()

    assert job["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": runtime["metadata"]["name"],
    }
    replicated = {r["name"] for r in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
    (patch,) = job["spec"]["runtimePatches"]
    assert {r["name"] for r in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]} <= replicated


def test_single_node_cpu_job_requests_no_gpu(trainjob_schema, launch) -> None:
    job = trainjob.build_job("sam3pipe-run1", "team-a", ["-m", "x"], 1, 0, launch, {})

    assert trainjob_schema.errors(job) == []
    assert job["spec"]["trainer"]["numNodes"] == 1 and job["spec"]["trainer"]["numProcPerNode"] == 1
    assert "nvidia.com/gpu" not in job["spec"]["trainer"]["resourcesPerNode"]["limits"]


def test_nodes_get_the_trainer_service_account_and_a_sized_dev_shm(launch) -> None:
    job = trainjob.build_job("sam3pipe-run1", "team-a", ["-m", "x"], 2, 1, launch, {})
    override = node_override(job)

    assert override["serviceAccountName"] == "sam3pipe-trainer"
    (dshm,) = override["volumes"]
    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": launch.shm_size}
    (node,) = override["containers"]
    assert node["name"] == "node" and node["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]


def test_job_env_references_secrets_and_never_holds_their_values(launch, monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-secret-value")
    job = trainjob.build_job("sam3pipe-run1", "team-a", ["-m", "x"], 2, 1, launch, {"MLFLOW_EXPERIMENT_NAME": "e"})

    env = {item["name"]: item for item in job["spec"]["trainer"]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "mlpipeline-minio-artifact",
        "key": "secretkey",
    }
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["name"] == "sam3pipe-mlflow"
    assert env["MLFLOW_EXPERIMENT_NAME"]["value"] == "e"
    assert "planted-secret-value" not in json.dumps(job)


def test_a_job_without_runtime_is_refused(launch) -> None:
    with pytest.raises(ConfigError, match=r"trainjob\.runtime"):
        trainjob.build_job("sam3pipe-run1", "team-a", ["-m", "x"], 1, 1, dataclasses.replace(launch, runtime=""), {})


def test_successful_job_returns_rank0_outputs_and_is_deleted(fake_trainer, trainjob_schema, launch, s3_bucket) -> None:
    outputs = {"run_uri": f"{s3_bucket}/runs/r1", "best_checkpoint_uri": "b", "last_checkpoint_uri": "l"}
    fake_trainer.on_success = rank0_writes(outputs)

    result = launch_training(["model=tiny"], launch, "run-1", 2, 8, s3_bucket, {}, api=fake_trainer.api())

    assert result == outputs
    (created,) = fake_trainer.created
    assert trainjob_schema.errors(created) == []
    assert created["spec"]["trainer"]["args"][-1] == "model=tiny"
    assert created["spec"]["trainer"]["args"][:4] == ["-m", "torch.distributed.run", "-m", "pipeline.distributed"]
    assert fake_trainer.deleted == [("team-a", created["metadata"]["name"])]


def test_failed_job_fails_the_step_with_its_reason_and_a_kubectl_hint(fake_trainer, launch, s3_bucket) -> None:
    fake_trainer.script = ["Created", "Failed"]
    fake_trainer.reasons["Failed"] = ("FailedJobs", "jobset failed: node-0 exited with code 1")

    with pytest.raises(TrainingJobError) as failure:
        launch_training([], launch, "run-2", 2, 1, s3_bucket, {}, api=fake_trainer.api())

    name = jobs.job_name("run-2")
    assert f"trainjob team-a/{name} failed: FailedJobs: jobset failed: node-0 exited with code 1" in str(failure.value)
    assert f"kubectl logs -n team-a -l jobset.sigs.k8s.io/jobset-name={name} --tail=200" in str(failure.value)
    assert fake_trainer.deleted == [("team-a", name)] and fake_trainer.jobs == {}


def test_failed_job_is_kept_when_asked_for_debugging(fake_trainer, launch, s3_bucket) -> None:
    fake_trainer.script = ["Created", "Failed"]

    with pytest.raises(TrainingJobError, match="kept for debugging: kubectl describe trainjobs -n team-a"):
        launch_training(
            [], dataclasses.replace(launch, keep_failed=True), "run-3", 1, 1, s3_bucket, {}, api=fake_trainer.api()
        )

    assert fake_trainer.deleted == [] and len(fake_trainer.jobs) == 1


def test_retried_launcher_adopts_the_existing_job(fake_trainer, launch, s3_bucket) -> None:
    name = jobs.job_name("run-4")
    fake_trainer.add_job(trainjob.build_job(name, "team-a", ["-m", "x"], 1, 1, launch, {}))
    fake_trainer.on_success = lambda job: storage.write_json(
        storage.join(s3_bucket, "pipeline-runs", name, "train-outputs.json"), {"run_uri": "r"}
    )

    result = launch_training([], launch, "run-4", 1, 1, s3_bucket, {}, api=fake_trainer.api())

    assert result == {"run_uri": "r"}
    assert fake_trainer.created == [] and fake_trainer.deleted == [("team-a", name)]


def test_retried_launcher_replaces_a_job_kept_failed_by_an_earlier_attempt(fake_trainer, launch, s3_bucket) -> None:
    name = jobs.job_name("run-9")
    fake_trainer.add_job(trainjob.build_job(name, "team-a", ["-m", "x"], 1, 1, launch, {}), script=["Failed"])
    fake_trainer.on_success = rank0_writes({"run_uri": "r"})

    result = launch_training([], launch, "run-9", 1, 1, s3_bucket, {}, api=fake_trainer.api())

    assert result == {"run_uri": "r"}
    assert len(fake_trainer.created) == 1 and fake_trainer.deleted == [("team-a", name), ("team-a", name)]


def test_status_read_failing_once_is_retried_and_the_job_still_succeeds(fake_trainer, launch, s3_bucket) -> None:
    fake_trainer.get_errors = [503]
    fake_trainer.on_success = rank0_writes({"run_uri": "r"})

    result = launch_training([], launch, "run-10", 1, 1, s3_bucket, {}, api=fake_trainer.api())

    assert result == {"run_uri": "r"} and fake_trainer.get_errors == []


def test_refused_status_read_leaves_the_job_for_a_retried_launcher(fake_trainer, launch, s3_bucket) -> None:
    fake_trainer.get_errors = [403]

    with pytest.raises(TrainingJobError, match="lacks RBAC for trainjobs"):
        launch_training([], launch, "run-11", 1, 1, s3_bucket, {}, api=fake_trainer.api())

    assert fake_trainer.deleted == [] and len(fake_trainer.jobs) == 1


def test_a_cluster_without_trainer_v2_is_named_in_the_error(fake_k8s, launch, s3_bucket) -> None:
    # fake_k8s serves pytorchjobs only: the trainjobs CRD is a 404, as without the Trainer
    with pytest.raises(
        TrainingJobError, match=r"trainjobs.trainer.kubeflow.org is not installed: .*is Kubeflow Trainer"
    ):
        launch_training([], launch, "run-13", 1, 1, s3_bucket, {}, api=fake_k8s.api())


def test_a_trainer_older_than_v2_2_stops_the_launch_with_one_line(
    fake_trainer, trainjob_crd, launch, s3_bucket
) -> None:
    fake_trainer.crd = older_trainer_crd(trainjob_crd)

    with pytest.raises(TrainingJobError) as failure:
        launch_training([], launch, "run-14", 2, 1, s3_bucket, {}, api=fake_trainer.api())

    message = str(failure.value)
    assert "\n" not in message and "does not know spec.runtimePatches" in message
    assert "Kubeflow Trainer v2.2 and later" in message and "v2.3.0" in message
    assert fake_trainer.created == [] and fake_trainer.crd_reads == 1


def test_a_crd_that_does_not_serve_v1alpha1_stops_the_launch(fake_trainer, trainjob_crd, launch, s3_bucket) -> None:
    fake_trainer.crd = copy.deepcopy(trainjob_crd)
    fake_trainer.crd["spec"]["versions"][0]["name"] = "v1"

    with pytest.raises(TrainingJobError, match=r"does not serve trainer.kubeflow.org/v1alpha1 \(it serves v1\)"):
        launch_training([], launch, "run-15", 1, 1, s3_bucket, {}, api=fake_trainer.api())

    assert fake_trainer.created == []


def test_an_unreadable_crd_leaves_the_check_to_strict_field_validation(
    fake_trainer, trainjob_crd, launch, s3_bucket, caplog
) -> None:
    # no RBAC to read CRDs, on a Trainer v2.1: the API server refuses the unknown field (no silent prune)
    fake_trainer.crd_error = 403
    fake_trainer.validator = crd_validator(older_trainer_crd(trainjob_crd), "v1alpha1")

    with caplog.at_level(logging.WARNING), pytest.raises(TrainingJobError) as failure:
        launch_training([], launch, "run-16", 1, 1, s3_bucket, {}, api=fake_trainer.api())

    assert "could not read CRD trainjobs.trainer.kubeflow.org (HTTP 403" in caplog.text
    assert "HTTP 400" in str(failure.value) and "runtimePatches" in str(failure.value)
    assert fake_trainer.create_queries == ["fieldValidation=Strict"] and fake_trainer.jobs == {}


def test_jobs_are_created_with_strict_field_validation(fake_trainer, launch, s3_bucket) -> None:
    fake_trainer.on_success = rank0_writes({"run_uri": "r"})

    launch_training([], launch, "run-17", 1, 1, s3_bucket, {}, api=fake_trainer.api())

    assert fake_trainer.create_queries == ["fieldValidation=Strict"]


def test_the_launcher_logs_the_progress_rank_0_reports(fake_trainer, launch, s3_bucket, caplog) -> None:
    fake_trainer.script = ["Created", "Created", "Complete"]
    fake_trainer.progress = {
        "progressPercentage": 45,
        "estimatedRemainingSeconds": 120,
        "metrics": [{"name": "train/loss", "value": "0.25"}],
        "lastUpdatedTime": "2026-08-01T12:00:00Z",
    }
    fake_trainer.on_success = rank0_writes({"run_uri": "r"})

    with caplog.at_level(logging.INFO):
        launch_training([], launch, "run-18", 1, 1, s3_bucket, {}, api=fake_trainer.api())

    assert caplog.text.count("45% done, about 120 s left; train/loss=0.25") == 1


def test_job_that_never_finishes_times_out_and_is_deleted(fake_trainer, launch, s3_bucket) -> None:
    fake_trainer.script = ["Created"]

    with pytest.raises(TrainingJobError, match="not finished after"):
        launch_training(
            [], dataclasses.replace(launch, timeout_s=0), "run-5", 1, 1, s3_bucket, {}, api=fake_trainer.api()
        )

    assert len(fake_trainer.deleted) == 1


LAUNCHER = """
import json, sys
from kubernetes import client
from pipeline import jobs, trainjob
configuration = client.Configuration()
configuration.host = sys.argv[1]
api = client.CustomObjectsApi(client.ApiClient(configuration))
jobs.run_job(api, trainjob.KIND, json.loads(sys.argv[2]), jobs.LaunchSettings(**json.loads(sys.argv[3])))
"""


def test_terminated_launcher_deletes_its_job(fake_trainer, launch) -> None:
    fake_trainer.script = ["Created"]
    job = trainjob.build_job("sam3pipe-run12", "team-a", ["-m", "x"], 2, 1, launch, {})
    settings = json.dumps(dataclasses.asdict(dataclasses.replace(launch, poll_interval_s=0.05, timeout_s=300)))
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, fake_trainer.url, json.dumps(job), settings], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while fake_trainer.reads.get(("team-a", "sam3pipe-run12"), 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        launcher.send_signal(signal.SIGTERM)
        returncode = launcher.wait(timeout=60)
    finally:
        launcher.kill()

    assert returncode == 128 + signal.SIGTERM
    assert fake_trainer.deleted == [("team-a", "sam3pipe-run12")]


def test_local_store_is_refused_before_creating_a_job(fake_trainer, launch, tmp_path) -> None:
    with pytest.raises(ConfigError, match="shared"):
        launch_training([], launch, "run-8", 1, 1, str(tmp_path), {}, api=fake_trainer.api())

    assert fake_trainer.created == []


def test_trainjob_launch_settings_come_from_the_trainjob_settings() -> None:
    settings = load_settings(["trainjob.runtime=team-runtime", "trainjob.cpu=4", "pytorchjob.cpu=16"])

    launch = LaunchSettings.from_settings(settings, settings.trainjob)

    assert (launch.runtime, launch.cpu) == ("team-runtime", "4")


def test_unknown_fields_follow_objects_lists_and_maps_and_stop_at_open_objects() -> None:
    schema = {
        "properties": {
            "spec": {
                "properties": {
                    "items": {"type": "array", "items": {"properties": {"name": {"type": "string"}}}},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                    "byName": {"type": "object", "additionalProperties": {"properties": {"a": {"type": "string"}}}},
                }
            }
        }
    }
    obj = {
        "spec": {
            "items": [{"name": "x"}, {"name": "y", "extra": 1}],
            "labels": {"any": "thing"},
            "open": {"whatever": {"deep": 1}},
            "byName": {"k": {"a": "1", "b": "2"}},
            "podSpecOverrides": [],
        },
        "status": {},
    }

    assert jobs.unknown_fields(schema, obj) == [
        "spec.items[1].extra",
        "spec.byName.k.b",
        "spec.podSpecOverrides",
        "status",
    ]


def test_every_generated_trainjob_field_is_known_to_trainer_v2_3(trainjob_crd, launch) -> None:
    job = trainjob.build_job("sam3pipe-run1", "team-a", ["-m", "x"], 2, 8, launch, {"A": "b"})
    schema = trainjob_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

    assert jobs.unknown_fields(schema, job) == []
