"""Data prep: turn a source into a content-addressed, published dataset, on one machine or sharded.

Everything is validated and staged before a single object is published, so a bad input never
leaves a half dataset in the store. Each video is staged on its own (frames decoded completely,
resized, re-encoded or copied; masks resampled) by a pool of worker processes, and the
results are assembled in the source's video order, so the output does not depend on the
number of workers (``sam3_core.data.staging``), nor on the number of shards when the pipeline
spreads the videos over pods (``sam3_core.data.shards``). The dataset id hashes the
staged files, the source description and ``FORMAT_VERSION``: the same inputs and settings give
the same id and the same bytes, so KFP caching and MLflow lineage can rely on it.

Format version 2 (this module) against 1: resized frames are JPEG (``frame_format=jpeg``,
quality ``jpeg_quality``) instead of PNG, decoded with libjpeg's DCT scaling before the same
bilinear resize; frames are only ever scaled down; masks are the same as version 1's; a
video's negative phrases are kept; annotations are listed video by video.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sam3_core import storage
from sam3_core.data import synthetic
from sam3_core.data.sources import FILE_SOURCES, SOURCES, Source, json_sha256, load_source
from sam3_core.data.sources.vos import VosConfig
from sam3_core.data.staging import StagedVideo, StageSettings, stage_videos, target_size
from sam3_core.data.synthetic import SyntheticConfig
from sam3_core.data.ytvis import Category, VideoDataset, to_json
from sam3_core.errors import ConfigError, InputError, StorageError, StoreUnreachableError
from sam3_core.memory import available_memory
from sam3_core.outputs import Output, check_outputs

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
# how videos are split: "random" by val_fraction and split_seed, or "source": the source's own lists (DAVIS's ImageSets)
SPLIT_BY = ("random", "source")
FRAME_FORMATS = ("jpeg", "png")
# JPEG cannot hold a larger side; a larger resize_max_side would mean "keep" anyway
MAX_SIDE_LIMIT = 65500
MAX_FPS = 1000.0
MAX_WORKERS = 1024
# bytes per frame pixel a worker holds at its peak (RGB decode, mask crop, integral image, coverage)
STAGE_BYTES_PER_PIXEL = 16
# frames with a shorter side are warned about (the model's patches are 14 px)
MIN_USEFUL_SIDE = 16


@dataclass
class DataPrepConfig:
    """Where the data comes from, how frames are resized and written, how videos are split."""

    # synthetic | ytvis (YouTube-VIS 2019/2021, OVIS) | saco (SA-Co/VEval) | mp4 (video files)
    # | davis (DAVIS 2017 folder, vos.root) | vos (MOSE / YouTube-VOS / SA-V PNG annotation folders)
    source: str = "synthetic"
    # file sources: URI of the annotation JSON (vos: of the annotation folder), and the root its frame /
    # video file names are relative to
    annotations: str = ""
    frames_root: str = ""
    # mp4 only: the frame rate the annotation's frame indices count at; 0 = every frame at the file's own rate
    fps: float = 0.0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    vos: VosConfig = field(default_factory=VosConfig)
    # frames with a longer side are scaled down to this many pixels (masks and boxes with them); 0 keeps all sizes
    resize_max_side: int = 0
    # how re-encoded frames (resized, or decoded from video files) are written: "jpeg" or lossless "png";
    # frames kept at their size are copied byte for byte
    frame_format: str = "jpeg"
    jpeg_quality: int = 90
    # "random": val_fraction of the videos, drawn by split_seed, are held out (split by video, never by
    # frame); "source": the source's own split (source=davis: the train and val image sets)
    split_by: str = "random"
    # share of videos held out for validation with split_by=random
    val_fraction: float = 0.25
    split_seed: int = 0
    store: str = field(default_factory=storage.default_store)
    # where remote source files are cached locally (kept for the next run); None: read without keeping them
    cache_dir: str | None = None
    # processes staging videos in parallel; 0 = one per CPU core this process may use
    workers: int = 0
    # publish the dataset again even when its id is published already (repairs a damaged copy; a
    # published dataset that does not match its manifest is refused otherwise)
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_config(self)


@dataclass(frozen=True)
class PreparedDataset:
    uri: str
    dataset_id: str


def _fail(key: str, message: str) -> ConfigError:
    return ConfigError(f"config data_prep: {key}: {message}")


def _number(cfg: DataPrepConfig, key: str, kind: type) -> Any:
    value = getattr(cfg, key)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise _fail(key, f"must be a finite {'integer' if kind is int else 'number'}, got {value!r}")
    return value


def check_config(cfg: DataPrepConfig) -> None:
    """Reject config values before any work is done, naming the key to change."""
    if cfg.source not in SOURCES:
        raise _fail("source", f"must be one of {list(SOURCES)}, got {cfg.source!r}")
    for key in ("annotations", "frames_root", "store", "frame_format"):
        if not isinstance(getattr(cfg, key), str):
            raise _fail(key, f"must be a string, got {getattr(cfg, key)!r}")
    if cfg.source in FILE_SOURCES and not (cfg.annotations and cfg.frames_root):
        raise ConfigError(
            f"config data_prep: source={cfg.source} needs annotations=<uri of the JSON> and frames_root=<uri>"
        )
    if cfg.split_by not in SPLIT_BY:
        raise _fail("split_by", f"must be one of {list(SPLIT_BY)}, got {cfg.split_by!r}")
    if cfg.split_by == "source" and cfg.source != "davis":
        raise _fail("split_by", f"source={cfg.source} has no split of its own; use split_by=random")
    if cfg.source == "davis" and not cfg.vos.root:
        raise ConfigError("config data_prep: source=davis needs vos.root=<the DAVIS folder with ImageSets/>")
    if not 0.0 <= _number(cfg, "val_fraction", float) < 1.0:
        raise _fail("val_fraction", f"must be in [0, 1), got {cfg.val_fraction}")
    if _number(cfg, "split_seed", int) < 0:
        raise _fail("split_seed", f"must be >= 0, got {cfg.split_seed}")
    if not 0 <= _number(cfg, "resize_max_side", int) <= MAX_SIDE_LIMIT:
        raise _fail(
            "resize_max_side", f"must be 0 (keep) or a side length up to {MAX_SIDE_LIMIT}, got {cfg.resize_max_side}"
        )
    if cfg.frame_format not in FRAME_FORMATS:
        raise _fail("frame_format", f"must be one of {list(FRAME_FORMATS)}, got {cfg.frame_format!r}")
    if not 1 <= _number(cfg, "jpeg_quality", int) <= 100:
        raise _fail("jpeg_quality", f"must be in [1, 100], got {cfg.jpeg_quality}")
    if not 0.0 <= _number(cfg, "fps", float) <= MAX_FPS:
        raise _fail("fps", f"must be 0 (every frame) or a frame rate up to {MAX_FPS:g}, got {cfg.fps}")
    if not 0 <= _number(cfg, "workers", int) <= MAX_WORKERS:
        raise _fail("workers", f"must be 0 (one per core) or a process count up to {MAX_WORKERS}, got {cfg.workers}")
    if cfg.cache_dir is not None and (not isinstance(cfg.cache_dir, str) or not cfg.cache_dir):
        raise _fail("cache_dir", f"must be a folder path or null, got {cfg.cache_dir!r}")
    if not isinstance(cfg.overwrite, bool):
        raise _fail("overwrite", f"must be true or false, got {cfg.overwrite!r}")
    if not cfg.store:
        raise _fail("store", "empty; set SAM3PIPE_STORE or store=<uri>")
    try:
        storage.join(cfg.store, "datasets")
    except StorageError as exc:
        raise _fail("store", str(exc)) from None
    if cfg.source == "synthetic":
        synthetic.check_config(cfg.synthetic)
        if val_count(cfg.synthetic.num_videos, cfg.val_fraction) >= cfg.synthetic.num_videos:
            raise ConfigError(
                f"config data_prep: synthetic.num_videos: {cfg.synthetic.num_videos} video(s) leave none for training "
                f"with val_fraction={cfg.val_fraction}; raise num_videos or lower val_fraction"
            )


def worker_count(cfg: DataPrepConfig) -> int:
    """``workers``, with 0 meaning every core this process may run on."""
    if cfg.workers:
        return cfg.workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------- one machine


def prepare_dataset(cfg: DataPrepConfig) -> PreparedDataset:
    """Validate, stage, hash and publish; reuse the published dataset when the id already exists (and
    it still matches its manifest)."""
    check_config(cfg)
    guard_store(cfg)
    with tempfile.TemporaryDirectory(prefix="sam3pipe-prep-") as tmp:
        source = load_checked_source(cfg, Path(tmp) / "source")
        split = split_for(cfg, source)
        staging = Path(tmp) / "staging"
        staged = stage_videos(source, stage_settings(cfg), staging, worker_count(cfg))
        manifest = write_dataset_files(staging, staged, source.dataset.categories, describe(cfg, source), split)
        dest = storage.join(cfg.store, "datasets", manifest["dataset_id"])
        publish_or_reuse(dest, staging / MANIFEST, cfg.overwrite, lambda: storage.publish_dir(staging, dest, MANIFEST))
    return PreparedDataset(uri=dest, dataset_id=manifest["dataset_id"])


def guard_store(cfg: DataPrepConfig) -> None:
    """The output guard before any work: the store must not be, or lie inside, a published dataset."""
    check_outputs([Output(cfg.store, "store", folder=True)], {})


def publish_or_reuse(dest: str, manifest_path: Path, overwrite: bool, publish: Callable[[], None]) -> None:
    """Publish the staged dataset at `dest`, or reuse the one published there after checking it.

    A published dataset is reused only when it still is what its id says: the manifest this run
    computed and every file of it, byte for byte. Otherwise it is refused (`overwrite=true` publishes
    it again, which repairs it). After a publish the manifest is read back, so a store that accepts
    writes without keeping them (an endpoint that is not an object store) is found out.
    """
    expected = manifest_path.read_bytes()
    dataset_id = json.loads(expected)["dataset_id"]
    if not overwrite and storage.is_published(dest, MANIFEST):
        verify_published(dest, expected)
        logger.info("dataset %s already published at %s (checked against its manifest); reusing it", dataset_id, dest)
        return
    publish()
    verify_published(dest, expected, check_files=False)
    logger.info("published dataset %s at %s", dataset_id, dest)


def _published_manifest(dest: str) -> tuple[bytes, dict[str, Any]]:
    """The published manifest's bytes and content; a StorageError when the store's answer is not one."""
    marker = storage.join(dest, MANIFEST)
    data = storage.read_bytes(marker)
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "dataset_id" not in manifest:
        shown = data[:60].decode("utf-8", "replace")
        raise StorageError(
            f"{marker}: the store answered with {shown!r} ({len(data)} bytes), not a dataset manifest; check that "
            "the store (SAM3PIPE_STORE, AWS_ENDPOINT_URL) is an object store and not, e.g., a web page"
        )
    return data, manifest


def verify_published(dest: str, expected: bytes | None = None, check_files: bool = True) -> None:
    """Check the dataset at `dest` against its manifest (and the manifest against `expected`)."""
    data, manifest = _published_manifest(dest)
    advice = "the published dataset was changed after it was published; run this data prep with overwrite=true to publish it again"
    if expected is not None and data != expected:
        raise InputError(
            dest,
            MANIFEST,
            f"is not the manifest of dataset {manifest.get('dataset_id')!r} this data prep makes: {advice}",
        )
    if not check_files:
        return
    records: dict[str, Any] = manifest["files"]

    def problem(rel: str) -> str | None:
        try:
            content = storage.read_bytes(storage.join(dest, rel))
        except StorageError as exc:
            if isinstance(exc, StoreUnreachableError):
                raise
            return f"cannot be read ({exc})"
        record = records[rel]
        if len(content) != record.get("size") or storage.sha256_bytes(content) != record.get("sha256"):
            return f"{len(content)} bytes whose sha256 differs from the manifest's"
        return None

    with ThreadPoolExecutor(max_workers=storage.max_concurrency()) as pool:
        found = tqdm(pool.map(problem, sorted(records)), total=len(records), desc=f"verify {dest}", unit="file")
        for rel, why in zip(sorted(records), found):
            if why is not None:
                raise InputError(dest, rel, f"{why}: {advice}")


def load_checked_source(cfg: DataPrepConfig, scratch: Path, video_ids: list[int] | None = None) -> Source:
    """The source, checked for what data prep needs beyond the format (categories, memory per frame)."""
    source = load_source(
        cfg.source, cfg.annotations, cfg.frames_root, cfg.fps, cfg.synthetic, cfg.vos, scratch, video_ids
    )
    if not source.dataset.categories:
        raise InputError(
            source.annotations, "categories", "empty: a dataset needs at least one noun phrase to train on; add them"
        )
    _warn_about_tiny_frames(source, cfg.resize_max_side)
    budget = available_memory() // worker_count(cfg)
    for video in source.dataset.videos:
        need = video.width * video.height * STAGE_BYTES_PER_PIXEL
        if need > budget:
            raise InputError(
                source.annotations,
                f"{source.paths[video.id]}.width",
                f"{video.width}x{video.height} frames need about {need / 2**30:.1f} GiB per worker to stage, more "
                f"than the {budget / 2**30:.1f} GiB per worker this machine has with {worker_count(cfg)} worker(s); "
                "lower data_prep.workers or use smaller frames",
            )
    return source


def _warn_about_tiny_frames(source: Source, max_side: int) -> None:
    """Frames of a few pixels are valid input but almost certainly a broken export: say so."""
    tiny = []
    for video in source.dataset.videos:
        width, height = target_size(video.width, video.height, max_side)
        if min(width, height) < MIN_USEFUL_SIDE:
            tiny.append(f"{source.paths[video.id]}: {width}x{height}")
    if tiny:
        logger.warning(
            "%d video(s) have frames under %d px on a side (%s%s): the model sees them scaled up to "
            "model.image_size, with next to nothing to learn from; check the export (or resize_max_side)",
            len(tiny),
            MIN_USEFUL_SIDE,
            ", ".join(tiny[:3]),
            ", ..." if len(tiny) > 3 else "",
        )


def describe(cfg: DataPrepConfig, source: Source) -> dict[str, Any]:
    """The source description plus every setting that shapes the output: part of the dataset id."""
    description = dict(source.description)
    description["resize_max_side"] = cfg.resize_max_side
    description["frame_format"] = cfg.frame_format
    if cfg.frame_format == "jpeg":
        description["jpeg_quality"] = cfg.jpeg_quality
    return description


def split_for(cfg: DataPrepConfig, source: Source) -> dict[str, Any]:
    """The split of the source's videos the config asks for, as the manifest records it."""
    if cfg.split_by == "source":
        return {"by": "source", **source_split(source)}
    train, val = split_videos(
        [v.id for v in source.dataset.videos], cfg.val_fraction, cfg.split_seed, source.annotations
    )
    return {"seed": cfg.split_seed, "val_fraction": cfg.val_fraction, "train": train, "val": val}


