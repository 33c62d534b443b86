"""The public, versioned extension API: the only `ldm_core` module an extension may import.

An extension is a folder `extensions/<name>/` with an `extension.toml` manifest and an entry module that
defines `register(ctx: ExtensionContext) -> None`. Through `ctx` it registers what it adds:

- conditioning types (`ConditioningType`): typed per-unit parameters (a pydantic model deriving from
  `UnitParams`), a `prepare(job, unit, index)` that returns a per-step provider of extra UNet inputs
  (`down_block_additional_residuals`, `mid_block_additional_residual`, ...) and/or a CFG hook; several
  units (and several types) chain, their residuals are summed by the denoising loop;
- preprocessors (`Preprocessor`: image -> control map), samplers (`SamplerInfo` + factory), upscalers,
  post-processors (`PostProcessor`), infotext keys (on the conditioning type or post-processor), UI
  sections (`UISection`: a declarative list of typed `UIField`s the UI turns into components) and extra
  HTTP routes (`ApiRoute`, mounted by the API layer).

Parameters reach an extension the same way from the UI and from the REST API: A1111's
`alwayson_scripts: {"<name>": {"args": [...]}}` (each arg a unit object, or positional values of one
unit in field order) or a dict of named args; they are validated into the type's pydantic model.

Versioning: `API_VERSION` is semver. A manifest's `api_version = "1.0"` means "1.0 or any later 1.x";
a change that breaks extensions bumps the major version. Nothing here patches library classes.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

import numpy as np
import torch
from PIL import Image, ImageOps
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from .config import BUILTIN_MODEL_DIR
from .generation_requests import RequestError
from .models.loading import ModelFileError
from .models.loading import load_state_dict as _load_state_dict
from .models.suffixes import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, WEIGHT_SUFFIXES
from .pipeline.loop import CfgHook
from .pipeline.loop import StepState as Step
from .schedulers import SCHEDULE_TYPES, SamplerFactory, SamplerInfo

API_VERSION = "1.0.0"

__all__ = [
    "API_VERSION",
    "ApiRoute",
    "CfgHook",
    "ConditioningType",
    "ExtensionContext",
    "ExtensionError",
    "ImageInput",
    "Job",
    "ModelCache",
    "ModelFileError",
    "PICKLE_SUFFIXES",
    "PostProcessor",
    "Preprocessor",
    "RequestError",
    "SAFETENSORS_SUFFIXES",
    "SCHEDULE_TYPES",
    "SamplerFactory",
    "SamplerInfo",
    "Slider",
    "Step",
    "UIField",
    "UISection",
    "UnitHooks",
    "UnitParams",
    "WEIGHT_SUFFIXES",
    "builtin_models_dir",
    "decode_image",
    "format_number",
    "load_state_dict",
    "parse_units",
    "pil_to_tensor",
    "resize_to",
    "ui_fields",
    "unet_residual_shapes",
]


class ExtensionError(Exception):
    """An extension cannot do what was asked (not the request's fault); the message is shown to users."""


# ----------------------------------------------------------------------------------------------------------
# files and images


def load_state_dict(path: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a weights file, on the CPU, through the project's one safe loading choke point:
    `.safetensors` always; pickle files (`.ckpt/.pt/.pth/.bin`) only with `allow_pickle` (pass
    `job.allow_pickle`) and then with `torch.load(weights_only=True)`. Raises `ModelFileError`."""
    return _load_state_dict(path, allow_pickle=allow_pickle)


def builtin_models_dir() -> Path:
    """The project's shipped `models/` folder (holds `builtin/`, and e.g. `ControlNet/` for shipped
    control models); extensions may look for their shipped weights in a subfolder."""
    return BUILTIN_MODEL_DIR.parent


def decode_image(value: Any) -> Image.Image | None:
    """An image from what the UI or an API client sends: a PIL image, a base64 string (bare or a
    `data:image/...;base64,` URL), a dict `{"image": ..., "mask": ...}` (A1111's ControlNet shape; the mask
    is ignored), or a numpy array (H, W[, C]) of uint8. None, "" and {} give None. Returns RGB."""
    if value is None:
        return None
    if isinstance(value, dict):
        inner = value.get("image") if "image" in value else value.get("background")
        return decode_image(inner) if inner is not None else None
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, np.ndarray):
        arr = value
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if text.startswith("data:"):
            text = text.split(",", 1)[-1]
        try:
            raw = base64.b64decode(text, validate=False)
            with Image.open(io.BytesIO(raw)) as im:
                return im.convert("RGB")
        except Exception:
            raise ValueError("not a readable base64 image") from None
    raise ValueError(f"expected an image (base64 string or picture), got {type(value).__name__}")


#: A pydantic field type for images: accepts everything `decode_image` does, holds an RGB PIL image or None.
ImageInput = Annotated[Any, BeforeValidator(decode_image), Field(json_schema_extra={"ui": "image"})]


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a float tensor (1, 3, H, W) in [0, 1] (the value range control models take)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def resize_to(image: Image.Image, width: int, height: int, mode: str, fill: int = 0) -> Image.Image:
    """Resize a control map to `width` x `height` pixels. `mode`: "Just Resize" stretches; "Crop and Resize"
    scales to cover and centre-crops; "Resize and Fill" scales to fit and pads the bars with grey level
    `fill` (0 = black, "no control" for edge maps). Case-insensitive."""
    m = mode.lower()
    image = image.convert("RGB")
    if m == "just resize":
        return image.resize((width, height), Image.LANCZOS)
    if m == "crop and resize":
        return ImageOps.fit(image, (width, height), Image.LANCZOS, centering=(0.5, 0.5))
    if m == "resize and fill":
        ratio = min(width / image.width, height / image.height)
        w, h = max(1, round(image.width * ratio)), max(1, round(image.height * ratio))
        canvas = Image.new("RGB", (width, height), (fill, fill, fill))
        canvas.paste(image.resize((w, h), Image.LANCZOS), ((width - w) // 2, (height - h) // 2))
        return canvas
    raise ValueError(f"unknown resize mode {mode!r}")


def unet_residual_shapes(
    unet_config: Mapping[str, Any], latent_height: int, latent_width: int
) -> tuple[list[tuple[int, int, int]], tuple[int, int, int]]:
    """(C, h, w) of each `down_block_additional_residuals` entry and of the `mid_block_additional_residual`
    for a UNet config (diffusers' UNet2DConditionModel) at a latent size: the conv_in output, then per level
    one per resnet and one after each downsampler."""
    ch = list(unet_config["block_out_channels"])
    lpb = unet_config["layers_per_block"]
    h, w = latent_height, latent_width
    down = [(ch[0], h, w)]
    for i, c in enumerate(ch):
        for _ in range(lpb[i] if isinstance(lpb, list | tuple) else lpb):
            down.append((c, h, w))
        if i < len(ch) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            down.append((c, h, w))
    return down, (ch[-1], h, w)


def format_number(v: float) -> int | float:
    """7.0 -> 7, 0.35000001 -> 0.35: numbers as A1111 writes them in infotext."""
    return int(v) if float(v).is_integer() else round(float(v), 4)


# ----------------------------------------------------------------------------------------------------------
# typed parameters


class UnitParams(BaseModel):
    """Fields every conditioning unit has; extensions subclass it with their own typed fields.

    The loader applies these itself so every conditioning type behaves alike: a unit with `enabled` False
    is dropped; outside `guidance_start <= step fraction <= guidance_end` (fraction = step index / steps,
    0 at the first step) its provider is not called; residual outputs are multiplied by `weight` (unless
    the type sets `applies_weight`). Unknown keys are ignored (A1111 clients send many). `FIELD_ORDER`
    (optional) fixes the order of positional args and UI fields; default: declaration order.
    """

    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True, validate_assignment=True)
    FIELD_ORDER: ClassVar[tuple[str, ...]] = ()

    enabled: bool = Field(True, json_schema_extra={"label": "Enable"})
    weight: float = Field(1.0, ge=0.0, le=2.0, json_schema_extra={"label": "Weight", "step": 0.05})
    guidance_start: float = Field(
        0.0, ge=0.0, le=1.0, json_schema_extra={"label": "Starting step (fraction)", "step": 0.01}
    )
    guidance_end: float = Field(
        1.0, ge=0.0, le=1.0, json_schema_extra={"label": "Ending step (fraction)", "step": 0.01}
    )

    @model_validator(mode="after")
    def _window(self):
        if self.guidance_end < self.guidance_start:
            raise ValueError("guidance_end must not be smaller than guidance_start")
        return self

    @classmethod
    def field_order(cls) -> tuple[str, ...]:
        """Field names in positional-argument order."""
        names = [n for n in cls.FIELD_ORDER if n in cls.model_fields]
        return tuple(names + [n for n in cls.model_fields if n not in names])

    def active_at(self, fraction: float) -> bool:
        """Whether the unit acts at `fraction` (0..1) of the sampling run."""
        return self.guidance_start - 1e-9 <= fraction <= self.guidance_end + 1e-9


def _error_for(prefix: str, exc: ValidationError) -> RequestError:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    msg = err.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    got = err.get("input")
    if got is not None and not isinstance(got, dict | list | Image.Image) and len(repr(got)) < 80:
        msg += f"; got {got!r}"
    return RequestError(f"{prefix}.{loc}" if loc else prefix, msg)


def parse_units(params: type[UnitParams], raw: Any, *, name: str, max_units: int = 1) -> list[UnitParams]:
    """Validate an `alwayson_scripts[name]` value into unit objects.

    Accepted shapes: `{"args": [unit, unit, ...]}` where each unit is a dict of named fields (A1111's
    ControlNet shape) or an already built `params` object; `{"args": [v1, v2, ...]}` positional values
    of ONE unit in `params.field_order()`; `{"args": {named}}`; a dict of named fields without "args";
    or a bare list as "args". None entries are skipped. Raises `RequestError` naming
    `alwayson_scripts.<name>.args[i].<field>`."""
    prefix = f"alwayson_scripts.{name}"
    if raw is None:
        return []
    if isinstance(raw, BaseModel | Mapping) and not (isinstance(raw, Mapping) and "args" in raw):
        args: Any = [raw]
    elif isinstance(raw, Mapping):
        args = raw.get("args")
    else:
        args = raw
    if args is None:
        return []
    if isinstance(args, BaseModel | Mapping):
        args = [args]
    if not isinstance(args, list | tuple):
        raise RequestError(f"{prefix}.args", "must be a list of unit objects or of positional values")
    items = [a for a in args if a is not None]
    if items and not all(isinstance(a, BaseModel | Mapping) for a in items):
        order = params.field_order()
        if len(args) > len(order):
            raise RequestError(
                f"{prefix}.args", f"{len(args)} positional values but {name} takes at most {len(order)}: {list(order)}"
            )
        items = [dict(zip(order, args, strict=False))]
    if len(items) > max_units:
        raise RequestError(f"{prefix}.args", f"at most {max_units} units; got {len(items)}")
    units = []
    for i, item in enumerate(items):
        if isinstance(item, params):
            units.append(item)
            continue
        data = item.model_dump() if isinstance(item, BaseModel) else dict(item)
        try:
            units.append(params(**data))
        except ValidationError as exc:
            raise _error_for(f"{prefix}.args[{i}]", exc) from None
    return units


# ----------------------------------------------------------------------------------------------------------
# UI description

FieldKind = Literal["checkbox", "slider", "number", "text", "textarea", "dropdown", "radio", "image"]


@dataclass(frozen=True)
class UIField:
    """One input of an extension's UI section. `name` is the parameter name the value arrives under.

    `kind` picks the component; `minimum/maximum/step` apply to sliders and numbers; `choices` to
    dropdowns and radios: a tuple, or a callable returning the current list (e.g. model files; the UI
    calls it again on refresh). `default` is the UI's initial value."""

    name: str
    kind: FieldKind
    label: str = ""
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] | Callable[[], Sequence[str]] = ()
    info: str = ""

    def current_choices(self) -> list[str]:
        return list(self.choices() if callable(self.choices) else self.choices)


@dataclass(frozen=True)
class UISection:
    """An extension's accordion in the generation tabs. `units` > 1 repeats the fields in N sub-tabs
    ("Unit 0", "Unit 1", ...); the values of unit k arrive as the k-th unit object. `tabs` lists where the
    section shows ("txt2img", "img2img")."""

    name: str  # the alwayson_scripts key the values are sent under
    title: str
    fields: tuple[UIField, ...]
    tabs: tuple[str, ...] = ("txt2img", "img2img")
    units: int = 1
    open: bool = False

    def args_from_values(self, values: Sequence[Any]) -> dict[str, Any]:
        """Flat UI values (unit 0's fields in order, then unit 1's, ...) -> `{"args": [unit dicts]}`, the
        same shape an API client sends."""
        n = len(self.fields)
        if len(values) != n * self.units:
            raise ValueError(f"{self.name}: expected {n * self.units} values, got {len(values)}")
        units = [
            {f.name: v for f, v in zip(self.fields, values[k * n : (k + 1) * n], strict=True)}
            for k in range(self.units)
        ]
        return {"args": units}


def _field_kind(annotation: Any, extra: dict) -> tuple[str, tuple[str, ...]]:
    if "ui" in extra:
        kind = extra["ui"]
    else:
        kind = ""
    choices: tuple[str, ...] = ()
    ann = annotation
    if get_origin(ann) is Literal:
        choices = tuple(str(a) for a in get_args(ann))
    if kind:
        return kind, choices
    if choices:
        return "dropdown", choices
    if ann is bool:
        return "checkbox", ()
    if ann in (int, float):
        return "number", ()
    return "text", ()


def ui_fields(
    params: type[UnitParams],
    *,
    defaults: Mapping[str, Any] | None = None,
    choices: Mapping[str, tuple[str, ...] | Callable[[], Sequence[str]]] | None = None,
    hidden: Sequence[str] = (),
) -> tuple[UIField, ...]:
    """UI fields derived from a params model, so the UI and the API share one definition. Per field:
    Literal -> dropdown, bool -> checkbox, bounded number -> slider (else number), str -> text;
    `json_schema_extra` may set "ui" (kind), "label", "step", "info". `defaults` overrides UI start values
    (e.g. `enabled` False in the UI, True for API clients), `choices` supplies dynamic lists."""
    defaults = dict(defaults or {})
    choices = dict(choices or {})
    out = []
    for name in params.field_order():
        if name in hidden:
            continue
        info = params.model_fields[name]
        extra = dict(info.json_schema_extra or {}) if isinstance(info.json_schema_extra, dict) else {}
        kind, lit = _field_kind(info.annotation, extra)
        lo = hi = None
        for m in info.metadata:
            lo = getattr(m, "ge", None) if getattr(m, "ge", None) is not None else lo
            hi = getattr(m, "le", None) if getattr(m, "le", None) is not None else hi
        if kind == "number" and lo is not None and hi is not None:
            kind = "slider"
        default = defaults.get(name, None if info.is_required() else info.get_default(call_default_factory=True))
        out.append(
            UIField(
                name=name,
                kind=kind,  # type: ignore[arg-type]
                label=extra.get("label") or name.replace("_", " ").capitalize(),
                default=default,
                minimum=lo,
                maximum=hi,
                step=extra.get("step"),
                choices=choices.get(name, lit),
                info=extra.get("info", info.description or ""),
            )
        )
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------
# what a job looks like to an extension


@dataclass(frozen=True)
class Job:
    """What a conditioning type sees of one generation job, read-only.

    `width`/`height` are the output size in pixels; `latent_scale` pixels per latent (the VAE's factor: 8, or
    4 for a three-level VAE; a ControlNet hint is latent size x this); `family` is "sd1", "sd2" or "sdxl";
    `unet_config` the base UNet's diffusers config (block_out_channels, layers_per_block, cross_attention_dim,
    ...); `device`/`dtype` where and in which precision the UNet runs (put models there); `init_image` the
    img2img source (RGB) or None; `model_dirs` the user's model folders by A1111 folder name ("ControlNet",
    "Lora", "VAE", "Stable-diffusion"); `preprocessors` every registered preprocessor by name (all
    extensions'); `request` the typed request (prompt, steps, cfg_scale, alwayson_scripts, ...)."""

    request: Any
    mode: str
    family: str
    inpaint: bool
    prediction_type: str
    model_name: str
    model_hash: str
    unet_config: Mapping[str, Any]
    width: int
    height: int
    latent_scale: int
    batch_size: int
    steps: int
    cfg_scale: float
    device: torch.device
    dtype: torch.dtype
    init_image: Image.Image | None
    model_dirs: Mapping[str, tuple[Path, ...]]
    allow_pickle: bool
    preprocessors: Mapping[str, Preprocessor]


@dataclass
class UnitHooks:
    """What `prepare` may return instead of a bare provider: a UNet-input provider
    (`Step -> dict | None`), a CFG hook (`(step, uncond, conds, guided) -> guided`), or both."""

    unet_inputs: Callable[[Step], dict[str, Any] | None] | None = None
    cfg: CfgHook | None = None


PrepareFn = Callable[[Job, UnitParams, int], "UnitHooks | Callable[[Step], dict[str, Any] | None] | None"]


@dataclass(frozen=True)
class ConditioningType:
    """A new kind of conditioning, addressed as `alwayson_scripts[name]` (case-insensitive).

    `prepare(job, unit, index)` runs once per job and unit before denoising starts: load models, check
    that they fit `job.family` / `job.unet_config` (raise `RequestError` with a clear message if not),
    preprocess images; it returns a provider called every step with a `Step` (see
    `ldm_core.pipeline.loop.StepState`: `x_in` is the UNet input batch, groups of `batch_size` rows, the
    unconditional group first when `has_uncond`) that returns UNet keyword arguments, or None. A provider
    may return only one of `down_block_additional_residuals` / `mid_block_additional_residual` (the UNet
    needs both): the loader adds zeros for the other (shapes from `unet_residual_shapes`).
    `families`: base families the type supports (empty = all). `to_infotext(units)` returns infotext
    keys for the enabled units (with their original indices); `from_infotext(params)` reads them back into
    unit dicts (None when absent). `applies_weight`: the type uses `unit.weight` itself."""

    name: str
    params: type[UnitParams]
    prepare: PrepareFn
    title: str = ""
    max_units: int = 1
    families: tuple[str, ...] = ()
    ui: UISection | None = None
    to_infotext: Callable[[list[tuple[int, UnitParams]]], dict[str, str]] | None = None
    from_infotext: Callable[[Mapping[str, str]], list[dict[str, Any]] | None] | None = None
    applies_weight: bool = False


@dataclass(frozen=True)
class Slider:
    """A numeric preprocessor option shown as a slider (A1111's threshold_a / threshold_b)."""

    label: str
    default: float
    minimum: float
    maximum: float
    step: float = 1.0


@dataclass(frozen=True)
class Preprocessor:
    """Image -> control map. `fn(image, resolution, threshold_a, threshold_b)`: `image` RGB, `resolution`
    the short side to process at (pixels), thresholds already defaulted from the sliders; returns an RGB
    map (any size; the caller resizes it to the output size). `aliases`: other accepted names."""

    name: str
    fn: Callable[[Image.Image, int, float, float], Image.Image]
    label: str = ""
    aliases: tuple[str, ...] = ()
    threshold_a: Slider | None = None
    threshold_b: Slider | None = None
    uses_resolution: bool = True
    needs_model: bool = False  # runs a model from a local folder (A1111's module_detail "model_free": false)

    def __call__(
        self, image: Image.Image, resolution: int = 512, threshold_a: float = -1, threshold_b: float = -1
    ) -> Image.Image:
        a = self.threshold_a.default if self.threshold_a and threshold_a < 0 else threshold_a
        b = self.threshold_b.default if self.threshold_b and threshold_b < 0 else threshold_b
        return self.fn(image.convert("RGB"), int(resolution), float(a), float(b))


@dataclass(frozen=True)
class PostProcessor:
    """Runs on finished images when `alwayson_scripts[name]` has an enabled unit: `fn(images, job,
    params) -> images` (same count, RGB). `to_infotext(params)` adds infotext keys."""

    name: str
    params: type[UnitParams]
    fn: Callable[[list[Image.Image], Job, UnitParams], list[Image.Image]]
    title: str = ""
    ui: UISection | None = None
    to_infotext: Callable[[UnitParams], dict[str, str]] | None = None
    from_infotext: Callable[[Mapping[str, str]], list[dict[str, Any]] | None] | None = None


@dataclass(frozen=True)
class ApiRoute:
    """An extra HTTP route under the API (e.g. `/controlnet/model_list`). `handler(body)` gets the JSON
    body (None for GET) and returns something JSON-serialisable; raise `RequestError` for a 422."""

    method: Literal["GET", "POST"]
    path: str
    handler: Callable[[Any], Any]
    summary: str = ""


class ModelCache:
    """A small thread-safe LRU of loaded models for one extension (kept across jobs). `get(key, load)`
    returns the cached value or calls `load()` and keeps at most `size` entries."""

    def __init__(self, size: int = 2) -> None:
        self.size = max(1, size)
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.RLock()

    def get(self, key: Any, load: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            value = load()
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


@dataclass
class ExtensionContext:
    """Handed to an extension's `register(ctx)`. Everything an extension adds goes through here; nothing
    else of the process is reachable. `path`: the extension's folder; `data_dir`: a folder for its own
    files (settings, caches); `model_dirs`: the user's model folders by A1111 name; `log`: its logger;
    `cache`: a model cache kept across jobs."""

    name: str
    path: Path
    version: str
    data_dir: Path
    model_dirs: Mapping[str, tuple[Path, ...]]
    allow_pickle: bool = False
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("extensions"))
    cache: ModelCache = field(default_factory=ModelCache)
    api_version: str = API_VERSION
    conditioning: list[ConditioningType] = field(default_factory=list)
    preprocessors: list[Preprocessor] = field(default_factory=list)
    samplers: list[tuple[SamplerInfo, SamplerFactory]] = field(default_factory=list)
    upscalers: list[tuple[str, Callable[[Image.Image, float], Image.Image], float | None]] = field(default_factory=list)
    postprocessors: list[PostProcessor] = field(default_factory=list)
    ui_sections: list[UISection] = field(default_factory=list)
    api_routes: list[ApiRoute] = field(default_factory=list)
    #: read-only view of every registered preprocessor (all extensions), filled by the loader
    all_preprocessors: Mapping[str, Preprocessor] = field(default_factory=dict)

    def add_conditioning(self, ctype: ConditioningType) -> None:
        """Register a conditioning type; its UI section (if any) is shown in the generation tabs."""
        if not ctype.name or not ctype.name.replace("_", "").replace("-", "").isalnum():
            raise ExtensionError(f"invalid conditioning type name {ctype.name!r}")
        self.conditioning.append(ctype)

    def add_preprocessor(self, pre: Preprocessor) -> None:
        self.preprocessors.append(pre)

    def add_sampler(self, info: SamplerInfo, factory: SamplerFactory) -> None:
        """A sampler for the engine's registry (see `ldm_core.schedulers.SamplerRegistry.register`)."""
        self.samplers.append((info, factory))

    def add_upscaler(
        self, name: str, fn: Callable[[Image.Image, float], Image.Image], scale: float | None = None
    ) -> None:
        """An image upscaler `fn(image, scale) -> image` listed with the model upscalers."""
        self.upscalers.append((name, fn, scale))

    def add_postprocessor(self, post: PostProcessor) -> None:
        self.postprocessors.append(post)

    def add_ui_section(self, section: UISection) -> None:
        self.ui_sections.append(section)

    def add_api_route(self, route: ApiRoute) -> None:
        if not route.path.startswith("/"):
            raise ExtensionError(f"API route path must start with '/': {route.path!r}")
        self.api_routes.append(route)
