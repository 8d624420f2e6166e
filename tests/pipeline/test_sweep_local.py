"""A 2x1 sweep on the tiny preset, end to end through `sam3pipe sweep --local` (kfp.local's own
ParallelFor, every component a subprocess), then what it left in the store,
the MLflow store and the Model Registry.

The sweep runs once for the module: tiny synthetic videos, a 56 px model, 2 training steps per
trial, torch on one thread in every component.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline.cli import main
from sam3_core import pipeline_parameters, storage
from sam3_core.mlflow_records import sweeps
from sam3_core.mlflow_records.runs import SWEEP, TAG_COMPONENT, TAG_PIPELINE_RUN_ID, TAG_SWEEP_ID
from tests.fixtures.datasets import TINY_MODEL

# every test here starts processes, servers or trainings (the integration tier)
pytestmark = pytest.mark.integration

TINY_DATA = [
    "synthetic.num_videos=4",
    "synthetic.frames_per_video=4",
    "synthetic.height=64",
    "synthetic.width=64",
    "val_fraction=0.25",
]
QUIET_TRACKING = ["mlflow.system_metrics=false", "mlflow.flush_interval_s=0.2"]
MODEL = "sam3-sweep-test"
EXPERIMENT = "sweep-local"


@dataclass
class SweepRun:
    outcome: dict[str, Any]
    stdout: str
    sweep_run: Run
    trials: dict[str, Run]
    components: dict[str, dict[str, Run]]


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SweepRun]:
    home = tmp_path_factory.mktemp("sweep-local")
    with pytest.MonkeyPatch.context() as env:
        env.chdir(home)  # the local MLflow store keeps its artifacts under ./.sam3pipe
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        env.setenv("SAM3PIPE_STORE", str(home / "store"))
        env.setenv("OMP_NUM_THREADS", "1")
        env.setenv("MKL_NUM_THREADS", "1")
        printed = io.StringIO()  # the CLI's table and outcome line (capsys is per test)
        with contextlib.redirect_stdout(printed):
            status = main(
                [
                    "sweep",
                    "--local",
                    "--spec",
                    '{"lr": [0.001, 0.0001], "frames_per_clip": [2]}',
                    "--parallelism",
                    "2",
                    "--pipeline-root",
                    str(home / "kfp"),
                    "profile=demo",
                    "max_steps=2",
                    "batch_size=1",
                    f"registered_model={MODEL}",
                    f"mlflow_experiment={EXPERIMENT}",
                    "sweep_metric=bbox_AP50",
                    f"data_prep_overrides={json.dumps(TINY_DATA)}",
                    f"train_overrides={json.dumps([*TINY_MODEL, 'optim.warmup_steps=1', 'train.log_every=1', *QUIET_TRACKING])}",
                    f"predict_overrides={json.dumps([*TINY_MODEL, *QUIET_TRACKING])}",
                    f"evaluate_overrides={json.dumps(QUIET_TRACKING)}",
                ]
            )
        stdout = printed.getvalue()
        assert status == 0, stdout[-3000:]
        outcome = json.loads(stdout.strip().splitlines()[-1])
        client = MlflowClient()
        experiment = client.get_experiment_by_name(EXPERIMENT)
        runs = client.search_runs([experiment.experiment_id])
        (sweep_run,) = [r for r in runs if r.data.tags.get(TAG_COMPONENT) == SWEEP]
        trials = {r.data.tags[sweeps.TAG_TRIAL_ID]: r for r in runs if sweeps.TAG_TRIAL_ID in r.data.tags}
        components = {
            trial_id: {
                r.data.tags[TAG_COMPONENT]: r
                for r in runs
                if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == trial.info.run_id
            }
            for trial_id, trial in trials.items()
        }
        yield SweepRun(outcome, stdout, sweep_run, trials, components)


def test_both_trials_run_to_the_end_and_the_best_is_reported(swept: SweepRun) -> None:
    outcome = swept.outcome

    assert (outcome["trials"], outcome["succeeded"]) == (2, 2)
    assert outcome["best_trial"] in ("t0", "t1") and outcome["metric"] == "bbox_AP50"
    rows = storage.read_json(outcome["table_uri"])
    assert [(row["trial"], row["lr"], row["frames_per_clip"]) for row in rows] == [
        ("t0", "0.001", "2"),
        ("t1", "0.0001", "2"),
    ]
    best_row = next(row for row in rows if row["status"] == "best")
    assert best_row["trial"] == outcome["best_trial"] and best_row["bbox_AP50"] == max(r["bbox_AP50"] for r in rows)
    assert "| t0 |" in swept.stdout and "| t1 |" in swept.stdout


def test_the_demo_profiles_training_keeps_the_checkpoint_with_the_best_box_ap(swept: SweepRun) -> None:
    train_run = swept.components["t0"]["train"]

    demo = pipeline_parameters.PROFILES["demo"]
    assert train_run.data.params["train.best_metric"] == demo["best_metric"] == "val/bbox_AP"


def test_the_store_holds_one_sweep_parent_with_two_trial_runs(swept: SweepRun) -> None:
    sweep_id = swept.sweep_run.data.tags[TAG_SWEEP_ID]

    assert set(swept.trials) == {"t0", "t1"}
    for trial_id, trial in swept.trials.items():
        assert trial.data.tags[MLFLOW_PARENT_RUN_ID] == swept.sweep_run.info.run_id
        assert trial.data.tags[TAG_PIPELINE_RUN_ID] == f"{sweep_id}-{trial_id}"
        assert trial.data.tags[sweeps.TAG_TRIAL_STATUS] == "succeeded"
    assert swept.sweep_run.info.status == "FINISHED"
    assert swept.sweep_run.data.tags[sweeps.TAG_BEST_TRIAL] == swept.outcome["best_trial"]


def test_each_trial_run_has_its_params_and_eval_metrics(swept: SweepRun) -> None:
    # the trial's own values, next to the parent-row params every pipeline run gets (mlflow.parent_params)
    assert {"lr": "0.001", "frames_per_clip": "2"}.items() <= swept.trials["t0"].data.params.items()
    assert {"lr": "0.0001", "frames_per_clip": "2"}.items() <= swept.trials["t1"].data.params.items()
    for trial in swept.trials.values():
        assert {"eval/bbox_AP50", "eval/segm_AP", "eval/video_mask_mAP_50_95"} <= set(trial.data.metrics)


def test_each_trial_nests_its_train_predict_and_evaluate_runs(swept: SweepRun) -> None:
    for trial_id, components in swept.components.items():
        assert set(components) == {"train", "predict", "evaluate"}, trial_id
        assert components["train"].data.params["optim.lr"] == swept.trials[trial_id].data.params["lr"]


def test_the_best_trial_is_registered_as_candidate(swept: SweepRun) -> None:
    best = swept.outcome["best_trial"]
    version = MlflowClient().get_model_version_by_alias(MODEL, "candidate")

    assert version.source == swept.outcome["checkpoint_uri"] and Path(version.source).is_file()
    assert version.tags[TAG_PIPELINE_RUN_ID] == swept.trials[best].data.tags[TAG_PIPELINE_RUN_ID]
    assert version.run_id == swept.components[best]["train"].info.run_id
