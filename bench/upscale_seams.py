"""Seams of a tiled diffusion upscaler: upscale test patterns larger than one tile with the registry's tiling and
with one tile covering everything, and compare how much the picture changes across the tiles' hand-over bands.

A diffusion upscaler runs every tile with the same seed but its own noise, so neighbouring tiles disagree a
little; the feathered blend (ldm_core.tiling) hands over along a ramp. A visible seam shows as extra gradient
energy in the hand-over bands. For each pattern this prints the mean absolute gradient across the bands
relative to the gradient just outside them (`band_ratio`), for the tiled and the untiled output at the same
places (the untiled one has no seams, so its ratio is what the picture itself has there), and the PSNR of each
against the pattern's true high-resolution render.

    python bench/upscale_seams.py --upscaler ldm-builtin-x4 --steps 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def patterns(size: int) -> dict:
    """name -> (low-res PIL image, true 4x numpy image or None)."""
    import torch
    from PIL import Image

    from ldm_core.train import shapes
    from ldm_core.train.upscaler import skimage_images

    out = {}
    scenes = shapes.sample_scenes("seams", 1, n_objects=2)
    packed = shapes.pack_scenes(scenes)
    out["shapes scene"] = (shapes.to_pil(shapes.render_packed(packed, size)[0]),
                           np.asarray(shapes.to_pil(shapes.render_packed(packed, size * 4)[0])))
    y, x = torch.meshgrid(torch.linspace(0, 1, size * 4), torch.linspace(0, 1, size * 4), indexing="ij")
    ramp = torch.stack([x, y, 0.5 + 0.25 * torch.sin(6 * x + 3 * y)]).clamp(0, 1)
    hr = shapes.to_pil(ramp)
    out["smooth gradient"] = (hr.resize((size, size), Image.BICUBIC), np.asarray(hr))
    _, held, _ = skimage_images()
    photo = held[0][: size * 4, : size * 4]
    ph = Image.fromarray(photo)
    out["photo"] = (ph.resize((photo.shape[1] // 4, photo.shape[0] // 4), Image.BICUBIC), photo)
    return out


def band_ratio(img: np.ndarray, bands: list[tuple[int, int]], axis: int) -> float:
    """Mean |gradient| across `axis` inside the bands over the mean within 16 px outside them."""
    g = np.abs(np.diff(img.astype(np.float32).mean(-1), axis=axis))
    inside, outside = [], []
    n = g.shape[axis]
    for a, b in bands:
        sl = [slice(None), slice(None)]
        sl[axis] = slice(a, b)
        inside.append(g[tuple(sl)].mean())
        for lo, hi in ((max(0, a - 16), a), (b, min(n, b + 16))):
            sl[axis] = slice(lo, hi)
            if hi > lo:
                outside.append(g[tuple(sl)].mean())
    return float(np.mean(inside) / max(np.mean(outside), 1e-6))


def bands(length: int, tile: int, overlap: int, scale: int) -> list[tuple[int, int]]:
    """Output-pixel ranges of the hand-over ramps (middle half of each overlap) along one axis."""
    from ldm_core.tiling import tile_starts

    starts = tile_starts(length, tile, overlap)
    size = min(tile, length)
    out = []
    for a, b in zip(starts, starts[1:], strict=False):
        lo, hi = b, a + size  # the shared strip
        q = (hi - lo) / 4
        out.append((int((lo + q) * scale), int((hi - q) * scale) + 1))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upscaler", default="ldm-builtin-x4")
    ap.add_argument("--dirs", nargs="*", default=[str(ROOT / "models" / "SD-Upscale"), str(ROOT / "models" / "LDSR")])
    ap.add_argument("--size", type=int, default=160, help="low-resolution pattern side (the tile is 128)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    import torch

    from ldm_core.config import DiffusionUpscaleOptions
    from ldm_core.upscalers import UpscalerRegistry

    if a.threads:
        torch.set_num_threads(a.threads)
    from ldm_core.train.upscaler import psnr

    opts = DiffusionUpscaleOptions(steps=a.steps)
    tiled = UpscalerRegistry([Path(d) for d in a.dirs], builtin=None, diffusion=opts)
    whole = UpscalerRegistry([Path(d) for d in a.dirs], builtin=None,
                             diffusion=DiffusionUpscaleOptions(steps=a.steps, tile=4096))
    report = {"upscaler": a.upscaler, "steps": a.steps, "tile": opts.tile, "overlap": opts.overlap, "patterns": {}}
    for name, (low, truth) in patterns(a.size).items():
        t0 = time.perf_counter()
        out_t = np.asarray(tiled.upscale(low, a.upscaler, scale=4))
        t1 = time.perf_counter()
        out_w = np.asarray(whole.upscale(low, a.upscaler, scale=4))
        t2 = time.perf_counter()
        w, h = low.size
        bx, by = bands(w, opts.tile, opts.overlap, 4), bands(h, opts.tile, opts.overlap, 4)
        row = {"low_res": [w, h], "seams": len(bx) + len(by), "seconds_tiled": round(t1 - t0, 1),
               "seconds_whole": round(t2 - t1, 1)}
        for label, img in (("tiled", out_t), ("whole", out_w)):
            ratios = []
            if bx:
                ratios.append(band_ratio(img, bx, axis=1))
            if by:
                ratios.append(band_ratio(img, by, axis=0))
            row[f"band_ratio_{label}"] = round(float(np.mean(ratios)), 3) if ratios else None
            if truth is not None and truth.shape == img.shape:
                row[f"psnr_{label}"] = round(psnr(img, truth), 2)
        report["patterns"][name] = row
        print(name, json.dumps(row), flush=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
