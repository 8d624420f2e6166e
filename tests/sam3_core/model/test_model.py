"""The SAM3 detector presets, the multi-frame training forward through sam3's own loss, checkpoint loading,
and LoRA adapters (through peft): only they train, and merging them gives the adapted model's outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from sam3_core import storage
from sam3_core.config import load_config
from sam3_core.data.clips import ClipConfig, ClipDataset
from sam3_core.data.datapoints import collate_clips
from sam3_core.data.frames import FrameReader
from sam3_core.data.prep import PreparedDataset
from sam3_core.errors import ConfigError, InputError
from sam3_core.model.build import build_detector, freeze
from sam3_core.model.checkpoint import load_checkpoint, load_model_weights
from sam3_core.model.config import LoraConfig, ModelConfig
from sam3_core.model.lora import (
    add_adapters,
    lora_settings,
    merged_state_dict,
    target_modules,
)
from sam3_core.model.video_detector import VideoClipDetector
from sam3_core.train.config import TrainConfig
from sam3_core.train.loss import LossConfig, build_loss
from sam3_core.train.optim import OptimConfig, build_optimizer

LOSS_TERMS = ("loss_bbox", "loss_giou", "loss_ce", "presence_loss", "loss_mask", "loss_dice")
TINY = ModelConfig(image_size=56, vit_pretrain_img_size=56)
FRAMES = 3


def tiny_model(init_seed: int = 0) -> VideoClipDetector:
    return VideoClipDetector(build_detector(ModelConfig(image_size=56, vit_pretrain_img_size=56, init_seed=init_seed)))


def clip_batch(dataset: PreparedDataset, frames: int) -> Any:
    """One collated training clip of `frames` frames of the tiny dataset's first train video."""
    reader = FrameReader(dataset.uri)
    clips = ClipDataset(
        reader.dataset("train"),
        lambda name: np.array(reader.image(name)),
        ClipConfig(frames_per_clip=frames),
        TINY.image_size,
        seed=0,
        train=False,
    )
    return collate_clips([clips[0]])


def clip_losses(model: VideoClipDetector, batch: Any, loss: nn.Module) -> tuple[Any, dict[str, torch.Tensor]]:
    outputs = model(batch)
    return outputs, loss(outputs, [model.detector.back_convert(t) for t in batch.find_targets])


def grads_under(model: nn.Module, prefix: str) -> list[torch.Tensor | None]:
    return [p.grad for name, p in model.named_parameters() if name.startswith(prefix)]


@pytest.fixture(scope="module")
def three_frame_step(tiny_dataset: PreparedDataset, torch_single_thread: None) -> dict[str, Any]:
    """One training forward/backward of a 3-frame clip through sam3's loss set.

    The semantic-seg head is made trainable first, to show that the loss set never reaches it.
    """
    model = tiny_model()
    model.detector.segmentation_head.semantic_seg_head.requires_grad_(True)
    model.train()
    batch = clip_batch(tiny_dataset, FRAMES)
    outputs, losses = clip_losses(model, batch, build_loss(LossConfig(), TINY.num_queries, with_masks=True))
    losses["core_loss"].backward()
    return {"model": model.detector, "batch": batch, "outputs": outputs, "losses": losses}


@pytest.fixture(scope="module")
def source_detector(torch_single_thread: None) -> VideoClipDetector:
    """The weights the checkpoint tests save, in whatever layout each test needs."""
    return tiny_model(init_seed=0)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    theirs = b.state_dict()
    for key, value in a.state_dict().items():
        assert torch.equal(value, theirs[key]), key


# ---------------------------------------------------------------------------- presets


def test_tiny_preset_builds_with_every_parameter_finite(source_detector: VideoClipDetector) -> None:
    bad = [name for name, p in source_detector.named_parameters() if not torch.isfinite(p).all()]
    assert bad == []


