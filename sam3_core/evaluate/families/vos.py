"""``vos``: semi-supervised video object segmentation as DAVIS 2017 scores it -- region J, boundary F, J&F.

The definitions are those of the DAVIS 2017 toolkit (davisvideochallenge/davis2017-evaluation,
``DAVISEvaluation`` in semi-supervised mode, ``metrics.py`` and ``utils.db_statistics``), written
here from their formulas and applied to YT-VIS files:

- objects: the GT annotations (masklets) with a non-empty mask in some frame. Each prediction
  carries ``gt_id``, the id of the annotation whose mask prompted it; at most one per object. An
  object nobody predicted scores as an empty mask in every frame (the toolkit zero-pads it).
- frames: the toolkit drops the first and the last frame of every sequence (``[:, 1:-1]``): the
  first holds the prompt, the last is left out by the benchmark's convention. Here an object is
  scored on the frames after its prompt frame (its first frame with a non-empty GT mask) up to,
  not including, the video's last frame -- for an object present from frame 0, as every DAVIS
  2017 object is, exactly the toolkit's ``1:-1``. A null GT or predicted frame is an empty mask.
- J (``db_eval_iou``): |P ∩ G| / |P ∪ G|, and 1 when both masks are empty.
- F (``db_eval_boundary``): one-pixel boundary maps of P and G (``seg2bmap``: a pixel is on the
  boundary when it differs from its east, south or south-east neighbour; in the last row only east
  counts, in the last column only south, never in the bottom-right corner), each boundary pixel
  matched when the other boundary has a pixel within ``ceil(0.008 x image diagonal)`` pixels
  (dilation by the disk x² + y² <= r²). Precision = matched P boundary / P boundary, recall =
  matched G boundary / G boundary; (1, 0) when only G has a boundary, (0, 1) when only P has one,
  (1, 1) when neither has; F = 2PR / (P + R), 0 when P + R = 0.
- per object (``db_statistics``): the mean over its frames, the recall (fraction of frames > 0.5)
  and the decay (mean of the first quarter of its frames minus that of the last quarter; the four
  bins start at round(linspace(1, n, 5)) - 1, each running to the next bin's start, inclusive).
- reported: ``vos_{J,F}_{mean,recall,decay}``, each the mean over objects, and
  ``vos_JF_mean = (vos_J_mean + vos_F_mean) / 2``; per object, ``vos_per_object.csv``.

Where the toolkit leaves a case undefined: its bin indices are cast to uint8 (wrong past 256
frames), here they are plain integers; an object with no frame to score (prompted in one of the
video's last two frames) has no values, is listed with 0 frames and left out of the means, and a
set with no such frame at all is refused. Scores and categories of the predictions play no part.

Boundary maps and dilations are computed on the crop around both masks with a one-pixel margin,
which gives the same numbers as the full frame (a pixel's boundary flag reads only its neighbours
to the right and below, and no boundary pixel lies outside the margin), at a cost that follows
the objects' size rather than the frame's.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from sam3_core.errors import InputError
from sam3_core.evaluate.family import FamilyResult, VideoContext, VideoFamily
from sam3_core.evaluate.videodata import Masklet, VideoSet, require

logger = logging.getLogger(__name__)

BOUND_TH = 0.008  # boundary tolerance, a fraction of the image diagonal (DAVIS's bound_th)
RECALL_THRESHOLD = 0.5  # a frame counts for the recall when its value is above this
DECAY_BINS = 4
STATISTICS = ("mean", "recall", "decay")
PER_OBJECT_CSV = "vos_per_object.csv"
PER_OBJECT_COLUMNS = ("video_id", "object_id", "category_id", "category", "predicted", "frames")


def boundary_radius(height: int, width: int) -> int:
    """The matching tolerance in pixels: ceil(BOUND_TH x the image diagonal)."""
    return math.ceil(BOUND_TH * math.sqrt(height * height + width * width))


def disk(radius: int) -> np.ndarray:
    """The (2r + 1)² structuring element of the offsets (x, y) with x² + y² <= r²."""
    offsets = np.arange(-radius, radius + 1)
    return (offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2).astype(np.uint8)


def boundary(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundary map of a boolean mask (DAVIS's ``seg2bmap`` at the mask's own size)."""
    out = np.zeros(mask.shape, dtype=bool)
    out[:, :-1] |= mask[:, :-1] != mask[:, 1:]  # east (the last row sees only this)
    out[:-1, :] |= mask[:-1, :] != mask[1:, :]  # south (the last column sees only this)
    out[:-1, :-1] |= mask[:-1, :-1] != mask[1:, 1:]  # south-east
    return out


