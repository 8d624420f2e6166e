"""The component runner: a user error is one line and exit 2, a bug keeps its traceback."""

from __future__ import annotations

import errno
import logging

import pytest

from components import evaluate, train
from components.runner import TRACEBACK_ENV, run_cli
from sam3_core.errors import InputError, StorageError


def _run(exc: BaseException, caplog: pytest.LogCaptureFixture) -> tuple[int, list[str]]:
    def execute(argv: list[str]) -> dict:
        raise exc

    caplog.set_level(logging.INFO)
    status = run_cli(execute, [])
    return status, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_outputs_are_printed_as_one_json_line(capsys):
    assert run_cli(lambda argv: {"b": 1, "a": argv}, ["x"]) == 0
    assert capsys.readouterr().out == '{"a": ["x"], "b": 1}\n'


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_what_the_component_does_and_its_settings_with_their_defaults(capsys, flag):
    assert train.main(["data.uri=s3://unused", flag]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("The train component: fine-tune the SAM3 detector")
    assert "\n  max_steps: 200\n" in printed and "\ndata:\n  uri: ???\n" in printed


def test_help_is_answered_before_the_arguments_are_read(capsys):
    assert evaluate.main(["--gt", "missing.json", "--help"]) == 0
    assert "backend: faster_coco_eval" in capsys.readouterr().out


def test_a_user_error_is_one_line_and_exit_2(caplog, capsys):
    status, errors = _run(InputError("s3://b/ann.json", "videos[0].length", "is 3 but file_names lists 2"), caplog)
    assert status == 2
    assert errors == ["error: s3://b/ann.json: videos[0].length: is 3 but file_names lists 2"]
    assert not any(r.exc_info for r in caplog.records)
    assert capsys.readouterr().out == ""


def test_a_message_over_several_lines_becomes_one(caplog):
    _, errors = _run(StorageError("s3://b/x: write failed:\n  SlowDown\n  retry later"), caplog)
    assert errors == ["error: s3://b/x: write failed: | SlowDown | retry later"]


def test_a_password_in_a_url_never_reaches_the_console(caplog):
    _, errors = _run(StorageError("http://alice:s3cr3t@minio:9000/b: access denied"), caplog)
    # the one masker of every message (sam3_core.mlflow_records.redact): the user stays, the password goes
    assert errors == ["error: http://alice:***@minio:9000/b: access denied"]


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x.json"),
            "error: /data/x.json: No such file or directory; check the path",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/store/runs"),
            "error: /store/runs: Permission denied; check its permissions",
        ),
        (OSError(errno.ENOSPC, "No space left on device"), "error: No space left on device; free some space"),
    ],
)
def test_an_os_error_on_a_users_path_is_one_line_naming_the_path(exc, expected, caplog):
    status, errors = _run(exc, caplog)
    assert status == 2
    assert len(errors) == 1 and errors[0].startswith(expected)


def test_running_out_of_memory_is_one_line_that_says_what_to_lower(caplog):
    status, errors = _run(MemoryError(), caplog)
    assert status == 2
    assert len(errors) == 1 and "out of memory" in errors[0] and "batch size" in errors[0]


def test_an_interrupt_is_one_line_and_exit_130(caplog):
    status, errors = _run(KeyboardInterrupt(), caplog)
    assert (status, errors) == (130, ["error: interrupted"])


def test_a_bug_keeps_its_traceback(caplog):
    with pytest.raises(ZeroDivisionError):
        _run(ZeroDivisionError("division by zero"), caplog)


def test_the_traceback_of_a_user_error_is_there_on_request(caplog, monkeypatch):
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(InputError):
        _run(InputError("a", "b", "c"), caplog)
