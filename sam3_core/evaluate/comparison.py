"""Base against fine-tuned: the same metrics of both models on the same data, their difference, SAM3's published row.

Fine-tuning can make the model users will run worse (upstream issue #580), so a fine-tune is
reported next to its base, evaluated on the same split with the same settings: one row per model,
a row of differences (fine-tuned minus base), and, where the data is a benchmark SAM3 published
numbers for, SAM3's row as a reference. SAM3 published those on the whole benchmark split with
its own video inference; a dataset made from it here may hold a part of it (a split, a subset),
so the published row is a reference, not one more model of the same evaluation.

Values are in the units of metrics.json (fractions; SAM3's paper prints percent).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sam3_core import storage
from sam3_core.config_checks import MISSING, check_str, check_uri
from sam3_core.errors import ConfigError, InputError
from sam3_core.mlflow_records.settings import MlflowConfig

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CGF1 = "video_mask_demo_cgf1_micro_50_95"
PHOTA = "video_mask_all_phrase_HOTA"
MASK_MAP = "video_mask_mAP_50_95"
# the video metrics SAM3 reports, first in every comparison table
HEADLINE = (CGF1, PHOTA, MASK_MAP)

BASE, FINE_TUNED, DIFFERENCE = "base", "fine-tuned", "fine-tuned - base"
COMPARISON_JSON, COMPARISON_MD, COMPARISON_CSV = "comparison.json", "comparison.md", "comparison.csv"


@dataclass(frozen=True)
class PublishedReference:
    """SAM3's published result on a benchmark split (issue 20 quotes them from the SAM3 paper)."""

    name: str
    benchmark: str
    metrics: Mapping[str, float]
    # the SA-Co/VEval annotation file (sam3's `<name>.json`) that identifies the benchmark in a dataset's source
    annotations: str = ""

    @property
    def label(self) -> str:
        return f"SAM3 published ({self.benchmark})"


PUBLISHED = {
    ref.name: ref
    for ref in (
        PublishedReference(
            "saco_veval_sav_test", "SA-Co/VEval SA-V test", {CGF1: 0.303, PHOTA: 0.580}, "saco_veval_sav_test.json"
        ),
        PublishedReference(
            "saco_veval_yt1b_test", "SA-Co/VEval YT-1B test", {CGF1: 0.508, PHOTA: 0.699}, "saco_veval_yt1b_test.json"
        ),
        PublishedReference(
            "saco_veval_smartglasses_test",
            "SA-Co/VEval SmartGlasses test",
            {CGF1: 0.364, PHOTA: 0.636},
            "saco_veval_smartglasses_test.json",
        ),
        PublishedReference("ytvis2021_val", "YouTube-VIS 2021 val", {MASK_MAP: 0.574}),
        PublishedReference("ovis_val", "OVIS val", {MASK_MAP: 0.605}),
    )
}
# `reference=` values besides the names of PUBLISHED
AUTO, NONE = "auto", "none"


def reference_for(choice: str, source: Mapping[str, Any] | None = None) -> PublishedReference | None:
    """The published row to show: `choice` names one (see PUBLISHED), or is `none`, or `auto`.

    `auto` recognises an SA-Co/VEval test set by its annotation file in the dataset manifest's
    `source` (sam3 names them `<benchmark>.json`); YT-VIS 2021 and OVIS files carry no such
    name, so they are chosen by name (`reference=ytvis2021_val`).
    """
    if choice == NONE:
        return None
    if choice == AUTO:
        annotations = str((source or {}).get("annotations", ""))
        kind = (source or {}).get("kind")
        return next(
            (r for r in PUBLISHED.values() if kind == "saco" and r.annotations and r.annotations == annotations), None
        )
    if choice not in PUBLISHED:
        raise ConfigError(f"reference={choice!r}: use auto, none or one of {', '.join(sorted(PUBLISHED))}")
    return PUBLISHED[choice]


def compared_metrics(base: Mapping[str, float], fine_tuned: Mapping[str, float]) -> list[str]:
    """The metrics both evaluations have: SAM3's headline ones first, then the others by name."""
    common = set(base) & set(fine_tuned)
    return [m for m in HEADLINE if m in common] + sorted(common - set(HEADLINE))


def comparison_rows(
    base: Mapping[str, float],
    fine_tuned: Mapping[str, float],
    reference: PublishedReference | None = None,
    metrics: Sequence[str] | None = None,
) -> tuple[list[str], list[list[Any]]]:
    """A table (header, rows): base, fine-tuned, their difference, and the published row (its metrics only).

    A cell the row has no value for is None.
    """
    names = list(metrics) if metrics is not None else compared_metrics(base, fine_tuned)
    rows = [
        [BASE, *(base.get(m) for m in names)],
        [FINE_TUNED, *(fine_tuned.get(m) for m in names)],
        [DIFFERENCE, *(difference(base, fine_tuned, m) for m in names)],
    ]
    if reference is not None:
        rows.append([reference.label, *(reference.metrics.get(m) for m in names)])
    return ["model", *names], rows


