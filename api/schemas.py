"""Pydantic models of the REST API: A1111 `/sdapi/v1` request and response shapes, and the native jobs API.

The generation request models are derived from the engine's typed requests (`ldm_core.generation_requests`): every
engine field keeps its name, type and range (e.g. `steps` with minimum 1; no upper bounds A1111 does not impose:
a server's limits are settings, see api/common.py), and a new engine field appears in the API without an edit
here. Images travel as base64 text.

The A1111 models are as liberal as A1111 (whose pydantic-1 models coerce): unknown keys are ignored, `null`
means the default, numbers and booleans may come as strings, a number with a fraction is truncated for an
integer field and a number is taken as text for a text field. Their defaults are A1111's declared defaults
(`A1111_TXT2IMG_DEFAULTS`, `A1111_IMG2IMG_DEFAULTS`: steps 50, 512x512, sampler_index "Euler", ...), and
`a1111_parameters` echoes a request the way A1111 does, those defaults and types included, so typed clients
decode it. The native `JobRequest` is strict (an unknown key is a 422 naming it). `a1111_engine_values` /
`native_engine_values` then `build_engine_request` turn either into a validated engine request.
"""

from __future__ import annotations

import copy
import math
import types
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from PIL import Image
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    create_model,
    model_validator,
)
from pydantic.fields import FieldInfo

from ldm_core.extras import MAX_OUTPUT_SIDE, MAX_UPSCALE
from ldm_core.generation_requests import (
    INPAINT_FILLS,
    RESIZE_MODES,
    GenerationRequest,
    Img2ImgRequest,
    InpaintFill,
    InpaintRequest,
    RequestError,
    ResizeMode,
)
from ldm_core.options import checked_overrides, request_values

from .images import decode_image


def _by_index(names: tuple[str, ...]):
    """A before-validator accepting A1111's integer index for a named choice."""

    def convert(value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < len(names):
                raise ValueError(f"must be 0..{len(names) - 1} or one of {list(names)}")
            return names[value]
        return value

    return BeforeValidator(convert)


def _index_or_name_schema(names: tuple[str, ...]) -> WithJsonSchema:
    return WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0, "maximum": len(names) - 1},
                {"type": "string", "enum": list(names)},
            ]
        }
    )


ResizeModeIn = Annotated[ResizeMode, _by_index(RESIZE_MODES), _index_or_name_schema(RESIZE_MODES)]
InpaintFillIn = Annotated[InpaintFill, _by_index(INPAINT_FILLS), _index_or_name_schema(INPAINT_FILLS)]
_IMAGE_FIELDS = ("init_images", "mask")


def _mentions_image(annotation: Any) -> bool:
    if annotation is Image.Image:
        return True
    return any(_mentions_image(a) for a in typing.get_args(annotation))


def _accepts_none(annotation: Any) -> bool:
    """Whether `annotation` admits None (None, Any, or a union with one of them; not a dict of Any)."""
    if annotation is None or annotation is type(None) or annotation is Any:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, Annotated):
        return any(_accepts_none(a) for a in typing.get_args(annotation))
    return False


def _engine_fields(model: type[BaseModel], skip: tuple[str, ...] = ()) -> dict[str, tuple[Any, FieldInfo]]:
    """The engine request's fields (name -> (annotation, FieldInfo copy)), leaving out `mode`, images and
    `skip`."""
    out = {}
    for name, info in model.model_fields.items():
        if name == "mode" or name in skip or name in _IMAGE_FIELDS or _mentions_image(info.annotation):
            continue
        out[name] = (info.annotation, copy.copy(info))
    return out


def _is_int_field(annotation: Any) -> bool:
    if annotation is int:
        return True
    args = typing.get_args(annotation)
    return bool(args) and int in args and all(a in (int, type(None)) for a in args)


