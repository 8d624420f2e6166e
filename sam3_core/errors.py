"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class Sam3PipeError(Exception):
    """Base of every error caused by input, configuration or the environment, not by a bug."""


class InputError(Sam3PipeError):
    """Bad input: names the file (or URI) and the field so the user knows what to fix."""

    def __init__(self, source: str, field: str, message: str) -> None:
        self.source, self.field, self.message = str(source), field, message
        super().__init__(f"{self.source}: {field}: {message}")

    def __reduce__(self) -> tuple[type[InputError], tuple[str, str, str]]:
        # pickled whole (e.g. sent to the other ranks), not from its one-line message
        return type(self), (self.source, self.field, self.message)


class StorageError(Sam3PipeError):
    """An object-store operation failed or was refused (bad key, missing object, checksum)."""


class StoreUnreachableError(StorageError):
    """The store did not answer (refused or dropped connections, timeouts): the data may be intact,
    so callers must not advise re-creating it."""


class ConfigError(Sam3PipeError, ValueError):
    """A Hydra override or config value is invalid (a ValueError too, as callers of pure code expect)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Python's MemoryError or torch's (CUDA) OutOfMemoryError."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"


@contextlib.contextmanager
def working_on(source: str) -> Iterator[None]:
    """Name `source` (a file, a frame) in an out-of-memory error raised while it is worked on: the CLI
    prints the note, so the line says which input was too big."""
    try:
        yield
    except Exception as exc:
        if is_out_of_memory(exc) and not getattr(exc, "__notes__", None):
            exc.add_note(f"while working on {source}")
        raise
