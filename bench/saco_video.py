"""A generated SA-Co/VEval-shaped source: 720x1280 JPEG frames in per-video folders, many masklets.

The shape of the case that took data prep ~70 s (one video, 146 frames, 33 masklets, 4,359 frame
masks): textured frames, objects of varied sizes (0.3-12 % of the frame) moving and deforming,
each visible over a contiguous span of frames, with SA-Co's `video_np_pairs` (positives and
negatives), `noun_phrase` fields and unused global categories.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pycocotools.mask as mask_util


def _spans(frames: int, masklets: int, masks: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(first, count) per masklet, the counts summing to ``masks``."""
    counts = np.full(masklets, masks // masklets)
    counts[: masks % masklets] += 1
    if counts.max() > frames:
        raise ValueError(f"{masks} masks do not fit {masklets} masklets of at most {frames} frames")
    return [(int(rng.integers(0, frames - c + 1)), int(c)) for c in counts]


def _frame(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    small = rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def write_saco_video(
    root: Path,
    frames: int = 146,
    masklets: int = 33,
    masks: int = 4359,
    height: int = 720,
    width: int = 1280,
    videos: int = 1,
    seed: int = 0,
) -> Path:
    """Write ``videos`` such videos under ``root/JPEGImages_24fps/`` and the annotation file; return its path."""
    rng = np.random.default_rng(seed)
    out_videos: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    categories = [{"id": i, "name": f"object kind {i}"} for i in range(1, masklets + 6)]
    pairs: list[dict[str, Any]] = []
    for v in range(1, videos + 1):
        name = f"sav_{v:06d}"
        folder = root / "JPEGImages_24fps" / name
        folder.mkdir(parents=True, exist_ok=True)
        file_names = []
        for f in range(frames):
            cv2.imwrite(str(folder / f"{f:05d}.jpg"), _frame(height, width, rng), [cv2.IMWRITE_JPEG_QUALITY, 90])
            file_names.append(f"{name}/{f:05d}.jpg")
        out_videos.append(
            {"id": v, "video_name": name, "file_names": file_names, "height": height, "width": width, "length": frames}
        )
        for m, (first, count) in enumerate(_spans(frames, masklets, masks, rng)):
            category = m % (masklets - 3) + 1
            radius = np.sqrt(rng.uniform(0.003, 0.12) * height * width / np.pi)
            center = rng.uniform([0.1 * width, 0.1 * height], [0.9 * width, 0.9 * height])
            velocity = rng.uniform(-6, 6, 2)
            segs: list[Any] = [None] * frames
            boxes: list[Any] = [None] * frames
            areas: list[Any] = [None] * frames
            for f in range(first, first + count):
                mask = np.zeros((height, width), dtype=np.uint8)
                c = center + velocity * (f - first)
                axes = (int(radius * (1 + 0.2 * np.sin(f / 7 + m))), int(radius * 0.7))
                cv2.ellipse(mask, (int(c[0]), int(c[1])), axes, (f * 3 + m * 17) % 180, 0, 360, 1, -1)
                if not mask.any():
                    mask[int(np.clip(c[1], 0, height - 1)), int(np.clip(c[0], 0, width - 1))] = 1
                rle = mask_util.encode(np.asfortranarray(mask))
                segs[f] = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
                boxes[f] = [float(x) for x in mask_util.toBbox(rle)]
                areas[f] = int(mask_util.area(rle))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "video_id": v,
                    "category_id": category,
                    "noun_phrase": categories[category - 1]["name"],
                    "segmentations": segs,
                    "bboxes": boxes,
                    "areas": areas,
                    "iscrowd": 0,
                    "height": height,
                    "width": width,
                }
            )
        present = sorted({a["category_id"] for a in annotations if a["video_id"] == v})
        for c in [*present, masklets - 2, masklets - 1]:
            n = sum(1 for a in annotations if a["video_id"] == v and a["category_id"] == c)
            pairs.append(
                {
                    "id": len(pairs) + 1,
                    "video_id": v,
                    "category_id": c,
                    "noun_phrase": categories[c - 1]["name"],
                    "num_masklets": n,
                }
            )
    path = root / "saco_veval_generated.json"
    doc = {
        "info": {"description": "generated SA-Co/VEval-shaped data"},
        "videos": out_videos,
        "annotations": annotations,
        "categories": categories,
        "video_np_pairs": pairs,
    }
    path.write_text(json.dumps(doc))
    return path
