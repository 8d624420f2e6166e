"""MLflow tracking: runs, params, metrics, artifacts, registry and outages, against a real server."""

from __future__ import annotations

import json
import logging
import os
import random
import string
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from sam3_core import storage
from sam3_core.errors import ConfigError, InputError
from sam3_core.mlflow_records import (
    TAG_COMPONENT,
    TAG_PIPELINE_RUN_ID,
    MlflowConfig,
    component_run,
    draw_masks,
    replay_unsent,
    resolve_model_uri,
    ui_command,
)
from sam3_core.mlflow_records.redact import MASK, redact_params, redact_text, redact_value
from sam3_core.mlflow_records.unsent import UNSENT_FILE
from tests.fixtures.network import free_port

if TYPE_CHECKING:
    from tests.fixtures.mlflow import MlflowServer


@dataclass
class Optim:
    lr: float = 1e-4
    weight_decay: float = 0.05


@dataclass
class Hub:
    token: str = ""
    source: str = ""


@dataclass
class DemoConfig:
    """Stands in for a component's config: nested sections plus the embedded `tracking:`."""

    optim: Optim = field(default_factory=Optim)
    hub: Hub = field(default_factory=Hub)
    notes: str = ""
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


def fast_tracking(**overrides: object) -> MlflowConfig:
    """Short intervals so the tests do not wait on the defaults meant for long trainings.

    The recorder works in the test's process (`background=False`): these tests pin what it records
    and when (outages timed against its calls, its warnings in caplog); test_background.py, the
    KFP tests and the tracked pipelines run it in its helper process.
    """
    values: dict[str, object] = {
        "background": False,
        "pipeline_run_id": uuid.uuid4().hex,
        "flush_interval_s": 0.1,
        "retry_initial_s": 0.1,
        "retry_max_s": 0.5,
        "connect_timeout_s": 5.0,
        "final_flush_timeout_s": 30.0,
        "system_metrics": False,
    }
    values.update(overrides)
    return MlflowConfig(**values)  # type: ignore[arg-type]


def random_token(alphabet: str, length: int) -> str:
    return "".join(random.SystemRandom().choice(alphabet) for _ in range(length))


def experiment_id() -> str:
    return MlflowClient().get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"]).experiment_id


# ---------------------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    "key",
    [
        "aws.secret_access_key",
        "store.AWS_ACCESS_KEY_ID",
        "hub.apiKey",
        "auth.token",
        "db.password",
        "http.authorization",
    ],
)
def test_a_key_that_names_a_credential_masks_its_value(key: str) -> None:
    assert redact_value(key, "plain-looking-value") == MASK


@pytest.mark.parametrize("key", ["model.num_tokens", "model.tokenizer_path", "data.key_frames", "train.keep_last"])
def test_keys_that_merely_contain_credential_letters_are_kept(key: str) -> None:
    assert redact_value(key, "value") == "value"


@pytest.mark.parametrize(
    "value",
    [
        "AKIA" + random_token(string.ascii_uppercase + string.digits, 16),
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJib2IifQ.c2lnbmF0dXJlLWJ5dGVz",
        random_token(string.ascii_letters + string.digits + "/+", 38) + "Aa",
        "hf_" + random_token(string.ascii_letters + string.digits, 34),
        random_token("0123456789abcdef", 64),
    ],
    ids=["aws-key-id", "jwt", "aws-secret-shape", "hf-token", "hex-secret"],
)
def test_a_value_that_looks_like_a_credential_is_masked_under_any_key(value: str) -> None:
    assert value not in str(redact_value("notes", value))


def test_a_url_keeps_its_user_and_host_but_not_its_password() -> None:
    assert redact_value("data.source", "https://alice:hunter2@data.example.com/v.tar") == (
        f"https://alice:{MASK}@data.example.com/v.tar"
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("dataset_id", "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"),
        ("git_commit", "a8d03d3b6721c89b64bb0643f0f930db477350d5"),
        ("output.dir", "/work/.sam3pipe/store/runs/20250101T120000Z/checkpoints/best.pt"),
        ("model.uri", "s3://bucket/runs/0f9a7c2e4d5b4a1e9c8f7a6b5c4d3e2f/checkpoints/last.pt"),
        ("model.name", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("pipeline", "3f2a9c1e-8b7d-4c6e-9a5f-1d2e3c4b5a69"),
    ],
)
def test_lineage_values_are_not_mistaken_for_credentials(key: str, value: str) -> None:
    assert redact_value(key, value) == value


# Not a speed test: a bound that only a quadratic (backtracking) pattern could reach.
@pytest.mark.timeout(30)
def test_masking_a_megabyte_of_letters_does_not_backtrack() -> None:
    text = "x" * 1_000_000 + " https://alice:hunter2@host/x"

    assert redact_text(text).endswith("https://alice:***@host/x")


def test_long_param_values_are_cut_to_the_mlflow_limit() -> None:
    params = redact_params({"data.videos": [f"video_{i:05d}" for i in range(2000)]})
    assert len(params["data.videos"]) == 6000
    assert params["data.videos"].endswith("[truncated]")


# ---------------------------------------------------------------------------- helpers without a server


