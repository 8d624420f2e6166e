"""The evaluate component end to end: files on disk (and on S3), real processes, the CLI contract."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from components.evaluate import execute, flags_to_overrides
from sam3_core import storage
from sam3_core.errors import ConfigError, InputError
from tests.fixtures.masks import box_rle
from tests.fixtures.paths import REPO
from tests.fixtures.saco import SacoShape, generate

SIZE = (60, 80)  # height, width
# One video of two frames; frame t is COCO image t + 1. Category 2 has no object.
BOXES = {1: [[10, 10, 30, 20], [12, 10, 30, 20]], 2: [[50, 30, 20, 20], None]}
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "emu"}]


def rle(box: list[int] | None) -> dict | None:
    return box_rle(box, SIZE)


def frames_gt() -> dict:
    annotations: list[dict] = []
    for boxes in BOXES.values():
        for t, box in enumerate(boxes):
            if box is not None:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": t + 1,
                        "category_id": 1,
                        "bbox": box,
                        "segmentation": rle(box),
                        "area": float(box[2] * box[3]),
                        "iscrowd": 0,
                    }
                )
    return {
        "images": [{"id": t + 1, "height": SIZE[0], "width": SIZE[1]} for t in range(2)],
        "annotations": annotations,
        "categories": CATEGORIES,
    }


def video_gt() -> dict:
    return {
        "videos": [{"id": 1, "height": SIZE[0], "width": SIZE[1], "length": 2, "file_names": ["v/0.jpg", "v/1.jpg"]}],
        "annotations": [
            {
                "id": track,
                "video_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "bboxes": boxes,
                "segmentations": [rle(b) for b in boxes],
                "areas": [None if b is None else b[2] * b[3] for b in boxes],
            }
            for track, boxes in BOXES.items()
        ],
        "categories": CATEGORIES,
    }


def perfect_frame_predictions() -> list[dict]:
    return [
        {
            "image_id": a["image_id"],
            "category_id": 1,
            "bbox": a["bbox"],
            "segmentation": a["segmentation"],
            "score": 0.9,
        }
        for a in frames_gt()["annotations"]
    ]


def perfect_video_predictions() -> list[dict]:
    return [
        {"video_id": 1, "category_id": 1, "score": 0.9, "bboxes": a["bboxes"], "segmentations": a["segmentations"]}
        for a in video_gt()["annotations"]
    ]


def write(path: Path, obj: object) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return str(path)


def predictions_folder(root: Path) -> str:
    """The predict step's output: three files in one folder."""
    write(root / "coco_predictions_bbox.json", perfect_frame_predictions())
    write(root / "coco_predictions_segm.json", perfect_frame_predictions())
    write(root / "video_predictions.json", perfect_video_predictions())
    return str(root)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "components.evaluate", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


FRAME_METRICS = {
    f"{t}_{s}"
    for t in ("bbox", "segm")
    for s in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
}
VIDEO_METRICS = {f"video_{k}_mAP_{i}" for k in ("bbox", "mask") for i in ("50_95", "50", "75")}


