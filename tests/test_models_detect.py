"""Checkpoint detection from keys and shapes, sidecar overrides, and the shipped real-size configs."""

from __future__ import annotations

import json

import pytest
import torch

from ldm_core.models import (
    CheckpointKind,
    ModelFileError,
    UnsupportedCheckpointError,
    detect_checkpoint,
    detect_diffusers,
    inspect_model,
    load_state_dict,
    read_sidecar,
    read_tensor_shapes,
)
from ldm_core.models.configs import VARIANTS, shipped_config
from ldm_core.models.sidecar import SidecarError
from ldm_core.models.single_file import convert_checkpoint, to_original_state_dict

EXPECTED = {
    "sd1": CheckpointKind("sd1", False, "epsilon"),
    "sd1_inpaint": CheckpointKind("sd1", True, "epsilon"),
    "sd2_v": CheckpointKind("sd2", False, "v_prediction"),
    "sdxl": CheckpointKind("sdxl", False, "epsilon"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_detects_single_files_from_header_and_from_tensors(tiny_models, name):
    path = tiny_models[name]["single_file"]
    assert detect_checkpoint(read_tensor_shapes(path)) == EXPECTED[name]
    assert detect_checkpoint(load_state_dict(path)) == EXPECTED[name]
    assert inspect_model(path) == EXPECTED[name]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_detects_diffusers_folders(tiny_models, name):
    assert inspect_model(tiny_models[name]["diffusers"]) == EXPECTED[name]


def test_detection_ignores_file_names(tiny_models, tmp_path):
    misleading = tmp_path / "sdxl-inpainting-v-pred.safetensors"
    misleading.write_bytes(tiny_models["sd1"]["single_file"].read_bytes())
    assert inspect_model(misleading) == EXPECTED["sd1"]


def test_config_variants():
    assert CheckpointKind("sd1").config_variant == "sd1"
    assert CheckpointKind("sd1", inpaint=True).config_variant == "sd1-inpaint"
    assert CheckpointKind("sd2", prediction_type="v_prediction").config_variant == "sd2"
    assert CheckpointKind("sd2", prediction_type="epsilon").config_variant == "sd2-base"
    assert CheckpointKind("sdxl", inpaint=True).config_variant == "sdxl-inpaint"
    assert CheckpointKind("sdxl", inpaint=True).pipeline_class_name == "StableDiffusionXLInpaintPipeline"


def test_markers_and_in_channels(tiny_models):
    shapes = read_tensor_shapes(tiny_models["sdxl"]["single_file"])
    kind = detect_checkpoint({**shapes, "v_pred": (0,), "ztsnr": (0,)})
    assert kind.prediction_type == "v_prediction" and kind.zero_terminal_snr
    shapes = dict(read_tensor_shapes(tiny_models["sd1"]["single_file"]))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    shapes[key] = (shapes[key][0], 8, 3, 3)
    with pytest.raises(UnsupportedCheckpointError, match="8 input channels"):
        detect_checkpoint(shapes)


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32)}, "LoRA"),
        ({"unet.down_blocks.0.attentions.0.to_q.lora_A.weight": (4, 32)}, "LoRA"),
        ({"encoder.conv_in.weight": (32, 3, 3, 3), "decoder.conv_in.weight": (32, 4, 3, 3)}, "VAE"),
        ({"control_model.time_embed.0.weight": (1280, 320)}, "ControlNet"),
        ({"emb_params": (2, 768)}, "embedding"),
        (
            {"conv_in.weight": (320, 4, 3, 3), "down_blocks.0.resnets.0.norm1.weight": (320,)},
            "diffusers-layout",
        ),
        ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, "Flux"),
        ({"foo": (1,)}, "no UNet weights"),
    ],
)
def test_non_checkpoints_are_named(keys, expected):
    with pytest.raises(UnsupportedCheckpointError, match=expected):
        detect_checkpoint(keys)


