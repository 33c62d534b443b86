"""DPM fast: DPM-Solver-fast, the singlestep solver with orders 3/2/1 of Lu et al. 2022, "DPM-Solver: A
Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around 10 Steps" (arXiv:2206.00927),
Section 3.3 and Algorithms 1 and 2, written in the sigma scale (alpha = 1, lambda = -log sigma) with the
model's noise estimate eps = (x - D) / sigma.

An algorithm in the form `base.SigmaScheduler` runs (see `base`). `steps` counts model evaluations: the
first steps - 1 go to DPM-Solver-fast between the schedule's first and last nonzero noise level on a grid
evenly spaced in lambda (the paper's choice), the last one denoises (the step to sigma = 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .base import Evaluation, SamplerContext, to_d


def fast_orders(evaluations: int) -> list[int]:
    """The orders of DPM-Solver-fast's steps for a budget of model evaluations (Lu et al. 2022, Sec. 3.3):
    K = evaluations // 3 + 1 steps, all third order except the end: [.., 2, 1] when the budget is a
    multiple of 3, [.., 1] when it leaves 1, [.., 2] when it leaves 2."""
    if evaluations <= 0:
        return []
    k = evaluations // 3 + 1
    rest = evaluations % 3
    if rest == 0:
        return [3] * (k - 2) + [2, 1]
    return [3] * (k - 1) + [rest]


def _eps(x, sigma: float, denoised):
    return to_d(x, sigma, denoised)


def _solver_step(x, eps_s, sigma: float, sigma_next: float, order: int):
    """One DPM-Solver step of the given order from sigma to sigma_next, eps_s the noise estimate at x.
    A generator: yields the order - 1 extra evaluations, returns the new x."""
    h = math.log(sigma / sigma_next)
    if order == 1:
        return x + (sigma_next - sigma) * eps_s
    if order == 2:  # r1 = 1/2
        sigma_1 = sigma * math.exp(-0.5 * h)
        u, den = yield x + (sigma_1 - sigma) * eps_s, sigma_1
        return x + (sigma_next - sigma) * _eps(u, sigma_1, den)
    r1, r2 = 1.0 / 3.0, 2.0 / 3.0
    sigma_1, sigma_2 = sigma * math.exp(-r1 * h), sigma * math.exp(-r2 * h)
    u1, den_1 = yield x + (sigma_1 - sigma) * eps_s, sigma_1
    diff_1 = _eps(u1, sigma_1, den_1) - eps_s
    coef = (sigma_2 * r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1.0)
    u2, den_2 = yield x + (sigma_2 - sigma) * eps_s - coef * diff_1, sigma_2
    diff_2 = _eps(u2, sigma_2, den_2) - eps_s
    return x + (sigma_next - sigma) * eps_s - (sigma_next / r2) * (math.expm1(h) / h - 1.0) * diff_2


def dpm_fast(sigmas: Sequence[float], ctx: SamplerContext) -> Evaluation:
    """DPM-Solver-fast on [first, last nonzero sigma of the schedule], then a final denoising evaluation."""
    evaluations = len(sigmas) - 1
    orders = fast_orders(evaluations - 1) + [1]
    nonzero = [s for s in sigmas if s > 0.0]
    grid = np.exp(np.linspace(math.log(nonzero[0]), math.log(nonzero[-1]), len(orders))).tolist()
    grid[0], grid[-1] = nonzero[0], nonzero[-1]
    x = None
    for j, order in enumerate(orders):
        x, denoised = yield x, grid[j]
        if j == len(orders) - 1:
            x = denoised
        else:
            x = yield from _solver_step(x, _eps(x, grid[j], denoised), grid[j], grid[j + 1], order)
    return x
