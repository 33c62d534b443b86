"""Outpainting: grow the canvas left/right/up/down and build the inpaint mask for the new area, as an
`InpaintRequest` the engine runs like any inpaint job; also the canvas + mask of img2img "Resize and fill"
(fit the image inside the target size and inpaint the bars).

The mask (mode "L", 255 = repaint) is 255 over every new pixel and ramps linearly from 255 down to 0 across a
`blend` px band just inside the original image along each grown side, so the seam is repainted smoothly;
everything else is 0, so the engine's paste-back keeps those original pixels exactly. The new area starts as
colours diffused in from the original's edge (the "fill" of masked content).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..generation_requests import MAX_SIDE, MIN_SIDE, InpaintRequest, RequestError
from ..models.geometry import SD_VAE_FACTOR, round_nearest
from .images import fill_masked


@dataclass(frozen=True)
class Outpaint:
    """A grown canvas (RGB), its mask (L, 255 = repaint) and where the original sits: `box` =
    (left, top, right, bottom) in canvas px."""

    canvas: Image.Image
    mask: Image.Image
    box: tuple[int, int, int, int]


def _ramp(n: int, length: int) -> np.ndarray:
    """n values falling linearly from ~1 (index 0, at the seam) to ~0 over `length` px, then 0."""
    if length <= 0:
        return np.zeros(n, np.float32)
    i = np.arange(n, dtype=np.float32)
    return np.clip(1.0 - (i + 0.5) / length, 0.0, 1.0)


def outpaint_mask(
    size: tuple[int, int],
    box: tuple[int, int, int, int],
    blend: int,
    sides: tuple[bool, bool, bool, bool] | None = None,
) -> Image.Image:
    """Mask for a canvas of `size` = (w, h) whose original occupies `box`: 255 outside the box; inside, a
    linear ramp over `blend` px from each side in `sides` (left, top, right, bottom; default: each side where
    the canvas grew), 0 elsewhere."""
    w, h = size
    x0, y0, x1, y1 = box
    if sides is None:
        sides = (x0 > 0, y0 > 0, x1 < w, y1 < h)
    bw, bh = x1 - x0, y1 - y0
    blend = max(0, min(blend, bw // 2, bh // 2))
    inner = np.zeros((bh, bw), np.float32)
    if sides[0]:
        inner = np.maximum(inner, _ramp(bw, blend)[None, :])
    if sides[2]:
        inner = np.maximum(inner, _ramp(bw, blend)[::-1][None, :])
    if sides[1]:
        inner = np.maximum(inner, _ramp(bh, blend)[:, None])
    if sides[3]:
        inner = np.maximum(inner, _ramp(bh, blend)[::-1][:, None])
    m = np.ones((h, w), np.float32)
    m[y0:y1, x0:x1] = inner
    return Image.fromarray(np.round(m * 255).astype(np.uint8), "L")


def _grow(n: int, a: int, b: int, multiple: int) -> tuple[int, int]:
    """Grow amounts (a, b) on the two ends of an axis of n px, enlarged so n+a+b is a multiple of `multiple`
    when that axis grows at all (the extra goes to the larger side)."""
    if a < 0 or b < 0:
        raise RequestError("outpaint", "pixels to add must be >= 0")
    if (a == 0 and b == 0) or multiple <= 1:
        return a, b
    extra = (-(n + a + b)) % multiple
    if a > b:
        return a + extra, b
    return a, b + extra


def outpaint_canvas(
    image: Image.Image,
    *,
    left: int = 0,
    right: int = 0,
    up: int = 0,
    down: int = 0,
    blend: int = 16,
    multiple: int = SD_VAE_FACTOR,
) -> Outpaint:
    """Grow `image` by the given px on each side (a grown axis is enlarged further so its length is a multiple
    of `multiple`, the model's VAE factor), fill the new area from the edge colours and build the mask."""
    image = image.convert("RGB")
    w, h = image.size
    left, right = _grow(w, left, right, multiple)
    up, down = _grow(h, up, down, multiple)
    cw, ch = w + left + right, h + up + down
    if max(cw, ch) > MAX_SIDE:
        raise RequestError("outpaint", f"the canvas would be {cw}x{ch}; at most {MAX_SIDE} px per side")
    return _placed(image, (cw, ch), (left, up), blend)


def resize_and_fill_canvas(image: Image.Image, width: int, height: int, *, blend: int = 16) -> Outpaint:
    """img2img "Resize and fill" as outpainting: scale `image` to fit inside width x height (aspect kept),
    centre it, and mark the bars (plus a `blend` px band) for inpainting."""
    image = image.convert("RGB")
    ratio = min(width / image.width, height / image.height)
    fw, fh = max(1, round(image.width * ratio)), max(1, round(image.height * ratio))
    fitted = image.resize((fw, fh), Image.LANCZOS) if (fw, fh) != image.size else image
    return _placed(fitted, (width, height), ((width - fw) // 2, (height - fh) // 2), blend)


def _placed(image: Image.Image, size: tuple[int, int], at: tuple[int, int], blend: int) -> Outpaint:
    """`image` pasted at `at` on a canvas of `size`, the rest filled from its edge colours, and the mask of the
    rest (plus a `blend` px band)."""
    box = (at[0], at[1], at[0] + image.width, at[1] + image.height)
    canvas = Image.new("RGB", size)
    canvas.paste(image, at)
    if image.size != size:
        hard = Image.new("L", size, 255)
        hard.paste(0, box)
        canvas = fill_masked(canvas, hard)
        canvas.paste(image, at)
    return Outpaint(canvas, outpaint_mask(size, box, blend), box)


def work_side(n: int, multiple: int = SD_VAE_FACTOR) -> int:
    """The side a canvas of `n` px is worked at: the nearest multiple of `multiple` (the model's VAE factor)
    within the request limits."""
    return round_nearest(n, multiple, MIN_SIDE, MAX_SIDE)


def outpaint_request(
    image: Image.Image,
    *,
    left: int = 0,
    right: int = 0,
    up: int = 0,
    down: int = 0,
    blend: int = 16,
    multiple: int = SD_VAE_FACTOR,
    **fields: Any,
) -> InpaintRequest:
    """An InpaintRequest that outpaints `image`: the grown canvas as init image, the outpaint mask, width and
    height set to the canvas size (an axis that did not grow and is not a multiple of `multiple`, the model's
    VAE factor, is worked at the nearest multiple of it; the engine resizes and pastes back at the canvas size).
    `fields` are other request fields (prompt, seed, denoising_strength, ...); defaults here: inpainting_fill
    "fill" and mask_blur 0 (the mask is already feathered)."""
    if left == right == up == down == 0:
        raise RequestError("outpaint", "choose at least one side to extend by some pixels")
    op = outpaint_canvas(image, left=left, right=right, up=up, down=down, blend=blend, multiple=multiple)
    values: dict[str, Any] = {"inpainting_fill": "fill", "mask_blur": 0}
    values.update(fields)
    values.update(
        init_images=[op.canvas],
        mask=op.mask,
        width=work_side(op.canvas.width, multiple),
        height=work_side(op.canvas.height, multiple),
    )
    return InpaintRequest.build(**values)