@pytest.mark.integration
def test_cli_prints_one_json_line_and_publishes_metrics_table_and_plot(tmp_path):
    gt = write(tmp_path / "gt.json", frames_gt())
    predictions = write(tmp_path / "pred.json", perfect_frame_predictions())
    output = tmp_path / "eval" / "metrics.json"

    done = run_cli("--gt", gt, "--predictions", predictions, "--output", str(output), cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    printed = json.loads(lines[0])
    assert printed["metrics_uri"] == str(output)
    assert printed["metrics"] == json.loads(output.read_text())
    assert set(printed["metrics"]) == FRAME_METRICS
    assert printed["metrics"]["segm_AP"] == pytest.approx(1.0)
    assert sorted(p.name for p in output.parent.iterdir()) == [
        "evaluate_settings.json",
        "metrics.json",
        "per_category.csv",
        "per_category.md",
        "pr_curves.png",
    ]
    assert (output.parent / "pr_curves.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.integration
def test_malformed_predictions_exit_non_zero_name_the_field_and_write_nothing(tmp_path):
    gt = write(tmp_path / "gt.json", frames_gt())
    bad = [{k: v for k, v in p.items() if k != "score"} for p in perfect_frame_predictions()]
    predictions = write(tmp_path / "pred.json", bad)
    output = tmp_path / "eval" / "metrics.json"

    done = run_cli("--gt", gt, "--predictions", predictions, "--output", str(output), cwd=tmp_path)

    assert done.returncode != 0
    assert f"{predictions}: [0].score: missing" in done.stderr.strip().splitlines()[-1]
    assert not output.parent.exists()


@pytest.mark.integration
def test_hydra_overrides_give_the_same_result_as_flags(tmp_path):
    gt = write(tmp_path / "gt.json", frames_gt())
    predictions = write(tmp_path / "pred.json", perfect_frame_predictions())

    by_flags = execute(["--gt", gt, "--predictions", predictions, "--output", str(tmp_path / "a" / "metrics.json")])
    by_overrides = execute([f"gt={gt}", f"predictions={predictions}", f"output={tmp_path / 'b' / 'metrics.json'}"])

    assert by_flags["metrics"] == by_overrides["metrics"]


def test_flag_values_with_spaces_commas_and_quotes_reach_the_config_intact():
    path = "/data/my run,v2/it's=ok\\x.json"

    overrides = flags_to_overrides(["--gt", path, "backend=pycocotools"])

    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(overrides)}
    assert parsed == {"gt": path, "backend": "pycocotools"}


def test_video_gt_with_predictions_folder_and_frames_gt_scores_videos_and_frames(tmp_path):
    folder = predictions_folder(tmp_path / "predictions")

    outputs = execute(
        [
            "--gt",
            write(tmp_path / "val.json", video_gt()),
            "--predictions",
            folder,
            "--frames-gt",
            write(tmp_path / "val_frames_coco.json", frames_gt()),
            "--output",
            str(tmp_path / "eval" / "metrics.json"),
        ]
    )

    assert set(outputs["metrics"]) == FRAME_METRICS | VIDEO_METRICS
    assert outputs["metrics"]["video_mask_mAP_50_95"] == pytest.approx(1.0)
    assert outputs["metrics"]["bbox_AP"] == pytest.approx(1.0)


def test_video_gt_with_predictions_folder_and_no_frames_gt_scores_videos_only(tmp_path):
    folder = predictions_folder(tmp_path / "predictions")

    outputs = execute(
        [
            "--gt",
            write(tmp_path / "val.json", video_gt()),
            "--predictions",
            folder,
            "--output",
            str(tmp_path / "eval" / "metrics.json"),
        ]
    )

    assert set(outputs["metrics"]) == VIDEO_METRICS


def test_coco_gt_with_predictions_folder_reads_bbox_and_segm_files(tmp_path):
    folder = predictions_folder(tmp_path / "predictions")
    write(tmp_path / "predictions" / "coco_predictions_segm.json", [])

    metrics = execute(
        [
            "--gt",
            write(tmp_path / "gt.json", frames_gt()),
            "--predictions",
            folder,
            "--output",
            str(tmp_path / "eval" / "metrics.json"),
        ]
    )["metrics"]

    assert metrics["bbox_AP"] == pytest.approx(1.0)
    assert metrics["segm_AP"] == 0.0


def test_per_category_table_lists_the_categories_with_gt_or_predictions_blank_where_no_gt(tmp_path):
    predictions = [
        *perfect_frame_predictions(),
        {"image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "segmentation": rle([0, 0, 5, 5]), "score": 0.5},
    ]
    execute(
        [
            "--gt",
            write(tmp_path / "gt.json", frames_gt()),
            "--predictions",
            write(tmp_path / "pred.json", predictions),
            "--output",
            str(tmp_path / "eval" / "metrics.json"),
        ]
    )

    with open(tmp_path / "eval" / "per_category.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["category_id"], r["name"]) for r in rows] == [("1", "cat"), ("3", "emu")]  # "dog": neither
    assert float(rows[0]["segm AP"]) == pytest.approx(1.0)
    assert rows[1]["bbox AP"] == ""
    assert "| 3 | emu | n/a |" in (tmp_path / "eval" / "per_category.md").read_text()


def test_requested_kind_that_contradicts_the_gt_file_is_input_error(tmp_path):
    gt = write(tmp_path / "val.json", video_gt())

    with pytest.raises(InputError, match="kind=coco was requested but this is a video GT file"):
        execute(
            [
                "--gt",
                gt,
                "--predictions",
                write(tmp_path / "p.json", []),
                "--output",
                str(tmp_path / "m.json"),
                "kind=coco",
            ]
        )


def test_gt_that_is_neither_video_nor_coco_is_input_error(tmp_path):
    gt = write(tmp_path / "gt.json", {"annotations": []})

    with pytest.raises(InputError, match=r"gt\.json: \(root\): neither 'videos'"):
        execute(["--gt", gt, "--predictions", write(tmp_path / "p.json", []), "--output", str(tmp_path / "m.json")])


def test_missing_required_input_is_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="predictions is required"):
        execute(["--gt", write(tmp_path / "gt.json", frames_gt()), "--output", str(tmp_path / "m.json")])


def test_unknown_backend_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"evaluate\.backend='detectron': must be one of"):
        execute(
            [
                "--gt",
                write(tmp_path / "gt.json", frames_gt()),
                "--predictions",
                write(tmp_path / "p.json", []),
                "--output",
                str(tmp_path / "m.json"),
                "backend=detectron",
            ]
        )


def test_reads_inputs_from_s3_and_publishes_there(s3_bucket, tmp_path):
    storage.write_json(f"{s3_bucket}/data/val.json", video_gt())
    for name, obj in (
        ("video_predictions.json", perfect_video_predictions()),
        ("coco_predictions_bbox.json", []),
        ("coco_predictions_segm.json", []),
    ):
        storage.write_json(f"{s3_bucket}/run/predictions/{name}", obj)

    outputs = execute(
        [
            f"gt={s3_bucket}/data/val.json",
            f"predictions={s3_bucket}/run/predictions",
            f"output={s3_bucket}/run/eval/metrics.json",
        ]
    )

    assert outputs["metrics_uri"] == f"{s3_bucket}/run/eval/metrics.json"
    assert storage.read_json(outputs["metrics_uri"]) == outputs["metrics"]
    assert storage.list_files(f"{s3_bucket}/run/eval") == [
        "evaluate_settings.json",
        "metrics.json",
        "per_category.csv",
        "per_category.md",
        "pr_curves.png",
    ]


def test_sa_co_gt_with_sam3_predictions_publishes_every_family_the_per_pair_results_and_tracks_them(tmp_path):
    gt, predictions = generate(SacoShape(videos=2, frames=4, seed=21))
    output = tmp_path / "eval" / "metrics.json"

    outputs = execute(
        [
            "--gt",
            write(tmp_path / "gt.json", gt),
            "--predictions",
            write(tmp_path / "p.json", predictions),
            "--output",
            str(output),
            "mlflow.pipeline_run_id=saco-cli",
            "workers=1",
        ]
    )

    metrics = outputs["metrics"]
    assert {
        "video_mask_mAP_50_95",
        "video_bbox_phrase_ap_50",
        "video_mask_teta",
        "video_mask_all_phrase_HOTA",
        "video_bbox_all_phrase_AssA",
        "video_mask_demo_cgf1_micro_50_95",
        "video_mask_demo_ilmcc_50",
    } <= set(metrics)
    assert json.loads(output.read_text()) == metrics
    assert sorted(p.name for p in output.parent.iterdir()) == [
        "evaluate_settings.json",
        "metrics.json",
        "per_category.csv",
        "per_category.md",
        "pr_curves.png",
        "video_np_results.json",
    ]
    rows = json.loads((output.parent / "video_np_results.json").read_text())
    asked = {(p["video_id"], p["category_id"]) for p in gt["video_np_pairs"]}
    assert asked <= {(r["video_id"], r["category_id"]) for r in rows}
    with open(output.parent / "per_category.csv", newline="") as handle:
        listed = {int(r["category_id"]) for r in csv.DictReader(handle)}
    assert listed == {a["category_id"] for a in gt["annotations"]} | {p["category_id"] for p in predictions}

    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name("sam3pipe")
    query = "tags.`sam3pipe.pipeline_run_id` = 'saco-cli' and tags.`sam3pipe.component` = 'evaluate'"
    run = client.search_runs([experiment.experiment_id], query)[0]
    assert run.data.metrics["eval/video_mask_demo_cgf1_micro_50_95"] == pytest.approx(
        metrics["video_mask_demo_cgf1_micro_50_95"]
    )
    assert len([k for k in run.data.metrics if k.startswith("eval/")]) == len(metrics)
    assert "video_np_results.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_yt_vis_gt_scores_class_map_only_unless_metrics_asks_for_more(tmp_path):
    gt, predictions = generate(SacoShape(videos=2, frames=4, seed=22))
    gt.pop("video_np_pairs")
    args = [
        "--gt",
        write(tmp_path / "gt.json", gt),
        "--predictions",
        write(tmp_path / "p.json", predictions),
        "mlflow.enabled=false",
        "workers=1",
    ]

    default = execute([*args, "--output", str(tmp_path / "a" / "metrics.json")])["metrics"]
    chosen = execute([*args, "--output", str(tmp_path / "b" / "metrics.json"), "metrics=[hota,phrase_ap]"])["metrics"]

    assert {k.rsplit("_mAP", 1)[0] for k in default} == {"video_bbox", "video_mask"}
    assert not (tmp_path / "a" / "video_np_results.json").exists()
    assert any("_all_phrase_" in k for k in chosen) and any("_phrase_ap_" in k for k in chosen)
    assert not any("_mAP_" in k for k in chosen)


@pytest.mark.integration
def test_evaluation_with_tracking_off_never_imports_mlflow(tmp_path):
    """Importing mlflow takes about a second: a short evaluation that tracks nothing must not pay it."""
    gt, predictions = generate(SacoShape(videos=1, frames=3, seed=23))
    args = ["--gt", write(tmp_path / "gt.json", gt), "--predictions", write(tmp_path / "p.json", predictions)]
    args += ["--output", str(tmp_path / "eval" / "metrics.json"), "mlflow.enabled=false", "workers=1"]
    probe = (
        "import atexit, runpy, sys\n"
        "atexit.register(lambda: print('mlflow imported:', 'mlflow' in sys.modules))\n"
        f"sys.argv = ['evaluate', *{args!r}]\n"
        "runpy.run_module('components.evaluate', run_name='__main__')\n"
    )

    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "mlflow imported: False"


def vos_predictions(gt: dict, skip: int) -> list[dict]:
    """What inference=vos writes: one masklet per GT object, naming it by gt_id (here a perfect copy),
    for every object but annotations[skip]."""
    return [
        {
            "video_id": a["video_id"],
            "category_id": a["category_id"],
            "score": 1.0,
            "gt_id": a["id"],
            "bboxes": a["bboxes"],
            "segmentations": a["segmentations"],
            "areas": a["areas"],
        }
        for i, a in enumerate(gt["annotations"])
        if i != skip
    ]


@pytest.mark.integration
def test_vos_predictions_get_davis_j_and_f_and_a_per_object_table_from_the_cli(tmp_path):
    gt, _ = generate(SacoShape(videos=2, frames=6, seed=24))
    gt.pop("video_np_pairs")
    skipped = gt["annotations"][1]
    folder = tmp_path / "predictions"
    write(folder / "video_predictions.json", vos_predictions(gt, skip=1))
    output = tmp_path / "eval" / "metrics.json"

    done = run_cli(
        "--gt",
        write(tmp_path / "dataset" / "val.json", gt),
        "--predictions",
        str(folder),
        "--output",
        str(output),
        "mlflow.enabled=false",
        cwd=tmp_path,
    )

    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout.strip().splitlines()[-1])["metrics"]
    assert set(metrics) == {f"vos_{m}_{s}" for m in ("J", "F") for s in ("mean", "recall", "decay")} | {"vos_JF_mean"}
    assert 0 < metrics["vos_JF_mean"] < 1
    assert json.loads(output.read_text()) == metrics
    assert "vos_per_object.csv" in {p.name for p in output.parent.iterdir()}
    with open(output.parent / "vos_per_object.csv", newline="") as handle:
        rows = {int(r["object_id"]): r for r in csv.DictReader(handle)}
    assert set(rows) == {a["id"] for a in gt["annotations"]}
    assert rows[skipped["id"]]["predicted"] == "0" and float(rows[skipped["id"]]["JF_mean"]) < 1
    assert {float(r["JF_mean"]) for k, r in rows.items() if k != skipped["id"]} == {1.0}


def test_a_vos_prediction_naming_no_gt_object_is_one_error_naming_the_field(tmp_path, caplog, capsys):
    from components.evaluate import main

    gt, _ = generate(SacoShape(videos=1, frames=5, seed=25))
    predictions = vos_predictions(gt, skip=-1)
    predictions[0]["gt_id"] = 10_000
    output = tmp_path / "eval" / "metrics.json"
    pred_path = write(tmp_path / "p.json", predictions)
    caplog.set_level(logging.WARNING)

    args = ["--gt", write(tmp_path / "val.json", gt), "--predictions", pred_path, "--output", str(output)]

    code = main([*args, "mlflow.enabled=false"])

    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"error: {pred_path}: [0].gt_id: 10000 is not the id of a GT annotation of video 1"]
    assert capsys.readouterr().out == ""
    assert not output.parent.exists()
