"""Same pixels as A1111 / diffusers on the same weights, on tiny models in the real key layouts.

- SDXL with an empty negative prompt is conditioned on zeros (hidden states and pooled embedding), as A1111
  does for SDXL and diffusers does with `force_zeros_for_empty_prompt` (the shipped SDXL config's flag): the
  engine's image equals diffusers' StableDiffusionXLPipeline with zeroed negative conditioning, and differs
  from encoding "".
- An SD 2.x single file keeps as many text-encoder blocks as the model runs: a complete OpenCLIP tower
  (N blocks + `text_projection`, as Stability ships it) runs N-1, a tower written by diffusers' conversion
  script (only the N-1 blocks in use, no projection) runs all of them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_core.config import EngineConfig
from ldm_core.engine import Engine
from ldm_core.generation_requests import GenerationRequest
from ldm_core.models.loading import load_model
from ldm_core.models.single_file import sd2_used_blocks
from ldm_core.prompts.encode import PromptEncoder

SIZE = 64
STEPS = 4
CFG = 5.0
SEED = 21
PROMPT = "a red circle"


def _engine(tmp: Path, src: Path) -> Engine:
    ckpt = tmp / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, ckpt / src.name)
    return Engine(EngineConfig.from_data_dir(tmp, builtin_model_dir=None))


def _arr(im) -> np.ndarray:
    return np.asarray(im).astype(np.int16)


# ---- SDXL: empty negative prompt -> zeros ------------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory, tiny_models):
    """The engine (tiny SDXL single file) and diffusers' SDXL pipeline on the same weights and sampler."""
    from diffusers import StableDiffusionXLPipeline

    engine = _engine(tmp_path_factory.mktemp("sdxl"), tiny_models["sdxl"]["single_file"])
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models["sdxl"]["diffusers"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return engine, pipe


def _ours(engine: Engine, negative: str):
    req = GenerationRequest.build(
        prompt=PROMPT,
        negative_prompt=negative,
        steps=STEPS,
        cfg_scale=CFG,
        width=SIZE,
        height=SIZE,
        seed=SEED,
        sampler_name="Euler",
        save_images=False,
    )
    return engine.generate(req).images[0]


def _theirs(engine: Engine, pipe, negative: str | None):
    pipe.scheduler = engine.samplers.create("Euler", "Automatic", dict(engine.current_model.scheduler_config))
    return pipe(
        PROMPT,
        negative_prompt=negative,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        width=SIZE,
        height=SIZE,
        generator=torch.Generator("cpu").manual_seed(SEED),
    ).images[0]


def test_sdxl_conditioning_matches_diffusers_encode_prompt(sdxl_run):
    engine, pipe = sdxl_run
    _ours(engine, "")  # loads the model
    model = engine.current_model
    assert model.force_zeros_for_empty_prompt is True  # the shipped SDXL config's flag
    enc = PromptEncoder(model)
    pos, neg = enc.encode(PROMPT), enc.encode("", 1, negative=True)
    p, n, pp, npool = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True)
    assert torch.allclose(pos.embeds, p, atol=1e-5) and torch.allclose(pos.pooled, pp, atol=1e-5)
    assert neg.embeds.shape == n.shape and neg.pooled.shape == npool.shape
    assert not neg.embeds.any() and not neg.pooled.any() and not n.any() and not npool.any()
    # an empty *positive* prompt, or a model without the flag, still encodes ""
    assert enc.encode("").embeds.any() and enc.encode("").pooled.any()
    plain = PromptEncoder(model, zero_empty_negative=False).encode("", 1, negative=True)
    assert plain.embeds.any() and torch.equal(plain.embeds, enc.encode("", 1).embeds)


def test_sdxl_empty_negative_equals_diffusers_with_zeroed_negative(sdxl_run):
    engine, pipe = sdxl_run
    ours = _arr(_ours(engine, ""))
    zeroed = _arr(_theirs(engine, pipe, None))  # diffusers zeroes a missing negative prompt
    encoded = _arr(_theirs(engine, pipe, ""))  # and encodes an explicit ""
    assert np.abs(ours - zeroed).max() <= 2
    assert np.abs(ours - encoded).mean() > 1.0  # encoding "" would have given another image
    # a non-empty negative prompt is encoded on both sides
    assert np.abs(_arr(_ours(engine, "blue")) - _arr(_theirs(engine, pipe, "blue"))).max() <= 2


