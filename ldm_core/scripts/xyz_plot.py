"""The X/Y/Z plot script: one image per combination of up to three axes of values (seed, steps, CFG,
sampler, checkpoint, prompt S/R, ...), a labelled grid of them, and the single images with their own
infotexts.

`script_args` follow A1111's order: x_type, x_values, x_values_dropdown, y_type, y_values,
y_values_dropdown, z_type, z_values, z_values_dropdown, draw_legend, include_lone_images,
include_sub_grids, no_fixed_seeds, margin_size, csv_mode, raw_mode (the last two may be left out, as older
clients do). An axis type is an index into the mode's axis list (A1111's order, so indexes from A1111
clients mean the same axis) or the axis label. Values are comma-separated (CSV quoting allowed), with
integer/float ranges "1-5", "1-5 (+2)" (step) and "1-10 [5]" (count).

Result (A1111's): the grid first; with include_sub_grids and a Z axis, one grid per Z value next; with
include_lone_images, every cell's image after them. The grid's infotext is the first cell's plus "Script",
"X Type", "X Values" (and "Fixed X Values" for seeds), ...; every cell image keeps its own infotext.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from PIL import Image

from ..engine import Engine, GenerationResult
from ..generation_requests import GenerationRequest, RequestError
from ..grids import GriddedResult, GridOptions, append_params, image_grid, labelled_grid, save_grid, with_batch_grid
from ..rng import resolve_seed
from ..upscalers import latent_modes
from .base import (
    ARGS_FIELD,
    Script,
    ScriptArg,
    ScriptRun,
    arg_at,
    as_bool,
    as_number,
    rebuild,
    request_values,
    script_mode,
)

TITLE = "X/Y/Z plot"
MAX_CELLS = 1000
MAX_GRID_PIXELS = 200_000_000  # A1111's img_max_size_mp default (200 MP)
_BOTH = ("txt2img", "img2img")
_T2I = ("txt2img",)
_I2I = ("img2img",)


@dataclass(frozen=True)
class Axis:
    """One axis type. `kind`: int, float, str, size, permutations or nothing. `field` is the request field
    it sets (None for special ones). `fmt`: how a value is labelled ("label" = "Steps: 20", "value", "path",
    "join", "none"). `choices`: the list its values come from (samplers, checkpoints, ...)."""

    label: str
    kind: str
    field: str | None = None
    modes: tuple[str, ...] = _BOTH
    fmt: str = "label"
    choices: str | None = None
    cost: float = 0.0
    special: str | None = None

    @property
    def supported(self) -> bool:
        return self.field is not None or self.special is not None or self.kind == "nothing"


# A1111's axis list (scripts/xyz_grid.py), in its order: an index sent by an A1111 client names the same
# axis here. Axes whose setting this server lacks are listed (so indexes line up) and refused when used.
AXES: tuple[Axis, ...] = (
    Axis("Nothing", "nothing", fmt="none"),
    Axis("Seed", "int", "seed"),
    Axis("Var. seed", "int", "subseed"),
    Axis("Var. strength", "float", "subseed_strength"),
    Axis("Steps", "int", "steps"),
    Axis("Hires steps", "int", "hr_second_pass_steps", _T2I),
    Axis("CFG Scale", "float", "cfg_scale"),
    Axis("Image CFG Scale", "float", "image_cfg_scale", _I2I),
    Axis("Prompt S/R", "str", fmt="value", special="prompt_sr"),
    Axis("Prompt order", "permutations", fmt="join", special="prompt_order"),
    Axis("Sampler", "str", "sampler_name", _T2I, fmt="value", choices="samplers"),
    Axis("Hires sampler", "str", "hr_sampler_name", _T2I, choices="samplers"),
    Axis("Sampler", "str", "sampler_name", _I2I, fmt="value", choices="samplers"),
    Axis("Checkpoint name", "str", "model", fmt="path", choices="checkpoints", cost=1.0),
    Axis("Negative Guidance minimum sigma", "float", "s_min_uncond"),
    Axis("Sigma Churn", "float", "s_churn"),
    Axis("Sigma min", "float", "s_tmin"),
    Axis("Sigma max", "float", "s_tmax"),
    Axis("Sigma noise", "float", "s_noise"),
    Axis("Schedule type", "str", "scheduler", choices="schedulers"),
    Axis("Schedule min sigma", "float"),
    Axis("Schedule max sigma", "float"),
    Axis("Schedule rho", "float"),
    Axis("Beta schedule alpha", "float"),
    Axis("Beta schedule beta", "float"),
    Axis("Eta", "float", "eta"),
    Axis("Clip skip", "int", "clip_skip"),
    Axis("Denoising", "float", "denoising_strength"),
    Axis("Initial noise multiplier", "float", "initial_noise_multiplier"),
    Axis("Extra noise", "float"),
    Axis("Hires upscaler", "str", "hr_upscaler", _T2I, choices="hires_upscalers"),
    Axis("Cond. Image Mask Weight", "float", "inpainting_mask_weight", _I2I),
    Axis("VAE", "str", "vae", choices="vaes", cost=0.7),
    Axis("Styles", "str", fmt="label", choices="styles", special="styles"),
    Axis("UniPC Order", "int", cost=0.5),
    Axis("Face restore", "str", "restore_faces", fmt="value"),
    Axis("Token merging ratio", "float"),
    Axis("Token merging ratio high-res", "float"),
    Axis("Always discard next-to-last sigma", "str", choices="bool"),
    Axis("SGM noise multiplier", "str", choices="bool"),
    Axis("Refiner checkpoint", "str", "refiner_checkpoint", fmt="path", choices="checkpoints_or_none", cost=1.0),
    Axis("Refiner switch at", "float", "refiner_switch_at"),
    Axis("RNG source", "str"),
    Axis("FP8 mode", "str", cost=0.9),
    Axis("Size", "size", special="size"),
    # not in A1111's list (after it, so A1111's indexes are unchanged)
    Axis("Width", "int", "width"),
    Axis("Height", "int", "height"),
    Axis("Rescale CFG", "float", "rescale_cfg"),  # the CFG Rescale extension's axis name
)


# Axis lists of older A1111 versions, for clients that send those versions' argument layouts (and so index
# those lists): "v1.0" = 11 arguments without dropdown slots (x_type, x_values, y_type, ..., margin_size), as
# the webuiapi package documents; "v1.2" = 14 arguments (dropdown slots, no csv_mode/raw_mode).
_V10 = (
    "Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "{hires_steps}", "CFG Scale", "{image_cfg}",
    "Prompt S/R", "Prompt order", "Sampler", "Checkpoint name", "Sigma Churn", "Sigma min", "Sigma max", "Sigma noise",
    "Eta", "Clip skip", "Denoising",
)  # fmt: skip
LEGACY_LABELS = {
    ("v1.0", "txt2img"): (*_V10, "Hires upscaler", "VAE", "Styles"),
    ("v1.0", "img2img"): (*_V10, "Cond. Image Mask Weight", "VAE", "Styles"),
    ("v1.2", "txt2img"): (
        *_V10, "Hires upscaler", "Fallback latent upscaler sampler", "VAE", "Styles", "UniPC Order", "Face restore"
    ),
    ("v1.2", "img2img"): (*_V10, "Cond. Image Mask Weight", "VAE", "Styles", "UniPC Order", "Face restore"),
}  # fmt: skip
_OLD_ONLY = {"Fallback latent upscaler sampler": Axis("Fallback latent upscaler sampler", "str", modes=_T2I)}


def axes_for(mode: str, layout: str = "current") -> list[Axis]:
    """The axis list of the txt2img or img2img tab (A1111's `current_axis_options`); `layout` "v1.0" or
    "v1.2": the list of that A1111 version, for clients that send its argument layout."""
    m = "txt2img" if mode == "txt2img" else "img2img"
    axes = [a for a in AXES if m in a.modes]
    if layout == "current":
        return axes
    by_label = {a.label: a for a in axes} | _OLD_ONLY
    own = {"{hires_steps}": "Hires steps"} if m == "txt2img" else {"{image_cfg}": "Image CFG Scale"}
    labels = [own.get(x, x) for x in LEGACY_LABELS[(layout, m)] if not x.startswith("{") or x in own]
    return [by_label[label] for label in labels]


def normalise_args(args: list[Any]) -> tuple[list[Any], str]:
    """(arguments in A1111 1.6+'s 16-value layout, the layout they came in). The old 11-value layout
    (x_type, x_values, y_type, y_values, z_type, z_values, draw_legend, include_lone_images, include_sub_grids,
    no_fixed_seeds, margin_size) is recognised by an axis type where the x dropdown list goes, and gets empty
    dropdown slots; 12 to 15 values are A1111 1.1-1.5's layout."""
    if 3 <= len(args) <= 11 and not isinstance(args[2], list | tuple) and args[2] not in (None, ""):
        old = list(args) + [None] * (11 - len(args))
        return [old[0], old[1], [], old[2], old[3], [], old[4], old[5], [], *old[6:11]], "v1.0"
    return list(args), ("v1.2" if 12 <= len(args) <= 15 else "current")


def _norm(label: str) -> str:
    return re.sub(r"[\s.]+", " ", label.replace(".", " ")).strip().lower()


def find_axis(value: Any, mode: str, which: str, layout: str = "current") -> Axis:
    """An axis by index into the mode's list, or by label (case-insensitive; "Hires. sampler" works)."""
    axes = axes_for(mode, layout)
    if isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer():
        i = int(value)
        if 0 <= i < len(axes):
            return axes[i]
        raise RequestError(ARGS_FIELD, f"{TITLE}: {which} type index must be 0..{len(axes) - 1}; got {value!r}")
    text = str(value if value is not None else "Nothing").strip()
    if text.isdigit():
        return find_axis(int(text), mode, which, layout)
    for a in axes_for(mode):
        if _norm(a.label) == _norm(text):
            return a
    names = [a.label for a in axes_for(mode) if a.supported]
    raise RequestError(ARGS_FIELD, f"{TITLE}: unknown {which} type {text!r}; choose one of {names} or an index")


# ---- values -----------------------------------------------------------------------------------------------
_NUM = r"[+-]?\s*\d+(?:\.\d*)?"
_INT = r"[+-]?\s*\d+"
_RANGE_INT = re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\(\s*([+-]\d+)\s*\))?\s*")
_COUNT_INT = re.compile(rf"\s*({_INT})\s*-\s*({_INT})\s*\[\s*(\d+)\s*\]\s*")
_RANGE_FLOAT = re.compile(rf"\s*({_NUM})\s*-\s*({_NUM})(?:\s*\(\s*([+-]\d+(?:\.\d*)?)\s*\))?\s*")
_COUNT_FLOAT = re.compile(rf"\s*({_NUM})\s*-\s*({_NUM})\s*\[\s*(\d+(?:\.\d*)?)\s*\]\s*")


def split_values(text: str, raw: bool = False) -> list[str]:
    """Axis text -> value strings: CSV (quotes keep commas), each stripped, empty ones dropped; with `raw`
    and several lines, one value per line."""
    text = str(text or "")
    if raw and "\n" in text.strip():
        return [line.strip() for line in text.strip().split("\n") if line.strip()]
    rows = csv.reader(io.StringIO(text), skipinitialspace=True)
    return [v.strip() for row in rows for v in row if v.strip()]


def _num(text: str) -> float:
    return float(text.replace(" ", ""))


def _int(text: str) -> int:
    return int(text.replace(" ", ""))


def _linspace(start: float, stop: float, count: int) -> list[float]:
    if count <= 1:
        return [start]
    return [start + (stop - start) * i / (count - 1) for i in range(count)]


def expand_ints(values: Sequence[str]) -> list[str | int]:
    """Integer ranges expanded: "1-5" -> 1..5, "1-9 (+2)" -> 1,3,..,9, "0-100 [5]" -> 5 evenly spaced
    (truncated to integers); other values as they are."""
    out: list[str | int] = []
    for v in values:
        if m := _RANGE_INT.fullmatch(v):
            start, end = _int(m.group(1)), _int(m.group(2))  # exact: seeds go up to 2**64 - 1
            step = _int(m.group(3)) if m.group(3) else 1
            if step == 0:
                raise ValueError(f"range {v!r} has step 0")
            out += list(range(start, end + (1 if step > 0 else -1), step))
        elif m := _COUNT_INT.fullmatch(v):
            start, end, count = _int(m.group(1)), _int(m.group(2)), int(m.group(3))
            # evenly spaced, truncated to integers as A1111 does, in exact arithmetic (large seeds)
            out += [int(start + Fraction((end - start) * i, max(1, count - 1))) for i in range(count)]
        else:
            out.append(v)
    return out


def expand_floats(values: Sequence[str]) -> list[str | float]:
    """Float ranges expanded: "0.5-1.5 (+0.5)" -> 0.5, 1.0, 1.5 ("1-3" steps by 1); "1-2 [3]" -> count."""
    out: list[str | float] = []
    for v in values:
        if m := _RANGE_FLOAT.fullmatch(v):
            start, end = _num(m.group(1)), _num(m.group(2))
            step = _num(m.group(3)) if m.group(3) else 1.0
            if step == 0:
                raise ValueError(f"range {v!r} has step 0")
            n = max(0, math.floor((end - start) / step + 1e-9)) + 1
            out += [round(start + i * step, 10) for i in range(n)]
        elif m := _COUNT_FLOAT.fullmatch(v):
            out += _linspace(_num(m.group(1)), _num(m.group(2)), int(float(m.group(3))))
        else:
            out.append(v)
    return out


def parse_axis_values(axis: Axis, text: Any, dropdown: Any = None, *, csv_mode: bool = True, raw: bool = False) -> list:
    """The typed values of one axis from its text (or, for an axis with choices outside csv mode, the
    dropdown list when one is given). Raises ValueError with the bad value."""
    if axis.kind == "nothing":
        return [0]
    if axis.choices and not csv_mode and isinstance(dropdown, list | tuple) and dropdown:
        items = [str(v).strip() for v in dropdown if str(v).strip()]
    elif isinstance(text, list | tuple):
        items = [str(v).strip() for v in text if str(v).strip()]
    else:
        items = split_values(text, raw)
    if not items:
        raise ValueError("no values given")
    if axis.kind == "int":
        out = []
        for v in expand_ints(items):
            try:
                out.append(v if isinstance(v, int) else int(str(v).replace(" ", "")))
            except ValueError:
                raise ValueError(f"{v!r} is not an integer") from None
        return out
    if axis.kind == "float":
        out = []
        for v in expand_floats(items):
            try:
                out.append(v if isinstance(v, float) else float(str(v)))
            except ValueError:
                raise ValueError(f"{v!r} is not a number") from None
        return out
    if axis.kind == "permutations":
        return [list(p) for p in itertools.permutations(items)]
    return items


def format_label(axis: Axis, value: Any) -> str:
    if axis.fmt == "none":
        return ""
    if isinstance(value, float):
        value = round(value, 8)
        value = int(value) if value.is_integer() and axis.kind != "float" else value
    if axis.fmt == "value":
        return str(value)
    if axis.fmt == "path":
        return os.path.basename(str(value))
    if axis.fmt == "join":
        return ", ".join(value)
    return f"{axis.label}: {value}"


# ---- applying a value ---------------------------------------------------------------------------------
def _choices(engine: Engine, kind: str | None) -> list[str] | None:
    if kind is None:
        return None
    if kind == "samplers":
        return list(engine.samplers.names())
    if kind == "schedulers":
        return list(engine.samplers.schedule_types())
    if kind == "checkpoints":
        return sorted((e.title for e in engine.models.checkpoints()), key=str.casefold)
    if kind == "checkpoints_or_none":
        return ["None", *sorted((e.title for e in engine.models.checkpoints()), key=str.casefold)]
    if kind == "vaes":
        return ["Automatic", "None", *[e.name for e in engine.models.vaes()]]
    if kind == "hires_upscalers":
        return [*latent_modes(), *[n for n in engine.upscalers.names() if n != "None"]]
    if kind == "styles":
        return list(engine.styles.names())
    if kind == "bool":
        return ["False", "True"]
    return None


def _reorder(prompt: str, tokens: Sequence[str]) -> str:
    """Prompt order: the given tokens put back into the prompt in `tokens`' order, at the places where
    the tokens were found (earliest place first)."""
    found = sorted((prompt.find(t), t) for t in tokens)
    parts, rest = [], prompt
    for _, t in found:
        n = rest.find(t)
        if n < 0:
            raise ValueError(f"Prompt order: {t!r} is not in the prompt")
        parts.append(rest[:n])
        rest = rest[n + len(t) :]
    return "".join(p + tokens[i] for i, p in enumerate(parts)) + rest


def _changes(engine: Engine, axis: Axis, value: Any, values: list, current: dict[str, Any]) -> dict[str, Any]:
    """The request changes for `value` on `axis` given the values built so far (`current`)."""
    if axis.kind == "nothing":
        return {}
    if axis.special == "prompt_sr":
        search = str(values[0])
        p, n = current["prompt"], current["negative_prompt"]
        if search not in p and search not in n:
            raise ValueError(f"Prompt S/R did not find {search!r} in the prompt or negative prompt")
        return {"prompt": p.replace(search, str(value)), "negative_prompt": n.replace(search, str(value))}
    if axis.special == "prompt_order":
        return {"prompt": _reorder(current["prompt"], value)}
    if axis.special == "size":
        m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", str(value))
        if not m:
            raise ValueError(f"size {value!r} must be WIDTHxHEIGHT, e.g. 512x768")
        return {"width": int(m.group(1)), "height": int(m.group(2))}
    if axis.special == "styles":
        return {"styles": [*current.get("styles", []), *[s.strip() for s in str(value).split(",") if s.strip()]]}
    field = axis.field
    assert field is not None
    if field == "model":
        try:
            return {"model": engine.models.find_checkpoint(str(value)).title}
        except (KeyError, LookupError, ValueError):
            raise ValueError(f"unknown checkpoint {value!r}; choose one of {_choices(engine, 'checkpoints')}") from None
    if field == "refiner_checkpoint" and str(value).strip() in ("", "None", "none"):
        return {field: None}
    if field in ("sampler_name", "hr_sampler_name"):
        try:
            info, _ = engine.samplers.resolve(str(value), "Automatic")
        except (KeyError, LookupError, ValueError):
            raise ValueError(f"unknown sampler {value!r}; choose one of {_choices(engine, 'samplers')}") from None
        return {field: info.name}
    if field == "scheduler":
        for s in engine.samplers.schedule_types():
            if s.lower() == str(value).strip().lower():
                return {field: s}
        raise ValueError(f"unknown schedule type {value!r}; choose one of {_choices(engine, 'schedulers')}")
    if field == "vae":
        text = str(value).strip()
        if text.lower() in ("automatic", "auto", "none", ""):
            return {"vae": None}
        try:
            return {"vae": engine.models.find_vae(text).name}
        except (KeyError, LookupError, ValueError):
            raise ValueError(f"unknown VAE {value!r}; choose one of {_choices(engine, 'vaes')}") from None
    if field == "restore_faces":
        return {field: str(value).strip().lower() in ("true", "yes", "y", "1", "codeformer", "gfpgan")}
    return {field: value}


# ---- the plan -----------------------------------------------------------------------------------------
@dataclass
class AxisPlan:
    axis: Axis
    text: str
    values: list
    labels: list[str]
    fixed: list | None = None  # seeds made concrete (for the "Fixed X Values" infotext key)


@dataclass
class XYZPlan:
    x: AxisPlan
    y: AxisPlan
    z: AxisPlan
    cells: list[tuple[int, int, int, GenerationRequest]]  # (ix, iy, iz, request) in processing order
    draw_legend: bool
    include_lone_images: bool
    include_sub_grids: bool
    margin: int


def arguments(engine: Engine, mode: str) -> list[ScriptArg]:
    labels = [a.label for a in axes_for(mode)]
    out: list[ScriptArg] = []
    for name, default in (("X", labels[1]), ("Y", labels[0]), ("Z", labels[0])):
        out += [
            ScriptArg(f"{name} type", default, "dropdown", choices=labels),
            ScriptArg(f"{name} values", "", "text"),
            ScriptArg(f"{name} values", [], "multiselect", choices=[], visible=False),
        ]
    return out + [
        ScriptArg("Draw legend", True, "checkbox"),
        ScriptArg("Include Sub Images", False, "checkbox"),
        ScriptArg("Include Sub Grids", False, "checkbox"),
        ScriptArg("Keep -1 for seeds", False, "checkbox"),
        ScriptArg("Grid margins (px)", 0, "slider", 0, 500, 2),
        ScriptArg("Use text inputs instead of dropdowns", True, "checkbox"),
        ScriptArg("Use raw text lines", False, "checkbox"),
    ]


def prepare(engine: Engine, request: GenerationRequest, args: list[Any]) -> XYZPlan:
    mode = script_mode(request)
    args, layout = normalise_args(args)
    flags = ["Draw legend", "Include Sub Images", "Include Sub Grids", "Keep -1 for seeds"]
    draw_legend, lone, sub_grids, no_fixed = (
        as_bool(arg_at(args, 9 + i, d), TITLE, 9 + i, flags[i]) for i, d in enumerate((True, False, False, False))
    )
    margin = int(as_number(arg_at(args, 13, 0), TITLE, 13, "Grid margins (px)", 0, 500))
    csv_mode = as_bool(arg_at(args, 14, True), TITLE, 14, "Use text inputs instead of dropdowns")
    raw = as_bool(arg_at(args, 15, False), TITLE, 15, "Use raw text lines")
    base = request_values(request)
    if not no_fixed:
        base["seed"] = resolve_seed(request.seed)
        base["subseed"] = resolve_seed(request.subseed)
    plans = []
    for k, which in enumerate("XYZ"):
        axis = find_axis(arg_at(args, 3 * k, 1 if which == "X" else 0), mode, which, layout)
        text = arg_at(args, 3 * k + 1, "")
        dropdown = arg_at(args, 3 * k + 2, [])
        if not axis.supported or (axis.field is not None and axis.field not in type(request).model_fields):
            raise RequestError(ARGS_FIELD, f"{TITLE}: {which} type {axis.label!r} is not supported by this server")
        try:
            values = parse_axis_values(axis, text, dropdown, csv_mode=csv_mode, raw=raw)
        except ValueError as exc:
            raise RequestError(ARGS_FIELD, f"{TITLE}: {which} values ({axis.label}): {exc}") from None
        fixed = None
        if axis.field in ("seed", "subseed") and not no_fixed:
            values = [resolve_seed(-1) if v in (-1, None, "") else v for v in values]
            fixed = list(values)
        text_str = ", ".join(str(v) for v in text) if isinstance(text, list | tuple) else str(text or "")
        if axis.choices and not csv_mode and isinstance(dropdown, list | tuple) and dropdown:
            text_str = ", ".join(str(v) for v in dropdown)
        plans.append(AxisPlan(axis, text_str, values, [format_label(axis, v) for v in values], fixed))
    x, y, z = plans
    count = len(x.values) * len(y.values) * len(z.values)
    if count > MAX_CELLS:
        raise RequestError(ARGS_FIELD, f"{TITLE}: {count} cells is too many (at most {MAX_CELLS})")
    w, h = request.width or 512, request.height or 512
    if count * w * h > MAX_GRID_PIXELS:
        raise RequestError(
            ARGS_FIELD,
            f"{TITLE}: the grid would have {count * w * h // 10**6} MPixels (at most {MAX_GRID_PIXELS // 10**6})",
        )
    # the costliest axis (a checkpoint switch) changes least often, as in A1111
    order = sorted([("z", z), ("y", y), ("x", x)], key=lambda t: -t[1].axis.cost)
    ranges = [range(len(p.values)) for _, p in order]
    cells = []
    for idx in itertools.product(*ranges):
        pos = {name: i for (name, _), i in zip(order, idx, strict=True)}
        values = dict(base)
        try:
            for plan, i in ((x, pos["x"]), (y, pos["y"]), (z, pos["z"])):
                values.update(_changes(engine, plan.axis, plan.values[i], plan.values, values))
            cell = rebuild(request, **values)
        except ValueError as exc:
            msg = exc.message if isinstance(exc, RequestError) else str(exc)
            field = exc.field if isinstance(exc, RequestError) else None
            where = f"{field}: " if field else ""
            raise RequestError(ARGS_FIELD, f"{TITLE}: cell {pos['x']},{pos['y']},{pos['z']}: {where}{msg}") from None
        cells.append((pos["x"], pos["y"], pos["z"], cell))
    return XYZPlan(x, y, z, cells, draw_legend, lone, sub_grids, margin)


def _grid_params(plan: XYZPlan, with_z: bool) -> dict[str, Any]:
    params: dict[str, Any] = {"Script": TITLE}
    axes = [("X", plan.x), ("Y", plan.y)] + ([("Z", plan.z)] if with_z else [])
    for name, p in axes:
        if p.axis.kind == "nothing":
            continue
        params[f"{name} Type"] = p.axis.label
        params[f"{name} Values"] = p.text
        if p.fixed is not None:
            params[f"Fixed {name} Values"] = ", ".join(str(v) for v in p.fixed)
    return params


def run(run_: ScriptRun, request: GenerationRequest, plan: XYZPlan) -> GenerationResult:
    nx, ny, nz = len(plan.x.values), len(plan.y.values), len(plan.z.values)
    run_.total_jobs = len(plan.cells) * request.n_iter
    cells: dict[tuple[int, int, int], GenerationResult] = {}
    template: GenerationResult | None = None
    loaded = run_.engine.current_model
    try:
        for n, (ix, iy, iz, cell_req) in enumerate(plan.cells):
            if run_.interrupted:
                break
            run_.progress_text(f"{TITLE}: {n + 1} out of {len(plan.cells)}")
            res = run_.generate(cell_req)
            if res.images:
                cells[(ix, iy, iz)] = with_batch_grid(res, _CELL_GRID, run_.engine.config.outputs_dir, request.mode)
                template = template or res
            if res.interrupted:
                break
    finally:
        # a Checkpoint name axis leaves the model that was loaded before (A1111 reloads it too)
        if loaded is not None and "model" in {p.axis.field for p in (plan.x, plan.y, plan.z)}:
            current = run_.engine.current_model
            if current is None or current.entry.path != loaded.entry.path:
                run_.engine.load_checkpoint(loaded.entry.title)
    if template is None:
        return GriddedResult(interrupted=True)
    size = template.images[0].size
    images, infos, seeds, subseeds, manifests, prompts, negatives = [], [], [], [], [], [], []
    saved: list = []
    for iz in range(nz):
        for iy in range(ny):
            for ix in range(nx):
                r = cells.get((ix, iy, iz))
                if r is None:  # interrupted before this cell: an empty image, as A1111 leaves
                    images.append(Image.new("RGB", size))
                    infos.append("")
                    seeds.append(-1)
                    subseeds.append(-1)
                    manifests.append({})
                    prompts.append("")
                    negatives.append("")
                    continue
                cell_req = next(c for x, y, z, c in plan.cells if (x, y, z) == (ix, iy, iz))
                images.append(r.images[0])
                infos.append(r.infotexts[0] if r.infotexts else "")
                seeds.append(r.seeds[0] if r.seeds else -1)
                subseeds.append(r.subseeds[0] if r.subseeds else -1)
                manifests.append(r.manifests[0] if r.manifests else {})
                prompts.append(cell_req.prompt)
                negatives.append(cell_req.negative_prompt)
                if len(r.paths) == 1:
                    saved.append(r.paths[0])
    per_z = nx * ny
    sub_grids, sub_infos = [], []
    for iz in range(nz):
        part = images[iz * per_z : (iz + 1) * per_z]
        sub_grids.append(
            labelled_grid(part, plan.x.labels, plan.y.labels, draw_legend=plan.draw_legend, margin=plan.margin)
        )
        first = infos[iz * per_z]
        sub_infos.append(append_params(first, _grid_params(plan, with_z=False)))
    main = image_grid(sub_grids, rows=1)
    if plan.draw_legend and any(plan.z.labels):
        main = labelled_grid(sub_grids, plan.z.labels, [""], draw_legend=True)
    main_info = append_params(infos[0], _grid_params(plan, with_z=True))
    out_images = [main]
    out_infos = [main_info]
    grids = 1
    if plan.include_sub_grids:
        out_images += sub_grids
        out_infos += sub_infos
        grids += nz
    paths = []
    if run_.grid.save:
        paths.append(
            save_grid(
                main,
                run_.engine.config.outputs_dir,
                request.mode,
                infotext=main_info,
                manifest=manifests[0] or None,
                seed=seeds[0],
                prompt=prompts[0],
                model_name=template.model_name,
            )
        )
    result = GriddedResult.from_result(
        template,
        images=out_images,
        infotexts=out_infos,
        seeds=[seeds[0]] * grids,
        subseeds=[subseeds[0]] * grids,
        manifests=[manifests[0]] * grids,
        paths=paths,
        interrupted=run_.interrupted or len(cells) < len(plan.cells),
        skipped_batches=0,
        index_of_first_image=grids,
        all_prompts=[],
        all_negative_prompts=[],
    )
    if plan.include_lone_images:
        result.images += images
        result.infotexts += infos
        result.seeds += seeds
        result.subseeds += subseeds
        result.manifests += manifests
        result.all_prompts = prompts
        result.all_negative_prompts = negatives
        if paths and len(saved) == len(images):
            result.paths = paths + saved
    return result


_CELL_GRID = GridOptions(return_grid=True, save=False)  # a cell of several images shows their grid

SCRIPT = Script(TITLE, _BOTH, arguments, prepare, run)
