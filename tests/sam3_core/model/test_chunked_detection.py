"""Video detection: prompt batches give the outputs of one batch; frames spread over ranks give the
single-process results, gathered only to the rank that owns the video."""

from __future__ import annotations

import os
import pickle
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
    detection_bytes,
    frame_detector,
    suppress_duplicates,
)
from sam3_core.model.config import ModelConfig
from sam3_core.model.video_detector import VideoClipDetector
from sam3_core.predict.postprocess import PostprocessConfig, batched_frame_detections
from tests.fixtures.network import free_port

NUM_FRAMES = 5  # not a multiple of 2 or 3: the last chunk is partial
PROMPTS = ["red circle", "blue square", "green ring", "yellow star", "white cross"]
MODEL = ModelConfig(image_size=56, vit_pretrain_img_size=56, num_queries=8)


def _frames() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, size=(40, 48, 3), dtype=np.uint8) for _ in range(NUM_FRAMES)]


def _detect(prompt_batch: int = 0):
    model = VideoClipDetector(build_detector(MODEL)).eval()
    frames = _frames()
    return frame_detector(
        model,
        PROMPTS,
        lambda f: frame_to_tensor(frames[f], MODEL.image_size),
        DetectionConfig(prompt_batch=prompt_batch),
    )


def _video_results(reverse: bool, owner: int | None) -> list[tuple[int, dict]]:
    """(frame, kept detections as a dict) in the order `run` yields them on this rank."""
    detect = _detect(prompt_batch=2)

    def detections(frame: int) -> dict:
        found = batched_frame_detections(detect(frame), list(range(len(PROMPTS))), frame, (40, 48), PostprocessConfig())
        return vars(found)

    return list(ChunkedVideoDetector(detections, reverse=reverse).run(NUM_FRAMES, owner=owner))


def _worker(rank: int, world: int, port: int, reverse: bool, owner: int | None, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        (Path(out_dir) / f"rank{rank}.pkl").write_bytes(pickle.dumps(_video_results(reverse, owner)))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single_process(torch_single_thread) -> dict[bool, list[tuple[int, dict]]]:
    """One thread, like each rank (a reduction split over other thread counts rounds differently)."""
    return {reverse: _video_results(reverse, owner=None) for reverse in (False, True)}


def test_prompt_batches_give_the_outputs_of_all_prompts_at_once(torch_single_thread) -> None:
    whole = list(_detect(prompt_batch=0)(1))
    batched = list(_detect(prompt_batch=2)(1))
    assert [out["pred_logits"].shape[0] for out in batched] == [2, 2, 1]
    assert len(whole) == 1
    for key, expected in whole[0].items():
        torch.testing.assert_close(torch.cat([out[key] for out in batched]), expected, rtol=0, atol=1e-5)


def test_reverse_order_visits_frames_backwards_with_the_same_results(single_process) -> None:
    forward, backward = single_process[False], single_process[True]
    assert [frame for frame, _ in backward] == list(range(NUM_FRAMES - 1, -1, -1))
    assert dict(backward) == dict(forward)


@pytest.mark.integration
@pytest.mark.parametrize(("world", "reverse", "owner"), [(2, False, None), (2, True, 1), (3, False, 2)])
def test_ranks_give_the_single_process_results_and_only_the_owner_receives_them(
    tmp_path: Path, single_process, world: int, reverse: bool, owner: int | None
) -> None:
    mp.spawn(_worker, args=(world, free_port(), reverse, owner, str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        results = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        if owner is not None and rank != owner:
            assert results == []
            continue
        assert [frame for frame, _ in results] == [frame for frame, _ in single_process[reverse]]
        for (_, got), (_, expected) in zip(results, single_process[reverse]):
            assert got["category_ids"] == expected["category_ids"] and got["rles"] == expected["rles"]
            np.testing.assert_allclose(got["scores"], expected["scores"], rtol=0, atol=1e-6)


def test_each_frame_is_processed_once_by_a_single_process() -> None:
    calls: list[int] = []
    results = list(ChunkedVideoDetector(lambda frame: calls.append(frame) or frame * 10).run(6))
    assert calls == list(range(6))
    assert results == [(frame, frame * 10) for frame in range(6)]


def test_mask_nms_lowers_the_logit_of_a_duplicate_detection() -> None:
    mask = torch.zeros(8, 8)
    mask[2:6, 2:6] = 10.0
    out = {
        "pred_logits": torch.tensor([[[3.0], [2.0], [1.0]]]),
        "pred_boxes": torch.zeros(1, 3, 4),
        "pred_masks": torch.stack([mask, mask, -mask])[None],
    }
    suppress_duplicates(out, prob_threshold=0.5, iou_threshold=0.5)
    logits = out["pred_logits"][0, :, 0]
    assert logits[0] == 3.0  # the best of the duplicates is kept
    assert logits[1] < -1e3  # its duplicate is suppressed


def test_detection_memory_grows_with_the_prompt_batch_not_with_the_vocabulary() -> None:
    big = ModelConfig(image_size=1008, vit_pretrain_img_size=1008)
    assert detection_bytes(100_000, big, prompt_batch=16) < detection_bytes(100_000, big, prompt_batch=0) / 100
    assert detection_bytes(16, big, prompt_batch=16) == detection_bytes(16, big, prompt_batch=0)


@pytest.mark.parametrize("field", ["prompt_batch", "amp"])
def test_invalid_detection_settings_are_config_errors(field: str) -> None:
    from sam3_core.errors import ConfigError

    with pytest.raises(ConfigError, match=f"detection.{field}"):
        DetectionConfig(**{field: -1 if field == "prompt_batch" else "fp16"})
