"""Multi-node training: create a Kubeflow PyTorchJob, watch it to the end, clean it up.

The train step runs this in its KFP pod when `training_mode=pytorchjob`. The job's Master and
Workers run the same image and the same `pipeline.distributed` entry as a single-pod run; rank 0
writes the step's outputs to the object store, which this launcher reads back once the job
succeeded. A retried launcher finds its job by name (derived from the pipeline run id) and keeps
watching it instead of starting a second one (a kept Failed job is replaced by a fresh one).
The job is deleted when it ends, when the watch times out and when the launcher pod is terminated;
a failing Kubernetes API leaves it running for a retried launcher to adopt.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import urllib3
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException

from pipeline.distributed import rank_command
from pipeline.settings import PipelineSettings
from sam3_core import storage
from sam3_core.errors import ConfigError, Sam3PipeError

logger = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
CONTAINER = "pytorch"
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
FINAL_STATES = ("Succeeded", "Failed")


class PyTorchJobError(Sam3PipeError):
    """The job could not be created, failed, or did not finish in time."""


class KubernetesApiError(PyTorchJobError):
    """The API server refused a request; the job itself may be fine."""


@dataclass
class LaunchSettings:
    """Everything the launcher needs at run time, fixed when the pipeline is compiled."""

    image: str
    # "" = the namespace the launcher pod runs in
    namespace: str
    service_account: str
    accelerator_type: str
    node_selector: dict[str, str]
    tolerations: list[dict[str, str]]
    shm_size: str
    cpu: str
    memory: str
    # Kubernetes EnvVar objects referencing the object-store and MLflow secrets by name
    env: list[dict[str, Any]]
    poll_interval_s: float
    timeout_s: int
    ttl_after_finished_s: int
    backoff_limit: int
    keep_failed: bool

    def __post_init__(self) -> None:
        # KFP hands dict constants over as protobuf Structs, where every number is a double;
        # the API server rejects 2.0 for an integer field
        self.backoff_limit = int(self.backoff_limit)
        self.timeout_s = int(self.timeout_s)
        self.ttl_after_finished_s = int(self.ttl_after_finished_s)
        self.poll_interval_s = float(self.poll_interval_s)

    @classmethod
    def from_settings(cls, settings: PipelineSettings) -> LaunchSettings:
        job = settings.pytorchjob
        return cls(
            image=settings.image,
            namespace=job.namespace,
            service_account=job.service_account,
            accelerator_type=settings.gpu.accelerator_type,
            node_selector=dict(settings.gpu.node_selector),
            tolerations=[{k: v for k, v in dataclasses.asdict(t).items() if v} for t in settings.gpu.tolerations],
            shm_size=settings.gpu.shm_size,
            cpu=job.cpu,
            memory=job.memory,
            env=secret_env(settings),
            poll_interval_s=job.poll_interval_s,
            timeout_s=job.timeout_s,
            ttl_after_finished_s=job.ttl_after_finished_s,
            backoff_limit=job.backoff_limit,
            keep_failed=job.keep_failed,
        )


def secret_env(settings: PipelineSettings) -> list[dict[str, Any]]:
    """The same credentials and endpoints the KFP steps get, as references (never values)."""
    store, tracking = settings.object_store, settings.tracking

    def from_secret(env: str, secret: str, key: str) -> dict[str, Any]:
        return {"name": env, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}

    return [
        from_secret("AWS_ACCESS_KEY_ID", store.secret, store.access_key_field),
        from_secret("AWS_SECRET_ACCESS_KEY", store.secret, store.secret_key_field),
        from_secret("MLFLOW_TRACKING_URI", tracking.secret, tracking.uri_field),
        *(
            {"name": key, "valueFrom": {"configMapKeyRef": {"name": store.config_map, "key": key}}}
            for key in store.config_map_keys
        ),
    ]


def load_template() -> dict[str, Any]:
    text = resources.files("pipeline").joinpath("templates/pytorchjob.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def job_name(pipeline_run_id: str) -> str:
    """A stable, DNS-safe name: the same pipeline run (and its retries) always gets the same job."""
    slug = re.sub(r"[^a-z0-9]+", "-", pipeline_run_id.lower()).strip("-")
    if not slug:
        raise ConfigError("pytorchjob: the pipeline run id is empty; cannot name the job")
    # pod names append "-worker-<n>" and must stay within 63 characters
    return f"sam3pipe-{slug}"[:48].rstrip("-")


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
    job = load_template()
    job["metadata"].update(name=name, namespace=namespace)
    job["spec"]["nprocPerNode"] = str(max(gpus_per_node, 1))
    run_policy = job["spec"]["runPolicy"]
    run_policy["backoffLimit"] = launch.backoff_limit
    run_policy["activeDeadlineSeconds"] = launch.timeout_s
    run_policy["ttlSecondsAfterFinished"] = launch.ttl_after_finished_s

    master = job["spec"]["pytorchReplicaSpecs"]["Master"]
    pod = master["template"]["spec"]
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
    container["env"] = [*copy.deepcopy(launch.env), *({"name": k, "value": v} for k, v in sorted(extra_env.items()))]
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    requests.update(cpu=launch.cpu, memory=launch.memory)
    limits["memory"] = launch.memory
    if gpus_per_node > 0:
        limits[launch.accelerator_type] = gpus_per_node

    if nodes > 1:
        worker = copy.deepcopy(master)
        worker["replicas"] = nodes - 1
        job["spec"]["pytorchReplicaSpecs"]["Worker"] = worker
    return job


def job_conditions(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list((job.get("status") or {}).get("conditions") or [])


def final_state(job: dict[str, Any]) -> str | None:
    """The job's final condition (Succeeded or Failed) once the operator has decided, else None."""
    for condition in reversed(job_conditions(job)):
        if condition.get("type") in FINAL_STATES and condition.get("status") == "True":
            return condition["type"]
    return None


