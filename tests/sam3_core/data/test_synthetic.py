"""The synthetic video generator: moving, bouncing, occluding shapes with exact annotations."""

from __future__ import annotations

import dataclasses
import json
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sam3_core.data.synthetic import (
    COLORS,
    SyntheticConfig,
    check_config,
    composite,
    generate,
    render_video,
    shape_mask,
    track_from_masks,
    video_memory_bytes,
)
from sam3_core.data.ytvis import load_video_dataset, rle_bbox, rle_to_mask
from sam3_core.errors import ConfigError

TINY = SyntheticConfig(num_videos=3, frames_per_video=4, height=48, width=48, min_size=10, max_size=20)


def tiny(**changes: Any) -> SyntheticConfig:
    return dataclasses.replace(TINY, **changes)


# A crowded clip where seed 0 gives both a partly covered object and one fully hidden in a frame.
CROWDED = tiny(
    num_videos=1,
    frames_per_video=6,
    min_objects=5,
    max_objects=5,
    min_size=12,
    max_size=24,
    noise=0.0,
    seed=0,
    max_speed=4.0,
)


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def test_generation_is_byte_identical_for_the_same_seed(tmp_path: Path) -> None:
    first, second = generate(tiny(), tmp_path / "a"), generate(tiny(), tmp_path / "b")
    files = sorted(p.relative_to(first.parent) for p in first.parent.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second.parent) for p in second.parent.rglob("*") if p.is_file())
    for rel in files:
        assert (first.parent / rel).read_bytes() == (second.parent / rel).read_bytes(), rel


def test_a_different_seed_gives_different_videos(tmp_path: Path) -> None:
    first, second = generate(tiny(seed=1), tmp_path / "a"), generate(tiny(seed=2), tmp_path / "b")
    assert first.read_bytes() != second.read_bytes()


def test_every_object_moves_between_consecutive_frames() -> None:
    video = render_video(tiny(max_speed=3.0), 0)
    for obj in video.objects:
        centres = [centroid(m) for m in obj.full_masks]
        assert all(a != b for a, b in pairwise(centres))


def test_objects_bounce_off_the_edges_instead_of_leaving_the_frame() -> None:
    # 40 frames at >= 4.5 px/frame cross a 48 px frame several times, so every square hits an edge.
    cfg = tiny(frames_per_video=40, max_speed=9.0, min_size=12, max_size=12, categories=["red square"])
    for index in range(cfg.num_videos):
        for obj in render_video(cfg, index).objects:
            for mask in obj.full_masks:
                rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
                assert len(rows) >= 12 and len(cols) >= 12, "a square cut by the border would be narrower"


def test_composite_cuts_the_covered_part_from_a_lower_mask() -> None:
    lower = shape_mask("square", 10, 10, 10, 24, 24)
    upper = shape_mask("square", 14, 14, 10, 24, 24)
    image, (seen_lower, seen_upper) = composite(np.zeros((24, 24, 3)), [(lower, (255, 0, 0)), (upper, (0, 0, 255))])
    assert np.array_equal(seen_upper, upper)
    assert np.array_equal(seen_lower, lower & ~upper)
    assert 0 < seen_lower.sum() < lower.sum()
    assert (image[lower & upper] == (0, 0, 255)).all()


def test_composite_leaves_a_fully_covered_object_with_an_empty_mask() -> None:
    small = shape_mask("circle", 12, 12, 6, 24, 24)
    big = shape_mask("square", 12, 12, 16, 24, 24)
    _, (seen_small, _) = composite(np.zeros((24, 24, 3)), [(small, (255, 0, 0)), (big, (0, 255, 0))])
    assert not seen_small.any()


def test_a_frame_with_an_empty_visible_mask_is_null_in_the_track() -> None:
    visible = shape_mask("square", 8, 8, 6, 16, 16)
    track = track_from_masks(1, 1, 1, [visible, np.zeros((16, 16), dtype=bool)])
    assert track.segmentations[1] is None and track.bboxes[1] is None and track.areas[1] is None
    assert track.areas[0] == visible.sum()


