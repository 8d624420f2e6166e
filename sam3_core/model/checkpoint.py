"""Checkpoints in any store: our training checkpoints and the official SAM3 layout.

Training checkpoints are `{"model", "optimizer", "scheduler", "step", ...}` with model keys
`detector.*` (see `VideoClipDetector`); with LoRA adapters the model keys also hold the
adapters and `"lora"` the settings to rebuild them. The official `sam3.pt` is a flat (or
`{"model": ...}`) state dict of `detector.*` and `tracker.*` keys; only `detector.*` is kept.
Loading merges saved adapters into plain weights, reports missing and unexpected keys instead
of failing on them, and names a shape mismatch.

A checkpoint is written to a staging file first (under the system temp folder, one folder per
destination folder: `stage_checkpoint`) and uploaded from there (`publish_checkpoint`), so the
object appears complete or not at all; the trainer stages on its own thread and publishes in the
background. A process killed mid-write leaves its staging file behind; `remove_stale_writes`
clears those and the store's own hidden temp files at the next start.

Resuming reads the whole training state on every rank: `load_training_state` maps it from one
file per node instead of reading a private copy into every process.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sam3_core import comm, storage
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


@dataclass(frozen=True)
class StagedCheckpoint:
    """A checkpoint serialised in the local staging folder, waiting to be uploaded to `uri`."""

    path: Path
    uri: str
    step: int
    metrics: dict[str, float] = field(default_factory=dict)


# Staging folders are made and removed under this lock: a checkpoint staged on the training thread while the
# previous one's upload ends on another never finds its folder removed between making it and using it.
_STAGING_FOLDERS = threading.Lock()


def _new_staging_file(staging: Path, name: str) -> Path:
    """An empty file of its own in `staging`."""
    with _STAGING_FOLDERS:
        staging.mkdir(parents=True, exist_ok=True)
        handle, name_on_disk = tempfile.mkstemp(dir=staging, prefix=f"{name}.", suffix=".partial")
    os.close(handle)
    return Path(name_on_disk)


def _remove_staged(path: Path) -> None:
    """Remove a staged file, and its folder once empty: the system temp folder keeps no folder per run."""
    path.unlink(missing_ok=True)
    with _STAGING_FOLDERS, contextlib.suppress(OSError):  # OSError: another checkpoint is staged there
        path.parent.rmdir()


def stage_checkpoint(
    state: dict[str, Any], uri: str, step: int, metrics: dict[str, float] | None = None
) -> StagedCheckpoint:
    """Serialise `state` (device tensors are copied to the host as they are written) for `uri`.

    Each call gets a file of its own, so a checkpoint can be staged while an earlier one to the
    same URI is still uploading.
    """
    folder, _, name = uri.rstrip("/").rpartition("/")
    staging = staging_dir(folder)
    path = _new_staging_file(staging, name)
    try:
        torch.save(state, path)
    except RuntimeError as exc:  # torch's writer reports a full or unwritable disk as a RuntimeError
        _remove_staged(path)
        raise StorageError(
            f"{uri}: writing it to the staging folder {staging} failed ({str(exc).strip().splitlines()[-1][:160]}); "
            "free space there or point TMPDIR at a disk with room for a checkpoint"
        ) from exc
    except BaseException:
        _remove_staged(path)
        raise
    return StagedCheckpoint(path, uri, step, dict(metrics or {}))


def publish_checkpoint(staged: StagedCheckpoint) -> CheckpointRef:
    """Hash and upload a staged checkpoint, then remove the staged file: the object appears complete or not at all."""
    try:
        size = staged.path.stat().st_size
        ref = CheckpointRef(staged.uri, size, storage.sha256_file(staged.path), staged.step, dict(staged.metrics))
        storage.upload_file(staged.path, staged.uri)
    finally:
        _remove_staged(staged.path)
    log.info("checkpoint step %d -> %s (%.1f MB)", staged.step, staged.uri, ref.size / 1e6)
    return ref


def save_checkpoint(
    state: dict[str, Any], uri: str, step: int, metrics: dict[str, float] | None = None
) -> CheckpointRef:
    """Serialise to the staging folder, then upload: the object appears complete or not at all."""
    return publish_checkpoint(stage_checkpoint(state, uri, step, metrics))


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


def _checked(state: Any, uri: str) -> dict[str, Any]:
    if not isinstance(state, dict):
        raise InputError(uri, "checkpoint", f"holds a {type(state).__name__}, not a checkpoint dict of tensors")
    return state


def load_checkpoint(uri: str, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint dict from any store (a fresh download: `last.pt` changes between reads).

    `mmap=True` maps tensors from the downloaded file instead of reading them into memory: for
    weights that are copied into a model right away (the file's name is gone when this returns;
    the mapping keeps its pages).
    """
    with tempfile.TemporaryDirectory(prefix="sam3pipe-ckpt-") as tmp:
        path = Path(tmp) / "checkpoint.pt"
        storage.download_file(uri, path)
        return read_checkpoint_file(path, uri, mmap)


def read_checkpoint_file(path: Path, uri: str, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint dict in a local file downloaded from `uri` (the name errors give)."""
    return _checked(_read(path, uri, mmap), uri)


def node_copy_path(uri: str) -> Path:
    """Where the processes of this machine find their shared download of `uri` while they resume."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"sam3pipe-resume-{digest}" / "checkpoint.pt"


def load_training_state(uri: str) -> dict[str, Any]:
    """Every rank's copy of the training state at `uri` (last.pt), memory-mapped and read once per machine.

    Collective: every rank calls it. A checkpoint in a local store is mapped where it is (the
    store replaces files, it never rewrites one). From an object store, the first process of each
    machine (LOCAL_RANK 0) downloads it to a machine-local file that the machine's processes map,
    and removes the name once all have mapped it. Its pages are then the page cache's: shared by
    the machine's processes and reclaimable, where `torch.load` without mmap gave each process a
    private copy (8 ranks x a 10 GB state: 80 GB of process memory on one node). Tensors copied
    to a GPU leave the mapping as they are copied; tensors that stay on the CPU (optimizer state
    of a CPU run) keep reading their pages from it until they are written (copy-on-write).
    """
    if not storage.is_remote(uri):
        return _checked(_read(storage.local_path(uri), uri, mmap=True), uri)
    path = node_copy_path(uri)
    if comm.local_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        storage.download_file(uri, path)
    comm.barrier()
    state = _read(path, uri, mmap=True)
    comm.barrier()
    if comm.local_rank() == 0:
        shutil.rmtree(path.parent, ignore_errors=True)
    return _checked(state, uri)


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
