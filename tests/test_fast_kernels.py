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
