"""The engine: one object per process that owns the loaded models and turns validated requests into images.

`Engine.generate(request, ctx)` is the single entry point for txt2img, img2img and inpaint (the request's type
says which); it resolves the model, sampler and prompt schedule, prepares latents, runs the one denoising loop
(`pipeline.loop.denoise`), decodes, writes infotext and manifest, and saves. Model switching, the LRU cache and
device placement live here too. The engine knows nothing of Gradio or HTTP.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import tempfile
import threading
import time
import weakref
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
from .compiled import Compiler, compile_enabled
from .config import EngineConfig
from .devices import DevicePolicy, enable_fast_cuda_kernels, execution_device, resolve_policy, vae_dtype_for
from .generation_requests import (
    DEFAULT_SAMPLER,
    MIN_SIDE,
    GenerationRequest,
    Img2ImgRequest,
    InpaintRequest,
    RequestError,
    sampling_choice,
)
from .infotext import build_infotext, infotext_number
from .memory import FaultHook, JobMemoryPlan, free_memory, run_with_fallbacks
from .models import HashCache, LoadedModel, ModelEntry, ModelRegistry, load_model, load_vae
from .models.detect import SDXL_FAMILIES
from .models.geometry import (
    SD_VAE_FACTOR,
    checkpoint_vae_factor,
    latent_normalisation,
    round_down,
    vae_scale_factor,
)
from .models.sidecar import SidecarError, read_sidecar
from .outputs import output_folder, save_image
from .pipeline import images as imgs
from .pipeline.loop import Hooks, InpaintBlend, LoopInputs, ModelSwitch, denoise
from .pipeline.preview import LatentPreviewer
from .progress import Interrupted, JobContext, PreviewSource
from .prompts.embeddings import EmbeddingLibrary
from .prompts.encode import PromptEncoder
from .prompts.networks import NetworkLibrary
from .prompts.parser import extract_extra_networks
from .prompts.schedule import PromptSchedule
from .prompts.styles import StyleStore
from .prompts.time_ids import sdxl_added_cond
from .rng import batch_noise, resolve_seed, wrap_seed
from .samplers.sigmas import NoiseLevels, alphas_cumprod_from_config
from .schedulers import SamplerInfo, SamplerRegistry, default_sampler_registry, img2img_steps, img2img_timesteps
from .seamless import circular_padding
from .upscalers import UpscalerRegistry, is_latent_mode, upscale_latents
from .video import free_init
from .video.clips import decode_clip
from .video.job import ClipFile, VideoPlan, blend_image_to_video, plan_video, write_clips
from .video.motion_modules import MotionModules, motion_patch
from .video.prompt_travel import TravelSchedule, parse_travel
from .video.svd import SVDModel

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
    notes: list[str] = field(default_factory=list)  # what was asked but not done (A1111's "comments")
    warnings: list[str] = field(default_factory=list)  # what was done otherwise than asked (fallbacks)
    videos: list[ClipFile] = field(default_factory=list)  # a video job's clip files (ldm_core.video)

    def info(self, request: GenerationRequest) -> dict[str, Any]:
        """A1111's `info` object (the API returns it as a JSON string); `warnings` only when there are some."""
        out = {
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
            "restore_faces": bool(request.restore_faces),
            "face_restoration_model": None,
            "comments": "".join(f"{note}\n" for note in self.notes),
            "version": __version__,
        }
        if self.warnings:
            out["warnings"] = list(self.warnings)
        if self.videos:
            out["videos"] = [{"format": v.format, "path": str(v.path) if v.path else None} for v in self.videos]
        return out


@dataclass
class _Placed:
    """A LoadedModel as placed on the engine's device, with its previewer."""

    model: LoadedModel
    previewer: LatentPreviewer


@dataclass
class _Stage:
    """A model as a pass uses it: the checkpoint, its prompt encoder and the VAE that encodes/decodes."""

    model: LoadedModel
    encoder: PromptEncoder
    vae: Any


@dataclass
class _JobState:
    """What every pass of one job shares. `hires_stage` runs the hires pass (the hires checkpoint, or the
    job's model); `refiner` takes over a pass mid-run; `extra` collects infotext keys set while sampling."""

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
    hires_stage: _Stage | None = None
    refiner: _Stage | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    video: VideoPlan | None = None  # a clip: frames are the batch, the motion module is patched in

    @property
    def main(self) -> _Stage:
        return _Stage(self.model, self.encoder, self.vae)


