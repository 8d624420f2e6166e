"""The sweep as a Katib Experiment: the manifest `sam3pipe compile-experiment` writes, checked
offline against Katib's CRD and API types, and one real trial run by its entry point on the tiny
dataset (metrics on stdout in the collector's format, the trial in MLflow under the sweep run)."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline import katib
from pipeline.cli import main
from pipeline.settings import load_settings
from sam3_core.errors import InputError
from sam3_core.mlflow_records import sweeps
from sam3_core.mlflow_records.runs import SWEEP, TAG_COMPONENT
from tests.fixtures.datasets import TINY_MODEL, TINY_TRAIN
from tests.fixtures.fake_k8s import strict_schema
from tests.fixtures.paths import SCHEMAS

PLANTED_SECRET = "planted-secret-value-1a2b3c"
GRID = {"lr": [0.0001, 0.0003], "optim.weight_decay": [0.05, 0.1]}


@pytest.fixture(scope="module")
def experiment_schema() -> jsonschema.Draft7Validator:
    definitions = json.loads((SCHEMAS / "katib.v1beta1.experiment.definitions.json").read_text())["definitions"]
    schema = {"definitions": strict_schema(definitions), "$ref": "#/definitions/v1beta1.Experiment"}
    return jsonschema.Draft7Validator(schema)


@pytest.fixture
def experiment(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", PLANTED_SECRET)
    settings = load_settings(["image=registry.example.com/sam3pipe:1.2.3", "sweep.parallelism=3"])
    base = katib.base_parameters({"max_steps": 100, "gpus": 2})
    return katib.build_experiment(settings, "lr-sweep", "team-a", GRID, "s3://b/datasets/abc", base, "segm_AP", "max")


def errors(validator: jsonschema.Draft7Validator, obj: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def test_the_experiment_passes_katibs_crd_and_api_types(experiment, experiment_schema) -> None:
    crd = yaml.safe_load((SCHEMAS / "kubeflow.org_experiments.katib.yaml").read_text())

    assert experiment["apiVersion"] == f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}"
    assert experiment["kind"] == crd["spec"]["names"]["kind"]
    assert errors(experiment_schema, experiment) == []
    experiment["spec"]["trialTemplate"]["primaryContainer"] = "training"
    assert any("primaryContainer" in e for e in errors(experiment_schema, experiment))


def test_the_trial_job_passes_strict_kubernetes_validation(experiment) -> None:
    job = experiment["spec"]["trialTemplate"]["trialSpec"]

    kubernetes_validate.validate({**job, "metadata": {"name": "trial"}}, "1.30", strict=True)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["name"] == experiment["spec"]["trialTemplate"]["primaryContainerName"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_katib_searches_the_grid_and_fails_only_when_every_trial_failed(experiment) -> None:
    spec = experiment["spec"]

    assert spec["algorithm"] == {"algorithmName": "grid"}
    assert {p["name"]: p["feasibleSpace"]["list"] for p in spec["parameters"]} == {
        "lr": ["0.0001", "0.0003"],
        "optim_weight_decay": ["0.05", "0.1"],
    }
    assert (spec["maxTrialCount"], spec["parallelTrialCount"], spec["maxFailedTrialCount"]) == (4, 3, 3)
    assert spec["objective"]["type"] == "maximize" and spec["objective"]["objectiveMetricName"] == "segm_AP"


def test_every_trial_parameter_is_defined_and_used(experiment) -> None:
    template = experiment["spec"]["trialTemplate"]
    declared = {p["name"]: p["reference"] for p in template["trialParameters"]}
    used = set(re.findall(r"\$\{trialParameters\.([^}]+)\}", json.dumps(template["trialSpec"])))
    searched = {p["name"] for p in experiment["spec"]["parameters"]}

    assert used == set(declared)
    assert {ref for ref in declared.values() if not ref.startswith("${")} == searched


def test_the_trial_env_references_secrets_and_never_holds_their_values(experiment) -> None:
    env = {
        e["name"]: e
        for e in experiment["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["containers"][0]["env"]
    }

    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "mlpipeline-minio-artifact"
    assert PLANTED_SECRET not in json.dumps(experiment)


def test_metric_lines_are_what_the_collector_reads_and_logs_are_not() -> None:
    lines = katib.metric_lines({"segm_AP": 0.25, "video_mask_mAP_50_95": 1e-05})
    log = "2026-01-01 INFO train: overrides optim.lr=0.001 segm_AP=0.9"

    found = [re.search(katib.METRICS_FORMAT, line) for line in [*lines, log]]
    assert [(m[1], float(m[2])) for m in found if m] == [("segm_AP", 0.25), ("video_mask_mAP_50_95", 1e-05)]


def test_compile_experiment_writes_the_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "experiment.yaml"

    status = main(
        [
            "compile-experiment",
            "--spec",
            json.dumps(GRID),
            "--dataset-uri",
            "s3://b/d",
            "--output",
            str(out),
            "--name",
            "wd-sweep",
            "max_steps=50",
            "sweep_metric=bbox_AP",
            "sweep_mode=min",
        ]
    )

    assert status == 0 and json.loads(capsys.readouterr().out.splitlines()[-1])["trials"] == 4
    written = yaml.safe_load(out.read_text())
    assert written["metadata"]["name"] == "wd-sweep"
    assert written["spec"]["objective"] == {
        **written["spec"]["objective"],
        "type": "minimize",
        "objectiveMetricName": "bbox_AP",
    }
    assert '"max_steps": 50' in " ".join(
        written["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["containers"][0]["command"]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--spec", '[{"lr": 0.1}]'], "Katib searches a grid"),
        (["--spec", '{"lr": [0.1]}', "nodes=2"], "nodes: not a parameter of a Katib trial"),
        (["--spec", '{"lr": [0.1]}', "max_steps=ten"], "max_steps: expected a int value"),
    ],
)
def test_what_katib_cannot_run_is_refused(tmp_path, monkeypatch, caplog, args: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)

    status = main(["compile-experiment", "--dataset-uri", "s3://b/d", *args])

    assert status == 2 and any(message in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "experiment.yaml").exists()


def test_a_trial_with_a_bad_assignment_exits_2(capsys) -> None:
    status = katib.main(
        ["--experiment", "e", "--trial", "t", "--dataset-uri", "d", "--metric", "m", "--base", "{}", "lr"]
    )

    assert status == 2 and capsys.readouterr().out == ""


@pytest.mark.integration
def test_a_trial_trains_evaluates_reports_its_metrics_and_nests_under_the_sweep_run(
    tiny_dataset, torch_single_thread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the local MLflow store keeps artifacts under ./.sam3pipe
    for name in ("SAM3PIPE_PIPELINE_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.setenv(name, "")  # the steps set them for their own runs
    quiet = ["mlflow.system_metrics=false"]
    base = {
        "max_steps": 2,
        "batch_size": 1,
        "store": str(tmp_path / "store"),
        "mlflow_experiment": "katib-test",
        "train_overrides": [*TINY_MODEL, *TINY_TRAIN, *quiet],
        "predict_overrides": [*TINY_MODEL, *quiet],
        "evaluate_overrides": quiet,
        "registered_model": "katib-test",
    }
    printed = io.StringIO()

    with contextlib.redirect_stdout(printed):
        status = katib.main(
            [
                "--experiment",
                "exp-1",
                "--trial",
                "exp-1-abc",
                "--dataset-uri",
                tiny_dataset.uri,
                "--metric",
                "bbox_AP",
                "--base",
                json.dumps(base),
                "lr=0.001",
                "optim.weight_decay=0.1",
            ]
        )

    assert status == 0
    reported = dict(re.search(katib.METRICS_FORMAT, line).group(1, 2) for line in printed.getvalue().splitlines())
    assert "bbox_AP" in reported and "video_mask_mAP_50_95" in reported
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("katib-test").experiment_id])
    (sweep_run,) = [r for r in runs if r.data.tags.get(TAG_COMPONENT) == SWEEP]
    (trial,) = [r for r in runs if r.data.tags.get(sweeps.TAG_TRIAL_ID) == "exp-1-abc"]
    assert sweep_run.info.run_name == "sweep-exp-1" and trial.data.tags[MLFLOW_PARENT_RUN_ID] == sweep_run.info.run_id
    # the tuned values, next to the parent-row params every pipeline run gets (mlflow.parent_params)
    assert {"lr": "0.001", "optim.weight_decay": "0.1"}.items() <= trial.data.params.items()
    assert trial.data.metrics["eval/bbox_AP"] == pytest.approx(float(reported["bbox_AP"]))


def test_unknown_base_parameters_are_refused() -> None:
    with pytest.raises(InputError, match="source: not a parameter of a Katib trial"):
        katib.base_parameters({"source": "ytvis"})
