"""Tiled processing with overlap and feathered blending, for any image-to-image function (model upscalers,
SD upscale's img2img tiles).

A `TileGrid` covers a width x height image with tiles of at most tile_w x tile_h pixels that overlap their
neighbours by at least `overlap` pixels (tiles are spread evenly, so every tile has the same size). Each pair
of neighbours hands over along a linear ramp in the middle half of their shared strip; the per-tile weights
form a partition of unity, and every tile's weight is zero within a quarter of the overlap from its inner
edges. Consequence: a convolutional model whose receptive-field radius is at most overlap/4 input pixels
gives exactly the untiled result; larger receptive fields only differ near seams, and smoothly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tile:
    """One tile in input pixels: top-left (x, y), size (w, h); (col, row) is its place in the grid."""

    x: int
    y: int
    w: int
    h: int
    col: int
    row: int


@dataclass(frozen=True)
class _Axis:
    starts: tuple[int, ...]
    size: int
    length: int
    # per tile: (ramp start, ramp length) of the hand-over from the previous / to the next tile, input px
    ramps_in: tuple[tuple[float, float] | None, ...]
    ramps_out: tuple[tuple[float, float] | None, ...]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size min(tile, length) covering [0, length) with at least `overlap` px
    shared between neighbours (capped at a third of the tile), spread evenly; first 0, last length - tile."""
    if length <= 0 or tile <= 0:
        raise ValueError("length and tile must be positive")
    size = min(tile, length)
    if size == length:
        return [0]
    overlap = max(0, min(overlap, size // 3))
    n = -(-(length - overlap) // (size - overlap))  # ceil
    n = max(n, 2)
    return [(i * (length - size)) // (n - 1) for i in range(n)]


def _axis(length: int, tile: int, overlap: int) -> _Axis:
    starts = tile_starts(length, tile, overlap)
    size = min(tile, length)
    ramps: list[tuple[float, float]] = []
    for a, b in zip(starts, starts[1:], strict=False):
        shared = a + size - b  # px both tiles cover
        ramp = max(shared / 2, 1.0)
        ramps.append((b + (shared - ramp) / 2, ramp))
    ins = (None, *ramps)
    outs = (*ramps, None)
    return _Axis(tuple(starts), size, length, ins, outs)


def _axis_weight(axis: _Axis, i: int, scale: float) -> torch.Tensor:
    """Weight of tile i along one axis at each of its size*scale output pixels, float32 in [0, 1]."""
    n_out = round(axis.size * scale)
    pos = axis.starts[i] * scale + torch.arange(n_out, dtype=torch.float64) + 0.5  # output px centres
    w = torch.ones(n_out, dtype=torch.float64)
    if axis.ramps_in[i] is not None:
        a, r = axis.ramps_in[i]
        w = w * ((pos - a * scale) / (r * scale)).clamp(0, 1)
    if axis.ramps_out[i] is not None:
        a, r = axis.ramps_out[i]
        w = w * (1 - ((pos - a * scale) / (r * scale)).clamp(0, 1))
    return w.float()


class TileGrid:
    """Tiles covering a width x height image (input px); see the module docstring for the blending rule."""

    def __init__(self, width: int, height: int, tile_w: int, tile_h: int | None = None, overlap: int = 16):
        self.width, self.height = width, height
        self._x = _axis(width, tile_w, overlap)
        self._y = _axis(height, tile_h or tile_w, overlap)
        self.tiles: list[Tile] = [
            Tile(x, y, self._x.size, self._y.size, c, r)
            for r, y in enumerate(self._y.starts)
            for c, x in enumerate(self._x.starts)
        ]

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def tile_size(self) -> tuple[int, int]:
        """(w, h) of every tile, input px."""
        return self._x.size, self._y.size

    def weight(self, tile: Tile, scale: float = 1.0) -> torch.Tensor:
        """Blend weight of `tile` at output resolution: float32 (h*scale, w*scale) in [0, 1]; the weights of
        all tiles sum to 1 at every output pixel."""
        wy = _axis_weight(self._y, tile.row, scale)
        wx = _axis_weight(self._x, tile.col, scale)
        return wy[:, None] * wx[None, :]


class TileBlender:
    """Accumulates weighted tile outputs into a (n, c, height, width) float32 canvas on `device`."""

    def __init__(self, grid: TileGrid, n: int, channels: int, scale: float = 1.0, device: str = "cpu"):
        self.grid = grid
        self.scale = scale
        h, w = round(grid.height * scale), round(grid.width * scale)
        self.acc = torch.zeros(n, channels, h, w, dtype=torch.float32, device=device)
        self.wsum = torch.zeros(1, 1, h, w, dtype=torch.float32, device=device)

    def add(self, tile: Tile, values: torch.Tensor) -> None:
        """Add one tile's output, (n, c, tile.h*scale, tile.w*scale)."""
        w = self.grid.weight(tile, self.scale).to(self.acc.device)
        y0, x0 = round(tile.y * self.scale), round(tile.x * self.scale)
        h, wd = w.shape
        if values.shape[-2:] != (h, wd):
            raise ValueError(f"tile output is {tuple(values.shape[-2:])}, expected {(h, wd)}")
        self.acc[:, :, y0 : y0 + h, x0 : x0 + wd] += values.to(self.acc.device, torch.float32) * w
        self.wsum[:, :, y0 : y0 + h, x0 : x0 + wd] += w

    def result(self) -> torch.Tensor:
        """The blended canvas (n, c, height*scale, width*scale)."""
        return self.acc / self.wsum.clamp_min(1e-12)


def tiled_apply(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], *, tile: int, overlap: int,
                progress: Callable[[int, int], None] | None = None,
                cancel: Callable[[], None] | None = None) -> torch.Tensor:
    """Apply `fn` ((n, c, h, w) -> (n, c', h*s, w*s), integer or fractional s fixed by fn) to `x` tile by
    tile and blend. Returns float32 on the CPU (bounded device memory: one tile at a time on fn's device).
    `progress(done, total)` is called after each tile; `cancel()` before each (it may raise to stop)."""
    n, _, h, w = x.shape
    grid = TileGrid(w, h, tile, tile, overlap)
    blender: TileBlender | None = None
    for i, t in enumerate(grid.tiles):
        if cancel is not None:
            cancel()
        out = fn(x[:, :, t.y : t.y + t.h, t.x : t.x + t.w])
        if blender is None:
            scale = out.shape[-1] / t.w
            blender = TileBlender(grid, n, out.shape[1], scale)
        blender.add(t, out)
        if progress is not None:
            progress(i + 1, len(grid))
    assert blender is not None
    return blender.result()
