"""The tracker's loss: SAM2's multi-step, multi-mask mask / IoU / object-score loss.

Written after SAM2's ``MultiStepMultiMasksAndIous`` (``training/loss_fns.py``) with the settings of
its training configs: for every frame of every clip, and for every interactive step of that frame
(one, plus one per corrective click), on the step's M predicted masks (3 with multimask output):

- focal (alpha 0.25, gamma 2, averaged over pixels) and dice losses per mask; only the mask with
  the lowest ``loss_mask * focal + loss_dice * dice`` is back-propagated, as SAM does;
- the L1 error of the predicted IoU against the mask's true IoU, on all M masks
  (``supervise_all_iou``: their mean);
- these three only where the object is present in the ground truth;
- the object score: binary cross-entropy of its logit against "the object is present".

Each term is summed over steps, frames, clips and objects, then divided by the number of objects
(in training averaged over ranks under torch.distributed; at least 1). ``loss`` is the weighted sum with
SAM2's weights: mask 20, dice 1, IoU 1, object score 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sam3_core import comm
from sam3_core.config_checks import check_float
from sam3_core.model.tracker_training import FrameSteps

TERMS = ("loss_mask", "loss_dice", "loss_iou", "loss_class")


@dataclass
class TrackerLossConfig:
    """Key `tracker_train.loss`: SAM2's loss weights and focal settings."""

    loss_mask: float = 20.0
    loss_dice: float = 1.0
    loss_iou: float = 1.0
    loss_class: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0

    def __post_init__(self) -> None:
        for key in ("loss_mask", "loss_dice", "loss_iou", "loss_class", "focal_gamma"):
            check_float(f"tracker_train.loss.{key}", getattr(self, key), 0.0)
        check_float("tracker_train.loss.focal_alpha", self.focal_alpha, 0.0, 1.0)


def focal_per_mask(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """[N, M]: sigmoid focal loss of each mask, averaged over its pixels."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(2).mean(-1)


def dice_per_mask(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N, M]: 1 - (2 |p t| + 1) / (|p| + |t| + 1), probabilities against the binary target."""
    prob = logits.sigmoid().flatten(2)
    flat = targets.flatten(2)
    return 1 - (2 * (prob * flat).sum(-1) + 1) / (prob.sum(-1) + flat.sum(-1) + 1)


def true_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N, M]: IoU of each thresholded mask with the target (0 when both are empty)."""
    pred, gt = logits.flatten(2) > 0, targets.flatten(2) > 0
    inter = (pred & gt).sum(-1).float()
    union = (pred | gt).sum(-1).float()
    return inter / union.clamp(min=1.0)


class TrackerLoss:
    """The weighted loss and its four terms for a batch's tracked clips and their ground-truth masks.

    `over_ranks`: the object count is averaged over the ranks (a collective every rank must join,
    as in a training step); off for validation, where ranks score different numbers of clips.
    """

    def __init__(self, cfg: TrackerLossConfig, over_ranks: bool = True) -> None:
        self.cfg, self.over_ranks = cfg, over_ranks
        self.weights = {term: getattr(cfg, term) for term in TERMS}

    def _step(
        self,
        terms: dict[str, torch.Tensor],
        masks: torch.Tensor,
        ious: torch.Tensor,
        scores: torch.Tensor,
        gt: torch.Tensor,
    ) -> None:
        targets = gt[:, None].float().expand_as(masks)
        focal = focal_per_mask(masks, targets, self.cfg.focal_alpha, self.cfg.focal_gamma)
        dice = dice_per_mask(masks, targets)
        iou = (ious - true_iou(masks, targets)).abs()
        present = gt.flatten(1).any(dim=1).float()
        rows = torch.arange(masks.shape[0], device=masks.device)
        best = (focal * self.cfg.loss_mask + dice * self.cfg.loss_dice).argmin(dim=1)
        terms["loss_mask"] = terms["loss_mask"] + (focal[rows, best] * present).sum()
        terms["loss_dice"] = terms["loss_dice"] + (dice[rows, best] * present).sum()
        terms["loss_iou"] = terms["loss_iou"] + (iou.mean(dim=1) * present).sum()
        bce = F.binary_cross_entropy_with_logits(scores[:, 0], present, reduction="none")
        terms["loss_class"] = terms["loss_class"] + bce.sum()

    def __call__(self, tracked: list[dict[int, FrameSteps]], gt_masks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """`tracked[b][t]`: clip b's frame t; `gt_masks[b]`: its [T, N, S, S] masks."""
        device = gt_masks[0].device
        terms = {term: torch.zeros((), device=device) for term in TERMS}
        for frames, masks in zip(tracked, gt_masks, strict=True):
            for t, steps in frames.items():
                for step in zip(steps.multimasks, steps.ious, steps.object_scores, strict=True):
                    self._step(terms, *step, masks[t])
        objects = torch.tensor(float(sum(m.shape[1] for m in gt_masks)), device=device)
        if self.over_ranks:
            objects = comm.all_reduce_sum(objects) / comm.world_size()
        objects = objects.clamp(min=1.0)
        losses = {term: value / objects for term, value in terms.items()}
        losses["loss"] = sum(self.weights[term] * losses[term] for term in TERMS)
        return losses
