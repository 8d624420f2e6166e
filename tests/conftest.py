"""Shared fixtures live in tests/fixtures/, one module per real service or data set the tests use."""

from __future__ import annotations

import os

import pytest

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.datasets",
    "tests.fixtures.mlflow",
    "tests.fixtures.fake_k8s",
]


@pytest.fixture(autouse=True)
def isolated_local_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never write MLflow runs or store objects into the checkout's `.sam3pipe/`.

    A test that needs a server or an S3 store sets its own values over these.
    """
    root = tmp_path_factory.getbasetemp() / "local-state"
    if "MLFLOW_TRACKING_URI" not in os.environ:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setenv("SAM3PIPE_STORE", str(root / "store"))
