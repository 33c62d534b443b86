"""Wiring shared by the tabs, as plain functions that the unit tests call without a browser: the UI context,
choices read from the engine's registries, form values -> validated request, infotext -> form values, job
progress as HTML, and the poll loop that follows a queued job.

Form values travel as a dict keyed by the request field names (`prompt`, `steps`, `sampler_name`, ...), plus
a few UI-only keys (`init_image`, `inpaint_editor`, `mask_upload`, `mask_mode`, `inpaint_area`) that
`build_request` turns into request fields.
"""

from __future__ import annotations

import html
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageChops

from ldm_core.generation_requests import (
    INPAINT_FILLS,
    MAX_SIDE,
    RESIZE_MODES,
    GenerationRequest,
    Img2ImgRequest,
    InpaintRequest,
    RequestError,
    RequestLimits,
    check_limits,
)
from ldm_core.infotext import parse_infotext
from ldm_core.models.sidecar import read_sidecar
from ldm_core.progress import ProgressState
from ldm_core.video.options import number_kind

from .settings_store import SettingsStore

log = logging.getLogger(__name__)

POLL_SECONDS = 0.3  # how often a Generate handler looks at its job
PREVIEW_SECONDS = 1.0  # the live preview is sent to the browser at most this often
DEFAULT_SIZE = 512  # width/height when the model's native size is unknown
SIZE_STEP = 8  # the size sliders' step when the model's VAE factor is unknown (the SD families' factor)
FALLBACK_SAMPLERS = ("Euler a", "Euler", "DPM++ 2M", "DDIM")
FALLBACK_SCHEDULES = ("Automatic", "Uniform", "Karras", "Exponential")
MASK_MODES = ("Inpaint masked", "Inpaint not masked")
INPAINT_AREAS = ("Whole picture", "Only masked")
AUTOMATIC_VAE = "Automatic"
MODES = ("txt2img", "img2img", "inpaint")
SAME_CHECKPOINT, SAME_SAMPLER, SAME_SCHEDULER = "Use same checkpoint", "Use same sampler", "Use same scheduler"


@dataclass
class UiContext:
    """What every tab needs: the service (engine + queue), settings, styles and launch facts.

    `flags` holds the launch flags that change UI behaviour (e.g. `listen`, `share`). `tokenizer` is the
    fallback CLIP tokenizer for the token counter when no model is loaded (loaded on first use).
    """

    service: Any  # ldm_core.service.Service (typed loosely so tests can pass a stand-in)
    settings: SettingsStore
    styles: Any = None  # ldm_core.prompts.styles.StyleStore or None
    data_dir: Path = Path(".")
    flags: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None
    upscalers: Any = None  # an UpscalerRegistry when the engine has none (see ui.upscale)

    @property
    def engine(self):
        return self.service.engine


# ---- choices from the engine ---------------------------------------------------------------------------
def checkpoint_titles(engine) -> list[str]:
    """Titles of the checkpoints the registry found (empty list when none)."""
    try:
        return [e.title for e in engine.models.checkpoints()]
    except Exception as exc:  # a broken folder must not stop the UI from loading
        log.warning("listing checkpoints failed: %s", exc)
        return []


def current_checkpoint_title(engine) -> str | None:
    """The title of the loaded model, else of the default checkpoint, else None."""
    try:
        entry = engine.current_model_entry()
    except Exception:
        return None
    return entry.title if entry is not None else None


def vae_titles(engine) -> list[str]:
    """ "Automatic" (the checkpoint's own VAE) followed by the VAE files found."""
    try:
        return [AUTOMATIC_VAE] + [e.title for e in engine.models.vaes()]
    except Exception:
        return [AUTOMATIC_VAE]


def sampler_names(engine) -> list[str]:
    try:
        names = list(engine.samplers.names())
    except Exception:
        names = []
    return names or list(FALLBACK_SAMPLERS)


def schedule_types(engine) -> list[str]:
    try:
        names = list(engine.samplers.schedule_types())
    except Exception:
        names = []
    return names or list(FALLBACK_SCHEDULES)


