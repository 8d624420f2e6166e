"""The sam3 loss set used by upstream fine-tuning (boxes, focal + presence classification, masks).

Weights and matcher settings follow upstream's fine-tuning config; every one is a config key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sam3_core.config_checks import check_choice, check_float, check_int
from sam3_core.model import cpu_compat
from sam3_core.model.build import hungarian_matcher


@dataclass
class LossConfig:
    loss_bbox: float = 5.0
    loss_giou: float = 2.0
    loss_ce: float = 20.0
    presence_loss: float = 20.0
    loss_mask: float = 200.0
    loss_dice: float = 10.0
    pos_weight: float = 10.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    o2m_weight: float = 2.0
    o2m_alpha: float = 0.3
    o2m_threshold: float = 0.4
    o2m_topk: int = 4
    # "mean": per-frame losses averaged over the clip's frames (clip length does not scale the
    # loss); "sum": summed, as sam3's wrapper does without normalize_by_stage_num
    frame_reduction: str = "mean"

    def __post_init__(self) -> None:
        for key in (
            "loss_bbox",
            "loss_giou",
            "loss_ce",
            "presence_loss",
            "loss_mask",
            "loss_dice",
            "pos_weight",
            "focal_gamma",
            "o2m_weight",
        ):
            check_float(f"loss.{key}", getattr(self, key), 0.0)
        for key in ("focal_alpha", "o2m_alpha", "o2m_threshold"):
            check_float(f"loss.{key}", getattr(self, key), 0.0, 1.0)
        check_int("loss.o2m_topk", self.o2m_topk, 1)
        check_choice("loss.frame_reduction", self.frame_reduction, ("mean", "sum"))


def build_loss(cfg: LossConfig, num_queries: int, with_masks: bool, per_rank: bool = False) -> nn.Module:
    """`Sam3LossWrapper`; box-count normalisation is global (all-reduced) under torch.distributed.

    `per_rank=True` normalises by this rank's own boxes (sam3's "local"): no collective, for work
    that ranks share out unevenly (validation clips), where a global all-reduce per frame would
    find ranks that have no frame left.
    """
    from sam3.train.loss.loss_fns import Boxes, IABCEMdetr, Masks
    from sam3.train.loss.sam3_loss import Sam3LossWrapper
    from sam3.train.matcher import BinaryOneToManyMatcher

    cpu_compat.apply()
    loss_fns: list[nn.Module] = [
        Boxes(weight_dict={"loss_bbox": cfg.loss_bbox, "loss_giou": cfg.loss_giou}),
        IABCEMdetr(
            weak_loss=False,
            weight_dict={"loss_ce": cfg.loss_ce, "presence_loss": cfg.presence_loss},
            pos_weight=cfg.pos_weight,
            alpha=cfg.focal_alpha,
            gamma=cfg.focal_gamma,
            use_presence=True,
            pos_focal=False,
            pad_n_queries=num_queries,
            pad_scale_pos=1.0,
        ),
    ]
    if with_masks:
        loss_fns.append(
            Masks(
                focal_alpha=cfg.focal_alpha,
                focal_gamma=cfg.focal_gamma,
                weight_dict={"loss_mask": cfg.loss_mask, "loss_dice": cfg.loss_dice},
                compute_aux=False,
            )
        )
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return Sam3LossWrapper(
        loss_fns_find=loss_fns,
        matcher=hungarian_matcher(),
        o2m_matcher=BinaryOneToManyMatcher(alpha=cfg.o2m_alpha, threshold=cfg.o2m_threshold, topk=cfg.o2m_topk),
        o2m_weight=cfg.o2m_weight,
        use_o2m_matcher_on_o2m_aux=False,
        normalization="global" if distributed and not per_rank else "local",
        normalize_by_stage_num=cfg.frame_reduction == "mean",
    )
