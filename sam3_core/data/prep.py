"""Data prep: turn a source into a content-addressed, published dataset, on one machine or sharded.

Everything is validated and staged before a single object is published, so a bad input never
leaves a half dataset in the store. Each video is staged on its own (frames decoded completely,
resized, re-encoded or copied; masks resampled) by a pool of worker processes, and the
results are assembled in the source's video order, so the output does not depend on the
number of workers, nor on the number of shards when the pipeline spreads the videos over pods
(``plan_shards`` -> ``prepare_shard`` per shard -> ``merge_shards``). The dataset id hashes the
staged files, the source description and ``FORMAT_VERSION``: the same inputs and settings give
the same id and the same bytes, so KFP caching and MLflow lineage can rely on it.

Format version 2 (this module) against 1: resized frames are JPEG (``frame_format=jpeg``,
quality ``jpeg_quality``) instead of PNG, decoded with libjpeg's DCT scaling before the same
bilinear resize; frames are only ever scaled down; masks are the same as version 1's; a
video's negative phrases are kept; annotations are listed video by video.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import av
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from sam3_core import storage
from sam3_core.data import synthetic
from sam3_core.data.resample import check_frame_bytes, encode_frame, resample_mask, resize_frame
from sam3_core.data.sources import FILE_SOURCES, SOURCES, FrameFiles, Source, VideoFile, json_sha256, load_source
from sam3_core.data.sources import mp4 as mp4_source
from sam3_core.data.synthetic import SyntheticConfig
from sam3_core.data.ytvis import (
    RLE,
    BBox,
    Category,
    Track,
    Video,
    VideoDataset,
    rle_area,
    rle_bbox,
    to_json,
)
from sam3_core.errors import ConfigError, InputError, Sam3PipeError, StorageError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
FRAME_FORMATS = ("jpeg", "png")
# JPEG cannot hold a larger side; a larger resize_max_side would mean "keep" anyway
MAX_SIDE_LIMIT = 65500
MAX_FPS = 1000.0
MAX_WORKERS = 1024
# bytes per frame pixel a worker holds at its peak (RGB decode, mask crop, integral image, coverage)
STAGE_BYTES_PER_PIXEL = 16
# tasks: a video's frames in chunks of this many, its tracks in chunks of about this many masks
FRAMES_PER_TASK = 32
MASKS_PER_TASK = 512
PARTS = ".parts"
PLAN = "plan.json"
REPORT = "report.json"
RESULT = "result.json"


def _default_store() -> str:
    return os.environ.get("SAM3PIPE_STORE") or ".sam3pipe/store"


@dataclass
class DataPrepConfig:
    """Where the data comes from, how frames are resized and written, how videos are split."""

    # synthetic | ytvis (YouTube-VIS 2019/2021, OVIS) | saco (SA-Co/VEval) | mp4 (video files)
    source: str = "synthetic"
    # file sources: URI of the annotation JSON, and the root its frame / video file names are relative to
    annotations: str = ""
    frames_root: str = ""
    # mp4 only: the frame rate the annotation's frame indices count at; 0 = every frame at the file's own rate
    fps: float = 0.0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    # frames with a longer side are scaled down to this many pixels (masks and boxes with them); 0 keeps all sizes
    resize_max_side: int = 0
    # how re-encoded frames (resized, or decoded from video files) are written: "jpeg" or lossless "png";
    # frames kept at their size are copied byte for byte
    frame_format: str = "jpeg"
    jpeg_quality: int = 90
    # share of videos held out for validation (split by video, never by frame)
    val_fraction: float = 0.25
    split_seed: int = 0
    store: str = field(default_factory=_default_store)
    # where remote source files are cached locally (kept for the next run); None: read without keeping them
    cache_dir: str | None = None
    # processes staging videos in parallel; 0 = one per CPU core this process may use
    workers: int = 0

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
    """Validate, stage, hash and publish; reuse the published dataset when the id already exists."""
    check_config(cfg)
    with tempfile.TemporaryDirectory(prefix="sam3pipe-prep-") as tmp:
        source = _load(cfg, Path(tmp) / "source")
        split = _split(cfg, source)
        staging = Path(tmp) / "staging"
        staged = stage_videos(source, _settings(cfg, source), staging, worker_count(cfg))
        manifest = write_dataset_files(staging, staged, source.dataset.categories, describe(cfg, source), split)
        dest = storage.join(cfg.store, "datasets", manifest["dataset_id"])
        if storage.is_published(dest, MANIFEST):
            logger.info("dataset %s already published at %s; reusing it", manifest["dataset_id"], dest)
        else:
            storage.publish_dir(staging, dest, MANIFEST)
            logger.info("published dataset %s at %s", manifest["dataset_id"], dest)
    return PreparedDataset(uri=dest, dataset_id=manifest["dataset_id"])


def _load(cfg: DataPrepConfig, scratch: Path, video_ids: list[int] | None = None) -> Source:
    """The source, checked for what data prep needs beyond the format (categories, memory per frame)."""
    source = load_source(cfg.source, cfg.annotations, cfg.frames_root, cfg.fps, cfg.synthetic, scratch, video_ids)
    if not source.dataset.categories:
        raise InputError(
            source.annotations, "categories", "empty: a dataset needs at least one noun phrase to train on; add them"
        )
    budget = _available_memory() // worker_count(cfg)
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


def _available_memory() -> int:
    """Bytes this process can still use: MemAvailable, capped by a cgroup (container) limit."""
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit.isdigit():
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(available, 0)


def describe(cfg: DataPrepConfig, source: Source) -> dict[str, Any]:
    """The source description plus every setting that shapes the output: part of the dataset id."""
    description = dict(source.description)
    description["resize_max_side"] = cfg.resize_max_side
    description["frame_format"] = cfg.frame_format
    if cfg.frame_format == "jpeg":
        description["jpeg_quality"] = cfg.jpeg_quality
    return description


def _split(cfg: DataPrepConfig, source: Source) -> dict[str, Any]:
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


def val_count(num_videos: int, val_fraction: float) -> int:
    """Videos held out: the rounded share, but at least one whenever val_fraction > 0."""
    return 0 if val_fraction == 0 else max(1, round(num_videos * val_fraction))


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) with a long side above ``max_side`` scaled down to it; unchanged otherwise or for 0."""
    if max_side == 0 or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