def hires_upscalers(engine) -> list[str] | None:
    """Upscaler names for Hires. fix (latent modes first, then image upscalers), or None when the engine has
    no upscaler registry (the section is then left out)."""
    reg = getattr(engine, "upscalers", None)
    if reg is None:
        return None
    try:
        from ldm_core.upscalers import latent_modes

        return [*latent_modes(), *[n for n in reg.names() if n != "None"]]
    except Exception:
        return None


def native_size(engine) -> int:
    """Side length in pixels the loaded (or default) model was trained at; DEFAULT_SIZE when unknown.
    Does not load a model."""
    model = getattr(engine, "current_model", None)
    size = getattr(model, "native_size", None) if model is not None else None
    if size is None:
        try:
            entry = engine.current_model_entry()
        except Exception:
            entry = None
        size = getattr(entry, "native_size", None)
    return int(size) if size else DEFAULT_SIZE


def size_step(engine) -> int:
    """What the size sliders step by: the loaded (or default) model's VAE factor (8 for the SD families, 4
    for a three-level VAE), SIZE_STEP when unknown. Does not load a model."""
    model = getattr(engine, "current_model", None)
    step = getattr(model, "vae_scale_factor", None) if model is not None else None
    if step is None and hasattr(engine, "size_multiple"):
        try:
            step = engine.size_multiple()
        except Exception:
            step = None
    return int(step) if step else SIZE_STEP


def recommended_rescale_cfg(engine) -> float:
    """The loaded (or default) model's recommended CFG rescale: its sidecar's `rescale_cfg`, 0 when it has none
    or the model is unknown. Does not load a model."""
    model = getattr(engine, "current_model", None)
    if model is not None:
        return float(getattr(model, "rescale_cfg", 0.0) or 0.0)
    try:
        return read_sidecar(engine.current_model_entry().path).rescale_cfg or 0.0
    except Exception:  # no model yet, or a sidecar the load will report
        return 0.0


def recommended_sampling(engine) -> tuple[str | None, str | None]:
    """The loaded (or default) model's recommended (sampler, schedule type), each None where it names none
    (`Engine.recommended_sampling`). Does not load a model."""
    try:
        return engine.recommended_sampling()
    except Exception:  # an engine without models (or one that predates the method)
        return None, None


def default_sampling(engine, settings: SettingsStore, mode: str = "txt2img") -> tuple[str, str]:
    """(sampler, schedule type) for a new page or a model switch: the model's recommendation (for images: the
    Video tab keeps the settings', as `Engine.sampling` does for clips), else the settings' defaults, each only
    where this engine lists it (else its first)."""
    rec_sampler, rec_schedule = recommended_sampling(engine) if mode != "video" else (None, None)
    samplers, schedules = sampler_names(engine), schedule_types(engine)
    sampler = rec_sampler or settings.get("default_sampler")
    schedule = rec_schedule or settings.get("default_scheduler")
    return (
        sampler if sampler in samplers else samplers[0],
        schedule if schedule in schedules else schedules[0],
    )


def default_dims(engine, settings: SettingsStore) -> tuple[int, int]:
    """(width, height) for a new page: the settings' defaults, where 0 means the model's native size."""
    native = native_size(engine)
    w = settings.get("default_width") or native
    h = settings.get("default_height") or native
    return int(w), int(h)


def size_after_switch(width: int, height: int, old_native: int, new_native: int) -> tuple[int, int]:
    """Width/height after a model switch: a side still at the old model's native size follows the new one,
    a side the user changed stays."""
    return (new_native if width == old_native else width, new_native if height == old_native else height)


# ---- token counter ------------------------------------------------------------------------------------
def _fallback_tokenizer(ctx: UiContext):
    if ctx.tokenizer is None:
        from ldm_core.models import load_shipped_tokenizer

        ctx.tokenizer = load_shipped_tokenizer("clip")
    return ctx.tokenizer


