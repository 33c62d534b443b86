"""CUDA-only speed switches (ldm_core.devices.enable_fast_cuda_kernels, channels-last VAE): set for a CUDA
policy, and a CPU engine keeps torch's switches and its VAE's memory layout as they were."""

from __future__ import annotations

import shutil

import torch

from ldm_core.config import EngineConfig
from ldm_core.devices import DevicePolicy, enable_fast_cuda_kernels
from ldm_core.engine import Engine

FLAGS = (
    (torch.backends.cudnn, "benchmark"),
    (torch.backends.cudnn, "allow_tf32"),
    (torch.backends.cuda.matmul, "allow_tf32"),
)


def flags() -> tuple[bool, ...]:
    return tuple(bool(getattr(obj, name)) for obj, name in FLAGS)


def test_cuda_policy_turns_on_benchmark_and_tf32_and_cpu_leaves_them():
    saved = flags()
    try:
        for obj, name in FLAGS:
            setattr(obj, name, False)
        cpu = DevicePolicy(torch.device("cpu"), torch.float32, torch.float32, channels_last=False)
        assert enable_fast_cuda_kernels(cpu) is False and flags() == (False, False, False)
        cuda = DevicePolicy(torch.device("cuda"), torch.float16, torch.float32, channels_last=True)
        assert enable_fast_cuda_kernels(cuda) is True and flags() == (True, True, True)
    finally:
        for (obj, name), value in zip(FLAGS, saved, strict=True):
            setattr(obj, name, value)


def test_cpu_engine_keeps_switches_and_vae_layout(tmp_path, tiny_models):
    ckpt = tmp_path / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    shutil.copytree(tiny_models["sd1"]["diffusers"], ckpt / "tiny")
    before = flags()
    engine = Engine(EngineConfig.from_data_dir(tmp_path, builtin_model_dir=None, device="cpu", channels_last=True))
    model = engine.load_checkpoint("tiny")
    assert flags() == before
    conv = model.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()  # asked for: UNet
    vae_conv = model.vae.decoder.conv_in.weight
    assert vae_conv.is_contiguous()  # the VAE is channels-last on CUDA only


def test_bf16_autocast_on_a_cpu_without_bf16_hardware_is_named_as_slow(tmp_path, monkeypatch):
    """A CPU without the avx512_bf16 / amx_bf16 flags emulates bf16 (a motion training step with an attention
    LoRA took 24.1 s against 2.4 s in fp32 on an AVX2-only EPYC): trainers given --autocast bf16 there say so
    before they start."""
    import argparse

    from ldm_core.devices import cpu_has_fast_bf16
    from ldm_core.train import __main__ as train_main

    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n")
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert cpu_has_fast_bf16(str(avx2)) is False
    assert cpu_has_fast_bf16(str(amx)) is True
    assert cpu_has_fast_bf16(str(tmp_path / "none")) is None  # unreadable: unknown, no warning

    said = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("ldm_core.devices.cpu_has_fast_bf16", lambda: False)
    assert train_main.warn_emulated_bf16(argparse.Namespace(autocast="bf16"), said.append)
    assert "--autocast off" in said[0]
    assert not train_main.warn_emulated_bf16(argparse.Namespace(autocast="off"), said.append)
    assert not train_main.warn_emulated_bf16(argparse.Namespace(), said.append)  # a command without the option
    monkeypatch.setattr("ldm_core.devices.cpu_has_fast_bf16", lambda: True)
    assert not train_main.warn_emulated_bf16(argparse.Namespace(autocast="bf16"), said.append)
    assert len(said) == 1
