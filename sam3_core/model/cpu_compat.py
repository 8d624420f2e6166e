"""Every workaround for the pinned sam3 (0.1.4) on a machine without CUDA, in one place.

Each shim is a no-op on CUDA tensors, is applied once by `apply()` (or scoped by
`cuda_calls_on_cpu()`), and has a test in tests/sam3_core/model/test_cpu_compat.py that fails if
the pinned sam3 stops needing it (so it can be removed).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

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


def _patch_connected_components_empty_batch() -> None:
    """`connected_components_cpu` stacks one result per mask and fails on zero masks (`torch.stack([])`).

    sam3's video model fills holes in the masks of a frame's new detections, which are often none;
    on a GPU the Triton kernel takes empty batches.
    """
    from sam3.perflib import connected_components

    original = connected_components.connected_components_cpu

    @functools.wraps(original)
    def connected_components_cpu(input_tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if input_tensor.shape[0] == 0:
            empty = torch.zeros(input_tensor.shape, dtype=torch.int64, device=input_tensor.device)
            return empty, empty.clone()
        return original(input_tensor)

    connected_components.connected_components_cpu = connected_components_cpu


def _patch_video_predictor_gpu_properties() -> None:
    """`Sam3VideoPredictor.start_session` logs the current GPU's properties, which raises without one."""
    from sam3.model.sam3_video_predictor import Sam3VideoPredictor

    original = Sam3VideoPredictor._get_torch_and_gpu_properties

    @functools.wraps(original)
    def properties(self: Any) -> str:
        if torch.cuda.is_available():
            return original(self)
        return f"torch: {torch.__version__}, no GPU"

    Sam3VideoPredictor._get_torch_and_gpu_properties = properties  # type: ignore[method-assign]


def _uneven(args: tuple, kwargs: dict) -> bool:
    """An `all_gather(outputs, tensor)` whose outputs differ in size, on gloo, synchronous (sam3's calls)."""
    import torch.distributed as dist

    if len(args) < 2 or kwargs.get("async_op") or not isinstance(args[0], list):
        return False
    outputs, tensor = args[0], args[1]
    group = kwargs.get("group", args[2] if len(args) > 2 else None)
    return dist.get_backend(group) == "gloo" and any(out.shape != tensor.shape for out in outputs)


def _is_cuda(device: Any) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda"


def _uneven_all_gather(outputs: list[torch.Tensor], tensor: torch.Tensor, group: Any) -> None:
    """`all_gather` into outputs of different first dimensions, over gloo (which takes equal sizes only).

    sam3 gathers each rank's tracked masks and scores, whose count differs between ranks (NCCL
    takes that); here every part is padded to the largest, gathered, and cut back.
    """
    import torch.distributed as dist

    longest = max(out.shape[0] for out in outputs)
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in outputs]
    dist.all_gather(parts, padded, group=group)
    for out, part in zip(outputs, parts):
        out.copy_(part[: out.shape[0]])


class _CudaCallsOnCpu(TorchFunctionMode):
    """sam3's explicit CUDA placements, kept on the CPU: `.cuda()`, `.pin_memory()`, `device="cuda"`, `.to("cuda")`;
    and its gathers of per-rank parts of different sizes, over gloo.

    sam3's video stack places memories, frames and states on "cuda" by name (tracker memory
    read-back, `storage_device`, frame loading, pinned index copies); builders precompute caches
    on "cuda". Its multi-GPU inference all-gathers each rank's tracks, as many as the rank holds.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("cuda", "pin_memory"):
            return args[0]
        if name == "all_gather" and _uneven(args, kwargs):
            group = kwargs.get("group", args[2] if len(args) > 2 else None)
            return _uneven_all_gather(args[0], args[1], group)
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if name == "to" and any(_is_cuda(arg) for arg in args[1:]):
            args = tuple("cpu" if _is_cuda(arg) else arg for arg in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_calls_on_cpu() -> Iterator[None]:
    """Run sam3 code that names "cuda" on a machine without one (a no-op where CUDA is available)."""
    if torch.cuda.is_available():
        yield
        return
    with _CudaCallsOnCpu():
        yield


def apply() -> None:
    """Install the shims (idempotent). Called by the model builder and the loss builder."""
    global _APPLIED
    if _APPLIED:
        return
    _patch_geometry_encoder_pin_memory()
    _patch_focal_loss_triton()
    _patch_connected_components_empty_batch()
    _patch_video_predictor_gpu_properties()
    _APPLIED = True
    log.debug("sam3 CPU compatibility shims installed")
