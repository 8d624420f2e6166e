"""Submit a pipeline run to a Kubeflow Pipelines API server.

Authentication, in order (the usual Kubeflow ways):
1. a bearer token given with `--existing-token` or the env variable KFP_EXISTING_TOKEN (the same
   variable the `kfp` CLI reads), e.g. `kubectl create token <sa> --audience=pipelines.kubeflow.org`;
2. a projected service-account token file: KF_PIPELINES_SA_TOKEN_PATH, or the in-cluster default
   /var/run/secrets/kubeflow/pipelines/token (a notebook or pod in the cluster);
3. none, for a port-forwarded or unauthenticated endpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kfp
import kfp_server_api
import urllib3
from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

from pipeline.arguments import parse_arguments
from pipeline.compile import pipeline_for
from pipeline.settings import PipelineSettings
from sam3_core import pipeline_parameters as table
from sam3_core.errors import InputError, Sam3PipeError

logger = logging.getLogger(__name__)

TOKEN_ENV = "KFP_EXISTING_TOKEN"
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
SA_TOKEN_DEFAULT = Path("/var/run/secrets/kubeflow/pipelines/token")
# each request to the KFP API: connect and every wait for bytes (kfp's client retries a few times on top)
TIMEOUT_ENV = "SAM3PIPE_KFP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 30.0


class SubmitError(Sam3PipeError):
    """The Kubeflow Pipelines API refused or could not be reached."""


def auth_kwargs(existing_token: str | None) -> dict[str, Any]:
    """The kfp.Client keyword arguments that authenticate this submission (see module doc)."""
    token = existing_token or os.environ.get(TOKEN_ENV)
    if token:
        return {"existing_token": token}
    configured = os.environ.get(SA_TOKEN_PATH_ENV)
    if configured and not Path(configured).is_file():
        raise InputError(SA_TOKEN_PATH_ENV, "path", f"no token file at {configured}")
    path = Path(configured) if configured else SA_TOKEN_DEFAULT
    if path.is_file():
        return {"credentials": ServiceAccountTokenVolumeCredentials(path=str(path))}
    return {}


def submit(
    settings: PipelineSettings,
    host: str,
    pairs: list[str],
    experiment: str | None = None,
    namespace: str | None = None,
    run_name: str | None = None,
    service_account: str | None = None,
    existing_token: str | None = None,
    enable_caching: bool | None = None,
    sweep: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Compile the pipeline for `settings`, start a run with `pairs` as parameters; return its id and URL.

    `enable_caching=False` reruns every component; None keeps the compiled choice (only data prep cached).
    With a sweep spec (sweep.load_spec) the sweep pipeline runs, with the spec as its arguments.
    """
    check_host(host)
    arguments = parse_arguments(table.RUN if sweep is None else table.SWEEP, pairs, sweep)
    pipeline = pipeline_for(settings, sweep)
    try:
        # kfp.Client prints links on stdout; keep stdout for the CLI's one JSON line
        with contextlib.redirect_stdout(sys.stderr), bounded_waits(request_timeout_s()):
            client = kfp.Client(host=host, namespace=namespace, **auth_kwargs(existing_token))
            result = client.create_run_from_pipeline_func(
                pipeline,
                arguments=arguments,
                run_name=run_name,
                experiment_name=experiment,
                namespace=namespace,
                service_account=service_account,
                enable_caching=enable_caching,
            )
    except (kfp_server_api.ApiException, urllib3.exceptions.HTTPError, OSError, ValueError, AttributeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SubmitError(
            f"Kubeflow Pipelines at {host}: {first_line[:300]}; check --host (a KFP API endpoint), the token and "
            f"the namespace (each request waits at most {TIMEOUT_ENV}={request_timeout_s():g} s)"
        ) from exc
    run_id = getattr(result, "run_id", None)
    if not isinstance(run_id, str) or not run_id:
        raise SubmitError(
            f"Kubeflow Pipelines at {host}: the answer holds no run id ({str(run_id)[:80]!r}), so no run was started; "
            "is --host the KFP API (e.g. http://<host>/pipeline on Kubeflow, or the ml-pipeline service)?"
        )
    url = f"{host.rstrip('/')}/#/runs/details/{run_id}"
    logger.info("submitted run %s: %s", run_id, url)
    return {"run_id": run_id, "url": url}


def check_host(host: str) -> None:
    """An http(s) URL with a host: anything else is one line here, not a warning and a guess by kfp."""
    parts = urllib.parse.urlsplit(host)
    try:
        _ = parts.port
    except ValueError:
        raise InputError(host, "--host", "the port is not a number") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(host, "--host", "must be the KFP API's http(s) URL, e.g. http://localhost:8080")


def request_timeout_s() -> float:
    """Seconds one request to the KFP API may take (connect, and each wait for an answer)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_TIMEOUT_S
    except ValueError:
        raise InputError(TIMEOUT_ENV, raw, "must be a number of seconds") from None
    if not 0 < value <= 3600:
        raise InputError(TIMEOUT_ENV, raw, "must be a number of seconds in (0, 3600]")
    return value


@contextlib.contextmanager
def bounded_waits(seconds: float) -> Iterator[None]:
    """Every request kfp's API client makes in this block waits at most `seconds` to connect and for each
    answer (the client sets no timeout of its own): a host that accepts the connection and never answers
    is an error, not a hang."""
    rest = kfp_server_api.rest.RESTClientObject
    original = rest.request

    def request(self: Any, *args: Any, _request_timeout: Any = None, **kwargs: Any) -> Any:
        return original(self, *args, _request_timeout=_request_timeout or (seconds, seconds), **kwargs)

    rest.request = request
    try:
        yield
    finally:
        rest.request = original
