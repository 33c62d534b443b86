"""The cancel channel of the pool: a small async Ray actor holding interrupt/skip flags per job id.

A Serve stream only flows from the replica to the head, so the head posts a job's interrupt or skip here and
the replica running that job learns of it by a long poll: `wait` returns as soon as the job's flags differ from
what the replica has seen (or after a timeout), so the replica holds one pending call per job instead of
polling a few times a second, and an interrupt reaches it at once. Skips are counted, not flagged: each skip the
head sends stops one batch.
"""

from __future__ import annotations

import asyncio

import ray


@ray.remote(num_cpus=0)
class CancelBoard:
    """Per job id: [interrupted, skips sent]. Entries are dropped when the head forgets the job."""

    def __init__(self) -> None:
        self._flags: dict[str, list] = {}
        self._changed: dict[str, asyncio.Event] = {}  # set when a job's flags change (or it is forgotten)

    def _touch(self, job_id: str) -> None:
        event = self._changed.pop(job_id, None)
        if event is not None:
            event.set()

    async def interrupt(self, job_id: str) -> None:
        self._flags.setdefault(job_id, [False, 0])[0] = True
        self._touch(job_id)

    async def skip(self, job_id: str) -> None:
        self._flags.setdefault(job_id, [False, 0])[1] += 1
        self._touch(job_id)

    async def poll(self, job_id: str) -> tuple[bool, int]:
        interrupted, skips = self._flags.get(job_id, (False, 0))
        return bool(interrupted), int(skips)

    async def wait(self, job_id: str, skips_seen: int, timeout: float) -> tuple[bool, int]:
        """The job's (interrupted, skips sent) once it is interrupted or has more than `skips_seen` skips, or
        when the job is forgotten or `timeout` seconds pass (then unchanged)."""
        state = await self.poll(job_id)
        if not state[0] and state[1] <= skips_seen:
            event = self._changed.setdefault(job_id, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            state = await self.poll(job_id)
        return state

    async def forget(self, job_id: str) -> None:
        self._flags.pop(job_id, None)
        self._touch(job_id)
