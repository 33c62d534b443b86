"""Linear multistep samplers that reuse earlier derivatives: LMS (order 4) and PLMS.

Algorithms in the form `base.SigmaScheduler` runs (see `base`); one evaluation per step (PLMS: one extra
in its first step).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import Evaluation, SamplerContext, to_d

LMS_ORDER = 4
_GAUSS_X, _GAUSS_W = np.polynomial.legendre.leggauss(4)  # exact for the degree <= 3 Lagrange polynomials


def lms_coefficient(nodes: Sequence[float], j: int, start: float, end: float) -> float:
    """Integral over [start, end] of the Lagrange basis polynomial of node j through `nodes`
    (Gauss-Legendre quadrature, exact for these polynomial degrees)."""
    tau = 0.5 * (end - start) * _GAUSS_X + 0.5 * (end + start)
    basis = np.ones_like(tau)
    for k, node in enumerate(nodes):
        if k != j:
            basis *= (tau - node) / (nodes[j] - node)
    return float(0.5 * (end - start) * np.sum(_GAUSS_W * basis))


def lms(sigmas: Sequence[float], ctx: SamplerContext) -> Evaluation:
    """Linear multistep (Adams-Bashforth with variable steps) on the probability-flow ODE dx/dsigma = d:
    x_{i+1} = x_i + sum_j c_j d_{i-j}, c_j the integral of the j-th Lagrange basis polynomial through
    the last min(i + 1, 4) noise levels over [sigma_i, sigma_{i+1}] (Karras et al. 2022 discuss LMS as
    the k-diffusion baseline; the method is the classical Adams-Bashforth family)."""
    x = None
    history: list = []  # derivatives, newest first
    for i in range(len(sigmas) - 1):
        x, denoised = yield x, sigmas[i]
        history.insert(0, to_d(x, sigmas[i], denoised))
        del history[LMS_ORDER:]
        nodes = [sigmas[i - k] for k in range(len(history))]
        for j, d in enumerate(history):
            x = x + lms_coefficient(nodes, j, sigmas[i], sigmas[i + 1]) * d
    return x


# Adams-Bashforth weights for equal steps, newest first (orders 1..4).
_AB_WEIGHTS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def plms(sigmas: Sequence[float], ctx: SamplerContext) -> Evaluation:
    """Pseudo linear multistep (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on
    Manifolds", arXiv:2202.09778): DDIM's transfer (in the sigma scale an Euler step x + (sigma' - sigma)
    eps) driven by a fixed-weight Adams-Bashforth combination of the last four noise estimates; the first
    step is the pseudo improved Euler step (two evaluations), the next two use orders 2 and 3."""
    x = None
    history: list = []  # noise estimates, newest first
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x, denoised = yield x, sigma
        eps = to_d(x, sigma, denoised)
        if not history and sigma_next > 0.0:
            x_pred, denoised_2 = yield x + eps * (sigma_next - sigma), sigma_next
            eps_step = 0.5 * (eps + to_d(x_pred, sigma_next, denoised_2))
        else:
            weights = _AB_WEIGHTS[len(history)]
            eps_step = sum(w * e for w, e in zip(weights, [eps, *history], strict=True))
        history.insert(0, eps)
        del history[3:]
        x = x + eps_step * (sigma_next - sigma)
    return x