def test_draw_masks_tints_masked_pixels_and_leaves_the_rest() -> None:
    image = Image.new("RGB", (32, 24), (0, 0, 0))
    mask = np.zeros((24, 32), dtype=bool)
    mask[12:, 16:] = True
    drawn = np.asarray(draw_masks(image, [mask], alpha=0.5))
    assert drawn[0, 0].tolist() == [0, 0, 0]
    assert drawn[20, 28].tolist() != [0, 0, 0]
    assert np.asarray(image).max() == 0


def test_draw_masks_refuses_a_mask_of_another_size() -> None:
    with pytest.raises(ValueError, match="shape"):
        draw_masks(Image.new("RGB", (8, 8)), [np.ones((4, 4), dtype=bool)])


def test_ui_command_serves_the_local_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SAM3PIPE_HOME", raising=False)
    argv = ui_command(port=5123)
    assert argv[1:4] == ["-m", "mlflow", "server"]
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / '.sam3pipe' / 'mlflow.db'}"
    assert argv[argv.index("--port") + 1] == "5123"
    assert (tmp_path / ".sam3pipe").is_dir()


def test_ui_command_refuses_when_a_tracking_server_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example.com")
    with pytest.raises(ConfigError, match="open it in a browser"):
        ui_command()


def test_a_pipeline_run_id_that_would_break_a_search_filter_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"mlflow\.pipeline_run_id"):
        MlflowConfig(pipeline_run_id="run' or '1'='1")


def test_a_plain_checkpoint_uri_passes_resolve_unchanged() -> None:
    assert resolve_model_uri("s3://bucket/runs/r1/checkpoints/best.pt") == "s3://bucket/runs/r1/checkpoints/best.pt"


def test_a_non_zero_rank_tracks_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with component_run(fast_tracking(), "train", DemoConfig(), output_uri=str(tmp_path)) as run:
        run.log_metrics({"train/loss": 1.0}, step=0)
        run.log_checkpoint("best", str(tmp_path / "missing.pt"), step=0)
    assert not run.active and run.run_id is None
    assert list(tmp_path.iterdir()) == []


