"""Frame-level COCO bbox / segm evaluation, with the pycocotools traps handled.

Matching and accumulation are delegated to a backend (pycocotools or faster-coco-eval, which
produce the same precision/recall arrays); everything around it is ours:

- An empty predictions list is evaluated as "no detections" (pycocotools' ``loadRes`` raises on
  ``[]``): AP/AR are 0 where the ground truth has objects and -1 where it has none, exactly what
  COCO reports for an image set without detections.
- Ground truth without ``iscrowd`` gets 0; without ``area`` gets the mask area (or the box area
  when there is no mask), so the area ranges work.
- The 12 stats keep their COCO names but are computed for the configured ``max_dets`` triple:
  ``AR1, AR10, AR100`` are recall at ``max_dets[0], [1], [2]`` and every AP uses ``max_dets[2]``
  (pycocotools' own ``summarize`` hard-codes 100 for ``AP`` and returns -1 without it).
- Categories without ground truth have precision -1 and are left out of every mean, as in COCO.
- For ``segm`` the predicted area comes from the mask: a ``bbox`` carried by a segm result is
  dropped first, otherwise both backends would use the box area for the area ranges.
- Only the categories with GT or predictions, and the images with either, are evaluated: a GT
  file with 51,248 categories would otherwise cost both backends one Python call per (category,
  image, area range) and a precision array of 500 MB, for categories that score -1 anyway.
- Scores must be finite and RLE counts must decode to the image size (:mod:`.rle`); pycocotools
  would otherwise rank NaN scores as it pleases or loop for minutes on a truncated mask.

``summarize`` and ``EvalArrays`` work on COCO-layout arrays and are shared with video mAP.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sam3_core.config_checks import is_int64
from sam3_core.errors import ConfigError, InputError
from sam3_core.evaluate.rle import first_malformed

logger = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("pycocotools", "faster_coco_eval")
IOU_TYPES: tuple[str, ...] = ("bbox", "segm")
STAT_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
AREA_LABELS: tuple[str, ...] = ("all", "small", "medium", "large")
# Object areas in pixels for COCO's small / medium / large; the first range is "all".
FRAME_AREA_RANGES: tuple[tuple[float, float], ...] = (
    (0.0, 1e5**2),
    (0.0, 32.0**2),
    (32.0**2, 96.0**2),
    (96.0**2, 1e5**2),
)
_PREDICTION_FIELD = {"bbox": "bbox", "segm": "segmentation"}


@dataclass(frozen=True)
class EvalArrays:
    """Accumulated COCO-layout results: precision [T,R,K,A,M] and recall [T,K,A,M], -1 = no GT."""

    precision: np.ndarray
    recall: np.ndarray
    iou_thrs: np.ndarray
    rec_thrs: np.ndarray
    category_ids: tuple[int, ...]
    max_dets: tuple[int, int, int]

    def iou_index(self, iou: float) -> int:
        """Index of a threshold; compared with a tolerance because linspace is not exact."""
        hits = np.flatnonzero(np.isclose(self.iou_thrs, iou))
        if len(hits) != 1:
            raise ValueError(f"IoU threshold {iou} is not one of {self.iou_thrs.tolist()}")
        return int(hits[0])

    def per_category(self) -> dict[int, dict[str, float]]:
        """AP, AP50, AP75 per category (area "all", largest max_dets); -1 where it has no GT."""
        table: dict[int, dict[str, float]] = {}
        for k, cat_id in enumerate(self.category_ids):
            sliced = self.precision[:, :, k, 0, -1]
            table[cat_id] = {
                "AP": _mean_valid(sliced),
                "AP50": _mean_valid(sliced[self.iou_index(0.5)]),
                "AP75": _mean_valid(sliced[self.iou_index(0.75)]),
            }
        return table

    def pr_curve(self, iou: float) -> np.ndarray:
        """Precision at each recall threshold, averaged over categories that have GT (NaN if none)."""
        curves = self.precision[self.iou_index(iou), :, :, 0, -1]
        valid = curves > -1
        counts = valid.sum(axis=1)
        sums = np.where(valid, curves, 0.0).sum(axis=1)
        return np.divide(sums, counts, out=np.full(len(sums), np.nan), where=counts > 0)


@dataclass(frozen=True)
class Evaluation:
    """One scored IoU type: ``name`` is its metric prefix (bbox, segm, video_bbox, video_mask_phrase_ap, ...).

    ``per_category`` is False when the arrays hold one pseudo-category (phrase AP pools every pair),
    so the per-category table leaves them out while the PR plot still draws them.
    """

    name: str
    metrics: dict[str, float]
    arrays: EvalArrays
    per_category: bool = True


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def summarize(arrays: EvalArrays) -> dict[str, float]:
    """The 12 COCO stats, correct for any increasing max_dets triple (see module docstring)."""
    p, r = arrays.precision, arrays.recall
    all_a, small, medium, large = range(len(AREA_LABELS))
    i50, i75 = arrays.iou_index(0.5), arrays.iou_index(0.75)
    values = (
        _mean_valid(p[:, :, :, all_a, 2]),
        _mean_valid(p[i50, :, :, all_a, 2]),
        _mean_valid(p[i75, :, :, all_a, 2]),
        _mean_valid(p[:, :, :, small, 2]),
        _mean_valid(p[:, :, :, medium, 2]),
        _mean_valid(p[:, :, :, large, 2]),
        _mean_valid(r[:, :, all_a, 0]),
        _mean_valid(r[:, :, all_a, 1]),
        _mean_valid(r[:, :, all_a, 2]),
        _mean_valid(r[:, :, small, 2]),
        _mean_valid(r[:, :, medium, 2]),
        _mean_valid(r[:, :, large, 2]),
    )
    return dict(zip(STAT_NAMES, values))


def check_max_dets(max_dets: Sequence[int]) -> tuple[int, int, int]:
    """Three strictly increasing positive ints, the shape every summary relies on."""
    dets = [int(d) for d in max_dets]
    if len(dets) != 3 or dets[0] < 1 or not dets[0] < dets[1] < dets[2]:
        raise ConfigError(
            f"evaluate: max_dets must be three increasing positive integers, e.g. [1, 10, 100]; got {list(max_dets)}"
        )
    return dets[0], dets[1], dets[2]


def _require(container: Any, key: str, source: str, where: str, kind: type | tuple[type, ...]) -> Any:
    """``container[key]`` of the given type; ``where`` is the container's path ("" for the root).

    Integers must fit in 64 bits (numpy and the COCO backends hold ids so) and numbers must be finite.
    """
    if not isinstance(container, dict):
        raise InputError(source, where or "(root)", f"expected an object, got {type(container).__name__}")
    field = f"{where}.{key}" if where else key
    if key not in container:
        raise InputError(source, field, "missing")
    value = container[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InputError(source, field, f"expected {_kind_name(kind)}, got {type(value).__name__}")
    if isinstance(value, int) and not is_int64(value):
        raise InputError(source, field, f"{value} does not fit in 64 bits")
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(source, field, f"must be a finite number, got {value!r}")
    return value


def unique_id(container: Any, key: str, source: str, where: str, seen: dict[int, str]) -> int:
    """An integer id that no earlier entry (``seen``: id -> its path) carries."""
    value = _require(container, key, source, where, int)
    if value in seen:
        raise InputError(source, f"{where}.{key}", f"duplicate id {value} (also {seen[value]}): ids must be unique")
    seen[value] = where
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {numbers.Real: "a number", numbers.Integral: "an integer", list: "a list", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def check_box(value: Any, source: str, field: str) -> None:
    """A box is [x, y, w, h] with finite numbers and non-negative size."""
    if (
        not isinstance(value, list)
        or len(value) != 4
        or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)
    ):
        raise InputError(source, field, f"expected [x, y, width, height] numbers, got {value!r:.80}")
    if not np.all(np.isfinite(value)) or value[2] < 0 or value[3] < 0:
        raise InputError(source, field, f"box must be finite with width, height >= 0, got {value!r:.80}")


def compress_rle(rle: Any, source: str, field: str) -> dict[str, Any]:
    """Validate an RLE and return it compressed (uncompressed integer counts are converted)."""
    bad = first_malformed([rle])
    if bad is not None:
        raise InputError(source, field, bad[1])
    return _compressed(rle)


def _compressed(rle: dict[str, Any]) -> dict[str, Any]:
    """A well-formed RLE with string counts."""
    size, counts = rle["size"], rle["counts"]
    if isinstance(counts, list):
        compressed = mask_utils.frPyObjects({"size": size, "counts": counts}, size[0], size[1])
        return {"size": size, "counts": compressed["counts"].decode("ascii")}
    return {"size": size, "counts": counts}


def check_rles(rles: list[Any], fields: list[str], source: str) -> None:
    """Every RLE well formed (one batched check; the first bad one is named)."""
    bad = first_malformed(rles)
    if bad is not None:
        raise InputError(source, fields[bad[0]], bad[1])


def _segment_area(segmentation: Any, height: int, width: int) -> float:
    """Pixel area of an RLE or polygon list, for GT annotations that lack ``area``."""
    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
        return float(mask_utils.area(mask_utils.merge(rles)))
    rle = segmentation
    if isinstance(rle.get("counts"), list):
        rle = mask_utils.frPyObjects(rle, *rle["size"])
    return float(mask_utils.area(rle))


def _check_polygons(value: Any, source: str, field: str) -> None:
    if not value or not all(
        isinstance(poly, list)
        and len(poly) >= 6
        and len(poly) % 2 == 0
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in poly)
        for poly in value
    ):
        raise InputError(source, field, "a polygon list is [[x1, y1, x2, y2, ...], ...] of >= 3 finite points")


def prepare_frame_gt(gt: Any, source: str) -> dict[str, Any]:
    """Validated copy of a COCO GT with ``iscrowd`` and ``area`` filled where missing.

    As strict as the predictions: unique integer ids (images, categories, annotations), known
    references, image sizes, finite non-negative boxes and areas, well-formed masks and polygons,
    ``iscrowd`` 0 or 1. A flaw here would not fail the evaluation, it would change its numbers.
    """
    images = _require(gt, "images", source, "", list)
    annotations = _require(gt, "annotations", source, "", list)
    categories = _require(gt, "categories", source, "", list)
    sizes: dict[int, tuple[int, int]] = {}
    seen: dict[int, str] = {}
    for i, image in enumerate(images):
        where = f"images[{i}]"
        image_id = unique_id(image, "id", source, where, seen)
        height, width = (_require(image, key, source, where, int) for key in ("height", "width"))
        if height < 1 or width < 1:
            raise InputError(source, f"{where}.height", f"{height}x{width}: an image needs a positive size")
        sizes[image_id] = (height, width)
    seen = {}
    cat_ids = {unique_id(c, "id", source, f"categories[{i}]", seen) for i, c in enumerate(categories)}
    rles = [
        (a["segmentation"], f"annotations[{i}].segmentation")
        for i, a in enumerate(annotations)
        if isinstance(a, dict) and isinstance(a.get("segmentation"), dict)
    ]
    check_rles([r for r, _ in rles], [f for _, f in rles], source)
    filled = []
    seen = {}
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]"
        unique_id(ann, "id", source, where, seen)
        if _require(ann, "image_id", source, where, int) not in sizes:
            raise InputError(source, f"{where}.image_id", f"unknown image id {ann['image_id']}")
        if _require(ann, "category_id", source, where, int) not in cat_ids:
            raise InputError(source, f"{where}.category_id", f"unknown category id {ann['category_id']}")
        if ann.get("iscrowd", 0) not in (0, 1) or isinstance(ann.get("iscrowd"), float):
            raise InputError(source, f"{where}.iscrowd", f"must be 0 or 1, got {ann['iscrowd']!r:.40}")
        if "bbox" in ann:
            check_box(ann["bbox"], source, f"{where}.bbox")
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, list) and segmentation:
            _check_polygons(segmentation, source, f"{where}.segmentation")
        elif segmentation is not None and not isinstance(segmentation, dict):
            raise InputError(source, f"{where}.segmentation", "must be an RLE object or a polygon list")
        if isinstance(segmentation, dict) and list(segmentation["size"]) != list(sizes[ann["image_id"]]):
            raise InputError(
                source,
                f"{where}.segmentation.size",
                f"{segmentation['size']} is not image {ann['image_id']}'s [height, width] {list(sizes[ann['image_id']])}",
            )
        if "area" in ann:
            area = _require(ann, "area", source, where, numbers.Real)
            if area < 0:
                raise InputError(source, f"{where}.area", f"must be >= 0, got {area!r}")
        ann = dict(ann)
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            if ann.get("segmentation"):
                height, width = sizes[ann["image_id"]]
                ann["area"] = _segment_area(ann["segmentation"], height, width)
            elif "bbox" in ann:
                ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
            else:
                raise InputError(source, where, "needs area, segmentation or bbox")
        filled.append(ann)
    return {**gt, "annotations": filled}


def check_gt_has(gt: dict[str, Any], iou_type: str, source: str) -> None:
    """Every GT annotation carries what ``iou_type`` is scored on (a bbox, a segmentation)."""
    field = _PREDICTION_FIELD[iou_type]
    for i, ann in enumerate(gt["annotations"]):
        if not ann.get(field):
            raise InputError(
                source, f"annotations[{i}].{field}", f"missing; {iou_type} needs it (or leave it out of iou_types)"
            )


def check_frame_predictions(predictions: Any, gt: dict[str, Any], iou_type: str, source: str) -> list[dict[str, Any]]:
    """Validated COCO results for one IoU type, reduced to the fields that type is scored on."""
    if not isinstance(predictions, list):
        raise InputError(source, "(root)", f"expected a list of COCO results, got {type(predictions).__name__}")
    image_ids = {image["id"] for image in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    field = _PREDICTION_FIELD[iou_type]
    results = []
    for i, pred in enumerate(predictions):
        where = f"[{i}]"
        if _require(pred, "image_id", source, where, int) not in image_ids:
            raise InputError(source, f"{where}.image_id", f"image {pred['image_id']} is not in the ground truth")
        if _require(pred, "category_id", source, where, int) not in cat_ids:
            raise InputError(source, f"{where}.category_id", f"category {pred['category_id']} is not in the GT")
        score = _require(pred, "score", source, where, numbers.Real)
        if not math.isfinite(score):
            raise InputError(source, f"{where}.score", f"must be a finite number, got {score!r}")
        if field not in pred:
            raise InputError(source, f"{where}.{field}", f"missing; {iou_type} needs it (or leave it out of iou_types)")
        result = {"image_id": pred["image_id"], "category_id": pred["category_id"], "score": float(score)}
        if iou_type == "bbox":
            check_box(pred["bbox"], source, f"{where}.bbox")
            result["bbox"] = pred["bbox"]
        else:
            result["segmentation"] = pred["segmentation"]
        results.append(result)
    if iou_type == "segm":
        check_rles([r["segmentation"] for r in results], [f"[{i}].segmentation" for i in range(len(results))], source)
        for r in results:
            r["segmentation"] = _compressed(r["segmentation"])
    return results


@contextlib.contextmanager
def _quiet_stdout() -> Any:
    """pycocotools prints progress to stdout, which must stay free for the CLI's JSON line."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    if buffer.getvalue().strip():
        logger.debug("pycocotools: %s", buffer.getvalue().strip())