def test_full_preset_composes_through_hydra_with_the_official_dimensions() -> None:
    model = load_config("train", TrainConfig, ["model=full", "data.uri=x"]).model
    # the values sam3 0.1.4's model_builder hard-codes for the released checkpoint
    official = {
        "image_size": 1008,
        "patch_size": 14,
        "d_model": 256,
        "vit_embed_dim": 1024,
        "vit_depth": 32,
        "vit_heads": 16,
        "vit_mlp_ratio": 4.625,
        "vit_window_size": 24,
        "vit_global_att_blocks": [7, 15, 23, 31],
        "vit_pretrain_img_size": 336,
        "text_width": 1024,
        "text_heads": 16,
        "text_layers": 24,
        "text_context_length": 32,
        "heads": 8,
        "ffn_dim": 2048,
        "encoder_layers": 6,
        "decoder_layers": 6,
        "geometry_layers": 3,
        "num_queries": 200,
    }
    assert {key: getattr(model, key) for key in official} == official
    assert model.preset == "full"


@pytest.mark.integration
def test_full_preset_builds_the_official_architecture_parameter_for_parameter() -> None:
    """840,509,750 parameters (vision trunk 446.2M, text 353.7M): sam3 0.1.4's image detector."""
    model = build_detector(load_config("train", TrainConfig, ["model=full", "data.uri=x"]).model)
    counts = {"all": 0, "trunk": 0, "text": 0}
    for name, param in model.named_parameters():
        counts["all"] += param.numel()
        counts["trunk"] += param.numel() if name.startswith("backbone.vision_backbone.trunk") else 0
        counts["text"] += param.numel() if name.startswith("backbone.language_backbone") else 0
    assert counts["all"] == 840_509_750
    assert round(counts["trunk"] / 1e6, 1) == 446.2
    assert round(counts["text"] / 1e6, 1) == 353.7


# ---------------------------------------------------------------------------- multi-frame forward


def test_a_clip_gives_one_output_stage_per_frame(three_frame_step: dict[str, Any]) -> None:
    assert len(three_frame_step["batch"].find_inputs) == FRAMES
    assert len(three_frame_step["outputs"]) == FRAMES


def test_clip_loss_is_finite_with_all_six_loss_terms(three_frame_step: dict[str, Any]) -> None:
    losses = three_frame_step["losses"]
    assert torch.isfinite(losses["core_loss"])
    assert {term: bool(torch.isfinite(losses[term])) for term in LOSS_TERMS} == dict.fromkeys(LOSS_TERMS, True)


@pytest.mark.parametrize("part", ["backbone.vision_backbone.trunk", "backbone.language_backbone.encoder.transformer"])
def test_gradients_reach_the_encoders(three_frame_step: dict[str, Any], part: str) -> None:
    grads = grads_under(three_frame_step["model"], part)
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_sum_frame_reduction_is_frame_count_times_mean(
    tiny_dataset: PreparedDataset, source_detector: VideoClipDetector
) -> None:
    batch = clip_batch(tiny_dataset, FRAMES)
    source_detector.train()
    with torch.no_grad():
        outputs = source_detector(batch)
        targets = [source_detector.detector.back_convert(t) for t in batch.find_targets]
        mean = build_loss(LossConfig(frame_reduction="mean"), TINY.num_queries, True)(outputs, targets)
        total = build_loss(LossConfig(frame_reduction="sum"), TINY.num_queries, True)(outputs, targets)
    torch.testing.assert_close(total["core_loss"], FRAMES * mean["core_loss"])


def test_unknown_frame_reduction_is_rejected() -> None:
    with pytest.raises(ValueError, match="frame_reduction"):
        build_loss(LossConfig(frame_reduction="max"), TINY.num_queries, True)


# ---------------------------------------------------------------------------- frozen parameters


def test_semantic_seg_head_is_frozen_by_the_builder(source_detector: VideoClipDetector) -> None:
    head = source_detector.detector.segmentation_head.semantic_seg_head
    assert [p.requires_grad for p in head.parameters()] == [False, False]


def test_the_loss_set_gives_the_semantic_seg_head_no_gradient(three_frame_step: dict[str, Any]) -> None:
    # the reason the builder freezes it (see build.py)
    assert grads_under(three_frame_step["model"], "segmentation_head.semantic_seg_head") == [None, None]
    assert all(g is not None for g in grads_under(three_frame_step["model"], "segmentation_head.instance_seg_head"))


