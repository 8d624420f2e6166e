"""Metrics leave the training loop through a buffer and one background thread.

`add` only appends under a lock, so a slow or absent tracking server never holds a step.
The thread sends in MLflow-sized batches every `flush_interval_s`; while the server is
away it keeps everything and retries with exponential backoff, and at `close` it keeps
trying until a deadline, then hands back whatever is left for the caller to record.
Resending a batch is safe: MLflow stores a (key, step, timestamp, value) metric once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import requests

from sam3_core.mlflow_records import mlflow_api
from sam3_core.mlflow_records.redact import describe_error
from sam3_core.mlflow_records.settings import MlflowConfig

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

logger = logging.getLogger(__name__)


def tracking_errors() -> tuple[type[Exception], ...]:
    """What a call to the tracking server may raise when the server, not our data, is the problem."""
    return (mlflow_api.MlflowException, requests.RequestException, OSError)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the server is down, overloaded or timed out (not: it refused the data)."""
    if isinstance(exc, mlflow_api.MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    return True


@dataclass
class Pending:
    """Metrics, params and tags not yet on the server, in the order they were logged."""

    metrics: list[Metric] = field(default_factory=list)
    params: list[Param] = field(default_factory=list)
    tags: list[RunTag] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.metrics) + len(self.params) + len(self.tags)

    def extend(self, other: Pending) -> None:
        self.metrics += other.metrics
        self.params += other.params
        self.tags += other.tags

    def head(self) -> Pending:
        """The next batch MLflow accepts in one request."""
        return Pending(
            self.metrics[: mlflow_api.MAX_METRICS_PER_BATCH],
            self.params[: mlflow_api.MAX_PARAMS_TAGS_PER_BATCH],
            self.tags[: mlflow_api.MAX_PARAMS_TAGS_PER_BATCH],
        )

    def drop_head(self, batch: Pending) -> None:
        del self.metrics[: len(batch.metrics)]
        del self.params[: len(batch.params)]
        del self.tags[: len(batch.tags)]

    def batches(self) -> Iterator[Pending]:
        """Everything, in MLflow-sized batches (this object is left as it is)."""
        rest = Pending(list(self.metrics), list(self.params), list(self.tags))
        while len(rest):
            batch = rest.head()
            yield batch
            rest.drop_head(batch)


class OfflineBuffer:
    """Stands in for the sender when no run could be opened: keeps everything for the record."""

    def __init__(self) -> None:
        self._pending = Pending()
        self._lock = threading.Lock()

    def add(self, metrics: Iterable[Metric] = (), params: Iterable[Param] = (), tags: Iterable[RunTag] = ()) -> None:
        with self._lock:
            self._pending.extend(Pending(list(metrics), list(params), list(tags)))

    def close(self, timeout_s: float) -> Pending:
        with self._lock:
            return self._pending


class Sender:
    """Sends one run's metrics, params and tags from a background thread, with retry + backoff."""

    def __init__(self, client: MlflowClient, run_id: str, cfg: MlflowConfig) -> None:
        self._client, self._run_id, self._cfg = client, run_id, cfg
        self._pending = Pending()
        self._rejected = Pending()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._deadline: float | None = None
        self._failing = False
        self._thread = threading.Thread(target=self._loop, name=f"mlflow-sender-{run_id[:8]}", daemon=True)
        self._thread.start()

    def add(self, metrics: Iterable[Metric] = (), params: Iterable[Param] = (), tags: Iterable[RunTag] = ()) -> None:
        """Queue for sending; returns at once."""
        with self._lock:
            self._pending.extend(Pending(list(metrics), list(params), list(tags)))

    def close(self, timeout_s: float) -> Pending:
        """Send what is queued, trying for up to `timeout_s`; returns what could not be sent."""
        self._deadline = time.monotonic() + timeout_s
        self._wake.set()
        self._thread.join()
        with self._lock:
            left = Pending()
            left.extend(self._rejected)
            left.extend(self._pending)
            return left

    def _loop(self) -> None:
        wait = self._cfg.flush_interval_s
        backoff = self._cfg.retry_initial_s
        while True:
            if self._deadline is not None:
                wait = min(wait, max(0.0, self._deadline - time.monotonic()))
            self._wake.wait(wait)
            self._wake.clear()
            deadline = self._deadline
            # The thread must outlive any error: an escaped exception would silently stop tracking.
            try:
                self._send_all()
            except Exception as exc:
                if deadline is not None and time.monotonic() >= deadline:
                    return
                self._note_failure(exc, backoff)
                wait, backoff = backoff, min(backoff * 2, self._cfg.retry_max_s)
                continue
            if self._failing:
                logger.warning("MLflow tracking server reachable again; buffered metrics of run %s sent", self._run_id)
                self._failing = False
            if deadline is not None:
                return
            wait, backoff = self._cfg.flush_interval_s, self._cfg.retry_initial_s

    def _send_all(self) -> None:
        while True:
            with self._lock:
                batch = self._pending.head()
            if not len(batch):
                return
            try:
                self._client.log_batch(self._run_id, metrics=batch.metrics, params=batch.params, tags=batch.tags)
            except Exception as exc:
                if is_transient(exc):
                    raise
                logger.error(
                    "MLflow refused %d values of run %s (%s); they go to the local record",
                    len(batch),
                    self._run_id,
                    describe_error(exc),
                )
                self._rejected.extend(batch)
            with self._lock:
                self._pending.drop_head(batch)

    def _note_failure(self, exc: BaseException, retry_in: float) -> None:
        if not self._failing:
            with self._lock:
                queued = len(self._pending)
            logger.warning(
                "MLflow tracking server unreachable (%s); keeping %d values of run %s and retrying every <= %.0fs",
                describe_error(exc),
                queued,
                self._run_id,
                self._cfg.retry_max_s,
            )
            self._failing = True
        logger.debug("next send attempt for run %s in %.1fs", self._run_id, retry_in)
