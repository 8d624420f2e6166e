"""The recorder in a helper process, so MLflow never holds the component.

Importing mlflow and opening its SQLAlchemy store take seconds of CPU, and a thread would not
hide them: under the GIL they take turns with the component's own Python (measured: evaluate's
work went from 1.7-2.0 s to 4.0-4.6 s with the opening in a thread beside it). A process runs them on
another core. `ProcessChannel` starts `python -m sam3_core.mlflow_records.background` at the
component's start and sends it the opening (config, command line, dataset, output folder); the
helper opens the runs with `open_recorder` and then takes the component's calls, in order, from
one pipe. Calls that answer wait for the helper; the others return at once.

The helper logs to stderr like the component, ignores Ctrl-C (the component decides how its run
ends), and ends the runs as FAILED if the component goes away without saying how it ended. An
error opening the runs that the user must fix (credentials, an unknown `mlflow.run_id`) comes
back as a ConfigError at the component's next tracking call or at its end.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import traceback
from multiprocessing.connection import Connection, Pipe
from pathlib import Path
from typing import Any

from sam3_core.console import configure_console
from sam3_core.errors import ConfigError

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Beyond the recorder's own deadlines (opening, final flush), how long the component waits for it.
GRACE_S = 30.0


def _package_root() -> str:
    """The folder holding `sam3_core`, so the helper imports the same code as this process."""
    return str(Path(__file__).resolve().parents[2])


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else a RuntimeError carrying its traceback."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError("".join(traceback.format_exception(exc)).strip())
    return exc


class ProcessChannel:
    """The component's side: starts the helper and talks to it over a pipe."""

    def __init__(self, opening: dict[str, Any]) -> None:
        cfg = opening["cfg"]
        self._wait_s = cfg.connect_timeout_s + cfg.final_flush_timeout_s + GRACE_S
        ours, theirs = Pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH", "")) if p)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "sam3_core.mlflow_records.background", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env=env,
        )
        theirs.close()
        self._conn: Connection | None = ours
        self._opened = False
        self._failure: BaseException | None = None
        self._send(("open", opening))

    def _gone(self, what: str) -> None:
        """The helper died: tracking stops here, the component goes on (an opening error it sent is kept)."""
        if self._conn is not None:
            if not self._opened:
                try:
                    if self._conn.poll(0):
                        self._opened, self._failure = True, self._conn.recv()[1]
                except (OSError, EOFError):
                    pass
            self._conn.close()
            self._conn = None
            if self._failure is not None:
                return
            code = self._process.poll()
            logger.warning("MLflow helper process ended (%s, exit code %s); this run's tracking stops here", what, code)

    def _send(self, message: tuple[Any, ...]) -> None:
        if self._conn is None:
            return
        try:
            self._conn.send(message)
        except (OSError, EOFError):
            self._gone("broken pipe")

    def _receive(self, timeout_s: float | None) -> Any:
        """The helper's next message; None when it died or did not answer within `timeout_s`."""
        if self._conn is None:
            return None
        try:
            if not self._conn.poll(timeout_s):
                self._process.kill()
                self._gone(f"no answer within {timeout_s:.0f} s")
                return None
            return self._conn.recv()
        except (OSError, EOFError):
            self._gone("closed its pipe")
            return None

    def _check_opened(self, block: bool) -> None:
        """Take the helper's opening report, once; raise the error it reported."""
        if not self._opened and self._conn is not None and (block or self._poll()):
            message = self._receive(self._wait_s)
            self._opened = True
            if message is not None and message[1] is not None:
                self._failure = message[1]
                self._close_process()
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def _poll(self) -> bool:
        try:
            return self._conn is not None and self._conn.poll(0)
        except (OSError, EOFError):
            return True

    def tell(self, method: str, *args: Any, **kwargs: Any) -> None:
        self._check_opened(block=False)
        self._send(("tell", method, args, kwargs))

    def ask(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self._check_opened(block=False)
        self._send(("ask", method, args, kwargs))
        self._check_opened(block=True)
        message = self._receive(self._wait_s)
        if message is None:
            return None
        _, ok, value = message
        if not ok:
            raise value
        return value

    def finish(self, status: str) -> dict[str, Any]:
        self._send(("finish", status))
        try:
            self._check_opened(block=True)
            message = self._receive(self._wait_s)
        finally:
            self._close_process()
        return message[1] if message is not None else {}

    def _close_process(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        try:
            self._process.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def serve(conn: Connection) -> int:
    """The helper's side: open the recorder, then take calls until `finish` or the component's end."""
    from sam3_core.mlflow_records.recorder import open_recorder

    try:
        _, opening = conn.recv()
    except EOFError:
        return 0
    try:
        recorder = open_recorder(**opening)
    except Exception as exc:
        if not isinstance(exc, ConfigError):
            logger.exception("MLflow: opening the runs failed")
        conn.send(("opened", _portable(exc)))
        return 1
    conn.send(("opened", None))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            logger.warning("the component ended without closing its MLflow run; it is recorded as FAILED")
            recorder.finish("FAILED")
            return 1
        if message[0] == "finish":
            recorder.finish(message[1])
            conn.send(("done", recorder.final_state()))
            return 0
        _, method, args, kwargs = message
        try:
            value = getattr(recorder, method)
            value = value(*args, **kwargs) if callable(value) else value
        except Exception as exc:
            if message[0] == "ask":
                conn.send(("answer", False, _portable(exc)))
            else:
                logger.exception("MLflow: %s failed; the component goes on without it", method)
            continue
        if message[0] == "ask":
            conn.send(("answer", True, value))


def main(argv: list[str]) -> None:
    # The component decides how its run ends on Ctrl-C; the helper must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # its lines reach the component's console: masked like the component's own (sam3_core.console)
    configure_console(fmt=LOG_FORMAT)
    code = serve(Connection(int(argv[0])))
    # Everything is sent or recorded by now (finish is bounded by its deadlines), and the component
    # waits for this exit: skip the interpreter's teardown of mlflow's modules (~0.8 s of CPU).
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
