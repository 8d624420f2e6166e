"""The PyTorchJob launcher: the manifests it generates, how it drives a job to its end, and how the
job's rank 0 hands the component's outputs back.

Jobs are checked against the Training Operator v1.9.0 CRD schema (strict about unknown fields);
the launcher talks HTTP to the fake API server of tests/fixtures/fake_k8s.py and hands outputs
back through a real (moto) S3 bucket.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline import jobs, pytorchjob
from pipeline.distributed import rank_command
from pipeline.jobs import LaunchSettings
from pipeline.jobs import TrainingJobError as PyTorchJobError
from pipeline.settings import load_settings
from sam3_core import storage
from sam3_core.errors import ConfigError
from tests.fixtures.network import free_port
from tests.fixtures.paths import REPO


@pytest.fixture
def launch() -> LaunchSettings:
    settings = load_settings(["image=registry.example.com/sam3pipe:1.2.3", "gpu.node_selector.pool=a100"])
    return dataclasses.replace(
        LaunchSettings.from_settings(settings, settings.pytorchjob),
        namespace="team-a",
        poll_interval_s=0.01,
        timeout_s=30,
    )


def launch_training(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """The train step's launch in pytorchjob mode."""
    return jobs.launch_training(pytorchjob.KIND, pytorchjob.build_job, *args, **kwargs)


def rank0_writes(outputs: dict[str, Any]) -> Any:
    """Play the job's rank 0: write `outputs` where the job's command says to."""

    def write(job: dict[str, Any]) -> None:
        args = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["args"]
        storage.write_json(args[args.index("--outputs") + 1], outputs)

    return write


def container(job: dict[str, Any], replica: str = "Worker") -> dict[str, Any]:
    return job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]["containers"][0]


def test_template_is_a_valid_pytorchjob(pytorchjob_schema) -> None:
    assert pytorchjob_schema.errors(pytorchjob.KIND.load_template()) == []


def test_strict_schema_rejects_a_misspelt_field(pytorchjob_schema) -> None:
    job = pytorchjob.KIND.load_template()
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["replica"] = 1
    assert any("replica" in error for error in pytorchjob_schema.errors(job))


