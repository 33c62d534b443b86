"""Restart sampling: Xu et al. 2023, "Restart Sampling for Improving Generative Processes"
(arXiv:2306.14878), Algorithm 1.

The main pass solves the probability-flow ODE with Heun steps. When it reaches the low end t_min of the
restart interval [t_min, t_max] it adds forward noise to jump back up to t_max and solves the ODE down to
t_min again (RESTART_TIMES times), then finishes the main pass. The restart interval is the part of the
user's schedule from the noise level closest to RESTART_T_MAX (in log sigma) down to the first one at or
below RESTART_T_MIN, so the schedule type shapes the restart passes too. Noise levels in the sigma scale.

An algorithm in the form `base.SigmaScheduler` runs (see `base`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .base import Evaluation, SamplerContext, to_d

RESTART_T_MIN = 0.1
RESTART_T_MAX = 2.0
RESTART_TIMES = 1


def _heun_step(x, sigma: float, sigma_next: float):
    """Heun's step (Karras et al. 2022, Algorithm 1); Euler for the step to 0. Yields 1 or 2 evaluations."""
    x, denoised = yield x, sigma
    d = to_d(x, sigma, denoised)
    if sigma_next == 0.0:
        return x + d * (sigma_next - sigma)
    x_pred, denoised_2 = yield x + d * (sigma_next - sigma), sigma_next
    return x + 0.5 * (d + to_d(x_pred, sigma_next, denoised_2)) * (sigma_next - sigma)


def restart_interval(sigmas: Sequence[float]) -> tuple[int, int] | None:
    """Schedule indices (a, b) of the restart interval's top and bottom, or None when the schedule is too
    short for a restart pass of at least two steps."""
    b = next((i for i, s in enumerate(sigmas) if 0.0 < s <= RESTART_T_MIN and i > 0), None)
    if b is None:
        return None
    a = min(range(b), key=lambda i: abs(math.log(sigmas[i] / RESTART_T_MAX)))
    return (a, b) if b - a >= 2 else None


def restart(sigmas: Sequence[float], ctx: SamplerContext) -> Evaluation:
    """Restart sampling with Heun steps; `ctx.s_noise` scales the restart noise."""
    interval = restart_interval(sigmas)
    x = None
    for i in range(len(sigmas) - 1):
        x = yield from _heun_step(x, sigmas[i], sigmas[i + 1])
        if interval is not None and i + 1 == interval[1]:
            a, b = interval
            for _ in range(RESTART_TIMES):
                x = x + ctx.noise(x) * (ctx.s_noise * math.sqrt(sigmas[a] ** 2 - sigmas[b] ** 2))
                for j in range(a, b):
                    x = yield from _heun_step(x, sigmas[j], sigmas[j + 1])
    return x
