"""The one options store: the settings the web UI's Settings tab and `/sdapi/v1/options` both read and write,
kept in `<data dir>/config.json` (A1111's file name and, for everything A1111 clients read, A1111's keys).

Each `Option` says its type (its default's type), range or choices, the Settings-tab section and label, and
when a change applies:

- "live": the next job uses it (a request default such as `CLIP_stop_at_last_layers`, or an EngineConfig
  field a running engine reads per job, such as the output folder);
- "reload": the next page load (UI defaults); "model": the next model load; "restart": the next start;
- "stored": kept and returned to clients, but this server does not use it (an A1111 UI or grid option
  clients read; setting it changes nothing here, and an `override_settings` value for it is reported in the
  response's `info` warnings).

Options that fill an engine request field name it in `field`. Such an option becomes "stored" when the engine
has no such field (yet), so the metadata never claims more than the engine does.

`OptionsStore` is a thread-safe, read-only `Mapping` of the current values (known keys coerced, unknown keys
as stored) with `update()` for changes: every value is validated first (an `OptionError` names the key and
the allowed range, and nothing is saved), then the file is replaced atomically and the change listeners run.
Unknown keys are refused by default (the Settings tab) and accepted with `allow_unknown=True` (the API: A1111
clients send keys of extensions and versions this server does not know; they are stored and returned, and do
nothing).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import threading
import typing
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .config import COLOUR_FIXES, EngineConfig

log = logging.getLogger(__name__)

Applies = Literal["live", "reload", "model", "restart", "stored"]
#: How an option fills a request field: "force" (an override wins over the request's own value; a saved value
#: applies when the request leaves the field unset), "default" (the request's own value wins), "eta" (the
#: sampler's eta: `eta_ddim` for DDIM, else `eta_ancestral`), "save" (`samples_save` off turns saving off),
#: "grid" (read per request by the API's batch-grid step: `return_grid`, `grid_save`).
Maps = Literal["force", "default", "eta", "save", "grid"]

APPLIES_TEXT = {
    "live": "now (the next job)",
    "reload": "at the next page load",
    "model": "at the next model load",
    "restart": "after a restart",
    "stored": "stored for clients (not used by this server)",
}


class OptionError(ValueError):
    """A bad option value: `key` is the option, `message` says what is allowed."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


@dataclass(frozen=True)
class Option:
    """One setting: key in config.json, default (its type is the option's type), Settings-tab label and
    section, when it applies, and optionally choices, a range, the request field it fills and how."""

    key: str
    default: Any
    label: str
    applies: Applies
    section: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    field: str | None = None
    maps: Maps | None = None
    config: str | None = None  # the EngineConfig field it sets (when that field may be missing)
    nullable: bool = False  # None is a valid value (A1111 options whose default is None)
    readonly: bool = False  # reported by the server (e.g. the current checkpoint's hash); never set
    ui: bool = True  # shown in the Settings tab


def _o(key: str, default: Any, label: str, applies: Applies, section: str, **kw: Any) -> Option:
    return Option(key, default, label, applies, section, **kw)


def _request_choices(name: str) -> tuple[str, ...]:
    """The Literal choices of a request field (e.g. `emphasis`), so the store allows what the engine takes."""
    from .generation_requests import InpaintRequest

    info = InpaintRequest.model_fields.get(name)
    args = typing.get_args(info.annotation) if info is not None else ()
    return tuple(a for a in args if isinstance(a, str))


S_SAVE, S_PATHS, S_PREVIEW, S_DEFAULTS = "Saving images", "Paths for saving", "Live previews", "Defaults"
S_SD, S_SAMPLER, S_I2I, S_SDXL = "Stable Diffusion", "Sampler parameters", "img2img", "Stable Diffusion XL"
S_FOLDERS, S_PERF, S_CLIENTS = "Model folders", "Performance", "Kept for A1111 clients"
S_UPSCALE = "Upscaling"