# -- bad input (issue 16): JSON's "\ud800" escapes decode to lone surrogates that no encoder (tokenizer,
# PNG text chunk, UTF-8) accepts; refuse them up front, naming the key, instead of failing inside the job --
def _surrogate_path(value: Any, path: str) -> str | None:
    """The path ("prompt", "styles[1]", "override_settings.x") of the first text holding a lone surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        sub = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
        found = _surrogate_path(item, sub)
        if found:
            return found
    return None


def _refuse_lone_surrogates(data: Any) -> None:
    found = _surrogate_path(data, "")
    if found:
        raise ValueError(f"{found}: text holds a lone UTF-16 surrogate (e.g. \\ud800), which is not valid Unicode")


class _Tolerant(BaseModel):
    """A1111-style body: unknown keys ignored, `null` means "use the default", a number is accepted as text
    and a float with a fraction as an integer (truncated), as A1111's pydantic-1 models do."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, coerce_numbers_to_str=True)

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_default(cls, data: Any) -> Any:
        _refuse_lone_surrogates(data)
        if isinstance(data, dict):
            fields = cls.model_fields
            out = {}
            for k, v in data.items():
                info = fields.get(k)
                if info is not None and v is None and not _accepts_none(info.annotation):
                    continue
                if (
                    info is not None
                    and isinstance(v, float)
                    and math.isfinite(v)
                    and not v.is_integer()
                    and _is_int_field(info.annotation)
                ):
                    v = int(v)
                out[k] = v
            return out
        return data


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        _refuse_lone_surrogates(data)
        return data


#: How upscaler names this server lacks are treated (upscaler_1/upscaler_2; hr_upscaler says the same).
UPSCALER_FALLBACK_DOC = (
    "A name from /sdapi/v1/upscalers. A model upscaler this server does not have (e.g. 'R-ESRGAN 4x+', "
    "'4x-UltraSharp', 'ESRGAN_4x', 'SwinIR_4x': names with a scale or an upscaler family; nothing is "
    "downloaded) falls back to an installed model upscaler of the same scale, else Lanczos, with a warning "
    "(html_info for extras); any other unknown name is a 422 listing the choices"
)


# ---- A1111 fields that are not engine fields ------------------------------------------------------------
_A1111_COMMON: dict[str, Any] = {
    "sampler_name": (
        str | None,
        Field(
            None,
            description="Sampler label, e.g. 'Euler a' or 'DPM++ 2M'; "
            "old combined names such as 'DPM++ 2M Karras' work",
        ),
    ),
    "sampler_index": (
        str | None,
        Field("Euler", description="Old name of sampler_name (used when it is unset; A1111's default)"),
    ),
    "s_tmax": (float | None, Field(None, description="Sigma tmax; null or 0 = infinity")),
    "save_images": (bool, Field(False, description="Save to the outputs folder (A1111's API default: no)")),
    "send_images": (bool, Field(True, description="Return the images in the response")),
    "do_not_save_samples": (bool, False),
    "do_not_save_grid": (bool, False),
    "override_settings": (
        dict[str, Any] | None,
        Field(
            None,
            description="Any /sdapi/v1/options key for this request only (sd_model_checkpoint, sd_vae, "
            "CLIP_stop_at_last_layers, eta_ancestral, s_min_uncond, ...); a checkpoint or VAE this server lacks "
            "falls back to the current one with a warning in info",
        ),
    ),
    "override_settings_restore_afterwards": (
        bool,
        Field(True, description="false: keep override_settings afterwards (saved like POST /sdapi/v1/options)"),
    ),
    "script_name": (
        str | None,
        Field(None, description="A1111 script title, any case (GET /sdapi/v1/scripts lists them)"),
    ),
    "script_args": (list[Any], Field(default_factory=list, description="The script's arguments, A1111's order")),
    "alwayson_scripts": (
        dict[str, Any],
        Field(
            default_factory=dict,
            description='Extension arguments by extension name: {"name": {"args": [...]}}',
        ),
    ),
    "firstphase_width": (int, 0),
    "firstphase_height": (int, 0),
    "force_task_id": (str | None, None),
    "infotext": (str | None, None),
}
_IMG2IMG_EXTRA: dict[str, Any] = {
    "init_images": (list[str] | None, Field(None, description="Base64 images, bare or data: URLs")),
    "mask": (str | None, Field(None, description="Base64 mask (white = repaint); makes this an inpaint")),
    "resize_mode": (ResizeModeIn, Field(0, description=f"Index or name: {list(RESIZE_MODES)}")),
    "inpainting_fill": (InpaintFillIn, Field(0, description=f"Index or name: {list(INPAINT_FILLS)}")),
    "include_init_images": (bool, Field(False, description="Echo init_images and mask in `parameters`")),
}


