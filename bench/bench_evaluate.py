"""Evaluation speed, side by side in one process on the same synthetic data.

Frame level: plain pycocotools, plain faster-coco-eval, and sam3pipe's ``evaluate_frames`` with
each backend (validation and the empty/maxDets/area fixes included), bbox + segm.
Video level: sam3pipe's vectorised video mAP vs SAM3's own ``YTVISPredFileEvaluator``, both
reading the same JSON files, with the metrics compared.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from sam3_core.evaluate.coco import evaluate_frames, prepare_frame_gt
from sam3_core.evaluate.report import EvaluateConfig
from sam3_core.evaluate.video import evaluate_videos


@dataclass
class EvaluateBench:
    """Sizes of the synthetic frame and video sets."""

    images: int = 500
    categories: int = 5
    height: int = 480
    width: int = 640
    objects_per_image: int = 6
    false_positives_per_image: int = 6
    videos: int = 16
    frames: int = 32
    tracks_per_prompt: float = 1.5
    predictions_per_prompt: int = 10
    seed: int = 0
    repeats: int = 3


def _rle(box: list[float], height: int, width: int) -> dict[str, Any]:
    rle = mask_utils.frPyObjects(np.array([box], dtype=float), height, width)[0]
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def _random_box(rng: np.random.Generator, height: int, width: int) -> list[float]:
    w, h = rng.uniform(8, width / 2), rng.uniform(8, height / 2)
    return [rng.uniform(0, width - w), rng.uniform(0, height - h), w, h]


def _jitter(rng: np.random.Generator, box: list[float], height: int, width: int) -> list[float]:
    x = min(max(box[0] + rng.normal(0, 0.05 * box[2]), 0), width - 2)
    y = min(max(box[1] + rng.normal(0, 0.05 * box[3]), 0), height - 2)
    return [x, y, min(box[2] * rng.uniform(0.85, 1.15), width - x), min(box[3] * rng.uniform(0.85, 1.15), height - y)]


def frame_data(bench: EvaluateBench) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """COCO GT and results: jittered hits on 80% of objects plus random false positives."""
    rng = np.random.default_rng(bench.seed)
    h, w = bench.height, bench.width
    annotations, results = [], []
    for image_id in range(1, bench.images + 1):
        for _ in range(bench.objects_per_image):
            box, category = _random_box(rng, h, w), int(rng.integers(1, bench.categories + 1))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category, "bbox": box,
                                "segmentation": _rle(box, h, w), "area": box[2] * box[3], "iscrowd": 0})
            if rng.random() < 0.8:
                guess = _jitter(rng, box, h, w)
                results.append({"image_id": image_id, "category_id": category, "bbox": guess,
                                "segmentation": _rle(guess, h, w), "score": float(rng.random())})
        for _ in range(bench.false_positives_per_image):
            box = _random_box(rng, h, w)
            results.append({"image_id": image_id, "category_id": int(rng.integers(1, bench.categories + 1)),
                            "bbox": box, "segmentation": _rle(box, h, w), "score": float(rng.random())})
    categories = [{"id": c, "name": f"c{c}"} for c in range(1, bench.categories + 1)]
    gt = {"images": [{"id": i, "height": h, "width": w} for i in range(1, bench.images + 1)],
          "annotations": annotations, "categories": categories}
    return gt, results


def video_data(bench: EvaluateBench) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """YTVIS GT and predictions as SAM3 makes them: every (video, category) prompt returns
    ``predictions_per_prompt`` masklets, jittered copies of 80% of its GT tracks and false tracks."""
    rng = np.random.default_rng(bench.seed + 1)
    h, w, n = bench.height, bench.width, bench.frames

    def track(box: list[float]) -> list[list[float] | None]:
        step = rng.normal(0, 2, size=2)
        return [None if t and rng.random() < 0.1 else
                [min(max(box[0] + t * step[0], 0), w - box[2]), min(max(box[1] + t * step[1], 0), h - box[3]),
                 box[2], box[3]]
                for t in range(n)]

    def prediction(video_id: int, category: int, boxes: list[list[float] | None]) -> dict[str, Any]:
        return {"video_id": video_id, "category_id": category, "score": float(rng.random()), "bboxes": boxes,
                "segmentations": [None if b is None else _rle(b, h, w) for b in boxes]}

    annotations, predictions = [], []
    for video_id in range(1, bench.videos + 1):
        for category in range(1, bench.categories + 1):
            found = []
            for _ in range(rng.poisson(bench.tracks_per_prompt)):
                boxes = track(_random_box(rng, h, w))
                annotations.append({
                    "id": len(annotations) + 1, "video_id": video_id, "category_id": category, "iscrowd": 0,
                    "bboxes": boxes, "segmentations": [None if b is None else _rle(b, h, w) for b in boxes],
                    "areas": [None if b is None else b[2] * b[3] for b in boxes],
                })
                if rng.random() < 0.8:
                    guess = [None if b is None else _jitter(rng, b, h, w) for b in boxes]
                    found.append(prediction(video_id, category, guess))
            false = [prediction(video_id, category, track(_random_box(rng, h, w)))
                     for _ in range(max(bench.predictions_per_prompt - len(found), 0))]
            predictions += found + false
    videos = [{"id": v, "height": h, "width": w, "length": n, "file_names": [f"{v}/{t}.jpg" for t in range(n)]}
              for v in range(1, bench.videos + 1)]
    categories = [{"id": c, "name": f"c{c}"} for c in range(1, bench.categories + 1)]
    return {"videos": videos, "annotations": annotations, "categories": categories}, predictions


def _timed(run: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    """Best wall time of `repeats` runs (the machine is shared) and the last value; upstream prints are muted."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            value = run()
        best = min(best, time.perf_counter() - start)
    return best, value


