"""The A1111-compatible REST API (`/sdapi/v1/...`): the same paths, request keys and response shapes, so
existing A1111 clients and scripts work unchanged. Every generation goes through the service's job queue
(shared with the web UI); handlers never block the event loop.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, HTTPException
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from PIL import Image

from ldm_core.engine import GenerationResult
from ldm_core.extras import ExtrasParams, postprocess_text, upscale_batch
from ldm_core.generation_requests import RequestError
from ldm_core.grids import GridOptions
from ldm_core.infotext import parse_infotext
from ldm_core.jobs import Job
from ldm_core.models.loading import ModelFileError
from ldm_core.options import AUTOMATIC_VAES, OPTIONS_BY_KEY, OptionError, output_dirs
from ldm_core.outputs import DiskFull, read_image_info
from ldm_core.scripts import script_infos, script_names
from ldm_core.upscalers import latent_modes

from .common import (
    GENERATION_KINDS,
    ApiContext,
    find_checkpoint,
    in_thread,
    make_route_class,
    raise_job_error,
    submit,
    vae_names,
)
from .images import decode_image, encode_png_b64, encode_preview_b64
from .overrides import overrides_applied, plan_overrides
from .schemas import (
    ExtrasBase,
    ExtrasBatchImagesRequest,
    ExtrasBatchImagesResponse,
    ExtrasSingleImageRequest,
    ExtrasSingleImageResponse,
    ImageResponse,
    PNGInfoRequest,
    PNGInfoResponse,
    ProgressResponse,
    StableDiffusionImg2ImgProcessingAPI,
    StableDiffusionTxt2ImgProcessingAPI,
    a1111_engine_values,
    a1111_info,
    a1111_parameters,
    build_engine_request,
)


def default_options(ctx: ApiContext) -> dict[str, Any]:
    """What GET /sdapi/v1/options returns: every option of the one options store (shared with the UI's
    Settings tab; A1111's keys and types) plus the unknown keys clients stored, with the values only the
    server knows filled in: the current checkpoint's title and SHA256, and where each kind of output goes."""
    engine = ctx.engine
    opts = ctx.options.snapshot()
    opts.update(output_dirs(engine.config.outputs_dir))
    entry = engine.current_model_entry()
    opts["sd_model_checkpoint"] = entry.title if entry is not None else None
    opts["sd_checkpoint_hash"] = (entry.cached_sha256() if entry is not None else None) or ""
    return opts


def build_router(ctx: ApiContext) -> APIRouter:
    """The `/sdapi/v1` routes bound to `ctx`."""
    router = APIRouter(prefix="/sdapi/v1", tags=["sdapi"], route_class=make_route_class(ctx))
    engine = ctx.engine
    queue = ctx.service.queue

    # ---- generation --------------------------------------------------------------------------------
    def _prepare(body, img2img: bool):
        with ctx.lock:
            options = dict(ctx.options)
        values = a1111_engine_values(body, options, engine.recommended_sampling)
        if img2img and not values.get("init_images"):
            raise RequestError("init_images", "img2img needs at least one init image")
        return build_engine_request(values, mode=None if img2img else "txt2img")

    def _respond(job: Job, body, img2img: bool, warnings: list[str] | None = None) -> dict[str, Any]:
        job.wait()
        _raise_bad_file(job, body)
        raise_job_error(job)
        params = a1111_parameters(body, img2img)  # A1111's echo: its keys, defaults and types
        result: GenerationResult | None = job.result
        if result is None:  # cancelled before it started
            info = {"infotexts": [], "all_seeds": [], "interrupted": True, "job": job.id}
            return {"images": [], "parameters": params, "info": json.dumps(info)}
        images = []
        if body.send_images:
            frames = [
                encode_png_b64(im, text, manifest)
                for im, text, manifest in zip(result.images, result.infotexts, result.manifests, strict=False)
            ]
            images = frames
            if result.videos:  # sd-webui-animatediff: the clips come back; the frames too when "Frame" is asked
                asked = job.request.animatediff.format if job.request and job.request.animatediff else []
                images = [base64.b64encode(v.data).decode("ascii") for v in result.videos]
                images += frames if "Frame" in asked else []
        info = a1111_info(result.info(job.request), params)  # A1111's keys and number types
        info.setdefault("index_of_first_image", 0)
        model_sha = ((result.manifests[0].get("model") or {}).get("sha256") or "") if result.manifests else ""
        info.setdefault("sd_model_hash", model_sha[:10] or None)
        info.setdefault("job_timestamp", datetime.fromtimestamp(job.created_at).strftime("%Y%m%d%H%M%S"))
        info.setdefault("is_using_inpainting_conditioning", False)
        if warnings:  # what override_settings could not do (e.g. an unknown checkpoint: the current one ran)
            info["warnings"] = [*info.get("warnings", []), *warnings]
        return {"images": images, "parameters": params, "info": json.dumps(jsonable_encoder(info))}

    def _grid_options(overrides: dict[str, Any], body, request) -> GridOptions:
        """A1111: a batch's grid comes first when the option return_grid is on; it is saved when grid_save
        is on and the request saves images and does not say do_not_save_grid. `overrides` are the request's
        checked override_settings (values already of the option's type)."""
        with ctx.lock:
            options = {**dict(ctx.options), **overrides}
        save = bool(options.get("grid_save", True)) and request.save_images and not body.do_not_save_grid
        return GridOptions(return_grid=bool(options.get("return_grid", True)), save=save)

    # -- bad input (issue 16): a weights file the request chose is broken -> 422 naming the field --------
    def _raise_bad_file(job: Job, body) -> None:
        """RequestError naming the field that chose the file when the job failed on a broken checkpoint or
        VAE file (corrupt, truncated, empty, git-LFS pointer: `ModelFileError`) that the request picked; a
        broken default model is the server's problem and stays a 500. A full disk while saving: 507."""
        exc, request = job.error, job.request
        if isinstance(exc, DiskFull):  # the server's disk, not the request: 507 Insufficient Storage, said plainly
            raise HTTPException(status_code=507, detail=f"DiskFull: {exc.strerror}")
        if not isinstance(exc, ModelFileError) or request is None:
            return
        overrides = body.override_settings or {}
        path, cfg = exc.path.resolve(), engine.config
        if request.vae and any(path.is_relative_to(Path(d).resolve()) for d in cfg.vae_dirs):
            field = "override_settings.sd_vae" if overrides.get("sd_vae") else "sd_vae"
        elif request.model and any(path.is_relative_to(Path(d).resolve()) for d in cfg.ckpt_dirs):
            field = "override_settings.sd_model_checkpoint" if overrides.get("sd_model_checkpoint") else "model"
        else:
            return
        raise RequestError(field, f"{exc.path.name} cannot be loaded: {exc.reason}")

    async def _generate(body, img2img: bool) -> dict[str, Any]:
        from_override = bool((body.override_settings or {}).get("sd_model_checkpoint"))
        model_field = "override_settings.sd_model_checkpoint" if from_override else "model"

        def prepare_and_submit():  # decoding images and resolving a model by hash may take a while
            # -- override_settings (api/overrides.py): checked, unknown checkpoint -> current one + warning --
            plan = plan_overrides(ctx, body.override_settings, body.override_settings_restore_afterwards)
            request = _prepare(body.model_copy(update={"override_settings": plan.settings}), img2img)
            # -- A1111 scripts and grids (ldm_core.scripts, ldm_core.grids) --
            script = (getattr(body, "script_name", None) or "").strip()
            grid = _grid_options(plan.settings, body, request)
            script_run = (script, list(body.script_args or [])) if script and script.lower() != "none" else None
            with overrides_applied(ctx, plan):  # for this job only, unless restore_afterwards is false
                job = submit(ctx, request, model_field=model_field, grid=grid, script=script_run)
            return job, plan.warnings

        job, warnings = await in_thread(ctx, prepare_and_submit)
        return await in_thread(ctx, _respond, job, body, img2img, warnings)

    @router.post("/txt2img", response_model=ImageResponse)
    async def txt2img(body: StableDiffusionTxt2ImgProcessingAPI):  # type: ignore[valid-type]
        return await _generate(body, img2img=False)

    @router.post("/img2img", response_model=ImageResponse)
    async def img2img(body: StableDiffusionImg2ImgProcessingAPI):  # type: ignore[valid-type]
        return await _generate(body, img2img=True)

    # ---- extras and png-info ---------------------------------------------------------------------------
    def _extras_params(req: ExtrasBase) -> tuple[ExtrasParams, list[str]]:
        # a model upscaler this server lacks falls back with a warning (in html_info); garbage -> 422
        params, warnings = ExtrasParams.from_api(req.model_dump()).with_fallbacks(ctx.upscalers)
        params.validate(ctx.upscalers)
        return params, warnings

    def _extras(params: ExtrasParams, sources: list[Image.Image], warnings: list[str]) -> tuple[list[str], str]:
        """Upscale `sources` in queue order; base64 PNGs keeping each source's infotext, and the html_info."""

        def work(job_ctx):
            return upscale_batch(sources, params, ctx.upscalers, cancel=job_ctx.cancel.check)

        outs = ctx.service.run_task(work, kind="extras")
        encoded = []
        for src, out in zip(sources, outs, strict=True):
            infotext = read_image_info(src)[0]
            encoded.append(encode_png_b64(out, infotext) if infotext else encode_png_b64(out))
        html = postprocess_text(sources[0].size, params)
        return encoded, "\n".join([html, *(f"Warning: {w}" for w in warnings)]) if warnings else html

    @router.post("/extra-single-image", response_model=ExtrasSingleImageResponse)
    async def extra_single_image(req: ExtrasSingleImageRequest):
        params, warnings = _extras_params(req)

        def run():
            return _extras(params, [decode_image(req.image, "image")], warnings)

        images, html = await in_thread(ctx, run)
        return {"html_info": html, "image": images[0]}

    @router.post("/extra-batch-images", response_model=ExtrasBatchImagesResponse)
    async def extra_batch_images(req: ExtrasBatchImagesRequest):
        params, warnings = _extras_params(req)

        def run():
            sources = [decode_image(f.data, f"imageList[{i}].data") for i, f in enumerate(req.imageList)]
            return _extras(params, sources, warnings)

        images, html = await in_thread(ctx, run)
        return {"html_info": html, "images": images}

    @router.post("/png-info", response_model=PNGInfoResponse)
    async def png_info(req: PNGInfoRequest):
        def run():
            image = decode_image(req.image, "image")
            infotext, manifest, others = read_image_info(image)
            items: dict[str, Any] = dict(others)
            if manifest is not None:
                items["ldm_manifest"] = manifest
            return {
                "info": infotext or "",
                "items": items,
                "parameters": parse_infotext(infotext) if infotext else {},
            }

        return await in_thread(ctx, run)

    # ---- progress, interrupt, skip ---------------------------------------------------------------------
    @router.get("/progress", response_model=ProgressResponse)
    def progress(skip_current_image: bool = False):
        job = queue.current
        if job is None or job.kind not in GENERATION_KINDS:
            return {
                "progress": 0.0,
                "eta_relative": 0.0,
                "state": {"job_count": 0},
                "current_image": None,
                "textinfo": None,
                "current_task": job.id if job else None,
            }
        p = job.progress()
        cancel = job.ctx.cancel
        state = {
            "skipped": cancel.skipped or p.skipped,
            "interrupted": cancel.interrupted or p.interrupted,
            "stopping_generation": False,
            "job": f"job {job.id}",
            "job_count": p.job_count,
            "job_timestamp": datetime.fromtimestamp(job.started_at or job.created_at).strftime("%Y%m%d%H%M%S"),
            "job_no": p.job_no,
            "sampling_step": p.step,
            "sampling_steps": p.steps,
            "worker": p.worker or None,  # ours: the Ray pool replica running the job (None in-process)
        }
        image = None
        if not skip_current_image and p.preview is not None:
            image = encode_preview_b64(p.preview)
        return {
            "progress": p.fraction,
            "eta_relative": p.eta or 0.0,
            "state": state,
            "current_image": image,
            "textinfo": p.textinfo or None,
            "current_task": job.id,
        }

    @router.post("/interrupt")
    def interrupt():
        ctx.service.interrupt()
        return {}

    @router.post("/skip")
    def skip():
        ctx.service.skip()
        return {}

    # ---- options and flags ---------------------------------------------------------------------------
    @router.get("/options")
    def get_options():
        return jsonable_encoder(default_options(ctx))

    @router.post("/options")
    async def set_options(req: dict[str, Any] = Body(...)):
        # A1111 semantics: keys this server does not know are stored and returned (they do nothing here);
        # a known key is checked (422 naming it and its range) and takes effect for the next job
        changes = dict(req)
        shown = default_options(ctx)
        changes.pop("sd_checkpoint_hash", None)  # follows the model; clients post GET's answer back
        for key in list(changes):
            option = OPTIONS_BY_KEY.get(key)
            if option is not None and option.readonly:
                if changes[key] not in (None, "", shown.get(key)):
                    raise RequestError(
                        key,
                        f"is set by this server ({shown.get(key)!r}: outputs go to <outdir_samples>/<mode>/<date>); "
                        "set outdir_samples to move them",
                    )
                changes.pop(key)
        try:
            clean = ctx.options.validate(changes, allow_unknown=True)
        except OptionError as exc:
            raise RequestError(exc.key, exc.message) from None
        vae = clean.get("sd_vae")
        if vae not in (None, *AUTOMATIC_VAES):
            try:
                engine.models.find_vae(str(vae))
            except (KeyError, LookupError, ValueError):
                choices = ["Automatic", "None", *vae_names(engine)]
                raise RequestError("sd_vae", f"unknown VAE {vae!r}; choose one of: {choices}") from None
        name = clean.get("sd_model_checkpoint")

        def switch() -> str:
            entry = find_checkpoint(engine, str(name), "sd_model_checkpoint")
            current = engine.current_model
            if current is None or current.entry.path != entry.path:
                return ctx.service.switch_model(str(name))
            return entry.title

        if name:
            clean["sd_model_checkpoint"] = await in_thread(ctx, switch)
        await in_thread(ctx, lambda: ctx.options.update(clean, allow_unknown=True))
        return None

    @router.get("/cmd-flags")
    def cmd_flags():
        return jsonable_encoder(ctx.flags, custom_encoder={Path: str})

    # ---- lists -----------------------------------------------------------------------------------------
    @router.get("/samplers")
    def samplers():
        return [
            {
                "name": i.name,
                "aliases": list(getattr(i, "aliases", ()) or ()),
                "options": dict(getattr(i, "options", None) or {}),
            }
            for i in engine.samplers.infos()
        ]

    @router.get("/schedulers")
    def schedulers():
        return [_schedule_entry(s) for s in engine.samplers.schedule_types()]

    @router.get("/upscalers")
    def upscalers():
        return ctx.upscalers.infos()

    @router.get("/latent-upscale-modes")
    def latent_upscale_modes():
        return [{"name": n} for n in latent_modes()]

    @router.get("/sd-models")
    def sd_models():
        out = []
        for e in engine.models.checkpoints():
            # never hash on a listing: the registry hashes new checkpoints in the background from startup,
            # so `hash` (A1111's 10-digit short hash) and `sha256` are null only until a file's turn comes
            sha = e.cached_sha256()
            out.append(
                {
                    "title": e.title,
                    "model_name": e.name,
                    "hash": sha[:10] if sha else None,
                    "sha256": sha,
                    "filename": str(e.path),
                    "config": None,
                }
            )
        return out

    @router.get("/sd-vae")
    def sd_vae():
        return [{"model_name": e.name, "filename": str(e.path)} for e in engine.models.vaes()]

    @router.get("/motion-modules")
    def motion_modules():
        # AnimateDiff motion modules in models/AnimateDiff (alwayson_scripts.AnimateDiff.args[0].model)
        return [{"model_name": n, "filename": str(p)} for n, p in engine.motion_modules.entries().items()]

    @router.get("/loras")
    def loras():
        # the engine's LoRA library as of its last scan (startup or /refresh-loras), as A1111 lists it
        return [
            {"name": e.name, "alias": e.alias, "path": str(e.path), "metadata": e.metadata}
            for e in engine.networks.entries()
        ]

    @router.get("/embeddings")
    def embeddings():
        # A1111: "loaded" fit the current model's text encoders, "skipped" do not; unreadable files are left out
        model = engine.current_model
        lib = engine.embeddings
        out: dict[str, dict[str, Any]] = {"loaded": {}, "skipped": {}}
        for e in lib.entries():
            if e.error:
                continue
            item = {
                "step": e.step,
                "sd_checkpoint": None,
                "sd_checkpoint_name": e.checkpoint,
                "shape": e.shape,
                "vectors": e.vectors,
            }
            out["loaded" if model is None or lib.fits(e.name, model) else "skipped"][e.name] = item
        return out

    @router.get("/prompt-styles")
    def prompt_styles():
        if ctx.styles is None:
            return []
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in ctx.styles.styles()]

    @router.get("/hypernetworks")
    def hypernetworks():
        return []

    @router.post("/interrogate")
    def interrogate():
        # A1111 captions with CLIP/BLIP or DeepBooru weights it downloads on first use; we ship none and
        # never download, so say so instead of a bare 404
        return JSONResponse(
            status_code=501,
            content={
                "error": "NotAvailable",
                "detail": "no interrogator is installed: CLIP/BLIP and DeepBooru weights are not shipped and "
                "nothing is downloaded",
            },
        )

    @router.get("/face-restorers")
    def face_restorers():
        return []

    @router.get("/realesrgan-models")
    def realesrgan_models():
        return [
            {"name": u["name"], "path": u["model_path"], "scale": u["scale"]}
            for u in ctx.upscalers.infos()
            if u["model_path"] and Path(u["model_path"]).parent.name == "RealESRGAN"
        ]

    @router.get("/scripts")
    def scripts():
        return {"txt2img": script_names("txt2img"), "img2img": script_names("img2img")}

    @router.get("/script-info")
    def script_info():
        return jsonable_encoder(script_infos(engine))

    @router.get("/extensions")
    def extensions():
        found = getattr(ctx.service, "extensions", None) or ctx.flags.get("extensions_info") or []
        return jsonable_encoder(list(found))

    @router.get("/memory")
    def memory():
        return _memory()

    # ---- model management ------------------------------------------------------------------------------
    @router.post("/refresh-checkpoints")
    async def refresh_checkpoints():
        await in_thread(ctx, engine.refresh_models)
        await in_thread(ctx, ctx.upscalers.refresh)
        return None

    @router.post("/refresh-vae")
    async def refresh_vae():
        await in_thread(ctx, engine.refresh_models)
        return None

    @router.post("/refresh-loras")
    async def refresh_loras():
        await in_thread(ctx, engine.networks.refresh)
        return None

    @router.post("/refresh-embeddings")
    async def refresh_embeddings():
        await in_thread(ctx, engine.embeddings.refresh)
        return None

    @router.post("/unload-checkpoint")
    async def unload_checkpoint():
        await in_thread(ctx, ctx.service.run_task, lambda _c: engine.unload(), "unload-model")
        return None

    @router.post("/reload-checkpoint")
    async def reload_checkpoint():
        await in_thread(ctx, ctx.service.run_task, lambda _c: engine.load_checkpoint(None), "load-model")
        return None

    return router