# ---- A1111's declared defaults (its processing classes' signatures plus the API's additions, A1111 1.10) ----
# `parameters` echoes every one of these keys, with these values and types when the client did not send it.
A1111_COMMON_DEFAULTS: dict[str, Any] = {
    "prompt": "",
    "negative_prompt": "",
    "styles": None,
    "seed": -1,
    "subseed": -1,
    "subseed_strength": 0,
    "seed_resize_from_h": -1,
    "seed_resize_from_w": -1,
    "sampler_name": None,
    "scheduler": None,
    "batch_size": 1,
    "n_iter": 1,
    "steps": 50,
    "cfg_scale": 7.0,
    "width": 512,
    "height": 512,
    "restore_faces": None,
    "tiling": None,
    "do_not_save_samples": False,
    "do_not_save_grid": False,
    "eta": None,
    "denoising_strength": 0.75,
    "s_min_uncond": None,
    "s_churn": None,
    "s_tmax": None,
    "s_tmin": None,
    "s_noise": None,
    "override_settings": None,
    "override_settings_restore_afterwards": True,
    "refiner_checkpoint": None,
    "refiner_switch_at": None,
    "disable_extra_networks": False,
    "firstpass_image": None,
    "comments": None,
    "force_task_id": None,
    "sampler_index": "Euler",
    "script_name": None,
    "script_args": [],
    "send_images": True,
    "save_images": False,
    "alwayson_scripts": {},
    "infotext": None,
}
A1111_TXT2IMG_DEFAULTS: dict[str, Any] = {
    **A1111_COMMON_DEFAULTS,
    "enable_hr": False,
    "firstphase_width": 0,
    "firstphase_height": 0,
    "hr_scale": 2.0,
    "hr_upscaler": None,
    "hr_second_pass_steps": 0,
    "hr_resize_x": 0,
    "hr_resize_y": 0,
    "hr_checkpoint_name": None,
    "hr_sampler_name": None,
    "hr_scheduler": None,
    "hr_prompt": "",
    "hr_negative_prompt": "",
}
A1111_IMG2IMG_DEFAULTS: dict[str, Any] = {
    **A1111_COMMON_DEFAULTS,
    "init_images": None,
    "resize_mode": 0,
    "image_cfg_scale": None,
    "mask": None,
    "mask_blur_x": 4,
    "mask_blur_y": 4,
    "mask_blur": None,
    "mask_round": True,
    "inpainting_fill": 0,
    "inpaint_full_res": True,
    "inpaint_full_res_padding": 0,
    "inpainting_mask_invert": 0,
    "initial_noise_multiplier": None,
    "latent_mask": None,
    "include_init_images": False,
}


def _with_default(annotation: Any, info: FieldInfo, value: Any) -> tuple[Any, FieldInfo]:
    """The field with A1111's default `value` (its annotation widened to accept None when that is it)."""
    info = copy.copy(info)
    info.default = copy.deepcopy(value)
    info.default_factory = None
    info._attributes_set = {k: v for k, v in info._attributes_set.items() if k != "default_factory"}
    info._attributes_set["default"] = info.default
    if value is None and not _accepts_none(annotation):
        annotation = annotation | None
    return annotation, info


