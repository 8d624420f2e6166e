"""One API for the object store: plain local paths, ``file://`` URIs and ``s3://bucket/key``.

Every artifact of the pipeline is a URI, so the same component code runs against a laptop
directory and a cluster bucket. Each scheme is one ``Backend`` class (``local``, ``s3``); the
functions here (publish, rollback, checksums, read caches) are written once on top of that
interface, and a new scheme is one class passed to ``register_backend``. Writes never expose
half a file: local writes go through a temporary file and ``os.replace``; ``publish_dir`` and
``publish`` write their marker last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from sam3_core.errors import InputError, StorageError
from sam3_core.storage.backend import Backend, backend_for, register_backend
from sam3_core.storage.backend import errors as _errors
from sam3_core.storage.cache import DEFAULT_CACHE_DIR, ReadCache, cache_root, cached_path
from sam3_core.storage.local import TMP_SUFFIX, LocalBackend, local_path, regular_file
from sam3_core.storage.s3 import S3Backend, max_concurrency

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DEFAULT_STORE",
    "STORE_ENV",
    "Backend",
    "ReadCache",
    "backend_for",
    "cache_root",
    "cached_path",
    "copy",
    "default_store",
    "delete",
    "delete_prefix",
    "download_file",
    "exists",
    "is_published",
    "is_remote",
    "join",
    "list_files",
    "publish",
    "publish_dir",
    "read_bytes",
    "read_json",
    "read_text",
    "register_backend",
    "remove_partial_writes",
    "sha256_bytes",
    "sha256_file",
    "size",
    "upload_file",
    "write_bytes",
    "write_json",
    "write_text",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

_HASH_CHUNK = 1024 * 1024
# the store root every component and the pipeline share: this variable, else a local folder
STORE_ENV = "SAM3PIPE_STORE"
DEFAULT_STORE = ".sam3pipe/store"

_LOCAL = LocalBackend()
register_backend("", _LOCAL)
register_backend("file", _LOCAL)
register_backend("s3", S3Backend())


# ---------------------------------------------------------------------------- URIs and errors


def default_store() -> str:
    """The store root when none is given: `SAM3PIPE_STORE`, else `.sam3pipe/store` (read at each call)."""
    return os.environ.get(STORE_ENV) or DEFAULT_STORE


def is_remote(uri: str) -> bool:
    """True when reading ``uri`` means a network transfer."""
    return backend_for(str(uri)).remote


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
    backend = backend_for(base)
    if not segments:
        return base
    return backend.join(base, segments)


# ---------------------------------------------------------------------------- bytes / text / json


def _on_backend(uri: str | Path, what: str, op: Callable[[Backend, str], T], need_key: bool = True) -> T:
    """`op(backend, uri)` on the backend of a checked `uri`, its failures named as `what` of `uri`."""
    uri = str(uri)
    backend = backend_for(uri)
    with _errors(uri, what, backend):
        backend.check(uri, need_key=need_key)
        return op(backend, uri)


def read_bytes(uri: str) -> bytes:
    """Whole object as bytes."""
    return _on_backend(uri, "read", lambda backend, key: backend.read_bytes(key))


def write_bytes(uri: str, data: bytes) -> None:
    """Create or replace one object; readers see the old or the new bytes, never a mix."""
    _on_backend(uri, "write", lambda backend, key: backend.write_bytes(key, data))


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
    except RecursionError:
        raise InputError(uri, "$", "nested too deeply to read (thousands of levels of lists or objects)") from None
    except MemoryError:
        raise InputError(
            uri, "$", f"too big to load into the memory left ({len(text) / 2**20:.0f} MB of text)"
        ) from None


def write_json(uri: str, obj: Any) -> None:
    """Compact, key-sorted UTF-8 JSON: equal objects give equal bytes, so hashes are stable."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    write_bytes(uri, text.encode("utf-8"))


# ---------------------------------------------------------------------------- listing / existence


def exists(uri: str) -> bool:
    """True when ``uri`` names an existing object (a file locally; a folder is not an object)."""
    return _on_backend(uri, "existence check", lambda backend, key: backend.exists(key))


def size(uri: str) -> int:
    """Size of one object in bytes."""
    return _on_backend(uri, "size check", lambda backend, key: backend.size(key))


def list_files(prefix: str) -> list[str]:
    """Every object under the folder ``prefix``, recursively, as sorted posix keys relative to it."""
    return _on_backend(prefix, "listing", lambda backend, key: backend.list_files(key), need_key=False)


# ---------------------------------------------------------------------------- transfers


def upload_file(local: str | Path, uri: str) -> None:
    """Copy a local file to ``uri``; big files go up in parallel multipart chunks.

    A failure is named as a write of ``uri``: the local file is often a staging copy the user never
    named (a failure of the local side names its own path).
    """
    _on_backend(uri, "write", lambda backend, key: backend.upload_file(Path(local), key))


def download_file(uri: str, local: str | Path) -> None:
    """Copy ``uri`` to a local file; the file appears complete or not at all (a failure is named as a
    read of ``uri``, not by the temporary copy)."""
    _on_backend(uri, "read", lambda backend, key: backend.download_file(key, Path(local)))


