"""A video GT file (YT-VIS or SA-Co/VEval) and a video predictions file, read once and validated.

Every metric family works from the same :class:`VideoSet`: masklets with their per-frame boxes and
compressed masks as numpy arrays, grouped by (video, category). Nothing here is sized by the
category list: a GT with 51,248 phrases costs one dict of names, the work follows the masklets.

Accepted as published or dumped:

- GT: ``videos`` (``id``, ``height``, ``width``, ``file_names`` or ``length``), ``categories``
  (``id``, ``name``), ``annotations`` (``video_id``, ``category_id``, per-frame ``bboxes`` /
  ``segmentations`` / ``areas`` with ``null`` where the object is absent, ``iscrowd``, ``id``),
  and for SA-Co/VEval ``video_np_pairs`` (the phrases asked of each video, negatives included).
- Predictions: a list of masklets as sam3's video dumper (and our predict step) write them:
  ``video_id``, ``category_id``, ``score``, per-frame ``bboxes``, ``segmentations``, ``areas``.
  Absent frames may be ``null`` or, as sam3's dense dumps have them, a zero box with an empty mask.
  Semi-supervised (VOS) predictions also carry ``gt_id``: the id of the GT annotation whose mask
  prompted the object.

Masks may be compressed (``counts`` a string) or uncompressed (a list of run lengths, as YT-VIS
publishes); both are checked to decode to ``height * width`` pixels first (see :mod:`.rle`).
Anything malformed is an :class:`InputError` naming the file and the field.
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from sam3_core.config_checks import INT64_MAX, INT64_MIN
from sam3_core.errors import InputError
from sam3_core.evaluate.coco import check_box
from sam3_core.evaluate.rle import areas, first_malformed

Pair = tuple[int, int]  # (video id, category id)


@dataclass(frozen=True)
class Video:
    id: int
    length: int
    height: int
    width: int


@dataclass(eq=False)
class Masklet:
    """One GT or predicted object over a video."""

    index: int  # position in its file: annotations[index] or predictions[index]
    video_id: int
    category_id: int
    track_id: int  # GT: the annotation id; predictions: the position in the file
    score: float  # predictions; GT masklets have 1.0
    crowd: bool
    boxes: np.ndarray  # [T, 4] xywh, zeros where null
    box_null: np.ndarray  # [T] bool
    masks: list[dict[str, Any] | None]  # compressed RLEs, None where null
    mask_areas: np.ndarray  # [T] pixels, 0 where null
    areas: np.ndarray | None  # the file's `areas` [T] (NaN where null); None when the field is absent
    area: float = 0.0  # the mean area the COCO area ranges use (see video.py)
    tags: tuple[str, ...] = ()
    has_boxes: bool = True  # whether the entry carried `bboxes` / `segmentations` / `tags` at all
    has_masks: bool = True
    has_tags: bool = False
    has_id: bool = False  # GT: whether the annotation carried its `id`
    gt_id: int | None = None  # predictions: the GT annotation that prompted it (VOS), when given

    @property
    def box_zero(self) -> np.ndarray:
        """[T] frames whose box is null or all zeros (sam3's dense dumps mark absence so)."""
        return self.box_null | ~self.boxes.any(axis=1)


@dataclass
class VideoSet:
    """Validated GT and predictions, and the (video, category) pairs they touch."""

    videos: dict[int, Video]  # in GT file order
    category_names: dict[int, str]
    gt: list[Masklet]
    predictions: list[Masklet]
    # video_np_pairs as (video, category) in file order; None when the GT has no such list
    asked: list[Pair] | None
    gt_source: str
    predictions_source: str
    gt_by_pair: dict[Pair, list[Masklet]] = field(default_factory=dict)
    predictions_by_pair: dict[Pair, list[Masklet]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.gt_by_pair = _by_pair(self.gt)
        self.predictions_by_pair = _by_pair(self.predictions)

    @property
    def is_saco(self) -> bool:
        """SA-Co/VEval GT lists the phrases asked of every video (``video_np_pairs``)."""
        return self.asked is not None

    def videos_of(self, masklets: Iterable[Masklet]) -> dict[int, list[Masklet]]:
        out: dict[int, list[Masklet]] = {v: [] for v in self.videos}
        for m in masklets:
            out[m.video_id].append(m)
        return out


def _by_pair(masklets: Iterable[Masklet]) -> dict[Pair, list[Masklet]]:
    groups: dict[Pair, list[Masklet]] = defaultdict(list)
    for m in masklets:
        groups[m.video_id, m.category_id].append(m)
    return dict(groups)


def _is_int(value: Any) -> bool:
    """An integer that fits in 64 bits (numpy holds ids so)."""
    # the exact-type test first: ABC checks are slow enough to show on 51,248 categories
    if type(value) is int or (isinstance(value, numbers.Integral) and not isinstance(value, bool)):
        return INT64_MIN <= value <= INT64_MAX
    return False


def _is_number(value: Any) -> bool:
    return type(value) in (float, int) or (isinstance(value, numbers.Real) and not isinstance(value, bool))


def _videos(gt: dict[str, Any], source: str) -> dict[int, Video]:
    videos = gt.get("videos")
    if not isinstance(videos, list):
        raise InputError(
            source, "videos", "missing or not a list; a YT-VIS / SA-Co file needs videos, annotations, categories"
        )
    out: dict[int, Video] = {}
    for i, video in enumerate(videos):
        where = f"videos[{i}]"
        if not isinstance(video, dict) or not _is_int(video.get("id")):
            raise InputError(source, f"{where}.id", "missing or not an integer")
        names = video.get("file_names")
        length = len(names) if isinstance(names, list) else video.get("length")
        if not _is_int(length) or length < 1:
            raise InputError(source, where, "needs file_names (or length) with at least one frame")
        for key in ("height", "width"):
            if not _is_int(video.get(key)) or video[key] < 1:
                raise InputError(source, f"{where}.{key}", "missing or not a positive integer (masks must match it)")
        if video["id"] in out:
            raise InputError(source, f"{where}.id", f"duplicate video id {video['id']}")
        out[video["id"]] = Video(video["id"], length, video["height"], video["width"])
    return out


def _categories(gt: dict[str, Any], source: str) -> dict[int, str]:
    categories = gt.get("categories")
    if not isinstance(categories, list):
        raise InputError(source, "categories", "missing or not a list")
    try:  # the usual case in one pass (SA-Co lists 51,248 categories); anything odd is named below
        names = {c["id"]: c["name"] for c in categories}
        if (
            len(names) == len(categories)
            and all(type(i) is int and INT64_MIN <= i <= INT64_MAX for i in names)
            and all(type(n) is str for n in names.values())
        ):
            return names
    except (KeyError, TypeError):
        pass
    names = {}
    for i, category in enumerate(categories):
        if not isinstance(category, dict) or not _is_int(category.get("id")):
            raise InputError(source, f"categories[{i}].id", "missing or not an integer")
        if category["id"] in names:
            raise InputError(source, f"categories[{i}].id", f"duplicate category id {category['id']}")
        names[category["id"]] = str(category.get("name", category["id"]))
    return names


def _asked_pairs(gt: dict[str, Any], videos: dict[int, Video], names: dict[int, str], source: str) -> list[Pair] | None:
    pairs = gt.get("video_np_pairs")
    if pairs is None:
        return None
    if not isinstance(pairs, list):
        raise InputError(source, "video_np_pairs", "not a list of {video_id, category_id} objects")
    out = []
    for i, pair in enumerate(pairs):
        where = f"video_np_pairs[{i}]"
        if not isinstance(pair, dict):
            raise InputError(source, where, "expected an object with video_id and category_id")
        if pair.get("video_id") not in videos:
            raise InputError(source, f"{where}.video_id", f"unknown video id {pair.get('video_id')!r}")
        if pair.get("category_id") not in names:
            raise InputError(source, f"{where}.category_id", f"unknown category id {pair.get('category_id')!r}")
        out.append((pair["video_id"], pair["category_id"]))
    return out


def _frames(entry: dict[str, Any], key: str, video: Video, source: str, where: str) -> list[Any]:
    values = entry.get(key)
    if not isinstance(values, list):
        raise InputError(source, f"{where}.{key}", "missing or not a list (one entry or null per frame)")
    if len(values) != video.length:
        raise InputError(source, f"{where}.{key}", f"has {len(values)} entries but the video has {video.length} frames")
    return values


def _boxes(values: list[Any], source: str, field: str) -> tuple[np.ndarray, np.ndarray]:
    """[T, 4] float boxes (zeros where null) and the null flags, validated in one numpy pass."""
    null = np.array([box is None for box in values], dtype=bool)
    try:
        boxes = np.array([box if box is not None else (0.0, 0.0, 0.0, 0.0) for box in values], dtype=float)
        valid = boxes.shape == (len(values), 4) and bool(np.isfinite(boxes).all()) and bool((boxes[:, 2:] >= 0).all())
    except (TypeError, ValueError):
        valid = False
    if not valid:
        for t, box in enumerate(values):  # check_box names the first bad box precisely
            if box is not None:
                check_box(box, source, f"{field}[{t}]")
        raise InputError(source, field, "expected one [x, y, width, height] or null per frame")
    return boxes, null


def _areas(values: list[Any], source: str, field: str) -> np.ndarray:
    if not all(a is None or (_is_number(a) and math.isfinite(a)) for a in values):
        raise InputError(source, field, "expected finite numbers or null, one per frame")
    return np.array([np.nan if a is None else float(a) for a in values], dtype=float)


@dataclass
class _MaskRefs:
    """Every mask of a file, checked and measured with one C call for the whole file."""

    rles: list[Any] = field(default_factory=list)
    fields: list[str] = field(default_factory=list)
    sizes: list[list[int]] = field(default_factory=list)
    owners: list[tuple[list[Any], int]] = field(default_factory=list)

    def add(self, rle: Any, video: Video, field_name: str, owner: list[Any], t: int) -> None:
        self.rles.append(rle)
        self.fields.append(field_name)
        self.sizes.append([video.height, video.width])
        self.owners.append((owner, t))

    def resolve(self, source: str) -> list[float]:
        """Check every RLE, compress list counts, write them into their masklets; return the areas."""
        bad = first_malformed(self.rles)
        if bad is not None:
            raise InputError(source, self.fields[bad[0]], bad[1])
        compressed = []
        for rle, size, field_name, (owner, t) in zip(self.rles, self.sizes, self.fields, self.owners):
            if list(rle["size"]) != size:
                raise InputError(
                    source, f"{field_name}.size", f"{rle['size']} is not the video's [height, width] {size}"
                )
            if isinstance(rle["counts"], list):
                rle = mask_utils.frPyObjects({"size": size, "counts": rle["counts"]}, size[0], size[1])
                rle = {"size": size, "counts": rle["counts"]}
            compressed.append(rle)
            owner[t] = rle
        return areas(compressed).tolist()


def _masklet(
    raw: Any,
    index: int,
    videos: dict[int, Video],
    names: dict[int, str],
    masks: _MaskRefs,
    source: str,
    where: str,
    is_gt: bool,
) -> Masklet:
    if not isinstance(raw, dict):
        raise InputError(source, where, "expected an object")
    video = videos.get(raw.get("video_id"))  # type: ignore[arg-type]
    if video is None:
        raise InputError(source, f"{where}.video_id", f"unknown video id {raw.get('video_id')!r}: not in the GT")
    if raw.get("category_id") not in names:
        raise InputError(source, f"{where}.category_id", f"category {raw.get('category_id')!r} is not in the GT")
    score = 1.0
    if not is_gt:
        score = raw.get("score")
        if not _is_number(score) or not math.isfinite(score):
            raise InputError(source, f"{where}.score", f"must be a finite number, got {score!r:.40}")
    track_id = index
    if is_gt and "id" in raw:
        if not _is_int(raw["id"]):
            raise InputError(source, f"{where}.id", "not an integer")
        track_id = raw["id"]
    gt_id = raw.get("gt_id") if not is_gt else None
    if gt_id is not None and not _is_int(gt_id):
        raise InputError(source, f"{where}.gt_id", f"must be the integer id of a GT annotation, got {gt_id!r:.40}")
    if "bboxes" in raw:
        boxes, box_null = _boxes(_frames(raw, "bboxes", video, source, where), source, f"{where}.bboxes")
    else:
        boxes, box_null = np.zeros((video.length, 4)), np.ones(video.length, dtype=bool)
    frame_masks: list[Any] | None = None
    if "segmentations" in raw:
        frame_masks = list(_frames(raw, "segmentations", video, source, where))
        for t, rle in enumerate(frame_masks):
            if rle is not None:
                masks.add(rle, video, f"{where}.segmentations[{t}]", frame_masks, t)
    areas = _areas(_frames(raw, "areas", video, source, where), source, f"{where}.areas") if "areas" in raw else None
    crowd = raw.get("iscrowd", 0)
    if crowd not in (0, 1, True, False):
        raise InputError(source, f"{where}.iscrowd", f"expected 0 or 1, got {crowd!r:.40}")
    tags = raw.get("tags", ())
    masklet = Masklet(
        index=index,
        video_id=video.id,
        category_id=raw["category_id"],
        track_id=track_id,
        score=float(score),
        crowd=bool(crowd),
        boxes=boxes,
        box_null=box_null,
        masks=frame_masks or [None] * video.length,
        mask_areas=np.zeros(video.length),
        areas=areas,
        tags=tuple(tags) if isinstance(tags, (list, tuple)) else (),
        has_boxes="bboxes" in raw,
        has_masks=frame_masks is not None,
        has_tags="tags" in raw,
        has_id=is_gt and "id" in raw,
        gt_id=gt_id,
    )
    return masklet


def _fill_mask_areas(masklets: Sequence[Masklet], areas: list[float]) -> None:
    it = iter(areas)
    for m in masklets:
        for t, rle in enumerate(m.masks):
            if rle is not None:
                m.mask_areas[t] = next(it)


def _read(
    entries: list[Any], videos: dict[int, Video], names: dict[int, str], source: str, prefix: str, is_gt: bool
) -> list[Masklet]:
    masks = _MaskRefs()
    out = []
    for i, raw in enumerate(entries):
        out.append(_masklet(raw, i, videos, names, masks, source, f"{prefix}[{i}]", is_gt))
    _fill_mask_areas(out, masks.resolve(source))
    return out


def _gt_area(m: Masklet) -> float:
    """YT-VIS: the mean of the annotation's ``areas`` (null = 0), else of its mask areas."""
    if m.areas is not None:
        return float(np.mean(np.nan_to_num(m.areas, nan=0.0)))
    return float(np.mean(m.mask_areas))


def _prediction_area(m: Masklet, has_boxes: bool) -> float:
    """sam3's loadRes: the mean box area (null = 0) when predictions carry boxes, else ``areas`` or mask areas."""
    if has_boxes:
        return float(np.mean(m.boxes[:, 2] * m.boxes[:, 3]))
    if m.areas is not None:
        return float(np.mean(np.nan_to_num(m.areas, nan=0.0)))
    return float(np.mean(m.mask_areas))


def read_video_set(gt: Any, predictions: Any, *, gt_source: str, predictions_source: str) -> VideoSet:
    """Validate and index a video GT and its predictions (see the module docstring)."""
    if not isinstance(gt, dict):
        raise InputError(gt_source, "(root)", "expected a YT-VIS / SA-Co object with videos, annotations, categories")
    videos = _videos(gt, gt_source)
    names = _categories(gt, gt_source)
    annotations = gt.get("annotations")
    if not isinstance(annotations, list):
        raise InputError(gt_source, "annotations", "missing or not a list")
    if not isinstance(predictions, list):
        raise InputError(
            predictions_source, "(root)", f"expected a list of video predictions, got {type(predictions).__name__}"
        )
    gt_masklets = _read(annotations, videos, names, gt_source, "annotations", is_gt=True)
    seen: dict[int, int] = {}
    for m in gt_masklets:
        if "id" in annotations[m.index]:
            # unique over the whole file, as YT-VIS and SA-Co number them: predictions name GT objects by it (gt_id)
            if m.track_id in seen:
                raise InputError(
                    gt_source,
                    f"annotations[{m.index}].id",
                    f"duplicate id {m.track_id} (also annotations[{seen[m.track_id]}]'s): ids must be unique",
                )
            seen[m.track_id] = m.index
        m.area = _gt_area(m)
    predicted = _read(predictions, videos, names, predictions_source, "", is_gt=False)
    has_boxes = any(p.get("bboxes") for p in predictions[:1] if isinstance(p, dict))
    for m in predicted:
        m.area = _prediction_area(m, has_boxes and "bboxes" in predictions[m.index])
    return VideoSet(
        videos=videos,
        category_names=names,
        gt=gt_masklets,
        predictions=predicted,
        asked=_asked_pairs(gt, videos, names, gt_source),
        gt_source=gt_source,
        predictions_source=predictions_source,
    )


def require(data: VideoSet, key: str, why: str) -> None:
    """Every GT annotation and prediction must carry per-frame ``key`` (bboxes or segmentations) for ``why``."""
    flag = "has_boxes" if key == "bboxes" else "has_masks"
    for source, prefix, masklets in (
        (data.gt_source, "annotations", data.gt),
        (data.predictions_source, "", data.predictions),
    ):
        missing = next((m for m in masklets if not getattr(m, flag)), None)
        if missing is not None:
            raise InputError(source, f"{prefix}[{missing.index}].{key}", f"missing; {why} needs it")
