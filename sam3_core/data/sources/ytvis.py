"""YouTube-VIS 2019/2021 and OVIS: annotation JSON plus one image file per frame below a root."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sam3_core.data.sources import FrameFiles, Source, describe
from sam3_core.data.ytvis import validate


def load(annotations: str, frames_root: str, raw: Any, video_ids: Collection[int] | None = None) -> Source:
    """The validated dataset; each video's frames are its ``file_names`` below ``frames_root``."""
    dataset = validate(raw, annotations, video_ids=video_ids)
    return Source(
        annotations=annotations,
        dataset=dataset,
        frames={v.id: FrameFiles(frames_root, v.file_names) for v in dataset.videos},
        paths={v.id: f"videos[{i}]" for i, v in enumerate(dataset.videos)},
        description=describe("ytvis", annotations, raw),
    )
