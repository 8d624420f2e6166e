"""Names of the files the components exchange through the store (DESIGN.md), in one place.

Kept free of heavy imports so the evaluator and the pipeline can use them without loading torch.
"""

from __future__ import annotations

PREDICTION_FILES = {
    "bbox": "coco_predictions_bbox.json",
    "segm": "coco_predictions_segm.json",
    "video": "video_predictions.json",
}
