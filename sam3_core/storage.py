"""One API for the object store: plain local paths, ``file://`` URIs and ``s3://bucket/key``.

Every artifact of the pipeline is a URI, so the same component code runs against a laptop
directory and a cluster bucket. S3 settings come from the standard AWS environment
variables (read on every call, so a process can switch endpoints); path-style addressing
keeps MinIO and SeaweedFS working. Writes never expose half a file: local writes go
through a temporary file and ``os.replace``; ``publish_dir`` writes its marker last.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import posixpath
import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

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
    EndpointConnectionError,
    NoCredentialsError,
)
from tqdm import tqdm

from sam3_core.errors import ConfigError, InputError, StorageError

logger = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_MULTIPART_THRESHOLD_MB = 64.0
DEFAULT_MULTIPART_CHUNK_MB = 64.0
DEFAULT_MAX_CONCURRENCY = 8
# Expanded at call time: containers running under an arbitrary uid may have no home at import.
DEFAULT_CACHE_DIR = "~/.cache/sam3pipe"

_MIB = 1024 * 1024
_HASH_CHUNK = _MIB
# Suffix of in-flight local writes; listings skip them so a reader never sees half a file.
_TMP_SUFFIX = ".sam3pipe-tmp"
_SUPPORTED = "plain paths, file:// URIs and s3://bucket/key"

_clients: dict[tuple[Any, ...], Any] = {}
_clients_lock = threading.Lock()


# ---------------------------------------------------------------------------- URIs


@dataclass(frozen=True)
class _S3Location:
    bucket: str
    key: str


def _scheme(uri: str) -> str:
    if "://" not in uri:
        return ""
    scheme = uri.split("://", 1)[0].lower()
    if scheme not in ("s3", "file"):
        raise StorageError(f"{uri}: unsupported URI scheme {scheme!r}; use {_SUPPORTED}")
    return scheme


def is_remote(uri: str) -> bool:
    """True for ``s3://`` URIs, i.e. when reading means a network transfer."""
    return _scheme(str(uri)) == "s3"


def _s3(uri: str, *, need_key: bool = True) -> _S3Location:
    rest = uri.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket name; write s3://<bucket>/<key>")
    if need_key and not key.strip("/"):
        raise StorageError(f"{uri}: no object key; write s3://<bucket>/<key>")
    return _S3Location(bucket, key)


def _local(uri: str | Path) -> Path:
    uri = str(uri)
    if _scheme(uri) != "file":
        return Path(uri)
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise StorageError(f"{uri}: file:// URIs must name a local path (file:///abs/path)")
    return Path(unquote(parts.path))


def _check_part(base: str, part: str) -> list[str]:
    if "://" in part:
        raise StorageError(f"{base}: refusing to join URI {part!r}; pass a relative key")
    if part.startswith("/"):
        raise StorageError(f"{base}: refusing absolute path {part!r}; pass a key relative to the base")
    segments = part.split("/")
    for segment in segments:
        if segment in ("", ".", ".."):
            raise StorageError(
                f"{base}: refusing key {part!r}: empty, '.' or '..' segments would escape or alias the base"
            )
    return segments


def join(base: str, *parts: str) -> str:
    """Append relative keys to ``base``, refusing any part that could escape it."""
    base = str(base)
    segments = [segment for part in parts for segment in _check_part(base, str(part))]
    if not segments:
        return base
    scheme = _scheme(base)
    if scheme == "s3":
        _s3(base, need_key=False)
        return "/".join([base.rstrip("/"), *segments])
    if scheme == "file":
        return "file://" + posixpath.join(_local(base).as_posix(), *segments)
    return posixpath.join(base, *segments)


# ---------------------------------------------------------------------------- settings


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r}: expected a number") from None
    if value <= 0:
        raise ConfigError(f"environment variable {name}={raw!r}: must be positive")
    return value


