"""Every component reports to MLflow: a tiny train -> predict -> evaluate against a real tracking server.

The module runs one pipeline run once, in-process through each component's `execute`, the way
the pipeline runs them: one `SAM3PIPE_PIPELINE_RUN_ID`, checkpoints in a moto S3 bucket (so the
server accepts them as model sources), predict pointed at `models:/<name>@candidate`. Each test
reads one part of what the tracking server then holds.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run, ViewType

from components import evaluate, predict, train
from sam3_core import storage
from sam3_core.data.prep import PreparedDataset
from sam3_core.tracking import TAG_COMPONENT, TAG_PIPELINE_RUN_ID
from tests.fixtures.datasets import TINY_MODEL
from tests.fixtures.s3 import use_s3_server

if TYPE_CHECKING:
    from tests.fixtures.mlflow import MlflowServer

# The defaults suit long trainings; these keep the tests from waiting on them.
FAST_TRACKING = [
    "tracking.flush_interval_s=0.1",
    "tracking.retry_initial_s=0.1",
    "tracking.retry_max_s=0.5",
    "tracking.connect_timeout_s=5",
    "tracking.final_flush_timeout_s=30",
    "tracking.system_metrics=false",
]
MAX_STEPS = 4  # tiny_train_overrides log every 2 steps


@dataclass
class PipelineRun:
    pipeline_run_id: str
    experiment_name: str
    model_name: str
    dataset: PreparedDataset
    train_overrides: list[str]
    trained: dict[str, Any]
    predicted: dict[str, Any]
    evaluated: dict[str, Any]

    def runs(self) -> dict[str, Run]:
        """This pipeline run's live MLflow runs by component (`pipeline` is the parent)."""
        client = MlflowClient()
        experiment = client.get_experiment_by_name(self.experiment_name)
        query = f"tags.`{TAG_PIPELINE_RUN_ID}` = '{self.pipeline_run_id}'"
        found = client.search_runs([experiment.experiment_id], query)
        return {run.data.tags[TAG_COMPONENT]: run for run in found}


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


