"""The GPU benchmarks' search for the largest batch that fits."""

from __future__ import annotations

import pytest

from bench.largest_batch import largest_batch


@pytest.mark.parametrize("capacity", [0, 1, 3, 5, 8, 13, 100])
@pytest.mark.parametrize("limit", [1, 8, 64])
def test_the_largest_fitting_batch_is_found_up_to_the_limit(capacity: int, limit: int) -> None:
    assert largest_batch(lambda size: size <= capacity, limit) == min(capacity, limit)


def test_the_search_tries_logarithmically_many_sizes() -> None:
    tried: list[int] = []

    def fits(size: int) -> bool:
        tried.append(size)
        return size <= 37

    assert largest_batch(fits, 256) == 37
    assert len(tried) <= 14
