"""A fine-tuned detector in SAM3's own video checkpoint: its `detector.*` plus a base checkpoint's `tracker.*`
(or its own, when its run trained the tracker too).

SAM3's video model (`build_sam3_video_model`) loads one checkpoint holding `detector.*` and
`tracker.*`, strictly by default; a checkpoint of the detector alone fails with missing keys
(upstream issues #298, #480). The export takes the detector of `model.uri` (our training
checkpoint, LoRA adapters merged, or a checkpoint in SAM3's layout) and completes it from
`base.uri` (SAM3's `sam3.pt` or an earlier export): the tracker, and the tracker's neck inside
the detector (`detector.backbone.vision_backbone.sam2_convs.*`), which detector training neither
has nor changes. A checkpoint of a tracker or joint run (`train.stage`) has both already: its own
`tracker.*` and neck are kept, and the base only fixes the keys and shapes. The result has exactly
the base's keys and shapes, so whatever loads the base strictly loads the export, and
`build_sam3_image_model` takes its `detector.*`.

The file is a flat state dict of tensors, as `sam3.pt` is (no other keys: sam3 would refuse them).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sam3_core import storage
from sam3_core.config_checks import MISSING, check_uri
from sam3_core.errors import InputError
from sam3_core.mlflow_records.settings import MlflowConfig
from sam3_core.model.checkpoint import CheckpointRef, detector_state_dict, read_checkpoint_file, save_checkpoint
from sam3_core.model.config import ModelConfig
from sam3_core.model.tracker import DETECTOR_PREFIX, TRACKER_NECK_PREFIX, TRACKER_PREFIX, tracker_state_dict

log = logging.getLogger(__name__)

# the registry entry of exported video models, beside the detector's (`mlflow.registered_model_name`)
VIDEO_MODEL_NAME = "sam3-video-model"


@dataclass
class ExportBaseConfig:
    # the checkpoint whose tracker completes the detector: SAM3's sam3.pt or an earlier export
    uri: str = MISSING

    def __post_init__(self) -> None:
        check_uri("base.uri", self.uri, required=True)


@dataclass
class ExportOutputConfig:
    # the file to write (local path, file:// or s3://)
    uri: str = MISSING

    def __post_init__(self) -> None:
        check_uri("output.uri", self.uri, required=True)


@dataclass
class ExportConfig:
    """Keys of `sam3pipe component export`. `model.uri`: the fine-tuned checkpoint or `models:/<name>@<alias>`;
    the model preset matters only for a checkpoint saved with LoRA adapters (they are merged on it)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    base: ExportBaseConfig = field(default_factory=ExportBaseConfig)
    output: ExportOutputConfig = field(default_factory=ExportOutputConfig)
    mlflow: MlflowConfig = field(default_factory=lambda: MlflowConfig(registered_model_name=VIDEO_MODEL_NAME))


@dataclass(frozen=True)
class ExportResult:
    """The written checkpoint (URI, size, sha256) and where its tensors came from."""

    checkpoint: CheckpointRef
    model_sha256: str
    base_sha256: str
    from_model: int
    from_base: int


