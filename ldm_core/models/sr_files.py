"""Single-file diffusion super-resolution models -> diffusers pipelines, offline, from shipped configs.

- **LDSR** (CompVis latent-diffusion 4x super-resolution; A1111 keeps it as `models/LDSR/model.ckpt`, some
  users as `.safetensors`). An openaimodel UNet (`model.diffusion_model.*`, 6 input channels: 3 latent and
  the low-resolution image in [-1, 1], concatenated) on a VQ-f4 autoencoder (`first_stage_model.*`, with
  its codebook `quantize.embedding`). It becomes a `LDMSuperResolutionPipeline` (UNet2DModel, VQModel,
  DDIMScheduler). Its attention blocks are not transformers: `norm`, a 1-D convolution `qkv` holding q, k
  and v fused per head ("legacy" order: for each head, q then k then v, `head_channels` rows each) and
  `proj_out`. The qkv rows are split here into diffusers' to_q / to_k / to_v.
- **SD x4 upscaler** (Stability's `x4-upscaler-ema.safetensors`): the SD 2.x layout (OpenCLIP ViT-H text
  encoder, linear-projection transformers) with a 7-channel UNet (4 latent + the noised low-resolution image)
  whose `label_emb` embeds the noise level, cross-attention-only transformers on levels 1-2, and a
  factor-4 VAE. It becomes a `StableDiffusionUpscalePipeline`.

Configs are the public ones (CompVis models/ldm/bsr_sr/config.yaml; Stability
configs/stable-diffusion/x4-upscaling.yaml) shipped as diffusers configs (`configs/ldsr`,
`configs/sd-x4-upscaler`); every size that tensor shapes show is taken from the file, so small test models
load through the same code. What shapes cannot show comes from those configs: LDSR's 32-channel heads, the
x4 UNet's 8 heads, group norms of 32.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .configs import shipped_config
from .detect import LDSR, TEXT_ENCODER_PREFIXES, UNET_PREFIX, VAE_PREFIX, X4, sr_kind
from .single_file import (
    LayoutError,
    StateDict,
    UNetLayout,
    _canonical_to_open_clip,
    _convert_text_encoder,
    _shape,
    _split,
    clip_to_canonical,
    convert_unet,
    convert_vae,
    infer_clip_config,
    infer_unet_config,
    infer_vae_config,
)

log = logging.getLogger(__name__)

_X4_TEXT_PREFIX, _X4_TEXT_STYLE = TEXT_ENCODER_PREFIXES["sd2"][0]


# ----------------------------------------------------------------------------------------------------------
# LDSR


def _split_qkv(sd: Mapping[str, torch.Tensor], head_channels: int) -> StateDict:
    """Fused `X.qkv.{weight,bias}` (legacy per-head order) -> `X.q.*`, `X.k.*`, `X.v.*`."""
    out: StateDict = {}
    for key, v in sd.items():
        stem, _, leaf = key.rpartition(".")
        if not stem.endswith(".qkv"):
            out[key] = v
            continue
        channels = v.shape[0] // 3
        if channels % head_channels:
            raise LayoutError(f"{key}: {channels} channels are not heads of {head_channels}")
        parts = v.reshape(channels // head_channels, 3, head_channels, *v.shape[1:])
        for i, name in enumerate("qkv"):
            out[f"{stem[:-3]}{name}.{leaf}"] = parts[:, i].reshape(channels, *v.shape[1:])
    return out


def _merge_qkv(sd: Mapping[str, torch.Tensor], head_channels: int) -> StateDict:
    """The inverse of `_split_qkv`; attention weights become 1-D convolutions (C, C, 1) again."""
    out: StateDict = {}
    for key, v in sd.items():
        stem, _, leaf = key.rpartition(".")
        part = stem.rpartition(".")[2]
        if part in ("k", "v"):
            continue
        if part == "q":
            base = stem[:-1]
            qkv = [sd[f"{base}{n}.{leaf}"] for n in "qkv"]
            channels = qkv[0].shape[0]
            if leaf == "weight":
                qkv = [t.reshape(channels, -1, 1) for t in qkv]
            heads = [t.reshape(channels // head_channels, head_channels, *t.shape[1:]) for t in qkv]
            out[f"{base}qkv.{leaf}"] = torch.stack(heads, 1).reshape(3 * channels, *qkv[0].shape[1:])
        elif part == "proj_out" and leaf == "weight" and v.ndim == 4:
            out[key] = v.reshape(v.shape[0], v.shape[1], 1)
        else:
            out[key] = v
    return out


def _ldsr_unet_config(sd: Mapping[str, Any]) -> dict[str, Any]:
    layout = UNetLayout.from_ldm(sd)
    blocks = [layout.first_block(i) for i in range(layout.levels)]
    attention = list(layout.attention)
    return {
        **shipped_config(LDSR, "unet"),
        "in_channels": _shape(sd, "input_blocks.0.0.weight")[1],
        "out_channels": _shape(sd, "out.2.weight")[0],
        "block_out_channels": [_shape(sd, f"input_blocks.{b}.0.out_layers.3.weight")[0] for b in blocks],
        "layers_per_block": layout.layers_per_block,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in attention[::-1]],
    }


def _vq_config(sd: Mapping[str, Any]) -> dict[str, Any]:
    kl = infer_vae_config(sd)
    n_embed, dim = _shape(sd, "quantize.embedding.weight")
    keep = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
            "down_block_types", "up_block_types")
    return {**shipped_config(LDSR, "vqvae"), **{k: kl[k] for k in keep}, "num_vq_embeddings": n_embed,
            "vq_embed_dim": dim}


def convert_ldsr(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[dict[str, Any], StateDict]]:
    """An LDSR checkpoint -> {"unet": (UNet2DModel config, weights), "vqvae": (VQModel config, weights)}.
    Keys outside the two prefixes (the DDPM schedule buffers) are ignored."""
    head = shipped_config(LDSR, "unet")["attention_head_dim"]
    unet = _split_qkv(_split(state_dict, UNET_PREFIX), head)
    unet_cfg = _ldsr_unet_config(unet)
    vq = _split(state_dict, VAE_PREFIX)
    if not vq:
        raise LayoutError(f"no autoencoder weights ({VAE_PREFIX}*) in this LDSR file")
    vq_cfg = _vq_config(vq)
    return {
        "unet": (unet_cfg, convert_unet(unet, unet_cfg, to_diffusers=True)),
        "vqvae": (vq_cfg, convert_vae(vq, vq_cfg, to_diffusers=True)),
    }


def ldsr_to_original(pipe: Any) -> StateDict:
    """An `LDMSuperResolutionPipeline` (or {"unet", "vqvae"}) in LDSR's original single-file layout."""
    comps = dict(getattr(pipe, "components", pipe))
    unet, vq = comps["unet"], comps["vqvae"]
    head = unet.config.attention_head_dim
    unet_sd = _merge_qkv(convert_unet(unet.state_dict(), unet.config, to_diffusers=False), head)
    vq_sd = convert_vae(vq.state_dict(), vq.config, to_diffusers=False)
    return {**{UNET_PREFIX + k: v for k, v in unet_sd.items()}, **{VAE_PREFIX + k: v for k, v in vq_sd.items()}}