def _a1111_model(
    name: str, engine_model: type[BaseModel], extra: dict[str, Any], defaults: dict[str, Any], doc: str
) -> type[BaseModel]:
    fields = _engine_fields(engine_model, skip=tuple(extra) + tuple(_A1111_COMMON))
    fields.update(_A1111_COMMON)
    fields.update(extra)
    for key, value in defaults.items():
        if key in fields:
            annotation, info = fields[key]
            if not isinstance(info, FieldInfo):
                info = Field(info)
            fields[key] = _with_default(annotation, info, value)
    return create_model(name, __base__=_Tolerant, __doc__=doc, **fields)


StableDiffusionTxt2ImgProcessingAPI = _a1111_model(
    "StableDiffusionTxt2ImgProcessingAPI",
    GenerationRequest,
    {},
    A1111_TXT2IMG_DEFAULTS,
    "A1111 txt2img request, with A1111's defaults. Unknown keys are ignored; null means the default.",
)
StableDiffusionImg2ImgProcessingAPI = _a1111_model(
    "StableDiffusionImg2ImgProcessingAPI",
    InpaintRequest,
    _IMG2IMG_EXTRA,
    A1111_IMG2IMG_DEFAULTS,
    "A1111 img2img request, with A1111's defaults; with `mask` it inpaints. Unknown keys are ignored; null "
    "means the default.",
)

JobMode = Literal["txt2img", "img2img", "inpaint"]
JobRequest = create_model(
    "JobRequest",
    __base__=_Strict,
    __doc__="A native job: the engine's request fields; `mode` defaults to txt2img, or img2img/inpaint when "
    "init_images/mask are given. Unknown keys are refused.",
    mode=(JobMode | None, None),
    **_engine_fields(InpaintRequest, skip=(*_IMG2IMG_EXTRA, "s_tmax")),
    s_tmax=_A1111_COMMON["s_tmax"],
    init_images=(list[str], Field(default_factory=list, description="Base64 images, bare or data: URLs")),
    mask=(str | None, Field(None, description="Base64 mask (white = repaint)")),
    resize_mode=(ResizeModeIn, Field("Just resize", description=f"Index or name: {list(RESIZE_MODES)}")),
    inpainting_fill=(InpaintFillIn, Field("original", description=f"Index or name: {list(INPAINT_FILLS)}")),
)


# ---- turning a body into an engine request -------------------------------------------------------------
def _override(
    settings: dict[str, Any], values: dict[str, Any], options: Mapping[str, Any], set_fields: set[str]
) -> None:
    """Apply A1111 options to engine values: the request's override_settings over the saved `options`
    (`ldm_core.options.request_values` says which option fills which field and which side wins). A bad
    override value raises RequestError naming `override_settings.<key>`; unknown and read-only keys are
    left to the caller (api/overrides.py reports them)."""
    explicit = {k for k in set_fields if values.get(k) is not None}
    extra, _skipped = request_values(options, checked_overrides(settings), explicit, values.get("sampler_name"))
    values.update(extra)


