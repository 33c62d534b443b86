"""Memory on the CPU, with the fault hook (ldm_core.memory.FaultHook) standing in for a small GPU: a checkpoint
switch frees the old model before reading the new one, models load straight into the run dtype, the VAE runs
in the precision the policy says and decodes once, out-of-memory errors are retried with the lighter steps
in order and recorded in the infotext and result, and --medvram / --lowvram (accelerate offload) run jobs."""

from __future__ import annotations

import json
import shutil
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_engine import make_engine as engine_over

from ldm_core.devices import DevicePolicy, execution_device, vae_dtype_for
from ldm_core.engine import Engine
from ldm_core.generation_requests import GenerationRequest
from ldm_core.infotext import parse_infotext
from ldm_core.memory import FALLBACK_STEPS, FaultHook, is_out_of_memory
from ldm_core.models import load_model


def make_engine(tmp: Path, models: dict[str, Path], **over) -> Engine:
    """test_engine's engine over `models`, saving nothing and drawing no previews."""
    return engine_over(tmp, models, **{"save_images": False, "preview_every": 0, **over})


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a red circle", steps=2, width=64, height=64, seed=3, sampler_name="Euler", save_images=False)
    return GenerationRequest(**{**base, **kw})


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_models):
    tmp = tmp_path_factory.mktemp("mem")
    return make_engine(
        tmp, {"a": tiny_models["sd1"]["single_file"], "b": tiny_models["sd1"]["diffusers"]}, model_cache_size=1
    )


# ---- evict before load, load straight to the run dtype ---------------------------------------------------


def test_switch_frees_the_old_model_before_the_new_one_is_read(engine):
    engine.load_checkpoint("a")
    old = weakref.ref(engine.current_model.unet)
    alive_at_load: list[bool] = []
    engine.fault_hook = FaultHook(on_point=lambda point, dev: alive_at_load.append(old() is not None))
    try:
        engine.load_checkpoint("b")
    finally:
        engine.fault_hook = None
    assert alive_at_load == [False], "the old UNet was still alive when the new checkpoint started loading"
    assert engine.current_model.entry.name == "b"


def test_models_load_straight_into_the_run_dtype(tiny_models):
    seen = []

    def vae_dtype(cfg):
        seen.append(cfg["latent_channels"])
        return torch.float32

    for layout in ("single_file", "diffusers"):
        m = load_model(tiny_models["sdxl"][layout], dtype=torch.bfloat16, vae_dtype=vae_dtype, device="cpu")
        for part in (m.unet, m.text_encoder, m.text_encoder_2):
            assert {p.dtype for p in part.parameters()} == {torch.bfloat16}, layout
        assert {p.dtype for p in m.vae.parameters()} == {torch.float32}, layout
    assert seen == [4, 4]  # the VAE's dtype was chosen from its config, once per load


def test_engine_loads_in_the_policy_dtype(tmp_path, tiny_models, monkeypatch):
    import ldm_core.engine as engine_module

    calls = []
    real = engine_module.load_model
    monkeypatch.setattr(engine_module, "load_model", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    eng = make_engine(tmp_path, {"x": tiny_models["sd1"]["single_file"]}, precision="bf16")
    eng.load_checkpoint("x")
    assert calls[0]["dtype"] == torch.bfloat16 and str(calls[0]["device"]) == "cpu"


# ---- VAE precision ---------------------------------------------------------------------------------------


def _policy(dtype, vae_dtype=torch.float32, auto=True) -> DevicePolicy:
    return DevicePolicy(torch.device("cpu"), dtype, vae_dtype, False, vae_precision_auto=auto)


def test_vae_precision_policy():
    assert vae_dtype_for(_policy(torch.float16), {"force_upcast": True}) == torch.float32
    assert vae_dtype_for(_policy(torch.float16), {}) == torch.float32  # diffusers' default: upcast
    assert vae_dtype_for(_policy(torch.float16), {"force_upcast": False}) == torch.float16  # an fp16-fix VAE
    assert vae_dtype_for(_policy(torch.bfloat16, torch.bfloat16), {}) == torch.bfloat16
    forced = _policy(torch.float16, torch.float16, auto=False)  # the user asked for an fp16 VAE
    assert vae_dtype_for(forced, {"force_upcast": True}) == torch.float16


def test_sdxl_vae_is_fp32_next_to_an_fp16_unet_unless_it_is_an_fp16_fix(tmp_path, tiny_models):
    fixed = tmp_path / "fixed"
    shutil.copytree(tiny_models["sdxl"]["diffusers"], fixed)
    cfg_path = fixed / "vae" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "force_upcast": False}))
    eng = make_engine(tmp_path / "d", {"xl": tiny_models["sdxl"]["single_file"], "xl-fix": fixed})
    # a CUDA policy's dtypes on the CPU (loading only: nothing runs in fp16 here)
    eng.policy = replace(eng.policy, dtype=torch.float16, vae_dtype=torch.float32, vae_precision_auto=True)
    m = eng.load_checkpoint("xl")
    assert m.unet.dtype == torch.float16 and m.vae.dtype == torch.float32
    assert eng.load_checkpoint("xl-fix").vae.dtype == torch.float16


