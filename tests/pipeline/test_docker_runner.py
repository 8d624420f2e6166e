"""`sam3pipe run --local --runner docker`, without an engine: what the containers get and the errors.

What runs with a Docker engine and the built image (the whole pipeline in containers) is in
tests/docker/test_images.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import docker_runner
from pipeline.cli import main
from sam3_core.errors import ConfigError


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SAM3PIPE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SAM3PIPE_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    for name in docker_runner.PASSED_ENV:
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_local_store_state_and_sqlite_folder_are_mounted_at_their_own_paths(state) -> None:
    env, mounts = docker_runner.container_settings("http://127.0.0.1:5123")

    assert mounts == sorted([state / "home", state / "store", state / "mlflow"])
    assert env["SAM3PIPE_STORE"] == str(state / "store") and env["SAM3PIPE_HOME"] == str(state / "home")
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5123"


def test_a_relative_store_is_made_absolute(state, monkeypatch) -> None:
    monkeypatch.chdir(state)
    monkeypatch.setenv("SAM3PIPE_STORE", "rel/store")

    env, mounts = docker_runner.container_settings("http://127.0.0.1:5123")

    assert env["SAM3PIPE_STORE"] == str(state / "rel" / "store") and state / "rel" / "store" in mounts


def test_an_s3_store_is_passed_on_with_its_endpoint_and_credentials_not_mounted(state, monkeypatch) -> None:
    monkeypatch.setenv("SAM3PIPE_STORE", "s3://bucket/prefix")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")

    env, mounts = docker_runner.container_settings("http://127.0.0.1:5123")

    assert env["SAM3PIPE_STORE"] == "s3://bucket/prefix" and env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert env["AWS_SECRET_ACCESS_KEY"] == "secret"
    assert mounts == sorted([state / "home", state / "mlflow"])


def test_only_a_sqlite_tracking_store_needs_a_server_for_the_containers() -> None:
    assert docker_runner.sqlite_folder("sqlite:////data/mlflow/mlflow.db") == Path("/data/mlflow")
    assert docker_runner.sqlite_folder("http://mlflow.example.com") is None
    assert docker_runner.sqlite_folder("postgresql://u@127.0.0.1/mlflow") is None


def test_no_engine_is_one_error_line(state, monkeypatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{state / 'no-such.sock'}")

    with pytest.raises(ConfigError, match=r"--runner docker: no Docker engine answers .*dockerd"):
        docker_runner.check_image("localhost/sam3pipe-cpu:0.1.0")


def test_the_cli_refuses_the_docker_runner_without_an_engine_before_running_anything(state, monkeypatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{state / 'no-such.sock'}")

    assert main(["run", "--local", "--runner", "docker", "--pipeline-root", str(state / "kfp")]) == 2
    assert not (state / "kfp").exists() and not (state / "store").exists()
