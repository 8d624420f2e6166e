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
    arguments = parse_arguments(table.RUN if sweep is None else table.SWEEP, pairs, sweep)
    pipeline = pipeline_for(settings, sweep)
    try:
        # kfp.Client prints links on stdout; keep stdout for the CLI's one JSON line
        with contextlib.redirect_stdout(sys.stderr):
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
    except (kfp_server_api.ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SubmitError(
            f"Kubeflow Pipelines at {host}: {first_line}; check --host, the token and the namespace"
        ) from exc
    url = f"{host.rstrip('/')}/#/runs/details/{result.run_id}"
    logger.info("submitted run %s: %s", result.run_id, url)
    return {"run_id": result.run_id, "url": url}
