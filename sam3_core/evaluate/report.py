"""The evaluate step: read GT and predictions, score them, publish metrics + table + PR plot.

What gets scored depends on the inputs (the GT kind is read from its keys, ``videos`` for a
YT-VIS or SA-Co/VEval file, ``images`` for a COCO file):

- COCO GT + a predictions file: frame bbox/segm metrics from that one file.
- COCO GT + the predict step's folder: bbox from ``coco_predictions_bbox.json``, segm from
  ``coco_predictions_segm.json``.
- Video GT + a predictions file (the predict step's ``video_predictions.json`` or a file sam3's
  video dumper wrote): the video families of ``metrics`` (:mod:`.suite`); unless configured, ``vos``
  (DAVIS J&F) for predictions that carry ``gt_id`` (semi-supervised, prompted by GT objects), all of
  sam3's SA-Co/VEval suite for a GT with ``video_np_pairs``, class mAP for plain YT-VIS GT.
- Video GT + the predict step's folder: the same from ``video_predictions.json``, and frame
  metrics from the two COCO files against ``frames_gt`` when it is given.

A predictions URI that names an existing object is a file; anything else is a folder.
Everything is computed before anything is written, so bad input leaves no partial output;
``metrics.json`` is published last, beside ``per_category.csv``, ``per_category.md``,
``pr_curves.png``, when cgF1 or HOTA ran ``video_np_results.json`` (sam3's per-(video, phrase)
results), and the files of the families that write their own (``vos_per_object.csv``). The table
lists only categories with GT or predictions, so a 50k-phrase vocabulary costs rows only for the
phrases the videos use.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import numbers
import posixpath
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sam3_core import storage
from sam3_core.artifacts import PREDICTION_FILES
from sam3_core.config import flatten
from sam3_core.errors import ConfigError, InputError, working_on
from sam3_core.evaluate.coco import (
    BACKENDS,
    IOU_TYPES,
    Evaluation,
    check_max_dets,
    evaluate_frames,
    prepare_frame_gt,
)
from sam3_core.evaluate.families import FAMILIES, default_families, family_files
from sam3_core.evaluate.suite import SuiteSettings, evaluate_suite
from sam3_core.evaluate.videodata import VideoSet, read_video_set
from sam3_core.mlflow_records.settings import MlflowConfig
from sam3_core.outputs import Output, check_earlier, check_outputs, claim

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

KINDS = ("auto", "video", "coco")
# What evaluate publishes next to metrics.json.
TABLE_CSV = "per_category.csv"
TABLE_MD = "per_category.md"
PR_PLOT = "pr_curves.png"
VIDEO_NP_RESULTS = "video_np_results.json"
# the settings that made the folder's metrics (the output guard's record, see sam3_core.outputs)
SETTINGS_FILE = "evaluate_settings.json"
# keys that change where or how fast the metrics are computed, never their values
SETTINGS_NEUTRAL = ("mlflow.", "workers", "overwrite", "output")
PLOT_IOUS = (0.5, 0.75)
MAX_WORKERS = 1024


@dataclass
class EvaluateConfig:
    """What to evaluate against what, and where the results go."""

    # URI of the ground truth: a YT-VIS / SA-Co/VEval video file or a COCO frame file
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
    # video metric families, a subset of map, phrase_ap, teta, hota, cgf1, vos; empty: vos for
    # predictions carrying gt_id, sam3's five for SA-Co/VEval GT (video_np_pairs), map for YT-VIS GT
    metrics: list[str] = field(default_factory=list)
    # cgF1 and TETA count predictions scoring >= this, HOTA those scoring above it (sam3: 0.5)
    score_threshold: float = 0.5
    # processes over videos: 1 = all in this process, 0 = one per CPU core when the set is big enough
    workers: int = 0
    # replace metrics that `output` holds from other settings or other inputs (refused otherwise)
    overwrite: bool = False
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def __post_init__(self) -> None:
        """Reject bad values when the config is built, naming the key to change."""
        for key in ("gt", "predictions", "output", "frames_gt"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"evaluate.{key}={getattr(self, key)!r}: must be a URI string")
        if self.backend not in BACKENDS:
            raise ConfigError(f"evaluate.backend={self.backend!r}: must be one of {list(BACKENDS)}")
        if self.kind not in KINDS:
            raise ConfigError(f"evaluate.kind={self.kind!r}: must be one of {list(KINDS)}")
        if (
            not self.iou_types
            or any(t not in IOU_TYPES for t in self.iou_types)
            or len(set(self.iou_types)) != len(self.iou_types)
        ):
            raise ConfigError(
                f"evaluate.iou_types={list(self.iou_types)}: must be a non-empty subset of {list(IOU_TYPES)}, each once"
            )
        if any(m not in FAMILIES for m in self.metrics) or len(set(self.metrics)) != len(self.metrics):
            raise ConfigError(
                f"evaluate.metrics={list(self.metrics)}: must be a subset of {list(FAMILIES)}, each "
                "once (or empty for the GT's default)"
            )
        if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in self.max_dets):
            raise ConfigError(f"evaluate.max_dets={list(self.max_dets)}: must be three increasing positive integers")
        try:
            check_max_dets(self.max_dets)
        except ConfigError as error:
            raise ConfigError(
                f"evaluate.max_dets={list(self.max_dets)}: must be three increasing positive integers, "
                "e.g. [1, 10, 100]"
            ) from error
        threshold = self.score_threshold
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, numbers.Real)
            or not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0)
        ):
            raise ConfigError(f"evaluate.score_threshold={threshold!r}: must be a number in [0, 1] (sam3 uses 0.5)")
        if (
            isinstance(self.workers, bool)
            or not isinstance(self.workers, numbers.Integral)
            or not (0 <= self.workers <= MAX_WORKERS)
        ):
            raise ConfigError(
                f"evaluate.workers={self.workers!r}: must be an integer in [0, {MAX_WORKERS}] (0 = one per CPU core)"
            )
        if not isinstance(self.overwrite, bool):
            raise ConfigError(f"evaluate.overwrite={self.overwrite!r}: must be true or false")
        if self.output:
            name = posixpath.basename(self.output)
            if not name:
                raise ConfigError(
                    f"evaluate.output={self.output!r}: must name the metrics file (<folder>/metrics.json)"
                )
            if name in (TABLE_CSV, TABLE_MD, PR_PLOT, VIDEO_NP_RESULTS, SETTINGS_FILE, *family_files()):
                raise ConfigError(
                    f"evaluate.output={self.output!r}: collides with the table/plot/results written "
                    "beside it; name it metrics.json"
                )


@dataclass(frozen=True)
class EvaluationReport:
    """Everything the evaluate step publishes, before it is written anywhere."""

    evaluations: list[Evaluation]
    category_names: dict[int, str]
    video_metrics: dict[str, float] = field(default_factory=dict)
    # sam3's per-(video, phrase) results (cgF1 / HOTA); None when those families did not run
    video_np_results: list[dict[str, Any]] | None = None
    # name -> text of the files families publish beside metrics.json (vos_per_object.csv)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        out = {name: value for e in self.evaluations for name, value in e.metrics.items()}
        out.update(self.video_metrics)
        return out


def check_config(cfg: EvaluateConfig) -> None:
    """Required keys, checked before reading anything (the values themselves are checked on build)."""
    for key in ("gt", "predictions", "output"):
        if not getattr(cfg, key):
            raise ConfigError(f"evaluate.{key} is required: pass {key}=<uri> (or --{key} <uri>)")


def evaluation_settings(cfg: EvaluateConfig) -> dict[str, Any]:
    """Every setting that shapes the metrics: what the output guard compares with an earlier run's."""
    flat = flatten(cfg)
    return {
        key: value
        for key, value in flat.items()
        if not any(key == n or (n.endswith(".") and key.startswith(n)) for n in SETTINGS_NEUTRAL)
    }


