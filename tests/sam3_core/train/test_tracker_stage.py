"""train.stage=tracker|joint in the one trainer: what trains, what stays bit-identical, SAM3's checkpoint layout."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from components import evaluate as evaluate_cli
from components import predict as predict_cli
from components.train import execute
from sam3_core import storage
from sam3_core.config import load_config
from sam3_core.model.build import build_detector
from sam3_core.model.checkpoint import load_checkpoint, save_checkpoint
from sam3_core.model.tracker import build_video_model
from sam3_core.model.tracker_training import TRACKER_NECK_PREFIX, build_video_clip_model
from sam3_core.model.video_detector import VideoClipDetector
from sam3_core.train.build import build_trainer, train
from sam3_core.train.config import TrainConfig
from sam3_core.train.stages import TRACKER_PRESETS
from tests.fixtures.datasets import TINY_MODEL

pytestmark = pytest.mark.integration

NO_TRACKING = ["mlflow.enabled=false"]
TRACKER_RUN = [
    "data.tracker_clips.frames_per_clip=3",
    "data.tracker_clips.correction_points=2",
    "train.val_every=0",
    "train.best_metric=train/loss",
    "train.best_mode=min",
    "optim.lr=1e-3",
]
NECK = "detector.backbone.vision_backbone.convs."


def config(overrides: list[str]) -> TrainConfig:
    return load_config("train", TrainConfig, overrides)


@pytest.fixture(scope="module")
def detector_checkpoint(tiny_train_overrides: list[str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """A detector-only checkpoint of ours (no tracker, no tracker neck), as stage detector writes best.pt."""
    cfg = config(tiny_train_overrides)
    module = VideoClipDetector(build_detector(cfg.model))
    torch.manual_seed(1)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.01 * torch.randn_like(param))  # weights no fresh build has
    uri = str(tmp_path_factory.mktemp("detector") / "best.pt")
    save_checkpoint({"model": module.state_dict()}, uri, step=0)
    return uri


def tracker_overrides(base: list[str], store: Path, checkpoint: str, *extra: str) -> list[str]:
    return [*base, f"output.store={store}", f"model.uri={checkpoint}", "train.stage=tracker", *TRACKER_RUN, *extra]


@pytest.fixture(scope="module")
def tracker_run(tiny_train_overrides: list[str], detector_checkpoint: str, tmp_path_factory: pytest.TempPathFactory):
    store = tmp_path_factory.mktemp("tracker-store")
    overrides = tracker_overrides(tiny_train_overrides, store, detector_checkpoint, "train.max_steps=3")
    outputs = execute([*overrides, *NO_TRACKING])
    return overrides, outputs


def test_stage_tracker_leaves_every_detector_weight_bit_identical_and_trains_the_tracker(
    tracker_run, detector_checkpoint: str
) -> None:
    overrides, outputs = tracker_run
    start = load_checkpoint(detector_checkpoint)["model"]
    trained = load_checkpoint(outputs["last_checkpoint_uri"])["model"]
    detector = {k: v for k, v in trained.items() if k.startswith("detector.")}
    assert set(start) <= set(detector)
    assert all(torch.equal(detector[key], start[key]) for key in start)
    # the tracker's neck, absent from the checkpoint, started as a copy of the loaded neck and stayed so
    neck = {k: v for k, v in detector.items() if k.startswith(TRACKER_NECK_PREFIX)}
    assert neck and all(torch.equal(v, start[NECK + k[len(TRACKER_NECK_PREFIX) :]]) for k, v in neck.items())
    initial = build_video_clip_model(config(overrides).model).state_dict()
    changed = [k for k, v in trained.items() if k.startswith("tracker.") and not torch.equal(v, initial[k])]
    assert any(k.startswith("tracker.transformer.") for k in changed)
    assert any(k.startswith("tracker.maskmem_backbone.") for k in changed)
    assert any(k.startswith("tracker.sam_mask_decoder.") for k in changed)
    assert not any(k.startswith("tracker.sam_prompt_encoder.") for k in changed)


def test_the_best_checkpoint_has_sam3s_video_layout_and_loads_strictly_into_its_video_model(tracker_run) -> None:
    overrides, outputs = tracker_run
    best = load_checkpoint(outputs["best_checkpoint_uri"])["model"]
    video_model = build_video_model(config(overrides).model)
    assert set(best) == set(video_model.state_dict())
    video_model.load_state_dict(best, strict=True)


def test_preset_memory_leaves_the_mask_decoder_as_it_started(
    tiny_train_overrides: list[str], detector_checkpoint: str, tmp_path: Path
) -> None:
    overrides = tracker_overrides(
        tiny_train_overrides, tmp_path, detector_checkpoint, "train.max_steps=2", "tracker_train.trainable=memory"
    )
    result = train(config(overrides))
    trained = load_checkpoint(result.last_checkpoint_uri)["model"]
    initial = build_video_clip_model(config(overrides).model).state_dict()
    decoder = [k for k in trained if k.startswith("tracker.sam_mask_decoder.")]
    assert decoder and all(torch.equal(trained[k], initial[k]) for k in decoder)
    memory = [k for k in trained if k.startswith(tuple("tracker." + p for p in TRACKER_PRESETS["memory"]))]
    assert any(not torch.equal(trained[k], initial[k]) for k in memory)


def test_a_tracker_run_resumed_from_its_step_checkpoint_ends_with_the_uninterrupted_weights(
    tiny_train_overrides: list[str], detector_checkpoint: str, tmp_path: Path
) -> None:
    common = tracker_overrides(
        tiny_train_overrides, tmp_path, detector_checkpoint, "train.max_steps=4", "train.checkpoint_every=2"
    )
    whole = train(config([*common, "output.run_name=whole"]))
    resumed_folder = tmp_path / "runs" / "resumed" / "checkpoints"
    resumed_folder.mkdir(parents=True)
    shutil.copy(Path(whole.run_uri) / "checkpoints" / "step_0000002.pt", resumed_folder / "last.pt")
    shutil.copy(Path(whole.run_uri) / "config.yaml", resumed_folder.parent / "config.yaml")
    resumed = train(config([*common, "output.run_name=resumed"]))
    a, b = load_checkpoint(whole.last_checkpoint_uri)["model"], load_checkpoint(resumed.last_checkpoint_uri)["model"]
    assert load_checkpoint(resumed.last_checkpoint_uri)["step"] == 4
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_stage_joint_trains_the_detector_and_the_tracker_from_one_loss(
    tiny_train_overrides: list[str], detector_checkpoint: str, tmp_path: Path
) -> None:
    overrides = [
        *tiny_train_overrides,
        f"output.store={tmp_path}",
        f"model.uri={detector_checkpoint}",
        "train.stage=joint",
        *TRACKER_RUN,
        "train.max_steps=2",
    ]
    result = train(config(overrides))
    start = load_checkpoint(detector_checkpoint)["model"]
    trained = load_checkpoint(result.last_checkpoint_uri)["model"]
    assert any(not torch.equal(trained[k], v) for k, v in start.items() if k.startswith("detector.transformer."))
    record = result.history[-1]
    assert {"train/loss", "train/detector_loss", "train/tracker_loss"} <= set(record)
    assert storage.exists(result.best_checkpoint_uri)


def test_tracker_lora_trains_only_its_adapters_and_best_pt_has_them_merged(
    tiny_train_overrides: list[str], detector_checkpoint: str, tmp_path: Path
) -> None:
    overrides = tracker_overrides(
        tiny_train_overrides, tmp_path, detector_checkpoint, "train.max_steps=2", "tracker_train.lora.rank=2"
    )
    result = train(config(overrides))
    last = load_checkpoint(result.last_checkpoint_uri)["model"]
    assert any(".lora_A." in key for key in last if key.startswith("tracker."))
    best = load_checkpoint(result.best_checkpoint_uri)["model"]
    video_model = build_video_model(config(overrides).model)
    video_model.load_state_dict(best, strict=True)
    initial = build_video_clip_model(config(overrides).model).state_dict()
    changed = [k for k, v in best.items() if k.startswith("tracker.") and not torch.equal(v, initial[k])]
    assert changed and all(k.endswith(".weight") for k in changed)


def test_in_loop_vos_validation_equals_predict_inference_vos_then_evaluate_on_the_best_checkpoint(
    tiny_train_overrides: list[str], tiny_dataset, detector_checkpoint: str, tmp_path: Path
) -> None:
    overrides = [
        *tracker_overrides(tiny_train_overrides, tmp_path / "store", detector_checkpoint, "train.max_steps=2"),
        "train.val_every=1",
        "train.best_metric=val/vos_JF_mean",
        "train.best_mode=max",
    ]
    result = train(config(overrides))
    logged = {record["step"]: record for record in result.history if "val/vos_JF_mean" in record}
    assert sorted(logged) == [1, 2]
    out = tmp_path / "predictions"
    predict = ["inference=vos", f"model.uri={result.best_checkpoint_uri}", f"data.uri={tiny_dataset.uri}"]
    assert predict_cli.main([*predict, f"output.uri={out}", *TINY_MODEL, *NO_TRACKING]) == 0
    metrics = evaluate_cli.execute(
        [
            "--gt",
            f"{tiny_dataset.uri}/val.json",
            "--predictions",
            str(out),
            "--output",
            str(tmp_path / "eval"),
            *NO_TRACKING,
        ]
    )["metrics"]
    assert metrics["vos_JF_mean"] == pytest.approx(logged[result.best_step]["val/vos_JF_mean"], abs=1e-9)


def test_stage_joint_alternate_gives_the_detector_even_steps_and_the_tracker_odd_ones(
    tiny_train_overrides: list[str], detector_checkpoint: str, tmp_path: Path
) -> None:
    overrides = [
        *tiny_train_overrides,
        f"output.store={tmp_path}",
        f"model.uri={detector_checkpoint}",
        "train.stage=joint",
        "tracker_train.joint=alternate",
        *TRACKER_RUN,
        "train.max_steps=2",
        "train.log_every=1",
    ]
    result = train(config(overrides))
    steps = {int(r["step"]): r for r in result.history if "train/loss" in r}
    assert "train/frames_per_s" in steps[1] and "train/objects_per_s" not in steps[1]  # a detector step
    assert "train/objects_per_s" in steps[2]  # a tracker step
    start = load_checkpoint(detector_checkpoint)["model"]
    trained = load_checkpoint(result.last_checkpoint_uri)["model"]
    initial = build_video_clip_model(config(overrides).model).state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in start.items() if k.startswith("detector.transformer."))
    assert any(not torch.equal(trained[k], initial[k]) for k in trained if k.startswith("tracker.transformer."))


def test_tracker_uri_gives_the_starting_tracker_and_model_uri_the_detector(
    tiny_train_overrides: list[str], detector_checkpoint: str, tmp_path: Path
) -> None:
    tiny = config(tiny_train_overrides).model
    base = build_video_model(replace(tiny, init_seed=5)).state_dict()  # SAM3's sam3.pt at the tiny preset
    save_checkpoint(base, str(tmp_path / "sam3.pt"), step=0)
    overrides = tracker_overrides(
        tiny_train_overrides, tmp_path, detector_checkpoint, f"tracker_train.tracker_uri={tmp_path / 'sam3.pt'}"
    )
    module = build_trainer(config(overrides)).module
    start, state = load_checkpoint(detector_checkpoint)["model"], module.state_dict()
    assert all(torch.equal(state[k], v) for k, v in start.items())
    tracker = [k for k in state if k.startswith(("tracker.", TRACKER_NECK_PREFIX))]
    assert tracker and all(torch.equal(state[k], base[k]) for k in tracker)
