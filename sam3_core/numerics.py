"""How a run does float math on its device: the autocast dtype and the GPU's matmul precision.

One place for what training, in-loop validation and predict share: `amp` (`auto` = bf16 autocast
on a GPU, full precision on CPU where bf16 gives no speed-up; `bf16`; `off`) and, on CUDA, TF32
for the float32 matmuls left outside autocast (the losses, the matcher, post-processing): many
times the float32 rate on Ampere and later, inputs rounded to a 10-bit mantissa and float32
accumulation, as PyTorch recommends for training (cuDNN convolutions use TF32 by PyTorch's own
default). Neither makes CUDA arithmetic bit-reproducible; see docs/training.md (resume on GPU).
"""

from __future__ import annotations

import torch

AMP_MODES = ("auto", "bf16", "off")


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `mode` (one of AMP_MODES) on `device`; None: full precision."""
    return torch.bfloat16 if mode == "bf16" or (mode == "auto" and device.type == "cuda") else None


def use_fast_matmul(device: torch.device) -> None:
    """On CUDA: TF32 for float32 matmuls (`set_float32_matmul_precision("high")`). Nothing on CPU.

    Through the one API that sets torch 2.15's old and new TF32 flags alike: mixing
    `backends.cuda.matmul.allow_tf32` with `fp32_precision` makes reading either raise.
    """
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