def _matched(boundary_pixels: np.ndarray, other: np.ndarray, kernel: np.ndarray) -> int:
    """How many of ``boundary_pixels`` lie within the kernel's reach of a pixel of ``other``."""
    import cv2  # imported on use: only this family needs OpenCV

    reach = cv2.dilate(other.view(np.uint8), kernel)
    return int(np.count_nonzero(boundary_pixels & reach.view(bool)))


def f_measure(prediction: np.ndarray, gt: np.ndarray, kernel: np.ndarray) -> float:
    """Boundary F-measure of two boolean masks of one frame (or of one crop of it, see the module)."""
    p_boundary, g_boundary = boundary(prediction), boundary(gt)
    n_p, n_g = int(np.count_nonzero(p_boundary)), int(np.count_nonzero(g_boundary))
    if n_p == 0 or n_g == 0:
        precision, recall = (1.0 if n_p == 0 else 0.0), (1.0 if n_g == 0 else 0.0)
    else:
        precision = _matched(p_boundary, g_boundary, kernel) / n_p
        recall = _matched(g_boundary, p_boundary, kernel) / n_g
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def jaccard(prediction: np.ndarray, gt: np.ndarray) -> float:
    """Region similarity: intersection over union, 1 when both masks are empty."""
    union = np.count_nonzero(prediction | gt)
    return 1.0 if union == 0 else np.count_nonzero(prediction & gt) / union


def _crop(rles: list[dict[str, Any]], height: int, width: int) -> tuple[slice, slice]:
    """Rows and columns of the masks' joint bounding box, one pixel wider on every side (clipped)."""
    boxes = np.asarray(mask_utils.toBbox(rles), dtype=float).reshape(-1, 4)
    x0, y0 = int(boxes[:, 0].min()), int(boxes[:, 1].min())
    x1, y1 = int((boxes[:, 0] + boxes[:, 2]).max()), int((boxes[:, 1] + boxes[:, 3]).max())
    return slice(max(y0 - 1, 0), min(y1 + 1, height)), slice(max(x0 - 1, 0), min(x1 + 1, width))


def frame_scores(
    prediction: dict[str, Any] | None, gt: dict[str, Any] | None, height: int, width: int, kernel: np.ndarray
) -> tuple[float, float]:
    """(J, F) of one frame from two compressed RLEs, None meaning an empty mask."""
    present = [rle for rle in (prediction, gt) if rle is not None]
    if not present:
        return 1.0, 1.0
    rows, cols = _crop(present, height, width)

    def crop(rle: dict[str, Any] | None) -> np.ndarray:
        if rle is None:
            return np.zeros((rows.stop - rows.start, cols.stop - cols.start), dtype=bool)
        return mask_utils.decode(rle)[rows, cols].astype(bool)

    p, g = crop(prediction), crop(gt)
    return jaccard(p, g), f_measure(p, g, kernel)


def statistics(values: np.ndarray) -> dict[str, float]:
    """DAVIS's per-object mean, recall and decay of per-frame values (at least one frame)."""
    starts = (np.round(np.linspace(1, len(values), DECAY_BINS + 1) + 1e-10) - 1).astype(np.int64)
    first, last = values[starts[0] : starts[1] + 1], values[starts[-2] : starts[-1] + 1]
    return {
        "mean": float(np.mean(values)),
        "recall": float(np.mean(values > RECALL_THRESHOLD)),
        "decay": float(np.mean(first) - np.mean(last)),
    }


@dataclass(frozen=True)
class ObjectScores:
    """One prompted object's statistics (empty dicts when it has no frame to score)."""

    video_id: int
    object_id: int
    category_id: int
    predicted: bool
    frames: int
    j: dict[str, float]
    f: dict[str, float]


def _prompt_frame(gt: Masklet) -> int | None:
    """The object's first frame with a non-empty mask (None: it never appears, so it is no object)."""
    present = np.flatnonzero(gt.mask_areas > 0)
    return int(present[0]) if len(present) else None


def _scored_frames(gt: Masklet, length: int) -> range:
    """The frames after the prompt frame, without the video's last (DAVIS's 1:-1 for frame-0 prompts)."""
    prompt = _prompt_frame(gt)
    return range(0) if prompt is None else range(prompt + 1, length - 1)


def _mask(masklet: Masklet | None, t: int) -> dict[str, Any] | None:
    return None if masklet is None or masklet.mask_areas[t] == 0 else masklet.masks[t]


