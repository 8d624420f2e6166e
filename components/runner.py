"""What every component CLI shares: logging, one-line errors, the outputs as one JSON line.

A user error never prints a traceback: it is one `error:` line and exit 2. User errors are our
own `Sam3PipeError`s, failures of the operating system on paths and devices the user chose
(`OSError`: missing file, permission, full disk) and running out of memory with the sizes the
user asked for. Anything else is a bug and keeps Python's traceback (exit 1). Set
`SAM3PIPE_TRACEBACK=1` to get the traceback of a user error too. Every line, the error's and the
log's, has its credentials masked (`sam3_core.console`).
"""

from __future__ import annotations

import errno
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sam3_core.config import defaults_yaml
from sam3_core.console import configure_console
from sam3_core.errors import Sam3PipeError, is_out_of_memory
from sam3_core.mlflow_records.redact import redact_text

log = logging.getLogger("sam3pipe")
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
TRACEBACK_ENV = "SAM3PIPE_TRACEBACK"
_OS_HINTS = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path: a part of it is a file",
    errno.EISDIR: "check the path: it is a folder",
    errno.EACCES: "check its permissions",
    errno.EPERM: "check its permissions",
    errno.EROFS: "write somewhere writable",
    errno.ENOSPC: "free some space, or point the store or cache (SAM3PIPE_CACHE, TMPDIR) elsewhere",
    errno.EFBIG: "the file would be larger than this process may write (ulimit -f) or the filesystem holds",
}


def one_line(text: str) -> str:
    """The message on one line (continuation lines joined with ' | '), credentials masked."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return redact_text(" | ".join(lines))


def user_error_message(exc: BaseException) -> str | None:
    """The one line for an error the user can fix, or None for a bug (which keeps its traceback)."""
    if isinstance(exc, Sam3PipeError):
        return one_line(str(exc))
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        what = exc.strerror or str(exc) or type(exc).__name__
        hint = _OS_HINTS.get(exc.errno or 0, "")
        return one_line(f"{where}{what}{'; ' + hint if hint else ''}")
    if is_out_of_memory(exc):
        where = "".join(f" {note}" for note in getattr(exc, "__notes__", []))
        return one_line(
            f"out of memory{where} ({exc or type(exc).__name__}); lower the batch size, image size or "
            "number of frames, or run on a bigger machine"
        )
    return None


HELP_FLAGS = frozenset({"-h", "--help"})


@dataclass(frozen=True)
class Usage:
    """What `--help` prints: the component's docstring and its config (`<config>.yaml`) with the defaults."""

    doc: str
    config: str
    schema: type


def help_text(usage: Usage) -> str:
    return (
        f"{inspect.cleandoc(usage.doc)}\n\n"
        "Settings, given as Hydra overrides key=value (??? = required), with their defaults:\n\n"
        f"{defaults_yaml(usage.config, usage.schema)}"
    )


def run_cli(
    execute: Callable[[list[str]], dict[str, Any]], argv: list[str] | None = None, usage: Usage | None = None
) -> int:
    """Run a component's `execute`; exit 2 with one line on an error the user can fix. `-h`/`--help` prints `usage`."""
    args = sys.argv[1:] if argv is None else list(argv)
    if usage is not None and HELP_FLAGS.intersection(args):
        print(help_text(usage))
        return 0
    configure_console(args)
    try:
        outputs = execute(args)
    except KeyboardInterrupt:
        log.error("error: interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:
        message = user_error_message(exc)
        if message is None or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        log.error("error: %s", message)
        return EXIT_USER_ERROR
    print(json.dumps(outputs, sort_keys=True))
    return 0
