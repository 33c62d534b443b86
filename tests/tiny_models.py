"""Tiny random-weight SD-family models for tests, built from the shipped family configs with small widths.

Each model is saved twice: as a diffusers folder (with tokenizers, scheduler config and model_index.json,
loadable by diffusers' own pipelines) and as one `.safetensors` file in the original CompVis/Stability key
layout (written by `ldm_core.models.save_single_file`). Fixed seeds make every build identical.

| name | variant | UNet | text encoders |
| --- | --- | --- | --- |
| sd1 | sd1 | 32/64 ch, 2 layers/level, attention on level 0 | CLIP-L style (quick_gelu) |
| sd1_inpaint | sd1-inpaint | as sd1, 9 input channels | as sd1 |
| sd2_v | sd2 (v-prediction) | 32/64 ch, linear projection, attention on both levels | OpenCLIP style (gelu) |
| sdxl | sdxl | 32/64 ch, attention (depth 2) on level 1 only, text_time embedding | CLIP-L + bigG style |
| sdxl_refiner | sdxl-refiner | 32/32/64/64 ch, attention (depth 2) on levels 1-2 + mid, 5 time ids | bigG only |

`sdxl_refiner` is not in `TINY_SPECS` (so `build_all` and the shared fixture stay as they are): build it with
`build_tiny_refiner`. Nor is `sd1_f4`, an SD1 model with a factor-4 VAE (3 levels) and a UNet sample_size of 16,
so its native size is 64 px from 16x16 latents (the built-in model v2's geometry): build it with `build_tiny_f4`
(a diffusers folder only).

Widths are multiples of 32 so the real `norm_num_groups=32` works; the VAE has 4 levels (8x downscale) like
the real one. Vocabularies keep the real 49,408 tokens so the shipped tokenizer works. Building all four
takes a few seconds on a CPU.

Run `python tests/tiny_models.py OUT_DIR` to write them outside pytest (e.g. for a benchmark).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ldm_core.models.configs import shipped_config
from ldm_core.models.loading import load_shipped_tokenizer
from ldm_core.models.single_file import heads_for_width, save_single_file, unet_attention_heads

#: name -> (config variant, UNet overrides, text-encoder overrides per encoder)
TINY_SPECS: dict[str, tuple[str, dict, list[dict]]] = {
    "sd1": (
        "sd1",
        dict(
            block_out_channels=[32, 64],
            layers_per_block=2,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            cross_attention_dim=32,
        ),
        [{}],
    ),
    "sd1_inpaint": (
        "sd1-inpaint",
        dict(
            block_out_channels=[32, 64],
            layers_per_block=2,
            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
            cross_attention_dim=32,
        ),
        [{}],
    ),
    "sd2_v": (
        "sd2",
        dict(
            block_out_channels=[32, 64],
            layers_per_block=1,
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            cross_attention_dim=32,
        ),
        [{}],
    ),
    "sdxl": (
        "sdxl",
        dict(
            block_out_channels=[32, 64],
            layers_per_block=1,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            transformer_layers_per_block=[1, 2],
            cross_attention_dim=64,
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
        ),
        [{}, {"projection_dim": 32}],
    ),
}
TEXT_WIDTH = 32
VAE_TINY = dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1)
SEED = 1234


def family_of(name: str) -> str:
    return name.split("_")[0]


def tiny_components(name: str, seed: int = SEED) -> dict:
    """In-memory components of a tiny model: unet, vae, text_encoder(_2), tokenizer(_2), scheduler_config."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    variant, unet_over, te_overs = TINY_SPECS[name]
    family = family_of(name)
    unet_cfg = {**shipped_config(variant, "unet"), **unet_over}
    unet_cfg["attention_head_dim"] = unet_attention_heads(family, unet_cfg["block_out_channels"])
    torch.manual_seed(seed)
    comps: dict = {"unet": UNet2DConditionModel.from_config(unet_cfg).eval()}
    torch.manual_seed(seed + 1)
    comps["vae"] = AutoencoderKL.from_config({**shipped_config(variant, "vae"), **VAE_TINY}).eval()
    tok_names = {"sd1": ["clip"], "sd2": ["clip_g"], "sdxl": ["clip", "clip_g"]}[family]
    for i, over in enumerate(te_overs):
        key = "text_encoder" if i == 0 else "text_encoder_2"
        cfg = {
            **shipped_config(variant, key),
            "hidden_size": TEXT_WIDTH,
            "intermediate_size": 2 * TEXT_WIDTH,
            "num_hidden_layers": 2,
            "num_attention_heads": heads_for_width(TEXT_WIDTH),
            **over,
        }
        cls = CLIPTextModelWithProjection if key == "text_encoder_2" else CLIPTextModel
        torch.manual_seed(seed + 2 + i)
        comps[key] = cls(CLIPTextConfig.from_dict({k: v for k, v in cfg.items() if k != "architectures"})).eval()
        comps["tokenizer" if i == 0 else "tokenizer_2"] = load_shipped_tokenizer(tok_names[i])
    comps["scheduler_config"] = shipped_config(variant, "scheduler")
    return comps


