"""Conversion of one video clip into sam3's training datapoint.

A clip of T frames becomes one `Datapoint` with T images and, for every frame and every prompt
(a category name), one find query whose `query_processing_order` is the frame index, so sam3's
collator produces one find stage per frame. Frames are resized to a square and normalised as
sam3's own training transforms do (ToTensor + Normalize(0.5, 0.5), boxes in pixels xyxy until the
end, then normalised cxcywh).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

NORM_MEAN = (0.5, 0.5, 0.5)
NORM_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class FrameObject:
    """One visible object in one frame, in original pixel coordinates."""

    track_id: int
    category_id: int
    box_xywh: tuple[float, float, float, float]
    mask: np.ndarray | None  # bool [H, W] at original size, None if the dataset has no mask


@dataclass(frozen=True)
class Prompt:
    """A noun-phrase query; `category_id` ties it to ground-truth objects (none: a negative)."""

    category_id: int
    text: str


def frame_to_tensor(frame: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 HxWx3 -> normalised float 3xSxS, bilinear like sam3's resize."""
    image = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).float().div_(255.0)
    image = F.interpolate(image[None], size=(image_size, image_size), mode="bilinear", align_corners=False)[0]
    mean = torch.tensor(NORM_MEAN).view(3, 1, 1)
    std = torch.tensor(NORM_STD).view(3, 1, 1)
    return (image - mean) / std


def resize_mask(mask: np.ndarray, image_size: int) -> torch.Tensor:
    """bool HxW -> bool SxS, each output pixel taking the source pixel under its centre.

    "nearest-exact", not "nearest": torch's "nearest" samples at the output pixel's corner, which
    moves the mask by half a source pixel towards the top-left against the image and its box.
    """
    tensor = torch.from_numpy(mask.astype(np.uint8))[None, None].float()
    return F.interpolate(tensor, size=(image_size, image_size), mode="nearest-exact")[0, 0].bool()


def _normalised_cxcywh(box_xywh: tuple[float, float, float, float], width: int, height: int) -> torch.Tensor:
    x, y, w, h = box_xywh
    return torch.tensor([(x + w / 2) / width, (y + h / 2) / height, w / width, h / height], dtype=torch.float32)


def make_datapoint(
    frames: list[np.ndarray],
    objects: list[list[FrameObject]],
    prompts: list[Prompt],
    image_size: int,
    frame_ids: list[int] | None = None,
):
    """Build a sam3 `Datapoint` for a clip: `frames[t]` holds `objects[t]`, every prompt asked on every frame."""
    from sam3.train.data.sam3_image_dataset import (
        Datapoint,
        FindQueryLoaded,
        Image,
        InferenceMetadata,
        Object,
    )

    if len(frames) != len(objects):
        raise ValueError(f"{len(frames)} frames but {len(objects)} object lists")
    images, queries = [], []
    for t, (frame, frame_objects) in enumerate(zip(frames, objects)):
        height, width = frame.shape[:2]
        sam3_objects = []
        for obj in frame_objects:
            box = _normalised_cxcywh(obj.box_xywh, width, height)
            segment = resize_mask(obj.mask, image_size) if obj.mask is not None else None
            sam3_objects.append(
                Object(
                    bbox=box,
                    area=float(box[2] * box[3]),
                    object_id=obj.track_id,
                    frame_index=t,
                    segment=segment,
                )
            )
        images.append(
            Image(data=frame_to_tensor(frame, image_size), objects=sam3_objects, size=(image_size, image_size))
        )
        for prompt in prompts:
            wanted = [i for i, obj in enumerate(frame_objects) if obj.category_id == prompt.category_id]
            queries.append(
                FindQueryLoaded(
                    query_text=prompt.text,
                    image_id=t,
                    object_ids_output=wanted,
                    is_exhaustive=True,
                    query_processing_order=t,
                    inference_metadata=InferenceMetadata(
                        coco_image_id=frame_ids[t] if frame_ids else t,
                        original_image_id=frame_ids[t] if frame_ids else t,
                        original_category_id=prompt.category_id,
                        original_size=(height, width),
                        object_id=-1,
                        frame_index=t,
                    ),
                )
            )
    return Datapoint(find_queries=queries, images=images)


def collate_clips(datapoints: list, with_masks: bool = True):
    """sam3's own collator: T find stages (one per frame), B*T images."""
    from sam3.train.data.collator import collate_fn_api

    return collate_fn_api(datapoints, dict_key="clips", with_seg_masks=with_masks)["clips"]
