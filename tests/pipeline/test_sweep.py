"""Sweeps without the pipeline engine: the spec and its trials, a trial's failure, the best trial,
and what the sweep writes to MLflow (the local sqlite store the conftest points at)."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline import component_bodies, sweep
from sam3_core import pipeline_parameters, storage
from sam3_core.errors import InputError
from sam3_core.mlflow_records import sweeps
from sam3_core.mlflow_records.runs import TAG_COMPONENT, TAG_PIPELINE_RUN_ID, TAG_SWEEP_ID, RunSpec, open_runs
from sam3_core.mlflow_records.sweeps import TrialResult


@pytest.fixture(autouse=True)
def outside_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local MLflow store keeps artifacts under ./.sam3pipe; components set the tracking env vars."""
    monkeypatch.chdir(tmp_path)
    for name in ("SAM3PIPE_PIPELINE_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.setenv(name, "")


class Pointer:
    """A KFP output artifact, as a component sees it."""

    def __init__(self, path: Path) -> None:
        self.path, self.metadata = str(path), {}


class Metrics:
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log_metric(self, metric: str, value: float) -> None:
        self.logged[metric] = value


def test_a_grid_expands_to_every_combination_in_key_order() -> None:
    trials = sweep.expand([], {"lr": [1e-4, 3e-4], "frames_per_clip": [2, 4]})

    assert trials == [
        {"lr": 1e-4, "frames_per_clip": 2},
        {"lr": 1e-4, "frames_per_clip": 4},
        {"lr": 3e-4, "frames_per_clip": 2},
        {"lr": 3e-4, "frames_per_clip": 4},
    ]


def test_listed_override_sets_come_first_then_the_grid() -> None:
    trials = sweep.expand([{"lr": 1e-3, "optim.weight_decay": 0.1}], {"max_steps": [10]})

    assert trials == [{"lr": 1e-3, "optim.weight_decay": 0.1}, {"max_steps": 10}]


@pytest.mark.parametrize(
    ("trials", "grid", "message"),
    [
        ([], {}, "no trials"),
        ([{"learning_rate": 1e-4}], {}, "'learning_rate' is not a sweepable setting"),
        ([], {"lr": []}, "sweep_grid.lr: expected a non-empty list"),
        ([], {"lr": [-1.0]}, "lr: must be a finite number > 0"),
        ([], {"frames_per_clip": [2.5]}, "frames_per_clip: expected int"),
        ([], {"freeze_prefixes": ["backbone"]}, "freeze_prefixes: expected a list of strings"),
        ([{"lr": 1e-4}, {"lr": 1e-4}], {}, "listed twice"),
        ([{}], {}, "sweep_trials\\[0\\]: expected a non-empty mapping"),
    ],
)
def test_a_bad_spec_is_refused_before_any_trial_runs(trials: list, grid: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        sweep.expand(trials, grid)


def test_numbers_that_went_through_kfp_get_their_type_back() -> None:
    # KFP hands dict/list parameters over as protobuf Structs, where 2 arrives as 2.0
    trial = sweep.plan_trials([{"frames_per_clip": 2.0, "train.log_every": 5.0, "lr": 1}], "d", "s")[0]

    assert sweep.settings(trial) == {"frames_per_clip": 2, "train.log_every": 5, "lr": 1.0}
    assert sweep.hydra_overrides(trial) == ["train.log_every=5"]


def test_each_trial_has_its_own_pipeline_run_id_name_and_the_dataset() -> None:
    trials = sweep.plan_trials(sweep.expand([], {"lr": [1e-4, 3e-4]}), "s3://b/datasets/abc", "run-7")

    assert [t["pipeline_run_id"] for t in trials] == ["run-7-t0", "run-7-t1"]
    assert [t["run_name"] for t in trials] == ["t0 lr=0.0001", "t1 lr=0.0003"]
    assert {t["dataset_uri"] for t in trials} == {"s3://b/datasets/abc"}


def test_trial_settings_override_the_pipeline_parameters() -> None:
    trial = sweep.plan_trials([{"lr": 3e-4, "optim.weight_decay": 0.05, "model.name": "a b"}], "d", "s")[0]

    params = sweep.parameters(trial, {"lr": 5e-4, "max_steps": 100})

    assert params == {"lr": 3e-4, "max_steps": 100}
    assert sweep.hydra_overrides(trial) == ["optim.weight_decay=0.05", "model.name='a b'"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"lr": [0.001]}', {"sweep_trials": [], "sweep_grid": {"lr": [0.001]}}),
        ('[{"lr": 0.001}]', {"sweep_trials": [{"lr": 0.001}], "sweep_grid": {}}),
        (
            '{"sweep_trials": [{"lr": 0.001}], "sweep_grid": {"max_steps": [5]}}',
            {"sweep_trials": [{"lr": 0.001}], "sweep_grid": {"max_steps": [5]}},
        ),
    ],
)
def test_a_spec_is_a_grid_a_list_or_both(text: str, expected: dict) -> None:
    assert sweep.load_spec(text) == expected