OPTIONS: tuple[Option, ...] = (
    # -- saving images (A1111 keys)
    _o("samples_save", True, "Save every generated image", "live", S_SAVE, maps="save"),
    _o(
        "samples_format",
        "png",
        "File format for images",
        "live",
        S_SAVE,
        choices=("png", "jpg", "jpeg", "webp"),
        config="samples_format",
        field="samples_format",
        maps="default",
    ),
    _o(
        "samples_filename_pattern",
        "[number]-[seed]",
        "File name pattern ([number], [seed], [date], [model_name], [prompt_words])",
        "live",
        S_SAVE,
    ),
    _o(
        "jpeg_quality",
        80,
        "Quality for saved JPEG and WebP images (1-100)",
        "live",
        S_SAVE,
        minimum=1,
        maximum=100,
        step=1,
        config="jpeg_quality",
    ),
    _o("grid_save", True, "Save the grid of a batch (when images are saved)", "live", S_SAVE, maps="grid"),
    _o("return_grid", True, "Return the grid of a batch with its images", "live", S_SAVE, maps="grid"),
    _o("do_not_add_watermark", False, "Do not add a watermark (this server never adds one)", "stored", S_CLIENTS),
    # -- paths: the per-mode folders are where this server puts files (outputs/<mode>/<date>), reported only
    _o("outdir_samples", "", "Output folder (empty: <data dir>/outputs)", "live", S_PATHS),
    _o("outdir_txt2img_samples", "", "txt2img images", "live", S_PATHS, readonly=True, ui=False),
    _o("outdir_img2img_samples", "", "img2img images", "live", S_PATHS, readonly=True, ui=False),
    _o("outdir_extras_samples", "", "Extras images", "live", S_PATHS, readonly=True, ui=False),
    _o("outdir_grids", "", "Grids", "live", S_PATHS, readonly=True, ui=False),
    # -- live previews
    _o("live_previews_enable", True, "Show live previews while generating", "live", S_PREVIEW),
    _o(
        "show_progress_every_n_steps",
        1,
        "Live preview every N steps (0 or -1: no previews while sampling)",
        "live",
        S_PREVIEW,
        minimum=-1,
        maximum=32,
        step=1,
    ),
    # -- UI defaults (this project's keys)
    _o("default_sampler", "Euler a", "Default sampler", "reload", S_DEFAULTS),
    _o("default_scheduler", "Automatic", "Default schedule type", "reload", S_DEFAULTS),
    _o("default_steps", 20, "Default sampling steps", "reload", S_DEFAULTS, minimum=1, maximum=150, step=1),
    _o("default_cfg_scale", 7.0, "Default CFG scale", "reload", S_DEFAULTS, minimum=1, maximum=30, step=0.5),
    _o(
        "default_width",
        0,
        "Default width (0: the model's native size)",
        "reload",
        S_DEFAULTS,
        minimum=0,
        maximum=2048,
        step=8,
    ),
    _o(
        "default_height",
        0,
        "Default height (0: the model's native size)",
        "reload",
        S_DEFAULTS,
        minimum=0,
        maximum=2048,
        step=8,
    ),
    # -- Stable Diffusion
    _o(
        "sd_model_checkpoint",
        "",
        "Checkpoint (set by the checkpoint menu at the top; loaded at start)",
        "live",
        S_SD,
        field="model",
        maps="force",
        ui=False,
    ),
    _o("sd_checkpoint_hash", "", "SHA256 of the current checkpoint", "live", S_SD, readonly=True, ui=False),
    _o(
        "sd_checkpoints_limit",
        1,
        "Checkpoints kept loaded at the same time",
        "model",
        S_SD,
        minimum=1,
        maximum=10,
        step=1,
    ),
    _o(
        "sd_checkpoint_cache",
        0,
        "Checkpoints to cache in RAM (obsolete in A1111)",
        "stored",
        S_CLIENTS,
        minimum=0,
        maximum=10,
        step=1,
    ),
    _o(
        "CLIP_stop_at_last_layers",
        1,
        "Clip skip (1 uses the last text-encoder layer)",
        "live",
        S_SD,
        minimum=1,
        maximum=12,
        step=1,
        field="clip_skip",
        maps="force",
    ),
    _o(
        "emphasis",
        "Original",
        "Emphasis mode for (text:1.2)",
        "live",
        S_SD,
        choices=_request_choices("emphasis"),
        field="emphasis",
        maps="force",
    ),
    _o("sd_vae", "Automatic", "SD VAE (Automatic/None: the checkpoint's own)", "live", S_SD, field="vae", maps="force"),
    _o("sd_vae_checkpoint_cache", 0, "VAEs to cache in RAM", "stored", S_CLIENTS, minimum=0, maximum=10, step=1),
    _o("tiling", False, "Tiling (seamless textures)", "live", S_SD, field="tiling", maps="default"),
    _o(
        "token_merging_ratio",
        0.0,
        "Token merging ratio (not supported here: a job asking for it says so in its info)",
        "stored",
        S_CLIENTS,
        minimum=0.0,
        maximum=0.9,
        step=0.1,
        field="token_merging_ratio",
        maps="default",
    ),
    _o(
        "s_min_uncond",
        0.0,
        "Negative guidance minimum sigma (0: off)",
        "live",
        S_SD,
        minimum=0.0,
        maximum=15.0,
        step=0.01,
        field="s_min_uncond",
        maps="default",
    ),
    # -- sampler parameters
    _o(
        "eta_ddim", 0.0, "Eta for DDIM", "live", S_SAMPLER, minimum=0.0, maximum=1.0, step=0.01, field="eta", maps="eta"
    ),
    _o(
        "eta_ancestral",
        1.0,
        "Eta for ancestral and SDE samplers",
        "live",
        S_SAMPLER,
        minimum=0.0,
        maximum=1.0,
        step=0.01,
        field="eta",
        maps="eta",
    ),
    _o(
        "s_churn",
        0.0,
        "Sigma churn",
        "live",
        S_SAMPLER,
        minimum=0.0,
        maximum=100.0,
        step=0.01,
        field="s_churn",
        maps="default",
    ),
    _o(
        "s_tmin",
        0.0,
        "Sigma tmin",
        "live",
        S_SAMPLER,
        minimum=0.0,
        maximum=10.0,
        step=0.01,
        field="s_tmin",
        maps="default",
    ),
    _o(
        "s_tmax",
        0.0,
        "Sigma tmax (0: infinity)",
        "live",
        S_SAMPLER,
        minimum=0.0,
        maximum=999.0,
        step=0.01,
        field="s_tmax",
        maps="default",
    ),
    _o(
        "s_noise",
        1.0,
        "Sigma noise",
        "live",
        S_SAMPLER,
        minimum=0.0,
        maximum=1.1,
        step=0.001,
        field="s_noise",
        maps="default",
    ),
    _o(
        "eta_noise_seed_delta",
        0,
        "Eta noise seed delta (ENSD)",
        "live",
        S_SAMPLER,
        minimum=0,
        field="eta_noise_seed_delta",
        maps="default",
    ),
    _o(
        "randn_source",
        "CPU",
        "Random number generator source (CPU: a seed gives the same image on every device; GPU: the job's device)",
        "live",
        S_SAMPLER,
        choices=("CPU", "GPU"),
        config="cpu_noise",
    ),
    # -- img2img
    _o(
        "initial_noise_multiplier",
        1.0,
        "Noise multiplier for img2img",
        "live",
        S_I2I,
        minimum=0.0,
        maximum=1.5,
        step=0.001,
        field="initial_noise_multiplier",
        maps="default",
    ),
    _o(
        "img2img_fix_steps",
        False,
        "img2img does exactly the steps set (not steps x denoising)",
        "live",
        S_I2I,
        field="img2img_fix_steps",
        maps="default",
    ),
    _o("upscaler_for_img2img", None, "Upscaler for img2img", "stored", S_CLIENTS, nullable=True),
    # -- diffusion upscalers (SD x4, SD x2 latent): EngineConfig.diffusion_upscale
    _o(
        "diffusion_upscale_steps",
        20,
        "Diffusion upscalers: sampling steps",
        "live",
        S_UPSCALE,
        minimum=1,
        maximum=150,
        step=1,
        config="diffusion_upscale",
    ),
    _o(
        "diffusion_upscale_noise_level",
        20,
        "SD x4 upscaler: noise level added to the image (0-350)",
        "live",
        S_UPSCALE,
        minimum=0,
        maximum=350,
        step=1,
        config="diffusion_upscale",
    ),
    _o(
        "diffusion_upscale_cfg_scale",
        0.0,
        "Diffusion upscalers: CFG scale (0: the upscaler's recommended one, 9 when it has none; 1: no CFG)",
        "live",
        S_UPSCALE,
        minimum=0.0,
        maximum=30.0,
        step=0.5,
        config="diffusion_upscale",
    ),
    _o(
        "diffusion_upscale_image_guidance",
        0.0,
        "SD x4 upscalers: image guidance, toward the low-resolution image (0: the upscaler's recommended one, "
        "1 when it has none; 1: off)",
        "live",
        S_UPSCALE,
        minimum=0.0,
        maximum=10.0,
        step=0.5,
        config="diffusion_upscale",
    ),
    _o(
        "diffusion_upscale_seed",
        0,
        "Diffusion upscalers: seed",
        "live",
        S_UPSCALE,
        minimum=0,
        config="diffusion_upscale",
    ),
    _o(
        "diffusion_upscale_prompt",
        "",
        "Diffusion upscalers: prompt (empty: the image's own, from its infotext)",
        "live",
        S_UPSCALE,
        config="diffusion_upscale",
    ),
    _o(
        "diffusion_upscale_colour_fix",
        "Wavelet",
        "Diffusion upscalers: colour fix (the output's large-scale colour from the input, as StableSR's Color Fix)",
        "live",
        S_UPSCALE,
        choices=COLOUR_FIXES,
        config="diffusion_upscale",
    ),
    _o(
        "ldsr_steps",
        100,
        "LDSR processing steps (lower = faster)",
        "live",
        S_UPSCALE,
        minimum=1,
        maximum=200,
        step=1,
        config="diffusion_upscale",
    ),
    # -- SDXL
    _o(
        "sdxl_crop_top", 0, "SDXL crop top coordinate", "live", S_SDXL, minimum=0, field="sdxl_crop_top", maps="default"
    ),
    _o(
        "sdxl_crop_left",
        0,
        "SDXL crop left coordinate",
        "live",
        S_SDXL,
        minimum=0,
        field="sdxl_crop_left",
        maps="default",
    ),
    _o(
        "sdxl_refiner_low_aesthetic_score",
        2.5,
        "SDXL refiner: aesthetic score of the negative prompt",
        "live",
        S_SDXL,
        field="sdxl_refiner_low_aesthetic_score",
        maps="default",
    ),
    _o(
        "sdxl_refiner_high_aesthetic_score",
        6.0,
        "SDXL refiner: aesthetic score of the prompt",
        "live",
        S_SDXL,
        field="sdxl_refiner_high_aesthetic_score",
        maps="default",
    ),
    # -- UI options A1111 clients read
    _o("send_seed", True, "Send the seed with 'send to' buttons", "stored", S_CLIENTS),
    _o("send_size", True, "Send the size with 'send to' buttons", "stored", S_CLIENTS),
    # -- folders and performance (this project's keys)
    _o("ckpt_dir", "", "Checkpoint folder (empty: models/Stable-diffusion)", "restart", S_FOLDERS),
    _o("vae_dir", "", "VAE folder (empty: models/VAE)", "restart", S_FOLDERS),
    _o("lora_dir", "", "LoRA folder (empty: models/Lora)", "restart", S_FOLDERS),
    _o("embeddings_dir", "", "Embeddings folder (empty: embeddings)", "restart", S_FOLDERS),
    _o("attention", "auto", "Attention backend", "restart", S_PERF, choices=("auto", "sdpa", "xformers", "sliced")),
    _o(
        "offload",
        "none",
        "Offload models to the CPU between uses (saves GPU memory)",
        "restart",
        S_PERF,
        choices=("none", "model", "sequential"),
    ),
    _o("vae_tiling", False, "VAE tiling (large images in less memory)", "model", S_PERF),
    _o("vae_slicing", False, "VAE slicing (batches in less memory)", "model", S_PERF),
)