def _tensors(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


def fine_tuned_detector(checkpoint: dict[str, Any], uri: str, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The `detector.*` weights of a checkpoint of ours (LoRA adapters merged on `model_cfg`) or in SAM3's layout."""
    from sam3_core.model.lora import has_adapters

    state = detector_state_dict(checkpoint, uri)
    if not has_adapters(state):
        return state
    from sam3_core.model.build import build_detector
    from sam3_core.model.lora import merge_adapted_state
    from sam3_core.model.video_detector import VideoClipDetector

    settings = checkpoint.get("lora")
    if not isinstance(settings, dict):
        raise InputError(uri, "lora", "the weights hold LoRA adapters but the checkpoint lacks their settings")
    log.info("merging the LoRA adapters of %s on the %s preset", uri, model_cfg.preset)
    return merge_adapted_state(VideoClipDetector(build_detector(model_cfg)), state, settings)


def video_state_dict(
    detector: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    model_uri: str,
    base_uri: str,
    trained_tracker: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """`detector` (fine-tuned `detector.*`) completed from `base`: the same keys and shapes as `base`.

    From the base come its `tracker.*` (unless `trained_tracker`, the model checkpoint's own, is
    given: then every one of the base's, with its shape) and the tracker's neck when `detector`
    lacks it; every other detector weight must come from `detector`, with the base's shape.
    """
    tracker = {k: v for k, v in base.items() if k.startswith(TRACKER_PREFIX)}
    if not tracker:
        raise InputError(
            base_uri, "tracker", "holds no tracker.* weights; pass SAM3's sam3.pt or a checkpoint exported before"
        )
    if trained_tracker:
        _check_same_layout(trained_tracker, tracker, model_uri, base_uri)
        tracker = dict(trained_tracker)
    base_detector = {k: v for k, v in base.items() if k.startswith(DETECTOR_PREFIX)}
    for key, value in detector.items():
        if key not in base_detector:
            raise InputError(model_uri, key, f"is not a detector weight of the base {base_uri}; check model preset")
        if tuple(value.shape) != tuple(base_detector[key].shape):
            raise InputError(
                model_uri,
                key,
                f"shape {tuple(value.shape)} differs from the base's {tuple(base_detector[key].shape)}; "
                "the base must be the same architecture (model preset)",
            )
    absent = sorted(key for key in base_detector if key not in detector and not key.startswith(TRACKER_NECK_PREFIX))
    if absent:
        raise InputError(
            model_uri, absent[0], f"missing, with {len(absent) - 1} more detector weights; is this a full checkpoint?"
        )
    other = sorted(key for key in base if not key.startswith((DETECTOR_PREFIX, TRACKER_PREFIX)))
    if other:
        log.warning("left out %d base tensors outside detector.* and tracker.* (e.g. %s)", len(other), other[0])
    neck = {k: v for k, v in base_detector.items() if k not in detector}
    return {**neck, **dict(detector), **tracker}


def _check_same_layout(
    tensors: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], model_uri: str, base_uri: str
) -> None:
    """`tensors` has exactly the keys of `base` (`base_uri`'s), each with the base's shape."""
    for key, value in tensors.items():
        if key not in base:
            raise InputError(model_uri, key, f"is not a tracker weight of the base {base_uri}; check model preset")
        if tuple(value.shape) != tuple(base[key].shape):
            raise InputError(
                model_uri,
                key,
                f"shape {tuple(value.shape)} differs from the base's {tuple(base[key].shape)}; "
                "the base must be the same architecture (model preset)",
            )
    absent = sorted(set(base) - set(tensors))
    if absent:
        raise InputError(model_uri, absent[0], f"missing, with {len(absent) - 1} more tracker weights")


@contextlib.contextmanager
def _fetched(uri: str) -> Iterator[tuple[dict[str, Any], str]]:
    """The checkpoint at `uri` read once (downloaded once when remote) and the sha256 of those bytes."""
    with tempfile.TemporaryDirectory(prefix="sam3pipe-export-") as tmp:
        path = Path(tmp) / "checkpoint.pt"
        storage.download_file(uri, path)
        yield read_checkpoint_file(path, uri, mmap=True), storage.sha256_file(path)


def export_video_checkpoint(cfg: ExportConfig, model_uri: str) -> ExportResult:
    """Write `model_uri`'s detector with `cfg.base.uri`'s tracker to `cfg.output.uri`; its size and sha256."""
    with _fetched(model_uri) as (model_checkpoint, model_sha256), _fetched(cfg.base.uri) as (raw, base_sha256):
        detector = fine_tuned_detector(model_checkpoint, model_uri, cfg.model)
        trained_tracker = tracker_state_dict(model_checkpoint.get("model", model_checkpoint))
        base = _tensors(raw["model"] if isinstance(raw.get("model"), dict) else raw)
        state = video_state_dict(detector, base, model_uri, cfg.base.uri, trained_tracker)
        ref = save_checkpoint(state, cfg.output.uri, step=0)
    from_model = len(detector) + len(trained_tracker)
    result = ExportResult(ref, model_sha256, base_sha256, from_model=from_model, from_base=len(state) - from_model)
    log.info(
        "exported %s (%d detector and tracker tensors) + %s (%d tracker and neck tensors) -> %s (sha256 %s)",
        model_uri,
        result.from_model,
        cfg.base.uri,
        result.from_base,
        ref.uri,
        ref.sha256,
    )
    return result
