"""Local files: plain paths and ``file://`` URIs. Writes go through a temp file and ``os.replace``."""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sam3_core.errors import StorageError
from sam3_core.storage.backend import Backend

# Suffix of in-flight local writes; listings skip them so a reader never sees half a file.
TMP_SUFFIX = ".sam3pipe-tmp"


class SpecialFileError(OSError):
    """A path names a FIFO, socket or device: reading it could block forever, so it is never opened."""


_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device"}


def regular_file(path: Path) -> Path:
    """`path`, checked to be a regular file (a folder or a missing path fails as the OS says) before it is
    opened: a FIFO among the inputs would block a read forever."""
    mode = os.stat(path).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = _KINDS.get(stat.S_IFMT(mode), "a special file")
        raise SpecialFileError(0, f"{kind}, not a regular file", str(path))
    return path


def local_path(uri: str | Path) -> Path:
    """The filesystem path of a plain path or ``file://`` URI."""
    uri = str(uri)
    if "\x00" in uri:
        raise StorageError(f"{uri!r}: a path cannot hold a NUL byte (\\x00); check how it was written")
    if not uri.lower().startswith("file://"):
        return Path(uri)
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise StorageError(f"{uri}: file:// URIs must name a local path (file:///abs/path)")
    return Path(unquote(parts.path))


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
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; published files get the mode a plain open() would give them
        os.chmod(tmp, 0o666 & ~_process_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes, fsync: bool = True) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())


def _file_ancestor(path: Path) -> Path | None:
    """The nearest part of ``path`` (itself included) that exists as a regular file."""
    for candidate in (path, *path.parents):
        if candidate.is_file():
            return candidate
    return None


class LocalBackend(Backend):
    remote = False

    def check(self, uri: str, *, need_key: bool = True) -> None:
        local_path(uri)

    def join(self, base: str, segments: list[str]) -> str:
        if base.lower().startswith("file://"):
            return "file://" + posixpath.join(local_path(base).as_posix(), *segments)
        return posixpath.join(base, *segments)

    def read_bytes(self, uri: str) -> bytes:
        return regular_file(local_path(uri)).read_bytes()

    def write_bytes(self, uri: str, data: bytes) -> None:
        write_atomic(local_path(uri), data)

    def exists(self, uri: str) -> bool:
        return local_path(uri).is_file()

    def size(self, uri: str) -> int:
        return local_path(uri).stat().st_size

    def list_files(self, prefix: str) -> list[str]:
        root = local_path(prefix)
        if not root.is_dir():
            return []
        return sorted(
            path.relative_to(root).as_posix()
            for path in root.rglob("*")
            if not path.is_dir() and not path.name.endswith(TMP_SUFFIX)
        )

    def upload_file(self, path: Path, uri: str) -> None:
        regular_file(path)
        with atomic_path(local_path(uri)) as tmp:
            shutil.copyfile(path, tmp)

    def download_file(self, uri: str, path: Path) -> None:
        source = regular_file(local_path(uri))
        with atomic_path(path) as tmp:
            shutil.copyfile(source, tmp)

    def copy(self, src: str, dst: str) -> None:
        self.upload_file(local_path(src), dst)

    def delete(self, uri: str) -> None:
        local_path(uri).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        root = local_path(prefix)
        if root.is_dir():
            shutil.rmtree(root)

    def explain(self, exc: BaseException) -> str:
        if isinstance(exc, SpecialFileError):
            return f"{exc.filename} is {exc.strerror}; point at a regular file"
        if isinstance(exc, (NotADirectoryError, FileExistsError)) and exc.filename:
            blocker = _file_ancestor(Path(exc.filename))
            if blocker is not None:
                return f"{blocker} is a file, not a folder; point the store (or path) at a folder"
        if isinstance(exc, FileNotFoundError):
            return f"no such file {exc.filename}; check the path or run the step that produces it"
        if isinstance(exc, IsADirectoryError):
            return f"{exc.filename} is a folder, not a file"
        if isinstance(exc, PermissionError):
            return f"permission denied on {exc.filename}; check the folder's owner and mode"
        if isinstance(exc, OSError):
            return exc.strerror or str(exc)
        return str(exc)

    def failures(self) -> tuple[type[BaseException], ...]:
        return (OSError,)