# ----------------------------------------------------------------------------------------------------------
# SD x4 upscaler


def convert_x4(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[dict[str, Any], StateDict]]:
    """An SD x4 upscaler checkpoint -> {"unet", "vae", "text_encoder"}: (config, diffusers weights) each (the
    text encoder in transformers naming). Other keys (the noise-augmentation schedule buffers) are ignored."""
    unet = _split(state_dict, UNET_PREFIX)
    unet_cfg = {**shipped_config(X4, "unet"), **infer_unet_config(unet, "sd2")}
    unet_cfg["attention_head_dim"] = shipped_config(X4, "unet")["attention_head_dim"]  # num_heads: 8
    vae = _split(state_dict, VAE_PREFIX)
    text = _split(state_dict, _X4_TEXT_PREFIX)
    if not vae or not text:
        raise LayoutError(f"an SD x4 upscaler needs {VAE_PREFIX}* and {_X4_TEXT_PREFIX}* weights")
    vae_cfg = {**shipped_config(X4, "vae"), **infer_vae_config(vae)}
    text_sd = _convert_text_encoder(text, _X4_TEXT_STYLE, "sd2")
    text_cfg = {**shipped_config(X4, "text_encoder"), **infer_clip_config(text_sd)}
    return {
        "unet": (unet_cfg, convert_unet(unet, unet_cfg, to_diffusers=True)),
        "vae": (vae_cfg, convert_vae(vae, vae_cfg, to_diffusers=True)),
        "text_encoder": (text_cfg, text_sd),
    }


