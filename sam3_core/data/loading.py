"""Batches that a DataLoader can pin: sam3's collated batch is a dataclass torch does not look inside.

``DataLoader(pin_memory=True)`` pins tensors, mappings and sequences, and calls ``pin_memory()``
on anything else that has it; sam3's ``BatchedDatapoint`` (nested dataclasses) has not, so it
would reach the GPU from pageable memory. ``PinningCollate`` wraps the collate function so the
loader's pin thread pins every tensor inside the batch and hands the batch itself on.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch


def pin_tensors(data: Any, pin: Callable[[torch.Tensor], torch.Tensor] = torch.Tensor.pin_memory) -> Any:
    """``data`` with ``pin`` applied to every tensor inside (dataclass fields, lists, tuples, dicts)."""
    if isinstance(data, torch.Tensor):
        return pin(data)
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        pinned = copy.copy(data)
        for item in dataclasses.fields(data):
            object.__setattr__(pinned, item.name, pin_tensors(getattr(data, item.name), pin))
        return pinned
    if isinstance(data, (list, tuple)) and not hasattr(data, "_fields"):
        return type(data)(pin_tensors(item, pin) for item in data)
    if isinstance(data, dict):
        return type(data)({key: pin_tensors(value, pin) for key, value in data.items()})
    return data


class _Pinnable:
    """A collated batch on its way from a worker to the pin thread."""

    def __init__(self, batch: Any) -> None:
        self.batch = batch

    def pin_memory(self) -> Any:
        return pin_tensors(self.batch)


class PinningCollate:
    """Picklable collate function whose batches the DataLoader pins completely (use with pin_memory=True only)."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, items: list[Any]) -> _Pinnable:
        return _Pinnable(self.collate(items))
