"""Typed, validated request objects: one per job. The UI, the REST API and the CLI all build these, with
the A1111 parameter names, and the engine accepts nothing else.

Validation errors are raised as `RequestError`, whose message names the field and the allowed values.
Images are PIL images in RGB (init images) or L (masks); the API layer decodes base64 before building a
request.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .video.options import AnimateDiffArgs

MAX_SIDE = 2048  # the UI sliders' range (the UI's max_side limit)
MAX_PIXELS = 2048 * 2048  # the default pixel limit (--max-pixels)
DEFAULT_MAX_BATCH_SIZE = 16  # the default batch size limit (--max-batch-size)
DEFAULT_MAX_STEPS = 1000  # the default steps limit (--max-steps; 10**9 steps would allocate GBs of sigmas)
MAX_CFG_SCALE = 100.0  # |cfg_scale| above this only overflows the latents to inf/NaN (1e30 makes a NaN image)
MIN_SIDE = 64
DEFAULT_SAMPLER = "Euler a"  # a request's sampler when it names none and its model recommends none
MAX_NATIVE_SIDE = 1024  # the largest native size of a supported family (SDXL): what an unset width/height may run at
MAX_SEED = 2**64 - 1  # any seed torch's generator takes, used as given (A1111); -1 or any negative = random

ResizeMode = Literal["Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)"]
RESIZE_MODES: tuple[str, ...] = ResizeMode.__args__  # index = A1111's integer resize_mode
InpaintFill = Literal["fill", "original", "latent noise", "latent nothing"]
INPAINT_FILLS: tuple[str, ...] = InpaintFill.__args__  # index = A1111's integer inpainting_fill


def sampling_choice(
    sampler: str | None, schedule: str | None, recommended: tuple[str | None, str | None]
) -> tuple[str, str | None]:
    """(sampler, schedule type) to run: the named sampler with the named schedule type, or where no sampler is
    named, the `recommended` (sampler, schedule type) pair of the model (its sidecar's), the sampler falling back
    to DEFAULT_SAMPLER and the recommended schedule type taking the place of "Automatic" only."""
    if sampler is not None:
        return sampler, schedule
    rec_sampler, rec_schedule = recommended
    automatic = (schedule or "Automatic").lower() == "automatic"
    return rec_sampler or DEFAULT_SAMPLER, (rec_schedule if rec_schedule and automatic else schedule)


class RequestError(ValueError):
    """A bad request value. `field` is the request field name, `message` says what is allowed."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def _describe(model: type[BaseModel], name: str) -> str:
    """The allowed range of a field, from its declared constraints, e.g. 'an integer from 1 to 150'."""
    info = model.model_fields.get(name)
    if info is None:
        return ""
    lo = hi = mult = None
    for m in info.metadata:
        lo = getattr(m, "ge", None) if getattr(m, "ge", None) is not None else lo
        hi = getattr(m, "le", None) if getattr(m, "le", None) is not None else hi
        mult = getattr(m, "multiple_of", None) or mult
    parts = []
    if lo is not None and hi is not None:
        parts.append(f"allowed: {lo} to {hi}")
    elif lo is not None:
        parts.append(f"allowed: at least {lo}")
    elif hi is not None:
        parts.append(f"allowed: at most {hi}")
    if mult:
        parts.append(f"a multiple of {mult}")
    return "; ".join(parts)


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _first_error(model: type[BaseModel], exc: ValidationError) -> RequestError:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if not isinstance(p, int)]
    msg = err.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    field = ".".join(loc) if loc else "request"  # a nested option: "animatediff.fps"
    if not loc:  # a whole-request check: its message starts with the field it is about
        first = msg.split(" ", 1)[0]
        if first in model.model_fields:
            field = first
    allowed = _describe(model, field)
    got = err.get("input")
    text = msg
    if allowed:
        text += f" ({allowed})"
    if got is not None and not isinstance(got, dict | Image.Image) and len(repr(got)) < 80:
        text += f"; got {got!r}"
    return RequestError(field, text)


