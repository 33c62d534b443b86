"""Clips longer than a motion module's context: sliding context windows.

A motion module sees at most `context` frames at once (16 for the SD 1.5 modules). For a longer clip, every
UNet evaluation runs once per window of `context` frames and each frame's prediction is the mean over the
windows that hold it (AnimateDiff's "uniform" context schedule, as sd-webui-animatediff and ComfyUI's
AnimateDiff-Evolved run it):

- windows start every `context - overlap` frames (overlap -1: `context // 4`), the last one ends on the last
  frame;
- `stride` 2, 4, ... (a power of two) adds windows over every 2nd, 4th, ... frame, which ties frames that far
  apart together;
- a closed loop lets windows wrap around the end of the clip, so the last frames and the first ones are
  denoised together and the clip loops.

`ContextWindowUNet` wraps the UNet for the loop: it slices the loop's batch (`groups` clips of `frames` images:
the unconditional clip, then one per AND part) and every per-image UNet input (text embeddings, SDXL's added
conditioning, ControlNet residuals) by window, and sets the motion patch's clip length for each call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


def context_windows(frames: int, context: int, stride: int = 1, overlap: int = -1, closed_loop: bool = False):
    """The frame indices of each window (see the module doc). One window of every frame when they fit."""
    if frames <= context:
        return [list(range(frames))]
    overlap = context // 4 if overlap < 0 else min(overlap, context - 1)
    step = max(1, context - overlap)
    windows: list[list[int]] = []
    level = 1
    while level <= max(1, stride):
        for offset in range(level):
            seq = list(range(offset, frames, level))
            if len(seq) <= context:
                if level > 1 and len(seq) > 1:
                    windows.append(seq)
                continue
            if closed_loop:
                starts = list(range(0, len(seq), step))
                wins = [[seq[(a + j) % len(seq)] for j in range(context)] for a in starts]
            else:
                starts = list(range(0, len(seq) - context + 1, step))
                if starts[-1] != len(seq) - context:
                    starts.append(len(seq) - context)
                wins = [seq[a : a + context] for a in starts]
            windows.extend(wins)
        level *= 2
    return windows


@dataclass
class _Out:
    sample: torch.Tensor


def _rows(groups: int, frames: int, window: list[int]) -> torch.Tensor:
    return torch.tensor([g * frames + f for g in range(groups) for f in window])


def _slice(value: Any, rows: torch.Tensor, batch: int) -> Any:
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch:
        return value[rows.to(value.device)]
    if isinstance(value, tuple | list):
        return type(value)(_slice(v, rows, batch) for v in value)
    if isinstance(value, dict):
        return {k: _slice(v, rows, batch) for k, v in value.items()}
    return value


class ContextWindowUNet:
    """The loop's UNet for a clip of `frames` frames: runs `unet` per context window (see the module doc) and
    tells `set_frames` each call's clip length (the motion patch's `frames`); `at_timestep`, when given, hears
    each call's timestep first (the motion patch's timeline)."""

    def __init__(
        self,
        unet,
        frames: int,
        windows: list[list[int]],
        set_frames: Callable[[int], None],
        at_timestep: Callable[[Any], None] | None = None,
    ):
        self.unet, self.frames, self.windows, self.set_frames = unet, frames, windows, set_frames
        self.at_timestep = at_timestep

    def parameters(self):
        return self.unet.parameters()

    def __call__(self, x: torch.Tensor, t, *, encoder_hidden_states, added_cond_kwargs=None, **kwargs) -> _Out:
        batch = x.shape[0]
        if batch % self.frames:
            raise RuntimeError(f"UNet batch {batch} is not a whole number of {self.frames}-frame clips")
        groups = batch // self.frames
        if self.at_timestep is not None:
            self.at_timestep(t)
        if len(self.windows) == 1 and len(self.windows[0]) == self.frames:
            self.set_frames(self.frames)
            return _Out(
                self.unet(
                    x, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, **kwargs
                ).sample
            )
        total: torch.Tensor | None = None
        count = torch.zeros(batch, 1, 1, 1, device=x.device)
        for window in self.windows:
            rows = _rows(groups, self.frames, window)
            self.set_frames(len(window))
            pred = self.unet(
                x[rows.to(x.device)],
                t,
                encoder_hidden_states=_slice(encoder_hidden_states, rows, batch),
                added_cond_kwargs=_slice(added_cond_kwargs, rows, batch),
                **_slice(kwargs, rows, batch),
            ).sample.float()
            if total is None:
                total = torch.zeros(batch, *pred.shape[1:], device=x.device)
            r = rows.to(x.device)
            total.index_add_(0, r, pred)
            count.index_add_(0, r, torch.ones(len(rows), 1, 1, 1, device=x.device))
        return _Out(total / count.clamp_min(1))
