"""Device and dtype policy: which device runs the models and in which precision.

Auto device picks CUDA, then MPS, then CPU. Precision "auto" is fp16 on CUDA, fp32 on MPS and CPU (fp16 on
CPU is slow and lossy). The VAE may run in its own precision ("auto" = fp32 where the UNet is fp16 unless the
user asks otherwise; the engine retries a NaN decode in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import EngineConfig

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class DevicePolicy:
    """The resolved device and dtypes for one engine."""

    device: torch.device
    dtype: torch.dtype  # UNet and text encoders
    vae_dtype: torch.dtype
    channels_last: bool

    @property
    def name(self) -> str:
        if self.device.type == "cuda":
            return f"cuda:{torch.cuda.get_device_name(self.device)}"
        return self.device.type


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
    if config.vae_precision == "auto":
        vae_dtype = dtype
    else:
        vae_dtype = _DTYPES[config.vae_precision]
    channels_last = device.type == "cuda" if config.channels_last is None else config.channels_last
    return DevicePolicy(device=device, dtype=dtype, vae_dtype=vae_dtype, channels_last=channels_last)