def input_files(cfg: EvaluateConfig) -> dict[str, str]:
    """The files evaluate reads, by the key that names them (a predictions folder's three files)."""
    inputs = {"gt": cfg.gt, "frames_gt": cfg.frames_gt}
    if cfg.predictions and not storage.exists(cfg.predictions):
        inputs.update(
            {f"predictions ({name})": storage.join(cfg.predictions, name) for name in PREDICTION_FILES.values()}
        )
    else:
        inputs["predictions"] = cfg.predictions
    return inputs


def guard_output(cfg: EvaluateConfig) -> None:
    """The output guard before any work: no file written is an input or lies in a published dataset, and
    metrics of other settings are replaced only with `overwrite=true`."""
    check_config(cfg)
    folder = output_folder(cfg.output)
    names = (TABLE_CSV, TABLE_MD, PR_PLOT, VIDEO_NP_RESULTS, SETTINGS_FILE, *family_files())
    written = [Output(cfg.output, "output"), *(Output(storage.join(folder, name), "output") for name in names)]
    check_outputs(written, input_files(cfg))
    check_earlier(
        written[0],
        storage.join(folder, SETTINGS_FILE),
        evaluation_settings(cfg),
        cfg.overwrite,
        "overwrite",
        lambda: storage.exists(cfg.output),
    )


