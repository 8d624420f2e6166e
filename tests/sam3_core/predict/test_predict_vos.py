"""inference=vos: every ground-truth object prompted by its first-frame mask, propagated by the tracker."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from components import predict as predict_cli
from sam3_core.config import load_config
from sam3_core.data.frames import FrameReader
from sam3_core.data.synthetic import track_from_masks
from sam3_core.data.ytvis import Video, rle_to_mask
from sam3_core.model.checkpoint import save_checkpoint
from sam3_core.model.tracker_training import build_video_clip_model
from sam3_core.predict.predictor import PredictConfig
from sam3_core.predict.vos import VideoPropagation
from tests.fixtures.datasets import TINY_MODEL

SIZE = 32


def model_config():
    return load_config("predict", PredictConfig, ["data.uri=unused", *TINY_MODEL]).model


@pytest.fixture(scope="module")
def model(torch_single_thread: None) -> torch.nn.Module:
    return build_video_clip_model(model_config()).eval()


@pytest.fixture(scope="module")
def checkpoint(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An untrained detector + tracker checkpoint in SAM3's layout."""
    uri = str(tmp_path_factory.mktemp("ckpt") / "video.pt")
    save_checkpoint({"model": model.state_dict()}, uri, step=0)
    return uri


def square(x: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[8:16, x : x + 8] = True
    return mask


def empty() -> np.ndarray:
    return np.zeros((SIZE, SIZE), dtype=bool)


def test_each_object_is_prompted_on_its_first_visible_frame_and_predicted_from_there_on(model) -> None:
    video = Video(7, SIZE, SIZE, tuple(f"7/{t:05d}.png" for t in range(5)))
    tracks = [
        track_from_masks(70, 7, 1, [square(t) for t in range(5)]),
        track_from_masks(71, 7, 2, [empty(), empty(), square(20), square(21), square(22)]),
    ]

    def image(t: int) -> torch.Tensor:
        return torch.zeros(3, 56, 56)

    propagation = VideoPropagation(model, video, tracks, image)
    propagation.run()
    masklets = {m["gt_id"]: m for m in propagation.masklets()}
    assert sorted(masklets) == [70, 71]
    assert masklets[71]["category_id"] == 2 and masklets[71]["video_id"] == 7
    assert masklets[71]["segmentations"][:2] == [None, None]
    for gt_id, first in ((70, 0), (71, 2)):
        prompt = next(t for t in tracks if t.id == gt_id).segmentations[first]
        predicted = rle_to_mask(masklets[gt_id]["segmentations"][first])
        overlap = (predicted & rle_to_mask(prompt)).sum() / (predicted | rle_to_mask(prompt)).sum()
        assert overlap > 0.6  # the prompt frame returns the prompt, through the tracker's low-res masks
    assert all(len(m["segmentations"]) == 5 for m in masklets.values())


def test_spatial_memories_are_dropped_once_no_later_frame_can_attend_them(model) -> None:
    length = 14
    video = Video(1, SIZE, SIZE, tuple(f"1/{t:05d}.png" for t in range(length)))
    tracks = [track_from_masks(1, 1, 1, [square(t) for t in range(length)])]
    propagation = VideoPropagation(model, video, tracks, lambda t: torch.zeros(3, 56, 56))
    propagation.run()
    (group,) = propagation.groups
    held = [f for f, out in group.output["non_cond_frame_outputs"].items() if "maskmem_features" in out]
    assert len(held) <= model.tracker.num_maskmem
    assert len(group.output["non_cond_frame_outputs"]) == length - 1  # pointers of every frame stay


@pytest.mark.integration
def test_predict_inference_vos_writes_one_masklet_per_validation_object_with_its_gt_id(
    checkpoint: str, tiny_dataset, tmp_path: Path
) -> None:
    out = tmp_path / "pred"
    overrides = [
        "inference=vos",
        f"model.uri={checkpoint}",
        f"data.uri={tiny_dataset.uri}",
        f"output.uri={out}",
        "mlflow.enabled=false",
        *TINY_MODEL,
    ]
    assert predict_cli.main(overrides) == 0
    predictions = json.loads((out / "video_predictions.json").read_text())
    val = FrameReader(tiny_dataset.uri).dataset("val")
    assert sorted(p["gt_id"] for p in predictions) == sorted(t.id for t in val.tracks)
    lengths = {v.id: v.length for v in val.videos}
    assert all(len(p["segmentations"]) == lengths[p["video_id"]] for p in predictions)
    assert json.loads((out / "predict_settings.json").read_text())["settings"]["inference"] == "vos"
