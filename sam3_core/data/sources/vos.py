"""Semi-supervised VOS layouts: per-frame PNG annotations where each object is a palette index or a folder.

Two layouts below an annotation folder, one sub-folder per video, found per video:

- **indexed** (DAVIS 2017, MOSE, YouTube-VOS): ``<video>/<frame>.png``, a palette ("P") or
  greyscale ("L") PNG whose pixel value is the object's index (0 background, 255 void, as in
  DAVIS's own evaluation: neither is an object);
- **per object** (SA-V val/test): ``<video>/<object>/<frame>.png``, one binary PNG per object and
  frame, ``<object>`` an integer folder name (``000``, ``001``, ...); a frame missing from an
  object's folder is a frame where that object is not visible.

A video's frames are the annotated ones (SA-V annotates every 4th frame of ``JPEGImages_24fps``,
YouTube-VOS every 5th), each found under the frames folder as ``<video>/<frame>.<jpg|jpeg|png>``;
sets annotated on the first frame only (DAVIS test-dev, MOSE valid) give one-frame videos, of no use
for training or J&F. Videos get ids 1..N in name order, objects keep their identity across frames as
tracks with id ``video_id * 1000 + index`` (the palette index, or the object folder's number + 1),
so an id says which video and object it is.

VOS objects have no class: every object gets one category, ``vos.category`` (default "object"),
which is what the detector is prompted with; the tracker and the J&F metrics ignore it.

``source=davis`` reads a DAVIS 2017 folder (``JPEGImages/<resolution>``, ``Annotations/<resolution>``,
``ImageSets/<image set>.txt``); the videos are those its image sets list, and each image set named
``.../train`` or ``.../val`` is that split of the dataset when data prep's ``split_by=source``.
``source=vos`` reads any folder pair (``annotations``, ``frames_root``), optionally limited to the
videos a list file names (``vos.video_list``, e.g. SAM2's ``MOSE_sample_train_list.txt``).
"""

from __future__ import annotations

import io
import logging
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from sam3_core import storage
from sam3_core.config_checks import check_choice, check_str, check_str_list, fail
from sam3_core.data.sources import FrameFiles, Source, json_sha256
from sam3_core.data.ytvis import Category, Track, Video, VideoDataset, mask_to_rle, rle_area, rle_bbox
from sam3_core.errors import InputError, StorageError

log = logging.getLogger(__name__)

# track id = video id * OBJECTS_PER_VIDEO + object index
OBJECTS_PER_VIDEO = 1000
VOID_INDEX = 255
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
CATEGORY_ID = 1
DAVIS_RESOLUTIONS = ("480p", "Full-Resolution")
# PNG modes whose pixel values are object indices (indexed) or mask values (per object)
INDEX_MODES = ("P", "L", "1", "I", "I;16")


@dataclass
class VosConfig:
    """Where PNG-annotated VOS data is (``source=davis`` or ``source=vos``) and what its objects are called."""

    # source=davis: the DAVIS folder holding JPEGImages/, Annotations/ and ImageSets/
    root: str = ""
    # source=davis: video lists below ImageSets/ (without .txt); their videos are read
    image_sets: list[str] = field(default_factory=lambda: ["2017/train", "2017/val"])
    # source=davis: the resolution folder below JPEGImages/ and Annotations/
    resolution: str = "480p"
    # source=vos: a text file naming the videos to read, one per line (empty: every video folder)
    video_list: str = ""
    # the noun phrase of every VOS object (VOS annotations have no classes)
    category: str = "object"

    def __post_init__(self) -> None:
        check_str("vos.root", self.root)
        check_str_list("vos.image_sets", self.image_sets)
        if not self.image_sets:
            fail("vos.image_sets", self.image_sets, "at least one image set such as 2017/train")
        for name in self.image_sets:
            if not name or name.startswith("/") or name.endswith(".txt") or ".." in name.split("/"):
                fail("vos.image_sets", self.image_sets, "names below ImageSets/ without .txt, e.g. 2017/val")
        check_choice("vos.resolution", self.resolution, DAVIS_RESOLUTIONS)
        check_str("vos.video_list", self.video_list)
        check_str("vos.category", self.category, required=True)


@dataclass(frozen=True)
class _VideoFiles:
    """One video's annotation files: frame stem -> file (indexed), or object -> frame stem -> file."""

    name: str
    indexed: dict[str, str]
    per_object: dict[int, dict[str, str]]

    @property
    def stems(self) -> list[str]:
        if self.indexed:
            return sorted(self.indexed)
        return sorted({stem for frames in self.per_object.values() for stem in frames})


