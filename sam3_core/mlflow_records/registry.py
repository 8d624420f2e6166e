"""The Model Registry holds references to checkpoints, never the bytes.

Each pipeline run registers one version whose source is the checkpoint's URI in the
object store, linked to the best checkpoint's logged model, tagged with the pipeline run id,
and points an alias (`candidate`) at it. `resolve_model_uri` turns `models:/<name>@<alias>`
or `models:/<name>/<version>` back into that URI, so predict accepts a registry name wherever
it accepts a checkpoint; it answers within `mlflow.lookup_timeout_s` when the server is down.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from sam3_core.errors import InputError, Sam3PipeError
from sam3_core.mlflow_records import mlflow_api
from sam3_core.mlflow_records.redact import describe_error, redact_text
from sam3_core.mlflow_records.runs import TAG_PIPELINE_RUN_ID, TAG_SUPERSEDED_BY
from sam3_core.mlflow_records.sender import is_transient, tracking_errors
from sam3_core.mlflow_records.settings import MlflowConfig, fail_fast_http, tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

logger = logging.getLogger(__name__)
T = TypeVar("T")
# The version's logged model, also where the server's own link (`mlflow.modelVersions` on the
# logged model) is missing: a local sqlite registry does not keep one.
TAG_MODEL_ID = "sam3pipe.model_id"

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


# Parallel trials of a sweep register versions of one model under one alias. The registry sets an
# alias by looking it up and inserting it when absent; when another trial inserts it in between, the
# database refuses the second insert (MLflow answers BAD_REQUEST) and setting it again updates it.
ALIAS_ATTEMPTS = 3
ALIAS_RETRY_S = 0.2


def _set_alias(client: MlflowClient, name: str, alias: str, version: str | int) -> None:
    for attempt in range(1, ALIAS_ATTEMPTS + 1):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except mlflow_api.MlflowException as exc:
            if exc.error_code != "BAD_REQUEST" or attempt == ALIAS_ATTEMPTS:
                raise
            logger.info("alias %s of %s was set meanwhile by another registration; setting it again", alias, name)
            time.sleep(ALIAS_RETRY_S * attempt)


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name, description="SAM3 video fine-tunes; versions point at checkpoints")
    except mlflow_api.MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def register_checkpoint(
    client: MlflowClient,
    name: str,
    alias: str,
    checkpoint_uri: str,
    run_id: str,
    pipeline_run_id: str,
    model_id: str | None = None,
) -> ModelVersion:
    """The version of `name` for this pipeline run, sourced at `checkpoint_uri`, with `alias` on it.

    `model_id` (the best checkpoint's logged model) links the version to that model. A rerun
    that registers the same checkpoint reuses its version; one that registers a new checkpoint
    gets a new version and the earlier one is tagged `sam3pipe.superseded_by`.
    """
    _ensure_registered_model(client, name)
    earlier = client.search_model_versions(f"name = '{name}' and tags.`{TAG_PIPELINE_RUN_ID}` = '{pipeline_run_id}'")
    version = next((v for v in earlier if v.source == checkpoint_uri), None)
    if version is None:
        version = client.create_model_version(
            name,
            checkpoint_uri,
            run_id=run_id,
            tags={TAG_PIPELINE_RUN_ID: pipeline_run_id, **({TAG_MODEL_ID: model_id} if model_id else {})},
            await_creation_for=0,
            model_id=model_id,
        )
        for old in earlier:
            client.set_model_version_tag(name, old.version, TAG_SUPERSEDED_BY, version.version)
    _set_alias(client, name, alias, version.version)
    logger.info("registered %s version %s (alias %s) -> %s", name, version.version, alias, checkpoint_uri)
    return version


def within_deadline(fn: Callable[[], T], cfg: MlflowConfig) -> T:
    """`fn()`, retried with backoff on transient errors only, given up at `cfg.lookup_timeout_s` in total."""
    deadline = time.monotonic() + cfg.lookup_timeout_s
    delay = cfg.retry_initial_s
    while True:
        try:
            return fn()
        except tracking_errors() as exc:
            if not is_transient(exc) or time.monotonic() + delay >= deadline:
                raise
            logger.info("MLflow look-up failed (%s); retrying in %.1fs", describe_error(exc), delay)
            time.sleep(delay)
            delay = min(delay * 2, cfg.retry_max_s)


def resolve_model_uri(uri: str, client: MlflowClient | None = None, cfg: MlflowConfig | None = None) -> str:
    """`models:/<name>@<alias>` or `models:/<name>/<version>` -> the checkpoint URI; other URIs unchanged.

    Bounded by `cfg.lookup_timeout_s` (each request by `request_timeout_s`): a server that is
    down is reported within seconds, not after MLflow's own minutes of retries.
    """
    if not uri.startswith("models:/"):
        return uri
    match = _MODELS_URI.match(uri)
    if match is None:
        raise InputError(uri, "model.uri", "write models:/<name>@<alias> or models:/<name>/<version>")
    cfg = cfg or MlflowConfig()
    fail_fast_http(cfg)
    client = client or mlflow_api.MlflowClient(tracking_uri())
    name, alias, version = match["name"], match["alias"], match["version"]
    try:
        found = within_deadline(
            lambda: (
                client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
            ),
            cfg,
        )
    except tracking_errors() as exc:
        where = redact_text(tracking_uri())
        if is_transient(exc):
            raise Sam3PipeError(
                f"{uri}: the model registry at {where} did not answer within mlflow.lookup_timeout_s="
                f"{cfg.lookup_timeout_s:g}s ({describe_error(exc)}); start the server or check MLFLOW_TRACKING_URI"
            ) from exc
        raise InputError(
            uri,
            "model.uri",
            f"not in the model registry at {where} ({describe_error(exc)}); register it by running train "
            "with tracking enabled, or pass a checkpoint URI",
        ) from exc
    logger.info("resolved %s to %s (version %s)", uri, found.source, found.version)
    return found.source
