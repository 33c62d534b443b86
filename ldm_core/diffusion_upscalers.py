"""Diffusion upscalers, run as model upscalers of the registry (`ldm_core.upscalers`): listed in Extras, as
hires-fix upscalers and in `/sdapi/v1/upscalers`.

- Stability's **SD x4 upscaler** (a text-conditioned latent diffusion model on a factor-4 VAE whose UNet reads
  the noised low-resolution image concatenated to its latents, conditioned on the noise level).
- Stability's **SD x2 latent upscaler** (works on SD 1.x/2.x latents: in the hires fix it upscales the first
  pass's latents 2x without decoding them, then the second pass runs as usual; on an image in Extras it
  encodes, upscales and decodes with its own VAE).

Found as diffusers folders (`model_index.json` of class `StableDiffusionUpscalePipeline`) in the upscaler
folders (models/ESRGAN, ...) or models/SD-Upscale, listed by folder name; loaded offline (`local_files_only`)
with safetensors weights only unless pickles are allowed. Images larger than one tile are upscaled tile by
tile with feathered overlaps (`ldm_core.tiling`), each tile with the same prompt, seed and noise.

The prompt is the image's own (read from its infotext, as A1111 pastes it) unless one is given; the other
options users know from the x4 upscaler are fixed here: 20 steps, noise level 20, CFG 9, seed 0.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from PIL import Image

from .config import DiffusionUpscaleOptions
from .models.pipelines import PipelineFolder

log = logging.getLogger(__name__)

PIPELINE_CLASS = "StableDiffusionUpscalePipeline"
LATENT_PIPELINE_CLASS = "StableDiffusionLatentUpscalePipeline"
#: Extra folder name (under models/) scanned for diffusion upscalers, besides the model-upscaler folders.
FOLDER = "SD-Upscale"


def pipeline_class(path: Path) -> str | None:
    """The `_class_name` of a diffusers pipeline folder, or None."""
    index = path / "model_index.json"
    if not index.is_file():
        return None
    try:
        return json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError):
        return None


def upscaler_class(path: Path) -> type[DiffusionUpscaler] | None:
    """The upscaler class for a pipeline folder (by its model_index.json), or None."""
    return {PIPELINE_CLASS: X4Upscaler, LATENT_PIPELINE_CLASS: X2LatentUpscaler}.get(pipeline_class(path) or "")


def image_prompt(image: Image.Image) -> str:
    """The prompt in the image's infotext (PNG "parameters"), or ""."""
    text = image.info.get("parameters") if hasattr(image, "info") else None
    if not text:
        return ""
    from .infotext import parse_infotext

    return str(parse_infotext(str(text)).get("Prompt", ""))


class DiffusionUpscaler(PipelineFolder):
    """A diffusers pipeline folder, loaded on first use (offline, safetensors unless pickles are allowed)."""

    scale = 1
    pipeline_name = ""
    field = "upscaler"

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_name)

    def upscale(self, image: Image.Image, prompt: str, options: DiffusionUpscaleOptions) -> torch.Tensor:
        """One image (a tile) -> (1, 3, scale*h, scale*w) float32 in [0, 1] on the CPU."""
        return self._run(image, prompt, options, "pt").float().cpu()

    def _run(self, image, prompt: str, options: DiffusionUpscaleOptions, output_type: str):
        raise NotImplementedError


class X4Upscaler(DiffusionUpscaler):
    """One SD x4 upscaler folder."""

    scale = 4
    pipeline_name = PIPELINE_CLASS

    def _run(self, image, prompt: str, options: DiffusionUpscaleOptions, output_type: str):
        return self.pipeline()(
            prompt=prompt,
            image=image,
            num_inference_steps=options.steps,
            guidance_scale=options.guidance_scale,
            noise_level=options.noise_level,
            generator=torch.Generator(device="cpu").manual_seed(options.seed),
            output_type=output_type,
        ).images


class X2LatentUpscaler(DiffusionUpscaler):
    """One SD x2 latent upscaler folder: `latents()` for the hires fix, `upscale()` for images (through its own
    VAE)."""

    scale = 2
    pipeline_name = LATENT_PIPELINE_CLASS

    def _run(self, image, prompt: str, options: DiffusionUpscaleOptions, output_type: str):
        return self.pipeline()(
            prompt=prompt,
            image=image,
            num_inference_steps=options.steps,
            guidance_scale=0.0 if not prompt else options.guidance_scale,
            generator=torch.Generator(device="cpu").manual_seed(options.seed),
            output_type=output_type,
        ).images

    def latents(self, z: torch.Tensor, prompt: str, options: DiffusionUpscaleOptions) -> torch.Tensor:
        """Scaled SD latents (B, 4, h, w) -> (B, 4, 2h, 2w), never decoded."""
        pipe = self.pipeline()
        out = [
            self._run(z[i : i + 1].to(pipe.device, pipe.unet.dtype), prompt, options, "latent") for i in range(len(z))
        ]
        return torch.cat(out).to(z.device, z.dtype)
