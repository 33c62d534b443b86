"""AnimateDiff-class motion modules: find them in `models/AnimateDiff/`, load them through the one safe loading
path, check them against the base model, and patch them into a loaded SD UNet for one job.

Two file layouts are read:

- a diffusers folder (`config.json` of a `MotionAdapter` + `diffusion_pytorch_model.safetensors`);
- one weights file in the original AnimateDiff key layout (`down_blocks.0.motion_modules.0.temporal_transformer.
  transformer_blocks.0.attention_blocks.0.to_q.weight`, ... : v1, v2, v3 and the SDXL beta). Its config is read
  from the tensor shapes: levels and channels from each level's `proj_in`, motion layers per level, transformer
  layers per motion layer, a mid-block module or not, and the frames it was trained for from the positional
  encoding's length. Attention heads (8) and norm groups (32) are not in the shapes: every published module
  uses those; other widths get the largest group count that divides them.

`.ckpt`/`.pt`/`.pth`/`.bin` files are pickles, refused unless `allow_pickle` (then read weights-only), as for
every other model (`ldm_core.models.loading.load_state_dict`).

**How a module is applied.** AnimateDiff adds one temporal transformer after every (resnet, attention) pair of
the UNet's down, mid and up blocks (after the resnet where a level has no attention): exactly where diffusers'
`UNetMotionModel` runs them. `MotionPatch` registers a forward hook on each of those UNet layers that runs the
matching temporal transformer over the frames; the hooks are removed when the job ends, so the base UNet is
untouched (a job without a module runs the plain UNet, and LoRA merging sees the same weights). Frames are the
batch: the loop's batch `[uncond frames, cond frames]` holds whole clips of `frames` images each, which is the
layout the temporal transformers reshape to `(clips, frames, ...)`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.loading import ModelFileError, load_state_dict
from ..models.sidecar import SidecarError, read_sidecar
from ..models.suffixes import WEIGHT_SUFFIXES
from .spatiotemporal import CONFIG_KEY as SPATIOTEMPORAL_KEY
from .spatiotemporal import LEVEL_KEY as SPATIOTEMPORAL_LEVEL_KEY
from .spatiotemporal import SpatioTemporalAttention, check_attentions, check_level
from .svd import is_svd_folder

log = logging.getLogger(__name__)

HEADS = 8  # attention heads of every published AnimateDiff module (not recoverable from the weights)
#: UNet channel layouts of the families that published modules are made for
FAMILY_CHANNELS = {(320, 640, 1280, 1280): "SD 1.x/2.x", (320, 640, 1280): "SDXL"}


class MotionModuleError(ValueError):
    """A motion module cannot be used (missing, unreadable, wrong layout, or made for another UNet)."""


@dataclass
class MotionModule:
    """A loaded motion module. `adapter` is a diffusers `MotionAdapter`; `max_frames` the frames its positional
    encoding covers (the most frames one context window may hold); `adapter_lora` the LoRA its sidecar says it
    runs with (`NAME.json` next to it: {"adapter_lora": "ADAPTER"}; see `ldm_core.models.sidecar`), or None;
    `spatiotemporal` the temporal blocks' attentions that attend over every cell of every frame
    (`ldm_core.video.spatiotemporal`; none in published modules), at the UNet levels from
    `spatiotemporal_from_level` on (0: the finest; the mid block is the coarsest level)."""

    name: str
    path: Path
    adapter: torch.nn.Module
    layout: str  # "diffusers" or "original"
    adapter_lora: str | None = None
    spatiotemporal: tuple[str, ...] = ()
    spatiotemporal_from_level: int = 0

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(self.adapter.config.block_out_channels)

    @property
    def max_frames(self) -> int:
        return int(self.adapter.config.motion_max_seq_length)

    @property
    def family(self) -> str:
        return FAMILY_CHANNELS.get(self.channels, "a UNet with channels " + "/".join(map(str, self.channels)))


# ------------------------------------------------------------------------------------------------ discovery


def _is_motion_folder(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("_class_name") == "MotionAdapter"
    except (OSError, ValueError):
        return False


class MotionModules:
    """The motion modules in `dirs` (each a weights file or a diffusers folder; Stable Video Diffusion folders
    are listed too, see `is_svd`), by name. The name is the file
    name (`mm_sd_v15_v2.safetensors`) or folder name; a request may leave out the file's extension. Loads one
    module at a time and keeps it until another is asked for."""

    def __init__(self, dirs: Iterable[str | os.PathLike], *, allow_pickle: bool = False):
        self.dirs = tuple(Path(d) for d in dirs)
        self.allow_pickle = allow_pickle
        self._loaded: MotionModule | None = None

    def entries(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for d in self.dirs:
            if not d.is_dir():
                continue
            for p in sorted(d.iterdir()):
                if p.is_file() and p.name.lower().endswith(WEIGHT_SUFFIXES):
                    found.setdefault(p.name, p)
                elif p.is_dir() and (_is_motion_folder(p) or is_svd_folder(p)):
                    found.setdefault(p.name, p)
        return found

    def names(self) -> list[str]:
        return list(self.entries())

    def default(self) -> str | None:
        """The first motion module (SVD folders are chosen by name only)."""
        return next((n for n, p in self.entries().items() if not is_svd_folder(p)), None)

    def path(self, name: str) -> Path:
        entries = self.entries()
        if name in entries:
            return entries[name]
        for n, p in entries.items():
            if Path(n).stem == name or n.lower() == name.lower() or Path(n).stem.lower() == name.lower():
                return p
        where = ", ".join(str(d) for d in self.dirs) or "(no folder)"
        have = ", ".join(entries) or "none"
        raise MotionModuleError(f"no motion module named {name!r} in {where} (available: {have})")

    def is_svd(self, name: str) -> bool:
        """Whether `name` is a Stable Video Diffusion folder (ldm_core.video.svd) rather than a module."""
        try:
            return is_svd_folder(self.path(name))
        except MotionModuleError:
            return False

    def load(self, name: str) -> MotionModule:
        path = self.path(name)
        if self._loaded is not None and self._loaded.path == path:
            return self._loaded
        self._loaded = None  # free the previous module first
        self._loaded = load_motion_module(path, allow_pickle=self.allow_pickle)
        return self._loaded


# ------------------------------------------------------------------------------------------------ loading


def original_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Key names of the original AnimateDiff layout -> diffusers' `MotionAdapter` (the positional encodings
    are computed, not stored, in diffusers: they are dropped)."""
    out = {}
    for k, v in state.items():
        if ".pos_encoder." in k:
            continue
        k = k.replace(".temporal_transformer.", ".")
        k = k.replace(".attention_blocks.0.", ".attn1.").replace(".attention_blocks.1.", ".attn2.")
        k = k.replace(".norms.0.", ".norm1.").replace(".norms.1.", ".norm2.").replace(".ff_norm.", ".norm3.")
        out[k] = v
    return out


