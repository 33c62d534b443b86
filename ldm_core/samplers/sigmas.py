"""Noise levels: the model's training noise schedule and the sampling schedules users pick ("Schedule type").

Everything here works in the "sigma" (variance-exploding) view of a discrete-time VP model: the model
was trained on x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (a_t = alphas_cumprod[t], t = 0 .. T-1), which is
the same as x = x0 + sigma_t eps with sigma_t = sqrt((1 - a_t) / a_t) after dividing by sqrt(a_t).
Noise levels between training timesteps are interpolated linearly in log sigma, both ways (t -> sigma
and sigma -> t), so a schedule's sigma and the timestep the model is told always agree.

A schedule is a descending numpy array of `steps + 1` sigmas whose last value is 0 (the clean image).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType

import numpy as np
import torch

#: Align Your Steps: the published 10-step noise levels (Sabour, Fidler & Kreis 2024, "Align Your Steps:
#: Optimizing Sampling Schedules in Diffusion Models", arXiv:2404.14507, project page tables) for
#: Stable Diffusion 1.5 and SDXL. Other step counts interpolate these log-linearly.
AYS_SD1 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)

KARRAS_RHO = 7.0  # Karras et al. 2022, "Elucidating the Design Space ...", eq. 5
POLYEXPONENTIAL_RHO = 1.0  # A1111's default; with rho = 1 the schedule equals "Exponential"
BETA_ALPHA = BETA_BETA = 0.6  # Lee et al. 2024, "Beta Sampling is All You Need", arXiv:2407.12173


# ---------------------------------------------------------------------------------------------------------
# The model's training schedule
# ---------------------------------------------------------------------------------------------------------


def alphas_cumprod_from_config(config: Mapping) -> torch.Tensor:
    """`alphas_cumprod` (float64, shape [T]) from a diffusers scheduler config dict: `num_train_timesteps`,
    `beta_start`, `beta_end`, `beta_schedule` ("linear", "scaled_linear", "squaredcos_cap_v2"),
    `trained_betas`, `rescale_betas_zero_snr`; diffusers' defaults where a key is missing."""
    from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar, rescale_zero_terminal_snr

    steps = int(config.get("num_train_timesteps", 1000))
    start = float(config.get("beta_start", 0.0001))
    end = float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
    elif kind == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    elif kind == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(steps).to(torch.float64)
    else:
        raise ValueError(f"unsupported beta_schedule {kind!r}")
    if config.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if config.get("rescale_betas_zero_snr", False):
        alphas_cumprod[-1] = 2.0**-24  # as diffusers does: keeps the first sigma finite
    return alphas_cumprod