def split_videos(video_ids: list[int], val_fraction: float, seed: int, source: str) -> tuple[list[int], list[int]]:
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


def source_split(source: Source) -> dict[str, list[int]]:
    """The source's own train and val lists; every video in exactly one of them."""
    given = source.split or {}
    unknown = sorted(set(given) - set(SPLITS))
    if unknown:
        raise InputError(
            source.annotations, unknown[0], f"is not a split name; with split_by=source use {list(SPLITS)}"
        )
    train, val = set(given.get("train", [])), set(given.get("val", []))
    both = sorted(train & val)
    if both:
        name = source.paths[both[0]]
        raise InputError(source.annotations, name, "is listed in both the train and the val video lists")
    if not train:
        raise InputError(source.annotations, "train", "no training video; list some in the train image set")
    return {"train": sorted(train), "val": sorted(val)}


def val_count(num_videos: int, val_fraction: float) -> int:
    """Videos held out: the rounded share, but at least one whenever val_fraction > 0."""
    return 0 if val_fraction == 0 else max(1, round(num_videos * val_fraction))


def stage_settings(cfg: DataPrepConfig) -> StageSettings:
    """What the staging workers need from the config."""
    return StageSettings(cfg.resize_max_side, cfg.frame_format, cfg.jpeg_quality, cfg.cache_dir)


