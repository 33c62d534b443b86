"""LoRA (and simple LyCORIS) networks: the files in `models/Lora`, applied per job by `<lora:name:w>` tags.

`NetworkLibrary.merge(model, calls)` merges every called network into the model's UNet and text encoder
weights in place and keeps them merged across jobs: a job with the same set does no work, another set
changes the layers that differ, a job without tags restores the exact original weights (originals are
copied to the CPU once, on a layer's first merge; see `network_state`). `applied(model, calls)` does the
same for one `with` block. Several networks at once add up. The merge for one layer is

    W' = W + sum over networks of  w * scale * delta,    delta = up @ down,  scale = alpha / rank

with `w` the tag's text-encoder or UNet weight (`<lora:name:w>` or `<lora:name:te_w:unet_w>`).

Key formats understood (the layer a key targets is looked up among the model's own module names):

* kohya sd-scripts: ``lora_unet_<module path with _>.lora_down.weight / .lora_up.weight / .alpha``, text
  encoders ``lora_te_`` (SD1/SD2) or ``lora_te1_`` / ``lora_te2_`` (SDXL). UNet paths may use diffusers names
  (``down_blocks_0_attentions_0_...``, what sd-scripts writes for SD1/SD2) or the original LDM/SGM names
  (``input_blocks_4_1_...``, what it writes for SDXL).
* diffusers / PEFT: ``unet.<dotted path>.lora_A.weight / .lora_B.weight`` (also ``.lora.down/.up``,
  ``.lora_linear_layer.down/.up`` and the old ``.processor.to_q_lora.down`` attention-processor names),
  ``text_encoder.`` / ``text_encoder_2.``.
* LyCORIS: LoCon (conv layers in the kohya format), LoHa (``hada_w1_a`` ...), LoKr (``lokr_w1`` ...) and full
  diffs (``.diff``). Not supported, and named in the error: Tucker-decomposed convolutions (``lora_mid``,
  ``hada_t1``, ``lokr_t2``), DoRA, OFT/BOFT, IA3, GLoRA and norm-layer networks.

A network made for another base model family (detected from key names and the cross-attention / text
encoder widths) is refused with a message naming both families.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..files import scan_named_files
from ..generation_requests import RequestError
from ..models.hashes import HashCache, file_sha256
from ..models.suffixes import LORA_SUFFIXES
from .network_state import MergedNetworks
from .parser import ExtraNetworkCall

log = logging.getLogger(__name__)

LORA_KINDS = ("lora", "lyco")  # tag kinds handled here (`<lyco:...>` is the old LyCORIS extension's tag)
LORA_HASH_LEN = 12
FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sdxl-refiner": "SDXL refiner"}
_CROSS_ATTN_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_TE_FAMILY = {768: "sd1", 1024: "sd2"}

# (key suffix, factor name) - longest first where one suffix ends another
_FACTOR_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_mid.weight", "mid"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".down.weight", "down"),  # attention-processor format: ...processor.to_q_lora.down.weight
    (".up.weight", "up"),
    (".hada_w1_a", "hada_w1_a"),
    (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"),
    (".hada_t1", "hada_t1"),
    (".hada_t2", "hada_t2"),
    (".lokr_w1_a", "lokr_w1_a"),
    (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2_a", "lokr_w2_a"),
    (".lokr_w2_b", "lokr_w2_b"),
    (".lokr_w1", "lokr_w1"),
    (".lokr_w2", "lokr_w2"),
    (".lokr_t2", "lokr_t2"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
    (".alpha", "alpha"),
    (".dora_scale", "dora_scale"),
    (".lora_magnitude_vector", "dora_scale"),
    (".oft_blocks", "oft"),
    (".oft_diag", "oft"),
    (".oft_R", "oft"),
    (".boft_R", "oft"),
    (".on_input", "ia3"),
    (".w_norm", "norm"),
    (".b_norm", "norm"),
    (".a1.weight", "glora"),
    (".a2.weight", "glora"),
    (".b1.weight", "glora"),
    (".b2.weight", "glora"),
)
_UNSUPPORTED = {
    "mid": "Tucker-decomposed LoCon (lora_mid)",
    "hada_t1": "Tucker-decomposed LoHa (hada_t1/hada_t2)",
    "hada_t2": "Tucker-decomposed LoHa (hada_t1/hada_t2)",
    "lokr_t2": "Tucker-decomposed LoKr (lokr_t2)",
    "dora_scale": "DoRA (weight-decomposed LoRA)",
    "oft": "OFT/BOFT",
    "ia3": "IA3",
    "norm": "norm-layer networks (w_norm/b_norm)",
    "glora": "GLoRA",
}


# ------------------------------------------------------------------------------------------ parsed files
@dataclass
class Layer:
    """The factors a network holds for one target layer (CPU tensors, as stored). `prefix` is the key
    prefix in the file; `kind` is "lora", "loha", "lokr" or "full"."""

    prefix: str
    kind: str
    factors: dict[str, torch.Tensor]
    alpha: float | None = None

    def delta(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """The weight update (scale included, tag weight not) as float32 on `device`, shaped like the
        target weight. Raises ValueError when the factors do not fit `shape`."""
        f = {k: v.to(device, torch.float32) for k, v in self.factors.items()}
        out_f, in_f = shape[0], int(torch.Size(shape[1:]).numel())
        if self.kind == "lora":
            up, down = f["up"], f["down"]
            if up.ndim == 4 and up.shape[2:] != (1, 1):
                raise ValueError(f"{self.prefix}: LoRA up weight with a {tuple(up.shape[2:])} kernel")
            rank = down.shape[0]
            d = up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)
            scale = self.alpha / rank if self.alpha else 1.0
        elif self.kind == "loha":
            w1 = f["hada_w1_a"] @ f["hada_w1_b"].reshape(f["hada_w1_b"].shape[0], -1)
            w2 = f["hada_w2_a"] @ f["hada_w2_b"].reshape(f["hada_w2_b"].shape[0], -1)
            d = w1 * w2
            rank = f["hada_w1_b"].shape[0]
            scale = self.alpha / rank if self.alpha else 1.0
        elif self.kind == "lokr":
            rank = None
            if "lokr_w1" in f:
                w1 = f["lokr_w1"]
            else:
                w1 = f["lokr_w1_a"] @ f["lokr_w1_b"]
                rank = f["lokr_w1_b"].shape[0]
            if "lokr_w2" in f:
                w2 = f["lokr_w2"]
            else:
                b = f["lokr_w2_b"]
                w2 = (f["lokr_w2_a"] @ b.reshape(b.shape[0], -1)).reshape(f["lokr_w2_a"].shape[0], *b.shape[1:])
                rank = b.shape[0]
            if w2.ndim == 4:
                w1 = w1.reshape(*w1.shape, 1, 1)
            d = torch.kron(w1, w2)
            scale = self.alpha / rank if (self.alpha and rank) else 1.0
        else:  # full diff
            d = f["diff"]
            scale = 1.0
        if d.numel() != out_f * in_f or d.shape[0] != out_f:
            raise ValueError(f"{self.prefix}: update of shape {tuple(d.shape)} does not fit weight {tuple(shape)}")
        return d.reshape(shape) * scale

    def fits(self, shape: torch.Size) -> bool:
        """Whether the update has the target weight's shape (checked from factor shapes, cheaply)."""
        f = self.factors
        out_f, in_f = shape[0], int(torch.Size(shape[1:]).numel())
        if self.kind == "lora":
            up, down = f["up"], f["down"]
            return up.shape[0] == out_f and down.numel() == down.shape[0] * in_f and up.shape[1] == down.shape[0]
        if self.kind == "loha":
            return f["hada_w1_a"].shape[0] == out_f and f["hada_w1_b"][0].numel() == in_f
        if self.kind == "lokr":

            def dims(full: str, a: str, b: str) -> tuple[int, int]:
                if full in f:
                    return f[full].shape[0], int(f[full][0].numel())
                return f[a].shape[0], int(f[b][0].numel())

            (o1, i1), (o2, i2) = (
                dims("lokr_w1", "lokr_w1_a", "lokr_w1_b"),
                dims("lokr_w2", "lokr_w2_a", "lokr_w2_b"),
            )
            return o1 * o2 == out_f and i1 * i2 == in_f
        return tuple(f["diff"].shape) == tuple(shape) or f["diff"].numel() == out_f * in_f

    def bias_delta(self, device: torch.device) -> torch.Tensor | None:
        b = self.factors.get("diff_b")
        return None if b is None else b.to(device, torch.float32)


