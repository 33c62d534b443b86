"""LoRAs stay merged across jobs (ldm_core.prompts.network_state): jobs with LoRA A, then B, then none, then A
again give exactly the images of a fresh engine for each set; a job with the set already merged does no merge
work; weights change in place (the same Parameter objects and storage, so a compiled UNet needs no recompile);
a changed file, `disable_extra_networks`, a hires checkpoint and an unloaded model all leave the weights right."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_lora import factors, kohya_file

from ldm_core.config import EngineConfig
from ldm_core.engine import Engine
from ldm_core.generation_requests import GenerationRequest, RequestError

SIZE = 64
SETS = {"A": "<lora:lora_a:1>", "B": "<lora:lora_b:0.8>", "none": "", "AB": "<lora:lora_a:0.5> <lora:lora_b:1>"}


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_models, sd1) -> Path:
    """A data folder with the tiny SD1 model (twice: "first", "second") and two LoRAs for it."""
    root = tmp_path_factory.mktemp("lora_cache")
    ckpt = root / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    for name in ("first", "second"):
        shutil.copytree(tiny_models["sd1"]["diffusers"], ckpt / name)
    lora = root / "models" / "Lora"
    lora.mkdir(parents=True)
    kohya_file(factors(sd1, 1, conv=True), lora / "lora_a.safetensors", "sd1")
    kohya_file(factors(sd1, 2), lora / "lora_b.safetensors", "sd1", alpha=1.0)
    return root


def engine_for(data: Path, tmp: Path, **over) -> Engine:
    """An engine over `data`'s models and LoRAs with its own output/cache folder `tmp`."""
    cfg = EngineConfig.from_data_dir(
        tmp,
        ckpt_dirs=(data / "models" / "Stable-diffusion",),
        lora_dirs=over.pop("lora_dirs", (data / "models" / "Lora",)),
        builtin_model_dir=None,
        **over,
    )
    return Engine(cfg)


def image(engine: Engine, tags: str, model: str = "first", **kw) -> np.ndarray:
    req = GenerationRequest.build(
        prompt=f"a red circle {tags}".strip(),
        negative_prompt="blue",
        steps=3,
        width=SIZE,
        height=SIZE,
        seed=5,
        sampler_name="Euler a",
        save_images=False,
        model=model,
        **kw,
    )
    return np.asarray(engine.generate(req).images[0]).astype(np.int16)


def weights(engine: Engine) -> dict[str, torch.Tensor]:
    m = engine.current_model
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(m, c).state_dict().items()}


@pytest.fixture(scope="module")
def fresh(data, tmp_path_factory) -> dict[str, np.ndarray]:
    """Each set's image from a freshly loaded model (nothing merged before)."""
    engine = engine_for(data, tmp_path_factory.mktemp("fresh"))
    out = {}
    for name, tags in SETS.items():
        engine.unload()
        out[name] = image(engine, tags)
    return out


def test_sets_in_sequence_equal_fresh_engines(data, tmp_path, fresh):
    engine = engine_for(data, tmp_path)
    engine.load_checkpoint("first")
    original = weights(engine)
    assert not np.array_equal(fresh["A"], fresh["none"]) and not np.array_equal(fresh["A"], fresh["B"])
    for name in ("A", "B", "none", "A", "AB", "A", "none"):
        assert np.array_equal(image(engine, SETS[name]), fresh[name]), name
    now = weights(engine)  # back to the file's weights bit for bit, UNet and text encoder
    assert all(torch.equal(now[k], original[k]) for k in original)
    assert engine.networks.merged_state(engine.current_model) is None


def test_same_set_does_no_merge_work_and_changes_weights_in_place(data, tmp_path, fresh):
    engine = engine_for(data, tmp_path)
    model = engine.load_checkpoint("first")
    params = {n: (p, p.data_ptr()) for c in (model.unet, model.text_encoder) for n, p in c.named_parameters()}
    image(engine, SETS["A"])
    state = engine.networks.merged_state(model)
    merges = state.merges
    assert merges > 0 and state.layers
    assert np.array_equal(image(engine, SETS["A"]), fresh["A"])
    assert state.merges == merges  # nothing recomputed for the set already merged
    image(engine, SETS["B"])
    assert engine.networks.merged_state(model) is state and state.merges > merges
    image(engine, "")
    # the same Parameter objects over the same storage throughout: a compiled UNet's graph inputs stay valid
    now = {n: (p, p.data_ptr()) for c in (model.unet, model.text_encoder) for n, p in c.named_parameters()}
    assert all(now[n][0] is p and now[n][1] == ptr for n, (p, ptr) in params.items())


def test_bad_call_disable_extra_networks_and_unload(data, tmp_path, fresh):
    engine = engine_for(data, tmp_path)
    image(engine, SETS["A"])
    with pytest.raises(RequestError, match="unknown LoRA"):
        image(engine, "<lora:nope:1>")
    with pytest.raises(RequestError, match="not a number"):
        image(engine, "<lora:lora_b:lots>")
    assert np.array_equal(image(engine, SETS["A"]), fresh["A"])  # a refused job leaves the merged set as it was
    assert np.array_equal(image(engine, SETS["A"], disable_extra_networks=True), fresh["none"])
    image(engine, SETS["A"])
    engine.unload()  # the merged state goes with the model; the reloaded model has its file's weights
    assert np.array_equal(image(engine, ""), fresh["none"])
    assert engine.networks.merged_state(engine.current_model) is None


def test_changed_file_is_merged_again(data, tmp_path, sd1):
    lora = tmp_path / "Lora"
    shutil.copytree(data / "models" / "Lora", lora)
    engine = engine_for(data, tmp_path / "e", lora_dirs=(lora,))
    image(engine, SETS["A"])
    kohya_file(factors(sd1, 7, conv=True), lora / "lora_a.safetensors", "sd1")  # same name, new weights
    st = (lora / "lora_a.safetensors").stat()
    os.utime(lora / "lora_a.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = image(engine, SETS["A"])
    engine.unload()
    assert np.array_equal(changed, image(engine, SETS["A"]))  # what the new file gives on a fresh model


def test_hires_checkpoint_gets_the_set_and_loses_it_later(data, tmp_path, fresh):
    hr = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", hr_second_pass_steps=2, denoising_strength=0.5)
    engine = engine_for(data, tmp_path, model_cache_size=2)
    image(engine, SETS["A"], **hr, hr_checkpoint_name="second")
    second = engine._cache[next(p for p in engine._cache if p.name == "second")].model
    assert engine.networks.merged_state(second) is not None  # merged into the hires checkpoint too
    # "second" (a copy of "first") as the main model without LoRA: its own weights again
    assert np.array_equal(image(engine, "", model="second"), fresh["none"])
