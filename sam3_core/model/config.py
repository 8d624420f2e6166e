"""Model knobs. `tiny` and `full` presets (configs/model/*.yaml) fill these from the same schema."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from sam3_core.config_checks import check_bool, check_float, check_int, check_int_list, check_str, check_str_list
from sam3_core.errors import ConfigError
from sam3_core.model.anchors import AnchorConfig

# a frame's ViT activations grow with the square of the side; past this one 1-frame step of the
# full preset no longer fits in the memory of any current accelerator
MAX_IMAGE_SIZE = 4032
# upper bounds of the other dimensions: far above any SAM3 variant (the full preset: 200 queries, width
# 1024, 32 ViT blocks), low enough that a typo (an extra digit or three) is one line, not an allocation
# that takes the machine's memory down
MAX_QUERIES = 4096
MAX_WIDTH = 16384
MAX_LAYERS = 256
MAX_HEADS = 256
MAX_CONTEXT_LENGTH = 4096


@dataclass
class LoraConfig:
    """LoRA adapters (through `peft`) on chosen linears; `rank: 0` turns them off.

    With adapters on, everything else is frozen except the `trainable` prefixes: only the
    adapters (and those) train, and the optimizer holds state for them alone.
    """

    rank: int = 0
    # the adapter's output is scaled by alpha / rank
    alpha: float = 16.0
    dropout: float = 0.0
    # parameter-name prefixes (of the detector) under which layers get adapters
    modules: list[str] = field(default_factory=lambda: ["backbone.vision_backbone.trunk", "transformer"])
    # names of the linears that get adapters, matched against the last part of a module name:
    # the ViT's qkv / proj / fc1 / fc2, the encoder's and decoder's linear1 / linear2, the text
    # blocks' c_fc / c_proj (attention modules cannot be targets: see sam3_core.model.lora)
    targets: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2", "linear1", "linear2"])
    # parameter-name prefixes that stay fully trainable next to the adapters, e.g. ["dot_prod_scoring"]
    trainable: list[str] = field(default_factory=list)

    # the config key of these settings, named in errors (a subclass adapts another module)
    KEY: ClassVar[str] = "model.lora"

    def __post_init__(self) -> None:
        key = self.KEY
        check_int(f"{key}.rank", self.rank, 0, 1024)
        check_float(f"{key}.alpha", self.alpha, 0.0, low_open=True)
        check_float(f"{key}.dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_str_list(f"{key}.modules", self.modules)
        check_str_list(f"{key}.targets", self.targets)
        check_str_list(f"{key}.trainable", self.trainable)
        if self.rank > 0 and not self.targets:
            raise ConfigError(f"{key}.targets: empty; name the layers to adapt (e.g. [qkv, proj]) or set {key}.rank=0")
        self._check_targets()

    def _check_targets(self) -> None:
        if "out_proj" in self.targets:
            raise ConfigError(
                "model.lora.targets: out_proj is read by nn.MultiheadAttention without calling it, so an adapter "
                "on it would never act; target linears such as qkv, proj, fc1, fc2, linear1, linear2"
            )


@dataclass
class TrackerConfig:
    """Key `model.tracker`: the sizes of SAM3's memory tracker. Defaults: the tiny preset; `full`: SAM3's.

    Its image side, feature stride and width come from the detector (`model.image_size`,
    `model.patch_size`, `model.d_model`): the tracker reads the detector's trunk.
    """

    # memory bank: the conditioning frames plus num_maskmem - 1 recent frames
    num_maskmem: int = 7
    # channels of a memory feature; an object pointer is split into d_model / mem_dim memory tokens
    mem_dim: int = 16
    # memory attention (self-attention + cross-attention to the memories, RoPE): layers, FFN width, heads
    memory_layers: int = 1
    memory_ffn_dim: int = 256
    memory_heads: int = 1
    # ConvNeXt blocks fusing a mask into the frame's features in the memory encoder
    fuser_layers: int = 2
    dropout: float = 0.0
    # conditioning frames attended at most (the temporally closest ones)
    max_cond_frames_in_attn: int = 4
    # object pointers of other frames attended at most
    max_obj_ptrs_in_encoder: int = 16
    # SAM3's temporal disambiguation: memory frames chosen by the quality of their masks (SAM2Long)
    memory_selection: bool = True
    # a frame scoring at or below this is never chosen as a memory
    memory_selection_threshold: float = 0.01

    def __post_init__(self) -> None:
        check_int("model.tracker.num_maskmem", self.num_maskmem, 1)
        for key in ("mem_dim", "memory_layers", "memory_ffn_dim", "memory_heads", "fuser_layers"):
            check_int(f"model.tracker.{key}", getattr(self, key), 1)
        check_float("model.tracker.dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_int("model.tracker.max_cond_frames_in_attn", self.max_cond_frames_in_attn, 2)
        check_int("model.tracker.max_obj_ptrs_in_encoder", self.max_obj_ptrs_in_encoder, 1)
        check_bool("model.tracker.memory_selection", self.memory_selection)
        check_float("model.tracker.memory_selection_threshold", self.memory_selection_threshold, 0.0, 1.0)


@dataclass
class ModelConfig:
    """Dimensions of the SAM3 detector built from the pinned sam3 classes.

    The defaults are the `tiny` preset; `full` is the official architecture (840M params).
    """

    preset: str = "tiny"
    image_size: int = 112
    patch_size: int = 14
    d_model: int = 64
    # vision trunk (ViT)
    vit_embed_dim: int = 96
    vit_depth: int = 2
    vit_heads: int = 4
    vit_mlp_ratio: float = 4.0
    vit_window_size: int = 4
    vit_global_att_blocks: list[int] = field(default_factory=lambda: [1])
    vit_pretrain_img_size: int = 112
    vit_drop_path_rate: float = 0.0
    # text encoder
    text_width: int = 64
    text_heads: int = 4
    text_layers: int = 2
    text_context_length: int = 32
    # fusion encoder / decoder
    heads: int = 4
    ffn_dim: int = 256
    encoder_layers: int = 2
    decoder_layers: int = 2
    geometry_layers: int = 1
    num_queries: int = 16
    # how the decoder's reference boxes and box attention start when no checkpoint is loaded
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    dropout: float = 0.0
    enable_segmentation: bool = True
    # weights to start from: a checkpoint URI (ours or the official `detector.*` layout) or a
    # registry entry `models:/<name>@<alias>` / `models:/<name>/<version>`
    uri: str | None = None
    # parameter-name prefixes to freeze, e.g. ["backbone.vision_backbone", "backbone.language_backbone"]
    freeze: list[str] = field(default_factory=list)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # SAM3's memory tracker (video inference, tracker training): sizes; side, stride and width are the detector's
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    init_seed: int = 0

    def __post_init__(self) -> None:
        check_str("model.preset", self.preset, required=True)
        check_int("model.patch_size", self.patch_size, 1)
        check_int("model.image_size", self.image_size, self.patch_size, MAX_IMAGE_SIZE)
        check_int("model.vit_pretrain_img_size", self.vit_pretrain_img_size, self.patch_size, MAX_IMAGE_SIZE)
        for key in ("image_size", "vit_pretrain_img_size"):
            if getattr(self, key) % self.patch_size:
                raise ConfigError(
                    f"model.{key}={getattr(self, key)}: must be a multiple of model.patch_size={self.patch_size}"
                )
        for key, maximum in (
            ("vit_embed_dim", MAX_WIDTH),
            ("vit_depth", MAX_LAYERS),
            ("vit_heads", MAX_HEADS),
            ("vit_window_size", MAX_IMAGE_SIZE),
            ("text_width", MAX_WIDTH),
            ("text_heads", MAX_HEADS),
            ("text_layers", MAX_LAYERS),
            ("text_context_length", MAX_CONTEXT_LENGTH),
            ("heads", MAX_HEADS),
            ("ffn_dim", 4 * MAX_WIDTH),
            ("decoder_layers", MAX_LAYERS),
            ("num_queries", MAX_QUERIES),
        ):
            check_int(f"model.{key}", getattr(self, key), 1, maximum)
        for key in ("encoder_layers", "geometry_layers"):
            check_int(f"model.{key}", getattr(self, key), 0, MAX_LAYERS)
        check_int("model.init_seed", self.init_seed, 0, 2**63 - 1)
        # the pixel decoder's GroupNorm(8) and the position encoding need d_model in multiples of 8
        check_int("model.d_model", self.d_model, 8, MAX_WIDTH)
        if self.d_model % 8 or self.d_model % self.heads:
            raise ConfigError(f"model.d_model={self.d_model}: must be a multiple of 8 and of model.heads={self.heads}")
        for dim, heads in (("vit_embed_dim", "vit_heads"), ("text_width", "text_heads")):
            if getattr(self, dim) % getattr(self, heads):
                raise ConfigError(
                    f"model.{dim}={getattr(self, dim)}: must be a multiple of model.{heads}={getattr(self, heads)}"
                )
        check_float("model.vit_mlp_ratio", self.vit_mlp_ratio, 0.0, 64.0, low_open=True)
        check_float("model.vit_drop_path_rate", self.vit_drop_path_rate, 0.0, 1.0, high_open=True)
        check_float("model.dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_int_list("model.vit_global_att_blocks", self.vit_global_att_blocks, 0)
        if self.vit_depth - 1 not in self.vit_global_att_blocks or max(self.vit_global_att_blocks) >= self.vit_depth:
            raise ConfigError(
                f"model.vit_global_att_blocks={list(self.vit_global_att_blocks)}: block indices must be below "
                f"model.vit_depth={self.vit_depth} and include the last block ({self.vit_depth - 1})"
            )
        check_bool("model.enable_segmentation", self.enable_segmentation)
        check_str("model.uri", self.uri, optional=True)
        check_str_list("model.freeze", self.freeze)
        if not isinstance(self.lora, LoraConfig):
            raise ConfigError(f"model.lora={self.lora!r}: expected a mapping of LoRA settings")
        self._check_tracker_fits()

    def _check_tracker_fits(self) -> None:
        """The tracker shares the detector's width: SAM's mask decoder runs 8 heads on half of it, an
        object pointer becomes d_model / mem_dim memory tokens, and RoPE needs a multiple of 4 per head."""
        if not isinstance(self.tracker, TrackerConfig):
            raise ConfigError(f"model.tracker={self.tracker!r}: expected a mapping of tracker settings")
        if self.d_model % 16:
            raise ConfigError(f"model.d_model={self.d_model}: SAM3's tracker needs a multiple of 16")
        if self.d_model % self.tracker.mem_dim:
            raise ConfigError(f"model.tracker.mem_dim={self.tracker.mem_dim}: must divide model.d_model={self.d_model}")
        if self.d_model % (4 * self.tracker.memory_heads):
            raise ConfigError(
                f"model.tracker.memory_heads={self.tracker.memory_heads}: model.d_model={self.d_model} must be a "
                "multiple of 4 x memory_heads (RoPE)"
            )