class NoiseLevels:
    """The training sigmas of one model and the t <-> sigma maps (log-linear interpolation).

    `sigmas[t]` is ascending in t; `sigma_min = sigmas[0]`, `sigma_max = sigmas[-1]` (about 0.029 and 14.6
    for Stable Diffusion's scaled_linear betas)."""

    def __init__(self, alphas_cumprod: torch.Tensor | np.ndarray):
        ac = np.asarray(alphas_cumprod, dtype=np.float64)
        self.sigmas = np.sqrt((1.0 - ac) / ac)
        self.log_sigmas = np.log(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    @property
    def num_train_timesteps(self) -> int:
        return len(self.sigmas)

    def t_to_sigma(self, t: np.ndarray | float) -> np.ndarray:
        """Sigma at (fractional) timesteps t in [0, T-1]."""
        t = np.asarray(t, dtype=np.float64)
        return np.exp(np.interp(t, np.arange(len(self.sigmas)), self.log_sigmas))

    def sigma_to_t(self, sigma: np.ndarray | float) -> np.ndarray:
        """Fractional timestep of each sigma (clamped to [0, T-1]); the inverse of `t_to_sigma`."""
        sigma = np.maximum(np.asarray(sigma, dtype=np.float64), 1e-10)
        return np.interp(np.log(sigma), self.log_sigmas, np.arange(len(self.sigmas), dtype=np.float64))


# ---------------------------------------------------------------------------------------------------------
# Sampling schedules: each returns `steps` descending nonzero sigmas; `make_sigmas` appends the final 0.
# ---------------------------------------------------------------------------------------------------------


def _uniform(levels: NoiseLevels, n: int, **_) -> np.ndarray:
    """Timesteps evenly spaced from T-1 down to 0 (k-diffusion's default; ComfyUI's "normal" is the same)."""
    return levels.t_to_sigma(np.linspace(levels.num_train_timesteps - 1, 0, n))


def _sgm_uniform(levels: NoiseLevels, n: int, **_) -> np.ndarray:
    """Evenly spaced timesteps from T-1 towards 0 leaving the last interval out (as SGM/SDXL sample)."""
    return levels.t_to_sigma(np.linspace(levels.num_train_timesteps - 1, 0, n + 1)[:-1])


def _simple(levels: NoiseLevels, n: int, **_) -> np.ndarray:
    """Integer timesteps T-1 - floor(i*T/n), i = 0..n-1 ("trailing" spacing)."""
    T = levels.num_train_timesteps
    return levels.t_to_sigma([T - 1 - math.floor(i * T / n) for i in range(n)])


def _ddim(levels: NoiseLevels, n: int, steps_offset: int = 1, **_) -> np.ndarray:
    """DDIM's "leading" integer timesteps: i*(T//n) + steps_offset, i = n-1..0."""
    T = levels.num_train_timesteps
    ratio = max(T // n, 1)
    t = np.clip(np.arange(n)[::-1] * ratio + steps_offset, 0, T - 1)
    return levels.t_to_sigma(t)


def _karras(levels: NoiseLevels, n: int, **_) -> np.ndarray:
    """Karras et al. 2022 eq. 5: evenly spaced in sigma**(1/rho), rho = 7."""
    lo, hi = levels.sigma_min ** (1 / KARRAS_RHO), levels.sigma_max ** (1 / KARRAS_RHO)
    return (hi + np.linspace(0, 1, n) * (lo - hi)) ** KARRAS_RHO


def _exponential(levels: NoiseLevels, n: int, **_) -> np.ndarray:
    """Evenly spaced in log sigma (= evenly spaced in half-log-SNR)."""
    return np.exp(np.linspace(math.log(levels.sigma_max), math.log(levels.sigma_min), n))


def _polyexponential(levels: NoiseLevels, n: int, **_) -> np.ndarray:
    """log sigma = log sigma_min + ramp**rho * (log sigma_max - log sigma_min), ramp 1 -> 0."""
    ramp = np.linspace(1, 0, n) ** POLYEXPONENTIAL_RHO
    lo, hi = math.log(levels.sigma_min), math.log(levels.sigma_max)
    return np.exp(lo + ramp * (hi - lo))


def _kl_optimal(levels: NoiseLevels, n: int, **_) -> np.ndarray:
    """The KL-optimal schedule of the AYS paper (arXiv:2404.14507): evenly spaced in arctan(sigma)."""
    return np.tan(np.linspace(math.atan(levels.sigma_max), math.atan(levels.sigma_min), n))


def _align_your_steps(levels: NoiseLevels, n: int, model_family: str | None = None, **_) -> np.ndarray:
    """AYS tables, log-linearly interpolated to n+1 points (the last one is replaced by 0 in
    `make_sigmas`); mapped affinely in log sigma onto this model's [sigma_min, sigma_max]."""
    sdxl = (model_family or "").lower() in ("sdxl", "sdxl-refiner")  # the refiner shares SDXL's schedule
    table = np.log(np.array(AYS_SDXL if sdxl else AYS_SD1))
    lo, hi = math.log(levels.sigma_min), math.log(levels.sigma_max)
    table = lo + (table - table[-1]) * (hi - lo) / (table[0] - table[-1])
    pos = np.linspace(0, 1, len(table))
    return np.exp(np.interp(np.linspace(0, 1, n + 1), pos, table))[:n]


def _beta(levels: NoiseLevels, n: int, **_) -> np.ndarray:
    """Lee et al. 2024: timesteps at the quantiles 1 - i/n of Beta(0.6, 0.6), scaled to [0, T-1]
    (continuous timesteps, so no two steps coincide)."""
    q = [beta_ppf(1.0 - i / n, BETA_ALPHA, BETA_BETA) for i in range(n)]
    return levels.t_to_sigma(np.array(q) * (levels.num_train_timesteps - 1))


_SCHEDULES: Mapping[str, Callable[..., np.ndarray]] = MappingProxyType(
    {
        "Uniform": _uniform,
        "Karras": _karras,
        "Exponential": _exponential,
        "Polyexponential": _polyexponential,
        "SGM Uniform": _sgm_uniform,
        "KL Optimal": _kl_optimal,
        "Align Your Steps": _align_your_steps,
        "Simple": _simple,
        "Normal": _uniform,
        "DDIM": _ddim,
        "Beta": _beta,
    }
)

#: Every schedule type this module computes, in A1111's order ("Automatic" is resolved by the registry).
SIGMA_SCHEDULES: tuple[str, ...] = tuple(_SCHEDULES)


def make_sigmas(
    schedule: str,
    steps: int,
    levels: NoiseLevels,
    *,
    steps_offset: int = 1,
    model_family: str | None = None,
) -> np.ndarray:
    """The sampling schedule: `steps + 1` descending sigmas (float64), the last one 0.

    `schedule` is a label from `SIGMA_SCHEDULES`; `steps_offset` is used by "DDIM" (leading spacing);
    `model_family` ("sd1", "sdxl", ...) picks the Align Your Steps table."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    try:
        fn = _SCHEDULES[schedule]
    except KeyError:
        raise ValueError(
            f"unknown schedule {schedule!r}; choose one of: {', '.join(SIGMA_SCHEDULES)}"
        ) from None
    sigmas = np.asarray(fn(levels, steps, steps_offset=steps_offset, model_family=model_family), np.float64)
    return np.concatenate([sigmas, [0.0]])


# ---------------------------------------------------------------------------------------------------------
# Beta distribution quantiles (no scipy): regularized incomplete beta by its continued fraction
# (Abramowitz & Stegun 26.5.8, evaluated with the modified Lentz method), inverted by bisection.
# ---------------------------------------------------------------------------------------------------------


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for x in [0, 1], a, b > 0."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile function of Beta(a, b): the x in [0, 1] with I_x(a, b) = q (bisection, ~1e-12)."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
