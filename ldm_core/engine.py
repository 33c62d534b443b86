"""The engine: one object per process that owns the loaded models and turns validated requests into images.

`Engine.generate(request, ctx)` is the single entry point for txt2img, img2img and inpaint (the request's type
says which); it resolves the model, sampler and prompt schedule, prepares latents, runs the one denoising loop
(`pipeline.loop.denoise`), decodes, writes infotext and manifest, and saves. Model switching, the LRU cache and
device placement live here too. The engine knows nothing of Gradio or HTTP.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import platform
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import __version__
from .attention import AttentionRegistry
from .config import EngineConfig
from .devices import DevicePolicy, resolve_policy
from .infotext import build_infotext
from .models import HashCache, LoadedModel, ModelEntry, ModelRegistry, load_model, load_vae
from .outputs import output_folder, save_image
from .pipeline import images as imgs
from .pipeline.loop import Hooks, InpaintBlend, LoopInputs, denoise
from .pipeline.preview import LatentPreviewer
from .progress import JobContext
from .prompts.embeddings import EmbeddingLibrary
from .prompts.encode import PromptEncoder
from .prompts.networks import NetworkLibrary
from .prompts.parser import extract_extra_networks
from .prompts.schedule import PromptSchedule
from .prompts.styles import StyleStore
from .requests import GenerationRequest, Img2ImgRequest, InpaintRequest, RequestError
from .rng import batch_noise, resolve_seed
from .schedulers import SamplerRegistry, default_sampler_registry, img2img_timesteps
from .upscalers import UpscalerRegistry, is_latent_mode, latent_modes, upscale_latents

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """Images of one job with their infotexts, seeds, saved paths and reproducibility manifests."""

    images: list[Image.Image] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    subseeds: list[int] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    manifests: list[dict] = field(default_factory=list)
    interrupted: bool = False
    skipped_batches: int = 0
    width: int = 0
    height: int = 0
    sampler_name: str = ""
    schedule_type: str = ""
    model_name: str = ""

    def info(self, request: GenerationRequest) -> dict[str, Any]:
        """A1111's `info` object (the API returns it as a JSON string)."""
        return {
            "prompt": request.prompt,
            "all_prompts": [request.prompt] * len(self.images),
            "negative_prompt": request.negative_prompt,
            "all_negative_prompts": [request.negative_prompt] * len(self.images),
            "seed": self.seeds[0] if self.seeds else -1,
            "all_seeds": self.seeds,
            "subseed": self.subseeds[0] if self.subseeds else -1,
            "all_subseeds": self.subseeds,
            "subseed_strength": request.subseed_strength,
            "width": self.width,
            "height": self.height,
            "sampler_name": self.sampler_name,
            "scheduler": self.schedule_type,
            "cfg_scale": request.cfg_scale,
            "steps": request.steps,
            "batch_size": request.batch_size,
            "sd_model_name": self.model_name,
            "denoising_strength": getattr(request, "denoising_strength", None),
            "clip_skip": request.clip_skip,
            "infotexts": self.infotexts,
            "styles": request.styles,
            "interrupted": self.interrupted,
            "version": __version__,
        }


@dataclass
class _Placed:
    """A LoadedModel as placed on the engine's device, with its previewer."""

    model: LoadedModel
    previewer: LatentPreviewer


@dataclass
class _JobState:
    """What every pass of one job shares."""

    request: GenerationRequest
    model: LoadedModel
    vae: Any
    previewer: LatentPreviewer
    hooks: Hooks
    ctx: JobContext
    encoder: PromptEncoder
    prompt: str
    negative: str
    width: int
    height: int
    sampler: str
    schedule_type: str
    hires: dict | None


