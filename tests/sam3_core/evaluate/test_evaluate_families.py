"""The video families on hand-worked cases, the cost of a large vocabulary, processes, and bad input."""

from __future__ import annotations

import math

import pytest

from sam3_core.errors import InputError
from sam3_core.evaluate import suite as suite_module
from sam3_core.evaluate.families import CLASSES, FAMILIES, SAM3_SUITE
from sam3_core.evaluate.family import FamilyResult, VideoFamily
from sam3_core.evaluate.report import PR_PLOT, TABLE_CSV, TABLE_MD, VIDEO_NP_RESULTS, EvaluateConfig, video_families
from sam3_core.evaluate.suite import SuiteSettings, evaluate_suite
from sam3_core.evaluate.videodata import read_video_set
from tests.fixtures.masks import box_rle
from tests.fixtures.saco import SacoShape, generate

SIZE = (40, 60)  # height, width
FRAMES = 2


def rle(box: list[int] | None) -> dict | None:
    return box_rle(box, SIZE)


def masklet(category: int, box: list[int], *, score: float | None = None, ann_id: int | None = None) -> dict:
    boxes = [box] * FRAMES
    out = {
        "video_id": 1,
        "category_id": category,
        "bboxes": boxes,
        "segmentations": [rle(b) for b in boxes],
        "areas": [b[2] * b[3] for b in boxes],
    }
    if score is not None:
        out["score"] = score
    if ann_id is not None:
        out.update(id=ann_id, iscrowd=0)
    return out


def saco_gt(annotations: list[dict], asked: list[int], categories: int = 6) -> dict:
    return {
        "videos": [{"id": 1, "height": SIZE[0], "width": SIZE[1], "file_names": [f"v/{t}.jpg" for t in range(FRAMES)]}],
        "categories": [{"id": c, "name": f"phrase {c}"} for c in range(1, categories + 1)],
        "annotations": annotations,
        "video_np_pairs": [{"id": i, "video_id": 1, "category_id": c} for i, c in enumerate(asked)],
    }


def suite(gt: dict, predictions: list, families=SAM3_SUITE, **settings):
    data = read_video_set(gt, predictions, gt_source="gt.json", predictions_source="pred.json")
    return evaluate_suite(data, SuiteSettings(families=tuple(families), workers=1, **settings))


