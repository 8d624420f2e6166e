"""The evaluate step: read GT and predictions, score them, publish metrics + table + PR plot.

What gets scored depends on the inputs (the GT kind is read from its keys, ``videos`` for a
YTVIS file, ``images`` for a COCO file):

- COCO GT + a predictions file: frame bbox/segm metrics from that one file.
- COCO GT + the predict step's folder: bbox from ``coco_predictions_bbox.json``, segm from
  ``coco_predictions_segm.json``.
- YTVIS GT + a predictions file: video mAP from that file.
- YTVIS GT + the predict step's folder: video mAP from ``video_predictions.json``, and frame
  metrics from the two COCO files against ``frames_gt`` when it is given.

A predictions URI that names an existing object is a file; anything else is a folder.
Everything is computed before anything is written, so bad input leaves no partial output;
``metrics.json`` is published last, beside ``per_category.csv``, ``per_category.md`` and
``pr_curves.png``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import posixpath
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from sam3_core import storage
from sam3_core.artifacts import PREDICTION_FILES
from sam3_core.errors import ConfigError, InputError
from sam3_core.evaluate.coco import (
    BACKENDS,
    IOU_TYPES,
    Evaluation,
    check_max_dets,
    evaluate_frames,
    prepare_frame_gt,
)
from sam3_core.evaluate.video import evaluate_videos
from sam3_core.tracking.settings import TrackingConfig

logger = logging.getLogger(__name__)

KINDS = ("auto", "video", "coco")
# What evaluate publishes next to metrics.json.
TABLE_CSV = "per_category.csv"
TABLE_MD = "per_category.md"
PR_PLOT = "pr_curves.png"
PLOT_IOUS = (0.5, 0.75)


@dataclass
class EvaluateConfig:
    """What to evaluate against what, and where the results go."""

    # URI of the ground truth: a YTVIS video file or a COCO frame file
    gt: str = ""
    # URI of a predictions JSON, or of the predict step's folder holding its three files
    predictions: str = ""
    # URI of metrics.json; the per-category table and the PR plot are written beside it
    output: str = ""
    # COCO frame GT, for frame metrics when gt is a video file and predictions is a folder
    frames_gt: str = ""
    # frame-level COCO backend; both give the same numbers, faster_coco_eval is faster (bench)
    backend: str = "faster_coco_eval"
    # the three max-detections limits of AR1/AR10/AR100; every AP uses the last one
    max_dets: list[int] = field(default_factory=lambda: [1, 10, 100])
    iou_types: list[str] = field(default_factory=lambda: ["bbox", "segm"])
    # "auto" reads the GT kind from its keys; "video" or "coco" insists on one
    kind: str = "auto"
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass(frozen=True)
class EvaluationReport:
    """Everything the evaluate step publishes, before it is written anywhere."""

    evaluations: list[Evaluation]
    category_names: dict[int, str]

    @property
    def metrics(self) -> dict[str, float]:
        return {name: value for e in self.evaluations for name, value in e.metrics.items()}


def check_config(cfg: EvaluateConfig) -> None:
    """Reject bad values before reading anything, naming the key to change."""
    for key in ("gt", "predictions", "output"):
        if not getattr(cfg, key):
            raise ConfigError(f"evaluate: {key} is required: pass {key}=<uri> (or --{key} <uri>)")
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"evaluate: backend must be one of {list(BACKENDS)}; got {cfg.backend!r}")
    if cfg.kind not in KINDS:
        raise ConfigError(f"evaluate: kind must be one of {list(KINDS)}; got {cfg.kind!r}")
    if not cfg.iou_types or any(t not in IOU_TYPES for t in cfg.iou_types):
        raise ConfigError(
            f"evaluate: iou_types must be a non-empty subset of {list(IOU_TYPES)}; got {list(cfg.iou_types)}"
        )
    check_max_dets(cfg.max_dets)
    if not posixpath.basename(cfg.output):
        raise ConfigError(f"evaluate: output must name the metrics file (<folder>/metrics.json); got {cfg.output!r}")
    if posixpath.basename(cfg.output) in (TABLE_CSV, TABLE_MD, PR_PLOT):
        raise ConfigError(f"evaluate: output {cfg.output!r} would collide with the table/plot written beside it")


def detect_kind(gt: Any, source: str, requested: str) -> str:
    """"video" for a YTVIS file (``videos``), "coco" for a COCO file (``images``)."""
    keys = gt if isinstance(gt, dict) else {}
    found = "video" if "videos" in keys else "coco" if "images" in keys else None
    if found is None:
        raise InputError(source, "(root)", "neither 'videos' (YTVIS video GT) nor 'images' (COCO frame GT) found")
    if requested != "auto" and requested != found:
        raise InputError(source, "(root)", f"kind={requested} was requested but this is a {found} GT file")
    return found


def _category_names(*gts: dict[str, Any]) -> dict[int, str]:
    names: dict[int, str] = {}
    for gt in reversed(gts):
        names.update({c["id"]: str(c.get("name", c["id"])) for c in gt.get("categories", []) if isinstance(c, dict)})
    return names


def _frame_evaluations(cfg: EvaluateConfig, raw_gt: Any, gt_uri: str, files: dict[str, str]) -> list[Evaluation]:
    gt = prepare_frame_gt(raw_gt, gt_uri)
    return [
        evaluate_frames(
            gt,
            storage.read_json(files[iou_type]),
            iou_type,
            backend=cfg.backend,
            max_dets=cfg.max_dets,
            predictions_source=files[iou_type],
        )
        for iou_type in cfg.iou_types
    ]


def run_evaluation(cfg: EvaluateConfig) -> EvaluationReport:
    """Read, validate and score; writes nothing."""
    check_config(cfg)
    gt = storage.read_json(cfg.gt)
    kind = detect_kind(gt, cfg.gt, cfg.kind)
    is_file = storage.exists(cfg.predictions)
    files = (
        dict.fromkeys(PREDICTION_FILES, cfg.predictions)
        if is_file
        else {key: storage.join(cfg.predictions, name) for key, name in PREDICTION_FILES.items()}
    )
    if cfg.frames_gt and (kind != "video" or is_file):
        raise ConfigError(
            "evaluate: frames_gt is only used with a video gt and a predictions folder (the predict step's output)"
        )
    if kind == "coco":
        return EvaluationReport(_frame_evaluations(cfg, gt, cfg.gt, files), _category_names(gt))
    evaluations = evaluate_videos(
        gt,
        storage.read_json(files["video"]),
        cfg.iou_types,
        max_dets=cfg.max_dets,
        gt_source=cfg.gt,
        predictions_source=files["video"],
    )
    if not cfg.frames_gt:
        if not is_file:
            logger.info("no frames_gt given: frame-level COCO metrics skipped")
        return EvaluationReport(evaluations, _category_names(gt))
    frames_gt = storage.read_json(cfg.frames_gt)
    frame_evaluations = _frame_evaluations(cfg, frames_gt, cfg.frames_gt, files)
    return EvaluationReport(frame_evaluations + evaluations, _category_names(gt, frames_gt))


def category_rows(report: EvaluationReport) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the per-category table: AP, AP50, AP75 of every evaluation (None = no GT)."""
    header = ["category_id", "name"]
    columns: dict[str, dict[int, float]] = {}
    for evaluation in report.evaluations:
        for cat_id, values in evaluation.arrays.per_category().items():
            for stat, value in values.items():
                columns.setdefault(f"{evaluation.name} {stat}", {})[cat_id] = value
    header += list(columns)
    category_ids = sorted({cat_id for column in columns.values() for cat_id in column})
    rows = [
        [cat_id, report.category_names.get(cat_id, "")]
        + [None if column.get(cat_id, -1.0) < 0 else column[cat_id] for column in columns.values()]
        for cat_id in category_ids
    ]
    return header, rows


