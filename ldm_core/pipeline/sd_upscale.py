"""SD upscale: upscale an image with any upscaler, then redraw it tile by tile with img2img and blend the
tiles back with feathered overlaps (A1111's "SD upscale" script).

The img2img runs through a `generate(Img2ImgRequest) -> result` function passed in (e.g. a closure around
`Engine.generate` with the job's context), so this module needs no engine. `result` needs `.images` (PIL),
and may have `.infotexts` and `.interrupted`. Every tile uses the same seed (one resolved seed per output
image), the request's width x height as the tile size, and `overlap` px shared between neighbouring tiles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..generation_requests import MAX_SIDE, MIN_SIDE, Img2ImgRequest, InpaintRequest, RequestError
from ..models.geometry import SD_VAE_FACTOR, round_nearest
from ..rng import resolve_seed
from ..tiling import Tile, TileBlender, TileGrid
from ..upscalers import UpscalerRegistry

GenerateFn = Callable[[Img2ImgRequest], Any]
ProgressFn = Callable[[int, int], None]


@dataclass
class SDUpscaleResult:
    """Upscaled-and-redrawn images (one per n_iter), the seed of each, the infotext of each image's first
    tile job, and whether the job was interrupted (remaining tiles then keep the plain upscaled pixels)."""

    images: list[Image.Image] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    interrupted: bool = False
    tiles: int = 0


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]


def _to_image(t: torch.Tensor) -> Image.Image:
    arr = t[0].clamp(0, 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB")


def sd_upscale(
    request: Img2ImgRequest,
    generate: GenerateFn,
    registry: UpscalerRegistry,
    *,
    upscaler: str,
    scale: float = 2.0,
    overlap: int = 64,
    progress: ProgressFn | None = None,
    multiple: int = SD_VAE_FACTOR,
    cancel: Callable[[], None] | None = None,
) -> SDUpscaleResult:
    """Upscale `request.init_images[0]` by `scale` with `upscaler`, then img2img every tile (tile size =
    request.width x request.height, default 512) with the request's prompt, sampler, steps and
    denoising_strength, and blend. Each tile is worked at the nearest multiple of `multiple` (the model's VAE
    factor). `request.batch_size` tiles go into one generate call; `request.n_iter`
    output images are made with seeds seed, seed+1, ... `progress(done, total)` counts tiles; `cancel()` is
    passed to the upscaler (a diffusion upscaler checks it every step)."""
    if isinstance(request, InpaintRequest):
        raise RequestError("script_name", "SD upscale works on img2img requests, not inpaint ones")
    if not 1.0 <= scale <= 8.0:
        raise RequestError("scale", f"allowed: 1 to 8; got {scale!r}")
    if overlap < 0:
        raise RequestError("overlap", f"must be >= 0; got {overlap!r}")
    source = request.init_images[0].convert("RGB")
    big = registry.upscale(source, upscaler, scale=scale, cancel=cancel)
    tile_w, tile_h = request.width or 512, request.height or 512
    grid = TileGrid(big.width, big.height, tile_w, tile_h, overlap)
    seed = resolve_seed(request.seed)
    result = SDUpscaleResult(tiles=len(grid))
    base = _to_tensor(big)
    total = len(grid) * request.n_iter
    done = 0
    per_call = request.batch_size
    for it in range(request.n_iter):
        blender = TileBlender(grid, 1, 3)
        image_seed = seed + it
        first_info = ""
        todo = list(grid.tiles)
        while todo:
            batch, todo = todo[:per_call], todo[per_call:]
            if result.interrupted:
                for t in batch:
                    blender.add(t, base[:, :, t.y : t.y + t.h, t.x : t.x + t.w])
                continue
            crops = [big.crop((t.x, t.y, t.x + t.w, t.y + t.h)) for t in batch]
            out = generate(_tile_request(request, crops, image_seed, multiple))
            images = list(getattr(out, "images", []) or [])
            if not first_info and getattr(out, "infotexts", None):
                first_info = out.infotexts[0]
            for k, t in enumerate(batch):
                blender.add(t, _tile_output(images, k, t, base))
            if getattr(out, "interrupted", False) or len(images) < len(batch):
                result.interrupted = True
            done += len(batch)
            if progress is not None:
                progress(done, total)
        result.images.append(_to_image(blender.result()))
        result.seeds.append(image_seed)
        result.infotexts.append(first_info)
        if result.interrupted:
            break
    return result


def _tile_request(request: Img2ImgRequest, crops: list[Image.Image], seed: int, multiple: int) -> Img2ImgRequest:
    w, h = crops[0].size
    return request.model_copy(
        update={
            "init_images": crops,
            "width": round_nearest(w, multiple, MIN_SIDE, MAX_SIDE),
            "height": round_nearest(h, multiple, MIN_SIDE, MAX_SIDE),
            "seed": seed,
            "batch_size": len(crops),
            "n_iter": 1,
            "save_images": False,
        }
    )


def _tile_output(images: list[Image.Image], k: int, tile: Tile, base: torch.Tensor) -> torch.Tensor:
    """The k-th generated tile as (1, 3, h, w) float 0..255, resized to the tile if needed; the plain upscaled
    pixels when the job stopped before making it."""
    if k >= len(images):
        return base[:, :, tile.y : tile.y + tile.h, tile.x : tile.x + tile.w]
    im = images[k].convert("RGB")
    if im.size != (tile.w, tile.h):
        im = im.resize((tile.w, tile.h), Image.LANCZOS)
    return _to_tensor(im)
