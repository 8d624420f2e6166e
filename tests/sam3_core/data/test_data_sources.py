"""Real dataset layouts as data prep sources, on small generated data: YouTube-VIS / OVIS, SA-Co/VEval, MP4."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image

from sam3_core.data.clips import ClipConfig, ClipDataset
from sam3_core.data.frames import FrameReader
from sam3_core.data.prep import DataPrepConfig, prepare_dataset
from sam3_core.data.ytvis import load_video_dataset, mask_to_rle, rle_to_mask
from sam3_core.errors import InputError

H, W = 48, 64


def box_mask(x0: int, y0: int, x1: int, y1: int, height: int = H, width: int = W) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def track(mask_of_frame: list[np.ndarray | None]) -> dict[str, Any]:
    segs, boxes, areas = [], [], []
    for mask in mask_of_frame:
        if mask is None:
            segs.append(None), boxes.append(None), areas.append(None)
            continue
        ys, xs = np.nonzero(mask)
        segs.append(mask_to_rle(mask))
        boxes.append([float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)])
        areas.append(int(mask.sum()))
    return {"segmentations": segs, "bboxes": boxes, "areas": areas, "iscrowd": 0}


# ---------------------------------------------------------------------------- YouTube-VIS / OVIS


def test_a_youtube_vis_layout_with_uncompressed_rle_and_frame_folders_is_prepared(tmp_path: Path) -> None:
    root = tmp_path / "train" / "JPEGImages"
    names = [f"0043f083b5/{i:05d}.jpg" for i in range(0, 15, 5)]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (W, H), (90, 120, 40)).save(root / name)
    flat = box_mask(10, 5, 30, 25).flatten(order="F").astype(int)
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[-1], flat, [-1]])))).tolist()
    raw = {
        "info": {"description": "YouTube-VIS 2021"},
        "videos": [{"id": 1, "width": W, "height": H, "length": 3, "file_names": names}],
        "annotations": [
            {
                "id": 1,
                "video_id": 1,
                "category_id": 26,
                "iscrowd": 0,
                "height": H,
                "width": W,
                "segmentations": [{"size": [H, W], "counts": runs}, None, None],
                "bboxes": [[10, 5, 20, 20], None, None],
                "areas": [400, None, None],
            }
        ],
        "categories": [{"supercategory": "object", "id": 26, "name": "person"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(raw))
    prepared = prepare_dataset(
        DataPrepConfig(
            source="ytvis",
            annotations=str(tmp_path / "instances.json"),
            frames_root=str(root),
            store=str(tmp_path / "store"),
            val_fraction=0.0,
        )
    )
    dataset = load_video_dataset(str(Path(prepared.uri) / "train.json"))
    segmentation = dataset.tracks[0].segmentations[0]
    assert segmentation is not None and np.array_equal(rle_to_mask(segmentation), box_mask(10, 5, 30, 25))
    assert dataset.video(1).file_names == tuple(f"frames/1/{i:05d}.jpg" for i in range(3))


# ---------------------------------------------------------------------------- SA-Co/VEval


def saco_source(root: Path) -> tuple[dict[str, Any], Path]:
    """Three SA-Co-shaped videos: frame folders per video, noun phrases, positive and negative pairs."""
    frames = root / "media" / "saco_sav" / "JPEGImages_24fps"
    videos, annotations = [], []
    for v in (1, 2, 3):
        name = f"sav_{v:06d}"
        files = [f"{name}/{i:05d}.jpg" for i in range(4)]
        for f in files:
            (frames / f).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (W, H), (20 * v, 80, 140)).save(frames / f)
        videos.append({"id": v, "video_name": name, "file_names": files, "height": H, "width": W, "length": 4})
        masks = [box_mask(4 + 2 * i, 6, 24 + 2 * i, 30) for i in range(4)]
        annotations.append(
            {"id": v, "video_id": v, "category_id": 1, "noun_phrase": "zebra", "height": H, "width": W, **track(masks)}
        )
    categories = [{"id": 1, "name": "zebra"}, {"id": 2, "name": "striped umbrella"}, {"id": 3, "name": "unused kite"}]
    pairs = [{"id": v, "video_id": v, "category_id": 1, "noun_phrase": "zebra", "num_masklets": 1} for v in (1, 2, 3)]
    pairs += [{"id": 4, "video_id": 2, "category_id": 2, "noun_phrase": "striped umbrella", "num_masklets": 0}]
    raw = {
        "info": {"version": "v1"},
        "videos": videos,
        "annotations": annotations,
        "categories": categories,
        "video_np_pairs": pairs,
    }
    return raw, frames


def saco_config(tmp_path: Path, raw: dict[str, Any], frames: Path, **changes: Any) -> DataPrepConfig:
    annotations = tmp_path / "annotation" / "saco_veval_sav_val.json"
    annotations.parent.mkdir(parents=True, exist_ok=True)
    annotations.write_text(json.dumps(raw))
    fields = {
        "source": "saco",
        "annotations": str(annotations),
        "frames_root": str(frames),
        "store": str(tmp_path / "store"),
        "val_fraction": 0.0,
    }
    return DataPrepConfig(**{**fields, **changes})


def test_sa_co_negative_pairs_become_the_videos_negative_phrases(tmp_path: Path) -> None:
    raw, frames = saco_source(tmp_path)
    prepared = prepare_dataset(saco_config(tmp_path, raw, frames))
    published = json.loads((Path(prepared.uri) / "train.json").read_text())
    assert [v.get("negative_category_ids", []) for v in published["videos"]] == [[], [2], []]
    # the global category list shrinks to the phrases this file uses; ids are kept
    assert published["categories"] == [{"id": 1, "name": "zebra"}, {"id": 2, "name": "striped umbrella"}]
    manifest = json.loads((Path(prepared.uri) / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "saco" and manifest["counts"]["negative_pairs"] == 1


def test_sa_co_negatives_reach_the_clip_prompts_of_their_video(tmp_path: Path) -> None:
    raw, frames = saco_source(tmp_path)
    reader = FrameReader(prepare_dataset(saco_config(tmp_path, raw, frames)).uri)
    clips = ClipDataset(
        reader.dataset("train"),
        lambda name: np.array(reader.image(name)),
        ClipConfig(frames_per_clip=2, num_negatives=0),
        image_size=56,
        seed=0,
    )
    for index, ref in enumerate(clips.refs):
        queries = clips[index].find_queries
        texts = {q.query_text for q in queries}
        if ref.video_id == 2:
            assert texts == {"zebra", "striped umbrella"}
            assert all(q.object_ids_output == [] for q in queries if q.query_text == "striped umbrella")
        else:
            assert texts == {"zebra"}


SACO_ERRORS: dict[str, tuple[str, Any, str]] = {
    "pair count differs from the annotations": ("video_np_pairs.0.num_masklets", 2, "video_np_pairs[0].num_masklets"),
    "noun phrase is not the category name": (
        "video_np_pairs.3.noun_phrase",
        "umbrella",
        "video_np_pairs[3].noun_phrase",
    ),
    "annotation phrase is not its category": ("annotations.1.noun_phrase", "horse", "annotations[1].noun_phrase"),
    "pair names an unknown video": ("video_np_pairs.3.video_id", 9, "video_np_pairs[3].video_id"),
    "negative pair of an annotated phrase": ("video_np_pairs.3.category_id", 1, "video_np_pairs[3]"),
}


@pytest.mark.parametrize("case", list(SACO_ERRORS))
def test_inconsistent_sa_co_pairs_name_the_field_and_publish_nothing(case: str, tmp_path: Path) -> None:
    path, value, field = SACO_ERRORS[case]
    raw, frames = saco_source(tmp_path)
    raw = copy.deepcopy(raw)
    node: Any = raw
    *parents, last = path.split(".")
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    node[int(last) if last.isdigit() else last] = value
    cfg = saco_config(tmp_path, raw, frames)
    with pytest.raises(InputError) as caught:
        prepare_dataset(cfg)
    assert str(caught.value).startswith(f"{cfg.annotations}: {field}")
    assert not (tmp_path / "store" / "datasets").exists()


def test_a_sa_co_file_without_video_np_pairs_is_refused_with_what_to_use(tmp_path: Path) -> None:
    raw, frames = saco_source(tmp_path)
    del raw["video_np_pairs"]
    with pytest.raises(InputError, match=r"video_np_pairs: missing; .* use source=ytvis"):
        prepare_dataset(saco_config(tmp_path, raw, frames))


# ---------------------------------------------------------------------------- MP4 videos


def write_mp4(path: Path, frames: int, rate: int) -> None:
    """A video whose frame k is uniformly grey level 8 * k (so a decoded frame says which one it is)."""

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"qscale": "1"}
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((H, W, 3), 8 * k, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def grey_levels(path: Path) -> list[float]:
    """Mean level of every frame as PyAV decodes the file at its own rate (what data prep must pick from)."""
    with av.open(str(path)) as container:
        return [float(frame.to_ndarray(format="rgb24").mean()) for frame in container.decode(video=0)]


def mp4_source(root: Path, indices: list[int], fps: float | None = 6) -> dict[str, Any]:
    write_mp4(root / "videos" / "walk.mp4", frames=24, rate=24)
    masks = [box_mask(8, 8, 20 + i, 30) for i in range(len(indices))]
    video: dict[str, Any] = {"id": 1, "file_name": "walk.mp4", "width": W, "height": H, "frame_indices": indices}
    if fps is not None:
        video["fps"] = fps
    return {
        "videos": [video],
        "annotations": [{"id": 1, "video_id": 1, "category_id": 1, **track(masks)}],
        "categories": [{"id": 1, "name": "walker"}],
    }


def mp4_config(tmp_path: Path, raw: dict[str, Any], **changes: Any) -> DataPrepConfig:
    (tmp_path / "ann.json").write_text(json.dumps(raw))
    fields = {
        "source": "mp4",
        "annotations": str(tmp_path / "ann.json"),
        "frames_root": str(tmp_path / "videos"),
        "store": str(tmp_path / "store"),
        "val_fraction": 0.0,
        "fps": 6.0,
    }
    return DataPrepConfig(**{**fields, **changes})


def test_mp4_frames_at_the_chosen_rate_are_the_annotated_ones(tmp_path: Path) -> None:
    indices = [0, 1, 3, 5]
    prepared = prepare_dataset(mp4_config(tmp_path, mp4_source(tmp_path, indices)))
    root = Path(prepared.uri)
    video = load_video_dataset(str(root / "train.json")).video(1)
    assert video.file_names == tuple(f"frames/1/{i:05d}.jpg" for i in range(len(indices)))
    # at 6 fps, frame i is the 24 fps frame 4 * i; neighbours differ by 8 levels, the JPEG copy by less than 2
    levels = [float(np.asarray(Image.open(root / name)).mean()) for name in video.file_names]
    decoded = grey_levels(tmp_path / "videos" / "walk.mp4")
    assert np.allclose(levels, [decoded[4 * i] for i in indices], atol=2), (levels, decoded)
    assert Image.open(root / video.file_names[0]).format == "JPEG"


def test_mp4_at_the_files_own_rate_numbers_every_frame(tmp_path: Path) -> None:
    raw = mp4_source(tmp_path, [0, 7, 23], fps=None)
    root = Path(prepare_dataset(mp4_config(tmp_path, raw, fps=0.0)).uri)
    video = load_video_dataset(str(root / "train.json")).video(1)
    levels = [float(np.asarray(Image.open(root / name)).mean()) for name in video.file_names]
    decoded = grey_levels(tmp_path / "videos" / "walk.mp4")
    assert len(decoded) == 24
    assert np.allclose(levels, [decoded[i] for i in (0, 7, 23)], atol=2), (levels, decoded)


def test_an_mp4_frame_index_past_the_end_names_the_video(tmp_path: Path) -> None:
    cfg = mp4_config(tmp_path, mp4_source(tmp_path, [0, 2, 6]))
    with pytest.raises(InputError, match=r"videos\[0\]\.file_name: .*walk\.mp4: frame index 6 is past the end"):
        prepare_dataset(cfg)
    assert not (tmp_path / "store" / "datasets").exists()


def test_an_mp4_annotated_at_another_rate_is_refused_before_decoding(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"videos\[0\]\.fps: is 6 but data prep decodes at fps=12.0; set fps=6"):
        prepare_dataset(mp4_config(tmp_path, mp4_source(tmp_path, [0, 1]), fps=12.0))


def test_an_mp4_whose_frames_are_not_the_annotated_size_is_refused(tmp_path: Path) -> None:
    raw = mp4_source(tmp_path, [0, 1])
    raw["videos"][0]["width"] = W + 16
    for ann in raw["annotations"]:
        ann["segmentations"] = [mask_to_rle(box_mask(8, 8, 20, 30, H, W + 16))] * 2
        ann["bboxes"] = [[8, 8, 12, 22]] * 2
    with pytest.raises(InputError, match=r"videos\[0\]\.file_name: .*decodes to 64x48 frames but the video says 80x48"):
        prepare_dataset(mp4_config(tmp_path, raw))
