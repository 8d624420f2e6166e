"""What a person sees: two pipeline runs side by side in the MLflow UI's compare view.

Drives Debian's chromium through Playwright (nothing is downloaded at test time) and keeps
a screenshot under `.sam3pipe/test-artifacts/` for a human to look at.
"""

from __future__ import annotations

import importlib.util
import json
import uuid
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import pytest
from mlflow import MlflowClient

from sam3_core.tracking import TrackingConfig, component_run

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / ".sam3pipe" / "test-artifacts"
EVAL_METRICS = {"bbox_AP": 0.3125, "segm_AP": 0.28125, "video_mask_mAP_50_95": 0.21875}

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason="the playwright package is not installed (pip install playwright; no browser download needed)",
    ),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
]

if TYPE_CHECKING:
    from tests.fixtures.mlflow import MlflowServer


def test_compare_view_shows_both_runs_and_their_eval_metrics(mlflow_tracking: MlflowServer) -> None:
    from playwright.sync_api import sync_playwright

    names, run_ids = [], []
    for lr in ("1e-4", "3e-4"):
        tracking = TrackingConfig(
            pipeline_run_id=uuid.uuid4().hex, pipeline_run_name=f"lr-{lr}", flush_interval_s=0.1, system_metrics=False
        )
        with component_run(tracking, "evaluate", {"optim": {"lr": float(lr)}}) as run:
            run.log_eval({name: value * float(lr) * 1e4 for name, value in EVAL_METRICS.items()})
        run_ids.append(run.run_id)
        names.append(f"lr-{lr}/evaluate")
    experiment = MlflowClient().get_run(run_ids[0]).info.experiment_id
    url = (
        f"{mlflow_tracking.url}/#/compare-runs?runs={quote(json.dumps(run_ids))}"
        f"&experiments={quote(json.dumps([experiment]))}"
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1800})
            page.goto(url)
            page.get_by_text(f"eval/{next(iter(EVAL_METRICS))}").first.wait_for(timeout=120_000)
            # The metrics table sits below the plots; bring it into the picture.
            page.get_by_text(f"eval/{list(EVAL_METRICS)[-1]}").last.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "mlflow-compare-runs.png"), full_page=True)
            text = page.inner_text("body")
        finally:
            browser.close()
    assert [name for name in names if name not in text] == []
    assert [name for name in EVAL_METRICS if f"eval/{name}" not in text] == []