def _max_attempts() -> int:
    return int(_env_number("SAM3PIPE_S3_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS))


def _max_concurrency() -> int:
    return int(_env_number("SAM3PIPE_S3_MAX_CONCURRENCY", DEFAULT_MAX_CONCURRENCY))


def _transfer_config() -> TransferConfig:
    """Multipart above the threshold (S3 itself enforces parts of at least 5 MiB)."""
    return TransferConfig(
        multipart_threshold=int(_env_number("SAM3PIPE_MULTIPART_THRESHOLD_MB", DEFAULT_MULTIPART_THRESHOLD_MB) * _MIB),
        multipart_chunksize=int(_env_number("SAM3PIPE_MULTIPART_CHUNK_MB", DEFAULT_MULTIPART_CHUNK_MB) * _MIB),
        max_concurrency=_max_concurrency(),
        num_download_attempts=_max_attempts(),
    )


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _client() -> Any:
    """The S3 client for the current environment, built once per distinct setting."""
    endpoint = _endpoint()
    key_id = os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    token = os.environ.get("AWS_SESSION_TOKEN")
    region = os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    attempts = _max_attempts()
    pool = _max_concurrency() + 2
    cache_key = (endpoint, key_id, secret, token, region, attempts, pool)
    with _clients_lock:
        client = _clients.get(cache_key)
        if client is None:
            config = Config(
                region_name=region,
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "max_attempts": attempts},
                max_pool_connections=pool,
            )
            session = boto3.session.Session(
                aws_access_key_id=key_id, aws_secret_access_key=secret, aws_session_token=token, region_name=region
            )
            client = session.client("s3", endpoint_url=endpoint, config=config)
            _clients[cache_key] = client
            logger.debug("created S3 client for endpoint %s", endpoint or "AWS default")
    return client


# ---------------------------------------------------------------------------- errors


def _client_error(exc: BaseException) -> ClientError | None:
    seen = exc
    while seen is not None:
        if isinstance(seen, ClientError):
            return seen
        if isinstance(seen, RetriesExceededError) and isinstance(seen.last_exception, ClientError):
            return seen.last_exception
        seen = seen.__cause__ or seen.__context__
    return None


def _explain(exc: BaseException) -> str:
    client_error = _client_error(exc)
    if client_error is not None:
        error = client_error.response.get("Error", {})
        code = str(error.get("Code", ""))
        if code in ("NoSuchKey", "404", "NotFound"):
            return "no such object; check the URI or run the step that produces it"
        if code == "NoSuchBucket":
            return "the bucket does not exist; create it or point SAM3PIPE_STORE at an existing bucket"
        if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return (
                f"access denied ({code}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                "and the bucket policy"
            )
        return f"{code}: {error.get('Message', client_error)}"
    if isinstance(exc, NoCredentialsError):
        return "no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    if isinstance(exc, EndpointConnectionError):
        return (
            f"cannot reach the S3 endpoint {_endpoint() or '(AWS default)'}; "
            "check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL and the network"
        )
    if isinstance(exc, FileNotFoundError):
        return f"no such file {exc.filename}; check the path or run the step that produces it"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


_FAILURES = (ClientError, BotoCoreError, S3UploadFailedError, S3TransferFailedError, RetriesExceededError, OSError)


@contextlib.contextmanager
def _errors(uri: str, action: str) -> Iterator[None]:
    """Turn boto and filesystem failures into a StorageError that names the URI."""
    try:
        yield
    except StorageError:
        raise
    except _FAILURES as exc:
        raise StorageError(f"{uri}: {action} failed: {_explain(exc)}") from exc


# ---------------------------------------------------------------------------- local helpers


@functools.cache
def _process_umask() -> int:
    """The umask, read without changing it (os.umask can only be read by setting it)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


@contextlib.contextmanager
def _atomic_local(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; published files get the mode a plain open() would give them
        os.chmod(tmp, 0o666 & ~_process_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_partial_writes(folder: str) -> list[str]:
    """Delete the hidden temp files that killed local writes left directly in ``folder``; their paths.

    An interrupted ``_atomic_local`` leaves ``.<name>.<random>.sam3pipe-tmp`` behind; listings
    skip them, so only this finds them. Object stores have no such leftovers (a killed
    multipart upload never becomes an object).
    """
    if is_remote(folder):
        return []
    root = _local(folder)
    if not root.is_dir():
        return []
    removed = []
    for path in root.glob(f".*{_TMP_SUFFIX}"):
        path.unlink(missing_ok=True)
        removed.append(str(path))
    return removed


def _write_local(path: Path, data: bytes) -> None:
    with _atomic_local(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def _copy_local(src: Path, dst: Path) -> None:
    with _atomic_local(dst) as tmp:
        shutil.copyfile(src, tmp)


# ---------------------------------------------------------------------------- bytes / text / json


def read_bytes(uri: str) -> bytes:
    """Whole object as bytes (s3 reads go through the transfer manager, which retries broken streams)."""
    uri = str(uri)
    with _errors(uri, "read"):
        if is_remote(uri):
            loc = _s3(uri)
            buffer = io.BytesIO()
            _client().download_fileobj(loc.bucket, loc.key, buffer, Config=_transfer_config())
            return buffer.getvalue()
        return _local(uri).read_bytes()


def write_bytes(uri: str, data: bytes) -> None:
    """Create or replace one object; readers see the old or the new bytes, never a mix."""
    uri = str(uri)
    with _errors(uri, "write"):
        if is_remote(uri):
            loc = _s3(uri)
            _client().upload_fileobj(io.BytesIO(data), loc.bucket, loc.key, Config=_transfer_config())
        else:
            _write_local(_local(uri), data)


def read_text(uri: str) -> str:
    """UTF-8 text of one object."""
    data = read_bytes(uri)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(uri, f"byte {exc.start}", "not valid UTF-8 text") from None


def write_text(uri: str, text: str) -> None:
    """Write text as UTF-8."""
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    """Parse one JSON object; a malformed file is an InputError pointing at the line."""
    text = read_text(uri)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(uri, f"line {exc.lineno} column {exc.colno}", f"invalid JSON: {exc.msg}") from None


def write_json(uri: str, obj: Any) -> None:
    """Compact, key-sorted UTF-8 JSON: equal objects give equal bytes, so hashes are stable."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    write_bytes(uri, text.encode("utf-8"))


# ---------------------------------------------------------------------------- listing / existence


def exists(uri: str) -> bool:
    """True when ``uri`` names an existing object (a file locally; a folder is not an object)."""
    uri = str(uri)
    if not is_remote(uri):
        return _local(uri).is_file()
    loc = _s3(uri)
    try:
        _client().head_object(Bucket=loc.bucket, Key=loc.key)
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            return False
        raise StorageError(f"{uri}: existence check failed: {_explain(exc)}") from exc
    except _FAILURES as exc:
        raise StorageError(f"{uri}: existence check failed: {_explain(exc)}") from exc
    return True


def _size(uri: str) -> int:
    with _errors(uri, "size check"):
        if is_remote(uri):
            loc = _s3(uri)
            return int(_client().head_object(Bucket=loc.bucket, Key=loc.key)["ContentLength"])
        return _local(uri).stat().st_size


def list_files(prefix: str) -> list[str]:
    """Every object under the folder ``prefix``, recursively, as sorted posix keys relative to it."""
    prefix = str(prefix)
    with _errors(prefix, "listing"):
        if is_remote(prefix):
            loc = _s3(prefix, need_key=False)
            folder = loc.key.strip("/")
            folder = f"{folder}/" if folder else ""
            keys: list[str] = []
            for page in _client().get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=folder):
                keys.extend(
                    item["Key"][len(folder) :] for item in page.get("Contents", []) if not item["Key"].endswith("/")
                )
            return sorted(keys)
        root = _local(prefix)
        if not root.is_dir():
            return []
        return sorted(
            path.relative_to(root).as_posix()
            for path in root.rglob("*")
            if not path.is_dir() and not path.name.endswith(_TMP_SUFFIX)
        )