def token_count(ctx: UiContext, text: str, steps: int = 20) -> tuple[int, int]:
    """(tokens, limit) for a prompt as the model will see it: extra-network tags removed, the longest text
    of its prompt-editing schedule and AND parts counted; the limit grows by 75 per chunk."""
    from ldm_core.prompts.encode import count_tokens
    from ldm_core.prompts.parser import extract_extra_networks, get_prompt_schedule, split_and_prompts

    model = getattr(ctx.engine, "current_model", None)
    tokenizer = getattr(model, "tokenizer", None) or _fallback_tokenizer(ctx)
    text, _ = extract_extra_networks(text or "")
    best = (0, 75)
    for part, _weight in split_and_prompts(text) or [("", 1.0)]:
        for _end, step_text in get_prompt_schedule(part, max(1, int(steps or 1))):
            best = max(best, count_tokens(tokenizer, step_text))
    return best


def token_counter_html(used: int, limit: int) -> str:
    """The counter shown in a prompt's corner, e.g. "80/150" (over 75 tokens a second chunk starts)."""
    cls = "ldm-tokens ldm-tokens-multi" if limit > 75 else "ldm-tokens"
    return f'<span class="{cls}" title="tokens used / token limit (75 per chunk)">{used}/{limit}</span>'


# ---- form values -> request ---------------------------------------------------------------------------
def _layers_mask(background: Image.Image, layers: list[Image.Image]) -> Image.Image:
    """White where any painted layer has paint (alpha > 0), black elsewhere; background's size."""
    mask = Image.new("L", background.size, 0)
    for layer in layers or []:
        if layer is None:
            continue
        alpha = layer.convert("RGBA").getchannel("A")
        if alpha.size != background.size:
            alpha = alpha.resize(background.size, Image.NEAREST)
        mask = ImageChops.lighter(mask, alpha)
    return mask.point(lambda v: 255 if v > 0 else 0)


def image_and_mask(editor: dict | None, uploaded_mask: Image.Image | None) -> tuple[Image.Image, Image.Image]:
    """(init image RGB, mask L: white = repaint) from the inpaint editor value ({background, layers,
    composite}) and an optional uploaded mask, which wins over painted strokes when given."""
    background = (editor or {}).get("background")
    if background is None:
        raise RequestError("init_images", "upload an image to inpaint first")
    image = background.convert("RGB")
    if uploaded_mask is not None:
        mask = uploaded_mask.convert("L")
        if mask.size != image.size:
            mask = mask.resize(image.size, Image.NEAREST)
        return image, mask
    mask = _layers_mask(image, (editor or {}).get("layers") or [])
    if mask.getextrema()[1] == 0:
        raise RequestError("mask", "paint over the area to repaint, or upload a mask")
    return image, mask


def _int_or_none(v: Any) -> Any:
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v  # let the request say what is wrong
    return int(f) if f.is_integer() else v


def build_request(mode: str, values: dict[str, Any]) -> GenerationRequest:
    """A validated request of `mode` ("txt2img", "img2img", "inpaint") from form values.

    Selected styles travel by name in `styles` (the engine applies them, as for API requests); "Automatic"
    VAE and an empty checkpoint mean the model's own. Raises RequestError naming the field on a bad value.
    """
    if mode not in (*MODES, "video"):
        raise RequestError("mode", f"must be one of {list(MODES) + ['video']}")
    v = {k: val for k, val in values.items() if val is not None or k in ("width", "height")}
    if mode == "video":
        return _video_request(v)
    init_image = v.pop("init_image", None)
    editor = v.pop("inpaint_editor", None)
    mask_upload = v.pop("mask_upload", None)
    mask_mode = v.pop("mask_mode", None)
    inpaint_area = v.pop("inpaint_area", None)
    v["styles"] = [s for s in (v.get("styles") or []) if s]
    if v.get("vae") in ("", AUTOMATIC_VAE):
        v["vae"] = None
    if not v.get("model"):
        v["model"] = None
    if v.get("refiner_checkpoint") in ("", "None"):  # the Refiner accordion's "None"
        v["refiner_checkpoint"] = None
    for key in (
        "seed",
        "subseed",
        "width",
        "height",
        "steps",
        "batch_size",
        "n_iter",
        "seed_resize_from_w",
        "seed_resize_from_h",
        "hr_second_pass_steps",
        "hr_resize_x",
        "hr_resize_y",
        "mask_blur",
        "inpaint_full_res_padding",
        "clip_skip",
    ):
        if key in v:
            v[key] = _int_or_none(v[key])
    if v.get("width") in (None, 0):
        v["width"] = None
    if v.get("height") in (None, 0):
        v["height"] = None
    if mode == "txt2img":
        return _within_limits(GenerationRequest.build(**v))
    for key in [k for k in v if k.startswith("hr_") or k == "enable_hr"]:
        v.pop(key)
    if mode == "img2img":
        if init_image is None:
            raise RequestError("init_images", "upload an image first")
        return _within_limits(Img2ImgRequest.build(init_images=[init_image], **v))
    image, mask = image_and_mask(editor, mask_upload)
    if mask_mode is not None:
        v["inpainting_mask_invert"] = mask_mode == MASK_MODES[1]
    if inpaint_area is not None:
        v["inpaint_full_res"] = inpaint_area == INPAINT_AREAS[1]
    return _within_limits(InpaintRequest.build(init_images=[image], mask=mask, **v))