def test_a_spec_can_be_a_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text("lr: [0.0001, 0.0003]\nframes_per_clip: [2]\n")

    assert sweep.load_spec(str(path))["sweep_grid"] == {"lr": [0.0001, 0.0003], "frames_per_clip": [2]}


def test_a_spec_that_is_not_json_is_one_input_error() -> None:
    with pytest.raises(InputError, match="sweep: expected JSON"):
        sweep.load_spec("{lr: [0.001")


def result(trial_id: str, value: float | None, ok: bool = True) -> TrialResult:
    metrics = {} if value is None else {"segm_AP": value, "bbox_AP": 0.5}
    return TrialResult(
        trial_id, f"s-{trial_id}", trial_id, {"lr": 0.1}, ok, metrics, f"ckpt-{trial_id}", "" if ok else "x"
    )


@pytest.mark.parametrize(("mode", "best"), [("max", "t1"), ("min", "t0")])
def test_the_best_trial_follows_the_mode(mode: str, best: str) -> None:
    results = [result("t0", 0.2), result("t1", 0.4), result("t2", None, ok=False)]

    assert sweep.best_trial(results, "segm_AP", mode).trial_id == best


def test_a_tie_goes_to_the_earlier_trial_and_nan_never_wins() -> None:
    results = [result("t0", math.nan), result("t1", 0.3), result("t2", 0.3)]

    assert sweep.best_trial(results, "segm_AP", "max").trial_id == "t1"


def test_no_best_trial_when_all_failed() -> None:
    assert sweep.best_trial([result("t0", None, ok=False)], "segm_AP", "max") is None


def test_an_unknown_metric_names_the_available_ones() -> None:
    with pytest.raises(
        InputError, match=r"'segm_APP' is not an evaluation metric of the trials; choose from \['bbox_AP', 'segm_AP'\]"
    ):
        sweep.best_trial([result("t0", 0.1)], "segm_APP", "max")


def test_the_table_has_a_row_per_trial_with_settings_objective_and_status() -> None:
    results = [result("t0", 0.2), result("t1", None, ok=False)]

    rows = sweep.table(results, "segm_AP", results[0])

    assert [(r["trial"], r["status"], r["lr"], r["segm_AP"]) for r in rows] == [
        ("t0", "best", "0.1", 0.2),
        ("t1", "failed", "0.1", None),
    ]
    assert "| t0 | best | 0.1 | 0.2000 |" in sweep.markdown(rows, "segm_AP", "max")


TRIAL = {
    "trial_id": "t0",
    "run_name": "t0 lr=0.1",
    "params": {"lr": 0.1},
    "dataset_uri": "d",
    "sweep_id": "sw1",
    "pipeline_run_id": "sw1-t0",
    "registered_model": "m",
}


def test_a_failing_trial_component_records_why_and_lets_the_sweep_go_on(tmp_path: Path) -> None:
    def work() -> str:
        raise RuntimeError("loss is nan at step 3")

    assert component_bodies.run_trial_component(TRIAL, "train", str(tmp_path), work) is None

    record = storage.read_json(sweep.record_uri(str(tmp_path), TRIAL))
    assert record == {
        "trial_id": "t0",
        "status": "failed",
        "component": "train",
        "error": "train: RuntimeError: loss is nan at step 3",
    }


def test_a_terminated_trial_component_is_not_swallowed(tmp_path: Path) -> None:
    def work() -> str:
        raise SystemExit(143)  # SIGTERM, as the launchers turn it: KFP retries that component

    with pytest.raises(SystemExit):
        component_bodies.run_trial_component(TRIAL, "train", str(tmp_path), work)


def test_a_launcher_that_lost_the_kubernetes_api_fails_the_component_for_kfp_to_retry(tmp_path: Path) -> None:
    from pipeline.jobs import KubernetesApiError

    def work() -> str:
        raise KubernetesApiError("trainjob team-a/x: get failed with HTTP 403 Forbidden")

    with pytest.raises(KubernetesApiError):
        component_bodies.run_trial_component(TRIAL, "train", str(tmp_path), work)

    assert not storage.exists(sweep.record_uri(str(tmp_path), TRIAL))