def test_the_default_store_is_a_local_sqlite_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("SAM3PIPE_HOME", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with component_run(fast_tracking(), "data_prep", DemoConfig()) as run:
        run.log_metrics({"data/videos": 3}, step=0)
    client = MlflowClient(f"sqlite:///{tmp_path / '.sam3pipe' / 'mlflow.db'}")
    assert client.get_run(run.run_id).data.metrics == {"data/videos": 3.0}
    assert client.get_run(run.run_id).info.artifact_uri.startswith((tmp_path / ".sam3pipe" / "mlartifacts").as_uri())


# ---------------------------------------------------------------------------- runs against the server


def test_components_of_one_pipeline_run_nest_under_one_parent(mlflow_tracking: MlflowServer) -> None:
    tracking = fast_tracking()
    with component_run(tracking, "train", DemoConfig(mlflow=tracking)) as train:
        pass
    with component_run(tracking, "evaluate", DemoConfig(mlflow=tracking)) as evaluate:
        pass
    parents = MlflowClient().search_runs(
        [experiment_id()],
        f"tags.`{TAG_PIPELINE_RUN_ID}` = '{tracking.pipeline_run_id}' and tags.`{TAG_COMPONENT}` = 'pipeline'",
    )
    assert [p.info.run_id for p in parents] == [train.parent_run_id]
    assert evaluate.parent_run_id == train.parent_run_id
    assert MlflowClient().get_run(evaluate.run_id).data.tags["mlflow.parentRunId"] == train.parent_run_id


def test_component_runs_carry_lineage_tags(mlflow_tracking: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAM3PIPE_GIT_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("SAM3PIPE_IMAGE", "ghcr.io/example/sam3pipe:1.2.3")
    with component_run(fast_tracking(), "train", DemoConfig(), dataset_id="ds-1a2b3c") as run:
        pass
    tags = MlflowClient().get_run(run.run_id).data.tags
    assert tags["sam3pipe.git_commit"] == "0123456789abcdef0123456789abcdef01234567"
    assert tags["sam3pipe.image"] == "ghcr.io/example/sam3pipe:1.2.3"
    assert tags["sam3pipe.dataset_id"] == "ds-1a2b3c"
    assert tags["sam3pipe.sam3_version"] == "0.1.4"
    assert tags[TAG_COMPONENT] == "train"
    assert MlflowClient().get_run(run.parent_run_id).data.tags["sam3pipe.dataset_id"] == "ds-1a2b3c"


def test_rerunning_a_finished_component_replaces_its_run_in_the_same_parent(mlflow_tracking: MlflowServer) -> None:
    tracking = fast_tracking()
    with component_run(tracking, "train", DemoConfig(mlflow=tracking)) as first:
        pass
    with component_run(tracking, "train", DemoConfig(mlflow=tracking)) as second:
        pass
    client = MlflowClient()
    assert second.parent_run_id == first.parent_run_id and second.run_id != first.run_id
    live = client.search_runs([experiment_id()], f"tags.`{TAG_COMPONENT}` = 'train'")
    assert [r.info.run_id for r in live] == [second.run_id]
    replaced = client.get_run(first.run_id)
    assert replaced.info.lifecycle_stage == "deleted"
    assert replaced.data.tags["sam3pipe.superseded_by"] == second.run_id


def test_rerunning_a_failed_component_with_the_same_config_resumes_its_run(mlflow_tracking: MlflowServer) -> None:
    tracking = fast_tracking()
    with pytest.raises(RuntimeError), component_run(tracking, "train", DemoConfig(mlflow=tracking)) as crashed:
        crashed.log_metrics({"train/loss": 2.0}, step=0)
        raise RuntimeError("node lost")
    assert MlflowClient().get_run(crashed.run_id).info.status == "FAILED"
    with component_run(tracking, "train", DemoConfig(mlflow=tracking)) as resumed:
        resumed.log_metrics({"train/loss": 1.0}, step=1)
    assert resumed.run_id == crashed.run_id
    history = MlflowClient().get_metric_history(resumed.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 2.0), (1, 1.0)]
    assert MlflowClient().get_run(resumed.run_id).info.status == "FINISHED"


def test_params_are_the_flattened_config_with_dotted_keys(mlflow_tracking: MlflowServer) -> None:
    tracking = fast_tracking()
    config = DemoConfig(optim=Optim(lr=3e-4), notes="x" * 7000, mlflow=tracking)
    with component_run(tracking, "train", config) as run:
        pass
    params = MlflowClient().get_run(run.run_id).data.params
    assert params["optim.lr"] == "0.0003"
    assert params["optim.weight_decay"] == "0.05"
    assert params["mlflow.pipeline_run_id"] == tracking.pipeline_run_id
    assert len(params["notes"]) == 6000


def test_metrics_are_recorded_with_their_global_steps(mlflow_tracking: MlflowServer) -> None:
    with component_run(fast_tracking(), "train", DemoConfig()) as run:
        for step in range(0, 50, 10):
            run.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": 1e-4}, step=step)
        run.log_eval({"bbox_AP": 0.25, "video_mask_mAP_50_95": 0.125}, step=40)
    client = MlflowClient()
    loss = client.get_metric_history(run.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(loss, key=lambda m: m.step)] == [
        (step, 1.0 / (step + 1)) for step in range(0, 50, 10)
    ]
    metrics = client.get_run(run.run_id).data.metrics
    assert metrics["eval/bbox_AP"] == 0.25 and metrics["eval/video_mask_mAP_50_95"] == 0.125


def test_system_metrics_are_sampled_while_the_component_runs(mlflow_tracking: MlflowServer) -> None:
    pytest.importorskip("psutil", reason="system metrics need psutil")
    with component_run(fast_tracking(system_metrics=True, system_metrics_interval_s=0.2), "train") as run:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(key.startswith("system/") for key in MlflowClient().get_run(run.run_id).data.metrics):
                break
            time.sleep(0.5)
    assert "system/cpu_utilization_percentage" in MlflowClient().get_run(run.run_id).data.metrics


def test_planted_credentials_never_reach_params_tags_or_artifacts(
    mlflow_tracking: MlflowServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    aws_secret = random_token(string.ascii_letters + string.digits, 38) + "/+"
    hf_token = "hf_" + random_token(string.ascii_letters + string.digits, 34)
    password = "pw-" + random_token(string.ascii_letters + string.digits, 12)
    key_id = "AKIA" + random_token(string.ascii_uppercase + string.digits, 16)
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJib2IifQ." + random_token(string.ascii_letters, 24)
    planted = [aws_secret, hf_token, password, key_id, jwt]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_secret)
    monkeypatch.setenv("HF_TOKEN", hf_token)
    monkeypatch.setenv("SAM3PIPE_IMAGE", f"registry.example.com/sam3pipe:1.0@{jwt}")
    tracking = fast_tracking()
    config = DemoConfig(
        hub=Hub(token=os.environ["HF_TOKEN"], source=f"https://bob:{password}@data.example.com/videos.tar"),
        notes=f"synced with key {key_id} / {os.environ['AWS_SECRET_ACCESS_KEY']}",
        mlflow=tracking,
    )
    manifest = tmp_path / "manifest.json"
    manifest.write_text(f'{{"source": "https://bob:{password}@data.example.com/videos.tar", "files": []}}')
    with component_run(tracking, "data_prep", config, dataset_id="ds-1") as run:
        run.log_summary("data prep", {"source": config.hub.source, "notes": config.notes})
        run.log_json({"token": hf_token, "auth": f"Bearer {jwt}"}, "debug/request.json")
        run.log_file(str(manifest))
    client = MlflowClient()
    for run_id in (run.run_id, run.parent_run_id):
        data = client.get_run(run_id).data
        logged = " ".join([*data.params.values(), *data.tags.values()])
        assert not [secret for secret in planted if secret in logged]
    downloaded = Path(mlflow.artifacts.download_artifacts(run_id=run.run_id, dst_path=str(tmp_path / "artifacts")))
    files = {
        path.relative_to(downloaded).as_posix(): path.read_text() for path in downloaded.rglob("*") if path.is_file()
    }
    assert {"config.yaml", "summary.txt", "debug/request.json", "manifest.json"} <= set(files)
    assert "bob" in files["config.yaml"] and MASK in files["config.yaml"]
    assert not [(name, s) for name, text in files.items() for s in planted if s in text]


def test_evaluation_artifacts_are_logged_for_the_ui(mlflow_tracking: MlflowServer, tmp_path: Path) -> None:
    metrics_json = tmp_path / "metrics.json"
    metrics_json.write_text('{"bbox_AP": 0.5}')
    frame = Image.new("RGB", (16, 16))
    with component_run(fast_tracking(), "evaluate", DemoConfig()) as run:
        run.log_file(str(metrics_json))
        run.log_table([{"category": "cat", "AP": 0.5}, {"category": "dog", "AP": 0.25}], "per_category.json")
        run.log_image(draw_masks(frame, [np.eye(16, dtype=bool)], ["cat 0.9"]), "frames/video1_0003.png")
        run.log_summary("evaluation", {"bbox_AP": 0.5})
    client = MlflowClient()
    paths = {a.path for folder in (None, "frames") for a in client.list_artifacts(run.run_id, folder)}
    assert {"config.yaml", "metrics.json", "per_category.json", "summary.txt"} <= paths
    assert "frames/video1_0003.png" in paths
    table = mlflow.load_table("per_category.json", run_ids=[run.run_id])
    assert table.to_dict("records") == [{"category": "cat", "AP": 0.5}, {"category": "dog", "AP": 0.25}]


def test_checkpoints_are_referenced_not_uploaded(mlflow_tracking: MlflowServer, s3_bucket: str) -> None:
    checkpoint = storage.join(s3_bucket, "runs", "r1", "checkpoints", "best.pt")
    storage.write_bytes(checkpoint, b"weights" * 100)
    with component_run(fast_tracking(), "train", DemoConfig()) as run:
        run.log_checkpoint("best", checkpoint, step=120)
    client = MlflowClient()
    reference = mlflow.artifacts.load_dict(f"runs:/{run.run_id}/checkpoints/best.json")
    assert reference == {
        "name": "best",
        "uri": checkpoint,
        "step": 120,
        "size_bytes": 700,
        "sha256": storage.sha256_bytes(b"weights" * 100),
    }
    assert client.get_run(run.run_id).data.tags["sam3pipe.checkpoint.best"] == checkpoint
    assert [a.path for a in client.list_artifacts(run.run_id, "checkpoints")] == ["checkpoints/best.json"]


def test_the_final_model_is_registered_with_its_alias_and_resolves_to_the_checkpoint(
    mlflow_tracking: MlflowServer, s3_bucket: str
) -> None:
    name = f"sam3-test-{uuid.uuid4().hex[:8]}"
    tracking = fast_tracking(registered_model_name=name)
    checkpoint = storage.join(s3_bucket, "runs", "r2", "checkpoints", "best.pt")
    with component_run(tracking, "train", DemoConfig(mlflow=tracking)) as run:
        version = run.register_model(checkpoint)
    assert version is not None
    registered = MlflowClient().get_model_version(name, version)
    assert registered.run_id == run.run_id and registered.tags[TAG_PIPELINE_RUN_ID] == tracking.pipeline_run_id
    assert resolve_model_uri(f"models:/{name}@candidate") == checkpoint
    assert resolve_model_uri(f"models:/{name}/{version}") == checkpoint


def test_an_unknown_model_alias_is_an_input_error(mlflow_tracking: MlflowServer) -> None:
    with pytest.raises(InputError, match="not in the model registry"):
        resolve_model_uri(f"models:/no-such-model-{uuid.uuid4().hex[:8]}@candidate")


def test_runs_with_different_lr_line_up_side_by_side(mlflow_tracking: MlflowServer) -> None:
    for lr, ap in ((1e-4, 0.31), (3e-4, 0.35)):
        tracking = fast_tracking()
        with component_run(tracking, "evaluate", DemoConfig(optim=Optim(lr=lr), mlflow=tracking)) as run:
            run.log_eval({"bbox_AP": ap, "segm_AP": ap / 2, "video_mask_mAP_50_95": ap / 3})
    table = mlflow.search_runs(
        experiment_names=[os.environ["MLFLOW_EXPERIMENT_NAME"]], filter_string=f"tags.`{TAG_COMPONENT}` = 'evaluate'"
    )
    assert sorted(table["params.optim.lr"]) == ["0.0001", "0.0003"]
    metric_columns = sorted(c for c in table.columns if c.startswith("metrics."))
    assert metric_columns == ["metrics.eval/bbox_AP", "metrics.eval/segm_AP", "metrics.eval/video_mask_mAP_50_95"]
    assert not table[metric_columns].isna().any().any()


# ---------------------------------------------------------------------------- outages


def test_metrics_logged_while_the_server_is_down_arrive_after_it_restarts(mlflow_tracking: MlflowServer) -> None:
    with component_run(fast_tracking(final_flush_timeout_s=120.0), "train", DemoConfig()) as run:
        for step in range(5):
            run.log_metrics({"train/loss": float(step)}, step=step)
        mlflow_tracking.stop()
        for step in range(5, 10):
            run.log_metrics({"train/loss": float(step)}, step=step)
        mlflow_tracking.start()
    history = MlflowClient().get_metric_history(run.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(10))


def test_metrics_the_server_never_got_are_recorded_then_replayed(
    mlflow_tracking: MlflowServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    output = str(tmp_path / "run-output")
    with component_run(fast_tracking(final_flush_timeout_s=1.0), "train", DemoConfig(), output_uri=output) as run:
        run.log_metrics({"train/loss": 0.0}, step=0)
        mlflow_tracking.pause()
        try:
            with caplog.at_level(logging.WARNING):
                run.log_metrics({"train/loss": 1.0}, step=1)
                run.finish()
        finally:
            mlflow_tracking.resume()
    record = storage.join(output, UNSENT_FILE)
    assert record in caplog.text and storage.exists(record)
    assert replay_unsent(record) >= 1
    history = MlflowClient().get_metric_history(run.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.0), (1, 1.0)]
    assert MlflowClient().get_run(run.run_id).info.status == "FINISHED"
    assert not storage.exists(record)


def test_a_server_unreachable_at_start_leaves_a_record_that_creates_the_runs_on_replay(
    mlflow_tracking: MlflowServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    tracking = fast_tracking(connect_timeout_s=0.5)
    with component_run(tracking, "train", DemoConfig(mlflow=tracking), output_uri=str(tmp_path)) as run:
        run.log_metrics({"train/loss": 0.5}, step=7)
    assert run.active and run.run_id is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_tracking.url)
    replay_unsent(str(tmp_path / UNSENT_FILE))
    (replayed,) = MlflowClient().search_runs(
        [experiment_id()],
        f"tags.`{TAG_PIPELINE_RUN_ID}` = '{tracking.pipeline_run_id}' and tags.`{TAG_COMPONENT}` = 'train'",
    )
    assert replayed.data.metrics == {"train/loss": 0.5}
    assert replayed.data.params["optim.lr"] == "0.0001"
    assert replayed.info.status == "FINISHED"


def test_error_descriptions_mask_the_credentials_mlflow_puts_in_its_messages() -> None:
    from sam3_core.mlflow_records.redact import describe_error

    exc = ConnectionError(
        "API request to https://alice:Zq8vLw3pRt6yNc1x@mlflow.example.com/api/2.0/mlflow/runs/create failed\n"
        "Traceback details that must not reach a log line"
    )
    text = describe_error(exc)
    assert "Zq8vLw3pRt6yNc1x" not in text
    assert text.startswith("API request to https://")
    assert "Traceback" not in text


# ---------------------------------------------------------------------------- settings, views, state folders


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("flush_interval_s", 0.0, "mlflow.flush_interval_s=0.0"),
        ("lookup_timeout_s", float("nan"), "mlflow.lookup_timeout_s=nan"),
        ("final_flush_timeout_s", float("inf"), "mlflow.final_flush_timeout_s=inf"),
        ("connect_timeout_s", -1, "mlflow.connect_timeout_s=-1"),
        ("request_timeout_s", "10", "mlflow.request_timeout_s='10'"),
        ("system_metrics", "yes", "mlflow.system_metrics='yes'"),
        ("upload_workers", 0, "mlflow.upload_workers=0"),
        ("experiment_name", " ", "mlflow.experiment_name=' '"),
        ("model_alias", "", "mlflow.model_alias"),
        ("headline_metrics", ["eval/segm AP", "val[loss]"], "'val[loss]' is not an MLflow metric name"),
        ("parent_params", {"lr": "optim lr"}, "mlflow.parent_params.lr='optim lr'"),
    ],
)
def test_every_tracking_value_is_checked_when_the_config_is_built(key: str, value: object, says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        MlflowConfig(**{key: value})  # type: ignore[arg-type]

    assert says in str(refused.value)


def test_retry_max_below_retry_initial_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"mlflow\.retry_max_s=0\.5: must be >= mlflow\.retry_initial_s=1\.0"):
        MlflowConfig(retry_initial_s=1.0, retry_max_s=0.5)