#: Video tab fields -> AnimateDiffArgs names (ldm_core.video.options)
VIDEO_FIELDS = {
    "video_model": "model",
    "video_length": "video_length",
    "video_fps": "fps",
    "video_context": "batch_size",
    "video_overlap": "overlap",
    "video_stride": "stride",
    "video_closed_loop": "closed_loop",
    "video_format": "format",
    "video_loop_number": "loop_number",
    "video_shared_noise": "shared_noise",
    "video_motion_start_percent": "motion_start_percent",
    "video_motion_end_percent": "motion_end_percent",
    "video_motion_effect": "motion_effect",
    "video_freeinit_enable": "freeinit_enable",
    "video_freeinit_iters": "freeinit_iters",
    "video_freeinit_filter": "freeinit_filter",
    "video_freeinit_ds": "freeinit_ds",
    "video_freeinit_dt": "freeinit_dt",
    "video_latent_power": "latent_power",
    "video_latent_scale": "latent_scale",
    "video_motion_bucket_id": "motion_bucket_id",
    "video_noise_aug_strength": "noise_aug_strength",
}


def _video_request(v: dict[str, Any]) -> GenerationRequest:
    """The Video tab's request: txt2img with `animatediff` options, or img2img from a start image (image-to-
    video) or a source clip (video-to-video: each frame from the clip's frame)."""
    from ldm_core.video.clips import read_source_clip

    args = {name: v.pop(key) for key, name in VIDEO_FIELDS.items() if v.get(key) is not None}
    for key in args:
        if number_kind(key) is int:
            args[key] = _int_or_none(args[key])
    init_image = v.pop("init_image", None)
    clip_path = v.pop("video_source", None)
    if clip_path:
        args["video_source"], first = read_source_clip(clip_path)
        init_image = init_image or first
    v["animatediff"] = args
    for key in ("seed", "width", "height", "steps", "n_iter", "clip_skip"):
        if key in v:
            v[key] = _int_or_none(v[key])
    v["styles"] = [s for s in (v.get("styles") or []) if s]
    for key in ("vae", "model"):
        if v.get(key) in ("", AUTOMATIC_VAE):
            v[key] = None
    for key in ("width", "height"):
        if v.get(key) in (None, 0):
            v[key] = None
    v.pop("batch_size", None)  # the frames are the batch
    if init_image is None:
        v.pop("denoising_strength", None)
        return _within_limits(GenerationRequest.build(**v))
    return _within_limits(Img2ImgRequest.build(init_images=[init_image], **v))


UI_LIMITS = RequestLimits(max_side=MAX_SIDE, where="the UI", flags=())  # the sliders' range, per side


def _within_limits(request: GenerationRequest) -> GenerationRequest:
    """`request`, or RequestError naming the field when it is over the UI's limits (ldm_core.generation_requests)."""
    check_limits(request, UI_LIMITS)
    return request


