"""ControlNet model files: find them in models/ControlNet, load them (diffusers folders and single files in
either key layout), and check that one fits the loaded base model.

Layouts:
- diffusers folder: `config.json` (class ControlNetModel) + `diffusion_pytorch_model[.fp16].safetensors`;
- single file with diffusers key names (`controlnet_cond_embedding.conv_in.weight`, ...; how SDXL
  ControlNets are usually shared);
- single file in the original layout (`control_model.input_blocks.*`, `input_hint_block.*`, `zero_convs.*`,
  `middle_block_out.*`; SDXL files add `label_emb.*`), converted with diffusers' own
  `convert_controlnet_checkpoint` (the SDXL addition embedding it leaves out is mapped here).

A single file's config comes from its tensor shapes (levels, channels, layers, attention depth, linear
projection, cross-attention width, hint-encoder channels, SDXL addition embedding); what shapes cannot
show (attention head counts, norm groups, time-embedding width) is taken from the base model's UNet when
the ControlNet has its block widths (ControlNets are copies of their base UNet's encoder), else from the
family rule (SD 1.x: 8 heads; SD 2.x / SDXL: heads of width 64). A `<file>.json` next to the file (a
diffusers config) overrides all of it.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm_core.extension_api import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, RequestError, load_state_dict

DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
ORIGINAL_PREFIX = "control_model."


@dataclass(frozen=True)
class ControlModelEntry:
    """One ControlNet found on disk. `name`: file stem or folder name; `weights`: the tensor file."""

    name: str
    path: Path
    weights: Path
    kind: str  # "file" or "diffusers"

    def matches(self, query: str) -> bool:
        q = query.strip().casefold()
        base = q.rsplit(" [", 1)[0] if q.endswith("]") else q
        return base in (self.name.casefold(), self.path.name.casefold())


def _diffusers_weights(folder: Path) -> Path | None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    known = data.get("_class_name") in ("ControlNetModel", "T2IAdapter")  # adapters run in units too (adapters.py)
    if not known and "conditioning_embedding_out_channels" not in data:
        return None
    return next((folder / n for n in DIFFUSERS_WEIGHTS if (folder / n).is_file()), None)


def scan(dirs: Iterable[Path], allow_pickle: bool = False) -> list[ControlModelEntry]:
    """Every ControlNet under `dirs` (recursive), sorted by name; first found wins on equal names."""
    suffixes = SAFETENSORS_SUFFIXES + (PICKLE_SUFFIXES if allow_pickle else ())
    out: dict[str, ControlModelEntry] = {}
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            continue
        for p in sorted(d.rglob("*")):
            if any(part.startswith(".") for part in p.relative_to(d).parts):
                continue
            if p.is_dir():
                w = _diffusers_weights(p)
                if w is not None:
                    out.setdefault(p.name.casefold(), ControlModelEntry(p.name, p, w, "diffusers"))
            elif p.suffix.lower() in suffixes and not (p.parent / "config.json").is_file():
                out.setdefault(p.stem.casefold(), ControlModelEntry(p.stem, p, p, "file"))
    return sorted(out.values(), key=lambda e: e.name.casefold())


class HashCache:
    """First 8 hex digits of each weights file's SHA-256 (A1111 shows ControlNets as "name [hash]"),
    cached by (path, size, mtime)."""

    def __init__(self) -> None:
        self._cache: dict[tuple, str] = {}
        self._lock = threading.Lock()

    def short(self, entry: ControlModelEntry) -> str:
        st = entry.weights.stat()
        key = (str(entry.weights), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        h = hashlib.sha256()
        with open(entry.weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        value = h.hexdigest()[:8]
        with self._lock:
            self._cache[key] = value
        return value


# ----------------------------------------------------------------------------------------------------------
# conversion and config


def _count(sd: Mapping[str, Any], prefix: str) -> int:
    n = len(prefix)
    return len({k[n:].split(".", 1)[0] for k in sd if k.startswith(prefix)})


def original_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original-layout ControlNet state dict (with or without `control_model.`) in diffusers names."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    plain = {k[len(ORIGINAL_PREFIX) :] if k.startswith(ORIGINAL_PREFIX) else k: v for k, v in sd.items()}
    ids = {int(k.split(".")[1]) for k in plain if k.startswith("input_blocks.")}
    downs = {int(k.split(".")[1]) for k in plain if k.startswith("input_blocks.") and ".0.op." in k}
    if not ids or "input_hint_block.0.weight" not in plain:
        raise ValueError("not a ControlNet: no input_blocks / input_hint_block tensors")
    levels = len(downs) + 1
    lpb = (max(ids) - len(downs)) // levels
    out = dict(convert_controlnet_checkpoint(plain, {"layers_per_block": lpb}))
    for i in (0, 2):  # SDXL's text/time addition embedding (label_emb.0.{0,2} -> add_embedding.linear_{1,2})
        for part in ("weight", "bias"):
            key = f"label_emb.0.{i}.{part}"
            if key in plain:
                out[f"add_embedding.linear_{1 if i == 0 else 2}.{part}"] = plain[key]
    return {k: v for k, v in out.items() if v is not None}


def family_of(config: Mapping[str, Any]) -> str:
    """ "sdxl", "sd2" or "sd1" from a ControlNet (or UNet) config."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    cross = config.get("cross_attention_dim")
    if cross == 1024 or (config.get("use_linear_projection") and cross != 768):
        return "sd2"
    return "sd1"


def _as_list(v: Any, n: int) -> list:
    return list(v) if isinstance(v, list | tuple) else [v] * n


