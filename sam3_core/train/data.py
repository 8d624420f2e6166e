"""The training data stream: endless micro-batches over epochs, resumable at any micro-batch.

Each epoch, a `DistributedSampler` (shuffled by seed and epoch) gives every rank its share of
the dataset; `(epoch, micro_in_epoch)` always points at the next micro-batch, so a resumed run
skips exactly what was trained and continues with the same batches in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

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
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.dataset, self.batch_size, self.collate = dataset, batch_size, collate
        self.seed, self.num_workers, self.rank, self.world_size = seed, num_workers, rank, world_size
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.epoch = 0
        self.micro_in_epoch = 0
        self._batches: Iterator[Any] | None = None

    def __iter__(self) -> MicroBatches:
        return self

    def __next__(self) -> Any:
        if self._batches is None:
            self._batches = self._stream()
        return next(self._batches)

    def _epoch_indices(self) -> list[int]:
        sampler = DistributedSampler(
            self.dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=self.seed, drop_last=False
        )
        sampler.set_epoch(self.epoch)
        return list(sampler)

    def _stream(self) -> Iterator[Any]:
        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            remaining = self._epoch_indices()[self.micro_in_epoch * self.batch_size :]
            loader = build_loader(
                self.dataset,
                remaining,
                self.batch_size,
                self.collate,
                self.num_workers,
                self.seed + self.epoch,
                self.prefetch_factor,
                self.pin_memory,
            )
            for batch in loader:
                self.micro_in_epoch += 1
                yield batch
            self.epoch += 1
            self.micro_in_epoch = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.micro_in_epoch = int(state["epoch"]), int(state["micro_in_epoch"])
        self._batches = None
