"""Checks that COCO run-length encodings are well formed before pycocotools' C code walks them.

pycocotools trusts its input: a truncated or corrupted ``counts`` string decodes to negative or
huge run lengths (its decoder is differential and sign-extends), and ``mask_utils.iou`` then
loops for minutes, or ``decode`` writes past its buffer. An RLE is well formed when every run
length is non-negative and the runs add up to ``height * width``.

Compressed strings are decoded here with numpy, all strings of a file in one pass (a Python loop
over characters would cost seconds on a SA-Co file), following pycocotools' ``rleFrString``:
each run is a little-endian base-32 number in characters ``'0'..'o'`` (bit 0x20 = more chars
follow, bit 0x10 of the last char = negative), and from the fourth run on each run is stored as
the difference to the run two places before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

# 30 bits (runs up to 2**30 pixels); pycocotools shifts an int, so longer runs overflow there anyway
_MAX_CHARS_PER_RUN = 6


def _size_problem(rle: Any) -> str | None:
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        return "expected an RLE object {size: [height, width], counts}"
    size = rle["size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(type(s) is int and s >= 0 for s in size)):
        return f"size must be [height, width] non-negative integers, got {size!r:.80}"
    return None


def _list_problem(counts: list[Any], pixels: int) -> str | None:
    if not all(type(c) is int and c >= 0 for c in counts):
        return "counts must be non-negative integers"
    if sum(counts) != pixels:
        return f"counts add up to {sum(counts)} pixels, not height * width = {pixels} (truncated or corrupted)"
    return None


def _segment_cumsum(values: np.ndarray, group_starts: np.ndarray) -> np.ndarray:
    """Cumulative sums that restart at each index of ``group_starts`` (sorted, starting with 0)."""
    total = np.cumsum(values)
    base = total[group_starts] - values[group_starts]
    restart = np.zeros(len(values), dtype=np.int64)
    restart[group_starts] = 1
    return total - base[np.cumsum(restart) - 1]


def _string_problems(strings: list[bytes], pixels: np.ndarray) -> np.ndarray:
    """A flag per compressed counts string (True = malformed), all strings decoded in one numpy pass."""
    n = len(strings)
    lengths = np.fromiter((len(s) for s in strings), dtype=np.int64, count=n)
    string_end = np.cumsum(lengths)
    buf = np.frombuffer(b"".join(strings), dtype=np.uint8)
    if not len(buf):
        return pixels != 0
    bad = np.zeros(n, dtype=bool)
    invalid = np.flatnonzero((buf < 48) | (buf > 111))
    if len(invalid):  # characters outside '0'..'o'
        bad[np.searchsorted(string_end, invalid, side="right")] = True
    chars = buf - np.uint8(48)
    chars[invalid] = 0
    nonempty = lengths > 0
    last_char = string_end[nonempty] - 1
    bad[np.flatnonzero(nonempty)[chars[last_char] >= 32]] = True  # the last run is cut in the middle
    ends = chars < 32  # bit 0x20 clear: this character ends a run
    ends[last_char] = True  # no run spans two strings (those strings are flagged already)
    run_end = np.flatnonzero(ends)
    run_start = np.concatenate(([0], run_end[:-1] + 1))
    run_chars = run_end - run_start + 1
    runs = np.zeros(len(run_end), dtype=np.int64)
    for k in range(_MAX_CHARS_PER_RUN):
        longer = np.flatnonzero(run_chars > k)
        if not len(longer):
            break
        runs[longer] += (chars[run_start[longer] + k] & 0x1F).astype(np.int64) << (5 * k)
    run_owner = np.searchsorted(string_end, run_start, side="right")
    too_long = run_chars > _MAX_CHARS_PER_RUN
    if too_long.any():
        bad[run_owner[too_long]] = True
    negative = (chars[run_end] & 0x10) != 0
    runs[negative] -= np.int64(1) << (5 * np.minimum(run_chars[negative], _MAX_CHARS_PER_RUN))
    first_run = np.searchsorted(run_owner, np.arange(n))
    index = np.arange(len(runs)) - first_run[run_owner]  # run index within its string
    # run 3, 5, 7, ... is stored as the difference to run 1, 3, ...; run 4, 6, ... to run 2, 4, ...
    counts = runs
    for parity, start in ((1, 1), (0, 2)):
        chain = np.flatnonzero((index >= start) & (index % 2 == parity))
        if len(chain):
            owners = run_owner[chain]
            restarts = np.flatnonzero(np.concatenate(([True], owners[1:] != owners[:-1])))
            counts[chain] = _segment_cumsum(runs[chain], restarts)
    negative_count = counts < 0
    if negative_count.any():
        bad[run_owner[negative_count]] = True
    totals = np.bincount(run_owner, weights=np.maximum(counts, 0), minlength=n)
    return bad | (totals != pixels)


def first_malformed(rles: Sequence[Any]) -> tuple[int, str] | None:
    """(index, reason) of the first malformed RLE in ``rles``, or None when all are well formed."""
    strings: list[bytes] = []
    string_index: list[int] = []
    string_pixels: list[int] = []
    for i, rle in enumerate(rles):
        problem = _size_problem(rle)
        if problem is None:
            counts, pixels = rle["counts"], rle["size"][0] * rle["size"][1]
            if isinstance(counts, (str, bytes)):
                strings.append(counts.encode("utf-8") if isinstance(counts, str) else counts)
                string_index.append(i)
                string_pixels.append(pixels)
                continue
            problem = (
                _list_problem(counts, pixels)
                if isinstance(counts, list)
                else "counts must be a string or a list of integers"
            )
        if problem is not None:
            return i, problem
    if strings:
        bad = np.flatnonzero(_string_problems(strings, np.array(string_pixels, dtype=np.int64)))
        if len(bad):
            return string_index[bad[0]], "counts do not decode to height * width pixels (truncated or corrupted)"
    return None


# pycocotools 2.0.11's area() sizes a uint8 array by the number of masks, which numpy 2 refuses
# past 255: measure in chunks below that.
_AREA_CHUNK = 255


def areas(rles: Sequence[dict[str, Any]]) -> np.ndarray:
    """Pixel areas of compressed RLEs (float64), any number of them."""
    out = np.zeros(len(rles))
    for start in range(0, len(rles), _AREA_CHUNK):
        out[start : start + _AREA_CHUNK] = mask_utils.area(list(rles[start : start + _AREA_CHUNK]))
    return out
