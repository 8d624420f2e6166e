"""The vos family: DAVIS 2017 semi-supervised J, F and J&F.

Hand-worked cases pin the definitions (the boundary tolerance, empty masks, a shifted mask, a
missing object, which frames count, the per-object statistics); generated sets are compared with
a plain transcription of the DAVIS toolkit's formulas (``tests/fixtures/davis_reference.py``,
davis2017-evaluation at ac7c43f) within 1e-12, per object and over the set.
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from sam3_core.errors import InputError
from sam3_core.evaluate.families.vos import PER_OBJECT_CSV, boundary_radius, disk, frame_scores, statistics
from sam3_core.evaluate.report import EvaluateConfig, video_families
from sam3_core.evaluate.suite import SuiteSettings, evaluate_suite
from sam3_core.evaluate.videodata import read_video_set
from tests.fixtures import davis_reference

KEYS = {f"vos_{m}_{s}" for m in ("J", "F") for s in ("mean", "recall", "decay")} | {"vos_JF_mean"}


def rle(mask: np.ndarray | None) -> dict | None:
    if mask is None:
        return None
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": encoded["counts"].decode("ascii")}


def box(mask: np.ndarray | None) -> list[float] | None:
    return None if mask is None or not mask.any() else [float(v) for v in mask_utils.toBbox(rle(mask))]


def square(size: tuple[int, int], top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


def video_set(videos: list[dict], *, metrics: tuple[str, ...] = ("vos",), workers: int = 1):
    """GT and predictions from dense masks: ``videos`` = [{size, objects: {id: [mask|None per frame]},
    predictions: {gt_id: [mask|None per frame]}}]; returns the suite result."""
    gt, predictions = gt_and_predictions(videos)
    data = read_video_set(gt, predictions, gt_source="gt.json", predictions_source="pred.json")
    return evaluate_suite(data, SuiteSettings(families=metrics, workers=workers))


def gt_and_predictions(videos: list[dict]) -> tuple[dict, list[dict]]:
    gt = {"videos": [], "annotations": [], "categories": [{"id": 1, "name": "thing"}]}
    predictions = []
    for v, video in enumerate(videos, start=1):
        height, width = video["size"]
        length = len(next(iter(video["objects"].values())))
        gt["videos"].append({"id": v, "height": height, "width": width, "length": length})
        for object_id, frames in video["objects"].items():
            gt["annotations"].append(
                {
                    "id": object_id,
                    "video_id": v,
                    "category_id": 1,
                    "iscrowd": 0,
                    "segmentations": [rle(m) if m is not None and m.any() else None for m in frames],
                    "bboxes": [box(m) for m in frames],
                    "areas": [None if m is None or not m.any() else float(m.sum()) for m in frames],
                }
            )
        for gt_id, frames in video.get("predictions", {}).items():
            predictions.append(
                {
                    "video_id": v,
                    "category_id": 1,
                    "score": 1.0,
                    "gt_id": gt_id,
                    "segmentations": [rle(m) for m in frames],
                    "bboxes": [box(m) or [0.0, 0.0, 0.0, 0.0] for m in frames],
                    "areas": [0.0 if m is None else float(m.sum()) for m in frames],
                }
            )
    return gt, predictions


def per_object(result) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(result.files[PER_OBJECT_CSV])))


# --- the boundary tolerance and one frame ----------------------------------------------------------


@pytest.mark.parametrize(("size", "radius"), [((480, 854), 8), ((1080, 1920), 18), ((100, 100), 2), ((60, 80), 1)])
def test_boundary_tolerance_is_the_ceiling_of_0_008_of_the_image_diagonal(size, radius):
    assert boundary_radius(*size) == radius == math.ceil(0.008 * math.hypot(*size))


def test_the_tolerance_disk_holds_the_offsets_within_the_radius():
    kernel = disk(2)

    assert kernel.shape == (5, 5)
    assert kernel.sum() == 13  # (0,0), 4 at distance 1, 4 at sqrt 2, 4 at 2; the (1, 2) offsets are out
    assert kernel[0, 2] == 1 and kernel[0, 1] == 0


SIZE = (100, 100)  # tolerance 2 pixels
KERNEL = disk(boundary_radius(*SIZE))


def scores(prediction: np.ndarray | None, gt: np.ndarray | None) -> tuple[float, float]:
    return frame_scores(rle(prediction), rle(gt), *SIZE, KERNEL)


def test_both_masks_empty_score_one_in_j_and_f():
    assert scores(None, None) == (1.0, 1.0)


def test_a_prediction_where_the_gt_is_empty_scores_zero():
    assert scores(square(SIZE, 20, 20, 10), None) == (0.0, 0.0)


def test_an_empty_prediction_where_the_gt_is_not_scores_zero():
    assert scores(None, square(SIZE, 20, 20, 10)) == (0.0, 0.0)


def test_a_mask_shifted_by_the_tolerance_keeps_f_at_one():
    j, f = scores(square(SIZE, 20, 22, 20), square(SIZE, 20, 20, 20))

    assert f == 1.0
    assert j == pytest.approx(20 * 18 / (20 * 22), abs=1e-15)


def test_a_mask_shifted_one_pixel_past_the_tolerance_loses_both_vertical_edges():
    j, f = scores(square(SIZE, 20, 23, 20), square(SIZE, 20, 20, 20))

    # Both boundaries are 21 x 21 outlines (80 pixels). Past the tolerance: the far vertical edge
    # (21 pixels) and the near one (21 less the 3 rows at each end that reach the other's top or
    # bottom edge) -- 36 unmatched on each side, so precision = recall = F = 44 / 80.
    assert f == pytest.approx(44 / 80, abs=1e-15)
    assert j == pytest.approx(20 * 17 / (20 * 23), abs=1e-15)


def test_a_frame_filled_by_the_gt_has_no_boundary_so_an_empty_prediction_keeps_f_at_one():
    # the toolkit's boundary map never marks the image's last row and column against the outside
    assert scores(None, np.ones(SIZE, dtype=bool)) == (0.0, 1.0)


def test_per_object_statistics_follow_db_statistics():
    stats = statistics(np.array([1.0, 1.0, 0.0, 0.0]))

    # bins start at round(linspace(1, 4, 5)) - 1 = 0, 1, 2, 2, 3: first quarter [1, 1], last [0, 0]
    assert stats == {"mean": 0.5, "recall": 0.5, "decay": 1.0}
    assert statistics(np.array([0.5, 0.75]))["recall"] == 0.5  # strictly above 0.5


# --- which frames and objects count ----------------------------------------------------------------


def moving(length: int, size=SIZE, side: int = 20) -> list[np.ndarray]:
    return [square(size, 20 + 3 * t, 10 + 5 * t, side) for t in range(length)]


def test_the_first_and_last_frames_are_not_scored():
    gt = moving(6)
    wrong = [square(SIZE, 70, 70, 10)]
    prediction = wrong + gt[1:-1] + wrong

    result = video_set([{"size": SIZE, "objects": {7: gt}, "predictions": {7: prediction}}])

    assert set(result.metrics) == KEYS
    assert result.metrics["vos_JF_mean"] == 1.0 and result.metrics["vos_J_decay"] == 0.0
    assert per_object(result)[0]["frames"] == "4"


def test_an_object_that_appears_later_is_scored_after_its_prompt_frame():
    gt = [None, None, *moving(6)[2:]]
    prediction = [None, None, square(SIZE, 80, 80, 5), *gt[3:]]  # wrong only on its prompt frame

    result = video_set([{"size": SIZE, "objects": {7: gt}, "predictions": {7: prediction}}])

    assert result.metrics["vos_J_mean"] == 1.0
    assert per_object(result)[0]["frames"] == "2"  # frames 3 and 4 of 0..5


def test_a_missing_object_scores_zero_where_it_is_visible_and_one_where_it_is_absent():
    visible = moving(4)
    gt = [*visible, None, None, None, None]  # 8 frames; scored: 1..6, visible in 1..3

    result = video_set([{"size": SIZE, "objects": {3: gt, 4: moving(8)}, "predictions": {4: moving(8)}}])

    rows = {row["object_id"]: row for row in per_object(result)}
    assert rows["3"]["predicted"] == "0"
    # per frame [0, 0, 0, 1, 1, 1]: bins start at 0, 1, 3, 4, 5, so decay = mean[0, 0] - mean[1, 1]
    assert [float(rows["3"][k]) for k in ("J_mean", "J_recall", "J_decay", "F_mean", "F_decay")] == [
        0.5,
        0.5,
        -1.0,
        0.5,
        -1.0,
    ]
    assert result.metrics["vos_J_mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert result.metrics["vos_JF_mean"] == pytest.approx((result.metrics["vos_J_mean"] + 0.75) / 2)


def test_an_object_prompted_in_the_last_two_frames_is_listed_but_left_out_of_the_means():
    late = [None, None, None, None, *moving(6)[4:]]

    result = video_set([{"size": SIZE, "objects": {1: moving(6), 2: late}, "predictions": {1: moving(6)}}])

    rows = per_object(result)
    assert [(r["object_id"], r["frames"], r["J_mean"]) for r in rows] == [("1", "4", "1.0"), ("2", "0", "")]
    assert result.metrics["vos_JF_mean"] == 1.0


def test_an_empty_predicted_mask_and_a_null_gt_frame_agree():
    gt = [*moving(3), None, *moving(6)[4:]]
    prediction = [*moving(3), np.zeros(SIZE, dtype=bool), *moving(6)[4:]]

    result = video_set([{"size": SIZE, "objects": {1: gt}, "predictions": {1: prediction}}])

    assert result.metrics["vos_JF_mean"] == 1.0


# --- parity with the toolkit's formulas on generated sets ------------------------------------------


def ellipse(size: tuple[int, int], cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.mgrid[: size[0], : size[1]]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


def generated(seed: int) -> tuple[list[dict], list[tuple[np.ndarray, np.ndarray]]]:
    """Videos of drifting ellipses (some touching the image border, some hidden for a while, one
    filling a frame) and predictions that are shifted, grown, shrunk, emptied, or missing; and the
    same as DAVIS arrays ``[objects, frames, H, W]`` (GT, results with zeros for missing objects)."""
    rng = np.random.default_rng(seed)
    videos, dense = [], []
    for size in [(37, 53), (64, 90), (120, 160)]:
        length = int(rng.integers(5, 9))
        objects, predictions = {}, {}
        gt_stack, result_stack = [], []
        for k in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(0, size[0]), rng.uniform(0, size[1])
            ry, rx = rng.uniform(3, size[0] / 2), rng.uniform(3, size[1] / 2)
            vy, vx = rng.normal(0, 3, size=2)
            frames = [ellipse(size, cy + t * vy, cx + t * vx, ry, rx) for t in range(length)]
            frames[0] = frames[0] | ellipse(size, size[0] / 2, size[1] / 2, 2, 2)  # present in frame 0
            if rng.random() < 0.5:  # hidden for a stretch
                start = int(rng.integers(1, length))
                for t in range(start, min(length, start + 2)):
                    frames[t] = np.zeros(size, dtype=bool)
            if k == 0 and size == (64, 90):
                frames[2] = np.ones(size, dtype=bool)
            guess = []
            for t in range(length):
                shift = rng.integers(-4, 5, size=2)
                mask = np.roll(frames[t], tuple(shift), axis=(0, 1))
                if rng.random() < 0.2:
                    mask = ellipse(size, cy, cx, ry * rng.uniform(0.5, 1.5), rx * rng.uniform(0.5, 1.5))
                if rng.random() < 0.15:
                    mask = np.zeros(size, dtype=bool)
                guess.append(mask)
            object_id = 100 * len(videos) + k + 1
            objects[object_id] = frames
            missing = rng.random() < 0.25
            if not missing:
                predictions[object_id] = guess
            gt_stack.append(np.stack(frames))
            result_stack.append(np.zeros((length, *size), dtype=bool) if missing else np.stack(guess))
        videos.append({"size": size, "objects": objects, "predictions": predictions})
        dense.append((np.stack(gt_stack), np.stack(result_stack)))
    return videos, dense


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_generated_sets_equal_the_toolkits_formulas_per_object_and_overall(seed):
    videos, dense = generated(seed)

    result = video_set(videos)
    reference, reference_objects = davis_reference.evaluate(dense)

    assert set(result.metrics) == KEYS
    assert result.metrics == pytest.approx(reference, abs=1e-12)
    rows = per_object(result)
    assert len(rows) == len(reference_objects)
    for row, expected in zip(rows, reference_objects):
        assert {k: float(row[k]) for k in expected} == pytest.approx(expected, abs=1e-12)


@pytest.mark.integration
def test_worker_processes_give_the_same_vos_numbers_as_one_process():
    videos, _ = generated(5)

    assert video_set(videos, workers=2).metrics == video_set(videos).metrics


# --- choosing the family, and bad input -----------------------------------------------------------


def test_predictions_carrying_gt_id_choose_vos_unless_metrics_says_otherwise():
    gt, predictions = gt_and_predictions([{"size": SIZE, "objects": {1: moving(4)}, "predictions": {1: moving(4)}}])
    data = read_video_set(gt, predictions, gt_source="gt.json", predictions_source="pred.json")
    plain = read_video_set(
        gt, [{k: v for k, v in p.items() if k != "gt_id"} for p in predictions], gt_source="g", predictions_source="p"
    )

    assert video_families(EvaluateConfig(), data) == ("vos",)
    assert video_families(EvaluateConfig(), plain) == ("map",)
    assert video_families(EvaluateConfig(metrics=["map", "vos"]), data) == ("map", "vos")


def test_vos_and_class_map_run_together_when_asked():
    video = {"size": SIZE, "objects": {1: moving(4)}, "predictions": {1: moving(4)}}

    metrics = video_set([video], metrics=("vos", "map")).metrics

    assert KEYS | {"video_mask_mAP_50_95"} <= set(metrics)


def _bad(case: str) -> tuple[dict, list[dict]]:
    length = 2 if case == "two-frame-video" else 4
    gt, predictions = gt_and_predictions(
        [{"size": SIZE, "objects": {1: moving(length), 2: moving(length)}, "predictions": {1: moving(length)}}]
    )
    if case == "no-gt-id":
        predictions[0].pop("gt_id")
    elif case == "unknown-gt-id":
        predictions[0]["gt_id"] = 9
    elif case == "gt-id-not-an-integer":
        predictions[0]["gt_id"] = "1"
    elif case == "two-predictions-for-one-object":
        predictions.append(dict(predictions[0]))
    elif case == "gt-without-ids":
        gt["annotations"][0].pop("id")
    elif case == "gt-id-of-an-object-that-never-appears":
        gt["annotations"][0]["segmentations"] = [None] * length
    return gt, predictions


@pytest.mark.parametrize(
    ("case", "source", "field"),
    [
        ("no-gt-id", "pred.json", "[0].gt_id"),
        ("unknown-gt-id", "pred.json", "[0].gt_id"),
        ("gt-id-not-an-integer", "pred.json", "[0].gt_id"),
        ("two-predictions-for-one-object", "pred.json", "[1].gt_id"),
        ("gt-without-ids", "gt.json", "annotations[0].id"),
        ("gt-id-of-an-object-that-never-appears", "pred.json", "[0].gt_id"),
        ("two-frame-video", "gt.json", "videos"),
    ],
)
def test_bad_vos_input_is_an_input_error_naming_file_and_field(case, source, field):
    gt, predictions = _bad(case)

    with pytest.raises(InputError) as error:
        data = read_video_set(gt, predictions, gt_source="gt.json", predictions_source="pred.json")
        evaluate_suite(data, SuiteSettings(families=("vos",), workers=1))

    assert (error.value.source, error.value.field) == (source, field)
