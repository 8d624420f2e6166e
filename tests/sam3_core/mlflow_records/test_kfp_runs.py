"""Runs KFP owns (KFP 2.17, KEP-12862): with MLFLOW_RUN_ID set, a component logs into that run and its parent.

The module's fixture acts as KFP's backend would: it creates the pipeline run's parent MLflow run
and one nested run per task with the MLflow client, on the session's real `mlflow server`, then
runs train -> predict -> evaluate in-process, each with the environment KFP's driver gives its
task (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_ID, MLFLOW_RUN_ID). The tests read what landed where.
MLFLOW_WORKSPACE is left out: the session's server runs without workspaces, and MLflow's own client
refuses a workspace such a server does not support; on a cluster the client handles it, not us.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run, ViewType

from components import evaluate, predict, train
from sam3_core.data.prep import PreparedDataset
from sam3_core.errors import ConfigError
from sam3_core.mlflow_records import TAG_COMPONENT, TAG_PIPELINE_RUN_ID, MlflowConfig, component_run
from tests.fixtures.datasets import TINY_MODEL
from tests.fixtures.mlflow import FAST_TRACKING, MlflowServer
from tests.fixtures.s3 import use_s3_server
from tests.fixtures.saco import SacoShape, generate

COMPONENTS = ("train", "predict", "evaluate")


@dataclass
class KfpRuns:
    """The MLflow runs KFP made for one pipeline run, and what the components returned."""

    server: MlflowServer
    experiment_id: str
    parent_id: str
    task_ids: dict[str, str]
    model_name: str
    outputs: dict[str, dict[str, Any]]
    runs_before: int

    def run(self, component: str) -> Run:
        return MlflowClient(self.server.url).get_run(self.task_ids[component])

    def parent(self) -> Run:
        return MlflowClient(self.server.url).get_run(self.parent_id)

    def all_runs(self) -> list[Run]:
        return MlflowClient(self.server.url).search_runs([self.experiment_id], run_view_type=ViewType.ALL)


def kfp_task_env(env: pytest.MonkeyPatch, server: MlflowServer, experiment_id: str, run_id: str) -> None:
    """What KFP's driver puts in a task's container (no auth variables or workspace: see the module doc)."""
    env.setenv("MLFLOW_TRACKING_URI", server.url)
    env.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    env.setenv("MLFLOW_RUN_ID", run_id)


@pytest.fixture(scope="module")
def kfp_runs(
    s3_server: str,
    mlflow_server: MlflowServer,
    tiny_dataset: PreparedDataset,
    tiny_train_overrides: list[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> KfpRuns:
    home = tmp_path_factory.mktemp("kfp-runs")
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=bucket)
    client = MlflowClient(mlflow_server.url)
    experiment_id = client.create_experiment(f"kfp-{uuid.uuid4().hex[:12]}")
    # KFP's API server: the parent run; its driver: a nested run per task
    parent = client.create_run(experiment_id, run_name="kfp-pipeline-run", tags={"kfp.pipeline_run_id": "kfp-1"})
    task_ids = {
        component: client.create_run(
            experiment_id, run_name=component, tags={"mlflow.parentRunId": parent.info.run_id}
        ).info.run_id
        for component in COMPONENTS
    }
    runs_before = len(client.search_runs([experiment_id], run_view_type=ViewType.ALL))
    model_name = f"sam3-kfp-{uuid.uuid4().hex[:8]}"
    outputs: dict[str, dict[str, Any]] = {}
    mlflow_server.start()
    with pytest.MonkeyPatch.context() as env:
        use_s3_server(env, s3_server, home)
        env.delenv("SAM3PIPE_PIPELINE_RUN_ID", raising=False)
        env.setenv("MLFLOW_EXPERIMENT_NAME", f"not-used-{uuid.uuid4().hex[:8]}")
        kfp_task_env(env, mlflow_server, experiment_id, task_ids["train"])
        base = [o for o in tiny_train_overrides if not o.startswith("data.uri=")]
        outputs["train"] = train.execute(
            [
                *base,
                f"data.uri={tiny_dataset.uri}",
                "train.max_steps=4",
                "train.val_every=2",
                "train.checkpoint_every=2",
                f"output.store=s3://{bucket}/store",
                "output.run_name=kfp-1",
                f"mlflow.registered_model_name={model_name}",
                *FAST_TRACKING,
            ]
        )
        kfp_task_env(env, mlflow_server, experiment_id, task_ids["predict"])
        outputs["predict"] = predict.execute(
            [
                f"data.uri={tiny_dataset.uri}",
                *TINY_MODEL,
                f"model.uri=models:/{model_name}@candidate",
                f"output.uri={outputs['train']['run_uri']}/predictions",
                f"mlflow.registered_model_name={model_name}",
                *FAST_TRACKING,
            ]
        )
        kfp_task_env(env, mlflow_server, experiment_id, task_ids["evaluate"])
        outputs["evaluate"] = evaluate.execute(
            [
                f"gt={tiny_dataset.uri}/val.json",
                f"frames_gt={tiny_dataset.uri}/val_frames_coco.json",
                f"predictions={outputs['predict']['predictions_uri']}",
                f"output={home / 'metrics.json'}",
                *FAST_TRACKING,
            ]
        )
    return KfpRuns(mlflow_server, experiment_id, parent.info.run_id, task_ids, model_name, outputs, runs_before)


def test_no_component_creates_a_run_of_its_own(kfp_runs: KfpRuns) -> None:
    runs = kfp_runs.all_runs()
    assert len(runs) == kfp_runs.runs_before == 1 + len(COMPONENTS)
    assert {r.info.run_id for r in runs} == {kfp_runs.parent_id, *kfp_runs.task_ids.values()}


def test_each_component_logs_its_params_and_metrics_into_its_task_run(kfp_runs: KfpRuns) -> None:
    trained = kfp_runs.run("train")
    assert trained.data.params["optim.lr"] and trained.data.params["train.max_steps"] == "4"
    assert "train/loss" in trained.data.metrics and "val/segm_AP" in trained.data.metrics
    assert kfp_runs.run("predict").data.tags["sam3pipe.model_uri"] == f"models:/{kfp_runs.model_name}@candidate"
    assert "eval/segm_AP" in kfp_runs.run("evaluate").data.metrics


def test_the_task_runs_are_tagged_so_the_runs_table_and_reproduce_find_them(kfp_runs: KfpRuns) -> None:
    parent_tags = kfp_runs.parent().data.tags
    assert parent_tags[TAG_COMPONENT] == "pipeline"
    for component in COMPONENTS:
        tags = kfp_runs.run(component).data.tags
        assert tags[TAG_COMPONENT] == component
        assert tags[TAG_PIPELINE_RUN_ID] == parent_tags[TAG_PIPELINE_RUN_ID]
        assert tags["mlflow.parentRunId"] == kfp_runs.parent_id


def test_the_parent_row_gets_the_comparison_params_and_headline_metrics(kfp_runs: KfpRuns) -> None:
    parent = kfp_runs.parent()
    assert parent.data.params["max_steps"] == "4" and "lr" in parent.data.params
    assert {"val/segm_AP", "best_step", "eval/segm_AP", "eval/bbox_AP"} <= set(parent.data.metrics)


def test_checkpoints_are_logged_models_of_the_train_run_and_the_best_is_registered(kfp_runs: KfpRuns) -> None:
    models = MlflowClient(kfp_runs.server.url).search_logged_models(experiment_ids=[kfp_runs.experiment_id])
    assert models and all(m.tags["sam3pipe.train_run_id"] == kfp_runs.task_ids["train"] for m in models)
    version = MlflowClient(kfp_runs.server.url).get_model_version_by_alias(kfp_runs.model_name, "candidate")
    assert version.run_id == kfp_runs.task_ids["train"]
    assert version.source == kfp_runs.outputs["train"]["best_checkpoint_uri"]


def test_artifacts_land_in_the_task_runs(kfp_runs: KfpRuns) -> None:
    client = MlflowClient(kfp_runs.server.url)
    train_files = {a.path for a in client.list_artifacts(kfp_runs.task_ids["train"])}
    assert {"config.yaml", "reproduce.json", "checkpoints", "dataset"} <= train_files
    evaluate_files = {a.path for a in client.list_artifacts(kfp_runs.task_ids["evaluate"])}
    assert {"metrics.json", "pr_curves.png", "summary.txt"} <= evaluate_files


def test_the_runs_kfp_owns_are_left_for_kfp_to_end(kfp_runs: KfpRuns) -> None:
    assert {kfp_runs.run(c).info.status for c in COMPONENTS} == {"RUNNING"}
    assert kfp_runs.parent().info.status == "RUNNING"


def test_a_run_id_the_server_does_not_know_is_one_clear_error(mlflow_tracking: MlflowServer) -> None:
    unknown = uuid.uuid4().hex
    cfg = MlflowConfig(run_id=unknown, background=False, connect_timeout_s=5.0, system_metrics=False)
    with pytest.raises(ConfigError, match=f"MLFLOW_RUN_ID={unknown}: MLflow at .* has no such run"):
        component_run(cfg, "evaluate", {"gt": "val.json"})


def test_the_evaluate_cli_given_an_unknown_run_id_exits_2_with_one_error_line(
    mlflow_tracking: MlflowServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    unknown = uuid.uuid4().hex
    monkeypatch.setenv("MLFLOW_RUN_ID", unknown)
    gt, predictions = generate(SacoShape(videos=2, frames=4, categories=30))
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(predictions))
    argv = [f"gt={tmp_path / 'gt.json'}", f"predictions={tmp_path / 'pred.json'}", f"output={tmp_path / 'out.json'}"]
    with caplog.at_level(logging.ERROR):
        assert evaluate.main([*argv, *FAST_TRACKING]) == 2
    (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.startswith(f"error: MLFLOW_RUN_ID={unknown}: MLflow at ") and "\n" not in error
    assert MlflowClient().get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"]) is None
