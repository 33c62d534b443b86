"""Depth and segmentation maps of shapes-world scenes (the renderer knows every object's mask, class and drawing
order), for the built-in model's depth and seg ControlNets, and the scenes that make depth meaningful.

- **Segmentation**: each pixel painted with its class colour in the style of the ADE20K palette that seg
  ControlNets read: the background one colour, each shape class its own (`SEG_PALETTE`, colours taken from
  the ADE20K palette); objects' colours are not in the map, so the prompt decides them.
- **Depth**: near is bright, as MiDaS-style maps are: the background 0, the first-drawn object `DEPTH[0]`, an
  object drawn over it `DEPTH[1]` (nearer).
- `overlapping_scene`: two objects whose shapes overlap, in a random drawing order, so which one is in front
  is something only the depth map says.
"""

from __future__ import annotations

import math
import random

import torch

from . import shapes

#: class -> RGB (0-255), from the ADE20K palette (wall, then the colours of five other ADE20K classes).
SEG_PALETTE: dict[str, tuple[int, int, int]] = {
    "background": (120, 120, 120),
    "circle": (255, 6, 82),
    "square": (8, 255, 51),
    "triangle": (255, 204, 0),
    "star": (61, 230, 250),
    "diamond": (224, 5, 255),
}
#: Depth of the first-drawn and the second-drawn object (1 = nearest); the background is 0.
DEPTH = (0.55, 0.95)
CONDITIONS = ("canny", "depth", "seg")


def seg_maps(packed: torch.Tensor, size: int) -> torch.Tensor:
    """Segmentation maps of packed scenes, float32 (N, 3, size, size) in [0, 1] (hard class edges)."""
    n = packed.shape[0]
    palette = torch.tensor([SEG_PALETTE[c] for c in ("background", *shapes.SHAPES)], dtype=torch.float32) / 255
    out = palette[0].view(1, 3, 1, 1).expand(n, 3, size, size).clone()
    cover = shapes.object_coverages(packed, size)
    for k in range(shapes.MAX_OBJECTS):
        idx = packed[:, 3 + k * shapes._OBJ_FIELDS + 1].round().long().clamp(0, len(shapes.SHAPES) - 1)
        colour = palette[1 + idx].view(n, 3, 1, 1)
        mask = (cover[:, k : k + 1] > 0.5).float()
        out = out * (1 - mask) + colour * mask
    return out


def depth_maps(packed: torch.Tensor, size: int) -> torch.Tensor:
    """Depth maps of packed scenes (near = bright), float32 (N, 3, size, size) in [0, 1], antialiased edges."""
    n = packed.shape[0]
    out = torch.zeros(n, 1, size, size)
    cover = shapes.object_coverages(packed, size)
    for k in range(shapes.MAX_OBJECTS):
        a = cover[:, k : k + 1]
        out = out * (1 - a) + DEPTH[k] * a
    return out.expand(n, 3, size, size).contiguous()


def condition_maps(condition: str, packed: torch.Tensor, images: torch.Tensor, size: int) -> torch.Tensor:
    """The control maps of one kind for a batch (canny from the rendered `images`, the others from `packed`)."""
    if condition == "depth":
        return depth_maps(packed, size)
    if condition == "seg":
        return seg_maps(packed, size)
    if condition == "canny":
        from .controlnet import canny_maps

        return canny_maps(images)
    raise ValueError(f"unknown condition {condition!r}; choose from {', '.join(CONDITIONS)}")


def overlapping_scene(rng: random.Random) -> shapes.Scene:
    """Two objects of different colours and one size whose shapes overlap (centres 0.7-1.1 radii apart);
    the first one is drawn first (behind)."""
    background = rng.choice(shapes.COLOUR_NAMES)
    a_colour = shapes._pick_colour(rng, [background])
    b_colour = shapes._pick_colour(rng, [background, a_colour])
    size = rng.choice(("medium", "large"))
    r = shapes.SIZES[size]
    cx, cy = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65)
    angle = rng.uniform(0, 2 * math.pi)
    dx, dy = r * rng.uniform(0.35, 0.55) * math.cos(angle), r * rng.uniform(0.35, 0.55) * math.sin(angle)
    objs = []
    for colour, (x, y) in ((a_colour, (cx - dx, cy - dy)), (b_colour, (cx + dx, cy + dy))):
        shape = rng.choice(shapes.SHAPES)
        obj = shapes.make_object(shape, colour, size, _nearest_position(x, y))
        objs.append(shapes.ShapeObject(shape, colour, size, obj.position, x, y, r))
    return shapes.Scene(background, tuple(objs))


def _nearest_position(x: float, y: float) -> str:
    return min(shapes.POSITIONS, key=lambda p: (shapes.POSITIONS[p][0] - x) ** 2 + (shapes.POSITIONS[p][1] - y) ** 2)