class _Request(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _no_nan_or_broken_text(cls, data: Any) -> Any:
        # bad input (issue 16): NaN passes every `<`/`>` range check, and a lone surrogate (JSON "\ud800")
        # breaks the tokenizer and the PNG text chunk deep inside the job; refuse both here, naming the field
        if isinstance(data, dict):
            for key, value in data.items():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, float) and math.isnan(item):
                        raise ValueError(f"{key} must be a number, not NaN")
                    if isinstance(item, str) and not _valid_unicode(item):
                        raise ValueError(f"{key} holds a lone UTF-16 surrogate (e.g. \\ud800): not valid Unicode")
        return data

    @classmethod
    def build(cls, **values: Any):
        """Validate `values` and return the request, or raise RequestError naming the first bad field."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise _first_error(cls, exc) from None


class GenerationRequest(_Request):
    """txt2img parameters; img2img and inpaint extend it. Names and meanings follow A1111."""

    mode: Literal["txt2img", "img2img", "inpaint"] = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    model: str | None = None  # checkpoint name as listed; None = the current (or default) model
    vae: str | None = None  # None / "Automatic" = the checkpoint's own VAE; a name from models/VAE
    # None: the model's recommended sampling (its sidecar's sampler_name and scheduler), else DEFAULT_SAMPLER
    sampler_name: str | None = None
    scheduler: str = "Automatic"  # schedule type (A1111 >= 1.9)
    steps: int = Field(20, ge=1)
    cfg_scale: float = Field(7.0, ge=-MAX_CFG_SCALE, le=MAX_CFG_SCALE)
    # CFG rescale (pipeline.loop.rescale_guidance; Forge's "Rescale CFG", diffusers' guidance_rescale): 0 = plain
    # CFG; None = the model's recommendation (its sidecar's rescale_cfg, else 0). Also read from the A1111
    # extensions' alwayson_scripts (see _rescale_cfg_script)
    rescale_cfg: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="CFG rescale 0..1 (Forge's 'Rescale CFG'; 0 = plain CFG); null = the model's recommendation "
        "(its sidecar's rescale_cfg, else 0). Also read from alwayson_scripts RescaleCFG / CFG Rescale Extension",
    )
    # None: the model's native size; the engine rounds other sizes down to a multiple of the model's VAE factor
    # (LoadedModel.work_size; A1111 works at size // 8 latents), so a request keeps the size as sent
    width: int | None = Field(None, ge=MIN_SIDE)
    height: int | None = Field(None, ge=MIN_SIDE)
    seed: int = Field(-1, le=MAX_SEED)  # -1 (any negative) = random
    subseed: int = Field(-1, le=MAX_SEED)  # variation seed
    subseed_strength: float = 0.0  # <= 0: no variation; >= 1: the variation seed's noise
    seed_resize_from_w: int = 0  # <= 0 (A1111 sends -1) = off
    seed_resize_from_h: int = 0
    batch_size: int = Field(1, ge=1)  # images per denoising batch (servers cap it: see api limits)
    n_iter: int = Field(1, ge=1)  # batch count
    eta: float | None = None  # ancestral/DDIM noise; None = sampler default
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0
    clip_skip: int = Field(1, ge=1, le=12)
    emphasis: Literal["Original", "No norm"] = "Original"
    # hires fix (txt2img only); used once the upscaler registry provides upscalers
    enable_hr: bool = False
    hr_scale: float = 2.0  # checked only when enable_hr (A1111 sends 0 with hires off)
    hr_upscaler: str = Field(
        "Latent",
        description="A latent mode (/sdapi/v1/latent-upscale-modes; an unknown 'Latent ...' name runs 'Latent') or "
        "an upscaler from /sdapi/v1/upscalers. A model upscaler this server does not have ('R-ESRGAN 4x+', "
        "'4x-UltraSharp': a name with a scale or an upscaler family; nothing is downloaded) falls back to an "
        "installed one of the same scale, else Lanczos, with a warning in info; other unknown names are refused",
    )
    hr_second_pass_steps: int = 0  # 0 = same as steps
    hr_resize_x: int = 0  # 0 = by hr_scale
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None
    hr_prompt: str | None = None
    hr_negative_prompt: str | None = None
    denoising_strength: float = 0.7  # hires pass (txt2img) or img2img strength; 0..1 checked when used
    save_images: bool = True
    # per-extension arguments, keyed by extension name (A1111's alwayson_scripts)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    # -- A1111 generation fields the engine honours (issue 14) --
    tiling: bool = False  # seamless textures: circular padding in the UNet and VAE convolutions
    restore_faces: bool | None = None  # accepted; no face restorer offline, `info` says it was not applied
    s_min_uncond: float = Field(0.0, ge=0.0)  # A1111's NGMS: skip every other uncond pass below this sigma
    disable_extra_networks: bool = False  # <lora:...> tags are stripped from the prompt but not applied
    hr_checkpoint_name: str | None = None  # hires pass checkpoint; None/""/"Use same checkpoint" = same
    hr_scheduler: str | None = None  # hires pass schedule type; None/""/"Use same scheduler" = same
    refiner_checkpoint: str | None = None  # continue the run with this checkpoint; None/""/"None" = off
    refiner_switch_at: float | None = Field(None, ge=0.0, le=1.0)  # share of the run before the switch
    # -- A1111 options that act per job (the options store fills them: ldm_core.options) --
    eta_noise_seed_delta: int = Field(0, ge=0)  # ENSD: step noise (ancestral/SDE) re-seeded with seed + delta
    img2img_fix_steps: bool = False  # img2img runs exactly `steps` (over a longer schedule), not steps x strength
    sdxl_crop_top: int = Field(0, ge=0)  # SDXL micro-conditioning crop coordinates (add_time_ids)
    sdxl_crop_left: int = Field(0, ge=0)
    # SDXL refiner micro-conditioning (ldm_core.prompts.time_ids): aesthetic score of the prompt / negative prompt
    sdxl_refiner_high_aesthetic_score: float = 6.0
    sdxl_refiner_low_aesthetic_score: float = 2.5
    token_merging_ratio: float = Field(0.0, ge=0.0, le=1.0)  # accepted; not implemented, `info` says so
    # -- video (issue 19): a clip instead of images, frames as the batch (ldm_core.video); A1111 clients send it
    # as alwayson_scripts {"AnimateDiff": {"args": [{...}]}} (sd-webui-animatediff's API), lifted here --
    animatediff: AnimateDiffArgs | None = None

    @model_validator(mode="before")
    @classmethod
    def _animatediff_script(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("animatediff") is not None:
            return data
        for key, _name, args in _alwayson_args(data, ("animatediff",)):
            first = args[0] if isinstance(args, list | tuple) and args else None
            if isinstance(first, dict) and first.get("enable", True):
                data = {**data, "animatediff": first}
            elif first is not None and not isinstance(first, dict):
                raise ValueError(f"alwayson_scripts.{key}.args[0] must be an object of AnimateDiff options")
        return data

    @model_validator(mode="before")
    @classmethod
    def _rescale_cfg_script(cls, data: Any) -> Any:
        """`rescale_cfg` from the alwayson_scripts that A1111-family clients send it in, when the request does
        not set it: Forge's built-in "RescaleCFG" (args [phi]), the A1111 "CFG Rescale Extension" (args
        [phi, ddim_trailing]; the DDIM flag is not read: the schedule type picks the timestep spacing here)
        and "RescaleCFG for reForge" (args [enabled, phi])."""
        if not isinstance(data, dict) or data.get("rescale_cfg") is not None:
            return data
        for key, name, args in _alwayson_args(data, _RESCALE_SCRIPTS):
            if not isinstance(args, list | tuple) or not args:
                continue
            if name == "rescalecfg for reforge":
                if len(args) < 2:
                    raise ValueError(f"alwayson_scripts.{key}.args must be [enabled, multiplier]")
                return {**data, "rescale_cfg": args[1] if args[0] else 0.0}
            return {**data, "rescale_cfg": args[0]}
        return data

    @field_validator("sampler_name")
    @classmethod
    def _nonempty_sampler(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must name a sampler (or be null: the model's recommended one)")
        return v.strip() if v is not None else None

    @model_validator(mode="after")
    def _used_fields(self):
        # A1111 looks at a feature's fields only when the feature is on (clients send hr_scale 0 with
        # enable_hr false, and denoising_strength of any value for a plain txt2img)
        if self.mode == "txt2img" and self.enable_hr:
            if self.hr_resize_x < 0 or self.hr_resize_y < 0:
                raise ValueError("hr_resize_x and hr_resize_y must be 0 (use hr_scale) or a size in pixels")
            if not (self.hr_resize_x or self.hr_resize_y) and self.hr_scale <= 0:
                raise ValueError(f"hr_scale must be above 0 when enable_hr is on; got {self.hr_scale}")
            if self.hr_second_pass_steps < 0:
                raise ValueError("hr_second_pass_steps must be 0 (same as steps) or more")
        if self.mode != "txt2img" or self.enable_hr:
            if self.denoising_strength < 0.0:
                raise ValueError(f"denoising_strength must be from 0 to 1; got {self.denoising_strength}")
            if self.denoising_strength > 1.0:  # A1111 runs min(strength, 0.999) of the steps: a full denoise
                self.__dict__["denoising_strength"] = 1.0
        return self


_RESCALE_SCRIPTS = ("rescalecfg", "cfg rescale extension", "rescalecfg for reforge")


def _alwayson_args(data: dict, names: tuple[str, ...]) -> Iterator[tuple[Any, str, Any]]:
    """(key as sent, its lowercase name, its args) of each `alwayson_scripts` entry whose name, in any case,
    is in `names`; args are the entry's "args", or the entry itself when a client sends a bare list."""
    scripts = data.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        return
    for key, value in scripts.items():
        name = str(key).lower()
        if name in names:
            yield key, name, value.get("args") if isinstance(value, dict) else value