def a1111_engine_values(
    body: BaseModel,
    options: dict[str, Any] | None = None,
    recommend: Callable[[str | None], tuple[str | None, str | None]] | None = None,
) -> dict[str, Any]:
    """Engine request values from an A1111 txt2img/img2img body (images decoded). `options` are the saved
    settings (sd_vae, CLIP_stop_at_last_layers) that apply when the request does not say otherwise.
    `recommend(model)` (`Engine.recommended_sampling`) says whether the model recommends a sampling: a body
    that names no sampler then runs it (the engine's sampler None), else A1111's default (sampler_index)."""
    options = options or {}
    data = body.model_dump(warnings=False)
    set_fields = set(body.model_fields_set)
    engine_fields = InpaintRequest.model_fields
    # A1111's None defaults (styles, s_churn, hr_upscaler, ...) mean "the engine's default"
    values = {
        k: v
        for k, v in data.items()
        if k in engine_fields and (v is not None or _accepts_none(engine_fields[k].annotation))
    }
    values["sampler_name"] = (
        data.get("sampler_name") or data.get("sampler_index") or GenerationRequest.model_fields["sampler_name"].default
    )
    if not data.get("s_tmax"):  # A1111: 0 or null means infinity
        values.pop("s_tmax", None)
    values["save_images"] = bool(data.get("save_images")) and not data.get("do_not_save_samples")
    for key in ("hr_sampler_name", "hr_prompt", "hr_negative_prompt"):
        if values.get(key) == "":
            values[key] = None
    # script_name / script_args: run by api/sdapi.py through ldm_core.scripts (not engine values)
    _override(data.get("override_settings") or {}, values, options, set_fields)
    named = data.get("sampler_name") or ("sampler_index" in set_fields and data.get("sampler_index"))
    if not named and recommend is not None and any(recommend(values.get("model"))):
        values["sampler_name"] = None  # the model's recommended sampling (Engine.sampling)
    _decode_images(data, values)
    return values


def a1111_parameters(body: BaseModel, img2img: bool) -> dict[str, Any]:
    """`parameters` of an A1111 response: the request as A1111 echoes it. Every key A1111 declares, with its
    default and type where the client sent nothing (`subseed_strength: 0`, `seed_resize_from_h: -1`, ...),
    resize_mode, inpainting_fill and inpainting_mask_invert as integers, our own fields only when sent, and
    no init images or mask unless include_init_images."""
    defaults = A1111_IMG2IMG_DEFAULTS if img2img else A1111_TXT2IMG_DEFAULTS
    sent = body.model_fields_set
    out = copy.deepcopy(defaults)
    for key, value in body.model_dump(warnings=False).items():
        if key in defaults or key in sent:
            out[key] = value
    for key, names in (("resize_mode", RESIZE_MODES), ("inpainting_fill", INPAINT_FILLS)):
        if isinstance(out.get(key), str) and out[key] in names:
            out[key] = names.index(out[key])
    if isinstance(out.get("inpainting_mask_invert"), bool):
        out["inpainting_mask_invert"] = int(out["inpainting_mask_invert"])
    if img2img and not out.get("include_init_images"):
        out["init_images"] = None
        out["mask"] = None
    return out


_INFO_ECHOES = ("subseed_strength", "cfg_scale", "denoising_strength", "seed_resize_from_w", "seed_resize_from_h")


