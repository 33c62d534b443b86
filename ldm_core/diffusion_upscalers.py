"""Diffusion upscalers, run as model upscalers of the registry (`ldm_core.upscalers`): listed in Extras, as
hires-fix upscalers and in `/sdapi/v1/upscalers`.

- Stability's **SD x4 upscaler** (a text-conditioned latent diffusion model on a factor-4 VAE whose UNet reads
  the noised low-resolution image concatenated to its latents, conditioned on the noise level).
- Stability's **SD x2 latent upscaler** (works on SD 1.x/2.x latents: in the hires fix it upscales the first
  pass's latents 2x without decoding them, then the second pass runs as usual; on an image in Extras it
  encodes, upscales and decodes with its own VAE).

- CompVis **LDSR** (latent diffusion 4x super-resolution, A1111's "LDSR"): a single file in models/LDSR
  (`model.safetensors`, or A1111's `model.ckpt` with --allow-pickle), listed as "LDSR" (other file names by
  their stem); run as A1111 runs it (DDIM, eta 1, A1111's `ldsr_steps` setting, default 100); images are
  padded to a multiple of 8 and cropped back.

Found as diffusers folders (`model_index.json` of class `StableDiffusionUpscalePipeline`) in the upscaler
folders (models/ESRGAN, ...) or models/SD-Upscale, listed by folder name, or as single files in their original
layout (the x4 upscaler's `x4-upscaler-ema.safetensors` in models/SD-Upscale, LDSR in models/LDSR; read by
`ldm_core.models.sr_files`), listed by file stem; loaded offline (`local_files_only`) with safetensors
weights only unless pickles are allowed. Images larger than one tile are upscaled tile by
tile with feathered overlaps (`ldm_core.tiling`), each tile with the same prompt, seed and noise.

The prompt is the image's own (read from its infotext, as A1111 pastes it) unless one is given; steps (20),
noise level (20), CFG, seed (0) and LDSR's steps (100) are settings (`DiffusionUpscaleOptions`). CFG 0 (the
default) runs each upscaler at its recommended scale: a `cfg_scale` in its sidecar (`NAME.json` beside the folder
or file, `ldm_core.models.sidecar`), else Stability's default 9; the shipped upscaler recommends 3 (its
TRAINING.json's guidance probe).

SD x4 upscalers are sampled by `x4_sample` (the diffusers pipeline's loop, the same random draws) so that they
can be guided by their low-resolution image too: image guidance s > 1 extrapolates each step's prediction away
from the one with the image noised to the highest noise level (nearly withheld), which sharpens what the image
shows. 0 (the default) is the upscaler's recommended value, a sidecar's `image_guidance`, else 1 (off).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from .config import DiffusionUpscaleOptions
from .models.pipelines import PipelineFolder

log = logging.getLogger(__name__)

PIPELINE_CLASS = "StableDiffusionUpscalePipeline"
LATENT_PIPELINE_CLASS = "StableDiffusionLatentUpscalePipeline"
#: Extra folder names (under models/) scanned for diffusion upscalers, besides the model-upscaler folders.
FOLDER = "SD-Upscale"
LDSR_FOLDER = "LDSR"
#: LDSR's UNet sees the image at latent resolution and halves it three times.
LDSR_MULTIPLE = 8
#: The CFG scale of an upscaler whose sidecar recommends none (Stability's x4 upscaler default).
DEFAULT_GUIDANCE = 9.0


def recommended_guidance(path: str | Path) -> float:
    """The CFG scale an upscaler at `path` runs with when none is set: its sidecar's `cfg_scale`, else 9
    (`SidecarError`, naming the file, for an invalid one)."""
    from .models.sidecar import read_sidecar

    return read_sidecar(path).cfg_scale or DEFAULT_GUIDANCE


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


def upscaler_file_class(path: Path) -> tuple[str, type[DiffusionUpscaler]] | None:
    """(listed name, class) for a single-file diffusion upscaler, or None for other files (spandrel's).
    A safetensors file says what it is in its header; a pickle cannot be read before it is loaded, so its
    folder decides (A1111's models/LDSR/model.ckpt; a pickle in models/SD-Upscale is an x4 upscaler)."""
    from .models.detect import LDSR, X4, sr_kind
    from .models.loading import ModelFileError, read_tensor_shapes

    folder = path.parent.name
    if path.suffix.lower() == ".safetensors":
        try:
            kind = sr_kind(read_tensor_shapes(path))
        except (ModelFileError, OSError, ValueError):
            kind = None
    else:
        kind = {LDSR_FOLDER: LDSR, FOLDER: X4}.get(folder)
    if kind == LDSR:
        return ("LDSR" if path.stem == "model" else path.stem), LDSRUpscaler
    if kind == X4:
        return path.stem, X4Upscaler
    return None


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

    def pipeline(self):
        """A folder loads as diffusers saved it; a single file through `ldm_core.models.sr_files`."""
        if self._pipe is None and self.folder.is_file():
            from .models.sr_files import load_sr_file

            self._pipe = load_sr_file(
                self.folder, device=self.device, dtype=self.dtype, allow_pickle=self.allow_pickle, field=self.field
            )
        return super().pipeline()

    def upscale(self, image: Image.Image, prompt: str, options: DiffusionUpscaleOptions,
                cancel: Callable[[], None] | None = None) -> torch.Tensor:
        """One image (a tile) -> (1, 3, scale*h, scale*w) float32 in [0, 1] on the CPU. `cancel()` is called
        after every denoising step and may raise (Interrupt)."""
        return self._run(image, prompt, self.resolved(options), "pt", cancel).float().cpu()

    def resolved(self, options: DiffusionUpscaleOptions) -> DiffusionUpscaleOptions:
        """`options` with each 0 of `recommendations` (CFG; image guidance for the x4) replaced by this
        upscaler's recommended value (read on each call, so an edited sidecar applies at once; an invalid one
        raises `SidecarError` naming the file)."""
        from dataclasses import replace

        over = {name: read(self.folder) for name, read in self.recommendations().items()
                if getattr(options, name) <= 0}
        return replace(options, **over) if over else options

    def recommendations(self) -> dict[str, Callable[[Path], float]]:
        """The options whose 0 means "this upscaler's recommended value", and how to read that value."""
        return {"guidance_scale": recommended_guidance}

    def _run(self, image, prompt: str, options: DiffusionUpscaleOptions, output_type: str,
             cancel: Callable[[], None] | None = None):
        """The diffusers pipeline's call, with this class's `_sampling` arguments."""
        return self.pipeline()(
            prompt=prompt,
            image=image,
            num_inference_steps=options.steps,
            generator=torch.Generator(device="cpu").manual_seed(options.seed),
            output_type=output_type,
            **self._sampling(prompt, options),
            **_step_callback(cancel),
        ).images

    def _sampling(self, prompt: str, options: DiffusionUpscaleOptions) -> dict:
        raise NotImplementedError


def _step_callback(cancel: Callable[[], None] | None) -> dict:
    """The pipelines' per-step `callback` argument that calls `cancel()`, or nothing."""
    return {} if cancel is None else {"callback": lambda *_: cancel()}


class X4Upscaler(DiffusionUpscaler):
    """One SD x4 upscaler folder."""

    scale = 4
    pipeline_name = PIPELINE_CLASS

    def recommendations(self) -> dict[str, Callable[[Path], float]]:
        return {**super().recommendations(), "image_guidance": recommended_image_guidance}

    def _run(self, image, prompt: str, options: DiffusionUpscaleOptions, output_type: str,
             cancel: Callable[[], None] | None = None):
        return x4_sample(self.pipeline(), image, prompt, options, output_type, cancel)


def recommended_image_guidance(path: str | Path) -> float:
    """The image guidance an SD x4 upscaler at `path` runs with when none is set: its sidecar's
    `image_guidance`, else 1 (off)."""
    from .models.sidecar import read_sidecar

    return read_sidecar(path).image_guidance or 1.0


@torch.inference_mode()
def x4_sample(pipe, image: Image.Image, prompt: str, options: DiffusionUpscaleOptions, output_type: str = "pt",
              cancel: Callable[[], None] | None = None, eta: float = 0.0):
    """StableDiffusionUpscalePipeline's sampling (the same random draws, so with image guidance 1 the same
    image for the same seed), written out for image guidance: with `options.image_guidance` s > 1 each step
    also runs the UNet on the image noised to the pipeline's highest noise level (the image nearly withheld) and
    takes e_far + s * (e - e_far), as InstructPix2Pix guides by its input image; text CFG g > 1 adds
    g * (e_prompt - e_negative) on top. The result as the pipeline's `images` for `output_type` ("pt": a
    (1, 3, 4h, 4w) tensor in [0, 1]; "pil": a list of one image). `cancel()` after every step; `eta` is the
    DDIM step noise (0 as the pipeline runs by default; sr-eval's probes set it)."""
    from diffusers.utils.torch_utils import randn_tensor

    pipe.check_inputs(prompt, image, options.noise_level, 1, None, None, None)  # the pipeline's own checks
    unet, vae = pipe.unet, pipe.vae
    device = unet.device
    text_cfg, image_cfg = options.guidance_scale > 1.0, options.image_guidance != 1.0
    positive, negative = pipe.encode_prompt(prompt, device, 1, text_cfg, None)
    generator = torch.Generator(device="cpu").manual_seed(options.seed)
    clean = pipe.image_processor.preprocess(image).to(device, positive.dtype)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # per call: the registry shares pipes
    scheduler.set_timesteps(options.steps, device=device)
    noise = randn_tensor(clean.shape, generator=generator, device=device, dtype=positive.dtype)

    def noised(level: int) -> torch.Tensor:
        return pipe.low_res_scheduler.add_noise(clean, noise, torch.tensor([level], device=device))

    # the batch's branches (text, image, noise level): the prompt's (after the negative's with text CFG), then
    # with image guidance the image noised to the top level, with the negative prompt where CFG has one
    texts = [negative, positive] if text_cfg else [positive]
    imgs, labels = [noised(options.noise_level)] * len(texts), [options.noise_level] * len(texts)
    if image_cfg:
        texts, imgs = [*texts, texts[0]], [*imgs, noised(pipe.config.max_noise_level)]
        labels.append(pipe.config.max_noise_level)
    text, low = torch.cat(texts), torch.cat(imgs)
    label = torch.tensor(labels, dtype=torch.long, device=device)
    shape = (1, vae.config.latent_channels, *clean.shape[2:])
    latents = randn_tensor(shape, generator=generator, device=device, dtype=positive.dtype)
    latents = latents * scheduler.init_noise_sigma
    step_kwargs = pipe.prepare_extra_step_kwargs(generator, eta)  # eta and generator where the scheduler takes them
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents] * len(texts)), t)
        e = unet(torch.cat([x, low], dim=1), t, encoder_hidden_states=text, class_labels=label).sample
        parts = list(e.chunk(len(texts)))
        pred = parts[0]
        if image_cfg:
            far = parts[-1]  # the image nearly withheld
            pred = far + options.image_guidance * (parts[0] - far)
        if text_cfg:
            pred = pred + options.guidance_scale * (parts[1] - parts[0])
        latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
        if cancel is not None:
            cancel()
    if output_type == "latent":
        return latents
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast  # as the pipeline decodes
    if upcast:
        pipe.upcast_vae()
    decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    if upcast:
        vae.to(dtype=torch.float16)
    return pipe.image_processor.postprocess(decoded, output_type=output_type)


