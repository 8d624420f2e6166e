"""The CPU shims for the pinned sam3 (sam3_core/model/cpu_compat.py): each is still needed, and each works.

A "still needed" test fails once the pinned sam3 no longer assumes CUDA there: the shim (or
the builder's workaround) can then be deleted. They are meaningless with a GPU, so they skip.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torchvision
from torch import nn

from sam3_core.model import cpu_compat
from sam3_core.model.build import build_detector
from sam3_core.model.config import ModelConfig

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks sam3's behaviour without a GPU")


@pytest.fixture(scope="module")
def geometry_encoder(torch_single_thread: None) -> nn.Module:
    """The tiny preset's geometry encoder (building the detector applies the shims)."""
    return build_detector(ModelConfig(image_size=56, vit_pretrain_img_size=56)).geometry_encoder


def one_box_prompt():
    from sam3.model.geometry_encoders import Prompt

    return Prompt(
        box_embeddings=torch.tensor([[[0.5, 0.5, 0.4, 0.3]]]),  # [n_boxes, batch, cxcywh]
        box_mask=torch.zeros(1, 1, dtype=torch.bool),
        box_labels=torch.ones(1, 1, dtype=torch.long),
    )


@needs_no_gpu
def test_sam3_box_encoding_still_pins_memory_which_fails_without_a_gpu(geometry_encoder: nn.Module) -> None:
    from sam3.model.geometry_encoders import SequenceGeometryEncoder

    unpatched = inspect.unwrap(SequenceGeometryEncoder._encode_boxes)
    prompt = one_box_prompt()
    with pytest.raises(RuntimeError, match="NVIDIA driver"):
        unpatched(geometry_encoder, prompt.box_embeddings, prompt.box_mask, prompt.box_labels, torch.zeros(1, 64, 4, 4))


def test_geometry_encoder_encodes_box_prompts_on_cpu_after_apply(geometry_encoder: nn.Module) -> None:
    cpu_compat.apply()
    feats = torch.randn(16, 1, 64)  # a 4x4 feature map, sequence first
    embeddings, mask = geometry_encoder(one_box_prompt(), [feats], [(4, 4)], [torch.zeros_like(feats)])
    assert embeddings.shape[1:] == (1, 64)
    assert torch.isfinite(embeddings).all()
    assert mask.shape == (1, embeddings.shape[0])


def test_the_pin_memory_shim_is_undone_after_box_encoding(geometry_encoder: nn.Module) -> None:
    original = torch.Tensor.pin_memory
    cpu_compat.apply()
    feats = torch.randn(16, 1, 64)
    geometry_encoder(one_box_prompt(), [feats], [(4, 4)], [torch.zeros_like(feats)])
    assert torch.Tensor.pin_memory is original


@needs_no_gpu
def test_sam3_focal_loss_still_defaults_to_triton_which_fails_without_a_gpu() -> None:
    from sam3.train.loss import loss_fns

    unpatched = inspect.unwrap(loss_fns.sigmoid_focal_loss)
    assert inspect.signature(unpatched).parameters["triton"].default is True
    with pytest.raises(RuntimeError):
        unpatched(torch.randn(2, 5), torch.ones(2, 5), 1.0)


def test_focal_loss_on_cpu_after_apply_equals_a_plain_torch_focal_loss() -> None:
    from sam3.train.loss import loss_fns

    cpu_compat.apply()
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, generator=generator)
    targets = (torch.rand(3, 7, generator=generator) > 0.6).float()
    num_boxes = 2.0
    reference = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="none")
    loss = loss_fns.sigmoid_focal_loss(logits, targets, num_boxes, alpha=0.25, gamma=2.0)
    torch.testing.assert_close(loss, reference.mean(1).sum() / num_boxes)


@needs_no_gpu
def test_sam3_position_encoding_with_a_precompute_resolution_fails_without_a_gpu() -> None:
    from sam3.model.position_encoding import PositionEmbeddingSine

    with pytest.raises(RuntimeError, match="NVIDIA driver"):
        PositionEmbeddingSine(num_pos_feats=64, normalize=True, precompute_resolution=56)