def _run_pycocotools(gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str, max_dets: list[int]) -> Any:
    with _quiet_stdout():
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = _empty_results(COCO, gt) if not results else coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        _set_params(evaluator.params, max_dets, gt, results)
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def _run_faster_coco_eval(gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str, max_dets: list[int]) -> Any:
    # imported on use: it takes a third of a second and only this backend needs it
    from faster_coco_eval import COCO as FasterCOCO
    from faster_coco_eval import COCOeval_faster

    coco_gt = FasterCOCO(gt)
    coco_dt = _empty_results(FasterCOCO, gt) if not results else coco_gt.loadRes(results)
    evaluator = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=logger.debug)
    _set_params(evaluator.params, max_dets, gt, results)
    evaluator.evaluate()
    evaluator.accumulate()
    return evaluator


def _empty_results(coco_class: type, gt: dict[str, Any]) -> Any:
    """A results object with no detections (what loadRes cannot build from [])."""
    empty = coco_class()
    empty.dataset = {"images": list(gt["images"]), "categories": copy.deepcopy(gt["categories"]), "annotations": []}
    empty.createIndex()
    return empty


def _set_params(params: Any, max_dets: list[int], gt: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """COCO's parameters, restricted to the categories and images that have GT or results.

    The others only ever score -1 (no GT) or nothing, so the numbers are the same, at a cost
    that follows the annotations instead of the category list.
    """
    params.maxDets = list(max_dets)
    params.areaRng = [list(r) for r in FRAME_AREA_RANGES]
    params.areaRngLbl = list(AREA_LABELS)
    used = [*gt["annotations"], *results]
    params.catIds = sorted({a["category_id"] for a in used}) or params.catIds[:1]
    params.imgIds = sorted({a["image_id"] for a in used}) or params.imgIds[:1]


_BACKEND_RUNNERS = {"pycocotools": _run_pycocotools, "faster_coco_eval": _run_faster_coco_eval}


def evaluate_frames(
    gt: dict[str, Any],
    predictions: Any,
    iou_type: str,
    *,
    backend: str,
    max_dets: Sequence[int],
    predictions_source: str,
    gt_source: str = "the ground truth",
) -> Evaluation:
    """COCO evaluation of one IoU type; ``gt`` must come from ``prepare_frame_gt``."""
    if iou_type not in IOU_TYPES:
        raise ConfigError(f"evaluate: iou_types entries must be one of {list(IOU_TYPES)}; got {iou_type!r}")
    if backend not in _BACKEND_RUNNERS:
        raise ConfigError(f"evaluate: backend must be one of {list(BACKENDS)}; got {backend!r}")
    dets = check_max_dets(max_dets)
    check_gt_has(gt, iou_type, gt_source)
    results = check_frame_predictions(predictions, gt, iou_type, predictions_source)
    logger.info("COCO %s evaluation of %d results with %s", iou_type, len(results), backend)
    # Both backends set keys on the GT annotation dicts (ignore flags, RLEs): give them copies.
    own_gt = {**gt, "images": [dict(i) for i in gt["images"]], "annotations": [dict(a) for a in gt["annotations"]]}
    evaluator = _BACKEND_RUNNERS[backend](own_gt, results, iou_type, list(dets))
    arrays = EvalArrays(
        precision=np.asarray(evaluator.eval["precision"], dtype=float),
        recall=np.asarray(evaluator.eval["recall"], dtype=float),
        iou_thrs=np.asarray(evaluator.params.iouThrs, dtype=float),
        rec_thrs=np.asarray(evaluator.params.recThrs, dtype=float),
        category_ids=tuple(int(c) for c in evaluator.params.catIds),
        max_dets=dets,
    )
    metrics = {f"{iou_type}_{name}": value for name, value in summarize(arrays).items()}
    return Evaluation(name=iou_type, metrics=metrics, arrays=arrays)
