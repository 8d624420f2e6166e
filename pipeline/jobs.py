"""Multi-node training as a Kubernetes custom resource: create it, watch it to the end, clean it up.

What the PyTorchJob (Training Operator v1, pipeline/pytorchjob.py) and the TrainJob (Trainer v2,
pipeline/trainjob.py) launchers share. The train component runs the launcher in its KFP pod; the job's
pods run the same image and the same `pipeline.distributed` entry as a single-pod run, and rank 0
writes the component's outputs to the object store, which the launcher reads back once the job
succeeded. Guarantees, for either kind:

- a retried launcher finds its job by name (derived from the pipeline run id) and keeps watching
  it instead of starting a second one; a job kept Failed by an earlier attempt is replaced;
- the job is deleted when it ends, when the watch times out and when the launcher pod is
  terminated (KFP sends SIGTERM); a failing Kubernetes API leaves it running for a retried
  launcher to adopt;
- transient API errors (5xx, 429, lost connections) are retried; a failed job fails the component with
  the job's own reason and a `kubectl` command to read its pods' logs;
- a field the cluster's CRD does not know is never dropped without a word: where a kind names the
  versions it supports, the installed CRD is read first and one that lacks a field of the job
  stops the launch with one line; either way the job is created with strict field validation, so
  the API server refuses unknown fields instead of pruning them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
import signal
import time
from collections.abc import Callable, Iterator
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
from pipeline.settings import JobSettings, PipelineSettings
from sam3_core import storage
from sam3_core.errors import ConfigError, Sam3PipeError

logger = logging.getLogger(__name__)

NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
SUCCEEDED, FAILED = "Succeeded", "Failed"


class TrainingJobError(Sam3PipeError):
    """The job could not be created, failed, or did not finish in time."""


class KubernetesApiError(TrainingJobError):
    """The API server refused a request; the job itself may be fine.

    The component must fail so that KFP retries it and the retried launcher adopts the job (a sweep's
    trial component lets it through rather than recording the trial as failed).
    """

    retry_component = True


@dataclass(frozen=True)
class JobKind:
    """A training job's custom resource, and how to read its end from its conditions."""

    kind: str
    group: str
    version: str
    plural: str
    # the condition types that end a job well / badly
    succeeded_condition: str
    failed_condition: str
    # label the job's pods carry with the job's name (for the `kubectl logs` hint)
    pod_label: str
    # the settings group (`--set <mode>.keep_failed=true`) and the template users can edit
    mode: str
    template: str
    # what a 404 on the job's resource most likely means
    missing_crd_hint: str
    # the operator versions this project supports, for the error on a CRD too old for the job;
    # "" = the installed CRD is not read before creating the job
    supported_versions: str = ""
    # the status field where the job's trainer reports its progress ("" = none); logged while watching
    progress_status: str = ""

    @property
    def name(self) -> str:
        return self.kind.lower()

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{self.group}"

    def load_template(self) -> dict[str, Any]:
        """The job manifest template shipped in the package (`template` is its path in the repo)."""
        package, _, path = self.template.partition("/")
        return yaml.safe_load(resources.files(package).joinpath(path).read_text(encoding="utf-8"))


@dataclass
class LaunchSettings:
    """Everything a launcher needs at run time, fixed when the pipeline is compiled."""

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
    keep_failed: bool
    # pytorchjob only: the operator's TTL after the job finished and its pod restarts
    ttl_after_finished_s: int = 0
    backoff_limit: int = 0
    # trainjob only: the ClusterTrainingRuntime the TrainJob references
    runtime: str = ""

    def __post_init__(self) -> None:
        # KFP hands dict constants over as protobuf Structs, where every number is a double;
        # the API server rejects 2.0 for an integer field
        self.backoff_limit = int(self.backoff_limit)
        self.timeout_s = int(self.timeout_s)
        self.ttl_after_finished_s = int(self.ttl_after_finished_s)
        self.poll_interval_s = float(self.poll_interval_s)

    @classmethod
    def from_settings(cls, settings: PipelineSettings, job: JobSettings) -> LaunchSettings:
        """The launch settings of one training mode (`job` is settings.pytorchjob or settings.trainjob)."""
        specific = {
            name: getattr(job, name)
            for name in ("ttl_after_finished_s", "backoff_limit", "runtime")
            if hasattr(job, name)
        }
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
            keep_failed=job.keep_failed,
            **specific,
        )