# A1111's schedule types: its lower-case name, default rho and whether it reads the model's own sigmas
_SCHEDULE_FACTS = {
    "Uniform": ("uniform", -1.0, True),
    "Karras": ("karras", 7.0, False),
    "Polyexponential": ("polyexponential", 1.0, False),
    "SGM Uniform": ("sgm_uniform", -1.0, True),
    "Simple": ("simple", -1.0, True),
    "Normal": ("normal", -1.0, True),
    "DDIM": ("ddim", -1.0, True),
    "Beta": ("beta", -1.0, True),
}


def _schedule_entry(label: str) -> dict[str, Any]:
    """One `/schedulers` entry in A1111's shape (name is the lower-case id, label what the UI shows)."""
    name, rho, inner = _SCHEDULE_FACTS.get(label, (label.lower().replace(" ", "_"), -1.0, False))
    return {
        "name": name,
        "label": label,
        "aliases": ["SGMUniform"] if name == "sgm_uniform" else None,
        "default_rho": rho,
        "need_inner_model": inner,
    }


def _memory() -> dict[str, Any]:
    """RAM and CUDA memory in bytes, in A1111's shape."""
    out: dict[str, Any] = {}
    try:
        import psutil

        vm = psutil.virtual_memory()
        out["ram"] = {"free": vm.available, "used": vm.total - vm.available, "total": vm.total}
    except Exception as exc:  # psutil missing or unsupported platform
        out["ram"] = {"error": str(exc)}
    try:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            stats = torch.cuda.memory_stats()
            out["cuda"] = {
                "system": {"free": free, "used": total - free, "total": total},
                "active": {
                    "current": stats.get("active_bytes.all.current", 0),
                    "peak": stats.get("active_bytes.all.peak", 0),
                },
                "allocated": {
                    "current": stats.get("allocated_bytes.all.current", 0),
                    "peak": stats.get("allocated_bytes.all.peak", 0),
                },
                "reserved": {
                    "current": stats.get("reserved_bytes.all.current", 0),
                    "peak": stats.get("reserved_bytes.all.peak", 0),
                },
                "inactive": {
                    "current": stats.get("inactive_split_bytes.all.current", 0),
                    "peak": stats.get("inactive_split_bytes.all.peak", 0),
                },
                "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
            }
        else:
            out["cuda"] = {"error": "CUDA is not available"}
    except Exception as exc:
        out["cuda"] = {"error": str(exc)}
    out["timestamp"] = time.time()
    return out
