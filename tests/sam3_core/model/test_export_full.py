"""The export at full size, loaded by sam3's own builders: the official weights are not downloadable here,
so both sources have random weights.

A checkpoint of our full preset (the fine-tuned detector, in our training layout) and a random
SAM3 video model from sam3's own `build_sam3_video_model` (the base, as sam3.pt would be) are
exported; `build_sam3_video_model(checkpoint_path=..., load_from_HF=False)` loads the result
strictly and `build_sam3_image_model` without a missing key, both with the fine-tuned detector's
weights and the base's tracker unchanged. Every file is bf16 (halving 3.4 GB files; sam3's
loader upcasts exactly). Each full model takes seconds and ~4 GB on a CPU: one test.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import pytest
import torch

from sam3_core.config import load_config
from sam3_core.model import cpu_compat
from sam3_core.model.build import bpe_vocab_path, build_detector
from sam3_core.model.checkpoint import save_checkpoint
from sam3_core.model.export import ExportBaseConfig, ExportConfig, ExportOutputConfig, export_video_checkpoint
from sam3_core.model.tracker import TRACKER_NECK_PREFIX
from sam3_core.model.video_detector import VideoClipDetector
from sam3_core.predict.predictor import PredictConfig


def bf16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}


@contextlib.contextmanager
def weights_left_uninitialised() -> Iterator[None]:
    """sam3's builders initialise every weight and then load the checkpoint over it: builds that load skip
    the initialisation (torch.nn.init's in-place functions). A weight the checkpoint left unset keeps whatever
    memory held, and fails the comparisons below."""
    with pytest.MonkeyPatch.context() as patch:
        for name in dir(torch.nn.init):
            if name.endswith("_") and not name.startswith("_"):
                patch.setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield


def equal_to(loaded: dict[str, torch.Tensor], source: dict[str, torch.Tensor], keys: list[str]) -> bool:
    return all(torch.equal(loaded[k], source[k].to(loaded[k].dtype)) for k in keys)


@pytest.mark.integration
@pytest.mark.timeout(3600)
def test_a_full_export_loads_strictly_into_sam3s_video_model_and_into_its_image_model(
    tmp_path, torch_single_thread, capsys
) -> None:
    from sam3.model_builder import build_sam3_image_model, build_sam3_video_model

    full = load_config("predict", PredictConfig, ["model=full", "data.uri=unused"]).model
    fine_tuned_uri, base_uri, out = (str(tmp_path / name) for name in ("best.pt", "sam3.pt", "video.pt"))

    ours = VideoClipDetector(build_detector(full))
    save_checkpoint({"model": bf16(ours.state_dict()), "step": 100}, fine_tuned_uri, step=100)
    del ours
    gc.collect()
    with cpu_compat.cuda_calls_on_cpu():
        stock = build_sam3_video_model(load_from_HF=False, bpe_path=bpe_vocab_path(), device="cpu")
    save_checkpoint(bf16(stock.state_dict()), base_uri, step=0)
    del stock
    gc.collect()

    cfg = ExportConfig(model=full, base=ExportBaseConfig(uri=base_uri), output=ExportOutputConfig(uri=out))
    export_video_checkpoint(cfg, fine_tuned_uri)
    fine_tuned = torch.load(fine_tuned_uri, weights_only=True, mmap=True)["model"]
    base = torch.load(base_uri, weights_only=True, mmap=True)
    tracker_keys = [k for k in base if k.startswith(("tracker.", TRACKER_NECK_PREFIX))]

    with cpu_compat.cuda_calls_on_cpu(), weights_left_uninitialised():
        video = build_sam3_video_model(checkpoint_path=out, load_from_HF=False, bpe_path=bpe_vocab_path(), device="cpu")
    assert "Missing keys" not in capsys.readouterr().out  # strict loading raises on any; sam3 prints none
    loaded = video.state_dict()
    assert equal_to(loaded, fine_tuned, list(fine_tuned))
    assert equal_to(loaded, base, tracker_keys)
    del video, loaded
    gc.collect()

    with cpu_compat.cuda_calls_on_cpu(), weights_left_uninitialised():
        image = build_sam3_image_model(checkpoint_path=out, load_from_HF=False, bpe_path=bpe_vocab_path(), device="cpu")
    assert "missing" not in capsys.readouterr().out
    loaded = {f"detector.{k}": v for k, v in image.state_dict().items()}
    assert equal_to(loaded, fine_tuned, list(fine_tuned))
