"""Checkpoints in any store: our training checkpoints and the official SAM3 layout.

Training checkpoints are `{"model", "optimizer", "scheduler", "step", ...}` with model keys
`detector.*` (see `VideoClipDetector`); with LoRA adapters the model keys also hold the
adapters and `"lora"` the settings to rebuild them. The official `sam3.pt` is a flat (or
`{"model": ...}`) state dict of `detector.*` and `tracker.*` keys; only `detector.*` is kept.
Loading merges saved adapters into plain weights, reports missing and unexpected keys instead
of failing on them, and names a shape mismatch.

A checkpoint is written to a staging file first (under the system temp folder, one folder per
destination folder) and uploaded from there, so the object appears complete or not at all.
A process killed mid-write leaves its staging file behind; `remove_stale_writes` clears those
and the store's own hidden temp files at the next start.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sam3_core import storage
from sam3_core.errors import InputError, StorageError

log = logging.getLogger(__name__)
DETECTOR_PREFIX = "detector."


@dataclass(frozen=True)
class CheckpointRef:
    """Where a checkpoint was written, as logged to MLflow: URI, size, sha256, step, and the
    validation metrics of that step (empty when it was not a validation step)."""

    uri: str
    size: int
    sha256: str
    step: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class LoadReport:
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def staging_dir(folder_uri: str) -> Path:
    """The local folder where checkpoints bound for `folder_uri` are written before upload."""
    digest = hashlib.sha256(folder_uri.rstrip("/").encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"sam3pipe-ckpt-{digest}"


def remove_stale_writes(folder_uri: str) -> list[str]:
    """Delete what interrupted checkpoint writes into `folder_uri` left behind; the paths removed."""
    removed = []
    staging = staging_dir(folder_uri)
    if staging.exists():
        removed.extend(str(path) for path in staging.iterdir())
        shutil.rmtree(staging, ignore_errors=True)
    removed.extend(storage.remove_partial_writes(folder_uri))
    for path in removed:
        log.warning("removed %s, left by an interrupted checkpoint write", path)
    return removed


def save_checkpoint(
    state: dict[str, Any], uri: str, step: int, metrics: dict[str, float] | None = None
) -> CheckpointRef:
    """Serialise to the staging folder, then upload: the object appears complete or not at all."""
    folder, _, name = uri.rstrip("/").rpartition("/")
    staging = staging_dir(folder)
    staging.mkdir(parents=True, exist_ok=True)
    path = staging / f"{name}.partial"
    try:
        try:
            torch.save(state, path)
        except RuntimeError as exc:  # torch's writer reports a full or unwritable disk as a RuntimeError
            raise StorageError(
                f"{uri}: writing it to the staging folder {staging} failed ({str(exc).strip().splitlines()[-1][:160]}); "
                "free space there or point TMPDIR at a disk with room for a checkpoint"
            ) from exc
        ref = CheckpointRef(
            uri=uri, size=path.stat().st_size, sha256=storage.sha256_file(path), step=step, metrics=dict(metrics or {})
        )
        storage.upload_file(path, uri)
    finally:
        path.unlink(missing_ok=True)
    log.info("checkpoint step %d -> %s (%.1f MB)", step, uri, ref.size / 1e6)
    return ref


def _read(path: Path, uri: str, mmap: bool) -> Any:
    if path.stat().st_size == 0:
        raise InputError(uri, "checkpoint", "the file is empty (0 bytes); point model.uri at a complete checkpoint")
    try:
        # only the zip format can be mapped; older torch.save files are read whole
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        raise InputError(
            uri,
            "checkpoint",
            f"not a torch checkpoint ({type(exc).__name__} from torch.load); "
            "point model.uri at a file written by torch.save",
        ) from exc


def load_checkpoint(uri: str, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint dict from any store (a fresh download: `last.pt` changes between reads).

    `mmap=True` maps tensors from the file instead of reading them into memory: for weights
    that are copied into a model right away. Resume must not use it, because optimizer state
    loaded from it would stay backed by the mapped file.
    """
    with tempfile.TemporaryDirectory(prefix="sam3pipe-ckpt-") as tmp:
        path = Path(tmp) / "checkpoint.pt"
        storage.download_file(uri, path)
        state = _read(path, uri, mmap)
    if not isinstance(state, dict):
        raise InputError(uri, "checkpoint", f"holds a {type(state).__name__}, not a checkpoint dict of tensors")
    return state


def detector_state_dict(checkpoint: dict[str, Any], uri: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The `detector.*` weights of a training or official checkpoint, keys as `VideoClipDetector` names them."""
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict):
        raise InputError(uri, "model", f"holds a {type(state).__name__}, not a state dict of tensors")
    detector = {k: v for k, v in state.items() if k.startswith(DETECTOR_PREFIX) and isinstance(v, torch.Tensor)}
    if detector:
        return detector
    # a bare Sam3Image state dict (no wrapper prefix)
    return {DETECTOR_PREFIX + k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _merged_adapters(
    model: nn.Module, state: dict[str, torch.Tensor], checkpoint: dict[str, Any], uri: str
) -> dict[str, torch.Tensor]:
    from sam3_core.model import lora

    settings = checkpoint.get("lora")
    if not isinstance(settings, dict):
        raise InputError(uri, "lora", "the weights hold LoRA adapters but the checkpoint lacks their settings")
    log.info("merging the LoRA adapters of %s into its weights", uri)
    return lora.merge_adapted_state(model, state, settings)


def load_model_weights(model: nn.Module, uri: str) -> LoadReport:
    """Load detector weights into a plain `VideoClipDetector`, reporting missing/unexpected keys.

    A checkpoint saved with LoRA adapters is merged into plain weights on the way in.
    """
    checkpoint = load_checkpoint(uri, mmap=True)
    state = detector_state_dict(checkpoint, uri)
    from sam3_core.model.lora import has_adapters

    if has_adapters(state):
        state = _merged_adapters(model, state, checkpoint, uri)
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise InputError(
                uri,
                key,
                f"shape {tuple(value.shape)} does not fit the model's {tuple(own[key].shape)}; check model preset",
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
        report.loaded,
        uri,
        len(report.missing),
        len(report.unexpected),
    )
    for key in report.missing[:20]:
        log.warning("missing in checkpoint: %s", key)
    for key in report.unexpected[:20]:
        log.warning("unexpected in checkpoint: %s", key)
    return report
