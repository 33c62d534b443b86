"""DDIM CFG++: DDIM with manifold-constrained classifier-free guidance (Chung et al. 2024, "CFG++:
Manifold-constrained Classifier Free Guidance for Diffusion Models", arXiv:2406.08070).

Plain CFG with DDIM takes the guided x0 estimate D_g = D_u + w (D_c - D_u) and re-noises it with the guided
noise estimate eps_g; CFG++ re-noises the same kind of estimate with the unconditional one, eps_u = (x -
D_u) / sigma, which keeps every step on the data manifold and lets a guidance scale lambda in [0, 1] play the
role of a large CFG scale. In the sigma scale one step is x' = D_lambda + sigma' eps_u (eta = 0).

A1111's "DDIM CFG++" reads the CFG scale the user sets divided by 12.5 (`CFG_SCALE_FACTOR`): CFG 7 is lambda
= 0.56, CFG 12.5 is lambda = 1. The loop combines the predictions with the full CFG scale, so this sampler
rescales the guidance part: D_lambda = D_u + (D_g - D_u) / 12.5 (exact, the combination is linear). Without
an unconditional prediction (CFG scale 1, or an evaluation that `s_min_uncond` skipped) D_u is taken to be
the guided one, which makes the step plain DDIM.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Evaluation, SamplerContext, ancestral_split, to_d

#: A1111 runs DDIM CFG++ at lambda = CFG scale / 12.5.
CFG_SCALE_FACTOR = 1.0 / 12.5


def ddim_cfg_pp(sigmas: Sequence[float], ctx: SamplerContext) -> Evaluation:
    """DDIM CFG++ on the schedule (one evaluation per step). Needs `ctx.denoised_uncond` (the scheduler's
    `uses_uncond`); eta > 0 adds DDIM's noise as in `first_order.euler_ancestral`."""
    x = None
    for i in range(len(sigmas) - 1):
        x, denoised = yield x, sigmas[i]
        uncond = ctx.denoised_uncond if ctx.denoised_uncond is not None else denoised
        guided = uncond + (denoised - uncond) * CFG_SCALE_FACTOR
        sigma_down, sigma_up = ancestral_split(sigmas[i], sigmas[i + 1], ctx.eta)
        x = guided + to_d(x, sigmas[i], uncond) * sigma_down
        if sigma_up > 0.0:
            x = x + ctx.noise(x) * ctx.s_noise * sigma_up
    return x
