"""Frame-level COCO evaluation: hand-made cases whose answers are known without running COCO."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from sam3_core.errors import InputError
from sam3_core.evaluate.coco import STAT_NAMES, evaluate_frames, prepare_frame_gt

BACKENDS = ["pycocotools", "faster_coco_eval"]
SIZE = (120, 160)  # height, width of every image


def box_mask(box: list[float], size: tuple[int, int] = SIZE) -> dict:
    """Compressed RLE of an axis-aligned integer box, so mask IoU equals box IoU."""
    mask = np.zeros(size, dtype=np.uint8, order="F")
    x, y, w, h = (int(v) for v in box)
    mask[y : y + h, x : x + w] = 1
    rle = mask_utils.encode(mask)
    return {"size": list(size), "counts": rle["counts"].decode("ascii")}


def coco_gt(boxes: dict[int, list[tuple[int, list[int]]]], categories: tuple[int, ...] = (1, 2)) -> dict:
    """COCO GT from {image_id: [(category_id, box), ...]} with masks equal to the boxes."""
    annotations = []
    for image_id, objects in boxes.items():
        for category_id, box in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": box,
                    "segmentation": box_mask(box),
                    "area": float(box[2] * box[3]),
                    "iscrowd": 0,
                }
            )
    return {
        "images": [{"id": i, "height": SIZE[0], "width": SIZE[1]} for i in boxes],
        "annotations": annotations,
        "categories": [{"id": c, "name": f"class{c}"} for c in categories],
    }


def result(image_id: int, category_id: int, box: list[int], score: float = 0.9) -> dict:
    return {
        "image_id": image_id,
        "category_id": category_id,
        "bbox": box,
        "segmentation": box_mask(box),
        "score": score,
    }


def run(gt: dict, predictions: list, iou_type: str, backend: str = "pycocotools", max_dets=(1, 10, 100)):
    return evaluate_frames(
        prepare_frame_gt(gt, "gt.json"),
        predictions,
        iou_type,
        backend=backend,
        max_dets=list(max_dets),
        predictions_source="pred.json",
    )


GT = coco_gt({1: [(1, [10, 10, 40, 30]), (2, [60, 50, 30, 30])], 2: [(1, [0, 0, 20, 20])]})
PERFECT = [result(a["image_id"], a["category_id"], a["bbox"]) for a in GT["annotations"]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perfect_predictions_score_one(backend, iou_type):
    metrics = run(GT, PERFECT, iou_type, backend).metrics

    for name in ("AP", "AP50", "AP75", "APs", "APm", "AR10", "AR100", "ARs", "ARm"):
        assert metrics[f"{iou_type}_{name}"] == pytest.approx(1.0, abs=1e-12), name


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_stat_names_are_the_twelve_coco_names_with_the_iou_type_prefix(iou_type):
    metrics = run(GT, PERFECT, iou_type).metrics

    assert list(metrics) == [f"{iou_type}_{name}" for name in STAT_NAMES]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_iou_of_exactly_0_6_matches_at_thresholds_up_to_0_6_inclusive(backend, iou_type):
    # GT 40x25 = 1000 px; the prediction covers its left 24 columns: IoU = 600 / 1000 = 0.6,
    # a match at .50, .55 and .60 (COCO's threshold is inclusive) out of ten thresholds.
    gt = coco_gt({1: [(1, [20, 20, 40, 25])]})

    metrics = run(gt, [result(1, 1, [20, 20, 24, 25])], iou_type, backend).metrics

    assert metrics[f"{iou_type}_AP50"] == pytest.approx(1.0)
    assert metrics[f"{iou_type}_AP75"] == 0.0
    assert metrics[f"{iou_type}_AP"] == pytest.approx(0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_thirds_iou_box_scores_four_tenths(backend):
    gt = coco_gt({1: [(1, [0, 0, 30, 30])]})

    metrics = run(gt, [result(1, 1, [0, 0, 20, 30])], "bbox", backend).metrics

    assert metrics["bbox_AP"] == pytest.approx(0.4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_empty_predictions_score_zero_where_gt_exists_and_minus_one_where_none(backend, iou_type):
    metrics = run(GT, [], iou_type, backend).metrics

    assert metrics[f"{iou_type}_AP"] == 0.0
    assert metrics[f"{iou_type}_AR100"] == 0.0
    assert metrics[f"{iou_type}_APl"] == -1.0  # no GT object is larger than 96x96


def test_missing_iscrowd_and_area_are_filled_from_the_mask():
    gt = coco_gt({1: [(1, [10, 10, 40, 30])]})
    for ann in gt["annotations"]:
        del ann["iscrowd"], ann["area"]

    prepared = prepare_frame_gt(gt, "gt.json")

    assert prepared["annotations"][0]["iscrowd"] == 0
    assert prepared["annotations"][0]["area"] == 1200.0


def test_missing_area_without_mask_is_filled_from_the_box():
    gt = coco_gt({1: [(1, [10, 10, 40, 30])]})
    del gt["annotations"][0]["area"], gt["annotations"][0]["segmentation"]

    assert prepare_frame_gt(gt, "gt.json")["annotations"][0]["area"] == 1200.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_gt_without_iscrowd_and_area_evaluates(backend):
    gt = coco_gt({1: [(1, [10, 10, 40, 30])]})
    for ann in gt["annotations"]:
        del ann["iscrowd"], ann["area"]

    metrics = run(gt, [result(1, 1, [10, 10, 40, 30])], "segm", backend).metrics

    assert metrics["segm_AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_max_dets_set_ar_per_limit_and_ap_at_the_largest(backend):
    # Three objects found with decreasing scores: recall is 1/3, 2/3, 3/3 at max_dets 1, 2, 3.
    boxes = [[0, 0, 20, 20], [40, 0, 20, 20], [80, 0, 20, 20]]
    gt = coco_gt({1: [(1, box) for box in boxes]})
    predictions = [result(1, 1, box, score) for box, score in zip(boxes, (0.9, 0.8, 0.7))]

    metrics = run(gt, predictions, "bbox", backend, max_dets=(1, 2, 3)).metrics

    assert metrics["bbox_AR1"] == pytest.approx(1 / 3)
    assert metrics["bbox_AR10"] == pytest.approx(2 / 3)
    assert metrics["bbox_AR100"] == pytest.approx(1.0)
    assert metrics["bbox_AP"] == pytest.approx(1.0)  # pycocotools' summarize says -1 here


@pytest.mark.parametrize("backend", BACKENDS)
def test_category_without_gt_is_left_out_of_the_mean(backend):
    gt = coco_gt({1: [(1, [10, 10, 40, 30])]}, categories=(1, 2))
    predictions = [result(1, 1, [10, 10, 40, 30]), result(1, 2, [70, 60, 30, 30], 0.95)]

    evaluation = run(gt, predictions, "bbox", backend)

    assert evaluation.metrics["bbox_AP"] == pytest.approx(1.0)
    assert evaluation.arrays.per_category()[2]["AP"] == -1.0


def test_per_category_table_gives_each_category_its_own_ap():
    gt = coco_gt({1: [(1, [10, 10, 40, 30]), (2, [60, 50, 30, 30])]})

    table = run(gt, [result(1, 1, [10, 10, 40, 30])], "bbox").arrays.per_category()

    assert table[1]["AP"] == pytest.approx(1.0)
    assert table[2] == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}


def test_segm_predictions_are_sized_by_their_mask_not_their_box():
    # A false positive whose mask is small (10x10) but whose box field claims 110x110: sized by
    # the mask it counts against the small-object AP; sized by the box it would be ignored there.
    gt = coco_gt({1: [(1, [0, 0, 20, 20])]})
    false_positive = {**result(1, 1, [100, 100, 10, 10], 0.99), "bbox": [0, 0, 110, 110]}

    metrics = run(gt, [result(1, 1, [0, 0, 20, 20], 0.5), false_positive], "segm").metrics

    assert metrics["segm_APs"] < 0.6


def test_pr_curve_of_perfect_predictions_is_one_at_every_recall():
    arrays = run(GT, PERFECT, "bbox").arrays

    assert np.allclose(arrays.pr_curve(0.5), 1.0)
    assert arrays.pr_curve(0.5).shape == arrays.rec_thrs.shape


def random_case(seed: int) -> tuple[dict, list]:
    """GT and noisy, partly wrong predictions over 12 images and 3 categories."""
    rng = np.random.default_rng(seed)
    objects: dict[int, list[tuple[int, list[int]]]] = {}
    predictions = []
    for image_id in range(1, 13):
        objects[image_id] = []
        for _ in range(rng.integers(0, 5)):
            w, h = int(rng.integers(5, 70)), int(rng.integers(5, 70))
            box = [int(rng.integers(0, SIZE[1] - w)), int(rng.integers(0, SIZE[0] - h)), w, h]
            category = int(rng.integers(1, 4))
            objects[image_id].append((category, box))
            if rng.random() < 0.8:
                jitter = [int(v) for v in rng.integers(-4, 5, size=4)]
                guess = [
                    max(box[0] + jitter[0], 0),
                    max(box[1] + jitter[1], 0),
                    max(w + jitter[2], 1),
                    max(h + jitter[3], 1),
                ]
                guess[2], guess[3] = min(guess[2], SIZE[1] - guess[0]), min(guess[3], SIZE[0] - guess[1])
                predictions.append(result(image_id, category, guess, float(rng.random())))
        for _ in range(rng.integers(0, 3)):
            box = [
                int(rng.integers(0, 100)),
                int(rng.integers(0, 80)),
                int(rng.integers(5, 40)),
                int(rng.integers(5, 40)),
            ]
            predictions.append(result(image_id, int(rng.integers(1, 4)), box, float(rng.random())))
    return coco_gt(objects, categories=(1, 2, 3, 4)), predictions


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_faster_coco_eval_gives_the_same_numbers_as_pycocotools(iou_type):
    gt, predictions = random_case(seed=7)

    reference = run(gt, predictions, iou_type, "pycocotools")
    faster = run(gt, predictions, iou_type, "faster_coco_eval")

    assert 0.1 < reference.metrics[f"{iou_type}_AP"] < 0.9
    assert faster.metrics == pytest.approx(reference.metrics, abs=1e-12)
    assert np.allclose(faster.arrays.precision, reference.arrays.precision, atol=1e-12)


@pytest.mark.parametrize(
    ("predictions", "field"),
    [
        ({"image_id": 1}, "(root)"),
        ([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5]}], "[0].score"),
        ([result(99, 1, [0, 0, 5, 5])], "[0].image_id"),
        ([result(1, 42, [0, 0, 5, 5])], "[0].category_id"),
        ([{"image_id": 1, "category_id": 1, "score": 0.5}], "[0].bbox"),
        ([{**result(1, 1, [0, 0, 5, 5]), "bbox": [0, 0, -5, 5]}], "[0].bbox"),
    ],
    ids=["not-a-list", "no-score", "unknown-image", "unknown-category", "no-bbox", "negative-width"],
)
def test_malformed_predictions_raise_input_error_naming_file_and_field(predictions, field):
    with pytest.raises(InputError) as error:
        run(GT, predictions, "bbox")

    assert error.value.source == "pred.json"
    assert error.value.field == field


def test_gt_annotation_with_unknown_image_raises_input_error():
    gt = coco_gt({1: [(1, [10, 10, 40, 30])]})
    gt["annotations"][0]["image_id"] = 5

    with pytest.raises(InputError, match=r"gt\.json: annotations\[0\]\.image_id"):
        prepare_frame_gt(gt, "gt.json")


def truncated(mask: dict) -> dict:
    return {**mask, "counts": mask["counts"][: len(mask["counts"]) // 2]}


@pytest.mark.parametrize(
    ("predictions", "iou_type", "field"),
    [
        ([result(1, 1, [0, 0, 5, 5], score=float("nan"))], "bbox", "[0].score"),
        ([result(1, 1, [0, 0, 5, 5], score=float("nan")) for _ in range(3)], "segm", "[0].score"),
        ([result(1, 1, [0, 0, 5, 5]), result(2, 1, [0, 0, 5, 5], score=float("-inf"))], "bbox", "[1].score"),
        (
            [
                result(1, 1, [0, 0, 5, 5]),
                {**result(2, 1, [0, 0, 5, 5]), "segmentation": truncated(box_mask([0, 0, 9, 9]))},
            ],
            "segm",
            "[1].segmentation",
        ),
    ],
    ids=["nan-score", "all-nan-scores", "minus-inf-score", "truncated-rle"],
)
def test_non_finite_scores_and_malformed_masks_raise_input_error(predictions, iou_type, field):
    with pytest.raises(InputError) as error:
        run(GT, predictions, iou_type)

    assert (error.value.source, error.value.field) == ("pred.json", field)


def test_truncated_gt_mask_raises_input_error_naming_the_annotation():
    gt = coco_gt({1: [(1, [10, 10, 40, 30]), (2, [60, 50, 30, 30])]})
    gt["annotations"][1]["segmentation"] = truncated(gt["annotations"][1]["segmentation"])

    with pytest.raises(InputError, match=r"gt\.json: annotations\[1\]\.segmentation: .*truncated"):
        prepare_frame_gt(gt, "gt.json")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fifty_thousand_unused_categories_change_no_number_and_size_no_array(backend):
    big = {**GT, "categories": GT["categories"] + [{"id": c, "name": f"phrase {c}"} for c in range(10, 50_010)]}
    predictions = [*PERFECT[:2], result(2, 2, [50, 50, 10, 10], score=0.4)]

    small, large = run(GT, predictions, "segm", backend), run(big, predictions, "segm", backend)

    assert large.metrics == small.metrics
    assert large.arrays.category_ids == (1, 2)
    assert large.arrays.precision.shape[2] == 2