# ---------------------------------------------------------------------------- staging one video


@dataclass(frozen=True)
class StageSettings:
    """What a worker needs besides the source (small and picklable)."""

    max_side: int
    frame_format: str
    jpeg_quality: int
    cache_dir: str | None


@dataclass
class StagedVideo:
    """One video as published: final frame names and size, rescaled tracks, and its frame files' checksums."""

    video: Video
    tracks: list[Track]
    files: dict[str, dict[str, Any]]


def _settings(cfg: DataPrepConfig, source: Source) -> StageSettings:
    return StageSettings(cfg.resize_max_side, cfg.frame_format, cfg.jpeg_quality, cfg.cache_dir)


@dataclass(frozen=True)
class _Task:
    """Frames [first, stop) or tracks [first, stop) of one video."""

    video_id: int
    kind: str
    first: int
    stop: int


@dataclass(frozen=True)
class _Failure:
    """An InputError raised in a worker, carried back as plain values (it pickles by its parts)."""

    source: str
    field: str
    message: str


# the work of the current stage_videos call; set before the pool forks, so workers inherit it
_CURRENT: tuple[Source, StageSettings, Path] | None = None


def _tasks(source: Source) -> list[_Task]:
    tasks = []
    for video in source.dataset.videos:
        frames = source.frames[video.id]
        step = video.length if isinstance(frames, VideoFile) else FRAMES_PER_TASK
        tasks += [_Task(video.id, "frames", i, min(i + step, video.length)) for i in range(0, video.length, step)]
        tracks = source.dataset.tracks_of(video.id)
        step = max(1, MASKS_PER_TASK // video.length)
        tasks += [_Task(video.id, "tracks", i, min(i + step, len(tracks))) for i in range(0, len(tracks), step)]
    return tasks


def stage_videos(source: Source, settings: StageSettings, staging: Path, workers: int) -> list[StagedVideo]:
    """Stage every video of ``source`` under ``staging/frames/<video id>/``, ``workers`` processes at a time."""
    global _CURRENT
    tasks = _tasks(source)
    pending = {v.id: sum(1 for t in tasks if t.video_id == v.id) for v in source.dataset.videos}
    files: dict[int, dict[str, dict[str, Any]]] = {v.id: {} for v in source.dataset.videos}
    tracks: dict[int, list[Track]] = {v.id: [] for v in source.dataset.videos}
    staging.mkdir(parents=True, exist_ok=True)
    _CURRENT = (source, settings, staging)
    try:
        with tqdm(total=len(pending), desc="stage videos", unit="video") as progress:
            progress.update(sum(1 for n in pending.values() if n == 0))
            for task, result in zip(tasks, _results(tasks, workers), strict=True):
                if isinstance(result, _Failure):
                    raise InputError(result.source, result.field, result.message)
                if task.kind == "frames":
                    files[task.video_id].update(result)
                else:
                    tracks[task.video_id].extend(result)
                pending[task.video_id] -= 1
                if pending[task.video_id] == 0:
                    progress.update(1)
    finally:
        _CURRENT = None
    staged = []
    for video in source.dataset.videos:
        width, height = target_size(video.width, video.height, settings.max_side)
        names = tuple(files[video.id])  # frame tasks ran in order, each in frame order
        after = dataclasses.replace(video, width=width, height=height, file_names=names)
        staged.append(StagedVideo(after, tracks[video.id], files[video.id]))
    return staged


def _results(tasks: list[_Task], workers: int) -> Iterator[Any]:
    """Each task's result, in task order: in this process, or from a pool of forked workers."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(_run_task, tasks)
        return
    with multiprocessing.get_context("fork").Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap(_run_task, tasks, chunksize=1)


def _run_task(task: _Task) -> Any:
    assert _CURRENT is not None, "stage_videos sets the work before running tasks"
    source, settings, staging = _CURRENT
    try:
        if task.kind == "frames":
            return _stage_frames(source, settings, staging, task)
        before = source.dataset.video(task.video_id)
        width, height = target_size(before.width, before.height, settings.max_side)
        return [
            rescale_track(t, before, width, height)
            for t in source.dataset.tracks_of(task.video_id)[task.first : task.stop]
        ]
    except InputError as exc:
        return _Failure(exc.source, exc.field, exc.message)


def _stage_frames(source: Source, settings: StageSettings, staging: Path, task: _Task) -> dict[str, dict[str, Any]]:
    video = source.dataset.video(task.video_id)
    frames = source.frames[video.id]
    if isinstance(frames, VideoFile):
        encoded = _decoded_frames(source, settings, video, frames)
    else:
        encoded = _file_frames(source, settings, video, frames, task.first, task.stop)
    records = {}
    for index, (data, suffix) in encoded:
        rel = f"frames/{video.id}/{index:05d}{suffix}"
        path = staging / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        records[rel] = {"size": len(data), "sha256": storage.sha256_bytes(data)}
    return records


def _file_frames(
    source: Source, settings: StageSettings, video: Video, frames: FrameFiles, first: int, stop: int
) -> Iterator[tuple[int, tuple[bytes, str]]]:
    """Frames read from image files: decoded completely, then copied as they are or resized and re-encoded."""
    width, height = target_size(video.width, video.height, settings.max_side)
    for index in range(first, stop):
        name = frames.names[index]
        path = f"{source.paths[video.id]}.file_names[{index}]"
        uri = storage.join(frames.root, name)
        try:
            data = _read(uri, settings.cache_dir)
        except StorageError as exc:
            raise InputError(
                source.annotations, path, f"frame {name!r} cannot be read ({exc}); check frames_root"
            ) from exc
        try:
            if (width, height) == (video.width, video.height):
                size = check_frame_bytes(data)
                out = (data, PurePosixPath(name).suffix.lower())
            else:
                image, size = resize_frame(data, width, height)
                out = encode_frame(image, settings.frame_format, settings.jpeg_quality)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise InputError(source.annotations, path, f"frame {uri} is not a readable image ({exc})") from exc
        if size != (video.width, video.height):
            raise InputError(
                source.annotations,
                path,
                f"frame {uri} is {size[0]}x{size[1]} but the video says {video.width}x{video.height}",
            )
        yield index, out


def _decoded_frames(
    source: Source, settings: StageSettings, video: Video, frames: VideoFile
) -> Iterator[tuple[int, tuple[bytes, str]]]:
    """The annotated frames of a video file, decoded at the source's frame rate and encoded as images."""
    width, height = target_size(video.width, video.height, settings.max_side)
    path = f"{source.paths[video.id]}.file_name"
    with tempfile.TemporaryDirectory(prefix="sam3pipe-video-") as tmp:
        try:
            local = _local_copy(frames.uri, settings.cache_dir, Path(tmp))
        except StorageError as exc:
            raise InputError(
                source.annotations, path, f"video {frames.uri} cannot be read ({exc}); check frames_root"
            ) from exc
        try:
            for position, (_, array) in enumerate(mp4_source.decode(local, frames.fps, frames.indices)):
                if array.shape[:2] != (video.height, video.width):
                    raise InputError(
                        source.annotations,
                        path,
                        f"{frames.uri} decodes to {array.shape[1]}x{array.shape[0]} frames but the video says "
                        f"{video.width}x{video.height}",
                    )
                image = Image.fromarray(array)
                if (width, height) != (video.width, video.height):
                    image = image.resize((width, height), Image.Resampling.BILINEAR)
                yield position, encode_frame(image, settings.frame_format, settings.jpeg_quality)
        except (av.FFmpegError, ValueError, OSError) as exc:
            raise InputError(source.annotations, path, f"{frames.uri}: {exc}") from exc


def _read(uri: str, cache_dir: str | None) -> bytes:
    if cache_dir is not None and storage.is_remote(uri):
        return storage.cached_path(uri, cache_dir).read_bytes()
    return storage.read_bytes(uri)


def _local_copy(uri: str, cache_dir: str | None, scratch: Path) -> Path:
    if not storage.is_remote(uri):
        return storage.cached_path(uri)
    if cache_dir is not None:
        return storage.cached_path(uri, cache_dir)
    local = scratch / PurePosixPath(uri).name
    storage.download_file(uri, local)
    return local


def rescale_track(track: Track, before: Video, width: int, height: int) -> Track:
    """Masks resampled (bilinear, kept where at least half covered), boxes scaled, areas measured on the new masks.

    A mask that vanishes at the new size marks the object as not visible in that frame.
    """
    if (width, height) == (before.width, before.height):
        return track
    sx, sy = width / before.width, height / before.height
    segs: list[RLE | None] = []
    boxes: list[BBox | None] = []
    for rle, box in zip(track.segmentations, track.bboxes, strict=True):
        new_rle = resample_mask(rle, width, height) if rle is not None else None
        visible = new_rle is not None and box is not None and rle_area(new_rle) > 0
        segs.append(new_rle if visible else None)
        boxes.append(_scale_box(box, sx, sy, width, height, new_rle) if visible else None)
    return dataclasses.replace(
        track,
        segmentations=tuple(segs),
        bboxes=tuple(boxes),
        areas=tuple(rle_area(r) if r is not None else None for r in segs),
    )


def _scale_box(box: BBox | None, sx: float, sy: float, width: int, height: int, rle: RLE | None) -> BBox:
    """The box at the new size; a box that rounds to nothing (it was far smaller than its mask) becomes the mask's."""
    assert box is not None and rle is not None
    x0, y0 = box[0] * sx, box[1] * sy
    x1, y1 = min((box[0] + box[2]) * sx, width), min((box[1] + box[3]) * sy, height)
    scaled = (round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3))
    return scaled if scaled[2] > 0 and scaled[3] > 0 else rle_bbox(rle)


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
        files[rel] = _write_json(out_dir / rel, obj)
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
    _write_json(out_dir / MANIFEST, manifest, indent=2)
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
        "split": {"seed": split["seed"], "val_fraction": split["val_fraction"]},
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


