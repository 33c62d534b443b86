"""Dead-leaves images: synthetic training images with the statistics of photographs, made here, for the diffusion
upscaler's trainer (`ldm_core.train.sr --dead-leaves N`).

The dead-leaves model (Matheron 1968) stacks opaque discs at random places, each hiding what lies under it. With
radii drawn from a power law p(r) ~ r^-3 the image is scale invariant and its power spectrum falls as about
1 / f^2, as natural images' does (Lee, Mumford and Huang 2001); such images train image-restoration networks
nearly as well as photographs (Achddou, Gousseau and Ladjal 2021). Colours are drawn from a palette (the
trainer's: pixels of the training photographs), so that the colour statistics are a photograph's too; a share of
the images is slightly blurred by a random amount, as out-of-focus parts of photographs are.

Discs are painted front to back (each only where nothing nearer covers the pixel) until the image is covered,
at twice the size and area-downscaled, so that every edge is antialiased over about a pixel.
"""

from __future__ import annotations

import numpy as np

#: the share of the image that must be covered before painting stops (the rest takes the last disc's colour)
COVERED = 0.999
#: discs painted at most (a safety bound: at the default radii about a few thousand cover an image)
MAX_DISCS = 20000


def disc_radii(rng: np.random.Generator, n: int, r_min: float, r_max: float) -> np.ndarray:
    """`n` radii in [r_min, r_max] with density proportional to r^-3 (inverse-CDF sampling)."""
    u = rng.random(n)
    a, b = r_min**-2.0, r_max**-2.0
    return (a - u * (a - b)) ** -0.5


def dead_leaves(
    size: int,
    rng: np.random.Generator,
    palette: np.ndarray | None = None,
    r_min: float = 1.0,
    r_max: float | None = None,
    blur_share: float = 0.3,
) -> np.ndarray:
    """One dead-leaves image, RGB uint8 (size, size, 3). `palette` (K, 3) uint8 colours to draw from (None:
    uniform RGB); radii in pixels of the output, `r_max` None: half the image; `blur_share` of the images get a
    Gaussian blur of sigma 0.3-1.2 px."""
    import cv2

    ss = 2  # supersampling
    n = size * ss
    r_max = size / 2 if r_max is None else r_max
    img = np.zeros((n, n, 3), np.float32)
    covered = np.zeros((n, n), bool)
    yy, xx = np.mgrid[0:n, 0:n]
    left = n * n
    colour = np.zeros(3, np.float32)
    for drawn in range(MAX_DISCS):
        if left <= (1 - COVERED) * n * n:
            break
        if drawn % 256 == 0:
            radii = disc_radii(rng, 256, r_min * ss, r_max * ss)
            centres = rng.uniform(-r_max * ss * 0.5, n + r_max * ss * 0.5, size=(256, 2))
            if palette is None:
                colours = rng.integers(0, 256, size=(256, 3)).astype(np.float32)
            else:
                colours = palette[rng.integers(0, len(palette), 256)].astype(np.float32)
        k = drawn % 256
        r, (cx, cy), colour = radii[k], centres[k], colours[k]
        x0, x1 = max(0, int(cx - r)), min(n, int(cx + r) + 2)
        y0, y1 = max(0, int(cy - r)), min(n, int(cy + r) + 2)
        if x0 >= x1 or y0 >= y1:
            continue
        box = (xx[y0:y1, x0:x1] - cx) ** 2 + (yy[y0:y1, x0:x1] - cy) ** 2 <= r * r
        box &= ~covered[y0:y1, x0:x1]
        if not box.any():
            continue
        img[y0:y1, x0:x1][box] = colour
        covered[y0:y1, x0:x1] |= box
        left -= int(box.sum())
    img[~covered] = colour
    out = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    if rng.random() < blur_share:
        out = cv2.GaussianBlur(out, (0, 0), float(rng.uniform(0.3, 1.2)))
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def photo_palette(images: list[np.ndarray], n: int = 4096, seed: int = 0) -> np.ndarray:
    """`n` pixel colours (uint8 (n, 3)) drawn at random from `images` (RGB uint8 HxWx3)."""
    rng = np.random.default_rng(seed)
    pix = [im.reshape(-1, 3) for im in images]
    which = rng.integers(0, len(pix), n)
    return np.stack([pix[i][rng.integers(0, len(pix[i]))] for i in which]).astype(np.uint8)
