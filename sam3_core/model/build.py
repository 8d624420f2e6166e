"""Build the SAM3 detector from the pinned sam3 classes at any size.

sam3's `model_builder` hard-codes the official dimensions; this mirrors its wiring with every
dimension taken from `ModelConfig`, so the `tiny` preset is the same architecture, only smaller,
and the `full` preset's parameter names match the official checkpoint.
"""

from __future__ import annotations

import logging
from importlib import resources

import torch
from torch import nn

from sam3_core.model import cpu_compat
from sam3_core.model.anchors import init_anchors
from sam3_core.model.config import ModelConfig

log = logging.getLogger(__name__)


def bpe_vocab_path() -> str:
    """The sam3 wheel lacks its BPE vocabulary; open_clip ships the byte-identical file."""
    return str(resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz"))


def _attention(cfg: ModelConfig, dropout: float, batch_first: bool | None = None) -> nn.Module:
    from sam3.model.model_misc import MultiheadAttentionWrapper

    kwargs = {} if batch_first is None else {"batch_first": batch_first}
    return MultiheadAttentionWrapper(num_heads=cfg.heads, dropout=dropout, embed_dim=cfg.d_model, **kwargs)


def _position_encoding(cfg: ModelConfig) -> nn.Module:
    from sam3.model.position_encoding import PositionEmbeddingSine

    # precompute_resolution stays None: precomputing allocates on "cuda" (see cpu_compat tests)
    return PositionEmbeddingSine(num_pos_feats=cfg.d_model, normalize=True, scale=None, temperature=10000)


def _vision_backbone(cfg: ModelConfig) -> nn.Module:
    from sam3.model.necks import Sam3DualViTDetNeck
    from sam3.model.vitdet import ViT

    trunk = ViT(
        img_size=cfg.image_size,
        pretrain_img_size=cfg.vit_pretrain_img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.vit_embed_dim,
        depth=cfg.vit_depth,
        num_heads=cfg.vit_heads,
        mlp_ratio=cfg.vit_mlp_ratio,
        norm_layer="LayerNorm",
        drop_path_rate=cfg.vit_drop_path_rate,
        qkv_bias=True,
        use_abs_pos=True,
        tile_abs_pos=True,
        global_att_blocks=tuple(cfg.vit_global_att_blocks),
        rel_pos_blocks=(),
        use_rope=True,
        use_interp_rope=True,
        window_size=cfg.vit_window_size,
        pretrain_use_cls_token=True,
        retain_cls_token=False,
        ln_pre=True,
        ln_post=False,
        return_interm_layers=False,
        bias_patch_embed=False,
    )
    return Sam3DualViTDetNeck(
        position_encoding=_position_encoding(cfg),
        d_model=cfg.d_model,
        scale_factors=[4.0, 2.0, 1.0, 0.5],
        trunk=trunk,
        add_sam2_neck=False,
    )


def _text_encoder(cfg: ModelConfig) -> nn.Module:
    from sam3.model.text_encoder_ve import VETextEncoder
    from sam3.model.tokenizer_ve import SimpleTokenizer

    return VETextEncoder(
        tokenizer=SimpleTokenizer(bpe_path=bpe_vocab_path()),
        d_model=cfg.d_model,
        width=cfg.text_width,
        heads=cfg.text_heads,
        layers=cfg.text_layers,
        context_length=cfg.text_context_length,
    )


def _transformer(cfg: ModelConfig) -> nn.Module:
    from sam3.model.decoder import TransformerDecoder, TransformerDecoderLayer
    from sam3.model.encoder import TransformerEncoderFusion, TransformerEncoderLayer
    from sam3.model.model_misc import TransformerWrapper

    encoder_layer = TransformerEncoderLayer(
        activation="relu",
        d_model=cfg.d_model,
        dim_feedforward=cfg.ffn_dim,
        dropout=cfg.dropout,
        pos_enc_at_attn=True,
        pos_enc_at_cross_attn_keys=False,
        pos_enc_at_cross_attn_queries=False,
        pre_norm=True,
        self_attention=_attention(cfg, cfg.dropout, batch_first=True),
        cross_attention=_attention(cfg, cfg.dropout, batch_first=True),
    )
    encoder = TransformerEncoderFusion(
        layer=encoder_layer,
        num_layers=cfg.encoder_layers,
        d_model=cfg.d_model,
        num_feature_levels=1,
        frozen=False,
        use_act_checkpoint=True,
        add_pooled_text_to_img_feat=False,
        pool_text_with_mask=True,
    )
    decoder_layer = TransformerDecoderLayer(
        activation="relu",
        d_model=cfg.d_model,
        dim_feedforward=cfg.ffn_dim,
        dropout=cfg.dropout,
        cross_attention=_attention(cfg, cfg.dropout),
        n_heads=cfg.heads,
        use_text_cross_attention=True,
    )
    decoder = TransformerDecoder(
        layer=decoder_layer,
        num_layers=cfg.decoder_layers,
        num_queries=cfg.num_queries,
        return_intermediate=True,
        box_refine=True,
        num_o2m_queries=0,
        dac=True,
        boxRPB="log",
        d_model=cfg.d_model,
        frozen=False,
        interaction_layer=None,
        dac_use_selfatt_ln=True,
        # resolution/stride stay None: precomputed box coords are allocated on "cuda"
        resolution=None,
        stride=None,
        use_act_checkpoint=True,
        presence_token=True,
    )
    return TransformerWrapper(encoder=encoder, decoder=decoder, d_model=cfg.d_model)


def _dot_product_scoring(cfg: ModelConfig) -> nn.Module:
    from sam3.model.model_misc import MLP, DotProductScoring

    prompt_mlp = MLP(
        input_dim=cfg.d_model,
        hidden_dim=cfg.ffn_dim,
        output_dim=cfg.d_model,
        num_layers=2,
        dropout=cfg.dropout,
        residual=True,
        out_norm=nn.LayerNorm(cfg.d_model),
    )
    return DotProductScoring(d_model=cfg.d_model, d_proj=cfg.d_model, prompt_mlp=prompt_mlp)


def _segmentation_head(cfg: ModelConfig) -> nn.Module:
    from sam3.model.maskformer_segmentation import (
        PixelDecoder,
        UniversalSegmentationHead,
    )

    return UniversalSegmentationHead(
        hidden_dim=cfg.d_model,
        upsampling_stages=3,
        aux_masks=False,
        presence_head=False,
        dot_product_scorer=None,
        act_ckpt=True,
        cross_attend_prompt=_attention(cfg, 0.0),
        pixel_decoder=PixelDecoder(num_upsampling_stages=3, interpolation_mode="nearest", hidden_dim=cfg.d_model),
    )


def _geometry_encoder(cfg: ModelConfig) -> nn.Module:
    from sam3.model.encoder import TransformerEncoderLayer
    from sam3.model.geometry_encoders import SequenceGeometryEncoder

    layer = TransformerEncoderLayer(
        activation="relu",
        d_model=cfg.d_model,
        dim_feedforward=cfg.ffn_dim,
        dropout=cfg.dropout,
        pos_enc_at_attn=False,
        pre_norm=True,
        self_attention=_attention(cfg, cfg.dropout, batch_first=False),
        pos_enc_at_cross_attn_queries=False,
        pos_enc_at_cross_attn_keys=True,
        cross_attention=_attention(cfg, cfg.dropout, batch_first=False),
    )
    return SequenceGeometryEncoder(
        pos_enc=_position_encoding(cfg),
        encode_boxes_as_points=False,
        points_direct_project=True,
        points_pool=True,
        points_pos_enc=True,
        boxes_direct_project=True,
        boxes_pool=True,
        boxes_pos_enc=True,
        d_model=cfg.d_model,
        num_layers=cfg.geometry_layers,
        layer=layer,
        use_act_ckpt=True,
        add_cls=True,
        add_post_encode_proj=True,
    )


def hungarian_matcher() -> nn.Module:
    """The one-to-one matcher of sam3's training config (the model computes matches with it)."""
    from sam3.train.matcher import BinaryHungarianMatcherV2

    return BinaryHungarianMatcherV2(
        focal=True, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25, gamma=2, stable=False
    )


def _init_text_parameters(model: nn.Module) -> None:
    """sam3 creates these with `torch.empty` and relies on a checkpoint; uninitialised they give NaNs."""
    text = model.backbone.language_backbone.encoder
    nn.init.normal_(text.positional_embedding, std=0.01)
    if getattr(text, "text_projection", None) is not None:
        nn.init.normal_(text.text_projection, std=text.text_projection.shape[0] ** -0.5)


def build_detector(cfg: ModelConfig) -> nn.Module:
    """The SAM3 image detector (`Sam3Image`) with a Hungarian matcher, weights freshly initialised.

    Construction is seeded by `cfg.init_seed` so every rank and every rerun starts identical.
    """
    from sam3.model.sam3_image import Sam3Image
    from sam3.model.vl_combiner import SAM3VLBackbone

    cpu_compat.apply()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.init_seed)
        model = Sam3Image(
            backbone=SAM3VLBackbone(visual=_vision_backbone(cfg), text=_text_encoder(cfg), scalp=1),
            transformer=_transformer(cfg),
            input_geometry_encoder=_geometry_encoder(cfg),
            segmentation_head=_segmentation_head(cfg) if cfg.enable_segmentation else None,
            num_feature_levels=1,
            o2m_mask_predict=True,
            dot_prod_scoring=_dot_product_scoring(cfg),
            use_instance_query=False,
            multimask_output=True,
            inst_interactive_predictor=None,
            matcher=hungarian_matcher(),
        )
        _init_text_parameters(model)
        init_anchors(model, cfg.anchors)
    if model.segmentation_head is not None:
        # its semantic-seg output has no criterion in the loss set: training it would only
        # spend optimizer state and DDP bookkeeping; its weights still load and save
        model.segmentation_head.semantic_seg_head.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("built SAM3 detector preset=%s (%.2fM parameters)", cfg.preset, n_params / 1e6)
    return model


def freeze(model: nn.Module, prefixes: list[str]) -> int:
    """Turn off gradients for parameters whose name starts with any prefix; returns how many."""
    frozen = 0
    for name, param in model.named_parameters():
        if any(name.startswith(prefix) for prefix in prefixes):
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen
