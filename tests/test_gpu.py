"""On a real CUDA device: fp16 generation, channels-last, --medvram / --lowvram with their peak VRAM, the
xformers probe, PyTorch SDPA, eviction before a switch and out-of-memory recovery (by injection).

Marked `gpu` (skipped by default, and skipped without CUDA). Quick set: `pytest -m "gpu and not slow"
tests/test_gpu.py -s -n 0` (tiny random models). `pytest -m gpu tests/test_gpu.py -s -n 0` also builds full-size SD 1.5
and SDXL architectures with random fp16 weights and prints their peak VRAM in each offload mode.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from test_memory import make_engine, req

from ldm_core.attention import AttentionRegistry, probe_xformers
from ldm_core.infotext import parse_infotext
from ldm_core.memory import FaultHook

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
MIB = 2**20


def _fresh() -> int:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _ok(image) -> bool:
    """Not a flat image (a NaN decode comes out as one colour)."""
    return bool(np.asarray(image).astype(np.float32).std() > 1)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_fp16_generation_decodes_once_in_fp32(tmp_path, tiny_models, name, monkeypatch):
    eng = make_engine(tmp_path, {name: tiny_models[name]["single_file"]})
    m = eng.load_checkpoint(name)
    assert eng.policy.device.type == "cuda" and m.unet.dtype == torch.float16
    assert m.vae.dtype == torch.float32 and m.unet.device.type == "cuda"  # auto VAE precision next to fp16
    real, calls = m.vae.decode, []
    monkeypatch.setattr(m.vae, "decode", lambda z, *a, **kw: calls.append(z.dtype) or real(z, *a, **kw))
    res = eng.generate(req(batch_size=2))
    assert calls == [torch.float32] and all(_ok(im) for im in res.images)


def test_channels_last_on_cuda(tmp_path, tiny_models):
    eng = make_engine(tmp_path, {"x": tiny_models["sd1"]["single_file"]})
    assert eng.policy.channels_last
    unet = eng.load_checkpoint("x").unet
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert _ok(eng.generate(req()).images[0])


def test_offload_modes_report_peak_vram(tmp_path, tiny_models, record_property):
    peaks, resident = {}, {}
    for mode in ("none", "model", "sequential"):
        base = _fresh()
        eng = make_engine(tmp_path / mode, {"xl": tiny_models["sdxl"]["single_file"]}, offload=mode)
        res = eng.generate(req(model="xl"))
        assert _ok(res.images[0]), mode
        peaks[mode] = torch.cuda.max_memory_allocated() - base
        gc.collect()
        resident[mode] = torch.cuda.memory_allocated() - base  # weights left on the GPU between jobs
        where = next(eng.current_model.unet.parameters()).device.type
        assert where == {"none": "cuda", "model": "cpu", "sequential": "meta"}[mode]
        record_property(f"peak_vram_mib_{mode}", round(peaks[mode] / MIB, 2))
        del eng, res
    print("tiny SDXL peak VRAM (MiB):", {k: round(v / MIB, 2) for k, v in peaks.items()})
    assert resident["model"] < resident["none"] and resident["sequential"] < resident["none"]


def test_xformers_probe(tmp_path, tiny_models):
    pytest.importorskip("xformers")
    assert probe_xformers(torch.device("cuda")) is None
    eng = make_engine(tmp_path, {"x": tiny_models["sd1"]["single_file"]}, attention="xformers")
    assert eng.attention_choice.name == "xformers"
    assert _ok(eng.generate(req()).images[0])


def test_sdpa_on_cuda(tmp_path, tiny_models):
    assert AttentionRegistry().choose("sdpa", torch.device("cuda")).name == "sdpa"
    eng = make_engine(tmp_path, {"x": tiny_models["sd1"]["single_file"]}, attention="sdpa")
    procs = eng.load_checkpoint("x").unet.attn_processors.values()
    assert {type(p).__name__ for p in procs} == {"AttnProcessor2_0"}
    assert _ok(eng.generate(req()).images[0])


def test_switch_frees_gpu_memory_before_loading(tmp_path, tiny_models):
    eng = make_engine(tmp_path, {"a": tiny_models["sdxl"]["single_file"], "b": tiny_models["sd1"]["single_file"]})
    base = _fresh()
    eng.load_checkpoint("a")
    with_a = torch.cuda.memory_allocated()
    at_load: list[int] = []
    eng.fault_hook = FaultHook(on_point=lambda point, dev: at_load.append(torch.cuda.memory_allocated()))
    eng.load_checkpoint("b")
    # (nearly) nothing of "a" was left on the GPU when "b" started loading
    assert with_a > base and with_a - at_load[0] >= 0.9 * (with_a - base)


def test_out_of_memory_recovery_on_cuda(tmp_path, tiny_models):
    hook = FaultHook(oom_at={"denoise": 1, "decode": 1})
    eng = make_engine(tmp_path, {"x": tiny_models["sdxl"]["single_file"]})
    eng.fault_hook = hook
    res = eng.generate(req())
    assert _ok(res.images[0])
    assert parse_infotext(res.infotexts[0])["Memory fallback"] == "vae tiling, attention slicing"
    assert next(eng.current_model.unet.parameters()).device.type == "cuda"  # back in place for the next job


# ---- full-size architectures (random fp16 weights): peak VRAM per offload mode ----------------------------


def _full_size_folder(variant: str, folder):
    """A diffusers folder with the real SD 1.5 / SDXL architecture from the shipped configs, random fp16
    weights (built on the GPU, saved as safetensors). Nothing is downloaded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from tiny_models import save_diffusers_folder
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ldm_core.models.configs import shipped_config

    comps: dict = {"scheduler_config": shipped_config(variant, "scheduler")}
    with torch.device("cuda"):
        comps["unet"] = UNet2DConditionModel.from_config(shipped_config(variant, "unet")).half()
        comps["vae"] = AutoencoderKL.from_config(shipped_config(variant, "vae")).half()
        for key, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            try:
                cfg = shipped_config(variant, key)
            except (KeyError, FileNotFoundError, OSError):
                continue
            comps[key] = cls(CLIPTextConfig.from_dict({k: v for k, v in cfg.items() if k != "architectures"})).half()
    save_diffusers_folder(comps, variant, folder)
    del comps
    _fresh()
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "size"), [("sd1", 512), ("sdxl", 1024)])
def test_full_size_peak_vram_per_offload_mode(tmp_path, variant, size, record_property):
    _full_size_folder(variant, tmp_path / "models" / "Stable-diffusion" / f"full-{variant}")
    peaks = {}
    for mode in ("none", "model", "sequential"):
        base = _fresh()
        eng = make_engine(tmp_path, {}, offload=mode)  # over the folder built above (no copy)
        res = eng.generate(req(width=size, height=size, steps=2))
        assert res.images[0].size == (size, size)  # random weights: the point here is the memory, not the image
        peaks[mode] = round((torch.cuda.max_memory_allocated() - base) / MIB)
        record_property(f"{variant}_peak_vram_mib_{mode}", peaks[mode])
        del eng, res
    print(f"{variant} {size}x{size} peak VRAM (MiB):", peaks)
    assert peaks["sequential"] <= peaks["model"] < peaks["none"]