def test_the_artifacts_of_a_local_store_live_next_to_its_database(tmp_path: Path) -> None:
    from sam3_core.mlflow_records.settings import local_artifact_root

    assert (
        local_artifact_root(f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}") == (tmp_path / "db" / "mlartifacts").as_uri()
    )


def test_the_local_state_folder_follows_sam3pipe_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from sam3_core.mlflow_records.settings import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("SAM3PIPE_HOME", str(tmp_path / "state"))

    assert tracking_uri() == f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}"


def test_the_parent_params_are_picked_from_the_config_and_sections_give_one_param_per_leaf() -> None:
    from sam3_core.mlflow_records.recorder import parent_params

    flat = {"optim.lr": 3e-4, "train.max_steps": 50, "model.lora.rank": 8, "model.lora.alpha": 16, "data.uri": "x"}
    mapping = {"lr": "optim.lr", "max_steps": "train.max_steps", "lora": "model.lora", "frames": "data.clips.frames"}

    assert parent_params(flat, mapping) == {"lr": 3e-4, "max_steps": 50, "lora.rank": 8, "lora.alpha": 16}


def test_the_runs_table_view_shows_the_comparison_params_then_the_headline_metrics() -> None:
    from sam3_core.mlflow_records.ui import headline_view, runs_table_url

    cfg = MlflowConfig(parent_params={"lr": "optim.lr"}, headline_metrics=["eval/segm_AP"])
    view = headline_view(cfg)

    assert view["selectedColumns"] == [
        "attributes.`Dataset`",
        "attributes.`Models`",
        "params.`lr`",
        "metrics.`eval/segm_AP`",
        "metrics.`best_step`",
        "params.`dataset_id`",
        "params.`image`",
        "params.`git_commit`",
    ]
    assert view["columnOrder"] == view["selectedColumns"]
    assert runs_table_url("http://h:5000/", "7") == (
        "http://h:5000/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=sam3pipe-headline"
    )