@dataclass
class ParsedNetwork:
    """A network file split into layers; `unsupported` names variants found but not handled."""

    layers: list[Layer]
    unsupported: list[str] = field(default_factory=list)
    family: str | None = None  # "sd1", "sd2", "sdxl" or None when the keys cannot tell


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, factor in _FACTOR_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], factor
    return None


def parse_network(state_dict: dict[str, torch.Tensor]) -> ParsedNetwork:
    """Group a LoRA/LyCORIS state dict by target layer (no model needed)."""
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    unknown: list[str] = []
    for key, value in state_dict.items():
        split = _split_key(key)
        if split is None or not isinstance(value, torch.Tensor):
            unknown.append(key)
            continue
        groups[split[0]][split[1]] = value
    unsupported: set[str] = set()
    layers: list[Layer] = []
    for prefix, fac in groups.items():
        bad = [_UNSUPPORTED[k] for k in fac if k in _UNSUPPORTED]
        if bad:
            unsupported.update(bad)
            continue
        alpha_t = fac.pop("alpha", None)
        alpha = float(alpha_t.float().reshape(-1)[0]) if alpha_t is not None and alpha_t.numel() else None
        if "up" in fac and "down" in fac:
            kind = "lora"
        elif all(k in fac for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
            kind = "loha"
        elif ("lokr_w1" in fac or "lokr_w1_a" in fac) and ("lokr_w2" in fac or "lokr_w2_a" in fac):
            kind = "lokr"
        elif "diff" in fac:
            kind = "full"
        elif not fac:
            continue  # a lone alpha
        else:
            unknown.extend(prefix + "." + k for k in fac)
            continue
        layers.append(Layer(prefix, kind, fac, alpha))
    if unknown:
        log.debug("network keys not understood: %s", unknown[:10])
    if not layers and unknown and not unsupported:
        unsupported.add(f"unknown key format (e.g. {unknown[0]!r})")
    return ParsedNetwork(
        layers,
        sorted(unsupported),
        guess_family({k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}),
    )


def guess_family(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The base family a network was made for, from key names and widths, or None if they cannot tell:
    second text encoder or SDXL-only embeddings -> "sdxl"; else the cross-attention key/value input width
    (768 SD1, 1024 SD2, 2048 SDXL); else the text encoder width (768 SD1, 1024 SD2)."""
    keys = list(shapes)
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
        return "sdxl"
    if any(("label_emb" in k or "add_embedding" in k) for k in keys):
        return "sdxl"
    for k, s in shapes.items():
        split = _split_key(k)
        if split is None or len(s) < 2:
            continue
        prefix, factor = split
        in_width = {"down": s[1], "hada_w1_b": s[1], "diff": s[1]}.get(factor)
        if in_width is None:
            continue
        if "attn2" in prefix and ("to_k" in prefix or "to_v" in prefix) and in_width in _CROSS_ATTN_FAMILY:
            return _CROSS_ATTN_FAMILY[in_width]
    for k, s in shapes.items():
        split = _split_key(k)
        if split is None or len(s) < 2 or split[1] != "down":
            continue
        if split[0].startswith(("lora_te_", "text_encoder.")) and "q_proj" in split[0] and s[1] in _TE_FAMILY:
            return _TE_FAMILY[s[1]]
    return None


# -------------------------------------------------------------------------------------- module lookup
_RESNET_LDM = {
    "norm1": "in_layers_0",
    "conv1": "in_layers_2",
    "time_emb_proj": "emb_layers_1",
    "norm2": "out_layers_0",
    "conv2": "out_layers_3",
    "conv_shortcut": "skip_connection",
}


def _ldm_prefixes(config) -> dict[str, tuple[str, bool]]:
    """diffusers UNet module prefix -> (LDM/SGM prefix with "_", is_resnet) for the original layout, derived
    from the UNet config (block types and layers per block)."""
    lpb = config.layers_per_block
    down_types, up_types = list(config.down_block_types), list(config.up_block_types)
    per_block = list(lpb) if isinstance(lpb, list | tuple) else [lpb] * len(down_types)
    out: dict[str, tuple[str, bool]] = {
        "conv_in": ("input_blocks_0_0", False),
        "time_embedding.linear_1": ("time_embed_0", False),
        "time_embedding.linear_2": ("time_embed_2", False),
        "add_embedding.linear_1": ("label_emb_0_0", False),
        "add_embedding.linear_2": ("label_emb_0_2", False),
        "conv_norm_out": ("out_0", False),
        "conv_out": ("out_2", False),
        "mid_block.resnets.0": ("middle_block_0", True),
        "mid_block.attentions.0": ("middle_block_1", False),
        "mid_block.resnets.1": ("middle_block_2", True),
    }
    idx = 1
    for i, kind in enumerate(down_types):
        attn = "CrossAttn" in kind
        for j in range(per_block[i]):
            out[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks_{idx}_0", True)
            if attn:
                out[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks_{idx}_1", False)
            idx += 1
        if i < len(down_types) - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks_{idx}_0_op", False)
            idx += 1
    idx = 0
    rev = list(reversed(per_block))
    for i, kind in enumerate(up_types):
        attn = "CrossAttn" in kind
        for j in range(rev[i] + 1):
            out[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks_{idx}_0", True)
            if attn:
                out[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks_{idx}_1", False)
            if j == rev[i] and i < len(up_types) - 1:
                out[f"up_blocks.{i}.upsamplers.0.conv"] = (
                    f"output_blocks_{idx}_{2 if attn else 1}_conv",
                    False,
                )
            idx += 1
    return out


def _weighted_modules(module: torch.nn.Module, text: bool = False) -> dict[str, torch.nn.Module]:
    """Linear and Conv2d layers by dotted name. Text encoders are named as in transformers' CLIPTextModel
    state dicts ("text_model.encoder.layers.0.self_attn.q_proj"), which LoRA files use, also where the
    module tree itself has no `text_model` level (transformers 5's CLIPTextModel)."""
    prefix = "text_model." if text and not hasattr(module, "text_model") else ""
    return {prefix + n: m for n, m in module.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and n}


@dataclass
class ModelTargets:
    """The layers of one model a network key can name: component ("unet", "te", "te2") -> {name: module},
    and kohya-style underscore names -> (component, dotted name)."""

    modules: dict[str, dict[str, torch.nn.Module]]
    kohya: dict[str, tuple[str, str]]

    @classmethod
    def of(cls, model) -> ModelTargets:
        comps = {"unet": model.unet, "te": model.text_encoder, "te2": getattr(model, "text_encoder_2", None)}
        modules = {c: _weighted_modules(m, text=c != "unet") for c, m in comps.items() if m is not None}
        kohya: dict[str, tuple[str, str]] = {}
        for name in modules.get("unet", {}):
            kohya["lora_unet_" + name.replace(".", "_")] = ("unet", name)
        ldm = _ldm_prefixes(model.unet.config)
        for name in modules.get("unet", {}):
            for dprefix, (lprefix, resnet) in ldm.items():
                if name == dprefix or name.startswith(dprefix + "."):
                    rest = name[len(dprefix) + 1 :]
                    if resnet:
                        head, _, tail = rest.partition(".")
                        rest = _RESNET_LDM.get(head, head) + ("." + tail if tail else "")
                    alias = lprefix + ("_" + rest.replace(".", "_") if rest else "")
                    kohya.setdefault("lora_unet_" + alias, ("unet", name))
                    break
        te_prefixes = ("lora_te1_", "lora_te_") if "te2" in modules else ("lora_te_", "lora_te1_")
        for name in modules.get("te", {}):
            for p in te_prefixes:
                kohya.setdefault(p + name.replace(".", "_"), ("te", name))
        for name in modules.get("te2", {}):
            kohya["lora_te2_" + name.replace(".", "_")] = ("te2", name)
        return cls(modules, kohya)

    def resolve(self, prefix: str) -> tuple[str, str] | None:
        """(component, module name) a layer's key prefix targets, or None."""
        if prefix.startswith("lora_"):
            return self.kohya.get(prefix)
        path = prefix
        for old, new in (
            (".processor.", "."),
            ("to_out_lora", "to_out.0"),
            ("to_q_lora", "to_q"),
            ("to_k_lora", "to_k"),
            ("to_v_lora", "to_v"),
        ):
            path = path.replace(old, new)
        for head, comps in (
            ("unet.", ("unet",)),
            ("text_encoder_2.", ("te2",)),
            ("text_encoder.", ("te",)),
            ("base_model.model.", ("unet", "te")),
            ("", ("unet", "te")),
        ):
            if path.startswith(head):
                rest = path[len(head) :]
                for c in comps:
                    for name in (rest, "text_model." + rest) if c != "unet" else (rest,):
                        if name in self.modules.get(c, {}):
                            return c, name
                if head:
                    return None
        return None


# --------------------------------------------------------------------------------------------- library
@dataclass
class LoraEntry:
    """One network file as the UI/API lists it. `sha256` is the whole file's SHA-256 (None until hashed);
    `family` comes from the key names/widths ("sd1", "sd2", "sdxl" or None); `metadata` is the
    safetensors `__metadata__` as `parse_metadata` reads it (kohya's `ss_*` training keys and others)."""

    name: str
    path: Path
    alias: str
    sha256: str | None = None
    family: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def parse_metadata(meta: dict[str, str]) -> dict[str, Any]:
    """A safetensors `__metadata__` as A1111 shows it: every value a string, except those that start with
    "{" and parse as JSON (kohya's `ss_tag_frequency`, `ss_dataset_dirs`, ...), which become objects."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        out[k] = v
        if isinstance(v, str) and v.startswith("{"):
            try:
                out[k] = json.loads(v)
            except ValueError:
                pass
    return out


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(key -> shape, `__metadata__`) from a .safetensors header, without reading the tensors."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        if n > 100_000_000:
            raise ValueError(f"{path}: implausible safetensors header")
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", None) or {}
    return {k: tuple(v.get("shape", ())) for k, v in header.items()}, {str(k): str(v) for k, v in meta.items()}


def addnet_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a .safetensors file's tensor data (everything after the header): the hash kohya's
    sd-scripts stores as `sshs_model_hash` and A1111 shows (first 12 digits) as a LoRA's hash."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + n)
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class NetworkLibrary:
    """The LoRA/LyCORIS files under `lora_dirs` (searched recursively), by name (file stem; first found
    wins). Parsed files are cached by (path, size, mtime), at most `cache_size` of them. `.pt`/`.ckpt`
    files, like `.safetensors`, load through the engine's loading choke point (pickles only with
    `allow_pickle`); an unreadable file is a RequestError naming it.

    `merge(model, calls)` merges networks into a model and keeps them merged across jobs (the engine's path);
    `applied(model, calls)` does so for a `with` block only."""

    def __init__(
        self,
        lora_dirs: Iterable[str | os.PathLike],
        *,
        allow_pickle: bool = False,
        hash_cache: HashCache | None = None,
        cache_size: int = 8,
    ):
        self.dirs = tuple(Path(d) for d in lora_dirs)
        self.allow_pickle = allow_pickle
        self.hash_cache = hash_cache or HashCache()
        self.cache_size = max(1, cache_size)
        self._lock = threading.RLock()
        self._files: dict[str, Path] = {}
        self._parsed: OrderedDict[tuple[Path, int, int], ParsedNetwork] = OrderedDict()
        self._short: dict[tuple[Path, int, int], str] = {}
        # the networks kept merged per model, by its UNet module: gone with the model (ldm_core.prompts.network_state)
        self._merged: weakref.WeakKeyDictionary[torch.nn.Module, MergedNetworks] = weakref.WeakKeyDictionary()
        self.refresh()

    # ---- listing --------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Rescan the folders."""
        files = scan_named_files(self.dirs, LORA_SUFFIXES, "LoRA")
        with self._lock:
            self._files = files

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._files)

    def find(self, name: str) -> Path:
        """The file of network `name` (exact, else case-insensitive); RequestError("prompt", ...) if none."""
        with self._lock:
            files = dict(self._files)
        if name in files:
            return files[name]
        folded = [n for n in files if n.lower() == name.lower()]
        if len(folded) == 1:
            return files[folded[0]]
        names = sorted(files)
        shown = ", ".join(names[:30]) + (f", ... ({len(names)} in all)" if len(names) > 30 else "")
        raise RequestError("prompt", f"unknown LoRA {name!r}; available: {shown or 'none (models/Lora is empty)'}")

    def entries(self, hashes: bool = False) -> list[LoraEntry]:
        """Every network found by the last scan (`refresh`) with its alias (`ss_output_name`), family and
        metadata (`parse_metadata`); `hashes` computes missing SHA-256s (slow once per file)."""
        out = []
        for name in self.names():
            p = self.find(name)
            e = LoraEntry(name, p, name, sha256=self.hash_cache.cached(p))
            if hashes and e.sha256 is None:
                e.sha256 = file_sha256(p, self.hash_cache)
            if p.suffix.lower() == ".safetensors":
                try:
                    shapes, meta = read_safetensors_header(p)
                    e.metadata = parse_metadata(meta)
                    e.alias = meta.get("ss_output_name") or name
                    e.family = guess_family(shapes)
                except (OSError, ValueError, struct.error) as exc:
                    log.warning("cannot read %s: %s", p, exc)
            out.append(e)
        return out

    # ---- loading ------------------------------------------------------------------------------------
    @staticmethod
    def _stamp(path: Path) -> tuple[Path, int, int]:
        st = path.stat()
        return path, st.st_size, st.st_mtime_ns

    def load(self, name: str) -> ParsedNetwork:
        """The parsed network `name` (cached by path, size and mtime)."""
        key = self._stamp(self.find(name))
        with self._lock:
            if key in self._parsed:
                self._parsed.move_to_end(key)
                return self._parsed[key]
        from ..models.loading import ModelFileError, load_state_dict

        try:
            sd = load_state_dict(key[0], allow_pickle=self.allow_pickle)
        except ModelFileError as exc:
            raise RequestError("prompt", f"LoRA {name!r}: {exc}") from None
        parsed = parse_network(sd)
        with self._lock:
            self._parsed[key] = parsed
            while len(self._parsed) > self.cache_size:
                self._parsed.popitem(last=False)
        return parsed

    def short_hash(self, name: str) -> str:
        """The 12-hex hash "Lora hashes" shows, as A1111 computes it: the file's `sshs_model_hash` metadata,
        else the SHA-256 of a .safetensors file's tensor data, else of the whole file."""
        key = self._stamp(self.find(name))
        with self._lock:
            if key in self._short:
                return self._short[key]
        path = key[0]
        digest = ""
        if path.suffix.lower() == ".safetensors":
            try:
                digest = read_safetensors_header(path)[1].get("sshs_model_hash", "") or addnet_hash(path)
            except (OSError, ValueError):
                digest = ""
        digest = digest or file_sha256(path, self.hash_cache)
        with self._lock:
            self._short[key] = digest[:LORA_HASH_LEN]
        return digest[:LORA_HASH_LEN]

    # ---- applying -----------------------------------------------------------------------------------
    def _plan(
        self, model, calls: list[ExtraNetworkCall]
    ) -> tuple[dict[tuple[str, str], list[tuple[Layer, float]]], dict[str, str], ModelTargets]:
        family = model.kind.family
        targets = ModelTargets.of(model)
        plan: dict[tuple[str, str], list[tuple[Layer, float]]] = defaultdict(list)
        hashes: dict[str, str] = {}
        for call in calls:
            try:
                te_w, unet_w = call.weights()
            except ValueError as exc:
                raise RequestError("prompt", str(exc)) from None
            self.find(call.name)
            net = self.load(call.name)
            label = f"LoRA {call.name!r}"
            if net.family is not None and net.family != family:
                raise RequestError(
                    "prompt",
                    f"{label} is made for {FAMILY_LABELS[net.family]} models, but the "
                    f"current model is {FAMILY_LABELS.get(family, family)}",
                )
            if net.unsupported:
                raise RequestError(
                    "prompt",
                    f"{label} uses a network type that is not supported: {', '.join(net.unsupported)} "
                    "(supported: LoRA, LoCon, LoHa, LoKr and full diffs without Tucker decomposition)",
                )
            missing: list[str] = []
            misfit: list[str] = []
            resolved: list[tuple[tuple[str, str], Layer]] = []
            for layer in net.layers:
                where = targets.resolve(layer.prefix)
                if where is None:
                    missing.append(layer.prefix)
                elif not layer.fits(targets.modules[where[0]][where[1]].weight.shape):
                    misfit.append(layer.prefix)
                else:
                    resolved.append((where, layer))
            model_label = FAMILY_LABELS.get(family, family)
            if misfit:
                raise RequestError(
                    "prompt",
                    f"{label} does not fit the current {model_label} model: {len(misfit)} layers have "
                    f"other shapes (e.g. {misfit[0]!r}); is it made for another base model?",
                )
            if not resolved or len(missing) > len(net.layers) // 2:
                raise RequestError(
                    "prompt",
                    f"{label} does not fit the current {model_label} model: {len(missing)} of "
                    f"{len(net.layers)} layers have no match (e.g. {missing[0] if missing else None!r}); "
                    "is it made for another base model?",
                )
            if missing:
                log.warning("%s: %d layers have no match in this model, e.g. %s", label, len(missing), missing[:3])
            for (comp, name), layer in resolved:
                w = unet_w if comp == "unet" else te_w
                if w != 0:
                    plan[(comp, name)].append((layer, w))
            hashes[call.name] = self.short_hash(call.name)
        return plan, hashes, targets

    def _signature(self, calls: list[ExtraNetworkCall]) -> tuple:
        """What a merge of `calls` depends on: per call its name, file (path, size, mtime) and weights."""
        sig = []
        for call in calls:
            try:
                te_w, unet_w = call.weights()
            except ValueError as exc:
                raise RequestError("prompt", str(exc)) from None
            sig.append((call.name, self._stamp(self.find(call.name)), te_w, unet_w))
        return tuple(sig)

    def merge(self, model, calls: Iterable[ExtraNetworkCall]) -> dict[str, str]:
        """Make `model`'s weights hold exactly the `<lora:...>` calls (other tag kinds are ignored) and keep
        them merged after the call (see `network_state`): the same set as the model holds now costs nothing,
        another set changes only the layers that differ, no calls restores the original weights. Returns
        the infotext params ({"Lora hashes": "name: 12hex, ..."}, or {} without calls).

        Raises RequestError("prompt", ...) for an unknown name, a bad weight, a network for another model
        family or of an unsupported type, before any weight is changed. Not safe to use concurrently on
        one model (the engine runs one job at a time)."""
        calls = [c for c in calls if c.kind in LORA_KINDS]
        with self._lock:
            state = self._merged.get(model.unet)
            if not calls:
                if state is not None:
                    state.clear()
                    del self._merged[model.unet]
                return {}
            signature = self._signature(calls)
            if state is not None and state.matches(signature):
                return dict(state.params)
            plan, hashes, targets = self._plan(model, calls)
            if state is None:
                state = self._merged.setdefault(model.unet, MergedNetworks())
            params = {"Lora hashes": ", ".join(f"{n}: {h}" for n, h in hashes.items())}
            state.update(signature, plan, targets.modules, params, _layer_delta)
            return dict(state.params)

    def merged_state(self, model) -> MergedNetworks | None:
        """The networks kept merged in `model` (None when it holds its file's weights)."""
        with self._lock:
            return self._merged.get(model.unet)

    @contextmanager
    def applied(self, model, calls: Iterable[ExtraNetworkCall]) -> Iterator[dict[str, str]]:
        """`merge(model, calls)` for the duration of a `with` block; yields its infotext params. On exit
        (also on errors) every changed weight is restored bit for bit (`merge(model, [])`)."""
        params = self.merge(model, calls)
        try:
            yield params
        finally:
            self.merge(model, [])


def _layer_delta(
    module: torch.nn.Module, parts: list[tuple[Layer, float]], where: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The summed (weight, bias or None) update of `parts` for `module`, float32 on the weight's device."""
    weight = module.weight
    try:
        delta = None
        bias = None
        for layer, w in parts:
            d = layer.delta(weight.shape, weight.device) * w
            delta = d if delta is None else delta + d
            bd = layer.bias_delta(weight.device)
            if bd is not None and module.bias is not None:
                bias = bd * w if bias is None else bias + bd * w
    except (ValueError, RuntimeError) as exc:
        raise RequestError("prompt", f"LoRA layer {where} does not fit the model: {exc}") from None
    return delta, bias
