"""Sidecar files: a user's overrides for what a checkpoint's keys cannot tell.

Put `NAME.json`, `NAME.yaml` or `NAME.yml` next to `NAME.safetensors` (for a diffusers folder `NAME/`, next
to the folder). Recognised content:

- our own keys (JSON or YAML), any subset::

      {"prediction_type": "v_prediction", "family": "sd2", "rescale_cfg": 0.7}
      {"cfg_scale": 3, "image_guidance": 3}
      {"sampler_name": "DPM++ 2M", "scheduler": "Exponential"}

  `prediction_type` is "epsilon" or "v_prediction" ("eps" and "v" are accepted too); `family` is "sd1",
  "sd2", "sdxl" or "sdxl-refiner"; `rescale_cfg` (0..1) is the model's recommended CFG rescale, used when a
  request does not set one (v-prediction models that blow colours out at CFG 7 want about 0.7); `cfg_scale`
  (1..30) is a diffusion upscaler's recommended CFG scale, used when Settings > Upscaling leaves it at 0;
  `image_guidance` (1..10) likewise an SD x4 upscaler's recommended guidance by its low-resolution image;
  `sampler_name` and `scheduler` (sampler and schedule type labels, as the A1111 API names those fields) are
  the model's recommended sampling, where the UI's dropdowns start and what an API or CLI request that names
  no sampler runs (`Engine.recommended_sampling`). For a motion module (`models/AnimateDiff/NAME.json`),
  `adapter_lora` names the LoRA it was trained beside (its domain adapter, as AnimateDiff v3's module comes with
  `v3_sd15_adapter`): a clip made with the module adds `<lora:ADAPTER:1>` unless its prompt names that LoRA.
  Other keys are ignored, so A1111's per-model user-metadata JSON (description, activation text, ...) is harmless.
- an original LDM/SGM inference config, as A1111 users already keep next to SD 2.x models
  (`v2-inference-v.yaml`, ...): `model.params.parameterization: "v"` means v-prediction, its absence
  epsilon; an SGM config whose denoiser uses `VScaling` means v-prediction.

When both a JSON and a YAML sidecar exist, the JSON one wins. An unreadable sidecar is logged and ignored; a
readable one with an invalid value raises `SidecarError` naming the file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .detect import FAMILIES

log = logging.getLogger(__name__)

SIDECAR_SUFFIXES = (".yaml", ".yml", ".json")  # later ones win
_KEYS = (
    "family",
    "prediction_type",
    "rescale_cfg",
    "cfg_scale",
    "image_guidance",
    "sampler_name",
    "scheduler",
    "adapter_lora",
)
_PREDICTION_ALIASES = {
    "epsilon": "epsilon",
    "eps": "epsilon",
    "v_prediction": "v_prediction",
    "v": "v_prediction",
}


class SidecarError(ValueError):
    """A sidecar file holds a value we cannot use; the message names the file."""


@dataclass(frozen=True)
class Sidecar:
    """Overrides read from the sidecar files of one model; None means "not set"."""

    family: str | None = None
    prediction_type: str | None = None
    rescale_cfg: float | None = None
    cfg_scale: float | None = None
    image_guidance: float | None = None
    sampler_name: str | None = None
    scheduler: str | None = None
    adapter_lora: str | None = None
    sources: tuple[Path, ...] = ()


def sidecar_paths(model_path: str | Path) -> list[Path]:
    """Candidate sidecar files of a checkpoint file or diffusers folder (existing or not)."""
    p = Path(model_path)
    stem = p.name if p.is_dir() else p.stem
    return [p.parent / f"{stem}{s}" for s in SIDECAR_SUFFIXES]


def _from_ldm_config(data: dict[str, Any]) -> dict[str, Any]:
    """Overrides implied by an original LDM/SGM yaml config (`model: {target, params}`)."""
    params = (data.get("model") or {}).get("params") or {}
    if not isinstance(params, dict):
        return {}
    out: dict[str, Any] = {}
    denoiser = json.dumps(params.get("denoiser_config") or {})
    if "parameterization" in params:
        out["prediction_type"] = params["parameterization"]
    elif "VScaling" in denoiser:
        out["prediction_type"] = "v"
    elif "EpsScaling" in denoiser or "unet_config" in params or "network_config" in params:
        out["prediction_type"] = "eps"
    return out


def _parse(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        log.warning("ignoring unreadable sidecar %s: %s", path, e)
        return {}
    if not isinstance(data, dict):
        log.warning("ignoring sidecar %s: not a mapping", path)
        return {}
    if isinstance(data.get("model"), dict) and "target" in data["model"]:
        return _from_ldm_config(data)
    return {k: data[k] for k in _KEYS if k in data}


def read_sidecar(model_path: str | Path) -> Sidecar:
    """Merge the sidecar files of `model_path` (see the module docstring). Raises `SidecarError`."""
    family = prediction = rescale = cfg = image_guidance = sampler = schedule = adapter = None
    sources = []
    for path in sidecar_paths(model_path):
        if not path.is_file():
            continue
        values = _parse(path)
        if not values:
            continue
        sources.append(path)
        if "family" in values:
            f = str(values["family"]).lower()
            if f not in FAMILIES:
                raise SidecarError(f"{path}: family {values['family']!r} is not one of {', '.join(FAMILIES)}")
            family = f
        if "prediction_type" in values:
            pt = _PREDICTION_ALIASES.get(str(values["prediction_type"]).lower())
            if pt is None:
                raise SidecarError(
                    f"{path}: prediction_type {values['prediction_type']!r} is not one of "
                    "epsilon, v_prediction (or eps, v)"
                )
            prediction = pt
        if "rescale_cfg" in values:
            rescale = _number(path, "rescale_cfg", values["rescale_cfg"], 0.0, 1.0)
        if "cfg_scale" in values:
            cfg = _number(path, "cfg_scale", values["cfg_scale"], 1.0, 30.0)
        if "image_guidance" in values:
            image_guidance = _number(path, "image_guidance", values["image_guidance"], 1.0, 10.0)
        if "sampler_name" in values:
            sampler = _label(path, "sampler_name", values["sampler_name"])
        if "scheduler" in values:
            schedule = _label(path, "scheduler", values["scheduler"])
        if "adapter_lora" in values:
            adapter = _name(path, "adapter_lora", values["adapter_lora"])
    return Sidecar(family, prediction, rescale, cfg, image_guidance, sampler, schedule, adapter, tuple(sources))


def _label(path: Path, key: str, value: Any) -> str:
    """A sampler or schedule-type label: a non-empty string (whether this engine has it is checked where it
    is used, since extensions add samplers)."""
    if not isinstance(value, str) or not value.strip():
        raise SidecarError(f"{path}: {key} {value!r} must be a sampler or schedule type label, e.g. 'DPM++ 2M'")
    return value.strip()


def _name(path: Path, key: str, value: Any) -> str:
    """A file name without extension (a LoRA's name as `<lora:NAME:1>` takes it)."""
    if not isinstance(value, str) or not value.strip() or any(c in value for c in "<>:/\\"):
        raise SidecarError(f"{path}: {key} {value!r} must be a LoRA name as <lora:NAME:1> takes it")
    return value.strip()


def _number(path: Path, key: str, value: Any, low: float, high: float) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = float("nan")
    if not low <= x <= high:  # (NaN fails too)
        raise SidecarError(f"{path}: {key} {value!r} must be a number from {low:g} to {high:g}")
    return x