def test_generated_annotations_show_cut_and_hidden_objects(tmp_path: Path) -> None:
    rendered = render_video(CROWDED, 0)
    dataset = load_video_dataset(str(generate(CROWDED, tmp_path)))
    cut = hidden = 0
    for obj, track in zip(rendered.objects, dataset.tracks_of(1), strict=True):
        for full, seen, rle in zip(obj.full_masks, obj.visible_masks, track.segmentations, strict=True):
            if seen.any() and not np.array_equal(seen, full):
                cut += 1
                assert np.array_equal(rle_to_mask(rle), seen)
            if full.any() and not seen.any():
                hidden += 1
                assert rle is None
    assert cut > 0 and hidden > 0


def test_masks_boxes_and_pixels_agree(tmp_path: Path) -> None:
    cfg = tiny(noise=0.0, min_objects=2, max_objects=3)
    path = generate(cfg, tmp_path)
    dataset = load_video_dataset(str(path))
    colors = {c.id: COLORS[c.name.split()[0]] for c in dataset.categories}
    for track in dataset.tracks:
        video = dataset.video(track.video_id)
        for name, rle, box, area in zip(video.file_names, track.segmentations, track.bboxes, track.areas):
            if rle is None:
                continue
            mask = rle_to_mask(rle)
            pixels = np.asarray(Image.open(tmp_path / name))[mask]
            assert (pixels == colors[track.category_id]).all()
            assert box == rle_bbox(rle)
            assert area == mask.sum()


def test_annotation_file_uses_the_category_names_as_prompts(tmp_path: Path) -> None:
    raw = json.loads(generate(tiny(categories=["cyan triangle", "orange circle"]), tmp_path).read_text())
    assert raw["categories"] == [{"id": 1, "name": "cyan triangle"}, {"id": 2, "name": "orange circle"}]


def test_with_distinct_categories_no_two_objects_of_a_video_share_a_category() -> None:
    cfg = tiny(num_videos=20, min_objects=4, max_objects=4, distinct_categories=True)
    for index in range(cfg.num_videos):
        categories = [obj.category_id for obj in render_video(cfg, index).objects]
        assert sorted(categories) == [1, 2, 3, 4]


def test_without_distinct_categories_objects_of_a_video_may_share_one() -> None:
    cfg = tiny(num_videos=20, min_objects=4, max_objects=4)
    shared = [len({obj.category_id for obj in render_video(cfg, i).objects}) < 4 for i in range(cfg.num_videos)]
    assert any(shared)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"max_size": 64}, "synthetic.max_size"),
        ({"min_objects": 3, "max_objects": 2}, "synthetic.max_objects"),
        ({"categories": ["purple circle"]}, "synthetic.categories"),
        ({"categories": ["red hexagon"]}, "synthetic.categories"),
        ({"max_objects": 5, "distinct_categories": True}, "synthetic.max_objects"),
        ({"num_videos": 0}, "synthetic.num_videos"),
    ],
)
def test_impossible_settings_are_rejected(tmp_path: Path, changes: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        generate(tiny(**changes), tmp_path)
    assert not (tmp_path / "annotations.json").exists()


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"num_videos": -3}, "num_videos"),
        ({"frames_per_video": 0}, "frames_per_video"),
        ({"height": 0}, "height"),
        ({"width": 5000}, "width"),
        ({"min_size": 0}, "min_size"),
        ({"seed": -1}, "seed"),
        ({"noise": float("nan")}, "noise"),
        ({"noise": 2.0}, "noise"),
        ({"max_speed": float("inf")}, "max_speed"),
        ({"max_speed": -1.0}, "max_speed"),
        ({"num_videos": 2.5}, "num_videos"),
        ({"categories": []}, "categories"),
        ({"categories": ["red circle", "red circle"]}, "categories"),
    ],
)
def test_bad_values_are_config_errors_naming_the_key_when_the_config_is_built(
    changes: dict[str, object], key: str
) -> None:
    with pytest.raises(ConfigError, match=rf"synthetic\.{key} must be "):
        tiny(**changes)


def test_a_video_too_big_for_the_available_memory_is_a_config_error_naming_the_keys() -> None:
    big = tiny(height=2048, width=2048, frames_per_video=200, max_objects=8)
    assert video_memory_bytes(big) > 2**30
    with pytest.raises(ConfigError, match=r"synthetic\.height x width x frames_per_video x max_objects"):
        check_config(big, available_memory=2 * 2**30)
    check_config(tiny(), available_memory=2 * 2**30)


def test_more_frames_than_the_disk_holds_is_a_config_error_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"synthetic\.num_videos=10000000000000: .* GiB free"):
        generate(tiny(num_videos=10**13), tmp_path / "out")
    assert not (tmp_path / "out").exists()
