"""Where data prep reads videos from: one loader per layout, all giving the same `Source`.

- ``ytvis``: YouTube-VIS 2019/2021 and OVIS: a JSON file and frame files below a root.
- ``saco``: SA-Co/VEval: YTVIS-like JSON plus ``video_np_pairs``; frame folders such as
  ``JPEGImages_24fps/<video>/<frame>.jpg``. Pairs with ``num_masklets: 0`` become the video's
  negative phrases.
- ``mp4``: video files decoded with PyAV at a chosen frame rate, annotated per frame index.
- ``synthetic``: the generated demo videos (written as a ``ytvis`` source first).
- ``davis``: a DAVIS 2017 folder (``JPEGImages/480p``, ``Annotations/480p``, ``ImageSets``); its
  objects are palette indices in per-frame PNGs (``sam3_core.data.sources.vos``).
- ``vos``: MOSE / YouTube-VOS (palette PNGs per frame) or SA-V (one PNG folder per object) layouts.

A loader validates the annotations (every bad value an InputError naming the file and JSON
path) and says how to get each video's frames; decoding and staging happen in data prep's
workers. With ``video_ids`` only those videos' masks are checked in depth (a shard's share).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from sam3_core import storage
from sam3_core.data import synthetic
from sam3_core.data.synthetic import SyntheticConfig
from sam3_core.data.ytvis import VideoDataset, read_annotation_json
from sam3_core.errors import InputError
from sam3_core.storage.local import local_path

if TYPE_CHECKING:
    from sam3_core.data.sources.vos import VosConfig

SOURCES = ("synthetic", "ytvis", "saco", "mp4", "davis", "vos")
# the layouts read from annotations (a file, or a folder for vos) and a root the frame names are relative to
FILE_SOURCES = ("ytvis", "saco", "mp4", "vos")


@dataclass(frozen=True)
class FrameFiles:
    """A video's frames are image files (JPEG, PNG, ...) at these names below ``root``."""

    root: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class VideoFile:
    """A video's frames are decoded from one video file; ``indices`` are the annotated frames at ``fps``."""

    uri: str
    fps: float
    indices: tuple[int, ...]


Frames = FrameFiles | VideoFile


@dataclass
class Source:
    """Validated annotations, how to read every video's frames, and what identifies the input."""

    annotations: str
    dataset: VideoDataset
    frames: dict[int, Frames]
    # video id -> JSON path of its entry ("videos[3]"), for errors about its frames
    paths: dict[int, str]
    description: dict[str, Any]
    # the source's own split (split name -> video ids), e.g. DAVIS's ImageSets; None when it has none
    split: dict[str, list[int]] | None = None


def check_inside(root: str, uri: str, annotations: str, path: str) -> None:
    """A local frame must lie below `root` once symlinks are followed: file names are confined to
    frames_root (no '..'), and a link must not take a file from elsewhere into the dataset unseen."""
    if storage.is_remote(root):
        return
    try:
        base, target = local_path(root).resolve(), local_path(uri).resolve()
    except (OSError, RuntimeError):  # a symlink loop: reading it fails with its own message
        return
    if not target.is_relative_to(base):
        raise InputError(
            annotations,
            path,
            f"{uri} leads to {target}, outside frames_root={root} (a symbolic link); copy the file into "
            "frames_root, or point frames_root at a folder that holds it",
        )


def json_sha256(obj: Any) -> str:
    """Checksum of a JSON document's content, independent of its formatting."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def describe(kind: str, annotations: str, raw: Any) -> dict[str, Any]:
    """What produced the dataset, free of machine-specific paths so equal inputs hash equally anywhere."""
    return {"kind": kind, "annotations": PurePosixPath(annotations).name, "annotations_sha256": json_sha256(raw)}


def load_source(
    kind: str,
    annotations: str,
    frames_root: str,
    fps: float,
    synthetic_cfg: SyntheticConfig,
    vos_cfg: VosConfig,
    scratch: Path,
    video_ids: Collection[int] | None = None,
) -> Source:
    """Read and validate the source ``kind``; synthetic videos are generated into ``scratch`` first."""
    from sam3_core.data.sources import mp4, saco, vos, ytvis

    if kind == "synthetic":
        path = synthetic.generate(synthetic_cfg, scratch)
        source = ytvis.load(str(path), str(path.parent), read_annotation_json(str(path)), video_ids)
        source.description = {"kind": "synthetic", "synthetic": dataclasses.asdict(synthetic_cfg)}
        return source
    if kind == "davis":
        return vos.load_davis(vos_cfg, video_ids)
    if kind == "vos":
        return vos.load_vos(annotations, frames_root, vos_cfg, video_ids)
    raw = read_annotation_json(annotations)
    if kind == "ytvis":
        return ytvis.load(annotations, frames_root, raw, video_ids)
    if kind == "saco":
        return saco.load(annotations, frames_root, raw, video_ids)
    if kind == "mp4":
        return mp4.load(annotations, frames_root, raw, fps, video_ids)
    raise ValueError(f"unknown source {kind!r}; use one of {list(SOURCES)}")
