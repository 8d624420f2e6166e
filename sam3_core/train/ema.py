"""An exponential moving average of the trained weights (`train.ema_decay`): what validation scores and best.pt holds.

A from-scratch run at a high learning rate ends with weights that still move from step to step,
and its metrics move with them. Their average over the last few hundred steps scores as well or
better and varies less from run to run (docs/training.md). The average starts at the initial
weights with a short memory: the n-th update uses decay min(ema_decay, (1 + n) / (10 + n)), so
the random initialisation fades out within the first steps rather than the first 1 / (1 - decay).

Only trainable parameters are averaged (frozen ones and buffers do not change). The average is
part of every training checkpoint, so a resumed run goes on with the same average, bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from sam3_core.train.trainer import HookBase

# the decay of the n-th update is at most (1 + n) / (10 + n): 0.5 at the first, 0.9 at the 80th
_WARMUP_OFFSET = 10


def warmed_up_decay(decay: float, updates: int) -> float:
    """The decay of the `updates`-th update (counted from 1)."""
    return min(decay, (1 + updates) / (_WARMUP_OFFSET + updates))


class WeightEma(HookBase):
    """Keeps the average after every optimizer step; `swapped_in()` puts it in the module for a while.

    Registered before `Validation` and `BestCheckpoint`, which score and export the average
    (build_trainer wires them). Under DDP every rank holds the same average.
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.average: dict[str, torch.Tensor] = {}

    def _trained(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.trainer.module.named_parameters() if p.requires_grad}

    def before_train(self) -> None:
        """Start from the initial weights (a resumed run then loads its saved average over them)."""
        if not self.average:
            self.average = {name: p.detach().clone() for name, p in self._trained().items()}

    def after_step(self) -> None:
        self.updates += 1
        weight = 1.0 - warmed_up_decay(self.decay, self.updates)
        trained = self._trained()
        with torch.no_grad():
            for name, average in self.average.items():
                average.lerp_(trained[name].detach(), weight)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The module holds the average inside the block and its own weights again after it."""
        trained = self._trained()
        live = {name: p.detach().clone() for name, p in trained.items()}
        with torch.no_grad():
            for name, average in self.average.items():
                trained[name].copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, weights in live.items():
                    trained[name].copy_(weights)

    def exported(self, export: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """`export()` (e.g. the merged state dict) of the average, copied out before the weights go back."""
        with self.swapped_in():
            return {name: tensor.clone() for name, tensor in export().items()}

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "average": dict(self.average)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.updates = int(state["updates"])
        trained = self._trained()
        self.average = {name: tensor.to(trained[name].device).clone() for name, tensor in state["average"].items()}
