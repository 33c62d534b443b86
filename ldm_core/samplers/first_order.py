"""First-order samplers: Euler (with churn), ancestral Euler (also DDIM) and LCM's multistep sampling.

Each function is a sampling algorithm in the form `base.SigmaScheduler` runs (see `base`): it walks the
schedule `sigmas` (descending, last 0) and asks for the model with `x, denoised = yield x, sigma`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .base import Evaluation, SamplerContext, ancestral_split, to_d


def euler(sigmas: Sequence[float], ctx: SamplerContext) -> Evaluation:
    """Euler's method on the probability-flow ODE, with optional churn (Karras et al. 2022, "Elucidating
    the Design Space of Diffusion-Based Generative Models", arXiv:2206.00364, Algorithm 2 without the
    second-order correction). One evaluation per step."""
    steps = len(sigmas) - 1
    x = None
    for i in range(steps):
        sigma_hat = ctx.churn(sigmas[i], steps)
        if x is not None and sigma_hat > sigmas[i]:
            x = x + ctx.noise(x) * ctx.s_noise * math.sqrt(sigma_hat**2 - sigmas[i] ** 2)
        x, denoised = yield x, sigma_hat
        x = x + to_d(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
    return x


def euler_ancestral(sigmas: Sequence[float], ctx: SamplerContext) -> Evaluation:
    """Ancestral Euler: an Euler step down to sigma_down, then fresh noise of std sigma_up (see
    `base.ancestral_split`). With the DDIM schedule and eta = 0 this is exactly DDIM's deterministic
    update (Song et al. 2020, "Denoising Diffusion Implicit Models", arXiv:2010.02502): in the sigma scale
    DDIM's x_{t-1} = sqrt(a') x0 + sqrt(1 - a') eps becomes x' = x0 + sigma' eps, an Euler step; with eta
    > 0 it is DDIM's stochastic update. One evaluation per step."""
    x = None
    for i in range(len(sigmas) - 1):
        x, denoised = yield x, sigmas[i]
        sigma_down, sigma_up = ancestral_split(sigmas[i], sigmas[i + 1], ctx.eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigma_up > 0.0:
            x = x + ctx.noise(x) * ctx.s_noise * sigma_up
    return x


def lcm(sigmas: Sequence[float], ctx: SamplerContext) -> Evaluation:
    """Multistep consistency sampling (Song et al. 2023, "Consistency Models", arXiv:2303.01469,
    Algorithm 1; used by Latent Consistency Models, Luo et al. 2023, arXiv:2310.04378): take the model's
    x0 estimate and re-noise it to the next level with fresh noise. One evaluation per step."""
    x = None
    for i in range(len(sigmas) - 1):
        x, denoised = yield x, sigmas[i]
        x = denoised
        if sigmas[i + 1] > 0.0:
            x = x + ctx.noise(x) * ctx.s_noise * sigmas[i + 1]
    return x
