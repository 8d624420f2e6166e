"""Predict: checkpoint + dataset -> COCO frame results and YTVIS masklets, identical on 1 and 2 ranks.

Its output folder is keyed by every setting that shapes the files, and a folder that holds
predictions of other settings is never replaced without `output.overwrite=true`.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from components import predict as predict_cli
from sam3_core import storage
from sam3_core.artifacts import PREDICTION_FILES
from sam3_core.config import load_config
from sam3_core.errors import ConfigError
from sam3_core.model.build import build_detector
from sam3_core.model.checkpoint import save_checkpoint
from sam3_core.model.chunked_detection import DetectionConfig
from sam3_core.model.config import ModelConfig
from sam3_core.model.video_detector import VideoClipDetector
from sam3_core.predict.association import AssociationConfig
from sam3_core.predict.dumper import DumperConfig
from sam3_core.predict.postprocess import PostprocessConfig
from sam3_core.predict.predictor import (
    SETTINGS_FILE,
    PredictConfig,
    PredictDataConfig,
    PredictOutputConfig,
    PreviewConfig,
    output_uri_for,
)
from tests.fixtures.datasets import TINY_MODEL, single_thread_env
from tests.fixtures.network import free_port
from tests.fixtures.paths import REPO


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """An (untrained) tiny checkpoint in our training layout."""
    model = VideoClipDetector(build_detector(ModelConfig(image_size=56, vit_pretrain_img_size=56)))
    uri = str(tmp_path_factory.mktemp("ckpt") / "last.pt")
    save_checkpoint({"model": model.state_dict()}, uri, step=0)
    return uri


def _overrides(checkpoint: str, dataset_uri: str, out: Path) -> list[str]:
    return [
        f"model.uri={checkpoint}",
        f"data.uri={dataset_uri}",
        f"output.uri={out}",
        "postprocess.top_k=5",
        *TINY_MODEL,
    ]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=single_thread_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def one_rank(checkpoint, tiny_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pred1")
    proc = _run([sys.executable, "-m", "components.predict", *_overrides(checkpoint, tiny_dataset.uri, out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"predictions_uri": str(out)}
    return out


@pytest.mark.integration
def test_predict_writes_the_three_prediction_files_and_the_settings_that_made_them(one_rank, checkpoint):
    assert sorted(storage.list_files(str(one_rank))) == sorted([*PREDICTION_FILES.values(), SETTINGS_FILE])
    record = storage.read_json(str(one_rank / SETTINGS_FILE))
    assert record["settings"]["postprocess.top_k"] == 5
    assert record["settings"]["model.sha256"] == storage.sha256_file(checkpoint)


def test_frame_results_use_the_datasets_coco_image_ids_and_top_k(one_rank, tiny_dataset):
    gt = storage.read_json(storage.join(tiny_dataset.uri, "val_frames_coco.json"))
    image_ids = {im["id"] for im in gt["images"]}
    bbox = storage.read_json(str(one_rank / PREDICTION_FILES["bbox"]))
    segm = storage.read_json(str(one_rank / PREDICTION_FILES["segm"]))
    assert {r["image_id"] for r in bbox} == image_ids
    assert all(sum(r["image_id"] == i for r in bbox) == 5 for i in image_ids)
    assert {(r["image_id"], r["category_id"]) for r in segm} == {(r["image_id"], r["category_id"]) for r in bbox}


def test_video_results_have_one_entry_per_frame(one_rank, tiny_dataset):
    val = storage.read_json(storage.join(tiny_dataset.uri, "val.json"))
    lengths = {v["id"]: len(v["file_names"]) for v in val["videos"]}
    video = storage.read_json(str(one_rank / PREDICTION_FILES["video"]))
    assert video
    for masklet in video:
        assert len(masklet["segmentations"]) == len(masklet["bboxes"]) == lengths[masklet["video_id"]]


@pytest.mark.integration
def test_two_ranks_write_the_same_predictions_as_one(one_rank, checkpoint, tiny_dataset, tmp_path):
    out = tmp_path / "pred2"
    proc = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "-m",
            "components.predict",
            *_overrides(checkpoint, tiny_dataset.uri, out),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in PREDICTION_FILES.values():
        assert storage.read_json(str(out / name)) == storage.read_json(str(one_rank / name)), name


@pytest.mark.integration
def test_predict_without_a_checkpoint_exits_2_with_one_line(tiny_dataset, tmp_path):
    proc = _run([sys.executable, "-m", "components.predict", f"data.uri={tiny_dataset.uri}", f"output.uri={tmp_path}"])
    assert proc.returncode == 2
    assert "model.uri" in proc.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.iterdir())


def _snapshot(folder: Path) -> dict[str, str]:
    return {name: storage.sha256_file(folder / name) for name in storage.list_files(str(folder))}


def _predict_here(args: list[str]) -> int:
    """The predict CLI in this process (tracking off: these tests are about the store)."""
    return predict_cli.main([*args, "mlflow.enabled=false"])


def test_predict_refuses_to_replace_predictions_made_with_other_settings(one_rank, checkpoint, tiny_dataset, caplog):
    before = _snapshot(one_rank)
    overrides = [o for o in _overrides(checkpoint, tiny_dataset.uri, one_rank) if not o.startswith("postprocess")]
    status = _predict_here([*overrides, "postprocess.top_k=3"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert status == 2
    assert len(errors) == 1 and "postprocess.top_k: 5 -> 3" in errors[0] and "output.overwrite=true" in errors[0]
    assert _snapshot(one_rank) == before


def test_predictions_of_unknown_settings_are_not_replaced_either(checkpoint, tiny_dataset, tmp_path, caplog):
    (tmp_path / PREDICTION_FILES["bbox"]).write_text("[]")
    status = _predict_here(_overrides(checkpoint, tiny_dataset.uri, tmp_path))
    assert status == 2
    assert "unknown settings" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [PREDICTION_FILES["bbox"]]


def test_overwrite_replaces_them_and_records_the_new_settings(one_rank, checkpoint, tiny_dataset, tmp_path):
    out = tmp_path / "pred"
    out.mkdir()
    for name in [*PREDICTION_FILES.values(), SETTINGS_FILE]:
        (out / name).write_bytes((one_rank / name).read_bytes())
    overrides = [o for o in _overrides(checkpoint, tiny_dataset.uri, out) if not o.startswith("postprocess")]
    assert _predict_here([*overrides, "postprocess.top_k=3", "output.overwrite=true"]) == 0
    assert storage.read_json(str(out / SETTINGS_FILE))["settings"]["postprocess.top_k"] == 3
    bbox = storage.read_json(str(out / PREDICTION_FILES["bbox"]))
    assert max(sum(r["image_id"] == i for r in bbox) for i in {r["image_id"] for r in bbox}) == 3


@pytest.mark.integration
def test_predictions_with_other_post_processing_land_in_folders_of_their_own(
    checkpoint, tiny_dataset, tmp_path, capsys
):
    uris = []
    for top_k in (5, 3, 5):
        status = _predict_here(
            [
                f"model.uri={checkpoint}",
                f"data.uri={tiny_dataset.uri}",
                *TINY_MODEL,
                f"output.store={tmp_path}",
                f"postprocess.top_k={top_k}",
            ]
        )
        assert status == 0
        uris.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["predictions_uri"])
    assert uris[0] != uris[1] and uris[0] == uris[2]
    assert all(storage.exists(storage.join(uri, PREDICTION_FILES["bbox"])) for uri in uris)


SHAPING = [
    "postprocess.top_k=7",
    "postprocess.score_threshold=0.1",
    "postprocess.mask_threshold=0.4",
    "postprocess.use_presence=false",
    "detection.nms=true",
    "detection.nms_iou_threshold=0.5",
    "detection.nms_prob_threshold=0.2",
    "detection.reverse=true",
    "detection.prompt_batch=1",
    "detection.amp=bf16",
    "association.matcher=greedy",
    "association.iou_threshold=0.3",
    "association.max_missed_frames=1",
    "association.score_reduction=max",
    "association.top_k=3",
    "dumper.maxdets=10",
    "model.image_size=56",
    "model.num_queries=8",
    "data.split=train",
    "data.uri=/elsewhere",
]
NEUTRAL = [
    "dumper.gather=filesystem,dumper.shared_dir=/shared",
    "dumper.gather=store,dumper.store_uri=/parts",
    "dumper.timeout_s=5,dumper.poll_interval_s=1",
    "data.cache_dir=/cache",
    "preview.frames=1",
    "mlflow.enabled=false",
    "output.overwrite=true",
]


def _keyed_uri(overrides: list[str], sha256: str = "0" * 64) -> str:
    cfg = load_config("predict", PredictConfig, ["model.uri=/m.pt", "data.uri=/d", "output.store=/s", *overrides])
    return output_uri_for(cfg, sha256)


@pytest.mark.parametrize("override", SHAPING)
@pytest.mark.integration
def test_every_setting_that_shapes_the_files_changes_the_output_folder(override):
    assert _keyed_uri([override]) != _keyed_uri([])


@pytest.mark.parametrize("overrides", NEUTRAL)
@pytest.mark.integration
def test_settings_that_leave_the_files_alone_keep_the_output_folder(overrides):
    assert _keyed_uri(overrides.split(",")) == _keyed_uri([])


def test_another_checkpoint_at_the_same_uri_changes_the_output_folder():
    assert _keyed_uri([], "1" * 64) != _keyed_uri([], "2" * 64)


BAD_VALUES = [
    (PredictDataConfig, {"uri": ""}, "data.uri"),
    (PredictDataConfig, {"uri": "http://host/x"}, "data.uri"),
    (PredictDataConfig, {"uri": "/d", "split": "test"}, "data.split"),
    (PredictDataConfig, {"uri": "/d", "cache_dir": 3}, "data.cache_dir"),
    (PredictOutputConfig, {"store": ""}, "output.store"),
    (PredictOutputConfig, {"uri": "ftp://x/y"}, "output.uri"),
    (PredictOutputConfig, {"overwrite": "yes"}, "output.overwrite"),
    (PreviewConfig, {"frames": -1}, "preview.frames"),
    (PreviewConfig, {"max_masks": 1.5}, "preview.max_masks"),
    (PreviewConfig, {"min_score": float("nan")}, "preview.min_score"),
    (PreviewConfig, {"min_score": 2.0}, "preview.min_score"),
    (DetectionConfig, {"nms_iou_threshold": -1.0}, "detection.nms_iou_threshold"),
    (DetectionConfig, {"nms_iou_threshold": 1.5}, "detection.nms_iou_threshold"),
    (DetectionConfig, {"nms_prob_threshold": float("nan")}, "detection.nms_prob_threshold"),
    (DetectionConfig, {"nms": "true"}, "detection.nms"),
    (PostprocessConfig, {"top_k": True}, "postprocess.top_k"),
    (PostprocessConfig, {"score_threshold": float("inf")}, "postprocess.score_threshold"),
    (PostprocessConfig, {"use_presence": 1}, "postprocess.use_presence"),
    (AssociationConfig, {"iou_threshold": float("nan")}, "association.iou_threshold"),
    (AssociationConfig, {"max_missed_frames": 2.5}, "association.max_missed_frames"),
    (DumperConfig, {"timeout_s": float("nan")}, "dumper.timeout_s"),
    (DumperConfig, {"poll_interval_s": 0.0}, "dumper.poll_interval_s"),
    (DumperConfig, {"timeout_s": 1.0, "poll_interval_s": 2.0}, "dumper.poll_interval_s"),
    (DumperConfig, {"gather": "store", "store_uri": "gs://bucket/x"}, "dumper.store_uri"),
]


@pytest.mark.parametrize(("schema", "values", "key"), BAD_VALUES, ids=[f"{k}={v}" for _, v, k in BAD_VALUES])
def test_a_bad_predict_value_is_refused_when_the_config_is_built_naming_its_key(schema, values, key):
    with pytest.raises(ConfigError, match=re.escape(key)) as raised:
        schema(**values)
    assert "\n" not in str(raised.value)
