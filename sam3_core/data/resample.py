"""Resizing masks and frames for data prep, fast and without changing what the masks are.

Masks: the published masks were always "coverage under Pillow's bilinear resize of the 0/1
mask, kept where >= 0.5". Pillow computes that on a float32 image of the full frame, ~15 ms
per 720p mask. ``resample_mask`` gives the same masks from the RLE directly: it decodes only
the mask's bounding box from the run lengths, and computes Pillow's own sums (its filter
coefficients, horizontal pass first with a float32 intermediate, each sum in double in the
same order) only where a filter window is mixed; a window that is all 0 or all 1 has a known
result. Equal to Pillow bit for bit where Pillow is compiled without fused multiply-add (x86-64
wheels); elsewhere a window whose double sum lands within one rounding step of a float32
boundary at exactly 0.5 could differ, which the tests have never met.

Frames: decoded with libjpeg's DCT scaling straight to the nearest power-of-two reduction
above the target (all the compressed data is still decoded, so a truncated file fails), then
resized with the same bilinear filter as the masks, so frames and masks stay aligned.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

import cv2
import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from sam3_core.data.ytvis import RLE, rle_runs

JPEG_FORMATS = ("JPEG", "MPO")


@dataclass(frozen=True)
class Coefficients:
    """Pillow's bilinear filter for one axis: output pixel i reads inputs [start[i], start[i] + length[i])."""

    start: np.ndarray  # int64 [out]
    length: np.ndarray  # int64 [out]
    weights: np.ndarray  # float64 [out, taps], zero past length
    full: np.ndarray  # float32 [out]: Pillow's result for a window of ones

    @property
    def end(self) -> np.ndarray:
        return self.start + self.length


@functools.lru_cache(maxsize=64)
def coefficients(in_size: int, out_size: int) -> Coefficients:
    """The coefficients Pillow's ``precompute_coeffs`` builds for BILINEAR, in the same double arithmetic."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    taps = math.ceil(support) * 2 + 1
    inverse = 1.0 / filterscale
    start = np.zeros(out_size, dtype=np.int64)
    length = np.zeros(out_size, dtype=np.int64)
    weights = np.zeros((out_size, taps), dtype=np.float64)
    full = np.zeros(out_size, dtype=np.float32)
    for xx in range(out_size):
        center = 0.0 + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        row = []
        total = 0.0
        for x in range(xmax):
            t = (x + xmin - center + 0.5) * inverse
            t = -t if t < 0.0 else t
            w = 1.0 - t if t < 1.0 else 0.0
            row.append(w)
            total += w
        if total != 0.0:
            row = [w / total for w in row]
        ones = 0.0
        for w in row:
            ones += w
        start[xx], length[xx], full[xx] = xmin, xmax, ones
        weights[xx, :xmax] = row
    return Coefficients(start, length, weights, full)


def bbox_crop(runs: np.ndarray, height: int, width: int) -> tuple[np.ndarray, int, int] | None:
    """The mask's bounding box as a uint8 array, and its (x0, y0), decoded from column-major runs; None if empty."""
    ends = np.cumsum(runs)
    n_fg = len(runs) // 2
    starts, stops = ends[0 : 2 * n_fg : 2], ends[1 : 2 * n_fg + 1 : 2]
    keep = stops > starts
    starts, stops = starts[keep], stops[keep]
    if starts.size == 0:
        return None
    col_s, row_s = np.divmod(starts, height)
    col_e, row_e = np.divmod(stops - 1, height)
    single = col_s == col_e
    spans = not single.all()  # a run crossing a column boundary covers the bottom and top rows
    x0, x1 = int(col_s[0]), int(col_e[-1])
    y0 = 0 if spans else int(row_s.min())
    y1 = height - 1 if spans else int(row_e.max())
    crop_h, crop_w = y1 - y0 + 1, x1 - x0 + 1
    begin = (col_s - x0) * crop_h + (row_s - y0)
    finish = (col_e - x0) * crop_h + (row_e - y0) + 1
    lengths = np.empty(2 * len(begin) + 1, dtype=np.int64)
    lengths[0] = begin[0]
    lengths[1:-1:2] = finish - begin
    lengths[2:-1:2] = begin[1:] - finish[:-1]
    lengths[-1] = crop_h * crop_w - finish[-1]
    values = np.zeros(lengths.size, dtype=np.uint8)
    values[1::2] = 1
    flat = np.repeat(values, lengths)
    return flat.reshape(crop_w, crop_h).T, x0, y0


def _touching(coeffs: Coefficients, first: int, last: int) -> tuple[int, int]:
    """Output index range [lo, hi) whose windows overlap input pixels first..last."""
    lo = int(np.searchsorted(coeffs.end, first, side="right"))
    hi = int(np.searchsorted(coeffs.start, last, side="right"))
    return lo, hi


