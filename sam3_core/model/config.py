"""Model knobs. `tiny` and `full` presets (configs/model/*.yaml) fill these from the same schema."""

from __future__ import annotations

from dataclasses import dataclass, field

from sam3_core.model.anchors import AnchorConfig


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
    # weights to start from: a checkpoint URI (ours or the official `detector.*` layout)
    uri: str | None = None
    # parameter-name prefixes to freeze, e.g. ["backbone.vision_backbone", "backbone.language_backbone"]
    freeze: list[str] = field(default_factory=list)
    init_seed: int = 0