def _choice_by_index(v, choices: tuple[str, ...]):
    """A1111 sends some choices as their index: an int `v` becomes `choices[v]` (ValueError naming the range);
    anything else is left for the field's own check."""
    if isinstance(v, int):
        if not 0 <= v < len(choices):
            raise ValueError(f"must be 0..{len(choices) - 1} or one of {list(choices)}")
        return choices[v]
    return v


class Img2ImgRequest(GenerationRequest):
    """img2img: `init_images` (RGB; the first is used, or one per batch image) noised by
    `denoising_strength` (0 keeps the image, 1 ignores it)."""

    mode: Literal["txt2img", "img2img", "inpaint"] = "img2img"
    init_images: list[Image.Image] = Field(min_length=1)
    denoising_strength: float = 0.75
    resize_mode: ResizeMode = "Just resize"
    image_cfg_scale: float | None = None
    initial_noise_multiplier: float = 1.0  # scales the noise the init latents get (A1111's "Noise multiplier")

    @field_validator("resize_mode", mode="before")
    @classmethod
    def _resize_index(cls, v):
        return _choice_by_index(v, RESIZE_MODES)

    @field_validator("init_images")
    @classmethod
    def _rgb(cls, v: list[Image.Image]) -> list[Image.Image]:
        return [im.convert("RGB") for im in v]


