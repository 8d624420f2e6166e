"""Every console line masked: log records of any logger, warnings, tracebacks (sam3_core/console.py)."""

from __future__ import annotations

import io
import logging
import sys
import warnings
from collections.abc import Iterator

import pytest

from sam3_core.console import configure_console
from sam3_core.mlflow_records.redact import redact_text, remember_secrets


@pytest.fixture
def library_log() -> Iterator[io.StringIO]:
    """A library logger writing through a handler of its own (as mlflow's does), not the root's."""
    stream = io.StringIO()
    logger = logging.getLogger("some.library")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.propagate = False
    yield stream
    logger.removeHandler(handler)
    logger.propagate = True


def test_a_password_on_the_command_line_is_masked_where_a_library_repeats_it_in_its_own_words(library_log) -> None:
    configure_console(["data.uri=s3://KEYID:pass/with+slash@bucket/x"])
    logging.getLogger("some.library").warning('Invalid bucket name "KEYID:pass/with+slash@bucket"')
    assert "pass/with+slash" not in library_log.getvalue() and "***" in library_log.getvalue()


def test_a_secret_environment_value_is_masked_and_a_short_one_is_not() -> None:
    remember_secrets(
        [],
        {
            "MLFLOW_TRACKING_PASSWORD": "correct-horse-battery",
            "AWS_SECRET_ACCESS_KEY": "short",
            "HOME": "/root-home-folder",
        },
    )
    assert redact_text("login correct-horse-battery failed") == "login *** failed"
    assert redact_text("key short, home /root-home-folder") == "key short, home /root-home-folder"


def test_a_url_password_holding_a_slash_is_masked_whole() -> None:
    assert redact_text("s3://KEYID:wJalr/XUtn+FEMI@bucket/key") == "s3://KEYID:***@bucket/key"


def test_a_warning_goes_through_the_masked_log(caplog: pytest.LogCaptureFixture) -> None:
    logging.captureWarnings(False)  # pytest put its own warning recorder back after an earlier test's
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        configure_console()
        warnings.warn("connecting to https://bob:opensesame@tracking.example.com", UserWarning, stacklevel=1)
        logging.captureWarnings(False)
    assert any("bob:***@tracking.example.com" in r.getMessage() for r in caplog.records)
    assert not any("opensesame" in r.getMessage() for r in caplog.records)


def test_a_traceback_is_masked_before_it_is_printed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    configure_console()
    try:
        raise RuntimeError("GET https://bob:opensesame@host/api failed")
    except RuntimeError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    err = capsys.readouterr().err
    assert "Traceback" in err and "bob:***@host" in err and "opensesame" not in err
