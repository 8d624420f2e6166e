"""S3 and S3-compatible stores (MinIO, SeaweedFS) through boto3.

Settings come from the standard AWS environment variables, read on every call so a process can
switch endpoints; path-style addressing keeps MinIO and SeaweedFS working. Transient failures
(connection refused or reset, timeouts, 500/502/503/504, throttling) are retried with
exponential backoff, at most ``SAM3PIPE_S3_MAX_ATTEMPTS`` times and never past
``SAM3PIPE_S3_DEADLINE_S`` seconds after a request's first attempt; anything else fails at once.
So a store that refuses connections is reported within seconds, not minutes.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
from boto3.exceptions import (
    RetriesExceededError,
    S3TransferFailedError,
    S3UploadFailedError,
)
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)
from botocore.retries.standard import (
    OrRetryChecker,
    RetryContext,
    ThrottledRetryableChecker,
    ThrottlingStatusCodeChecker,
    TransientRetryableChecker,
)

from sam3_core.errors import ConfigError, StorageError
from sam3_core.storage.backend import Backend
from sam3_core.storage.local import atomic_path

logger = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_DEADLINE_S = 30.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 60.0
DEFAULT_MULTIPART_THRESHOLD_MB = 64.0
DEFAULT_MULTIPART_CHUNK_MB = 64.0
DEFAULT_MAX_CONCURRENCY = 8
# first retry waits about this long, each next one twice as long (with jitter), capped
BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 5.0

_MIB = 1024 * 1024
_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


# ---------------------------------------------------------------------------- settings


def env_number(name: str, default: float) -> float:
    """A positive number from the environment, or ``default`` when unset."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r}: expected a number") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"environment variable {name}={raw!r}: must be a positive finite number")
    return value


