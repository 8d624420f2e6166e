"""Every workaround for the pinned sam3 (0.1.4) on a machine without CUDA, in one place.

Each shim is a no-op on CUDA tensors, is applied once by `apply()`, and has a test in
tests/sam3_core/model/test_cpu_compat.py that fails if the pinned sam3 stops needing it (so it can be removed).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

log = logging.getLogger(__name__)
_APPLIED = False


@contextlib.contextmanager
def _pin_memory_is_identity() -> Iterator[None]:
    """`Tensor.pin_memory()` raises without an NVIDIA driver; pinning is pointless on CPU anyway."""
    original = torch.Tensor.pin_memory
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.pin_memory = original  # type: ignore[method-assign]


def _patch_geometry_encoder_pin_memory() -> None:
    """`SequenceGeometryEncoder._encode_boxes` pins a 4-element scale tensor on every forward."""
    from sam3.model.geometry_encoders import SequenceGeometryEncoder

    original = SequenceGeometryEncoder._encode_boxes

    @functools.wraps(original)
    def encode_boxes(self: Any, boxes: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if boxes.is_cuda:
            return original(self, boxes, *args, **kwargs)
        with _pin_memory_is_identity():
            return original(self, boxes, *args, **kwargs)

    SequenceGeometryEncoder._encode_boxes = encode_boxes  # type: ignore[method-assign]


def _patch_focal_loss_triton() -> None:
    """`loss_fns.sigmoid_focal_loss` defaults to a Triton (GPU-only) kernel; use torch on CPU."""
    from sam3.train.loss import loss_fns

    original: Callable[..., torch.Tensor] = loss_fns.sigmoid_focal_loss

    @functools.wraps(original)
    def sigmoid_focal_loss(inputs: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not inputs.is_cuda:
            kwargs["triton"] = False
        return original(inputs, *args, **kwargs)

    loss_fns.sigmoid_focal_loss = sigmoid_focal_loss


def apply() -> None:
    """Install the shims (idempotent). Called by the model builder and the loss builder."""
    global _APPLIED
    if _APPLIED:
        return
    _patch_geometry_encoder_pin_memory()
    _patch_focal_loss_triton()
    _APPLIED = True
    log.debug("sam3 CPU compatibility shims installed")
