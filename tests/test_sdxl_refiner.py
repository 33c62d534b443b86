"""The SDXL refiner (stabilityai/stable-diffusion-xl-refiner-1.0) as a model family: detected by keys and
shapes in both layouts, loaded offline (single file: OpenCLIP bigG under `conditioner.embedders.0.model.`;
diffusers folder: `text_encoder: [null, null]`, only `text_encoder_2/`), conditioned as diffusers'
StableDiffusionXLImg2ImgPipeline with `requires_aesthetics_score` (bigG alone; time ids = original size, crop,
aesthetic score: A1111's `sdxl_refiner_high_aesthetic_score` for the prompt, `..._low_...` for the negative),
used as `refiner_checkpoint` after an SDXL base and alone (txt2img, img2img), as in A1111.

Tiny random refiner: `tests/tiny_models.build_tiny_refiner`; the real-size key layout is checked on the meta
device from the shipped configs (no weights).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_engine import make_engine
from tiny_models import build_tiny_refiner

from ldm_core.generation_requests import GenerationRequest, Img2ImgRequest
from ldm_core.infotext import parse_infotext
from ldm_core.models.configs import shipped_config
from ldm_core.models.detect import (
    UNET_PREFIX,
    CheckpointKind,
    UnsupportedCheckpointError,
    detect_checkpoint,
    detect_diffusers,
)
from ldm_core.models.loading import inspect_model, load_model, read_tensor_shapes
from ldm_core.models.single_file import convert_checkpoint, to_original_state_dict
from ldm_core.options import OPTIONS_BY_KEY, effective_applies
from ldm_core.prompts.encode import PromptEncoder
from ldm_core.prompts.time_ids import sdxl_added_cond, sdxl_time_ids

SIZE = 64
REFINER = "sdxl-refiner"


@pytest.fixture(scope="module")
def refiner(tmp_path_factory) -> dict[str, Path]:
    return build_tiny_refiner(tmp_path_factory.mktemp("refiner"))


# ---- detection and loading ---------------------------------------------------------------------------------
def test_detected_by_keys_and_shapes_in_both_layouts(refiner, tiny_models):
    shapes = read_tensor_shapes(refiner["single_file"])
    assert "conditioner.embedders.0.model.text_projection" in shapes
    assert not any(k.startswith(("conditioner.embedders.1.", "conditioner.embedders.0.transformer.")) for k in shapes)
    kind = detect_checkpoint(shapes)
    assert kind == CheckpointKind(REFINER) and kind.config_variant == REFINER
    assert kind.pipeline_class_name == "StableDiffusionXLImg2ImgPipeline"
    for path in refiner.values():
        assert inspect_model(path) == kind
    # the base is still the base; a refiner UNet without its text encoder is known by its 1280-wide context
    assert detect_checkpoint(read_tensor_shapes(tiny_models["sdxl"]["single_file"])).family == "sdxl"
    unet_only = {UNET_PREFIX + "input_blocks.0.0.weight": (384, 4, 3, 3)}
    to_k = UNET_PREFIX + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    assert detect_checkpoint({**unet_only, to_k: (768, 1280)}).family == REFINER
    assert (
        detect_checkpoint({**unet_only, to_k: (640, 2048), UNET_PREFIX + "label_emb.0.0.weight": (1, 2816)}).family
        == "sdxl"
    )
    with pytest.raises(UnsupportedCheckpointError, match="refiner"):
        detect_checkpoint({**shapes, UNET_PREFIX + "input_blocks.0.0.weight": (32, 9, 3, 3)})
    # diffusers folders: the real refiner's shipped configs, and the model_index flag for small widths
    assert detect_diffusers(shipped_config(REFINER, "unet")).family == REFINER
    assert detect_diffusers(shipped_config("sdxl", "unet")).family == "sdxl"
    tiny_unet = read_json(refiner["diffusers"] / "unet" / "config.json")
    assert detect_diffusers(tiny_unet).family == "sdxl"  # 32-wide: the structure alone cannot tell
    assert detect_diffusers(tiny_unet, model_index=shipped_config(REFINER, "model_index")).family == REFINER


def read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def test_real_size_refiner_layout_on_meta():
    """The shipped configs at full size (2.26B-parameter UNet, 32-block bigG) export to the key layout of
    Stability's sd_xl_refiner_1.0.safetensors, which diffusers' own detector calls "xl_refiner", and convert
    back to the same configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    te_cfg = {k: v for k, v in shipped_config(REFINER, "text_encoder_2").items() if k != "architectures"}
    with torch.device("meta"):
        comps = {
            "unet": UNet2DConditionModel.from_config(shipped_config(REFINER, "unet")),
            "vae": AutoencoderKL.from_config(shipped_config(REFINER, "vae")),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_dict(te_cfg)),
        }
    sd = to_original_state_dict(comps)
    assert infer_diffusers_model_type(sd) == "xl_refiner"
    assert "conditioner.embedders.0.model.transformer.resblocks.31.attn.in_proj_weight" in sd
    assert tuple(sd[UNET_PREFIX + "label_emb.0.0.weight"].shape) == (1536, 2560)
    kind = detect_checkpoint(sd)
    assert kind.family == REFINER
    conv = convert_checkpoint(sd, kind)
    real = shipped_config(REFINER, "unet")
    unet = conv.configs["unet"]
    for key in (
        "block_out_channels",
        "down_block_types",
        "up_block_types",
        "cross_attention_dim",
        "attention_head_dim",
    ):
        assert unet[key] == real[key], key
    assert (unet["addition_time_embed_dim"], unet["projection_class_embeddings_input_dim"]) == (256, 2560)
    assert unet["transformer_layers_per_block"] == [1, 4, 4, 4]  # = 4 (the first level has no attention)
    assert conv.configs["text_encoder_2"]["num_hidden_layers"] == 32 and "text_encoder" not in conv.configs
    assert set(conv.state_dicts["unet"]) == set(comps["unet"].state_dict())