@pytest.fixture(scope="module")
def pipeline_run(
    s3_server: str,
    mlflow_server: MlflowServer,
    tiny_dataset: PreparedDataset,
    tiny_train_overrides: list[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PipelineRun]:
    """Train, predict and evaluate once under one pipeline run id, as the pipeline's steps do."""
    home = tmp_path_factory.mktemp("tracking-components")
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    s3.create_bucket(Bucket=bucket)
    pipeline_run_id = f"kfp-{uuid.uuid4().hex[:12]}"
    experiment_name = f"test-{uuid.uuid4().hex[:12]}"
    model_name = f"sam3-test-{uuid.uuid4().hex[:8]}"
    # The env of `s3_bucket` and `mlflow_tracking`, held for the module: its tests share one pipeline run.
    with pytest.MonkeyPatch.context() as env:
        use_s3_server(env, s3_server, home)
        env.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        env.setenv("MLFLOW_EXPERIMENT_NAME", experiment_name)
        env.setenv("SAM3PIPE_PIPELINE_RUN_ID", pipeline_run_id)
        # What the tracker sets for itself; set here so it is undone after the module.
        env.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        env.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        mlflow_server.start()

        train_overrides = [
            *tiny_train_overrides,
            f"train.max_steps={MAX_STEPS}",
            f"output.store=s3://{bucket}/store",
            f"tracking.registered_model_name={model_name}",
            *FAST_TRACKING,
        ]
        trained = train.execute(train_overrides)
        predicted = predict.execute(
            [
                f"data.uri={tiny_dataset.uri}",
                *TINY_MODEL,
                f"model.uri=models:/{model_name}@candidate",
                f"output.store=s3://{bucket}/store",
                *FAST_TRACKING,
            ]
        )
        evaluated = evaluate.execute(
            evaluate_overrides(tiny_dataset.uri, predicted["predictions_uri"], home / "evaluation")
        )
        yield PipelineRun(
            pipeline_run_id, experiment_name, model_name, tiny_dataset, train_overrides, trained, predicted, evaluated
        )


def test_the_components_of_a_pipeline_run_nest_under_one_parent(pipeline_run: PipelineRun) -> None:
    runs = pipeline_run.runs()

    assert sorted(runs) == ["evaluate", "pipeline", "predict", "train"]
    parent_id = runs["pipeline"].info.run_id
    for component in ("train", "predict", "evaluate"):
        assert runs[component].data.tags["mlflow.parentRunId"] == parent_id
        assert runs[component].info.status == "FINISHED"


def test_train_params_are_its_resolved_config_with_dotted_keys(pipeline_run: PipelineRun) -> None:
    params = pipeline_run.runs()["train"].data.params

    assert params["train.max_steps"] == str(MAX_STEPS)
    assert params["data.uri"] == pipeline_run.dataset.uri
    assert params["model.image_size"] == "56"
    assert params["data.clips.frames_per_clip"] == "2"
    assert params["tracking.pipeline_run_id"] == pipeline_run.pipeline_run_id


def test_train_logs_the_loss_terms_lr_and_throughput_at_every_logged_step(pipeline_run: PipelineRun) -> None:
    run = pipeline_run.runs()["train"]
    history = MlflowClient().get_metric_history(run.info.run_id, "train/loss")

    assert [metric.step for metric in history] == [2, 4]
    assert {"train/loss_bbox", "train/loss_mask", "train/lr", "train/clips_per_s", "train/frames_per_s"} <= set(
        run.data.metrics
    )


def test_train_logs_its_config_and_the_dataset_manifest(pipeline_run: PipelineRun) -> None:
    run = pipeline_run.runs()["train"]

    config = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml")
    manifest = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/dataset/manifest.json")
    assert f"max_steps: {MAX_STEPS}" in config
    assert manifest["dataset_id"] == pipeline_run.dataset.dataset_id
    assert run.data.tags["sam3pipe.dataset_id"] == pipeline_run.dataset.dataset_id


def test_train_references_its_checkpoints_in_the_store_without_uploading_them(pipeline_run: PipelineRun) -> None:
    run = pipeline_run.runs()["train"]
    best = pipeline_run.trained["best_checkpoint_uri"]

    reference = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/checkpoints/best.json")
    assert reference["uri"] == best and reference["step"] == MAX_STEPS
    assert reference["sha256"] == storage.sha256_bytes(storage.read_bytes(best))
    assert run.data.tags["sam3pipe.checkpoint.best"] == best
    assert run.data.tags["sam3pipe.checkpoint.last"] == pipeline_run.trained["last_checkpoint_uri"]
    assert not [path for path in artifact_paths(run.info.run_id) if path.endswith(".pt")]


def test_the_best_checkpoint_is_registered_with_the_candidate_alias(pipeline_run: PipelineRun) -> None:
    version = MlflowClient().get_model_version_by_alias(pipeline_run.model_name, "candidate")

    assert version.source == pipeline_run.trained["best_checkpoint_uri"]
    assert version.run_id == pipeline_run.runs()["train"].info.run_id


def test_predict_resolves_the_registry_alias_to_the_best_checkpoint(pipeline_run: PipelineRun) -> None:
    run = pipeline_run.runs()["predict"]

    assert run.data.params["model.uri"] == pipeline_run.trained["best_checkpoint_uri"]
    assert run.data.tags["sam3pipe.model_uri"] == f"models:/{pipeline_run.model_name}@candidate"
    assert run.data.tags["sam3pipe.predictions_uri"] == pipeline_run.predicted["predictions_uri"]


def test_predict_logs_frames_of_the_first_video_with_their_masks(pipeline_run: PipelineRun) -> None:
    run_id = pipeline_run.runs()["predict"].info.run_id
    previews = sorted(path for path in artifact_paths(run_id) if path.startswith("previews/"))

    assert len(previews) == 3 and all(path.endswith(".png") for path in previews)
    image = mlflow.artifacts.load_image(f"runs:/{run_id}/{previews[0]}")
    assert image.size == (64, 64)  # the dataset's frame size


def test_evaluate_logs_the_evaluators_metrics_under_eval(pipeline_run: PipelineRun) -> None:
    metrics = pipeline_run.runs()["evaluate"].data.metrics
    expected = pipeline_run.evaluated["metrics"]

    for name in ("bbox_AP", "bbox_AR100", "segm_AP", "video_bbox_mAP_50_95", "video_mask_mAP_50_95"):
        assert metrics[f"eval/{name}"] == pytest.approx(expected[name])


def test_evaluate_logs_metrics_json_the_table_the_pr_plot_and_a_summary(pipeline_run: PipelineRun) -> None:
    run_id = pipeline_run.runs()["evaluate"].info.run_id

    assert {
        "metrics.json",
        "per_category.csv",
        "per_category.md",
        "per_category.json",
        "pr_curves.png",
        "summary.txt",
    } <= artifact_paths(run_id)
    assert mlflow.artifacts.load_dict(f"runs:/{run_id}/metrics.json") == pipeline_run.evaluated["metrics"]
    assert "eval/video_mask_mAP_50_95" in mlflow.artifacts.load_text(f"runs:/{run_id}/summary.txt")


@pytest.fixture(scope="module")
def train_reruns(pipeline_run: PipelineRun) -> tuple[dict[str, Any], Run, Run]:
    """The pipeline's train command run twice more by hand: no pipeline run id, a model name of its own."""
    overrides = [*pipeline_run.train_overrides, f"tracking.registered_model_name={pipeline_run.model_name}-rerun"]
    with pytest.MonkeyPatch.context() as env:
        env.delenv("SAM3PIPE_PIPELINE_RUN_ID")
        first = train.execute(overrides)
        train.execute(overrides)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(pipeline_run.experiment_name)
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.`{TAG_COMPONENT}` = 'train' and tags.`{TAG_PIPELINE_RUN_ID}` != '{pipeline_run.pipeline_run_id}'",
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


def test_a_new_run_of_a_resumed_training_holds_the_earlier_steps(train_reruns: tuple[dict[str, Any], Run, Run]) -> None:
    _, _, later = train_reruns

    assert [metric.step for metric in MlflowClient().get_metric_history(later.info.run_id, "train/loss")] == [2, 4]


def test_tracking_disabled_creates_no_run(
    pipeline_run: PipelineRun, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    experiment_name = f"test-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment_name)
    overrides = evaluate_overrides(pipeline_run.dataset.uri, pipeline_run.predicted["predictions_uri"], tmp_path)

    outputs = evaluate.execute([*overrides, "tracking.enabled=false"])

    assert Path(outputs["metrics_uri"]).is_file()
    assert MlflowClient().get_experiment_by_name(experiment_name) is None


def test_without_a_tracking_server_runs_go_to_a_local_sqlite_store(
    pipeline_run: PipelineRun, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("SAM3PIPE_HOME")
    monkeypatch.chdir(tmp_path)

    evaluate.execute(evaluate_overrides(pipeline_run.dataset.uri, pipeline_run.predicted["predictions_uri"], tmp_path))

    client = MlflowClient(f"sqlite:///{tmp_path / '.sam3pipe' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(pipeline_run.experiment_name)
    (run,) = client.search_runs([experiment.experiment_id], f"tags.`{TAG_COMPONENT}` = 'evaluate'")
    assert run.data.metrics["eval/bbox_AP"] == pytest.approx(pipeline_run.evaluated["metrics"]["bbox_AP"])
