"""The CPU image, really run: a component in a container and the whole pipeline through kfp.local's
DockerRunner. Skipped, with the reason, where no Docker engine answers or the image is not built;
`make test` never builds an image. `make test-images` builds the CPU image from HEAD and runs them
(SAM3PIPE_TEST_IMAGE names another image). Slow: the pipeline test takes minutes on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.paths import REPO

IMAGE = os.environ.get("SAM3PIPE_TEST_IMAGE", "localhost/sam3pipe-cpu:0.1.0")


def _engine_problem() -> str | None:
    """Why the image cannot be run here, or None."""
    try:
        from docker.errors import DockerException, ImageNotFound

        import docker
    except ImportError:
        return "the docker Python package is not installed"
    try:
        client = docker.from_env()
        client.ping()
    except DockerException:
        return "no Docker engine answers (start dockerd; docs/pipelines.md, 'Images')"
    try:
        client.images.get(IMAGE)
    except ImageNotFound:
        return f"image {IMAGE} is not built (make image-cpu)"
    finally:
        client.close()
    return None


pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_engine_problem() is not None, reason=str(_engine_problem())),
]


def test_a_component_in_the_image_writes_the_callers_files_into_a_bind_mounted_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    command = [
        *("docker", "run", "--rm", "--network", "host", "--user", f"{os.getuid()}:{os.getgid()}"),
        *("--mount", f"type=bind,source={store},target={store}"),
        *(IMAGE, "sam3pipe", "component", "data-prep", "source=synthetic", "synthetic.num_videos=4", f"store={store}"),
    ]

    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)

    assert result.returncode == 0, result.stderr[-3000:]
    outputs = json.loads(result.stdout.strip().splitlines()[-1])
    manifest = Path(outputs["dataset_uri"]) / "manifest.json"
    assert manifest.is_file() and manifest.stat().st_uid == os.getuid()


def test_the_pipeline_runs_every_component_in_the_image(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "SAM3PIPE_HOME": str(tmp_path / "home"),
        "SAM3PIPE_STORE": str(tmp_path / "store"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}",
    }
    command = [
        *(sys.executable, "-m", "pipeline.cli", "run", "--local", "--runner", "docker", "--set", f"image={IMAGE}"),
        *("--pipeline-root", str(tmp_path / "kfp"), "max_steps=2"),
        'data_prep_overrides=["synthetic.num_videos=4"]',
    ]

    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env, cwd=REPO, check=False)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "video_mask_mAP_50_95" in result.stdout
    owners = {path.stat().st_uid for path in (tmp_path / "store").rglob("*")}
    assert owners == {os.getuid()}