def test_the_session_check_names_what_changed_in_a_state_folder(tmp_path: Path) -> None:
    from tests.fixtures.isolation import changes, snapshot

    (tmp_path / "kept.db").write_bytes(b"1")
    (tmp_path / "edited.db").write_bytes(b"1")
    (tmp_path / "gone.db").write_bytes(b"1")
    before = snapshot(tmp_path)
    (tmp_path / "gone.db").unlink()
    (tmp_path / "edited.db").write_bytes(b"22")
    (tmp_path / "unsent").mkdir()
    (tmp_path / "unsent" / "run.jsonl").write_text("{}")

    assert changes(before, snapshot(tmp_path)) == ["added unsent/run.jsonl", "removed gone.db", "changed edited.db"]
    assert changes(before, before) == []


def test_a_missing_state_folder_snapshots_as_empty(tmp_path: Path) -> None:
    from tests.fixtures.isolation import snapshot

    assert snapshot(tmp_path / "absent") == {}


def test_the_test_session_keeps_all_default_state_outside_the_checkout() -> None:
    from tests.conftest import CHECKOUT_STATE

    for name in ("MLFLOW_TRACKING_URI", "SAM3PIPE_STORE", "SAM3PIPE_HOME", "SAM3PIPE_CACHE"):
        assert str(CHECKOUT_STATE) not in os.environ[name], name
        assert "sam3pipe-test-state-" in os.environ[name], name