def save_diffusers_folder(comps: dict, variant: str, folder: Path) -> Path:
    """Write components as a standard diffusers folder (model_index.json, one subfolder per component)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(shipped_config(variant, "model_index"), indent=2))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(comps["scheduler_config"], indent=2))
    for key in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        if comps.get(key) is not None:
            comps[key].save_pretrained(folder / key)
    return folder


def build_tiny_model(name: str, out_dir: Path, seed: int = SEED) -> dict[str, Path]:
    """Build `name` and save it as `out_dir/name/` (diffusers) and `out_dir/name.safetensors` (original)."""
    comps = tiny_components(name, seed)
    variant = TINY_SPECS[name][0]
    folder = save_diffusers_folder(comps, variant, out_dir / name)
    single = save_single_file(comps, out_dir / f"{name}.safetensors")
    return {"diffusers": folder, "single_file": single}


#: The tiny SDXL refiner: UNet overrides of the shipped `sdxl-refiner` config (same level layout as the real
#: one: no attention on the first and last level) and its one text encoder's overrides.
REFINER_UNET = dict(
    block_out_channels=[32, 32, 64, 64],
    layers_per_block=2,
    transformer_layers_per_block=[1, 2, 2, 2],
    cross_attention_dim=TEXT_WIDTH,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=TEXT_WIDTH + 5 * 8,
)
REFINER_TEXT = {"projection_dim": TEXT_WIDTH}
REFINER_ADD_EMBEDDING_GAIN = 30.0  # scales the text_time embedding's input layer (see tiny_refiner_components)


def tiny_refiner_components(seed: int = SEED + 7) -> dict:
    """In-memory components of the tiny SDXL refiner: unet, vae, text_encoder_2, tokenizer_2 (no
    text_encoder/tokenizer, as in the real refiner's pipeline), scheduler_config."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    variant = "sdxl-refiner"
    unet_cfg = {**shipped_config(variant, "unet"), **REFINER_UNET}
    unet_cfg["attention_head_dim"] = unet_attention_heads("sdxl", unet_cfg["block_out_channels"])
    torch.manual_seed(seed)
    comps: dict = {"unet": UNet2DConditionModel.from_config(unet_cfg).eval()}
    with torch.no_grad():  # a random init barely reacts to the time ids; the trained refiner does
        comps["unet"].add_embedding.linear_1.weight.mul_(REFINER_ADD_EMBEDDING_GAIN)
    torch.manual_seed(seed + 1)
    comps["vae"] = AutoencoderKL.from_config({**shipped_config(variant, "vae"), **VAE_TINY}).eval()
    cfg = {
        **shipped_config(variant, "text_encoder_2"),
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": 2 * TEXT_WIDTH,
        "num_hidden_layers": 2,
        "num_attention_heads": heads_for_width(TEXT_WIDTH),
        **REFINER_TEXT,
    }
    torch.manual_seed(seed + 2)
    config = CLIPTextConfig.from_dict({k: v for k, v in cfg.items() if k != "architectures"})
    comps["text_encoder_2"] = CLIPTextModelWithProjection(config).eval()
    comps["tokenizer_2"] = load_shipped_tokenizer("clip_g")
    comps["scheduler_config"] = shipped_config(variant, "scheduler")
    return comps


def build_tiny_refiner(out_dir: Path, seed: int = SEED + 7, name: str = "sdxl_refiner") -> dict[str, Path]:
    """Build the tiny SDXL refiner as `out_dir/name/` (diffusers folder whose model_index.json has
    `text_encoder: [null, null]`, as the real one) and `out_dir/name.safetensors` (original layout: the
    bigG tower under `conditioner.embedders.0.model.`)."""
    comps = tiny_refiner_components(seed)
    folder = save_diffusers_folder(comps, "sdxl-refiner", out_dir / name)
    single = save_single_file(comps, out_dir / f"{name}.safetensors")
    return {"diffusers": folder, "single_file": single}


#: The factor-4 SD1 model: VAE overrides (3 levels = 2 downsamplings = 4 pixels per latent) and the UNet's
#: sample_size (latent side at the native size: 16 x 4 = 64 px).
F4_VAE = dict(
    block_out_channels=[32, 32, 32],
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    layers_per_block=1,
)
F4_SAMPLE_SIZE = 16


def build_tiny_f4(out_dir: Path, seed: int = SEED, name: str = "sd1_f4") -> Path:
    """Build the tiny factor-4 SD1 model (see the module docstring) as the diffusers folder `out_dir/name/`."""
    from diffusers import AutoencoderKL

    comps = tiny_components("sd1", seed)
    comps["unet"].register_to_config(sample_size=F4_SAMPLE_SIZE)
    torch.manual_seed(seed + 1)
    comps["vae"] = AutoencoderKL.from_config({**shipped_config("sd1", "vae"), **F4_VAE}).eval()
    return save_diffusers_folder(comps, "sd1", out_dir / name)


def build_tiny_vae(path: Path, seed: int = SEED + 100) -> Path:
    """A tiny SD1-shaped VAE as a standalone file in the original layout (no `first_stage_model.` prefix),
    seeded differently from the checkpoints' own VAEs."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from ldm_core.models.single_file import convert_vae

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config({**shipped_config("sd1", "vae"), **VAE_TINY})
    sd = convert_vae(vae.state_dict(), vae.config, to_diffusers=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def build_all(out_dir: Path, seed: int = SEED) -> dict[str, dict[str, Path]]:
    """Every tiny model, name -> {"diffusers": folder, "single_file": file}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return {name: build_tiny_model(name, out_dir, seed) for name in TINY_SPECS}


if __name__ == "__main__":
    for name, paths in build_all(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny_models")).items():
        print(name, paths["diffusers"], paths["single_file"])


def tiny_loaded_model(name: str):
    """A LoadedModel-like object (the fields PromptEncoder and LoRA code read) from `tiny_components(name)`."""
    from types import SimpleNamespace

    c = tiny_components(name)
    keys = ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    return SimpleNamespace(kind=SimpleNamespace(family=family_of(name)), **{k: c.get(k) for k in keys})


def tiny_train_options(tmp_path, name: str, **kw):
    """Options of a reduced built-in training run (tiny preset, a few steps) under tmp_path/name."""
    from ldm_core.train.builtin import TrainOptions

    base = dict(
        out=tmp_path / name / "out",
        work_dir=tmp_path / name / "work",
        preset="tiny",
        device="cpu",
        vae_steps=2,
        unet_steps=3,
        vae_batch=4,
        unet_batch=4,
        warmup_steps=2,
        progress_bar=False,
        latent_samples=16,
        num_workers=0,
        command="pytest",
    )
    base.update(kw)
    return TrainOptions(**base)


def tiny_motion_adapter(name: str, seed: int = SEED + 50):
    """A random-weight AnimateDiff motion module that fits the tiny `name` model's UNet ("sd1", "sdxl", ...):
    one temporal layer per (resnet, attention) pair, a mid-block layer for SD1-style UNets (as v2/v3 modules
    have) and none for SDXL (as the SDXL beta module). Weights are drawn large enough to move the output."""
    from diffusers import MotionAdapter

    unet_cfg = TINY_SPECS[name][1]
    torch.manual_seed(seed)
    adapter = MotionAdapter(
        block_out_channels=tuple(unet_cfg["block_out_channels"]),
        motion_layers_per_block=unet_cfg["layers_per_block"],
        motion_num_attention_heads=8,
        motion_norm_num_groups=32,
        motion_max_seq_length=32,
        use_motion_mid_block=family_of(name) != "sdxl",
    )
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0.0, 0.05)
    return adapter.eval()


def save_motion_module(adapter, path: Path, layout: str) -> Path:
    """Write `adapter` as a diffusers folder (`layout="diffusers"`) or as one `.safetensors`/`.ckpt` file in
    the original AnimateDiff key layout (`"original"`; a `.ckpt` path writes a pickle)."""
    from safetensors.torch import save_file

    from ldm_core.video.motion_modules import diffusers_to_original

    if layout == "diffusers":
        adapter.save_pretrained(path)
        return path
    state = diffusers_to_original(adapter.state_dict(), adapter.config.motion_max_seq_length)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".ckpt":
        torch.save({k: v.contiguous() for k, v in state.items()}, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def build_tiny_svd(folder: Path, seed: int = SEED + 70) -> Path:
    """A tiny random Stable Video Diffusion model as a diffusers `StableVideoDiffusionPipeline` folder (3-D UNet,
    temporal-decoder VAE, CLIP vision encoder, image processor, Euler scheduler: SVD's layout)."""
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32,
        num_attention_heads=8,
        projection_class_embeddings_input_dim=96,
        addition_time_embed_dim=32,
    )
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        latent_channels=4,
    )
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=224,
            intermediate_size=37,
            patch_size=32,
        )  # the pipeline feeds 224 px
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_x4_pipeline(seed: int = SEED + 90):
    """A tiny random SD x4 upscaler (StableDiffusionUpscalePipeline: 7-channel UNet with a noise-level class
    embedding and cross-attention-only attention like the real one's levels 1-2, factor-4 VAE, a GELU CLIP text
    encoder as OpenCLIP's, the shipped OpenCLIP tokenizer, the x4's schedulers)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=7,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=96,
        only_cross_attention=[True, True],  # the real model's levels 1-2: attn1 reads the text too
        attention_head_dim=8,
        use_linear_projection=True,
        norm_num_groups=32,
        num_class_embeds=1000,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=32,
        scaling_factor=0.08333,
    )
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
    ))
    return StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=load_shipped_tokenizer("clip_g"),
        unet=unet,
        low_res_scheduler=DDPMScheduler.from_config(shipped_config("sd-x4-upscaler", "low_res_scheduler")),
        scheduler=DDIMScheduler.from_config(shipped_config("sd-x4-upscaler", "scheduler")),
        max_noise_level=350,
    )


def tiny_ldsr_pipeline(seed: int = SEED + 80):
    """A tiny random CompVis LDSR as diffusers holds it (LDMSuperResolutionPipeline: UNet2DModel with LDSR's
    32-channel attention heads, 2 of them at 64 channels; a VQ-f4 autoencoder; the shipped DDIM config)."""
    from diffusers import DDIMScheduler, LDMSuperResolutionPipeline, UNet2DModel, VQModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=16,
        in_channels=6,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=32,  # LDSR's head width: 2 heads at 64 channels
        norm_num_groups=32,
    )
    vq = VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        latent_channels=3,
        num_vq_embeddings=64,
        vq_embed_dim=3,
        norm_num_groups=32,
        scaling_factor=1.0,
    )
    for p in unet.parameters():  # diffusers zero-inits nothing here, but make the output conv matter
        p.data.add_(torch.randn_like(p) * 0.02)
    sched = DDIMScheduler.from_config(shipped_config("ldsr", "scheduler"))
    return LDMSuperResolutionPipeline(vqvae=vq, unet=unet, scheduler=sched)




def save_tiny_ldsr(path: Path) -> Path:
    """`tiny_ldsr_pipeline()` written as an LDSR single file in CompVis' key layout (with the DDPM schedule
    buffers the CompVis files carry, which loading ignores)."""
    from safetensors.torch import save_file

    from ldm_core.models.sr_files import ldsr_to_original

    sd = ldsr_to_original(tiny_ldsr_pipeline())
    sd["betas"] = torch.linspace(0.0015, 0.0155, 1000)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, str(path))
    return path
