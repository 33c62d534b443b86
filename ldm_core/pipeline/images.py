"""Pixel-space helpers for img2img and inpainting: A1111's resize modes, mask preparation (invert, blur),
the "Only masked" crop region, masked-content fill, and the final paste-back of original pixels.

Images are PIL; masks are mode "L" where 255 = repaint.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps


def resize_image(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """Resize to width x height by one of A1111's resize modes:
    "Just resize" stretches; "Crop and resize" scales to cover then centre-crops; "Resize and fill" scales to
    fit and fills the bars by stretching the edge pixels; "Just resize (latent upscale)" is accepted but, for
    now, stretches in pixel space exactly like "Just resize" (no latent-space resize yet)."""
    image = image.convert("RGB")
    if mode in ("Just resize", "Just resize (latent upscale)"):
        return image.resize((width, height), Image.LANCZOS)
    if mode == "Crop and resize":
        return ImageOps.fit(image, (width, height), Image.LANCZOS, centering=(0.5, 0.5))
    if mode == "Resize and fill":
        ratio = min(width / image.width, height / image.height)
        w, h = max(1, round(image.width * ratio)), max(1, round(image.height * ratio))
        fitted = image.resize((w, h), Image.LANCZOS)
        canvas = image.resize((width, height), Image.LANCZOS).filter(ImageFilter.GaussianBlur(8))
        # stretch the outermost rows/columns into the bars, as A1111 does
        x0, y0 = (width - w) // 2, (height - h) // 2
        if x0 > 0:
            canvas.paste(fitted.crop((0, 0, 1, h)).resize((x0, h)), (0, y0))
            canvas.paste(fitted.crop((w - 1, 0, w, h)).resize((width - w - x0, h)), (x0 + w, y0))
        if y0 > 0:
            canvas.paste(fitted.crop((0, 0, w, 1)).resize((w, y0)), (x0, 0))
            canvas.paste(fitted.crop((0, h - 1, w, h)).resize((w, height - h - y0)), (x0, y0 + h))
        canvas.paste(fitted, (x0, y0))
        return canvas
    raise ValueError(f"resize_mode: unknown mode {mode!r}")


def prepare_mask(mask: Image.Image, *, invert: bool, blur: int | tuple[int, int]) -> Image.Image:
    """Greyscale mask, inverted if asked ("Inpaint not masked"), Gaussian-blurred with a standard deviation
    of `blur` pixels, or (horizontal, vertical) pixels for A1111's asymmetric `mask_blur_x`/`mask_blur_y`."""
    m = mask.convert("L")
    if invert:
        m = ImageOps.invert(m)
    bx, by = (blur, blur) if isinstance(blur, int) else blur
    if bx > 0 or by > 0:
        m = m.filter(ImageFilter.GaussianBlur((max(0, bx), max(0, by))))
    return m


def masked_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The "Only masked" crop box: the mask's bounding box grown by `padding` pixels and then widened to the
    target aspect ratio width:height, clipped to the image. None when the mask is empty."""
    box = mask.point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        return None
    W, H = mask.size
    x1, y1, x2, y2 = box
    x1, y1, x2, y2 = max(0, x1 - padding), max(0, y1 - padding), min(W, x2 + padding), min(H, y2 + padding)
    bw, bh = x2 - x1, y2 - y1
    target = width / height
    if bw / bh < target:  # too tall: widen
        need = round(bh * target) - bw
        x1, x2 = x1 - need // 2, x2 + need - need // 2
    else:  # too wide: heighten
        need = round(bw / target) - bh
        y1, y2 = y1 - need // 2, y2 + need - need // 2
    # shift back inside the image, then clip
    if x1 < 0:
        x2, x1 = x2 - x1, 0
    if x2 > W:
        x1, x2 = max(0, x1 - (x2 - W)), W
    if y1 < 0:
        y2, y1 = y2 - y1, 0
    if y2 > H:
        y1, y2 = max(0, y1 - (y2 - H)), H
    return x1, y1, x2, y2


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Masked content "fill": replace masked pixels with colours diffused in from the surrounding pixels."""
    arr = np.asarray(image.convert("RGB")).astype(np.float32)
    m = np.asarray(mask.convert("L")) > 127
    if not m.any() or m.all():
        return image
    known = ~m
    out = arr.copy()
    out[m] = arr[known].mean(axis=0)
    # repeated blurs that keep the known pixels fixed: a cheap harmonic fill
    img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    for radius in (64, 32, 16, 8, 4, 2, 1):
        blurred = np.asarray(img.filter(ImageFilter.GaussianBlur(radius))).astype(np.float32)
        out[m] = blurred[m]
        img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    return img


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL -> (1,3,H,W) float tensor in [-1, 1]."""
    arr = np.asarray(image.convert("RGB")).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(B,3,H,W) tensor in [-1, 1] -> list of RGB PIL images."""
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def mask_to_latent(mask: Image.Image, latent_hw: tuple[int, int]) -> torch.Tensor:
    """L mask -> (1,1,h,w) float in [0,1] at latent resolution (area-averaged)."""
    m = torch.from_numpy(np.asarray(mask.convert("L")).astype(np.float32) / 255.0)[None, None]
    return torch.nn.functional.interpolate(m, size=latent_hw, mode="area")


def paste_back(
    original: Image.Image, generated: Image.Image, mask: Image.Image, box: tuple[int, int, int, int] | None
) -> Image.Image:
    """Composite: the generated pixels where the (blurred) mask is set, the original elsewhere. With an
    "Only masked" `box`, the generated crop is first resized into that box."""
    base = original.convert("RGB").copy()
    if box is not None:
        x1, y1, x2, y2 = box
        layer = base.copy()
        layer.paste(generated.resize((x2 - x1, y2 - y1), Image.LANCZOS), (x1, y1))
    else:
        layer = generated.resize(base.size, Image.LANCZOS) if generated.size != base.size else generated
    return Image.composite(layer, base, mask.convert("L"))