# ---------------------------------------------------------------------------- datasets, look-ups, console


def test_a_loose_ground_truth_file_is_a_dataset_named_by_its_own_digest(tmp_path: Path) -> None:
    from sam3_core.mlflow_records.datasets import changed_files, describe

    gt = tmp_path / "val.json"
    gt.write_text('{"videos": []}')
    ref = describe(str(gt))

    assert (ref.name, ref.published, ref.dataset_id) == ("val.json", False, storage.sha256_bytes(gt.read_bytes())[:16])
    assert changed_files(ref) == []
    gt.write_text('{"videos": [1]}')
    assert changed_files(ref) and "recorded" in changed_files(ref)[0]


def test_a_file_of_a_published_dataset_is_that_dataset(tiny_dataset) -> None:  # type: ignore[no-untyped-def]
    from sam3_core.mlflow_records.datasets import describe

    ref = describe(storage.join(tiny_dataset.uri, "val.json"))

    assert (ref.dataset_id, ref.uri, ref.file) == (tiny_dataset.dataset_id, tiny_dataset.uri, "val.json")
    assert ref.name == f"synthetic-{tiny_dataset.dataset_id}" and ref.counts["videos"] == 4


@pytest.mark.timeout(60)
def test_a_registry_look_up_with_the_server_down_gives_up_at_the_configured_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sam3_core.errors import Sam3PipeError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    cfg = fast_tracking(lookup_timeout_s=1.0)

    with pytest.raises(Sam3PipeError, match=r"did not answer within mlflow.lookup_timeout_s=1s") as refused:
        resolve_model_uri("models:/sam3-video@candidate", cfg=cfg)

    assert not isinstance(refused.value, InputError)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"


@pytest.mark.parametrize(("status", "calls"), [(404, 1), (503, 3)])
def test_a_look_up_retries_transient_errors_only(status: int, calls: int) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    from sam3_core.mlflow_records.registry import within_deadline

    attempts = []

    def look_up() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise MlflowException(
                "no", error_code=RESOURCE_DOES_NOT_EXIST if status == 404 else TEMPORARILY_UNAVAILABLE
            )
        return "found"

    cfg = fast_tracking(retry_initial_s=0.01, retry_max_s=0.01, lookup_timeout_s=30.0)
    if status == 404:
        with pytest.raises(MlflowException):
            within_deadline(look_up, cfg)
    else:
        assert within_deadline(look_up, cfg) == "found"
    assert len(attempts) == calls


