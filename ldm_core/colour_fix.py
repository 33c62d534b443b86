"""Colour fix for diffusion upscalers: keep the upscaler's detail, take the large-scale colour from the input.

A diffusion upscaler samples its output, and small errors in the large-scale colour of that sample (a sky a
shade greyer, a face a shade greener) are the most visible way it departs from the image it was given. Users
of StableSR (Wang et al. 2023, "Exploiting Diffusion Prior for Real-World Image Super-Resolution") know the
remedy as the "Color Fix" setting of its A1111 extension (sd-webui-stablesr: Wavelet, AdaIN). The choices here
(this module's own implementation):

- "Wavelet": the output's coarse layers are replaced by the input's (bicubic-upscaled to the output's size).
  Both are split by an a-trous wavelet decomposition (a separable [1, 2, 1] / 4 blur applied `WAVELET_LEVELS`
  times with dilations 1, 2, 4, ...): what the blurs remove from the output (its fine detail) is kept, what
  remains after them (the colour over ~2**levels pixels) comes from the input.
- "AdaIN": each channel's mean and standard deviation are set to the input's (a global colour and contrast
  correction; the output's local colour errors stay).
- "None": the output as sampled.

Measured on the shipped x4 upscaler (sr-eval, 200 held-out scenes and 8 crops of 3 held-out photographs): see
its TRAINING.json, `eval_as_shipped`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import COLOUR_FIXES

WAVELET_LEVELS = 5  # coarse layers from the input: colour over ~32 px of the output


def check_colour_fix(method: str) -> str:
    """`method` in the spelling of COLOUR_FIXES (any case), or ValueError naming the choices."""
    for m in COLOUR_FIXES:
        if m.lower() == str(method).strip().lower():
            return m
    raise ValueError(f"colour fix {method!r}: choose one of {', '.join(COLOUR_FIXES)}")


def _blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """(N, C, H, W) blurred by a separable [1, 2, 1] / 4 kernel with taps `dilation` pixels apart (edges
    replicated)."""
    c = x.shape[1]
    k = torch.tensor([0.25, 0.5, 0.25], dtype=x.dtype, device=x.device)
    x = F.pad(x, (dilation, dilation, 0, 0), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, 3).expand(c, 1, 1, 3), groups=c, dilation=(1, dilation))
    x = F.pad(x, (0, 0, dilation, dilation), mode="replicate")
    return F.conv2d(x, k.view(1, 1, 3, 1).expand(c, 1, 3, 1), groups=c, dilation=(dilation, 1))


def coarse(x: torch.Tensor, levels: int = WAVELET_LEVELS) -> torch.Tensor:
    """The a-trous wavelet decomposition's residual after `levels` levels: what `x` is without its detail."""
    for level in range(levels):
        x = _blur(x, 2**level)
    return x


def fix_tensor(out: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    """`out` (N, C, H, W) with its colour taken from `reference` (same shape) by `method`; values unclamped."""
    method = check_colour_fix(method)
    if method == "Wavelet":
        return out - coarse(out) + coarse(reference)
    if method == "AdaIN":
        dims = (-2, -1)
        o_mean, o_std = out.mean(dims, keepdim=True), out.std(dims, keepdim=True)
        r_mean, r_std = reference.mean(dims, keepdim=True), reference.std(dims, keepdim=True)
        return (out - o_mean) / (o_std + 1e-5) * r_std + r_mean
    return out


def colour_fix(out: Image.Image, source: Image.Image, method: str) -> Image.Image:
    """The upscaled RGB image `out` with its colour taken from `source` (the image it was upscaled from, any
    size: it is bicubic-resized to `out`'s) by `method` (one of COLOUR_FIXES)."""
    if check_colour_fix(method) == "None":
        return out
    ref = source.convert("RGB").resize(out.size, Image.BICUBIC)

    def tensor(im: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]

    y = fix_tensor(tensor(out), tensor(ref), method)[0]
    arr = y.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB")