class X2LatentUpscaler(DiffusionUpscaler):
    """One SD x2 latent upscaler folder: `latents()` for the hires fix, `upscale()` for images (through its own
    VAE)."""

    scale = 2
    pipeline_name = LATENT_PIPELINE_CLASS

    def _sampling(self, prompt: str, options: DiffusionUpscaleOptions) -> dict:
        return {"guidance_scale": 0.0 if not prompt else options.guidance_scale}

    def latents(self, z: torch.Tensor, prompt: str, options: DiffusionUpscaleOptions,
                cancel: Callable[[], None] | None = None) -> torch.Tensor:
        """Scaled SD latents (B, 4, h, w) -> (B, 4, 2h, 2w), never decoded; `cancel()` after every step."""
        pipe = self.pipeline()
        options = self.resolved(options)
        out = [
            self._run(z[i : i + 1].to(pipe.device, pipe.unet.dtype), prompt, options, "latent", cancel)
            for i in range(len(z))
        ]
        return torch.cat(out).to(z.device, z.dtype)


class LDSRUpscaler(DiffusionUpscaler):
    """CompVis LDSR (one single file): no prompt, no noise level; `ldsr_steps` DDIM steps with eta 1 (A1111's)."""

    scale = 4
    pipeline_name = "LDMSuperResolutionPipeline"

    def _run(self, image, prompt: str, options: DiffusionUpscaleOptions, output_type: str,
             cancel: Callable[[], None] | None = None):
        """The pipeline's loop, written out because diffusers' LDMSuperResolutionPipeline does not pass its
        generator to the scheduler: with eta 1 every step's noise would come from the global RNG, and the
        same seed would not give the same image."""
        import numpy as np
        import torch.nn.functional as F
        from diffusers import DDIMScheduler

        pipe = self.pipeline()
        unet, vq = pipe.unet, pipe.vqvae
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
        x = x.permute(2, 0, 1)[None]
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % LDSR_MULTIPLE, -w % LDSR_MULTIPLE
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        x = x.to(unet.device, unet.dtype)
        generator = torch.Generator(device="cpu").manual_seed(options.seed)
        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # per call: the registry may share a pipe
        scheduler.set_timesteps(options.ldsr_steps, device=unet.device)
        shape = (1, unet.config.in_channels - x.shape[1], *x.shape[-2:])
        latents = torch.randn(shape, generator=generator).to(unet.device, unet.dtype) * scheduler.init_noise_sigma
        with torch.inference_mode():
            for t in scheduler.timesteps:
                eps = unet(torch.cat([latents, x], dim=1), t).sample
                latents = scheduler.step(eps, t, latents, eta=1.0, generator=generator).prev_sample
                if cancel is not None:
                    cancel()
            out = vq.decode(latents).sample.clamp(-1, 1) / 2 + 0.5
        return out[..., : self.scale * h, : self.scale * w]
