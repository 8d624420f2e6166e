"""Chunked multi-process video detection: same outputs on 1 and 2 ranks, any direction, bounded memory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sam3_core.data.datapoints import frame_to_tensor
from sam3_core.model.build import build_detector
from sam3_core.model.chunked_detection import (
    ChunkedVideoDetector,
    DetectionConfig,
    frame_detector,
)
from sam3_core.model.config import ModelConfig
from sam3_core.model.video_detector import VideoClipDetector
from tests.fixtures.network import free_port

NUM_FRAMES = 5  # not a multiple of 2: the last chunk is partial
PROMPTS = ["red circle", "blue square"]
MODEL = ModelConfig(image_size=56, vit_pretrain_img_size=56, num_queries=8)


def _frames() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8) for _ in range(NUM_FRAMES)]


def _run_video(reverse: bool, nms: bool = False) -> dict[int, dict[str, torch.Tensor]]:
    model = VideoClipDetector(build_detector(MODEL)).eval()
    frames = _frames()
    detect = frame_detector(model, PROMPTS, lambda f: frame_to_tensor(frames[f], MODEL.image_size))
    detector = ChunkedVideoDetector(detect, DetectionConfig(reverse=reverse, nms=nms))
    return {frame: {k: v.clone() for k, v in out.items()} for frame, out in detector.run(NUM_FRAMES)}


def _worker(rank: int, world: int, port: int, reverse: bool, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_run_video(reverse), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single_process_outputs(torch_single_thread) -> dict[int, dict[str, torch.Tensor]]:
    """One thread, like each rank: a reduction split over another thread count sums in another
    order, and float32 results then differ by a few ulps (1.2e-6 seen), so the comparison below
    is only exact-to-rounding when both sides run the same kernels on one thread."""
    return _run_video(reverse=False)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.integration
def test_two_ranks_give_every_rank_the_single_process_outputs(tmp_path, single_process_outputs, reverse):
    mp.spawn(_worker, args=(2, free_port(), reverse, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        outputs = torch.load(tmp_path / f"rank{rank}.pt")
        assert sorted(outputs) == list(range(NUM_FRAMES))
        for frame in range(NUM_FRAMES):
            for key, expected in single_process_outputs[frame].items():
                torch.testing.assert_close(outputs[frame][key], expected, rtol=0, atol=1e-6)


def test_reverse_order_visits_frames_backwards_with_the_same_outputs(single_process_outputs):
    model = VideoClipDetector(build_detector(MODEL)).eval()
    frames = _frames()
    detect = frame_detector(model, PROMPTS, lambda f: frame_to_tensor(frames[f], MODEL.image_size))
    visited = []
    for frame, out in ChunkedVideoDetector(detect, DetectionConfig(reverse=True)).run(NUM_FRAMES):
        visited.append(frame)
        torch.testing.assert_close(out["pred_boxes"], single_process_outputs[frame]["pred_boxes"], rtol=0, atol=0)
    assert visited == list(range(NUM_FRAMES - 1, -1, -1))


def test_buffer_holds_at_most_the_current_and_next_chunk():
    calls = []

    def detect(frame: int) -> dict[str, torch.Tensor]:
        calls.append(frame)
        return {"pred_logits": torch.full((1, 2, 1), float(frame)), "pred_boxes": torch.zeros(1, 2, 4)}

    detector = ChunkedVideoDetector(detect, DetectionConfig())
    for frame, out in detector.run(6):
        assert float(out["pred_logits"][0, 0, 0]) == frame
        assert len(detector.buffered_frames) <= 2 * detector.world_size
    assert calls == list(range(6))  # each frame computed once, one chunk ahead


def test_mask_nms_lowers_the_logit_of_a_duplicate_detection():
    mask = torch.zeros(8, 8)
    mask[2:6, 2:6] = 10.0

    def detect(frame: int) -> dict[str, torch.Tensor]:
        return {
            "pred_logits": torch.tensor([[[3.0], [2.0], [1.0]]]),
            "pred_boxes": torch.zeros(1, 3, 4),
            "pred_masks": torch.stack([mask, mask, -mask])[None],
        }

    cfg = DetectionConfig(nms=True, nms_prob_threshold=0.5, nms_iou_threshold=0.5)
    ((_, out),) = ChunkedVideoDetector(detect, cfg).run(1)
    logits = out["pred_logits"][0, :, 0]
    assert logits[0] == 3.0  # the best of the duplicates is kept
    assert logits[1] < -1e3  # its duplicate is suppressed
