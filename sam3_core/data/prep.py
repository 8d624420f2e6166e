"""Data prep: turn a source (synthetic or YTVIS files) into a content-addressed, published dataset.

Everything is validated and staged in a local temp folder before a single object is published,
so a bad input never leaves a half dataset in the store. The dataset id is a hash of the staged
files and of the source description, so the same inputs always give the same id and the same
bytes: KFP caching and MLflow lineage can rely on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from sam3_core import storage
from sam3_core.data import synthetic
from sam3_core.data.synthetic import SyntheticConfig
from sam3_core.data.ytvis import (
    RLE,
    BBox,
    Track,
    Video,
    VideoDataset,
    mask_to_rle,
    read_annotation_json,
    rle_area,
    rle_to_mask,
    to_json,
    validate,
)
from sam3_core.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

SOURCES = ("synthetic", "ytvis")
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def _default_store() -> str:
    return os.environ.get("SAM3PIPE_STORE") or ".sam3pipe/store"


@dataclass
class DataPrepConfig:
    """Where the data comes from and how it is split and resized."""

    source: str = "synthetic"
    # ytvis only: URI of the annotation JSON, and the root its file_names are relative to
    annotations: str = ""
    frames_root: str = ""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # 0 keeps the frames as they are; otherwise the long side becomes this many pixels
    resize_max_side: int = 0
    # share of videos held out for validation (split by video, never by frame)
    val_fraction: float = 0.25
    split_seed: int = 0
    store: str = field(default_factory=_default_store)
    # where remote frames are cached locally; None = storage's default (env SAM3PIPE_CACHE)
    cache_dir: str | None = None


@dataclass(frozen=True)
class PreparedDataset:
    uri: str
    dataset_id: str


def check_config(cfg: DataPrepConfig) -> None:
    """Reject config values before any work is done, naming the key to change."""
    if cfg.source not in SOURCES:
        raise ConfigError(f"config data_prep: source: must be one of {list(SOURCES)}, got {cfg.source!r}")
    if cfg.source == "ytvis" and not (cfg.annotations and cfg.frames_root):
        raise ConfigError("config data_prep: source=ytvis needs annotations=<uri of the JSON> and frames_root=<uri>")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"config data_prep: val_fraction: must be in [0, 1), got {cfg.val_fraction}")
    if cfg.resize_max_side < 0:
        raise ConfigError(f"config data_prep: resize_max_side: must be 0 (keep) or positive, got {cfg.resize_max_side}")
    if not cfg.store:
        raise ConfigError("config data_prep: store: empty; set SAM3PIPE_STORE or store=<uri>")
    if cfg.source == "synthetic":
        synthetic.check_config(cfg.synthetic)
        if val_count(cfg.synthetic.num_videos, cfg.val_fraction) >= cfg.synthetic.num_videos:
            raise ConfigError(
                f"config data_prep: synthetic.num_videos: {cfg.synthetic.num_videos} video(s) leave none for training "
                f"with val_fraction={cfg.val_fraction}; raise num_videos or lower val_fraction"
            )


def prepare_dataset(cfg: DataPrepConfig) -> PreparedDataset:
    """Validate, stage, hash and publish; reuse the published dataset when the id already exists."""
    check_config(cfg)
    with tempfile.TemporaryDirectory(prefix="sam3pipe-prep-") as tmp:
        annotations, frames_root = _materialise_source(cfg, Path(tmp) / "source")
        raw = read_annotation_json(annotations)
        dataset = validate(raw, annotations, frames_root, cfg.cache_dir)
        train_ids, val_ids = split_videos([v.id for v in dataset.videos], cfg.val_fraction, cfg.split_seed, annotations)
        staging = Path(tmp) / "staging"
        staged = stage_frames(dataset, frames_root, staging, cfg.resize_max_side, cfg.cache_dir)
        split = {"seed": cfg.split_seed, "val_fraction": cfg.val_fraction, "train": train_ids, "val": val_ids}
        dataset_id = write_dataset_files(staging, staged, _describe_source(cfg, raw), split)
        dest = storage.join(cfg.store, "datasets", dataset_id)
        if storage.is_published(dest, MANIFEST):
            logger.info("dataset %s already published at %s; reusing it", dataset_id, dest)
        else:
            storage.publish_dir(staging, dest, MANIFEST)
            logger.info("published dataset %s at %s", dataset_id, dest)
    return PreparedDataset(uri=dest, dataset_id=dataset_id)


def _materialise_source(cfg: DataPrepConfig, scratch: Path) -> tuple[str, str]:
    """(annotation URI, frames root) of the input; synthetic data is generated into `scratch` first."""
    if cfg.source == "synthetic":
        annotations = synthetic.generate(cfg.synthetic, scratch)
        return str(annotations), str(annotations.parent)
    return cfg.annotations, cfg.frames_root


def _describe_source(cfg: DataPrepConfig, raw: Any) -> dict[str, Any]:
    """What produced the dataset, free of machine-specific paths so equal inputs hash equally anywhere."""
    if cfg.source == "synthetic":
        source: dict[str, Any] = {"kind": "synthetic", "synthetic": dataclasses.asdict(cfg.synthetic)}
    else:
        source = {
            "kind": "ytvis",
            "annotations": PurePosixPath(cfg.annotations).name,
            "annotations_sha256": _json_sha256(raw),
        }
    source["resize_max_side"] = cfg.resize_max_side
    return source


def write_dataset_files(
    staging: Path, staged: VideoDataset, source: dict[str, Any], split: dict[str, Any]
) -> str:
    """Write the split annotations, the frame-level COCO GT and, last, the manifest; return the dataset id."""
    train, val = staged.subset(split["train"]), staged.subset(split["val"])
    _write_json(staging / "train.json", to_json(train))
    _write_json(staging / "val.json", to_json(val))
    _write_json(staging / "val_frames_coco.json", frames_coco(val))
    counts = {
        "videos": len(staged.videos),
        "train_videos": len(train.videos),
        "val_videos": len(val.videos),
        "frames": sum(v.length for v in staged.videos),
        "tracks": len(staged.tracks),
        "categories": len(staged.categories),
        "val_frames": sum(v.length for v in val.videos),
    }
    manifest = build_manifest(staging, source, split, counts)
    _write_json(staging / MANIFEST, manifest, indent=2)
    return str(manifest["dataset_id"])


def _json_sha256(obj: Any) -> str:
    """Checksum of a JSON document's content, independent of its formatting."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def split_videos(
    video_ids: list[int], val_fraction: float, seed: int, source: str
) -> tuple[list[int], list[int]]:
    """Deterministic split by video: a seeded permutation of the sorted ids; both parts sorted."""
    ids = sorted(video_ids)
    n_val = val_count(len(ids), val_fraction)
    if n_val == 0:
        return ids, []
    if n_val >= len(ids):
        raise InputError(
            source,
            "videos",
            f"{len(ids)} video(s) cannot be split with val_fraction={val_fraction}; add videos or set val_fraction=0",
        )
    order = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[i] for i in order[:n_val])
    chosen = set(val)
    return [i for i in ids if i not in chosen], val