def test_vae_decodes_once_even_when_a_reduced_precision_decode_gives_nan(tmp_path, tiny_models, monkeypatch):
    eng = make_engine(tmp_path, {"xl": tiny_models["sdxl"]["single_file"]}, precision="bf16", vae_precision="bf16")
    vae = eng.load_checkpoint("xl").vae
    assert vae.dtype == torch.bfloat16
    real, calls = vae.decode, []

    def nan_decode(z, *a, **kw):
        calls.append(z.dtype)
        out = real(z, *a, **kw)
        out.sample.fill_(float("nan"))
        return out

    monkeypatch.setattr(vae, "decode", nan_decode)
    eng.generate(req(batch_size=2))
    assert calls == [torch.bfloat16], "one decode per batch, in the VAE's dtype (no fp32 retry)"


# ---- out-of-memory recovery ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("point", "times"),
    [("decode", 1), ("denoise", 2), ("encode", 3)],
)
def test_out_of_memory_is_retried_with_lighter_steps_in_order(engine, point, times):
    model = engine.load_checkpoint("a")
    sliced_at_denoise: list[bool] = []

    def watch(p, dev):
        if p == "denoise":
            procs = model.unet.attn_processors.values()
            sliced_at_denoise.append(all(type(x).__name__ == "SlicedAttnProcessor" for x in procs))

    engine.fault_hook = FaultHook(oom_at={point: times}, on_point=watch)
    try:
        res = engine.generate(req(model="a"))
    finally:
        engine.fault_hook = None
    steps = list(FALLBACK_STEPS[:times])
    assert len(res.images) == 1 and np.asarray(res.images[0]).std() > 0
    info = parse_infotext(res.infotexts[0])
    assert info["Memory fallback"] == ", ".join(steps)
    assert any("out of memory" in w and steps[-1] in w for w in res.info(req())["warnings"])
    assert sliced_at_denoise[-1] == (times >= 2)  # the retry really ran with sliced attention
    # the next job runs at full speed again: every step undone
    assert not model.vae.use_tiling
    assert not any(type(x).__name__ == "SlicedAttnProcessor" for x in model.unet.attn_processors.values())
    assert "Memory fallback" not in parse_infotext(engine.generate(req(model="a")).infotexts[0])


def test_out_of_memory_after_every_step_fails_the_job(engine):
    engine.fault_hook = FaultHook(oom_at={"denoise": len(FALLBACK_STEPS) + 1})
    try:
        with pytest.raises(torch.OutOfMemoryError):
            engine.generate(req(model="a"))
    finally:
        engine.fault_hook = None
    assert not engine.current_model.vae.use_tiling  # undone on failure too


def test_fault_hook_checks_its_points():
    with pytest.raises(ValueError, match="unknown point"):
        FaultHook(oom_at={"sampling": 1})
    assert is_out_of_memory(torch.OutOfMemoryError("x")) and is_out_of_memory(RuntimeError("MPS out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


# ---- --medvram / --lowvram ---------------------------------------------------------------------------------


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_modes_run_jobs_on_the_configured_device(tmp_path, tiny_models, offload):
    eng = make_engine(tmp_path, {"xl": tiny_models["sdxl"]["single_file"]}, offload=offload)
    where: dict[str, str] = {}

    def watch(point, dev):
        if point in ("encode", "denoise"):
            where[point] = next(eng.current_model.unet.parameters()).device.type

    eng.fault_hook = FaultHook(on_point=watch)
    res = eng.generate(req(prompt="a [blue:red:0.5] square"))
    assert np.asarray(res.images[0]).std() > 0
    assert eng.fault_hook.points() == ["load", "encode", "denoise", "decode"]
    assert {d.type for _, d in eng.fault_hook.seen} == {"cpu"}  # the execution device comes from the config
    if offload == "sequential":  # weights wait on `meta`; accelerate's hooks bring them in layer by layer
        assert where == {"encode": "meta", "denoise": "meta"}
        with pytest.raises(ValueError, match="offloaded"):
            execution_device(eng.current_model.unet, None)
    else:
        assert where["denoise"] == "cpu"
    assert execution_device(eng.current_model.unet, "cpu") == torch.device("cpu")