def copy(src: str, dst: str) -> None:
    """Copy one object between any two supported locations (within one remote store it stays server-side)."""
    src, dst = str(src), str(dst)
    source, target = backend_for(src), backend_for(dst)
    if not source.remote:
        upload_file(local_path(src), dst)
    elif not target.remote:
        download_file(src, local_path(dst))
    elif source is target:
        with _errors(src, f"copy to {dst}", source):
            source.check(src)
            target.check(dst)
            source.copy(src, dst)
    else:
        write_bytes(dst, read_bytes(src))


def delete(uri: str) -> None:
    """Remove one object; removing a missing object is not an error."""
    _on_backend(uri, "delete", lambda backend, key: backend.delete(key))


def delete_prefix(prefix: str) -> None:
    """Remove every object under the folder ``prefix`` (never a whole bucket)."""
    _on_backend(prefix, "delete", lambda backend, key: backend.delete_prefix(key))


def remove_partial_writes(folder: str) -> list[str]:
    """Delete the hidden temp files that killed local writes left directly in ``folder``; their paths.

    An interrupted atomic local write leaves ``.<name>.<random>.sam3pipe-tmp`` behind and listings
    skip it, so only this finds it. Object stores have no such leftovers (a killed upload never
    becomes an object).
    """
    if is_remote(folder):
        return []
    root = local_path(folder)
    if not root.is_dir():
        return []
    removed = []
    for path in root.glob(f".*{TMP_SUFFIX}"):
        path.unlink(missing_ok=True)
        removed.append(str(path))
    return removed


# ---------------------------------------------------------------------------- checksums


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a local file, read in chunks so checkpoints never sit in memory whole."""
    digest = hashlib.sha256()
    with _errors(str(path), "checksum", backend_for("")), open(regular_file(Path(path)), "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- atomic publish


def _put_verified(source: str | Path, uri: str) -> None:
    """Upload a local file (Path) or copy a store object (str) to ``uri`` and check the size arrived."""
    if isinstance(source, Path):
        upload_file(source, uri)
        expected = source.stat().st_size
    else:
        copy(source, uri)
        expected = size(source)
    actual = size(uri)
    if expected != actual:
        raise StorageError(f"{uri}: wrote {actual} bytes but {source} has {expected}; retry the publish")


def publish(sources: dict[str, str | Path], dest: str, marker: str, marker_source: Path) -> None:
    """Make ``dest`` hold ``sources`` (relative key -> local file or store URI) and, last, the marker.

    ``dest`` only ever looks complete or absent to a reader that checks ``is_published``: an
    earlier marker is removed first, every object is written and its size checked, then the
    marker goes up. On any failure the objects of this publish are removed again.
    """
    if marker in sources:
        raise StorageError(f"{dest}: the marker {marker} must not also be listed among the objects to publish")
    targets = {rel: join(dest, rel) for rel in sources}
    marker_uri = join(dest, marker)
    delete(marker_uri)
    try:
        _put_all({targets[rel]: source for rel, source in sources.items()}, dest)
        _put_verified(marker_source, marker_uri)
    except BaseException as exc:
        # the marker first: a marker whose verification failed must not outlive its files
        _roll_back(dest, [marker_uri, *targets.values()])
        if isinstance(exc, StorageError) or not isinstance(exc, Exception):
            raise
        raise StorageError(f"{dest}: publish failed and was rolled back: {exc}") from exc
    logger.info("published %d objects to %s", len(targets) + 1, dest)


def publish_dir(local_dir: str | Path, dest: str, marker: str = "manifest.json") -> None:
    """Upload a finished local folder so that ``dest`` only ever looks complete or absent (see ``publish``)."""
    root = Path(local_dir)
    if not root.is_dir():
        raise StorageError(f"{root}: not a folder; nothing to publish to {dest}")
    marker_path = root / marker
    if not marker_path.is_file():
        raise StorageError(f"{marker_path}: missing; write the marker ({marker}) before publishing to {dest}")
    files: dict[str, str | Path] = {rel: root / rel for rel in list_files(str(root)) if rel != marker}
    publish(files, dest, marker, marker_path)


def _put_all(targets: dict[str, str | Path], dest: str) -> None:
    """Write in parallel; on the first failure cancel what has not started and wait for the rest."""
    with ThreadPoolExecutor(max_workers=max_concurrency()) as pool:
        futures = [pool.submit(_put_verified, source, uri) for uri, source in targets.items()]
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc=f"publish {dest}", unit="file"):
                future.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _roll_back(dest: str, uris: list[str]) -> None:
    """Remove every object a failed publish may have written (all writes have stopped by now)."""
    backend = backend_for(dest)
    try:
        with _errors(dest, "rollback", backend):
            backend.delete_many(uris)
    except StorageError as exc:
        logger.error("rollback of the failed publish to %s is incomplete: %s", dest, exc)
        return
    logger.warning("publish to %s failed; removed its %d objects", dest, len(uris))


def is_published(dest: str, marker: str = "manifest.json") -> bool:
    """True once ``publish_dir`` (or ``publish``) completed for ``dest``."""
    return exists(join(dest, marker))
