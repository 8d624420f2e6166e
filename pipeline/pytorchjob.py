"""training_mode=pytorchjob: the train component as a Kubeflow PyTorchJob (Training Operator v1, kubeflow.org/v1).

For clusters with the Training Operator. The job is built from `pipeline/templates/pytorchjob.yaml`:
one Worker pod per node running torchrun, joined by a c10d rendezvous (the operator passes it as
PET_* variables from the elastic policy, at a fixed size), so a failure restarts every worker of
every pod together, each resuming from last.pt, instead of one pod restarting while its peers
wait inside nccl. Create, watch, adoption on retry and clean-up are pipeline/jobs.py's.
"""

from __future__ import annotations

from typing import Any

from pipeline import jobs
from pipeline.jobs import LaunchSettings
from sam3_core.errors import ConfigError

CONTAINER = "pytorch"
KIND = jobs.JobKind(
    kind="PyTorchJob",
    group="kubeflow.org",
    version="v1",
    plural="pytorchjobs",
    succeeded_condition="Succeeded",
    failed_condition="Failed",
    pod_label="training.kubeflow.org/job-name",
    mode="pytorchjob",
    template="pipeline/templates/pytorchjob.yaml",
    missing_crd_hint="is the Kubeflow Training Operator installed (CRD pytorchjobs.kubeflow.org)?",
)


def build_job(
    name: str,
    namespace: str,
    args: list[str],
    nodes: int,
    gpus_per_node: int,
    launch: LaunchSettings,
    extra_env: dict[str, str],
) -> dict[str, Any]:
    """The PyTorchJob manifest: the template with this run's image, command, sizes and placement."""
    if nodes < 1:
        raise ConfigError(f"pytorchjob: nodes must be >= 1, got {nodes}")
    job = KIND.load_template()
    job["metadata"].update(name=name, namespace=namespace)
    job["spec"]["nprocPerNode"] = str(max(gpus_per_node, 1))
    # a fixed number of pods; the job's restarts, each of every worker together
    job["spec"]["elasticPolicy"].update(minReplicas=nodes, maxReplicas=nodes, maxRestarts=launch.backoff_limit)
    run_policy = job["spec"]["runPolicy"]
    run_policy["backoffLimit"] = launch.backoff_limit
    run_policy["activeDeadlineSeconds"] = launch.timeout_s
    run_policy["ttlSecondsAfterFinished"] = launch.ttl_after_finished_s

    workers = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    workers["replicas"] = nodes
    pod = workers["template"]["spec"]
    pod["serviceAccountName"] = launch.service_account
    if launch.node_selector:
        pod["nodeSelector"] = dict(launch.node_selector)
    if launch.tolerations:
        pod["tolerations"] = [dict(t) for t in launch.tolerations]
    for volume in pod["volumes"]:
        if volume["name"] == "dshm":
            volume["emptyDir"]["sizeLimit"] = launch.shm_size
    container = next(c for c in pod["containers"] if c["name"] == CONTAINER)
    container["image"] = launch.image
    container["args"] = args
    container["env"] = [*container["env"], *jobs.job_env(launch, extra_env)]
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    requests.update(cpu=launch.cpu, memory=launch.memory)
    limits["memory"] = launch.memory
    if gpus_per_node > 0:
        limits[launch.accelerator_type] = gpus_per_node
    return job
