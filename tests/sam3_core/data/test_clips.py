"""Clip sampling and conversion to sam3 datapoints: coverage, reproducibility, prompts, batch layout."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from sam3_core.data.clips import (
    ClipConfig,
    ClipDataset,
    clip_frame_indices,
    enumerate_clips,
)
from sam3_core.data.datapoints import NORM_MEAN, NORM_STD, collate_clips, resize_mask
from sam3_core.data.synthetic import track_from_masks
from sam3_core.data.ytvis import Category, Video, VideoDataset
from sam3_core.errors import ConfigError

SIZE = 32
IMAGE_SIZE = 28
CATEGORIES = [
    Category(i, name)
    for i, name in enumerate(["red circle", "blue square", "green triangle", "cyan circle", "white square"], 1)
]


def square(frame: int, offset: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[offset : offset + 8, frame : frame + 8] = True
    return mask


def video_dataset(lengths: list[int], categories_per_video: list[list[int]] | None = None) -> VideoDataset:
    """Videos of the given lengths; video k holds one moving square per category in categories_per_video[k]."""
    categories_per_video = categories_per_video or [[1]] * len(lengths)
    videos, tracks = [], []
    for k, (length, cats) in enumerate(zip(lengths, categories_per_video), 1):
        videos.append(Video(k, SIZE, SIZE, tuple(f"{k}/{t:05d}.png" for t in range(length))))
        for j, category in enumerate(cats):
            masks = [square(t, 4 * j) for t in range(length)]
            tracks.append(track_from_masks(len(tracks) + 1, k, category, masks))
    return VideoDataset(videos, tracks, CATEGORIES)


def frame_with_its_index(file_name: str) -> np.ndarray:
    """A frame whose pixels all equal 10 x its index in the video, so a datapoint shows which frames it holds."""
    index = int(file_name.rsplit("/", 1)[1].split(".")[0])
    return np.full((SIZE, SIZE, 3), 10 * index, dtype=np.uint8)


def frames_of(datapoint: Any) -> list[int]:
    pixels = [float(image.data[0].mean()) * NORM_STD[0] + NORM_MEAN[0] for image in datapoint.images]
    return [round(p * 255 / 10) for p in pixels]


def summary(datapoint: Any) -> tuple[list[int], list[str]]:
    """The frames (in order) and the prompt texts of a datapoint."""
    return frames_of(datapoint), [q.query_text for q in datapoint.find_queries]


def clips(dataset: VideoDataset, seed: int = 0, train: bool = True, **changes: Any) -> ClipDataset:
    cfg = dataclasses.replace(ClipConfig(frames_per_clip=3, stride_min=1, stride_max=3), **changes)
    return ClipDataset(dataset, frame_with_its_index, cfg, IMAGE_SIZE, seed=seed, train=train)


def prompts_of(datapoint: Any) -> list[str]:
    """Prompt texts of the first frame (every frame asks the same prompts)."""
    return [q.query_text for q in datapoint.find_queries if q.image_id == 0]


def test_enumerated_clips_cover_every_frame_of_every_video() -> None:
    dataset = video_dataset([1, 2, 3, 5, 7, 9])
    covered: dict[int, set[int]] = {v.id: set() for v in dataset.videos}
    for ref in enumerate_clips(dataset, frames_per_clip=3):
        length = dataset.video(ref.video_id).length
        covered[ref.video_id].update(clip_frame_indices(ref.start, length, 3, stride=1))
    assert covered == {v.id: set(range(v.length)) for v in dataset.videos}


@pytest.mark.parametrize("length", range(1, 11))
def test_clip_frame_indices_always_fit_the_video(length: int) -> None:
    for frames in range(1, 6):
        for stride in range(1, 5):
            for start in range(length):
                indices = clip_frame_indices(start, length, frames, stride)
                assert len(indices) == frames
                assert all(0 <= i < length for i in indices), (start, frames, stride, indices)


def test_clip_frame_indices_keep_the_stride_when_the_video_is_long_enough() -> None:
    assert clip_frame_indices(start=8, length=10, frames=3, stride=2) == [5, 7, 9]
    assert clip_frame_indices(start=0, length=10, frames=3, stride=4) == [0, 4, 8]


def test_an_item_is_identical_for_the_same_seed_epoch_and_index() -> None:
    dataset = video_dataset([8, 8], [[1], [2]])
    first, second = clips(dataset, seed=3), clips(dataset, seed=3)
    for ds in (first, second):
        ds.set_epoch(2)
    assert [summary(first[i]) for i in range(len(first))] == [summary(second[i]) for i in range(len(second))]


def test_items_differ_across_epochs() -> None:
    dataset = clips(video_dataset([8, 8], [[1], [2]]))
    by_epoch = []
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        by_epoch.append([summary(dataset[i]) for i in range(len(dataset))])
    assert by_epoch[0] != by_epoch[1]


def test_reverse_prob_one_presents_every_clip_backwards() -> None:
    dataset = clips(video_dataset([9, 5]), reverse_prob=1.0)
    for i in range(len(dataset)):
        frames = frames_of(dataset[i])
        assert frames == sorted(frames, reverse=True) and frames[0] > frames[-1]


def test_reverse_prob_zero_keeps_time_order() -> None:
    dataset = clips(video_dataset([9, 5]), reverse_prob=0.0)
    for i in range(len(dataset)):
        frames = frames_of(dataset[i])
        assert frames == sorted(frames) and frames[0] < frames[-1]


def test_evaluation_clips_are_consecutive_forward_frames() -> None:
    dataset = clips(video_dataset([9]), train=False, reverse_prob=1.0)
    assert [frames_of(dataset[i]) for i in range(len(dataset))] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_negative_prompts_are_categories_absent_from_the_clip() -> None:
    dataset = clips(video_dataset([6], [[1, 2]]), num_negatives=2)
    present = {"red circle", "blue square"}
    for epoch in range(3):
        dataset.set_epoch(epoch)
        prompts = prompts_of(dataset[0])
        assert prompts[:2] == ["red circle", "blue square"]
        assert len(prompts) == 4 and not set(prompts[2:]) & present


def test_negative_prompts_have_no_target_objects() -> None:
    datapoint = clips(video_dataset([6], [[1]]), num_negatives=1)[0]
    wanted = {q.query_text: len(q.object_ids_output) for q in datapoint.find_queries if q.image_id == 0}
    assert wanted["red circle"] == 1
    assert [n for text, n in wanted.items() if text != "red circle"] == [0]


def test_prompts_are_capped_by_max_prompts_positives_first() -> None:
    dataset = clips(video_dataset([6], [[1, 2, 3]]), num_negatives=2, max_prompts=2)
    assert prompts_of(dataset[0]) == ["red circle", "blue square"]


def test_every_prompt_is_asked_on_every_frame() -> None:
    datapoint = clips(video_dataset([6], [[1, 2]]), num_negatives=1)[0]
    per_frame = [[q.query_text for q in datapoint.find_queries if q.image_id == t] for t in range(3)]
    assert per_frame[0] == per_frame[1] == per_frame[2] and len(per_frame[0]) == 3


def test_collate_gives_one_find_stage_per_frame_and_batch_times_frames_images() -> None:
    dataset = clips(video_dataset([6, 6], [[1], [2]]), frames_per_clip=3)
    batch = collate_clips([dataset[0], dataset[2]])
    assert len(batch.find_inputs) == 3
    assert len(batch.find_targets) == 3
    assert tuple(batch.img_batch.shape) == (2 * 3, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_bad_clip_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="stride_min"):
        clips(video_dataset([6]), stride_min=3, stride_max=2)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"frames_per_clip": 0}, "frames_per_clip"),
        ({"frames_per_clip": 2.5}, "frames_per_clip"),
        ({"stride_min": 0}, "stride_min"),
        ({"stride_min": 3, "stride_max": 2}, "stride_max"),
        ({"reverse_prob": 1.5}, "reverse_prob"),
        ({"reverse_prob": float("nan")}, "reverse_prob"),
        ({"num_negatives": -1}, "num_negatives"),
        ({"max_prompts": 0}, "max_prompts"),
        ({"with_masks": "no"}, "with_masks"),
    ],
)
def test_bad_clip_values_are_config_errors_naming_the_key(changes: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"data\.clips\.{key} must be "):
        dataclasses.replace(ClipConfig(), **changes)


def test_clips_longer_than_every_video_are_a_config_error_naming_the_longest() -> None:
    with pytest.raises(
        ConfigError, match=r"data\.clips\.frames_per_clip=9 .* the longest has 7 frames\); use at most 7"
    ):
        clips(video_dataset([5, 7]), frames_per_clip=9)


def test_clips_longer_than_some_videos_repeat_those_videos_last_frame() -> None:
    dataset = clips(video_dataset([2, 6]), frames_per_clip=4, stride_max=1, reverse_prob=0.0)
    assert frames_of(dataset[0]) == [0, 1, 1, 1]


@pytest.mark.parametrize(("source", "target"), [(128, 112), (160, 112), (100, 112), (96, 56)])
def test_resized_target_masks_stay_centred_on_their_boxes(source: int, target: int) -> None:
    """torch's "nearest" moved masks ~0.45 output pixels against the image and box; they must not move.

    One mask's edges round to whole output pixels either way, so the test averages the signed
    offset of the mask's centre from its box's centre over 64 boxes at different sub-pixel phases:
    unbiased resizing leaves only rounding ties (measured <= 0.07 px for these ratios).
    """
    height, width = source // 5, source // 3
    offsets = []
    for start in range(64):
        x, y = start % (source - width), start % (source - height)
        mask = np.zeros((source, source), dtype=bool)
        mask[y : y + height, x : x + width] = True
        ys, xs = np.nonzero(resize_mask(mask, target).numpy())
        centre = np.array([(xs.mean() + 0.5) / target, (ys.mean() + 0.5) / target])
        expected = np.array([x + width / 2, y + height / 2]) / source
        offsets.append((centre - expected) * target)
    assert np.abs(np.mean(offsets, axis=0)).max() < 0.15  # output pixels