def _plain_coco(library: str, gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str) -> list[float]:
    """The usual three-call recipe of each library, on a copy of the inputs (both mutate them)."""
    gt, results = copy.deepcopy(gt), copy.deepcopy(results)
    if iou_type == "segm":
        for result in results:
            result.pop("bbox")
    if library == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval as Evaluator

        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
    else:
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as Evaluator

        coco_gt = COCO(gt)
    evaluator = Evaluator(coco_gt, coco_gt.loadRes(results), iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return [float(s) for s in evaluator.stats[:12]]


def _frame_rows(bench: EvaluateBench) -> None:
    gt, results = frame_data(bench)
    prepared = prepare_frame_gt(gt, "synthetic")
    default = EvaluateConfig().backend
    print(f"\nframe-level COCO: {bench.images} images x {bench.categories} categories, "
          f"{len(gt['annotations'])} GT objects, {len(results)} results")
    print(f"{'iou type':<8}{'pycocotools s':>15}{'faster-coco-eval s':>20}{'ours/pycocotools s':>20}"
          f"{f'ours/{default} s':>26}{'speed-up':>10}{'same metrics':>14}")
    for iou_type in ("bbox", "segm"):
        plain_s, plain = _timed(lambda: _plain_coco("pycocotools", gt, results, iou_type), bench.repeats)
        fast_s, fast = _timed(lambda: _plain_coco("faster_coco_eval", gt, results, iou_type), bench.repeats)
        ours_py_s, ours_py = _timed(lambda: evaluate_frames(prepared, results, iou_type, backend="pycocotools",
                                                            max_dets=[1, 10, 100], predictions_source="synthetic"),
                                    bench.repeats)
        ours_s, ours = _timed(lambda: evaluate_frames(prepared, results, iou_type, backend=default,
                                                      max_dets=[1, 10, 100], predictions_source="synthetic"),
                              bench.repeats)
        same = (np.allclose(plain, fast, atol=1e-12) and np.allclose(plain, list(ours_py.metrics.values()), atol=1e-12)
                and np.allclose(plain, list(ours.metrics.values()), atol=1e-12))
        print(f"{iou_type:<8}{plain_s:>15.2f}{fast_s:>20.2f}{ours_py_s:>20.2f}{ours_s:>26.2f}"
              f"{plain_s / ours_s:>9.1f}x{str(same):>14}")


def _video_rows(bench: EvaluateBench) -> None:
    gt, predictions = video_data(bench)
    with tempfile.TemporaryDirectory() as tmp:
        gt_path, pred_path = Path(tmp) / "gt.json", Path(tmp) / "pred.json"
        gt_path.write_text(json.dumps(gt))
        pred_path.write_text(json.dumps(predictions))
        import_s, evaluator_class = _timed(_import_sam3_evaluator)

        def ours() -> dict[str, float]:
            evaluations = evaluate_videos(json.loads(gt_path.read_text()), json.loads(pred_path.read_text()),
                                          ["bbox", "segm"], max_dets=[1, 10, 100], gt_source=str(gt_path),
                                          predictions_source=str(pred_path))
            return {k: v for e in evaluations for k, v in e.metrics.items()}

        ours_s, our_metrics = _timed(ours, bench.repeats)
        sam3_s, (reference, _) = _timed(lambda: evaluator_class(str(gt_path)).evaluate(str(pred_path)), bench.repeats)
    same = all(abs(our_metrics[k] - float(v)) < 1e-9 for k, v in reference.items())
    print(f"\nvideo mAP: {bench.videos} videos x {bench.frames} frames, {len(gt['annotations'])} GT tracks, "
          f"{len(predictions)} predicted tracks, bbox + mask (sam3 import {import_s:.1f} s, not counted)")
    print(f"{'implementation':<34}{'wall s':>10}")
    print(f"{'sam3 YTVISPredFileEvaluator':<34}{sam3_s:>10.2f}")
    print(f"{'sam3pipe evaluate_videos':<34}{ours_s:>10.2f}")
    print(f"{'speed-up':<34}{sam3_s / ours_s:>9.1f}x")
    print("identical metrics: " + str(same) + "  " + ", ".join(f"{k}={float(v):.6f}" for k, v in reference.items()))


def _import_sam3_evaluator() -> type:
    from sam3.eval.saco_veval_evaluators import YTVISPredFileEvaluator

    return YTVISPredFileEvaluator


def main() -> None:
    bench = EvaluateBench()
    _frame_rows(bench)
    _video_rows(bench)


if __name__ == "__main__":
    main()
