"""The ControlNet extension: registers the "controlnet" conditioning type (up to `MAX_UNITS` units), its
preprocessors, its UI section and A1111's `/controlnet/*` helper routes.

Per job and unit (`prepare`, before denoising): find and load the model (cached), check it fits the
loaded base model, take the unit's image (or the img2img init image), preprocess it, resize it to the
output size and return a `ControlProvider`. Per step the provider runs the ControlNet on the UNet's
input batch and returns `down_block_additional_residuals` / `mid_block_additional_residual`, which the
loop adds to the UNet's skip connections. The loader calls it only inside the unit's guidance window.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ldm_core.extension_api import (
    ApiRoute,
    ConditioningType,
    ExtensionContext,
    Job,
    ModelCache,
    ModelFileError,
    RequestError,
    Step,
    UISection,
    builtin_models_dir,
    decode_image,
    load_state_dict,
    pil_to_tensor,
    resize_to,
    ui_fields,
)

from . import adapters, annotators, control_models, preprocessors
from .units import CONTROL_MODES, DEFAULT_PROCESSOR_RES, ControlNetUnit, infotext_value, units_from_infotext

MAX_UNITS = 3
#: "My prompt is more important": of SD's 13 residuals, residual k (0 = shallowest, middle block last) is
#: scaled by SOFT**(12-k): the middle block at full weight, the shallowest at about 0.1.
SOFT = 0.825
SOFT_TOP = 12


def control_scales(n: int, weight: float, mode: str) -> list[float]:
    """Per-residual multipliers for `n` ControlNet outputs (down residuals then the middle one). The soft
    modes spread SD's 13-step ramp over the model's own residuals (SDXL has 10, small models fewer), as
    diffusers' guess mode does (a log ramp from 0.1 to 1): the middle block always at full weight. Counting
    12-k from a 13-residual model's end instead would leave a shallower model's middle block at a fraction."""
    if mode == CONTROL_MODES[0] or n < 2:
        return [weight] * n
    return [weight * SOFT ** (SOFT_TOP * (n - 1 - k) / (n - 1)) for k in range(n)]


def pixel_perfect_resolution(image: Image.Image, width: int, height: int, resize_mode: str) -> int:
    """The preprocessor resolution at which the control map's pixels map 1:1 onto the output: the short
    side of the image scaled as the resize mode will scale it ("Resize and Fill" fits inside, the others
    cover)."""
    kh, kw = height / image.height, width / image.width
    k = min(kh, kw) if resize_mode == "Resize and Fill" else max(kh, kw)
    return max(1, round(k * min(image.width, image.height)))


def fit_map(control: Image.Image, width: int, height: int, resize_mode: str) -> Image.Image:
    """Resize a control map to the output size. Binary maps (edges, scribbles) are area-averaged and
    re-thresholded low (any pixel a line crosses stays a line), so thin lines survive downscaling; other
    maps use Lanczos."""
    if control.size == (width, height):
        return control.convert("RGB")
    if np.isin(np.asarray(control.convert("L")), (0, 255)).all():
        return _box_resize(control, width, height, resize_mode).point(lambda v: 255 if v > 8 else 0)
    return resize_to(control, width, height, resize_mode)


def _box_resize(control: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    img = control.convert("RGB")
    if mode == "Just Resize":
        return img.resize((width, height), Image.BOX)
    if mode == "Crop and Resize":
        return ImageOps.fit(img, (width, height), Image.BOX, centering=(0.5, 0.5))
    ratio = min(width / img.width, height / img.height)
    w, h = max(1, round(img.width * ratio)), max(1, round(img.height * ratio))
    canvas = Image.new("RGB", (width, height))
    canvas.paste(img.resize((w, h), Image.BOX), ((width - w) // 2, (height - h) // 2))
    return canvas


def is_adapter(entry: control_models.ControlModelEntry, allow_pickle: bool) -> bool:
    """Whether a scanned model is a T2I-Adapter (by its config's class, or by its weights' key names)."""
    if entry.kind == "diffusers":
        try:
            cfg = json.loads((entry.path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return cfg.get("_class_name") == adapters.CLASS_NAME
    try:
        if entry.weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(entry.weights), "pt") as f:
                return adapters.is_adapter_state(dict.fromkeys(f.keys()))
        return adapters.is_adapter_state(load_state_dict(entry.weights, allow_pickle=allow_pickle))
    except Exception:  # unreadable (corrupt, truncated, a pickle not allowed): the ControlNet loader says why
        return False


class ControlProvider:
    """Runs one ControlNet every step. `hint`: (1, 3, H, W) control map in [0, 1] on the UNet's device;
    `scales`: one multiplier per residual; `cond_only`: skip the unconditional rows (their residuals are
    zero)."""

    def __init__(self, model, hint: torch.Tensor, scales: list[float], cond_only: bool, latent_scale: int = 8) -> None:
        self.model = model
        self.latent_scale = latent_scale
        self.hint = hint
        self.scales = scales
        self.cond_only = cond_only
        self.in_channels = int(model.config.in_channels)
        self.sdxl = model.config.get("addition_embed_type") == "text_time"

    def __call__(self, step: Step) -> dict | None:
        x = step.x_in
        if x.shape[1] != self.in_channels:
            x = x[:, : self.in_channels]
        rows = x.shape[0]
        start = step.batch_size if self.cond_only and step.has_uncond else 0
        xs, ctx = x[start:], step.encoder_hidden_states[start:]
        added = None
        if self.sdxl and step.added_cond_kwargs:
            added = {k: v[start:] for k, v in step.added_cond_kwargs.items()}
        hint = self.hint
        size = (x.shape[-2] * self.latent_scale, x.shape[-1] * self.latent_scale)
        if hint.shape[-2:] != size:  # e.g. a hires pass at another size
            hint = F.interpolate(hint.float(), size=size, mode="bilinear", align_corners=False).to(hint.dtype)
        down, mid = self.model(
            xs,
            step.timestep,
            encoder_hidden_states=ctx,
            controlnet_cond=hint.expand(xs.shape[0], -1, -1, -1),
            conditioning_scale=1.0,
            added_cond_kwargs=added,
            return_dict=False,
        )
        res = [r * s for r, s in zip((*down, mid), self.scales, strict=True)]
        if start:
            res = [torch.cat([torch.zeros((start, *r.shape[1:]), dtype=r.dtype, device=r.device), r]) for r in res]
        assert res[0].shape[0] == rows
        return {"down_block_additional_residuals": tuple(res[:-1]), "mid_block_additional_residual": res[-1]}


class ControlNet:
    """The extension's state: model folders, the model cache (via `ctx.cache`) and file hashes."""

    def __init__(self, ctx: ExtensionContext) -> None:
        self.ctx = ctx
        self.hashes = control_models.HashCache()
        # the folder listing by (folders, allow_pickle): scanned once, not per job; rescanned by the model list
        # (the API route, the UI's choices/refresh) and when a job names a model the listing does not hold
        self._listing: dict[tuple, list[control_models.ControlModelEntry]] = {}
        self._listing_lock = threading.Lock()
        # canny & co., then the ones that run a local model (depth, normal, segmentation: annotators.py)
        self.preprocessors = preprocessors.ALL + annotators.preprocessors(
            lambda: ctx.model_dirs, ModelCache(size=2), ctx.allow_pickle
        )

    # ---- models -------------------------------------------------------------------------------------
    def dirs(self, job: Job | None = None) -> list[Path]:
        dirs = list((job.model_dirs if job else self.ctx.model_dirs).get("ControlNet", ()))
        shipped = builtin_models_dir() / "ControlNet"
        if shipped not in dirs:
            dirs.append(shipped)
        return dirs

    def entries(self, job: Job | None = None, *, rescan: bool = False) -> list[control_models.ControlModelEntry]:
        """The ControlNets in the folders: the cached listing, or a fresh scan with `rescan` (or the first time)."""
        allow = job.allow_pickle if job else self.ctx.allow_pickle
        dirs = self.dirs(job)
        key = (tuple(str(d) for d in dirs), allow)
        with self._listing_lock:
            listing = None if rescan else self._listing.get(key)
        if listing is None:
            listing = control_models.scan(dirs, allow_pickle=allow)
            with self._listing_lock:
                self._listing[key] = listing
        return listing

    def model_names(self) -> list[str]:
        """The names the model list shows, from a fresh scan (A1111's `/controlnet/model_list` rescans too)."""
        return [e.name for e in self.entries(rescan=True)]

    def find(self, query: str, job: Job | None, field: str) -> control_models.ControlModelEntry:
        """The model `query` names, from the cached listing; a name it lacks (or whose file is gone) rescans
        the folders once before the RequestError."""
        entries = self.entries(job)
        for attempt in range(2):
            for e in entries:
                if e.matches(query) and e.weights.is_file():
                    return e
            if attempt == 0:
                entries = self.entries(job, rescan=True)
        raise RequestError(
            field,
            f"ControlNet model {query!r} not found in {[str(d) for d in self.dirs(job)]}; "
            f"available: {[e.name for e in entries] or 'none'}",
        )

    def title(self, entry: control_models.ControlModelEntry) -> str:
        return f"{entry.name} [{self.hashes.short(entry)}]"

    def load(self, entry: control_models.ControlModelEntry, job: Job):
        st = entry.weights.stat()
        key = (str(entry.weights), st.st_size, st.st_mtime_ns, str(job.device), str(job.dtype))

        def build():
            if is_adapter(entry, job.allow_pickle):
                return adapters.load_adapter(entry, job.unet_config, allow_pickle=job.allow_pickle).to(
                    device=job.device, dtype=job.dtype
                )
            model = control_models.load_controlnet(entry, job.unet_config, allow_pickle=job.allow_pickle)
            model.to(device=job.device, dtype=job.dtype)
            if job.device.type == "cuda":  # channels-last like the engine's UNet on CUDA (faster convolutions)
                model.to(memory_format=torch.channels_last)
            return model

        try:
            return self.ctx.cache.get(key, build)
        except (ValueError, OSError, ModelFileError) as exc:  # ModelFileError: corrupt/truncated/LFS-pointer file
            raise RequestError("alwayson_scripts.controlnet", f"cannot load ControlNet {entry.name!r}: {exc}") from None

    # ---- per job ------------------------------------------------------------------------------------
    def control_map(self, unit: ControlNetUnit, image: Image.Image, width: int, height: int, field: str) -> Image.Image:
        """The unit's preprocessed control map at the output size."""
        pre = self.ctx.all_preprocessors.get(unit.module) or self.ctx.all_preprocessors.get(unit.module.casefold())
        if pre is None:
            raise RequestError(
                field + ".module",
                f"unknown preprocessor {unit.module!r}; available: {sorted(set(self.ctx.all_preprocessors))}",
            )
        res = unit.processor_res if unit.processor_res > 0 else DEFAULT_PROCESSOR_RES
        if unit.pixel_perfect:
            res = pixel_perfect_resolution(image, width, height, unit.resize_mode)
        detected = pre(image, res, unit.threshold_a, unit.threshold_b)
        return fit_map(detected, width, height, unit.resize_mode)

    def prepare(self, job: Job, unit: ControlNetUnit, index: int) -> ControlProvider:
        field = f"alwayson_scripts.controlnet.args[{index}]"
        if not unit.has_model:
            raise RequestError(field + ".model", f"ControlNet unit {index}: choose a model")
        image = unit.image if unit.image is not None else job.init_image
        if image is None:
            raise RequestError(field + ".image", f"ControlNet unit {index} has no image (txt2img needs one)")
        entry = self.find(unit.model, job, field + ".model")
        model = self.load(entry, job)
        adapter = type(model).__name__ == adapters.CLASS_NAME  # a T2I-Adapter in a ControlNet unit
        if adapter:
            adapters.check_fits(model, job.unet_config, job.family, entry.name, job.model_name, field + ".model")
        else:
            control_models.check_fits(
                model.config, job.unet_config, job.family, entry.name, job.model_name, field + ".model"
            )
            hint_factor = 2 ** (len(model.config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)) - 1)
            if hint_factor != job.latent_scale:  # its hint encoder must shrink the image to the latent size
                raise RequestError(
                    field + ".model",
                    f"ControlNet {entry.name!r} reads its control image at 1/{hint_factor} of the image size but the "
                    f"loaded model {job.model_name!r} works at 1/{job.latent_scale} (its VAE's factor): choose a "
                    "ControlNet made for this model",
                )
        cmap = self.control_map(unit, image, job.width, job.height, field)
        hint = pil_to_tensor(cmap).to(device=job.device, dtype=job.dtype)
        cond_only = unit.control_mode == CONTROL_MODES[2]
        self.ctx.log.debug("unit %d: %s, %s, %dx%d", index, entry.name, unit.module, job.width, job.height)
        if adapter:
            return adapters.AdapterProvider(model, hint, unit.weight, cond_only, job.latent_scale)
        scales = control_scales(len(model.controlnet_down_blocks) + 1, unit.weight, unit.control_mode)
        return ControlProvider(model, hint, scales, cond_only, job.latent_scale)

    # ---- infotext -----------------------------------------------------------------------------------
    def to_infotext(self, units: list[tuple[int, ControlNetUnit]]) -> dict[str, str]:
        out = {}
        for index, unit in units:
            title = unit.model
            try:
                title = self.title(self.find(unit.model, None, "model"))
            except (RequestError, OSError):
                pass
            pre = self.ctx.all_preprocessors.get(unit.module)
            a, b = unit.threshold_a, unit.threshold_b
            if pre is not None:
                a = pre.threshold_a.default if pre.threshold_a and a < 0 else a
                b = pre.threshold_b.default if pre.threshold_b and b < 0 else b
            res = unit.processor_res if unit.processor_res > 0 else DEFAULT_PROCESSOR_RES
            out[f"ControlNet {index}"] = infotext_value(unit, title, a, b, res)
        return out

    # ---- API helpers (A1111's /controlnet/* routes) ------------------------------------------------
    def api_model_list(self, _body=None) -> dict:
        return {"model_list": self.model_names()}

    def api_module_list(self, _body=None) -> dict:
        detail = {}
        for p in self.preprocessors:
            sliders = [s for s in (p.threshold_a, p.threshold_b) if s is not None]
            detail[p.name] = {
                "model_free": not p.needs_model,
                "sliders": [
                    {"name": s.label, "value": s.default, "min": s.minimum, "max": s.maximum, "step": s.step}
                    for s in sliders
                ],
            }
        return {"module_list": [p.name for p in self.preprocessors], "module_detail": detail}

    def api_detect(self, body) -> dict:
        body = body or {}
        module = body.get("controlnet_module", "none")
        pre = self.ctx.all_preprocessors.get(module)
        if pre is None:
            raise RequestError("controlnet_module", f"unknown preprocessor {module!r}")
        res = int(body.get("controlnet_processor_res", DEFAULT_PROCESSOR_RES) or DEFAULT_PROCESSOR_RES)
        out = []
        for i, raw in enumerate(body.get("controlnet_input_images") or []):
            try:
                image = decode_image(raw)
            except ValueError as exc:
                raise RequestError(f"controlnet_input_images[{i}]", str(exc)) from None
            detected = pre(
                image, res, float(body.get("controlnet_threshold_a", -1)), float(body.get("controlnet_threshold_b", -1))
            )
            buf = io.BytesIO()
            detected.save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        return {"images": out, "info": "Success"}


