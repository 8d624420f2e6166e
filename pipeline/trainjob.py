"""training_mode=trainjob: the train component as a Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1).

For clusters with Kubeflow Trainer v2 (TrainJob + ClusterTrainingRuntime, on JobSet) instead of the
Training Operator. The TrainJob is built from `pipeline/templates/trainjob.yaml` and references the
ClusterTrainingRuntime shipped in manifests/trainer-v2/ (setting `trainjob.runtime`): `numNodes`
pods each run one torchrun over the node's GPUs; the Trainer passes the rendezvous as PET_*
variables. Create, watch, adoption on retry and clean-up are pipeline/jobs.py's.
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
)
NODE = "node"


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

    (override,) = [o for o in job["spec"]["podSpecOverrides"] if {"name": NODE} in o["targetJobs"]]
    override["serviceAccountName"] = launch.service_account
    if launch.node_selector:
        override["nodeSelector"] = dict(launch.node_selector)
    if launch.tolerations:
        override["tolerations"] = [dict(t) for t in launch.tolerations]
    for volume in override["volumes"]:
        if volume["name"] == "dshm":
            volume["emptyDir"]["sizeLimit"] = launch.shm_size
    return job
