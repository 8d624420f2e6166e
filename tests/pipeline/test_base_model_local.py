"""`sam3pipe run --local base_checkpoint=<SAM3 checkpoint> tracker_steps=2`: the base model predicted and
evaluated like the fine-tuned one, the two compared, SAM3's tracker trained on the fine-tuned detector from
the base's tracker, and the two exported into SAM3's video checkpoint, registered as the video model; each
its own MLflow run under the pipeline's parent.

The pipeline runs once for the module through kfp.local (every component a subprocess): tiny synthetic
videos, a 56 px model, 2 training steps of each stage, torch on one thread in every component. The base is
a tiny SAM3 video model with random weights, saved in SAM3's layout (`detector.*` + `tracker.*`).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline.cli import main
from pipeline.component_bodies import TRACKER_MODEL_NAME
from sam3_core.mlflow_records.runs import PIPELINE, TAG_COMPONENT
from sam3_core.model.checkpoint import save_checkpoint
from sam3_core.model.config import ModelConfig
from sam3_core.model.export import VIDEO_MODEL_NAME
from sam3_core.model.tracker import build_video_model
from tests.fixtures.datasets import TINY_MODEL

pytestmark = pytest.mark.integration

TINY_DATA = [
    "synthetic.num_videos=4",
    "synthetic.frames_per_video=4",
    "synthetic.height=64",
    "synthetic.width=64",
    "val_fraction=0.25",
]
QUIET_TRACKING = ["mlflow.system_metrics=false", "mlflow.flush_interval_s=0.2"]
TINY_TRACKER = [
    *TINY_MODEL,
    "data.tracker_clips.frames_per_clip=3",
    "data.tracker_clips.correction_points=2",
    "optim.warmup_steps=1",
    "train.val_every=2",
    "train.val_max_videos=1",
    "train.num_threads=1",
    *QUIET_TRACKING,
]
EXPERIMENT = "base-model-local"


@dataclass
class BaseModelRun:
    base_uri: str
    run_folder: Path
    parent: Run
    components: dict[str, Run]


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaseModelRun]:
    home = tmp_path_factory.mktemp("base-model-local")
    torch.manual_seed(0)
    base_uri = str(home / "sam3_tiny.pt")
    save_checkpoint(build_video_model(ModelConfig(image_size=56, vit_pretrain_img_size=56)).state_dict(), base_uri, 0)
    with pytest.MonkeyPatch.context() as env:
        env.chdir(home)  # the local MLflow store keeps its artifacts under ./.sam3pipe
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        env.setenv("SAM3PIPE_STORE", str(home / "store"))
        env.setenv("OMP_NUM_THREADS", "1")
        env.setenv("MKL_NUM_THREADS", "1")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            status = main(
                [
                    "run",
                    "--local",
                    "--pipeline-root",
                    str(home / "kfp"),
                    f"base_checkpoint={base_uri}",
                    "tracker_steps=2",
                    f"tracker_overrides={json.dumps(TINY_TRACKER)}",
                    "max_steps=2",
                    "batch_size=1",
                    "best_metric=val/loss",
                    f"mlflow_experiment={EXPERIMENT}",
                    f"data_prep_overrides={json.dumps(TINY_DATA)}",
                    "train_overrides="
                    + json.dumps([*TINY_MODEL, "optim.warmup_steps=1", "train.best_mode=min", *QUIET_TRACKING]),
                    f"predict_overrides={json.dumps([*TINY_MODEL, *QUIET_TRACKING])}",
                    f"evaluate_overrides={json.dumps(QUIET_TRACKING)}",
                ]
            )
        assert status == 0, printed.getvalue()[-3000:]
        (marker,) = (home / "store").glob("runs/*/comparison/comparison.json")
        client = MlflowClient()
        runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
        (parent,) = [r for r in runs if r.data.tags.get(TAG_COMPONENT) == PIPELINE]
        children = {
            r.data.tags[TAG_COMPONENT]: r for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent.info.run_id
        }
        yield BaseModelRun(base_uri, marker.parent.parent, parent, children)


def _tracker_folder(ran: BaseModelRun) -> Path:
    return ran.run_folder.with_name(f"{ran.run_folder.name}-tracker")


def _metrics(path: Path) -> dict[str, float]:
    return json.loads(path.read_text())


def test_the_base_is_evaluated_with_the_fine_tuned_models_settings(ran: BaseModelRun) -> None:
    base = _metrics(ran.run_folder / "base" / "evaluation" / "metrics.json")
    fine_tuned = _metrics(ran.run_folder / "evaluation" / "metrics.json")

    assert set(base) == set(fine_tuned) and "bbox_AP50" in base
    base_settings, tuned_settings = (
        json.loads((folder / "predictions" / "predict_settings.json").read_text())["settings"]
        for folder in (ran.run_folder / "base", ran.run_folder)
    )
    differ = {key for key in base_settings if base_settings[key] != tuned_settings[key]}
    assert differ == {"model.uri", "model.sha256"} and base_settings["model.uri"] == ran.base_uri


def test_the_comparison_has_base_fine_tuned_and_their_difference(ran: BaseModelRun) -> None:
    rows = json.loads((ran.run_folder / "comparison" / "comparison.json").read_text())
    base = _metrics(ran.run_folder / "base" / "evaluation" / "metrics.json")
    fine_tuned = _metrics(ran.run_folder / "evaluation" / "metrics.json")

    base_row, tuned_row, delta_row = rows
    assert (base_row["model"], tuned_row["model"], delta_row["model"]) == ("base", "fine-tuned", "fine-tuned - base")
    assert base_row["bbox_AP50"] == pytest.approx(base["bbox_AP50"])
    assert tuned_row["bbox_AP50"] == pytest.approx(fine_tuned["bbox_AP50"])
    assert delta_row["bbox_AP50"] == pytest.approx(fine_tuned["bbox_AP50"] - base["bbox_AP50"])


def test_the_tracker_stage_trains_the_bases_tracker_on_the_fine_tuned_detector(ran: BaseModelRun) -> None:
    detector = torch.load(ran.run_folder / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)["model"]
    tracker = torch.load(_tracker_folder(ran) / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    base = torch.load(ran.base_uri, map_location="cpu", weights_only=True)
    model = tracker["model"]

    assert tracker["step"] == 2
    assert all(torch.equal(model[k], v) for k, v in detector.items() if k.startswith("detector."))
    changed = [k for k in base if k.startswith("tracker.") and not torch.equal(model[k], base[k])]
    assert changed and len(changed) < len([k for k in base if k.startswith("tracker.")])


def test_the_export_holds_the_trained_detector_and_the_trained_tracker(ran: BaseModelRun) -> None:
    exported = torch.load(ran.run_folder / "export" / "sam3_video.pt", map_location="cpu", weights_only=True)
    base = torch.load(ran.base_uri, map_location="cpu", weights_only=True)
    best = torch.load(ran.run_folder / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)["model"]
    tracker = torch.load(_tracker_folder(ran) / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)

    assert set(exported) == set(base)
    assert all(torch.equal(exported[k], v) for k, v in tracker["model"].items() if k.startswith("tracker."))
    assert all(torch.equal(exported[k], v) for k, v in best.items() if k.startswith("detector."))


def test_each_step_of_the_base_model_is_its_own_run_under_the_pipelines_parent(ran: BaseModelRun) -> None:
    assert {
        "train",
        "train_tracker",
        "predict",
        "evaluate",
        "predict_base",
        "evaluate_base",
        "compare",
        "export",
    } <= set(ran.components)


def test_the_parent_row_keeps_the_fine_tuned_models_metrics_beside_the_comparison(ran: BaseModelRun) -> None:
    parent = ran.parent.data.metrics
    fine_tuned = _metrics(ran.run_folder / "evaluation" / "metrics.json")

    assert parent["eval/bbox_AP"] == pytest.approx(fine_tuned["bbox_AP"])
    assert parent["compare/delta/video_mask_mAP_50_95"] == pytest.approx(
        fine_tuned["video_mask_mAP_50_95"] - parent["compare/base/video_mask_mAP_50_95"]
    )


def test_the_export_is_registered_as_the_video_model(ran: BaseModelRun) -> None:
    versions = MlflowClient().search_model_versions(f"name='{VIDEO_MODEL_NAME}'")

    assert len(versions) == 1
    assert versions[0].run_id == ran.components["export"].info.run_id


def test_the_tracker_stage_is_registered_under_its_own_name(ran: BaseModelRun) -> None:
    versions = MlflowClient().search_model_versions(f"name='{TRACKER_MODEL_NAME}'")

    assert len(versions) == 1
    assert versions[0].run_id == ran.components["train_tracker"].info.run_id
