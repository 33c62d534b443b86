"""One ControlNet unit's parameters, with A1111's API field names and values, and its infotext form.

API clients send units as `alwayson_scripts: {"controlnet": {"args": [unit, ...]}}` with the fields of
`ControlNetUnit`; `resize_mode` and `control_mode` may be A1111's integer indices or names (old names
too). The infotext key is `ControlNet <i>` with the value
`"Module: canny, Model: name [hash], Weight: 1, Resize Mode: Crop and Resize, Processor Res: 512,
Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 1, Pixel Perfect: False,
Control Mode: Balanced"`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ldm_core.extension_api import ImageInput, UnitParams, format_number

RESIZE_MODES: tuple[str, ...] = ("Just Resize", "Crop and Resize", "Resize and Fill")
CONTROL_MODES: tuple[str, ...] = ("Balanced", "My prompt is more important", "ControlNet is more important")
_RESIZE_ALIASES = {
    "just resize": 0,
    "resize": 0,
    "crop and resize": 1,
    "inner fit": 1,
    "scale to fit (inner fit)": 1,
    "inner fit (scale to fit)": 1,
    "resize and fill": 2,
    "outer fit": 2,
    "envelope (outer fit)": 2,
    "outer fit (shrink to fit)": 2,
}
_CONTROL_ALIASES = {m.casefold(): i for i, m in enumerate(CONTROL_MODES)}
DEFAULT_PROCESSOR_RES = 512


def _choice(value: Any, names: tuple[str, ...], aliases: Mapping[str, int], what: str) -> str:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an index 0..{len(names) - 1} or one of {list(names)}")
    if isinstance(value, int | float) and float(value).is_integer() and 0 <= int(value) < len(names):
        return names[int(value)]
    if isinstance(value, str):
        key = value.strip().casefold()
        if key.isdigit() and int(key) < len(names):
            return names[int(key)]
        if key in aliases:
            return names[aliases[key]]
    raise ValueError(f"{what} must be an index 0..{len(names) - 1} or one of {list(names)}")


class ControlNetUnit(UnitParams):
    """One ControlNet unit (A1111's API unit object).

    `module`: preprocessor name ("none", "canny", "threshold", "scribble_xdog", "invert", ...);
    `model`: a ControlNet from models/ControlNet, by name, file name or "name [hash]" ("None" = none);
    `image`: the control image (base64 or picture; None in img2img uses the init image);
    `processor_res`: short side in pixels the preprocessor works at (-1 = 512); `threshold_a/b`: the
    preprocessor's options (-1 = its default); `pixel_perfect`: pick `processor_res` from the output size;
    `control_mode`: "Balanced" applies the residuals to every CFG branch at full strength; "My prompt is
    more important" scales residual k (0 = shallowest, the middle block last) by 0.825**(12-k); "ControlNet
    is more important" does the same and applies control only to the conditional branch, so CFG
    amplifies it. `weight` multiplies every residual."""

    FIELD_ORDER = (
        "enabled",
        "module",
        "model",
        "weight",
        "image",
        "resize_mode",
        "processor_res",
        "threshold_a",
        "threshold_b",
        "guidance_start",
        "guidance_end",
        "pixel_perfect",
        "control_mode",
    )

    module: str = Field("none", json_schema_extra={"ui": "dropdown", "label": "Preprocessor"})
    model: str = Field("None", json_schema_extra={"ui": "dropdown", "label": "Model"})
    image: ImageInput = Field(None, json_schema_extra={"ui": "image", "label": "Control image"})
    resize_mode: Literal["Just Resize", "Crop and Resize", "Resize and Fill"] = Field(
        "Crop and Resize", json_schema_extra={"ui": "radio", "label": "Resize mode"}
    )
    processor_res: int = Field(
        -1, ge=-1, le=2048, json_schema_extra={"label": "Preprocessor resolution (-1 = 512)"}
    )
    threshold_a: float = Field(-1.0, json_schema_extra={"label": "Threshold A (-1 = default)"})
    threshold_b: float = Field(-1.0, json_schema_extra={"label": "Threshold B (-1 = default)"})
    pixel_perfect: bool = Field(False, json_schema_extra={"label": "Pixel perfect"})
    control_mode: Literal["Balanced", "My prompt is more important", "ControlNet is more important"] = Field(
        "Balanced", json_schema_extra={"ui": "radio", "label": "Control mode"}
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_names(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            if "image" not in data and "input_image" in data:
                data["image"] = data.pop("input_image")
            if data.get("module") in (None, ""):
                data.pop("module", None)
            if data.get("model") in (None, ""):
                data["model"] = "None"
        return data

    @field_validator("resize_mode", mode="before")
    @classmethod
    def _resize(cls, v):
        return _choice(v, RESIZE_MODES, _RESIZE_ALIASES, "resize_mode")

    @field_validator("control_mode", mode="before")
    @classmethod
    def _control(cls, v):
        return _choice(v, CONTROL_MODES, _CONTROL_ALIASES, "control_mode")

    @field_validator("module", "model")
    @classmethod
    def _strip(cls, v: str) -> str:
        return v.strip()

    @property
    def has_model(self) -> bool:
        return self.model.casefold() not in ("", "none")


def infotext_value(
    unit: ControlNetUnit, model_title: str, threshold_a: float, threshold_b: float, processor_res: int
) -> str:
    """The `ControlNet <i>` infotext value of a unit (the infotext writer JSON-quotes it)."""
    parts = [
        ("Module", unit.module),
        ("Model", model_title),
        ("Weight", format_number(unit.weight)),
        ("Resize Mode", unit.resize_mode),
        ("Processor Res", processor_res),
        ("Threshold A", format_number(threshold_a)),
        ("Threshold B", format_number(threshold_b)),
        ("Guidance Start", format_number(unit.guidance_start)),
        ("Guidance End", format_number(unit.guidance_end)),
        ("Pixel Perfect", unit.pixel_perfect),
        ("Control Mode", unit.control_mode),
    ]
    return ", ".join(f"{k}: {v}" for k, v in parts)


_KEY_RE = re.compile(r"^ControlNet (\d+)$")
_FIELDS = {
    "module": "module",
    "model": "model",
    "weight": "weight",
    "resize mode": "resize_mode",
    "processor res": "processor_res",
    "threshold a": "threshold_a",
    "threshold b": "threshold_b",
    "guidance start": "guidance_start",
    "guidance end": "guidance_end",
    "pixel perfect": "pixel_perfect",
    "control mode": "control_mode",
}


def parse_infotext_value(value: str) -> dict[str, Any]:
    """`"Module: canny, Model: x, Weight: 1, ..."` -> unit dict (API field names); unknown keys skipped."""
    out: dict[str, Any] = {"enabled": True}
    for part in value.split(", "):
        key, sep, val = part.partition(": ")
        name = _FIELDS.get(key.strip().casefold())
        if not sep or name is None:
            continue
        val = val.strip()
        if name in ("weight", "threshold_a", "threshold_b", "guidance_start", "guidance_end"):
            out[name] = float(val)
        elif name == "processor_res":
            out[name] = int(float(val))
        elif name == "pixel_perfect":
            out[name] = val.casefold() == "true"
        else:
            out[name] = val
    return out


def units_from_infotext(params: Mapping[str, str]) -> list[dict[str, Any]] | None:
    """Every `ControlNet <i>` key of parsed infotext as unit dicts, at their unit index (gaps are disabled
    units). None when there is none."""
    found: dict[int, dict[str, Any]] = {}
    for key, value in params.items():
        m = _KEY_RE.match(str(key))
        if m:
            found[int(m.group(1))] = parse_infotext_value(str(value))
    if not found:
        return None
    return [found.get(i, {"enabled": False}) for i in range(max(found) + 1)]