# ---- SD 2.x: text-encoder blocks of a single file ------------------------------------------------------
TOWER = "cond_stage_model.model."
BLOCKS = 4  # the "24" of a real OpenCLIP ViT-H tower, scaled down


@pytest.fixture(scope="module")
def sd2_files(tmp_path_factory, tiny_models):
    """Two tiny SD 2.x single files in the real key layout that differ only in how the text tower is stored:
    complete (4 blocks + text_projection + logit_scale, like Stability's files) and as diffusers' conversion
    script writes it (the 3 blocks in use, nothing else)."""
    base = load_file(tiny_models["sd2_v"]["single_file"])
    other = {k: v for k, v in base.items() if not k.startswith(TOWER)}
    tower = {k: v for k, v in base.items() if k.startswith(TOWER) and ".resblocks." not in k}
    block0 = {k.split(".resblocks.0.", 1)[1]: v for k, v in base.items() if ".resblocks.0." in k}
    gen = torch.Generator().manual_seed(7)
    for i in range(BLOCKS):
        for name, v in block0.items():
            noise = torch.randn(v.shape, generator=gen) * 0.2 * (v.float().std() if v.numel() > 1 else 1)
            tower[f"{TOWER}transformer.resblocks.{i}.{name}"] = (v + noise).contiguous()
    width = tower[TOWER + "token_embedding.weight"].shape[1]
    tower[TOWER + "text_projection"] = torch.randn(width, width, generator=gen)
    tower[TOWER + "logit_scale"] = torch.tensor(4.6052)
    out = tmp_path_factory.mktemp("sd2")
    complete, converted = out / "sd2-openclip.safetensors", out / "sd2-diffusers.safetensors"
    save_file({**other, **tower}, str(complete))
    used = {
        k: v
        for k, v in tower.items()
        if f"resblocks.{BLOCKS - 1}." not in k and not k.endswith(("text_projection", "logit_scale"))
    }
    save_file({**other, **used}, str(converted))
    return complete, converted


def test_sd2_file_with_only_the_used_blocks_uses_all_of_them(sd2_files):
    complete, converted = (load_model(p) for p in sd2_files)
    assert complete.text_encoder.config.num_hidden_layers == BLOCKS - 1  # penultimate layer of 4
    assert converted.text_encoder.config.num_hidden_layers == BLOCKS - 1  # all 3 it has
    raw = load_file(sd2_files[1])
    last = f"{TOWER}transformer.resblocks.{BLOCKS - 2}.mlp.c_fc.weight"
    assert torch.equal(converted.text_encoder.state_dict()[_te_key(converted, BLOCKS - 2)], raw[last])
    for clip_skip in (1, 2):
        a = PromptEncoder(complete, clip_skip=clip_skip).encode(PROMPT).embeds
        b = PromptEncoder(converted, clip_skip=clip_skip).encode(PROMPT).embeds
        assert torch.equal(a, b), clip_skip
    # dropping the converted file's last block (the old behaviour) gives other conditioning
    short = PromptEncoder(converted, clip_skip=2).encode(PROMPT).embeds
    assert not torch.allclose(PromptEncoder(converted).encode(PROMPT).embeds, short)


def _te_key(model, block: int) -> str:
    keys = model.text_encoder.state_dict()
    name = f"encoder.layers.{block}.mlp.fc1.weight"
    return next(k for k in keys if k.endswith(name))


def test_sd2_used_blocks_at_real_width():
    """A real ViT-H tower (width 1024) runs 23 blocks whether the file holds 24 or 23 (A1111, diffusers)."""

    def shapes(blocks: int, projection: bool) -> dict[str, tuple[int, ...]]:
        sd = {"token_embedding.weight": (49408, 1024)}
        sd.update({f"transformer.resblocks.{i}.ln_1.weight": (1024,) for i in range(blocks)})
        if projection:
            sd["text_projection"] = (1024, 1024)
        return sd

    assert sd2_used_blocks(shapes(24, True)) == 23
    assert sd2_used_blocks(shapes(24, False)) == 23
    assert sd2_used_blocks(shapes(23, False)) == 23
    assert sd2_used_blocks(shapes(23, True)) == 23
