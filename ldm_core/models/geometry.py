"""Pixel geometry of a model: how many pixels one latent covers (the VAE's factor), sizes rounded to it, and how
latents are normalised (the VAE's scaling and shift).

The factor is read from the VAE's own config (`2 ** (len(block_out_channels) - 1)`, as diffusers does): 8 for
every Stable Diffusion family, 4 for a VAE with three levels (the built-in model v2). Every path that turns a
size in pixels into latents (generation, hires fix, ControlNet hints, previews, outpainting, SD upscale, the
UI's size sliders) takes it from here rather than assuming 8.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The factor of the VAEs of the SD families (and of every single-file checkpoint: their VAE config is the
#: family's shipped one); also the answer when a checkpoint's own config cannot be read.
SD_VAE_FACTOR = 8


def vae_scale_factor(config: Any) -> int:
    """Pixels per latent of a VAE, from its config (an object with `block_out_channels` or a mapping)."""
    channels = config.get("block_out_channels") if isinstance(config, Mapping) else config.block_out_channels
    return 2 ** (len(channels) - 1) if channels else SD_VAE_FACTOR


def latent_normalisation(config: Any) -> tuple[float, float]:
    """(scaling, shift) of a VAE config: a model's latents are (posterior - shift) * scaling. The shift is 0
    for a VAE without one (every SD 1.x/2.x/XL VAE: no `shift_factor`, or null)."""
    return float(config.scaling_factor), float(getattr(config, "shift_factor", None) or 0.0)


def round_down(n: float, factor: int, minimum: int = 0) -> int:
    """`n` rounded down to a multiple of `factor`; never below `minimum` rounded up to one (nor below `factor`)."""
    low = max(factor, -(-minimum // factor) * factor)
    return max(low, int(n) // factor * factor)


def round_nearest(n: float, factor: int, minimum: int, maximum: int) -> int:
    """`n` rounded to the nearest multiple of `factor`, within [minimum rounded up, maximum rounded down]."""
    low = -(-minimum // factor) * factor
    return min(maximum // factor * factor, max(low, round(n / factor) * factor))


def checkpoint_vae_factor(path: str | Path) -> int:
    """The factor of a checkpoint without loading it: a diffusers folder's `vae/config.json`; SD_VAE_FACTOR for a
    single file (or a folder whose VAE config cannot be read)."""
    cfg = Path(path) / "vae" / "config.json"
    if not cfg.is_file():
        return SD_VAE_FACTOR
    try:
        return vae_scale_factor(json.loads(cfg.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return SD_VAE_FACTOR