def test_predict_and_evaluate_skip_a_trial_whose_training_failed(tmp_path: Path) -> None:
    predictions = Pointer(tmp_path / "predictions")
    shared = {"store": str(tmp_path), "mlflow_experiment": "e", "run_uri": "", "checkpoint_uri": "", "trial": TRIAL}

    predicted = component_bodies.predict(
        {**shared, "model_preset": "tiny", "predict_gpus": 0, "predict_overrides": [], "predictions": predictions}
    )
    evaluated = component_bodies.evaluate(
        {**shared, "evaluate_overrides": [], "predictions_uri": "", "metrics": Metrics()}
    )

    assert predicted == "" and evaluated == ("", {})
    assert json.loads(Path(predictions.path).read_text())["status"] == "skipped"


def test_a_bad_trial_fails_alone_in_training(tmp_path: Path) -> None:
    model = Pointer(tmp_path / "model")
    bad = {**TRIAL, "params": {"optim.no_such_key": 1}}
    arguments = {
        "model_preset": "tiny",
        "checkpoint": "",
        "max_steps": 1,
        "lr": 1e-3,
        "batch_size": 1,
        "frames_per_clip": 2,
        "freeze_prefixes": [],
        "best_metric": "val/segm_AP",
        "store": str(tmp_path),
        "mlflow_experiment": "e",
        "training_mode": "pod",
        "gpus": 0,
        "nodes": 1,
        "train_overrides": [],
        "launch": {},
        "model": model,
        "trial": bad,
    }

    outputs = component_bodies.train(arguments)

    assert outputs == ("", "", "")
    record = storage.read_json(sweep.record_uri(str(tmp_path), bad))
    assert record["status"] == "failed" and "optim.no_such_key" in record["error"]


@pytest.fixture
def experiment() -> str:
    return f"sweep-test-{uuid.uuid4().hex[:8]}"


def runs_by_tag(client: MlflowClient, experiment: str, key: str) -> dict[str, Any]:
    exp = client.get_experiment_by_name(experiment)
    return {r.data.tags.get(key): r for r in client.search_runs([exp.experiment_id])}


def test_a_trial_parent_run_nests_under_the_sweep_run(experiment: str) -> None:
    client = MlflowClient()
    sweep_run = sweeps.open_sweep(experiment, "sw2", {"sweep.metric": "segm_AP"}, {"sweep_grid": {"lr": [0.1]}})

    opened = open_runs(client, RunSpec(experiment, "sw2-t0", "t0 lr=0.1", "train", "sha", sweep_id="sw2"))

    parent = client.get_run(opened.parent_run_id)
    assert parent.data.tags[MLFLOW_PARENT_RUN_ID] == sweep_run
    assert parent.data.tags[TAG_SWEEP_ID] == "sw2" and parent.info.run_name == "t0 lr=0.1"
    assert client.get_run(sweep_run).data.params == {"sweep.metric": "segm_AP"}


def test_a_pipeline_run_outside_a_sweep_has_no_sweep_parent(experiment: str) -> None:
    client = MlflowClient()

    opened = open_runs(client, RunSpec(experiment, "plain-1", "", "train", "sha"))

    assert MLFLOW_PARENT_RUN_ID not in client.get_run(opened.parent_run_id).data.tags


def test_recording_a_sweep_compares_trials_and_registers_the_best(experiment: str, tmp_path: Path) -> None:
    client = MlflowClient()
    sweeps.open_sweep(experiment, "sw3", {}, {})
    trained = open_runs(client, RunSpec(experiment, "sw3-t1", "t1", "train", "sha", sweep_id="sw3"))
    results = [
        TrialResult("t0", "sw3-t0", "t0 lr=0.1", {"lr": 0.1}, False, error="train: RuntimeError: boom"),
        TrialResult("t1", "sw3-t1", "t1 lr=0.2", {"lr": 0.2}, True, {"segm_AP": 0.3}, str(tmp_path / "best.pt")),
    ]
    rows = sweep.table(results, "segm_AP", results[1])
    model = f"sweep-model-{uuid.uuid4().hex[:6]}"

    version = sweeps.record_sweep(experiment, "sw3", results, results[1], rows, "md", model, "candidate")

    by_trial = runs_by_tag(client, experiment, sweeps.TAG_TRIAL_ID)
    sweep_run = runs_by_tag(client, experiment, TAG_COMPONENT)["sweep"]
    assert {by_trial[t].data.tags[MLFLOW_PARENT_RUN_ID] for t in ("t0", "t1")} == {sweep_run.info.run_id}
    assert by_trial["t1"].data.params == {"lr": "0.2"} and by_trial["t1"].data.metrics == {"eval/segm_AP": 0.3}
    assert (
        by_trial["t0"].info.status == "FAILED"
        and by_trial["t0"].data.tags[sweeps.TAG_TRIAL_ERROR] == "train: RuntimeError: boom"
    )
    assert sweep_run.info.status == "FINISHED" and sweep_run.data.tags[sweeps.TAG_BEST_TRIAL] == "t1"
    registered = client.get_model_version_by_alias(model, "candidate")
    assert registered.version == version and registered.source == str(tmp_path / "best.pt")
    assert registered.run_id == trained.run_id and registered.tags[TAG_PIPELINE_RUN_ID] == "sw3-t1"
    assert {a.path for a in client.list_artifacts(sweep_run.info.run_id)} >= {"sweep_table.json", "sweep_table.md"}