def x4_to_original(pipe: Any) -> StateDict:
    """A `StableDiffusionUpscalePipeline` in the x4 upscaler's original single-file layout."""
    out: StateDict = {}
    unet_sd = convert_unet(pipe.unet.state_dict(), pipe.unet.config, to_diffusers=False)
    out.update({UNET_PREFIX + k: v for k, v in unet_sd.items()})
    vae_sd = convert_vae(pipe.vae.state_dict(), pipe.vae.config, to_diffusers=False)
    out.update({VAE_PREFIX + k: v for k, v in vae_sd.items()})
    text = _canonical_to_open_clip(clip_to_canonical(pipe.text_encoder.state_dict()), add_identity_layer=True)
    out.update({_X4_TEXT_PREFIX + k: v for k, v in text.items()})
    return out


# ----------------------------------------------------------------------------------------------------------
# loading


def load_sr_file(path: Path, *, device: torch.device, dtype: torch.dtype, allow_pickle: bool, field: str) -> Any:
    """The diffusers pipeline of an LDSR or SD x4 upscaler single file, on `device` in `dtype` (safetensors;
    pickles only with `allow_pickle`). A file that is neither, or does not fit its layout, is a RequestError
    naming `field`."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        LDMSuperResolutionPipeline,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
        UNet2DModel,
        VQModel,
    )

    from ..generation_requests import RequestError
    from .loading import (
        ModelFileError,
        _build_diffusers,
        _build_text_encoder,
        load_shipped_tokenizer,
        load_state_dict,
    )

    path = Path(path)
    try:
        sd = load_state_dict(path, allow_pickle=allow_pickle)
    except ModelFileError as exc:
        raise RequestError(field, f"{path.name}: {exc.reason}") from None
    kind = sr_kind(sd)
    try:
        if kind == LDSR:
            parts = convert_ldsr(sd)
            del sd
            pipe = LDMSuperResolutionPipeline(
                vqvae=_build_diffusers(VQModel, *parts["vqvae"], dtype, "LDSR autoencoder", device),
                unet=_build_diffusers(UNet2DModel, *parts["unet"], dtype, "LDSR UNet", device),
                scheduler=DDIMScheduler.from_config(shipped_config(LDSR, "scheduler")),
            )
        elif kind == X4:
            parts = convert_x4(sd)
            del sd
            pipe = StableDiffusionUpscalePipeline(
                vae=_build_diffusers(AutoencoderKL, *parts["vae"], dtype, "x4 VAE", device),
                text_encoder=_build_text_encoder(*parts["text_encoder"], dtype, "x4 text encoder", device),
                tokenizer=load_shipped_tokenizer("clip_g"),
                unet=_build_diffusers(UNet2DConditionModel, *parts["unet"], dtype, "x4 UNet", device),
                low_res_scheduler=DDPMScheduler.from_config(shipped_config(X4, "low_res_scheduler")),
                scheduler=DDIMScheduler.from_config(shipped_config(X4, "scheduler")),
                max_noise_level=shipped_config(X4, "model_index")["max_noise_level"],
            )
        else:
            raise RequestError(field, f"{path.name}: neither an LDSR nor an SD x4 upscaler checkpoint")
    except LayoutError as exc:
        raise RequestError(field, f"{path.name}: {exc}") from None
    pipe.set_progress_bar_config(disable=True)
    log.info("loaded %s %s on %s", type(pipe).__name__, path.name, device)
    return pipe.to(device)