def readable_error(exc: BaseException) -> str:
    """The one-line message a user sees for a failed job (never a traceback)."""
    if isinstance(exc, RequestError):
        return f"{exc.field}: {exc.message}"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "out of memory" in text.lower():
        return "Out of memory: try a smaller size or batch, or --medvram / --lowvram."
    if isinstance(exc, ValueError | KeyError | FileNotFoundError):
        return text or type(exc).__name__
    return f"Generation failed: {type(exc).__name__}: {text}" if text else f"Generation failed: {type(exc).__name__}"


# ---- infotext -> form values --------------------------------------------------------------------------
def _num(text: Any, kind: type = float) -> Any:
    try:
        f = float(str(text).strip())
    except ValueError:
        return None
    return int(f) if kind is int else f


def fields_from_infotext(
    params: dict[str, Any], resolve: Callable[[str, str], tuple[str, str]] | None = None
) -> dict[str, Any]:
    """Form values (request field names, plus "mask_mode"/"inpaint_area") from a parsed infotext
    (`ldm_core.infotext.parse_infotext`). Fields the text does not mention are left out, except that a text
    with a parameters line resets variation seed, seed resize, clip skip and hires fix to "off".

    `resolve(sampler, schedule)` maps old combined sampler names ("DPM++ 2M Karras") to (sampler, schedule).
    """
    out: dict[str, Any] = {}
    if "Prompt" in params:
        out["prompt"] = params["Prompt"]
    if "Negative prompt" in params:
        out["negative_prompt"] = params["Negative prompt"]
    if "Steps" not in params:
        return out
    out.update(
        subseed=-1,
        subseed_strength=0.0,
        seed_resize_from_w=0,
        seed_resize_from_h=0,
        clip_skip=1,
        enable_hr=False,
        hr_checkpoint_name=SAME_CHECKPOINT,
        hr_sampler_name=SAME_SAMPLER,
        hr_scheduler=SAME_SCHEDULER,
        refiner_checkpoint="None",
        rescale_cfg=0.0,  # an infotext without the key was made with plain CFG
    )
    ints = {
        "Steps": "steps",
        "Seed": "seed",
        "Variation seed": "subseed",
        "Clip skip": "clip_skip",
        "Mask blur": "mask_blur",
        "Masked area padding": "inpaint_full_res_padding",
        "Hires steps": "hr_second_pass_steps",
        "Size-1": "width",
        "Size-2": "height",
        "Seed resize from-1": "seed_resize_from_w",
        "Seed resize from-2": "seed_resize_from_h",
        "Hires resize-1": "hr_resize_x",
        "Hires resize-2": "hr_resize_y",
        "ENSD": "eta_noise_seed_delta",  # A1111 restores it as a setting; a form without the field ignores it
    }
    floats = {
        "CFG scale": "cfg_scale",
        "Variation seed strength": "subseed_strength",
        "Denoising strength": "denoising_strength",
        "Hires upscale": "hr_scale",
        "Eta": "eta",
        "Refiner switch at": "refiner_switch_at",
        "Rescale CFG": "rescale_cfg",  # Forge's key (what we write)
        "CFG Rescale": "rescale_cfg",  # the A1111 CFG Rescale extension's
    }
    for key, name in ints.items():
        if key in params and _num(params[key], int) is not None:
            out[name] = _num(params[key], int)
    for key, name in floats.items():
        if key in params and _num(params[key]) is not None:
            out[name] = _num(params[key])
    sampler = params.get("Sampler")
    schedule = str(params.get("Schedule type") or "Automatic")
    if sampler:
        sampler = str(sampler)
        if resolve is not None:
            try:
                sampler, schedule = resolve(sampler, schedule)
            except Exception:  # an unknown sampler is still shown; generating then names the choices
                pass
        out["sampler_name"] = sampler
        out["scheduler"] = schedule
    if "Hires upscale" in params or "Hires resize-1" in params or "Hires upscaler" in params:
        out["enable_hr"] = True
    if "Hires upscaler" in params:
        out["hr_upscaler"] = str(params["Hires upscaler"])
    for key, name in (
        ("Hires checkpoint", "hr_checkpoint_name"),
        ("Hires sampler", "hr_sampler_name"),
        ("Hires schedule type", "hr_scheduler"),
        ("Refiner", "refiner_checkpoint"),
    ):
        if params.get(key):
            out[name] = str(params[key])
    if params.get("Masked content") in INPAINT_FILLS:
        out["inpainting_fill"] = params["Masked content"]
    if "Inpaint area" in params:
        out["inpaint_area"] = INPAINT_AREAS[1] if params["Inpaint area"] == "Only masked" else INPAINT_AREAS[0]
    if params.get("Mask mode") in MASK_MODES:
        out["mask_mode"] = params["Mask mode"]
    if params.get("Resize mode") in RESIZE_MODES:
        out["resize_mode"] = params["Resize mode"]
    if params.get("AnimateDiff"):  # a clip's options ("model: x, video_length: 16, fps: 8, ...") -> Video tab
        out.update(_video_fields(str(params["AnimateDiff"])))
    return out


