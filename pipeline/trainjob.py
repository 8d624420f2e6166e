"""training_mode=trainjob: the train component as a Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1).

For clusters with Kubeflow Trainer v2 (TrainJob + ClusterTrainingRuntime, on JobSet) instead of the
Training Operator. Supported: Trainer v2.2 and later (built and tested against v2.3.0's CRDs). v2.2
replaced the TrainJob's `podSpecOverrides` with `runtimePatches`, which this job uses; on an older
Trainer the launcher stops before creating anything, with one line naming the missing field.

The TrainJob is built from `pipeline/templates/trainjob.yaml` and references the
ClusterTrainingRuntime shipped in manifests/trainer-v2/ (setting `trainjob.runtime`): `numNodes`
pods each run one torchrun over the node's GPUs; the Trainer passes the rendezvous as PET_*
variables. What the runtime's pods need per run (ServiceAccount, node placement, /dev/shm) goes in
this launcher's own runtime patch (manager `sam3pipe/launcher`), which the Trainer merges into the
runtime's JobSet template as a strategic merge patch. Create, watch, adoption on retry and clean-up
are pipeline/jobs.py's.
"""

from __future__ import annotations

from typing import Any

from pipeline import jobs
from pipeline.jobs import LaunchSettings
from sam3_core.errors import ConfigError

KIND = jobs.JobKind(
    kind="TrainJob",
    group="trainer.kubeflow.org",
    version="v1alpha1",
    plural="trainjobs",
    succeeded_condition="Complete",
    failed_condition="Failed",
    # the JobSet, and so its pods' label, carries the TrainJob's name
    pod_label="jobset.sigs.k8s.io/jobset-name",
    mode="trainjob",
    template="pipeline/templates/trainjob.yaml",
    missing_crd_hint="is Kubeflow Trainer v2 installed (CRD trainjobs.trainer.kubeflow.org)?",
    supported_versions="Kubeflow Trainer v2.2 and later (built and tested against v2.3.0's CRDs)",
    # Trainer v2.2+ with the TrainJobStatus feature gate: what rank 0 reports (sam3_core/train/trainjob_status.py)
    progress_status="trainerStatus",
)
# the runtime's replicated job and container that run torchrun on every node
NODE = "node"
# who owns this launcher's entry of spec.runtimePatches (a domain-prefixed path, as the Trainer requires)
MANAGER = "sam3pipe/launcher"


def build_job(
    name: str,
    namespace: str,
    args: list[str],
    nodes: int,
    gpus_per_node: int,
    launch: LaunchSettings,
    extra_env: dict[str, str],
) -> dict[str, Any]:
    """The TrainJob manifest: the template with this run's runtime, image, command, sizes and placement."""
    if nodes < 1:
        raise ConfigError(f"trainjob: nodes must be >= 1, got {nodes}")
    if not launch.runtime:
        raise ConfigError(
            "trainjob: no runtime; set trainjob.runtime to a ClusterTrainingRuntime (manifests/trainer-v2/)"
        )
    job = KIND.load_template()
    job["metadata"].update(name=name, namespace=namespace)
    job["spec"]["runtimeRef"]["name"] = launch.runtime
    trainer = job["spec"]["trainer"]
    trainer.update(image=launch.image, args=args, env=jobs.job_env(launch, extra_env), numNodes=nodes)
    trainer["numProcPerNode"] = max(gpus_per_node, 1)
    requests, limits = trainer["resourcesPerNode"]["requests"], trainer["resourcesPerNode"]["limits"]
    requests.update(cpu=launch.cpu, memory=launch.memory)
    limits["memory"] = launch.memory
    if gpus_per_node > 0:
        limits[launch.accelerator_type] = gpus_per_node

    pod = node_pod_patch(job)
    pod["serviceAccountName"] = launch.service_account
    if launch.node_selector:
        pod["nodeSelector"] = dict(launch.node_selector)
    if launch.tolerations:
        pod["tolerations"] = [dict(t) for t in launch.tolerations]
    for volume in pod["volumes"]:
        if volume["name"] == "dshm":
            volume["emptyDir"]["sizeLimit"] = launch.shm_size
    return job


def node_pod_patch(job: dict[str, Any]) -> dict[str, Any]:
    """The pod spec this launcher's runtime patch applies to the runtime's `node` job."""
    (patch,) = [p for p in job["spec"]["runtimePatches"] if p["manager"] == MANAGER]
    (node,) = [r for r in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"] if r["name"] == NODE]
    return node["template"]["spec"]["template"]["spec"]
