"""Attention backends: a registry of named ways to compute attention, applied to a model through the
diffusers processor API (`set_attn_processor`), never by patching library classes.

- "sdpa": PyTorch scaled_dot_product_attention (flash / memory-efficient kernels where the device has them).
- "xformers": only when the package imports AND a small functional probe on the target device passes; otherwise
  the engine falls back to sdpa with one log line saying why.
- "sliced": attention computed in slices of the batch*heads dimension, for low memory.
"auto" means xformers when it works on CUDA, else sdpa.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttentionChoice:
    """The backend that will run, and why (the reason is shown when a requested backend fell back)."""

    name: str
    reason: str = ""


def probe_xformers(device: torch.device) -> str | None:
    """Return None when xformers can run attention on `device`, else a one-line reason it cannot."""
    try:
        import xformers.ops  # noqa: F401 (optional dependency)
    except Exception as exc:  # ImportError, or a broken build raising something else at import
        return f"xformers not importable ({type(exc).__name__}: {exc})"
    if device.type != "cuda":
        return f"xformers needs CUDA (device is {device.type})"
    try:
        q = torch.randn(1, 8, 2, 64, device=device, dtype=torch.float16)
        out = xformers.ops.memory_efficient_attention(q, q, q)
        if not torch.isfinite(out).all():
            return "xformers probe returned non-finite values"
    except Exception as exc:  # e.g. "No operator found for memory_efficient_attention_forward"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"xformers probe failed: {first}"
    return None


def _sdpa_processor():
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()


def _xformers_processor():
    from diffusers.models.attention_processor import XFormersAttnProcessor

    return XFormersAttnProcessor()


def _sliced_processor():
    from diffusers.models.attention_processor import SlicedAttnProcessor

    return SlicedAttnProcessor(slice_size=1)


class AttentionRegistry:
    """Named attention backends. `factories[name]()` returns a diffusers attention processor."""

    def __init__(self) -> None:
        self.factories: dict[str, Callable[[], object]] = {
            "sdpa": _sdpa_processor,
            "xformers": _xformers_processor,
            "sliced": _sliced_processor,
        }

    def names(self) -> list[str]:
        return ["auto", *self.factories]

    def register(self, name: str, factory: Callable[[], object]) -> None:
        self.factories[name] = factory

    def choose(self, requested: str, device: torch.device) -> AttentionChoice:
        """Resolve 'auto' and check xformers by its probe; unknown names raise ValueError."""
        if requested not in ("auto", *self.factories):
            raise ValueError(f"attention: unknown backend {requested!r} (allowed: {', '.join(self.names())})")
        if requested in ("auto", "xformers"):
            if requested == "auto" and device.type != "cuda":
                return AttentionChoice("sdpa")
            why = probe_xformers(device)
            if why is None:
                return AttentionChoice("xformers")
            if requested == "xformers" or not why.startswith("xformers not importable"):
                log.warning("xformers unusable, using PyTorch SDPA attention instead: %s", why)
            return AttentionChoice("sdpa", reason=why)
        return AttentionChoice(requested)

    def apply(self, model: torch.nn.Module, name: str) -> None:
        """Install backend `name` on every attention layer of a diffusers model (UNet, VAE, ControlNet)."""
        if hasattr(model, "set_attn_processor") and getattr(model, "attn_processors", None):
            model.set_attn_processor(self.factories[name]())
