"""Checkpoints in any store: our training checkpoints and the official SAM3 layout.

Training checkpoints are `{"model", "optimizer", "scheduler", "step", ...}` with model keys
`detector.*` (see `VideoClipDetector`). The official `sam3.pt` is a flat (or `{"model": ...}`)
state dict of `detector.*` and `tracker.*` keys; only `detector.*` is kept. Loading reports
missing and unexpected keys instead of failing on them, and names a shape mismatch.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sam3_core import storage
from sam3_core.errors import InputError

log = logging.getLogger(__name__)
DETECTOR_PREFIX = "detector."


@dataclass(frozen=True)
class CheckpointRef:
    """Where a checkpoint was written, as logged to MLflow: URI, size, sha256, step."""

    uri: str
    size: int
    sha256: str
    step: int


@dataclass
class LoadReport:
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def save_checkpoint(state: dict[str, Any], uri: str, step: int) -> CheckpointRef:
    """Serialise locally, then upload: the object appears complete or not at all."""
    with tempfile.TemporaryDirectory(prefix="sam3pipe-ckpt-") as tmp:
        path = Path(tmp) / "checkpoint.pt"
        torch.save(state, path)
        ref = CheckpointRef(uri=uri, size=path.stat().st_size, sha256=storage.sha256_file(path), step=step)
        storage.upload_file(path, uri)
    log.info("checkpoint step %d -> %s (%.1f MB)", step, uri, ref.size / 1e6)
    return ref


def load_checkpoint(uri: str) -> dict[str, Any]:
    """Read a checkpoint from any store (a fresh download: `last.pt` changes between reads)."""
    with tempfile.TemporaryDirectory(prefix="sam3pipe-ckpt-") as tmp:
        path = Path(tmp) / "checkpoint.pt"
        storage.download_file(uri, path)
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises several types for a corrupt or foreign file
            raise InputError(uri, "checkpoint", f"not a readable torch checkpoint ({exc})") from exc


def detector_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The `detector.*` weights of a training or official checkpoint, keys as `VideoClipDetector` names them."""
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict):
        raise ValueError("checkpoint has no state dict under 'model'")
    detector = {k: v for k, v in state.items() if k.startswith(DETECTOR_PREFIX)}
    if detector:
        return detector
    # a bare Sam3Image state dict (no wrapper prefix)
    return {DETECTOR_PREFIX + k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_model_weights(model: nn.Module, uri: str) -> LoadReport:
    """Load detector weights into a `VideoClipDetector`, reporting missing/unexpected keys."""
    state = detector_state_dict(load_checkpoint(uri))
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise InputError(
                uri, key, f"shape {tuple(value.shape)} does not fit the model's {tuple(own[key].shape)}; check model preset"
            )
    result = model.load_state_dict(state, strict=False)
    report = LoadReport(
        loaded=len(state) - len(result.unexpected_keys),
        missing=sorted(result.missing_keys),
        unexpected=sorted(result.unexpected_keys),
    )
    if report.loaded == 0:
        raise InputError(uri, "model", "no parameter of the checkpoint matches the model; check model preset")
    log.info(
        "loaded %d tensors from %s (%d missing, %d unexpected)",
        report.loaded, uri, len(report.missing), len(report.unexpected),
    )
    for key in report.missing[:20]:
        log.warning("missing in checkpoint: %s", key)
    for key in report.unexpected[:20]:
        log.warning("unexpected in checkpoint: %s", key)
    return report