def test_sdxl_refiner_is_its_own_family(tiny_models):
    """bigG alone, stored as the first embedder, is the SDXL refiner's layout (tests/test_sdxl_refiner.py)."""
    shapes = read_tensor_shapes(tiny_models["sdxl"]["single_file"])
    refiner = {
        k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v
        for k, v in shapes.items()
        if not k.startswith("conditioner.embedders.0.")
    }
    assert detect_checkpoint(refiner).family == "sdxl-refiner"


def test_unet_only_files_fall_back_to_structure(tiny_models):
    for name in ("sd1", "sd2_v", "sdxl"):
        shapes = read_tensor_shapes(tiny_models[name]["single_file"])
        unet_only = {k: v for k, v in shapes.items() if k.startswith("model.diffusion_model.")}
        assert detect_checkpoint(unet_only).family == name.split("_")[0]


def test_detect_diffusers_rules():
    assert detect_diffusers({"cross_attention_dim": 768}).family == "sd1"
    assert detect_diffusers({"cross_attention_dim": 1024}, {"prediction_type": "v_prediction"}) == CheckpointKind(
        "sd2", False, "v_prediction"
    )
    assert detect_diffusers({"cross_attention_dim": 2048, "in_channels": 9}) == CheckpointKind("sdxl", True)
    assert detect_diffusers({"cross_attention_dim": 48, "use_linear_projection": True}).family == "sd2"
    assert detect_diffusers({"cross_attention_dim": 48}, {"rescale_betas_zero_snr": True}).zero_terminal_snr
    with pytest.raises(UnsupportedCheckpointError):
        detect_diffusers({"cross_attention_dim": 768}, {"prediction_type": "sample"})


# ---- sidecars -------------------------------------------------------------------------------------------


def _copy(src, dst):
    dst.write_bytes(src.read_bytes())
    return dst


def test_json_sidecar_overrides_prediction_type(tiny_models, tmp_path):
    path = _copy(tiny_models["sd2_v"]["single_file"], tmp_path / "sd2-base.safetensors")
    assert inspect_model(path).prediction_type == "v_prediction"
    (tmp_path / "sd2-base.json").write_text(json.dumps({"prediction_type": "epsilon", "description": "x"}))
    kind = inspect_model(path)
    assert kind == CheckpointKind("sd2", False, "epsilon") and kind.config_variant == "sd2-base"


def test_ldm_yaml_sidecar(tiny_models, tmp_path):
    path = _copy(tiny_models["sd1"]["single_file"], tmp_path / "m.safetensors")
    (tmp_path / "m.yaml").write_text(
        "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n"
        '    parameterization: "v"\n    unet_config:\n      params: {context_dim: 768}\n'
    )
    assert inspect_model(path).prediction_type == "v_prediction"
    (tmp_path / "m.yaml").write_text(
        "model:\n  target: sgm.models.diffusion.DiffusionEngine\n  params:\n"
        "    denoiser_config:\n      params:\n        scaling_config:\n"
        "          target: sgm.modules.diffusionmodules.denoiser_scaling.VScaling\n"
    )
    assert read_sidecar(path).prediction_type == "v_prediction"


def test_family_sidecar_and_json_beats_yaml(tmp_path):
    path = tmp_path / "x.safetensors"
    (tmp_path / "x.yaml").write_text("prediction_type: v\n")
    (tmp_path / "x.json").write_text('{"prediction_type": "eps", "family": "SDXL"}')
    side = read_sidecar(path)
    assert (side.family, side.prediction_type) == ("sdxl", "epsilon")
    assert len(side.sources) == 2


def test_bad_sidecars(tiny_models, tmp_path):
    path = _copy(tiny_models["sd1"]["single_file"], tmp_path / "m.safetensors")
    (tmp_path / "m.json").write_text("{not json")
    assert inspect_model(path) == EXPECTED["sd1"]  # unreadable: logged and ignored
    (tmp_path / "m.json").write_text('{"prediction_type": "flow"}')
    with pytest.raises(SidecarError, match="m.json"):
        read_sidecar(path)
    with pytest.raises(ModelFileError, match="prediction_type"):
        inspect_model(path)


# ---- shipped configs at real size -----------------------------------------------------------------------


