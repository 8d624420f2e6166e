"""Semi-supervised VOS layouts as data prep sources, on small generated folders: DAVIS 2017, MOSE, SA-V."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sam3_core.data.prep import DataPrepConfig, prepare_dataset
from sam3_core.data.shards import merge_shards, plan_shards, prepare_shard
from sam3_core.data.sources.vos import VosConfig
from sam3_core.data.ytvis import load_video_dataset, rle_to_mask
from sam3_core.errors import ConfigError, InputError
from tests.fixtures.vos import DAVIS_VIDEOS, H, W, davis_folder, square, write_binary, write_frame, write_indexed


def davis_config(tmp_path: Path, **changes: Any) -> DataPrepConfig:
    root = davis_folder(tmp_path / "DAVIS", {"2017/train": ["bear", "dog"], "2017/val": ["car"]})
    settings: dict[str, Any] = {
        "source": "davis",
        "vos": VosConfig(root=str(root)),
        "split_by": "source",
        "store": str(tmp_path / "store"),
        "workers": 1,
    }
    settings.update(changes)
    return DataPrepConfig(**settings)


def test_a_davis_2017_folder_is_split_by_its_image_sets_with_one_track_per_palette_index(tmp_path: Path) -> None:
    prepared = prepare_dataset(davis_config(tmp_path))
    train = load_video_dataset(str(Path(prepared.uri) / "train.json"))
    val = load_video_dataset(str(Path(prepared.uri) / "val.json"))
    # ids 1..N in name order: bear 1, car 2, dog 3
    assert [v.id for v in train.videos] == [1, 3] and [v.id for v in val.videos] == [2]
    assert [(c.id, c.name) for c in train.categories] == [(1, "object")]
    bear = {t.id: t for t in train.tracks_of(1)}
    assert sorted(bear) == [1001, 1002]
    for t, objects in enumerate(DAVIS_VIDEOS["bear"]):
        for index in (1, 2):
            rle = bear[1000 + index].segmentations[t]
            if index in objects:
                assert np.array_equal(rle_to_mask(rle), objects[index])
            else:
                assert rle is None
    assert sorted(t.id for t in train.tracks_of(3)) == [3001, 3003]


def test_void_pixels_of_a_davis_annotation_are_no_object(tmp_path: Path) -> None:
    prepared = prepare_dataset(davis_config(tmp_path))
    train = load_video_dataset(str(Path(prepared.uri) / "train.json"))
    assert all(t.id % 1000 != 255 for t in train.tracks)


def test_a_davis_folder_split_at_random_takes_the_union_of_its_image_sets(tmp_path: Path) -> None:
    prepared = prepare_dataset(davis_config(tmp_path, split_by="random", val_fraction=0.34))
    manifest = json.loads((Path(prepared.uri) / "manifest.json").read_text())
    assert manifest["counts"]["videos"] == 3 and manifest["counts"]["val_videos"] == 1


def test_a_davis_dataset_has_the_same_id_and_bytes_prepared_in_one_process_or_in_two_shards(tmp_path: Path) -> None:
    single = prepare_dataset(davis_config(tmp_path))
    cfg = davis_config(tmp_path, store=str(tmp_path / "sharded"))
    plan = plan_shards(cfg, 2)
    for index in range(plan.shards):
        prepare_shard(plan.uri, index)
    sharded = merge_shards(plan.uri)
    assert sharded.dataset_id == single.dataset_id
    for name in ("train.json", "val.json", "manifest.json"):
        assert (Path(sharded.uri) / name).read_bytes() == (Path(single.uri) / name).read_bytes()


def sav_folder(root: Path) -> tuple[Path, Path]:
    """SA-V val layout: 24 fps frames, per-object binary PNGs on every 4th frame; object 001 leaves after frame 4."""
    frames, annotations = root / "JPEGImages_24fps", root / "Annotations_6fps"
    for t in range(9):
        write_frame(frames / "sav_000001" / f"{t:05d}.jpg", 20 * t)
    for t in (0, 4, 8):
        write_binary(annotations / "sav_000001" / "000" / f"{t:05d}.png", square(t, 2))
        if t < 8:
            write_binary(annotations / "sav_000001" / "001" / f"{t:05d}.png", square(20, 12 - t))
    return annotations, frames


def test_an_sa_v_layout_keeps_the_annotated_frames_and_an_object_missing_from_a_frame_is_not_visible_there(
    tmp_path: Path,
) -> None:
    annotations, frames = sav_folder(tmp_path / "sav_val")
    prepared = prepare_dataset(
        DataPrepConfig(
            source="vos",
            annotations=str(annotations),
            frames_root=str(frames),
            val_fraction=0.0,
            store=str(tmp_path / "store"),
            workers=1,
        )
    )
    train = load_video_dataset(str(Path(prepared.uri) / "train.json"))
    (video,) = train.videos
    assert video.length == 3
    tracks = {t.id: t for t in train.tracks}
    assert sorted(tracks) == [1001, 1002]
    assert np.array_equal(rle_to_mask(tracks[1001].segmentations[1]), square(4, 2))
    assert tracks[1002].segmentations[2] is None and tracks[1002].segmentations[1] is not None


def mose_folder(root: Path) -> tuple[Path, Path]:
    """MOSE / YouTube-VOS layout: <split>/JPEGImages/<video>/*.jpg, <split>/Annotations/<video>/*.png."""
    for name in ("0a1b", "0c2d", "0e3f"):
        for t in range(2):
            write_frame(root / "JPEGImages" / name / f"{t:05d}.jpg", 30 * t)
            write_indexed(root / "Annotations" / name / f"{t:05d}.png", {1: square(3 + t, 3), 2: square(15, 9)})
    return root / "Annotations", root / "JPEGImages"


def test_a_mose_layout_is_limited_to_the_videos_its_list_names(tmp_path: Path) -> None:
    annotations, frames = mose_folder(tmp_path / "MOSE" / "train")
    listed = tmp_path / "MOSE_sample_train_list.txt"
    listed.write_text("0e3f\n0a1b\n")
    prepared = prepare_dataset(
        DataPrepConfig(
            source="vos",
            annotations=str(annotations),
            frames_root=str(frames),
            vos=VosConfig(video_list=str(listed), category="thing"),
            val_fraction=0.5,
            store=str(tmp_path / "store"),
            workers=1,
        )
    )
    manifest = json.loads((Path(prepared.uri) / "manifest.json").read_text())
    assert manifest["counts"] == {**manifest["counts"], "videos": 2, "tracks": 4, "val_videos": 1}
    val = load_video_dataset(str(Path(prepared.uri) / "val.json"))
    assert val.categories[0].name == "thing"


def vos_config(tmp_path: Path, annotations: Path, frames: Path) -> DataPrepConfig:
    return DataPrepConfig(
        source="vos",
        annotations=str(annotations),
        frames_root=str(frames),
        val_fraction=0.0,
        store=str(tmp_path / "store"),
        workers=1,
    )


def test_an_rgb_annotation_png_is_refused_naming_the_file(tmp_path: Path) -> None:
    annotations, frames = mose_folder(tmp_path / "train")
    Image.new("RGB", (W, H), (128, 0, 0)).save(annotations / "0c2d" / "00001.png")
    with pytest.raises(InputError, match=r"0c2d/00001\.png.*RGB PNG"):
        prepare_dataset(vos_config(tmp_path, annotations, frames))
    assert not (tmp_path / "store").exists()


def test_an_annotated_frame_without_its_image_names_both(tmp_path: Path) -> None:
    annotations, frames = mose_folder(tmp_path / "train")
    (frames / "0a1b" / "00001.jpg").unlink()
    with pytest.raises(InputError, match=r"0a1b/00001\.png.*no 0a1b/00001\.jpg"):
        prepare_dataset(vos_config(tmp_path, annotations, frames))


def test_a_video_mixing_both_layouts_is_refused(tmp_path: Path) -> None:
    annotations, frames = mose_folder(tmp_path / "train")
    write_binary(annotations / "0a1b" / "000" / "00000.png", square(1, 1))
    with pytest.raises(InputError, match=r"0a1b.*mixes"):
        prepare_dataset(vos_config(tmp_path, annotations, frames))


def test_a_listed_davis_video_without_annotations_is_named(tmp_path: Path) -> None:
    root = davis_folder(tmp_path / "DAVIS", {"2017/train": ["bear", "zebra"]})
    cfg = DataPrepConfig(source="davis", vos=VosConfig(root=str(root), image_sets=["2017/train"]), store=str(tmp_path))
    with pytest.raises(InputError, match="zebra: no annotation PNGs"):
        prepare_dataset(cfg)


def test_split_by_source_is_refused_for_a_source_without_a_split_of_its_own(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="split_by: source=synthetic has no split of its own"):
        DataPrepConfig(source="synthetic", split_by="source", store=str(tmp_path))
