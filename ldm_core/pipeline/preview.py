"""Cheap live previews: latents -> RGB without running the VAE decoder at full cost.

For small latents (up to 32x32, e.g. the built-in model) the real VAE decode is cheap and exact, so it is used.
For larger ones a linear map latent -> RGB is fitted once per VAE by least squares, by encoding a synthetic
colour image with the VAE's own encoder: it works for any VAE without shipped coefficients.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..devices import execution_device
from ..models.geometry import vae_scale_factor
from .images import tensor_to_pil

FULL_DECODE_MAX_AREA = 32 * 32


def _synthetic_image(size: int = 64) -> torch.Tensor:
    """A deterministic colourful test card in [-1, 1], (1,3,size,size)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    r = (torch.sin(x * 6.3) + 1) / 2
    g = (torch.cos(y * 5.1 + x * 2) + 1) / 2
    b = ((x + y) / 2) ** 2
    return torch.stack([r, g, b])[None] * 2 - 1


class LatentPreviewer:
    """Turns (B,C,h,w) latents (already scaled by the VAE's scaling factor) into PIL previews."""

    def __init__(self, vae, scaling_factor: float, shift_factor: float = 0.0, device: torch.device | None = None):
        self.vae = vae
        self.device = device  # where the VAE executes when its weights are offloaded to `meta`
        self.scaling = scaling_factor
        self.shift = shift_factor
        self._coef: torch.Tensor | None = None  # (C+1, 3)

    @torch.no_grad()
    def _fit(self) -> torch.Tensor:
        param = next(self.vae.parameters())
        img = _synthetic_image().to(execution_device(self.vae, self.device), param.dtype)
        z = self.vae.encode(img).latent_dist.mode().float()  # (1,C,h,w)
        h, w = z.shape[-2:]
        rgb = torch.nn.functional.interpolate(img.float(), size=(h, w), mode="area")
        zz = z[0].reshape(z.shape[1], -1).T.cpu().numpy()
        a = np.concatenate([zz, np.ones((zz.shape[0], 1), np.float32)], axis=1)
        target = rgb[0].reshape(3, -1).T.cpu().numpy()
        coef, *_ = np.linalg.lstsq(a, target, rcond=None)
        return torch.from_numpy(coef.astype(np.float32))

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, *, max_images: int = 1) -> Image.Image:
        latents = latents[:max_images]
        z = latents.float() / self.scaling + self.shift
        if z.shape[-1] * z.shape[-2] <= FULL_DECODE_MAX_AREA:
            param = next(self.vae.parameters())
            x = self.vae.decode(z.to(execution_device(self.vae, self.device), param.dtype)).sample
            return tensor_to_pil(x)[0]
        if self._coef is None:
            self._coef = self._fit()
        flat = z[0].reshape(z.shape[1], -1).T.cpu()
        rgb = torch.cat([flat, torch.ones(flat.shape[0], 1)], dim=1) @ self._coef
        rgb = rgb.T.reshape(1, 3, z.shape[-2], z.shape[-1])
        img = tensor_to_pil(rgb)[0]
        f = vae_scale_factor(self.vae.config)  # pixels per latent: the preview has the image's size
        return img.resize((img.width * f, img.height * f), Image.BILINEAR)
