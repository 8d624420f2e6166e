"""YouTube-VIS / SA-Co VEval style video datasets: typed model, strict validation, JSON writer.

Everything downstream (trainer, predictor, evaluators) reads this one normalised form: masks as
compressed RLE with `counts` as str, one entry per frame (null where the object is not
visible), areas measured on the mask. Validation names the file and the JSON path of the first
bad value, so a user can fix their export instead of debugging a training crash hours later.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pycocotools.mask as mask_util

from sam3_core import storage
from sam3_core.config_checks import is_int64
from sam3_core.errors import InputError, StorageError

RLE = dict[str, Any]
BBox = tuple[float, float, float, float]
TOP_LEVEL_KEYS = ("videos", "annotations", "categories")


@dataclass(frozen=True)
class Category:
    """A noun-phrase prompt (e.g. "red circle") and its id."""

    id: int
    name: str


@dataclass(frozen=True)
class Video:
    """One clip: frame files relative to a frames root, all of the same size.

    ``negative_category_ids``: phrases known to be absent from the whole video (SA-Co's
    ``video_np_pairs`` with ``num_masklets: 0``); training asks them as negative prompts.
    """

    id: int
    width: int
    height: int
    file_names: tuple[str, ...]
    negative_category_ids: tuple[int, ...] = ()

    @property
    def length(self) -> int:
        return len(self.file_names)


@dataclass(frozen=True)
class Track:
    """One object across all frames of its video; None entries mark frames where it is not visible."""

    id: int
    video_id: int
    category_id: int
    segmentations: tuple[RLE | None, ...]
    bboxes: tuple[BBox | None, ...]
    areas: tuple[float | None, ...]
    iscrowd: int = 0


@dataclass
class VideoDataset:
    """Videos, tracks and categories with id lookups."""

    videos: list[Video]
    tracks: list[Track]
    categories: list[Category]
    _videos_by_id: dict[int, Video] = field(init=False, repr=False)
    _tracks_by_video: dict[int, list[Track]] = field(init=False, repr=False)
    _categories_by_id: dict[int, Category] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._videos_by_id = {v.id: v for v in self.videos}
        self._categories_by_id = {c.id: c for c in self.categories}
        self._tracks_by_video = {v.id: [] for v in self.videos}
        for track in self.tracks:
            self._tracks_by_video[track.video_id].append(track)

    def video(self, video_id: int) -> Video:
        return self._videos_by_id[video_id]

    def category(self, category_id: int) -> Category:
        return self._categories_by_id[category_id]

    def tracks_of(self, video_id: int) -> list[Track]:
        return self._tracks_by_video[video_id]

    def subset(self, video_ids: list[int]) -> VideoDataset:
        """The given videos (in dataset order) with their tracks and all categories (ids stay aligned)."""
        keep = set(video_ids)
        return VideoDataset(
            videos=[v for v in self.videos if v.id in keep],
            tracks=[t for t in self.tracks if t.video_id in keep],
            categories=list(self.categories),
        )


def load_video_dataset(uri: str) -> VideoDataset:
    """Read and validate an annotation file from any storage URI."""
    return validate(read_annotation_json(uri), uri)


def read_annotation_json(uri: str) -> Any:
    """The parsed JSON document, or an InputError saying why the file cannot be used."""
    try:
        data = storage.read_bytes(uri)
    except StorageError as exc:
        raise InputError(uri, "$", f"cannot read the annotation file ({exc}); check the URI") from exc
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(uri, "$", f"not valid JSON ({exc}); export the annotations as UTF-8 JSON") from exc
    except RecursionError:
        raise InputError(uri, "$", "nested too deeply to read (thousands of levels of lists or objects)") from None


def validate(raw: Any, source: str, *, video_ids: Collection[int] | None = None) -> VideoDataset:
    """Check `raw` against the format and return it normalised.

    Raises InputError(source, json_path, message) on the first problem found. Frames are not
    opened here: data prep decodes every frame completely when it stages it. With ``video_ids``
    (a data prep shard's share) the masks of other videos are skipped: their annotations are
    checked for ids and references only and left out of the result.
    """
    if not isinstance(raw, dict):
        raise InputError(source, "$", f"expected a JSON object with keys {list(TOP_LEVEL_KEYS)}")
    for key in TOP_LEVEL_KEYS:
        if key not in raw:
            raise InputError(source, key, f"missing top-level key; expected keys {list(TOP_LEVEL_KEYS)}")
        if not isinstance(raw[key], list):
            raise InputError(source, key, "must be a list")
    checker = _Checker(source, None if video_ids is None else set(video_ids))
    categories = [checker.category(c, f"categories[{i}]") for i, c in enumerate(raw["categories"])]
    videos = [checker.video(v, f"videos[{i}]") for i, v in enumerate(raw["videos"])]
    tracks = [checker.track(a, f"annotations[{i}]") for i, a in enumerate(raw["annotations"])]
    return VideoDataset(videos=videos, tracks=[t for t in tracks if t is not None], categories=categories)


def to_json(dataset: VideoDataset) -> dict[str, Any]:
    """The dataset in the annotation format, with a fixed key order so written files are byte-stable."""
    return {
        "videos": [_video_json(v) for v in dataset.videos],
        "annotations": [
            {
                "id": t.id,
                "video_id": t.video_id,
                "category_id": t.category_id,
                "iscrowd": t.iscrowd,
                "segmentations": list(t.segmentations),
                "bboxes": [list(b) if b is not None else None for b in t.bboxes],
                "areas": list(t.areas),
            }
            for t in dataset.tracks
        ],
        "categories": [{"id": c.id, "name": c.name} for c in dataset.categories],
    }


def _video_json(video: Video) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": video.id,
        "width": video.width,
        "height": video.height,
        "length": video.length,
        "file_names": list(video.file_names),
    }
    if video.negative_category_ids:
        entry["negative_category_ids"] = list(video.negative_category_ids)
    return entry


def mask_to_rle(mask: np.ndarray) -> RLE:
    """Compressed RLE of a boolean HxW mask, `counts` as str (JSON-ready)."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: RLE) -> np.ndarray:
    """Boolean HxW mask of a compressed RLE."""
    return mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def rle_area(rle: RLE) -> float:
    return float(mask_util.area({"size": rle["size"], "counts": rle["counts"].encode("ascii")}))


def rle_bbox(rle: RLE) -> BBox:
    """Tight [x, y, w, h] box of a non-empty mask."""
    x, y, w, h = mask_util.toBbox({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
    return (float(x), float(y), float(w), float(h))


def rle_runs(counts: str) -> np.ndarray | None:
    """Run lengths (int64, zeros first) of a COCO compressed RLE string, None if the string is malformed.

    The same decoding as pycocotools' ``rleFrString`` (6-bit groups, sign bit, runs after the
    third stored as differences), vectorised; pycocotools itself accepts malformed strings
    silently, so this is also the validator.
    """
    try:
        raw = counts.encode("ascii")
    except UnicodeEncodeError:
        return None
    chars = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if chars.size == 0:
        return np.zeros(0, dtype=np.int64)
    if chars.min() < 0 or chars.max() >= 64:
        return None
    last = (chars & 0x20) == 0
    if not last[-1]:
        return None
    ends = np.flatnonzero(last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 7:  # more than 35 bits: no image has runs that long
        return None
    position = np.arange(chars.size) - np.repeat(starts, lengths)
    values = np.add.reduceat((chars & 0x1F) << (5 * position), starts)
    negative = (chars[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * lengths[negative])
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    if runs.min() < 0:
        return None
    return runs


def compressed_rle_total(counts: str) -> int | None:
    """Sum of the run lengths of a COCO compressed RLE string, None if the string is malformed.

    pycocotools decodes a too-short string without complaint (leaving pixels undefined), so the
    total is checked against height * width before the mask is trusted.
    """
    runs = rle_runs(counts)
    return None if runs is None else int(runs.sum())


class _Checker:
    """Validates entries in file order, remembering ids seen so far for duplicate/reference checks."""

    def __init__(self, source: str, keep: set[int] | None = None) -> None:
        self.source = source
        self.keep = keep
        self.videos: dict[int, Video] = {}
        self.category_ids: set[int] = set()
        self.category_names: dict[str, int] = {}
        self.track_ids: set[int] = set()

    def fail(self, path: str, message: str) -> InputError:
        return InputError(self.source, path, message)

    def entry(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, "must be a JSON object")
        return value

    def integer(self, obj: dict[str, Any], key: str, path: str) -> int:
        if key not in obj:
            raise self.fail(f"{path}.{key}", "missing")
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"{path}.{key}", f"must be an integer, got {value!r:.40}")
        if not is_int64(value):
            raise self.fail(f"{path}.{key}", f"{value} does not fit in 64 bits (ids and sizes must)")
        return value

    def positive(self, obj: dict[str, Any], key: str, path: str) -> int:
        value = self.integer(obj, key, path)
        if value <= 0:
            raise self.fail(f"{path}.{key}", f"must be positive, got {value}")
        return value

    def category(self, value: Any, path: str) -> Category:
        obj = self.entry(value, path)
        cid = self.integer(obj, "id", path)
        if cid in self.category_ids:
            raise self.fail(f"{path}.id", f"duplicate category id {cid}")
        name = obj.get("name")
        if not isinstance(name, str) or not name.strip():
            raise self.fail(f"{path}.name", "must be a non-empty noun phrase such as 'red circle'")
        name = name.strip()
        if name in self.category_names:
            raise self.fail(
                f"{path}.name", f"duplicate category name {name!r} (also id {self.category_names[name]}); merge them"
            )
        self.category_ids.add(cid)
        self.category_names[name] = cid
        return Category(id=cid, name=name)

    def video(self, value: Any, path: str) -> Video:
        obj = self.entry(value, path)
        vid = self.integer(obj, "id", path)
        if vid in self.videos:
            raise self.fail(f"{path}.id", f"duplicate video id {vid}")
        width = self.positive(obj, "width", path)
        height = self.positive(obj, "height", path)
        names = obj.get("file_names")
        if not isinstance(names, list) or not names:
            raise self.fail(f"{path}.file_names", "a video needs a non-empty list of frame file names")
        for j, name in enumerate(names):
            self.file_name(name, f"{path}.file_names[{j}]")
        if obj.get("length") is not None and self.integer(obj, "length", path) != len(names):
            raise self.fail(f"{path}.length", f"is {obj['length']} but file_names lists {len(names)} frames")
        negatives = self.negatives(obj.get("negative_category_ids", []), f"{path}.negative_category_ids")
        video = Video(id=vid, width=width, height=height, file_names=tuple(names), negative_category_ids=negatives)
        self.videos[vid] = video
        return video

    def negatives(self, value: Any, path: str) -> tuple[int, ...]:
        if not isinstance(value, list) or any(isinstance(c, bool) or not isinstance(c, int) for c in value):
            raise self.fail(path, f"must be a list of category ids, got {value!r}")
        for c in value:
            if c not in self.category_ids:
                raise self.fail(path, f"unknown category id {c}")
        if len(set(value)) != len(value):
            raise self.fail(path, "lists a category twice")
        return tuple(sorted(value))

    def file_name(self, name: Any, path: str) -> None:
        if not isinstance(name, str) or not name:
            raise self.fail(path, "must be a non-empty relative path")
        if "\x00" in name:
            raise self.fail(path, f"{name!r} holds a NUL byte; no file name can")
        if "://" in name or "\\" in name or any(seg in ("", ".", "..") for seg in name.split("/")):
            raise self.fail(
                path, f"{name!r} must be a relative path below frames_root (no leading '/', '..', '.' or '//')"
            )

    def track(self, value: Any, path: str) -> Track | None:
        obj = self.entry(value, path)
        tid = self.integer(obj, "id", path)
        if tid in self.track_ids:
            raise self.fail(f"{path}.id", f"duplicate annotation id {tid}")
        video_id = self.integer(obj, "video_id", path)
        if video_id not in self.videos:
            raise self.fail(f"{path}.video_id", f"unknown video id {video_id}")
        category_id = self.integer(obj, "category_id", path)
        if category_id not in self.category_ids:
            raise self.fail(f"{path}.category_id", f"unknown category id {category_id}")
        if category_id in self.videos[video_id].negative_category_ids:
            raise self.fail(
                f"{path}.category_id", f"category {category_id} is listed as absent from video {video_id} (a negative)"
            )
        if self.keep is not None and video_id not in self.keep:
            self.track_ids.add(tid)
            return None
        iscrowd = obj.get("iscrowd", 0)
        if isinstance(iscrowd, bool) or iscrowd not in (0, 1):
            raise self.fail(f"{path}.iscrowd", f"must be 0 or 1, got {iscrowd!r}")
        video = self.videos[video_id]
        segs = self.per_frame(obj, "segmentations", path, video, required=True)
        boxes = self.per_frame(obj, "bboxes", path, video, required=False)
        areas = self.per_frame(obj, "areas", path, video, required=False)
        out_segs: list[RLE | None] = []
        out_boxes: list[BBox | None] = []
        out_areas: list[float | None] = []
        for f in range(video.length):
            rle = self.segmentation(segs[f], f"{path}.segmentations[{f}]", video)
            if rle is not None and rle_area(rle) == 0:
                rle = None
            box = self.bbox(boxes[f], f"{path}.bboxes[{f}]", video) if boxes is not None else None
            if areas is not None:
                self.area(areas[f], f"{path}.areas[{f}]")
            if boxes is not None and (rle is None) != (box is None):
                raise self.fail(
                    f"{path}.bboxes[{f}]",
                    "must be null exactly where the segmentation is null or empty (object not visible)",
                )
            if rle is not None and box is None:
                box = rle_bbox(rle)
            out_segs.append(rle)
            out_boxes.append(box)
            out_areas.append(rle_area(rle) if rle is not None else None)
        self.track_ids.add(tid)
        return Track(
            id=tid,
            video_id=video_id,
            category_id=category_id,
            segmentations=tuple(out_segs),
            bboxes=tuple(out_boxes),
            areas=tuple(out_areas),
            iscrowd=int(iscrowd),
        )

    def per_frame(self, obj: dict[str, Any], key: str, path: str, video: Video, required: bool) -> list[Any] | None:
        if key not in obj and not required:
            return None
        values = obj.get(key)
        if not isinstance(values, list):
            raise self.fail(f"{path}.{key}", "must be a list with one entry (or null) per frame")
        if len(values) != video.length:
            raise self.fail(
                f"{path}.{key}", f"has {len(values)} entries but video {video.id} has {video.length} frames"
            )
        return values

    def bbox(self, value: Any, path: str, video: Video) -> BBox | None:
        if value is None:
            return None
        if not isinstance(value, list) or len(value) != 4 or not all(_is_number(v) for v in value):
            raise self.fail(path, f"must be [x, y, w, h] or null, got {value!r}")
        x, y, w, h = (float(v) for v in value)
        if w <= 0 or h <= 0:
            raise self.fail(path, f"width and height must be positive, got {value!r}")
        eps = 1e-6
        if x < -eps or y < -eps or x + w > video.width + eps or y + h > video.height + eps:
            raise self.fail(path, f"{value!r} lies outside the {video.width}x{video.height} frame")
        return (x, y, w, h)

    def area(self, value: Any, path: str) -> None:
        if value is not None and (not _is_number(value) or value < 0):
            raise self.fail(path, f"must be a non-negative number or null, got {value!r}")

    def segmentation(self, value: Any, path: str, video: Video) -> RLE | None:
        if value is None:
            return None
        if isinstance(value, dict):
            return self.rle(value, path, video)
        if isinstance(value, list):
            return self.polygons(value, path, video)
        raise self.fail(path, "must be an RLE object, a polygon list or null")

    def rle(self, value: dict[str, Any], path: str, video: Video) -> RLE:
        size, counts = value.get("size"), value.get("counts")
        if size != [video.height, video.width]:
            raise self.fail(
                f"{path}.size", f"is {size!r} but video {video.id} is [height, width] = [{video.height}, {video.width}]"
            )
        total = video.height * video.width
        if isinstance(counts, str):
            if compressed_rle_total(counts) != total:
                raise self.fail(f"{path}.counts", f"is not a compressed RLE of {total} pixels")
            return {"size": list(size), "counts": counts}
        if isinstance(counts, list) and all(_is_number(c) and int(c) == c and c >= 0 for c in counts):
            counts = [int(c) for c in counts]
            if sum(counts) != total:
                raise self.fail(f"{path}.counts", f"runs sum to {sum(counts)}, expected {total} pixels")
            rle = mask_util.frPyObjects({"size": list(size), "counts": counts}, video.height, video.width)
            return {"size": list(size), "counts": rle["counts"].decode("ascii")}
        raise self.fail(f"{path}.counts", "must be a compressed RLE string or a list of non-negative run lengths")

    def polygons(self, value: list[Any], path: str, video: Video) -> RLE:
        if not value:
            raise self.fail(path, "empty polygon list; use null for a frame where the object is not visible")
        for k, poly in enumerate(value):
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2 or not all(_is_number(v) for v in poly):
                raise self.fail(f"{path}[{k}]", "a polygon is a flat list [x1, y1, x2, y2, ...] of >= 3 points")
        rles = mask_util.frPyObjects([[float(v) for v in poly] for poly in value], video.height, video.width)
        merged = mask_util.merge(rles)
        if mask_util.area(merged) == 0:
            raise self.fail(
                path,
                f"the polygon lies outside the {video.width}x{video.height} frame (or has no area); "
                "use null where the object is not visible",
            )
        return {"size": [video.height, video.width], "counts": merged["counts"].decode("ascii")}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