def diffusers_to_original(state: dict[str, torch.Tensor], max_frames: int) -> dict[str, torch.Tensor]:
    """The inverse of `original_to_diffusers`, with the sinusoidal positional encodings the original files
    carry (`pos_encoder.pe`, one per attention): writes a module in the layout users download."""
    out = {}
    for k, v in state.items():
        if k.endswith(".pos_embed.pe"):
            continue  # written as pos_encoder.pe below
        m = re.match(r"^((?:down_blocks|up_blocks)\.\d+|mid_block)\.motion_modules\.(\d+)\.(.*)$", k)
        if m is None:
            raise ValueError(f"not a motion-module key: {k}")
        head, rest = f"{m.group(1)}.motion_modules.{m.group(2)}", m.group(3)
        rest = rest.replace("attn1.", "attention_blocks.0.").replace("attn2.", "attention_blocks.1.")
        rest = rest.replace("norm1.", "norms.0.").replace("norm2.", "norms.1.").replace("norm3.", "ff_norm.")
        if rest.endswith(".to_q.weight") and ".attention_blocks." in rest:
            attention = rest.removesuffix(".to_q.weight")
            out[f"{head}.temporal_transformer.{attention}.pos_encoder.pe"] = _sinusoid(max_frames, v.shape[1])
        out[f"{head}.temporal_transformer.{rest}"] = v
    return out