def test_freezing_by_prefix_stops_those_parameters_gradients(tiny_dataset: PreparedDataset) -> None:
    model = tiny_model()
    prefix = "backbone.vision_backbone"
    frozen = freeze(model.detector, [prefix])
    assert frozen == sum(p.numel() for n, p in model.detector.named_parameters() if n.startswith(prefix))
    model.train()
    _, losses = clip_losses(model, clip_batch(tiny_dataset, 2), build_loss(LossConfig(), TINY.num_queries, True))
    losses["core_loss"].backward()
    assert set(grads_under(model.detector, prefix)) == {None}
    assert all(g is not None for g in grads_under(model.detector, "transformer.decoder"))


# ---------------------------------------------------------------------------- checkpoints


def official_layout(model: VideoClipDetector) -> dict[str, torch.Tensor]:
    """What the released sam3.pt holds: detector weights under `detector.*` beside the tracker's."""
    state = dict(model.state_dict())
    state["tracker.maskmem_backbone.mask_downsampler.encoder.0.weight"] = torch.zeros(4, 1, 3, 3)
    state["tracker.sam_mask_decoder.iou_prediction_head.layers.0.bias"] = torch.zeros(8)
    return state


def put(obj: Any, uri: str, tmp_path: Path) -> str:
    local = tmp_path / "upload.pt"
    torch.save(obj, local)
    storage.upload_file(local, uri)
    return uri


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "under-model"])
def test_official_checkpoint_layout_loads_without_missing_or_unexpected_keys(
    source_detector: VideoClipDetector, store_root: str, tmp_path: Path, nested: bool
) -> None:
    state = official_layout(source_detector)
    uri = put({"model": state} if nested else state, storage.join(store_root, "sam3.pt"), tmp_path)
    target = tiny_model(init_seed=1)
    report = load_model_weights(target, uri)
    assert (report.missing, report.unexpected) == ([], [])
    assert report.loaded == len(source_detector.state_dict())
    assert_same_weights(target, source_detector)


def test_bare_sam3_image_state_dict_loads(source_detector: VideoClipDetector, tmp_path: Path) -> None:
    uri = put(source_detector.detector.state_dict(), str(tmp_path / "bare.pt"), tmp_path)
    target = tiny_model(init_seed=1)
    report = load_model_weights(target, uri)
    assert (report.missing, report.unexpected) == ([], [])
    assert_same_weights(target, source_detector)


def test_a_shape_mismatch_raises_input_error_naming_the_key(source_detector: VideoClipDetector, tmp_path: Path) -> None:
    state = dict(source_detector.state_dict())
    key = "detector.transformer.decoder.query_embed.weight"
    state[key] = torch.zeros(3, 3)
    uri = put(state, str(tmp_path / "wrong.pt"), tmp_path)
    with pytest.raises(InputError, match=key.replace(".", r"\.")) as raised:
        load_model_weights(tiny_model(), uri)
    assert raised.value.source == uri


# ---------------------------------------------------------------------------- LoRA adapters

LORA = LoraConfig(
    rank=4,
    modules=["backbone.vision_backbone.trunk", "transformer", "backbone.language_backbone"],
    targets=["qkv", "proj", "fc1", "fc2", "linear1", "linear2", "c_fc"],
)


def adapted_model(cfg: LoraConfig = LORA) -> VideoClipDetector:
    model = tiny_model()
    add_adapters(model.detector, cfg)
    return model


@pytest.fixture(scope="module")
def lora_step(tiny_dataset: PreparedDataset, torch_single_thread: None) -> dict[str, Any]:
    """Weights before and after one AdamW step of a LoRA-adapted tiny model on a 2-frame clip."""
    model = adapted_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
    _, losses = clip_losses(model, clip_batch(tiny_dataset, 2), build_loss(LossConfig(), TINY.num_queries, True))
    losses["core_loss"].backward()
    optimizer.step()
    return {"model": model, "before": before, "after": model.state_dict(), "optimizer": optimizer}