def _video_fields(value: str) -> dict[str, Any]:
    pairs = dict(part.split(":", 1) for part in value.split(",") if ":" in part)
    names = {v: k for k, v in VIDEO_FIELDS.items()}
    out: dict[str, Any] = {}
    for key, raw in pairs.items():
        field, text = names.get(key.strip()), raw.strip()
        if field is None:
            continue
        kind = number_kind(VIDEO_FIELDS[field])
        if field in ("video_model", "video_closed_loop", "video_freeinit_filter"):
            out[field] = text
        elif kind is not None and _num(text) is not None:
            out[field] = _num(text, kind)
    if "video_freeinit_iters" in out:  # the infotext names FreeInit only when it ran
        out["video_freeinit_enable"] = True
    return out


def sampler_resolver(engine) -> Callable[[str, str], tuple[str, str]] | None:
    """`fields_from_infotext`'s `resolve` argument from the engine's sampler registry (None without one)."""
    samplers = getattr(engine, "samplers", None)
    if samplers is None or not hasattr(samplers, "resolve"):
        return None

    def resolve(sampler: str, schedule: str) -> tuple[str, str]:
        info, schedule_type = samplers.resolve(sampler, schedule)
        return info.name, schedule_type

    return resolve


def fields_from_text(text: str, engine=None) -> dict[str, Any]:
    """Form values from raw infotext (what PNG Info and the paste button read)."""
    return fields_from_infotext(parse_infotext(text or ""), sampler_resolver(engine) if engine else None)


# ---- progress -----------------------------------------------------------------------------------------
def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    s = max(0, int(round(s)))
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def _bar(fraction: float, text: str, state: str, extra: str = "") -> str:
    pct = max(0.0, min(1.0, fraction)) * 100
    return (
        f'<div class="ldm-progress" data-state="{state}"{extra}>'
        f'<div class="ldm-progress-bar" style="width:{pct:.1f}%"></div>'
        f'<span class="ldm-progress-text">{html.escape(text)}</span></div>'
    )


def queued_html(position: int, pending: int) -> str:
    """Progress box of a job waiting in the queue (`position` 1 = next)."""
    return _bar(0.0, f"Waiting in queue: position {position} of {pending}", "queued", f' data-position="{position}"')


def progress_html(state: ProgressState) -> str:
    """Progress box of a running job: bar, step, batch and ETA."""
    if not state.steps:
        return _bar(0.0, "Starting… (loading the model if needed)", "starting")
    parts = [f"Step {state.step}/{state.steps}"]
    if state.job_count > 1:
        parts.append(f"batch {min(state.job_no + 1, state.job_count)}/{state.job_count}")
    parts.append(f"ETA {_fmt_seconds(state.eta)}")
    if state.worker:  # a Ray pool: the replica running the job
        parts.append(f"on {state.worker}")
    return _bar(state.fraction, " · ".join(parts), "running")


def finished_html(seconds: float, images: int, interrupted: bool = False, skipped: int = 0) -> str:
    """Progress box after a job: how long it took and whether it was cut short."""
    n = f"{images} image{'s' if images != 1 else ''}"
    if interrupted:
        text = (
            f"Interrupted after {seconds:.1f}s: {n}, the last one unfinished"
            if images
            else (f"Interrupted after {seconds:.1f}s: no image")
        )
    else:
        text = f"Done: {n} in {seconds:.1f}s"
        if skipped:
            text += f" ({skipped} batch{'es' if skipped != 1 else ''} skipped)"
    return _bar(1.0, text, "interrupted" if interrupted else "done")


