"""Original single-file checkpoints (CompVis / Stability key layout) <-> diffusers components, both ways.

An original SD checkpoint holds every component under one prefix each:

- UNet: `model.diffusion_model.`; VAE: `first_stage_model.` (every family)
- SD 1.x text encoder: `cond_stage_model.transformer.` (CLIP ViT-L with transformers' key names)
- SD 2.x text encoder: `cond_stage_model.model.` (OpenCLIP ViT-H in OpenCLIP's own layout)
- SDXL: `conditioner.embedders.0.transformer.` (CLIP ViT-L) and `conditioner.embedders.1.model.`
  (OpenCLIP ViT-bigG)
- SDXL refiner: `conditioner.embedders.0.model.` (OpenCLIP ViT-bigG, its only text encoder, which diffusers
  names `text_encoder_2`); its UNet's addition embedding takes the pooled text and 5 time ids (the
  aesthetic score replaces the target size), not 6

Key names are mapped with prefix tables built from the model's structure (number of levels, layers per
level, which levels have attention), the same tables in both directions, so an export followed by a load
gives back identical tensors. Configs are the shipped family configs with every field that tensor shapes
determine replaced (channels, levels, layers, attention depth, linear projection, cross-attention width,
addition-embedding width, text-encoder width/depth/MLP size, VAE channels), so the public full-size
checkpoints and small test checkpoints load through the same code. Head counts cannot be seen in weights:
SD 1.x uses 8 heads per level, SD 2.x, SDXL and all text encoders use heads of width 64 (`heads_for_width`).

OpenCLIP details: q/k/v are fused in `attn.in_proj_*`; `text_projection` is stored transposed
(x @ P). SD 2.x conditions on OpenCLIP ViT-H's penultimate layer: it runs blocks 0-22 of 24 and then the
final layer norm, which is what a 23-layer diffusers text encoder computes. Files hold the tower in one of
two ways, and loading reads which one from the file (`sd2_used_blocks`):

- the complete OpenCLIP tower (Stability's files, OpenCLIP itself, our own exports): all 24 blocks plus
  `text_projection`; the last block is not used and is dropped;
- only the blocks in use (diffusers' own conversion script writes the 23 layers of its text encoder and no
  `text_projection`): every block is used.

At ViT-H width (1024) the block count decides regardless (24 -> 23, 23 -> 23), as A1111 and diffusers do.
Exporting appends an all-zero block (an exact identity in a pre-norm residual block) and an identity
`text_projection`, so every reader gets the same features.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .configs import shipped_config
from .detect import (
    SDXL_FAMILIES,
    TEXT_ENCODER_PREFIXES,
    UNET_PREFIX,
    V_PREDICTION_MARKER,
    VAE_PREFIX,
    ZERO_SNR_MARKER,
    CheckpointKind,
    detect_checkpoint,
    detect_diffusers,
)

Tensor = torch.Tensor
StateDict = dict[str, Tensor]


class LayoutError(ValueError):
    """A state dict does not have the key layout / shapes its detected family needs."""


# ----------------------------------------------------------------------------------------------------------
# prefix tables


@dataclass(frozen=True)
class _Pair:
    ldm: str  # prefix in the original layout (inside the component prefix), ends with "."
    diffusers: str  # the same module's prefix in diffusers naming
    sub: str = ""  # renames inside the module: "" none, "resnet", "vae_resnet", "vae_attn"


_SUB_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "": (),
    "resnet": (
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ),
    "vae_resnet": (("nin_shortcut.", "conv_shortcut."),),
    "vae_attn": (
        ("norm.", "group_norm."),
        ("q.", "to_q."),
        ("k.", "to_k."),
        ("v.", "to_v."),
        ("proj_out.", "to_out.0."),
    ),
}
_MAX_PREFIX_PARTS = 6


class _KeyMap:
    """Bidirectional key mapping from a list of `_Pair`s (longest matching prefix wins)."""

    def __init__(self, pairs: list[_Pair]) -> None:
        self.by_ldm = {p.ldm: p for p in pairs}
        self.by_diffusers = {p.diffusers: p for p in pairs}

    def convert(self, sd: Mapping[str, Tensor], to_diffusers: bool) -> tuple[StateDict, list[str]]:
        """Map every key of `sd`; returns (converted, keys that matched no prefix)."""
        table = self.by_ldm if to_diffusers else self.by_diffusers
        out: StateDict = {}
        unmatched = []
        for key, value in sd.items():
            parts = key.split(".")
            for n in range(min(len(parts) - 1, _MAX_PREFIX_PARTS), 0, -1):
                pair = table.get(".".join(parts[:n]) + ".")
                if pair is not None:
                    break
            else:
                unmatched.append(key)
                continue
            src, dst = (pair.ldm, pair.diffusers) if to_diffusers else (pair.diffusers, pair.ldm)
            rest = key[len(src) :]
            for a, b in _SUB_RENAMES[pair.sub]:
                s, d = (a, b) if to_diffusers else (b, a)
                if rest.startswith(s):
                    rest = d + rest[len(s) :]
                    break
            if (
                pair.sub == "vae_attn"
                and rest.endswith(".weight")
                and not rest.startswith(("norm.", "group_norm."))
            ):
                # 1x1 convolutions in the original, linear layers in diffusers
                if to_diffusers and value.ndim > 2:
                    value = value.reshape(value.shape[0], value.shape[1])
                elif not to_diffusers and value.ndim == 2:
                    value = value[:, :, None, None]
            out[dst + rest] = value
        return out, unmatched


@dataclass(frozen=True)
class UNetLayout:
    """The structure that fixes a UNet's key names: levels, resnets per down level, attention per level."""

    levels: int
    layers_per_block: int
    attention: tuple[bool, ...]  # per down level; up levels mirror it
    addition_embedding: bool  # SDXL "text_time" embedding (label_emb in the original)
    class_embedding: bool = False  # an nn.Embedding `label_emb` (the SD x4 upscaler's noise level)
    #: Renames inside attention blocks: "" for transformer blocks (same names both sides); "vae_attn" for
    #: plain self-attention blocks (LDSR's, after `ldm_core.models.sr_files` split their fused qkv).
    attention_sub: str = ""

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> UNetLayout:
        lpb = cfg["layers_per_block"]
        if not isinstance(lpb, int):
            raise LayoutError("per-level layers_per_block is not supported by the original layout")
        types = cfg["down_block_types"]
        return cls(
            len(cfg["block_out_channels"]),
            lpb,
            tuple("Attn" in t for t in types),
            cfg.get("addition_embed_type") == "text_time",
            cfg.get("num_class_embeds") is not None and cfg.get("class_embed_type") is None,
            "vae_attn" if any(t.startswith("AttnDown") for t in types) else "",
        )

    @classmethod
    def from_ldm(cls, keys: Mapping[str, Any]) -> UNetLayout:
        ids = {int(k.split(".")[1]) for k in keys if k.startswith("input_blocks.")}
        downs = {int(k.split(".")[1]) for k in keys if k.startswith("input_blocks.") and ".0.op." in k}
        if not ids:
            raise LayoutError("UNet has no input_blocks")
        levels = len(downs) + 1
        resnets = max(ids) - len(downs)
        if resnets % levels:
            raise LayoutError(f"UNet input blocks ({max(ids) + 1}) do not split into {levels} levels")
        lpb = resnets // levels
        firsts = [f"input_blocks.{1 + i * (lpb + 1)}.1." for i in range(levels)]
        attention = tuple(any(k.startswith(f) for k in keys) for f in firsts)
        plain = any(k.startswith("middle_block.1.") and k.endswith(".q.weight") for k in keys)
        return cls(
            levels, lpb, attention, "label_emb.0.0.weight" in keys, "label_emb.weight" in keys,
            "vae_attn" if plain else "",
        )

    def first_block(self, level: int) -> int:
        """Index of the first input block of a down level."""
        return 1 + level * (self.layers_per_block + 1)

    def key_map(self) -> _KeyMap:
        n, lpb = self.levels, self.layers_per_block
        pairs = [
            _Pair("time_embed.0.", "time_embedding.linear_1."),
            _Pair("time_embed.2.", "time_embedding.linear_2."),
            _Pair("input_blocks.0.0.", "conv_in."),
            _Pair("out.0.", "conv_norm_out."),
            _Pair("out.2.", "conv_out."),
            _Pair("middle_block.0.", "mid_block.resnets.0.", "resnet"),
            _Pair("middle_block.1.", "mid_block.attentions.0.", self.attention_sub),
            _Pair("middle_block.2.", "mid_block.resnets.1.", "resnet"),
        ]
        if self.class_embedding:
            pairs.append(_Pair("label_emb.", "class_embedding."))
        if self.addition_embedding:
            pairs += [
                _Pair("label_emb.0.0.", "add_embedding.linear_1."),
                _Pair("label_emb.0.2.", "add_embedding.linear_2."),
            ]
        k = 1
        for i in range(n):
            for j in range(lpb):
                pairs.append(_Pair(f"input_blocks.{k}.0.", f"down_blocks.{i}.resnets.{j}.", "resnet"))
                if self.attention[i]:
                    pairs.append(
                        _Pair(f"input_blocks.{k}.1.", f"down_blocks.{i}.attentions.{j}.", self.attention_sub)
                    )
                k += 1
            if i < n - 1:
                pairs.append(_Pair(f"input_blocks.{k}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
                k += 1
        up_attention = self.attention[::-1]
        k = 0
        for i in range(n):
            for j in range(lpb + 1):
                pairs.append(_Pair(f"output_blocks.{k}.0.", f"up_blocks.{i}.resnets.{j}.", "resnet"))
                if up_attention[i]:
                    pairs.append(
                        _Pair(f"output_blocks.{k}.1.", f"up_blocks.{i}.attentions.{j}.", self.attention_sub)
                    )
                if j == lpb and i < n - 1:
                    idx = 2 if up_attention[i] else 1
                    pairs.append(_Pair(f"output_blocks.{k}.{idx}.conv.", f"up_blocks.{i}.upsamplers.0.conv."))
                k += 1
        return _KeyMap(pairs)


@dataclass(frozen=True)
class VAELayout:
    """The structure that fixes an AutoencoderKL's (or a VQModel's: `codebook`) key names."""

    levels: int
    layers_per_block: int
    codebook: bool = False  # a VQ autoencoder's `quantize.embedding` (LDSR's first stage)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> VAELayout:
        return cls(len(cfg["block_out_channels"]), cfg["layers_per_block"], "num_vq_embeddings" in cfg)

    @classmethod
    def from_ldm(cls, keys: Mapping[str, Any]) -> VAELayout:
        levels = {int(k.split(".")[2]) for k in keys if k.startswith("encoder.down.")}
        blocks = {int(k.split(".")[4]) for k in keys if k.startswith("encoder.down.0.block.")}
        if not levels or not blocks:
            raise LayoutError("VAE has no encoder.down.* blocks")
        return cls(max(levels) + 1, max(blocks) + 1, "quantize.embedding.weight" in keys)

    def key_map(self) -> _KeyMap:
        n, lpb = self.levels, self.layers_per_block
        pairs = [_Pair("quant_conv.", "quant_conv."), _Pair("post_quant_conv.", "post_quant_conv.")]
        if self.codebook:
            pairs.append(_Pair("quantize.", "quantize."))
        for part in ("encoder", "decoder"):
            pairs += [
                _Pair(f"{part}.conv_in.", f"{part}.conv_in."),
                _Pair(f"{part}.conv_out.", f"{part}.conv_out."),
                _Pair(f"{part}.norm_out.", f"{part}.conv_norm_out."),
                _Pair(f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", "vae_resnet"),
                _Pair(f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", "vae_attn"),
                _Pair(f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", "vae_resnet"),
            ]
        for i in range(n):
            for j in range(lpb):
                pairs.append(
                    _Pair(
                        f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.", "vae_resnet"
                    )
                )
            if i < n - 1:
                pairs.append(
                    _Pair(
                        f"encoder.down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv."
                    )
                )
            level = n - 1 - i  # the decoder's first up block is the original's deepest level
            for j in range(lpb + 1):
                pairs.append(
                    _Pair(
                        f"decoder.up.{level}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.", "vae_resnet"
                    )
                )
            if i < n - 1:
                pairs.append(
                    _Pair(f"decoder.up.{level}.upsample.conv.", f"decoder.up_blocks.{i}.upsamplers.0.conv.")
                )
        return _KeyMap(pairs)


# ----------------------------------------------------------------------------------------------------------
# config inference from shapes


def heads_for_width(width: int) -> int:
    """Attention heads of width 64 (SD 2.x, SDXL, CLIP/OpenCLIP text encoders); 1 head when `width` is not
    a multiple of 64 (small test models)."""
    return width // 64 if width % 64 == 0 and width >= 64 else 1


def unet_attention_heads(family: str, block_out_channels: list[int]) -> int | list[int]:
    """Heads per level (diffusers' `attention_head_dim`, which holds head *counts*): 8 for SD 1.x, else
    heads of width 64."""
    if family == "sd1":
        return 8
    return [heads_for_width(c) for c in block_out_channels]


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise LayoutError(f"missing tensor {key!r}")
    v = sd[key]
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def _count(sd: Mapping[str, Any], prefix: str) -> int:
    """Number of distinct integer indices `i` in keys `prefix + "i."`."""
    n = len(prefix)
    return len({k[n:].split(".", 1)[0] for k in sd if k.startswith(prefix)})


def infer_unet_config(sd: Mapping[str, Any], family: str, pooled_dim: int | None = None) -> dict[str, Any]:
    """UNet2DConditionModel config fields determined by an original-layout UNet state dict (prefix removed).

    `pooled_dim` is the width of SDXL's pooled text embedding, needed to split the addition embedding's
    input into pooled text and the time embeddings (6 for SDXL, 5 for the refiner)."""
    layout = UNetLayout.from_ldm(sd)
    n, lpb = layout.levels, layout.layers_per_block
    blocks = [layout.first_block(i) for i in range(n)]
    channels = [_shape(sd, f"input_blocks.{b}.0.out_layers.3.weight")[0] for b in blocks]
    if not any(layout.attention):
        raise LayoutError("UNet has no attention blocks")
    depth = [
        _count(sd, f"input_blocks.{b}.1.transformer_blocks.") if a else 1
        for b, a in zip(blocks, layout.attention, strict=True)
    ]
    mid_depth = _count(sd, "middle_block.1.transformer_blocks.")
    if not layout.attention[-1]:
        depth[-1] = mid_depth
    elif mid_depth != depth[-1]:
        raise LayoutError(
            f"mid-block transformer depth {mid_depth} differs from the last level's {depth[-1]}"
        )
    first = blocks[layout.attention.index(True)]
    proj_in = _shape(sd, f"input_blocks.{first}.1.proj_in.weight")
    cfg: dict[str, Any] = {
        "in_channels": _shape(sd, "input_blocks.0.0.weight")[1],
        "out_channels": _shape(sd, "out.2.weight")[0],
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in layout.attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in layout.attention[::-1]],
        "cross_attention_dim": _shape(sd, f"input_blocks.{first}.1.transformer_blocks.0.attn2.to_k.weight")[
            1
        ],
        "use_linear_projection": len(proj_in) == 2,
        "attention_head_dim": unet_attention_heads(family, channels),
        "transformer_layers_per_block": 1 if all(d == 1 for d in depth) else depth,
    }
    # cross-attention only (the x4 upscaler's levels 1-2): the first attention reads the text, so its key
    # projection is as wide as the text states, not as the level (equal widths cannot be told apart)
    only_cross = [
        a and _shape(sd, f"input_blocks.{b}.1.transformer_blocks.0.attn1.to_k.weight")[1] != c
        for b, a, c in zip(blocks, layout.attention, channels, strict=True)
    ]
    if any(only_cross):
        cfg["only_cross_attention"] = only_cross
    if layout.class_embedding:
        cfg["num_class_embeds"] = _shape(sd, "label_emb.weight")[0]
    if layout.addition_embedding:
        in_dim = _shape(sd, "label_emb.0.0.weight")[1]
        n_ids = time_id_count(family)
        time_dim = (in_dim - pooled_dim) // n_ids if pooled_dim else 256
        if pooled_dim and (in_dim - pooled_dim) % n_ids:
            raise LayoutError(
                f"addition embedding input {in_dim} is not pooled {pooled_dim} + {n_ids} time embeddings"
            )
        cfg.update(
            addition_embed_type="text_time",
            projection_class_embeddings_input_dim=in_dim,
            addition_time_embed_dim=time_dim,
        )
    return cfg


def time_id_count(family: str) -> int:
    """Micro-conditioning values of an SDXL-family UNet: (orig h, orig w, crop top, crop left) then target
    h, w (SDXL) or the aesthetic score (refiner)."""
    return 5 if family == "sdxl-refiner" else 6


def infer_vae_config(sd: Mapping[str, Any]) -> dict[str, Any]:
    """AutoencoderKL config fields determined by an original-layout VAE state dict (prefix removed)."""
    layout = VAELayout.from_ldm(sd)
    n = layout.levels
    return {
        "in_channels": _shape(sd, "encoder.conv_in.weight")[1],
        "out_channels": _shape(sd, "decoder.conv_out.weight")[0],
        "latent_channels": _shape(sd, "decoder.conv_in.weight")[1],
        "block_out_channels": [_shape(sd, f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(n)],
        "layers_per_block": layout.layers_per_block,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
    }


def infer_clip_config(sd: Mapping[str, Any]) -> dict[str, Any]:
    """CLIPTextConfig fields from a text encoder in transformers naming ("text_model." prefix)."""
    vocab, width = _shape(sd, "text_model.embeddings.token_embedding.weight")
    cfg = {
        "vocab_size": vocab,
        "hidden_size": width,
        "max_position_embeddings": _shape(sd, "text_model.embeddings.position_embedding.weight")[0],
        "num_hidden_layers": _count(sd, "text_model.encoder.layers."),
        "intermediate_size": _shape(sd, "text_model.encoder.layers.0.mlp.fc1.weight")[0],
        "num_attention_heads": heads_for_width(width),
    }
    if "text_projection.weight" in sd:
        cfg["projection_dim"] = _shape(sd, "text_projection.weight")[0]
    return cfg


# ----------------------------------------------------------------------------------------------------------
# text encoders


_CLIP_IGNORED = ("text_model.embeddings.position_ids",)
_OPEN_CLIP_IGNORED = ("logit_scale", "attn_mask")
_OPEN_CLIP_LAYER = (
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("attn.out_proj.", "self_attn.out_proj."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)
#: log(100): the trained CLIP logit scale, written on export for readers that expect the key.
_LOGIT_SCALE = math.log(100.0)


def clip_to_canonical(sd: Mapping[str, Tensor]) -> StateDict:
    """Text-encoder keys in transformers naming with the "text_model." prefix (whatever the transformers
    version), from a CLIPTextModel(WithProjection) state dict or an original-layout CLIP part."""
    out = {}
    for k, v in sd.items():
        if k.startswith("text_model.") or k == "text_projection.weight":
            out[k] = v
        else:
            out["text_model." + k] = v
    return out


#: OpenCLIP ViT-H/14 (SD 2.x): width and blocks of the complete text tower; SD 2.x uses all but the last.
OPEN_CLIP_H_WIDTH = 1024
OPEN_CLIP_H_BLOCKS = 24


def sd2_used_blocks(sd: Mapping[str, Any]) -> int:
    """How many blocks of an SD 2.x OpenCLIP text tower (prefix removed; tensors or shapes) the model runs:
    the penultimate layer of a complete tower (one with `text_projection`, or 24 blocks at ViT-H width),
    else every block the file holds (a tower converted from diffusers holds only the ones in use)."""
    blocks = _count(sd, "transformer.resblocks.")
    width = _shape(sd, "token_embedding.weight")[1]
    if width == OPEN_CLIP_H_WIDTH:
        return min(blocks, OPEN_CLIP_H_BLOCKS - 1)
    complete = "text_projection" in sd
    return blocks - 1 if complete and blocks > 1 else blocks


def _open_clip_to_canonical(sd: Mapping[str, Tensor], keep: int | None, projection: bool) -> StateDict:
    """OpenCLIP text tower (prefix removed) -> transformers naming. `keep` is how many blocks to convert
    (None: all; SD 2.x: `sd2_used_blocks`); `projection` keeps `text_projection` (SDXL's pooled output)."""
    used: set[str] = set()

    def take(key: str) -> Tensor:
        if key not in sd:
            raise LayoutError(f"missing tensor {key!r}")
        used.add(key)
        return sd[key]

    out: StateDict = {
        "text_model.embeddings.token_embedding.weight": take("token_embedding.weight"),
        "text_model.embeddings.position_embedding.weight": take("positional_embedding"),
        "text_model.final_layer_norm.weight": take("ln_final.weight"),
        "text_model.final_layer_norm.bias": take("ln_final.bias"),
    }
    layers = _count(sd, "transformer.resblocks.")
    keep = layers if keep is None else keep
    for i in range(layers):
        src = f"transformer.resblocks.{i}."
        block = {k[len(src) :]: k for k in sd if k.startswith(src)}
        if i >= keep:
            used.update(block.values())
            continue
        dst = f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = take(f"{src}attn.in_proj_{kind}").chunk(3, dim=0)
            out[f"{dst}self_attn.q_proj.{kind}"] = q.clone()
            out[f"{dst}self_attn.k_proj.{kind}"] = k.clone()
            out[f"{dst}self_attn.v_proj.{kind}"] = v.clone()
        for a, b in _OPEN_CLIP_LAYER:
            for kind in ("weight", "bias"):
                out[f"{dst}{b}{kind}"] = take(f"{src}{a}{kind}")
    if projection:
        out["text_projection.weight"] = take("text_projection").T.contiguous()
    elif "text_projection" in sd:
        used.add("text_projection")
    left = [k for k in sd if k not in used and k not in _OPEN_CLIP_IGNORED]
    if left:
        raise LayoutError(f"unexpected OpenCLIP tensors: {', '.join(sorted(left)[:5])}")
    return out


def _canonical_to_open_clip(sd: Mapping[str, Tensor], add_identity_layer: bool) -> StateDict:
    """transformers naming -> OpenCLIP text tower (no prefix). `add_identity_layer` appends an all-zero
    block (an exact identity; SD 2.x files hold one block more than the encoder uses) and writes an
    identity `text_projection` when the encoder has none."""
    ref = sd["text_model.embeddings.token_embedding.weight"]
    width = ref.shape[1]
    out: StateDict = {
        "token_embedding.weight": ref,
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "logit_scale": torch.tensor(_LOGIT_SCALE, dtype=ref.dtype, device=ref.device),
    }
    layers = _count(sd, "text_model.encoder.layers.")
    for i in range(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [sd[f"{src}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0
            )
        for a, b in _OPEN_CLIP_LAYER:
            for kind in ("weight", "bias"):
                out[f"{dst}{a}{kind}"] = sd[f"{src}{b}{kind}"]
    if add_identity_layer:
        dst = f"transformer.resblocks.{layers}."
        block = {
            k[len(f"transformer.resblocks.{layers - 1}.") :]: v
            for k, v in out.items()
            if k.startswith(f"transformer.resblocks.{layers - 1}.")
        }
        for name, v in block.items():
            out[dst + name] = torch.zeros_like(v)
    if "text_projection.weight" in sd:
        out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    elif add_identity_layer:
        out["text_projection"] = torch.eye(width, dtype=ref.dtype, device=ref.device)
    return out


# ----------------------------------------------------------------------------------------------------------
# whole checkpoints


#: Component names of a loaded model, in the order of `TEXT_ENCODER_PREFIXES`.
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")
#: Component names per family where they do not follow that order: the refiner's one encoder is diffusers'
#: `text_encoder_2` (its pipeline has no `text_encoder`).
_FAMILY_TEXT_ENCODER_NAMES = {"sdxl-refiner": ("text_encoder_2",)}


def text_encoder_slots(family: str) -> list[tuple[str, str, str]]:
    """(component name, original-layout prefix, key style) of each text encoder of `family`."""
    names = _FAMILY_TEXT_ENCODER_NAMES.get(family, TEXT_ENCODER_NAMES)
    return [(n, prefix, style) for n, (prefix, style) in zip(names, TEXT_ENCODER_PREFIXES[family], strict=False)]


@dataclass
class ConvertedCheckpoint:
    """An original checkpoint as diffusers components: configs and state dicts per component name
    ("unet", "vae", "text_encoder", "text_encoder_2"); text encoders use transformers naming with the
    "text_model." prefix. `configs` also holds "scheduler" and "model_index"."""

    kind: CheckpointKind
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    state_dicts: dict[str, StateDict] = field(default_factory=dict)


def _split(sd: Mapping[str, Tensor], prefix: str) -> StateDict:
    n = len(prefix)
    return {k[n:]: v for k, v in sd.items() if k.startswith(prefix)}


def _convert_text_encoder(part: StateDict, style: str, family: str) -> StateDict:
    if style == "hf_clip":
        canonical = clip_to_canonical(part)
        for k in _CLIP_IGNORED:
            canonical.pop(k, None)
        return canonical
    keep = sd2_used_blocks(part) if family == "sd2" else None
    return _open_clip_to_canonical(part, keep=keep, projection=family in SDXL_FAMILIES)


def convert_unet(sd: Mapping[str, Tensor], config: Mapping[str, Any], to_diffusers: bool) -> StateDict:
    """Convert a UNet state dict between the original layout (prefix removed) and diffusers naming."""
    layout = UNetLayout.from_config(config)
    out, unmatched = layout.key_map().convert(sd, to_diffusers)
    if unmatched:
        raise LayoutError(f"unexpected UNet tensors: {', '.join(sorted(unmatched)[:5])}")
    return out


def convert_vae(sd: Mapping[str, Tensor], config: Mapping[str, Any], to_diffusers: bool) -> StateDict:
    """Convert a VAE state dict between the original layout (prefix removed) and diffusers naming."""
    out, unmatched = VAELayout.from_config(config).key_map().convert(sd, to_diffusers)
    if unmatched:
        raise LayoutError(f"unexpected VAE tensors: {', '.join(sorted(unmatched)[:5])}")
    return out


def convert_checkpoint(state_dict: Mapping[str, Tensor], kind: CheckpointKind) -> ConvertedCheckpoint:
    """Split an original-layout checkpoint into diffusers component configs and state dicts.

    Keys outside the component prefixes (EMA copies, DDPM schedule buffers, markers) are ignored; keys
    inside a prefix that the layout does not explain raise `LayoutError`. Works on meta tensors too.
    """
    variant = kind.config_variant
    out = ConvertedCheckpoint(kind)
    texts = {}
    for name, prefix, style in text_encoder_slots(kind.family):
        part = _split(state_dict, prefix)
        if not part:
            raise LayoutError(f"no {name} weights ({prefix}*) in this {kind.family} checkpoint")
        texts[name] = _convert_text_encoder(part, style, kind.family)
        out.configs[name] = {**shipped_config(variant, name), **infer_clip_config(texts[name])}
        out.state_dicts[name] = texts[name]
    pooled = out.configs.get("text_encoder_2", {}).get("projection_dim")

    unet = _split(state_dict, UNET_PREFIX)
    unet_cfg = {**shipped_config(variant, "unet"), **infer_unet_config(unet, kind.family, pooled)}
    out.configs["unet"] = unet_cfg
    out.state_dicts["unet"] = convert_unet(unet, unet_cfg, to_diffusers=True)

    vae = _split(state_dict, VAE_PREFIX)
    if not vae:
        raise LayoutError(f"no VAE weights ({VAE_PREFIX}*) in this checkpoint")
    vae_cfg = {**shipped_config(variant, "vae"), **infer_vae_config(vae)}
    out.configs["vae"] = vae_cfg
    out.state_dicts["vae"] = convert_vae(vae, vae_cfg, to_diffusers=True)

    out.configs["scheduler"] = scheduler_config_for(kind)
    out.configs["model_index"] = shipped_config(variant, "model_index")
    return out


def scheduler_config_for(kind: CheckpointKind) -> dict[str, Any]:
    """The shipped scheduler config of `kind`'s variant with its prediction type and zero-SNR flag."""
    cfg = shipped_config(kind.config_variant, "scheduler")
    cfg["prediction_type"] = kind.prediction_type
    if kind.zero_terminal_snr:
        cfg["rescale_betas_zero_snr"] = True
    return cfg


# ----------------------------------------------------------------------------------------------------------
# export


def _resolve(model: Any, family: str | None) -> tuple[dict[str, Any], CheckpointKind]:
    """Components and kind of a LoadedModel, a diffusers pipeline or a component mapping."""
    if hasattr(model, "kind") and hasattr(model, "unet"):  # LoadedModel
        names = ("unet", "vae", "text_encoder", "text_encoder_2")
        comps, kind = {n: getattr(model, n, None) for n in names}, model.kind
    else:
        comps = dict(getattr(model, "components", model))
        if comps.get("unet") is None:
            raise ValueError("export needs a unet component")
        sched = comps.get("scheduler_config") or comps.get("scheduler")
        index = dict(getattr(model, "config", None) or {})  # a pipeline's config is its model_index
        if comps.get("text_encoder") is None and comps.get("text_encoder_2") is not None:
            index["requires_aesthetics_score"] = True  # bigG alone: the refiner's layout
        kind = detect_diffusers(comps["unet"].config, dict(getattr(sched, "config", sched) or {}), index)
    if family is not None:
        kind = kind.with_overrides(family=family)
    return comps, kind


def to_original_state_dict(model: Any, *, family: str | None = None) -> StateDict:
    """The original single-file layout of a model: a `LoadedModel`, a diffusers pipeline, or a mapping with
    "unet", "vae", "text_encoder" (and "text_encoder_2" for SDXL; only "text_encoder_2" for the refiner;
    optional "scheduler"/"scheduler_config" for the prediction type). Tensors are shared with the model
    where no reshaping is needed.

    Markers: a v-prediction model (other than SD 2.x, where it is the default) gets a `v_pred` key and a
    zero-terminal-SNR model a `ztsnr` key, both empty tensors.
    """
    comps, kind = _resolve(model, family)
    unet, vae = comps.get("unet"), comps.get("vae")
    slots = text_encoder_slots(kind.family)
    if vae is None:
        raise ValueError("export needs unet and vae components")
    missing = [name for name, _, _ in slots if comps.get(name) is None]
    if missing:
        raise ValueError(f"a {kind.family} export needs {' and '.join(missing)}")

    out: StateDict = {}
    unet_sd = convert_unet(unet.state_dict(), unet.config, to_diffusers=False)
    out.update({UNET_PREFIX + k: v for k, v in unet_sd.items()})
    vae_sd = convert_vae(vae.state_dict(), vae.config, to_diffusers=False)
    out.update({VAE_PREFIX + k: v for k, v in vae_sd.items()})
    for name, prefix, style in slots:
        canonical = clip_to_canonical(comps[name].state_dict())
        if style == "hf_clip":
            canonical.pop("text_projection.weight", None)
            part = canonical
        else:
            part = _canonical_to_open_clip(canonical, add_identity_layer=kind.family == "sd2")
        out.update({prefix + k: v for k, v in part.items()})
    ref = out[UNET_PREFIX + "input_blocks.0.0.weight"]
    if kind.prediction_type == "v_prediction" and kind.family != "sd2":
        out[V_PREDICTION_MARKER] = torch.zeros(0, dtype=ref.dtype, device=ref.device)
    if kind.zero_terminal_snr:
        out[ZERO_SNR_MARKER] = torch.zeros(0, dtype=ref.dtype, device=ref.device)
    return out


def save_single_file(
    model: Any,
    path: str | Path,
    *,
    family: str | None = None,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write `model` (see `to_original_state_dict`) as one original-layout `.safetensors` file.

    `dtype` converts floating-point tensors (e.g. torch.float16 for a half-size export). When key
    detection would get the prediction type wrong (an SD 2.x epsilon model), a `NAME.json` sidecar with
    the right `prediction_type` is written next to the file. Returns the path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    _, kind = _resolve(model, family)
    tensors: StateDict = {}
    seen: set[int] = set()
    for k, v in to_original_state_dict(model, family=family).items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        v = v.contiguous()
        if v.numel() and v.untyped_storage().data_ptr() in seen:  # safetensors refuses shared memory
            v = v.clone()
        if v.numel():
            seen.add(v.untyped_storage().data_ptr())
        tensors[k] = v
    meta = {"format": "pt", "ldm_core.family": kind.family, **(metadata or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    detected = detect_checkpoint({k: tuple(v.shape) for k, v in tensors.items()})
    sidecar = path.with_suffix(".json")
    if detected.prediction_type != kind.prediction_type:
        sidecar.write_text(json.dumps({"prediction_type": kind.prediction_type}) + "\n", encoding="utf-8")
    return path
