"""The helper process (`mlflow.background`): MLflow stays out of the component's own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from sam3_core.mlflow_records.redact import MAX_PARAM_VALUE_LENGTH
from tests.fixtures.paths import REPO
from tests.fixtures.saco import SacoShape, generate


def python(code: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def local_store(tmp_path: Path) -> dict[str, str]:
    """The environment of a component tracking into a local sqlite store of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        MLFLOW_EXPERIMENT_NAME="background",
        SAM3PIPE_HOME=str(tmp_path / "home"),
        SAM3PIPE_STORE=str(tmp_path / "store"),
    )
    return env


def test_the_param_length_limit_is_mlflows() -> None:
    assert MAX_PARAM_VALUE_LENGTH == MAX_PARAM_VAL_LENGTH


@pytest.mark.integration
def test_masking_params_does_not_import_mlflow(local_store: dict[str, str]) -> None:
    done = python(
        """
        import sys
        from sam3_core.mlflow_records.redact import redact_params
        assert redact_params({"notes": "x" * 7000})["notes"].endswith("...[truncated]")
        print("mlflow" in sys.modules)
        """,
        local_store,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"]


@pytest.mark.integration
def test_a_tracked_evaluate_never_imports_mlflow_in_the_components_process(
    local_store: dict[str, str], tmp_path: Path
) -> None:
    gt, predictions = generate(SacoShape(videos=2, frames=4, categories=30))
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(predictions))
    done = python(
        f"""
        import json, sys
        from components import evaluate
        outputs = evaluate.execute(["gt={tmp_path / "gt.json"}", "predictions={tmp_path / "pred.json"}",
                                    "output={tmp_path / "out" / "metrics.json"}", "mlflow.system_metrics=false"])
        print(json.dumps({{"mlflow": "mlflow" in sys.modules, "metrics": outputs["metrics"]}}))
        """,
        local_store,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["mlflow"] is False
    client = MlflowClient(local_store["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("background")
    (run,) = client.search_runs([experiment.experiment_id], "tags.`sam3pipe.component` = 'evaluate'")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eval/video_mask_mAP_50_95"] == pytest.approx(result["metrics"]["video_mask_mAP_50_95"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"metrics.json", "pr_curves.png", "summary.txt"}


@pytest.mark.integration
def test_the_helper_ends_the_run_as_failed_when_the_component_dies_without_closing_it(
    local_store: dict[str, str],
) -> None:
    done = python(
        """
        import os
        from sam3_core.mlflow_records import MlflowConfig, component_run
        run = component_run(MlflowConfig(pipeline_run_id="died", system_metrics=False), "train", {"lr": 0.1})
        run.log_metrics({"train/loss": 0.5}, step=3)
        print(run.run_id, flush=True)
        os._exit(9)
        """,
        local_store,
    )
    assert done.returncode == 9, done.stderr
    run_id = done.stdout.split()[-1]
    client = MlflowClient(local_store["MLFLOW_TRACKING_URI"])
    deadline = time.monotonic() + 120
    while client.get_run(run_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.metrics == {"train/loss": 0.5}