def _sinusoid(n: int, width: int) -> torch.Tensor:
    pos = torch.arange(n).unsqueeze(1)
    div = torch.exp(torch.arange(0, width, 2) * (-math.log(10000.0) / width))
    pe = torch.zeros(1, n, width)
    pe[0, :, 0::2] = torch.sin(pos * div)
    pe[0, :, 1::2] = torch.cos(pos * div)
    return pe


def _groups(channels: Iterable[int]) -> int:
    chans = list(channels)
    for g in (32, 16, 8, 4, 2, 1):
        if all(c % g == 0 for c in chans):
            return g
    return 1


def config_from_original(state: dict[str, torch.Tensor], path: Path) -> dict:
    """A `MotionAdapter` config read from the shapes of a module in the original layout."""
    keys = list(state)
    if any("lora" in k.lower() for k in keys):
        raise MotionModuleError(
            f"{path.name}: holds LoRA weights (a motion LoRA or AnimateDiff v3 adapter), not a motion module"
        )
    if any(k.startswith("conv_in.") for k in keys):
        raise MotionModuleError(f"{path.name}: a module with its own conv_in (PIA / SparseCtrl) is not supported")
    levels = sorted({int(m.group(1)) for k in keys if (m := re.match(r"^down_blocks\.(\d+)\.motion_modules\.", k))})
    if not levels or levels != list(range(len(levels))):
        raise MotionModuleError(
            f"{path.name}: not an AnimateDiff motion module in the original key layout "
            "(no down_blocks.N.motion_modules.M.temporal_transformer keys)"
        )

    def count(prefix: str, part: str) -> int:
        pat = re.compile(rf"^{re.escape(prefix)}\.{part}\.(\d+)\.")
        return 1 + max((int(m.group(1)) for k in keys if (m := pat.match(k))), default=-1)

    channels, per_level, tf_layers = [], [], []
    for i in levels:
        w = state.get(f"down_blocks.{i}.motion_modules.0.temporal_transformer.proj_in.weight")
        if w is None:
            raise MotionModuleError(f"{path.name}: down_blocks.{i} has no temporal_transformer.proj_in weight")
        channels.append(int(w.shape[0]))
        per_level.append(count(f"down_blocks.{i}", "motion_modules"))
        tf_layers.append(count(f"down_blocks.{i}.motion_modules.0.temporal_transformer", "transformer_blocks"))
    pe = next((v for k, v in state.items() if k.endswith("pos_encoder.pe")), None)
    mid = any(k.startswith("mid_block.motion_modules.") for k in keys)
    cfg = {
        "block_out_channels": channels,
        "motion_layers_per_block": per_level,
        "motion_transformer_layers_per_block": tf_layers,
        "motion_num_attention_heads": HEADS,
        "motion_norm_num_groups": _groups(channels),
        "motion_max_seq_length": int(pe.shape[1]) if pe is not None else 32,
        "use_motion_mid_block": mid,
    }
    if mid:
        cfg["motion_mid_block_layers_per_block"] = count("mid_block", "motion_modules")
        cfg["motion_transformer_layers_per_mid_block"] = count(
            "mid_block.motion_modules.0.temporal_transformer", "transformer_blocks"
        )
    return cfg


