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
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import __version__
from .attention import AttentionRegistry
from .config import EngineConfig
from .devices import DevicePolicy, resolve_policy
from .infotext import build_infotext
from .models import LoadedModel, ModelEntry, ModelRegistry, load_model, load_vae
from .outputs import output_folder, save_image
from .pipeline import images as imgs
from .pipeline.loop import Hooks, InpaintBlend, LoopInputs, denoise
from .pipeline.preview import LatentPreviewer
from .progress import Interrupted, JobContext
from .prompts.encode import PromptEncoder
from .prompts.parser import extract_extra_networks
from .prompts.schedule import PromptSchedule
from .requests import GenerationRequest, Img2ImgRequest, InpaintRequest, RequestError
from .rng import batch_noise, resolve_seed
from .schedulers import SamplerRegistry, default_sampler_registry, img2img_timesteps

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


class Engine:
    """Owns models and runs jobs. Not thread-safe for concurrent `generate` calls: the job queue runs one
    job at a time per engine; model management methods take a lock so the UI can list models meanwhile."""

    def __init__(self, config: EngineConfig, *, samplers: SamplerRegistry | None = None,
                 attention: AttentionRegistry | None = None):
        self.config = config
        self.policy: DevicePolicy = resolve_policy(config)
        self.samplers = samplers or default_sampler_registry()
        self.attention = attention or AttentionRegistry()
        self.attention_choice = self.attention.choose(config.attention, self.policy.device)
        self.models = ModelRegistry(config.ckpt_dirs, config.vae_dirs, config.builtin_model_dir)
        self.hooks_factories: list[Any] = []  # extensions: callables (engine, request, model) -> Hooks parts
        self._cache: OrderedDict[Path, _Placed] = OrderedDict()
        self._vae_cache: OrderedDict[Path, Any] = OrderedDict()
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
        self.models.refresh()

    def _place(self, model: LoadedModel) -> LoadedModel:
        dev, p = self.policy.device, self.policy
        offload = self.config.offload
        for name in ("text_encoder", "text_encoder_2", "unet"):
            mod = getattr(model, name, None)
            if mod is not None:
                mod.to(dtype=p.dtype)
                mod.eval().requires_grad_(False)
                if offload == "none":
                    mod.to(dev)
        model.vae.to(dtype=p.vae_dtype).eval().requires_grad_(False)
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
            while len(self._cache) >= max(1, self.config.model_cache_size):
                self._cache.popitem(last=False)
                self._free_memory()
            t0 = time.perf_counter()
            model = self._place(load_model(entry, dtype=torch.float32, allow_pickle=self.config.allow_pickle))
            vae_cfg = model.vae.config
            previewer = LatentPreviewer(model.vae, vae_cfg.scaling_factor, getattr(vae_cfg, "shift_factor", 0) or 0)
            self._cache[entry.path] = _Placed(model, previewer)
            self._current = entry.path
            log.info("loaded %s (%s) in %.1fs on %s, %s, attention %s", entry.title, model.kind.family,
                     time.perf_counter() - t0, self.policy.device, self.policy.dtype, self.attention_choice.name)
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
        if entry.path not in self._vae_cache:
            self._vae_cache.clear()
            vae = load_vae(entry, dtype=self.policy.vae_dtype, allow_pickle=self.config.allow_pickle)
            vae.to(self.policy.device).eval().requires_grad_(False)
            self.attention.apply(vae, self.attention_choice.name)
            self._vae_cache[entry.path] = vae
        return self._vae_cache[entry.path], entry

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
        with self._lock:
            model = self.load_checkpoint(request.model)
            placed = self._cache[self._current]
        info, schedule_type = self.samplers.resolve(request.sampler_name, request.scheduler)
        native = model.native_size
        width = request.width or native
        height = request.height or native
        is_img2img = isinstance(request, Img2ImgRequest)
        vae, vae_entry = self._vae_for(request, model)
        previewer = placed.previewer if vae is model.vae else LatentPreviewer(vae, vae.config.scaling_factor)

        seed = resolve_seed(request.seed)
        subseed = resolve_seed(request.subseed) if request.subseed_strength > 0 else -1
        prompt, networks = extract_extra_networks(request.prompt)
        negative, _ = extract_extra_networks(request.negative_prompt)
        if networks:
            log.info("extra networks in prompt are not applied yet: %s", networks)

        result = GenerationResult(width=width, height=height, sampler_name=info.name,
                                  schedule_type=schedule_type, model_name=model.entry.name)
        encoder = PromptEncoder(model, clip_skip=request.clip_skip, emphasis=request.emphasis)
        hooks = Hooks()
        for factory in self.hooks_factories:
            part = factory(self, request, model)
            if part is not None:
                hooks.unet_inputs.extend(part.unet_inputs)
                hooks.cfg.extend(part.cfg)

        ctx.progress.update(job_no=0, job_count=request.n_iter, step=0, steps=request.steps,
                            started_at=time.monotonic(), textinfo="")
        for n in range(request.n_iter):
            ctx.cancel.clear_skip()
            if ctx.cancel.interrupted:
                break
            seeds = [seed + n * request.batch_size + i for i in range(request.batch_size)]
            subseeds = [subseed + n * request.batch_size + i for i in range(request.batch_size)] \
                if subseed >= 0 else []
            ctx.progress.update(job_no=n, step=0)
            batch_imgs, stopped = self._run_batch(
                request, model, vae, previewer, encoder, hooks, ctx, prompt, negative, width, height,
                seeds, subseeds, schedule_type, info.name,
            )
            for i, im in enumerate(batch_imgs):
                params = self._infotext_params(request, model, vae_entry, info.name, schedule_type,
                                               seeds[i], subseeds[i] if subseeds else None, width, height)
                text = build_infotext(request.prompt, request.negative_prompt, params)
                manifest = self._manifest(request, model, vae_entry, schedule_type, info.name, seeds[i],
                                          subseeds[i] if subseeds else None, width, height)
                result.images.append(im)
                result.infotexts.append(text)
                result.seeds.append(seeds[i])
                result.subseeds.append(subseeds[i] if subseeds else -1)
                result.manifests.append(manifest)
                if request.save_images and self.config.save_images:
                    folder = output_folder(self.config.outputs_dir, request.mode)
                    result.paths.append(save_image(im, folder, infotext=text, manifest=manifest, seed=seeds[i],
                                                   pattern=self.config.filename_pattern))
            if stopped is not None:
                if stopped.skipped:
                    result.skipped_batches += 1
                else:
                    result.interrupted = True
                    break
        ctx.progress.update(job_no=request.n_iter, step=0, interrupted=result.interrupted)
        return result

    def _run_batch(self, request, model, vae, previewer, encoder, hooks, ctx, prompt, negative, width,
                   height, seeds, subseeds, schedule_type, sampler_name):
        """Denoise and decode one batch of images; returns (images, Interrupted or None)."""
        dev = self.policy.device
        factor = model.vae_scale_factor
        lat_c = vae.config.latent_channels
        lh, lw = height // factor, width // factor
        resize_from = None
        if request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0:
            resize_from = (request.seed_resize_from_h // factor, request.seed_resize_from_w // factor)
        noise, gens = batch_noise((lat_c, lh, lw), seeds, subseeds=subseeds or None,
                                  subseed_strength=request.subseed_strength, resize_from=resize_from)
        noise = noise.to(dev)
        sched = self.samplers.create(
            sampler_name, schedule_type, dict(model.scheduler_config), eta=request.eta, s_churn=request.s_churn,
            s_tmin=request.s_tmin, s_tmax=request.s_tmax, s_noise=request.s_noise,
        )
        scaling = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        b = len(seeds)

        init_latents = blend = unet_concat = None
        original = mask_img = box = None
        if isinstance(request, Img2ImgRequest):
            original = request.init_images[0]
            work = original
            if isinstance(request, InpaintRequest):
                mask_img = imgs.prepare_mask(request.mask, invert=request.inpainting_mask_invert,
                                             blur=request.mask_blur)
                if request.inpaint_full_res:
                    box = imgs.masked_region(mask_img, request.inpaint_full_res_padding, width, height)
                    if box is not None:
                        work = original.crop(box)
            pixel_mode = "Just resize" if request.resize_mode == "Just resize (latent upscale)" else request.resize_mode
            if box is not None:
                pixel_mode = "Just resize"
            work_rs = imgs.resize_image(work, width, height, pixel_mode)
            work_mask = None
            if mask_img is not None:
                m = mask_img.crop(box) if box is not None else mask_img
                if box is None and pixel_mode != "Just resize":
                    m = imgs.resize_image(m.convert("RGB"), width, height, pixel_mode).convert("L")
                work_mask = m.resize((width, height), Image.LANCZOS)
                if request.inpainting_fill == "fill":
                    work_rs = imgs.fill_masked(work_rs, work_mask)
            with self._on_device(vae):
                pix = imgs.pil_to_tensor(work_rs).to(dev, next(vae.parameters()).dtype)
                z = vae.encode(pix).latent_dist.mode().float()
            init_latents = ((z - shift) * scaling).repeat(b, 1, 1, 1)
            if work_mask is not None:
                lmask = imgs.mask_to_latent(work_mask, (lh, lw)).to(dev).repeat(b, 1, 1, 1)
                if request.inpainting_fill == "latent noise":
                    init_latents = init_latents * (1 - lmask) + noise * lmask
                elif request.inpainting_fill == "latent nothing":
                    init_latents = init_latents * (1 - lmask)
                if model.kind.inpaint:
                    masked = pix * (imgs.pil_to_tensor(work_mask.convert("RGB")).to(pix) < 0)
                    with self._on_device(vae):
                        mz = vae.encode(masked).latent_dist.mode().float()
                    mz = ((mz - shift) * scaling).repeat(b, 1, 1, 1)
                    hard = (lmask > 0.5).float()
                    unet_concat = torch.cat([hard, mz], dim=1)
                else:
                    blend = InpaintBlend(init_latents, noise, lmask)
            strength = request.denoising_strength
        elif model.kind.inpaint:
            # txt2img on an inpainting model: everything is masked, nothing known
            unet_concat = torch.cat([torch.ones(b, 1, lh, lw, device=dev), torch.zeros(b, lat_c, lh, lw, device=dev)],
                                    dim=1)

        if init_latents is None:
            sched.set_timesteps(request.steps, device=dev)
            timesteps = sched.timesteps
            latents = noise * sched.init_noise_sigma
        else:
            sched.set_timesteps(request.steps, device=dev)
            timesteps = img2img_timesteps(sched, request.steps, strength, dev)
            if len(timesteps):
                latents = sched.add_noise(init_latents, noise, timesteps[:1].repeat(b))
            else:
                latents = init_latents

        schedule = PromptSchedule(encoder, prompt, negative, max(1, len(timesteps)))
        added = None
        if model.kind.family == "sdxl":
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=dev)

            def added(_unused, pooled):
                return {"text_embeds": torch.cat(pooled), "time_ids": time_ids.repeat(len(pooled), 1)}

        def conditioning(i):
            return schedule.at(i)

        if request.cfg_scale == 1.0:
            def conditioning(i):  # noqa: F811 (no unconditional pass needed without guidance)
                _, conds = schedule.at(i)
                return None, conds

        every = max(0, self.config.preview_every)

        def on_step(done, total, denoised):
            upd = {"step": done, "steps": total}
            if every and (done % every == 0 or done == total):
                try:
                    upd["preview"] = previewer(denoised)
                    upd["preview_step"] = done
                except Exception as exc:  # a preview must never fail the job
                    log.debug("preview failed: %s", exc)
            ctx.progress.update(**upd)

        with self._on_device(model.text_encoder, model.text_encoder_2):
            schedule.at(0)  # encode up front so text encoders can go back to the CPU
            for i in range(1, len(timesteps)):
                schedule.at(i)
        ctx.progress.update(steps=len(timesteps))
        loop_in = LoopInputs(latents=latents, timesteps=timesteps, scheduler=sched, conditioning=conditioning,
                             cfg_scale=request.cfg_scale, generators=gens, added_cond_kwargs=added,
                             unet_concat=unet_concat, inpaint=blend)
        with self._on_device(model.unet), torch.inference_mode():
            res = denoise(model.unet, loop_in, hooks=hooks, cancel=ctx.cancel, on_step=on_step)
        with self._on_device(vae):
            decoded = self.decode(vae, res.latents)
        out = decoded
        if original is not None and mask_img is not None:
            out = [imgs.paste_back(original, im, mask_img, box) for im in decoded]
        return out, res.stopped

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
            p["Mask blur"] = request.mask_blur
            if request.inpaint_full_res:
                p["Inpaint area"] = "Only masked"
                p["Masked area padding"] = request.inpaint_full_res_padding
            p["Masked content"] = request.inpainting_fill
            if request.inpainting_mask_invert:
                p["Mask mode"] = "Inpaint not masked"
        if request.emphasis != "Original":
            p["Emphasis"] = request.emphasis
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
            "model": {"name": model.entry.name, "sha256": model.sha256, "family": model.kind.family,
                      "inpaint": model.kind.inpaint, "prediction_type": model.kind.prediction_type},
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


def _num(v: float) -> int | float:
    """7.0 -> 7, as A1111 writes whole numbers."""
    return int(v) if float(v).is_integer() else round(float(v), 4)
