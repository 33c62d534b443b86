"""FreeInit (Wu et al., 2023, "FreeInit: Bridging Initialization Gap in Video Diffusion Models"), as
sd-webui-animatediff offers it (`freeinit_enable`, `freeinit_filter`, `freeinit_ds`, `freeinit_dt`,
`freeinit_iters`).

A video model is trained on clips noised to the last timestep, whose low spatio-temporal frequencies still hold
some of the clip (frames alike, objects where they were); at inference every frame starts from independent
noise, which has none. FreeInit samples the clip once, diffuses the result back to the last timestep with the
same starting noise, keeps that latent's low frequencies (3D FFT over frames, height and width) and takes the
high ones from fresh noise, and samples again; `freeinit_iters` is the number of samplings in all (the first
from plain noise), so the job takes that many times as long.

Filters of the normalised frequency distance d (per axis -1..1 after centring, the time axis scaled by
d_s / d_t so that `dt` is the temporal stop frequency): "butterworth" 1 / (1 + (d / d_s)^8) (order 4),
"gaussian" exp(-d^2 / (2 d_s^2)), "ideal" d <= d_s, "box" |spatial| <= d_s and |temporal| <= d_t per axis.
"""

from __future__ import annotations

import torch

FILTERS = ("butterworth", "gaussian", "ideal", "box")
BUTTERWORTH_ORDER = 4


def low_pass(frames: int, height: int, width: int, kind: str = "butterworth", ds: float = 0.25, dt: float = 0.25):
    """The (frames, height, width) low-pass mask in centred (fftshift-ed) frequency order, values in [0, 1]."""
    if kind not in FILTERS:
        raise ValueError(f"unknown FreeInit filter {kind!r}: choose from {', '.join(FILTERS)}")
    if not (0 < ds <= 1 and 0 < dt <= 1):
        raise ValueError(f"FreeInit ds and dt must be in (0, 1], got {ds} and {dt}")

    def axis(n: int) -> torch.Tensor:  # -1 .. 1 over the centred spectrum (0 at the centre)
        return torch.arange(n, dtype=torch.float64) * 2 / n - 1 if n > 1 else torch.zeros(1, dtype=torch.float64)

    t, h, w = torch.meshgrid(axis(frames), axis(height), axis(width), indexing="ij")
    if kind == "box":
        return ((t.abs() <= dt) & (h.abs() <= ds) & (w.abs() <= ds)).float()
    d2 = (ds / dt) ** 2 * t**2 + h**2 + w**2
    if kind == "gaussian":
        return torch.exp(-d2 / (2 * ds**2)).float()
    if kind == "ideal":
        return (d2 <= ds**2).float()
    return (1 / (1 + (d2 / ds**2) ** BUTTERWORTH_ORDER)).float()


def mix_frequencies(low_from: torch.Tensor, high_from: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(F, C, H, W) latents whose low frequencies (by `mask`, (F, H, W) centred) are `low_from`'s and the rest
    `high_from`'s; the FFT runs over frames, height and width, per channel."""
    dims = (0, 2, 3)
    m = mask.to(low_from.device)[:, None]  # (F, 1, H, W)

    def spectrum(x: torch.Tensor) -> torch.Tensor:
        return torch.fft.fftshift(torch.fft.fftn(x.float(), dim=dims), dim=dims)

    mixed = spectrum(low_from) * m + spectrum(high_from) * (1 - m)
    out = torch.fft.ifftn(torch.fft.ifftshift(mixed, dim=dims), dim=dims).real
    return out.to(low_from.dtype)


def reinitialised_noise(
    clean: torch.Tensor, first_noise: torch.Tensor, fresh: torch.Tensor, last_alpha_cumprod: float, mask: torch.Tensor
) -> torch.Tensor:
    """The next sampling's starting noise: `clean` latents (F, C, H, W, unit-variance scaled) diffused to the last
    timestep with the first sampling's noise, low frequencies kept, high frequencies from `fresh` noise."""
    a = float(last_alpha_cumprod)
    diffused = a**0.5 * clean + (1 - a) ** 0.5 * first_noise.to(clean)
    return mix_frequencies(diffused, fresh.to(clean), mask)
