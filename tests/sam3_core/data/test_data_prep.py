"""Data prep end to end: content-addressed, deterministic datasets in a local store or S3, read back by frame."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from faster_coco_eval import COCO
from PIL import Image

from components.data_prep import main
from sam3_core import storage
from sam3_core.data.frames import FrameReader
from sam3_core.data.prep import DataPrepConfig, prepare_dataset, split_videos
from sam3_core.data.synthetic import SyntheticConfig, generate
from sam3_core.data.ytvis import load_video_dataset, mask_to_rle, rle_bbox, rle_to_mask
from sam3_core.errors import ConfigError, InputError, StorageError
from tests.fixtures.paths import REPO

TINY = SyntheticConfig(num_videos=3, frames_per_video=4, height=48, width=48, min_size=10, max_size=20)


def tiny(**changes: Any) -> SyntheticConfig:
    return dataclasses.replace(TINY, **changes)


def synthetic_prep(store: Path | str, **changes: Any) -> DataPrepConfig:
    base = DataPrepConfig(source="synthetic", synthetic=TINY, store=str(store), val_fraction=0.34)
    return dataclasses.replace(base, **changes)


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def corners(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    return box[0], box[1], box[0] + box[2], box[1] + box[3]


def test_same_config_gives_the_same_id_and_identical_bytes(tmp_path: Path) -> None:
    first = prepare_dataset(synthetic_prep(tmp_path / "a"))
    second = prepare_dataset(synthetic_prep(tmp_path / "b"))
    assert first.dataset_id == second.dataset_id
    assert files_of(Path(first.uri)) == files_of(Path(second.uri))


def test_a_different_seed_gives_a_different_id(tmp_path: Path) -> None:
    first = prepare_dataset(synthetic_prep(tmp_path))
    second = prepare_dataset(synthetic_prep(tmp_path, synthetic=tiny(seed=1)))
    assert first.dataset_id != second.dataset_id


def test_published_layout_and_manifest_checksums(tmp_path: Path) -> None:
    prepared = prepare_dataset(synthetic_prep(tmp_path))
    root = Path(prepared.uri)
    assert root == tmp_path / "datasets" / prepared.dataset_id
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["dataset_id"] == prepared.dataset_id
    assert set(manifest["files"]) == set(files_of(root)) - {"manifest.json"}
    assert {"train.json", "val.json", "val_frames_coco.json", "frames/1/00000.png"} <= set(manifest["files"])
    for rel, meta in manifest["files"].items():
        assert meta == {"size": (root / rel).stat().st_size, "sha256": storage.sha256_file(root / rel)}
    assert manifest["counts"]["frames"] == 12 and manifest["source"]["kind"] == "synthetic"
    assert str(tmp_path) not in json.dumps(manifest), "no machine-specific paths in the manifest"


def test_preparing_again_reuses_the_published_dataset(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = prepare_dataset(synthetic_prep(tmp_path))
    with caplog.at_level(logging.INFO, logger="sam3_core.data.prep"):
        second = prepare_dataset(synthetic_prep(tmp_path))
    assert second == first
    assert "already published" in caplog.text


def test_split_is_by_video_deterministic_and_disjoint() -> None:
    ids = list(range(1, 21))
    train, val = split_videos(ids, 0.25, seed=3, source="ann.json")
    assert (train, val) == split_videos(ids, 0.25, seed=3, source="ann.json")
    assert len(val) == 5 and not set(train) & set(val) and sorted(train + val) == ids
    assert split_videos(ids, 0.25, seed=4, source="ann.json")[1] != val


def test_split_files_hold_the_manifest_split(tmp_path: Path) -> None:
    root = Path(prepare_dataset(synthetic_prep(tmp_path, synthetic=tiny(num_videos=6), val_fraction=0.5)).uri)
    split = json.loads((root / "manifest.json").read_text())["split"]
    train, val = load_video_dataset(str(root / "train.json")), load_video_dataset(str(root / "val.json"))
    assert [v.id for v in train.videos] == split["train"] and [v.id for v in val.videos] == split["val"]
    assert len(split["val"]) == 3 and not set(split["train"]) & set(split["val"])
    assert {t.video_id for t in val.tracks} <= set(split["val"])
    assert train.categories == val.categories


def test_val_frames_coco_has_one_annotation_per_visible_object_and_frame(tmp_path: Path) -> None:
    root = Path(prepare_dataset(synthetic_prep(tmp_path, synthetic=tiny(num_videos=4), val_fraction=0.5)).uri)
    val = load_video_dataset(str(root / "val.json"))
    coco = json.loads((root / "val_frames_coco.json").read_text())
    expected_images = [(v.id, i) for v in sorted(val.videos, key=lambda v: v.id) for i in range(v.length)]
    assert [(im["video_id"], im["frame_index"]) for im in coco["images"]] == expected_images
    assert [im["id"] for im in coco["images"]] == list(range(1, len(expected_images) + 1))
    visible = sum(1 for t in val.tracks for s in t.segmentations if s is not None)
    assert len(coco["annotations"]) == visible > 0
    ann = coco["annotations"][0]
    assert isinstance(ann["segmentation"]["counts"], str) and ann["iscrowd"] == 0
    assert COCO(str(root / "val_frames_coco.json")).getImgIds() == list(range(1, len(expected_images) + 1))


def test_resize_scales_frames_masks_boxes_and_areas_exactly_on_aligned_shapes(tmp_path: Path) -> None:
    mask = np.zeros((20, 40), dtype=bool)
    mask[2:10, 4:20] = True
    raw = {
        "videos": [{"id": 7, "width": 40, "height": 20, "file_names": ["a.jpg", "b.jpg"]}],
        "annotations": [
            {
                "id": 1,
                "video_id": 7,
                "category_id": 1,
                "segmentations": [mask_to_rle(mask), None],
                "bboxes": [[4, 2, 16, 8], None],
                "areas": [128, None],
            }
        ],
        "categories": [{"id": 1, "name": "red square"}],
    }
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (40, 20), (200, 30, 30)).save(tmp_path / name)
    (tmp_path / "ann.json").write_text(json.dumps(raw))
    cfg = DataPrepConfig(
        source="ytvis",
        annotations=str(tmp_path / "ann.json"),
        frames_root=str(tmp_path),
        store=str(tmp_path / "store"),
        val_fraction=0.0,
        resize_max_side=20,
    )
    root = Path(prepare_dataset(cfg).uri)
    dataset = load_video_dataset(str(root / "train.json"))
    assert dataset.video(7).file_names == ("frames/7/00000.jpg", "frames/7/00001.jpg")
    assert Image.open(root / "frames/7/00000.jpg").format == "JPEG"
    assert Image.open(root / "frames/7/00000.jpg").size == (20, 10)
    track = dataset.tracks[0]
    assert track.bboxes == ((2.0, 1.0, 8.0, 4.0), None) and track.areas == (32.0, None)
    seg = track.segmentations[0]
    assert seg is not None and np.array_equal(rle_to_mask(seg), mask[::2, ::2])


def test_resized_masks_stay_inside_their_scaled_boxes(tmp_path: Path) -> None:
    synth = tiny(height=40, width=80, min_size=16, max_size=30)
    full = Path(prepare_dataset(synthetic_prep(tmp_path / "a", synthetic=synth)).uri)
    half = Path(prepare_dataset(synthetic_prep(tmp_path / "b", synthetic=synth, resize_max_side=40)).uri)
    before, after = load_video_dataset(str(full / "train.json")), load_video_dataset(str(half / "train.json"))
    assert [(v.width, v.height) for v in after.videos] == [(40, 20)] * len(after.videos)
    for old, new in zip(before.tracks, after.tracks, strict=True):
        for old_box, rle, box in zip(old.bboxes, new.segmentations, new.bboxes, strict=True):
            if rle is None:
                continue
            assert box is not None and old_box is not None
            assert np.allclose(box, np.array(old_box) / 2)
            x0, y0, x1, y1 = corners(rle_bbox(rle))
            assert box[0] - 1 <= x0 and box[1] - 1 <= y0 and x1 <= box[0] + box[2] + 1 and y1 <= box[1] + box[3] + 1


def test_publishes_to_s3_and_reads_each_frame_from_the_cache_after_the_first_download(
    s3_bucket: str, tmp_path: Path
) -> None:
    prepared = prepare_dataset(synthetic_prep(f"{s3_bucket}/store"))
    assert prepared.uri == f"{s3_bucket}/store/datasets/{prepared.dataset_id}"
    reader = FrameReader(prepared.uri, cache_dir=tmp_path / "cache")
    names = [n for v in reader.dataset("train").videos for n in v.file_names]
    first = [np.asarray(reader.image(n)) for n in names]
    storage.delete_prefix(storage.join(prepared.uri, "frames"))
    again = FrameReader(prepared.uri, cache_dir=tmp_path / "cache")
    assert all(np.array_equal(a, np.asarray(again.image(n))) for a, n in zip(first, names))


def test_a_frame_whose_bytes_differ_from_the_manifest_is_refused(s3_bucket: str, tmp_path: Path) -> None:
    prepared = prepare_dataset(synthetic_prep(f"{s3_bucket}/store"))
    storage.write_bytes(storage.join(prepared.uri, "frames/1/00000.png"), b"tampered")
    reader = FrameReader(prepared.uri, cache_dir=tmp_path / "cache")
    with pytest.raises(InputError, match=r"frames/1/00000\.png"):
        reader.image("frames/1/00000.png")


def test_ytvis_files_on_s3_give_the_same_dataset_as_the_same_files_on_disk(s3_bucket: str, tmp_path: Path) -> None:
    annotations = generate(tiny(), tmp_path / "src")
    local = prepare_dataset(
        DataPrepConfig(
            source="ytvis",
            annotations=str(annotations),
            frames_root=str(annotations.parent),
            store=str(tmp_path / "store"),
            val_fraction=0.34,
        )
    )
    for path in sorted(annotations.parent.rglob("*")):
        if path.is_file():
            storage.upload_file(path, storage.join(s3_bucket, "src", path.relative_to(annotations.parent).as_posix()))
    remote = prepare_dataset(
        DataPrepConfig(
            source="ytvis",
            annotations=f"{s3_bucket}/src/annotations.json",
            frames_root=f"{s3_bucket}/src",
            store=f"{s3_bucket}/store",
            val_fraction=0.34,
            cache_dir=str(tmp_path / "cache"),
        )
    )
    assert remote.dataset_id == local.dataset_id


@pytest.mark.integration
def test_component_cli_prints_the_dataset_uri_and_id(tmp_path: Path) -> None:
    env = {**os.environ, "SAM3PIPE_STORE": str(tmp_path / "store"), "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "components.data_prep",
            "source=synthetic",
            "synthetic.num_videos=2",
            "synthetic.frames_per_video=2",
            "synthetic.height=32",
            "synthetic.width=32",
            "synthetic.min_size=8",
            "synthetic.max_size=16",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    outputs = json.loads(result.stdout.strip().splitlines()[-1])
    assert outputs["dataset_uri"] == str(tmp_path / "store" / "datasets" / outputs["dataset_id"])
    assert storage.is_published(outputs["dataset_uri"])


def test_component_exits_2_naming_a_bad_config_value(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main([f"store={tmp_path / 'store'}", "val_fraction=1.5"]) == 2
    assert "data_prep: val_fraction: must be in [0, 1)" in caplog.text
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------------------- workers, formats, hostile input


def test_workers_one_and_two_give_the_same_id_and_bytes(tmp_path: Path) -> None:
    synth = tiny(num_videos=4, frames_per_video=5, height=40, width=72)
    one = prepare_dataset(synthetic_prep(tmp_path / "a", synthetic=synth, resize_max_side=36, workers=1))
    two = prepare_dataset(synthetic_prep(tmp_path / "b", synthetic=synth, resize_max_side=36, workers=2))
    assert one.dataset_id == two.dataset_id
    assert files_of(Path(one.uri)) == files_of(Path(two.uri))


def test_manifest_keeps_the_lineage_fields_and_names_its_format_version(tmp_path: Path) -> None:
    manifest = json.loads((Path(prepare_dataset(synthetic_prep(tmp_path)).uri) / "manifest.json").read_text())
    assert {"dataset_id", "source", "split", "counts", "files"} <= set(manifest)
    assert manifest["format_version"] == 2


def ytvis_files(root: Path, size: tuple[int, int] = (80, 40), frames: int = 2) -> Path:
    """One video of JPEG frames with one box-shaped object; returns the annotation file."""
    width, height = size
    mask = np.zeros((height, width), dtype=bool)
    mask[4:20, 8:40] = True
    names = [f"v/{i}.jpg" for i in range(frames)]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(root / name)
    raw = {
        "videos": [{"id": 1, "width": width, "height": height, "file_names": names}],
        "annotations": [
            {
                "id": 1,
                "video_id": 1,
                "category_id": 1,
                "segmentations": [mask_to_rle(mask)] * frames,
                "bboxes": [[8, 4, 32, 16]] * frames,
            }
        ],
        "categories": [{"id": 1, "name": "red box"}],
    }
    (root / "ann.json").write_text(json.dumps(raw))
    return root / "ann.json"


def ytvis_prep(annotations: Path, **changes: Any) -> DataPrepConfig:
    fields = {
        "source": "ytvis",
        "annotations": str(annotations),
        "frames_root": str(annotations.parent),
        "store": str(annotations.parent / "store"),
        "val_fraction": 0.0,
    }
    return DataPrepConfig(**{**fields, **changes})


def test_resized_frames_are_lossless_png_when_asked_and_the_masks_do_not_change(tmp_path: Path) -> None:
    ann = ytvis_files(tmp_path)
    as_jpeg = load_video_dataset(str(Path(prepare_dataset(ytvis_prep(ann, resize_max_side=40)).uri) / "train.json"))
    root = Path(prepare_dataset(ytvis_prep(ann, resize_max_side=40, frame_format="png")).uri)
    as_png = load_video_dataset(str(root / "train.json"))
    assert as_png.video(1).file_names == ("frames/1/00000.png", "frames/1/00001.png")
    assert Image.open(root / "frames/1/00000.png").format == "PNG"
    assert as_png.tracks == as_jpeg.tracks


def test_frames_smaller_than_resize_max_side_are_copied_as_they_are(tmp_path: Path) -> None:
    ann = ytvis_files(tmp_path)
    root = Path(prepare_dataset(ytvis_prep(ann, resize_max_side=500)).uri)
    assert (root / "frames/1/00000.jpg").read_bytes() == (tmp_path / "v/0.jpg").read_bytes()


def test_a_truncated_frame_is_refused_naming_it_and_nothing_is_published(tmp_path: Path) -> None:
    ann = ytvis_files(tmp_path)
    data = (tmp_path / "v/1.jpg").read_bytes()
    (tmp_path / "v/1.jpg").write_bytes(data[: len(data) - 40])
    for changes in ({}, {"resize_max_side": 40}):
        with pytest.raises(
            InputError,
            match=r"ann\.json: videos\[0\]\.file_names\[1\]: frame .*v/1\.jpg is not a "
            r"readable image \(image file is truncated",
        ):
            prepare_dataset(ytvis_prep(ann, **changes))
    assert not (tmp_path / "store").exists()


def test_a_dataset_without_categories_is_refused(tmp_path: Path) -> None:
    ann = ytvis_files(tmp_path)
    raw = json.loads(ann.read_text())
    raw["annotations"], raw["categories"] = [], []
    ann.write_text(json.dumps(raw))
    with pytest.raises(InputError, match=r"ann\.json: categories: empty"):
        prepare_dataset(ytvis_prep(ann))


def test_a_polygon_outside_the_frame_is_blamed_on_the_segmentation_not_the_box(tmp_path: Path) -> None:
    ann = ytvis_files(tmp_path)
    raw = json.loads(ann.read_text())
    raw["annotations"][0]["segmentations"][1] = [[200, 200, 220, 200, 220, 230]]
    ann.write_text(json.dumps(raw))
    with pytest.raises(InputError, match=r"annotations\[0\]\.segmentations\[1\]: the polygon lies outside the 80x40"):
        prepare_dataset(ytvis_prep(ann))


def test_frames_too_large_for_the_memory_per_worker_are_refused_before_any_work(tmp_path: Path) -> None:
    ann = ytvis_files(tmp_path)
    raw = json.loads(ann.read_text())
    raw["videos"][0]["width"] = raw["videos"][0]["height"] = 2_000_000
    raw["annotations"] = []
    ann.write_text(json.dumps(raw))
    with pytest.raises(InputError, match=r"videos\[0\]\.width: 2000000x2000000 frames need about .* GiB per worker"):
        prepare_dataset(ytvis_prep(ann, workers=2))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"resize_max_side": 10**9}, "resize_max_side: must be 0 (keep) or a side length up to 65500"),
        ({"jpeg_quality": 0}, "jpeg_quality: must be in [1, 100]"),
        ({"frame_format": "bmp"}, "frame_format: must be one of ['jpeg', 'png']"),
        ({"workers": -1}, "workers: must be 0 (one per core)"),
        ({"fps": float("nan")}, "fps: must be a finite number"),
        ({"fps": -5.0}, "fps: must be 0 (every frame) or a frame rate"),
        ({"split_seed": -1}, "split_seed: must be >= 0"),
        ({"val_fraction": float("inf")}, "val_fraction: must be a finite number"),
        ({"store": "gs://bucket/x"}, "store: gs://bucket/x: unsupported URI scheme 'gs'"),
        ({"cache_dir": ""}, "cache_dir: must be a folder path or null"),
    ],
)
def test_every_config_value_is_checked_when_the_config_is_built(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        DataPrepConfig(**changes)
    assert str(caught.value).startswith(f"config data_prep: {message}")


def test_a_store_that_is_a_file_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "store").write_text("not a folder")
    with pytest.raises(StorageError, match=rf"{tmp_path / 'store'} is a file, not a folder"):
        prepare_dataset(synthetic_prep(tmp_path / "store"))
