"""Every component reports to MLflow: a tiny train -> predict -> evaluate against a real tracking server.

The session's `tracked_pipelines` (tests/fixtures/mlflow.py) ran the pipeline twice, in-process
through each component's `execute`, the way the pipeline runs them: one pipeline run id each,
checkpoints in a moto S3 bucket (so the server accepts them as model sources), predict pointed
at `models:/<name>@candidate`. These tests read what the server holds about the first run.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run, ViewType

from components import evaluate, train
from sam3_core import storage
from sam3_core.mlflow_records import TAG_COMPONENT, TAG_PIPELINE_RUN_ID
from tests.fixtures.mlflow import FAST_TRACKING, MAX_STEPS, PipelineRun, TrackedPipelines


@pytest.fixture
def pipeline_run(pipelines: TrackedPipelines) -> PipelineRun:
    return pipelines.runs[0]


@pytest.fixture
def runs(pipelines: TrackedPipelines, pipeline_run: PipelineRun) -> dict[str, Run]:
    return pipelines.runs_of(pipeline_run)


def artifact_paths(run_id: str, folder: str | None = None) -> set[str]:
    """Every artifact file of a run, recursively."""
    paths: set[str] = set()
    for info in MlflowClient().list_artifacts(run_id, folder):
        paths |= artifact_paths(run_id, info.path) if info.is_dir else {info.path}
    return paths


def evaluate_overrides(dataset_uri: str, predictions_uri: str, output: Path) -> list[str]:
    """What the pipeline's evaluate step passes: video GT, frame GT, the predictions folder."""
    return [
        f"gt={storage.join(dataset_uri, 'val.json')}",
        f"frames_gt={storage.join(dataset_uri, 'val_frames_coco.json')}",
        f"predictions={predictions_uri}",
        f"output={output / 'metrics.json'}",
        *FAST_TRACKING,
    ]


def test_the_components_of_a_pipeline_run_nest_under_one_parent(runs: dict[str, Run]) -> None:
    assert sorted(runs) == ["evaluate", "pipeline", "predict", "train"]
    parent_id = runs["pipeline"].info.run_id
    for component in ("train", "predict", "evaluate"):
        assert runs[component].data.tags["mlflow.parentRunId"] == parent_id
        assert runs[component].info.status == "FINISHED"


def test_train_params_are_its_resolved_config_with_dotted_keys(pipeline_run: PipelineRun, runs: dict[str, Run]) -> None:
    params = runs["train"].data.params

    assert params["train.max_steps"] == str(MAX_STEPS)
    assert params["data.uri"] == pipeline_run.dataset_uri
    assert params["model.image_size"] == "56"
    assert params["data.clips.frames_per_clip"] == "2"
    assert params["mlflow.pipeline_run_id"] == pipeline_run.pipeline_run_id


def test_train_logs_the_loss_terms_lr_and_throughput_at_every_logged_step(runs: dict[str, Run]) -> None:
    run = runs["train"]
    history = MlflowClient().get_metric_history(run.info.run_id, "train/loss")

    assert [metric.step for metric in history] == [2, 4]
    assert {"train/loss_bbox", "train/loss_mask", "train/lr", "train/clips_per_s", "train/frames_per_s"} <= set(
        run.data.metrics
    )


def test_train_logs_its_config_and_the_dataset_manifest(pipeline_run: PipelineRun, runs: dict[str, Run]) -> None:
    run = runs["train"]
    dataset_id = storage.read_json(storage.join(pipeline_run.dataset_uri, "manifest.json"))["dataset_id"]

    config = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml")
    manifest = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/dataset/manifest.json")
    assert f"max_steps: {MAX_STEPS}" in config
    assert manifest["dataset_id"] == dataset_id
    assert run.data.tags["sam3pipe.dataset_id"] == dataset_id


def test_train_references_its_checkpoints_in_the_store_without_uploading_them(
    pipeline_run: PipelineRun, runs: dict[str, Run]
) -> None:
    run = runs["train"]
    best = pipeline_run.trained["best_checkpoint_uri"]

    reference = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/checkpoints/best.json")
    assert reference["uri"] == best
    assert reference["sha256"] == storage.sha256_bytes(storage.read_bytes(best))
    assert run.data.tags["sam3pipe.checkpoint.best"] == best
    assert run.data.tags["sam3pipe.checkpoint.last"] == pipeline_run.trained["last_checkpoint_uri"]
    assert not [path for path in artifact_paths(run.info.run_id) if path.endswith(".pt")]


def test_the_best_checkpoint_is_registered_as_a_version_of_its_logged_model(
    pipelines: TrackedPipelines, pipeline_run: PipelineRun, runs: dict[str, Run]
) -> None:
    client = MlflowClient()
    versions = client.search_model_versions(
        f"name = '{pipelines.model_name}' and tags.`{TAG_PIPELINE_RUN_ID}` = '{pipeline_run.pipeline_run_id}'"
    )

    (version,) = versions
    best = client.get_logged_model(runs["train"].data.tags["sam3pipe.checkpoint.best_model_id"])
    assert version.source == pipeline_run.trained["best_checkpoint_uri"]
    assert version.run_id == runs["train"].info.run_id
    assert version.tags["sam3pipe.model_id"] == best.model_id and best.tags["sam3pipe.best"] == "true"
    assert {"name": pipelines.model_name, "version": int(version.version)} in json.loads(
        best.tags["mlflow.modelVersions"]
    )