def test_multi_node_job_has_one_worker_pod_per_node_with_its_gpus(pytorchjob_schema, launch) -> None:
    job = pytorchjob.build_job(
        "sam3pipe-run1", "team-a", ["-m", "x"], 3, 4, launch, {"SAM3PIPE_PIPELINE_RUN_ID": "run1"}
    )

    assert pytorchjob_schema.errors(job) == []
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert list(replicas) == ["Worker"] and replicas["Worker"]["replicas"] == 3
    assert job["spec"]["nprocPerNode"] == "4"
    assert container(job)["image"] == "registry.example.com/sam3pipe:1.2.3"
    assert container(job)["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert replicas["Worker"]["template"]["spec"]["nodeSelector"] == {"pool": "a100"}


def test_single_node_cpu_job_has_one_worker_and_no_gpu_limit(pytorchjob_schema, launch) -> None:
    job = pytorchjob.build_job("sam3pipe-run1", "team-a", ["-m", "x"], 1, 0, launch, {})

    assert pytorchjob_schema.errors(job) == []
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert "nvidia.com/gpu" not in container(job)["resources"]["limits"]
    assert job["spec"]["nprocPerNode"] == "1"


def test_the_job_restarts_every_worker_together_through_a_fixed_size_c10d_rendezvous(pytorchjob_schema, launch) -> None:
    job = pytorchjob.build_job("sam3pipe-run1", "team-a", ["-m", "x"], 3, 4, launch, {})

    assert pytorchjob_schema.errors(job) == []
    policy = job["spec"]["elasticPolicy"]
    assert (policy["rdzvBackend"], policy["minReplicas"], policy["maxReplicas"]) == ("c10d", 3, 3)
    assert policy["maxRestarts"] == launch.backoff_limit
    # a pod whose torchrun died comes back and rejoins (the others restart with it)
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["restartPolicy"] == "OnFailure"


def test_finished_job_is_garbage_collected_by_the_operator(pytorchjob_schema, launch) -> None:
    job = pytorchjob.build_job("sam3pipe-run1", "team-a", ["-m", "x"], 1, 1, launch, {})

    assert pytorchjob_schema.errors(job) == []
    assert job["spec"]["runPolicy"]["ttlSecondsAfterFinished"] == launch.ttl_after_finished_s


def test_job_env_references_secrets_and_never_holds_their_values(launch, monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-secret-value")
    job = pytorchjob.build_job("sam3pipe-run1", "team-a", ["-m", "x"], 2, 1, launch, {"MLFLOW_EXPERIMENT_NAME": "e"})

    env = {item["name"]: item for item in container(job)["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "mlpipeline-minio-artifact",
        "key": "secretkey",
    }
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["name"] == "sam3pipe-mlflow"
    assert env["MLFLOW_EXPERIMENT_NAME"]["value"] == "e"
    assert "planted-secret-value" not in json.dumps(job)


def test_job_name_is_stable_and_dns_safe() -> None:
    name = jobs.job_name("5F3A_9c1e-Run/ID" * 5)

    assert name == jobs.job_name("5F3A_9c1e-Run/ID" * 5)
    assert len(name) <= 48 and name.startswith("sam3pipe-")
    assert all(c.isdigit() or c == "-" or "a" <= c <= "z" for c in name) and not name.endswith("-")


def test_a_later_stage_of_a_pipeline_run_gets_its_own_job_even_from_a_long_run_id() -> None:
    run_id = "5f3a9c1e-0b7d-4c2a-9e61-3d8f2a7b4c10"  # a KFP run id: the name is cut to 48 characters

    tracker = jobs.job_name(run_id, "tracker")

    assert tracker != jobs.job_name(run_id) and tracker.endswith("-tracker") and len(tracker) <= 48


def test_successful_job_returns_rank0_outputs_and_is_deleted(fake_k8s, launch, s3_bucket) -> None:
    outputs = {"run_uri": f"{s3_bucket}/runs/r1", "best_checkpoint_uri": "b", "last_checkpoint_uri": "l"}
    fake_k8s.on_success = rank0_writes(outputs)

    result = launch_training(["model=tiny"], launch, "run-1", 2, 8, s3_bucket, {}, api=fake_k8s.api())

    assert result == outputs
    (created,) = fake_k8s.created
    assert container(created)["args"][-1] == "model=tiny"
    assert fake_k8s.deleted == [("team-a", created["metadata"]["name"])]


def test_failed_job_fails_the_launcher_and_is_deleted(fake_k8s, launch, s3_bucket) -> None:
    fake_k8s.script = ["Created", "Running", "Failed"]

    fake_k8s.reasons["Failed"] = ("PyTorchJobFailed", "PyTorchJob run-2 is failed because 1 Worker replica(s) failed.")

    with pytest.raises(PyTorchJobError) as failure:
        launch_training([], launch, "run-2", 1, 1, s3_bucket, {}, api=fake_k8s.api())

    assert "failed: PyTorchJobFailed: PyTorchJob run-2 is failed because 1 Worker replica(s) failed." in str(
        failure.value
    )
    assert "kubectl logs -n team-a -l training.kubeflow.org/job-name=sam3pipe-run-2" in str(failure.value)
    assert len(fake_k8s.deleted) == 1 and fake_k8s.jobs == {}


def test_failed_job_is_kept_when_asked_for_debugging(fake_k8s, launch, s3_bucket) -> None:
    fake_k8s.script = ["Created", "Failed"]

    with pytest.raises(PyTorchJobError):
        launch_training(
            [], dataclasses.replace(launch, keep_failed=True), "run-3", 1, 1, s3_bucket, {}, api=fake_k8s.api()
        )

    assert fake_k8s.deleted == [] and len(fake_k8s.jobs) == 1


def test_retried_launcher_adopts_the_existing_job(fake_k8s, launch, s3_bucket) -> None:
    name = jobs.job_name("run-4")
    fake_k8s.add_job(pytorchjob.build_job(name, "team-a", ["-m", "x"], 1, 1, launch, {}))
    fake_k8s.on_success = lambda job: storage.write_json(
        storage.join(s3_bucket, "pipeline-runs", name, "train-outputs.json"), {"run_uri": "r"}
    )

    result = launch_training([], launch, "run-4", 1, 1, s3_bucket, {}, api=fake_k8s.api())

    assert result == {"run_uri": "r"}
    assert fake_k8s.created == [] and fake_k8s.deleted == [("team-a", name)]


def test_retried_launcher_replaces_a_job_kept_failed_by_an_earlier_attempt(fake_k8s, launch, s3_bucket) -> None:
    name = jobs.job_name("run-9")
    fake_k8s.add_job(pytorchjob.build_job(name, "team-a", ["-m", "x"], 1, 1, launch, {}), script=["Failed"])
    fake_k8s.on_success = rank0_writes({"run_uri": "r"})

    result = launch_training([], launch, "run-9", 1, 1, s3_bucket, {}, api=fake_k8s.api())

    assert result == {"run_uri": "r"}
    assert len(fake_k8s.created) == 1 and fake_k8s.deleted == [("team-a", name), ("team-a", name)]


def test_status_read_failing_once_is_retried_and_the_job_still_succeeds(fake_k8s, launch, s3_bucket) -> None:
    fake_k8s.get_errors = [500]
    fake_k8s.on_success = rank0_writes({"run_uri": "r"})

    result = launch_training([], launch, "run-10", 1, 1, s3_bucket, {}, api=fake_k8s.api())

    assert result == {"run_uri": "r"} and fake_k8s.get_errors == []
    assert fake_k8s.deleted == [("team-a", jobs.job_name("run-10"))]


def test_refused_status_read_leaves_the_job_for_a_retried_launcher(fake_k8s, launch, s3_bucket) -> None:
    fake_k8s.get_errors = [403]

    with pytest.raises(PyTorchJobError, match="lacks RBAC for pytorchjobs"):
        launch_training([], launch, "run-11", 1, 1, s3_bucket, {}, api=fake_k8s.api())

    assert fake_k8s.deleted == [] and len(fake_k8s.jobs) == 1


LAUNCHER = """
import json, sys
from kubernetes import client
from pipeline import jobs, pytorchjob
configuration = client.Configuration()
configuration.host = sys.argv[1]
api = client.CustomObjectsApi(client.ApiClient(configuration))
jobs.run_job(api, pytorchjob.KIND, json.loads(sys.argv[2]), jobs.LaunchSettings(**json.loads(sys.argv[3])))
"""


def test_terminated_launcher_deletes_its_job(fake_k8s, launch) -> None:
    fake_k8s.script = ["Created", "Running"]
    job = pytorchjob.build_job("sam3pipe-run12", "team-a", ["-m", "x"], 1, 1, launch, {})
    settings = json.dumps(dataclasses.asdict(dataclasses.replace(launch, poll_interval_s=0.05, timeout_s=300)))
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, fake_k8s.url, json.dumps(job), settings], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while fake_k8s.reads.get(("team-a", "sam3pipe-run12"), 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        launcher.send_signal(signal.SIGTERM)
        returncode = launcher.wait(timeout=60)
    finally:
        launcher.kill()

    assert returncode == 128 + signal.SIGTERM
    assert fake_k8s.deleted == [("team-a", "sam3pipe-run12")]


def test_job_that_never_finishes_times_out_and_is_deleted(fake_k8s, launch, s3_bucket) -> None:
    fake_k8s.script = ["Created", "Running"]

    with pytest.raises(PyTorchJobError, match="not finished after"):
        launch_training([], dataclasses.replace(launch, timeout_s=0), "run-5", 1, 1, s3_bucket, {}, api=fake_k8s.api())

    assert len(fake_k8s.deleted) == 1


def test_refused_create_explains_the_missing_rbac(fake_k8s, launch, s3_bucket) -> None:
    fake_k8s.refuse_create = 403

    with pytest.raises(PyTorchJobError, match="lacks RBAC for pytorchjobs"):
        launch_training([], launch, "run-6", 1, 1, s3_bucket, {}, api=fake_k8s.api())


def test_succeeded_job_without_outputs_is_an_error(fake_k8s, launch, s3_bucket) -> None:
    with pytest.raises(PyTorchJobError, match="wrote no outputs"):
        launch_training([], launch, "run-7", 1, 1, s3_bucket, {}, api=fake_k8s.api())


def test_local_store_is_refused_before_creating_a_job(fake_k8s, launch, tmp_path) -> None:
    with pytest.raises(ConfigError, match="shared"):
        launch_training([], launch, "run-8", 1, 1, str(tmp_path), {}, api=fake_k8s.api())

    assert fake_k8s.created == []


@pytest.mark.parametrize(("rank", "writes"), [("0", True), ("1", False)])
@pytest.mark.integration
def test_only_rank_0_hands_the_step_outputs_back(tmp_path, rank: str, writes: bool) -> None:
    outputs = tmp_path / "outputs.json"
    command = rank_command(
        "data-prep",
        ["synthetic.num_videos=2", "synthetic.frames_per_video=2", f"store={tmp_path / 'store'}"],
        str(outputs),
    )

    result = subprocess.run(
        [sys.executable, *command], env={**os.environ, "RANK": rank}, capture_output=True, text=True
    )

    assert result.returncode == 0, result.stderr
    assert outputs.exists() is writes
    if writes:
        assert Path(json.loads(outputs.read_text())["dataset_uri"], "manifest.json").is_file()


# ---------------------------------------------------------------------------- restarts, with real torchrun


def operator_env(job: dict[str, Any], node_rank: int, host: str, port: int) -> dict[str, str]:
    """The torchrun variables the Training Operator v1.9.0 gives pod `node_rank` of `job`
    (pkg/controller.v1/pytorch/envvar.go, master.go and elastic.go at tag v1.9.0), with the pods'
    Service names replaced by `host` and their ports by `port`."""
    spec = job["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    env = {"PET_NPROC_PER_NODE": spec["nprocPerNode"]}
    if "Master" in replicas:
        world = sum(r["replicas"] for r in replicas.values()) * int(spec["nprocPerNode"])
        env.update(
            MASTER_ADDR=host,
            PET_MASTER_ADDR=host,
            MASTER_PORT=str(port),
            PET_MASTER_PORT=str(port),
            WORLD_SIZE=str(world),
            RANK=str(node_rank),
            PET_NODE_RANK=str(node_rank),
        )
    elastic = spec.get("elasticPolicy")
    if elastic is None:
        env["PET_NNODES"] = str(sum(r["replicas"] for r in replicas.values()))
        return env
    env.update(
        PET_RDZV_ENDPOINT=f"{host}:{port}",
        PET_RDZV_BACKEND=elastic.get("rdzvBackend", "c10d"),
        PET_NNODES=f"{elastic['minReplicas']}:{elastic['maxReplicas']}",
    )
    if "maxRestarts" in elastic:
        env["PET_MAX_RESTARTS"] = str(elastic["maxRestarts"])
    return env


def pod_env(job: dict[str, Any]) -> dict[str, str]:
    """The plain values of the job container's env (the secret references need a cluster)."""
    return {item["name"]: item["value"] for item in container(job)["env"] if "value" in item}


@pytest.mark.integration
def test_a_failed_worker_restarts_the_workers_of_every_pod_and_the_job_then_finishes(launch, tmp_path: Path) -> None:
    # two pods' torchruns on this machine, with the operator's variables and the pod's env; the first
    # rank 1 fails while rank 0 waits for it in a collective, and the restarted rank 0 starts late.
    # One pod restarting alone would leave rank 0 waiting there (under nccl until its watchdog, 30
    # min); a worker store shared across rounds would hand rank 1 the first rank 0's address
    job = pytorchjob.build_job("sam3pipe-run1", "team-a", ["-m", "x"], 2, 0, launch, {})
    port = free_port()
    worker = str(Path(__file__).with_name("restart_worker.py"))
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", worker, str(tmp_path)],
            cwd=REPO,
            env={
                **os.environ,
                **pod_env(job),
                "OMP_NUM_THREADS": "1",
                **operator_env(job, node_rank, "127.0.0.1", port),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for node_rank in range(2)
    ]
    logs = []
    try:
        for agent in agents:
            try:
                logs.append(agent.communicate(timeout=240)[0])
            except subprocess.TimeoutExpired:
                os.killpg(agent.pid, signal.SIGKILL)
                logs.append(agent.communicate()[0])
    finally:
        # workers that a failed torchrun left behind, still waiting for their peers
        for agent in agents:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.pid, signal.SIGKILL)
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert (tmp_path / "failed").exists()
    # every rank ran again after the failure: rank 0's first process was stopped, not left waiting
    joined = [path.name.split("-")[0] for path in tmp_path.glob("rank*-pid*")]
    assert joined.count("rank0") >= 2 and joined.count("rank1") >= 2, joined