def _is_transient(exc: Exception) -> bool:
    """An overloaded or restarting API server, or a dropped connection: worth asking again."""
    if isinstance(exc, ApiException):
        return exc.status == 429 or (exc.status or 0) >= 500
    return isinstance(exc, urllib3.exceptions.HTTPError)


def _api_error(action: str, name: str, namespace: str, exc: ApiException) -> KubernetesApiError:
    hint = {
        401: "the launcher's credentials were refused",
        403: "the pipeline's service account lacks RBAC for pytorchjobs: apply manifests/ (Role sam3pipe-launcher)",
        404: "is the Kubeflow Training Operator installed (CRD pytorchjobs.kubeflow.org)?",
        422: "the job manifest was rejected: check pipeline/templates/pytorchjob.yaml and the settings",
    }.get(exc.status or 0, "see the API server's message")
    return KubernetesApiError(
        f"pytorchjob {namespace}/{name}: {action} failed with HTTP {exc.status} {exc.reason}: {hint}"
    )


def _get(api: k8s.CustomObjectsApi, name: str, namespace: str) -> dict[str, Any] | None:
    """The job, or None once it is gone."""
    try:
        return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise _api_error("get", name, namespace, exc) from exc


def _wait_deleted(api: k8s.CustomObjectsApi, name: str, namespace: str, launch: LaunchSettings) -> None:
    deadline = time.monotonic() + launch.timeout_s
    while _get(api, name, namespace) is not None:
        if time.monotonic() >= deadline:
            raise PyTorchJobError(f"pytorchjob {namespace}/{name}: still not deleted after {launch.timeout_s} s")
        time.sleep(launch.poll_interval_s)


def _create_or_adopt(api: k8s.CustomObjectsApi, job: dict[str, Any], launch: LaunchSettings) -> None:
    """Create the job; a retried launcher adopts its earlier job, unless that one was kept Failed."""
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
        logger.info("created pytorchjob %s/%s", namespace, name)
        return
    except ApiException as exc:
        if exc.status != 409:
            raise _api_error("create", name, namespace, exc) from exc
    existing = _get(api, name, namespace)
    if existing is not None and final_state(existing) != "Failed":
        logger.warning("pytorchjob %s/%s already exists (a retried launcher): watching it", namespace, name)
        return
    if existing is not None:
        logger.warning("pytorchjob %s/%s was kept Failed by an earlier attempt: replacing it", namespace, name)
        _delete(api, name, namespace)
        _wait_deleted(api, name, namespace, launch)
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    except ApiException as exc:
        raise _api_error("create", name, namespace, exc) from exc
    logger.info("created pytorchjob %s/%s", namespace, name)


def _delete(api: k8s.CustomObjectsApi, name: str, namespace: str) -> None:
    try:
        api.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, body=k8s.V1DeleteOptions(propagation_policy="Background")
        )
        logger.info("deleted pytorchjob %s/%s", namespace, name)
    except ApiException as exc:
        if exc.status != 404:
            logger.warning("could not delete pytorchjob %s/%s: HTTP %s %s", namespace, name, exc.status, exc.reason)
    except urllib3.exceptions.HTTPError as exc:
        logger.warning("could not delete pytorchjob %s/%s: %s", namespace, name, exc)


