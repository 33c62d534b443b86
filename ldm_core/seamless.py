"""Seamless (tileable) generation, A1111's `tiling`: every padded 2-D convolution of the given modules pads
circularly instead of with zeros, so the UNet sees the latent image as a torus and the VAE decodes it as
one; the left edge then continues the right edge and the top the bottom.

`circular_padding(*modules)` switches the convolution instances of the modules for the duration of a
block and puts every one back as it was on exit (also on errors). It changes instances, never classes, so
other models in the process are untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _padded_convs(module: torch.nn.Module) -> Iterator[torch.nn.Conv2d]:
    """The Conv2d layers of `module` that pad their input (padding "valid" or 0 pads nothing)."""
    for m in module.modules():
        if not isinstance(m, torch.nn.Conv2d):
            continue
        pads = m.padding != "valid" if isinstance(m.padding, str) else any(p != 0 for p in m.padding)
        if pads:
            yield m


@contextlib.contextmanager
def circular_padding(*modules: torch.nn.Module | None, enabled: bool = True) -> Iterator[int]:
    """Within the block, the padded Conv2d layers of `modules` (None entries skipped) pad circularly.
    Yields how many layers were switched. With `enabled=False` nothing changes (yields 0)."""
    changed: list[tuple[torch.nn.Conv2d, str]] = []
    try:
        if enabled:
            seen: set[int] = set()
            for module in modules:
                if module is None:
                    continue
                for conv in _padded_convs(module):
                    if id(conv) in seen:
                        continue
                    seen.add(id(conv))
                    changed.append((conv, conv.padding_mode))
                    conv.padding_mode = "circular"
        yield len(changed)
    finally:
        for conv, mode in reversed(changed):
            conv.padding_mode = mode
