"""T2I-Adapters as ControlNet units (as A1111's ControlNet extension runs them): an adapter file or folder in
models/ControlNet is picked in a unit like any ControlNet; its features are computed once per job from the
control map and added inside the UNet's down blocks (`down_intrablock_additional_residuals`) at every step of
the unit's guidance window, times the unit's weight.

Layouts (diffusers' `T2IAdapter`, "full_adapter" for SD 1.x/2.x and "full_adapter_xl" for SDXL):
- diffusers folder: `config.json` (class T2IAdapter) + `diffusion_pytorch_model[.fp16].safetensors`;
- single file with diffusers key names (`adapter.conv_in.weight`, `adapter.body.0.resnets.0.block1.weight`...);
- single file in TencentARC's original layout (`conv_in.weight`, `body.K.block1.weight`, `body.K.in_conv.weight`,
  K running over levels x blocks per level), mapped to diffusers names here: body K is level K // n, block
  K % n, where n = blocks per level = bodies / the base UNet's down blocks (adapters match their UNet).

A single file's config comes from its shapes: channels per level (each level's first block), blocks per level,
the input channels and the pixel-unshuffle factor (`conv_in` reads in_channels x factor^2: 8 for SD, 16 for
SDXL's "full_adapter_xl"). A `<file>.json` next to the file (a diffusers config) overrides it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ldm_core.extension_api import RequestError, Step, load_state_dict

from .control_models import build_checked

CLASS_NAME = "T2IAdapter"
_ORIGINAL = re.compile(r"^body\.(\d+)\.(block1|block2|in_conv)\.(weight|bias)$")
_DIFFUSERS = re.compile(r"^adapter\.body\.(\d+)\.resnets\.(\d+)\.block1\.weight$")


def is_adapter_state(sd: Mapping[str, Any]) -> bool:
    return "adapter.conv_in.weight" in sd or ("conv_in.weight" in sd and "body.0.block1.weight" in sd)


def original_to_diffusers(sd: Mapping[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """TencentARC's key layout -> diffusers' (see the module docstring)."""
    bodies = 1 + max(int(m.group(1)) for k in sd if (m := _ORIGINAL.match(k)))
    if levels <= 0 or bodies % levels:
        raise ValueError(f"{bodies} adapter blocks do not split over the base model's {levels} UNet levels")
    per = bodies // levels
    out = {}
    for k, v in sd.items():
        m = _ORIGINAL.match(k)
        if k.startswith("conv_in."):
            out["adapter." + k] = v
        elif m is None:
            raise ValueError(f"unexpected key {k!r} in a T2I-Adapter file")
        else:
            body, part, kind = int(m.group(1)), m.group(2), m.group(3)
            level, block = divmod(body, per)
            if part == "in_conv":
                out[f"adapter.body.{level}.in_conv.{kind}"] = v
            else:
                out[f"adapter.body.{level}.resnets.{block}.{part}.{kind}"] = v
    return out


def infer_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """A diffusers T2IAdapter config from diffusers-named weights."""
    blocks: dict[int, int] = {}
    for k in sd:
        if m := _DIFFUSERS.match(k):
            blocks[int(m.group(1))] = max(blocks.get(int(m.group(1)), 0), int(m.group(2)) + 1)
    if not blocks:
        raise ValueError("no adapter blocks found")
    levels = max(blocks) + 1
    channels = [int(sd[f"adapter.body.{i}.resnets.0.block1.weight"].shape[0]) for i in range(levels)]
    unshuffled = int(sd["adapter.conv_in.weight"].shape[1])
    for factor, kind in ((16, "full_adapter_xl"), (8, "full_adapter")):
        if unshuffled % (factor * factor) == 0:
            return {
                "in_channels": unshuffled // (factor * factor),
                "channels": channels,
                "num_res_blocks": blocks[0],
                "downscale_factor": factor,
                "adapter_type": kind,
            }
    raise ValueError(f"conv_in reads {unshuffled} channels: not a pixel-unshuffled image")


def load_adapter(entry, base_unet_config: Mapping[str, Any] | None, *, allow_pickle: bool = False):
    """A float32 eval `T2IAdapter` from a scanned entry (`control_models.ControlModelEntry`)."""
    from diffusers import T2IAdapter

    sd = load_state_dict(entry.weights, allow_pickle=allow_pickle)
    if entry.kind == "diffusers":
        cfg = json.loads((entry.path / "config.json").read_text(encoding="utf-8"))
    else:
        if "adapter.conv_in.weight" not in sd:
            sd = original_to_diffusers(sd, len((base_unet_config or {}).get("down_block_types") or ()))
        sidecar = entry.path.with_suffix(".json")
        cfg = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else infer_config(sd)
    return build_checked(T2IAdapter, cfg, sd, entry.path.name, "T2I-Adapter")


def check_fits(model, unet_config: Mapping[str, Any], family: str, name: str, model_name: str, field: str) -> None:
    """The adapter must be made for the base model's family (SDXL adapters place their features one level
    lower) and its features must match the UNet's levels (count and channels)."""
    xl = model.config.adapter_type == "full_adapter_xl"
    if xl != (family == "sdxl"):
        raise RequestError(
            field,
            f"T2I-Adapter {name!r} is made for {'SDXL' if xl else 'SD 1.x/2.x'} but the loaded model "
            f"{model_name!r} is {family}: choose an adapter made for this model's family",
        )
    want = list(unet_config.get("block_out_channels") or ())
    have = list(model.config.channels)
    if have != want:
        raise RequestError(
            field,
            f"T2I-Adapter {name!r} has feature channels {have} but the loaded model {model_name!r} has UNet "
            f"levels {want}: choose an adapter made for this model",
        )


class AdapterProvider:
    """Adds one adapter's features (computed once, weighted) inside the down blocks at every step it is
    called (the loader calls it inside the unit's guidance window only). `cond_only`: leave the
    unconditional rows alone ("ControlNet is more important")."""

    def __init__(self, model, hint: torch.Tensor, weight: float, cond_only: bool, latent_scale: int = 8) -> None:
        self.latent_scale = latent_scale
        with torch.inference_mode():
            self.features = [f * weight for f in model(hint)]
        self.hint_size = hint.shape[-2:]
        self.model = model
        self.hint = hint
        self.weight = weight
        self.cond_only = cond_only

    def _features_for(self, latent_hw: tuple[int, int], scale: int) -> list[torch.Tensor]:
        size = (latent_hw[0] * scale, latent_hw[1] * scale)
        if tuple(self.hint_size) == size:
            return self.features
        hint = F.interpolate(self.hint.float(), size=size, mode="bilinear", align_corners=False).to(self.hint.dtype)
        with torch.inference_mode():  # another size (a hires pass): features of the resized map
            self.features = [f * self.weight for f in self.model(hint)]
        self.hint_size = hint.shape[-2:]
        return self.features

    def __call__(self, step: Step) -> dict | None:
        x = step.x_in
        feats = self._features_for((x.shape[-2], x.shape[-1]), self.latent_scale)
        rows = x.shape[0]
        start = step.batch_size if self.cond_only and step.has_uncond else 0
        out = []
        for f in feats:
            f = f.expand(rows - start, -1, -1, -1)
            if start:
                f = torch.cat([torch.zeros((start, *f.shape[1:]), dtype=f.dtype, device=f.device), f])
            out.append(f)
        return {"down_intrablock_additional_residuals": out}  # a fresh list: the UNet pops from it