def check_same_metrics(report: EvaluationReport, cfg: EvaluateConfig) -> None:
    """Metrics of the same settings already at `output` must be these: else the inputs changed since."""
    if cfg.overwrite or not storage.exists(cfg.output):
        return
    try:
        earlier = storage.read_json(cfg.output)
    except InputError:
        earlier = None
    if not _same_metrics(earlier, report.metrics):
        raise InputError(
            cfg.output,
            "output",
            "already holds other metrics of these settings (the ground truth or the predictions changed "
            "since?); pass overwrite=true to replace them, or write somewhere else",
        )


def _same_metrics(earlier: Any, metrics: dict[str, float]) -> bool:
    """The same names and values (NaN matching NaN; a float rounding apart, as another worker count may sum)."""
    if not isinstance(earlier, dict) or set(earlier) != set(metrics):
        return False
    for name, value in metrics.items():
        old = earlier[name]
        if not isinstance(old, (int, float)) or isinstance(old, bool):
            return False
        if not (math.isnan(old) and math.isnan(value)) and not math.isclose(old, value, rel_tol=1e-9, abs_tol=1e-12):
            return False
    return True


def detect_kind(gt: Any, source: str, requested: str) -> str:
    """ "video" for a YTVIS file (``videos``), "coco" for a COCO file (``images``)."""
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
            gt_source=gt_uri,
        )
        for iou_type in cfg.iou_types
    ]


def video_families(cfg: EvaluateConfig, data: VideoSet) -> tuple[str, ...]:
    """The configured families, or the inputs' default (see ``families.default_families``)."""
    return tuple(cfg.metrics) if cfg.metrics else default_families(data)


def _video_report(cfg: EvaluateConfig, gt: dict[str, Any], predictions_uri: str) -> EvaluationReport:
    """The video families of ``cfg`` on a video GT; AP evaluations feed the table and the PR plot."""
    data = read_video_set(gt, storage.read_json(predictions_uri), gt_source=cfg.gt, predictions_source=predictions_uri)
    families = video_families(cfg, data)
    settings = SuiteSettings(
        families=families,
        iou_types=tuple(cfg.iou_types),
        max_dets=check_max_dets(cfg.max_dets),
        threshold=cfg.score_threshold,
        workers=cfg.workers,
    )
    result = evaluate_suite(data, settings)
    ap_metrics = {k for e in result.evaluations for k in e.metrics}
    others = {k: v for k, v in result.metrics.items() if k not in ap_metrics}
    return EvaluationReport(result.evaluations, data.category_names, others, result.video_np_results, result.files)


def run_evaluation(cfg: EvaluateConfig) -> EvaluationReport:
    """Read, validate and score; writes nothing."""
    check_config(cfg)
    with working_on(f"gt={cfg.gt} and predictions={cfg.predictions}"):
        return _evaluation(cfg)


def _evaluation(cfg: EvaluateConfig) -> EvaluationReport:
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
            "evaluate.frames_gt is only used with a video gt and a predictions folder (the predict step's output)"
        )
    if kind == "coco":
        return EvaluationReport(_frame_evaluations(cfg, gt, cfg.gt, files), _category_names(gt))
    video = _video_report(cfg, gt, files["video"])
    if not cfg.frames_gt:
        if not is_file:
            logger.info("no frames_gt given: frame-level COCO metrics skipped")
        return video
    frames_gt = storage.read_json(cfg.frames_gt)
    frame_evaluations = _frame_evaluations(cfg, frames_gt, cfg.frames_gt, files)
    names = {**_category_names(frames_gt), **video.category_names}
    return EvaluationReport(
        frame_evaluations + video.evaluations, names, video.video_metrics, video.video_np_results, video.files
    )


