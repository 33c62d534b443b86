"""Device and dtype policy: which device runs the models and in which precision.

Auto device picks CUDA, then MPS, then CPU. Precision "auto" is fp16 on CUDA, fp32 on MPS and CPU (fp16 on
CPU is slow and lossy). The VAE has its own precision: "auto" is fp32 where the UNet runs in fp16 (the SD and
SDXL VAEs overflow to NaN in fp16), except for a VAE whose config says it is safe in fp16 (`force_upcast:
false`, e.g. madebyollin's sdxl-vae-fp16-fix), which then runs in fp16 (`vae_dtype_for`). So a VAE decodes
once, in the precision chosen here; nothing decodes in fp16 and retries in fp32. bf16 has fp32's range and
stays bf16. An explicit `vae_precision` is used as given.

Where a model runs is the policy's `device`, never the device of its parameters: with `--lowvram`
(sequential offload) the weights sit on the `meta` device between uses and only accelerate's hooks know
where they execute, so the engine passes `device` to whatever creates tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import EngineConfig

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class DevicePolicy:
    """The resolved device and dtypes for one engine."""

    device: torch.device
    dtype: torch.dtype  # UNet and text encoders
    vae_dtype: torch.dtype  # for a VAE that needs upcasting; see `vae_dtype_for`
    channels_last: bool
    vae_precision_auto: bool = True

    @property
    def name(self) -> str:
        if self.device.type == "cuda":
            return f"cuda:{torch.cuda.get_device_name(self.device)}"
        return self.device.type


def cpu_has_fast_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU does bf16 arithmetic in hardware (the `avx512_bf16` or `amx_bf16` flag); None where
    that cannot be read (not Linux). Without it, bf16 autocast on the CPU is emulated: a motion-module training
    step with an attention LoRA measured 24.1 s with bf16 autocast against 2.4 s in fp32 on an AVX2-only AMD EPYC
    (2026-12-07)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    return None if flags is None else bool({"avx512_bf16", "amx_bf16"} & set(flags))


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' -> cuda, mps or cpu (first available); otherwise the named device, checked to exist."""
    if requested in ("auto", "", None):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {requested!r} asked for, but CUDA is not available (allowed: auto, cpu)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device: {requested!r} asked for, but MPS is not available (allowed: auto, cpu)")
    return dev


def resolve_policy(config: EngineConfig) -> DevicePolicy:
    """Turn the config's device/precision choices into concrete torch objects."""
    device = pick_device(config.device)
    if config.precision == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = _DTYPES[config.precision]
        if device.type == "cpu" and dtype == torch.float16:
            dtype = torch.bfloat16  # fp16 kernels are incomplete on CPU; bf16 is the closest safe choice
    auto = config.vae_precision == "auto"
    vae_dtype = (torch.float32 if dtype == torch.float16 else dtype) if auto else _DTYPES[config.vae_precision]
    channels_last = device.type == "cuda" if config.channels_last is None else config.channels_last
    return DevicePolicy(
        device=device, dtype=dtype, vae_dtype=vae_dtype, channels_last=channels_last, vae_precision_auto=auto
    )


def enable_fast_cuda_kernels(policy: DevicePolicy) -> bool:
    """On CUDA, let cuDNN pick the fastest convolution algorithms for each shape (`cudnn.benchmark`; a shape's
    first run tunes once, later runs at that shape reuse it) and run float32 matmuls and convolutions on
    TF32 tensor cores (the fp32 VAE and upcast attention; fp16 weights are unaffected). Torch's process-wide
    switches, set when an engine resolves a CUDA policy, never at import. Returns whether they were set; on
    other devices nothing changes."""
    if policy.device.type != "cuda":
        return False
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    return True


def execution_device(module: torch.nn.Module, offloaded: torch.device | str | None) -> torch.device:
    """Where `module` runs: where its weights are, or `offloaded` (the policy's device) when they sit on `meta`
    (sequential offload keeps them there and its hooks bring each layer in as it runs)."""
    param = next(module.parameters(), None)
    if param is None or param.device.type == "meta":
        if offloaded is None:
            raise ValueError("the module's weights are offloaded (on meta): pass the execution device")
        return torch.device(offloaded)
    return param.device


def vae_dtype_for(policy: DevicePolicy, vae_config: Any) -> torch.dtype:
    """The dtype one VAE runs (and decodes) in: the policy's `vae_dtype`, except that with precision "auto"
    a VAE whose config has `force_upcast: false` (made to run in fp16) follows the UNet's fp16."""
    if policy.vae_precision_auto and policy.dtype == torch.float16:
        get = vae_config.get if isinstance(vae_config, Mapping) else lambda k, d: getattr(vae_config, k, d)
        if get("force_upcast", True) is False:
            return torch.float16
    return policy.vae_dtype
