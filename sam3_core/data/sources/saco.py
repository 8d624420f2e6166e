"""SA-Co/VEval: YTVIS-like annotations plus ``video_np_pairs``, frames in per-video folders.

Every (video, noun phrase) pair the file lists is either positive (``num_masklets`` > 0: that
many annotated masklets) or negative (``num_masklets: 0``: the phrase is absent from the whole
video). Negatives become the video's ``negative_category_ids``, which training asks as extra
negative prompts. SA-Co files share one global category list across all subsets; the dataset
keeps only the phrases this file uses (in annotations or pairs), with their ids unchanged.
Frames: ``file_names`` such as ``sav_000000/00000.jpg`` below ``frames_root`` (e.g.
``media/saco_sav/JPEGImages_24fps``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Collection
from typing import Any

from sam3_core.data.sources import Source, describe, ytvis
from sam3_core.data.ytvis import VideoDataset
from sam3_core.errors import InputError


def load(annotations: str, frames_root: str, raw: Any, video_ids: Collection[int] | None = None) -> Source:
    """The YT-VIS source with per-video negatives; frames are ``file_names`` below ``frames_root``."""
    source = ytvis.load(annotations, frames_root, raw, video_ids)
    negatives = negatives_from_pairs(raw, source.dataset, annotations, required=True)
    dataset = with_negatives(source.dataset, negatives, {a["category_id"] for a in raw["annotations"]})
    return dataclasses.replace(source, dataset=dataset, description=describe("saco", annotations, raw))


def negatives_from_pairs(
    raw: dict[str, Any], dataset: VideoDataset, source: str, required: bool
) -> dict[int, list[int]]:
    """Video id -> negative category ids, after checking ``video_np_pairs`` against the annotations.

    Runs after ``validate``, so videos, categories and annotations are known to be well formed.
    """
    pairs = raw.get("video_np_pairs")
    if pairs is None:
        if required:
            raise InputError(
                source,
                "video_np_pairs",
                "missing; SA-Co/VEval files list every (video, noun phrase) pair; use source=ytvis for plain YTVIS",
            )
        return {}
    if not isinstance(pairs, list):
        raise InputError(source, "video_np_pairs", "must be a list")
    names = {c.id: c.name for c in dataset.categories}
    counts = Counter((a["video_id"], a["category_id"]) for a in raw["annotations"])
    for i, ann in enumerate(raw["annotations"]):
        phrase = ann.get("noun_phrase")
        if phrase is not None and (not isinstance(phrase, str) or phrase.strip() != names[ann["category_id"]]):
            name = names[ann["category_id"]]
            raise InputError(
                source,
                f"annotations[{i}].noun_phrase",
                f"{phrase!r} is not the name of category {ann['category_id']} ({name!r})",
            )
    videos = {v.id for v in dataset.videos}
    seen: dict[tuple[int, int], int] = {}
    negatives: dict[int, list[int]] = {}
    for i, pair in enumerate(pairs):
        path = f"video_np_pairs[{i}]"
        if not isinstance(pair, dict):
            raise InputError(source, path, "must be a JSON object {video_id, category_id, noun_phrase, num_masklets}")
        video_id, category_id = _integer(pair, "video_id", path, source), _integer(pair, "category_id", path, source)
        if video_id not in videos:
            raise InputError(source, f"{path}.video_id", f"unknown video id {video_id}")
        if category_id not in names:
            raise InputError(source, f"{path}.category_id", f"unknown category id {category_id}")
        phrase = pair.get("noun_phrase")
        if phrase is not None and (not isinstance(phrase, str) or phrase.strip() != names[category_id]):
            name = names[category_id]
            raise InputError(
                source, f"{path}.noun_phrase", f"{phrase!r} is not the name of category {category_id} ({name!r})"
            )
        masklets = _integer(pair, "num_masklets", path, source)
        if masklets < 0:
            raise InputError(source, f"{path}.num_masklets", f"must be >= 0, got {masklets}")
        key = (video_id, category_id)
        if key in seen:
            first = f"video_np_pairs[{seen[key]}]"
            raise InputError(source, path, f"repeats the pair of video {video_id} and category {category_id} ({first})")
        seen[key] = i
        if masklets != counts.get(key, 0):
            found = counts.get(key, 0)
            raise InputError(
                source,
                f"{path}.num_masklets",
                f"is {masklets} but the file annotates {found} masklet(s) of category {category_id} in video {video_id}",
            )
        if masklets == 0:
            negatives.setdefault(video_id, []).append(category_id)
    for i, ann in enumerate(raw["annotations"]):
        if (ann["video_id"], ann["category_id"]) not in seen:
            pair = f"video {ann['video_id']} and category {ann['category_id']}"
            raise InputError(source, f"annotations[{i}]", f"{pair} have no entry in video_np_pairs; list the pair")
    return negatives


def with_negatives(dataset: VideoDataset, negatives: dict[int, list[int]], annotated: set[int]) -> VideoDataset:
    """The dataset with each video's negatives set, keeping the categories annotated in the whole file or negative."""
    used = annotated | {c for ids in negatives.values() for c in ids}
    videos = [
        dataclasses.replace(v, negative_category_ids=tuple(sorted(negatives.get(v.id, ())))) for v in dataset.videos
    ]
    return VideoDataset(
        videos=videos, tracks=dataset.tracks, categories=[c for c in dataset.categories if c.id in used]
    )


def _integer(obj: dict[str, Any], key: str, path: str, source: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(source, f"{path}.{key}", f"must be an integer, got {value!r}")
    return value
