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


@contextlib.contextmanager
def _cuda_is_identity() -> Iterator[None]:
    """`Tensor.cuda()` leaves a tensor where it is (on a machine without CUDA, where it would raise)."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def _patch_tracker_memory_on_cpu() -> None:
    """The tracker's memory read moves every memory to "cuda" and pins the object pointers' positions.

    `Sam3TrackerBase._prepare_memory_conditioned_features` calls `.cuda()` on each stored memory
    (it may have been offloaded) and `_get_tpos_enc` `.pin_memory()`; with CPU features both stay put.
    """
    from sam3.model.sam3_tracker_base import Sam3TrackerBase

    original = Sam3TrackerBase._prepare_memory_conditioned_features

    @functools.wraps(original)
    def prepare(self: Any, *args: Any, **kwargs: Any) -> Any:
        feats = kwargs.get("current_vision_feats", args[2] if len(args) > 2 else None)
        if feats is None or feats[-1].is_cuda:
            return original(self, *args, **kwargs)
        with _cuda_is_identity(), _pin_memory_is_identity():
            return original(self, *args, **kwargs)

    Sam3TrackerBase._prepare_memory_conditioned_features = prepare  # type: ignore[method-assign]


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
    _patch_tracker_memory_on_cpu()
    _APPLIED = True
    log.debug("sam3 CPU compatibility shims installed")
