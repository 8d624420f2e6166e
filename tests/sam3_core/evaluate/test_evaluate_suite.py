"""The SA-Co/VEval video suite: each family equal to the pinned sam3 evaluator on generated SA-Co-shaped sets.

Tolerance 1e-9 (absolute) everywhere: both sides compute the same quantities in float64 from the
same integers and IoUs; only summation order may differ (~1e-16). TETA values are percentages
rounded by sam3 to 5 significant digits, which we reproduce, so they compare equal too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sam3_core.evaluate.families import SAM3_SUITE
from sam3_core.evaluate.suite import SuiteSettings, evaluate_suite
from sam3_core.evaluate.videodata import read_video_set
from tests.fixtures import sam3_reference
from tests.fixtures.saco import SacoShape, generate

pytestmark = pytest.mark.filterwarnings("ignore")

CASES = {
    # many phrases, negatives, several videos, sam3-style dense absent frames mixed with nulls, score ties
    "plain": SacoShape(videos=4, frames=6, categories=500, positives_per_video=3, negatives_per_video=4, seed=11),
    # crowd GT, every annotation tagged (sam3 then adds challenging HOTA), dense absent frames only
    "crowd-tags": SacoShape(
        videos=3, frames=7, crowd_rate=0.25, tags=True, absent_style="dense", false_positives_per_pair=1.2, seed=12
    ),
}


def same(ours: dict[str, float], reference: dict[str, float]) -> list[str]:
    """Keys of ``reference`` that ``ours`` lacks or gets wrong (NaN equals NaN)."""
    return [
        k
        for k, v in reference.items()
        if k not in ours or not (abs(ours[k] - v) <= 1e-9 or (math.isnan(ours[k]) and math.isnan(v)))
    ]


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, tuple[Path, Path, object]]:
    """Each case written to disk and scored by our suite once (every family)."""
    out = {}
    for name, shape in CASES.items():
        gt, predictions = generate(shape)
        gt_path, pred_path = sam3_reference.write_case(tmp_path_factory.mktemp(name), gt, predictions)
        data = read_video_set(
            json.loads(gt_path.read_text()),
            json.loads(pred_path.read_text()),
            gt_source=str(gt_path),
            predictions_source=str(pred_path),
        )
        out[name] = (gt_path, pred_path, evaluate_suite(data, SuiteSettings(families=SAM3_SUITE, workers=1)))
    return out


def per_pair(result) -> dict[tuple[int, int], dict[str, float]]:
    return {
        (r["video_id"], r["category_id"]): {k: v for k, v in r.items() if k not in ("video_id", "category_id")}
        for r in result.video_np_results
    }


@pytest.mark.parametrize("case", CASES)
def test_class_map_equals_sam3_ytvis_evaluator(cases, case):
    gt, pred, ours = cases[case]

    reference = sam3_reference.class_map(gt, pred)

    assert set(reference) == {f"video_{k}_mAP_{s}" for k in ("bbox", "mask") for s in ("50_95", "50", "75")}
    assert same(ours.metrics, reference) == []


@pytest.mark.parametrize("case", CASES)
def test_phrase_ap_equals_sam3_phrase_ap_evaluator(cases, case):
    gt, pred, ours = cases[case]

    reference, _ = sam3_reference.family("phrase_ap", gt, pred)

    assert len(reference) == 6
    assert same(ours.metrics, reference) == []


@pytest.mark.parametrize("case", CASES)
def test_teta_equals_sam3_teta_evaluator(cases, case):
    gt, pred, ours = cases[case]

    reference, _ = sam3_reference.family("teta", gt, pred)

    assert len(reference) == 10 and 0 < reference["video_mask_teta"] < 100
    assert same(ours.metrics, reference) == []


@pytest.mark.parametrize("case", CASES)
def test_phrase_hota_equals_sam3_hota_evaluator_with_its_per_pair_results(cases, case):
    gt, pred, ours = cases[case]

    reference, reference_pairs = sam3_reference.family("hota", gt, pred)

    assert len(reference) == (36 if case == "crowd-tags" else 18)  # + challenging_phrase_* with tags
    assert same(ours.metrics, reference) == []
    ours_pairs = per_pair(ours)
    assert [p for p, values in reference_pairs.items() if same(ours_pairs.get(p, {}), values)] == []


@pytest.mark.parametrize("case", CASES)
def test_cgf1_equals_sam3_cgf1_evaluator_with_its_per_pair_results(cases, case):
    gt, pred, ours = cases[case]

    reference, reference_pairs = sam3_reference.family("cgf1", gt, pred)

    assert len(reference) == 18 and reference["video_mask_demo_cgf1_micro_50"] != 0
    assert same(ours.metrics, reference) == []
    assert set(per_pair(ours)) == set(reference_pairs)  # negatives of video_np_pairs included
    assert [p for p, values in reference_pairs.items() if same(per_pair(ours)[p], values)] == []


@pytest.mark.parametrize("case", CASES)
def test_upstream_demo_keys_equal_sam3_demo_eval_run_as_upstream_runs_it(cases, case):
    gt, pred, ours = cases[case]

    reference = sam3_reference.upstream_demo(gt, pred)

    assert len(reference) == 2 * (9 + 6 + 2)
    assert same(ours.metrics, reference) == []


def test_the_suite_reports_exactly_sam3s_keys_plus_the_upstream_demo_and_map_extras(cases):
    _, _, ours = cases["plain"]
    demo_extra = {
        f"video_{k}_demo_{n}_{s}"
        for k in ("bbox", "mask")
        for n in ("precision", "recall", "f1", "pmf1", "cgf1")
        for s in ("50_95", "50", "75")
    }
    demo_extra |= {f"video_{k}_demo_{n}_50_95" for k in ("bbox", "mask") for n in ("pmf1_w0dt", "cgf1_w0dt")}
    map_extra = {f"video_{k}_mAP_{s}" for k in ("bbox", "mask") for s in ("50", "75")}

    sam3_keys = set(ours.metrics) - demo_extra - map_extra

    assert len(sam3_keys) == 2 + 6 + 10 + 18 + 18  # VEvalEvaluator's 54 keys on a set without tags
