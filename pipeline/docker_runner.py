"""`sam3pipe run --local --runner docker`: every pipeline component in the project's image.

kfp.local's DockerRunner starts each component as a container of the image (`--set image=...`),
as a cluster would start its pod, on the host's network: 127.0.0.1 inside is this machine, so a
store or a tracking server on loopback (moto, MinIO, `mlflow server`) is reached as it is here.

- The store: an `s3://` store is reached with this shell's AWS_* variables; a local store is
  bind-mounted at its own absolute path, so the URIs the components hand each other mean the same
  inside and outside. The local state folder (SAM3PIPE_HOME) is mounted the same way.
- MLflow: a tracking server or database URI is passed on. The default local sqlite store is served
  for the run by an `mlflow server` on a free loopback port (artifacts into the folder beside the
  database, also mounted), so containers never open the host's database file themselves.
- The user: containers run as the caller's uid:gid, so what they write into the mounts belongs to
  the caller (as the image's own uid 10001 they could not write into the caller's folders, and the
  caller could not delete what they wrote). The image's HOME is writable by any uid.
- The pipeline root: kfp.local mounts it itself, at its own path.

Source files outside the store (`annotations=`, `frames_root=` of a file source) are not mounted:
put them in the store, or in s3.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from kfp import local as kfp_local

from sam3_core import mlflow_records, storage
from sam3_core.errors import ConfigError
from sam3_core.mlflow_records.settings import home

if TYPE_CHECKING:
    from docker.types import Mount

    import docker

logger = logging.getLogger(__name__)

# passed on to the components as they are in this shell (the object store's endpoint and credentials)
PASSED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "MLFLOW_EXPERIMENT_NAME",
)
SERVER_START_TIMEOUT_S = 120.0


def _docker_client() -> docker.DockerClient:
    """The local engine's client (docker is imported on use: only this runner needs it)."""
    from docker.errors import DockerException

    import docker

    try:
        client = docker.from_env()
        client.ping()
    except DockerException as exc:
        raise ConfigError(
            f"--runner docker: no Docker engine answers ({type(exc).__name__}); start it (dockerd, or "
            "`dockerd --bridge=none --iptables=false` where no bridge may be made) or set DOCKER_HOST"
        ) from exc
    return client


def check_image(image: str) -> None:
    """The image must be in the local engine: the runner would otherwise try to pull it."""
    from docker.errors import ImageNotFound

    client = _docker_client()
    try:
        client.images.get(image)
    except ImageNotFound as exc:
        raise ConfigError(
            f"--runner docker: image {image!r} is not in the local engine; build it (make image-cpu, or "
            "docker/build.sh cpu; without Docker Hub: make demo-containers builds the base too) or pass "
            "--set image=<an image that is>"
        ) from exc
    finally:
        client.close()


def local_store() -> Path | None:
    """The local store's absolute path (SAM3PIPE_STORE or the default), None for an s3:// store."""
    store = storage.default_store()
    if storage.is_remote(store):
        return None
    return Path(unquote(urlparse(store).path) if store.startswith("file://") else store).resolve()


def sqlite_folder(uri: str) -> Path | None:
    """The folder of a sqlite tracking store's database file (its artifacts are beside it), else None."""
    parsed = urlparse(uri)
    if parsed.scheme.split("+", 1)[0] != "sqlite" or parsed.path in ("", "/", "/:memory:"):
        return None
    return Path(unquote(parsed.path[1:])).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def tracking_server(log_file: Path) -> Iterator[str]:
    """An `mlflow server` on the local sqlite store for the block; yields its http URI."""
    port = free_port()
    command = mlflow_records.ui_command(port)
    uri = f"http://127.0.0.1:{port}"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT_S
            while True:
                try:
                    with urllib.request.urlopen(f"{uri}/health", timeout=2):
                        break
                except (urllib.error.URLError, OSError):
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise ConfigError(
                            f"--runner docker: the MLflow server for the containers did not start; see {log_file}"
                        ) from None
                    time.sleep(0.5)
            logger.info("containers track to %s (mlflow server on %s)", uri, mlflow_records.tracking_uri())
            yield uri
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def container_settings(tracking_uri: str) -> tuple[dict[str, str], list[Path]]:
    """The components' environment and the host folders mounted at their own paths."""
    env = {name: os.environ[name] for name in PASSED_ENV if os.environ.get(name)}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    state = home().resolve()
    state.mkdir(parents=True, exist_ok=True)
    env["SAM3PIPE_HOME"] = str(state)
    mounts = [state]
    store = local_store()
    if store is None:
        env["SAM3PIPE_STORE"] = os.environ["SAM3PIPE_STORE"]
    else:
        store.mkdir(parents=True, exist_ok=True)
        env["SAM3PIPE_STORE"] = str(store)
        mounts.append(store)
    database = sqlite_folder(mlflow_records.tracking_uri())
    if database is not None:
        mounts.append(database)
    return env, sorted(set(mounts))


@contextmanager
def docker_runner(image: str) -> Iterator[kfp_local.DockerRunner]:
    """A DockerRunner for `image` (checked to be in the engine), with the store and MLflow reachable."""
    check_image(image)
    uri = mlflow_records.tracking_uri()
    with _tracking(uri) as container_uri:
        env, mounts = container_settings(container_uri)
        logger.info("components run in %s as uid %d, mounting %s", image, os.getuid(), ", ".join(map(str, mounts)))
        yield kfp_local.DockerRunner(
            network_mode="host",
            user=f"{os.getuid()}:{os.getgid()}",
            environment=env,
            mounts=[_bind(path) for path in mounts],
        )


@contextmanager
def _tracking(uri: str) -> Iterator[str]:
    """The tracking URI the containers use: a server for the local sqlite store, else `uri` itself."""
    if sqlite_folder(uri) is None:
        yield uri
        return
    with tracking_server(home().resolve() / "docker-runner-mlflow.log") as served:
        yield served


def _bind(path: Path) -> Mount:
    from docker.types import Mount

    return Mount(target=str(path), source=str(path), type="bind")
