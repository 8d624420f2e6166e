"""Training progress into a Kubeflow Trainer TrainJob's status (`status.trainerStatus`), from rank 0.

Kubeflow Trainer v2.2 and later, with its `TrainJobStatus` feature gate on, gives the trainer
container an HTTPS endpoint of its controller: `KUBEFLOW_TRAINER_SERVER_URL`, the CA certificate
that signs it (`KUBEFLOW_TRAINER_SERVER_CA_CERT`, a path) and a projected service-account token
(`KUBEFLOW_TRAINER_SERVER_TOKEN`, a path; the token rotates, so it is read again for every
request). A POST of `{"trainerStatus": {...}}` sets the job's progress percentage, estimated
remaining seconds and metrics (names and values as strings of at most 64 characters), which
`kubectl get trainjob` and the launcher's log show.

Without those variables (a pod step, a laptop, a PyTorchJob, the gate off) no hook is built. The
requests go out from a background thread, at most one per `train.trainjob_status_every_s`
seconds (the Trainer asks for no more than one per 5 s); a refused or lost request is a warning,
never the training's end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sam3_core import comm
from sam3_core.train.trainer import HookBase

log = logging.getLogger(__name__)

URL_ENV = "KUBEFLOW_TRAINER_SERVER_URL"
CA_CERT_ENV = "KUBEFLOW_TRAINER_SERVER_CA_CERT"
TOKEN_ENV = "KUBEFLOW_TRAINER_SERVER_TOKEN"
# the TrainJob CRD's limits on trainerStatus.metrics
MAX_METRICS = 256
MAX_TEXT = 64
REQUEST_TIMEOUT_S = 5.0
# how long the end of training waits for its final report
FINAL_REPORT_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class StatusEndpoint:
    """Where and how to report: the controller's URL, its CA certificate and the token file."""

    url: str
    ca_cert: str
    token_file: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> StatusEndpoint | None:
        """The endpoint the Trainer injected, or None outside a TrainJob with progress reporting."""
        values = {name: environ.get(name, "") for name in (URL_ENV, CA_CERT_ENV, TOKEN_ENV)}
        if not any(values.values()):
            return None
        missing = [name for name, value in values.items() if not value]
        if missing:
            log.warning("TrainJob progress reporting off: %s set but not %s", URL_ENV, ", ".join(missing))
            return None
        return cls(values[URL_ENV], values[CA_CERT_ENV], values[TOKEN_ENV])

    def post(self, trainer_status: dict[str, Any]) -> None:
        """Send one status over TLS verified with the Trainer's CA; raises OSError on a refused or failed request."""
        token = Path(self.token_file).read_text(encoding="utf-8").strip()
        request = urllib.request.Request(
            self.url,
            data=json.dumps({"trainerStatus": trainer_status}).encode("utf-8"),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            method="POST",
        )
        context = ssl.create_default_context(cafile=self.ca_cert)
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S, context=context) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read(200).decode("utf-8", "replace")
            raise OSError(f"HTTP {exc.code} {exc.reason}: {' '.join(detail.split())}") from exc


def _text(value: str) -> str:
    return value[:MAX_TEXT]


def _value(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else str(value)


def trainer_status(
    step: int, max_steps: int, remaining_s: float | None, metrics: Mapping[str, float], now: datetime
) -> dict[str, Any]:
    """The trainerStatus object of the TrainJob CRD: percent done, ETA, the latest metrics, the time."""
    reported = [{"name": _text(name), "value": _text(_value(value))} for name, value in sorted(metrics.items())]
    status: dict[str, Any] = {
        "progressPercentage": max(0, min(100, (100 * step) // max(max_steps, 1))),
        "metrics": [{"name": "step", "value": f"{step}/{max_steps}"}, *reported[: MAX_METRICS - 1]],
        "lastUpdatedTime": now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if remaining_s is not None:
        status["estimatedRemainingSeconds"] = max(0, min(2**31 - 1, round(remaining_s)))
    return status


class TrainJobStatusReporter(HookBase):
    """Reports progress every `every_s` seconds and at the end; the requests run on a daemon thread.

    Only the newest status waits to be sent: a slow controller delays reports, never the steps.
    """

    def __init__(
        self,
        endpoint: StatusEndpoint,
        every_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint, self.every_s, self.clock = endpoint, every_s, clock
        self._latest: dict[str, float] = {}
        self._since = 0.0
        self._start_step = 0
        self._last_report = -math.inf
        self._pending: dict[str, Any] | None = None
        self._busy = False
        self._stop = False
        self._failures = 0
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._send_loop, name="trainjob-status", daemon=True)

    # ------------------------------------------------------------------ hook
    def before_train(self) -> None:
        self._since, self._start_step = self.clock(), self.trainer.step
        self._thread.start()
        self._report()

    def after_step(self) -> None:
        self._latest.update(self.trainer.step_metrics)
        if self.clock() - self._last_report >= self.every_s:
            self._report()

    def after_train(self) -> None:
        self._report()
        self.close(FINAL_REPORT_TIMEOUT_S)

    # ------------------------------------------------------------------ reports
    def remaining_s(self) -> float | None:
        """Seconds left at this process's pace so far; None before its first step."""
        done = self.trainer.step - self._start_step
        if done <= 0:
            return None
        return (self.clock() - self._since) / done * (self.trainer.max_steps - self.trainer.step)

    def _report(self) -> None:
        self._last_report = self.clock()
        status = trainer_status(
            self.trainer.step, self.trainer.max_steps, self.remaining_s(), self._latest, datetime.now(UTC)
        )
        with self._ready:
            self._pending = status
            self._ready.notify_all()

    def _send_loop(self) -> None:
        while True:
            with self._ready:
                while self._pending is None and not self._stop:
                    self._ready.wait()
                if self._pending is None:
                    return
                status, self._pending, self._busy = self._pending, None, True
            self._send(status)
            with self._ready:
                self._busy = False
                self._ready.notify_all()

    def _send(self, status: dict[str, Any]) -> None:
        try:
            self.endpoint.post(status)
        except (OSError, ValueError) as exc:
            self._failures += 1
            if self._failures == 1:
                log.warning("TrainJob progress not reported to %s (training goes on): %s", self.endpoint.url, exc)
            return
        if self._failures:
            log.info("TrainJob progress reported again after %d failed report(s)", self._failures)
            self._failures = 0

    def flush(self, timeout_s: float) -> None:
        """Wait (at most `timeout_s`) until the pending report is sent."""
        deadline = time.monotonic() + timeout_s
        with self._ready:
            while (self._pending is not None or self._busy) and time.monotonic() < deadline:
                self._ready.wait(max(deadline - time.monotonic(), 0.0))

    def close(self, timeout_s: float) -> None:
        """Send what is pending (waiting at most `timeout_s`), then stop the thread."""
        deadline = time.monotonic() + timeout_s
        with self._ready:
            self._stop = True
            self._ready.notify_all()
        self.flush(timeout_s)
        self._thread.join(max(deadline - time.monotonic(), 0.0))


def trainjob_status_hook(every_s: int, environ: Mapping[str, str] = os.environ) -> TrainJobStatusReporter | None:
    """The reporter on rank 0 of a TrainJob that asks for progress; None elsewhere or when off (every_s=0)."""
    if every_s <= 0 or not comm.is_main():
        return None
    endpoint = StatusEndpoint.from_env(environ)
    if endpoint is None:
        return None
    log.info("reporting progress to the TrainJob's status every %d s (%s)", every_s, endpoint.url)
    return TrainJobStatusReporter(endpoint, every_s)
