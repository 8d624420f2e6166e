"""Learning diagnostics of the detector: do its queries stay distinct, localise, and rank right?

A DETR-style detector can lower its loss while learning the wrong thing, and the loss does not
show it. Three symptoms were seen on the from-scratch tiny model, and each has a number here:

- query collapse: the last decoder layer's query embeddings of one prompt all become alike
  (mean pairwise cosine near 1), so every query paints the same mask and instances are not told
  apart (`query_cosine`);
- memorised positions: boxes are right on training frames and wrong on held-out ones
  (`top_box_iou` on the training split vs the validation split);
- wrong ranking: the query the Hungarian matcher pairs with an object is not the one the score
  puts first, so predictions (ranked by score) get the bad boxes (`matched_is_top`).

`diagnose(module, val_dataset, step)` is the validator the training loop calls (key
`train.diagnostics`); the functions above it are pure, on one frame's tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision.ops import box_convert, box_iou

# clips per split a diagnosis looks at: enough for a stable mean, cheap next to a training run
DEFAULT_MAX_CLIPS = 8


def mean_pairwise_cosine(queries: torch.Tensor) -> float:
    """Mean cosine similarity over the distinct pairs of Q query embeddings [Q, D] (1.0: collapsed)."""
    q = queries.shape[0]
    if q < 2:
        return float("nan")
    unit = torch.nn.functional.normalize(queries.float(), dim=-1)
    sims = unit @ unit.T
    return float((sims.sum() - sims.diagonal().sum()) / (q * (q - 1)))


def _xyxy(boxes_cxcywh: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes_cxcywh.float(), "cxcywh", "xyxy")


def top_scored_box_ious(scores: torch.Tensor, boxes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU [K] of each of K target boxes with the query the ranking gives it, as COCO matching does.

    The K highest-scoring queries [Q] (boxes [Q, 4] and targets [K, 4], normalised cxcywh) take,
    best score first, the unclaimed target they overlap most; a target no top query claims gets 0.
    With one object this is the IoU of the single highest-scoring query.
    """
    k = targets.shape[0]
    ious = torch.zeros(k)
    if k == 0:
        return ious
    order = scores.float().argsort(descending=True)[:k]
    overlaps = box_iou(_xyxy(boxes[order]), _xyxy(targets))
    free = torch.ones(k, dtype=torch.bool)
    for row in overlaps:
        masked = torch.where(free, row, torch.full_like(row, -1.0))
        best = int(masked.argmax())
        if masked[best] < 0:
            break
        ious[best], free[best] = row[best], False
    return ious


def matched_box_ious(boxes: torch.Tensor, targets: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
    """IoU [K] of each target with the query the Hungarian matcher paired it with (`matched` [K])."""
    if targets.shape[0] == 0:
        return torch.zeros(0)
    return box_iou(_xyxy(boxes[matched]), _xyxy(targets)).diagonal()


def matched_is_top(scores: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
    """Bool [K]: whether the query matched to each of K targets is among the K highest-scoring ones."""
    k = matched.shape[0]
    top = set(scores.float().argsort(descending=True)[:k].tolist())
    return torch.tensor([int(i) in top for i in matched.tolist()], dtype=torch.bool)


def _matched_queries(indices: Any, num_boxes: torch.Tensor) -> list[torch.Tensor]:
    """Per prompt, the query index of each of its targets (in target order) from sam3's matcher output."""
    batch_idx, src_idx, tgt_idx = (None if t is None else t.cpu() for t in indices)
    offsets = torch.cumsum(num_boxes, 0) - num_boxes
    out = []
    for prompt, count in enumerate(num_boxes.tolist()):
        rows = (batch_idx == prompt).nonzero().flatten()
        queries = src_idx[rows]
        if tgt_idx is not None:
            order = (tgt_idx[rows] - offsets[prompt]).argsort()
            queries = queries[order]
        out.append(queries[:count])
    return out


def frame_diagnostics(outputs: dict[str, Any], targets: dict[str, Any]) -> dict[str, list[float]]:
    """Per-object and per-prompt values of one frame, from an eval-mode forward with matching done.

    `outputs` is one stage of the detector (pred_logits [P, Q, 1], pred_boxes [P, Q, 4],
    queries [P, Q, D], indices from the matcher); `targets` the detector's `back_convert` of
    that stage's targets (boxes packed per prompt, num_boxes [P]).
    """
    num_boxes = targets["num_boxes"].cpu()
    scores = outputs["pred_logits"].detach().float().squeeze(-1).cpu()
    boxes = outputs["pred_boxes"].detach().float().cpu()
    packed = targets["boxes"].detach().float().cpu()
    matched = _matched_queries(outputs["indices"], num_boxes)
    values: dict[str, list[float]] = {
        "top_box_iou": [],
        "matched_box_iou": [],
        "matched_is_top": [],
        "query_cosine": [],
    }
    start = 0
    for prompt, count in enumerate(num_boxes.tolist()):
        values["query_cosine"].append(mean_pairwise_cosine(outputs["queries"][prompt].detach().cpu()))
        if count == 0:
            continue
        mine = packed[start : start + count]
        start += count
        values["top_box_iou"] += top_scored_box_ious(scores[prompt], boxes[prompt], mine).tolist()
        values["matched_box_iou"] += matched_box_ious(boxes[prompt], mine, matched[prompt]).tolist()
        values["matched_is_top"] += matched_is_top(scores[prompt], matched[prompt]).float().tolist()
    return values


@torch.no_grad()
def split_diagnostics(
    module: torch.nn.Module, clips: Sequence[Any], max_clips: int = DEFAULT_MAX_CLIPS
) -> dict[str, float]:
    """Means of `frame_diagnostics` over the first `max_clips` clips of a `ClipDataset`, dropout off."""
    from sam3.model.utils.misc import copy_data_to_device

    from sam3_core.data.datapoints import collate_clips

    detector = module.detector
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    totals: dict[str, list[float]] = {}
    try:
        for index in range(min(len(clips), max_clips)):
            batch = collate_clips([clips[index]], with_masks=False)
            if device.type != "cpu":
                batch = copy_data_to_device(batch, device, non_blocking=True)
            stages = module(batch, with_targets=True)
            for stage, target in zip(stages.output, batch.find_targets):
                for key, vals in frame_diagnostics(stage[-1], detector.back_convert(target)).items():
                    totals.setdefault(key, []).extend(vals)
    finally:
        module.train(was_training)
    return {key: sum(vals) / len(vals) for key, vals in totals.items() if vals}


def diagnose(
    module: torch.nn.Module,
    val_dataset: Sequence[Any],
    step: int,
    *,
    train_dataset: Sequence[Any] | None = None,
    max_clips: int = DEFAULT_MAX_CLIPS,
) -> dict[str, float]:
    """`diag/*` metrics of a `VideoClipDetector` at `step`: validation clips, and training clips when given.

    Pass `train_dataset` as clips of the training split built with `train=False` (no
    augmentation): the gap between `diag/train_top_box_iou` and `diag/val_top_box_iou` is how much
    the model memorised rather than learned. `step` is the caller's; the numbers do not depend on it.
    """
    del step
    metrics = {f"diag/val_{k}": v for k, v in split_diagnostics(module, val_dataset, max_clips).items()}
    if train_dataset is not None:
        metrics.update({f"diag/train_{k}": v for k, v in split_diagnostics(module, train_dataset, max_clips).items()})
    return metrics