class InpaintRequest(Img2ImgRequest):
    """Inpainting: `mask` (white = repaint) has the init image's size."""

    mode: Literal["txt2img", "img2img", "inpaint"] = "inpaint"
    mask: Image.Image
    mask_blur: int | None = None  # when given, sets both axes (as in A1111)
    mask_blur_x: int = 4  # Gaussian blur of the mask, horizontal (A1111); <= 0 = none
    mask_blur_y: int = 4  # and vertical
    inpainting_fill: InpaintFill = "original"
    inpaint_full_res: bool = False  # "Only masked"
    inpaint_full_res_padding: int = 32  # <= 0 = none
    inpainting_mask_invert: bool = False

    @field_validator("inpainting_fill", mode="before")
    @classmethod
    def _fill_index(cls, v):
        return _choice_by_index(v, INPAINT_FILLS)

    @field_validator("mask_blur", "mask_blur_x", "mask_blur_y", "inpaint_full_res_padding")
    @classmethod
    def _no_negative(cls, v: int | None) -> int | None:
        return None if v is None else max(0, v)  # A1111 blurs/pads only for values above 0

    @field_validator("mask")
    @classmethod
    def _gray(cls, v: Image.Image) -> Image.Image:
        if v.mode in ("RGBA", "LA"):
            # a painted mask from a browser canvas: the alpha channel holds the strokes
            alpha = v.getchannel("A")
            if alpha.getextrema() != (255, 255):
                return alpha
        return v.convert("L")

    @property
    def mask_blur_xy(self) -> tuple[int, int]:
        """The (horizontal, vertical) mask blur: `mask_blur` for both when given, else the two axes."""
        if self.mask_blur is not None:
            return self.mask_blur, self.mask_blur
        return self.mask_blur_x, self.mask_blur_y

    @model_validator(mode="after")
    def _mask_size(self):
        # A1111 resizes the mask with the image; a mask of another size is stretched onto the first image
        size = self.init_images[0].size
        if self.mask.size != size:
            self.__dict__["mask"] = self.mask.resize(size, Image.Resampling.LANCZOS)
        return self