# ---------------------------------------------------------------------------- transfers


def upload_file(local_path: str | Path, uri: str) -> None:
    """Copy a local file to ``uri``; big files go up in parallel multipart chunks."""
    uri = str(uri)
    with _errors(uri, f"upload of {local_path}"):
        if is_remote(uri):
            loc = _s3(uri)
            _client().upload_file(str(local_path), loc.bucket, loc.key, Config=_transfer_config())
        else:
            _copy_local(Path(local_path), _local(uri))


def download_file(uri: str, local_path: str | Path) -> None:
    """Copy ``uri`` to a local file; the file appears complete or not at all."""
    uri = str(uri)
    with _errors(uri, f"download to {local_path}"):
        if not is_remote(uri):
            _copy_local(_local(uri), Path(local_path))
            return
        loc = _s3(uri)
        with _atomic_local(Path(local_path)) as tmp, open(tmp, "wb") as handle:
            _client().download_fileobj(loc.bucket, loc.key, handle, Config=_transfer_config())


def copy(src: str, dst: str) -> None:
    """Copy one object between any two supported locations (s3 to s3 stays server-side)."""
    src, dst = str(src), str(dst)
    if not is_remote(src):
        upload_file(_local(src), dst)
    elif not is_remote(dst):
        download_file(src, _local(dst))
    else:
        source, target = _s3(src), _s3(dst)
        with _errors(src, f"copy to {dst}"):
            _client().copy(
                {"Bucket": source.bucket, "Key": source.key}, target.bucket, target.key, Config=_transfer_config()
            )


