"""SAM3's tracker from sam3's own classes (`model.tracker.*`) and the video model it makes with the detector.

The tiny preset is the official architecture at CPU size; the full preset's tracker has the
official parameter names and shapes; the video model's state dict is SAM3's checkpoint layout;
the heuristics' defaults are those of sam3's video builder.
"""

from __future__ import annotations

import ast
import inspect
import logging
from dataclasses import asdict

import pytest
import torch

from sam3_core.config import load_config
from sam3_core.errors import ConfigError, InputError
from sam3_core.model import cpu_compat
from sam3_core.model.build import build_detector
from sam3_core.model.checkpoint import save_checkpoint
from sam3_core.model.config import ModelConfig, TrackerConfig
from sam3_core.model.tracker import (
    TRACKER_NECK_PREFIX,
    VideoInferenceConfig,
    build_tracker,
    build_video_model,
    load_video_model_weights,
)
from sam3_core.model.video_detector import VideoClipDetector
from sam3_core.predict.predictor import PredictConfig

TINY = ModelConfig(image_size=56, vit_pretrain_img_size=56)


@pytest.fixture(scope="module")
def tiny_video_model(torch_single_thread: None) -> torch.nn.Module:
    return build_video_model(TINY)


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


def test_the_video_models_state_dict_has_sam3s_checkpoint_layout(tiny_video_model) -> None:
    keys = tiny_video_model.state_dict().keys()
    assert {key.split(".", 1)[0] for key in keys} == {"detector", "tracker"}
    assert any(key.startswith(TRACKER_NECK_PREFIX) for key in keys)


def test_the_video_models_detector_is_the_image_detector_plus_the_trackers_neck(tiny_video_model) -> None:
    image = VideoClipDetector(build_detector(TINY)).state_dict()
    video = {k: v for k, v in tiny_video_model.state_dict().items() if k.startswith("detector.")}
    neck = {k for k in video if k.startswith(TRACKER_NECK_PREFIX)}
    assert shapes({k: v for k, v in video.items() if k not in neck}) == shapes(image)
    assert all(torch.equal(video[k], image[k]) for k in image)


def test_the_trackers_neck_starts_as_a_copy_of_the_detectors_neck(tiny_video_model) -> None:
    neck = tiny_video_model.detector.backbone.vision_backbone
    assert shapes(neck.sam2_convs.state_dict()) == shapes(neck.convs.state_dict())
    assert all(
        torch.equal(a, b) for a, b in zip(neck.sam2_convs.state_dict().values(), neck.convs.state_dict().values())
    )


def test_the_tracker_is_built_identically_from_the_same_seed(torch_single_thread: None) -> None:
    first, second = build_tracker(TINY).state_dict(), build_tracker(TINY).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_the_training_tracker_has_the_inference_trackers_parameters(torch_single_thread: None) -> None:
    from sam3.model.sam3_tracking_predictor import Sam3TrackerPredictor

    training = build_tracker(TINY, predictor=False)
    assert not isinstance(training, Sam3TrackerPredictor)
    assert shapes(training.state_dict()) == shapes(build_tracker(TINY).state_dict())


@pytest.mark.integration
def test_the_full_presets_tracker_has_the_names_and_shapes_of_sam3s_own_tracker(torch_single_thread: None) -> None:
    from sam3.model_builder import build_tracker as sam3_build_tracker

    full = load_config("predict", PredictConfig, ["model=full", "data.uri=unused"]).model
    with cpu_compat.cuda_calls_on_cpu():
        official = sam3_build_tracker(apply_temporal_disambiguation=True)
    ours = build_tracker(full)
    assert shapes(ours.state_dict()) == shapes(official.state_dict())
    assert ours.use_memory_selection == official.use_memory_selection


def _builder_call_keywords() -> dict[str, object]:
    """The literal keyword values `build_sam3_video_model` gives its video model (temporal disambiguation on)."""
    from sam3 import model_builder

    tree = ast.parse(inspect.getsource(model_builder.build_sam3_video_model))
    branch = next(
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "apply_temporal_disambiguation"
    )
    call = next(
        node
        for statement in branch.body
        for node in ast.walk(statement)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Sam3VideoInferenceWithInstanceInteractivity"
    )
    keywords = {}
    for keyword in call.keywords:
        try:
            keywords[keyword.arg] = ast.literal_eval(keyword.value)
        except ValueError:  # a variable, e.g. compile_model=compile
            continue
    return keywords