def load_davis(cfg: VosConfig, video_ids: Collection[int] | None = None) -> Source:
    """A DAVIS 2017 folder: the videos of ``cfg.image_sets``, split by image set name where it is train or val."""
    lists = {name: _video_list(storage.join(cfg.root, "ImageSets", f"{name}.txt")) for name in cfg.image_sets}
    names = sorted({video for videos in lists.values() for video in videos})
    annotations = storage.join(cfg.root, "Annotations", cfg.resolution)
    frames = storage.join(cfg.root, "JPEGImages", cfg.resolution)
    source = _load(annotations, frames, names, cfg.category, video_ids)
    ids = {name: vid for vid, name in _ids(names).items()}
    split: dict[str, list[int]] = {}
    for set_name, videos in lists.items():
        part = PurePosixPath(set_name).name
        split.setdefault(part, []).extend(ids[v] for v in videos)
    source.split = {part: sorted(set(videos)) for part, videos in split.items()}
    source.description = {
        "kind": "davis",
        "image_sets": list(cfg.image_sets),
        "resolution": cfg.resolution,
        "category": cfg.category,
        "listing_sha256": source.description["listing_sha256"],
    }
    return source


def load_vos(annotations: str, frames_root: str, cfg: VosConfig, video_ids: Collection[int] | None = None) -> Source:
    """Any indexed or per-object PNG layout: every video folder of ``annotations``, or those ``cfg.video_list`` names."""
    names = _video_list(cfg.video_list) if cfg.video_list else None
    source = _load(annotations, frames_root, names, cfg.category, video_ids)
    source.description = {
        "kind": "vos",
        "annotations": PurePosixPath(annotations.rstrip("/")).name,
        "video_list": PurePosixPath(cfg.video_list).name if cfg.video_list else "",
        "category": cfg.category,
        "listing_sha256": source.description["listing_sha256"],
    }
    return source


def _video_list(uri: str) -> list[str]:
    try:
        text = storage.read_text(uri)
    except StorageError as exc:
        raise InputError(uri, "$", f"cannot read the video list ({exc}); check the path") from exc
    names = [line.strip() for line in text.splitlines() if line.strip()]
    for number, name in enumerate(names, 1):
        if "/" in name or name in (".", ".."):
            raise InputError(uri, f"line {number}", f"{name!r} is not a video folder name")
    if not names:
        raise InputError(uri, "$", "lists no video")
    if len(set(names)) != len(names):
        raise InputError(uri, "$", "lists a video twice")
    return names


def _ids(names: list[str]) -> dict[int, str]:
    """Video id -> name: 1..N in name order."""
    return {index + 1: name for index, name in enumerate(sorted(names))}


def _listing(uri: str, what: str) -> list[str]:
    try:
        return storage.list_files(uri)
    except StorageError as exc:
        raise InputError(uri, "$", f"cannot list the {what} folder ({exc}); check the path") from exc