def max_attempts() -> int:
    return max(1, int(env_number("SAM3PIPE_S3_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS)))


def max_concurrency() -> int:
    return max(1, int(env_number("SAM3PIPE_S3_MAX_CONCURRENCY", DEFAULT_MAX_CONCURRENCY)))


def endpoint() -> str | None:
    """The endpoint URL from the environment (validated), None for AWS's default."""
    for name in _ENDPOINT_VARS:
        raw = os.environ.get(name)
        if raw:
            parts = urlsplit(raw)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(
                    f"environment variable {name}={raw!r}: not an http(s) URL; set it to the object store's "
                    "address, e.g. http://minio:9000, or unset it for AWS"
                )
            try:
                _ = parts.port  # raises on a port that is not a number
            except ValueError:
                raise ConfigError(f"environment variable {name}={raw!r}: the port is not a number") from None
            return raw
    return None


def transfer_config() -> TransferConfig:
    """Multipart above the threshold (S3 itself enforces parts of at least 5 MiB)."""
    return TransferConfig(
        multipart_threshold=int(env_number("SAM3PIPE_MULTIPART_THRESHOLD_MB", DEFAULT_MULTIPART_THRESHOLD_MB) * _MIB),
        multipart_chunksize=int(env_number("SAM3PIPE_MULTIPART_CHUNK_MB", DEFAULT_MULTIPART_CHUNK_MB) * _MIB),
        max_concurrency=max_concurrency(),
        num_download_attempts=max_attempts(),
    )


# ---------------------------------------------------------------------------- retries


class RetryPolicy:
    """botocore ``needs-retry`` handler: transient errors only, bounded attempts, backoff, total deadline.

    The client's own retries are switched off (one attempt), so this policy alone decides; the
    deadline runs from the request's first attempt (stamped on ``request-created``).
    """

    _STARTED = "sam3pipe_first_attempt"

    def __init__(self, attempts: int, deadline_s: float) -> None:
        self.attempts, self.deadline_s = attempts, deadline_s
        # its own generator: jitter drawn from Python's global one would make a training run's
        # saved random state depend on how many of its requests were retried
        self._jitter = random.Random()
        self._transient = OrRetryChecker(
            [TransientRetryableChecker(), ThrottledRetryableChecker(), ThrottlingStatusCodeChecker()]
        )

    def stamp(self, request: Any, **_: Any) -> None:
        request.context.setdefault(self._STARTED, time.monotonic())

    def delay(self, attempt: int) -> float:
        """Seconds before retry number ``attempt`` (1-based): exponential, capped, half-jittered."""
        step = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
        return step * (0.5 + self._jitter.random() / 2)

    def needs_retry(
        self, attempts: int, response: Any, caught_exception: Any, request_dict: dict, operation: Any, **_: Any
    ) -> float | None:
        http_response, parsed = response if response is not None else (None, None)
        context = RetryContext(
            attempt_number=attempts,
            operation_model=operation,
            parsed_response=parsed,
            http_response=http_response,
            caught_exception=caught_exception,
            request_context=request_dict["context"],
        )
        if attempts >= self.attempts or not self._transient.is_retryable(context):
            return None
        wait = self.delay(attempts)
        started = request_dict["context"].get(self._STARTED, time.monotonic())
        if time.monotonic() - started + wait > self.deadline_s:
            logger.warning(
                "S3 %s: giving up after %d attempt(s): the %.0f s deadline would pass",
                operation.name,
                attempts,
                self.deadline_s,
            )
            return None
        logger.info(
            "S3 %s: transient failure (attempt %d of %d); retrying in %.2f s",
            operation.name,
            attempts,
            self.attempts,
            wait,
        )
        return wait


# ---------------------------------------------------------------------------- answers


class NotAnS3Answer(BotoCoreError):
    """The endpoint answered an S3 request with a web page: it is not an S3 API (a login portal, a proxy)."""

    fmt = (
        "the endpoint answered {operation} with a web page ({content_type}), not an S3 answer; check "
        "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL point at the object store's S3 API"
    )


# operations whose answer body is the object itself (any content type); every other answer is S3's XML or empty
_OBJECT_BODIES = frozenset({"GetObject", "HeadObject"})


_HTML_START = (b"<!doctype html", b"<html")


def check_answer(http_response: Any, model: Any, **_: Any) -> None:
    """botocore ``after-call`` handler: a successful answer that is an HTML page is not S3's (botocore would
    parse it as an empty listing or a completed write, and a write would look done while nothing was stored).

    The body is what tells: some S3 servers label their empty answers text/html.
    """
    if model.name in _OBJECT_BODIES or not 200 <= http_response.status_code < 300:
        return
    head = (http_response.content or b"")[:64].lstrip().lower()
    if head.startswith(_HTML_START):
        content_type = str(http_response.headers.get("content-type", "")) or "no content type"
        raise NotAnS3Answer(operation=model.name, content_type=content_type)


# ---------------------------------------------------------------------------- client


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str


def location(uri: str, *, need_key: bool = True) -> S3Location:
    rest = uri.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket name; write s3://<bucket>/<key>")
    if _USERINFO.match(rest):
        raise StorageError(
            f"{uri}: an s3:// URI cannot carry credentials (user:password@); write s3://<bucket>/<key> and set "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        )
    if need_key and not key.strip("/"):
        raise StorageError(f"{uri}: no object key; write s3://<bucket>/<key>")
    return S3Location(bucket, key)


# `s3://KEY:SECRET@bucket/...`: a key id, a colon, anything up to an '@' (secrets may hold '/')
_USERINFO = re.compile(r"[^/:@]+:[^@]*@")
_clients: dict[tuple[Any, ...], Any] = {}
_clients_lock = threading.Lock()


def _forget_clients() -> None:
    """A forked child must not share the parent's connections: it builds its own clients (and lock,
    which another thread of the parent may have held at the fork)."""
    global _clients_lock
    _clients.clear()
    _clients_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_clients)


def client() -> Any:
    """The S3 client for the current environment, built once per distinct setting."""
    url = endpoint()
    key_id = os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    token = os.environ.get("AWS_SESSION_TOKEN")
    region = os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    attempts = max_attempts()
    deadline = env_number("SAM3PIPE_S3_DEADLINE_S", DEFAULT_DEADLINE_S)
    connect = env_number("SAM3PIPE_S3_CONNECT_TIMEOUT_S", DEFAULT_CONNECT_TIMEOUT_S)
    read = env_number("SAM3PIPE_S3_READ_TIMEOUT_S", DEFAULT_READ_TIMEOUT_S)
    pool = max_concurrency() + 2
    cache_key = (url, key_id, secret, token, region, attempts, deadline, connect, read, pool)
    with _clients_lock:
        found = _clients.get(cache_key)
        if found is not None:
            return found
        config = Config(
            region_name=region,
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "total_max_attempts": 1},
            connect_timeout=connect,
            read_timeout=read,
            max_pool_connections=pool,
        )
        session = boto3.session.Session(
            aws_access_key_id=key_id, aws_secret_access_key=secret, aws_session_token=token, region_name=region
        )
        made = session.client("s3", endpoint_url=url, config=config)
        policy = RetryPolicy(attempts, deadline)
        made.meta.events.register("request-created.s3", policy.stamp)
        made.meta.events.register("needs-retry.s3", policy.needs_retry)
        made.meta.events.register("after-call.s3", check_answer)
        _clients[cache_key] = made
        logger.debug("created S3 client for endpoint %s", url or "AWS default")
        return made


def _client_error(exc: BaseException) -> ClientError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ClientError):
            return seen
        if isinstance(seen, RetriesExceededError) and isinstance(seen.last_exception, ClientError):
            return seen.last_exception
        seen = seen.__cause__ or seen.__context__
    return None


