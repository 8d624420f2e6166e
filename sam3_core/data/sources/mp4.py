"""Video files (MP4 or anything FFmpeg reads) annotated per frame index, decoded with PyAV.

The annotation file is YTVIS-like, but a video names one file instead of a frame list:

    {"videos": [{"id": 1, "file_name": "cats/cat1.mp4", "width": 640, "height": 360,
                 "frame_indices": [0, 6, 12], "fps": 6}],          # or "length": 3 for frames 0, 1, 2
     "annotations": [... one entry (or null) per annotated frame, as in YTVIS ...],
     "categories": [...], "video_np_pairs": [...]}                 # pairs optional, as in SA-Co

Frame index i is the i-th frame of the video resampled to data prep's ``fps`` (0: every decoded
frame at the file's own rate): the frame on screen at time start + i / fps. A video entry's own
``fps``, when given, must equal that rate. Decoding checks every annotated index against the
frames the file really has, and the frame size against ``width`` / ``height``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np

from sam3_core import storage
from sam3_core.data.sources import Source, VideoFile, check_inside, describe
from sam3_core.data.sources.saco import negatives_from_pairs, with_negatives
from sam3_core.data.ytvis import validate
from sam3_core.errors import InputError

# a frame shown at time t covers output times within this many seconds before t (timestamp rounding)
_EPS_S = 1e-6


def load(annotations: str, frames_root: str, raw: Any, fps: float, video_ids: Collection[int] | None = None) -> Source:
    """The validated dataset; each video's frames are decoded from ``file_name`` below ``frames_root``."""
    converted, indices = _as_frame_lists(raw, annotations, fps)
    dataset = validate(converted, annotations, video_ids=video_ids)
    negatives = negatives_from_pairs(raw, dataset, annotations, required=False)
    if negatives or "video_np_pairs" in raw:
        dataset = with_negatives(dataset, negatives, {a["category_id"] for a in raw["annotations"]})
    files = {v["id"]: v["file_name"] for v in raw["videos"]}
    paths = {v.id: f"videos[{i}]" for i, v in enumerate(dataset.videos)}
    for video in dataset.videos:
        check_inside(
            frames_root, storage.join(frames_root, files[video.id]), annotations, f"{paths[video.id]}.file_name"
        )
    description = describe("mp4", annotations, raw)
    description["fps"] = fps
    return Source(
        annotations=annotations,
        dataset=dataset,
        frames={v.id: VideoFile(storage.join(frames_root, files[v.id]), fps, indices[v.id]) for v in dataset.videos},
        paths=paths,
        description=description,
    )


def _as_frame_lists(raw: Any, source: str, fps: float) -> tuple[Any, dict[int, tuple[int, ...]]]:
    """The annotation with each video's file turned into one name per annotated frame, and those frames' indices."""
    if not isinstance(raw, dict) or not isinstance(raw.get("videos"), list):
        return raw, {}  # validate names the problem
    videos, indices = [], {}
    for i, entry in enumerate(raw["videos"]):
        path = f"videos[{i}]"
        if not isinstance(entry, dict):
            videos.append(entry)
            continue
        name = entry.get("file_name")
        if not _relative_path(name):
            raise InputError(
                source, f"{path}.file_name", f"must be a video file path relative to frames_root, got {name!r}"
            )
        declared = entry.get("fps", fps)
        if isinstance(declared, bool) or not isinstance(declared, (int, float)) or not math.isclose(declared, fps):
            raise InputError(
                source,
                f"{path}.fps",
                f"is {declared!r} but data prep decodes at fps={fps}; set fps={declared} (0 = the file's own rate)",
            )
        wanted = _frame_indices(entry, path, source)
        indices[entry.get("id")] = wanted
        converted = {k: v for k, v in entry.items() if k not in ("file_name", "frame_indices", "fps")}
        converted["file_names"] = [f"{name}#{index}" for index in wanted]
        converted.pop("length", None)
        videos.append(converted)
    return {**raw, "videos": videos}, indices


def _relative_path(name: Any) -> bool:
    if not isinstance(name, str) or not name or "://" in name or "\\" in name or name.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def _frame_indices(entry: dict[str, Any], path: str, source: str) -> tuple[int, ...]:
    given = entry.get("frame_indices")
    if given is None:
        length = entry.get("length")
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise InputError(
                source, path, "give frame_indices (the annotated frames) or length (frames 0..length-1) as integers"
            )
        return tuple(range(length))
    if (
        not isinstance(given, list)
        or not given
        or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in given)
        or any(b <= a for a, b in itertools.pairwise(given))
    ):
        raise InputError(source, f"{path}.frame_indices", "must be a non-empty, increasing list of frame indices >= 0")
    length = entry.get("length")
    if length is not None and length != len(given):
        raise InputError(source, f"{path}.length", f"is {length!r} but frame_indices lists {len(given)} frames")
    return tuple(given)


def decode(path: Path, fps: float, indices: tuple[int, ...]) -> Iterator[tuple[int, np.ndarray]]:
    """(index, RGB uint8 frame) for each wanted index, in order.

    Raises ValueError (the caller names the video) when the file has no video stream or fewer
    frames than the last wanted index, and PyAV's errors when the file does not decode.
    """
    wanted = iter(indices)
    target = next(wanted, None)
    count = 0
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("the file has no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for index, frame in _resampled(container.decode(stream), stream, fps):
            count = index + 1
            while target is not None and target == index:
                yield index, frame.to_ndarray(format="rgb24")
                target = next(wanted, None)
            if target is None:
                return
    raise ValueError(f"frame index {target} is past the end: the video has {count} frame(s) at this frame rate")


def _resampled(frames: Iterator[av.VideoFrame], stream: Any, fps: float) -> Iterator[tuple[int, av.VideoFrame]]:
    """(output index, frame): every frame when fps is 0, else the frame on screen at start + i / fps."""
    if fps == 0:
        yield from enumerate(frames)
        return
    native = float(stream.average_rate or stream.guessed_rate or 0) or None
    index, start, shown, shown_at = 0, None, None, 0.0
    for position, frame in enumerate(frames):
        at = frame.time if frame.time is not None else position / (native or fps)
        if start is None:
            start = at
        while shown is not None and start + index / fps < at - _EPS_S:
            yield index, shown
            index += 1
        shown, shown_at = frame, at
    if shown is None or start is None:
        return
    end = shown_at + (1.0 / native if native else _EPS_S)
    while start + index / fps < end - _EPS_S:
        yield index, shown
        index += 1
