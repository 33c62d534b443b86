"""Seeds and noise. Initial noise is drawn on the CPU in fp32 by default, one generator per image seeded
with that image's seed, so a seed gives the same image on any device and regardless of batch size.

Variation seeds blend the base noise with the variation seed's noise by spherical interpolation (slerp);
"resize seed from WxH" draws the noise at the old latent size and places it in the middle of the new one,
so a composition found at one size survives a change of size.

Step noise (ancestral and SDE samplers) continues each image's generator, unless an eta noise seed delta
(A1111's ENSD option) is given: then, as in A1111 1.6+, each image's step generator is a fresh one seeded
with seed + delta, so the same seed and delta give the same picture as there.

The noise source is A1111's "Random number generator source" option (`randn_source`, EngineConfig
`cpu_noise`): "CPU" (the default) draws on the CPU and moves the noise to the device; "GPU" draws with a
generator on the job's device (what A1111 does by default: faster to draw, but a seed's image then depends on
the device and its torch build).

Seeds are any integer torch's generator takes (0 .. 2**64 - 1), used as given and shown as given (A1111
does the same); random seeds stay below 2**32 as in A1111. torch's CPU generator itself draws from the low 32
bits of its seed, so on CPU noise (the default, like A1111's "CPU" RNG source) seed 2**32 + 5 gives the
picture of seed 5. Seed arithmetic past 2**64 - 1 (a batch's seed + i, seed + delta) wraps around.
"""

from __future__ import annotations

import random

import torch

MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes
RANDOM_SEEDS = 2**32 - 1  # random seeds are drawn below this (A1111's range for -1)


def resolve_seed(seed: int | None) -> int:
    """-1 (or any negative, or None) means a fresh random seed below 2**32; others are used as given
    (0 .. 2**64 - 1; larger ones wrap around, as `wrap_seed`)."""
    if seed is None or seed < 0:
        return random.SystemRandom().randrange(0, RANDOM_SEEDS)
    return wrap_seed(seed)


def wrap_seed(seed: int) -> int:
    """`seed` in torch's generator range: seed arithmetic (seed + batch index, seed + delta) past 2**64 - 1
    wraps around instead of failing the job."""
    return int(seed) % (MAX_SEED + 1)


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two noise tensors of the same shape; t=0 gives a, t=1 gives b."""
    if t <= 0:
        return a
    if t >= 1:
        return b
    af, bf = a.flatten(), b.flatten()
    dot = (af / af.norm()).dot(bf / bf.norm()).clamp(-1.0, 1.0)
    omega = torch.acos(dot)
    if omega.abs() < 1e-4:
        return (1 - t) * a + t * b
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b


def towards_first(noise: torch.Tensor, share: float) -> torch.Tensor:
    """Each of `noise`'s items (its first dimension: a clip's frames) blended towards the first one's by `share`
    (0: unchanged, 1: all the first's), by `slerp`, so each keeps the statistics of one draw: the video job's
    `shared_noise`, and the correlated noise a motion module trained for it sees."""
    if share <= 0 or noise.shape[0] < 2:
        return noise
    first = noise[0]
    return torch.stack([first] + [slerp(share, n, first) for n in noise[1:]])


def _randn(
    shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Generator]:
    g = torch.Generator(device).manual_seed(wrap_seed(seed))
    return torch.randn(shape, generator=g, dtype=torch.float32, device=device), g


def _paste_center(src: torch.Tensor, shape: tuple[int, ...], base: torch.Tensor) -> torch.Tensor:
    """Place `src` (C,h,w) in the centre of `base` (C,H,W), cropping or leaving base values around it."""
    out = base.clone()
    _, h, w = src.shape
    _, H, W = shape
    dy, dx = (H - h) // 2, (W - w) // 2
    ty, tx = max(dy, 0), max(dx, 0)
    sy, sx = max(-dy, 0), max(-dx, 0)
    hh, ww = min(h, H), min(w, W)
    out[:, ty : ty + hh, tx : tx + ww] = src[:, sy : sy + hh, sx : sx + ww]
    return out


def image_noise(
    shape: tuple[int, int, int],
    seed: int,
    *,
    subseed: int | None = None,
    subseed_strength: float = 0.0,
    resize_from: tuple[int, int] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Generator]:
    """Noise (C,H,W) for one image, and the generator to continue for the sampler's own noise, both on
    `device` (the CPU by default; the job's device for the "GPU" noise source).

    `resize_from` is the (C,h,w) latent shape the seed was first used at (from "resize seed from").
    """
    if resize_from:
        base, gen = _randn(shape, seed, device)
        small, _ = _randn((shape[0], *resize_from), seed, device)
        noise = _paste_center(small, shape, base)
    else:
        noise, gen = _randn(shape, seed, device)
    if subseed is not None and subseed_strength > 0:
        if resize_from:
            sbase, _ = _randn(shape, subseed, device)
            ssmall, _ = _randn((shape[0], *resize_from), subseed, device)
            sub = _paste_center(ssmall, shape, sbase)
        else:
            sub, _ = _randn(shape, subseed, device)
        noise = slerp(subseed_strength, noise, sub)
    return noise, gen


def batch_noise(
    shape: tuple[int, int, int],
    seeds: list[int],
    *,
    subseeds: list[int] | None = None,
    subseed_strength: float = 0.0,
    resize_from: tuple[int, int] | None = None,
    noise_seed_delta: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Stacked noise (B,C,H,W) for a batch, one seed per image, and one step generator per image: each
    image's generator continued, or with a non-zero `noise_seed_delta` (A1111's ENSD) a new generator seeded
    with the image's seed + delta. Noise and generators are on `device` (the noise source: see the module)."""
    noises, gens = [], []
    for i, s in enumerate(seeds):
        n, g = image_noise(
            shape,
            s,
            subseed=subseeds[i] if subseeds else None,
            subseed_strength=subseed_strength,
            resize_from=resize_from,
            device=device,
        )
        noises.append(n)
        gens.append(step_generator(s, noise_seed_delta, device) if noise_seed_delta else g)
    return torch.stack(noises), gens


def step_generator(seed: int, noise_seed_delta: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of an image's step noise under an eta noise seed delta: seeded with seed + delta."""
    return torch.Generator(device).manual_seed(wrap_seed(int(seed) + int(noise_seed_delta)))
