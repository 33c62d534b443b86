"""The torch CPU thread policy of a server or command: how many intra-op threads, and whether idle OpenMP threads
spin or sleep.

OpenMP's default is to spin-wait between parallel regions. On a machine where other programs hold cores, a
spinning thread burns the time slice its partner needs, and one image of the built-in model went from 0.8 s
to 4-46 s with 2 threads on a busy 2-core machine. Threads that sleep when idle (OMP_WAIT_POLICY=PASSIVE) keep
most of the second core's gain when the machine is quiet and lose little when it is not; `bench/threads.py`
prints the policies side by side, quiet and under load, and the numbers behind the default are in the README.

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
    """The policy for `--threads N` (None: the default, every CPU this process may use, passive waiting).
    ValueError names the flag for a count below 1."""
    if requested is not None and requested < 1:
        raise ValueError(f"--threads must be at least 1 (got {requested})")
    n = requested if requested is not None else (cpus or cpu_count())
    return ThreadPolicy(threads=n, passive=True)


def prepare_process(policy: ThreadPolicy) -> None:
    """Put the policy's OpenMP settings into this process's environment unless the user set them; effective
    only before torch starts its thread pool (the launchers call this before building the engine)."""
    for key, value in policy.environ().items():
        os.environ.setdefault(key, value)
