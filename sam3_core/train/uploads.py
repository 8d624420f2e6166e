"""Checkpoint publishing off the training thread: one background thread, jobs in the order given.

Under DDP the other ranks go on to the next step while rank 0 checkpoints, and wait for it
inside that step's collectives (under nccl, a watchdog kills them after `train.dist_timeout_s`).
So rank 0 only stages a checkpoint on the training thread (a local `torch.save`: seconds for a
full model) and hands the slow rest to this thread: hashing, the upload, the copy to last.pt and
metrics.jsonl. What a job hands back (the `on_checkpoint` callbacks, i.e. the MLflow records of
the checkpoints now in the store) runs on the training thread, in the jobs' order, when it next
looks (`deliver`, every step), so callers need not be thread-safe. A job that failed is raised
there too; the jobs queued after it are skipped (the store that refused one would refuse them
too, each after its retries).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger(__name__)
# what a job hands back to the training thread (None: nothing)
Then = Callable[[], None] | None
# runs on the upload thread
Job = Callable[[], Then]


class SkippedUpload(Exception):
    """A job not run because an earlier one failed."""


class BackgroundUploads:
    """One thread that runs publishing jobs in order; at most one job of each kind queued or running."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sam3pipe-upload")
        # submitted jobs whose result the training thread has not taken yet, in order
        self._jobs: list[Future[Then]] = []
        self._latest: dict[str, Future[Then]] = {}
        self._failed = False

    def _run(self, job: Job) -> Then:
        if self._failed:
            raise SkippedUpload("skipped: an earlier checkpoint upload failed")
        try:
            return job()
        except BaseException:
            self._failed = True
            raise

    def submit(self, kind: str, job: Job) -> None:
        """Queue `job`, after waiting for the previous job of `kind` (each kind holds one staged file at most)."""
        self.deliver()
        previous = self._latest.get(kind)
        if previous is not None and not previous.done():
            start = time.perf_counter()
            previous.exception()
            log.warning(
                "waited %.1f s for the previous %s checkpoint's upload: uploads take longer than the steps between "
                "checkpoints (raise train.checkpoint_every or train.val_every)",
                time.perf_counter() - start,
                kind,
            )
            self.deliver()
        self._latest[kind] = future = self._pool.submit(self._run, job)
        self._jobs.append(future)

    def deliver(self) -> None:
        """On the training thread: take the finished jobs, in order: run what each handed back, or raise its error."""
        while self._jobs and self._jobs[0].done():
            then = self._jobs.pop(0).result()
            if then is not None:
                then()

    def wait(self) -> None:
        """Wait for every job and take it (see `deliver`)."""
        while self._jobs:
            then = self._jobs.pop(0).result()
            if then is not None:
                then()

    def close(self) -> None:
        """Wait for every job, take what succeeded, stop the thread. It runs while another error may
        propagate (the run's own, or an upload's raised already), so failures left here are warnings."""
        for future in self._jobs:
            try:
                then = future.result()
                if then is not None:
                    then()
            except SkippedUpload:
                continue
            except Exception as exc:  # the error that ends the run is already on its way
                log.warning("a checkpoint upload failed: %s", exc)
        self._jobs = []
        self._pool.shutdown(wait=True)
