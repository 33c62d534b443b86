"""Cancellation and progress: the two things a running job shares with whoever watches it.

`CancelToken` is checked by the denoising loop once per step: `interrupt()` stops the whole job and keeps
the partial result (decoded), `skip()` stops the current image batch and moves on to the next one.
`Progress` is a snapshot the loop updates; readers (UI, API) copy it with `snapshot()`.

Live previews cost nothing unless someone looks: the loop posts a `PreviewSource` (the step's predicted latents
and the renderer), and the image is rendered on the first read of `ProgressState.preview`, in the reader's
thread, once per source. A job nobody watches (most API calls) never decodes a preview.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from PIL import Image

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """Raised inside the loop when the job was interrupted or the current batch skipped."""

    def __init__(self, skipped: bool):
        self.skipped = skipped
        super().__init__("skipped" if skipped else "interrupted")


class CancelToken:
    """Thread-safe interrupt/skip flags for one job."""

    def __init__(self) -> None:
        self._interrupt = threading.Event()
        self._skip = threading.Event()

    def interrupt(self) -> None:
        self._interrupt.set()

    def skip(self) -> None:
        self._skip.set()

    @property
    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    @property
    def skipped(self) -> bool:
        return self._skip.is_set()

    def clear_skip(self) -> None:
        """Called when a new batch starts: a skip applies to the batch that was running."""
        self._skip.clear()

    def check(self) -> None:
        """Raise Interrupted if the job should stop now."""
        if self._interrupt.is_set():
            raise Interrupted(skipped=False)
        if self._skip.is_set():
            raise Interrupted(skipped=True)


class PreviewSource:
    """One preview, rendered by `render()` on the first call of `image()` and kept (thread-safe). A render that
    fails gives None (a preview must never fail anything)."""

    def __init__(self, render: Callable[[], Image.Image | None] | None = None, image: Image.Image | None = None):
        self._render = render
        self._image = image
        self._lock = threading.Lock()

    def image(self) -> Image.Image | None:
        with self._lock:
            if self._render is not None:
                render, self._render = self._render, None
                try:
                    self._image = render()
                except Exception as exc:
                    log.debug("preview failed: %s", exc)
            return self._image


@dataclass
class ProgressState:
    """Where a job stands. `step`/`steps` count denoising steps of the current batch (`job_no` of
    `job_count` batches); `fraction` is overall progress 0..1; `eta` is seconds left (None: unknown)."""

    job_no: int = 0
    job_count: int = 0
    step: int = 0
    steps: int = 0
    started_at: float = 0.0
    textinfo: str = ""
    preview_source: PreviewSource | None = None  # read it as `preview`
    preview_step: int = -1
    interrupted: bool = False
    skipped: bool = False
    worker: str = ""  # which engine runs the job: "" in-process, a replica's host:pid in a Ray pool

    @property
    def preview(self) -> Image.Image | None:
        """The newest live preview (rendered now if nobody has looked at it yet), or None."""
        return self.preview_source.image() if self.preview_source is not None else None

    @preview.setter
    def preview(self, image: Image.Image | None) -> None:
        self.preview_source = PreviewSource(image=image) if image is not None else None

    @property
    def fraction(self) -> float:
        if not self.job_count or not self.steps:
            return 0.0
        return min(1.0, (self.job_no + self.step / self.steps) / self.job_count)

    @property
    def eta(self) -> float | None:
        f = self.fraction
        if f <= 0 or not self.started_at:
            return None
        elapsed = time.monotonic() - self.started_at
        return elapsed * (1 - f) / f


class Progress:
    """A thread-safe, mutable ProgressState owned by one job."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = ProgressState()

    def update(self, **changes) -> None:
        with self._lock:
            for k, v in changes.items():
                setattr(self._state, k, v)

    def snapshot(self) -> ProgressState:
        with self._lock:
            return replace(self._state)


@dataclass
class JobContext:
    """What the engine receives alongside a request: the cancel token and the progress sink."""

    cancel: CancelToken = field(default_factory=CancelToken)
    progress: Progress = field(default_factory=Progress)
