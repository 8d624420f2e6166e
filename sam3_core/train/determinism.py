"""Deterministic kernels (`train.deterministic`): the same run twice on one machine gives the same weights.

Measured on the tiny preset with 2 torch threads on CPU: every op of a training step gave the same
bits in every process except one. The backward of indexing the image features by prompt (several
prompts of one frame read the same features) accumulates with `index_put_(accumulate=True)`, which
torch runs on CPU as parallel atomic float adds when it has more than one thread: the order of the
adds, and so the rounding, follows thread timing. Two runs of one command parted after 5-9 steps, and
more so on a busy machine (or beside MLflow's threads). Under `torch.use_deterministic_algorithms`
torch adds those serially in index order; nothing else of the step changes.

What stays machine-dependent: the thread count (each thread sums its own share of a reduction), the
CPU's vector width (AVX-512 and AVX2 kernels round differently) and the torch build.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)
# cuBLAS's deterministic workspace setting, which torch requires of deterministic GPU matmuls
CUBLAS_WORKSPACE = ":4096:8"


def use_deterministic_kernels(mode: str, device: torch.device) -> bool:
    """Turn torch's deterministic kernels on or off for this process as `mode` says; True when on.

    "auto": on for CPU runs. "on": on any device; on a GPU it also sets CUBLAS_WORKSPACE_CONFIG
    (unless set) and only warns about ops torch has no deterministic CUDA kernel for (not checked
    here: no GPU). "off": torch's defaults.
    """
    on = mode == "on" or (mode == "auto" and device.type == "cpu")
    if on and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(on, warn_only=device.type == "cuda")
    return on
