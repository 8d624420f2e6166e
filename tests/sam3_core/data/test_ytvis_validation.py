"""Validation of YTVIS-style inputs: every bad input names the file and the JSON path, and publishes nothing."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sam3_core.data.prep import DataPrepConfig, prepare_dataset
from sam3_core.data.synthetic import SyntheticConfig
from sam3_core.data.ytvis import (
    load_video_dataset,
    mask_to_rle,
    rle_to_mask,
    to_json,
    validate,
)
from sam3_core.errors import ConfigError, InputError

WIDTH, HEIGHT = 24, 16


def rect(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def uncompressed(mask: np.ndarray) -> dict[str, Any]:
    """Column-major run lengths starting with background, as COCO's uncompressed RLE."""
    flat = mask.flatten(order="F").astype(int)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": [HEIGHT, WIDTH], "counts": np.diff(np.concatenate([[0], changes])).tolist()}


def valid_raw() -> dict[str, Any]:
    """Two 3-frame videos mixing compressed RLE, polygon, uncompressed RLE and null frames."""
    return {
        "videos": [
            {
                "id": 1,
                "width": WIDTH,
                "height": HEIGHT,
                "length": 3,
                "file_names": ["v1/0.png", "v1/1.png", "v1/2.png"],
            },
            {"id": 2, "width": WIDTH, "height": HEIGHT, "file_names": ["v2/0.png", "v2/1.png", "v2/2.png"]},
        ],
        "annotations": [
            {
                "id": 10,
                "video_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "segmentations": [mask_to_rle(rect(2, 3, 8, 9)), [[4, 4, 12, 4, 12, 10, 4, 10]], None],
                "bboxes": [[2, 3, 6, 6], [4, 4, 8, 6], None],
                "areas": [36, 48, None],
            },
            {
                "id": 11,
                "video_id": 2,
                "category_id": 2,
                "segmentations": [uncompressed(rect(0, 0, 5, 4)), None, mask_to_rle(rect(10, 2, 24, 16))],
                "bboxes": [[0, 0, 5, 4], None, [10, 2, 14, 14]],
                "areas": [20, None, 196],
            },
        ],
        "categories": [{"id": 1, "name": "red circle"}, {"id": 2, "name": "blue square"}],
    }


def write_frames(root: Path, raw: dict[str, Any]) -> None:
    for video in raw["videos"]:
        for name in video["file_names"]:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (video["width"], video["height"]), (30, 60, 90)).save(root / name)


