"""Metric names shared by every run, so the MLflow compare view lines runs up.

Training logs the trainer's names (`train/loss`, `train/<loss term>`, `train/lr`,
`train/grad_norm`, `train/clips_per_s`, `train/frames_per_s`, `train/gpu_mem_gb` on GPU,
`val/loss`); evaluation logs `eval/<name>` with the evaluators' own names (`eval/bbox_AP`,
`eval/video_mask_mAP_50_95`, ...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# MLflow accepts letters, digits, _ - . space : / in metric names.
_NOT_ALLOWED = re.compile(r"[^\w\-. :/]")


def metric_name(name: str) -> str:
    """A loss term or evaluator name made safe for MLflow (`loss[mask]` -> `loss_mask_`)."""
    return _NOT_ALLOWED.sub("_", name)


def eval_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Evaluator results under `eval/`, names as the evaluator gives them."""
    return {f"eval/{metric_name(name)}": float(value) for name, value in metrics.items()}