def sweep_arguments(
    trials: list[dict[str, Any]],
    sweep_id: str,
    metric: str,
    store: str,
    experiment: str,
    model: str,
    table: Pointer | None = None,
    metrics: Metrics | None = None,
) -> dict[str, Any]:
    """select_best's arguments, as its KFP component hands them over."""
    return {
        "trials": trials,
        "sweep_id": sweep_id,
        "sweep_metric": metric,
        "sweep_mode": "max",
        "store": store,
        "mlflow_experiment": experiment,
        "registered_model": model,
        "table": table or Pointer(Path(store) / "t"),
        "metrics": metrics or Metrics(),
    }


def test_select_best_fails_the_sweep_only_when_every_trial_failed(experiment: str, tmp_path: Path) -> None:
    trials = sweep.plan_trials([{"lr": 0.1}, {"lr": 0.2}], "d", "sw4")
    for trial in trials:
        sweep.write_record(str(tmp_path), trial, sweep.failed("train", RuntimeError("diverged")))
    sweeps.open_sweep(experiment, "sw4", {}, {})

    with pytest.raises(
        component_bodies.SweepFailedError, match=r"all 2 trials failed \(t0: train: RuntimeError: diverged; t1"
    ):
        component_bodies.select_best(sweep_arguments(trials, "sw4", "segm_AP", str(tmp_path), experiment, "m"))

    assert storage.exists(storage.join(sweep.sweep_root(str(tmp_path), "sw4"), "sweep_table.json"))
    assert runs_by_tag(MlflowClient(), experiment, TAG_COMPONENT)["sweep"].info.status == "FAILED"


def test_select_best_picks_among_the_trials_that_succeeded(experiment: str, tmp_path: Path) -> None:
    trials = sweep.plan_trials([{"lr": 0.1}, {"lr": 0.2}], "d", "sw5")
    sweep.write_record(str(tmp_path), trials[0], sweep.failed("predict", RuntimeError("out of memory")))
    sweep.write_record(str(tmp_path), trials[1], sweep.succeeded({"segm_AP": 0.25}, str(tmp_path / "b.pt"), "r", "m"))
    table, metrics = Pointer(tmp_path / "table.md"), Metrics()

    outcome = component_bodies.select_best(
        sweep_arguments(trials, "sw5", "eval/segm_AP", str(tmp_path), experiment, "m-sw5", table, metrics)
    )

    assert (outcome["best_trial"], outcome["value"], outcome["succeeded"]) == ("t1", 0.25, 1)
    assert metrics.logged == {"segm_AP": 0.25}
    assert "| t0 | failed | 0.1 |" in Path(table.path).read_text()
    assert storage.read_json(outcome["outcome_uri"]) == outcome


def test_bad_training_knobs_stop_the_sweep_in_its_first_component() -> None:
    values = {**pipeline_parameters.defaults(pipeline_parameters.SWEEP), "sweep_grid": {"lr": [0.1]}, "nodes": 2}

    with pytest.raises(InputError, match="pipeline parameters: nodes: training_mode=pod runs on one node"):
        component_bodies.check_parameters({**values, "pipeline": pipeline_parameters.SWEEP})


def test_a_metric_no_trial_reports_fails_the_sweep_after_writing_its_table(experiment: str, tmp_path: Path) -> None:
    trials = sweep.plan_trials([{"lr": 0.1}], "d", "sw7")
    sweep.write_record(str(tmp_path), trials[0], sweep.succeeded({"segm_AP": 0.25}, "b.pt", "r", "m"))
    sweeps.open_sweep(experiment, "sw7", {}, {})

    with pytest.raises(InputError, match="'mask_AP' is not an evaluation metric"):
        component_bodies.select_best(sweep_arguments(trials, "sw7", "mask_AP", str(tmp_path), experiment, "m"))

    assert storage.exists(storage.join(sweep.sweep_root(str(tmp_path), "sw7"), "sweep_table.json"))
    assert runs_by_tag(MlflowClient(), experiment, TAG_COMPONENT)["sweep"].info.status == "FAILED"