OPTIONS_BY_KEY: dict[str, Option] = {o.key: o for o in OPTIONS}
#: Values that mean "the checkpoint's own VAE".
AUTOMATIC_VAES = ("", "Automatic", "None")


def request_fields(mode: str | None = None) -> frozenset[str]:
    """The engine request fields of `mode` ("txt2img", "img2img", "inpaint"; None: all modes), read from the
    request classes so new fields count at once."""
    from .generation_requests import GenerationRequest, Img2ImgRequest, InpaintRequest

    cls = {"txt2img": GenerationRequest, "img2img": Img2ImgRequest}.get(mode or "", InpaintRequest)
    return frozenset(cls.model_fields)


def effective_applies(option: Option, fields: Collection[str] | None = None) -> Applies:
    """When `option` applies on this server: "stored" when neither the engine request field nor the
    EngineConfig field it sets exists (yet)."""
    has_field = bool(option.field) and option.field in (request_fields() if fields is None else fields)
    has_config = bool(option.config) and option.config in {f.name for f in _config_fields()}
    if (option.field or option.config) and option.maps not in ("save", "grid") and not (has_field or has_config):
        return "stored"
    return option.applies


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise OptionError(key, f"must be true or false; got {value!r}")
    if isinstance(value, bool | int | float) or value is None:
        return bool(value)
    raise OptionError(key, f"must be true or false; got {value!r}")