def _build(config: dict, state: dict[str, torch.Tensor], path: Path) -> torch.nn.Module:
    from diffusers import MotionAdapter

    try:
        adapter = MotionAdapter.from_config(config)
    except (TypeError, ValueError) as e:
        raise MotionModuleError(f"{path.name}: its config does not build a motion module ({e})") from None
    missing, unexpected = adapter.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("pos_embed.pe")]
    wrong = [k for k, v in state.items() if k in adapter.state_dict() and adapter.state_dict()[k].shape != v.shape]
    if missing or unexpected or wrong:
        bits = []
        for what, ks in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if ks:
                bits.append(f"{len(ks)} {what} (e.g. {ks[0]})")
        raise MotionModuleError(f"{path.name}: weights do not fit a motion module: " + "; ".join(bits))
    return adapter.eval().requires_grad_(False)


def load_motion_module(path: str | os.PathLike, *, allow_pickle: bool = False) -> MotionModule:
    """Load a diffusers-folder or original-layout motion module (see the module doc), with its sidecar's
    adapter LoRA name."""
    module = _load_weights(Path(path), allow_pickle)
    try:
        module.adapter_lora = read_sidecar(module.path).adapter_lora
    except SidecarError as e:
        raise MotionModuleError(str(e)) from None
    return module


def _load_weights(p: Path, allow_pickle: bool) -> MotionModule:
    try:
        if p.is_dir():
            config = json.loads((p / "config.json").read_text())
            names = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
            weights = next((p / n for n in names if (p / n).exists()), p / names[0])
            state = load_state_dict(weights, allow_pickle=allow_pickle)
            config = {k: v for k, v in config.items() if not k.startswith("_")}
            try:
                st = check_attentions(config.pop(SPATIOTEMPORAL_KEY, None))
                from_level = check_level(config.pop(SPATIOTEMPORAL_LEVEL_KEY, 0))
            except ValueError as e:
                raise MotionModuleError(f"{p.name}: {e}") from None
            adapter = _build(config, state, p)
            return MotionModule(p.name, p, adapter, "diffusers", None, st, from_level)
        state = load_state_dict(p, allow_pickle=allow_pickle)
    except ModelFileError as e:
        raise MotionModuleError(str(e)) from None
    except (OSError, ValueError) as e:
        raise MotionModuleError(f"{p}: cannot read the motion module ({e})") from None
    state = {k.removeprefix("module."): v for k, v in state.items()}
    config = config_from_original(state, p)
    return MotionModule(p.name, p, _build(config, original_to_diffusers(state), p), "original")


# ------------------------------------------------------------------------------------------------ patching


def _targets(unet) -> Iterator[tuple[str, torch.nn.Module, str, int, int]]:
    """(where, UNet layer after which a module runs, adapter part, level, index) in diffusers' order."""
    for i, block in enumerate(unet.down_blocks):
        layers = getattr(block, "attentions", None) or block.resnets
        for j, layer in enumerate(layers):
            yield f"down_blocks.{i}", layer, "down", i, j
    mid = unet.mid_block
    if mid is not None:
        for j, layer in enumerate(getattr(mid, "attentions", None) or []):
            yield "mid_block", layer, "mid", 0, j
    for i, block in enumerate(unet.up_blocks):
        layers = getattr(block, "attentions", None) or block.resnets
        for j, layer in enumerate(layers):
            yield f"up_blocks.{i}", layer, "up", i, j