def test_the_heuristics_default_to_those_of_sam3s_video_builder() -> None:
    from sam3.model.sam3_video_base import Sam3VideoBase

    base_defaults = {
        name: p.default for name, p in inspect.signature(Sam3VideoBase.__init__).parameters.items() if name != "self"
    }
    expected = {**base_defaults, **_builder_call_keywords()}
    ours = asdict(VideoInferenceConfig())
    assert ours == {key: expected[key] for key in ours}


def test_every_heuristic_is_an_argument_of_sam3s_video_model() -> None:
    from sam3.model.sam3_video_base import Sam3VideoBase

    assert set(asdict(VideoInferenceConfig())) <= set(inspect.signature(Sam3VideoBase.__init__).parameters)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"d_model": 72, "heads": 4, "vit_heads": 4}, "model.d_model"),
        ({"tracker": TrackerConfig(mem_dim=24)}, "model.tracker.mem_dim"),
        ({"tracker": TrackerConfig(memory_heads=32)}, "model.tracker.memory_heads"),
    ],
)
def test_a_tracker_that_does_not_fit_the_detectors_width_is_refused_naming_the_key(overrides, key) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ModelConfig(**overrides)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_maskmem", 0),
        ("max_cond_frames_in_attn", 1),
        ("dropout", 1.0),
        ("memory_selection", "yes"),
    ],
)
def test_a_bad_tracker_value_is_refused_naming_its_key(field, value) -> None:
    with pytest.raises(ConfigError, match=f"model.tracker.{field}"):
        TrackerConfig(**{field: value})


def test_hot_start_thresholds_beyond_the_delay_are_refused() -> None:
    with pytest.raises(ConfigError, match="hotstart_unmatch_thresh"):
        VideoInferenceConfig(hotstart_delay=5, hotstart_unmatch_thresh=6)


def test_an_exported_checkpoint_fills_the_detector_and_the_tracker(tiny_video_model, tmp_path) -> None:
    source = build_video_model(ModelConfig(image_size=56, vit_pretrain_img_size=56, init_seed=7)).state_dict()
    uri = str(tmp_path / "exported.pt")
    save_checkpoint(source, uri, step=0)
    target = build_video_model(TINY)
    report, missing = load_video_model_weights(target, uri)
    assert (report.missing, missing) == ([], [])
    loaded = target.state_dict()
    assert all(torch.equal(loaded[k], source[k]) for k in source)


def test_a_training_checkpoint_leaves_the_tracker_as_built_and_says_so(tiny_video_model, tmp_path, caplog) -> None:
    uri = str(tmp_path / "last.pt")
    trained = VideoClipDetector(build_detector(ModelConfig(image_size=56, vit_pretrain_img_size=56, init_seed=3)))
    save_checkpoint({"model": trained.state_dict(), "step": 1}, uri, step=1)
    target = build_video_model(TINY)
    before = {k: v.clone() for k, v in target.tracker.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        report, missing = load_video_model_weights(target, uri)
    assert len(missing) == len(before)
    assert all(torch.equal(target.tracker.state_dict()[k], v) for k, v in before.items())
    assert all(key.startswith(TRACKER_NECK_PREFIX) for key in report.missing)
    assert "keep their initial values" in caplog.text


def test_tracker_weights_of_another_size_are_refused_naming_the_tensor(tmp_path) -> None:
    other = build_video_model(ModelConfig(image_size=56, vit_pretrain_img_size=56, tracker=TrackerConfig(mem_dim=32)))
    uri = str(tmp_path / "other.pt")
    save_checkpoint(other.state_dict(), uri, step=0)
    with pytest.raises(InputError, match=r"tracker\..*check model\.tracker"):
        load_video_model_weights(build_video_model(TINY), uri)
