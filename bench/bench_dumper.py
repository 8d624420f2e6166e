"""Merging gathered COCO predictions: sam3pipe's streaming merge vs upstream SAM3's, side by side.

Upstream's PredictionDumper flattens its per-image heaps with `sum(lists, [])`, which copies
the growing result once per image: quadratic in the number of images. Both merges run on the
same parts in one process, and the outputs are compared element by element.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from bench.seed_reference import seed_merge
from sam3_core.predict.dumper import merge_parts, round_result

T = TypeVar("T")


@dataclass
class DumperBench:
    """Size of the merge: ranks x predictions_per_rank predictions over `images` images."""

    ranks: int = 4
    predictions_per_rank: int = 200_000
    images: int = 8_000
    categories: int = 5
    padded_images: int = 8
    maxdets: int = 100
    seed: int = 0


def make_parts(bench: DumperBench) -> list[list[dict]]:
    """Per-rank results grouped by frame, a varying count per frame, and the last rank's padded
    samples repeating rank 0's first frames (as a padded DistributedSampler does)."""
    rng = random.Random(bench.seed)
    images_per_rank = bench.images // bench.ranks
    parts = []
    for rank in range(bench.ranks):
        first = rank * images_per_rank
        frames = list(range(first, first + images_per_rank))
        if rank == bench.ranks - 1:
            frames = frames[: images_per_rank - bench.padded_images] + list(range(bench.padded_images))
        image_ids = sorted(rng.choice(frames) for _ in range(bench.predictions_per_rank))
        parts.append(
            [
                round_result(
                    {
                        "image_id": image_id,
                        "category_id": rng.randrange(bench.categories),
                        "bbox": [rng.uniform(0, 640) for _ in range(4)],
                        "score": rng.random(),
                    }
                )
                for image_id in image_ids
            ]
        )
    return parts


def _timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main() -> None:
    bench = DumperBench()
    parts = make_parts(bench)
    total = sum(len(part) for part in parts)
    ours, ours_s = _timed(merge_parts, parts, bench.maxdets)
    upstream, upstream_s = _timed(seed_merge, parts, bench.maxdets)
    print(
        f"prediction merge: {total:,} predictions, {bench.images:,} images, {bench.ranks} ranks, "
        f"maxdets {bench.maxdets}"
    )
    print(f"{'implementation':<32}{'wall s':>10}")
    print(f"{'upstream (heap + sum flatten)':<32}{upstream_s:>10.2f}")
    print(f"{'sam3pipe (streaming merge)':<32}{ours_s:>10.2f}")
    print(f"{'speed-up':<32}{upstream_s / ours_s:>9.1f}x")
    print(f"identical output: {ours == upstream}")


if __name__ == "__main__":
    main()
