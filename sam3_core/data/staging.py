"""Staging videos for data prep: each video's frames decoded completely and written, its masks resampled.

Work is cut into tasks (a video's frames in chunks, its tracks in chunks of about
``MASKS_PER_TASK`` masks) run by a pool of forked worker processes; results come back in task
order and are assembled per video, so the output is the same for any number of workers. A
worker reports a bad input as plain values (`_Failure`) and the caller raises it as the
InputError it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import av
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from sam3_core import storage
from sam3_core.data.resample import check_frame_bytes, encode_frame, resample_mask, resize_frame
from sam3_core.data.sources import FrameFiles, Source, VideoFile, check_inside
from sam3_core.data.sources import mp4 as mp4_source
from sam3_core.data.ytvis import RLE, BBox, Track, Video, rle_area, rle_bbox
from sam3_core.errors import InputError, StorageError

# tasks: a video's frames in chunks of this many, its tracks in chunks of about this many masks
FRAMES_PER_TASK = 32
MASKS_PER_TASK = 512


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) with a long side above ``max_side`` scaled down to it; unchanged otherwise or for 0."""
    if max_side == 0 or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


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
    pending = Counter(task.video_id for task in tasks)
    files: dict[int, dict[str, dict[str, Any]]] = {v.id: {} for v in source.dataset.videos}
    tracks: dict[int, list[Track]] = {v.id: [] for v in source.dataset.videos}
    staging.mkdir(parents=True, exist_ok=True)
    _CURRENT = (source, settings, staging)
    try:
        with (
            _results(tasks, workers) as results,
            tqdm(total=len(pending), desc="stage videos", unit="video") as progress,
        ):
            for task, result in zip(tasks, results, strict=True):
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


@contextlib.contextmanager
def _results(tasks: list[_Task], workers: int) -> Iterator[Iterator[Any]]:
    """Each task's result, in task order: in this process, or from a pool of forked workers.

    A context, not a generator: when a bad video stops the staging, the pool is terminated right there.
    A generator's pool was terminated whenever the garbage collector (or the interpreter's exit) closed
    it, and that could hang in the pool's task-handler join (seen once in `make test`: 900 s).
    """
    if workers <= 1 or len(tasks) <= 1:
        yield map(_run_task, tasks)
        return
    with multiprocessing.get_context("fork").Pool(min(workers, len(tasks))) as pool:
        yield pool.imap(_run_task, tasks, chunksize=1)


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
    except MemoryError:
        what = f"{source.paths[task.video_id]} ({task.kind} {task.first} to {task.stop - 1})"
        return _Failure(
            source.annotations, what, "out of memory staging it: lower data_prep.workers or resize_max_side"
        )


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
        check_inside(frames.root, uri, source.annotations, path)
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
            # PyAV names the local copy of a remote video: the user knows the video by its URI
            raise InputError(
                source.annotations, path, f"{frames.uri}: {str(exc).replace(str(local), frames.uri)}"
            ) from exc


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
        if new_rle is None or box is None or rle_area(new_rle) == 0:
            segs.append(None)
            boxes.append(None)
            continue
        segs.append(new_rle)
        boxes.append(_scale_box(box, sx, sy, width, height, new_rle))
    return dataclasses.replace(
        track,
        segmentations=tuple(segs),
        bboxes=tuple(boxes),
        areas=tuple(rle_area(r) if r is not None else None for r in segs),
    )


def _scale_box(box: BBox, sx: float, sy: float, width: int, height: int, rle: RLE) -> BBox:
    """The box at the new size; a box that rounds to nothing (it was far smaller than its mask) becomes the mask's."""
    x0, y0 = box[0] * sx, box[1] * sy
    x1, y1 = min((box[0] + box[2]) * sx, width), min((box[1] + box[3]) * sy, height)
    scaled = (round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3))
    return scaled if scaled[2] > 0 and scaled[3] > 0 else rle_bbox(rle)
