"""The one interface every storage scheme implements; everything above it is written once.

A backend knows how to move bytes for its own URIs (``s3://...``, a local path) and how to
explain its own failures in words a user can act on. Publishing, rollback, checksums and the
read caches (``sam3_core.storage``) only call these methods, so a new scheme is one class
registered with ``register_backend``.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

from sam3_core.errors import StorageError, StoreUnreachableError


class Backend(ABC):
    """Object operations on the URIs of one scheme. Methods may raise the scheme's own exceptions;
    ``explain`` turns them into a sentence and the caller wraps it in a StorageError naming the URI."""

    #: True when reading means a network transfer (cached locally by ``cached_path``)
    remote: bool = False

    @abstractmethod
    def check(self, uri: str, *, need_key: bool = True) -> None:
        """Raise StorageError if ``uri`` is not a well-formed URI of this scheme."""

    @abstractmethod
    def join(self, base: str, segments: list[str]) -> str:
        """``base`` with already-checked relative path segments appended."""

    @abstractmethod
    def read_bytes(self, uri: str) -> bytes: ...

    @abstractmethod
    def write_bytes(self, uri: str, data: bytes) -> None:
        """Create or replace one object; readers see the old or the new bytes, never a mix."""

    @abstractmethod
    def exists(self, uri: str) -> bool:
        """True for an existing object (not for a folder)."""

    @abstractmethod
    def size(self, uri: str) -> int: ...

    @abstractmethod
    def list_files(self, prefix: str) -> list[str]:
        """Every object below the folder ``prefix``, as sorted posix keys relative to it ([] if none)."""

    @abstractmethod
    def upload_file(self, path: Path, uri: str) -> None: ...

    @abstractmethod
    def download_file(self, uri: str, path: Path) -> None:
        """Copy the object to a local file that appears complete or not at all."""

    @abstractmethod
    def copy(self, src: str, dst: str) -> None:
        """Copy between two URIs of this backend (server-side where the scheme allows)."""

    @abstractmethod
    def delete(self, uri: str) -> None:
        """Remove one object; a missing object is not an error."""

    def delete_many(self, uris: list[str]) -> None:
        """Remove several objects (backends with batch deletes override this)."""
        for uri in uris:
            self.delete(uri)

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove everything below the folder ``prefix``."""

    def cache_key(self, uri: str) -> str:
        """What identifies the object across processes (the URI, plus e.g. the endpoint it lives on)."""
        return uri

    @abstractmethod
    def explain(self, exc: BaseException) -> str:
        """One sentence saying what went wrong and what to do."""

    @abstractmethod
    def failures(self) -> tuple[type[BaseException], ...]:
        """The exception types of this backend that ``explain`` understands."""

    def unreachable(self, exc: BaseException) -> bool:
        """True when ``exc`` means the store did not answer at all (a local disk always does)."""
        return False


_BACKENDS: dict[str, Backend] = {}


def register_backend(scheme: str, backend: Backend) -> None:
    """Serve URIs ``<scheme>://...`` with ``backend`` ("" for plain local paths)."""
    _BACKENDS[scheme.lower()] = backend


def supported() -> str:
    """The accepted URI forms, for error messages."""
    schemes = sorted(s for s in _BACKENDS if s)
    return "plain paths and " + ", ".join(f"{s}://" for s in schemes) + " URIs"


def scheme_of(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


def backend_for(uri: str) -> Backend:
    """The backend serving ``uri``; StorageError for an unknown scheme."""
    scheme = scheme_of(uri)
    backend = _BACKENDS.get(scheme)
    if backend is None:
        raise StorageError(f"{uri}: unsupported URI scheme {scheme!r}; use {supported()}")
    return backend


@contextlib.contextmanager
def errors(uri: str, action: str, backend: Backend | None = None) -> Iterator[None]:
    """Turn a backend's failures into a StorageError that names the URI and says what to do."""
    backend = backend or backend_for(uri)
    try:
        yield
    except StorageError:
        raise
    except backend.failures() as exc:
        kind = StoreUnreachableError if backend.unreachable(exc) else StorageError
        raise kind(f"{uri}: {action} failed: {backend.explain(exc)}") from exc
