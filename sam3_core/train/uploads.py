"""Checkpoint publishing off the training thread: one background thread, jobs in the order given.

Under DDP the other ranks go on to the next step while rank 0 checkpoints, and wait for it
inside that step's collectives (under nccl, a watchdog kills them after `train.dist_timeout_s`).
So rank 0 only stages a checkpoint on the training thread (a local `torch.save`: seconds for a
full model) and hands the slow rest to this thread: hashing, the upload, the copy to last.pt,
metrics.jsonl and the MLflow records of the `on_checkpoint` callback, which therefore runs on
this thread. A job that failed is raised on the training thread at the next `raise_errors`,
`submit` or `wait`; the jobs queued after it are skipped (the store that refused one would refuse
them too, each after its retries).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger(__name__)


class SkippedUpload(Exception):
    """A job not run because an earlier one failed."""


class BackgroundUploads:
    """One thread that runs publishing jobs in order; at most one job of each kind queued or running."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sam3pipe-upload")
        self._jobs: list[Future[None]] = []
        self._latest: dict[str, Future[None]] = {}
        self._failed = False

    def _run(self, job: Callable[[], None]) -> None:
        if self._failed:
            raise SkippedUpload("skipped: an earlier checkpoint upload failed")
        try:
            job()
        except BaseException:
            self._failed = True
            raise

    def submit(self, kind: str, job: Callable[[], None]) -> None:
        """Queue `job`, after waiting for the previous job of `kind` (each kind holds one staged file at most)."""
        self.raise_errors()
        previous = self._latest.get(kind)
        if previous is not None and not previous.done():
            start = time.perf_counter()
            previous.result()
            log.warning(
                "waited %.1f s for the previous %s checkpoint's upload: uploads take longer than the steps between "
                "checkpoints (raise train.checkpoint_every or train.val_every)",
                time.perf_counter() - start,
                kind,
            )
        self._latest[kind] = future = self._pool.submit(self._run, job)
        self._jobs.append(future)

    def raise_errors(self) -> None:
        """Raise the error of the first finished job that failed; forget the jobs that succeeded."""
        for future in self._jobs:
            error = future.exception() if future.done() else None
            if error is not None:
                self._jobs.remove(future)
                raise error
        self._jobs = [future for future in self._jobs if not future.done()]

    def wait(self) -> None:
        """Wait for every job; raise the first error."""
        jobs, self._jobs = self._jobs, []
        for future in jobs:
            future.result()

    def close(self) -> None:
        """Wait for every job and stop the thread. It runs while another error may propagate (the
        run's own, or an upload's raised already), so failures left here are warnings."""
        for future in self._jobs:
            error = future.exception()
            if error is not None and not isinstance(error, SkippedUpload):
                log.warning("a checkpoint upload failed: %s", error)
        self._jobs = []
        self._pool.shutdown(wait=True)
