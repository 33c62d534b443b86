"""DPM adaptive: DPM-Solver with adaptive step size (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for
Diffusion Probabilistic Model Sampling in Around 10 Steps", arXiv:2206.00927, Section 3.3 and Appendix:
the DPM-Solver-12 and DPM-Solver-23 embedded pairs), written in the sigma scale (alpha = 1, lambda =
-log sigma) with the model's noise estimate eps = (x - D) / sigma.

Each step from lambda_s to lambda_t = lambda_s + h computes a lower-order and a higher-order solution from
shared model evaluations (DPM-Solver-2 with r1 = 1/3 and DPM-Solver-3 with r1 = 1/3, r2 = 2/3 for order 3;
DPM-Solver-1 and DPM-Solver-2 with r1 = 1/2 for order 2). Their difference, measured against
delta = max(atol, rtol * max(|x_lower|, |x|)) as a root mean square over the whole batch, is the error. A
PID step-size controller (Soederlind 2003, "Digital filters in adaptive time-stepping", with the arctan
limiter of Soederlind & Wang 2006) scales h by (1/error)^(1/order) in its integral form and accepts the
step when the limited factor is at least `accept_safety`; a rejected step is retried with the smaller h
from the same point (reusing the evaluation there).

The run goes from the schedule's first noise level down to the model's smallest one (`SamplerContext.
sigma_min`; the schedule's last nonzero level when the schedule does not end at 0, or when that is larger) and
returns the sample there, as A1111's "DPM adaptive" does: its step count is not the user's, the schedule type
only sets where img2img starts. With eta > 0 each step goes to the lower level of `base.ancestral_split` and
fresh noise of the matching std is added once the step is accepted (A1111 passes eta, default 1, and the
sampler is listed as using the eta noise seed delta). The defaults are those of k-diffusion's
`sample_dpm_adaptive`, which A1111 runs with all of them left alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .base import Evaluation, SamplerContext, ancestral_split, to_d


@dataclass(frozen=True)
class AdaptiveOptions:
    """Tolerances and step-size controller of DPM adaptive (defaults as in A1111 / k-diffusion).

    `order` 3 uses the DPM-Solver-23 pair (3 evaluations per attempted step), 2 the DPM-Solver-12 pair (2).
    `h_init` is the first step in lambda = -log sigma; `pcoeff`, `icoeff`, `dcoeff` the controller's
    proportional, integral and derivative gains; `accept_safety` the smallest step-size factor that still
    accepts a step."""

    rtol: float = 0.05
    atol: float = 0.0078
    h_init: float = 0.05
    pcoeff: float = 0.0
    icoeff: float = 1.0
    dcoeff: float = 0.0
    accept_safety: float = 0.81
    order: int = 3

    def __post_init__(self):
        if self.order not in (2, 3):
            raise ValueError(f"order must be 2 or 3; got {self.order}")
        if not (self.rtol > 0 and self.atol > 0 and self.h_init > 0):
            raise ValueError("rtol, atol and h_init must be > 0")


class StepSizeController:
    """The PID controller: after each attempt `propose(error)` scales `h` and says whether to accept.

    With inverse errors e_n (this attempt), e_{n-1}, e_{n-2} (the last accepted ones) the factor is
    e_n^b1 * e_{n-1}^b2 * e_{n-2}^b3 with b1 = (p + i + d) / k, b2 = -(p + 2d) / k, b3 = d / k (k = order),
    limited smoothly to 1 + atan(factor - 1)."""

    def __init__(self, options: AdaptiveOptions):
        k = options.order
        self.h = options.h_init
        self.b1 = (options.pcoeff + options.icoeff + options.dcoeff) / k
        self.b2 = -(options.pcoeff + 2.0 * options.dcoeff) / k
        self.b3 = options.dcoeff / k
        self.accept_safety = options.accept_safety
        self.growth = 1.0  # the factor of the last proposal
        self._accepted: list[float] = []  # inverse errors of the last two accepted steps, newest first

    def propose(self, error: float) -> bool:
        inv = 1.0 / (error + 1e-8)
        if not self._accepted:  # no history yet: this error stands for the earlier ones
            self._accepted = [inv, inv]
        factor = inv**self.b1 * self._accepted[0] ** self.b2 * self._accepted[1] ** self.b3
        factor = 1.0 + math.atan(factor - 1.0)
        accept = factor >= self.accept_safety
        if accept:
            self._accepted = [inv, self._accepted[0]]
        self.h *= factor
        self.growth = factor
        return accept


def _pair(x: torch.Tensor, eps_s: torch.Tensor, sigma_s: float, sigma_t: float, order: int):
    """One embedded pair from sigma_s to sigma_t, eps_s the noise estimate at x. A generator: yields the
    extra evaluations (order - 1 of them), returns (x_lower, x_higher)."""
    h = math.log(sigma_s / sigma_t)
    euler = x + (sigma_t - sigma_s) * eps_s  # DPM-Solver-1: sigma_t (e^h - 1) = sigma_s - sigma_t
    r1 = 0.5 if order == 2 else 1.0 / 3.0
    sigma_1 = sigma_s * math.exp(-r1 * h)
    u1, den_1 = yield x + (sigma_1 - sigma_s) * eps_s, sigma_1
    diff_1 = to_d(u1, sigma_1, den_1) - eps_s
    second = euler + (sigma_t - sigma_s) / (2.0 * r1) * diff_1  # DPM-Solver-2 with this r1
    if order == 2:
        return euler, second
    r2 = 2.0 / 3.0
    sigma_2 = sigma_s * math.exp(-r2 * h)
    coef = sigma_2 * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1.0)
    u2, den_2 = yield x + (sigma_2 - sigma_s) * eps_s - coef * diff_1, sigma_2
    diff_2 = to_d(u2, sigma_2, den_2) - eps_s
    third = euler - (sigma_t / r2) * (math.expm1(h) / h - 1.0) * diff_2  # DPM-Solver-3
    return second, third


def _error(x_low: torch.Tensor, x_high: torch.Tensor, x: torch.Tensor, options: AdaptiveOptions) -> float:
    delta = (options.rtol * torch.maximum(x_low.abs(), x.abs())).clamp(min=options.atol)
    return float(torch.linalg.vector_norm((x_low - x_high) / delta)) / math.sqrt(x.numel())


def _steps_left(left: float, h: float, growth: float) -> int:
    """Forecast of the steps still needed to cover `left` (in lambda) starting with step size h, assuming
    the step size keeps changing by the controller's last factor `growth` (clamped to [1, 2]): the
    smallest n with h (1 + g + ... + g^(n-1)) >= left."""
    g = min(max(growth, 1.0), 2.0)
    if g < 1.0 + 1e-3:
        return max(1, math.ceil(left / h))
    return max(1, math.ceil(math.log1p(left * (g - 1.0) / h) / math.log(g)))


#: Attempts (accepted or not) after which a run is considered stuck.
MAX_ATTEMPTS = 10_000


def dpm_adaptive(sigmas: Sequence[float], ctx: SamplerContext, options: AdaptiveOptions | None = None) -> Evaluation:
    """DPM-Solver-12/23 with adaptive step size from the schedule's first noise level to the model's
    smallest (see the module doc).

    After each accepted step it sets `ctx.remaining`, its forecast of the evaluations still to come (the
    next one included): `order` evaluations for each step `_steps_left` expects, i.e. as if the step size
    kept changing by the controller's last factor. Only an estimate: the real run decides as it goes."""
    options = options or AdaptiveOptions()
    nonzero = [float(s) for s in sigmas if s > 0.0]
    if not nonzero:
        raise ValueError("DPM adaptive needs a schedule with a nonzero noise level")
    sigma_max = nonzero[0]
    sigma_min = nonzero[-1]
    if sigmas[-1] <= 0.0 and 0.0 < ctx.sigma_min < sigma_min:
        sigma_min = ctx.sigma_min
    lam = -math.log(sigma_max)
    lam_end = -math.log(sigma_min)
    controller = StepSizeController(options)
    ctx.span = (sigma_max, sigma_min)
    x, denoised = yield None, sigma_max
    if lam_end - lam <= 1e-5:  # a single noise level (e.g. img2img of one step): denoise
        return denoised if sigmas[-1] <= 0.0 else x
    eps = to_d(x, sigma_max, denoised)
    for _ in range(MAX_ATTEMPTS):
        sigma_s = math.exp(-lam)
        lam_t = min(lam_end, lam + controller.h)
        sigma_t = math.exp(-lam_t)
        sigma_down, sigma_up = ancestral_split(sigma_s, sigma_t, ctx.eta)
        if sigma_down < 1e-3 * sigma_t:  # eta > 1 can ask for all noise fresh: the solver needs sigma > 0
            sigma_down = 1e-3 * sigma_t
            sigma_up = math.sqrt(sigma_t**2 - sigma_down**2)
        x_low, x_high = yield from _pair(x, eps, sigma_s, sigma_down, options.order)
        error = _error(x_low, x_high, x, options)
        if not math.isfinite(error):
            raise RuntimeError("DPM adaptive: the model returned non-finite values")
        accepted = controller.propose(error)
        if accepted:
            x = x_high
            if sigma_up > 0.0:
                x = x + ctx.noise(x) * ctx.s_noise * sigma_up
            lam = lam_t
        if lam_end - lam <= 1e-5:
            ctx.remaining = 0
            return x
        if accepted:
            ctx.remaining = options.order * _steps_left(lam_end - lam, controller.h, controller.growth)
            x, denoised = yield x, sigma_t
            eps = to_d(x, sigma_t, denoised)
    raise RuntimeError(f"DPM adaptive: no convergence after {MAX_ATTEMPTS} steps")