# ---------------------------------------------------------------------------- the published files


def write_dataset_files(
    out_dir: Path,
    staged: list[StagedVideo],
    categories: list[Category],
    source: dict[str, Any],
    split: dict[str, Any],
) -> dict[str, Any]:
    """Write the split annotations, the frame-level COCO GT and, last, the manifest; return the manifest."""
    dataset = VideoDataset(
        videos=[s.video for s in staged], tracks=[t for s in staged for t in s.tracks], categories=list(categories)
    )
    train, val = dataset.subset(split["train"]), dataset.subset(split["val"])
    files = {rel: record for s in staged for rel, record in s.files.items()}
    for rel, obj in (
        ("train.json", to_json(train)),
        ("val.json", to_json(val)),
        ("val_frames_coco.json", frames_coco(val)),
    ):
        files[rel] = write_json_file(out_dir / rel, obj)
    counts = {
        "videos": len(dataset.videos),
        "train_videos": len(train.videos),
        "val_videos": len(val.videos),
        "frames": sum(v.length for v in dataset.videos),
        "tracks": len(dataset.tracks),
        "categories": len(dataset.categories),
        "val_frames": sum(v.length for v in val.videos),
        "negative_pairs": sum(len(v.negative_category_ids) for v in dataset.videos),
    }
    manifest = build_manifest(files, source, split, counts)
    write_json_file(out_dir / MANIFEST, manifest, indent=2)
    return manifest


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
    files: dict[str, dict[str, Any]], source: dict[str, Any], split: dict[str, Any], counts: dict[str, int]
) -> dict[str, Any]:
    """The manifest of the given files (rel -> size, sha256) and the id derived from them, the source and the format."""
    identity = {
        "format_version": FORMAT_VERSION,
        "files": sorted((rel, meta["sha256"]) for rel, meta in files.items()),
        "source": source,
        "split": split_identity(split),
    }
    return {
        "dataset_id": json_sha256(identity)[:16],
        "format_version": FORMAT_VERSION,
        # key-sorted, so the bytes do not depend on how the description was built (in process or read from a plan)
        "source": _sorted_keys(source),
        "split": _sorted_keys(split),
        "counts": counts,
        "files": dict(sorted(files.items())),
    }


def split_identity(split: dict[str, Any]) -> dict[str, Any]:
    """What of the split goes into the dataset id: how it was drawn (the lists follow from it and the source)."""
    if split.get("by") == "source":
        return {"by": "source"}
    return {"seed": split["seed"], "val_fraction": split["val_fraction"]}


def _sorted_keys(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def write_json_file(path: Path, obj: Any, indent: int | None = None) -> dict[str, Any]:
    """Write ``obj`` as JSON and return its manifest record."""
    separators = (",", ": ") if indent else (",", ":")
    data = (json.dumps(obj, indent=indent, separators=separators) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"size": len(data), "sha256": storage.sha256_bytes(data)}