def infer_config(sd: Mapping[str, torch.Tensor], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A ControlNetModel config from a diffusers-named state dict's shapes (see the module docstring)."""
    base = dict(base or {})
    levels = _count(sd, "down_blocks.")
    lpb = _count(sd, "down_blocks.0.resnets.")
    if not levels or not lpb:
        raise ValueError("not a ControlNet: no down_blocks")
    channels = [int(sd[f"down_blocks.{i}.resnets.0.conv2.weight"].shape[0]) for i in range(levels)]
    attention = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in sd) for i in range(levels)]
    if not any(attention):
        raise ValueError("ControlNet has no attention blocks")
    depth = [
        _count(sd, f"down_blocks.{i}.attentions.0.transformer_blocks.") if a else 1 for i, a in enumerate(attention)
    ]
    mid_depth = _count(sd, "mid_block.attentions.0.transformer_blocks.")
    if not attention[-1] and mid_depth:
        depth[-1] = mid_depth
    first = attention.index(True)
    attn = f"down_blocks.{first}.attentions.0."
    hint_blocks = _count(sd, "controlnet_cond_embedding.blocks.")
    hint = [int(sd["controlnet_cond_embedding.conv_in.weight"].shape[0])] + [
        int(sd[f"controlnet_cond_embedding.blocks.{2 * k + 1}.weight"].shape[0]) for k in range(hint_blocks // 2)
    ]
    cfg: dict[str, Any] = {
        "in_channels": int(sd["conv_in.weight"].shape[1]),
        "conditioning_channels": int(sd["controlnet_cond_embedding.conv_in.weight"].shape[1]),
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "cross_attention_dim": int(sd[attn + "transformer_blocks.0.attn2.to_k.weight"].shape[1]),
        "use_linear_projection": sd[attn + "proj_in.weight"].ndim == 2,
        "transformer_layers_per_block": 1 if all(d == 1 for d in depth) else depth,
        "conditioning_embedding_out_channels": hint,
    }
    if "add_embedding.linear_1.weight" in sd:
        cfg.update(
            addition_embed_type="text_time",
            projection_class_embeddings_input_dim=int(sd["add_embedding.linear_1.weight"].shape[1]),
            addition_time_embed_dim=int(base.get("addition_time_embed_dim") or 256),
        )
    family = family_of(cfg)
    same_widths = list(base.get("block_out_channels") or []) == channels
    if same_widths and base.get("attention_head_dim") is not None:
        cfg["attention_head_dim"] = base["attention_head_dim"]
        if base.get("num_attention_heads") is not None:
            cfg["num_attention_heads"] = base["num_attention_heads"]
        cfg["norm_num_groups"] = base.get("norm_num_groups", 32)
    elif family == "sd1":
        cfg["attention_head_dim"] = 8
    else:
        cfg["attention_head_dim"] = [c // 64 if c % 64 == 0 and c >= 64 else 1 for c in channels]
    return cfg


def load_controlnet(
    entry: ControlModelEntry, base_unet_config: Mapping[str, Any] | None = None, *, allow_pickle: bool = False
):
    """A `ControlNetModel` (float32, CPU, eval) from a scanned entry. Raises ValueError with the file name
    when the file is not a usable ControlNet."""
    from diffusers import ControlNetModel

    sd = load_state_dict(entry.weights, allow_pickle=allow_pickle)
    if entry.kind == "diffusers":
        cfg = json.loads((entry.path / "config.json").read_text(encoding="utf-8"))
    else:
        if "controlnet_cond_embedding.conv_in.weight" not in sd:
            sd = original_to_diffusers(sd)
        sidecar = entry.path.with_suffix(".json")
        cfg = (
            json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else infer_config(sd, base_unet_config)
        )
    return build_checked(ControlNetModel, cfg, sd, entry.path.name, "ControlNet")


def build_checked(cls, cfg: Mapping[str, Any], sd: Mapping[str, torch.Tensor], file_name: str, what: str):
    """`cls.from_config(cfg)` (private `_` keys dropped) holding exactly the weights `sd`, float32, eval, frozen;
    ValueError naming the file when the keys differ."""
    model = cls.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{file_name}: weights do not match the {what} layout (missing {sorted(missing)[:4]}, "
            f"unexpected {sorted(unexpected)[:4]})"
        )
    return model.float().eval().requires_grad_(False)


def check_fits(
    cn_config: Mapping[str, Any],
    unet_config: Mapping[str, Any],
    base_family: str,
    cn_name: str,
    model_name: str,
    field: str,
) -> None:
    """Raise RequestError (with `field`) when the ControlNet cannot drive the loaded base UNet."""
    fam = family_of(cn_config)
    if fam != base_family:
        raise RequestError(
            field,
            f"ControlNet {cn_name!r} is made for {FAMILY_LABELS.get(fam, fam)} models but the loaded model "
            f"{model_name!r} is {FAMILY_LABELS.get(base_family, base_family)}: choose a ControlNet for "
            f"{FAMILY_LABELS.get(base_family, base_family)}",
        )
    n = len(unet_config.get("block_out_channels", ()))
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim"):
        a, b = cn_config.get(key), unet_config.get(key)
        if key == "layers_per_block":
            a, b = _as_list(a, n), _as_list(b, n)
        elif key == "block_out_channels":
            a, b = list(a or ()), list(b or ())
        if a != b:
            raise RequestError(
                field,
                f"ControlNet {cn_name!r} does not fit the loaded model {model_name!r}: {key} is {a} for the "
                f"ControlNet but {b} for the model (it was made for a different base model)",
            )
