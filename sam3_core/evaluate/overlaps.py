"""Per-frame mask IoU between one video's predictions and GT masklets, computed once for every family.

sam3's evaluators each recompute mask overlaps their own way: the masklet IoU of mAP, phrase AP
and cgF1 merges two RLEs per (prediction, GT, frame) in Python, HOTA and TETA call
``mask_utils.iou`` per frame of every sequence again. Here each frame of a video costs one
``mask_utils.iou`` call over all its non-empty predicted masks x all its non-empty GT masks, and
every family reads its values from that table:

- masklet IoU (mAP, phrase AP, cgF1) = sum over frames of intersections / sum of unions, where a
  frame's intersection is recovered exactly from its IoU and the two integer areas;
- the per-frame similarities of HOTA and TETA are the table's values (pycocotools' IoU is
  symmetric, so the order of the call does not matter).

An empty mask overlaps nothing (pycocotools returns 0 for it), so empty and null masks are left out
of the call and read as 0. Box IoU is computed where it is needed, from the boxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils

from sam3_core.evaluate.videodata import Masklet


@dataclass(frozen=True)
class FrameTable:
    """Mask IoU of one frame: rows are prediction positions, columns GT positions (both sorted)."""

    rows: np.ndarray
    cols: np.ndarray
    iou: np.ndarray  # [len(rows), len(cols)]


def _positions(wanted: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of ``wanted`` sits in sorted ``present``; and whether it is there at all."""
    if not len(present):
        return np.zeros(len(wanted), dtype=np.int64), np.zeros(len(wanted), dtype=bool)
    at = np.minimum(np.searchsorted(present, wanted), len(present) - 1)
    return at, present[at] == wanted


class VideoOverlaps:
    """Mask overlaps of one video's predictions (rows) and GT masklets (columns), by position in the lists."""

    def __init__(self, predictions: Sequence[Masklet], gts: Sequence[Masklet], length: int) -> None:
        self.tables: list[FrameTable] = []
        self.inter = np.zeros((len(predictions), len(gts)))  # summed over frames, in pixels
        pred_areas = np.stack([p.mask_areas for p in predictions]) if predictions else np.zeros((0, length))
        gt_areas = np.stack([g.mask_areas for g in gts]) if gts else np.zeros((0, length))
        empty = np.zeros(0, dtype=np.int64)
        for t in range(length):
            rows, cols = np.flatnonzero(pred_areas[:, t]), np.flatnonzero(gt_areas[:, t])
            if not len(rows) or not len(cols):
                self.tables.append(FrameTable(empty, empty, np.zeros((0, 0))))
                continue
            iou = np.asarray(
                mask_utils.iou(
                    [predictions[i].masks[t] for i in rows], [gts[j].masks[t] for j in cols], [0] * len(cols)
                ),
                dtype=float,
            ).reshape(len(rows), len(cols))
            self.tables.append(FrameTable(rows, cols, iou))
            both = pred_areas[rows, t][:, None] + gt_areas[cols, t][None, :]
            self.inter[np.ix_(rows, cols)] += np.rint(iou * both / (1.0 + iou))
        self.pred_area = pred_areas.sum(axis=1)
        self.gt_area = gt_areas.sum(axis=1)

    def frame_iou(self, t: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """[len(rows), len(cols)] mask IoU at frame t of the given prediction and GT positions."""
        table = self.tables[t]
        out = np.zeros((len(rows), len(cols)))
        r_at, r_in = _positions(rows, table.rows)
        c_at, c_in = _positions(cols, table.cols)
        if r_in.any() and c_in.any():
            out[np.ix_(r_in, c_in)] = table.iou[np.ix_(r_at[r_in], c_at[c_in])]
        return out

    def track_iou(self, rows: Sequence[int], cols: Sequence[int]) -> np.ndarray:
        """[len(rows), len(cols)] masklet IoU: summed intersections over summed unions, 1 for two empty masklets."""
        rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
        inter = self.inter[np.ix_(rows, cols)]
        union = self.pred_area[rows][:, None] + self.gt_area[cols][None, :] - inter
        return np.divide(inter, union, out=np.ones_like(inter), where=union > 0)


def box_track_iou(dts: Sequence[Masklet], gts: Sequence[Masklet]) -> np.ndarray:
    """[D, G] masklet IoU of xywh boxes summed over frames (null = empty), in float64."""
    if not dts or not gts:
        return np.zeros((len(dts), len(gts)))
    d = np.stack([m.boxes for m in dts])[:, None]  # [D, 1, T, 4]
    g = np.stack([m.boxes for m in gts])[None]  # [1, G, T, 4]
    width = np.minimum(d[..., 0] + d[..., 2], g[..., 0] + g[..., 2]) - np.maximum(d[..., 0], g[..., 0])
    height = np.minimum(d[..., 1] + d[..., 3], g[..., 1] + g[..., 3]) - np.maximum(d[..., 1], g[..., 1])
    inter = (np.clip(width, 0, None) * np.clip(height, 0, None)).sum(-1)
    union = (d[..., 2] * d[..., 3]).sum(-1) + (g[..., 2] * g[..., 3]).sum(-1) - inter
    return np.divide(inter, union, out=np.ones_like(inter), where=union > 0)


def frame_box_iou(gt_boxes: np.ndarray, tracker_boxes: np.ndarray) -> np.ndarray:
    """[G, D] box IoU of one frame as TrackEval computes it for HOTA: float32, corners first.

    Same arithmetic in the same precision as TrackEval's ``_calculate_box_ious`` (so the float32
    rounding, which HOTA sums over frames, is the reference's): zero-area boxes and empty unions
    give 0.
    """
    eps = np.finfo("float").eps
    a = gt_boxes.astype(np.float32).reshape(-1, 4).copy()
    b = tracker_boxes.astype(np.float32).reshape(-1, 4).copy()
    a[:, 2:] += a[:, :2]
    b[:, 2:] += b[:, :2]
    lo = np.minimum(a[:, None, :], b[None, :, :])
    hi = np.maximum(a[:, None, :], b[None, :, :])
    inter = np.maximum(lo[..., 2] - hi[..., 0], 0) * np.maximum(lo[..., 3] - hi[..., 1], 0)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a[:, None] + area_b[None, :] - inter
    inter[area_a <= 0 + eps, :] = 0
    inter[:, area_b <= 0 + eps] = 0
    inter[union <= 0 + eps] = 0
    union[union <= 0 + eps] = 1
    return inter / union