def _annotation_files(annotations: str, wanted: list[str] | None) -> dict[str, _VideoFiles]:
    """Each video's annotation files, from one listing of the annotation folder."""
    indexed: dict[str, dict[str, str]] = defaultdict(dict)
    per_object: dict[str, dict[int, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    for rel in _listing(annotations, "annotation"):
        path = PurePosixPath(rel)
        if path.suffix.lower() != ".png":
            continue
        parts = path.parts
        if len(parts) == 2:
            indexed[parts[0]][path.stem] = rel
        elif len(parts) == 3:
            if not parts[1].isdigit():
                raise InputError(annotations, rel, "an object folder must be named by its number (000, 001, ...)")
            per_object[parts[0]][int(parts[1]) + 1][path.stem] = rel
    names = sorted(set(indexed) | set(per_object))
    if wanted is not None:
        missing = [name for name in wanted if name not in indexed and name not in per_object]
        if missing:
            raise InputError(annotations, missing[0], "no annotation PNGs for this listed video")
        names = sorted(wanted)
    if not names:
        raise InputError(annotations, "$", "no <video>/<frame>.png or <video>/<object>/<frame>.png annotations")
    videos = {}
    for name in names:
        if name in indexed and name in per_object:
            raise InputError(
                annotations, name, "mixes <video>/<frame>.png and <video>/<object>/<frame>.png; use one layout"
            )
        objects = dict(per_object.get(name, {}))
        too_big = [index for index in objects if index >= OBJECTS_PER_VIDEO]
        if too_big:
            raise InputError(annotations, name, f"object folder {too_big[0] - 1} is above {OBJECTS_PER_VIDEO - 2}")
        videos[name] = _VideoFiles(name, dict(indexed.get(name, {})), objects)
    return videos


def _frame_files(frames_root: str, videos: dict[str, _VideoFiles], annotations: str) -> dict[str, tuple[str, ...]]:
    """Each video's frame file for every annotated frame, found by stem under the frames folder."""
    found: dict[tuple[str, str], str] = {}
    for rel in _listing(frames_root, "frames"):
        path = PurePosixPath(rel)
        if len(path.parts) == 2 and path.suffix.lower() in FRAME_SUFFIXES:
            found.setdefault((path.parts[0], path.stem), rel)
    names = {}
    for video in videos.values():
        files = []
        for stem in video.stems:
            rel = found.get((video.name, stem))
            if rel is None:
                raise InputError(
                    annotations,
                    f"{video.name}/{stem}.png",
                    f"is annotated but {frames_root} has no {video.name}/{stem}.jpg (or .png); check frames_root",
                )
            files.append(rel)
        names[video.name] = tuple(files)
    return names


def _read_png(annotations: str, rel: str) -> np.ndarray:
    uri = storage.join(annotations, rel)
    try:
        with Image.open(io.BytesIO(storage.read_bytes(uri))) as image:
            if image.mode not in INDEX_MODES:
                raise InputError(
                    annotations,
                    rel,
                    f"is a {image.mode} PNG; VOS annotations are palette (P) or greyscale (L) PNGs of object indices",
                )
            return np.array(image)
    except StorageError as exc:
        raise InputError(annotations, rel, f"cannot be read ({exc})") from exc
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise InputError(annotations, rel, f"is not a readable PNG ({exc})") from exc


def _size(annotations: str, rel: str) -> tuple[int, int]:
    """(width, height) of an annotation PNG from its header."""
    try:
        with Image.open(io.BytesIO(storage.read_bytes(storage.join(annotations, rel)))) as image:
            return image.size
    except StorageError as exc:
        raise InputError(annotations, rel, f"cannot be read ({exc})") from exc
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise InputError(annotations, rel, f"is not a readable PNG ({exc})") from exc


def _object_masks(annotations: str, video: _VideoFiles, size: tuple[int, int]) -> dict[int, list[np.ndarray | None]]:
    """Object index -> its mask on each annotated frame (None where it is not visible)."""
    stems = video.stems
    masks: dict[int, list[np.ndarray | None]] = {}

    def checked(rel: str) -> np.ndarray:
        array = _read_png(annotations, rel)
        if (array.shape[1], array.shape[0]) != size:
            raise InputError(
                annotations,
                rel,
                f"is {array.shape[1]}x{array.shape[0]} but the video's first annotation is {size[0]}x{size[1]}",
            )
        return array

    if video.indexed:
        for t, stem in enumerate(stems):
            array = checked(video.indexed[stem])
            for index in np.unique(array).tolist():
                if index in (0, VOID_INDEX):
                    continue
                masks.setdefault(int(index), [None] * len(stems))[t] = array == index
        return dict(sorted(masks.items()))
    for index, frames in sorted(video.per_object.items()):
        masks[index] = [checked(frames[stem]) > 0 if stem in frames else None for stem in stems]
    return masks


def _track(track_id: int, video_id: int, masks: list[np.ndarray | None]) -> Track:
    rles = [mask_to_rle(m) if m is not None and m.any() else None for m in masks]
    return Track(
        id=track_id,
        video_id=video_id,
        category_id=CATEGORY_ID,
        segmentations=tuple(rles),
        bboxes=tuple(rle_bbox(r) if r is not None else None for r in rles),
        areas=tuple(rle_area(r) if r is not None else None for r in rles),
    )


def _load(
    annotations: str, frames_root: str, names: list[str] | None, category: str, video_ids: Collection[int] | None
) -> Source:
    """The source of the listed (or all) videos; masks decoded for ``video_ids`` only when given."""
    files = _annotation_files(annotations, names)
    frames = _frame_files(frames_root, files, annotations)
    ids = _ids(list(files))
    keep = set(ids) if video_ids is None else set(video_ids)
    videos: list[Video] = []
    tracks: list[Track] = []
    for vid, name in tqdm(ids.items(), desc="read VOS annotations", unit="video", disable=not keep):
        video_files = files[name]
        first = video_files.indexed or next(iter(video_files.per_object.values()))
        width, height = _size(annotations, first[min(first)])
        videos.append(Video(id=vid, width=width, height=height, file_names=frames[name]))
        if vid not in keep:
            continue
        for index, masks in _object_masks(annotations, video_files, (width, height)).items():
            track = _track(vid * OBJECTS_PER_VIDEO + index, vid, masks)
            if any(s is not None for s in track.segmentations):
                tracks.append(track)
    listing = {name: files[name].stems for name in sorted(files)}
    return Source(
        annotations=annotations,
        dataset=VideoDataset(videos=videos, tracks=tracks, categories=[Category(CATEGORY_ID, category)]),
        frames={v.id: FrameFiles(frames_root, v.file_names) for v in videos},
        paths={vid: name for vid, name in ids.items()},
        description={"listing_sha256": json_sha256(listing)},
    )