def smoothed(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    """precision, recall, F1 with CGF1Eval's 1e-4 smoothing in each denominator."""
    precision, recall = tp / (tp + fp + 1e-4), tp / (tp + fn + 1e-4)
    return precision, recall, 2 * precision * recall / (precision + recall + 1e-4)


# Phrase 1: two GT, one found exactly and one false positive far away; phrase 2: found exactly;
# phrase 3: GT but only a prediction below 0.5; phrase 4: asked negative with a false positive;
# phrase 5: asked negative, nothing predicted. Every IoU is 1 or 0, so all thresholds agree.
A1, A2, E1, C1 = [2, 2, 10, 10], [30, 5, 12, 12], [5, 25, 14, 10], [40, 25, 10, 10]
HAND_GT = saco_gt(
    [masklet(1, A1, ann_id=1), masklet(1, A2, ann_id=2), masklet(2, E1, ann_id=3), masklet(3, C1, ann_id=4)],
    asked=[1, 2, 3, 4, 5],
)
HAND_PRED = [
    masklet(1, A1, score=0.9),
    masklet(1, [48, 30, 8, 8], score=0.8),
    masklet(2, E1, score=0.9),
    masklet(3, C1, score=0.3),
    masklet(4, [20, 20, 6, 6], score=0.7),
]


def test_cgf1_family_on_a_hand_worked_set_follows_upstreams_definitions():
    metrics = suite(HAND_GT, HAND_PRED, ["cgf1"], iou_types=("segm",)).metrics

    precision, recall, f1 = smoothed(tp=2, fp=2, fn=2)  # the FP on negative phrase 4 counts here
    _, _, pm_f1 = smoothed(tp=2, fp=1, fn=2)  # positive pairs only: phrases 1, 2, 3
    mcc = (2 * 1 - 1 * 1) / ((3 * 3 * 2 * 2) ** 0.5 + 1e-6)  # IL: TP 1,2  FN 3  FP 4  TN 5
    f1_pair1, f1_pair2 = smoothed(1, 1, 1)[2], smoothed(1, 0, 0)[2]
    expected = {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "positive_micro_f1": pm_f1,
        "ilmcc": mcc,
        "cgf1_micro": pm_f1 * mcc,
        "pmf1": (f1_pair1 + f1_pair2) / 2,
        "cgf1": (f1_pair1 + f1_pair2) / 2 * mcc,
    }
    for name, value in expected.items():
        for suffix in ("50_95", "50", "75"):
            assert metrics[f"video_mask_demo_{name}_{suffix}"] == pytest.approx(value, abs=1e-12), (name, suffix)
    # pairs without predictions (phrase 3) count in the w0dt macro F1
    assert metrics["video_mask_demo_pmf1_w0dt_50_95"] == pytest.approx((f1_pair1 + f1_pair2 + 0) / 3, abs=1e-12)
    assert metrics["video_mask_demo_cgf1_w0dt_50_95"] == pytest.approx((f1_pair1 + f1_pair2) / 3 * mcc, abs=1e-12)


def test_cgf1_per_pair_results_count_each_phrase_including_the_negatives():
    rows = {r["category_id"]: r for r in suite(HAND_GT, HAND_PRED, ["cgf1"], iou_types=("bbox",)).video_np_results}

    assert sorted(rows) == [1, 2, 3, 4, 5]
    assert (rows[1]["bbox_TP_50"], rows[1]["bbox_FP_50"], rows[1]["bbox_FN_50"], rows[1]["bbox_F1_50"]) == (
        1.0,
        1.0,
        1.0,
        0.5,
    )
    assert rows[3]["bbox_FN_75"] == 1.0 and rows[4]["bbox_FP_50_95"] == 1.0
    assert rows[5]["bbox_F1_50_95"] == 1.0  # a true negative: nothing to find, nothing found


def test_without_video_np_pairs_cgf1_reports_only_precision_recall_f1():
    gt = {k: v for k, v in HAND_GT.items() if k != "video_np_pairs"}

    metrics = suite(gt, HAND_PRED, ["cgf1"], iou_types=("bbox",)).metrics

    assert sorted({k.rsplit("_", 2)[0] if k.endswith("50_95") else k.rsplit("_", 1)[0] for k in metrics}) == [
        "video_bbox_demo_f1",
        "video_bbox_demo_precision",
        "video_bbox_demo_recall",
    ]


def test_perfect_predictions_score_one_in_hota_and_one_hundred_in_teta():
    gt = saco_gt([masklet(1, A1, ann_id=1), masklet(1, A2, ann_id=2), masklet(2, E1, ann_id=3)], asked=[1, 2, 3])
    predictions = [masklet(a["category_id"], a["bboxes"][0], score=0.9) for a in gt["annotations"]]

    metrics = suite(gt, predictions, ["hota", "teta"]).metrics

    for kind in ("bbox", "mask"):
        for name in ("HOTA", "DetA", "AssA", "LocA"):
            assert metrics[f"video_{kind}_all_phrase_{name}"] == pytest.approx(1.0)
    assert {k: v for k, v in metrics.items() if k.startswith("video_mask_") and "phrase" not in k} == dict.fromkeys(
        [
            f"video_mask_{n}"
            for n in (
                "teta",
                "loc_a",
                "assoc_a",
                "cls_a",
                "loc_re",
                "loc_pr",
                "assoc_re",
                "assoc_pr",
                "cls_re",
                "cls_pr",
            )
        ],
        100.0,
    )


def test_a_score_of_exactly_the_threshold_counts_for_cgf1_but_not_for_hota():
    gt = saco_gt([masklet(1, A1, ann_id=1)], asked=[1])

    metrics = suite(gt, [masklet(1, A1, score=0.5)], ["cgf1", "hota"], iou_types=("bbox",)).metrics

    assert metrics["video_bbox_demo_f1_50"] == pytest.approx(1.0, abs=1e-3)
    assert metrics["video_bbox_all_phrase_DetRe"] == 0.0


def test_a_hundred_thousand_unused_phrases_change_no_number_and_size_nothing():
    gt, predictions = generate(SacoShape(videos=2, frames=4, categories=30, seed=5))
    big = {**gt, "categories": gt["categories"] + [{"id": c, "name": f"unused {c}"} for c in range(1000, 101_000)]}

    small_result, big_result = suite(gt, predictions), suite(big, predictions)

    assert big_result.metrics == pytest.approx(small_result.metrics, abs=0, nan_ok=True)
    assert big_result.video_np_results == small_result.video_np_results
    used = {a["category_id"] for a in gt["annotations"]} | {p["category_id"] for p in predictions}
    class_map = next(e for e in big_result.evaluations if e.name == "video_mask")
    assert set(class_map.arrays.category_ids) == used
    assert class_map.arrays.precision.shape[2] == len(used)


def test_worker_processes_give_the_same_numbers_as_one_process():
    gt, predictions = generate(SacoShape(videos=3, frames=5, seed=8))

    one = suite(gt, predictions)
    data = read_video_set(gt, predictions, gt_source="gt.json", predictions_source="pred.json")
    two = evaluate_suite(data, SuiteSettings(families=SAM3_SUITE, workers=2))

    assert two.metrics == one.metrics
    assert two.video_np_results == one.video_np_results


def test_sa_co_gt_defaults_to_sam3s_suite_and_yt_vis_gt_to_class_map():
    def parsed(gt: dict):
        return read_video_set(gt, HAND_PRED, gt_source="gt.json", predictions_source="pred.json")

    yt_vis = {k: v for k, v in HAND_GT.items() if k != "video_np_pairs"}

    assert video_families(EvaluateConfig(), parsed(HAND_GT)) == SAM3_SUITE
    assert video_families(EvaluateConfig(), parsed(yt_vis)) == ("map",)
    assert video_families(EvaluateConfig(metrics=["hota"]), parsed(HAND_GT)) == ("hota",)


def test_registered_families_are_video_families_with_unique_names_and_files():
    files = [name for cls in CLASSES for name in cls.files]

    assert all(issubclass(cls, VideoFamily) for cls in CLASSES)
    assert FAMILIES == ("map", "phrase_ap", "teta", "hota", "cgf1", "vos")
    assert len(set(files)) == len(files)
    assert not set(files) & {TABLE_CSV, TABLE_MD, PR_PLOT, VIDEO_NP_RESULTS, "metrics.json"}


class GtFrames(VideoFamily):
    """A toy family: GT masklet-frames per video, and the video order it was reduced in."""

    name = "gt_frames"
    files = ("gt_frames.txt",)

    def evaluate_video(self, video):
        return video.video.length * len(video.gts)

    def reduce(self, data, parts):
        return FamilyResult({"gt_frames": float(sum(parts.values()))}, files={"gt_frames.txt": repr(list(parts))})


def test_a_family_added_to_the_registry_is_run_per_video_and_reduced_beside_the_others(monkeypatch):
    monkeypatch.setattr(suite_module, "CLASSES", (*CLASSES, GtFrames))
    monkeypatch.setattr(suite_module, "FAMILIES", (*FAMILIES, "gt_frames"))
    gt, predictions = generate(SacoShape(videos=3, frames=5, seed=8))

    result = suite(gt, predictions, ["gt_frames", "map"])

    assert result.metrics["gt_frames"] == 5 * len(gt["annotations"])
    assert "video_mask_mAP_50_95" in result.metrics
    assert result.files == {"gt_frames.txt": "[1, 2, 3]"}
    assert result.video_np_results is None  # neither family writes per-pair rows


def truncated(mask: dict) -> dict:
    return {**mask, "counts": mask["counts"][: len(mask["counts"]) // 2]}


@pytest.mark.parametrize(
    ("mutate", "source", "field"),
    [
        (lambda gt, p: p[1].__setitem__("score", float("nan")), "pred.json", "[1].score"),
        (lambda gt, p: [q.__setitem__("score", float("nan")) for q in p], "pred.json", "[0].score"),
        (lambda gt, p: p[2].__setitem__("score", float("inf")), "pred.json", "[2].score"),
        (
            lambda gt, p: p[0]["segmentations"].__setitem__(1, truncated(p[0]["segmentations"][1])),
            "pred.json",
            "[0].segmentations[1]",
        ),
        (
            lambda gt, p: gt["annotations"][2]["segmentations"].__setitem__(
                0, truncated(gt["annotations"][2]["segmentations"][0])
            ),
            "gt.json",
            "annotations[2].segmentations[0]",
        ),
        (
            lambda gt, p: p[3]["segmentations"].__setitem__(0, {"size": list(SIZE), "counts": [0, 5, 7]}),
            "pred.json",
            "[3].segmentations[0]",
        ),
        (
            lambda gt, p: gt["annotations"][1]["segmentations"].__setitem__(1, None),
            "gt.json",
            "annotations[1].segmentations[1]",
        ),
        (lambda gt, p: p[0].pop("segmentations"), "pred.json", "[0].segmentations"),
    ],
    ids=[
        "nan-score",
        "all-nan-scores",
        "inf-score",
        "truncated-prediction-rle",
        "truncated-gt-rle",
        "short-uncompressed-rle",
        "gt-box-without-mask-for-teta",
        "no-masks-for-segm",
    ],
)
def test_bad_values_are_input_errors_naming_file_and_field(mutate, source, field):
    gt, predictions = saco_gt(HAND_GT["annotations"], [1, 2, 3, 4, 5]), [dict(p) for p in HAND_PRED]
    gt = {**gt, "annotations": [{**a, "segmentations": list(a["segmentations"])} for a in gt["annotations"]]}
    for p in predictions:
        p["segmentations"] = list(p["segmentations"])
    mutate(gt, predictions)

    with pytest.raises(InputError) as error:
        suite(gt, predictions)

    assert (error.value.source, error.value.field) == (source, field)


@pytest.mark.timeout(60)
def test_every_mask_truncated_is_refused_at_once_instead_of_spinning():
    gt, predictions = generate(SacoShape(videos=2, frames=4, seed=9))
    for p in predictions:
        p["segmentations"] = [None if m is None else truncated(m) for m in p["segmentations"]]

    with pytest.raises(InputError, match="truncated or corrupted"):
        suite(gt, predictions)


def test_nan_free_metrics_on_a_generated_set():
    gt, predictions = generate(SacoShape(videos=2, frames=4, seed=10))

    metrics = suite(gt, predictions).metrics

    assert not [k for k, v in metrics.items() if math.isnan(v)]
