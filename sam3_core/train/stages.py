"""Training stages: which half of SAM3 a run trains (`train.stage`), and the tracker's training settings.

- ``detector`` (default): the detector on noun-phrase clips, as before; no tracker is built.
- ``tracker``: SAM3's tracker on object clips (`data.tracker_clips`), the detector frozen: every
  ``detector.*`` weight stays bit-identical (the tracker reads its features; only preset ``all``
  trains the tracker's neck, which lives in the detector). What of the tracker
  trains is a preset (`tracker_train.trainable`):

  | preset | trains |
  | --- | --- |
  | ``memory`` | memory attention, memory encoder, memory embeddings, object pointers |
  | ``memory_decoder`` (default) | the above and SAM's mask decoder (SAM2's fine-tuning set without the image encoder) |
  | ``all`` | every tracker weight (prompt encoder too) and the tracker's own neck inside the detector (``sam2_convs``) |

  With `tracker_train.lora.rank` > 0 only LoRA adapters on the tracker's linears train instead
  (plus `tracker_train.lora.trainable`); the training checkpoints keep the adapters, best.pt has
  them merged.

- ``joint``: both, on a detector clip batch and a tracker clip batch per step: their losses
  summed (`tracker_train.joint=sum`) or steps taking turns (``alternate``);
  `tracker_train.tracker_weight` scales the tracker's. The detector trains as in stage detector
  (`model.freeze`, `model.lora`), the tracker per its preset.

Checkpoints keep SAM3's layout (``detector.*``, ``tracker.*``), so the export merges a trained
tracker and SAM3's own video model loads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from sam3_core.config_checks import check_bool, check_choice, check_float, check_uri
from sam3_core.model.config import LoraConfig
from sam3_core.train.tracker_loss import TrackerLossConfig

STAGES = ("detector", "tracker", "joint")
# stage joint: both losses every step, or steps taking turns
JOINT_MODES = ("sum", "alternate")
# the tracker's parameter-name prefixes each preset trains (names inside Sam3TrackerBase)
_MEMORY = (
    "transformer.",
    "maskmem_backbone.",
    "maskmem_tpos_enc",
    "no_mem_embed",
    "no_mem_pos_enc",
    "no_obj_embed_spatial",
    "obj_ptr_proj.",
    "obj_ptr_tpos_proj.",
    "no_obj_ptr",
)
TRACKER_PRESETS: dict[str, tuple[str, ...]] = {
    "memory": _MEMORY,
    "memory_decoder": (*_MEMORY, "sam_mask_decoder."),
    "all": ("",),
}
# the tracker's neck: a copy of the detector's neck inside the detector, read by the tracker only
TRACKER_NECK = "backbone.vision_backbone.sam2_convs."


@dataclass
class TrackerLoraConfig(LoraConfig):
    """Key `tracker_train.lora`: LoRA adapters on the tracker's linears (`rank: 0` turns them off).

    With adapters on, only they (and the `trainable` prefixes) train, whatever the preset: the
    memory attention's and the mask decoder's attention projections (SAM's attention calls all four,
    ``out_proj`` included), their MLPs, and the memory encoder's ConvNeXt pointwise layers.
    """

    # parameter-name prefixes of the tracker under which layers get adapters
    modules: list[str] = field(
        default_factory=lambda: ["transformer", "sam_mask_decoder.transformer", "maskmem_backbone"]
    )
    targets: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "out_proj",
            "linear1",
            "linear2",
            "lin1",
            "lin2",
            "pwconv1",
            "pwconv2",
        ]
    )

    KEY: ClassVar[str] = "tracker_train.lora"

    def _check_targets(self) -> None:
        """Every listed name is fine: the tracker has no `nn.MultiheadAttention` whose `out_proj` goes unused."""


@dataclass
class TrackerTrainConfig:
    """Key `tracker_train`: what of SAM3's tracker trains in stages tracker and joint, and how."""

    # memory | memory_decoder | all (see sam3_core.train.stages)
    trainable: str = "memory_decoder"
    # a checkpoint whose tracker (`tracker.*` and the tracker's neck) the run starts from, in place of
    # model.uri's: SAM3's sam3.pt or an export beside a detector trained here; "" = model.uri's (or as built)
    tracker_uri: str = ""
    # the ground truth, not the predicted object score, decides whether a frame's memory holds the object
    teacher_force_obj_scores: bool = True
    # probability of dropping part of the spatial memory when a frame is tracked (sam3's knob; 0: off)
    spatial_memory_dropout: float = 0.0
    # stage joint: "sum" (both losses every step) or "alternate" (detector and tracker steps take turns)
    joint: str = "sum"
    # stage joint: the tracker's loss is multiplied by this
    tracker_weight: float = 1.0
    loss: TrackerLossConfig = field(default_factory=TrackerLossConfig)
    lora: TrackerLoraConfig = field(default_factory=TrackerLoraConfig)

    def __post_init__(self) -> None:
        check_choice("tracker_train.trainable", self.trainable, TRACKER_PRESETS)
        check_uri("tracker_train.tracker_uri", self.tracker_uri)
        check_bool("tracker_train.teacher_force_obj_scores", self.teacher_force_obj_scores)
        check_float("tracker_train.spatial_memory_dropout", self.spatial_memory_dropout, 0.0, 1.0)
        check_choice("tracker_train.joint", self.joint, JOINT_MODES)
        check_float("tracker_train.tracker_weight", self.tracker_weight, 0.0)


def freeze_all(module: nn.Module) -> int:
    """Turn off every gradient of `module`; returns how many parameters."""
    count = 0
    for param in module.parameters():
        param.requires_grad_(False)
        count += param.numel()
    return count


def train_tracker_preset(detector: nn.Module, tracker: nn.Module, preset: str) -> int:
    """Gradients on for the tracker weights `preset` names (off for the rest of the tracker); returns how many.

    Preset ``all`` also trains the tracker's neck inside the detector.
    """
    prefixes = TRACKER_PRESETS[preset]
    count = 0
    for name, param in tracker.named_parameters():
        on = any(name.startswith(prefix) for prefix in prefixes)
        param.requires_grad_(on)
        count += param.numel() if on else 0
    if preset == "all":
        for name, param in detector.named_parameters():
            if name.startswith(TRACKER_NECK):
                param.requires_grad_(True)
                count += param.numel()
    return count
