"""Shipped diffusers-layout configs, one folder per model variant, so nothing is fetched from the Hub.

Each folder is a diffusers layout without weights (`model_index.json`, `unet/config.json`, `vae/config.json`,
`text_encoder/config.json`, `text_encoder_2/config.json` for SDXL, `scheduler/scheduler_config.json`);
`<family>/` is the family's default variant:

- `sd1` (SD 1.5), `sd1-inpaint` (SD 1.5 inpainting, 9-channel UNet)
- `sd2` (SD 2.x 768 v-prediction), `sd2-base` (SD 2.x 512 epsilon), `sd2-inpaint`
- `sdxl` (SDXL base 1.0), `sdxl-inpaint`, `sdxl-refiner` (SDXL refiner 1.0: no `text_encoder/`, only
  `text_encoder_2/`)
- `ldsr` (CompVis LDSR 4x: `unet/` a UNet2DModel, `vqvae/`, a DDIM scheduler as CompVis' sampler steps it) and
  `sd-x4-upscaler` (Stability's SD x4 upscaler, with `low_res_scheduler/`), read by
  `ldm_core.models.sr_files`

Values follow the public diffusers repos of those models. Single-file loading starts from these and
replaces every field that the checkpoint's tensor shapes determine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIGS_DIR = Path(__file__).resolve().parent

VARIANTS: tuple[str, ...] = (
    "sd1",
    "sd1-inpaint",
    "sd2",
    "sd2-base",
    "sd2-inpaint",
    "sdxl",
    "sdxl-inpaint",
    "sdxl-refiner",
    "ldsr",
    "sd-x4-upscaler",
)

_FILES = {
    "model_index": "model_index.json",
    "scheduler": "scheduler/scheduler_config.json",
    "low_res_scheduler": "low_res_scheduler/scheduler_config.json",
}


def _read(variant: str, component: str) -> str:
    if variant not in VARIANTS:
        raise KeyError(f"unknown config variant {variant!r}; known: {', '.join(VARIANTS)}")
    path = CONFIGS_DIR / variant / _FILES.get(component, f"{component}/config.json")
    if not path.is_file():
        raise KeyError(f"config variant {variant!r} has no {component!r} config")
    return path.read_text(encoding="utf-8")


def shipped_config(variant: str, component: str) -> dict[str, Any]:
    """A fresh copy of a shipped config. `component` is "unet", "vae", "text_encoder", "text_encoder_2",
    "scheduler" or "model_index". Raises KeyError for unknown variants/components."""
    return json.loads(_read(variant, component))
