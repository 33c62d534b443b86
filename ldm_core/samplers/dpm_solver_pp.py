"""The DPM-Solver++ family: DPM++ 2M, 2M SDE (midpoint / Heun), 3M SDE, 2S a and SDE.

Sources: Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models"
(arXiv:2211.01095): data-prediction exponential integrators, the 2S (Algorithm 1) and 2M (Algorithm 2)
solvers and SDE-DPM-Solver++; the SDE family is Karras et al. 2022 (arXiv:2206.00364) eq. 6.

Derivation used by the SDE samplers (sigma scale, lambda = -log sigma, h = lambda_next - lambda): with
noise level eta (0 = probability-flow ODE, 1 = the reverse SDE), Karras et al.'s family with
beta(sigma) = eta / sigma reads, in lambda, dx = c (D - x) dlambda + sqrt(2 eta) sigma dW, c = 1 + eta.
Solving the linear part exactly and integrating a polynomial fit of D(lambda) through the last model
outputs gives

    x' = e^{-c h} x + I0 D + I1 D' + I2 D'' / 2 + sigma' sqrt(1 - e^{-2 eta h}) z,
    I0 = 1 - e^{-ch},  I1 = (ch - 1 + e^{-ch}) / c,  I2 = ((ch)^2 - 2ch + 2 - 2 e^{-ch}) / c^2,

with D', D''/2 the coefficients of the fitted polynomial in (lambda - lambda_i). eta = 0 gives the
DPM-Solver++ multistep updates. The step to sigma = 0 returns D itself.

Algorithms in the form `base.SigmaScheduler` runs (see `base`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .base import Evaluation, SamplerContext, ancestral_split


def _integrals(h: float, eta: float) -> tuple[float, float, float, float]:
    """(e^{-ch}, I0, I1, I2) of the module doc for a step of length h in lambda."""
    c = 1.0 + eta
    ch = c * h
    decay = math.exp(-ch)
    i0 = -math.expm1(-ch)
    i1 = (ch - i0) / c
    i2 = (ch * ch - 2.0 * ch + 2.0 * i0) / (c * c)
    return decay, i0, i1, i2


def _sde_noise(x, ctx: SamplerContext, sigma_next: float, h: float):
    if ctx.eta <= 0.0 or sigma_next <= 0.0:
        return x
    return x + ctx.noise(x) * (ctx.s_noise * sigma_next * math.sqrt(-math.expm1(-2.0 * ctx.eta * h)))


def dpmpp_2m(sigmas: Sequence[float], ctx: SamplerContext) -> Evaluation:
    """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2: x' = (sigma'/sigma) x - (e^{-h} - 1) D_eff with
    D_eff = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1}/h_i; first-order on the first and last step."""
    x = None
    prev_denoised, prev_h = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, denoised = yield x, sigma
        if sigma_next == 0.0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        d_eff = denoised
        if prev_denoised is not None:
            r = prev_h / h
            d_eff = (1.0 + 1.0 / (2.0 * r)) * denoised - (1.0 / (2.0 * r)) * prev_denoised
        x = (sigma_next / sigma) * x - math.expm1(-h) * d_eff
        prev_denoised, prev_h = denoised, h
    return x


def _multistep_sde(sigmas: Sequence[float], ctx: SamplerContext, order: int, solver: str) -> Evaluation:
    """Multistep SDE-DPM-Solver++ of the given order (2 or 3), see the module doc. `solver` "midpoint"
    approximates I1 by h I0 / 2 (the DPM-Solver++(2M) combination), "heun" uses the exact I1."""
    x = None
    history: list[tuple[float, object]] = []  # (lambda, denoised), newest first
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, denoised = yield x, sigma
        if sigma_next == 0.0:
            x = denoised
            continue
        lam = -math.log(sigma)
        h = -math.log(sigma_next) - lam
        decay, i0, i1, i2 = _integrals(h, ctx.eta)
        x_next = decay * x + i0 * denoised
        if history and order >= 2:
            lam_1, den_1 = history[0]
            h_1 = lam - lam_1
            slope_01 = (denoised - den_1) / h_1
            if len(history) >= 2 and order >= 3:
                lam_2, den_2 = history[1]
                h_2 = lam_1 - lam_2
                curv = (slope_01 - (den_1 - den_2) / h_2) / (h_1 + h_2)
                x_next = x_next + i1 * (slope_01 + curv * h_1) + i2 * curv
            elif solver == "midpoint":
                x_next = x_next + 0.5 * h * i0 * slope_01
            else:
                x_next = x_next + i1 * slope_01
        x = _sde_noise(x_next, ctx, sigma_next, h)
        history.insert(0, (lam, denoised))
        del history[2:]
    return x


def dpmpp_2m_sde(sigmas: Sequence[float], ctx: SamplerContext) -> Evaluation:
    """SDE-DPM-Solver++(2M), midpoint variant."""
    return (yield from _multistep_sde(sigmas, ctx, 2, "midpoint"))


def dpmpp_2m_sde_heun(sigmas: Sequence[float], ctx: SamplerContext) -> Evaluation:
    """SDE-DPM-Solver++(2M), Heun variant (exact integral of the linear fit)."""
    return (yield from _multistep_sde(sigmas, ctx, 2, "heun"))


def dpmpp_3m_sde(sigmas: Sequence[float], ctx: SamplerContext) -> Evaluation:
    """Third-order multistep SDE-DPM-Solver++: a quadratic fit of D through the last three outputs."""
    return (yield from _multistep_sde(sigmas, ctx, 3, "heun"))


def dpmpp_2s_ancestral(sigmas: Sequence[float], ctx: SamplerContext) -> Evaluation:
    """Ancestral DPM-Solver++(2S): a DPM-Solver++(2S) step (Lu et al. 2022, Algorithm 1, r = 1/2: one
    extra evaluation at the midpoint in lambda, whose D drives the whole step) down to sigma_down, then
    fresh noise of std sigma_up (`base.ancestral_split`)."""
    x = None
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        x, denoised = yield x, sigma
        sigma_down, sigma_up = ancestral_split(sigma, sigmas[i + 1], ctx.eta)
        if sigma_down == 0.0:
            x = denoised
        else:
            h = math.log(sigma / sigma_down)
            sigma_mid = math.sqrt(sigma * sigma_down)
            x_mid = (sigma_mid / sigma) * x - math.expm1(-0.5 * h) * denoised
            _, denoised_mid = yield x_mid, sigma_mid
            x = (sigma_down / sigma) * x - math.expm1(-h) * denoised_mid
        if sigma_up > 0.0:
            x = x + ctx.noise(x) * ctx.s_noise * sigma_up
    return x


def dpmpp_sde(sigmas: Sequence[float], ctx: SamplerContext) -> Evaluation:
    """Stochastic DPM-Solver++(2S): both stages are steps of the eta-SDE of the module doc. Stage 1 goes
    to the midpoint in lambda, stage 2 takes the whole step with the midpoint's D. The noise of the two
    stages is the same Brownian path: stage 2 reuses stage 1's noise (decayed by e^{-ch/2}) plus an
    independent part, so the step's noise has exactly the SDE's variance sigma'^2 (1 - e^{-2 eta h})."""
    x = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, denoised = yield x, sigma
        if sigma_next == 0.0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        sigma_mid = math.sqrt(sigma * sigma_next)
        half_decay, half_i0, _, _ = _integrals(0.5 * h, ctx.eta)
        part_std = math.sqrt(-math.expm1(-ctx.eta * h))  # each half's noise factor
        noise_1 = ctx.noise(x) * (ctx.s_noise * sigma_mid * part_std)
        _, denoised_mid = yield half_decay * x + half_i0 * denoised + noise_1, sigma_mid
        decay, i0, _, _ = _integrals(h, ctx.eta)
        noise = half_decay * noise_1 + ctx.noise(x) * (ctx.s_noise * sigma_next * part_std)
        x = decay * x + i0 * denoised_mid + noise
    return x
