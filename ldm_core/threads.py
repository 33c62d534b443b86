"""The torch CPU thread policy of a server or command: how many intra-op threads, and whether idle OpenMP threads
spin or sleep.

OpenMP's default is to spin-wait between parallel regions. On a machine where other programs hold cores, a
spinning thread burns the time slice its partner needs. `bench/threads.py` on this project's 2-core machine
(built-in model, 20 steps, median of 5; README: Speed): quiet, 1 thread 0.41 s, 2 spinning 0.37 s, 2 sleeping
0.52 s; with one competing process, 0.83 s, 70.6 s (!) and 1.05 s; with two, 1.36 s, 1.69 s and 1.55 s.
So the default leaves one CPU to the rest of the machine (the server, the browser, other programs): every CPU
but one, at least 1 thread, and idle threads sleep (OMP_WAIT_POLICY=PASSIVE) so that a busy machine never
collapses to spinning. On 2 CPUs that is 1 thread: at most 12% slower than the best quiet policy, and the
fastest as soon as anything else runs.

OpenMP reads its wait policy once, when torch first starts its thread pool, so `prepare_process()` must run
before torch does any work (the launchers call it first thing); `apply()` then sets the thread count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadPolicy:
    """`threads` torch intra-op threads; `passive`: idle OpenMP threads sleep instead of spinning."""

    threads: int
    passive: bool = True

    def environ(self) -> dict[str, str]:
        """The environment variables this policy needs set before torch starts its OpenMP pool."""
        return {"OMP_WAIT_POLICY": "PASSIVE"} if self.passive else {}

    def apply(self) -> None:
        """Set torch's intra-op thread count (call after `prepare_process`)."""
        import torch

        torch.set_num_threads(self.threads)


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, e.g. a container's share), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def thread_policy(requested: int | None = None, cpus: int | None = None) -> ThreadPolicy:
    """The policy for `--threads N` (None: OMP_NUM_THREADS if set, else every CPU this process may use but one,
    at least one; idle threads sleep). ValueError names the flag for a count below 1."""
    if requested is not None and requested < 1:
        raise ValueError(f"--threads must be at least 1 (got {requested})")
    if requested is None:
        env = os.environ.get("OMP_NUM_THREADS", "")
        requested = int(env) if env.isdigit() and int(env) >= 1 else None  # a count the user set wins
    n = requested if requested is not None else max(1, (cpus or cpu_count()) - 1)
    return ThreadPolicy(threads=n, passive=True)


def prepare_process(policy: ThreadPolicy) -> None:
    """Put the policy's OpenMP settings into this process's environment unless the user set them; effective
    only before torch starts its thread pool (the launchers call this before building the engine)."""
    for key, value in policy.environ().items():
        os.environ.setdefault(key, value)