def register(ctx: ExtensionContext) -> None:
    cn = ControlNet(ctx)
    for p in cn.preprocessors:
        ctx.add_preprocessor(p)
    fields = ui_fields(
        ControlNetUnit,
        defaults={"enabled": False},
        choices={
            "module": lambda: sorted({p.name for p in ctx.all_preprocessors.values()}),
            "model": lambda: ["None", *cn.model_names()],
        },
    )
    ctx.add_conditioning(
        ConditioningType(
            name="controlnet",
            title="ControlNet",
            params=ControlNetUnit,
            prepare=cn.prepare,  # type: ignore[arg-type]
            max_units=MAX_UNITS,
            families=("sd1", "sd2", "sdxl"),
            ui=UISection("controlnet", "ControlNet", fields, units=MAX_UNITS),
            to_infotext=cn.to_infotext,  # type: ignore[arg-type]
            from_infotext=units_from_infotext,
            applies_weight=True,
        )
    )
    ctx.add_api_route(ApiRoute("GET", "/controlnet/version", lambda _b: {"version": 2}, "ControlNet API version"))
    ctx.add_api_route(ApiRoute("GET", "/controlnet/model_list", cn.api_model_list, "ControlNet models"))
    ctx.add_api_route(ApiRoute("GET", "/controlnet/module_list", cn.api_module_list, "Preprocessors"))
    ctx.add_api_route(ApiRoute("POST", "/controlnet/detect", cn.api_detect, "Run a preprocessor"))