def delete(uri: str) -> None:
    """Remove one object; removing a missing object is not an error."""
    uri = str(uri)
    with _errors(uri, "delete"):
        if is_remote(uri):
            loc = _s3(uri)
            _client().delete_object(Bucket=loc.bucket, Key=loc.key)
        else:
            _local(uri).unlink(missing_ok=True)


def _delete_s3_keys(label: str, bucket: str, keys: list[str]) -> None:
    client = _client()
    with _errors(label, "delete"):
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            response = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            if response.get("Errors"):
                first = response["Errors"][0]
                raise StorageError(
                    f"{label}: delete failed for {len(response['Errors'])} objects, "
                    f"first {first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )


def delete_prefix(prefix: str) -> None:
    """Remove every object under the folder ``prefix`` (never a whole bucket)."""
    prefix = str(prefix)
    if is_remote(prefix):
        loc = _s3(prefix)
        folder = loc.key.strip("/")
        _delete_s3_keys(prefix, loc.bucket, [f"{folder}/{rel}" for rel in list_files(prefix)])
        return
    with _errors(prefix, "delete"):
        root = _local(prefix)
        if root.is_dir():
            shutil.rmtree(root)


# ---------------------------------------------------------------------------- checksums


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a local file, read in chunks so checkpoints never sit in memory whole."""
    digest = hashlib.sha256()
    with _errors(str(path), "checksum"), open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- atomic publish


def _upload_verified(path: Path, uri: str) -> None:
    upload_file(path, uri)
    expected, actual = path.stat().st_size, _size(uri)
    if expected != actual:
        raise StorageError(f"{uri}: uploaded {actual} bytes but {path} has {expected}; retry the publish")


def publish_dir(local_dir: str | Path, dest: str, marker: str = "manifest.json") -> None:
    """Upload a finished local folder so that ``dest`` only ever looks complete or absent.

    The marker goes up last, after every other file is uploaded and its size checked; a
    reader that checks ``is_published`` therefore never sees a partial artifact. On any
    failure the objects of this publish are removed again and the marker is never written.
    An earlier marker at ``dest`` is removed first, so a republish is invisible until done.
    """
    root = Path(local_dir)
    if not root.is_dir():
        raise StorageError(f"{root}: not a folder; nothing to publish to {dest}")
    marker_path = root / marker
    if not marker_path.is_file():
        raise StorageError(f"{marker_path}: missing; write the marker ({marker}) before publishing to {dest}")
    targets = {rel: join(dest, rel) for rel in list_files(str(root)) if rel != marker}
    marker_uri = join(dest, marker)
    delete(marker_uri)
    try:
        _upload_all(root, targets, dest)
        _upload_verified(marker_path, marker_uri)
    except BaseException as exc:
        # the marker first: a marker whose verification failed must not outlive its files
        _roll_back(dest, [marker_uri, *targets.values()])
        if isinstance(exc, StorageError) or not isinstance(exc, Exception):
            raise
        raise StorageError(f"{dest}: publish of {root} failed and was rolled back: {_explain(exc)}") from exc
    logger.info("published %d files from %s to %s", len(targets) + 1, root, dest)


def _upload_all(root: Path, targets: dict[str, str], dest: str) -> None:
    """Upload in parallel; on the first failure cancel what has not started and wait for the rest."""
    with ThreadPoolExecutor(max_workers=_max_concurrency()) as pool:
        futures = [pool.submit(_upload_verified, root / rel, uri) for rel, uri in targets.items()]
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc=f"publish {dest}", unit="file"):
                future.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _roll_back(dest: str, uris: list[str]) -> None:
    """Remove every object a failed publish may have written (all uploads have stopped by now)."""
    try:
        if is_remote(dest):
            _delete_s3_keys(dest, _s3(dest, need_key=False).bucket, [_s3(uri).key for uri in uris])
        else:
            for uri in uris:
                delete(uri)
    except StorageError as exc:
        logger.error("rollback of the failed publish to %s is incomplete: %s", dest, exc)
        return
    logger.warning("publish to %s failed; removed its %d objects", dest, len(uris))


def is_published(dest: str, marker: str = "manifest.json") -> bool:
    """True once ``publish_dir`` completed for ``dest``."""
    return exists(join(dest, marker))


# ---------------------------------------------------------------------------- read cache


def _verify(path: Path, sha256: str) -> bool:
    return sha256_file(path) == sha256.lower()


def cached_path(uri: str, cache_dir: str | Path | None = None, sha256: str | None = None) -> Path:
    """A local file with the content of ``uri``, for libraries that need a path (torch.load, PIL).

    Remote objects are downloaded once into the cache, keyed by endpoint and URI; the cache
    trusts that a URI's content never changes (artifacts are content-addressed or run-scoped),
    so a second call makes no network request. With ``sha256`` the file is verified; a
    cached copy that fails is downloaded again, a fresh download that fails is removed.
    """
    uri = str(uri)
    if not is_remote(uri):
        path = _local(uri)
        if not path.is_file():
            raise StorageError(f"{uri}: no such file; check the path or run the step that produces it")
        if sha256 is not None and not _verify(path, sha256):
            raise StorageError(f"{uri}: sha256 mismatch (expected {sha256}); the file is corrupt or was replaced")
        return path
    loc = _s3(uri)
    if cache_dir is None:
        cache_dir = os.environ.get("SAM3PIPE_CACHE") or Path(DEFAULT_CACHE_DIR).expanduser()
    root = Path(cache_dir)
    digest = sha256_bytes(f"{_endpoint() or ''}\n{uri}".encode())
    path = root / digest[:2] / digest / posixpath.basename(loc.key.rstrip("/"))
    if path.is_file() and (sha256 is None or _verify(path, sha256)):
        logger.debug("cache hit for %s at %s", uri, path)
        return path
    download_file(uri, path)
    if sha256 is not None and not _verify(path, sha256):
        path.unlink(missing_ok=True)
        raise StorageError(
            f"{uri}: sha256 mismatch after download (expected {sha256}); the object is corrupt or was replaced"
        )
    return path
