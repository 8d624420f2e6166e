"""The largest batch that fits on the accelerator, shared by the GPU benchmarks' steps."""

from __future__ import annotations

from collections.abc import Callable


def largest_batch(fits: Callable[[int], bool], limit: int) -> int:
    """The largest batch size in [1, limit] for which `fits(size)` holds (0 if none): doubling, then bisecting
    the last gap, so a step that runs out of memory is tried about 2 log2(limit) times, not `limit` times."""
    fitting, size = 0, 1
    while size <= limit and fits(size):
        fitting, size = size, size * 2
    too_big = min(limit + 1, size)
    while too_big - fitting > 1:
        middle = (fitting + too_big) // 2
        if fits(middle):
            fitting = middle
        else:
            too_big = middle
    return fitting
