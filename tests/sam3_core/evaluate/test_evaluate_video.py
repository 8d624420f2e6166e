"""Video mAP on masklets: hand-made cases, and parity with SAM3's own YT-VIS evaluator."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from sam3_core.errors import InputError
from sam3_core.evaluate.overlaps import VideoOverlaps, box_track_iou
from sam3_core.evaluate.video import evaluate_videos
from sam3_core.evaluate.videodata import read_video_set

SIZE = (64, 96)  # height, width


def box_mask(box: list[float] | None, size: tuple[int, int] = SIZE) -> dict | None:
    """Compressed RLE of a box rounded to pixels (None stays None: the object is absent)."""
    if box is None:
        return None
    mask = np.zeros(size, dtype=np.uint8, order="F")
    x, y, w, h = (round(v) for v in box)
    mask[y : y + h, x : x + w] = 1
    rle = mask_utils.encode(mask)
    return {"size": list(size), "counts": rle["counts"].decode("ascii")}


def gt_track(track_id: int, video_id: int, category_id: int, boxes: list, iscrowd: int = 0) -> dict:
    masks = [box_mask(b) for b in boxes]
    return {
        "id": track_id,
        "video_id": video_id,
        "category_id": category_id,
        "iscrowd": iscrowd,
        "bboxes": boxes,
        "segmentations": masks,
        "areas": [None if m is None else float(mask_utils.area(m)) for m in masks],
    }


def pred_track(video_id: int, category_id: int, boxes: list, score: float = 0.9) -> dict:
    return {
        "video_id": video_id,
        "category_id": category_id,
        "score": score,
        "bboxes": boxes,
        "segmentations": [box_mask(b) for b in boxes],
    }


def video_gt(annotations: list[dict], n_videos: int = 2, n_frames: int = 3, n_categories: int = 2) -> dict:
    return {
        "videos": [
            {
                "id": v,
                "height": SIZE[0],
                "width": SIZE[1],
                "length": n_frames,
                "file_names": [f"v{v}/{t:05d}.jpg" for t in range(n_frames)],
            }
            for v in range(1, n_videos + 1)
        ],
        "annotations": annotations,
        "categories": [{"id": c, "name": f"class{c}"} for c in range(1, n_categories + 1)],
    }


def metrics_of(gt: dict, predictions: list, iou_types=("bbox", "segm")) -> dict[str, float]:
    evaluations = evaluate_videos(
        gt, predictions, list(iou_types), max_dets=[1, 10, 100], gt_source="gt.json", predictions_source="pred.json"
    )
    return {name: value for e in evaluations for name, value in e.metrics.items()}


TRACKS = [
    gt_track(1, 1, 1, [[10, 10, 20, 20], [12, 10, 20, 20], None]),
    gt_track(2, 1, 2, [[50, 30, 30, 20], [50, 32, 30, 20], [50, 34, 30, 20]]),
    gt_track(3, 2, 1, [None, [5, 5, 40, 40], [6, 6, 40, 40]]),
]


def test_perfect_predictions_score_one_for_boxes_and_masks():
    predictions = [pred_track(t["video_id"], t["category_id"], t["bboxes"]) for t in TRACKS]

    metrics = metrics_of(video_gt(TRACKS), predictions)

    assert metrics == pytest.approx(dict.fromkeys(metrics, 1.0), abs=1e-12)
    assert set(metrics) == {f"video_{kind}_mAP_{iou}" for kind in ("bbox", "mask") for iou in ("50_95", "50", "75")}


def test_track_iou_sums_intersections_and_unions_over_frames_with_null_as_empty():
    # Frame 0 overlaps fully (400 px); frame 1 is missing from the prediction (GT 200 px):
    # IoU = 400 / (400 + 200) = 2/3, not the mean of per-frame IoUs (1/2).
    gt = video_gt([gt_track(1, 1, 1, [[0, 0, 20, 20], [0, 0, 10, 20]])], n_videos=1, n_frames=2, n_categories=1)
    data = read_video_set(gt, [pred_track(1, 1, [[0, 0, 20, 20], None])], gt_source="gt", predictions_source="pred")

    assert box_track_iou(data.predictions, data.gt)[0, 0] == pytest.approx(2 / 3)
    assert VideoOverlaps(data.predictions, data.gt, 2).track_iou([0], [0])[0, 0] == pytest.approx(2 / 3)


def test_two_thirds_track_iou_matches_at_thresholds_up_to_0_65():
    gt = video_gt([gt_track(1, 1, 1, [[0, 0, 20, 20], [0, 0, 10, 20], None])], n_videos=1, n_categories=1)

    metrics = metrics_of(gt, [pred_track(1, 1, [[0, 0, 20, 20], None, None])])

    assert metrics["video_bbox_mAP_50"] == pytest.approx(1.0)
    assert metrics["video_mask_mAP_75"] == 0.0
    assert metrics["video_mask_mAP_50_95"] == pytest.approx(0.4)


def test_empty_predictions_score_zero():
    metrics = metrics_of(video_gt(TRACKS), [])

    assert metrics == dict.fromkeys(metrics, 0.0)


def test_prediction_on_a_crowd_track_is_neither_hit_nor_false_positive():
    crowd = gt_track(9, 1, 1, [[60, 30, 20, 20], [60, 30, 20, 20], [60, 30, 20, 20]], iscrowd=1)
    gt = video_gt([TRACKS[0], crowd], n_videos=1, n_categories=1)
    predictions = [pred_track(1, 1, crowd["bboxes"], score=0.99), pred_track(1, 1, TRACKS[0]["bboxes"], score=0.5)]

    assert metrics_of(gt, predictions)["video_bbox_mAP_50_95"] == pytest.approx(1.0)


def test_higher_scored_false_positive_halves_precision():
    gt = video_gt([TRACKS[0]], n_videos=1, n_categories=1)
    far = [[70, 40, 10, 10]] * 3
    predictions = [pred_track(1, 1, far, score=0.99), pred_track(1, 1, TRACKS[0]["bboxes"], score=0.5)]

    # precision is 1/2 at the only recall reached, for every threshold
    assert metrics_of(gt, predictions)["video_bbox_mAP_50_95"] == pytest.approx(0.5, abs=1e-6)


def test_category_without_gt_is_left_out_of_the_mean():
    gt = video_gt([TRACKS[0]], n_videos=1, n_categories=2)
    predictions = [pred_track(1, 1, TRACKS[0]["bboxes"]), pred_track(1, 2, [[0, 0, 5, 5]] * 3, score=0.99)]

    evaluation = evaluate_videos(
        gt, predictions, ["bbox"], max_dets=[1, 10, 100], gt_source="gt.json", predictions_source="pred.json"
    )[0]

    assert evaluation.metrics["video_bbox_mAP_50_95"] == pytest.approx(1.0)
    assert evaluation.arrays.per_category()[2]["AP"] == -1.0


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda p: p.__setitem__(0, {**p[0], "video_id": 77}), "[0].video_id"),
        (lambda p: p.__setitem__(0, {**p[0], "category_id": 5}), "[0].category_id"),
        (lambda p: p[0].pop("score"), "[0].score"),
        (lambda p: p[0]["bboxes"].pop(), "[0].bboxes"),
        (
            lambda p: p[0]["segmentations"].__setitem__(0, box_mask([0, 0, 4, 4], size=(10, 10))),
            "[0].segmentations[0].size",
        ),
    ],
    ids=["unknown-video", "unknown-category", "no-score", "wrong-frame-count", "wrong-mask-size"],
)
def test_malformed_predictions_raise_input_error_naming_file_and_field(mutate, field):
    predictions = [pred_track(t["video_id"], t["category_id"], list(t["bboxes"])) for t in TRACKS]
    mutate(predictions)

    with pytest.raises(InputError) as error:
        metrics_of(video_gt(TRACKS), predictions)

    assert (error.value.source, error.value.field) == ("pred.json", field)


def test_predictions_that_are_not_a_list_raise_input_error():
    with pytest.raises(InputError, match=r"pred\.json: \(root\): expected a list"):
        metrics_of(video_gt(TRACKS), {"annotations": []})


def synthetic_case(seed: int, n_videos: int = 4, n_categories: int = 3, n_frames: int = 6) -> tuple[dict, list]:
    """Random tracks with gaps, crowd tracks, jittered and spurious predictions, varied sizes."""
    rng = np.random.default_rng(seed)
    size = (200, 300)
    annotations, predictions = [], []
    for video_id in range(1, n_videos + 1):
        for category_id in range(1, n_categories + 1):
            for _ in range(rng.integers(0, 3)):
                w, h = rng.uniform(4, 180), rng.uniform(4, 120)
                x, y = rng.uniform(0, size[1] - w - n_frames), rng.uniform(0, size[0] - h)
                boxes = [None if (t and rng.random() < 0.2) else [x + t, y, w, h] for t in range(n_frames)]
                masks = [box_mask(b, size) for b in boxes]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "video_id": video_id,
                        "category_id": category_id,
                        "iscrowd": int(rng.random() < 0.1),
                        "bboxes": boxes,
                        "segmentations": masks,
                        "areas": [None if m is None else float(mask_utils.area(m)) for m in masks],
                    }
                )
                for _ in range(rng.integers(0, 3)):
                    dx, dy, sx, sy = rng.normal(0, 2), rng.normal(0, 2), rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1)
                    guess = [
                        None
                        if b is None or rng.random() < 0.1
                        else [
                            min(max(b[0] + dx, 0), size[1] - 2),
                            min(max(b[1] + dy, 0), size[0] - 2),
                            b[2] * sx,
                            b[3] * sy,
                        ]
                        for b in boxes
                    ]
                    predictions.append(
                        {
                            "video_id": video_id,
                            "category_id": category_id,
                            "score": float(rng.random()),
                            "bboxes": guess,
                            "segmentations": [box_mask(b, size) for b in guess],
                        }
                    )
            if rng.random() < 0.4:
                box = [rng.uniform(0, 150), rng.uniform(0, 100), rng.uniform(4, 60), rng.uniform(4, 60)]
                predictions.append(
                    {
                        "video_id": video_id,
                        "category_id": category_id,
                        "score": float(rng.random()),
                        "bboxes": [box] * n_frames,
                        "segmentations": [box_mask(box, size)] * n_frames,
                    }
                )
    videos = [
        {
            "id": v,
            "height": size[0],
            "width": size[1],
            "length": n_frames,
            "file_names": [f"v{v}/{t}.jpg" for t in range(n_frames)],
        }
        for v in range(1, n_videos + 1)
    ]
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, n_categories + 2)]
    return {"videos": videos, "annotations": annotations, "categories": categories}, predictions


def sam3_reference(gt: dict, predictions: list, tmp_path, monkeypatch) -> dict[str, float]:
    """SAM3's YTVISPredFileEvaluator on the same files, plus the AP50/AP75 its COCOeval computed."""
    from sam3.eval import saco_veval_evaluators
    from sam3.eval.ytvis_eval import YTVISeval

    stats: dict[str, np.ndarray] = {}

    class RecordingYTVISeval(YTVISeval):
        def summarize(self) -> None:
            super().summarize()
            stats[self.params.iouType] = self.stats

    monkeypatch.setattr(saco_veval_evaluators, "YTVISeval", RecordingYTVISeval)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(predictions))
    with contextlib.redirect_stdout(io.StringIO()):
        results, _ = saco_veval_evaluators.YTVISPredFileEvaluator(str(tmp_path / "gt.json")).evaluate(
            str(tmp_path / "pred.json")
        )
    for iou_type, kind in (("bbox", "bbox"), ("segm", "mask")):
        results[f"video_{kind}_mAP_50"] = stats[iou_type][1]
        results[f"video_{kind}_mAP_75"] = stats[iou_type][2]
    return {name: float(value) for name, value in results.items()}


@pytest.mark.filterwarnings("ignore:Numba not found")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sam3_ytvis_evaluator(seed, tmp_path, monkeypatch):
    gt, predictions = synthetic_case(seed)

    reference = sam3_reference(gt, predictions, tmp_path, monkeypatch)
    ours = metrics_of(gt, predictions)

    assert set(ours) == set(reference)
    assert ours == pytest.approx(reference, abs=1e-9)
    assert 0.05 < ours["video_mask_mAP_50_95"] < 0.95