class Engine:
    """Owns models and runs jobs. Not thread-safe for concurrent `generate` calls: the job queue runs one
    job at a time per engine; model management methods take a lock so the UI can list models meanwhile."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        samplers: SamplerRegistry | None = None,
        attention: AttentionRegistry | None = None,
    ):
        self.config = config
        self.policy: DevicePolicy = resolve_policy(config)
        self.samplers = samplers or default_sampler_registry()
        self.attention = attention or AttentionRegistry()
        self.attention_choice = self.attention.choose(config.attention, self.policy.device)
        self.hash_cache = HashCache(config.data_dir / "cache" / "hashes.json")
        self.models = ModelRegistry(
            config.ckpt_dirs, config.vae_dirs, config.builtin_model_dir, hash_cache=self.hash_cache
        )
        self.networks = NetworkLibrary(config.lora_dirs, allow_pickle=config.allow_pickle, hash_cache=self.hash_cache)
        self.embeddings = EmbeddingLibrary(
            config.embeddings_dirs, allow_pickle=config.allow_pickle, hash_cache=self.hash_cache
        )
        self.upscalers = UpscalerRegistry(
            list(config.upscaler_dirs),
            device=self.policy.device,
            dtype=self.policy.dtype,
            allow_pickle=config.allow_pickle,
        )
        self.styles = StyleStore(config.data_dir / "styles.csv")
        self.hooks_factories: list[Any] = []  # extensions: callables (engine, request, model) -> Hooks parts
        self.infotext_providers: list[Any] = []  # extensions: (request, model) -> {infotext key: value}
        self.postprocessors: list[Any] = []  # extensions: (request, images, engine, model) -> images
        self._cache: OrderedDict[Path, _Placed] = OrderedDict()
        self._vae_cache: OrderedDict[tuple, Any] = OrderedDict()
        self._current: Path | None = None
        self._lock = threading.RLock()

    # ---- models -------------------------------------------------------------------------------------
    @property
    def current_model(self) -> LoadedModel | None:
        with self._lock:
            return self._cache[self._current].model if self._current in self._cache else None

    def current_model_entry(self) -> ModelEntry | None:
        m = self.current_model
        if m is not None:
            return m.entry
        return self.models.default_checkpoint()

    def refresh_models(self) -> None:
        """Rescan checkpoints, VAEs, LoRAs, embeddings and upscalers."""
        self.models.refresh()
        self.networks.refresh()
        self.embeddings.refresh()
        self.upscalers.refresh()

    def _place(self, model: LoadedModel) -> LoadedModel:
        dev, p = self.policy.device, self.policy
        offload = self.config.offload
        for name in ("text_encoder", "text_encoder_2", "unet"):
            mod = getattr(model, name, None)
            if mod is not None:
                if mod.dtype != p.dtype:
                    mod.to(dtype=p.dtype)
                mod.eval().requires_grad_(False)
                if offload == "none":
                    mod.to(dev)
        if model.vae.dtype != p.vae_dtype:
            model.vae.to(dtype=p.vae_dtype)
        model.vae.eval().requires_grad_(False)
        if offload == "none":
            model.vae.to(dev)
        if p.channels_last:
            model.unet.to(memory_format=torch.channels_last)
        self.attention.apply(model.unet, self.attention_choice.name)
        self.attention.apply(model.vae, self.attention_choice.name)
        if self.config.vae_tiling:
            model.vae.enable_tiling()
        if self.config.vae_slicing:
            model.vae.enable_slicing()
        if offload == "sequential":
            from accelerate import cpu_offload

            for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
                mod = getattr(model, name, None)
                if mod is not None:
                    cpu_offload(mod, execution_device=dev)
        return model

    def load_checkpoint(self, name: str | None = None) -> LoadedModel:
        """Make `name` (a title, name or short hash; None = current or default) the current model."""
        with self._lock:
            if name is None:
                entry = self.current_model_entry()
                if entry is None:
                    raise RequestError("model", "no model found: put a checkpoint in models/Stable-diffusion")
            else:
                try:
                    entry = self.models.find_checkpoint(name)
                except KeyError as exc:
                    raise RequestError("model", str(exc.args[0] if exc.args else exc)) from None
            if entry.path in self._cache:
                self._cache.move_to_end(entry.path)
                self._current = entry.path
                return self._cache[entry.path].model
            t0 = time.perf_counter()
            model = self._place(load_model(entry, dtype=torch.float32, allow_pickle=self.config.allow_pickle))
            while len(self._cache) >= max(1, self.config.model_cache_size):
                self._cache.popitem(last=False)
                self._free_memory()
            vae_cfg = model.vae.config
            previewer = LatentPreviewer(model.vae, vae_cfg.scaling_factor, getattr(vae_cfg, "shift_factor", 0) or 0)
            self._cache[entry.path] = _Placed(model, previewer)
            self._current = entry.path
            log.info(
                "loaded %s (%s) in %.1fs on %s, %s, attention %s",
                entry.title,
                model.kind.family,
                time.perf_counter() - t0,
                self.policy.device,
                self.policy.dtype,
                self.attention_choice.name,
            )
            return model

    def unload(self) -> None:
        """Drop every loaded model (the next job loads its model again)."""
        with self._lock:
            self._cache.clear()
            self._vae_cache.clear()
            self._current = None
            self._free_memory()

    def _free_memory(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _vae_for(self, request: GenerationRequest, model: LoadedModel) -> tuple[Any, ModelEntry | None]:
        if not request.vae or request.vae in ("Automatic", "None"):
            return model.vae, None
        try:
            entry = self.models.find_vae(request.vae)
        except KeyError as exc:
            raise RequestError("vae", str(exc.args[0] if exc.args else exc)) from None
        key = (entry.path, model.vae.config.scaling_factor)
        if key not in self._vae_cache:
            self._vae_cache.clear()
            vae = load_vae(
                entry,
                dtype=self.policy.vae_dtype,
                allow_pickle=self.config.allow_pickle,
                scaling_factor=model.vae.config.scaling_factor,
            )
            vae.to(self.policy.device).eval().requires_grad_(False)
            self.attention.apply(vae, self.attention_choice.name)
            self._vae_cache[key] = vae
        return self._vae_cache[key], entry

    @contextlib.contextmanager
    def _on_device(self, *modules):
        """With model CPU offload, move modules to the device for the duration of the block."""
        if self.config.offload != "model":
            yield
            return
        for m in modules:
            if m is not None:
                m.to(self.policy.device)
        try:
            yield
        finally:
            for m in modules:
                if m is not None:
                    m.to("cpu")
            self._free_memory()

    # ---- generation ---------------------------------------------------------------------------------
    def generate(self, request: GenerationRequest, ctx: JobContext | None = None) -> GenerationResult:
        """Run one txt2img / img2img / inpaint job to completion (or interruption)."""
        ctx = ctx or JobContext()
        if request.styles:
            p, n = self.styles.apply_styles(request.prompt, request.negative_prompt, request.styles)
            request = request.model_copy(update={"prompt": p, "negative_prompt": n})
        with self._lock:
            model = self.load_checkpoint(request.model)
            placed = self._cache[self._current]
        info, schedule_type = self.samplers.resolve(request.sampler_name, request.scheduler)
        hires = None
        if request.enable_hr and request.mode == "txt2img":
            hires = self._resolve_hires(request, info.name, schedule_type)
        native = model.native_size
        width = request.width or native
        height = request.height or native
        vae, vae_entry = self._vae_for(request, model)
        previewer = placed.previewer if vae is model.vae else LatentPreviewer(vae, vae.config.scaling_factor)

        seed = resolve_seed(request.seed)
        subseed = resolve_seed(request.subseed) if request.subseed_strength > 0 else -1
        prompt, networks = extract_extra_networks(request.prompt)
        negative, _ = extract_extra_networks(request.negative_prompt)
        hooks = Hooks()
        for factory in self.hooks_factories:
            part = factory(self, request, model)
            if part is not None:
                hooks.unet_inputs.extend(part.unet_inputs)
                hooks.cfg.extend(part.cfg)
        final_w, final_h = (hires["width"], hires["height"]) if hires else (width, height)
        result = GenerationResult(
            width=final_w,
            height=final_h,
            sampler_name=info.name,
            schedule_type=schedule_type,
            model_name=model.entry.name,
        )
        ctx.progress.update(
            job_no=0,
            job_count=request.n_iter,
            step=0,
            steps=request.steps,
            started_at=time.monotonic(),
            textinfo="",
        )
        with self.networks.applied(model, networks) as lora_params:
            encoder = PromptEncoder(
                model, clip_skip=request.clip_skip, emphasis=request.emphasis, embeddings=self.embeddings
            )
            job = _JobState(
                request,
                model,
                vae,
                previewer,
                hooks,
                ctx,
                encoder,
                prompt,
                negative,
                width,
                height,
                info.name,
                schedule_type,
                hires,
            )
            for n in range(request.n_iter):
                ctx.cancel.clear_skip()
                if ctx.cancel.interrupted:
                    break
                seeds = [seed + n * request.batch_size + i for i in range(request.batch_size)]
                subseeds = (
                    [subseed + n * request.batch_size + i for i in range(request.batch_size)] if subseed >= 0 else []
                )
                ctx.progress.update(job_no=n, step=0)
                batch_imgs, stopped = self._run_batch(job, seeds, subseeds)
                for post in self.postprocessors:
                    batch_imgs = post(request, batch_imgs, self, model)
                extra = {**(hires["params"] if hires else {}), **lora_params, **encoder.infotext_params()}
                for i, im in enumerate(batch_imgs):
                    sub = subseeds[i] if subseeds else None
                    params = self._infotext_params(
                        request, model, vae_entry, info.name, schedule_type, seeds[i], sub, width, height
                    )
                    params = {**params, **extra}
                    params["Version"] = params.pop("Version")
                    text = build_infotext(request.prompt, request.negative_prompt, params)
                    manifest = self._manifest(
                        request, model, vae_entry, schedule_type, info.name, seeds[i], sub, width, height
                    )
                    result.images.append(im)
                    result.infotexts.append(text)
                    result.seeds.append(seeds[i])
                    result.subseeds.append(sub if sub is not None else -1)
                    result.manifests.append(manifest)
                    if request.save_images and self.config.save_images:
                        folder = output_folder(self.config.outputs_dir, request.mode)
                        result.paths.append(
                            save_image(
                                im,
                                folder,
                                infotext=text,
                                manifest=manifest,
                                seed=seeds[i],
                                pattern=self.config.filename_pattern,
                                model_name=model.entry.name,
                                prompt=request.prompt,
                            )
                        )
                if stopped is not None:
                    if stopped.skipped:
                        result.skipped_batches += 1
                    else:
                        result.interrupted = True
                        break
        ctx.progress.update(job_no=request.n_iter, step=0, interrupted=result.interrupted)
        return result

    def _resolve_hires(self, request: GenerationRequest, sampler: str, schedule_type: str) -> dict:
        """Check the hires-fix settings up front and work out its target size and infotext keys."""
        w0 = request.width or 0
        h0 = request.height or 0
        if not w0 or not h0:
            native = self.current_model.native_size
            w0, h0 = w0 or native, h0 or native
        rx, ry = request.hr_resize_x, request.hr_resize_y
        if rx or ry:
            tw = rx or round(ry * w0 / h0)
            th = ry or round(rx * h0 / w0)
        else:
            tw, th = w0 * request.hr_scale, h0 * request.hr_scale
        tw, th = max(64, int(tw) // 8 * 8), max(64, int(th) // 8 * 8)
        if tw * th > 2048 * 2048:
            raise RequestError("hr_scale", f"hires size {tw}x{th} is too large (at most 2048x2048 pixels)")
        up = request.hr_upscaler or "Latent"
        if not is_latent_mode(up) and up not in self.upscalers.names():
            raise RequestError(
                "hr_upscaler",
                f"unknown upscaler {up!r}; choose one of: " + ", ".join(latent_modes() + self.upscalers.names()),
            )
        hr_sampler, hr_sched = sampler, schedule_type
        if request.hr_sampler_name and request.hr_sampler_name != "Use same sampler":
            hr_info, hr_sched = self.samplers.resolve(request.hr_sampler_name, request.scheduler)
            hr_sampler = hr_info.name
        params: dict[str, Any] = {"Denoising strength": _num(request.denoising_strength)}
        if rx or ry:
            params["Hires resize"] = f"{tw}x{th}"
        else:
            params["Hires upscale"] = _num(request.hr_scale)
        if request.hr_second_pass_steps:
            params["Hires steps"] = request.hr_second_pass_steps
        params["Hires upscaler"] = up
        if hr_sampler != sampler:
            params["Hires sampler"] = hr_sampler
        if request.hr_prompt and request.hr_prompt != request.prompt:
            params["Hires prompt"] = request.hr_prompt
        if request.hr_negative_prompt and request.hr_negative_prompt != request.negative_prompt:
            params["Hires negative prompt"] = request.hr_negative_prompt
        return {
            "width": tw,
            "height": th,
            "upscaler": up,
            "sampler": hr_sampler,
            "schedule_type": hr_sched,
            "steps": request.hr_second_pass_steps or request.steps,
            "params": params,
        }

    def _encode_images(self, vae, images: list[Image.Image]) -> torch.Tensor:
        """RGB images (same size) -> scaled latents (B,C,h,w) on the engine's device."""
        scaling = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        with self._on_device(vae), torch.inference_mode():
            param = next(vae.parameters())
            pix = torch.cat([imgs.pil_to_tensor(im) for im in images]).to(param.device, param.dtype)
            z = vae.encode(pix).latent_dist.mode().float()
        return ((z - shift) * scaling).to(self.policy.device)

    def _run_batch(self, job: _JobState, seeds: list[int], subseeds: list[int]):
        """Denoise (first pass, then hires fix if asked) and decode one batch; returns (images, Interrupted|None)."""
        request, model, vae = job.request, job.model, job.vae
        dev = self.policy.device
        factor = model.vae_scale_factor
        lat_c = vae.config.latent_channels
        width, height = job.width, job.height
        lh, lw = height // factor, width // factor
        b = len(seeds)
        resize_from = None
        if request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0:
            resize_from = (request.seed_resize_from_h // factor, request.seed_resize_from_w // factor)
        noise, gens = batch_noise(
            (lat_c, lh, lw),
            seeds,
            subseeds=subseeds or None,
            subseed_strength=request.subseed_strength,
            resize_from=resize_from,
        )
        noise = noise.to(dev)

        init_latents = blend = unet_concat = None
        original = mask_img = box = None
        strength = 1.0
        if isinstance(request, Img2ImgRequest):
            strength = request.denoising_strength
            original = request.init_images[0]
            work = original
            if isinstance(request, InpaintRequest):
                mask_img = imgs.prepare_mask(
                    request.mask, invert=request.inpainting_mask_invert, blur=request.mask_blur_xy
                )
                if request.inpaint_full_res:
                    box = imgs.masked_region(mask_img, request.inpaint_full_res_padding, width, height)
                    if box is not None:
                        work = original.crop(box)
            pixel_mode = request.resize_mode if box is None else "Just resize"
            work_rs = imgs.resize_image(work, width, height, pixel_mode)
            work_mask = None
            if mask_img is not None:
                m = mask_img.crop(box) if box is not None else mask_img
                if pixel_mode not in ("Just resize", "Just resize (latent upscale)"):
                    m = imgs.resize_image(m.convert("RGB"), width, height, pixel_mode).convert("L")
                work_mask = m.resize((width, height), Image.LANCZOS)
                if request.inpainting_fill == "fill":
                    work_rs = imgs.fill_masked(work_rs, work_mask)
            init_latents = self._encode_images(vae, [work_rs]).repeat(b, 1, 1, 1)
            if work_mask is not None:
                lmask = imgs.mask_to_latent(work_mask, (lh, lw)).to(dev).repeat(b, 1, 1, 1)
                if request.inpainting_fill == "latent noise":
                    init_latents = init_latents * (1 - lmask) + noise * lmask
                elif request.inpainting_fill == "latent nothing":
                    init_latents = init_latents * (1 - lmask)
                if model.kind.inpaint:
                    keep = np.asarray(work_mask.convert("L")) < 128
                    masked_img = Image.fromarray(np.asarray(work_rs) * keep[..., None].astype(np.uint8))
                    mz = self._encode_images(vae, [masked_img]).repeat(b, 1, 1, 1)
                    unet_concat = torch.cat([(lmask > 0.5).float(), mz], dim=1)
                else:
                    blend = InpaintBlend(init_latents, noise, lmask)

        res = self._denoise_pass(
            job,
            job.sampler,
            job.schedule_type,
            request.steps,
            noise,
            gens,
            init_latents,
            strength,
            job.prompt,
            job.negative,
            unet_concat,
            blend,
        )
        latents, stopped = res.latents, res.stopped
        if job.hires is not None and stopped is None:
            latents, stopped = self._hires_pass(job, latents, seeds)
        with self._on_device(vae):
            out = self.decode(vae, latents)
        if original is not None and mask_img is not None:
            out = [imgs.paste_back(original, im, mask_img, box) for im in out]
        return out, stopped

    def _hires_pass(self, job: _JobState, latents: torch.Tensor, seeds: list[int]):
        """Hires fix: upscale the first pass (in latent space or through an image upscaler), then img2img."""
        hr, request, vae = job.hires, job.request, job.vae
        factor = job.model.vae_scale_factor
        tw, th = hr["width"], hr["height"]
        if is_latent_mode(hr["upscaler"]):
            z = upscale_latents(latents, hr["upscaler"], (th // factor, tw // factor))
        else:
            with self._on_device(vae):
                first = self.decode(vae, latents)
            big = [
                self.upscalers.upscale(im, hr["upscaler"], size=(tw, th), cancel=job.ctx.cancel.check) for im in first
            ]
            z = self._encode_images(vae, big)
        noise, gens = batch_noise((z.shape[1], th // factor, tw // factor), seeds)
        prompt, negative = job.prompt, job.negative
        if request.hr_prompt:
            prompt, _ = extract_extra_networks(request.hr_prompt)
        if request.hr_negative_prompt:
            negative, _ = extract_extra_networks(request.hr_negative_prompt)
        res = self._denoise_pass(
            job,
            hr["sampler"],
            hr["schedule_type"],
            hr["steps"],
            noise.to(z.device),
            gens,
            z,
            request.denoising_strength,
            prompt,
            negative,
            None,
            None,
            size=(tw, th),
        )
        return res.latents, res.stopped

    def _denoise_pass(
        self,
        job: _JobState,
        sampler: str,
        schedule_type: str,
        steps: int,
        noise,
        gens,
        init_latents,
        strength: float,
        prompt: str,
        negative: str,
        unet_concat,
        blend,
        size: tuple[int, int] | None = None,
    ):
        """One run of the denoising loop from noise (txt2img) or from noised init latents (img2img)."""
        request, model, ctx = job.request, job.model, job.ctx
        dev = self.policy.device
        width, height = size or (job.width, job.height)
        b = noise.shape[0]
        sched = self.samplers.create(
            sampler,
            schedule_type,
            dict(model.scheduler_config),
            eta=request.eta,
            s_churn=request.s_churn,
            s_tmin=request.s_tmin,
            s_tmax=request.s_tmax,
            s_noise=request.s_noise,
            model_family=model.kind.family,
        )
        sched.set_timesteps(steps, device=dev)
        if init_latents is None:
            timesteps = sched.timesteps
            latents = noise * sched.init_noise_sigma
            user_steps = steps
        else:
            timesteps = img2img_timesteps(sched, steps, strength, dev)
            latents = sched.add_noise(init_latents, noise, timesteps[:1].repeat(b)) if len(timesteps) else init_latents
            user_steps = max(1, int(steps * strength))
        if unet_concat is None and model.kind.inpaint:
            # an inpainting model outside inpainting: everything masked, nothing known
            lat_c = noise.shape[1]
            unet_concat = torch.cat(
                [
                    torch.ones(b, 1, *noise.shape[-2:], device=dev),
                    torch.zeros(b, lat_c, *noise.shape[-2:], device=dev),
                ],
                dim=1,
            )
        # prompt editing counts user steps; multi-evaluation samplers run more model calls than steps
        n_evals = max(1, len(timesteps))
        schedule = PromptSchedule(job.encoder, prompt, negative, user_steps)

        def step_of(i: int) -> int:
            return min(user_steps - 1, i * user_steps // n_evals)

        added = None
        if model.kind.family == "sdxl":
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=dev)

            def added(_unused, pooled):
                return {"text_embeds": torch.cat(pooled), "time_ids": time_ids.repeat(len(pooled), 1)}

        def conditioning(i):
            uncond, conds = schedule.at(step_of(i))
            return (None if request.cfg_scale == 1.0 else uncond), conds

        every = max(0, self.config.preview_every)

        def on_step(done, total, denoised):
            upd = {"step": done, "steps": total}
            if every and (done % every == 0 or done == total):
                try:
                    upd["preview"] = job.previewer(denoised)
                    upd["preview_step"] = done
                except Exception as exc:  # a preview must never fail the job
                    log.debug("preview failed: %s", exc)
            ctx.progress.update(**upd)

        with self._on_device(model.text_encoder, model.text_encoder_2):
            for i in range(user_steps):  # encode up front so text encoders can go back to the CPU
                schedule.at(i)
        ctx.progress.update(step=0, steps=len(timesteps))
        loop_in = LoopInputs(
            latents=latents,
            timesteps=timesteps,
            scheduler=sched,
            conditioning=conditioning,
            cfg_scale=request.cfg_scale,
            generators=gens,
            added_cond_kwargs=added,
            unet_concat=unet_concat,
            inpaint=blend,
        )
        with self._on_device(model.unet), torch.inference_mode():
            return denoise(model.unet, loop_in, hooks=job.hooks, cancel=ctx.cancel, on_step=on_step)

    @torch.inference_mode()
    def decode(self, vae, latents: torch.Tensor) -> list[Image.Image]:
        """Latents (scaled) -> images; retries in fp32 when a reduced-precision decode gives NaNs."""
        scaling = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = latents / scaling + shift
        dtype = next(vae.parameters()).dtype
        x = vae.decode(z.to(dtype)).sample
        if not torch.isfinite(x).all() and dtype != torch.float32:
            log.warning("VAE decode in %s produced NaNs; retrying in fp32", dtype)
            vae.to(torch.float32)
            try:
                x = vae.decode(z.float()).sample
            finally:
                vae.to(dtype)
        return imgs.tensor_to_pil(x)

    # ---- infotext ------------------------------------------------------------------------------------
    def _infotext_params(self, request, model, vae_entry, sampler, schedule_type, seed, subseed, w, h):
        p: dict[str, Any] = {
            "Steps": request.steps,
            "Sampler": sampler,
            "Schedule type": schedule_type,
            "CFG scale": _num(request.cfg_scale),
            "Seed": seed,
            "Size": f"{w}x{h}",
            "Model hash": model.sha256[:10],
            "Model": model.entry.name,
        }
        if vae_entry is not None:
            p["VAE hash"] = vae_entry.sha256[:10]
            p["VAE"] = vae_entry.name
        if subseed is not None:
            p["Variation seed"] = subseed
            p["Variation seed strength"] = _num(request.subseed_strength)
        if request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0:
            p["Seed resize from"] = f"{request.seed_resize_from_w}x{request.seed_resize_from_h}"
        if isinstance(request, Img2ImgRequest):
            p["Denoising strength"] = _num(request.denoising_strength)
        if request.clip_skip > 1:
            p["Clip skip"] = request.clip_skip
        if request.eta is not None:
            p["Eta"] = _num(request.eta)
        if isinstance(request, InpaintRequest):
            bx, by = request.mask_blur_xy
            if bx == by:
                p["Mask blur"] = bx
            else:  # A1111 has no key for this; these read back into mask_blur_x / mask_blur_y
                p["Mask blur x"] = bx
                p["Mask blur y"] = by
            if request.inpaint_full_res:
                p["Inpaint area"] = "Only masked"
                p["Masked area padding"] = request.inpaint_full_res_padding
            p["Masked content"] = request.inpainting_fill
            if request.inpainting_mask_invert:
                p["Mask mode"] = "Inpaint not masked"
        if request.emphasis != "Original":
            p["Emphasis"] = request.emphasis
        for provider in self.infotext_providers:
            p.update(provider(request, model) or {})
        p["Version"] = f"ldm_core-{__version__}"
        return p

    def _manifest(self, request, model, vae_entry, schedule_type, sampler, seed, subseed, w, h) -> dict:
        import diffusers
        import transformers

        sched_cfg = dict(model.scheduler_config)
        return {
            "ldm_core": __version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "mode": request.mode,
            "model": {
                "name": model.entry.name,
                "sha256": model.sha256,
                "family": model.kind.family,
                "inpaint": model.kind.inpaint,
                "prediction_type": model.kind.prediction_type,
            },
            "vae": None if vae_entry is None else {"name": vae_entry.name, "sha256": vae_entry.sha256},
            "sampler": sampler,
            "schedule_type": schedule_type,
            "scheduler_config": {k: v for k, v in sched_cfg.items() if not k.startswith("_")},
            "dtype": str(self.policy.dtype).replace("torch.", ""),
            "vae_dtype": str(self.policy.vae_dtype).replace("torch.", ""),
            "attention": self.attention_choice.name,
            "device": self.policy.name,
            "seed": seed,
            "subseed": subseed,
            "subseed_strength": request.subseed_strength,
            "noise": "cpu" if self.config.cpu_noise else "device",
            "size": [w, h],
            "steps": request.steps,
            "cfg_scale": request.cfg_scale,
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
        }


@contextlib.contextmanager
def scratch_engine(model: str | Path, **config: Any) -> Iterator[tuple[Engine, LoadedModel]]:
    """An engine over one model (a diffusers folder or a single file) in a throw-away data folder, with that
    model loaded and nothing saved: what evaluations and benchmarks run through, so they measure the path
    users take. `config` overrides EngineConfig fields (device, lora_dirs, controlnet_dirs, ...)."""
    model = Path(model)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = EngineConfig.from_data_dir(
            tmp,
            ckpt_dirs=(model.parent,),
            builtin_model_dir=None,
            save_images=False,
            preview_every=0,
            **config,
        )
        engine = Engine(cfg)
        yield engine, engine.load_checkpoint(model.name)


def _num(v: float) -> int | float:
    """7.0 -> 7, as A1111 writes whole numbers."""
    return int(v) if float(v).is_integer() else round(float(v), 4)
