"""The job queue: one worker thread per engine (= per device) runs jobs first-in first-out (a pool of engines,
ldm_core.cluster, gives the queue one worker thread per replica: `workers=N` runs up to N jobs at once).
The web UI, the REST API and the CLI all submit here, so one GPU never runs two jobs at once and every client
sees the same queue positions.

A job carries its own `JobContext` (cancel token + progress). `interrupt` on a running job stops it after the
current step and keeps the partial result; on a queued job it cancels it. A failed job records its error and
the worker goes on with the next one.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from .progress import JobContext, ProgressState

log = logging.getLogger(__name__)

JobState = Literal["queued", "running", "done", "failed", "cancelled"]


class QueueFull(RuntimeError):
    """The queue holds `max_queued` jobs already."""


@dataclass
class Job:
    """One unit of work. `run(ctx)` does it; its return value becomes `result`."""

    run: Callable[[JobContext], Any]
    kind: str = "generate"
    request: Any = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    state: JobState = "queued"
    ctx: JobContext = field(default_factory=JobContext)
    result: Any = None
    error: BaseException | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends; True if it ended within `timeout` seconds."""
        return self._done.wait(timeout)

    def progress(self) -> ProgressState:
        return self.ctx.progress.snapshot()


class JobQueue:
    """FIFO queue with `workers` worker threads (1: one job at a time). `submit` returns at once; `wait` or
    `Job.wait` blocks. With several workers, `current` is the longest-running job and `running()` lists all."""

    def __init__(self, *, max_queued: int = 64, keep_finished: int = 256, workers: int = 1):
        if workers < 1:
            raise ValueError(f"workers must be >= 1 (got {workers})")
        self.max_queued = max_queued
        self.workers = workers
        self._queue: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}
        self._finished: deque[str] = deque()
        self._keep = keep_finished
        self._cv = threading.Condition()
        self._running: list[Job] = []
        self._stop = False
        self._counter = itertools.count(1)
        self.completed = 0
        self._threads = [
            threading.Thread(target=self._worker, name=f"ldm-job-worker-{i}" if i else "ldm-job-worker", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    # ---- client side --------------------------------------------------------------------------------
    def submit(self, run: Callable[[JobContext], Any], *, kind: str = "generate", request: Any = None) -> Job:
        job = Job(run=run, kind=kind, request=request)
        with self._cv:
            if len(self._queue) >= self.max_queued:
                raise QueueFull(f"the queue is full ({self.max_queued} jobs waiting); try again later")
            self._queue.append(job)
            self._jobs[job.id] = job
            self._cv.notify_all()
        return job

    def call(self, run: Callable[[JobContext], Any], *, kind: str = "task", timeout: float | None = None) -> Any:
        """Submit and wait; re-raise the job's error. For short tasks that must not overlap a generation."""
        job = self.submit(run, kind=kind)
        job.wait(timeout)
        if job.error is not None:
            raise job.error
        return job.result

    def get(self, job_id: str) -> Job | None:
        with self._cv:
            return self._jobs.get(job_id)

    def position(self, job: Job) -> int:
        """0 = running, 1 = next, ...; -1 when finished or unknown."""
        with self._cv:
            if job in self._running:
                return 0
            try:
                return self._queue.index(job) + 1
            except ValueError:
                return -1

    @property
    def current(self) -> Job | None:
        """The running job (with several workers: the one that started first); None when idle."""
        with self._cv:
            return self._running[0] if self._running else None

    def running(self) -> list[Job]:
        """Every running job, oldest first (at most `workers`)."""
        with self._cv:
            return list(self._running)

    def queued(self) -> list[Job]:
        with self._cv:
            return list(self._queue)

    def pending_count(self) -> int:
        with self._cv:
            return len(self._queue) + len(self._running)

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job or interrupt a running one. False when there is no such unfinished job."""
        with self._cv:
            job = self._jobs.get(job_id)
            if job is None or job.finished:
                return False
            if job in self._queue:
                self._queue.remove(job)
                self._finish(job, "cancelled")
                return True
        job.ctx.cancel.interrupt()
        return True

    def interrupt_current(self) -> bool:
        """Interrupt the running job (every running one, with several workers: A1111's "stop what runs")."""
        jobs = self.running()
        for job in jobs:
            job.ctx.cancel.interrupt()
        return bool(jobs)

    def skip_current(self) -> bool:
        """Skip the running batch (of every running job, with several workers)."""
        jobs = self.running()
        for job in jobs:
            job.ctx.cancel.skip()
        return bool(jobs)

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            for job in list(self._queue):
                self._finish(job, "cancelled")
            self._queue.clear()
            self._cv.notify_all()
        for job in self.running():
            job.ctx.cancel.interrupt()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # ---- worker side --------------------------------------------------------------------------------
    def _finish(self, job: Job, state: JobState) -> None:
        job.state = state
        job.finished_at = time.time()
        job._done.set()
        self._finished.append(job.id)
        while len(self._finished) > self._keep:
            self._jobs.pop(self._finished.popleft(), None)

    def _worker(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                job = self._queue.popleft()
                self._running.append(job)
                job.state = "running"
                job.started_at = time.time()
            try:
                job.result = job.run(job.ctx)
                state: JobState = "done"
            except BaseException as exc:  # a failed job must never stop the worker
                job.error = exc
                state = "failed"
                if not isinstance(exc, ValueError):
                    log.exception("job %s failed", job.id)
                if _is_oom(exc):
                    _free_cuda()
            with self._cv:
                self._running.remove(job)
                self.completed += 1
                self._finish(job, state)
                self._cv.notify_all()


def _is_oom(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower()


def _free_cuda() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        pass
