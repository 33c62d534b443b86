"""Spatio-temporal attention in a motion module's temporal transformers.

An AnimateDiff temporal attention looks along time at one latent cell: the tokens of one attention are the
`frames` values of that cell. An object that moves leaves the cell, so no temporal attention ever sees the same
object in two frames once it has travelled more than a cell or two, and nothing in the module can hold its shape
while it moves. A spatio-temporal attention takes the same weights (query, key, value and output projections of
the temporal transformer block) over every cell of every frame of a clip at once (`frames x height x width`
tokens), as the full 3D attention of later video models (Latte, CogVideoX) does: a frame can read the object where
it is in the other frames. Each token carries its frame's sinusoidal encoding (the block's own, added before the
attention as in AnimateDiff) and a 2D sinusoidal encoding of its cell (`cell_encoding`), so that where an object
is stays readable.

A module names the attentions of its temporal blocks that run this way in its config.json
(`"spatiotemporal_attention": ["attn2"]`), and the UNet levels from which on they do (`"spatiotemporal_from_level":
1`; 0 is the finest level, the mid block the coarsest): a level of `cells` cells costs `(frames x cells)^2` per
attention, so a module may keep the finest level's along time (on a CPU, 16 frames of 16x16 cells take about 1 s a
training step for each such attention). Every published module has none (plain AnimateDiff). Tools that do not know
the keys load the module's weights but run every attention along time only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: config.json key naming the temporal blocks' attentions that attend over all frames and cells
CONFIG_KEY = "spatiotemporal_attention"
#: config.json key: the first UNet level (0: the finest) whose temporal blocks use them
LEVEL_KEY = "spatiotemporal_from_level"
#: the attentions of a temporal transformer block (both self-attentions in AnimateDiff)
ATTENTIONS = ("attn1", "attn2")


def check_attentions(names) -> tuple[str, ...]:
    """`names` (a config value) as a tuple, or ValueError naming the allowed ones."""
    if names is None:
        return ()
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{CONFIG_KEY}: {names!r} is not a list of attention names ({', '.join(ATTENTIONS)})")
    bad = [n for n in names if n not in ATTENTIONS]
    if bad:
        raise ValueError(f"{CONFIG_KEY}: {', '.join(bad)} is not one of {', '.join(ATTENTIONS)}")
    return tuple(dict.fromkeys(names))


def check_level(value) -> int:
    """`value` (a config value or option) as the first UNet level with such attentions, or ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{LEVEL_KEY}: {value!r} is not a UNet level (0, the finest, or more)")
    return value


def cell_encoding(height: int, width: int, channels: int) -> torch.Tensor:
    """(height * width, channels): a 2D sinusoidal encoding of each cell, rows first as the temporal transformer
    orders them; the first half of the channels encodes the row, the second the column (positions in units of
    the grid's side, so a coarse level's cell and a fine level's cell at the same place read alike)."""
    half = channels // 2
    quarter = half // 2

    def axis(n: int) -> torch.Tensor:
        pos = (torch.arange(n, dtype=torch.float32) + 0.5) / n * 16  # 16 cells' worth across the image
        freq = torch.exp(torch.arange(quarter, dtype=torch.float32) * (-math.log(100.0) / max(1, quarter)))
        ang = pos[:, None] * freq[None, :]
        return torch.cat([ang.sin(), ang.cos()], dim=1)  # (n, 2 * quarter)

    rows, cols = axis(height), axis(width)
    enc = torch.zeros(height, width, channels)
    enc[:, :, : 2 * quarter] = rows[:, None, :]
    enc[:, :, half : half + 2 * quarter] = cols[None, :, :]
    return enc.reshape(height * width, channels)


class SpatioTemporalAttention:
    """A diffusers attention processor for a temporal block's self-attention: its input is the temporal
    transformer's `(clips * height * width, frames, channels)`; it attends over each clip's `height * width *
    frames` tokens with the attention's own projections. `grid` (height, width) is set by whoever runs the temporal
    transformer, before each call (`MotionPatch`)."""

    def __init__(self):
        self.grid: tuple[int, int] | None = None
        self._encodings: dict = {}

    def _encoding(self, h: int, w: int, c: int, like: torch.Tensor) -> torch.Tensor:
        key = (h, w, c, like.device, like.dtype)
        if key not in self._encodings:
            self._encodings[key] = cell_encoding(h, w, c).to(like.device, like.dtype)
        return self._encodings[key]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if self.grid is None:
            raise RuntimeError("spatio-temporal attention run without its grid (height, width)")
        h, w = self.grid
        cells, frames, c = hidden_states.shape
        if cells % (h * w):
            raise RuntimeError(f"{cells} temporal sequences are not whole clips of a {h}x{w} grid")
        clips = cells // (h * w)
        x = hidden_states.reshape(clips, h * w, frames, c) + self._encoding(h, w, c, hidden_states)[None, :, None, :]
        x = x.reshape(clips, h * w * frames, c)
        heads = attn.heads
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(clips, -1, heads, t.shape[-1] // heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        out = out.transpose(1, 2).reshape(clips, h * w * frames, -1).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out.reshape(cells, frames, -1) / attn.rescale_output_factor
