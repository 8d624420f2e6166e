"""Predict: checkpoint + dataset -> COCO frame results and YTVIS masklets, identical on 1 and 2 ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sam3_core import storage
from sam3_core.artifacts import PREDICTION_FILES
from sam3_core.model.build import build_detector
from sam3_core.model.checkpoint import save_checkpoint
from sam3_core.model.config import ModelConfig
from sam3_core.model.video_detector import VideoClipDetector
from tests.fixtures.datasets import TINY_MODEL, single_thread_env
from tests.fixtures.network import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """An (untrained) tiny checkpoint in our training layout."""
    model = VideoClipDetector(build_detector(ModelConfig(image_size=56, vit_pretrain_img_size=56)))
    uri = str(tmp_path_factory.mktemp("ckpt") / "last.pt")
    save_checkpoint({"model": model.state_dict()}, uri, step=0)
    return uri


def _overrides(checkpoint: str, dataset_uri: str, out: Path) -> list[str]:
    return [f"model.uri={checkpoint}", f"data.uri={dataset_uri}", f"output.uri={out}", "postprocess.top_k=5", *TINY_MODEL]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=single_thread_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def one_rank(checkpoint, tiny_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pred1")
    proc = _run([sys.executable, "-m", "components.predict", *_overrides(checkpoint, tiny_dataset.uri, out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"predictions_uri": str(out)}
    return out


def test_predict_writes_the_three_prediction_files(one_rank):
    assert sorted(storage.list_files(str(one_rank))) == sorted(PREDICTION_FILES.values())


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


def test_two_ranks_write_the_same_predictions_as_one(one_rank, checkpoint, tiny_dataset, tmp_path):
    out = tmp_path / "pred2"
    proc = _run([
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "components.predict", *_overrides(checkpoint, tiny_dataset.uri, out),
    ])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in PREDICTION_FILES.values():
        assert storage.read_json(str(out / name)) == storage.read_json(str(one_rank / name)), name


def test_predict_without_a_checkpoint_exits_2_with_one_line(tiny_dataset, tmp_path):
    proc = _run([sys.executable, "-m", "components.predict", f"data.uri={tiny_dataset.uri}", f"output.uri={tmp_path}"])
    assert proc.returncode == 2
    assert "model.uri" in proc.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.iterdir())
