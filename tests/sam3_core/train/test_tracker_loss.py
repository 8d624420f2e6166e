"""The tracker loss: SAM2's focal / dice / IoU / object-score terms, best-of-multimask, presence gating."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sam3_core.model.tracker_training import FrameSteps
from sam3_core.train.tracker_loss import TrackerLoss, TrackerLossConfig, dice_per_mask, focal_per_mask, true_iou

LOGIT = 20.0


def logits_of(mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, LOGIT, -LOGIT)


def square(size: int = 8, x0: int = 2, x1: int = 6) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[x0:x1, x0:x1] = True
    return mask


def test_focal_of_one_pixel_is_the_retinanet_formula() -> None:
    logit, target = torch.tensor(0.3), torch.tensor(1.0)
    p = torch.sigmoid(logit)
    expected = 0.25 * (1 - p) ** 2 * -torch.log(p)
    got = focal_per_mask(logit.view(1, 1, 1, 1), target.view(1, 1, 1, 1), 0.25, 2.0)
    assert torch.allclose(got, expected.view(1, 1))


def test_dice_is_near_zero_for_a_confident_exact_mask_and_near_one_for_a_disjoint_one() -> None:
    gt = square()[None, None].float()
    assert dice_per_mask(logits_of(square())[None, None], gt).item() < 1e-3
    assert dice_per_mask(logits_of(~square())[None, None], gt).item() > 0.95


def test_true_iou_of_thresholded_masks() -> None:
    half = square(x0=2, x1=6).clone()
    half[2:4] = False  # 8 of the 16 pixels
    assert true_iou(logits_of(half)[None, None], square()[None, None].float()).item() == pytest.approx(0.5)


def steps(masks: torch.Tensor, ious: torch.Tensor, scores: torch.Tensor) -> FrameSteps:
    return FrameSteps([masks], [ious], [scores])


def test_only_the_best_of_the_multimasks_is_supervised_and_the_iou_loss_covers_all_of_them() -> None:
    gt = square()
    good, bad = logits_of(gt), logits_of(~gt)
    multimask = torch.stack([bad, good, bad])[None]  # [1 object, 3 masks]
    ious = torch.tensor([[0.0, 1.0, 0.5]])
    losses = TrackerLoss(TrackerLossConfig())([{0: steps(multimask, ious, torch.tensor([[LOGIT]]))}], [gt[None, None]])
    assert losses["loss_mask"].item() < 1e-6 and losses["loss_dice"].item() < 1e-3
    assert losses["loss_iou"].item() == pytest.approx((0.0 + 0.0 + 0.5) / 3)
    assert losses["loss_class"].item() == pytest.approx(F.softplus(torch.tensor(-LOGIT)).item(), abs=1e-7)


def test_an_absent_object_is_only_asked_for_a_low_object_score() -> None:
    gt = torch.zeros(8, 8, dtype=torch.bool)
    wrong = logits_of(square())[None, None]
    losses = TrackerLoss(TrackerLossConfig())(
        [{0: steps(wrong, torch.tensor([[0.9]]), torch.tensor([[0.0]]))}], [gt[None, None]]
    )
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0 and losses["loss_iou"].item() == 0
    assert losses["loss_class"].item() == pytest.approx(math.log(2))


def test_terms_add_up_over_steps_and_frames_and_divide_by_the_objects() -> None:
    gt = square()
    wrong = logits_of(~gt)[None, None]
    one = TrackerLoss(TrackerLossConfig())([{0: steps(wrong, torch.ones(1, 1), torch.zeros(1, 1))}], [gt[None, None]])
    frame = FrameSteps([wrong, wrong], [torch.ones(1, 1)] * 2, [torch.zeros(1, 1)] * 2)
    two_steps_two_frames = TrackerLoss(TrackerLossConfig())([{0: frame, 1: frame}], [torch.stack([gt[None], gt[None]])])
    assert two_steps_two_frames["loss_dice"].item() == pytest.approx(4 * one["loss_dice"].item())
    pair = torch.stack([gt, gt])[None]  # two identical objects: the per-object mean is unchanged
    both = TrackerLoss(TrackerLossConfig())(
        [{0: steps(torch.cat([wrong, wrong]), torch.ones(2, 1), torch.zeros(2, 1))}], [pair]
    )
    assert both["loss_dice"].item() == pytest.approx(one["loss_dice"].item())


def test_the_loss_is_the_weighted_sum_with_sam2s_weights() -> None:
    gt = square()
    logits = logits_of(gt)[None, None] * 0.01
    losses = TrackerLoss(TrackerLossConfig())(
        [{0: steps(logits, torch.zeros(1, 1), torch.zeros(1, 1))}], [gt[None, None]]
    )
    expected = 20 * losses["loss_mask"] + losses["loss_dice"] + losses["loss_iou"] + losses["loss_class"]
    assert losses["loss"].item() == pytest.approx(expected.item())
