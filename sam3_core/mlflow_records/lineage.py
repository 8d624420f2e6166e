"""What produced a run, recorded so `sam3pipe reproduce` can rebuild and check it.

Every component run gets lineage tags (git commit, image, sam3 version, dataset id) and a
`reproduce.json` artifact: the component, its command-line overrides, its resolved config,
the dataset (id, URI), the checkpoint it started from (URI, sha256), the process count and
thread settings. Its outputs are tagged `sam3pipe.output.<name>` when it ends.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sam3_core import storage
from sam3_core.mlflow_records import mlflow_api
from sam3_core.mlflow_records.redact import redact_value, truncate

TAG_GIT_COMMIT = "sam3pipe.git_commit"
TAG_IMAGE = "sam3pipe.image"
TAG_DATASET_ID = "sam3pipe.dataset_id"
TAG_SAM3_VERSION = "sam3pipe.sam3_version"
TAG_REPRODUCES = "sam3pipe.reproduces_run_id"
TAG_OUTPUT = "sam3pipe.output.{name}"
RECORD_FILE = "reproduce.json"
RECORD_FORMAT = 1
# Set by `sam3pipe reproduce` on the processes it starts: the run they reproduce.
REPRODUCES_ENV = "SAM3PIPE_REPRODUCES"
# Thread settings change float results; a reproduction uses the recorded ones.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def git_commit() -> str:
    """The code's commit: SAM3PIPE_GIT_COMMIT (set in the image), else git, else 'unknown'."""
    if os.environ.get("SAM3PIPE_GIT_COMMIT"):
        return os.environ["SAM3PIPE_GIT_COMMIT"]
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def sam3_version() -> str:
    return package_version("sam3")


def image() -> str:
    return os.environ.get("SAM3PIPE_IMAGE", "")


def lineage_tags() -> dict[str, str]:
    """Tags that say what code produced a run: commit, image, model library (and what it reproduces)."""
    commit = git_commit()
    tags = {TAG_GIT_COMMIT: commit, mlflow_api.MLFLOW_GIT_COMMIT: commit, TAG_SAM3_VERSION: sam3_version()}
    if image():
        tags[TAG_IMAGE] = image()
    if os.environ.get(REPRODUCES_ENV):
        tags[TAG_REPRODUCES] = os.environ[REPRODUCES_ENV]
    return {key: truncate(str(redact_value(key, value))) for key, value in tags.items()}


def content_sha256(uri: str) -> str:
    """sha256 of the bytes at `uri` now (read afresh, never from a cache), streamed from disk."""
    if not storage.is_remote(uri):
        return storage.sha256_file(storage.cached_path(uri))
    with tempfile.TemporaryDirectory(prefix="sam3pipe-sha-") as tmp:
        path = Path(tmp) / "object"
        storage.download_file(uri, path)
        return storage.sha256_file(path)


@dataclass
class RunRecord:
    """The `reproduce.json` of a component run."""

    component: str
    overrides: list[str]
    config: dict[str, Any]
    git_commit: str
    sam3_version: str
    image: str = ""
    world_size: int = 1
    env: dict[str, str] = field(default_factory=dict)
    dataset: dict[str, Any] | None = None
    # checkpoint the component started from / predicted with: {"key", "uri", "sha256", "size_bytes"}
    checkpoint: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    format: int = RECORD_FORMAT

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "component": self.component,
            "overrides": self.overrides,
            "config": self.config,
            "git_commit": self.git_commit,
            "sam3_version": self.sam3_version,
            "image": self.image,
            "world_size": self.world_size,
            "env": self.env,
            "dataset": self.dataset,
            "checkpoint": self.checkpoint,
            "versions": self.versions,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        return cls(
            component=data["component"],
            overrides=list(data.get("overrides") or []),
            config=dict(data["config"]),
            git_commit=data.get("git_commit", "unknown"),
            sam3_version=data.get("sam3_version", "unknown"),
            image=data.get("image", ""),
            world_size=int(data.get("world_size", 1)),
            env=dict(data.get("env") or {}),
            dataset=data.get("dataset"),
            checkpoint=data.get("checkpoint"),
            versions=dict(data.get("versions") or {}),
            format=int(data.get("format", RECORD_FORMAT)),
        )


def checkpoint_input(key: str, uri: str) -> dict[str, Any]:
    """The checkpoint a component reads, pinned by its bytes."""
    return {"key": key, "uri": uri, "sha256": content_sha256(uri)}


def run_record(
    component: str,
    overrides: list[str],
    config: dict[str, Any],
    dataset: dict[str, Any] | None,
    checkpoint: dict[str, Any] | None,
) -> RunRecord:
    """What this process is about to run, for `reproduce.json`."""
    return RunRecord(
        component=component,
        overrides=list(overrides),
        config=config,
        git_commit=git_commit(),
        sam3_version=sam3_version(),
        image=image(),
        world_size=int(os.environ.get("WORLD_SIZE", "1") or 1),
        env={name: os.environ[name] for name in THREAD_ENV if name in os.environ},
        dataset=dataset,
        checkpoint=checkpoint,
        versions={
            "python": platform.python_version(),
            **{name: package_version(name) for name in ("torch", "mlflow", "sam3pipe")},
        },
    )