def test_mlflow_s_own_console_lines_mask_the_tracking_password(
    mlflow_tracking: MlflowServer,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    password = "pw-" + random_token(string.ascii_letters + string.digits, 16)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{password}@127.0.0.1:{mlflow_tracking.port}")
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    tracking = fast_tracking()
    with caplog.at_level(logging.INFO), component_run(tracking, "evaluate", DemoConfig()) as run:
        run.log_eval({"bbox_AP": 0.5})
    logging.getLogger("mlflow.system_metrics.system_metrics_monitor").warning(
        "Failed to get mlflow run: %s/api/2.0/mlflow/runs/get", os.environ["MLFLOW_TRACKING_URI"]
    )

    out, err = capfd.readouterr()
    assert password not in out + err + caplog.text
    assert "View run" not in out  # stdout holds only a component's JSON line
    assert f"View run pipeline-{tracking.pipeline_run_id}/evaluate at: http://alice:***@127.0.0.1" in caplog.text
    assert f"/runs/{run.run_id}" in caplog.text
    assert "Failed to get mlflow run: http://alice:***@" in err


# ---------------------------------------------------------------------------- the pipeline run's row and its checkpoints


def test_the_experiment_is_a_model_training_experiment_with_the_headline_view(mlflow_tracking: MlflowServer) -> None:
    with component_run(fast_tracking(), "evaluate", DemoConfig()):
        pass
    tags = MlflowClient().get_experiment(experiment_id()).tags

    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert "params.`lr`" in json.loads(tags["mlflow.sharedViewState.sam3pipe-headline"])["selectedColumns"]


def test_the_parent_row_gets_the_comparison_params_and_code_of_its_components(
    mlflow_tracking: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAM3PIPE_GIT_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("SAM3PIPE_IMAGE", "ghcr.io/example/sam3pipe:1.2.3")
    tracking = fast_tracking()
    with component_run(tracking, "train", DemoConfig(optim=Optim(lr=3e-4), mlflow=tracking)) as run:
        pass

    params = MlflowClient().get_run(run.parent_run_id).data.params
    assert params == {
        "lr": "0.0003",
        "git_commit": "0123456789abcdef0123456789abcdef01234567",
        "image": "ghcr.io/example/sam3pipe:1.2.3",
    }


def test_a_rerun_with_another_value_keeps_the_parents_param_and_says_so(
    mlflow_tracking: MlflowServer, caplog: pytest.LogCaptureFixture
) -> None:
    tracking = fast_tracking()
    with component_run(tracking, "train", DemoConfig(optim=Optim(lr=1e-4), mlflow=tracking)) as first:
        pass
    with caplog.at_level(logging.WARNING), component_run(tracking, "train", DemoConfig(optim=Optim(lr=2e-4))):
        pass

    assert MlflowClient().get_run(first.parent_run_id).data.params["lr"] == "0.0001"
    assert "pipeline run keeps param lr=0.0001; this component ran with 0.0002" in caplog.text


def test_only_the_headline_metrics_of_a_finished_component_reach_the_parent(mlflow_tracking: MlflowServer) -> None:
    tracking = fast_tracking(headline_metrics=["eval/segm_AP"])
    with component_run(tracking, "evaluate", DemoConfig(mlflow=tracking)) as run:
        run.log_eval({"segm_AP": 0.25, "bbox_AP": 0.5}, step=3)
    with pytest.raises(RuntimeError), component_run(tracking, "predict", DemoConfig(mlflow=tracking)) as failed:
        failed.log_eval({"segm_AP": 0.75})
        raise RuntimeError("lost the node")

    assert MlflowClient().get_run(run.parent_run_id).data.metrics == {"eval/segm_AP": 0.25}


def checkpoint_at(bucket: str, step: int) -> tuple[str, bytes]:
    uri = storage.join(bucket, "runs", "r", "checkpoints", f"step_{step:07d}.pt")
    data = f"weights of step {step}".encode()
    storage.write_bytes(uri, data)
    return uri, data


@dataclass
class Ref:
    """What the trainer hands `on_checkpoint` (contract 2's CheckpointRef)."""

    uri: str
    size: int
    sha256: str
    step: int
    metrics: dict[str, float] = field(default_factory=dict)


def log_checkpoints(run: object, bucket: str, scores: dict[int, float], with_metrics: bool = True) -> dict[int, Ref]:
    """Steps with their val/segm_AP, as the trainer reports them: step, last, and best when it improves."""
    refs, best = {}, -1.0
    for step, score in scores.items():
        uri, data = checkpoint_at(bucket, step)
        ref = Ref(uri, len(data), storage.sha256_bytes(data), step, {"val/segm_AP": score} if with_metrics else {})
        run.log_metrics({"val/segm_AP": score, "val/loss": 1 - score}, step)  # type: ignore[attr-defined]
        run.log_checkpoint_ref("step", ref)  # type: ignore[attr-defined]
        run.log_checkpoint_ref("last", ref)  # type: ignore[attr-defined]
        if score > best:
            best = score
            run.log_checkpoint_ref("best", ref)  # type: ignore[attr-defined]
        refs[step] = ref
    return refs


def test_checkpoints_are_logged_models_ranked_by_their_validation_metric(
    mlflow_tracking: MlflowServer, s3_bucket: str
) -> None:
    with component_run(fast_tracking(), "train", DemoConfig()) as run:
        refs = log_checkpoints(run, s3_bucket, {10: 0.2, 20: 0.5, 30: 0.4})

    ranked = mlflow.search_logged_models(
        experiment_ids=[experiment_id()],
        order_by=[{"field_name": "metrics.val/segm_AP", "ascending": False}],
        output_format="list",
    )
    assert [int(m.tags["sam3pipe.step"]) for m in ranked] == [20, 30, 10]
    best, last = ranked[0], ranked[1]
    assert (best.tags["sam3pipe.best"], best.tags["sam3pipe.last"]) == ("true", "false")
    assert (last.tags["sam3pipe.best"], last.tags["sam3pipe.last"]) == ("false", "true")
    assert best.tags["sam3pipe.checkpoint_uri"] == refs[20].uri and best.tags["sam3pipe.sha256"] == refs[20].sha256
    assert best.tags["sam3pipe.size_bytes"] == str(refs[20].size)
    assert best.source_run_id == run.parent_run_id and best.tags["sam3pipe.train_run_id"] == run.run_id


def test_a_steps_exported_best_weights_and_full_checkpoint_are_one_logged_model_with_both_files(
    mlflow_tracking: MlflowServer, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    full_uri, full = checkpoint_at(s3_bucket, 40)
    best_uri, weights = storage.join(s3_bucket, "runs", "r", "checkpoints", "best.pt"), b"exported weights"
    storage.write_bytes(best_uri, weights)
    with component_run(fast_tracking(), "train", DemoConfig()) as run:
        run.log_checkpoint_ref("best", Ref(best_uri, len(weights), storage.sha256_bytes(weights), 40))
        for role in ("step", "last"):
            run.log_checkpoint_ref(role, Ref(full_uri, len(full), storage.sha256_bytes(full), 40))

    [model] = mlflow.search_logged_models(experiment_ids=[experiment_id()], output_format="list")
    assert (model.tags["sam3pipe.best"], model.tags["sam3pipe.last"]) == ("true", "true")
    files = {role: model.tags[f"sam3pipe.file.{role}"] for role in ("best", "step", "last")}
    assert files == {"best": best_uri, "step": full_uri, "last": full_uri}
    assert model.tags["sam3pipe.file.last.sha256"] == storage.sha256_bytes(full)
    assert "differs" not in caplog.text


def test_another_file_for_a_role_a_step_already_has_is_left_out_with_a_warning(
    mlflow_tracking: MlflowServer, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    first_uri, first = checkpoint_at(s3_bucket, 50)
    rerun_uri, rerun = storage.join(s3_bucket, "rerun", "step_0000050.pt"), b"weights of a rerun"
    storage.write_bytes(rerun_uri, rerun)
    with component_run(fast_tracking(), "train", DemoConfig()) as run:
        run.log_checkpoint_ref("step", Ref(first_uri, len(first), storage.sha256_bytes(first), 50))
        run.log_checkpoint_ref("step", Ref(rerun_uri, len(rerun), storage.sha256_bytes(rerun), 50))

    [model] = mlflow.search_logged_models(experiment_ids=[experiment_id()], output_format="list")
    assert model.tags["sam3pipe.file.step"] == first_uri
    assert f"checkpoint step 50 at {rerun_uri} differs from the step file" in caplog.text


def test_the_best_checkpoints_validation_metric_lands_on_the_parent_at_its_step(
    mlflow_tracking: MlflowServer, s3_bucket: str
) -> None:
    with component_run(fast_tracking(), "train", DemoConfig()) as run:
        log_checkpoints(run, s3_bucket, {10: 0.2, 20: 0.5, 30: 0.4})

    client = MlflowClient()
    assert client.get_run(run.parent_run_id).data.metrics == {"val/segm_AP": 0.5, "val/loss": 0.5, "best_step": 20}
    assert [(m.step, m.value) for m in client.get_metric_history(run.parent_run_id, "val/segm_AP")] == [(20, 0.5)]


def test_a_checkpoint_without_metrics_takes_the_validation_metrics_logged_at_its_step(
    mlflow_tracking: MlflowServer, s3_bucket: str
) -> None:
    with component_run(fast_tracking(), "train", DemoConfig()) as run:
        log_checkpoints(run, s3_bucket, {10: 0.2}, with_metrics=False)

    (model,) = mlflow.search_logged_models(experiment_ids=[experiment_id()], output_format="list")
    assert {m.key: m.value for m in model.metrics} == {"val/segm_AP": 0.2, "val/loss": 0.8}
    history = MlflowClient().get_metric_history(run.run_id, "val/segm_AP")
    assert len(history) == 1  # linking the metric to the model added no copy to the run's curve


def test_checkpoint_and_registry_records_made_during_an_outage_are_sent_when_the_server_is_back(
    mlflow_tracking: MlflowServer, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"sam3-test-{uuid.uuid4().hex[:8]}"
    tracking = fast_tracking(registered_model_name=name, final_flush_timeout_s=120.0)
    with caplog.at_level(logging.WARNING), component_run(tracking, "train", DemoConfig(mlflow=tracking)) as run:
        mlflow_tracking.stop()
        refs = log_checkpoints(run, s3_bucket, {10: 0.3})
        assert run.register_model(refs[10].uri) is None
        assert [r["kind"] for r in run.pending] == ["checkpoint"] * 3 + ["register"]
        mlflow_tracking.start()

    assert "pending until it is back: 1 checkpoint record" in caplog.text
    assert "MLflow reachable again; pending tracking records sent" in caplog.text
    version = MlflowClient().get_model_version_by_alias(name, "candidate")
    (model,) = mlflow.search_logged_models(experiment_ids=[experiment_id()], output_format="list")
    assert version.source == refs[10].uri and version.tags["sam3pipe.model_id"] == model.model_id


def test_records_the_server_never_got_are_written_down_and_replayed(
    mlflow_tracking: MlflowServer,
    monkeypatch: pytest.MonkeyPatch,
    s3_bucket: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    name = f"sam3-test-{uuid.uuid4().hex[:8]}"
    tracking = fast_tracking(registered_model_name=name, final_flush_timeout_s=1.0, connect_timeout_s=1.0)
    output = str(tmp_path / "run-output")
    with component_run(tracking, "train", DemoConfig(mlflow=tracking), output_uri=output) as run:
        mlflow_tracking.pause()
        try:
            with caplog.at_level(logging.WARNING):
                refs = log_checkpoints(run, s3_bucket, {10: 0.3})
                run.register_model(refs[10].uri)
                run.finish()
        finally:
            mlflow_tracking.resume()

    record = storage.join(output, UNSENT_FILE)
    assert "3 checkpoint records, 1 model registration" in caplog.text and record in caplog.text
    replay_unsent(record)
    assert MlflowClient().get_model_version_by_alias(name, "candidate").source == refs[10].uri
    (model,) = mlflow.search_logged_models(experiment_ids=[experiment_id()], output_format="list")
    assert model.tags["sam3pipe.best"] == "true" and {m.key for m in model.metrics} == {"val/segm_AP", "val/loss"}
    assert not storage.exists(record)