@needs_no_gpu
def test_sam3_decoder_with_resolution_and_stride_fails_without_a_gpu() -> None:
    from sam3.model.decoder import TransformerDecoder, TransformerDecoderLayer
    from sam3.model.model_misc import MultiheadAttentionWrapper

    layer = TransformerDecoderLayer(
        activation="relu",
        d_model=64,
        dim_feedforward=128,
        dropout=0.0,
        cross_attention=MultiheadAttentionWrapper(num_heads=4, dropout=0.0, embed_dim=64),
        n_heads=4,
    )
    with pytest.raises(RuntimeError, match="NVIDIA driver"):
        TransformerDecoder(
            d_model=64,
            frozen=False,
            interaction_layer=None,
            layer=layer,
            num_layers=1,
            num_queries=4,
            return_intermediate=True,
            boxRPB="log",
            resolution=56,
            stride=14,
        )


@needs_no_gpu
def test_sam3_connected_components_on_cpu_still_fail_on_zero_masks() -> None:
    from sam3.perflib import connected_components

    unpatched = inspect.unwrap(connected_components.connected_components_cpu)
    with pytest.raises(RuntimeError, match="non-empty"):
        unpatched(torch.zeros(0, 1, 8, 8, dtype=torch.uint8))


def test_connected_components_of_zero_masks_are_empty_after_apply() -> None:
    from sam3.perflib.connected_components import connected_components

    cpu_compat.apply()
    labels, counts = connected_components(torch.zeros(0, 1, 8, 8, dtype=torch.uint8))
    assert labels.shape == counts.shape == (0, 1, 8, 8)


def test_connected_components_of_masks_are_sam3s_after_apply() -> None:
    from sam3.perflib import connected_components

    cpu_compat.apply()
    masks = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    masks[0, 0, 1:3, 1:3] = 1
    masks[1, 0, 4:8, 0:2] = 1
    labels, counts = connected_components.connected_components(masks)
    reference = inspect.unwrap(connected_components.connected_components_cpu)(masks)
    assert torch.equal(labels, reference[0]) and torch.equal(counts, reference[1])
    assert counts[0, 0, 1, 1] == 4 and counts[1, 0, 5, 0] == 8


@needs_no_gpu
def test_sam3s_video_session_still_asks_for_the_gpus_properties_which_fails_without_one() -> None:
    from sam3.model.sam3_video_predictor import Sam3VideoPredictor

    unpatched = inspect.unwrap(Sam3VideoPredictor._get_torch_and_gpu_properties)
    with pytest.raises(RuntimeError, match="NVIDIA driver"):
        unpatched(object.__new__(Sam3VideoPredictor))


def test_sam3s_video_session_describes_a_machine_without_a_gpu_after_apply() -> None:
    from sam3.model.sam3_video_predictor import Sam3VideoPredictor

    cpu_compat.apply()
    assert "torch" in object.__new__(Sam3VideoPredictor)._get_torch_and_gpu_properties()


@needs_no_gpu
def test_sam3s_video_loader_still_puts_frames_on_cuda_which_fails_without_a_gpu(tmp_path) -> None:
    from PIL import Image
    from sam3.model.io_utils import load_video_frames

    Image.new("RGB", (16, 12), (200, 10, 10)).save(tmp_path / "00000.jpg")
    with pytest.raises(RuntimeError, match="NVIDIA driver"):
        load_video_frames(str(tmp_path), image_size=28, offload_video_to_cpu=False)


def test_sam3s_video_loader_keeps_frames_on_the_cpu_inside_cuda_calls_on_cpu(tmp_path) -> None:
    from PIL import Image
    from sam3.model.io_utils import load_video_frames

    Image.new("RGB", (16, 12), (200, 10, 10)).save(tmp_path / "00000.jpg")
    with cpu_compat.cuda_calls_on_cpu():
        images, height, width = load_video_frames(str(tmp_path), image_size=28, offload_video_to_cpu=False)
    assert images.device.type == "cpu"
    assert (images.shape, height, width) == ((1, 3, 28, 28), 12, 16)


@needs_no_gpu
def test_cuda_placements_stay_on_the_cpu_only_inside_cuda_calls_on_cpu() -> None:
    tensor = torch.ones(3)
    with cpu_compat.cuda_calls_on_cpu():
        placed = [
            torch.zeros(2, device="cuda"),
            torch.full((2,), 1.0, device=torch.device("cuda")),
            tensor.cuda(non_blocking=True),
            tensor.to("cuda"),
            tensor.to(device=torch.device("cuda"), non_blocking=True),
            tensor.pin_memory(),
        ]
    assert all(t.device.type == "cpu" for t in placed)
    with pytest.raises(RuntimeError):
        torch.zeros(2, device="cuda")
