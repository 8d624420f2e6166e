"""`sam3pipe component export`: one JSON line with the export's URI and sha256, the export logged and
registered in MLflow as the video model beside the detector, and bad input as one line with exit 2."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from components import export as export_cli
from sam3_core import storage
from sam3_core.model.build import build_detector
from sam3_core.model.checkpoint import save_checkpoint
from sam3_core.model.config import ModelConfig
from sam3_core.model.export import VIDEO_MODEL_NAME
from sam3_core.model.tracker import build_video_model
from sam3_core.model.video_detector import VideoClipDetector
from tests.fixtures.datasets import TINY_MODEL

TINY = ModelConfig(image_size=56, vit_pretrain_img_size=56)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, torch_single_thread: None) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("export-sources")
    base, model = str(folder / "sam3.pt"), str(folder / "best.pt")
    save_checkpoint(build_video_model(TINY).state_dict(), base, step=0)
    detector = VideoClipDetector(build_detector(ModelConfig(image_size=56, vit_pretrain_img_size=56, init_seed=5)))
    save_checkpoint({"model": detector.state_dict(), "step": 3}, model, step=3)
    return model, base


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = export_cli.main(args)
    return code, capsys.readouterr().out.strip()


def test_export_prints_the_video_models_uri_and_sha256(sources, tmp_path, capsys) -> None:
    model, base = sources
    out = tmp_path / "video.pt"
    code, stdout = run(
        [f"model.uri={model}", f"base.uri={base}", f"output.uri={out}", *TINY_MODEL, "mlflow.enabled=false"], capsys
    )
    assert code == 0
    assert json.loads(stdout) == {"video_model_uri": str(out), "video_model_sha256": storage.sha256_file(out)}


@pytest.mark.parametrize(
    ("which", "field"),
    [("base", "base.uri"), ("model", "model.uri")],
)
def test_a_missing_source_is_one_line_and_exit_2_with_nothing_written(
    sources, tmp_path, capsys, caplog, which, field
) -> None:
    model, base = sources
    missing = str(tmp_path / "nowhere.pt")
    args = {"model": model, "base": base, which: missing}
    out = tmp_path / "video.pt"
    with caplog.at_level(logging.ERROR):
        code, stdout = run(
            [f"model.uri={args['model']}", f"base.uri={args['base']}", f"output.uri={out}", *TINY_MODEL], capsys
        )
    assert (code, stdout) == (2, "")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and missing in errors[0] and field in errors[0]
    assert not out.exists()


def test_export_without_a_model_is_refused_naming_model_uri(sources, tmp_path, capsys, caplog) -> None:
    with caplog.at_level(logging.ERROR):
        code, _ = run([f"base.uri={sources[1]}", f"output.uri={tmp_path / 'v.pt'}", *TINY_MODEL], capsys)
    assert code == 2 and "model.uri" in caplog.text


@pytest.mark.integration
def test_the_export_is_logged_and_registered_as_the_video_model(sources, tmp_path, capsys) -> None:
    from mlflow import MlflowClient

    from sam3_core.mlflow_records import tracking_uri

    model, base = sources
    out = tmp_path / "video.pt"
    code, stdout = run(
        [
            f"model.uri={model}",
            f"base.uri={base}",
            f"output.uri={out}",
            *TINY_MODEL,
            "mlflow.pipeline_run_id=export-test",
            "mlflow.experiment_name=export-test",
        ],
        capsys,
    )
    assert code == 0
    sha256 = json.loads(stdout)["video_model_sha256"]
    client = MlflowClient(tracking_uri())
    version = client.get_model_version_by_alias(VIDEO_MODEL_NAME, "candidate")
    assert version.source == str(out)
    logged = client.get_logged_model(version.tags["sam3pipe.model_id"])
    assert logged.tags["sam3pipe.sha256"] == sha256
    run_tags = client.get_run(version.run_id).data.tags
    assert (run_tags["sam3pipe.video_model_sha256"], run_tags["sam3pipe.base_uri"]) == (sha256, base)
    assert Path(out).stat().st_size == int(logged.tags["sam3pipe.size_bytes"])