def a1111_info(info: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    """`info` with A1111's types: where it repeats a request value (subseed_strength, cfg_scale, ...), the
    number has the type the request echo has (A1111 copies them from the request: `subseed_strength: 0`
    stays an integer, which typed clients decode as u32), and the keys A1111 always sends are present."""
    for key in _INFO_ECHOES:
        sent = parameters.get(key)
        if key not in info:
            info[key] = sent
        elif isinstance(sent, int | float) and isinstance(info[key], int | float) and info[key] == sent:
            info[key] = sent
    info.setdefault("extra_generation_params", {})
    return info


def native_engine_values(body: BaseModel) -> tuple[dict[str, Any], JobMode]:
    """Engine request values and the mode of a native JobRequest (images decoded)."""
    data = body.model_dump()
    values = {k: v for k, v in data.items() if k in InpaintRequest.model_fields and k != "mode"}
    if not data.get("s_tmax"):
        values.pop("s_tmax", None)
    _decode_images(data, values)
    mode = data.get("mode") or (
        "inpaint" if values.get("mask") is not None else "img2img" if values.get("init_images") else "txt2img"
    )
    if mode != "txt2img" and not values.get("init_images"):
        raise RequestError("init_images", f"mode {mode!r} needs at least one init image")
    if mode == "inpaint" and values.get("mask") is None:
        raise RequestError("mask", "mode 'inpaint' needs a mask")
    if mode == "txt2img" and values.get("init_images"):
        raise RequestError("mode", "txt2img takes no init_images; use mode 'img2img' or 'inpaint'")
    return values, mode


def _decode_images(data: dict[str, Any], values: dict[str, Any]) -> None:
    if data.get("init_images"):
        values["init_images"] = [decode_image(s, f"init_images[{i}]") for i, s in enumerate(data["init_images"])]
    else:
        values.pop("init_images", None)
    if data.get("mask"):
        values["mask"] = decode_image(data["mask"], "mask")
    else:
        values.pop("mask", None)


def build_engine_request(values: dict[str, Any], mode: JobMode | None = None) -> GenerationRequest:
    """The validated engine request for `values`; the class follows `mode` (default: from the images).
    Raises RequestError naming the first bad field."""
    if mode is None:
        mode = "inpaint" if values.get("mask") is not None else "img2img" if values.get("init_images") else "txt2img"
    cls = {"txt2img": GenerationRequest, "img2img": Img2ImgRequest, "inpaint": InpaintRequest}[mode]
    if mode == "img2img":
        values = {k: v for k, v in values.items() if k != "mask"}
    return cls.build(**{k: v for k, v in values.items() if k in cls.model_fields})


# ---- responses -----------------------------------------------------------------------------------------
class ImageResponse(BaseModel):
    images: list[str] = Field(description="Base64 PNGs carrying their infotext")
    parameters: dict[str, Any]
    info: str = Field(description="A JSON string: seed, all_seeds, infotexts, sampler_name, steps, ...")


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    worker: str | None = Field(None, description="Ray pool: the replica (host:pid) running the job; None in-process")


class ProgressResponse(BaseModel):
    progress: float = Field(description="0..1 of the current job")
    eta_relative: float = Field(description="Seconds left (estimate)")
    state: ProgressState
    current_image: str | None = Field(None, description="Base64 PNG of the live preview")
    textinfo: str | None = None
    current_task: str | None = None


class ExtrasBase(_Tolerant):
    """Extras settings (A1111 names). Face restoration fields are accepted and ignored (none installed)."""

    resize_mode: Literal[0, 1] = Field(0, description="0: scale by upscaling_resize; 1: to upscaling_resize_w/h")
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0.0, ge=0.0, le=1.0)
    codeformer_visibility: float = Field(0.0, ge=0.0, le=1.0)
    codeformer_weight: float = Field(0.0, ge=0.0, le=1.0)
    upscaling_resize: float = Field(2.0, gt=0.0, le=MAX_UPSCALE, description="Factor (resize_mode 0)")
    upscaling_resize_w: int = Field(512, ge=0, le=MAX_OUTPUT_SIDE, description="Pixels (resize_mode 1)")
    upscaling_resize_h: int = Field(512, ge=0, le=MAX_OUTPUT_SIDE, description="Pixels (resize_mode 1)")
    upscaling_crop: bool = True
    upscaler_1: str = Field("None", description=UPSCALER_FALLBACK_DOC)
    upscaler_2: str = Field("None", description=UPSCALER_FALLBACK_DOC)
    extras_upscaler_2_visibility: float = Field(0.0, ge=0.0, le=1.0)
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasBase):
    image: str = Field(description="Base64 image, bare or a data: URL")


class FileData(_Tolerant):
    data: str = Field(description="Base64 image, bare or a data: URL")
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasBase):
    imageList: list[FileData] = Field(min_length=1)  # noqa: N815 (A1111's name)


class ExtrasSingleImageResponse(BaseModel):
    html_info: str = ""
    image: str


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str = ""
    images: list[str]


class PNGInfoRequest(_Tolerant):
    image: str = Field(description="Base64 image, bare or a data: URL")


class PNGInfoResponse(BaseModel):
    info: str = Field(description="The raw infotext")
    items: dict[str, Any] = Field(description="Other text chunks")
    parameters: dict[str, Any] = Field(description="The parsed infotext: Prompt, Negative prompt, Steps, ...")


class JobCreated(BaseModel):
    id: str
    state: str
    position: int
