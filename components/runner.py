"""What every component CLI shares: logging, one-line errors, the outputs as one JSON line.

A user error never prints a traceback: it is one `error:` line and exit 2. User errors are our
own `Sam3PipeError`s, failures of the operating system on paths and devices the user chose
(`OSError`: missing file, permission, full disk) and running out of memory with the sizes the
user asked for. Anything else is a bug and keeps Python's traceback (exit 1). Set
`SAM3PIPE_TRACEBACK=1` to get the traceback of a user error too.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from sam3_core.errors import Sam3PipeError

log = logging.getLogger("sam3pipe")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
TRACEBACK_ENV = "SAM3PIPE_TRACEBACK"
# `scheme://user:password@host`: the password never reaches the console
_OS_HINTS = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path: a part of it is a file",
    errno.EISDIR: "check the path: it is a folder",
    errno.EACCES: "check its permissions",
    errno.EPERM: "check its permissions",
    errno.EROFS: "write somewhere writable",
    errno.ENOSPC: "free some space, or point the store or cache (SAM3PIPE_CACHE, TMPDIR) elsewhere",
}
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s:]+:[^/@\s]+@")


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def one_line(text: str) -> str:
    """The message on one line (continuation lines joined with ' | '), credentials in URLs masked."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return _USERINFO.sub(r"\g<scheme>***@", " | ".join(lines))


def user_error_message(exc: BaseException) -> str | None:
    """The one line for an error the user can fix, or None for a bug (which keeps its traceback)."""
    if isinstance(exc, Sam3PipeError):
        return one_line(str(exc))
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        what = exc.strerror or str(exc) or type(exc).__name__
        hint = _OS_HINTS.get(exc.errno or 0, "")
        return one_line(f"{where}{what}{'; ' + hint if hint else ''}")
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return one_line(
            f"out of memory ({exc or type(exc).__name__}); lower the batch size, image size or "
            "number of frames, or run on a bigger machine"
        )
    return None


def run_cli(execute: Callable[[list[str]], dict[str, Any]], argv: list[str] | None = None) -> int:
    """Run a component's `execute`; exit 2 with one line on an error the user can fix."""
    configure_logging()
    try:
        outputs = execute(sys.argv[1:] if argv is None else list(argv))
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