def test_lora_adapts_the_named_linears_under_the_chosen_prefixes() -> None:
    names = target_modules(tiny_model().detector, LORA)
    assert "backbone.vision_backbone.trunk.blocks.0.attn.qkv" in names
    assert "backbone.vision_backbone.trunk.blocks.1.mlp.fc2" in names
    assert "transformer.encoder.layers.1.linear2" in names
    assert "backbone.language_backbone.encoder.transformer.resblocks.0.mlp.c_fc" in names
    assert not [n for n in names if n.startswith(("segmentation_head", "geometry", "dot_prod_scoring"))]


def test_lora_targets_that_match_nothing_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.lora: no linear named"):
        target_modules(tiny_model().detector, LoraConfig(rank=4, targets=["nothing_here"]))


def test_lora_on_an_attention_module_is_refused_naming_the_peft_bug() -> None:
    # peft 0.21.2 adds the out_proj delta twice in MultiheadAttention.merge (huggingface/peft#3774)
    with pytest.raises(ConfigError, match=r"transformer.encoder.layers.0.self_attn is an attention module.*peft#3774"):
        target_modules(tiny_model().detector, LoraConfig(rank=4, modules=["transformer"], targets=["self_attn"]))


def test_with_lora_only_the_adapters_are_trainable_and_change(lora_step: dict[str, Any]) -> None:
    model, before, after = lora_step["model"], lora_step["before"], lora_step["after"]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and all(".lora_" in key for key in changed)
    optimised = sum(len(group["params"]) for group in lora_step["optimizer"].param_groups)
    assert optimised == len(trainable)


def test_merged_weights_have_the_official_layout_and_give_the_adapted_models_outputs(
    lora_step: dict[str, Any], tiny_dataset: PreparedDataset
) -> None:
    adapted = lora_step["model"].eval()
    merged = merged_state_dict(adapted)
    plain = tiny_model(init_seed=1).eval()
    assert set(merged) == set(plain.state_dict())
    plain.load_state_dict(merged)
    batch = clip_batch(tiny_dataset, 2)
    with torch.no_grad():
        ours, theirs = adapted(batch)[-1], plain(batch)[-1]
    # (W + BA)x against Wx + B(Ax): the same sums in another order, float32 rounding only
    for key in ("pred_logits", "pred_boxes", "pred_masks"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5)


def test_a_checkpoint_saved_with_adapters_loads_merged_into_a_plain_model(
    lora_step: dict[str, Any], tmp_path: Path
) -> None:
    adapted = lora_step["model"]
    uri = put({"model": adapted.state_dict(), "lora": lora_settings(LORA)}, str(tmp_path / "adapted.pt"), tmp_path)
    target = tiny_model(init_seed=1)
    report = load_model_weights(target, uri)
    assert (report.missing, report.unexpected) == ([], [])
    expected = merged_state_dict(adapted)
    assert all(torch.equal(value, expected[key]) for key, value in target.state_dict().items())


def test_adapters_without_their_settings_are_an_input_error(lora_step: dict[str, Any], tmp_path: Path) -> None:
    uri = put({"model": lora_step["model"].state_dict()}, str(tmp_path / "bare-adapters.pt"), tmp_path)
    with pytest.raises(InputError, match="lacks their settings"):
        load_model_weights(tiny_model(), uri)


# ---------------------------------------------------------------------------- unreadable checkpoints


@pytest.mark.parametrize(
    ("content", "says"),
    [(b"", "empty"), (b"\x00garbage\xff" * 10, "not a torch checkpoint"), ("list", "holds a list")],
    ids=["empty", "garbage", "list"],
)
def test_an_unreadable_checkpoint_is_a_one_line_input_error_naming_the_uri(
    tmp_path: Path, content: bytes | str, says: str
) -> None:
    path = tmp_path / "weights.pt"
    if content == "list":
        torch.save([torch.zeros(2)], path)
    else:
        path.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(InputError, match=says) as raised:
        load_checkpoint(str(path))
    assert raised.value.source == str(path)
    assert "\n" not in str(raised.value) and "mmap" not in str(raised.value)