class Engine:
    """Owns models and runs jobs. Not thread-safe for concurrent `generate` calls: the job queue runs one
    job at a time per engine; model management methods take a lock so the UI can list models meanwhile."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        samplers: SamplerRegistry | None = None,
        attention: AttentionRegistry | None = None,
        fault_hook: FaultHook | None = None,
    ):
        self.config = config
        self.fault_hook = fault_hook  # diagnostics/tests: see ldm_core.memory.FaultHook
        self.policy: DevicePolicy = resolve_policy(config)
        enable_fast_cuda_kernels(self.policy)  # CUDA only: cudnn.benchmark and TF32 (ldm_core.devices)
        self.samplers = samplers or default_sampler_registry()
        self.attention = attention or AttentionRegistry()
        self.attention_choice = self.attention.choose(config.attention, self.policy.device)
        self.compiler = Compiler(  # torch.compile of the UNet: --compile / --no-compile (ldm_core.compiled)
            compile_enabled(config.compile, self.policy.device),
            config.data_dir / "cache" / "torch-compile",
            freeze=self.policy.device.type == "cpu",  # frozen, prepacked weights pay on a CPU
        )
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
            diffusion=config.diffusion_upscale,
        )
        self.styles = StyleStore(config.data_dir / "styles.csv")
        self.motion_modules = MotionModules(config.motion_dirs, allow_pickle=config.allow_pickle)
        self._svd: dict[Path, SVDModel] = {}  # Stable Video Diffusion folders, loaded on first use
        self.hooks_factories: list[Any] = []  # extensions: callables (engine, request, model) -> Hooks parts
        self.infotext_providers: list[Any] = []  # extensions: (request, model) -> {infotext key: value}
        self.postprocessors: list[Any] = []  # extensions: (request, images, engine, model) -> images
        self._cache: OrderedDict[Path, _Placed] = OrderedDict()
        self._vae_cache: OrderedDict[tuple, Any] = OrderedDict()
        self._current: Path | None = None
        self._memory_plan: JobMemoryPlan | None = None  # the running job's out-of-memory fallbacks
        self._lock = threading.RLock()

    @property
    def config(self) -> EngineConfig:
        return self._config

    @config.setter
    def config(self, value: EngineConfig) -> None:
        """Settings applied without a restart (ldm_core.options.apply_to_engine) reach the parts that keep
        their own copy: the diffusion upscalers' steps, noise level, CFG, seed and prompt."""
        self._config = value
        if getattr(self, "upscalers", None) is not None:
            self.upscalers.diffusion = value.diffusion_upscale

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

    def size_multiple(self, name: str | None = None) -> int:
        """Pixels per latent of checkpoint `name` (None: the current or default one), without loading it: what
        sizes for it are multiples of (scripts size their requests with it before the job runs)."""
        model = self.current_model
        try:
            entry = self.models.find_checkpoint(name) if name else self.current_model_entry()
        except KeyError:  # an unknown name: the job itself reports it
            entry = None
        if model is not None and (entry is None or entry.path == model.entry.path):
            return model.vae_scale_factor
        return checkpoint_vae_factor(entry.path) if entry is not None else SD_VAE_FACTOR

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
        if p.channels_last:
            model.unet.to(memory_format=torch.channels_last)
        self.attention.apply(model.unet, self.attention_choice.name)
        if offload == "sequential":
            from accelerate import cpu_offload

            for name in ("text_encoder", "text_encoder_2", "unet"):
                mod = getattr(model, name, None)
                if mod is not None:
                    cpu_offload(mod, execution_device=dev)
        self._place_vae(model.vae)
        return model

    def _place_vae(self, vae) -> None:
        """A VAE (a checkpoint's own or one chosen per job) as this engine runs it: its safe dtype
        (`devices.vae_dtype_for`), eval mode, on the device unless offloaded, channels-last on CUDA (a CPU's VAE
        keeps its layout), the attention backend, tiling/slicing as configured, sequential offload."""
        p, offload = self.policy, self.config.offload
        vae_dtype = vae_dtype_for(p, vae.config)
        if vae.dtype != vae_dtype:
            vae.to(dtype=vae_dtype)
        vae.eval().requires_grad_(False)
        if offload == "none":
            vae.to(p.device)
        if p.channels_last and p.device.type == "cuda":
            vae.to(memory_format=torch.channels_last)
        self.attention.apply(vae, self.attention_choice.name)
        if self.config.vae_tiling:
            vae.enable_tiling()
        if self.config.vae_slicing:
            vae.enable_slicing()
        if offload == "sequential":
            from accelerate import cpu_offload

            cpu_offload(vae, execution_device=p.device)

    def checkpoint_entry(self, name: str | None = None) -> ModelEntry:
        """The registry entry for `name` (a title, name or short hash; None = the current or default model), or
        RequestError("model") saying what is missing."""
        if name is None:
            entry = self.current_model_entry()
            if entry is None:
                raise RequestError("model", "no model found: put a checkpoint in models/Stable-diffusion")
            return entry
        try:
            return self.models.find_checkpoint(name)
        except KeyError as exc:
            raise RequestError("model", str(exc.args[0] if exc.args else exc)) from None

    def recommended_sampling(self, name: str | None = None) -> tuple[str | None, str | None]:
        """(sampler, schedule type) that checkpoint `name`'s sidecar recommends (None: the current or default
        model), each None where it names none, or one this engine does not have (logged). Reads the sidecar
        without loading the model: the UI's dropdowns start there, and API and CLI requests that name no
        sampler run it."""
        try:
            entry = self.models.find_checkpoint(name) if name else self.current_model_entry()
            side = read_sidecar(entry.path) if entry is not None else None
        except (KeyError, SidecarError):  # an unknown name or a bad sidecar: the job itself reports it
            return None, None
        if side is None or (side.sampler_name is None and side.scheduler is None):
            return None, None
        sampler, schedule = side.sampler_name, side.scheduler
        try:
            info, label = self.samplers.resolve(sampler or DEFAULT_SAMPLER, schedule or "Automatic")
        except RequestError as exc:
            log.warning("%s: ignoring the recommended sampling in %s: %s", entry.path.name, side.sources, exc)
            return None, None
        return (info.name if sampler else None), (label if schedule else None)

    def sampling(self, request: GenerationRequest) -> tuple[str, str]:
        """(sampler, schedule type) a request runs: its own sampler, or where it names none (None) the model's
        recommended one, else DEFAULT_SAMPLER; the schedule type the request names, or with the recommended
        sampler and "Automatic", the recommended schedule type. A recommendation is for images: a clip (an
        enabled AnimateDiff) that names no sampler runs DEFAULT_SAMPLER (the built-in motion module holds the
        direction and the object better with it: 56% and 17% of 100 clips, against 53% and 9% at the built-in
        model's DPM++ 2M Exponential)."""
        clip = request.animatediff is not None and request.animatediff.enable
        advised = request.sampler_name is None and not clip
        recommended = self.recommended_sampling(request.model) if advised else (None, None)
        return sampling_choice(request.sampler_name, request.scheduler, recommended)

    def load_checkpoint(self, name: str | None = None) -> LoadedModel:
        """Make `name` (a title, name or short hash; None = current or default) the current model."""
        with self._lock:
            entry = self.checkpoint_entry(name)
            if entry.path in self._cache:
                self._cache.move_to_end(entry.path)
                self._current = entry.path
                return self._cache[entry.path].model
            # evict before loading: the old model is freed (and the CUDA cache emptied) before the new one's
            # weights are read, and they are read straight into the run dtype on the run device
            while len(self._cache) >= max(1, self.config.model_cache_size):
                self._cache.popitem(last=False)
            self._free_memory()
            self._reached("load")
            t0 = time.perf_counter()
            p = self.policy
            model = self._place(
                load_model(
                    entry,
                    dtype=p.dtype,
                    vae_dtype=lambda cfg: vae_dtype_for(p, cfg),
                    device=p.device if self.config.offload == "none" else "cpu",
                    allow_pickle=self.config.allow_pickle,
                )
            )
            previewer = LatentPreviewer(model.vae, *latent_normalisation(model.vae.config), device=p.device)
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
        free_memory(self.policy.device)

    def _reached(self, point: str) -> None:
        """Report a point of the job to the fault hook, if one is set (see `ldm_core.memory.FaultHook`)."""
        if self.fault_hook is not None:
            self.fault_hook.reached(point, self.policy.device)

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
            offload = self.config.offload
            vae = load_vae(
                entry,
                dtype=lambda cfg: vae_dtype_for(self.policy, cfg),
                allow_pickle=self.config.allow_pickle,
                scaling_factor=model.vae.config.scaling_factor,
                device=self.policy.device if offload == "none" else "cpu",
            )
            self._place_vae(vae)
            self._vae_cache[key] = vae
        vae = self._vae_cache[key]
        have = (vae_scale_factor(vae.config), vae.config.latent_channels)
        want = (model.vae_scale_factor, model.vae.config.latent_channels)
        if have != want:  # the same key names fit, but it would decode another latent space (e.g. f4 on f8)
            raise RequestError(
                "vae",
                f"{entry.name} decodes {have[1]}-channel latents at factor {have[0]}, but {model.entry.name} makes "
                f"{want[1]}-channel latents at factor {want[0]}: pick a VAE made for this model, or Automatic",
            )
        return vae, entry

    @contextlib.contextmanager
    def _on_device(self, *modules):
        """With model CPU offload (--medvram, or a job's out-of-memory fallback), move modules to the device
        for the duration of the block."""
        plan = self._memory_plan
        if self.config.offload != "model" and not (plan is not None and plan.model_offload):
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
        ad = request.animatediff
        if ad is not None and ad.enable and ad.model and self.motion_modules.is_svd(ad.model):
            return self._generate_svd(request, ctx)  # Stable Video Diffusion: its own pipeline
        with self._lock:
            model = self.load_checkpoint(request.model)
            placed = self._cache[self._current]
        info, schedule_type = self.samplers.resolve(*self.sampling(request))
        hires = None
        if request.enable_hr and request.mode == "txt2img":
            hires = self._resolve_hires(request, info.name, schedule_type)
        hr_model = model
        if hires is not None and hires["checkpoint"]:
            hr_model = self._aux_model("hr_checkpoint_name", hires["checkpoint"], model)
            hires["params"]["Hires checkpoint"] = _short_title(hr_model)
        refiner_model = None
        if _chosen(request.refiner_checkpoint, "None"):
            refiner_model = self._aux_model("refiner_checkpoint", request.refiner_checkpoint, model)
            base = hr_model if hires is not None else model  # A1111's default: the refiner runs in the hires pass
            _check_refiner(refiner_model, base)
            if refiner_model is base:  # A1111: refining with the model that is running is no switch
                refiner_model = None
        width, height = model.work_size(request.width, request.height)  # multiples of the model's VAE factor
        video = plan_video(request, self.motion_modules, model.unet, model.entry.name, model.kind.family)
        if video is not None:  # a clip: its frames are the batch
            if refiner_model is not None:
                raise RequestError("refiner_checkpoint", "a clip cannot switch to a refiner (no motion module there)")
            if hr_model is not model:
                raise RequestError("hr_checkpoint_name", "a clip's hires pass runs with the clip's own checkpoint")
            request = request.model_copy(update={"batch_size": video.frames})
        vae, vae_entry = self._vae_for(request, model)
        previewer = (
            placed.previewer
            if vae is model.vae
            else LatentPreviewer(vae, vae.config.scaling_factor, device=self.policy.device)
        )

        seed = resolve_seed(request.seed)
        subseed = resolve_seed(request.subseed) if request.subseed_strength > 0 else -1
        prompt, networks = extract_extra_networks(request.prompt)
        negative, _ = extract_extra_networks(request.negative_prompt)
        if request.disable_extra_networks:  # A1111: the tags are still removed from the prompt
            networks = []
        elif video is not None:
            networks = video.with_adapter_lora(networks, self.networks.names())
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
        if request.restore_faces:
            result.notes.append("restore_faces: not applied (no face restoration model is available offline)")
            log.info("restore_faces requested: not applied, no face restoration model is available offline")
        if request.token_merging_ratio > 0:
            result.notes.append(
                f"token_merging_ratio {infotext_number(request.token_merging_ratio)}: "
                "not applied (no token merging here)"
            )
            log.info("token_merging_ratio %s: not applied, no token merging here", request.token_merging_ratio)
        if getattr(request, "image_cfg_scale", None) is not None:  # accepted because A1111 clients send it
            result.notes.append(
                f"image_cfg_scale {infotext_number(request.image_cfg_scale)}: not applied (it is the image guidance of "
                "instruct-pix2pix models, which this server does not run)"
            )
        if hires is not None and hires["warning"]:
            result.warnings.append(hires["warning"])
        if video is not None:
            result.notes.extend(video.notes)
        job_params = {}
        if request.eta_noise_seed_delta and _uses_step_noise(info, request.eta):
            job_params["ENSD"] = request.eta_noise_seed_delta  # A1111: only where step noise is drawn
        ctx.progress.update(
            job_no=0,
            job_count=request.n_iter,
            step=0,
            steps=request.steps,
            started_at=time.monotonic(),
            textinfo="",
        )
        with contextlib.ExitStack() as stack:
            # LoRAs stay merged after the job: the next job with the same set merges nothing (network_state)
            lora_params = self.networks.merge(model, networks)
            encoder = self._encoder(request, model)
            stages = {model.entry.path: _Stage(model, encoder, vae)}
            for aux in (hr_model, refiner_model):
                if aux is None or aux.entry.path in stages:
                    continue
                same_family = aux.kind.family == model.kind.family
                self.networks.merge(aux, networks if same_family else [])  # [] undoes an earlier job's set
                if networks and not same_family:
                    log.info("the prompt's LoRAs are not applied to %s (another model family)", aux.entry.name)
                stages[aux.entry.path] = _Stage(aux, self._encoder(request, aux), self._vae_for(request, aux)[0])
            vaes = {id(s.vae): s.vae for s in stages.values()}
            unets = [s.model.unet for s in stages.values()]
            stack.enter_context(circular_padding(*unets, *vaes.values(), enabled=request.tiling))
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
                hires_stage=stages[hr_model.entry.path] if hires is not None else None,
                refiner=stages[refiner_model.entry.path] if refiner_model is not None else None,
                video=video,
            )
            if video is not None:  # the temporal layers, for this job only
                video.patch = stack.enter_context(motion_patch(model.unet, video.module))
            # out of memory in a batch: free, retry with the next lighter step (ldm_core.memory), undone after
            plan = JobMemoryPlan(
                unets=unets,
                vaes=list(vaes.values()),
                text_encoders=[m for s in stages.values() for m in (s.model.text_encoder, s.model.text_encoder_2)],
                attention=self.attention,
                attention_name=self.attention_choice.name,
                device=self.policy.device,
                config_vae_tiling=self.config.vae_tiling,
                config_offload=self.config.offload,
            )
            self._memory_plan = plan
            stack.callback(setattr, self, "_memory_plan", None)
            stack.callback(plan.undo)
            for n in range(request.n_iter):
                ctx.cancel.clear_skip()
                if ctx.cancel.interrupted:
                    break
                seeds = [wrap_seed(seed + n * request.batch_size + i) for i in range(request.batch_size)]
                subseeds = (
                    [wrap_seed(subseed + n * request.batch_size + i) for i in range(request.batch_size)]
                    if subseed >= 0
                    else []
                )
                ctx.progress.update(job_no=n, step=0)
                batch_imgs, stopped = run_with_fallbacks(
                    lambda seeds=seeds, subseeds=subseeds: self._run_batch(job, seeds, subseeds),
                    plan,
                    device=self.policy.device,
                )
                for post in self.postprocessors:
                    batch_imgs = post(request, batch_imgs, self, model)
                extra = {
                    **job_params,
                    **(hires["params"] if hires else {}),
                    **job.extra,
                    **lora_params,
                    **encoder.infotext_params(),
                    **plan.infotext(),
                    **({"AnimateDiff": video.infotext()} if video is not None else {}),
                }
                first = len(result.images)
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
                    manifest.update(_feature_manifest(request, job))
                    result.images.append(im)
                    result.infotexts.append(text)
                    result.seeds.append(seeds[i])
                    result.subseeds.append(sub if sub is not None else -1)
                    result.manifests.append(manifest)
                    if request.save_images and self.config.save_images and video is None:
                        folder = output_folder(self.config.outputs_dir, request.mode)
                        result.paths.append(
                            save_image(
                                im,
                                folder,
                                infotext=text,
                                manifest=manifest,
                                seed=seeds[i],
                                pattern=self.config.filename_pattern,
                                extension=self.config.samples_format,
                                quality=self.config.jpeg_quality,
                                model_name=model.entry.name,
                                prompt=request.prompt,
                                writer=self.config.output_writer,  # issue 16: the disk-full fault hook
                            )
                        )
                if video is not None and batch_imgs:  # the clip files (a stopped clip too: nothing is lost)
                    clips, saved = write_clips(
                        video,
                        batch_imgs,
                        result.infotexts[first],
                        result.manifests[first],
                        save=request.save_images and self.config.save_images,
                        outputs_dir=self.config.outputs_dir,
                        seed=seeds[0],
                        pattern=self.config.filename_pattern,
                        model_name=model.entry.name,
                        prompt=request.prompt,
                        writer=self.config.output_writer,
                    )
                    result.videos.extend(clips)
                    result.paths.extend([c.path for c in clips if c.path is not None] + saved)
                if stopped is not None:
                    if stopped.skipped:
                        result.skipped_batches += 1
                    else:
                        result.interrupted = True
                        break
            if plan.warning():
                result.warnings.append(plan.warning())
        ctx.progress.update(job_no=request.n_iter, step=0, interrupted=result.interrupted)
        return result

    def _generate_svd(self, request: GenerationRequest, ctx: JobContext) -> GenerationResult:
        """Image-to-video with a Stable Video Diffusion folder (ldm_core.video.svd), saved like any clip."""
        ad = request.animatediff
        if not isinstance(request, Img2ImgRequest):
            raise RequestError(
                "init_images",
                "Stable Video Diffusion makes a clip from a start image: give one (img2img, or "
                "the Video tab's start image)",
            )
        path = self.motion_modules.path(ad.model)
        with self._lock:
            svd = self._svd.get(path)
            if svd is None:
                svd = self._svd[path] = SVDModel(path, self.policy.device, self.policy.dtype, self.config.allow_pickle)
        width = round_down(request.width or 1024, 64)
        height = round_down(request.height or 576, 64)
        seed, frames = resolve_seed(request.seed), ad.frames()
        result = GenerationResult(width=width, height=height, sampler_name="Euler", model_name=path.name)
        ctx.progress.update(job_no=0, job_count=1, step=0, steps=request.steps, started_at=time.monotonic())
        try:
            images = svd.frames(
                request.init_images[0],
                frames=frames,
                width=width,
                height=height,
                steps=request.steps,
                seed=seed,
                cfg_scale=request.cfg_scale,
                fps=ad.fps,
                motion_bucket_id=ad.motion_bucket_id,
                noise_aug_strength=ad.noise_aug_strength,
                check_cancel=ctx.cancel.check,
                on_step=lambda done, total: ctx.progress.update(step=done, steps=total),
            )
        except Interrupted:
            result.interrupted = True
            result.notes.append("interrupted before the frames were decoded: Stable Video Diffusion keeps no part")
            return result
        value = (
            f"model: {path.name}, video_length: {frames}, fps: {infotext_number(ad.fps)}, motion_bucket_id: "
            f"{ad.motion_bucket_id}, noise_aug_strength: {infotext_number(ad.noise_aug_strength)}"
        )
        params = {
            "Steps": request.steps,
            "Sampler": "Euler",
            "CFG scale": infotext_number(request.cfg_scale),
            "Seed": seed,
            "Size": f"{width}x{height}",
            "Model": path.name,
            "SVD": value,
            "Version": f"ldm_core-{__version__}",
        }
        text = build_infotext(request.prompt, request.negative_prompt, params)
        manifest = {
            "svd": {"model": path.name, **ad.model_dump(include={"fps", "motion_bucket_id", "noise_aug_strength"})},
            "seed": seed,
        }
        plan = VideoPlan(ad, None, frames, frames, [list(range(frames))], ad.fps)
        for i, im in enumerate(images):
            result.images.append(im)
            result.infotexts.append(text)
            result.seeds.append(seed)
            result.subseeds.append(-1)
            result.manifests.append({**manifest, "frame": i})
        clips, saved = write_clips(
            plan,
            images,
            text,
            manifest,
            save=request.save_images and self.config.save_images,
            outputs_dir=self.config.outputs_dir,
            seed=seed,
            pattern=self.config.filename_pattern,
            model_name=path.name,
            prompt=request.prompt,
            writer=self.config.output_writer,
        )
        result.videos.extend(clips)
        result.paths.extend([c.path for c in clips if c.path is not None] + saved)
        ctx.progress.update(job_no=1, step=0)
        return result

    def _encoder(self, request: GenerationRequest, model: LoadedModel) -> PromptEncoder:
        return PromptEncoder(
            model,
            clip_skip=request.clip_skip,
            emphasis=request.emphasis,
            embeddings=self.embeddings,
            device=self.policy.device,
        )

    def _aux_model(self, field_name: str, name: str, main: LoadedModel) -> LoadedModel:
        """A second checkpoint for this job (hires checkpoint, refiner), loaded without becoming the current
        model: `main` stays current (and cached) for the next job."""
        with self._lock:
            try:
                entry = self.models.find_checkpoint(name)
            except KeyError as exc:
                raise RequestError(field_name, str(exc.args[0] if exc.args else exc)) from None
            if entry.path == main.entry.path:
                return main
            if entry.path in self._cache:
                return self._cache[entry.path].model
            main_path, main_placed = self._current, self._cache.get(self._current)
            aux = self.load_checkpoint(name)
            if main_placed is not None:
                self._cache[main_path] = main_placed
                self._cache.move_to_end(main_path)
                while len(self._cache) > max(1, self.config.model_cache_size):
                    oldest = next(iter(self._cache))
                    self._cache.pop(oldest)
            self._current = main_path
            return aux

    def _resolve_hires(self, request: GenerationRequest, sampler: str, schedule_type: str) -> dict:
        """Check the hires-fix settings up front and work out its target size and infotext keys."""
        model = self.current_model
        w0, h0 = model.work_size(request.width, request.height)
        rx, ry = request.hr_resize_x, request.hr_resize_y
        if rx or ry:
            tw = rx or round(ry * w0 / h0)
            th = ry or round(rx * h0 / w0)
        else:
            tw, th = w0 * request.hr_scale, h0 * request.hr_scale
        f = model.vae_scale_factor
        tw, th = round_down(tw, f, MIN_SIDE), round_down(th, f, MIN_SIDE)
        if tw * th > 2048 * 2048:
            raise RequestError("hr_scale", f"hires size {tw}x{th} is too large (at most 2048x2048 pixels)")
        # a model upscaler this server lacks ("R-ESRGAN 4x+") falls back with a warning; garbage is refused
        fallback = self.upscalers.fallback(request.hr_upscaler or "Latent", "hr_upscaler", latent=True)
        up = fallback.name
        channels = model.vae.config.latent_channels
        sd_latents = model.kind.family in ("sd1", "sd2") and (channels, f) == (4, 8)
        if self.upscalers.is_latent_upscaler(up) and not sd_latents:
            raise RequestError(  # refused before the first pass runs
                "hr_upscaler",
                f"{up} upscales the latents of SD 1.x/2.x's VAE; the loaded model is {model.kind.family} "
                f"({channels} latent channels at 1/{f}): choose an image upscaler",
            )
        hr_sampler, hr_sched = sampler, schedule_type
        same_sampler = not _chosen(request.hr_sampler_name, "Use same sampler")
        same_schedule = not _chosen(request.hr_scheduler, "Use same scheduler")
        if not (same_sampler and same_schedule):
            wanted = sampler if same_sampler else request.hr_sampler_name
            schedule = request.scheduler if same_schedule else request.hr_scheduler
            try:
                hr_info, hr_sched = self.samplers.resolve(wanted, schedule)
            except RequestError as exc:
                name = {"sampler_name": "hr_sampler_name", "scheduler": "hr_scheduler"}.get(exc.field, exc.field)
                raise RequestError(name, exc.message) from None
            hr_sampler = hr_info.name
        params: dict[str, Any] = {"Denoising strength": infotext_number(request.denoising_strength)}
        if rx or ry:
            params["Hires resize"] = f"{tw}x{th}"
        else:
            params["Hires upscale"] = infotext_number(request.hr_scale)
        if request.hr_second_pass_steps:
            params["Hires steps"] = request.hr_second_pass_steps
        params["Hires upscaler"] = up
        if hr_sampler != sampler:
            params["Hires sampler"] = hr_sampler
        if hr_sched != schedule_type:
            params["Hires schedule type"] = hr_sched
        if request.hr_prompt and request.hr_prompt != request.prompt:
            params["Hires prompt"] = request.hr_prompt
        if request.hr_negative_prompt and request.hr_negative_prompt != request.negative_prompt:
            params["Hires negative prompt"] = request.hr_negative_prompt
        checkpoint = request.hr_checkpoint_name if _chosen(request.hr_checkpoint_name, "Use same checkpoint") else None
        return {
            "width": tw,
            "height": th,
            "upscaler": up,
            "sampler": hr_sampler,
            "schedule_type": hr_sched,
            "steps": request.hr_second_pass_steps or request.steps,
            "checkpoint": checkpoint,
            "params": params,
            "warning": fallback.warning,
        }

    def _encode_images(self, vae, images: list[Image.Image]) -> torch.Tensor:
        """RGB images (same size) -> scaled latents (B,C,h,w) on the engine's device."""
        return self._encode_pixels(vae, torch.cat([imgs.pil_to_tensor(im) for im in images]))

    def _encode_pixels(self, vae, pix: torch.Tensor) -> torch.Tensor:
        """Pixels (B,3,H,W) in [-1, 1] -> scaled latents (B,C,h,w) on the engine's device."""
        scaling, shift = latent_normalisation(vae.config)
        with self._on_device(vae), torch.inference_mode():
            dtype = next(vae.parameters()).dtype
            dev = execution_device(vae, self.policy.device)
            z = vae.encode(pix.to(dev, dtype)).latent_dist.mode().float()
        return ((z - shift) * scaling).to(self.policy.device)

    def _unet_concat(
        self, job: _JobState, model: LoadedModel, unet_concat: torch.Tensor | None, noise: torch.Tensor
    ) -> torch.Tensor | None:
        """The extra UNet input channels: None for a normal model; for a 9-channel inpainting model the job's
        mask + masked-image latents, or outside inpainting A1111's "everything masked": a mask of ones and the
        latent of an image that is all masked (0 in [-1, 1], mid grey) through the job's VAE."""
        if not model.kind.inpaint:
            return None
        if unet_concat is not None:
            return unet_concat
        b, (h, w) = noise.shape[0], noise.shape[-2:]
        f = model.vae_scale_factor
        z = self._encode_pixels(job.vae, torch.zeros(1, 3, h * f, w * f))
        ones = torch.ones(b, 1, h, w, device=noise.device)
        return torch.cat([ones, z.to(noise.device).expand(b, -1, -1, -1)], dim=1)

    def _image_to_video(self, job: _JobState, init: torch.Tensor, seeds: list[int], width, height, mode):
        """Image-to-video init latents (ldm_core.video.job.blend_image_to_video), with the last frame if given."""
        args = job.video.args
        gen = torch.Generator().manual_seed(wrap_seed(seeds[0] + 0x5EED))
        noise = torch.randn(init.shape, generator=gen).to(init)
        last = None
        if args.last_frame is not None:
            image = args.last_frame
            if not isinstance(image, Image.Image):
                image = decode_clip(image).frames[0]  # base64 from an API client
            last = self._encode_images(job.vae, [imgs.resize_image(image.convert("RGB"), width, height, mode)])
            last = last.repeat(init.shape[0], 1, 1, 1)
        return blend_image_to_video(init, noise, args, last)

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
            noise_seed_delta=request.eta_noise_seed_delta,
            device="cpu" if self.config.cpu_noise else dev,  # the RNG source option (randn_source)
        )
        if job.video is not None:  # a clip: its frames may share part of their noise
            noise = job.video.starting_noise(noise)
        noise = noise.to(dev)

        init_latents = blend = unet_concat = None
        original = mask_img = box = None
        strength = 1.0
        noise_scale = 1.0
        if isinstance(request, Img2ImgRequest):
            strength = request.denoising_strength
            noise_scale = request.initial_noise_multiplier
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
            if job.video is not None and job.video.source:  # video-to-video: each frame from its source frame
                src = job.video.source
                frames = [imgs.resize_image(src[min(i, len(src) - 1)], width, height, pixel_mode) for i in range(b)]
                init_latents = self._encode_images(vae, frames)
            else:
                init_latents = self._encode_images(vae, [work_rs]).repeat(b, 1, 1, 1)
                if job.video is not None:  # image-to-video: later frames keep less of the image
                    init_latents = self._image_to_video(job, init_latents, seeds, width, height, pixel_mode)
            if work_mask is not None:
                # A1111 rounds the (blurred) mask at latent size: a cell is repainted or kept, never half of each
                # (a half-kept cell fades what is drawn at the mask's edge towards the original)
                lmask = imgs.mask_to_latent(work_mask, (lh, lw)).round().to(dev).repeat(b, 1, 1, 1)
                if request.inpainting_fill == "latent noise":
                    init_latents = init_latents * (1 - lmask) + noise * lmask
                elif request.inpainting_fill == "latent nothing":
                    init_latents = init_latents * (1 - lmask)
                if model.kind.inpaint:
                    # the masked pixels at 0 in [-1, 1] (mid grey), as SD's inpainting models were trained and
                    # as A1111 (source * (1 - mask)) and diffusers (image * (mask < 0.5)) give them; not black
                    keep = torch.from_numpy(np.asarray(work_mask.convert("L")) < 128)
                    mz = self._encode_pixels(vae, imgs.pil_to_tensor(work_rs) * keep).repeat(b, 1, 1, 1)
                    unet_concat = torch.cat([lmask, mz], dim=1)  # lmask is already rounded to 0/1
                else:
                    blend = InpaintBlend(init_latents, noise, lmask)

        main = job.main
        first_refiner = job.refiner if job.hires is None else None

        def denoise(start_noise):
            return self._denoise_pass(
                job,
                main,
                job.sampler,
                job.schedule_type,
                request.steps,
                start_noise,
                gens,
                init_latents,
                strength,
                job.prompt,
                job.negative,
                unet_concat,
                blend,
                refiner=first_refiner,
                noise_scale=noise_scale,
                fix_steps=getattr(request, "img2img_fix_steps", False),
            )

        res = denoise(noise)
        passes = job.video.free_init_passes if job.video is not None else 1
        if passes > 1:  # FreeInit: sample again from this clip's low frequencies (ldm_core.video.free_init)
            args = job.video.args
            mask = free_init.low_pass(b, lh, lw, args.freeinit_filter, args.freeinit_ds, args.freeinit_dt)
            last_alpha = float(alphas_cumprod_from_config(main.model.scheduler_config)[-1])
            for k in range(1, passes):
                if res.stopped is not None:
                    break
                fresh = torch.randn(noise.shape, generator=torch.Generator().manual_seed(wrap_seed(seeds[0] + k)))
                res = denoise(free_init.reinitialised_noise(res.latents, noise, fresh.to(dev), last_alpha, mask))
        latents, stopped = res.latents, res.stopped
        finished = first_refiner if res.switched else main
        if job.hires is not None and stopped is None:
            latents, stopped, finished = self._hires_pass(job, latents, seeds)
        with self._on_device(finished.vae):
            out = self.decode(finished.vae, latents)
        if original is not None and mask_img is not None:
            out = [imgs.paste_back(original, im, mask_img, box) for im in out]
        return out, stopped

    def _hires_pass(self, job: _JobState, latents: torch.Tensor, seeds: list[int]):
        """Hires fix: upscale the first pass (in latent space or through an image upscaler), then img2img with
        the hires checkpoint (if one is named) and the refiner (if one is named). Returns (latents,
        Interrupted|None, the stage whose VAE decodes the result)."""
        hr, request = job.hires, job.request
        stage = job.hires_stage or job.main
        factor = job.model.vae_scale_factor
        tw, th = hr["width"], hr["height"]
        if is_latent_mode(hr["upscaler"]):
            z = upscale_latents(latents, hr["upscaler"], (th // factor, tw // factor))
        elif self.upscalers.is_latent_upscaler(hr["upscaler"]):  # SD x2 latent upscaler: 2x, then the exact size
            prompt = job.request.hr_prompt or job.request.prompt
            z = self.upscalers.load(hr["upscaler"]).latents(
                latents, prompt, self.upscalers.diffusion, cancel=job.ctx.cancel.check
            )
            if z.shape[-2:] != (th // factor, tw // factor):
                z = upscale_latents(z, "Latent", (th // factor, tw // factor))
        else:
            with self._on_device(job.vae):
                first = self.decode(job.vae, latents)
            big = [
                self.upscalers.upscale(im, hr["upscaler"], size=(tw, th), cancel=job.ctx.cancel.check) for im in first
            ]
            z = self._encode_images(stage.vae, big)
        noise, gens = batch_noise(
            (z.shape[1], th // factor, tw // factor),
            seeds,
            noise_seed_delta=request.eta_noise_seed_delta,
            device="cpu" if self.config.cpu_noise else self.policy.device,  # the RNG source option (randn_source)
        )
        prompt, negative = job.prompt, job.negative
        if request.hr_prompt:
            prompt, _ = extract_extra_networks(request.hr_prompt)
        if request.hr_negative_prompt:
            negative, _ = extract_extra_networks(request.hr_negative_prompt)
        res = self._denoise_pass(
            job,
            stage,
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
            refiner=job.refiner,
            fix_steps=True,  # A1111 passes the hires steps explicitly: exactly that many run
        )
        return res.latents, res.stopped, (job.refiner if res.switched else stage)

    def _denoise_pass(
        self,
        job: _JobState,
        stage: _Stage,
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
        refiner: _Stage | None = None,
        noise_scale: float = 1.0,
        fix_steps: bool = False,
    ):
        """One run of the denoising loop from noise (txt2img) or from noised init latents (img2img), with
        `stage`'s model; with a `refiner`, the run continues with the refiner's model once the noise level
        reaches `request.refiner_switch_at` (A1111's rule). `noise_scale` multiplies the noise the init
        latents get (A1111's initial noise multiplier). From init latents, `fix_steps` runs exactly `steps`
        over a longer schedule (A1111's img2img_fix_steps) instead of steps x strength of a `steps` one."""
        request, model, ctx = job.request, stage.model, job.ctx
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
        if init_latents is None:
            sched.set_timesteps(steps, device=dev)
            timesteps = sched.timesteps
            latents = noise * sched.init_noise_sigma
            user_steps = steps
        else:
            schedule_len, run = img2img_steps(steps, strength, fix_steps)
            sched.set_timesteps(schedule_len, device=dev)
            timesteps = img2img_timesteps(sched, schedule_len, strength, dev, run=run)
            start_noise = noise * noise_scale if noise_scale != 1.0 else noise
            latents = (
                sched.add_noise(init_latents, start_noise, timesteps[:1].repeat(b)) if len(timesteps) else init_latents
            )
            user_steps = max(1, run)
        # prompt editing counts user steps; multi-evaluation samplers run more model calls than steps
        # an open-ended sampler (DPM adaptive) decides its evaluations while running: plan with its estimate
        n_evals = max(1, int(getattr(sched, "estimated_evaluations", len(timesteps))))
        levels = NoiseLevels(alphas_cumprod_from_config(model.scheduler_config))
        train_t = timesteps.detach().float().cpu().numpy()
        sigmas = [float(s) for s in levels.t_to_sigma(train_t)]
        conditioning, added = self._conditioning(
            stage, request, prompt, negative, user_steps, n_evals, width, height, video=job.video
        )
        switch = None
        if refiner is not None:
            at = _switch_index(train_t, levels.num_train_timesteps, request.refiner_switch_at)
            if at < len(timesteps):
                r_cond, r_added = self._conditioning(
                    refiner, request, prompt, negative, user_steps, n_evals, width, height
                )
                switch = ModelSwitch(
                    at,
                    self.compiler.unet(refiner.model.unet),
                    r_cond,
                    r_added,
                    self._unet_concat(job, refiner.model, unet_concat if model.kind.inpaint else None, noise),
                    keep_unet_inputs=refiner.model.kind.family == model.kind.family,
                )

        every = max(0, self.config.preview_every)
        previewer = weakref.ref(job.previewer)  # a preview read after the model is unloaded is just None

        def on_step(done, total, denoised):
            upd = {"step": done, "steps": total}
            if every and (done % every == 0 or done == total):
                # rendered only if someone reads it (UI, progress API); no decode and no host sync here
                upd["preview_source"] = PreviewSource(_preview_render(previewer, denoised[:1].detach().clone()))
                upd["preview_step"] = done
            ctx.progress.update(**upd)

        ctx.progress.update(step=0, steps=n_evals if len(timesteps) else 0)
        loop_in = LoopInputs(
            latents=latents,
            timesteps=timesteps,
            scheduler=sched,
            conditioning=conditioning,
            cfg_scale=request.cfg_scale,
            generators=gens,
            added_cond_kwargs=added,
            unet_concat=self._unet_concat(job, model, unet_concat, noise),
            inpaint=blend,
            s_min_uncond=request.s_min_uncond,
            sigmas=sigmas,
            switch=switch,
            # the job's model decides, also in a hires pass with another checkpoint: one value per job, the
            # one its infotext records
            rescale_cfg=rescale_cfg(request, job.model),
        )
        unets = (model.unet, refiner.model.unet if switch is not None else None)
        with self._on_device(*unets), torch.inference_mode():
            hooks = job.hooks
            if model.kind.family != job.model.kind.family:  # UNet-input residuals fit the job's model only
                hooks = Hooks(cfg=list(job.hooks.cfg))
            self._reached("denoise")
            loop_unet = (
                job.video.unet(model.unet, levels.num_train_timesteps)
                if job.video is not None
                else self.compiler.unet(model.unet)
            )
            res = denoise(loop_unet, loop_in, hooks=hooks, cancel=ctx.cancel, on_step=on_step)
        if res.switched and refiner is not None:
            job.extra["Refiner"] = _short_title(refiner.model)
            if request.refiner_switch_at is not None:
                job.extra["Refiner switch at"] = infotext_number(request.refiner_switch_at)
        return res

    def _conditioning(self, stage: _Stage, request, prompt, negative, user_steps, n_evals, width, height, video=None):
        """(conditioning(i), added_cond_kwargs or None) for the loop: `stage`'s encoding of the prompt
        schedule, encoded up front so the text encoders can go back to the CPU."""
        model = stage.model
        travel = parse_travel(prompt) if video is not None else None
        if travel is not None:  # a clip whose prompt changes over its frames (ldm_core.video.prompt_travel)
            schedule = TravelSchedule(stage.encoder, travel, negative, user_steps, video.frames, video.travel_closed)
        else:
            schedule = PromptSchedule(stage.encoder, prompt, negative, user_steps)

        def step_of(i: int) -> int:
            return min(user_steps - 1, i * user_steps // n_evals)

        added = None
        if model.kind.family in SDXL_FAMILIES:
            # original size, crop top-left (A1111's sdxl_crop_top / sdxl_crop_left options), then the target
            # size (SDXL) or the aesthetic score, high for the prompt and low for the negative (refiner)
            added = sdxl_added_cond(
                model.kind.family,
                width,
                height,
                crop_top=request.sdxl_crop_top,
                crop_left=request.sdxl_crop_left,
                high_aesthetic_score=request.sdxl_refiner_high_aesthetic_score,
                low_aesthetic_score=request.sdxl_refiner_low_aesthetic_score,
                device=self.policy.device,
            )

        def conditioning(i):
            uncond, conds = schedule.at(step_of(i))
            return (None if request.cfg_scale == 1.0 else uncond), conds

        with self._on_device(model.text_encoder, model.text_encoder_2):
            self._reached("encode")
            for i in range(user_steps):
                schedule.at(i)
        return conditioning, added

    @torch.inference_mode()
    def decode(self, vae, latents: torch.Tensor) -> list[Image.Image]:
        """Latents (scaled) -> images, decoded once in the VAE's own dtype (chosen when it was loaded:
        `devices.vae_dtype_for`, fp32 for a VAE that overflows in fp16), never decoded twice."""
        self._reached("decode")
        scaling, shift = latent_normalisation(vae.config)
        z = latents / scaling + shift
        dtype = next(vae.parameters()).dtype
        x = self.compiler.vae_decode(vae)(z.to(execution_device(vae, self.policy.device), dtype))
        if dtype != torch.float32 and not torch.isfinite(x).all():
            log.warning("the VAE decoded NaNs in %s: it is not safe in reduced precision (see its force_upcast)", dtype)
        return imgs.tensor_to_pil(x)

    # ---- infotext ------------------------------------------------------------------------------------
    def _infotext_params(self, request, model, vae_entry, sampler, schedule_type, seed, subseed, w, h):
        p: dict[str, Any] = {
            "Steps": request.steps,
            "Sampler": sampler,
            "Schedule type": schedule_type,
            "CFG scale": infotext_number(request.cfg_scale),
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
            p["Variation seed strength"] = infotext_number(request.subseed_strength)
        if request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0:
            p["Seed resize from"] = f"{request.seed_resize_from_w}x{request.seed_resize_from_h}"
        if isinstance(request, Img2ImgRequest):
            p["Denoising strength"] = infotext_number(request.denoising_strength)
        if request.clip_skip > 1:
            p["Clip skip"] = request.clip_skip
        if request.eta is not None:
            p["Eta"] = infotext_number(request.eta)
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
        if request.s_min_uncond:
            p["NGMS"] = infotext_number(request.s_min_uncond)
        phi = rescale_cfg(request, model)
        if phi > 0:
            p["Rescale CFG"] = infotext_number(phi)
        if request.tiling:
            p["Tiling"] = True
        if isinstance(request, Img2ImgRequest) and request.initial_noise_multiplier != 1.0:
            p["Noise multiplier"] = infotext_number(request.initial_noise_multiplier)
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


def _preview_render(previewer: weakref.ref, latents: torch.Tensor):
    """The render function of one live preview: `latents` through the previewer, if it still exists."""

    def render() -> Image.Image | None:
        p = previewer()
        return p(latents) if p is not None else None

    return render


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


def _feature_manifest(request: GenerationRequest, job: _JobState) -> dict[str, Any]:
    """Manifest entries of the A1111 options that change pixels: tiling, NGMS, noise multiplier, the hires
    checkpoint and the refiner (name, SHA-256, switch point; `used` says whether the run reached it)."""
    out: dict[str, Any] = {
        "tiling": request.tiling,
        "s_min_uncond": request.s_min_uncond,
        "rescale_cfg": rescale_cfg(request, job.model),
        "eta_noise_seed_delta": request.eta_noise_seed_delta,
    }
    if job.model.kind.family == "sdxl":
        out["sdxl_crop"] = [request.sdxl_crop_top, request.sdxl_crop_left]
    if isinstance(request, Img2ImgRequest):
        out["initial_noise_multiplier"] = request.initial_noise_multiplier
        out["img2img_fix_steps"] = request.img2img_fix_steps
    if job.hires_stage is not None and job.hires_stage.model is not job.model:
        hr = job.hires_stage.model
        out["hires_checkpoint"] = {"name": hr.entry.name, "sha256": hr.sha256}
    if job.refiner is not None:
        ref = job.refiner.model
        out["refiner"] = {
            "name": ref.entry.name,
            "sha256": ref.sha256,
            "switch_at": request.refiner_switch_at,
            "used": "Refiner" in job.extra,
        }
    return out


def _uses_step_noise(info: SamplerInfo, eta: float | None) -> bool:
    """Whether the sampler draws step noise, so that an eta noise seed delta changes its images: an ancestral
    or SDE sampler (A1111's "uses_ensd" flag) unless eta is 0, or DDIM / DDIM CFG++ with eta above 0."""
    if eta is not None and eta <= 0:
        return False
    return bool(info.options.get("uses_ensd")) or (info.name in ("DDIM", "DDIM CFG++") and eta is not None)


def _chosen(value: str | None, same: str) -> bool:
    """Whether an optional choice names something: not None, "", "None" or the `same` label."""
    return value is not None and value.strip() not in ("", "None", "none", same)


def rescale_cfg(request: GenerationRequest, model: LoadedModel) -> float:
    """The CFG rescale a job runs with: the request's, else the model's recommendation (its sidecar's)."""
    return request.rescale_cfg if request.rescale_cfg is not None else model.rescale_cfg


def _short_title(model: LoadedModel) -> str:
    """A1111's checkpoint `short_title`, "name [10-hex hash]", as its infotext writes it."""
    return f"{model.entry.name} [{model.short_hash}]"


def _check_refiner(refiner: LoadedModel, base: LoadedModel) -> None:
    """A refiner continues `base`'s latents: both must share the latent space and the prediction type."""
    if refiner.vae.config.latent_channels != base.vae.config.latent_channels:
        raise RequestError(
            "refiner_checkpoint",
            f"{refiner.entry.name} has {refiner.vae.config.latent_channels} latent channels, "
            f"{base.entry.name} {base.vae.config.latent_channels}: a refiner must share the latent space",
        )
    if refiner.kind.prediction_type != base.kind.prediction_type:
        raise RequestError(
            "refiner_checkpoint",
            f"{refiner.entry.name} predicts {refiner.kind.prediction_type}, {base.entry.name} "
            f"{base.kind.prediction_type}: a refiner must use the same prediction type",
        )


def _switch_index(train_t: np.ndarray, num_train: int, switch_at: float | None) -> int:
    """The first evaluation that runs on the refiner. A1111 (by noise level, its default): an evaluation's
    completed ratio is (T - 1 - t) / T for its nearest training timestep t, and the switch happens at the
    first evaluation whose ratio reaches `switch_at` (None: at once). len(train_t) when none does."""
    if switch_at is None:
        return 0
    for i, t in enumerate(train_t):
        if (num_train - 1 - round(float(t))) / num_train >= switch_at:
            return i
    return len(train_t)