def _window_counts(levels: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """For each window [start[i], stop[i]) along axis 0: the sum of the uint8 ``levels`` in it, per column.

    From OpenCV's integral image (one SIMD pass), read at the windows' boundaries only.
    """
    table = cv2.integral(levels)
    at_stop, at_start = table[stop], table[start]
    return (at_stop[:, 1:] - at_stop[:, :-1]) - (at_start[:, 1:] - at_start[:, :-1])


def _pass(values: np.ndarray, offset: int, coeffs: Coefficients, lo: int, hi: int) -> np.ndarray:
    """One separable pass along axis 0 of ``values`` (positions offset.. of the full axis) for outputs [lo, hi).

    Returns float32 [hi - lo, values.shape[1]]: 0 for windows of zeros, ``coeffs.full`` for windows
    of exact ones, Pillow's ordered double sum (rounded to float32) for the rest.
    """
    n_in = values.shape[0]
    # np.clip costs more than the arithmetic on arrays this small
    start = np.maximum(np.minimum(coeffs.start[lo:hi] - offset, n_in), 0)
    stop = np.maximum(np.minimum(coeffs.end[lo:hi] - offset, n_in), 0)
    # 0 for 0, 2 for exactly 1, 1 for anything between: a window sums to 0 iff all zero, to 2 * length iff all one
    if values.dtype == np.uint8:
        levels = values * np.uint8(2)
    else:
        levels = (values != 0).view(np.uint8) + (values == 1.0).view(np.uint8)
    sums = _window_counts(np.ascontiguousarray(levels), start, stop)
    all_ones = sums == 2 * coeffs.length[lo:hi, None]
    out = np.where(all_ones, coeffs.full[lo:hi, None], np.float32(0)).astype(np.float32)
    out_idx, other = np.nonzero((sums > 0) & ~all_ones)
    if out_idx.size:
        out[out_idx, other] = _ordered_sums(values, other, coeffs, out_idx + lo, offset).astype(np.float32)
    return out


def _ordered_sums(
    values: np.ndarray, other: np.ndarray, coeffs: Coefficients, out_index: np.ndarray, offset: int
) -> np.ndarray:
    """For each window (output pixel ``out_index`` at position ``other`` of the other axis): the sum over
    taps t of values[start + t - offset, other] * w[t], accumulated in double in tap order like Pillow."""
    limit, width = values.shape
    pos = (coeffs.start[out_index] - offset)[:, None] + np.arange(coeffs.weights.shape[1])
    inside = (pos >= 0) & (pos < limit)
    picked = values.ravel().take(np.maximum(np.minimum(pos, limit - 1), 0) * width + other[:, None])
    # weights are 0 past each window's length; pixels outside ``values`` are 0
    terms = np.where(inside, coeffs.weights[out_index], 0.0) * picked
    # cumsum adds left to right, the order of Pillow's loop; a pairwise sum could round differently
    return np.cumsum(terms, axis=1)[:, -1]


def resample_mask(rle: RLE, width: int, height: int) -> RLE:
    """The RLE of the mask resized to width x height: Pillow-bilinear coverage >= 0.5 (see the module docstring)."""
    in_h, in_w = int(rle["size"][0]), int(rle["size"][1])
    out = np.zeros((height, width), dtype=np.uint8, order="F")
    runs = rle_runs(rle["counts"])
    if runs is None:
        raise ValueError("malformed compressed RLE (validate the annotations first)")
    crop = bbox_crop(runs, in_h, in_w)
    if crop is not None:
        block, x0, y0 = crop
        xs = coefficients(in_w, width)
        ys = coefficients(in_h, height)
        x_lo, x_hi = _touching(xs, x0, x0 + block.shape[1] - 1)
        y_lo, y_hi = _touching(ys, y0, y0 + block.shape[0] - 1)
        if width != in_w:
            across = _pass(np.ascontiguousarray(block.T), x0, xs, x_lo, x_hi).T
        else:
            across, x_lo, x_hi = block.astype(np.float32), x0, x0 + block.shape[1]
        if height != in_h:
            coverage = _pass(np.ascontiguousarray(across), y0, ys, y_lo, y_hi)
        else:
            coverage, y_lo, y_hi = across, y0, y0 + block.shape[0]
        out[y_lo:y_hi, x_lo:x_hi] = coverage >= 0.5
    encoded = mask_util.encode(out)
    return {"size": [height, width], "counts": encoded["counts"].decode("ascii")}


def resize_frame(data: bytes, width: int, height: int) -> tuple[Image.Image, tuple[int, int]]:
    """The frame decoded (completely: a truncated file raises OSError) and resized to width x height, RGB,
    with the frame's own (width, height)."""
    with Image.open(io.BytesIO(data)) as image:
        size = image.size
        if image.format in JPEG_FORMATS:
            image.draft("RGB", (width, height))
        image.load()
        rgb = image.convert("RGB")
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    return rgb, size


def check_frame_bytes(data: bytes) -> tuple[int, int]:
    """Decode a frame completely (cheaply: JPEGs at 1/8 scale) and return its full (width, height)."""
    with Image.open(io.BytesIO(data)) as image:
        size = image.size
        if image.format in JPEG_FORMATS:
            image.draft(image.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
        image.load()
    return size


def encode_frame(image: Image.Image, frame_format: str, jpeg_quality: int) -> tuple[bytes, str]:
    """Encoded bytes and file suffix of a frame: JPEG at ``jpeg_quality`` or lossless PNG."""
    buffer = io.BytesIO()
    if frame_format == "png":
        image.save(buffer, format="PNG")
        return buffer.getvalue(), ".png"
    image.save(buffer, format="JPEG", quality=jpeg_quality)
    return buffer.getvalue(), ".jpg"