def test_single_file_equals_the_diffusers_folder(refiner):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    a, b = load_model(refiner["single_file"]), load_model(refiner["diffusers"])
    for m in (a, b):
        assert m.kind.family == REFINER and m.text_encoder is None and m.tokenizer is None
        assert m.tokenizer_2.pad_token == "!" and m.force_zeros_for_empty_prompt is False
    for comp in ("unet", "vae", "text_encoder_2"):
        sa, sb = getattr(a, comp).state_dict(), getattr(b, comp).state_dict()
        assert set(sa) == set(sb)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), comp
    # the folder is the real refiner's layout: diffusers' own img2img pipeline loads it offline
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner["diffusers"], local_files_only=True)
    assert pipe.text_encoder is None and pipe.config.requires_aesthetics_score is True


def test_conditioning_matches_diffusers_refiner_pipeline(refiner):
    """bigG alone (penultimate hidden states, pooled projection) and 5 time ids with the aesthetic scores, as
    StableDiffusionXLImg2ImgPipeline.encode_prompt / _get_add_time_ids compute them for the refiner."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner["diffusers"], local_files_only=True)
    model = load_model(refiner["single_file"])
    enc = PromptEncoder(model)
    pos, neg = enc.encode("a red circle"), enc.encode("blue sky", negative=True)
    p, n, pp, npool = pipe.encode_prompt(
        "a red circle", device="cpu", do_classifier_free_guidance=True, negative_prompt="blue sky"
    )
    assert pos.embeds.shape == p.shape == (1, 77, 32)
    assert torch.allclose(pos.embeds, p, atol=1e-5) and torch.allclose(pos.pooled, pp, atol=1e-5)
    assert torch.allclose(neg.embeds, n, atol=1e-5) and torch.allclose(neg.pooled, npool, atol=1e-5)
    # an empty negative prompt: zeros, as A1111 conditions every SDXL-architecture model (diffusers with
    # force_zeros_for_empty_prompt, which the refiner's own config leaves off, zeroes a missing one)
    empty = enc.encode("", negative=True)
    assert not empty.embeds.any() and not empty.pooled.any() and enc.encode("").embeds.any()
    pipe.register_to_config(force_zeros_for_empty_prompt=True)
    _, zn, _, zpool = pipe.encode_prompt("a red circle", device="cpu", do_classifier_free_guidance=True)
    assert torch.equal(empty.embeds, zn) and torch.equal(empty.pooled, zpool)

    size, crop = (96, 64), (8, 16)  # (height, width), (top, left)
    theirs, theirs_neg = pipe._get_add_time_ids(
        size, crop, size, 7.0, 1.5, size, crop, size, torch.float32, text_encoder_projection_dim=32
    )
    added = sdxl_added_cond(
        REFINER, 64, 96, crop_top=8, crop_left=16, high_aesthetic_score=7.0, low_aesthetic_score=1.5
    )(True, [neg.pooled, pos.pooled])
    assert torch.equal(added["time_ids"], torch.cat([theirs_neg, theirs]))
    assert torch.equal(added["text_embeds"], torch.cat([neg.pooled, pos.pooled]))
    # no unconditional group (CFG 1 or a skipped uncond pass): every row is the prompt's
    only_cond = sdxl_added_cond(REFINER, 64, 96, crop_top=8, crop_left=16, high_aesthetic_score=7.0)(False, [pp])
    assert torch.equal(only_cond["time_ids"], theirs)
    # the base keeps its 6 values (target size), whatever the aesthetic scores
    assert sdxl_time_ids("sdxl", 64, 96, crop_top=8, crop_left=16, aesthetic_score=1.0) == [96, 64, 8, 16, 96, 64]
    # A1111's defaults, and the UNet takes what diffusers gives it
    assert sdxl_time_ids(REFINER, 1024, 1024) == [1024, 1024, 0, 0, 6.0]
    with torch.no_grad():
        out = model.unet(
            torch.zeros(2, 4, 8, 8),
            10,
            encoder_hidden_states=torch.cat([n, p]),
            added_cond_kwargs=added,
        ).sample
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


# ---- the engine --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_models, refiner):
    return make_engine(
        tmp_path_factory.mktemp("refiner_engine"),
        {
            "xl": tiny_models["sdxl"]["single_file"],
            "refiner": refiner["single_file"],
            "refiner-dir": refiner["diffusers"],
        },
    )


def req(cls=GenerationRequest, **kw):
    base = dict(prompt="a red circle", negative_prompt="blue", steps=6, width=SIZE, height=SIZE, seed=7)
    base.update(save_images=False, sampler_name="Euler", model="xl")
    base.update(kw)
    return cls.build(**base)


def image(result) -> np.ndarray:
    return np.asarray(result.images[0]).astype(np.float64)


def mean_diff(a, b) -> float:
    return float(np.abs(image(a) - image(b)).mean())


def test_sdxl_base_with_the_refiner_switches_and_says_so(engine):
    base = engine.generate(req())
    refined = engine.generate(req(refiner_checkpoint="refiner", refiner_switch_at=0.2))
    assert mean_diff(refined, base) > 5.0
    p = parse_infotext(refined.infotexts[0])
    entry = engine.models.find_checkpoint("refiner")
    assert (p["Model"], p["Refiner"], p["Refiner switch at"]) == ("xl", f"refiner [{entry.short_hash}]", "0.2")
    assert refined.manifests[0]["refiner"]["used"] is True
    assert engine.current_model.entry.name == "xl"
    # the refiner's aesthetic scores act: the prompt's (high) and the negative prompt's (low)
    high = engine.generate(
        req(refiner_checkpoint="refiner", refiner_switch_at=0.2, sdxl_refiner_high_aesthetic_score=1)
    )
    low = engine.generate(req(refiner_checkpoint="refiner", refiner_switch_at=0.2, sdxl_refiner_low_aesthetic_score=8))
    assert mean_diff(high, refined) > 0.1 and mean_diff(low, refined) > 0.1
    # ... and only on the refiner: the base alone ignores them
    assert mean_diff(engine.generate(req(sdxl_refiner_high_aesthetic_score=1)), base) == 0.0
    # the diffusers folder of the same weights gives the same image
    from_dir = engine.generate(req(refiner_checkpoint="refiner-dir", refiner_switch_at=0.2))
    assert mean_diff(from_dir, refined) == 0.0


def test_the_refiner_alone_txt2img_and_img2img(engine):
    t2i = engine.generate(req(model="refiner"))
    assert parse_infotext(t2i.infotexts[0])["Model"] == "refiner" and image(t2i).std() > 1.0
    other = engine.generate(req(model="refiner", sdxl_refiner_high_aesthetic_score=1.0))
    assert mean_diff(other, t2i) > 1.0
    init = Image.new("RGB", (SIZE, SIZE), (40, 40, 200))
    i2i = engine.generate(req(Img2ImgRequest, model="refiner", init_images=[init], denoising_strength=0.5))
    p = parse_infotext(i2i.infotexts[0])
    assert (p["Model"], p["Denoising strength"]) == ("refiner", "0.5")
    assert float(np.abs(image(i2i) - np.asarray(init)).mean()) > 1.0
    assert engine.current_model.kind.family == REFINER


def test_aesthetic_scores_are_live_options():
    """A1111's options fill the request fields (POST /sdapi/v1/options, override_settings, Settings tab)."""
    for key, default in (("sdxl_refiner_high_aesthetic_score", 6.0), ("sdxl_refiner_low_aesthetic_score", 2.5)):
        option = OPTIONS_BY_KEY[key]
        assert effective_applies(option) == "live" and option.default == default
        assert GenerationRequest.model_fields[key].default == default
