"""Clips for the tracker: objects keep their identity across frames, prompts follow SAM2's training draws."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from sam3_core.data.datapoints import resize_mask
from sam3_core.data.frames import FrameReader
from sam3_core.data.prep import DataPrepConfig, prepare_dataset
from sam3_core.data.sources.vos import VosConfig
from sam3_core.data.synthetic import SyntheticConfig, track_from_masks
from sam3_core.data.tracker_clips import (
    BOX_BOTTOM_RIGHT,
    BOX_TOP_LEFT,
    NEGATIVE,
    POSITIVE,
    TrackerClipConfig,
    TrackerClipDataset,
    clip_starts,
    collate_tracker_clips,
    noisy_box,
    point_in_mask,
)
from sam3_core.data.ytvis import Category, Video, VideoDataset, rle_to_mask
from sam3_core.errors import ConfigError
from tests.fixtures.vos import davis_folder

SIZE = 32
IMAGE_SIZE = 28


def square(x: int, y: int, side: int = 8) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[y : y + side, x : x + side] = True
    return mask


def two_object_video(length: int = 10, hidden: tuple[int, ...] = (2, 3)) -> VideoDataset:
    """Video 1: object 1 moves right every frame; object 2 is hidden on the `hidden` frames; object 3 enters at 5."""
    video = Video(1, SIZE, SIZE, tuple(f"1/{t:05d}.png" for t in range(length)))
    first = [square(t, 2) for t in range(length)]
    second = [None if t in hidden else square(20, 20 - t) for t in range(length)]
    third = [square(2, 20) if t >= 5 else None for t in range(length)]
    tracks = [
        track_from_masks(1, 1, 1, first),
        track_from_masks(2, 1, 1, [m if m is not None else np.zeros((SIZE, SIZE), bool) for m in second]),
        track_from_masks(3, 1, 1, [m if m is not None else np.zeros((SIZE, SIZE), bool) for m in third]),
    ]
    return VideoDataset([video], tracks, [Category(1, "object")])


def frame_with_its_index(file_name: str) -> np.ndarray:
    index = int(file_name.rsplit("/", 1)[1].split(".")[0])
    return np.full((SIZE, SIZE, 3), 10 * index, dtype=np.uint8)


def clips(dataset: VideoDataset, train: bool = True, **changes: object) -> TrackerClipDataset:
    cfg = dataclasses.replace(TrackerClipConfig(frames_per_clip=4), **changes)
    return TrackerClipDataset(dataset, frame_with_its_index, cfg, IMAGE_SIZE, seed=0, train=train)


def test_every_object_keeps_its_own_mask_on_every_frame_of_the_clip() -> None:
    dataset = two_object_video()
    clip = clips(dataset, train=False)[0]
    assert clip.frames == [0, 1, 2, 3] and clip.track_ids == [1, 2]
    tracks = {t.id: t for t in dataset.tracks}
    for t, frame in enumerate(clip.frames):
        for k, track_id in enumerate(clip.track_ids):
            rle = tracks[track_id].segmentations[frame]
            expected = resize_mask(rle_to_mask(rle), IMAGE_SIZE) if rle is not None else torch.zeros(28, 28, dtype=bool)
            assert torch.equal(clip.masks[t, k], expected), (t, track_id)
    assert not clip.masks[2, 1].any()  # object 2 is hidden on frame 2


def test_clips_start_where_an_object_is_visible_and_take_only_the_objects_visible_there() -> None:
    dataset = two_object_video(length=12)
    starts = clip_starts(dataset, 4)
    assert [s.start for s in starts] == [0, 4, 8]
    later = clips(dataset, train=False)[2]
    assert later.frames == [8, 9, 10, 11] and later.track_ids == [1, 2, 3]


def test_a_video_without_any_visible_object_gives_no_clip_and_an_empty_split_is_refused() -> None:
    video = Video(1, SIZE, SIZE, tuple(f"1/{t:05d}.png" for t in range(4)))
    empty = VideoDataset([video], [], [Category(1, "object")])
    with pytest.raises(ConfigError, match="no frame of the dataset split shows an object"):
        clips(empty)


def test_a_training_clip_draws_at_most_max_objects_among_those_visible() -> None:
    data = clips(two_object_video(length=12), max_objects=2)
    seen = set()
    for epoch in range(12):
        data.set_epoch(epoch)
        seen.add(tuple(data[2].track_ids))
    assert all(len(ids) == 2 and set(ids) <= {1, 2, 3} for ids in seen)
    assert len(seen) > 1


def test_a_clip_is_the_same_for_the_same_seed_epoch_and_index_and_changes_with_the_epoch() -> None:
    dataset = two_object_video()
    one, two = clips(dataset, point_prob=1.0), clips(dataset, point_prob=1.0)
    a, b = one[1], two[1]
    assert a.frames == b.frames and a.cond_frames == b.cond_frames and a.seed == b.seed
    assert all(torch.equal(p.coords, q.coords) for p, q in zip(a.prompts, b.prompts))
    seeds = set()
    for epoch in range(4):
        one.set_epoch(epoch)
        seeds.add(one[1].seed)
    assert len(seeds) == 4


def test_mask_prompts_get_no_corrective_clicks() -> None:
    clip = clips(two_object_video(), point_prob=0.0)[0]
    assert all(p is None for p in clip.prompts) and clip.correct_frames == []
    assert clip.cond_frames[0] == 0 and 1 <= len(clip.cond_frames) <= 2


def test_point_prompts_fall_inside_their_objects_mask_and_the_first_frame_is_always_conditioning() -> None:
    data = clips(two_object_video(), point_prob=1.0, box_prob=0.0)
    for epoch in range(6):
        data.set_epoch(epoch)
        clip = data[0]
        assert clip.cond_frames[0] == 0
        for t, prompt in zip(clip.cond_frames, clip.prompts):
            for k in range(len(clip.track_ids)):
                (x, y), label = prompt.coords[k, 0].tolist(), int(prompt.labels[k, 0])
                if clip.masks[t, k].any():
                    assert label == POSITIVE and clip.masks[t, k, int(y), int(x)]
                else:
                    assert label == NEGATIVE


def test_corrected_frames_are_the_conditioning_frames_plus_drawn_ones_up_to_the_maximum() -> None:
    data = clips(two_object_video(), point_prob=1.0, max_cond_frames=1, max_correct_frames=2, correction_points=7)
    counts = set()
    for epoch in range(12):
        data.set_epoch(epoch)
        clip = data[0]
        assert clip.correct_frames[: len(clip.cond_frames)] == clip.cond_frames
        assert len(set(clip.correct_frames)) == len(clip.correct_frames) <= 2
        assert clip.gt_clicks.shape == (len(clip.correct_frames), 7)
        counts.add(len(clip.correct_frames))
    assert counts == {1, 2}


def test_a_noisy_box_stays_near_the_tight_box_and_inside_the_frame() -> None:
    mask = torch.from_numpy(square(10, 4, side=10))
    rng = np.random.default_rng(0)
    for _ in range(20):
        (x0, y0), (x1, y1) = noisy_box(mask, rng)
        assert abs(x0 - 10) <= 0.9 + 1e-6 and abs(y0 - 4) <= 0.9 + 1e-6
        assert abs(x1 - 19) <= 0.9 + 1e-6 and abs(y1 - 13) <= 0.9 + 1e-6
    assert noisy_box(torch.zeros(8, 8, dtype=torch.bool), rng) == [(0.0, 0.0), (0.0, 0.0)]


def test_box_prompts_carry_sams_corner_labels() -> None:
    clip = clips(two_object_video(), point_prob=1.0, box_prob=1.0)[0]
    assert clip.prompts[0].labels.tolist() == [[BOX_TOP_LEFT, BOX_BOTTOM_RIGHT]] * 2


def test_a_point_from_an_empty_mask_is_a_negative_click() -> None:
    _, label = point_in_mask(torch.zeros(8, 8, dtype=torch.bool), np.random.default_rng(0))
    assert label == NEGATIVE


def test_validation_clips_are_forwards_at_stride_one_prompted_by_first_frame_masks_only() -> None:
    data = clips(two_object_video(), train=False, stride_min=2, stride_max=2, reverse_prob=1.0, point_prob=1.0)
    clip = data[0]
    assert clip.frames == [0, 1, 2, 3] and clip.cond_frames == [0] and clip.prompts == [None]
    assert clip.correct_frames == []


def test_training_clips_may_run_backwards_starting_on_a_frame_with_objects() -> None:
    clip = clips(two_object_video(), reverse_prob=1.0)[0]
    assert clip.frames == [3, 2, 1, 0] and clip.track_ids == [1]  # object 2 is hidden on frame 3


def test_a_batch_stacks_the_clips_frames_for_one_backbone_pass() -> None:
    data = clips(two_object_video(length=8))
    batch = collate_tracker_clips([data[0], data[1]])
    assert batch.images.shape == (8, 3, IMAGE_SIZE, IMAGE_SIZE) and len(batch.clips) == 2


@pytest.mark.parametrize("source", ["synthetic", "davis"])
def test_the_tracker_clips_read_published_datasets_of_any_source(source: str, tmp_path: Path) -> None:
    if source == "davis":
        root = davis_folder(tmp_path / "DAVIS", {"2017/train": ["bear", "car", "dog"]})
        cfg = DataPrepConfig(source="davis", vos=VosConfig(root=str(root), image_sets=["2017/train"]))
    else:
        synth = SyntheticConfig(num_videos=2, frames_per_video=4, height=32, width=32, min_size=8, max_size=12)
        cfg = DataPrepConfig(source="synthetic", synthetic=synth)
    prepared = prepare_dataset(dataclasses.replace(cfg, store=str(tmp_path / "store"), val_fraction=0.0, workers=1))
    reader = FrameReader(prepared.uri)
    dataset = reader.dataset("train")
    data = TrackerClipDataset(
        dataset, lambda name: np.array(reader.image(name)), TrackerClipConfig(frames_per_clip=2), 28, seed=0
    )
    clip = data[0]
    assert clip.images.shape == (2, 3, 28, 28) and clip.masks.shape[:2] == (2, len(clip.track_ids))
    assert clip.masks[0].flatten(1).any(dim=1).all()
