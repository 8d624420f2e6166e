"""Evaluation speed and memory, side by side on the same synthetic data.

Frame level: plain pycocotools, plain faster-coco-eval, and sam3pipe's ``evaluate_frames`` with
each backend (validation and the empty/maxDets/area fixes included), bbox + segm; then the same
with a vocabulary of tens of thousands of categories (the SA-Co shape).
Video level: sam3's own ``VEvalEvaluator`` (the SA-Co/VEval suite: class mAP, phrase AP, TETA,
phrase HOTA, cgF1) vs sam3pipe's suite on a SA-Co-shaped set, each in its own process (wall time,
peak RSS), with every sam3 number asserted equal. Then the whole evaluate CLI, start to exit, on a
one-video SA-Co-shaped file, with MLflow tracking off and on (local sqlite), and sam3 on that file.
Last, the ``vos`` family (DAVIS J&F) alone on a semi-supervised set the size of DAVIS 2017 val.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from sam3_core.evaluate.coco import evaluate_frames, prepare_frame_gt
from sam3_core.evaluate.report import EvaluateConfig
from sam3_core.evaluate.suite import SuiteSettings, evaluate_suite
from sam3_core.evaluate.videodata import read_video_set
from tests.fixtures.saco import SacoShape, generate

REPO = Path(__file__).resolve().parents[1]


@dataclass
class EvaluateBench:
    """Sizes of the synthetic sets; ``repeats`` takes the best of several runs (the machine is shared)."""

    images: int = 500
    categories: int = 5
    height: int = 480
    width: int = 640
    objects_per_image: int = 6
    false_positives_per_image: int = 6
    # frame COCO with a SA-Co-sized vocabulary (few of its categories used)
    vocabulary_images: int = 50
    vocabulary: int = 20_000
    # the SA-Co-shaped video set of the suite comparison
    saco: SacoShape = field(
        default_factory=lambda: SacoShape(
            videos=20,
            frames=30,
            height=360,
            width=640,
            categories=20_000,
            positives_per_video=5,
            max_masklets_per_positive=3,
            negatives_per_video=10,
            false_positives_per_pair=0.6,
            seed=1,
        )
    )
    # the one-video file of the CLI timing: 51,248 phrases, 146 frames at 720x1280, 33 GT masklets
    one_video: SacoShape = field(
        default_factory=lambda: SacoShape(
            videos=1,
            frames=146,
            height=720,
            width=1280,
            categories=51_248,
            positives_per_video=11,
            masklets_per_positive=3,
            negatives_per_video=20,
            hit_rate=0.5,
            false_positives_per_pair=0.2,
            seed=3,
        )
    )
    one_video_predictions: int = 20
    # the vos row: DAVIS 2017 val's size (30 videos, 61 objects, ~67 frames each at 854x480)
    vos_videos: int = 30
    vos_objects_per_video: int = 2
    vos_frames: int = 67
    vos_height: int = 480
    vos_width: int = 854
    # sam3 on the one-video file takes minutes and ~11 GB (class mAP over 51,248 categories)
    sam3_one_video: bool = True
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


def frame_data(bench: EvaluateBench, vocabulary: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """COCO GT and results: jittered hits on 80% of objects plus random false positives.

    Objects use ``bench.categories`` categories; the GT lists ``vocabulary`` of them when larger.
    """
    rng = np.random.default_rng(bench.seed)
    h, w = bench.height, bench.width
    annotations, results = [], []
    for image_id in range(1, bench.images + 1):
        for _ in range(bench.objects_per_image):
            box, category = _random_box(rng, h, w), int(rng.integers(1, bench.categories + 1))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": box,
                    "segmentation": _rle(box, h, w),
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
            if rng.random() < 0.8:
                guess = _jitter(rng, box, h, w)
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": category,
                        "bbox": guess,
                        "segmentation": _rle(guess, h, w),
                        "score": float(rng.random()),
                    }
                )
        for _ in range(bench.false_positives_per_image):
            box = _random_box(rng, h, w)
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(rng.integers(1, bench.categories + 1)),
                    "bbox": box,
                    "segmentation": _rle(box, h, w),
                    "score": float(rng.random()),
                }
            )
    categories = [{"id": c, "name": f"c{c}"} for c in range(1, max(bench.categories, vocabulary) + 1)]
    gt = {
        "images": [{"id": i, "height": h, "width": w} for i in range(1, bench.images + 1)],
        "annotations": annotations,
        "categories": categories,
    }
    return gt, results


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
    print(
        f"\nframe-level COCO: {bench.images} images x {bench.categories} categories, "
        f"{len(gt['annotations'])} GT objects, {len(results)} results"
    )
    print(
        f"{'iou type':<8}{'pycocotools s':>15}{'faster-coco-eval s':>20}{'ours/pycocotools s':>20}"
        f"{f'ours/{default} s':>26}{'speed-up':>10}{'same metrics':>14}"
    )
    for iou_type in ("bbox", "segm"):
        run_ours = functools.partial(
            evaluate_frames, prepared, results, iou_type, max_dets=[1, 10, 100], predictions_source="synthetic"
        )
        plain_s, plain = _timed(functools.partial(_plain_coco, "pycocotools", gt, results, iou_type), bench.repeats)
        fast_s, fast = _timed(functools.partial(_plain_coco, "faster_coco_eval", gt, results, iou_type), bench.repeats)
        ours_py_s, ours_py = _timed(functools.partial(run_ours, backend="pycocotools"), bench.repeats)
        ours_s, ours = _timed(functools.partial(run_ours, backend=default), bench.repeats)
        same = (
            np.allclose(plain, fast, atol=1e-12)
            and np.allclose(plain, list(ours_py.metrics.values()), atol=1e-12)
            and np.allclose(plain, list(ours.metrics.values()), atol=1e-12)
        )
        print(
            f"{iou_type:<8}{plain_s:>15.2f}{fast_s:>20.2f}{ours_py_s:>20.2f}{ours_s:>26.2f}"
            f"{plain_s / ours_s:>9.1f}x{same!s:>14}"
        )


def _frame_vocabulary_rows(bench: EvaluateBench) -> None:
    small = EvaluateBench(images=bench.vocabulary_images, categories=200, seed=bench.seed)
    gt, results = frame_data(small, vocabulary=bench.vocabulary)
    prepared = prepare_frame_gt(gt, "synthetic")
    print(
        f"\nframe-level COCO, SA-Co-sized vocabulary: {small.images} images, {bench.vocabulary} categories in the GT "
        f"({small.categories} used), {len(gt['annotations'])} GT objects, {len(results)} results, bbox"
    )
    plain_s, plain = _timed(lambda: _plain_coco("pycocotools", gt, results, "bbox"))
    ours_s, ours = _timed(
        lambda: evaluate_frames(
            prepared,
            results,
            "bbox",
            backend=EvaluateConfig().backend,
            max_dets=[1, 10, 100],
            predictions_source="synthetic",
        ),
        bench.repeats,
    )
    same = np.allclose(plain, list(ours.metrics.values()), atol=1e-12)
    print(f"{'plain pycocotools s':>20}{'ours s':>10}{'speed-up':>10}{'same metrics':>14}")
    print(f"{plain_s:>20.2f}{ours_s:>10.2f}{plain_s / ours_s:>9.1f}x{same!s:>14}")


def _child(code: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``code`` in a fresh Python; it prints one JSON line. Adds wall time and the peak RSS of it
    and of its own children (sam3 forks worker pools), in MiB."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})},
    )
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"benchmark child failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["wall_s"] = wall
    return out


# Peak RSS of the child itself is its VmHWM (reset at exec; ru_maxrss would count the bench's own memory,
# copied at fork). Worker processes sam3 forks report ru_maxrss, shared pages with their parent included.
_RUSAGE = (
    "import resource, json, re; "
    "hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
    "rss = {'rss_mib': hwm / 1024, "
    "'children_rss_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}"
)


def _sam3_suite(gt: Path, pred: Path, out: Path) -> dict[str, Any]:
    code = (
        f"import contextlib, io, time\n"
        f"from sam3.eval.saco_veval_eval import VEvalEvaluator\n"
        f"start = time.perf_counter()\n"
        f"with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        f"    res = VEvalEvaluator({str(gt)!r}, {str(out)!r}).run_eval({str(pred)!r})\n"
        f"elapsed = time.perf_counter() - start\n"
        f"{_RUSAGE}\n"
        f"print(json.dumps({{'eval_s': elapsed, 'metrics': res['dataset_results'], **rss}}))"
    )
    return _child(code)


def _our_suite(gt: Path, pred: Path, workers: int) -> dict[str, Any]:
    code = (
        f"import json, time\n"
        f"from sam3_core.evaluate.families import SAM3_SUITE\n"
        f"from sam3_core.evaluate.suite import SuiteSettings, evaluate_suite\n"
        f"from sam3_core.evaluate.videodata import read_video_set\n"
        f"start = time.perf_counter()\n"
        f"data = read_video_set(json.load(open({str(gt)!r})), json.load(open({str(pred)!r})), "
        f"gt_source='gt', predictions_source='pred')\n"
        f"res = evaluate_suite(data, SuiteSettings(families=SAM3_SUITE, workers={workers}))\n"
        f"elapsed = time.perf_counter() - start\n"
        f"{_RUSAGE}\n"
        f"print(json.dumps({{'eval_s': elapsed, 'metrics': res.metrics, **rss}}))"
    )
    return _child(code)


def _equal(ours: dict[str, float], reference: dict[str, float]) -> bool:
    return all(
        k in ours and (abs(ours[k] - v) <= 1e-9 or (math.isnan(ours[k]) and math.isnan(v)))
        for k, v in reference.items()
    )


def _suite_rows(bench: EvaluateBench, folder: Path) -> None:
    gt, predictions = generate(bench.saco)
    gt_path, pred_path = folder / "saco_gt.json", folder / "saco_pred.json"
    gt_path.write_text(json.dumps(gt))
    pred_path.write_text(json.dumps(predictions))
    frames = sum(v["length"] for v in gt["videos"])
    print(
        f"\nSA-Co/VEval suite (class mAP, phrase AP, TETA, phrase HOTA, cgF1; bbox + mask): {len(gt['videos'])} "
        f"videos, {frames} frames at {bench.saco.width}x{bench.saco.height}, {len(gt['categories'])} phrases, "
        f"{len(gt['video_np_pairs'])} video-phrase pairs, {len(gt['annotations'])} GT masklets, "
        f"{len(predictions)} predicted masklets"
    )
    reference = _sam3_suite(gt_path, pred_path, folder / "sam3_res.json")
    rows = [("sam3 VEvalEvaluator", reference)]
    for workers in (1, 0):
        ours = _our_suite(gt_path, pred_path, workers)
        assert _equal(ours["metrics"], reference["metrics"]), "sam3pipe's suite differs from sam3's"
        rows.append((f"sam3pipe suite, workers={workers}", ours))
    _print_rows(rows, reference, len(reference["metrics"]))


def _print_rows(rows: list[tuple[str, dict[str, Any]]], reference: dict[str, Any], keys: int) -> None:
    """Process = start to exit (sam3's includes importing torch); evaluate = reading the files and scoring."""
    print(
        f"{'implementation':<30}{'process s':>11}{'evaluate s':>12}{'speed-up':>10}{'peak RSS MiB':>14}"
        f"{'workers MiB':>13}"
    )
    for name, row in rows:
        print(
            f"{name:<30}{row['wall_s']:>11.2f}{row['eval_s']:>12.2f}{reference['eval_s'] / row['eval_s']:>9.1f}x"
            f"{row['rss_mib']:>14.0f}{row['children_rss_mib']:>13.0f}"
        )
    print(f"identical numbers: all {keys} of sam3's keys within 1e-9; speed-up on evaluate time")


# Starts the CLI from a small process and reports its wall time and peak RSS (wait4): a child of the
# bench itself would inherit the bench's memory high-water mark through fork.
_SHIM = (
    "import os, sys, json, time, subprocess\n"
    "start = time.perf_counter()\n"
    "child = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(child.pid, 0)\n"
    "wall = time.perf_counter() - start\n"
    "json.dump({'wall_s': wall, 'cpu_s': usage.ru_utime + usage.ru_stime, 'rss_mib': usage.ru_maxrss / 1024, "
    "'code': os.waitstatus_to_exitcode(status)}, open(sys.argv[1], 'w'))\n"
)


def _cli(args: list[str], env: dict[str, str], folder: Path) -> dict[str, Any]:
    """The evaluate CLI start to exit: wall time and peak RSS of that process."""
    usage = folder / "cli-usage.json"
    done = subprocess.run(
        [sys.executable, "-c", _SHIM, str(usage), sys.executable, "-m", "components.evaluate", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    row = json.loads(usage.read_text())
    if row["code"]:
        raise RuntimeError(f"evaluate CLI failed:\n{done.stderr[-3000:]}")
    row["metrics"] = json.loads(done.stdout.strip().splitlines()[-1])["metrics"]
    return row


def _cli_rows(bench: EvaluateBench, folder: Path) -> None:
    gt, predictions = generate(bench.one_video)
    predictions = predictions[: bench.one_video_predictions]
    gt_path, pred_path = folder / "one_gt.json", folder / "one_pred.json"
    gt_path.write_text(json.dumps(gt))
    pred_path.write_text(json.dumps(predictions))
    video = gt["videos"][0]
    print(
        f"\nevaluate CLI, start to exit, one SA-Co-shaped video: {len(gt['categories'])} phrases, {video['length']} "
        f"frames at {video['width']}x{video['height']}, {len(gt['annotations'])} GT masklets, {len(predictions)} "
        f"predicted masklets; every family (python -m components.evaluate, best of {bench.repeats})"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SAM3PIPE_STORE": str(folder / "store"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
    }
    rows = []
    for tracking in ("false", "true"):
        runs = [
            _cli(
                [
                    "--gt",
                    str(gt_path),
                    "--predictions",
                    str(pred_path),
                    "--output",
                    str(folder / f"out-{tracking}-{i}" / "metrics.json"),
                    f"mlflow.enabled={tracking}",
                ],
                env,
                folder,
            )
            for i in range(bench.repeats)
        ]
        rows.append(
            (
                f"sam3pipe CLI, tracking {'on (sqlite)' if tracking == 'true' else 'off'}",
                min(runs, key=lambda r: r["wall_s"]),
            )
        )
    print(f"{'implementation':<34}{'wall s':>10}{'CPU s':>8}{'peak RSS MiB':>14}")
    for name, row in rows:
        print(f"{name:<34}{row['wall_s']:>10.2f}{row['cpu_s']:>8.2f}{row['rss_mib']:>14.0f}")
    print(
        f"MLflow tracking adds {rows[1][1]['wall_s'] - rows[0][1]['wall_s']:.2f} s wall, "
        f"{rows[1][1]['cpu_s'] - rows[0][1]['cpu_s']:.2f} s CPU"
    )
    if bench.sam3_one_video:
        reference = _sam3_suite(gt_path, pred_path, folder / "one_sam3_res.json")
        assert _equal(rows[0][1]["metrics"], reference["metrics"]), "sam3pipe's CLI differs from sam3"
        print(
            f"{'sam3 VEvalEvaluator, same file':<34}{reference['wall_s']:>10.2f}{reference['rss_mib']:>14.0f}"
            f"   (evaluate {reference['eval_s']:.1f} s; identical numbers: all {len(reference['metrics'])} of "
            "sam3's keys within 1e-9)"
        )


def _polygon_rle(cy: float, cx: float, ry: float, rx: float, height: int, width: int) -> dict[str, Any]:
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    polygon = np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], axis=1).ravel().tolist()
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def vos_data(bench: EvaluateBench) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A YT-VIS GT of drifting ellipses and inference=vos-style predictions (jittered, one per object, gt_id)."""
    rng = np.random.default_rng(bench.seed)
    h, w, length = bench.vos_height, bench.vos_width, bench.vos_frames
    gt: dict[str, Any] = {"videos": [], "annotations": [], "categories": [{"id": 1, "name": "object"}]}
    predictions = []
    for video_id in range(1, bench.vos_videos + 1):
        gt["videos"].append({"id": video_id, "height": h, "width": w, "length": length})
        for _ in range(bench.vos_objects_per_video):
            cy, cx = rng.uniform(0.2 * h, 0.8 * h), rng.uniform(0.2 * w, 0.8 * w)
            ry, rx = rng.uniform(0.06 * h, 0.25 * h), rng.uniform(0.04 * w, 0.18 * w)
            vy, vx = rng.normal(0, 2, size=2)
            annotation_id = len(gt["annotations"]) + 1
            segmentations = [_polygon_rle(cy + t * vy, cx + t * vx, ry, rx, h, w) for t in range(length)]
            gt["annotations"].append(
                {"id": annotation_id, "video_id": video_id, "category_id": 1, "segmentations": segmentations}
            )
            guesses = [
                _polygon_rle(
                    cy + t * vy + rng.normal(0, 4), cx + t * vx + rng.normal(0, 4), ry * rng.uniform(0.9, 1.1), rx, h, w
                )
                for t in range(length)
            ]
            predictions.append(
                {"video_id": video_id, "category_id": 1, "score": 1.0, "gt_id": annotation_id, "segmentations": guesses}
            )
    return gt, predictions


def _vos_rows(bench: EvaluateBench) -> None:
    gt, predictions = vos_data(bench)
    data = read_video_set(gt, predictions, gt_source="synthetic", predictions_source="synthetic")
    objects = len(gt["annotations"])
    scored = objects * (bench.vos_frames - 2)
    print(
        f"\nvos family (DAVIS J&F): {bench.vos_videos} videos x {bench.vos_frames} frames at "
        f"{bench.vos_width}x{bench.vos_height}, {objects} objects, {scored} scored object-frames, one process"
    )
    seconds, result = _timed(lambda: evaluate_suite(data, SuiteSettings(families=("vos",), workers=1)), bench.repeats)
    print(f"{'evaluate s':>12}{'ms per object-frame':>22}{'vos_JF_mean':>14}")
    print(f"{seconds:>12.2f}{1000 * seconds / scored:>22.2f}{result.metrics['vos_JF_mean']:>14.4f}")


def main() -> None:
    bench = EvaluateBench()
    _frame_rows(bench)
    _frame_vocabulary_rows(bench)
    with tempfile.TemporaryDirectory(prefix="sam3pipe-bench-eval-") as tmp:
        _suite_rows(bench, Path(tmp))
        _cli_rows(bench, Path(tmp))
    _vos_rows(bench)


if __name__ == "__main__":
    main()
