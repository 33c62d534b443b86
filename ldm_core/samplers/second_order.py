"""Two-evaluation samplers on the probability-flow ODE: Heun (with churn), DPM2 and ancestral DPM2.

Algorithms in the form `base.SigmaScheduler` runs (see `base`). The step to sigma = 0 is always a single
Euler step (the correction would divide by zero), so these make 2 * steps - 1 evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .base import Evaluation, SamplerContext, ancestral_split, to_d


def _churn(x, sigma: float, steps: int, ctx: SamplerContext):
    """Karras et al.'s churn: raise the noise level from sigma to sigma_hat by adding fresh noise (none before
    the first evaluation, when x is not known yet). Returns (x, sigma_hat)."""
    sigma_hat = ctx.churn(sigma, steps)
    if x is not None and sigma_hat > sigma:
        x = x + ctx.noise(x) * ctx.s_noise * math.sqrt(sigma_hat**2 - sigma**2)
    return x, sigma_hat


def heun(sigmas: Sequence[float], ctx: SamplerContext) -> Evaluation:
    """Heun's second-order method with churn: Karras et al. 2022, "Elucidating the Design Space of
    Diffusion-Based Generative Models", arXiv:2206.00364, Algorithm 2."""
    steps = len(sigmas) - 1
    x = None
    for i in range(steps):
        x, sigma_hat = _churn(x, sigmas[i], steps, ctx)
        sigma_next = sigmas[i + 1]
        x, denoised = yield x, sigma_hat
        d = to_d(x, sigma_hat, denoised)
        if sigma_next == 0.0:
            x = x + d * (sigma_next - sigma_hat)
            continue
        x_pred, denoised_2 = yield x + d * (sigma_next - sigma_hat), sigma_next
        d_2 = to_d(x_pred, sigma_next, denoised_2)
        x = x + (d + d_2) * 0.5 * (sigma_next - sigma_hat)
    return x


def _midpoint_step(x, sigma: float, d, target: float):
    """The DPM-Solver-2 step from sigma to target given the derivative d at x: evaluate at the midpoint in
    log sigma and take the whole step with the midpoint's derivative (Lu et al. 2022, "DPM-Solver",
    arXiv:2206.00927, Algorithm 1 with r1 = 1/2, written in the sigma scale). A generator: yields one
    evaluation, returns the new x."""
    sigma_mid = math.exp(0.5 * (math.log(sigma) + math.log(target)))
    x_mid, denoised_mid = yield x + d * (sigma_mid - sigma), sigma_mid
    return x + to_d(x_mid, sigma_mid, denoised_mid) * (target - sigma)


def dpm2(sigmas: Sequence[float], ctx: SamplerContext) -> Evaluation:
    """DPM-Solver-2 (Lu et al. 2022, arXiv:2206.00927) on the sigma schedule, with Karras et al.'s churn."""
    steps = len(sigmas) - 1
    x = None
    for i in range(steps):
        x, sigma_hat = _churn(x, sigmas[i], steps, ctx)
        sigma_next = sigmas[i + 1]
        x, denoised = yield x, sigma_hat
        d = to_d(x, sigma_hat, denoised)
        if sigma_next == 0.0:
            x = x + d * (sigma_next - sigma_hat)
        else:
            x = yield from _midpoint_step(x, sigma_hat, d, sigma_next)
    return x


def dpm2_ancestral(sigmas: Sequence[float], ctx: SamplerContext) -> Evaluation:
    """Ancestral DPM-Solver-2: a DPM-Solver-2 step down to sigma_down, then fresh noise of std sigma_up
    (`base.ancestral_split`)."""
    x = None
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        x, denoised = yield x, sigma
        d = to_d(x, sigma, denoised)
        sigma_down, sigma_up = ancestral_split(sigma, sigmas[i + 1], ctx.eta)
        if sigma_down == 0.0:
            x = x + d * (sigma_down - sigma)
        else:
            x = yield from _midpoint_step(x, sigma, d, sigma_down)
        if sigma_up > 0.0:
            x = x + ctx.noise(x) * ctx.s_noise * sigma_up
    return x
