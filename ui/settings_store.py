"""User settings kept in `config.json` (A1111's file name), and how they turn into an `EngineConfig`.

No Gradio here: `webui.py` reads the file before building the engine, the Settings tab edits it. Each
setting says when it takes effect: "live" (the next job uses it), "reload" (the next page load, for UI
defaults), "model" (the next model load) or "restart". Launch flags win over the file.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ldm_core.config import EngineConfig

Applies = Literal["live", "reload", "model", "restart"]


@dataclass(frozen=True)
class Setting:
    """One setting: its key in config.json, default, label in the Settings tab and when it applies."""

    key: str
    default: Any
    label: str
    applies: Applies
    section: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None


SETTINGS: tuple[Setting, ...] = (
    Setting("outdir_samples", "", "Output folder (empty: <data dir>/outputs)", "live", "Saving images"),
    Setting(
        "samples_filename_pattern",
        "[number]-[seed]",
        "File name pattern ([number], [seed], [date], [model_name], [prompt_words])",
        "live",
        "Saving images",
    ),
    Setting("samples_save", True, "Save every generated image", "live", "Saving images"),
    Setting(
        "show_progress_every_n_steps",
        1,
        "Live preview every N steps (0: off)",
        "live",
        "Live previews",
        minimum=0,
        maximum=32,
        step=1,
    ),
    Setting("default_sampler", "Euler a", "Default sampler", "reload", "Defaults"),
    Setting("default_scheduler", "Automatic", "Default schedule type", "reload", "Defaults"),
    Setting("default_steps", 20, "Default sampling steps", "reload", "Defaults", minimum=1, maximum=150, step=1),
    Setting("default_cfg_scale", 7.0, "Default CFG scale", "reload", "Defaults", minimum=1, maximum=30, step=0.5),
    Setting(
        "default_width",
        0,
        "Default width (0: the model's native size)",
        "reload",
        "Defaults",
        minimum=0,
        maximum=2048,
        step=8,
    ),
    Setting(
        "default_height",
        0,
        "Default height (0: the model's native size)",
        "reload",
        "Defaults",
        minimum=0,
        maximum=2048,
        step=8,
    ),
    Setting("ckpt_dir", "", "Checkpoint folder (empty: models/Stable-diffusion)", "restart", "Model folders"),
    Setting("vae_dir", "", "VAE folder (empty: models/VAE)", "restart", "Model folders"),
    Setting("lora_dir", "", "LoRA folder (empty: models/Lora)", "restart", "Model folders"),
    Setting("embeddings_dir", "", "Embeddings folder (empty: embeddings)", "restart", "Model folders"),
    Setting(
        "attention",
        "auto",
        "Attention backend",
        "restart",
        "Performance",
        choices=("auto", "sdpa", "xformers", "sliced"),
    ),
    Setting(
        "offload",
        "none",
        "Offload models to the CPU between uses (saves GPU memory)",
        "restart",
        "Performance",
        choices=("none", "model", "sequential"),
    ),
    Setting("vae_tiling", False, "VAE tiling (large images in less memory)", "model", "Performance"),
    Setting("vae_slicing", False, "VAE slicing (batches in less memory)", "model", "Performance"),
    Setting(
        "sd_model_checkpoint",
        "",
        "Checkpoint loaded at start (set by the checkpoint menu)",
        "restart",
        "Models",
    ),
)

SETTINGS_BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}


def coerce(setting: Setting, value: Any) -> Any:
    """`value` converted to the type of the setting's default; ValueError with a readable message."""
    default = setting.default
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if isinstance(default, int):
            out: Any = int(round(float(value)))
        elif isinstance(default, float):
            out = float(value)
        else:
            out = "" if value is None else str(value).strip()
    except (TypeError, ValueError):
        raise ValueError(f"{setting.key}: {value!r} is not a {type(default).__name__}") from None
    if setting.minimum is not None and out < setting.minimum:
        raise ValueError(f"{setting.key}: must be at least {setting.minimum}; got {out}")
    if setting.maximum is not None and out > setting.maximum:
        raise ValueError(f"{setting.key}: must be at most {setting.maximum}; got {out}")
    if setting.choices is not None and out not in setting.choices:
        raise ValueError(f"{setting.key}: choose one of {list(setting.choices)}; got {out!r}")
    return out


class SettingsStore:
    """Settings in one JSON file. Unknown keys in the file are kept (other tools may write them);
    bad values fall back to the default. Writes are atomic. Safe to share between threads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {}
        self.load()

    def load(self) -> None:
        """Read the file again (a missing or broken file gives the defaults)."""
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raw = {}
        values = raw if isinstance(raw, dict) else {}
        with self._lock:
            self._values = dict(values)

    def get(self, key: str) -> Any:
        """The value of `key` (its default when unset or invalid)."""
        setting = SETTINGS_BY_KEY[key]
        with self._lock:
            raw = self._values.get(key, setting.default)
        try:
            return coerce(setting, raw)
        except ValueError:
            return setting.default

    def all(self) -> dict[str, Any]:
        """Every known setting with its current value."""
        return {s.key: self.get(s.key) for s in SETTINGS}

    def update(self, changes: dict[str, Any]) -> list[str]:
        """Validate and save `changes`; returns the keys whose value changed. ValueError on a bad value
        (nothing is saved then) or an unknown key."""
        clean: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in SETTINGS_BY_KEY:
                raise ValueError(f"unknown setting {key!r}")
            clean[key] = coerce(SETTINGS_BY_KEY[key], value)
        with self._lock:
            changed = [k for k, v in clean.items() if self._values.get(k, SETTINGS_BY_KEY[k].default) != v]
            self._values.update(clean)
            self._write(self._values)
        return changed

    def _write(self, values: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(values, f, indent=2, sort_keys=True)
                f.write("\n")
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _path_or_none(text: str, data_dir: Path) -> Path | None:
    if not text:
        return None
    p = Path(text).expanduser()
    return p if p.is_absolute() else data_dir / p


def config_from_settings(
    base: EngineConfig, values: dict[str, Any], *, locked: frozenset[str] = frozenset()
) -> EngineConfig:
    """`base` with the settings in `values` applied, except the EngineConfig fields in `locked` (those a
    launch flag set). Relative folders are taken inside `base.data_dir`."""
    d = base.data_dir
    over: dict[str, Any] = {}

    def put(field: str, value: Any) -> None:
        if field not in locked and value is not None:
            over[field] = value

    put("outputs_dir", _path_or_none(values.get("outdir_samples", ""), d))
    if values.get("samples_filename_pattern"):
        put("filename_pattern", values["samples_filename_pattern"])
    if "samples_save" in values:
        put("save_images", bool(values["samples_save"]))
    if "show_progress_every_n_steps" in values:
        put("preview_every", int(values["show_progress_every_n_steps"]))
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
    return base.with_(**over)


#: The EngineConfig fields a running engine picks up from `engine.config` (read per job or per model load).
LIVE_FIELDS = frozenset(
    {"outputs_dir", "filename_pattern", "save_images", "preview_every", "vae_tiling", "vae_slicing"}
)


def live_config(current: EngineConfig, wanted: EngineConfig) -> EngineConfig:
    """`current` with only the fields a running engine can change without a restart taken from `wanted`."""
    return current.with_(**{f: getattr(wanted, f) for f in LIVE_FIELDS})
