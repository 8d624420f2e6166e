"""What every command line shares on the console: log lines, warnings and tracebacks with credentials masked.

`configure_console(argv)` is called once by each entry point (the component runner, `sam3pipe`, the
MLflow replay). It remembers the credentials the process was given (passwords of `user:password@`
URIs on the command line, secret environment variables) and masks them, and anything else that looks
like a credential (`redact_text`), in every message: log records of every logger, ours and the
libraries' (botocore, urllib3, mlflow, which may write through handlers of their own) are masked when
they are made; Python warnings go through logging; a traceback (a bug) is masked before it is printed.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from sam3_core.mlflow_records.redact import redact_text, remember_secrets

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# libraries that log every request at INFO: their warnings still show
NOISY_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "matplotlib", "PIL")


class MaskingFormatter(logging.Formatter):
    """A formatter whose whole output (message, exception text, stack) passes `redact_text`."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def _masking_factory(base: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed record: logging itself reports it later
            return record
        masked = redact_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        return record

    make.masks_credentials = True  # type: ignore[attr-defined]
    return make


def _masked_excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    sys.stderr.write(redact_text("".join(traceback.format_exception(kind, value, tb))))


def configure_console(argv: Sequence[str] = (), fmt: str = LOG_FORMAT) -> None:
    """Logging at INFO on stderr, every message masked (see the module doc). Idempotent."""
    remember_secrets(argv, os.environ)
    root = logging.getLogger()
    if not root.handlers:  # as logging.basicConfig, with the masking formatter
        handler = logging.StreamHandler()
        handler.setFormatter(MaskingFormatter(fmt))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "masks_credentials", False):
        logging.setLogRecordFactory(_masking_factory(factory))
    logging.captureWarnings(True)
    sys.excepthook = _masked_excepthook