def _meta_components(variant):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        comps = {
            "unet": UNet2DConditionModel.from_config(shipped_config(variant, "unet")),
            "vae": AutoencoderKL.from_config(shipped_config(variant, "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(shipped_config(variant, "text_encoder"))),
            "scheduler_config": shipped_config(variant, "scheduler"),
        }
        if variant.startswith("sdxl"):
            cfg = CLIPTextConfig.from_dict(shipped_config(variant, "text_encoder_2"))
            comps["text_encoder_2"] = CLIPTextModelWithProjection(cfg)
    return comps


@pytest.mark.parametrize("variant", ["sd1", "sd2", "sdxl"])
def test_real_size_layout_matches_public_checkpoints(variant):
    """Random-weight real-size models (on the meta device: no memory) exported to the original layout are
    recognised by diffusers' own single-file type detection, and reading their shapes back gives the
    shipped configs."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    with torch.device("meta"):
        sd = to_original_state_dict(_meta_components(variant))
    assert infer_diffusers_model_type(sd) == {"sd1": "v1", "sd2": "v2", "sdxl": "xl_base"}[variant]
    known = {
        "sd1": [
            ("model.diffusion_model.output_blocks.11.0.skip_connection.weight", (320, 640, 1, 1)),
            ("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight", (77, 768)),
            ("first_stage_model.encoder.mid.attn_1.q.weight", (512, 512, 1, 1)),
        ],
        "sd2": [
            ("model.diffusion_model.input_blocks.1.1.proj_in.weight", (320, 320)),
            ("cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight", (3072, 1024)),
            ("cond_stage_model.model.text_projection", (1024, 1024)),
        ],
        "sdxl": [
            ("model.diffusion_model.label_emb.0.0.weight", (1280, 2816)),
            ("conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_proj.bias", (1280,)),
            ("conditioner.embedders.1.model.text_projection", (1280, 1280)),
            ("model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight", (1280, 2048)),
        ],
    }[variant]
    for key, shape in known:
        assert tuple(sd[key].shape) == shape, key
    kind = detect_checkpoint(sd)
    assert kind.config_variant == variant
    conv = convert_checkpoint(sd, kind)
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if comp not in conv.configs:
            continue
        ship = shipped_config(variant, comp)
        for key, value in conv.configs[comp].items():
            assert json.loads(json.dumps(value)) == ship.get(key, value), (comp, key)


def test_variant_configs_differ_only_where_they_should():
    for family in ("sd1", "sd2", "sdxl"):
        base, inp = shipped_config(family, "unet"), shipped_config(f"{family}-inpaint", "unet")
        assert inp["in_channels"] == 9 and base["in_channels"] == 4
        assert {k for k in base if base[k] != inp.get(k)} <= {
            "in_channels",
            "sample_size",
            "upcast_attention",
        }
    assert shipped_config("sd1", "unet")["attention_head_dim"] == 8
    assert shipped_config("sd1", "unet")["block_out_channels"] == [320, 640, 1280, 1280]
    assert shipped_config("sd2", "unet")["attention_head_dim"] == [5, 10, 20, 20]
    assert shipped_config("sd2", "unet")["cross_attention_dim"] == 1024
    assert shipped_config("sd2", "scheduler")["prediction_type"] == "v_prediction"
    assert shipped_config("sd2-base", "scheduler")["prediction_type"] == "epsilon"
    assert shipped_config("sdxl", "vae")["scaling_factor"] == 0.13025
    refiner = shipped_config("sdxl-refiner", "unet")  # the real refiner's: 4 levels, bigG-wide context
    assert (refiner["block_out_channels"], refiner["cross_attention_dim"]) == ([384, 768, 1536, 1536], 1280)
    assert shipped_config("sdxl-refiner", "model_index")["requires_aesthetics_score"] is True
    assert set(VARIANTS) == {
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
    }
    assert shipped_config("ldsr", "unet")["attention_head_dim"] == 32  # CompVis bsr_sr: num_head_channels 32
    assert shipped_config("sd-x4-upscaler", "unet")["attention_head_dim"] == 8  # x4-upscaling.yaml: num_heads 8
    assert shipped_config("sd-x4-upscaler", "low_res_scheduler")["beta_end"] == 0.02
