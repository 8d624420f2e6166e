"""The `sam3pipe` command line: as a real process (`python -m pipeline.cli`) for compile and the
usage error, in-process through `main()` for the rest (kfp and mlflow imports cost seconds each).

`submit` talks HTTP to a small fake of the Kubeflow Pipelines v2beta1 API on 127.0.0.1 that
records what it receives (health check, experiment lookup/creation, run creation).
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kfp import components

from pipeline.cli import main, parse_args
from pipeline.local import metrics_table
from pipeline.submit import auth_kwargs
from sam3_core.errors import InputError


def sam3pipe(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(*args: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> tuple[int, str, list[str]]:
    """Run `sam3pipe args` in this process: (exit status, stdout, error lines logged)."""
    caplog.set_level(logging.INFO)
    status = main(list(args))
    errors = [r.getMessage() for r in caplog.records if r.getMessage().startswith("error:")]
    return status, capsys.readouterr().out, errors


@pytest.fixture
def fake_kfp() -> Iterator[dict[str, Any]]:
    """A fake KFP API server; yields {"url", "requests": [(method, path, authorization, body)]}."""
    state: dict[str, Any] = {"requests": []}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return

        def _reply(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length)) if length else None
            state["requests"].append((self.command, self.path.split("?")[0], self.headers.get("Authorization"), body))
            if self.path.startswith("/apis/v2beta1/healthz"):
                reply: dict[str, Any] = {"multi_user": False}
            elif self.path.startswith("/apis/v2beta1/experiments"):
                reply = {"experiments": []} if self.command == "GET" else {"experiment_id": "exp-1", **(body or {})}
            else:
                reply = {"run_id": "run-1", "display_name": (body or {}).get("display_name", "")}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _reply

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield state
    server.shutdown()
    server.server_close()


def test_compile_writes_a_package_kfp_loads(tmp_path: Path) -> None:
    result = sam3pipe(
        "compile", "--output", "out/pipeline.yaml", "--set", "image=registry.example.com/sam3pipe:9", cwd=tmp_path
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"pipeline": "out/pipeline.yaml"}
    loaded = components.load_component_from_file(str(tmp_path / "out/pipeline.yaml"))
    assert loaded.name == "sam3-video-finetune"
    assert "registry.example.com/sam3pipe:9" in (tmp_path / "out/pipeline.yaml").read_text()


def test_unknown_subcommand_exits_2(tmp_path: Path) -> None:
    result = sam3pipe("deploy", cwd=tmp_path)

    assert result.returncode == 2
    assert "invalid choice: 'deploy'" in result.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["reproduce", "run-1", "--host", "http://127.0.0.1:1", "lr=0.1", "max_steps=5"],
        ["reproduce", "run-1", "lr=0.1", "--host", "http://127.0.0.1:1", "max_steps=5"],
        ["submit", "lr=0.1", "--host", "http://127.0.0.1:1", "max_steps=5"],
    ],
)
def test_pipeline_parameters_may_follow_the_options(argv: list[str]) -> None:
    assert parse_args(argv).parameters == ["lr=0.1", "max_steps=5"]


def test_an_unknown_option_after_the_parameters_is_still_a_usage_error() -> None:
    with pytest.raises(SystemExit) as raised:
        parse_args(["submit", "lr=0.1", "--bogus"])
    assert raised.value.code == 2


def test_unknown_setting_is_one_error_line_and_exit_2(tmp_path, monkeypatch, capsys, caplog) -> None:
    monkeypatch.chdir(tmp_path)

    status, _, errors = cli("compile", "--set", "gpu.count=2", capsys=capsys, caplog=caplog)

    assert status == 2
    assert len(errors) == 1 and "pipeline settings: Key 'count'" in errors[0]
    assert not (tmp_path / "pipeline.yaml").exists()


def test_unknown_pipeline_parameter_stops_a_local_run_before_any_step(tmp_path, monkeypatch, capsys, caplog) -> None:
    monkeypatch.chdir(tmp_path)

    status, _, errors = cli("run", "--local", "max_step=3", capsys=capsys, caplog=caplog)

    assert status == 2
    assert len(errors) == 1 and errors[0].startswith("error: command line: max_step: not a pipeline parameter")
    assert not (tmp_path / ".sam3pipe").exists()


def test_component_runs_the_step_and_prints_its_outputs(tmp_path, capsys, caplog) -> None:
    status, out, _ = cli(
        "component",
        "data-prep",
        "source=synthetic",
        "synthetic.num_videos=2",
        "synthetic.frames_per_video=2",
        f"store={tmp_path / 'store'}",
        capsys=capsys,
        caplog=caplog,
    )

    assert status == 0
    assert Path(json.loads(out)["dataset_uri"], "manifest.json").is_file()


def test_component_input_error_is_one_line_and_exit_2(capsys, caplog) -> None:
    status, out, errors = cli("component", "data-prep", "source=youtube", capsys=capsys, caplog=caplog)

    assert status == 2 and out == ""
    assert len(errors) == 1 and "source" in errors[0]


@pytest.mark.integration
def test_submit_sends_the_pipeline_parameters_and_token(fake_kfp, capsys, caplog) -> None:
    status, out, _ = cli(
        "submit",
        "--host",
        fake_kfp["url"],
        "--experiment",
        "video-ft",
        "--existing-token",
        "tok-123",
        "max_steps=7",
        'train_overrides=["train.log_every=1"]',
        capsys=capsys,
        caplog=caplog,
    )

    assert status == 0
    assert json.loads(out) == {"run_id": "run-1", "url": f"{fake_kfp['url']}/#/runs/details/run-1"}
    (run,) = [
        body for method, path, _, body in fake_kfp["requests"] if (method, path) == ("POST", "/apis/v2beta1/runs")
    ]
    assert run["runtime_config"]["parameters"] == {"max_steps": 7, "train_overrides": ["train.log_every=1"]}
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "sam3-video-finetune"
    assert "kubernetes" in run["pipeline_spec"]["platform_spec"]["platforms"]
    assert {auth for *_, auth, _ in fake_kfp["requests"]} == {"Bearer tok-123"}


@pytest.mark.integration
def test_submit_no_cache_reruns_even_data_prep(fake_kfp, capsys, caplog) -> None:
    status, _, _ = cli("submit", "--host", fake_kfp["url"], "--no-cache", capsys=capsys, caplog=caplog)

    assert status == 0
    (run,) = [
        body for method, path, _, body in fake_kfp["requests"] if (method, path) == ("POST", "/apis/v2beta1/runs")
    ]
    tasks = run["pipeline_spec"]["pipeline_spec"]["root"]["dag"]["tasks"]
    assert not any(task["cachingOptions"].get("enableCache") for task in tasks.values())


@pytest.mark.integration
def test_submit_reads_the_service_account_token_file(tmp_path, monkeypatch, fake_kfp, capsys, caplog) -> None:
    token = tmp_path / "token"
    token.write_text("sa-token-456")
    monkeypatch.delenv("KFP_EXISTING_TOKEN", raising=False)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))

    status, _, _ = cli("submit", "--host", fake_kfp["url"], capsys=capsys, caplog=caplog)

    assert status == 0
    assert {auth for *_, auth, _ in fake_kfp["requests"]} == {"Bearer sa-token-456"}


@pytest.mark.integration
def test_submit_to_an_unreachable_server_is_one_error_line(capsys, caplog) -> None:
    status, out, errors = cli("submit", "--host", f"http://127.0.0.1:{closed_port()}", capsys=capsys, caplog=caplog)

    assert status == 2 and out == ""
    assert len(errors) == 1 and "check --host" in errors[0]


def test_explicit_token_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KFP_EXISTING_TOKEN", "from-env")

    assert auth_kwargs("from-flag") == {"existing_token": "from-flag"}
    assert auth_kwargs(None) == {"existing_token": "from-env"}


def test_missing_token_file_named_by_the_environment_is_an_input_error(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KFP_EXISTING_TOKEN", raising=False)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "absent"))

    with pytest.raises(InputError, match="KF_PIPELINES_SA_TOKEN_PATH: path: no token file"):
        auth_kwargs(None)


def test_metrics_table_lists_every_metric_sorted() -> None:
    table = metrics_table({"segm_AP": 0.25, "bbox_AP": 0.5})

    assert table.splitlines()[2:] == ["bbox_AP  0.5000", "segm_AP  0.2500"]


def test_compile_with_a_sweep_writes_the_sweep_pipeline(tmp_path: Path) -> None:
    result = sam3pipe(
        "compile", "--output", "sweep.yaml", "--sweep", '{"lr": [0.0001, 0.0003]}', "--parallelism", "4", cwd=tmp_path
    )

    assert result.returncode == 0, result.stderr
    loaded = components.load_component_from_file(str(tmp_path / "sweep.yaml"))
    assert loaded.name == "sam3-video-finetune-sweep"
    assert loaded.component_spec.inputs["sweep_grid"].default == {"lr": [0.0001, 0.0003]}
    assert "parallelismLimit: 4" in (tmp_path / "sweep.yaml").read_text()


@pytest.mark.integration
def test_submit_with_a_sweep_sends_the_spec_as_run_arguments(fake_kfp, capsys, caplog) -> None:
    status, _, _ = cli(
        "submit",
        "--host",
        fake_kfp["url"],
        "--sweep",
        '[{"lr": 0.001}, {"lr": 0.0001, "frames_per_clip": 4}]',
        "sweep_metric=segm_AP",
        capsys=capsys,
        caplog=caplog,
    )

    assert status == 0
    (run,) = [
        body for method, path, _, body in fake_kfp["requests"] if (method, path) == ("POST", "/apis/v2beta1/runs")
    ]
    assert run["runtime_config"]["parameters"] == {
        "sweep_trials": [{"lr": 0.001}, {"lr": 0.0001, "frames_per_clip": 4}],
        "sweep_grid": {},
        "sweep_metric": "segm_AP",
    }
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "sam3-video-finetune-sweep"


def test_a_bad_sweep_spec_is_one_error_line_before_anything_is_submitted(fake_kfp, capsys, caplog) -> None:
    status, out, errors = cli(
        "submit", "--host", fake_kfp["url"], "--sweep", '{"learning_rate": [0.1]}', capsys=capsys, caplog=caplog
    )

    assert status == 2 and out == ""
    assert len(errors) == 1 and "'learning_rate' is not a sweepable setting" in errors[0]
    assert fake_kfp["requests"] == []


def test_parallelism_without_a_sweep_is_refused(tmp_path, monkeypatch, capsys, caplog) -> None:
    monkeypatch.chdir(tmp_path)

    status, _, errors = cli("compile", "--parallelism", "2", capsys=capsys, caplog=caplog)

    assert status == 2 and "--parallelism: applies to sweeps only" in errors[0]
    assert not (tmp_path / "pipeline.yaml").exists()


def test_a_local_sweep_refuses_an_unknown_parameter_before_any_step(tmp_path, monkeypatch, capsys, caplog) -> None:
    monkeypatch.chdir(tmp_path)

    status, _, errors = cli("sweep", "--local", "--spec", '{"lr": [0.1]}', "max_step=3", capsys=capsys, caplog=caplog)

    assert status == 2
    assert len(errors) == 1 and errors[0].startswith("error: command line: max_step: not a pipeline parameter")
    assert not (tmp_path / ".sam3pipe").exists()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["run", "--local", "lr=-1"], "lr: must be a finite number > 0, got -1.0"),
        (["sweep", "--local", "--spec", '{"frames_per_clip": [2]}', "max_steps=-5"], "max_steps: must be >= 1, got -5"),
        (["compile", "lr=-1"], "lr: must be a finite number > 0, got -1.0"),
        (["compile", "--sweep", '{"frames_per_clip": [2]}', "training_mode=slurm"], "training_mode: must be one of"),
    ],
)
def test_a_bad_parameter_value_is_one_error_line_before_anything_runs(
    argv: list[str], says: str, tmp_path, monkeypatch, capsys, caplog
) -> None:
    monkeypatch.chdir(tmp_path)

    status, out, errors = cli(*argv, capsys=capsys, caplog=caplog)

    assert status == 2 and out == ""
    assert len(errors) == 1 and errors[0].startswith(f"error: command line: {says}")
    assert list(tmp_path.iterdir()) == []


def test_a_bad_parameter_value_is_refused_before_anything_is_submitted(fake_kfp, capsys, caplog) -> None:
    status, out, errors = cli("submit", "--host", fake_kfp["url"], "max_steps=-5", capsys=capsys, caplog=caplog)

    assert status == 2 and out == ""
    assert len(errors) == 1 and "command line: max_steps: must be >= 1, got -5" in errors[0]
    assert fake_kfp["requests"] == []


def test_compile_makes_the_given_values_and_profile_the_packages_defaults(tmp_path: Path) -> None:
    result = sam3pipe("compile", "--output", "demo.yaml", "profile=demo", "max_steps=50", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    inputs = components.load_component_from_file(str(tmp_path / "demo.yaml")).component_spec.inputs
    assert (inputs["max_steps"].default, inputs["lr"].default, inputs["best_metric"].default) == (
        50,
        1e-3,
        "val/bbox_AP",
    )