def val_count(num_videos: int, val_fraction: float) -> int:
    """Videos held out: the rounded share, but at least one whenever val_fraction > 0."""
    return 0 if val_fraction == 0 else max(1, round(num_videos * val_fraction))


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) with the long side scaled to `max_side`; unchanged when max_side is 0."""
    if max_side == 0:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def stage_frames(
    dataset: VideoDataset, frames_root: str, staging: Path, max_side: int, cache_dir: str | None
) -> VideoDataset:
    """Copy (or resize to PNG) every frame to `frames/<video_id>/<index>.<ext>`; rescale the tracks to match."""
    staged: dict[int, Video] = {}
    for video in tqdm(dataset.videos, desc="stage videos", unit="video"):
        width, height = target_size(video.width, video.height, max_side)
        resized = (width, height) != (video.width, video.height)
        names = []
        for index, name in enumerate(video.file_names):
            local = storage.cached_path(storage.join(frames_root, name), cache_dir)
            rel = f"frames/{video.id}/{index:05d}{'.png' if resized else PurePosixPath(name).suffix.lower()}"
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            if resized:
                with Image.open(local) as image:
                    small = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
                small.save(staging / rel, format="PNG")
            else:
                shutil.copyfile(local, staging / rel)
            names.append(rel)
        staged[video.id] = Video(id=video.id, width=width, height=height, file_names=tuple(names))
    return VideoDataset(
        videos=list(staged.values()),
        tracks=[rescale_track(t, dataset.video(t.video_id), staged[t.video_id]) for t in dataset.tracks],
        categories=dataset.categories,
    )


def rescale_track(track: Track, before: Video, after: Video) -> Track:
    """Masks resampled (bilinear, kept where at least half covered), boxes scaled, areas measured on the new masks.

    A mask that vanishes at the new size marks the object as not visible in that frame.
    """
    if (after.width, after.height) == (before.width, before.height):
        return track
    sx, sy = after.width / before.width, after.height / before.height
    segs: list[RLE | None] = []
    boxes: list[BBox | None] = []
    for rle, box in zip(track.segmentations, track.bboxes, strict=True):
        new_rle = _resample_mask(rle, after.width, after.height) if rle is not None else None
        visible = new_rle is not None and box is not None and rle_area(new_rle) > 0
        segs.append(new_rle if visible else None)
        boxes.append(_scale_box(box, sx, sy, after.width, after.height) if visible and box is not None else None)
    return dataclasses.replace(
        track,
        segmentations=tuple(segs),
        bboxes=tuple(boxes),
        areas=tuple(rle_area(r) if r is not None else None for r in segs),
    )


def _resample_mask(rle: RLE, width: int, height: int) -> RLE:
    coverage = Image.fromarray(rle_to_mask(rle).astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
    return mask_to_rle(np.asarray(coverage) >= 0.5)


def _scale_box(box: BBox, sx: float, sy: float, width: int, height: int) -> BBox:
    x0, y0 = box[0] * sx, box[1] * sy
    x1, y1 = min((box[0] + box[2]) * sx, width), min((box[1] + box[3]) * sy, height)
    return (round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3))


def frames_coco(dataset: VideoDataset) -> dict[str, Any]:
    """Frame-level COCO ground truth for the frame evaluators.

    Images in (video_id, frame index) order with ids 1..N; one annotation per (track, frame)
    where the object is visible, carrying its track id.
    """
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for video in sorted(dataset.videos, key=lambda v: v.id):
        tracks = sorted(dataset.tracks_of(video.id), key=lambda t: t.id)
        for index, name in enumerate(video.file_names):
            image_id = len(images) + 1
            images.append(
                {
                    "id": image_id,
                    "file_name": name,
                    "width": video.width,
                    "height": video.height,
                    "video_id": video.id,
                    "frame_index": index,
                }
            )
            for track in tracks:
                rle, box, area = track.segmentations[index], track.bboxes[index], track.areas[index]
                if rle is None or box is None or area is None:
                    continue
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": track.category_id,
                        "track_id": track.id,
                        "bbox": list(box),
                        "segmentation": rle,
                        "area": area,
                        "iscrowd": track.iscrowd,
                    }
                )
    categories = [{"id": c.id, "name": c.name} for c in dataset.categories]
    return {"images": images, "annotations": annotations, "categories": categories}


def build_manifest(
    staging: Path, source: dict[str, Any], split: dict[str, Any], counts: dict[str, int]
) -> dict[str, Any]:
    """Sizes and checksums of every staged file, and the id derived from them and the source."""
    files = {
        path.relative_to(staging).as_posix(): {"size": path.stat().st_size, "sha256": storage.sha256_file(path)}
        for path in sorted(staging.rglob("*"))
        if path.is_file() and path.relative_to(staging).as_posix() != MANIFEST
    }
    identity = {
        "files": sorted((rel, meta["sha256"]) for rel, meta in files.items()),
        "source": source,
        "split": {"seed": split["seed"], "val_fraction": split["val_fraction"]},
    }
    dataset_id = _json_sha256(identity)[:16]
    return {"dataset_id": dataset_id, "source": source, "split": split, "counts": counts, "files": files}


def _write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    separators = (",", ": ") if indent else (",", ":")
    path.write_text(json.dumps(obj, indent=indent, separators=separators) + "\n", encoding="utf-8")