def _error_code(exc: BaseException) -> str:
    found = _client_error(exc)
    return str(found.response.get("Error", {}).get("Code", "")) if found is not None else ""


# ---------------------------------------------------------------------------- backend


class S3Backend(Backend):
    remote = True

    def check(self, uri: str, *, need_key: bool = True) -> None:
        location(uri, need_key=need_key)

    def join(self, base: str, segments: list[str]) -> str:
        location(base, need_key=False)
        return "/".join([base.rstrip("/"), *segments])

    def read_bytes(self, uri: str) -> bytes:
        loc = location(uri)
        buffer = io.BytesIO()
        client().download_fileobj(loc.bucket, loc.key, buffer, Config=transfer_config())
        return buffer.getvalue()

    def write_bytes(self, uri: str, data: bytes) -> None:
        loc = location(uri)
        client().upload_fileobj(io.BytesIO(data), loc.bucket, loc.key, Config=transfer_config())

    def exists(self, uri: str) -> bool:
        loc = location(uri)
        try:
            client().head_object(Bucket=loc.bucket, Key=loc.key)
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def size(self, uri: str) -> int:
        loc = location(uri)
        return int(client().head_object(Bucket=loc.bucket, Key=loc.key)["ContentLength"])

    def list_files(self, prefix: str) -> list[str]:
        loc = location(prefix, need_key=False)
        folder = loc.key.strip("/")
        folder = f"{folder}/" if folder else ""
        keys: list[str] = []
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=folder):
            keys.extend(
                item["Key"][len(folder) :] for item in page.get("Contents", []) if not item["Key"].endswith("/")
            )
        return sorted(keys)

    def upload_file(self, path: Path, uri: str) -> None:
        loc = location(uri)
        client().upload_file(str(path), loc.bucket, loc.key, Config=transfer_config())

    def download_file(self, uri: str, path: Path) -> None:
        loc = location(uri)
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            client().download_fileobj(loc.bucket, loc.key, handle, Config=transfer_config())

    def copy(self, src: str, dst: str) -> None:
        source, target = location(src), location(dst)
        client().copy({"Bucket": source.bucket, "Key": source.key}, target.bucket, target.key, Config=transfer_config())

    def delete(self, uri: str) -> None:
        loc = location(uri)
        client().delete_object(Bucket=loc.bucket, Key=loc.key)

    def delete_many(self, uris: list[str]) -> None:
        by_bucket: dict[str, list[str]] = {}
        for uri in uris:
            loc = location(uri)
            by_bucket.setdefault(loc.bucket, []).append(loc.key)
        for bucket, keys in by_bucket.items():
            for start in range(0, len(keys), 1000):
                batch = [{"Key": key} for key in keys[start : start + 1000]]
                response = client().delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
                if response.get("Errors"):
                    first = response["Errors"][0]
                    raise StorageError(
                        f"s3://{bucket}: delete failed for {len(response['Errors'])} objects, "
                        f"first {first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                    )

    def delete_prefix(self, prefix: str) -> None:
        location(prefix)  # never a whole bucket
        self.delete_many([self.join(prefix, rel.split("/")) for rel in self.list_files(prefix)])

    def cache_key(self, uri: str) -> str:
        return f"{endpoint() or ''}\n{uri}"

    def explain(self, exc: BaseException) -> str:
        found = _client_error(exc)
        if found is not None:
            error = found.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                return "no such object; check the URI or run the step that produces it"
            if code == "NoSuchBucket":
                return "the bucket does not exist; create it or point SAM3PIPE_STORE at an existing bucket"
            if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return f"access denied ({code}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy"
            return f"{code}: {error.get('Message', found)}"
        if isinstance(exc, NoCredentialsError):
            return "no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        if isinstance(exc, EndpointConnectionError):
            return (
                f"cannot reach the S3 endpoint {endpoint() or '(AWS default)'} after {max_attempts()} attempt(s); "
                "check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, that the store is running, and the network"
            )
        if isinstance(exc, BotoCoreError):
            return f"{exc}; check the object store at {endpoint() or '(AWS default)'}"
        if isinstance(exc, OSError):
            return exc.strerror or str(exc)
        return str(exc)

    def failures(self) -> tuple[type[BaseException], ...]:
        return (ClientError, BotoCoreError, S3UploadFailedError, S3TransferFailedError, RetriesExceededError, OSError)

    def unreachable(self, exc: BaseException) -> bool:
        # boto3's transfer manager wraps the connection error (last_exception, or the cause)
        seen: BaseException | None = exc
        for _ in range(8):
            if seen is None:
                return False
            if isinstance(seen, (BotoConnectionError, ConnectionClosedError, ReadTimeoutError)):
                return True
            seen = getattr(seen, "last_exception", None) or seen.__cause__ or seen.__context__
        return False
