"""The LoRA networks merged into one model's weights, kept across jobs.

Merging a LoRA set into the UNet and text encoder costs a pass over every touched layer, and so does undoing
it; doing both per job made every job with a `<lora:...>` tag pay twice. `MergedNetworks` keeps the merged
state of one model instead: a job with the same set (same files by path, size and mtime; same weights, same
order) changes nothing; a job with another set changes only the layers whose networks differ, each
recomputed from its original weight, so the result is bit for bit what a fresh merge of that set gives; a job
without networks restores the originals. The state belongs to the model's objects (the library keys it by
the UNet module, weakly): a model that is unloaded or evicted takes its state with it, and a freshly loaded
model starts from its file's weights.

Weights change in place (`Tensor.copy_` into the existing Parameters): no new Parameter objects, no new
storage, so a compiled UNet (`ldm_core.compiled`, weights are graph inputs) sees the change without a
recompile.

Backups: the original of every touched weight is copied once, on its first merge, and kept until the layer
is restored. They are kept on the CPU: on a CPU that is the weights' own device; on CUDA it keeps VRAM for
the job (a LoRA that touches every attention and conv layer of SD 1.5 backs up hundreds of MB) and costs
only a host-to-device copy of the touched layers when the set changes, never on a job with the same set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..generation_requests import RequestError

# one network's part of a layer's update: (its Layer object from networks.py, tag weight)
Part = tuple[object, float]
Plan = dict[tuple[str, str], list[Part]]
DeltaFn = Callable[[torch.nn.Module, list[Part], str], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class _MergedLayer:
    """One changed layer: its module, the parts merged into it and the originals to restore."""

    module: torch.nn.Module
    parts: list[Part]
    weight: torch.Tensor  # original weight (CPU copy)
    bias: torch.Tensor | None = None  # original bias (CPU copy), only where the bias changed


def _same_parts(a: list[Part], b: list[Part]) -> bool:
    return len(a) == len(b) and all(x[0] is y[0] and x[1] == y[1] for x, y in zip(a, b, strict=True))


class MergedNetworks:
    """The networks merged into one model (see the module docstring). Not thread-safe: the library calls it
    under its lock."""

    def __init__(self) -> None:
        self.signature: tuple | None = None  # what is merged: per call (name, file stamp, te_w, unet_w)
        self.params: dict[str, str] = {}  # the infotext params of the merged set
        self.layers: dict[tuple[str, str], _MergedLayer] = {}
        self.merges = 0  # layers (re)computed so far: tests and benchmarks read it

    def matches(self, signature: tuple) -> bool:
        """Whether `signature` is what is merged now (a job with it has nothing to do)."""
        return self.signature == signature

    def update(
        self,
        signature: tuple,
        plan: Plan,
        modules: dict[str, dict[str, torch.nn.Module]],
        params: dict[str, str],
        delta: DeltaFn,
    ) -> None:
        """Make the weights hold exactly `plan` (component, module name) -> parts: layers the plan no longer
        names are restored, layers whose parts changed are recomputed from their originals, the rest stay.
        `delta(module, parts, where)` gives the (weight, bias or None) update in float32 on the weight's
        device. On an error every layer is restored and the state is empty before the error propagates."""
        try:
            with torch.no_grad():
                for key in [k for k in self.layers if k not in plan]:
                    self._restore(self.layers.pop(key))
                for key, parts in plan.items():
                    old = self.layers.get(key)
                    if old is not None and _same_parts(old.parts, parts):
                        continue
                    module = modules[key[0]][key[1]]
                    self._merge(key, module, parts, old, delta)
        except BaseException:
            self.clear()
            raise
        self.signature = signature
        self.params = dict(params)

    def _merge(
        self,
        key: tuple[str, str],
        module: torch.nn.Module,
        parts: list[Part],
        old: _MergedLayer | None,
        delta: DeltaFn,
    ) -> None:
        weight = module.weight
        if weight.is_meta:
            raise RequestError(
                "prompt",
                "LoRA cannot be applied while the model is offloaded layer by layer (sequential offload)",
            )
        d_weight, d_bias = delta(module, parts, f"{key[0]}:{key[1]}")
        if old is None:
            old = _MergedLayer(module, parts, weight.detach().to("cpu", copy=True))
            self.layers[key] = old
        old.parts = parts
        base = old.weight.to(weight.device)
        weight.copy_((base.float() + d_weight).to(weight.dtype))
        bias = module.bias
        if d_bias is not None and bias is not None:
            if old.bias is None:
                old.bias = bias.detach().to("cpu", copy=True)
            bias.copy_((old.bias.to(bias.device).float() + d_bias).to(bias.dtype))
        elif old.bias is not None:
            bias.copy_(old.bias)
            old.bias = None
        self.merges += 1

    @staticmethod
    def _restore(layer: _MergedLayer) -> None:
        layer.module.weight.copy_(layer.weight)
        if layer.bias is not None:
            layer.module.bias.copy_(layer.bias)

    def clear(self) -> None:
        """Restore every original weight (bit for bit) and forget the merged set."""
        with torch.no_grad():
            for layer in self.layers.values():
                self._restore(layer)
        self.layers.clear()
        self.signature = None
        self.params = {}
