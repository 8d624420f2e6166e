"""The export: a fine-tuned detector plus a base checkpoint's tracker, in SAM3's own video checkpoint layout.

On the tiny preset: the export has exactly the base's keys and shapes, loads strictly into the
video model, carries the fine-tuned detector's weights unchanged (LoRA adapters merged) and the
base's tracker and tracker neck (a checkpoint with its own tracker, e.g. of a tracker run, keeps
it); inputs that cannot make such a checkpoint are refused naming
the file and the tensor. The full preset, through sam3's own builders, is in
test_export_full.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sam3_core.errors import InputError
from sam3_core.model.build import build_detector
from sam3_core.model.checkpoint import save_checkpoint
from sam3_core.model.config import LoraConfig, ModelConfig
from sam3_core.model.export import ExportBaseConfig, ExportConfig, ExportOutputConfig, export_video_checkpoint
from sam3_core.model.lora import add_adapters, lora_settings, merged_state_dict
from sam3_core.model.tracker import TRACKER_NECK_PREFIX, build_video_model
from sam3_core.model.video_detector import VideoClipDetector

TINY = ModelConfig(image_size=56, vit_pretrain_img_size=56)


def tiny(init_seed: int) -> ModelConfig:
    return ModelConfig(image_size=56, vit_pretrain_img_size=56, init_seed=init_seed)


@pytest.fixture(scope="module")
def base(tmp_path_factory, torch_single_thread: None) -> tuple[str, dict[str, torch.Tensor]]:
    """A tiny video model's weights, flat in SAM3's layout: what sam3.pt is at full size."""
    state = build_video_model(tiny(1)).state_dict()
    uri = str(tmp_path_factory.mktemp("base") / "sam3.pt")
    save_checkpoint(state, uri, step=0)
    return uri, state


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory, torch_single_thread: None) -> tuple[str, dict[str, torch.Tensor]]:
    """A training checkpoint of ours: {"model": detector.*, "step", ...}."""
    state = VideoClipDetector(build_detector(tiny(2))).state_dict()
    uri = str(tmp_path_factory.mktemp("train") / "best.pt")
    save_checkpoint({"model": state, "step": 40}, uri, step=40)
    return uri, state


def export(model_uri: str, base_uri: str, out: Path, model: ModelConfig = TINY) -> dict[str, torch.Tensor]:
    cfg = ExportConfig(model=model, base=ExportBaseConfig(uri=base_uri), output=ExportOutputConfig(uri=str(out)))
    export_video_checkpoint(cfg, model_uri)
    return torch.load(out, weights_only=True)


def test_the_export_has_exactly_the_bases_keys_and_shapes(base, fine_tuned, tmp_path) -> None:
    exported = export(fine_tuned[0], base[0], tmp_path / "video.pt")
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in base[1].items()}


def test_the_fine_tuned_detector_weights_arrive_unchanged(base, fine_tuned, tmp_path) -> None:
    exported = export(fine_tuned[0], base[0], tmp_path / "video.pt")
    assert all(torch.equal(exported[key], value) for key, value in fine_tuned[1].items())


def test_the_tracker_and_its_neck_come_from_the_base(base, fine_tuned, tmp_path) -> None:
    exported = export(fine_tuned[0], base[0], tmp_path / "video.pt")
    from_base = [k for k in base[1] if k.startswith(("tracker.", TRACKER_NECK_PREFIX))]
    assert from_base and all(torch.equal(exported[k], base[1][k]) for k in from_base)


def test_the_export_loads_strictly_into_sam3s_video_model(base, fine_tuned, tmp_path) -> None:
    exported = export(fine_tuned[0], base[0], tmp_path / "video.pt")
    model = build_video_model(TINY)
    model.load_state_dict(exported, strict=True)
    assert torch.equal(
        model.state_dict()["detector.transformer.decoder.query_embed.weight"],
        exported["detector.transformer.decoder.query_embed.weight"],
    )


def test_lora_adapters_are_merged_into_the_exported_detector(base, tmp_path) -> None:
    adapted = VideoClipDetector(build_detector(tiny(3)))
    lora = LoraConfig(rank=4, targets=["qkv", "linear1"])
    add_adapters(adapted.detector, lora)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_()
    uri = str(tmp_path / "lora.pt")
    save_checkpoint({"model": adapted.state_dict(), "lora": lora_settings(lora), "step": 1}, uri, step=1)
    exported = export(
        uri, base[0], tmp_path / "video.pt", ModelConfig(image_size=56, vit_pretrain_img_size=56, lora=lora)
    )
    merged = merged_state_dict(adapted)
    assert all(torch.equal(exported[key], value) for key, value in merged.items())


def test_a_checkpoint_in_sam3s_layout_gives_its_whole_detector_and_its_own_tracker(base, tmp_path) -> None:
    other = build_video_model(tiny(4)).state_dict()
    uri = str(tmp_path / "other_video.pt")
    save_checkpoint(other, uri, step=0)
    exported = export(uri, base[0], tmp_path / "video.pt")
    assert set(exported) == set(base[1])
    assert all(torch.equal(exported[k], other[k]) for k in other)
    assert not torch.equal(exported["tracker.maskmem_tpos_enc"], base[1]["tracker.maskmem_tpos_enc"])


def test_the_checkpoint_of_a_tracker_run_keeps_its_trained_tracker_and_neck(base, tmp_path) -> None:
    trained = build_video_model(
        tiny(5)
    ).state_dict()  # a train.stage=tracker best.pt: {"model": detector.* + tracker.*}
    uri = str(tmp_path / "tracker_best.pt")
    save_checkpoint({"model": trained, "step": 9}, uri, step=9)
    exported = export(uri, base[0], tmp_path / "video.pt")
    own = [k for k in trained if k.startswith(("tracker.", TRACKER_NECK_PREFIX))]
    assert own and all(torch.equal(exported[k], trained[k]) for k in own)
    build_video_model(TINY).load_state_dict(exported, strict=True)


def test_a_trained_tracker_of_another_architecture_is_refused_naming_the_tensor(base, fine_tuned, tmp_path) -> None:
    other = build_video_model(ModelConfig(image_size=56, vit_pretrain_img_size=56, init_seed=6)).state_dict()
    tracker = {k: v[..., :1] if k == "tracker.maskmem_tpos_enc" else v for k, v in other.items()}
    uri = str(tmp_path / "odd_tracker.pt")
    save_checkpoint(
        {"model": {**fine_tuned[1], **{k: v for k, v in tracker.items() if k.startswith("tracker.")}}}, uri, step=0
    )
    with pytest.raises(InputError, match=r"odd_tracker\.pt: tracker\.maskmem_tpos_enc: shape .* differs from the base"):
        export(uri, base[0], tmp_path / "video.pt")
    assert not (tmp_path / "video.pt").exists()


def test_a_base_without_a_tracker_is_refused_naming_it(fine_tuned, tmp_path) -> None:
    detector_only = str(tmp_path / "detector_only.pt")
    save_checkpoint({"model": fine_tuned[1]}, detector_only, step=0)
    with pytest.raises(InputError, match=r"detector_only\.pt: tracker: holds no tracker"):
        export(fine_tuned[0], detector_only, tmp_path / "video.pt")
    assert not (tmp_path / "video.pt").exists()


def test_a_detector_of_another_architecture_is_refused_naming_the_tensor(base, tmp_path) -> None:
    other = VideoClipDetector(build_detector(ModelConfig(image_size=56, vit_pretrain_img_size=56, d_model=32)))
    uri = str(tmp_path / "other.pt")
    save_checkpoint({"model": other.state_dict()}, uri, step=0)
    with pytest.raises(InputError, match=r"other\.pt: detector\.\S+: shape .* differs from the base"):
        export(uri, base[0], tmp_path / "video.pt")
    assert not (tmp_path / "video.pt").exists()


def test_a_detector_missing_weights_is_refused(base, fine_tuned, tmp_path) -> None:
    partial = {k: v for k, v in fine_tuned[1].items() if not k.startswith("detector.transformer.")}
    uri = str(tmp_path / "partial.pt")
    save_checkpoint({"model": partial}, uri, step=0)
    with pytest.raises(InputError, match=r"partial\.pt: detector\.transformer\.\S+: missing"):
        export(uri, base[0], tmp_path / "video.pt")