def error_html(message: str) -> str:
    """Progress box of a request that failed (the same message also pops up as an error toast)."""
    return _bar(0.0, message, "error")


def idle_html() -> str:
    return _bar(0.0, "", "idle")


@dataclass
class JobUpdate:
    """One step of following a job: the progress box and a new preview image (None: unchanged)."""

    html: str
    preview: Image.Image | None = None


def follow_job(queue, job, poll: float = POLL_SECONDS, preview_every: float = PREVIEW_SECONDS) -> Iterator[JobUpdate]:
    """Yield progress for `job` until it finishes: its queue position while it waits, step/ETA while it runs,
    and the newest preview at most every `preview_every` seconds. Looks every `poll` seconds and yields only
    what changed, so a slow browser is not flooded. The caller reads `job.result` / `job.error` after."""
    last_step, last_sent = -1, 0.0
    last_html = queued_html(max(1, queue.position(job)), max(1, queue.pending_count()))
    yield JobUpdate(last_html)
    while not job.wait(poll):
        pos = queue.position(job)
        if pos > 0:
            html_text, preview = queued_html(pos, queue.pending_count()), None
        else:
            state = job.progress()
            html_text, preview = progress_html(state), None
            now = time.monotonic()
            if state.preview is not None and state.preview_step != last_step and now - last_sent >= preview_every:
                preview, last_step, last_sent = state.preview, state.preview_step, now
        if html_text != last_html or preview is not None:
            yield JobUpdate(html_text, preview)
            last_html = html_text


# ---- results ------------------------------------------------------------------------------------------
def result_record(result) -> dict[str, Any]:
    """What a tab keeps about its last result (in a gr.State): infotexts, seeds and saved paths."""
    return {
        "infotexts": list(result.infotexts),
        "seeds": list(result.seeds),
        "subseeds": list(getattr(result, "subseeds", []) or []),
        "paths": [str(p) for p in (result.paths or [])],
    }


def gallery_items(result) -> list[Any]:
    """Gallery value for a result: the saved files (so a download keeps the infotext) when every image was
    saved, else the images themselves."""
    if result.paths and len(result.paths) == len(result.images):
        return [str(p) for p in result.paths]
    return list(result.images)


def pick(record: dict | None, key: str, index: int | None) -> Any:
    """`record[key][index]` (index clamped to the list; None when empty)."""
    items = (record or {}).get(key) or []
    if not items:
        return None
    i = 0 if index is None else max(0, min(int(index), len(items) - 1))
    return items[i]


def outputs_note(record: dict | None, outputs_dir: Path) -> str:
    """HTML naming where the images of a result were saved (or that they were not)."""
    paths = (record or {}).get("paths") or []
    if not paths:
        folder = html.escape(str(outputs_dir))
        return f'<div class="ldm-saved">Not saved. Outputs folder: <code>{folder}</code></div>'
    folders = sorted({str(Path(p).parent) for p in paths})
    names = ", ".join(html.escape(Path(p).name) for p in paths[:8]) + (" …" if len(paths) > 8 else "")
    return (
        f'<div class="ldm-saved">Saved {len(paths)} file{"s" if len(paths) != 1 else ""} in '
        f"<code>{html.escape('; '.join(folders))}</code>: {names}</div>"
    )


def open_gallery_image(item: Any) -> Image.Image | None:
    """A PIL image (RGB) from one gallery value item ((path, caption) tuple, path, or image)."""
    if item is None:
        return None
    if isinstance(item, list | tuple):
        item = item[0]
    if isinstance(item, dict):
        item = item.get("path") or (item.get("image") or {}).get("path")
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, str | Path):
        with Image.open(item) as im:
            im.load()
            return im.convert("RGB")
    return None


def elapsed_since(t0: float) -> float:
    return time.monotonic() - t0