def category_rows(report: EvaluationReport) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the per-category table: AP, AP50, AP75 of every evaluation (None = no GT)."""
    header = ["category_id", "name"]
    columns: dict[str, dict[int, float]] = {}
    for evaluation in (e for e in report.evaluations if e.per_category):
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
    """Precision/recall at IoU .5 and .75, mean over categories with GT; one panel per IoU type.

    Class AP and phrase AP of the same IoU type share a panel (phrase AP pools every
    (video, phrase) pair as one category), which keeps the figure -- and the time to draw it -- small.
    """
    # imported on use: matplotlib costs a third of a second at the start of the CLI otherwise
    from matplotlib.figure import Figure

    panels: dict[str, list[Evaluation]] = {}
    for evaluation in report.evaluations:
        panels.setdefault(evaluation.name.removesuffix("_phrase_ap"), []).append(evaluation)
    figure = Figure(figsize=(4.0 * max(len(panels), 1), 3.6), layout="constrained")
    axes = figure.subplots(1, max(len(panels), 1), squeeze=False)[0]
    for ax, (title, evaluations) in zip(axes, panels.items()):
        for evaluation in evaluations:
            what = "phrase AP" if evaluation.name.endswith("_phrase_ap") else "AP"
            for iou in PLOT_IOUS:
                curve = evaluation.arrays.pr_curve(iou)
                if not np.isnan(curve).all():
                    ax.plot(evaluation.arrays.rec_thrs, curve, label=f"{what} IoU={iou:.2f}")
        ax.set(title=title, xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(loc="upper right", fontsize="small")
        else:
            ax.text(0.5, 0.5, "no ground truth", ha="center", va="center")
    if not panels:
        axes[0].set_axis_off()
        axes[0].text(0.5, 0.5, "no precision/recall curve in these metric families", ha="center", va="center")
    return figure


def output_folder(output: str) -> str:
    """The folder metrics.json is published in, with the table and plot beside it."""
    head, sep, _ = output.rpartition("/")
    if not sep:
        return "."
    return head or "/"


def report_files(report: EvaluationReport, output: str) -> list[str]:
    """URIs of everything `publish_report` writes for `output`, metrics.json last."""
    folder = output_folder(output)
    names = [TABLE_CSV, TABLE_MD, PR_PLOT, SETTINGS_FILE]
    names += [VIDEO_NP_RESULTS] if report.video_np_results is not None else []
    names += list(report.files)
    return [storage.join(folder, name) for name in names] + [output]


def publish_report(report: EvaluationReport, output: str, settings: dict[str, Any]) -> str:
    """Write the table and plot (and the `settings` record), then metrics.json last, atomically beside
    each other; return its URI."""
    header, rows = category_rows(report)
    with tempfile.TemporaryDirectory(prefix="sam3pipe-eval-") as tmp:
        folder = Path(tmp)
        claim(str(folder / SETTINGS_FILE), settings)
        (folder / TABLE_CSV).write_text(table_csv(header, rows), encoding="utf-8")
        (folder / TABLE_MD).write_text(table_markdown(header, rows), encoding="utf-8")
        pr_figure(report).savefig(folder / PR_PLOT, dpi=100)
        if report.video_np_results is not None:
            (folder / VIDEO_NP_RESULTS).write_text(json.dumps(report.video_np_results) + "\n", encoding="utf-8")
        for name, text in report.files.items():
            (folder / name).write_text(text, encoding="utf-8")
        marker = posixpath.basename(output)
        (folder / marker).write_text(json.dumps(report.metrics, sort_keys=True, indent=1) + "\n", encoding="utf-8")
        storage.publish_dir(folder, output_folder(output), marker=marker)
    logger.info("metrics: %s", ", ".join(f"{k}={v:.4f}" for k, v in sorted(report.metrics.items())))
    return output
