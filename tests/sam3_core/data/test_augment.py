"""Geometric clip augmentation: one view moves frames, masks and boxes together; config is validated."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from sam3_core.data.augment import (
    AugmentConfig,
    View,
    augment_clip,
    identity_view,
    sample_view,
    warp_box,
    warp_frame,
    warp_mask,
    warp_object,
)
from sam3_core.data.clips import ClipConfig, ClipDataset
from sam3_core.data.datapoints import FrameObject
from sam3_core.data.synthetic import COLORS, SyntheticConfig, render_video
from sam3_core.data.ytvis import Category, Video, VideoDataset
from sam3_core.errors import ConfigError

SIZE = 64
RED = np.array(COLORS["red"])
GREY = 90


def frame_with_square(x: int, y: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """A grey frame with a red square whose top-left corner is (x, y); its mask."""
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[y : y + side, x : x + side] = True
    frame = np.full((SIZE, SIZE, 3), GREY, dtype=np.uint8)
    frame[mask] = RED
    return frame, mask


def square_object(mask: np.ndarray, track_id: int = 1) -> FrameObject:
    ys, xs = np.nonzero(mask)
    box = (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1))
    return FrameObject(track_id, 1, box, mask)


def test_the_identity_view_leaves_frame_mask_and_box_unchanged() -> None:
    frame, mask = frame_with_square(10, 20, 12)
    view = identity_view(SIZE, SIZE)
    assert np.array_equal(warp_frame(frame, view), frame)
    assert np.array_equal(warp_mask(mask, view), mask)
    warped = warp_object(square_object(mask), view, SIZE, SIZE, 0.25)
    assert warped is not None and warped.box_xywh == square_object(mask).box_xywh


def test_a_horizontal_flip_mirrors_frame_mask_and_box() -> None:
    frame, mask = frame_with_square(10, 20, 12)
    view = View(0.0, 0.0, SIZE, SIZE, hflip=True)
    assert np.array_equal(warp_frame(frame, view), frame[:, ::-1])
    warped = warp_object(square_object(mask), view, SIZE, SIZE, 0.25)
    assert warped is not None and np.array_equal(warped.mask, mask[:, ::-1])
    assert warped.box_xywh == (SIZE - 10 - 12, 20, 12, 12)


def test_a_vertical_flip_mirrors_the_box_top_to_bottom() -> None:
    _, mask = frame_with_square(10, 20, 12)
    warped = warp_object(square_object(mask), View(0.0, 0.0, SIZE, SIZE, vflip=True), SIZE, SIZE, 0.25)
    assert warped is not None and warped.box_xywh == (10, SIZE - 20 - 12, 12, 12)


def test_a_shifted_window_moves_the_object_the_other_way_by_whole_pixels() -> None:
    frame, mask = frame_with_square(20, 20, 12)
    view = View(8.0, -4.0, SIZE, SIZE)
    _, shifted_mask = frame_with_square(12, 24, 12)
    assert np.array_equal(warp_mask(mask, view), shifted_mask)
    inside = warp_frame(frame, view)[shifted_mask]
    assert np.array_equal(inside, np.broadcast_to(RED, inside.shape))
    warped = warp_object(square_object(mask), view, SIZE, SIZE, 0.25)
    assert warped is not None and warped.box_xywh == (12, 24, 12, 12)


def test_zooming_in_twice_about_the_centre_doubles_the_box() -> None:
    _, mask = frame_with_square(24, 24, 16)
    view = View(16.0, 16.0, SIZE / 2, SIZE / 2)
    warped = warp_object(square_object(mask), view, SIZE, SIZE, 0.25)
    assert warped is not None and warped.box_xywh == (16, 16, 32, 32)


def test_pixels_from_outside_the_frame_take_its_mean_colour() -> None:
    frame = np.full((SIZE, SIZE, 3), 77, dtype=np.uint8)
    zoomed_out = warp_frame(frame, View(-SIZE / 2, -SIZE / 2, 2 * SIZE, 2 * SIZE))
    assert np.array_equal(zoomed_out, frame)


@pytest.mark.parametrize("seed", range(6))
def test_random_views_keep_masks_on_the_object_pixels_and_boxes_tight_on_the_masks(seed: int) -> None:
    """The warped image, mask and box describe the same object: the whole point of one view per clip."""
    frame, mask = frame_with_square(18, 22, 20)
    cfg = AugmentConfig(enabled=True, scale_min=0.6, scale_max=1.8, shift=0.25, hflip_prob=0.5, vflip_prob=0.5)
    view = sample_view(cfg, np.random.default_rng(seed), SIZE, SIZE)
    warped_frame = warp_frame(frame, view)
    warped = warp_object(square_object(mask), view, SIZE, SIZE, min_visible=0.0)
    if warped is None:
        assert not warp_mask(mask, view).any()
        return
    assert warped.mask is not None
    red_pixels = np.all(np.abs(warped_frame.astype(int) - RED) < 20, axis=-1)
    # bilinear resampling blends the object's border with the background: compare away from it
    interior = (
        warped.mask
        & np.roll(warped.mask, 1, 0)
        & np.roll(warped.mask, -1, 0)
        & np.roll(warped.mask, 1, 1)
        & np.roll(warped.mask, -1, 1)
    )
    assert red_pixels[interior].all()
    assert not (red_pixels & ~warped.mask).any()
    x, y, w, h = warped.box_xywh
    ys, xs = np.nonzero(warped.mask)
    assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_an_object_pushed_out_of_view_is_dropped_and_a_mostly_visible_one_kept() -> None:
    _, left = frame_with_square(0, 20, 12)
    _, right = frame_with_square(40, 20, 12)
    view = View(16.0, 0.0, SIZE, SIZE)
    assert warp_object(square_object(left), view, SIZE, SIZE, 0.25) is None
    kept = warp_object(square_object(right), view, SIZE, SIZE, 0.25)
    assert kept is not None and kept.box_xywh == (24, 20, 12, 12)


def test_an_object_keeping_less_than_min_visible_of_its_pixels_is_dropped() -> None:
    _, mask = frame_with_square(0, 20, 20)
    view = View(15.0, 0.0, SIZE, SIZE)  # 5 of 20 columns stay in view: a quarter of the pixels
    assert warp_object(square_object(mask), view, SIZE, SIZE, min_visible=0.2) is not None
    assert warp_object(square_object(mask), view, SIZE, SIZE, min_visible=0.3) is None


def test_a_box_without_a_mask_is_moved_and_clipped_to_the_frame() -> None:
    obj = FrameObject(1, 1, (4.0, 10.0, 20.0, 10.0), None)
    warped = warp_object(obj, View(10.0, 0.0, SIZE, SIZE), SIZE, SIZE, 0.25)
    assert warped is not None and warped.box_xywh == (0.0, 10.0, 14.0, 10.0)
    assert list(warp_box(obj.box_xywh, View(0.0, 0.0, SIZE, SIZE, hflip=True), SIZE, SIZE)) == [40, 10, 60, 20]


def test_every_frame_of_a_clip_goes_through_the_same_view() -> None:
    rendered = render_video(SyntheticConfig(height=SIZE, width=SIZE, min_size=10, max_size=20), 0)
    frames = rendered.frames[:3]
    objects = [
        [square_object(o.visible_masks[t], k) for k, o in enumerate(rendered.objects) if o.visible_masks[t].any()]
        for t in range(3)
    ]
    cfg = AugmentConfig(enabled=True, scale_min=0.7, scale_max=1.5, shift=0.2, hflip_prob=0.5)
    warped_frames, warped_objects = augment_clip(frames, objects, cfg, np.random.default_rng(3))
    view = sample_view(cfg, np.random.default_rng(3), SIZE, SIZE)
    assert all(np.array_equal(w, warp_frame(f, view)) for w, f in zip(warped_frames, frames))
    for frame_objects, warped in zip(objects, warped_objects):
        expected = [warp_object(o, view, SIZE, SIZE, cfg.min_visible) for o in frame_objects]
        assert [o.box_xywh for o in warped] == [o.box_xywh for o in expected if o is not None]


def two_video_clips(train: bool, **augment: Any) -> ClipDataset:
    frame, mask = frame_with_square(20, 20, 12)
    from sam3_core.data.synthetic import track_from_masks

    videos = [Video(k, SIZE, SIZE, tuple(f"{k}/{t}.png" for t in range(4))) for k in (1, 2)]
    tracks = [track_from_masks(k, k, 1, [mask] * 4) for k in (1, 2)]
    dataset = VideoDataset(videos, tracks, [Category(1, "red square")])
    cfg = ClipConfig(frames_per_clip=2, augment=AugmentConfig(**augment))
    return ClipDataset(dataset, lambda name: frame, cfg, image_size=SIZE, seed=0, train=train)


def boxes_of(datapoint: Any) -> list[list[float]]:
    return [obj.bbox.tolist() for image in datapoint.images for obj in image.objects]


AUGMENT = {"enabled": True, "scale_min": 0.7, "scale_max": 1.4, "shift": 0.2, "hflip_prob": 0.5}


def test_training_clips_are_augmented_reproducibly_and_differently_per_epoch() -> None:
    first, second = two_video_clips(True, **AUGMENT), two_video_clips(True, **AUGMENT)
    plain = boxes_of(two_video_clips(True)[0])
    assert boxes_of(first[0]) == boxes_of(second[0]) != plain
    first.set_epoch(1)
    assert boxes_of(first[0]) != boxes_of(second[0])


def test_validation_clips_are_never_augmented() -> None:
    assert boxes_of(two_video_clips(False, **AUGMENT)[0]) == boxes_of(two_video_clips(False)[0])


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"scale_min": 0.0}, "scale_min"),
        ({"scale_min": 1.5, "scale_max": 1.2}, "scale_max"),
        ({"scale_max": 100.0}, "scale_max"),
        ({"scale_max": float("nan")}, "scale_max"),
        ({"shift": -0.1}, "shift"),
        ({"shift": 0.9}, "shift"),
        ({"hflip_prob": 1.5}, "hflip_prob"),
        ({"vflip_prob": -1.0}, "vflip_prob"),
        ({"min_visible": 1.0}, "min_visible"),
        ({"min_visible": float("inf")}, "min_visible"),
        ({"enabled": "yes"}, "enabled"),
    ],
)
def test_bad_augment_values_are_config_errors_naming_the_key(changes: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"data\.clips\.augment\.{key} must be "):
        dataclasses.replace(AugmentConfig(), **changes)