def difference(base: Mapping[str, float], fine_tuned: Mapping[str, float], metric: str) -> float | None:
    """fine-tuned minus base; None unless both have the metric."""
    if metric not in base or metric not in fine_tuned:
        return None
    return float(fine_tuned[metric]) - float(base[metric])


def comparison_metrics(
    base: Mapping[str, float], fine_tuned: Mapping[str, float], reference: PublishedReference | None = None
) -> dict[str, float]:
    """Flat names for a run's metrics: `base/<m>`, `fine_tuned/<m>`, `delta/<m>` and `published/<m>`."""
    out: dict[str, float] = {}
    for metric in compared_metrics(base, fine_tuned):
        out[f"base/{metric}"] = float(base[metric])
        out[f"fine_tuned/{metric}"] = float(fine_tuned[metric])
        out[f"delta/{metric}"] = float(fine_tuned[metric]) - float(base[metric])
    if reference is not None:
        out.update({f"published/{m}": float(v) for m, v in reference.metrics.items()})
    return out


def pr_comparison_figure(reports: Mapping[str, Any], iou: float = 0.5) -> Figure:
    """Precision/recall of each model (`reports`: label -> EvaluationReport) at one IoU, one panel per IoU type.

    The models' curves of an IoU type share its panel, so base and fine-tuned read against each other.
    """
    # imported on use, as in sam3_core.evaluate.report: matplotlib is slow to import
    from matplotlib.figure import Figure

    panels: dict[str, list[tuple[str, Any]]] = {}
    for label, report in reports.items():
        for evaluation in report.evaluations:
            panels.setdefault(evaluation.name, []).append((label, evaluation))
    figure = Figure(figsize=(4.0 * max(len(panels), 1), 3.6), layout="constrained")
    axes = figure.subplots(1, max(len(panels), 1), squeeze=False)[0]
    for ax, (title, curves) in zip(axes, panels.items()):
        for label, evaluation in curves:
            curve = evaluation.arrays.pr_curve(iou)
            if not np.isnan(curve).all():
                ax.plot(evaluation.arrays.rec_thrs, curve, label=label)
        ax.set(title=f"{title} IoU={iou:.2f}", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(loc="upper right", fontsize="small")
    if not panels:
        axes[0].set_axis_off()
    return figure


@dataclass
class CompareConfig:
    """Keys of `sam3pipe component compare`: two metrics.json of one evaluation setup, and where the table goes."""

    # metrics.json of the base model's predictions, and of the fine-tuned model's (same split, same settings)
    base: str = MISSING
    fine_tuned: str = MISSING
    # folder for comparison.json (the marker), comparison.md and comparison.csv
    output: str = MISSING
    # the published row: auto (recognised from the dataset's manifest), none, or a name of PUBLISHED
    reference: str = AUTO
    # the dataset both were evaluated on (its manifest tells `reference=auto` the benchmark)
    dataset: str = ""
    mlflow: MlflowConfig = field(
        default_factory=lambda: MlflowConfig(
            headline_metrics=[f"compare/{row}/{m}" for row in ("base", "fine_tuned", "delta") for m in HEADLINE]
        )
    )

    def __post_init__(self) -> None:
        for key in ("base", "fine_tuned", "output"):
            check_uri(key, getattr(self, key), required=True)
        check_uri("dataset", self.dataset)
        check_str("reference", self.reference, required=True)
        if self.reference not in (AUTO, NONE, *PUBLISHED):
            raise ConfigError(f"reference={self.reference!r}: use auto, none or one of {', '.join(sorted(PUBLISHED))}")


def read_metrics(uri: str) -> dict[str, float]:
    """A metrics.json (name -> number), checked."""
    metrics = storage.read_json(uri)
    if not isinstance(metrics, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()
    ):
        raise InputError(uri, "metrics", "not a metrics.json of the evaluate step (an object of name: number)")
    return {str(k): float(v) for k, v in metrics.items()}


def publish_comparison(header: list[str], rows: list[list[Any]], output: str) -> str:
    """comparison.md and .csv, then comparison.json last, under `output`; the URI of comparison.json."""
    from sam3_core.evaluate.report import table_csv, table_markdown

    with tempfile.TemporaryDirectory(prefix="sam3pipe-compare-") as tmp:
        folder = Path(tmp)
        (folder / COMPARISON_MD).write_text(table_markdown(header, rows), encoding="utf-8")
        (folder / COMPARISON_CSV).write_text(table_csv(header, rows), encoding="utf-8")
        (folder / COMPARISON_JSON).write_text(
            json.dumps([dict(zip(header, row)) for row in rows], indent=1) + "\n", encoding="utf-8"
        )
        storage.publish_dir(folder, output, marker=COMPARISON_JSON)
    return storage.join(output, COMPARISON_JSON)
