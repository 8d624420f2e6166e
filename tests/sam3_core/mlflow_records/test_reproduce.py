"""Comparing and reproducing pipeline runs through MLflow, on the session's two tracked pipeline runs.

The runs (tests/fixtures/mlflow.py) differ only by learning rate. What a user compares sits on
the parent rows; checkpoints are logged models ranked by their validation metric; `reproduce`
rebuilds a run from what MLflow recorded, reruns it in new processes and finds the same metrics,
and refuses when the recorded dataset's bytes changed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from pipeline.cli import main
from pipeline.reproduce import pipeline_arguments, reproduce
from sam3_core import storage
from sam3_core.mlflow_records.reproduce import ReproduceError, check, plan
from tests.fixtures.mlflow import MAX_STEPS, TrackedPipelines


def parents(pipelines: TrackedPipelines) -> dict[float, mlflow.entities.Run]:
    return {run.lr: pipelines.runs_of(run)["pipeline"] for run in pipelines.runs}


# ---------------------------------------------------------------------------- the runs table


def test_two_pipeline_runs_are_two_rows_with_their_lr_and_eval_metrics(pipelines: TrackedPipelines) -> None:
    table = mlflow.search_runs(
        experiment_names=[pipelines.experiment_name],
        filter_string="tags.`sam3pipe.component` = 'pipeline'",
        order_by=["params.lr ASC"],
    )
    # Other tests add pipeline runs of their own (a reproduction); these are the session's two.
    table = table[table["tags.sam3pipe.pipeline_run_id"].isin([run.pipeline_run_id for run in pipelines.runs])]

    assert table["params.lr"].tolist() == ["0.0001", "0.0003"]
    assert table["params.max_steps"].tolist() == [str(MAX_STEPS)] * 2
    for metric in ("eval/segm_AP", "eval/bbox_AP", "eval/video_mask_mAP_50_95", "val/loss", "best_step"):
        assert table[f"metrics.{metric}"].notna().all(), metric


def test_the_parent_row_holds_the_evaluations_metrics_and_the_best_checkpoints_validation_metric(
    pipelines: TrackedPipelines,
) -> None:
    run = pipelines.runs[0]
    runs = pipelines.runs_of(run)
    parent, train_run = runs["pipeline"].data, runs["train"]
    best = MlflowClient().get_logged_model(train_run.data.tags["sam3pipe.checkpoint.best_model_id"])
    best_step = int(best.tags["sam3pipe.step"])

    assert parent.metrics["eval/segm_AP"] == runs["evaluate"].data.metrics["eval/segm_AP"]
    assert parent.metrics["best_step"] == best_step
    assert parent.metrics["val/loss"] == {m.key: m.value for m in best.metrics}["val/loss"]
    history = MlflowClient().get_metric_history(runs["pipeline"].info.run_id, "val/loss")
    assert [m.step for m in history] == [best_step]


def test_the_parent_row_names_its_dataset_code_and_best_model(pipelines: TrackedPipelines) -> None:
    run = pipelines.runs[0]
    parent = pipelines.runs_of(run)["pipeline"]
    dataset_id = storage.read_json(storage.join(run.dataset_uri, "manifest.json"))["dataset_id"]

    assert parent.data.params["dataset_id"] == dataset_id
    assert parent.data.params["git_commit"] == parent.data.tags["sam3pipe.git_commit"]
    (dataset_input,) = parent.inputs.dataset_inputs
    assert dataset_input.dataset.digest == dataset_id
    assert json.loads(dataset_input.dataset.source) == {"uri": run.dataset_uri}
    assert json.loads(dataset_input.dataset.profile)["videos"] == 4
    (model,) = parent.outputs.model_outputs
    assert model.model_id == pipelines.runs_of(run)["train"].data.tags["sam3pipe.checkpoint.best_model_id"]


def test_train_predict_and_evaluate_runs_each_show_the_dataset(pipelines: TrackedPipelines) -> None:
    runs = pipelines.runs_of(pipelines.runs[0])

    contexts = {
        name: [tag.value for tag in runs[name].inputs.dataset_inputs[0].tags]
        for name in ("train", "predict", "evaluate")
    }
    assert contexts == {"train": ["training"], "predict": ["prediction"], "evaluate": ["evaluation"]}


# ---------------------------------------------------------------------------- checkpoints as logged models


def test_searching_logged_models_by_the_validation_metric_returns_the_best_checkpoint(
    pipelines: TrackedPipelines,
) -> None:
    train_run = pipelines.runs_of(pipelines.runs[0])["train"]
    best_metric = train_run.data.params.get("train.best_metric", "val/loss")
    ascending = train_run.data.params.get("train.best_mode", "min") == "min"

    ranked = mlflow.search_logged_models(
        experiment_ids=[pipelines.experiment_id()],
        filter_string=f"tags.`sam3pipe.train_run_id` = '{train_run.info.run_id}'",
        order_by=[{"field_name": f"metrics.{best_metric}", "ascending": ascending}],
        output_format="list",
    )

    by_step = {int(m.tags["sam3pipe.step"]): m for m in ranked}
    best_step = int(train_run.data.tags["sam3pipe.best_step"])
    value = {step: {metric.key: metric.value for metric in m.metrics}[best_metric] for step, m in by_step.items()}
    assert sorted(by_step) == [2, 4]
    assert by_step[best_step].model_id == train_run.data.tags["sam3pipe.checkpoint.best_model_id"]
    # the best checkpoint ranks first (on a tie the earlier step is the best one)
    assert value[best_step] == value[int(ranked[0].tags["sam3pipe.step"])]
    assert {step: m.tags["sam3pipe.best"] for step, m in by_step.items()} == {
        step: str(step == best_step).lower() for step in by_step
    }


def test_a_logged_model_points_at_its_checkpoint_in_the_store(pipelines: TrackedPipelines) -> None:
    train_run = pipelines.runs_of(pipelines.runs[0])["train"]
    model = MlflowClient().get_logged_model(train_run.data.tags["sam3pipe.checkpoint.last_model_id"])
    data = storage.read_bytes(model.tags["sam3pipe.checkpoint_uri"])

    assert model.tags["sam3pipe.checkpoint_uri"].startswith(pipelines.store)
    assert model.tags["sam3pipe.sha256"] == storage.sha256_bytes(data)
    assert int(model.tags["sam3pipe.size_bytes"]) == len(data)
    assert model.tags["sam3pipe.step"] == str(MAX_STEPS) and model.tags["sam3pipe.last"] == "true"
    assert model.params["lr"] == "0.0001"
    assert {output.model_id for output in train_run.outputs.model_outputs} >= {model.model_id}
    # Its source is the pipeline run: the runs table lists it in that row's Models column.
    assert model.source_run_id == pipelines.runs_of(pipelines.runs[0])["pipeline"].info.run_id


# ---------------------------------------------------------------------------- reproduce


def test_reproducing_a_pipeline_run_gives_identical_metrics(pipelines: TrackedPipelines) -> None:
    original = pipelines.runs[0]

    result = reproduce(original.pipeline_run_id)

    assert result["identical"], result["differences"]
    reproduced = pipelines.runs_of_id(result["pipeline_run_id"])
    assert sorted(reproduced) == ["evaluate", "pipeline", "predict", "train"]
    assert (
        reproduced["pipeline"].data.tags["sam3pipe.reproduces_run_id"]
        == pipelines.runs_of(original)["pipeline"].info.run_id
    )
    train_metrics = pipelines.runs_of(original)["train"].data.metrics
    assert reproduced["train"].data.metrics["train/loss"] == train_metrics["train/loss"]
    assert reproduced["predict"].data.params["model.uri"] != original.trained["best_checkpoint_uri"]


def test_reproduce_refuses_a_run_whose_dataset_bytes_changed(pipelines: TrackedPipelines, tmp_path: Path) -> None:
    run = pipelines.runs[1]
    frame = next(
        rel for rel in storage.read_json(f"{run.dataset_uri}/manifest.json")["files"] if rel.startswith("frames/")
    )
    target = Path(run.dataset_uri) / frame
    runs_before = pipelines.run_count()
    shutil.copy2(target, tmp_path / "original")
    target.write_bytes(target.read_bytes()[:-7] + b"altered")
    try:
        with pytest.raises(ReproduceError) as refused:
            reproduce(run.pipeline_run_id)
    finally:
        shutil.copy2(tmp_path / "original", target)

    message = str(refused.value)
    assert f"at {run.dataset_uri} is not the one" in message and frame in message and "bytes changed" in message
    assert pipelines.run_count() == runs_before  # refused before anything ran


def test_reproduce_refuses_another_git_commit_unless_allowed(
    pipelines: TrackedPipelines, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAM3PIPE_GIT_COMMIT", "0" * 40)
    recorded = plan(MlflowClient(), pipelines.runs[0].pipeline_run_id, pipelines.experiment_name)

    with pytest.raises(ReproduceError, match=r"git checkout .* --allow-other-commit"):
        check(recorded)
    check(recorded, allow_other_commit=True)


def test_reproduce_of_an_unknown_id_is_one_error_line_and_exit_2(
    pipelines: TrackedPipelines, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    status = main(["reproduce", "no-such-run"])

    assert status == 2
    assert "no-such-run: neither an MLflow run id nor a pipeline run id" in caplog.text
    assert capsys.readouterr().out == ""


def test_a_dry_run_prints_the_exact_commands_of_a_component_run(
    pipelines: TrackedPipelines, capsys: pytest.CaptureFixture[str]
) -> None:
    train_run = pipelines.runs_of(pipelines.runs[0])["train"]

    assert main(["reproduce", train_run.info.run_id, "--dry-run"]) == 0

    (argv,) = json.loads(capsys.readouterr().out)["commands"]
    assert argv[1:3] == ["-m", "components.train"]
    assert "optim.lr=0.0001" in argv and "train.num_threads=1" in argv and "optim.warmup_steps=2" in argv
    assert f"data.uri='{pipelines.runs[0].dataset_uri}'" in argv
    assert f"output.run_name='pipeline-{pipelines.runs[0].pipeline_run_id}'" not in argv


def test_on_kubeflow_the_pipeline_parameters_are_rebuilt_from_the_recorded_configs(
    pipelines: TrackedPipelines,
) -> None:
    recorded = plan(MlflowClient(), pipelines.runs[1].pipeline_run_id, pipelines.experiment_name)

    arguments = pipeline_arguments(recorded)

    assert (arguments["lr"], arguments["max_steps"], arguments["frames_per_clip"]) == (3e-4, MAX_STEPS, 2)
    assert arguments["source"] == "synthetic" and "synthetic.num_videos=4" in arguments["data_prep_overrides"]
    assert "train.val_every=2" in arguments["train_overrides"]
    assert not [o for o in arguments["train_overrides"] if o.startswith(("data.uri=", "mlflow."))]
    assert "postprocess.top_k" in " ".join(arguments["predict_overrides"])