def secret_env(settings: PipelineSettings) -> list[dict[str, Any]]:
    """The same credentials and endpoints the KFP components get, as references (never values)."""
    store, mlflow = settings.object_store, settings.mlflow

    def from_secret(env: str, secret: str, key: str) -> dict[str, Any]:
        return {"name": env, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}

    return [
        from_secret("AWS_ACCESS_KEY_ID", store.secret, store.access_key_field),
        from_secret("AWS_SECRET_ACCESS_KEY", store.secret, store.secret_key_field),
        from_secret("MLFLOW_TRACKING_URI", mlflow.secret, mlflow.uri_field),
        *(
            {"name": key, "valueFrom": {"configMapKeyRef": {"name": store.config_map, "key": key}}}
            for key in store.config_map_keys
        ),
    ]


def job_env(launch: LaunchSettings, extra_env: dict[str, str]) -> list[dict[str, Any]]:
    """The job containers' env: secret references, then this run's plain values (sorted, stable)."""
    return [*copy.deepcopy(launch.env), *({"name": k, "value": v} for k, v in sorted(extra_env.items()))]


def job_name(pipeline_run_id: str, stage: str = "") -> str:
    """A stable, DNS-safe name: the same pipeline run (and its retries) always gets the same job; a later
    training `stage` of the run (e.g. tracker) its own."""
    slug = re.sub(r"[^a-z0-9]+", "-", pipeline_run_id.lower()).strip("-")
    if not slug:
        raise ConfigError("training job: the pipeline run id is empty; cannot name the job")
    suffix = f"-{stage}" if stage else ""
    # pod names append "-worker-<n>" (PyTorchJob) or "-node-0-<n>-<hash>" (TrainJob) and must stay within 63 characters
    return f"sam3pipe-{slug}"[: 48 - len(suffix)].rstrip("-") + suffix