def watch_job(
    api: k8s.CustomObjectsApi,
    name: str,
    namespace: str,
    poll_interval_s: float,
    timeout_s: float,
) -> str:
    """Poll the job until it succeeds or fails, logging each condition once; return the final state.

    Transient API failures (5xx, 429, lost connections) are retried until the deadline.
    """
    deadline = time.monotonic() + timeout_s
    seen: set[tuple[str, str, str]] = set()
    while True:
        try:
            job = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except (ApiException, urllib3.exceptions.HTTPError) as exc:
            if isinstance(exc, ApiException) and not _is_transient(exc):
                raise _api_error("get", name, namespace, exc) from exc
            logger.warning("pytorchjob %s/%s: reading its status failed, retrying: %s", namespace, name, exc)
            job = {}
        for condition in job_conditions(job):
            key = (condition.get("type", ""), condition.get("status", ""), condition.get("reason", ""))
            if key not in seen:
                seen.add(key)
                logger.info(
                    "pytorchjob %s: %s=%s %s %s", name, key[0], key[1], key[2], condition.get("message", "")
                )
        state = final_state(job)
        if state is not None:
            return state
        if time.monotonic() >= deadline:
            raise PyTorchJobError(f"pytorchjob {namespace}/{name}: not finished after {timeout_s:.0f} s")
        time.sleep(poll_interval_s)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """KFP stops a step with SIGTERM, whose default handler skips `finally`: make it unwind instead."""
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_job(api: k8s.CustomObjectsApi, job: dict[str, Any], launch: LaunchSettings) -> None:
    """Create (or adopt) the job, wait for it, and delete it; raise if it did not succeed."""
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    with _sigterm_raises():
        _create_or_adopt(api, job, launch)
        try:
            state = watch_job(api, name, namespace, launch.poll_interval_s, launch.timeout_s)
        except KubernetesApiError:
            logger.warning("leaving pytorchjob %s/%s running for a retried launcher to adopt", namespace, name)
            raise
        except BaseException:
            # timed out, or this pod is being terminated: nobody would watch the job any more
            _delete(api, name, namespace)
            raise
        if state == "Failed" and launch.keep_failed:
            logger.warning("keeping failed pytorchjob %s/%s for debugging (pytorchjob.keep_failed)", namespace, name)
        else:
            _delete(api, name, namespace)
    if state != "Succeeded":
        raise PyTorchJobError(
            f"pytorchjob {namespace}/{name} failed; its pods' logs: "
            f"kubectl logs -n {namespace} -l training.kubeflow.org/job-name={name} --tail=200"
        )


def current_namespace(configured: str) -> str:
    if configured:
        return configured
    if NAMESPACE_FILE.exists():
        return NAMESPACE_FILE.read_text(encoding="utf-8").strip()
    raise ConfigError("pytorchjob: not running in a pod; set the settings key pytorchjob.namespace")


def custom_objects_api() -> k8s.CustomObjectsApi:
    """In a pod: its service account; elsewhere (a developer's shell): the current kubeconfig."""
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()
    return k8s.CustomObjectsApi()


def launch_training(
    overrides: list[str],
    launch: LaunchSettings,
    pipeline_run_id: str,
    nodes: int,
    gpus_per_node: int,
    store: str,
    extra_env: dict[str, str],
    api: k8s.CustomObjectsApi | None = None,
) -> dict[str, Any]:
    """Train on `nodes` pods x `gpus_per_node` GPUs and return rank 0's outputs of the train step."""
    if not storage.is_remote(store):
        raise ConfigError(
            f"pytorchjob: the store {store!r} is local to this pod; the job's pods and the launcher need a shared "
            "object store: set SAM3PIPE_STORE (ConfigMap sam3pipe-env) or the store parameter to s3://..."
        )
    name = job_name(pipeline_run_id)
    outputs_uri = storage.join(store, "pipeline-runs", name, "train-outputs.json")
    args = ["-m", "torch.distributed.run", *rank_command("train", overrides, outputs_uri)]
    job = build_job(name, current_namespace(launch.namespace), args, nodes, gpus_per_node, launch, extra_env)
    run_job(api or custom_objects_api(), job, launch)
    if not storage.exists(outputs_uri):
        raise PyTorchJobError(f"pytorchjob {name} succeeded but rank 0 wrote no outputs to {outputs_uri}")
    return storage.read_json(outputs_uri)
