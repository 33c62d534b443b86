"""Runtime hooks of loaded extensions in the denoising loop: a unit's UNet-input provider and CFG hook gated
by its guidance window (residuals scaled by the unit's weight), and the live view of every preprocessor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..extension_api import (
    ExtensionError,
    Preprocessor,
    UnitParams,
    unet_residual_shapes,
)
from ..generation_requests import RequestError

if TYPE_CHECKING:
    from .manager import ExtensionManager


RESIDUAL_KEYS = ("down_block_additional_residuals", "mid_block_additional_residual")


def scale_residuals(out: dict[str, Any], weight: float) -> dict[str, Any]:
    res = dict(out)
    down = res.get(RESIDUAL_KEYS[0])
    if down is not None:
        res[RESIDUAL_KEYS[0]] = tuple(r * weight for r in down)
    mid = res.get(RESIDUAL_KEYS[1])
    if mid is not None:
        res[RESIDUAL_KEYS[1]] = mid * weight
    return res


class PreprocessorView(Mapping):
    """A live read-only mapping of every active preprocessor (for `ExtensionContext.all_preprocessors`)."""

    def __init__(self, manager: ExtensionManager) -> None:
        self._m = manager

    def __getitem__(self, key: str) -> Preprocessor:
        pre = self._m.preprocessors
        if key in pre:
            return pre[key]
        return pre[key.casefold()]

    def __iter__(self):
        return iter({p.name for p in self._m.preprocessors.values()})

    def __len__(self) -> int:
        return len({p.name for p in self._m.preprocessors.values()})


class GatedProvider:
    """A unit's UNet-input provider, called only inside its guidance window, residuals scaled by weight."""

    def __init__(
        self, ext: str, unit: UnitParams, fn, applies_weight: bool, unet_config: Mapping[str, Any] | None = None
    ) -> None:
        self.ext, self.unit, self.fn, self.applies_weight = ext, unit, fn, applies_weight
        self.unet_config = unet_config

    def __call__(self, step) -> dict[str, Any] | None:
        if not self.unit.active_at(step.fraction) or (self.unit.weight == 0 and not self.applies_weight):
            return None
        try:
            out = self.fn(step)
        except (RequestError, ExtensionError):
            raise
        except Exception as exc:
            raise ExtensionError(f"extension {self.ext}: {type(exc).__name__}: {exc}") from exc
        if not out:
            return None
        if not self.applies_weight and self.unit.weight != 1.0:
            out = scale_residuals(out, self.unit.weight)
        down, mid = out.get(RESIDUAL_KEYS[0]), out.get(RESIDUAL_KEYS[1])
        if (down is None) != (mid is None) and self.unet_config is not None:
            x = step.x_in
            down_shapes, mid_shape = unet_residual_shapes(self.unet_config, x.shape[-2], x.shape[-1])
            out = dict(out)
            if down is None:
                out[RESIDUAL_KEYS[0]] = tuple(x.new_zeros((x.shape[0], *s)) for s in down_shapes)
            else:
                out[RESIDUAL_KEYS[1]] = x.new_zeros((x.shape[0], *mid_shape))
        return out


class GatedCfg:
    """A unit's CFG hook, applied only inside its guidance window."""

    def __init__(self, ext: str, unit: UnitParams, fn) -> None:
        self.ext, self.unit, self.fn = ext, unit, fn

    def __call__(self, step, uncond, conds, guided):
        if not self.unit.active_at(step.fraction):
            return guided
        return self.fn(step, uncond, conds, guided)