def job_conditions(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list((job.get("status") or {}).get("conditions") or [])


def final_condition(kind: JobKind, job: dict[str, Any]) -> dict[str, Any] | None:
    """The condition that ended the job (its succeeded or failed type, status True), else None."""
    for condition in reversed(job_conditions(job)):
        if (
            condition.get("type") in (kind.succeeded_condition, kind.failed_condition)
            and condition.get("status") == "True"
        ):
            return condition
    return None


def final_state(kind: JobKind, job: dict[str, Any]) -> str | None:
    """SUCCEEDED or FAILED once the controller has decided, else None."""
    condition = final_condition(kind, job)
    if condition is None:
        return None
    return SUCCEEDED if condition["type"] == kind.succeeded_condition else FAILED


def _is_transient(exc: Exception) -> bool:
    """An overloaded or restarting API server, or a dropped connection: worth asking again."""
    if isinstance(exc, ApiException):
        return exc.status == 429 or (exc.status or 0) >= 500
    return isinstance(exc, urllib3.exceptions.HTTPError)


def _server_message(exc: ApiException) -> str:
    """The API server's own explanation (a Status object's message), on one line."""
    try:
        message = str(json.loads(exc.body or "{}").get("message") or "")
    except (ValueError, AttributeError):
        message = ""
    return " ".join(message.split())[:400]


def _api_error(kind: JobKind, action: str, name: str, namespace: str, exc: ApiException) -> KubernetesApiError:
    hint = {
        400: f"the API server refused the job: {_server_message(exc) or 'no message'} "
        f"(supported: {kind.supported_versions or 'see docs/pipelines.md'})",
        401: "the launcher's credentials were refused",
        403: f"the pipeline's service account lacks RBAC for {kind.plural}: apply manifests/ (Role sam3pipe-launcher)",
        404: kind.missing_crd_hint,
        422: f"the job manifest was rejected: check {kind.template} and the settings"
        + (f" ({_server_message(exc)})" if _server_message(exc) else ""),
    }.get(exc.status or 0, "see the API server's message")
    return KubernetesApiError(
        f"{kind.name} {namespace}/{name}: {action} failed with HTTP {exc.status} {exc.reason}: {hint}"
    )


def unknown_fields(schema: dict[str, Any], obj: Any, path: str = "") -> list[str]:
    """Dotted paths of `obj` that an OpenAPI v3 schema (a CRD's) does not describe: the fields an
    API server would prune from it. Maps (additionalProperties) are followed, open objects
    (x-kubernetes-preserve-unknown-fields, or no properties) take anything."""
    if isinstance(obj, list):
        items = schema.get("items")
        return [p for i, item in enumerate(obj) for p in unknown_fields(items, item, f"{path}[{i}]")] if items else []
    if not isinstance(obj, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if "properties" not in schema:
        values = schema.get("additionalProperties")
        if not isinstance(values, dict):
            return []
        return [p for key, value in obj.items() for p in unknown_fields(values, value, f"{path}.{key}")]
    found: list[str] = []
    for key, value in obj.items():
        where = f"{path}.{key}" if path else key
        if key in schema["properties"]:
            found.extend(unknown_fields(schema["properties"][key], value, where))
        else:
            found.append(where)
    return found


def _read_crd(api: k8s.CustomObjectsApi, kind: JobKind) -> dict[str, Any] | None:
    """The cluster's CRD of `kind` as JSON; None (with a warning) where the launcher may not read it."""
    extensions = k8s.ApiextensionsV1Api(api.api_client)
    try:
        response = extensions.read_custom_resource_definition(kind.crd_name, _preload_content=False)
        return json.loads(response.data)
    except ApiException as exc:
        if exc.status == 404:
            raise TrainingJobError(
                f"{kind.name}: CRD {kind.crd_name} is not installed: {kind.missing_crd_hint}"
            ) from exc
        reason = f"HTTP {exc.status} {exc.reason}"
    except (urllib3.exceptions.HTTPError, ValueError) as exc:
        reason = str(exc)
    logger.warning(
        "%s: could not read CRD %s (%s); the API server checks the job's fields instead (strict field validation)",
        kind.name,
        kind.crd_name,
        reason,
    )
    return None


def check_installed_crd(api: k8s.CustomObjectsApi, kind: JobKind, job: dict[str, Any]) -> None:
    """Stop with one line when the cluster's CRD is too old for `job`: it does not serve the job's
    version, or lacks one of its fields (which the API server would otherwise drop)."""
    crd = _read_crd(api, kind)
    if crd is None:
        return
    served = {v["name"]: v for v in crd.get("spec", {}).get("versions", []) if v.get("served")}
    supported = f"sam3pipe supports {kind.supported_versions}"
    if kind.version not in served:
        raise TrainingJobError(
            f"{kind.name}: the cluster's CRD {kind.crd_name} does not serve {kind.group}/{kind.version} "
            f"(it serves {', '.join(sorted(served)) or 'nothing'}); {supported}"
        )
    schema = served[kind.version].get("schema", {}).get("openAPIV3Schema") or {}
    unknown = unknown_fields(schema, job)
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise TrainingJobError(
            f"{kind.name}: the cluster's CRD {kind.crd_name} does not know {unknown[0]}{more}: its operator is "
            f"older than this job needs; {supported}"
        )
    logger.info("%s: the cluster's CRD %s knows every field of the job", kind.name, kind.crd_name)


def describe_progress(status: dict[str, Any]) -> str:
    """A trainer's reported progress (Trainer v2's trainerStatus) as one log line's text."""
    parts = []
    if "progressPercentage" in status:
        parts.append(f"{status['progressPercentage']}% done")
    if "estimatedRemainingSeconds" in status:
        parts.append(f"about {status['estimatedRemainingSeconds']} s left")
    metrics = " ".join(f"{m.get('name')}={m.get('value')}" for m in status.get("metrics") or [])
    return ", ".join(parts) + (f"; {metrics}" if metrics else "")


class JobClient:
    """The CustomObjects calls on one kind of job, with the launcher's error handling."""

    def __init__(self, api: k8s.CustomObjectsApi, kind: JobKind) -> None:
        self.api, self.kind = api, kind

    def _args(self, namespace: str) -> tuple[str, str, str, str]:
        return self.kind.group, self.kind.version, namespace, self.kind.plural

    def create(self, job: dict[str, Any]) -> None:
        # Strict: a field the installed CRD lacks is an error (400), not silently pruned
        self.api.create_namespaced_custom_object(
            *self._args(job["metadata"]["namespace"]), job, field_validation="Strict"
        )

    def read(self, name: str, namespace: str) -> dict[str, Any]:
        return self.api.get_namespaced_custom_object(*self._args(namespace), name)

    def get(self, name: str, namespace: str) -> dict[str, Any] | None:
        """The job, or None once it is gone."""
        try:
            return self.read(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _api_error(self.kind, "get", name, namespace, exc) from exc

    def delete(self, name: str, namespace: str) -> None:
        """Delete the job and, in the background, its pods; a failure is a warning (the TTL or an admin ends it)."""
        try:
            self.api.delete_namespaced_custom_object(
                *self._args(namespace), name, body=k8s.V1DeleteOptions(propagation_policy="Background")
            )
            logger.info("deleted %s %s/%s", self.kind.name, namespace, name)
        except ApiException as exc:
            if exc.status != 404:
                logger.warning(
                    "could not delete %s %s/%s: HTTP %s %s", self.kind.name, namespace, name, exc.status, exc.reason
                )
        except urllib3.exceptions.HTTPError as exc:
            logger.warning("could not delete %s %s/%s: %s", self.kind.name, namespace, name, exc)

    def wait_deleted(self, name: str, namespace: str, launch: LaunchSettings) -> None:
        deadline = time.monotonic() + launch.timeout_s
        while self.get(name, namespace) is not None:
            if time.monotonic() >= deadline:
                raise TrainingJobError(
                    f"{self.kind.name} {namespace}/{name}: still not deleted after {launch.timeout_s} s"
                )
            time.sleep(launch.poll_interval_s)

    def create_or_adopt(self, job: dict[str, Any], launch: LaunchSettings) -> None:
        """Create the job; a retried launcher adopts its earlier job, unless that one was kept Failed."""
        name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
        try:
            self.create(job)
            logger.info("created %s %s/%s", self.kind.name, namespace, name)
            return
        except ApiException as exc:
            if exc.status != 409:
                raise _api_error(self.kind, "create", name, namespace, exc) from exc
        existing = self.get(name, namespace)
        if existing is not None and final_state(self.kind, existing) != FAILED:
            logger.warning("%s %s/%s already exists (a retried launcher): watching it", self.kind.name, namespace, name)
            return
        if existing is not None:
            logger.warning(
                "%s %s/%s was kept Failed by an earlier attempt: replacing it", self.kind.name, namespace, name
            )
            self.delete(name, namespace)
            self.wait_deleted(name, namespace, launch)
        try:
            self.create(job)
        except ApiException as exc:
            raise _api_error(self.kind, "create", name, namespace, exc) from exc
        logger.info("created %s %s/%s", self.kind.name, namespace, name)

    def watch(self, name: str, namespace: str, poll_interval_s: float, timeout_s: float) -> dict[str, Any]:
        """Poll the job until it ends, logging each condition once; return the job as last read.

        Transient API failures (5xx, 429, lost connections) are retried until the deadline.
        """
        deadline = time.monotonic() + timeout_s
        seen: set[tuple[str, str, str]] = set()
        progress: dict[str, Any] = {}
        while True:
            try:
                job = self.read(name, namespace)
            except (ApiException, urllib3.exceptions.HTTPError) as exc:
                if isinstance(exc, ApiException) and not _is_transient(exc):
                    raise _api_error(self.kind, "get", name, namespace, exc) from exc
                logger.warning(
                    "%s %s/%s: reading its status failed, retrying: %s", self.kind.name, namespace, name, exc
                )
                job = {}
            for condition in job_conditions(job):
                key = (condition.get("type", ""), condition.get("status", ""), condition.get("reason", ""))
                if key not in seen:
                    seen.add(key)
                    logger.info("%s %s: %s=%s %s %s", self.kind.name, name, *key, condition.get("message", ""))
            reported = (job.get("status") or {}).get(self.kind.progress_status) if self.kind.progress_status else None
            if reported and reported != progress:
                progress = reported
                logger.info("%s %s: %s", self.kind.name, name, describe_progress(reported))
            if final_state(self.kind, job) is not None:
                return job
            if time.monotonic() >= deadline:
                raise TrainingJobError(f"{self.kind.name} {namespace}/{name}: not finished after {timeout_s:.0f} s")
            time.sleep(poll_interval_s)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """KFP stops a component with SIGTERM, whose default handler skips `finally`: make it unwind instead."""
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def failure_message(kind: JobKind, job: dict[str, Any], kept: bool) -> str:
    """Why the job failed (its Failed condition's reason and message) and how to read its pods' logs."""
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    condition = final_condition(kind, job) or {}
    reason = condition.get("reason") or "no reason given"
    message = condition.get("message") or ""
    logs = f"kubectl logs -n {namespace} -l {kind.pod_label}={name} --tail=200"
    if kept:
        where = f"kept for debugging: kubectl describe {kind.plural} -n {namespace} {name}; {logs}"
    else:
        where = f"its pods' logs: {logs} (the job is deleted; --set {kind.mode}.keep_failed=true keeps it)"
    return f"{kind.name} {namespace}/{name} failed: {reason}{': ' + message if message else ''}; {where}"


def run_job(api: k8s.CustomObjectsApi, kind: JobKind, job: dict[str, Any], launch: LaunchSettings) -> None:
    """Create (or adopt) the job, wait for it, and delete it; raise if it did not succeed."""
    jobs = JobClient(api, kind)
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    with _sigterm_raises():
        jobs.create_or_adopt(job, launch)
        try:
            ended = jobs.watch(name, namespace, launch.poll_interval_s, launch.timeout_s)
        except KubernetesApiError:
            logger.warning("leaving %s %s/%s running for a retried launcher to adopt", kind.name, namespace, name)
            raise
        except BaseException:
            # timed out, or this pod is being terminated: nobody would watch the job any more
            jobs.delete(name, namespace)
            raise
        failed = final_state(kind, ended) == FAILED
        kept = failed and launch.keep_failed
        if kept:
            logger.warning(
                "keeping failed %s %s/%s for debugging (%s.keep_failed)", kind.name, namespace, name, kind.mode
            )
        else:
            jobs.delete(name, namespace)
    if failed:
        raise TrainingJobError(failure_message(kind, {**ended, "metadata": job["metadata"]}, kept))


def current_namespace(configured: str) -> str:
    if configured:
        return configured
    if NAMESPACE_FILE.exists():
        return NAMESPACE_FILE.read_text(encoding="utf-8").strip()
    raise ConfigError(
        "training job: not running in a pod; set the settings key <mode>.namespace (e.g. trainjob.namespace)"
    )


def custom_objects_api() -> k8s.CustomObjectsApi:
    """In a pod: its service account; elsewhere (a developer's shell): the current kubeconfig."""
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()
    return k8s.CustomObjectsApi()


# (name, namespace, container args, nodes, GPUs per node, launch settings, extra env) -> the job manifest
JobBuilder = Callable[[str, str, list[str], int, int, LaunchSettings, dict[str, str]], dict[str, Any]]


def training_job(
    build_job: JobBuilder,
    overrides: list[str],
    launch: LaunchSettings,
    pipeline_run_id: str,
    nodes: int,
    gpus_per_node: int,
    store: str,
    extra_env: dict[str, str],
    namespace: str,
    stage: str = "",
) -> tuple[dict[str, Any], str]:
    """The job manifest that trains with `overrides`, and the URI where its rank 0 writes the train outputs."""
    name = job_name(pipeline_run_id, stage)
    outputs_uri = storage.join(store, "pipeline-runs", name, "train-outputs.json")
    args = ["-m", "torch.distributed.run", *rank_command("train", overrides, outputs_uri)]
    return build_job(name, namespace, args, nodes, gpus_per_node, launch, extra_env), outputs_uri


def launch_training(
    kind: JobKind,
    build_job: JobBuilder,
    overrides: list[str],
    launch: LaunchSettings,
    pipeline_run_id: str,
    nodes: int,
    gpus_per_node: int,
    store: str,
    extra_env: dict[str, str],
    api: k8s.CustomObjectsApi | None = None,
    stage: str = "",
) -> dict[str, Any]:
    """Train on `nodes` pods x `gpus_per_node` GPUs as a job of `kind`; return rank 0's outputs of the train component."""
    if not storage.is_remote(store):
        raise ConfigError(local_store_message(kind, store))
    job, outputs_uri = training_job(
        build_job,
        overrides,
        launch,
        pipeline_run_id,
        nodes,
        gpus_per_node,
        store,
        extra_env,
        current_namespace(launch.namespace),
        stage,
    )
    api = api or custom_objects_api()
    if kind.supported_versions:
        check_installed_crd(api, kind, job)
    run_job(api, kind, job, launch)
    if not storage.exists(outputs_uri):
        name = job["metadata"]["name"]
        raise TrainingJobError(f"{kind.name} {name} succeeded but rank 0 wrote no outputs to {outputs_uri}")
    return storage.read_json(outputs_uri)


def local_store_message(kind: JobKind, store: str) -> str:
    return (
        f"{kind.name}: the store {store!r} is local to this pod; the job's pods and the launcher need a shared "
        "object store: set SAM3PIPE_STORE (ConfigMap sam3pipe-env) or the store parameter to s3://..."
    )