def _sorted_keys(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def _write_json(path: Path, obj: Any, indent: int | None = None) -> dict[str, Any]:
    """Write ``obj`` as JSON and return its manifest record."""
    separators = (",", ": ") if indent else (",", ":")
    data = (json.dumps(obj, indent=indent, separators=separators) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"size": len(data), "sha256": storage.sha256_bytes(data)}


# ---------------------------------------------------------------------------- sharded across pods


@dataclass(frozen=True)
class ShardPlan:
    """Where the plan lives in the store (``<store>/datasets/.parts/<key>``) and how many shards it has."""

    uri: str
    shards: int


def plan_shards(cfg: DataPrepConfig, shards: int) -> ShardPlan:
    """Check the source's structure and split its videos into ``shards`` balanced by frame count.

    Masks are not checked here (each shard checks its own); the plan, with the resolved config,
    is written to the store for the shards and the merge to read. The plan's folder is named
    after its content, so rerunning the same data prep finds the same plan, and once a merge
    has published its dataset (``result.json``), shards and merge reuse it instead of working.
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_WORKERS:
        raise ConfigError(f"data prep shards: must be an integer in [1, {MAX_WORKERS}], got {shards!r}")
    with tempfile.TemporaryDirectory(prefix="sam3pipe-plan-") as tmp:
        source = _load(cfg, Path(tmp), video_ids=[])
    plan = {
        "format_version": FORMAT_VERSION,
        "config": dataclasses.asdict(cfg),
        "description": describe(cfg, source),
        "categories": [{"id": c.id, "name": c.name} for c in source.dataset.categories],
        "videos": [v.id for v in source.dataset.videos],
        "split": _split(cfg, source),
        "shards": assign_shards(source.dataset.videos, shards),
    }
    uri = storage.join(cfg.store, "datasets", PARTS, json_sha256(plan)[:16])
    storage.write_json(storage.join(uri, PLAN), plan)
    logger.info("planned %d shard(s) of %d video(s) at %s", shards, len(plan["videos"]), uri)
    return ShardPlan(uri, shards)


def assign_shards(videos: list[Video], shards: int) -> list[list[int]]:
    """Video ids per shard: longest videos first to the shard with the fewest frames; each list in source order."""
    order = {v.id: i for i, v in enumerate(videos)}
    loads, parts = [0] * shards, [[] for _ in range(shards)]
    for video in sorted(videos, key=lambda v: (-v.length, order[v.id])):
        lightest = min(range(shards), key=lambda s: (loads[s], s))
        loads[lightest] += video.length
        parts[lightest].append(video.id)
    return [sorted(part, key=order.__getitem__) for part in parts]


def _read_plan(plan_uri: str) -> tuple[dict[str, Any], DataPrepConfig]:
    plan = storage.read_json(storage.join(plan_uri, PLAN))
    if plan.get("format_version") != FORMAT_VERSION:
        raise InputError(
            plan_uri, "format_version", f"plan of format {plan.get('format_version')}; run the plan step again"
        )
    config = dict(plan["config"])
    config["synthetic"] = SyntheticConfig(**config["synthetic"])
    return plan, DataPrepConfig(**config)


def _shard_uri(plan_uri: str, index: int) -> str:
    return storage.join(plan_uri, f"shard-{index:05d}")


def prepare_shard(plan_uri: str, index: int) -> str:
    """Stage shard ``index`` of the plan and publish its frames and report below the plan; return that URI."""
    plan, cfg = _read_plan(plan_uri)
    if not 0 <= index < len(plan["shards"]):
        raise InputError(plan_uri, "shards", f"no shard {index}; the plan has {len(plan['shards'])}")
    dest = _shard_uri(plan_uri, index)
    done = _merged(plan_uri)
    if done is not None:
        logger.info("the plan's dataset is already published at %s; shard %d has nothing to do", done.uri, index)
        return dest
    if storage.is_published(dest, REPORT):
        logger.info("shard %d already published at %s", index, dest)
        return dest
    ids = plan["shards"][index]
    with tempfile.TemporaryDirectory(prefix="sam3pipe-shard-") as tmp:
        source = _load(cfg, Path(tmp) / "source", video_ids=ids)
        if describe(cfg, source) != plan["description"]:
            raise InputError(source.annotations, "$", "changed since the plan step; run the whole data prep again")
        chosen = set(ids)
        source.dataset = VideoDataset(
            videos=[v for v in source.dataset.videos if v.id in chosen],
            tracks=[t for t in source.dataset.tracks if t.video_id in chosen],
            categories=source.dataset.categories,
        )
        staging = Path(tmp) / "staging"
        staged = stage_videos(source, _settings(cfg, source), staging, worker_count(cfg))
        report = to_json(VideoDataset([s.video for s in staged], [t for s in staged for t in s.tracks], []))
        report["files"] = {rel: record for s in staged for rel, record in s.files.items()}
        _write_json(staging / REPORT, report)
        storage.publish_dir(staging, dest, REPORT)
    logger.info("shard %d: %d video(s) published at %s", index, len(ids), dest)
    return dest


def merge_shards(plan_uri: str) -> PreparedDataset:
    """Check that every shard of the plan is complete, then publish the dataset with its manifest last."""
    plan, cfg = _read_plan(plan_uri)
    done = _merged(plan_uri)
    if done is not None:
        logger.info("dataset %s of this plan already published at %s; reusing it", done.dataset_id, done.uri)
        return done
    staged: dict[int, StagedVideo] = {}
    sources: dict[str, str | Path] = {}
    for index, ids in enumerate(plan["shards"]):
        part = _shard_uri(plan_uri, index)
        if not storage.is_published(part, REPORT):
            raise InputError(plan_uri, f"shard {index}", f"not published at {part}; run that shard (again) first")
        report = storage.read_json(storage.join(part, REPORT))
        shard_videos = _staged_from_report(report)
        if [s.video.id for s in shard_videos] != ids:
            raise InputError(part, REPORT, f"holds videos {[s.video.id for s in shard_videos]}, the plan says {ids}")
        present = set(storage.list_files(storage.join(part, "frames")))
        for video in shard_videos:
            for rel in video.files:
                if rel.removeprefix("frames/") not in present:
                    raise InputError(part, rel, "listed in the shard's report but missing; run that shard again")
                sources[rel] = storage.join(part, rel)
            staged[video.video.id] = video
    categories = [Category(c["id"], c["name"]) for c in plan["categories"]]
    with tempfile.TemporaryDirectory(prefix="sam3pipe-merge-") as tmp:
        out = Path(tmp)
        manifest = write_dataset_files(
            out, [staged[i] for i in plan["videos"]], categories, plan["description"], plan["split"]
        )
        dest = storage.join(cfg.store, "datasets", manifest["dataset_id"])
        if storage.is_published(dest, MANIFEST):
            logger.info("dataset %s already published at %s; reusing it", manifest["dataset_id"], dest)
        else:
            sources.update({rel: out / rel for rel in ("train.json", "val.json", "val_frames_coco.json")})
            storage.publish(sources, dest, MANIFEST, out / MANIFEST)
            logger.info(
                "published dataset %s at %s from %d shard(s)", manifest["dataset_id"], dest, len(plan["shards"])
            )
    storage.write_json(storage.join(plan_uri, RESULT), {"dataset_uri": dest, "dataset_id": manifest["dataset_id"]})
    for index in range(len(plan["shards"])):
        try:
            storage.delete_prefix(_shard_uri(plan_uri, index))
        except Sam3PipeError as exc:
            logger.warning("could not remove shard %d's part (%s); delete it by hand", index, exc)
    return PreparedDataset(uri=dest, dataset_id=manifest["dataset_id"])


def _merged(plan_uri: str) -> PreparedDataset | None:
    """The plan's dataset if a merge already published it (and it is still there)."""
    result_uri = storage.join(plan_uri, RESULT)
    if not storage.exists(result_uri):
        return None
    result = storage.read_json(result_uri)
    if not storage.is_published(result["dataset_uri"], MANIFEST):
        return None
    return PreparedDataset(uri=result["dataset_uri"], dataset_id=result["dataset_id"])


def _staged_from_report(report: dict[str, Any]) -> list[StagedVideo]:
    """The staged videos a shard reported (written by our own code, so read without re-validation)."""
    by_video: dict[int, list[Track]] = {}
    for ann in report["annotations"]:
        by_video.setdefault(ann["video_id"], []).append(
            Track(
                id=ann["id"],
                video_id=ann["video_id"],
                category_id=ann["category_id"],
                segmentations=tuple(ann["segmentations"]),
                bboxes=tuple(tuple(b) if b is not None else None for b in ann["bboxes"]),
                areas=tuple(ann["areas"]),
                iscrowd=ann["iscrowd"],
            )
        )
    staged = []
    for entry in report["videos"]:
        video = Video(
            id=entry["id"],
            width=entry["width"],
            height=entry["height"],
            file_names=tuple(entry["file_names"]),
            negative_category_ids=tuple(entry.get("negative_category_ids", ())),
        )
        files = {rel: report["files"][rel] for rel in video.file_names}
        staged.append(StagedVideo(video, by_video.get(video.id, []), files))
    return staged
