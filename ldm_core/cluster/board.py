"""The cancel channel of the pool: a small Ray actor holding interrupt/skip flags per job id.

A Serve stream only flows from the replica to the head, so the head posts a job's interrupt or skip here and
the replica running that job polls the board a few times a second, setting the job's own `CancelToken` (which
the denoising loop checks every step). Skips are counted, not flagged: each skip the head sends stops one batch.
"""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class CancelBoard:
    """Per job id: [interrupted, skips sent]. Entries are dropped when the head forgets the job."""

    def __init__(self) -> None:
        self._flags: dict[str, list] = {}

    def interrupt(self, job_id: str) -> None:
        self._flags.setdefault(job_id, [False, 0])[0] = True

    def skip(self, job_id: str) -> None:
        self._flags.setdefault(job_id, [False, 0])[1] += 1

    def poll(self, job_id: str) -> tuple[bool, int]:
        interrupted, skips = self._flags.get(job_id, (False, 0))
        return bool(interrupted), int(skips)

    def forget(self, job_id: str) -> None:
        self._flags.pop(job_id, None)
