"""The training data stream: the same micro-batches and cursor whether or not a thread loads them ahead."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from torch.utils.data import Dataset

from sam3_core.train.data import MicroBatches, load_ahead_fits

SAMPLES, BATCH = 10, 3  # 4 micro-batches per epoch, the last one short


class Indices(Dataset):
    """Item i is i; `fail_at` raises on that index, `loaded` is set once `wait_for` was loaded."""

    def __init__(self, fail_at: int | None = None, wait_for: int | None = None) -> None:
        self.fail_at, self.wait_for = fail_at, wait_for
        self.loaded = threading.Event()

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> int:
        if index == self.fail_at:
            raise ValueError(f"frame {index} is unreadable")
        if index == self.wait_for:
            self.loaded.set()
        return index


def collate(items: list[int]) -> list[int]:
    return list(items)


@pytest.fixture
def stream() -> Iterator[Callable[..., MicroBatches]]:
    """Makes streams of a dataset, `prefetch` batches ahead; closes them all at the end of the test."""
    made: list[MicroBatches] = []

    def make(dataset: Dataset, prefetch: int, num_workers: int = 0) -> MicroBatches:
        made.append(MicroBatches(dataset, BATCH, collate, seed=5, num_workers=num_workers, prefetch_factor=prefetch))
        return made[-1]

    yield make
    for batches in made:
        batches.close()


def take(batches: MicroBatches, count: int) -> list[tuple[list[int], dict[str, int]]]:
    """`count` batches, each with the cursor after it was taken."""
    return [(next(batches), batches.state_dict()) for _ in range(count)]


def load_ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "sam3pipe-load-ahead"]


def test_loading_ahead_gives_the_same_batches_and_cursor_as_loading_in_the_step(stream) -> None:
    ahead, in_step = stream(Indices(), prefetch=2), stream(Indices(), prefetch=0)

    assert take(ahead, 11) == take(in_step, 11)


def test_the_thread_loads_the_next_batches_while_the_step_runs(stream) -> None:
    order = stream(Indices(), prefetch=0)._epoch_indices(0)
    dataset = Indices(wait_for=order[2 * BATCH])  # the first item of the third batch
    batches = stream(dataset, prefetch=2)

    assert next(batches) == order[:BATCH]
    assert dataset.loaded.wait(timeout=30)
    assert batches.state_dict() == {"epoch": 0, "micro_in_epoch": 1}


def test_an_error_while_loading_ahead_is_raised_by_next_in_the_training_thread(stream) -> None:
    order = stream(Indices(), prefetch=0)._epoch_indices(0)
    batches = stream(Indices(fail_at=order[BATCH]), prefetch=2)  # in the second batch

    next(batches)
    with pytest.raises(ValueError, match=r"frame \d+ is unreadable"):
        next(batches)
    assert not load_ahead_threads()
    assert batches.state_dict() == {"epoch": 0, "micro_in_epoch": 1}


def test_close_stops_the_thread_and_the_stream_goes_on_from_its_cursor(stream) -> None:
    expected = take(stream(Indices(), prefetch=0), 6)
    batches = stream(Indices(), prefetch=2)

    head = take(batches, 2)
    batches.close()
    assert not load_ahead_threads()
    assert head + take(batches, 4) == expected


def test_a_loaded_cursor_continues_with_the_batches_after_it(stream) -> None:
    expected = take(stream(Indices(), prefetch=0), 9)
    batches = stream(Indices(), prefetch=2)
    take(batches, 2)

    batches.load_state_dict(expected[4][1])

    assert take(batches, 4) == expected[5:]


def test_with_dataloader_workers_no_thread_is_started(stream) -> None:
    batches = stream(Indices(), prefetch=1, num_workers=1)

    assert take(batches, 2) == take(stream(Indices(), prefetch=0), 2)
    assert not load_ahead_threads()


def test_without_load_ahead_no_thread_is_started() -> None:
    batches = MicroBatches(Indices(), BATCH, collate, seed=5, prefetch_factor=2, load_ahead=False)

    assert take(batches, 2) == take(MicroBatches(Indices(), BATCH, collate, seed=5, prefetch_factor=0), 2)
    assert not load_ahead_threads()


@pytest.mark.parametrize(
    ("device", "threads", "cores", "fits"),
    [
        ("cuda", 8, 8, True),  # the step waits for the GPU
        ("cpu", 1, 2, True),  # a core left free
        ("cpu", 2, 2, False),  # every core in the step's threads
        ("cpu", 1, 1, False),  # two processes on two cores, one thread each
    ],
)
def test_a_loading_thread_runs_on_a_gpu_or_where_the_step_leaves_a_core_free(
    device: str, threads: int, cores: int, fits: bool
) -> None:
    assert load_ahead_fits(device, threads, cores) is fits
