"""Turn the SAM3 detector's raw per-frame outputs into frame detections and COCO results.

The detector answers every prompt (one noun phrase = one category) with Q candidate
objects. Scores combine the per-query logit with the prompt's presence logit exactly as
sam3's own `PostProcessImage` does, so numbers stay comparable with upstream evaluation.
The frame's top-k is kept while the detector's prompt batches arrive (`FrameTopK`), on the
outputs' device; only the kept masks are upsampled, one at a time, and encoded to RLE at once: a
full-resolution float stack of 100 masks on a 1080p frame would need close to a gigabyte.
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


def rle_box_xywh(rle: dict) -> list[float]:
    """The tight [x, y, w, h] box of an RLE mask (zeros for an empty one), as SAM3 boxes a mask."""
    return [float(v) for v in mask_utils.toBbox(rle)]


def rle_box_xyxy(rle: dict) -> list[float]:
    x, y, w, h = rle_box_xywh(rle)
    return [x, y, x + w, y + h]


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


def _check_outputs(outputs: Mapping[str, torch.Tensor], image_id: int, use_presence: bool) -> None:
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


class FrameTopK:
    """The `top_k` best detections of one frame over all its prompts, fed one prompt batch at a time.

    Prompt `p` asks for `category_ids[p]`; batches arrive in prompt order (see
    `chunked_detection.frame_detector`). Of each batch only the candidates that can still be among
    the frame's best are kept, with their low-resolution masks, on the outputs' device; the kept
    masks are upsampled and encoded once, at the end. So a frame costs one batch of raw outputs
    plus `top_k` masks, whatever the vocabulary. Detections are ordered by score, ties by prompt
    then query, so the result does not depend on how the prompts were batched.
    """

    def __init__(
        self, category_ids: Sequence[int], image_id: int, original_size: tuple[int, int], cfg: PostprocessConfig
    ) -> None:
        self.category_ids, self.image_id, self.cfg = list(category_ids), image_id, cfg
        self.height, self.width = int(original_size[0]), int(original_size[1])
        self.prompts = 0
        self.num_queries = 0
        # the kept candidates: score, flat index (prompt * queries + query), box (cxcywh), mask logits
        self.scores: torch.Tensor | None = None
        self.index: torch.Tensor | None = None
        self.boxes: torch.Tensor | None = None
        self.masks: torch.Tensor | None = None

    def add(self, outputs: Mapping[str, torch.Tensor]) -> FrameTopK:
        """Take the next prompt batch's detector outputs ([prompts, queries, ...])."""
        _check_outputs(outputs, self.image_id, self.cfg.use_presence)
        scores = detection_scores(outputs, self.cfg.use_presence)
        prompts, self.num_queries = scores.shape
        flat = scores.flatten()
        candidates = torch.nonzero(flat >= self.cfg.score_threshold).flatten()
        best = candidates[torch.sort(flat[candidates], descending=True, stable=True).indices[: self.cfg.top_k]]
        batch = {
            "scores": flat[best],
            "index": best + self.prompts * self.num_queries,
            "boxes": outputs["pred_boxes"].flatten(0, 1)[best].float(),
        }
        if "pred_masks" in outputs:
            batch["masks"] = outputs["pred_masks"].flatten(0, 1)[best]
        self.prompts += prompts
        if self.scores is not None:
            kept = {"scores": self.scores, "index": self.index, "boxes": self.boxes}
            if self.masks is not None:
                kept["masks"] = self.masks
            batch = {key: torch.cat([kept[key], batch[key].to(kept[key])]) for key in batch}
        # the kept ones come first and both parts are in (score, index) order: a stable sort keeps it
        order = torch.sort(batch["scores"], descending=True, stable=True).indices[: self.cfg.top_k]
        self.scores, self.index, self.boxes = batch["scores"][order], batch["index"][order], batch["boxes"][order]
        self.masks = batch["masks"][order] if "masks" in batch else None
        return self

    def result(self) -> FrameDetections:
        """The kept detections, best first, in pixel coordinates of the original frame (masks as RLEs)."""
        if self.prompts != len(self.category_ids):
            raise InputError(
                f"detector outputs for image {self.image_id}",
                "pred_logits",
                f"has {self.prompts} prompts but {len(self.category_ids)} category ids were given",
            )
        if self.scores is None or self.index is None or self.boxes is None:
            return FrameDetections(self.image_id, self.height, self.width, [], [], [])
        prompt_idx = (self.index // self.num_queries).tolist()
        detections = FrameDetections(
            image_id=self.image_id,
            height=self.height,
            width=self.width,
            scores=self.scores.tolist(),
            category_ids=[int(self.category_ids[p]) for p in prompt_idx],
            boxes_xyxy=cxcywh_to_pixel_xyxy(self.boxes, self.height, self.width).tolist(),
        )
        if self.masks is not None:
            rles = upsample_and_encode(self.masks, self.height, self.width, self.cfg.mask_threshold)
            detections.rles = rles
            detections.areas = [int(a) for a in mask_utils.area(rles)] if rles else []
        return detections


@torch.no_grad()
def batched_frame_detections(
    batches: Iterable[Mapping[str, torch.Tensor]],
    category_ids: Sequence[int],
    image_id: int,
    original_size: tuple[int, int],
    cfg: PostprocessConfig,
) -> FrameDetections:
    """One frame's detections from its detector outputs given in prompt batches (see `FrameTopK`)."""
    top = FrameTopK(category_ids, image_id, original_size, cfg)
    for outputs in batches:
        top.add(outputs)
    return top.result()


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
    return batched_frame_detections([outputs], category_ids, image_id, original_size, cfg)


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
