"""In-loop validators (see `hooks.Validation`): the validation loss and COCO detection metrics.

`DetectionMetrics` runs the same path as predict and evaluate (`frame_detector` ->
`batched_frame_detections` -> COCO results -> `evaluate_frames`) on a fixed, evenly spread set
of validation frames, so `val/segm_AP` during training means what `eval/segm_AP` means after it,
on fewer frames. Both share their items out over ranks (rank r takes items r, r + W, ...), so
ranks may hold different numbers of items, or none: nothing inside an item may be a collective.
Each item's numbers are computed as one process computes them, gathered to rank 0 and combined
in item order, so the metrics are the same on any number of ranks.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from sam3_core import comm
from sam3_core.data.datapoints import collate_clips, frame_to_tensor
from sam3_core.data.frames import FrameReader
from sam3_core.errors import InputError
from sam3_core.evaluate.coco import evaluate_frames, prepare_frame_gt
from sam3_core.model.chunked_detection import DetectionConfig, frame_detector
from sam3_core.predict.postprocess import (
    PostprocessConfig,
    batched_frame_detections,
    coco_bbox_results,
    coco_segm_results,
)
from sam3_core.train.task import ClipTask

log = logging.getLogger(__name__)
COCO_BACKEND = "faster_coco_eval"
MAX_DETS = (1, 10, 100)


class ValidationLoss:
    """`loss`: the mean loss of the first `max_clips` validation clips (targets matched, dropout off).

    `task`'s loss must normalise each clip by its own boxes (`build_loss(..., per_rank=True)`): the
    training loss's global normalisation all-reduces the box count once per frame, and a rank
    with fewer clips than another (or none: fewer clips than ranks) would leave that collective
    unmatched (gloo aborts with a collective mismatch; nccl hangs until its watchdog). Each clip's
    loss is then what one process computes; rank 0 averages them in clip order.
    """

    def __init__(self, task: ClipTask, max_clips: int, with_masks: bool, autocast: Any) -> None:
        self.task, self.max_clips, self.with_masks, self.autocast = task, max_clips, with_masks, autocast

    def __call__(self, module: nn.Module, val_set: Any, step: int) -> dict[str, float]:
        count = min(len(val_set), self.max_clips)
        mine: dict[int, float] = {}
        for index in range(comm.rank(), count, comm.world_size()):
            batch = self.task.to_device(collate_clips([val_set[index]], with_masks=self.with_masks))
            with self.autocast():
                mine[index] = float(self.task.losses(module, batch, with_targets=True)["loss"])
        parts = comm.gather_object(mine)
        if not parts:
            return {}
        losses = {index: loss for part in parts for index, loss in part.items()}
        return {"loss": sum(losses[index] for index in sorted(losses)) / len(losses)} if losses else {}


def spread(count: int, limit: int) -> list[int]:
    """`limit` indices spread evenly over range(count) (all of them when count <= limit)."""
    if count <= limit:
        return list(range(count))
    return sorted({int(i) for i in np.linspace(0, count - 1, limit).round()})


class DetectionMetrics:
    """COCO bbox (and segm) metrics of up to `max_frames` frames of a split, as predict + evaluate compute them."""

    def __init__(
        self,
        reader: FrameReader,
        max_frames: int,
        image_size: int,
        *,
        split: str = "val",
        with_masks: bool = True,
        postprocess: PostprocessConfig | None = None,
        detection: DetectionConfig | None = None,
    ) -> None:
        self.reader, self.image_size = reader, image_size
        self.iou_types = ("bbox", "segm") if with_masks else ("bbox",)
        self.postprocess = postprocess or PostprocessConfig()
        self.detection = detection or DetectionConfig()
        rel = f"{split}_frames_coco.json"
        if rel not in reader.manifest["files"]:
            raise InputError(reader.dataset_uri, rel, "no frame-level COCO file; set train.val_max_frames=0")
        coco = json.loads(reader.local_path(rel).read_text())
        images = [coco["images"][i] for i in spread(len(coco["images"]), max_frames)]
        chosen = {image["id"] for image in images}
        subset = {
            **coco,
            "images": images,
            "annotations": [ann for ann in coco["annotations"] if ann["image_id"] in chosen],
        }
        self.source = f"{reader.dataset_uri}/{rel}"
        self.gt = prepare_frame_gt(subset, self.source)
        self.images = images
        self.category_ids = [int(c["id"]) for c in coco["categories"]]
        self.prompts = [str(c["name"]) for c in coco["categories"]]

    def _image(self, images: list[dict[str, Any]], index: int) -> torch.Tensor:
        return frame_to_tensor(np.array(self.reader.image(images[index]["file_name"])), self.image_size)

    def __call__(self, module: nn.Module, val_set: Any, step: int) -> dict[str, float]:
        positions = range(comm.rank(), len(self.images), comm.world_size())
        mine: dict[int, dict[str, list[dict]]] = {}
        if positions:
            detect = frame_detector(module, self.prompts, functools.partial(self._image, self.images), self.detection)
            for position in positions:
                image = self.images[position]
                found = batched_frame_detections(
                    detect(position),
                    self.category_ids,
                    int(image["id"]),
                    (int(image["height"]), int(image["width"])),
                    self.postprocess,
                )
                mine[position] = {"bbox": coco_bbox_results([found])}
                if "segm" in self.iou_types:
                    mine[position]["segm"] = coco_segm_results([found])
        parts = comm.gather_object(mine)
        if parts is None:
            return {}
        by_position = {position: results for part in parts for position, results in part.items()}
        metrics: dict[str, float] = {}
        for iou_type in self.iou_types:
            # in the frames' order, as one process lists them
            merged = [result for position in sorted(by_position) for result in by_position[position][iou_type]]
            evaluation = evaluate_frames(
                self.gt,
                merged,
                iou_type,
                backend=COCO_BACKEND,
                max_dets=MAX_DETS,
                predictions_source=f"in-loop validation at step {step}",
            )
            metrics.update(evaluation.metrics)
        return metrics