def check_fits(module: MotionModule, unet, model_name: str, model_family: str) -> None:
    """Raise MotionModuleError (naming both) unless `module` has a temporal layer for every place of `unet`."""
    unet_channels = tuple(unet.config.block_out_channels)
    if module.channels != unet_channels:
        theirs = FAMILY_CHANNELS.get(unet_channels, model_family)
        raise MotionModuleError(
            f"motion module {module.name!r} is made for {module.family}, but the checkpoint {model_name!r} is "
            f"{theirs} (UNet channels {'/'.join(map(str, unet_channels))}): choose a module for that family"
        )
    a = module.adapter
    parts = {"down": list(a.down_blocks), "up": list(a.up_blocks), "mid": [a.mid_block] if a.mid_block else []}
    needed: dict[tuple[str, int], int] = {}
    for _, _, part, i, j in _targets(unet):
        needed[(part, i)] = max(needed.get((part, i), 0), j + 1)
    for (part, i), n in needed.items():
        if part == "mid" and not parts["mid"]:
            continue  # modules without a mid-block layer (v1, SDXL beta) leave the mid block as it is
        have = len(parts[part][i].motion_modules) if i < len(parts[part]) else 0
        if have != n:
            raise MotionModuleError(
                f"motion module {module.name!r} (made for {module.family}) has {have} temporal layers in {part} "
                f"block {i}, but the UNet of {model_name!r} ({model_family}) has {n} there: choose a module made "
                "for that model family"
            )


class MotionPatch:
    """The temporal layers of `module` hooked into `unet` (see the module doc). `frames` is the clip length
    the next UNet call holds (the context window's length); the batch must be a multiple of it."""

    def __init__(self, unet, module: MotionModule):
        self.unet, self.module = unet, module
        self.frames = 1
        self.effect = 1.0  # how much of the temporal layers' change the next UNet call keeps (0: none)
        self._handles: list = []
        # the module's spatio-temporal attentions (if any) and the processors they had before install()
        self._spatiotemporal = SpatioTemporalAttention() if module.spatiotemporal else None
        self._processors: list = []

    def set_frames(self, frames: int) -> None:
        self.frames = frames

    def _hook(self, motion):
        def run(_layer, _args, output):
            if isinstance(output, tuple):
                return (self._apply(motion, output[0]),) + tuple(output[1:])
            if hasattr(output, "sample"):
                output.sample = self._apply(motion, output.sample)
                return output
            return self._apply(motion, output)

        return run

    def _apply(self, motion, h: torch.Tensor) -> torch.Tensor:
        if next(motion.parameters()).device != h.device:  # the UNet was moved (offloading) after install
            motion.to(h.device)
        if h.shape[0] % self.frames:
            raise RuntimeError(f"UNet batch {h.shape[0]} is not a whole number of {self.frames}-frame clips")
        if self.effect == 0:
            return h
        if self._spatiotemporal is not None:
            self._spatiotemporal.grid = (h.shape[-2], h.shape[-1])
        out = motion(h, num_frames=self.frames)
        return out if self.effect == 1 else h + self.effect * (out - h)

    def install(self) -> MotionPatch:
        a = self.module.adapter
        p, q = next(self.unet.parameters()), next(a.parameters())
        if (q.device, q.dtype) != (p.device, p.dtype):
            a.to(p.device, p.dtype)  # the UNet's precision (fp16 on a GPU); autocast handles mixed runs
        parts = {"down": a.down_blocks, "up": a.up_blocks}
        levels = len(self.unet.down_blocks)
        for _, layer, part, i, j in _targets(self.unet):
            if part == "mid":
                if a.mid_block is None:
                    continue
                motion = a.mid_block.motion_modules[j]
            else:
                motion = parts[part][i].motion_modules[j]
            self._handles.append(layer.register_forward_hook(self._hook(motion)))
            level = {"down": i, "up": levels - 1 - i, "mid": levels - 1}[part]  # 0: the finest
            if self._spatiotemporal is None or level < self.module.spatiotemporal_from_level:
                continue
            for block in motion.transformer_blocks:
                for name in self.module.spatiotemporal:
                    attention = getattr(block, name)
                    self._processors.append((attention, attention.processor))
                    attention.set_processor(self._spatiotemporal)
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for attention, processor in self._processors:
            attention.set_processor(processor)
        self._processors.clear()


@contextmanager
def motion_patch(unet, module: MotionModule) -> Iterator[MotionPatch]:
    """`MotionPatch` installed for the `with` block, removed after it (also on errors)."""
    patch = MotionPatch(unet, module).install()
    try:
        yield patch
    finally:
        patch.remove()
