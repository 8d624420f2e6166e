"""Local copies of remote objects: ``cached_path`` (keep everything) and ``ReadCache`` (bounded, LRU).

Both trust that a URI's content never changes (artifacts are content-addressed or run-scoped),
key their files by the backend's cache key (URI plus e.g. the endpoint) and verify a sha256
when one is given. ``cached_path`` is for the few large files a library needs as a path
(checkpoints, annotation files). ``ReadCache`` is for the many small files training reads again
and again (frames): it holds at most ``max_bytes`` on disk, evicting the least recently used,
and is shared safely by every DataLoader worker and rank on a machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path

from sam3_core.errors import StorageError
from sam3_core.storage.backend import backend_for, errors
from sam3_core.storage.local import TMP_SUFFIX, local_path, regular_file, write_atomic

logger = logging.getLogger(__name__)

# Expanded at call time: containers running under an arbitrary uid may have no home at import.
DEFAULT_CACHE_DIR = "~/.cache/sam3pipe"
LRU_FOLDER = "lru"
_LOCK = ".lock"
_HASH_CHUNK = 1024 * 1024


def cache_root(cache_dir: str | Path | None) -> Path:
    """The cache folder: the argument, else SAM3PIPE_CACHE, else ~/.cache/sam3pipe."""
    if cache_dir is None:
        cache_dir = os.environ.get("SAM3PIPE_CACHE") or Path(DEFAULT_CACHE_DIR).expanduser()
    return Path(cache_dir)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _entry(root: Path, cache_key: str, uri: str) -> Path:
    digest = hashlib.sha256(cache_key.encode()).hexdigest()
    return root / digest[:2] / digest / posixpath.basename(uri.rstrip("/"))


def cached_path(uri: str, cache_dir: str | Path | None = None, sha256: str | None = None) -> Path:
    """A local file with the content of ``uri``, for libraries that need a path (torch.load, PIL).

    Remote objects are downloaded once into the cache, so a second call makes no network
    request. With ``sha256`` the file is verified; a cached copy that fails is downloaded
    again, a fresh download that fails is removed.
    """
    uri = str(uri)
    backend = backend_for(uri)
    with errors(uri, "read", backend):
        backend.check(uri)
        if not backend.remote:
            path = local_path(uri)
            if not path.exists():
                raise StorageError(f"{uri}: no such file; check the path or run the step that produces it")
            if path.is_dir():
                raise StorageError(f"{uri}: a folder, not a file")
            regular_file(path)
            if sha256 is not None and _file_sha256(path) != sha256.lower():
                raise StorageError(f"{uri}: sha256 mismatch (expected {sha256}); the file is corrupt or was replaced")
            return path
        path = _entry(cache_root(cache_dir), backend.cache_key(uri), uri)
        if path.is_file() and (sha256 is None or _file_sha256(path) == sha256.lower()):
            logger.debug("cache hit for %s at %s", uri, path)
            return path
    with errors(uri, f"download to {path}", backend):
        backend.download_file(uri, path)
        if sha256 is not None and _file_sha256(path) != sha256.lower():
            path.unlink(missing_ok=True)
            raise StorageError(
                f"{uri}: sha256 mismatch after download (expected {sha256}); the object is corrupt or was replaced"
            )
    return path


class ReadCache:
    """Bytes of objects, read through a size-bounded local LRU cache shared by processes.

    Remote objects are kept under ``<cache_dir>/lru/``; recency is the file's mtime (touched on
    every hit). A process sweeps (under a file lock, so sweeps never race) whenever it has added
    ``sweep_bytes`` since its last sweep, deleting the least recently used files until the cache
    holds at most 90 % of ``max_bytes``; between sweeps each reading process may add up to
    ``sweep_bytes`` (max_bytes / 16), the only overshoot. ``max_bytes=0`` keeps everything.
    Objects larger than the whole cache are read but not kept. Reads return bytes, never a
    path, so an eviction by another process can never pull a file from under a reader.
    """

    LOW_WATERMARK = 0.9

    def __init__(self, cache_dir: str | Path | None = None, max_bytes: int = 0) -> None:
        if max_bytes < 0:
            raise StorageError(f"read cache size must be >= 0 bytes (0 = unbounded), got {max_bytes}")
        self.root = cache_root(cache_dir) / LRU_FOLDER
        self.max_bytes = max_bytes
        self.sweep_bytes = max(1, max_bytes // 16)
        self._added = 0
        self._verified: set[str] = set()

    def __getstate__(self) -> dict[str, object]:
        # a DataLoader worker starts with its own count and checks
        return {**self.__dict__, "_added": 0, "_verified": set()}

    def read_bytes(self, uri: str, sha256: str | None = None) -> bytes:
        """The object's bytes, checked against ``sha256`` when given."""
        uri = str(uri)
        backend = backend_for(uri)
        with errors(uri, "read", backend):
            backend.check(uri)
            if not backend.remote:
                return self._read_local(uri, sha256)
            path = _entry(self.root, backend.cache_key(uri), uri)
            data = self._hit(path, sha256)
            if data is not None:
                return data
            data = backend.read_bytes(uri)
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256.lower():
            raise StorageError(
                f"{uri}: sha256 mismatch after download (expected {sha256}); the object is corrupt or was replaced"
            )
        self._keep(path, data)
        return data

    def _read_local(self, uri: str, sha256: str | None) -> bytes:
        data = regular_file(local_path(uri)).read_bytes()
        if sha256 is not None and uri not in self._verified:
            if hashlib.sha256(data).hexdigest() != sha256.lower():
                raise StorageError(f"{uri}: sha256 mismatch (expected {sha256}); the file is corrupt or was replaced")
            self._verified.add(uri)
        return data

    def _hit(self, path: Path, sha256: str | None) -> bytes | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256.lower():
            logger.warning("cached copy %s is corrupt; fetching it again", path)
            return None
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)
        return data

    def _keep(self, path: Path, data: bytes) -> None:
        if self.max_bytes and len(data) > self.max_bytes:
            return
        try:
            write_atomic(path, data, fsync=False)
        except OSError as exc:
            logger.warning("cannot keep %s in the read cache (%s); reading on without it", path, exc)
            return
        self._added += len(data)
        if self.max_bytes and self._added >= self.sweep_bytes:
            self.sweep()

    def sweep(self) -> int:
        """Evict least recently used files down to the low watermark; return the bytes now held."""
        self._added = 0
        self.root.mkdir(parents=True, exist_ok=True)
        with self._locked():
            files = list(_cached_files(self.root))
            total = sum(size for _, size, _ in files)
            if not self.max_bytes or total <= self.max_bytes:
                return total
            target = int(self.max_bytes * self.LOW_WATERMARK)
            for _, size, path in sorted(files):
                if total <= target:
                    break
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    total -= size
        logger.debug("read cache %s swept to %d bytes", self.root, total)
        return total

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / _LOCK, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _cached_files(root: Path) -> Iterator[tuple[float, int, Path]]:
    """(mtime, size, path) of every complete cached file below ``root``."""
    for folder, _, names in os.walk(root):
        for name in names:
            if name == _LOCK or name.endswith(TMP_SUFFIX):
                continue
            path = Path(folder) / name
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                yield stat.st_mtime, stat.st_size, path
