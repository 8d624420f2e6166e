"""The training data stream: endless micro-batches over epochs, resumable at any micro-batch.

Each epoch, a `DistributedSampler` (shuffled by seed and epoch) gives every rank its share of
the dataset; `(epoch, micro_in_epoch)` always points at the next micro-batch the step takes, so
a resumed run skips exactly what was trained and continues with the same batches in the same order.

Without DataLoader workers the batches can be loaded by a background thread, `prefetch_factor`
batches ahead of the step: reading, decoding and resizing frames (which release the GIL) then
overlap the model's step instead of adding to it, where a core is free for it (`load_ahead_fits`).
Every random choice of a clip comes from its (seed, epoch, index), so loading ahead changes no batch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def build_loader(
    dataset: Dataset,
    indices: Sequence[int],
    batch_size: int,
    collate: Callable[[list[Any]], Any],
    num_workers: int,
    seed: int,
    prefetch_factor: int = 2,
    pin_memory: bool = False,
) -> DataLoader:
    """The one place a training DataLoader is made: `indices` in order, batched.

    Its own generator, seeded per epoch: a loader draws a seed when iterated, and a resumed run
    iterates a new loader mid-epoch, so drawing from the global stream would shift dropout.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=list(indices),
        collate_fn=collate,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )


def load_ahead_fits(device_type: str, threads: int, cores_per_process: int) -> bool:
    """Whether a loading thread runs beside the step instead of taking cores from it.

    On a GPU the step's CPU threads mostly wait for the device. On CPU, the loading thread's torch
    ops start an OpenMP team of their own next to the step's: with every core in the step's team,
    steps took twice as long (2 cores, 2 threads). So on CPU it loads ahead only where the step's
    `threads` leave one of this process's cores free.
    """
    return device_type == "cuda" or threads < cores_per_process


T = TypeVar("T")
# how long a blocked producer waits before it checks whether it was closed
_POLL_S = 0.1


class LoadAhead(Generic[T]):
    """The items of `source`, produced by a daemon thread up to `depth` ahead of the consumer.

    The thread's errors are raised by the consumer's `next`; `close` stops the thread.
    """

    _END = object()

    def __init__(self, source: Iterator[T], depth: int) -> None:
        self._queue: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(source,), name="sam3pipe-load-ahead", daemon=True)
        self._thread.start()

    def _put(self, item: Any, error: BaseException | None = None) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put((item, error), timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, source: Iterator[T]) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            self._put(None, exc)
            return
        self._put(self._END)

    def __iter__(self) -> LoadAhead[T]:
        return self

    def __next__(self) -> T:
        if self._closed.is_set():
            raise StopIteration
        item, error = self._queue.get()
        if error is not None or item is self._END:
            self.close()
        if error is not None:
            raise error
        if item is self._END:
            raise StopIteration
        return item

    def close(self) -> None:
        self._closed.set()
        self._thread.join()


class MicroBatches:
    """Endless micro-batches of `dataset` for this rank; `state_dict()` is the cursor."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        collate: Callable[[list[Any]], Any],
        *,
        seed: int = 0,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        load_ahead: bool = True,
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.dataset, self.batch_size, self.collate = dataset, batch_size, collate
        self.seed, self.num_workers, self.rank, self.world_size = seed, num_workers, rank, world_size
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        # without workers: `prefetch_factor` batches loaded ahead by a thread (else in the step)
        self.load_ahead = load_ahead and num_workers == 0 and prefetch_factor > 0
        self.epoch = 0
        self.micro_in_epoch = 0
        self._batches: Iterator[tuple[int, int, Any]] | None = None

    def __iter__(self) -> MicroBatches:
        return self

    def __next__(self) -> Any:
        if self._batches is None:
            batches = self._stream(self.epoch, self.micro_in_epoch)
            self._batches = LoadAhead(batches, self.prefetch_factor) if self.load_ahead else batches
        try:
            self.epoch, self.micro_in_epoch, batch = next(self._batches)
        except BaseException:
            self.close()  # a failed load ends the stream; the next `next` starts again at the cursor
            raise
        return batch

    def _epoch_indices(self, epoch: int) -> list[int]:
        sampler = DistributedSampler(
            self.dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=self.seed, drop_last=False
        )
        sampler.set_epoch(epoch)
        return list(sampler)

    def _stream(self, epoch: int, micro: int) -> Iterator[tuple[int, int, Any]]:
        """`(epoch, micro_in_epoch after it, batch)` from the cursor `(epoch, micro)` on."""
        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            remaining = self._epoch_indices(epoch)[micro * self.batch_size :]
            loader = build_loader(
                self.dataset,
                remaining,
                self.batch_size,
                self.collate,
                self.num_workers,
                self.seed + epoch,
                self.prefetch_factor,
                self.pin_memory,
            )
            for batch in loader:
                micro += 1
                yield epoch, micro, batch
            epoch += 1
            micro = 0

    def close(self) -> None:
        """Stop loading ahead; the next `next` starts again from the cursor."""
        if isinstance(self._batches, LoadAhead):
            self._batches.close()
        self._batches = None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.epoch, self.micro_in_epoch = int(state["epoch"]), int(state["micro_in_epoch"])