def test_predict_resolves_the_registry_alias_to_the_best_checkpoint(
    pipelines: TrackedPipelines, pipeline_run: PipelineRun, runs: dict[str, Run]
) -> None:
    run = runs["predict"]

    assert run.data.params["model.uri"] == pipeline_run.trained["best_checkpoint_uri"]
    assert run.data.tags["sam3pipe.model_uri"] == f"models:/{pipelines.model_name}@candidate"
    assert run.data.tags["sam3pipe.predictions_uri"] == pipeline_run.predicted["predictions_uri"]


def test_predict_logs_frames_of_the_first_video_with_their_masks(runs: dict[str, Run]) -> None:
    run_id = runs["predict"].info.run_id
    previews = sorted(path for path in artifact_paths(run_id) if path.startswith("previews/"))

    assert len(previews) == 3 and all(path.endswith(".png") for path in previews)
    image = mlflow.artifacts.load_image(f"runs:/{run_id}/{previews[0]}")
    assert image.size == (64, 64)  # the dataset's frame size


def test_evaluate_logs_the_evaluators_metrics_under_eval(pipeline_run: PipelineRun, runs: dict[str, Run]) -> None:
    metrics = runs["evaluate"].data.metrics
    expected = pipeline_run.evaluated["metrics"]

    for name in ("bbox_AP", "bbox_AR100", "segm_AP", "video_bbox_mAP_50_95", "video_mask_mAP_50_95"):
        assert metrics[f"eval/{name}"] == pytest.approx(expected[name])


def test_evaluate_logs_metrics_json_the_table_the_pr_plot_and_a_summary(
    pipeline_run: PipelineRun, runs: dict[str, Run]
) -> None:
    run_id = runs["evaluate"].info.run_id

    assert {
        "metrics.json",
        "per_category.csv",
        "per_category.md",
        "per_category.json",
        "pr_curves.png",
        "summary.txt",
        "reproduce.json",
    } <= artifact_paths(run_id)
    assert mlflow.artifacts.load_dict(f"runs:/{run_id}/metrics.json") == pipeline_run.evaluated["metrics"]
    assert "eval/video_mask_mAP_50_95" in mlflow.artifacts.load_text(f"runs:/{run_id}/summary.txt")


@pytest.fixture(scope="module")
def train_reruns(tracked_pipelines: TrackedPipelines) -> tuple[dict[str, Any], Run, Run]:
    """The pipeline's train command run twice more by hand: no pipeline run id, a model name of its own."""
    pipeline_run = tracked_pipelines.runs[0]
    overrides = [*pipeline_run.train_overrides, f"mlflow.registered_model_name={tracked_pipelines.model_name}-rerun"]
    experiment_name = f"test-{uuid.uuid4().hex[:12]}"
    with pytest.MonkeyPatch.context() as env:
        tracked_pipelines.use(env)
        # An experiment of their own, so the session's experiment keeps its two pipeline rows.
        env.setenv("MLFLOW_EXPERIMENT_NAME", experiment_name)
        first = train.execute(overrides)
        train.execute(overrides)
        client = MlflowClient()
        experiment_id = client.get_experiment_by_name(experiment_name).experiment_id
        runs = client.search_runs(
            [experiment_id],
            f"tags.`{TAG_COMPONENT}` = 'train' and tags.`{TAG_PIPELINE_RUN_ID}` = 'pipeline-{pipeline_run.pipeline_run_id}'",
            run_view_type=ViewType.ALL,
            order_by=["attributes.start_time ASC"],
        )
    assert len(runs) == 2
    return first, runs[0], runs[1]


def test_rerunning_the_train_command_lands_in_the_same_parent(train_reruns: tuple[dict[str, Any], Run, Run]) -> None:
    _, earlier, later = train_reruns

    assert later.data.tags["mlflow.parentRunId"] == earlier.data.tags["mlflow.parentRunId"]
    assert earlier.data.tags["sam3pipe.superseded_by"] == later.info.run_id


def test_a_rerun_under_other_tracking_settings_resumes_the_same_training_folder(
    pipeline_run: PipelineRun, train_reruns: tuple[dict[str, Any], Run, Run]
) -> None:
    rerun_outputs, _, _ = train_reruns

    assert rerun_outputs == pipeline_run.trained


def test_a_new_run_of_a_resumed_training_holds_the_earlier_steps(
    pipelines: TrackedPipelines, train_reruns: tuple[dict[str, Any], Run, Run]
) -> None:
    _, _, later = train_reruns

    assert [metric.step for metric in MlflowClient().get_metric_history(later.info.run_id, "train/loss")] == [2, 4]


def test_tracking_disabled_creates_no_run(
    pipeline_run: PipelineRun, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    experiment_name = f"test-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment_name)
    overrides = evaluate_overrides(pipeline_run.dataset_uri, pipeline_run.predicted["predictions_uri"], tmp_path)

    outputs = evaluate.execute([*overrides, "mlflow.enabled=false"])

    assert Path(outputs["metrics_uri"]).is_file()
    assert MlflowClient().get_experiment_by_name(experiment_name) is None


def test_without_a_tracking_server_runs_go_to_a_local_sqlite_store(
    pipelines: TrackedPipelines, pipeline_run: PipelineRun, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("SAM3PIPE_HOME")
    monkeypatch.chdir(tmp_path)

    evaluate.execute(evaluate_overrides(pipeline_run.dataset_uri, pipeline_run.predicted["predictions_uri"], tmp_path))

    client = MlflowClient(f"sqlite:///{tmp_path / '.sam3pipe' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(pipelines.experiment_name)
    (run,) = client.search_runs([experiment.experiment_id], f"tags.`{TAG_COMPONENT}` = 'evaluate'")
    assert run.data.metrics["eval/bbox_AP"] == pytest.approx(pipeline_run.evaluated["metrics"]["bbox_AP"])
    assert run.info.artifact_uri.startswith((tmp_path / ".sam3pipe" / "mlartifacts").as_uri())