AnyRequest = GenerationRequest | Img2ImgRequest | InpaintRequest


# ---- protective limits ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestLimits:
    """Protective limits of one server or UI (A1111 has none; a shared machine needs some), checked by
    `check_limits` before a job is queued. `max_pixels` caps width x height of every image a job makes
    (the hires target and the seed-resize noise included); `max_batch_size` caps images per denoising batch;
    `max_steps` caps steps and hr_second_pass_steps; `max_side` (None: no cap) caps each side, as the UI's
    sliders do. `flags` name the setting in messages."""

    max_pixels: int = MAX_PIXELS
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_steps: int = DEFAULT_MAX_STEPS
    max_side: int | None = None
    where: str = "this server"
    flags: tuple[tuple[str, str], ...] = (
        ("max_pixels", "--max-pixels"),
        ("max_batch_size", "--max-batch-size"),
        ("max_steps", "--max-steps"),
    )


def _hires_size(request: GenerationRequest, width: int, height: int) -> tuple[int, int]:
    """The hires fix's target size as A1111 computes it."""
    rx, ry = request.hr_resize_x, request.hr_resize_y
    if not rx and not ry:
        return int(width * request.hr_scale), int(height * request.hr_scale)
    if not ry:
        return rx, rx * height // width
    if not rx:
        return ry * width // height, ry
    return max(rx, ry * width // height), max(ry, rx * height // width)


def check_limits(request: GenerationRequest, limits: RequestLimits) -> None:
    """RequestError naming the field and the setting when `request` is over one of `limits`."""
    flags = dict(limits.flags)

    def over(field: str, what: str, setting: str, value: int) -> RequestError:
        how = f" (set with {flags[setting]})" if setting in flags else ""
        return RequestError(field, f"{what} is over {limits.where}'s limit {setting} = {value}{how}")

    if request.batch_size > limits.max_batch_size:
        raise over("batch_size", str(request.batch_size), "max_batch_size", limits.max_batch_size)
    for field in ("steps", "hr_second_pass_steps"):
        if getattr(request, field) > limits.max_steps:
            raise over(field, str(getattr(request, field)), "max_steps", limits.max_steps)
    sizes = []
    # issue 16: an unset side is the model's native size, unknown before it loads; count the largest a
    # supported family has (a null width/height had skipped the pixel limit: a 512x512 job under a 64x64 cap)
    width, height = request.width or MAX_NATIVE_SIDE, request.height or MAX_NATIVE_SIDE
    sizes.append(("height" if request.width and not request.height else "width", width, height))
    unset = "" if request.width and request.height else f" (an unset side counts as {MAX_NATIVE_SIDE}: native size)"
    if request.mode == "txt2img" and request.enable_hr:
        field = "hr_scale" if not (request.hr_resize_x or request.hr_resize_y) else "hr_resize_x"
        sizes.append((field, *_hires_size(request, width, height)))
    if request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0:
        sizes.append(("seed_resize_from_w", request.seed_resize_from_w, request.seed_resize_from_h))
    for field, w, h in sizes:
        if limits.max_side is not None and max(w, h) > limits.max_side:
            side = field if field != "width" or w > limits.max_side else "height"
            raise over(side, f"{w}x{h}", "max_side", limits.max_side)
        if w * h > limits.max_pixels:
            note = unset if (field, w, h) == sizes[0] else ""
            raise over(field, f"{w}x{h} = {w * h} pixels{note}", "max_pixels", limits.max_pixels)
