"""AdamW with linear warmup and a cosine (or linear / constant) decay, as a resumable LambdaLR."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from sam3_core.config_checks import check_choice, check_float, check_int
from sam3_core.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 20
    schedule: str = "cosine"
    # the decayed learning rate ends at lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    # max gradient norm; 0 turns clipping off
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        check_float("optim.lr", self.lr, 0.0, 10.0, low_open=True)
        check_float("optim.weight_decay", self.weight_decay, 0.0)
        if self.lr * self.weight_decay >= 1.0:
            # AdamW scales every decayed weight by (1 - lr * weight_decay) per step: at 1 or more it
            # zeroes or flips the weights, and they diverge in a few steps
            raise ConfigError(
                f"optim.weight_decay={self.weight_decay!r}: with optim.lr={self.lr!r} each step scales the weights "
                f"by 1 - lr * weight_decay = {1 - self.lr * self.weight_decay:.3g}; keep lr * weight_decay below 1 "
                "(typical weight_decay: 0.01 to 0.1)"
            )
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise ConfigError(f"optim.betas={self.betas!r}: expected two numbers, e.g. [0.9, 0.999]")
        for beta in self.betas:
            check_float("optim.betas", beta, 0.0, 1.0, high_open=True)
        check_int("optim.warmup_steps", self.warmup_steps, 0)
        check_choice("optim.schedule", self.schedule, SCHEDULES)
        check_float("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_float("optim.grad_clip", self.grad_clip, 0.0)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW on trainable parameters; biases and norms (1-D tensors) get no weight decay."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))