def _range_text(o: Option) -> str:
    if o.minimum is not None and o.maximum is not None:
        return f"from {o.minimum:g} to {o.maximum:g}"
    if o.minimum is not None:
        return f"at least {o.minimum:g}"
    return f"at most {o.maximum:g}"


def coerce(option: Option, value: Any) -> Any:
    """`value` as the option's type (A1111 clients send numbers and booleans as strings too), checked against
    its range and choices; OptionError names the key and what is allowed."""
    key, default = option.key, option.default
    if (value is None or value == "") and (option.nullable or default is None):
        return None
    if isinstance(default, bool):
        return _parse_bool(key, value)
    if isinstance(default, int | float):
        kind = "an integer" if isinstance(default, int) else "a number"
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError, AttributeError):
            raise OptionError(key, f"must be {kind}; got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise OptionError(key, f"must be a finite number; got {value!r}")
        if isinstance(default, int):
            if number != int(number):
                raise OptionError(key, f"must be an integer; got {value!r}")
            out: Any = int(number)
        else:
            out = number
        if (option.minimum is not None and out < option.minimum) or (
            option.maximum is not None and out > option.maximum
        ):
            raise OptionError(key, f"must be {kind} {_range_text(option)}; got {value!r}")
        return out
    if isinstance(value, dict | list):
        raise OptionError(key, f"must be text; got {type(value).__name__}")
    out = "" if value is None else str(value).strip()
    if option.choices is not None and out not in option.choices:
        # clients write choices in their own case ("wavelet", "PNG"): take the one choice that differs only so
        same = [c for c in option.choices if c.casefold() == out.casefold()]
        if len(same) != 1:
            raise OptionError(key, f"choose one of {list(option.choices)}; got {out!r}")
        out = same[0]
    return out


Listener = Callable[[list[str]], None]


class OptionsStore(Mapping[str, Any]):
    """Options in one JSON file (`path`; None keeps them in memory). A read-only Mapping of the current
    values: every known option (its default when unset or invalid in the file) plus the unknown keys the file
    holds. Writes go through `update`. Safe to share between threads (the UI's and the API's)."""

    def __init__(self, path: str | os.PathLike | None, *, locked: Mapping[str, str] | None = None):
        self.path = Path(path) if path is not None else None
        # options that may not change (key -> why, e.g. folders while the server is exposed: ldm_core.exposure)
        self.locked: dict[str, str] = dict(locked or {})
        self._lock = threading.RLock()
        self._raw: dict[str, Any] = {}
        self._listeners: list[Listener] = []
        self.load()

    # ---- reading ------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Read the file again (a missing or broken file gives the defaults)."""
        raw: Any = {}
        if self.path is not None:
            try:
                raw = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raw = {}
        with self._lock:
            self._raw = dict(raw) if isinstance(raw, dict) else {}

    def _value(self, option: Option) -> Any:
        raw = self._raw.get(option.key, option.default)
        try:
            return coerce(option, raw)
        except OptionError:
            return option.default

    def get(self, key: str, default: Any = None) -> Any:
        """The value of `key`: a known option's value (its default when unset or invalid), an unknown key's
        stored value, else `default`."""
        with self._lock:
            option = OPTIONS_BY_KEY.get(key)
            if option is not None:
                return self._value(option)
            return self._raw.get(key, default)

    def all(self) -> dict[str, Any]:
        """Every known option with its current value."""
        with self._lock:
            return {o.key: self._value(o) for o in OPTIONS}

    def snapshot(self) -> dict[str, Any]:
        """Every known option plus the unknown keys stored (what GET /sdapi/v1/options starts from)."""
        with self._lock:
            out = {k: v for k, v in self._raw.items() if k not in OPTIONS_BY_KEY}
            out.update(self.all())
            return out

    def __getitem__(self, key: str) -> Any:
        with self._lock:
            if key in OPTIONS_BY_KEY:
                return self._value(OPTIONS_BY_KEY[key])
            return self._raw[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.snapshot())

    def __len__(self) -> int:
        return len(self.snapshot())

    # ---- writing ------------------------------------------------------------------------------------------
    def validate(self, changes: Mapping[str, Any], *, allow_unknown: bool = False) -> dict[str, Any]:
        """The changes coerced to their options' types; OptionError on the first bad value, on a read-only
        option or (without `allow_unknown`) on an unknown key."""
        clean: dict[str, Any] = {}
        for key, value in changes.items():
            option = OPTIONS_BY_KEY.get(key)
            if option is None:
                if not allow_unknown:
                    raise OptionError(key, "unknown setting")
                clean[key] = value
                continue
            if option.readonly:
                raise OptionError(key, "is reported by the server and cannot be set")
            clean[key] = coerce(option, value)
            if key in self.locked and clean[key] != self.get(key):  # unchanged values pass (forms send all)
                raise OptionError(key, self.locked[key])
        return clean

    def update(self, changes: Mapping[str, Any], *, allow_unknown: bool = False) -> list[str]:
        """Validate and save `changes`; returns the keys whose value changed and tells the listeners. Nothing
        is saved when a value is bad (OptionError) or the file cannot be written (OSError)."""
        clean = self.validate(changes, allow_unknown=allow_unknown)
        with self._lock:
            current = self.snapshot()
            changed = [k for k, v in clean.items() if k not in current or current[k] != v]
            if not changed:
                return []
            new = {**self._raw, **{k: clean[k] for k in changed}}
            self._write(new)
            self._raw = new
            listeners = list(self._listeners)
        unknown = [k for k in changed if k not in OPTIONS_BY_KEY]
        if unknown:
            log.info("stored settings this server does not use: %s", ", ".join(unknown))
        for fn in listeners:
            try:
                fn(changed)
            except Exception:  # a listener must not undo a saved change or hide it from the others
                log.exception("settings listener failed after changing %s", changed)
        return changed

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(changed_keys)` after every saved change; returns a function that unsubscribes."""
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def _write(self, values: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(values, f, indent=2, sort_keys=True, default=str)
                f.write("\n")
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


# ---- options -> EngineConfig --------------------------------------------------------------------------------
def _path_or_none(text: str, data_dir: Path) -> Path | None:
    if not text:
        return None
    p = Path(text).expanduser()
    return p if p.is_absolute() else data_dir / p


def config_from_options(
    base: EngineConfig, values: Mapping[str, Any], *, locked: Collection[str] = frozenset()
) -> EngineConfig:
    """`base` with the options in `values` applied, except the EngineConfig fields in `locked` (those a launch
    flag set). Relative folders are taken inside `base.data_dir`. Keys missing from `values` change nothing."""
    d = base.data_dir
    over: dict[str, Any] = {}

    def put(field: str, value: Any) -> None:
        if field not in locked and value is not None:
            over[field] = value

    if "outdir_samples" in values:
        put("outputs_dir", _path_or_none(values["outdir_samples"] or "", d) or d / "outputs")
    if values.get("samples_filename_pattern"):
        put("filename_pattern", values["samples_filename_pattern"])
    if "samples_save" in values:
        put("save_images", bool(values["samples_save"]))
    if "samples_format" in values and "samples_format" in {f.name for f in _config_fields()}:
        put("samples_format", values["samples_format"])
    if "jpeg_quality" in values and "jpeg_quality" in {f.name for f in _config_fields()}:
        put("jpeg_quality", int(values["jpeg_quality"]))
    if "show_progress_every_n_steps" in values or "live_previews_enable" in values:
        every = int(values.get("show_progress_every_n_steps", base.preview_every))
        put("preview_every", max(0, every) if values.get("live_previews_enable", True) else 0)
    if "sd_checkpoints_limit" in values:
        put("model_cache_size", int(values["sd_checkpoints_limit"]))
    upscale = {
        name: cast(values[key])
        for key, name, cast in (
            ("diffusion_upscale_steps", "steps", int),
            ("diffusion_upscale_noise_level", "noise_level", int),
            ("diffusion_upscale_cfg_scale", "guidance_scale", float),
            ("diffusion_upscale_image_guidance", "image_guidance", float),
            ("diffusion_upscale_seed", "seed", int),
            ("diffusion_upscale_prompt", "prompt", str),
            ("diffusion_upscale_colour_fix", "colour_fix", str),
            ("ldsr_steps", "ldsr_steps", int),
        )
        if values.get(key) is not None
    }
    if upscale:
        put("diffusion_upscale", dataclasses.replace(base.diffusion_upscale, **upscale))
    for key, field in (
        ("ckpt_dir", "ckpt_dirs"),
        ("vae_dir", "vae_dirs"),
        ("lora_dir", "lora_dirs"),
        ("embeddings_dir", "embeddings_dirs"),
    ):
        p = _path_or_none(values.get(key, ""), d)
        if p is not None:
            put(field, (p,))
    for key in ("attention", "offload", "vae_tiling", "vae_slicing"):
        if key in values:
            put(key, values[key])
    if "randn_source" in values:
        put("cpu_noise", values["randn_source"] != "GPU")
    return base.with_(**over)


def _config_fields():
    from dataclasses import fields

    return fields(EngineConfig)


#: The EngineConfig fields a running engine picks up from `engine.config` (read per job or per model load).
LIVE_FIELDS = frozenset(
    {
        "outputs_dir",
        "filename_pattern",
        "save_images",
        "samples_format",
        "jpeg_quality",
        "preview_every",
        "vae_tiling",
        "vae_slicing",
        "model_cache_size",
        "cpu_noise",
        "diffusion_upscale",
    }
)


def live_config(current: EngineConfig, wanted: EngineConfig) -> EngineConfig:
    """`current` with only the fields a running engine can change without a restart taken from `wanted`."""
    names = {f.name for f in _config_fields()}
    return current.with_(**{f: getattr(wanted, f) for f in LIVE_FIELDS if f in names})


def apply_to_engine(engine: Any, values: Mapping[str, Any], locked: Collection[str] = frozenset()) -> None:
    """Give a running engine the live part of the options (the next job and model load use it)."""
    engine.config = live_config(engine.config, config_from_options(engine.config, values, locked=locked))


def bind_engine(store: OptionsStore, engine: Any, locked: Collection[str] = frozenset()) -> Callable[[], None]:
    """Apply the store's live options to `engine` now and after every change (from the UI or the API);
    returns the unsubscribe function."""
    locked = frozenset(locked)
    apply_to_engine(engine, store.all(), locked)
    return store.subscribe(lambda _changed: apply_to_engine(engine, store.all(), locked))


def output_dirs(outputs_dir: str | os.PathLike) -> dict[str, str]:
    """The read-only per-mode folder options: where this server writes each kind of output."""
    root = Path(outputs_dir)
    return {
        "outdir_txt2img_samples": str(root / "txt2img"),
        "outdir_img2img_samples": str(root / "img2img"),
        "outdir_extras_samples": str(root / "extras"),
        # grids (ldm_core.grids): per-mode folders, as A1111 when outdir_grids is empty
        "outdir_grids": "",
        "outdir_txt2img_grids": str(root / "txt2img-grids"),
        "outdir_img2img_grids": str(root / "img2img-grids"),
    }


# ---- options -> request values --------------------------------------------------------------------------------
def is_ddim(sampler_name: str | None) -> bool:
    return (sampler_name or "").strip().lower().startswith("ddim")


def checked_overrides(raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """A request's override_settings with every known option's value checked and of the option's type (a bad
    one raises RequestError naming `override_settings.<key>`); read-only options (e.g. sd_checkpoint_hash echoed
    from GET /options) are dropped, unknown keys kept as sent. Checking twice gives the same result."""
    from .generation_requests import RequestError

    out: dict[str, Any] = {}
    for key, value in (raw or {}).items():
        option = OPTIONS_BY_KEY.get(key)
        if option is None:
            out[key] = value
        elif not option.readonly:
            try:
                out[key] = coerce(option, value)
            except OptionError as exc:
                raise RequestError(f"override_settings.{key}", exc.message) from None
    return out


def request_values(
    saved: Mapping[str, Any],
    override: Mapping[str, Any],
    explicit: Collection[str],
    sampler_name: str | None,
    fields: Collection[str] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """What the options give one job: (request field -> value, override keys this server did not apply).

    `saved` are the stored options, `override` a request's `override_settings` (already validated),
    `explicit` the request fields the client set itself, `fields` the engine request fields (default: all).
    A saved `sd_model_checkpoint` never names the model (the engine's current model is the saved one).
    """
    fields = request_fields() if fields is None else fields
    out: dict[str, Any] = {}
    applied: set[str] = set()
    eta_key = "eta_ddim" if is_ddim(sampler_name) else "eta_ancestral"
    for o in OPTIONS:
        if o.field is None and o.maps is None:
            continue
        in_override = o.key in override
        value = override[o.key] if in_override else saved.get(o.key, o.default)
        if o.maps in ("save", "grid"):
            if in_override:
                applied.add(o.key)  # "grid": the API's batch-grid step reads it for this request
                if o.maps == "save" and not value:
                    out["save_images"] = False
            continue
        if o.field not in fields:
            continue
        if o.maps == "force":
            if in_override or (o.field not in explicit and o.key != "sd_model_checkpoint"):
                if in_override:
                    applied.add(o.key)
                if o.field == "vae":
                    value = None if value in (*AUTOMATIC_VAES, None) else str(value)
                elif o.field == "model":
                    if not value:
                        continue  # empty: the current model
                    value = str(value)
                out[o.field] = value
            continue
        if o.maps == "eta":
            if in_override:
                applied.add(o.key)  # the other sampler kind's eta is honoured too: it just does not apply
            if o.key == eta_key and "eta" not in explicit and (in_override or value != o.default):
                out["eta"] = value
            continue
        if in_override:
            applied.add(o.key)
        if o.field in explicit:
            continue
        if o.key == "s_tmax" and not value:
            continue  # A1111: 0 means infinity (the request's default)
        if in_override or value != o.default:
            out[o.field] = value
    skipped = [k for k in override if k not in applied]
    return out, skipped
