"""Turn the SAM3 detector's raw per-frame outputs into frame detections and COCO results.

The detector answers every prompt (one noun phrase = one category) with Q candidate
objects. Scores combine the per-query logit with the prompt's presence logit exactly as
sam3's own `PostProcessImage` does, so numbers stay comparable with upstream evaluation.
Masks are upsampled one at a time and encoded to RLE immediately: a full-resolution float
stack of 100 masks on a 1080p frame would need close to a gigabyte.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F

from sam3_core.config_checks import check_bool, check_float, check_int
from sam3_core.errors import ConfigError, InputError


@dataclass
class PostprocessConfig:
    """Knobs that decide which detections of a frame survive and how masks are binarised."""

    # detections kept per frame, best first, over all prompts
    top_k: int = 100
    # detections scoring below this are dropped
    score_threshold: float = 0.0
    # a mask pixel is on where the upsampled mask probability exceeds this
    mask_threshold: float = 0.5
    # score = query probability x the prompt's presence probability, as sam3 does
    use_presence: bool = True

    def __post_init__(self) -> None:
        check_int("postprocess.top_k", self.top_k, minimum=1)
        check_float("postprocess.score_threshold", self.score_threshold, 0.0, 1.0)
        check_float("postprocess.mask_threshold", self.mask_threshold, 0.0, 1.0, low_open=True, high_open=True)
        check_bool("postprocess.use_presence", self.use_presence)


@dataclass
class FrameDetections:
    """The kept detections of one frame, best score first, in original pixel coordinates.

    `rles` and `areas` (mask pixel counts) are None when the detector produced no masks.
    """

    image_id: int
    height: int
    width: int
    scores: list[float]
    category_ids: list[int]
    boxes_xyxy: list[list[float]]
    rles: list[dict] | None = None
    areas: list[int] | None = None

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def boxes_xywh(self) -> list[list[float]]:
        """The boxes in COCO's convention."""
        return [xyxy_to_xywh(box) for box in self.boxes_xyxy]


def xyxy_to_xywh(box: Sequence[float]) -> list[float]:
    """COCO's box convention: top-left corner, width, height."""
    x0, y0, x1, y1 = box
    return [x0, y0, x1 - x0, y1 - y0]


def detection_scores(outputs: Mapping[str, torch.Tensor], use_presence: bool) -> torch.Tensor:
    """[P, Q] probabilities: sigmoid(logit), times sigmoid(presence) of the prompt when asked."""
    probs = outputs["pred_logits"].float().sigmoid().squeeze(-1)
    if use_presence:
        probs = probs * outputs["presence_logit_dec"].float().sigmoid().reshape(-1, 1)
    return probs


def cxcywh_to_pixel_xyxy(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Normalised centre/size boxes -> corner boxes in pixels of the original frame."""
    cx, cy, w, h = boxes.float().unbind(-1)
    xyxy = torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)
    return xyxy * xyxy.new_tensor([width, height, width, height])


def encode_mask(mask: torch.Tensor) -> dict:
    """Binary [H, W] mask -> COCO RLE with `counts` as str, so it can be written as JSON."""
    rle = mask_utils.encode(np.asfortranarray(mask.to(torch.uint8).cpu().numpy()))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def upsample_and_encode(mask_logits: torch.Tensor, height: int, width: int, threshold: float) -> list[dict]:
    """Low-res mask logits [N, h, w] -> RLEs of (bilinear upsample, sigmoid > threshold)."""
    rles = []
    for logits in mask_logits:
        upsampled = F.interpolate(
            logits[None, None].float(), size=(height, width), mode="bilinear", align_corners=False
        )
        rles.append(encode_mask(upsampled[0, 0].sigmoid() > threshold))
    return rles


def _check_outputs(outputs: Mapping[str, torch.Tensor], num_prompts: int, image_id: int, use_presence: bool) -> None:
    source = f"detector outputs for image {image_id}"
    for key in ("pred_logits", "pred_boxes"):
        if key not in outputs:
            raise InputError(source, key, "missing from the detector's outputs")
    if use_presence and "presence_logit_dec" not in outputs:
        raise InputError(
            source,
            "presence_logit_dec",
            "missing; set postprocess.use_presence=false for a model without a presence head",
        )
    if outputs["pred_logits"].shape[0] != num_prompts:
        raise InputError(
            source,
            "pred_logits",
            f"has {outputs['pred_logits'].shape[0]} prompts but {num_prompts} category ids were given",
        )


@torch.no_grad()
def frame_detections(
    outputs: Mapping[str, torch.Tensor],
    category_ids: Sequence[int],
    image_id: int,
    original_size: tuple[int, int],
    cfg: PostprocessConfig,
) -> FrameDetections:
    """One frame's detector outputs ([P, Q, ...], prompt p asks for category_ids[p]) -> kept detections.

    Keeps the `top_k` best detections of the frame over all prompts (as sam3 prunes per image)
    among those scoring at least `score_threshold`.
    """
    _check_outputs(outputs, len(category_ids), image_id, cfg.use_presence)
    height, width = int(original_size[0]), int(original_size[1])
    scores = detection_scores(outputs, cfg.use_presence)
    num_queries = scores.shape[1]
    flat = scores.flatten()
    candidates = torch.nonzero(flat >= cfg.score_threshold).flatten()
    best = torch.topk(flat[candidates], min(cfg.top_k, candidates.numel()), sorted=True).indices
    kept = candidates[best]
    prompt_idx, query_idx = kept // num_queries, kept % num_queries
    boxes = cxcywh_to_pixel_xyxy(outputs["pred_boxes"][prompt_idx, query_idx], height, width)
    detections = FrameDetections(
        image_id=image_id,
        height=height,
        width=width,
        scores=flat[kept].tolist(),
        category_ids=[int(category_ids[p]) for p in prompt_idx.tolist()],
        boxes_xyxy=boxes.tolist(),
    )
    if "pred_masks" in outputs:
        rles = upsample_and_encode(outputs["pred_masks"][prompt_idx, query_idx], height, width, cfg.mask_threshold)
        detections.rles = rles
        detections.areas = [int(a) for a in mask_utils.area(rles)] if rles else []
    return detections


def coco_bbox_results(frames: Iterable[FrameDetections]) -> list[dict]:
    """COCO "bbox" results, one dict per detection (the seed's prepare_for_coco_detection)."""
    return [
        {"image_id": frame.image_id, "category_id": cat, "bbox": box, "score": score}
        for frame in frames
        for cat, box, score in zip(frame.category_ids, frame.boxes_xywh, frame.scores)
    ]


def coco_segm_results(frames: Iterable[FrameDetections]) -> list[dict]:
    """COCO "segm" results (the seed's prepare_for_coco_segmentation).

    `area` is the mask's fraction of the frame, as upstream writes it; COCO's loadRes
    recomputes pixel areas from the RLE, so evaluation does not depend on it.
    """
    results = []
    for frame in frames:
        if frame.rles is None or frame.areas is None:
            raise ConfigError(
                f"segm results need masks but the detector returned no pred_masks for image "
                f"{frame.image_id}; use a model with a mask head or evaluate bbox only"
            )
        frame_pixels = frame.height * frame.width
        for cat, rle, score, area, box in zip(
            frame.category_ids, frame.rles, frame.scores, frame.areas, frame.boxes_xywh
        ):
            results.append(
                {
                    "image_id": frame.image_id,
                    "category_id": cat,
                    "segmentation": rle,
                    "score": score,
                    "area": area / frame_pixels,
                    "bbox": box,
                }
            )
    return results
