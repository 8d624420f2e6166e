"""Metric names shared by every run, so the MLflow compare view lines runs up.

Training logs `train/loss`, `train/<loss term>`, `train/lr`, `train/clips_per_s`,
`train/frames_per_s` and, on GPU, `train/gpu_mem_*_gib`; evaluation logs `eval/<name>`
with the evaluators' own names (`eval/bbox_AP`, `eval/video_mask_mAP_50_95`, ...).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping

_GIB = 1024**3
# MLflow accepts letters, digits, _ - . space : / in metric names.
_NOT_ALLOWED = re.compile(r"[^\w\-. :/]")


def metric_name(name: str) -> str:
    """A loss term or evaluator name made safe for MLflow (`loss[mask]` -> `loss_mask_`)."""
    return _NOT_ALLOWED.sub("_", name)


def gpu_memory_metrics() -> dict[str, float]:
    """Allocated and peak GPU memory of this process, when it trains on a GPU.

    Looks at torch only if the process already imported it: tracking never pulls torch in.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {
        "train/gpu_mem_allocated_gib": torch.cuda.memory_allocated() / _GIB,
        "train/gpu_mem_peak_gib": torch.cuda.max_memory_allocated() / _GIB,
    }


def train_step_metrics(
    loss: float, terms: Mapping[str, float], lr: float, clips: int, frames: int, seconds: float
) -> dict[str, float]:
    """One optimisation step: total loss, each weighted term, learning rate, throughput, GPU memory.

    `clips` and `frames` count what the step consumed over all ranks; `seconds` is its wall time.
    """
    metrics = {"train/loss": float(loss), "train/lr": float(lr)}
    metrics.update({f"train/{metric_name(term)}": float(value) for term, value in terms.items()})
    if seconds > 0:
        metrics["train/clips_per_s"] = clips / seconds
        metrics["train/frames_per_s"] = frames / seconds
    metrics.update(gpu_memory_metrics())
    return metrics


def eval_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Evaluator results under `eval/`, names as the evaluator gives them."""
    return {f"eval/{metric_name(name)}": float(value) for name, value in metrics.items()}