class Vos(VideoFamily):
    name = "vos"
    files = (PER_OBJECT_CSV,)

    def prepare(self, data: VideoSet) -> None:
        """Masks everywhere; GT ids; each prediction's gt_id names one object of its video, once."""
        require(data, "segmentations", "VOS J&F (on masks)")
        objects: dict[tuple[int, int], Masklet] = {}
        for g in data.gt:
            if not g.has_id:
                raise InputError(
                    data.gt_source,
                    f"annotations[{g.index}].id",
                    "missing; the vos family finds each prompted object by the id its prediction's gt_id names",
                )
            objects[g.video_id, g.track_id] = g
        claimed: dict[tuple[int, int], int] = {}
        for p in data.predictions:
            where = f"[{p.index}].gt_id"
            if p.gt_id is None:
                raise InputError(
                    data.predictions_source,
                    where,
                    "missing; vos predictions name the GT annotation whose mask prompted them (inference=vos)",
                )
            key = (p.video_id, p.gt_id)
            if key not in objects:
                raise InputError(
                    data.predictions_source, where, f"{p.gt_id} is not the id of a GT annotation of video {p.video_id}"
                )
            if _prompt_frame(objects[key]) is None:
                raise InputError(
                    data.predictions_source, where, f"GT annotation {p.gt_id} has no non-empty mask to prompt with"
                )
            if key in claimed:
                raise InputError(
                    data.predictions_source, where, f"object {p.gt_id} is also [{claimed[key]}]'s: one prediction each"
                )
            claimed[key] = p.index
        if not any(len(_scored_frames(g, data.videos[g.video_id].length)) for g in data.gt):
            raise InputError(
                data.gt_source,
                "videos",
                "no object has a frame to score: vos scores the frames after each object's first mask, "
                "without the video's last frame (DAVIS 2017), so a video needs at least 3 frames",
            )

    def evaluate_video(self, video: VideoContext) -> list[ObjectScores]:
        """Every object of the video, in GT order: J and F statistics over its scored frames."""
        height, width, length = video.video.height, video.video.width, video.video.length
        kernel = disk(boundary_radius(height, width))
        predicted = {p.gt_id: p for p in video.predictions}
        out = []
        for g in video.gts:
            if _prompt_frame(g) is None:
                continue
            p = predicted.get(g.track_id)
            frames = _scored_frames(g, length)
            scores = np.array([frame_scores(_mask(p, t), _mask(g, t), height, width, kernel) for t in frames])
            j = statistics(scores[:, 0]) if len(frames) else {}
            f = statistics(scores[:, 1]) if len(frames) else {}
            out.append(ObjectScores(g.video_id, g.track_id, g.category_id, p is not None, len(frames), j, f))
        return out

    def reduce(self, data: VideoSet, parts: Mapping[int, Any]) -> FamilyResult:
        objects: list[ObjectScores] = [o for part in parts.values() for o in part]
        scored = [o for o in objects if o.frames]
        if len(scored) < len(objects):
            logger.warning(
                "vos: %d of %d objects have no frame to score (first mask in one of their video's last two "
                "frames): left out of the means",
                len(objects) - len(scored),
                len(objects),
            )
        metrics = {}
        for letter, field in (("J", "j"), ("F", "f")):
            for stat in STATISTICS:
                metrics[f"vos_{letter}_{stat}"] = float(np.mean([getattr(o, field)[stat] for o in scored]))
        metrics["vos_JF_mean"] = (metrics["vos_J_mean"] + metrics["vos_F_mean"]) / 2
        return FamilyResult(metrics, files={PER_OBJECT_CSV: _per_object_csv(objects, data.category_names)})


def _per_object_csv(objects: list[ObjectScores], names: dict[int, str]) -> str:
    """One row per object, full precision; blank values for an object with no frame to score."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    values = [f"{letter}_{stat}" for letter in ("J", "F") for stat in STATISTICS] + ["JF_mean"]
    writer.writerow([*PER_OBJECT_COLUMNS, *values])
    for o in objects:
        row: list[Any] = [o.video_id, o.object_id, o.category_id, names.get(o.category_id, ""), int(o.predicted)]
        row.append(o.frames)
        if o.frames:
            row += [o.j[s] for s in STATISTICS] + [o.f[s] for s in STATISTICS] + [(o.j["mean"] + o.f["mean"]) / 2]
        else:
            row += [""] * len(values)
        writer.writerow(row)
    return buffer.getvalue()