@pytest.fixture
def source(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    """A valid dataset on disk: (raw annotations, frames root holding the frames)."""
    raw, root = valid_raw(), tmp_path / "src"
    write_frames(root, raw)
    return raw, root


def prep_config(annotations: Path, root: Path, store: Path, **changes: Any) -> DataPrepConfig:
    fields = {
        "source": "ytvis",
        "annotations": str(annotations),
        "frames_root": str(root),
        "store": str(store),
        "val_fraction": 0.5,
    }
    return DataPrepConfig(**{**fields, **changes})


def nothing_published(store: Path) -> bool:
    return not (store / "datasets").exists() or not any((store / "datasets").rglob("*"))


def test_a_valid_dataset_is_normalised_to_compressed_rle(source: tuple[dict[str, Any], Path]) -> None:
    raw = source[0]
    dataset = validate(raw, "ann.json")
    polygon = dataset.tracks[0].segmentations[1]
    assert polygon is not None and isinstance(polygon["counts"], str)
    assert rle_to_mask(polygon)[4:10, 4:12].all()
    from_runs = dataset.tracks[1].segmentations[0]
    assert from_runs is not None and np.array_equal(rle_to_mask(from_runs), rect(0, 0, 5, 4))
    assert dataset.tracks[1].areas == (20.0, None, 196.0)
    assert dataset.video(2).length == 3


def test_lookups_find_videos_tracks_and_categories(source: tuple[dict[str, Any], Path]) -> None:
    dataset = validate(source[0], "ann.json")
    assert dataset.video(2).file_names[0] == "v2/0.png"
    assert [t.id for t in dataset.tracks_of(1)] == [10]
    assert dataset.category(2).name == "blue square"


def test_to_json_round_trips_with_a_stable_key_order(source: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    dataset = validate(source[0], "ann.json")
    out = tmp_path / "out.json"
    out.write_text(json.dumps(to_json(dataset)))
    again = load_video_dataset(str(out))
    assert again.tracks == dataset.tracks and again.videos == dataset.videos
    assert list(to_json(again)["annotations"][0]) == [
        "id",
        "video_id",
        "category_id",
        "iscrowd",
        "segmentations",
        "bboxes",
        "areas",
    ]


def test_a_valid_dataset_is_prepared(source: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    raw, root = source
    (root / "ann.json").write_text(json.dumps(raw))
    prepared = prepare_dataset(prep_config(root / "ann.json", root, tmp_path / "store"))
    assert (Path(prepared.uri) / "manifest.json").is_file()


Mutation = Callable[[dict[str, Any], Path], str | None]


def _set(path: str, value: Any) -> Mutation:
    """Mutation setting raw[a][i][b]... (path like 'annotations.0.bboxes.1') to value."""

    def mutate(raw: dict[str, Any], root: Path) -> None:
        *parents, last = path.split(".")
        node: Any = raw
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[int(last) if last.isdigit() else last] = value

    return mutate


def _duplicate(key: str, index: int, field: str) -> Mutation:
    def mutate(raw: dict[str, Any], root: Path) -> None:
        raw[key][index][field] = raw[key][index - 1][field]

    return mutate


def _not_json(raw: dict[str, Any], root: Path) -> str:
    return '{"videos": [}'


def _drop_categories(raw: dict[str, Any], root: Path) -> None:
    del raw["categories"]


def _short_segmentations(raw: dict[str, Any], root: Path) -> None:
    raw["annotations"][0]["segmentations"].pop()


def _short_bboxes(raw: dict[str, Any], root: Path) -> None:
    raw["annotations"][1]["bboxes"].append(None)


def _truncated_counts(raw: dict[str, Any], root: Path) -> None:
    rle = raw["annotations"][0]["segmentations"][0]
    rle["counts"] = rle["counts"][:-2]


def _missing_frame(raw: dict[str, Any], root: Path) -> None:
    (root / "v2/2.png").unlink()


def _garbage_frame(raw: dict[str, Any], root: Path) -> None:
    (root / "v1/0.png").write_bytes(b"not a png")


def _wrong_frame_size(raw: dict[str, Any], root: Path) -> None:
    Image.new("RGB", (WIDTH, HEIGHT + 2)).save(root / "v1/1.png")


MALFORMED: dict[str, tuple[Mutation, str]] = {
    "not JSON": (_not_json, "$"),
    "missing top-level key": (_drop_categories, "categories"),
    "duplicate video id": (_duplicate("videos", 1, "id"), "videos[1].id"),
    "duplicate annotation id": (_duplicate("annotations", 1, "id"), "annotations[1].id"),
    "duplicate category id": (_duplicate("categories", 1, "id"), "categories[1].id"),
    "duplicate category name": (_duplicate("categories", 1, "name"), "categories[1].name"),
    "empty category name": (_set("categories.0.name", "  "), "categories[0].name"),
    "unknown category_id": (_set("annotations.1.category_id", 7), "annotations[1].category_id"),
    "unknown video_id": (_set("annotations.0.video_id", 3), "annotations[0].video_id"),
    "too few segmentations": (_short_segmentations, "annotations[0].segmentations"),
    "too many bboxes": (_short_bboxes, "annotations[1].bboxes"),
    "bbox outside the frame": (_set("annotations.0.bboxes.1", [20, 4, 8, 6]), "annotations[0].bboxes[1]"),
    "bbox with zero width": (_set("annotations.1.bboxes.0", [0, 0, 0, 4]), "annotations[1].bboxes[0]"),
    "bbox without a mask": (_set("annotations.1.bboxes.1", [1, 1, 2, 2]), "annotations[1].bboxes[1]"),
    "RLE size differs from the video": (
        _set("annotations.0.segmentations.0.size", [HEIGHT, WIDTH + 1]),
        "annotations[0].segmentations[0].size",
    ),
    "RLE counts truncated": (_truncated_counts, "annotations[0].segmentations[0].counts"),
    "uncompressed RLE of the wrong length": (
        _set("annotations.1.segmentations.0.counts", [3, 4]),
        "annotations[1].segmentations[0].counts",
    ),
    "polygon with an odd coordinate count": (
        _set("annotations.0.segmentations.1", [[4, 4, 12, 4, 12]]),
        "annotations[0].segmentations[1][0]",
    ),
    "video with no frames": (_set("videos.0.file_names", []), "videos[0].file_names"),
    "length disagrees with file_names": (_set("videos.0.length", 4), "videos[0].length"),
    "frame path escaping frames_root": (_set("videos.1.file_names.0", "../v2/0.png"), "videos[1].file_names[0]"),
    "missing frame file": (_missing_frame, "videos[1].file_names[2]"),
    "unreadable frame file": (_garbage_frame, "videos[0].file_names[0]"),
    "frame size differs from the video": (_wrong_frame_size, "videos[0].file_names[1]"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_names_file_and_field_and_publishes_nothing(
    case: str, source: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    mutate, field = MALFORMED[case]
    raw, root = copy.deepcopy(source[0]), source[1]
    text = mutate(raw, root)
    annotations, store = root / "ann.json", tmp_path / "store"
    annotations.write_text(text if text is not None else json.dumps(raw))
    with pytest.raises(InputError) as caught:
        prepare_dataset(prep_config(annotations, root, store))
    assert str(caught.value).startswith(f"{annotations}: {field}: ")
    assert nothing_published(store)


def test_a_missing_annotation_file_is_named(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with pytest.raises(InputError, match=r"nope\.json: \$: cannot read"):
        prepare_dataset(prep_config(tmp_path / "nope.json", tmp_path, store))
    assert nothing_published(store)


def test_too_few_videos_to_split_is_an_input_error(source: tuple[dict[str, Any], Path], tmp_path: Path) -> None:
    raw, root = source
    raw["videos"].pop()
    raw["annotations"].pop()
    (root / "ann.json").write_text(json.dumps(raw))
    store = tmp_path / "store"
    with pytest.raises(InputError, match=r"ann\.json: videos: 1 video"):
        prepare_dataset(prep_config(root / "ann.json", root, store))
    assert nothing_published(store)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"resize_max_side": -1}, "resize_max_side"),
        ({"source": "coco"}, "source"),
        ({"source": "synthetic", "synthetic": SyntheticConfig(num_videos=1)}, "synthetic.num_videos"),
    ],
)
def test_bad_config_values_name_the_key_and_publish_nothing(
    changes: dict[str, Any], field: str, source: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    raw, root = source
    (root / "ann.json").write_text(json.dumps(raw))
    store = tmp_path / "store"
    with pytest.raises(ConfigError, match=f"data_prep: {field}: "):
        prepare_dataset(prep_config(root / "ann.json", root, store, **changes))
    assert nothing_published(store)
