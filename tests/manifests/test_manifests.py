"""The Kubernetes manifests: every kustomization renders to objects that pass strict offline
schema validation, wire what the pipeline expects, and hold no credentials.

There is no kustomize binary here, so `render` implements the subset the manifests use
(resources, namespace, strategic-merge patches by kind and name) and refuses anything else.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pipeline.settings import load_settings
from tests.fixtures.fake_k8s import CLUSTERTRAININGRUNTIME_CRD, TRAININGRUNTIME_CRD, load_crd_validator
from tests.fixtures.paths import REPO
from tests.fixtures.strategic_merge import merge

MANIFESTS = REPO / "manifests"
KUSTOMIZATIONS = ["base", "overlays/local-minio", "overlays/aws-s3"]
KUBERNETES_VERSION = "1.30"
SUPPORTED_FIELDS = {"apiVersion", "kind", "namespace", "resources", "patches"}
# Secrets the user creates (manifests/README.md) or Kubeflow Pipelines already provides
EXTERNAL_SECRETS = {"mlpipeline-minio-artifact", "sam3pipe-postgres", "sam3pipe-s3"}
CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN", re.IGNORECASE)


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def render(directory: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    unsupported = set(kustomization) - SUPPORTED_FIELDS
    assert not unsupported, f"{directory}: the test renderer does not implement {unsupported}"
    docs: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        docs.extend(render(path) if path.is_dir() else load_docs(path))
    for patch_ref in kustomization.get("patches", []):
        for patch in load_docs(directory / patch_ref["path"]):
            key = (patch["kind"], patch["metadata"]["name"])
            index = next((i for i, doc in enumerate(docs) if (doc["kind"], doc["metadata"]["name"]) == key), None)
            assert index is not None, f"{directory / patch_ref['path']}: no {key} to patch"
            docs[index] = merge(docs[index], patch)
    if "namespace" in kustomization:
        for doc in docs:
            doc["metadata"]["namespace"] = kustomization["namespace"]
    return docs


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        c
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
        for c in d["spec"]["template"]["spec"]["containers"]
    ]


def env_refs(docs: list[dict[str, Any]], ref: str) -> list[dict[str, str]]:
    return [e["valueFrom"][ref] for c in containers(docs) for e in c.get("env", []) if ref in e.get("valueFrom", {})]


@pytest.fixture(scope="module", params=KUSTOMIZATIONS)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(MANIFESTS / request.param)


def test_every_object_passes_strict_schema_validation(rendered) -> None:
    for doc in rendered:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_strict_validation_catches_a_misspelt_field() -> None:
    deployment = copy.deepcopy(find(render(MANIFESTS / "base"), "Deployment", "sam3pipe-mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {}

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_mlflow_server_uses_postgres_and_proxies_artifacts_to_s3(rendered) -> None:
    mlflow = find(rendered, "Deployment", "sam3pipe-mlflow")["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(mlflow["args"])
    config = find(rendered, "ConfigMap", "sam3pipe-env")["data"]

    assert "--backend-store-uri=postgresql+psycopg2://$(PGUSER):$(PGPASSWORD)@" in args
    assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in args and "--serve-artifacts" in args
    assert config["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")


def test_mlflow_server_has_health_probes_and_resource_limits(rendered) -> None:
    mlflow = find(rendered, "Deployment", "sam3pipe-mlflow")["spec"]["template"]["spec"]["containers"][0]

    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert mlflow[probe]["httpGet"]["path"] == "/health"
    assert mlflow["resources"]["limits"]["memory"]
    service = find(rendered, "Service", "sam3pipe-mlflow")
    assert service["spec"]["ports"][0]["port"] == 5000


def test_every_container_has_requests_limits_and_runs_as_non_root(rendered) -> None:
    for doc in rendered:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            pod = doc["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            for container in pod["containers"]:
                assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def test_credentials_only_come_from_secret_references(rendered) -> None:
    for container in containers(rendered):
        for env in container.get("env", []):
            if CREDENTIAL_NAME.search(env["name"]):
                assert "secretKeyRef" in env.get("valueFrom", {}), env["name"]
    for doc in rendered:
        if doc["kind"] == "Secret":
            assert set(doc["stringData"]) == {"MLFLOW_TRACKING_URI"}
            assert "@" not in doc["stringData"]["MLFLOW_TRACKING_URI"]


def test_referenced_secrets_exist_or_are_documented(rendered) -> None:
    rendered_secrets = {d["metadata"]["name"] for d in rendered if d["kind"] == "Secret"}

    assert {ref["name"] for ref in env_refs(rendered, "secretKeyRef")} <= rendered_secrets | EXTERNAL_SECRETS


def test_referenced_config_keys_exist(rendered) -> None:
    config_maps = {d["metadata"]["name"]: d["data"] for d in rendered if d["kind"] == "ConfigMap"}

    for ref in env_refs(rendered, "configMapKeyRef"):
        assert ref["key"] in config_maps[ref["name"]], ref


def test_manifests_provide_what_the_compiled_pipeline_reads(rendered) -> None:
    settings = load_settings()

    config = find(rendered, "ConfigMap", settings.object_store.config_map)["data"]
    assert set(settings.object_store.config_map_keys) <= set(config)
    assert config["SAM3PIPE_STORE"].startswith("s3://")
    assert settings.mlflow.uri_field in find(rendered, "Secret", settings.mlflow.secret)["stringData"]
    find(rendered, "ServiceAccount", settings.pytorchjob.service_account)


def test_launcher_rbac_covers_create_watch_delete_and_pod_logs(rendered) -> None:
    rules = find(rendered, "Role", "sam3pipe-launcher")["rules"]
    granted = {(resource, verb) for rule in rules for resource in rule["resources"] for verb in rule["verbs"]}

    assert {("pytorchjobs", v) for v in ("create", "get", "delete")} <= granted
    assert {("pods", "list"), ("pods/log", "get")} <= granted
    binding = find(rendered, "RoleBinding", "sam3pipe-launcher")
    assert binding["roleRef"]["name"] == "sam3pipe-launcher"
    assert {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"} in binding["subjects"]


def test_aws_overlay_points_the_store_and_mlflow_at_s3_credentials() -> None:
    docs = render(MANIFESTS / "overlays/aws-s3")

    config = find(docs, "ConfigMap", "sam3pipe-env")["data"]
    assert config["AWS_ENDPOINT_URL"].endswith(".amazonaws.com")
    assert {ref["name"] for ref in env_refs(docs, "secretKeyRef") if ref["key"] in ("accesskey", "secretkey")} == {
        "sam3pipe-s3"
    }


def test_local_overlay_shrinks_the_database_volume() -> None:
    postgres = find(render(MANIFESTS / "overlays/local-minio"), "StatefulSet", "sam3pipe-postgres")

    assert postgres["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "2Gi"


TRAINER_V2 = MANIFESTS / "trainer-v2"


@pytest.fixture(scope="module")
def trainer_v2() -> list[dict[str, Any]]:
    return render(TRAINER_V2)


@pytest.fixture(scope="module")
def runtime(trainer_v2) -> dict[str, Any]:
    return find(trainer_v2, "ClusterTrainingRuntime", load_settings().trainjob.runtime)


def test_trainer_v2_runtime_passes_trainer_v2_3_cluster_training_runtime_crd(runtime) -> None:
    validator = load_crd_validator(CLUSTERTRAININGRUNTIME_CRD, "v1alpha1")

    assert runtime["kind"] == "ClusterTrainingRuntime" and "namespace" not in runtime["metadata"]
    assert validator.errors(runtime) == []
    broken = copy.deepcopy(runtime)
    broken["spec"]["template"]["spec"]["failurePolicy"]["maxRestart"] = 2
    assert any("maxRestart" in error for error in validator.errors(broken))


def test_trainer_v2_runtime_copied_as_a_namespaced_training_runtime_passes_its_crd(runtime) -> None:
    # manifests/README.md: a profile namespace may hold the runtime as a TrainingRuntime instead
    namespaced = copy.deepcopy(runtime)
    namespaced["kind"] = "TrainingRuntime"
    namespaced["metadata"]["namespace"] = "kubeflow-user-example-com"

    assert load_crd_validator(TRAININGRUNTIME_CRD, "v1alpha1").errors(namespaced) == []


def test_trainer_v2_runtime_sets_no_process_count_of_its_own(runtime) -> None:
    # Trainer v2.3's torch policy has no numProcPerNode: the TrainJob sets it (pipeline/trainjob.py)
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 1, "torch": {}}


def test_trainer_v2_rbac_lets_the_launcher_read_the_trainjob_crd_only(trainer_v2) -> None:
    from pipeline import trainjob

    role = find(trainer_v2, "ClusterRole", "sam3pipe-crd-reader")
    binding = find(trainer_v2, "ClusterRoleBinding", "sam3pipe-crd-reader")
    for doc in (role, binding):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)

    (rule,) = role["rules"]
    assert rule["resourceNames"] == [trainjob.KIND.crd_name] and rule["verbs"] == ["get"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"} in binding["subjects"]


def test_trainer_v2_runtime_jobs_pass_strict_kubernetes_validation(runtime) -> None:
    for replicated in runtime["spec"]["template"]["spec"]["replicatedJobs"]:
        template = replicated["template"]
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": replicated["name"], **template.get("metadata", {})},
        }
        kubernetes_validate.validate({**job, "spec": template["spec"]}, KUBERNETES_VERSION, strict=True)


def test_trainer_v2_runtime_is_what_the_trainjobs_reference(runtime) -> None:
    settings = load_settings()
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]

    assert runtime["metadata"]["name"] == settings.trainjob.runtime
    # the Trainer puts the TrainJob's trainer (image, command, resources) into this job's "node" container
    assert (
        node["name"] == "node"
        and node["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    )
    assert [c["name"] for c in pod["containers"]] == ["node"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False


def test_launcher_rbac_covers_trainjobs(rendered) -> None:
    rules = find(rendered, "Role", "sam3pipe-launcher")["rules"]
    granted = {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }

    assert {("trainer.kubeflow.org", "trainjobs", v) for v in ("create", "get", "delete")} <= granted
    find(rendered, "ServiceAccount", load_settings().trainjob.service_account)