def table_csv(header: list[str], rows: list[list[Any]]) -> str:
    """Machine-readable table: full precision, empty cell where a category has no GT."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buffer.getvalue()


def table_markdown(header: list[str], rows: list[list[Any]]) -> str:
    """Human-readable table for the MLflow UI and the run summary; "n/a" where there is no GT."""

    def cell(value: Any) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.4f}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def pr_figure(report: EvaluationReport) -> Figure:
    """Precision/recall at IoU .5 and .75, one panel per evaluation, mean over categories with GT."""
    count = max(len(report.evaluations), 1)
    figure = Figure(figsize=(4.5 * count, 4.0), layout="constrained")
    axes = figure.subplots(1, count, squeeze=False)[0]
    for ax, evaluation in zip(axes, report.evaluations):
        arrays = evaluation.arrays
        for iou in PLOT_IOUS:
            curve = arrays.pr_curve(iou)
            if not np.isnan(curve).all():
                ax.plot(arrays.rec_thrs, curve, label=f"IoU={iou:.2f}")
        ax.set(title=evaluation.name, xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(loc="lower left")
        else:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center")
    return figure


def output_folder(output: str) -> str:
    """The folder metrics.json is published in, with the table and plot beside it."""
    head, sep, _ = output.rpartition("/")
    if not sep:
        return "."
    return head or "/"


def report_files(output: str) -> list[str]:
    """URIs of everything `publish_report` writes for `output`, metrics.json last."""
    folder = output_folder(output)
    return [storage.join(folder, name) for name in (TABLE_CSV, TABLE_MD, PR_PLOT)] + [output]


def publish_report(report: EvaluationReport, output: str) -> str:
    """Write the table and plot, then metrics.json last, atomically beside each other; return its URI."""
    header, rows = category_rows(report)
    with tempfile.TemporaryDirectory(prefix="sam3pipe-eval-") as tmp:
        folder = Path(tmp)
        (folder / TABLE_CSV).write_text(table_csv(header, rows), encoding="utf-8")
        (folder / TABLE_MD).write_text(table_markdown(header, rows), encoding="utf-8")
        pr_figure(report).savefig(folder / PR_PLOT, dpi=100)
        marker = posixpath.basename(output)
        (folder / marker).write_text(json.dumps(report.metrics, sort_keys=True, indent=1) + "\n", encoding="utf-8")
        storage.publish_dir(folder, output_folder(output), marker=marker)
    logger.info("metrics: %s", ", ".join(f"{k}={v:.4f}" for k, v in sorted(report.metrics.items())))
    return output
