"""What a person sees: the session's two pipeline runs in the MLflow UI, in a real browser.

Drives Debian's chromium through Playwright (nothing is downloaded at test time) against the
session's tracking server, and keeps the screenshots for a human to look at, in
`tests-artifacts/` at the repository root (gitignored; `SAM3PIPE_TEST_ARTIFACTS` moves it).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from sam3_core.mlflow_records import compare_url, runs_table_url
from tests.fixtures.paths import REPO

if TYPE_CHECKING:
    from tests.fixtures.mlflow import TrackedPipelines

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
ARTIFACTS = Path(os.environ.get("SAM3PIPE_TEST_ARTIFACTS") or REPO / "tests-artifacts")
UI_TIMEOUT_MS = 120_000
EVAL_COLUMNS = ("eval/segm_AP", "eval/video_mask_mAP_50_95")

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason="the playwright package is not installed (pip install playwright; no browser download needed)",
    ),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def open_page(browser: Any, url: str, ready_text: str, height: int = 1400) -> Any:
    """A wide page at `url` once `ready_text` shows, with MLflow's assistant side panel closed.

    Wide, because the grid renders only the columns in view.
    """
    page = browser.new_page(viewport={"width": 3400, "height": height})
    page.goto(url)
    page.get_by_text(ready_text).first.wait_for(timeout=UI_TIMEOUT_MS)
    assistant = page.locator("[data-component-id='mlflow.assistant.chat_panel.close']")
    if assistant.count():
        assistant.first.click()
    return page


def shown(value: float) -> list[str]:
    """How the UI may print a metric value: rounded to 1-6 decimals (trailing zeros dropped)."""
    return [f"{value:.{digits}f}".rstrip("0").rstrip(".") for digits in range(1, 7)]


def test_the_runs_table_shows_each_pipeline_run_with_its_lr_and_eval_metrics(
    pipelines: TrackedPipelines, browser: Any
) -> None:
    url = runs_table_url(pipelines.server.url, pipelines.experiment_id())
    page = open_page(browser, url, EVAL_COLUMNS[0])
    page.get_by_text("0.0003").first.wait_for(timeout=UI_TIMEOUT_MS)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "mlflow-runs-table.png"), full_page=True)
    text = page.inner_text("body")
    landed = page.url
    page.close()

    assert "/runs" in landed and "workflowType=machine_learning" in landed
    assert [
        name for name in ("Run Name", "Dataset", "Models", *EVAL_COLUMNS, "lr", "max_steps") if name not in text
    ] == []
    assert "0.0001" in text and "0.0003" in text
    names = [pipelines.runs_of(run)["pipeline"].info.run_name for run in pipelines.runs]
    assert [name for name in names if name not in text] == []
    # The Models column names each row's checkpoints by the registered model their best one became.
    assert text.count(pipelines.model_name) >= len(pipelines.runs)


def test_the_compare_view_lines_up_the_two_pipeline_runs(pipelines: TrackedPipelines, browser: Any) -> None:
    parents = [pipelines.runs_of(run)["pipeline"] for run in pipelines.runs]
    url = compare_url(pipelines.server.url, pipelines.experiment_id(), [p.info.run_id for p in parents])
    page = open_page(browser, url, EVAL_COLUMNS[0], height=2600)
    # The run names, params and metrics tables sit below the plots; bring them into the picture.
    page.get_by_text("Parameters").last.scroll_into_view_if_needed()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "mlflow-compare-runs.png"), full_page=True)
    text = page.inner_text("body")
    page.close()

    assert [p.info.run_name for p in parents if p.info.run_name not in text] == []
    assert "0.0001" in text and "0.0003" in text
    assert [name for name in (*EVAL_COLUMNS, "val/loss", "lr", "dataset_id") if name not in text] == []
    for parent in parents:
        assert any(form in text for form in shown(parent.data.metrics["val/loss"])), parent.data.metrics["val/loss"]
