"""Base against fine-tuned: their rows and difference, SAM3's published rows (the numbers issue 20 quotes from
the SAM3 paper), how a published row is chosen for a dataset, the overlaid precision/recall curves, and the
`compare` component's files and exit codes."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from components import compare as compare_cli
from sam3_core.errors import ConfigError
from sam3_core.evaluate.coco import EvalArrays, Evaluation
from sam3_core.evaluate.comparison import (
    CGF1,
    MASK_MAP,
    PHOTA,
    PUBLISHED,
    CompareConfig,
    comparison_metrics,
    comparison_rows,
    pr_comparison_figure,
    reference_for,
)
from sam3_core.evaluate.report import EvaluationReport

BASE = {CGF1: 0.30, PHOTA: 0.55, MASK_MAP: 0.40, "bbox_AP": 0.2, "only_base": 1.0}
FINE_TUNED = {CGF1: 0.35, PHOTA: 0.50, MASK_MAP: 0.45, "bbox_AP": 0.25}


def test_rows_are_base_fine_tuned_and_their_difference_headline_metrics_first() -> None:
    header, rows = comparison_rows(BASE, FINE_TUNED)
    assert header == ["model", CGF1, PHOTA, MASK_MAP, "bbox_AP"]
    assert rows[0] == ["base", 0.30, 0.55, 0.40, 0.2]
    assert rows[1] == ["fine-tuned", 0.35, 0.50, 0.45, 0.25]
    assert rows[2][0] == "fine-tuned - base"
    assert rows[2][1:] == pytest.approx([0.05, -0.05, 0.05, 0.05])


def test_the_published_row_fills_only_the_metrics_sam3_published() -> None:
    _, rows = comparison_rows(BASE, FINE_TUNED, PUBLISHED["saco_veval_sav_test"])
    assert rows[3] == ["SAM3 published (SA-Co/VEval SA-V test)", 0.303, 0.580, None, None]


@pytest.mark.parametrize(
    ("name", "metrics"),
    [
        ("saco_veval_sav_test", {CGF1: 0.303, PHOTA: 0.580}),
        ("saco_veval_yt1b_test", {CGF1: 0.508, PHOTA: 0.699}),
        ("saco_veval_smartglasses_test", {CGF1: 0.364, PHOTA: 0.636}),
        ("ytvis2021_val", {MASK_MAP: 0.574}),
        ("ovis_val", {MASK_MAP: 0.605}),
    ],
)
def test_the_published_rows_are_sam3s_numbers_as_fractions(name, metrics) -> None:
    assert dict(PUBLISHED[name].metrics) == metrics


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"kind": "saco", "annotations": "saco_veval_yt1b_test.json"}, "saco_veval_yt1b_test"),
        ({"kind": "saco", "annotations": "saco_veval_yt1b_val.json"}, None),
        ({"kind": "ytvis", "annotations": "saco_veval_sav_test.json"}, None),
        ({"kind": "synthetic"}, None),
        (None, None),
    ],
)
def test_auto_recognises_an_sa_co_veval_test_set_by_its_annotation_file(source, expected) -> None:
    found = reference_for("auto", source)
    assert (found.name if found else None) == expected


def test_a_named_reference_is_chosen_whatever_the_source() -> None:
    assert reference_for("ovis_val", {"kind": "synthetic"}) is PUBLISHED["ovis_val"]
    assert reference_for("none", {"kind": "saco", "annotations": "saco_veval_sav_test.json"}) is None


def test_an_unknown_reference_is_refused_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"reference='coco'.*ovis_val"):
        CompareConfig(base="a.json", fine_tuned="b.json", output="out", reference="coco")


def test_run_metrics_carry_each_row_under_its_own_prefix() -> None:
    values = comparison_metrics(BASE, FINE_TUNED, PUBLISHED["ovis_val"])
    assert values[f"base/{CGF1}"] == 0.30 and values[f"fine_tuned/{CGF1}"] == 0.35
    assert values[f"delta/{CGF1}"] == pytest.approx(0.05)
    assert values[f"published/{MASK_MAP}"] == 0.605
    assert "base/only_base" not in values


def _report(precision: float) -> EvaluationReport:
    rec_thrs = np.linspace(0, 1, 101)
    iou_thrs = np.linspace(0.5, 0.95, 10)
    values = np.full((10, 101, 1, 4, 3), precision)
    arrays = EvalArrays(values, np.full((10, 1, 4, 3), 0.5), iou_thrs, rec_thrs, (1,), (1, 10, 100))
    return EvaluationReport([Evaluation("video_mask", {}, arrays)], {1: "cat"})


def test_the_pr_figure_draws_both_models_in_one_panel_per_iou_type() -> None:
    figure = pr_comparison_figure({"base": _report(0.4), "fine-tuned": _report(0.7)})
    (axes,) = figure.axes
    assert [line.get_label() for line in axes.get_lines()] == ["base", "fine-tuned"]
    assert [float(line.get_ydata()[0]) for line in axes.get_lines()] == [0.4, 0.7]


def test_compare_writes_the_table_and_prints_its_uri(tmp_path, capsys) -> None:
    (tmp_path / "base.json").write_text(json.dumps(BASE))
    (tmp_path / "fine.json").write_text(json.dumps(FINE_TUNED))
    out = tmp_path / "comparison"
    args = [f"base={tmp_path / 'base.json'}", f"fine_tuned={tmp_path / 'fine.json'}", f"output={out}"]
    assert compare_cli.main([*args, "reference=ytvis2021_val", "mlflow.enabled=false"]) == 0
    assert json.loads(capsys.readouterr().out) == {"comparison_uri": str(out / "comparison.json")}
    rows = json.loads((out / "comparison.json").read_text())
    assert [row["model"] for row in rows] == [
        "base",
        "fine-tuned",
        "fine-tuned - base",
        "SAM3 published (YouTube-VIS 2021 val)",
    ]
    assert "| fine-tuned - base |" in (out / "comparison.md").read_text()


def test_compare_refuses_a_file_that_is_not_a_metrics_json_with_one_line(tmp_path, capsys, caplog) -> None:
    (tmp_path / "base.json").write_text(json.dumps({"video_mask_mAP_50_95": "high"}))
    (tmp_path / "fine.json").write_text(json.dumps(FINE_TUNED))
    args = [f"base={tmp_path / 'base.json'}", f"fine_tuned={tmp_path / 'fine.json'}", f"output={tmp_path / 'out'}"]
    with caplog.at_level(logging.ERROR):
        assert compare_cli.main([*args, "mlflow.enabled=false"]) == 2
    assert "base.json: metrics:" in caplog.text
    assert not (tmp_path / "out").exists()
