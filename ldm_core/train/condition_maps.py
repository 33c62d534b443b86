"""Depth and segmentation maps of shapes-world scenes (the renderer knows every object's mask, class and drawing
order), for the built-in model's depth and seg ControlNets, and the scenes that make depth meaningful.

- **Segmentation**: each pixel painted with its class colour in the style of the ADE20K palette that seg
  ControlNets read: the background one colour, each shape class its own (`SEG_PALETTE`, colours taken from
  the ADE20K palette); objects' colours are not in the map, so the prompt decides them.
- **Depth**: near is bright, as MiDaS-style maps are: the background 0, an object `DEPTH[0]`, an object drawn
  over another `DEPTH[1]` (nearer). `jitter_depth_maps` gives training maps the levels and softness of other
  depth sources (an estimator's relative depth, a user's painting), keeping the order near-bright.
- `read_seg_map` / `read_depth_map`: the same maps read back from an image of the built-in world (a user's
  generated image): objects are the background-distinct pixels split by palette colour (1-px rims dropped),
  their shape read by the analyser's geometry; of two touching objects, the one that owns most of the pixels
  where their convex hulls overlap is in front.
- `overlapping_scene`: two objects of different shapes that overlap, in a random drawing order, so which one is
  in front is something only the depth map says.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

from . import shapes
from .blur import gaussian_blur

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
    """Depth maps of packed scenes (near = bright), float32 (N, 3, size, size) in [0, 1], antialiased edges.
    An object is at `DEPTH[0]`, or at `DEPTH[1]` when it is drawn over an earlier one (what an image can show:
    objects apart from each other look alike at any depth)."""
    n = packed.shape[0]
    out = torch.zeros(n, 1, size, size)
    cover = shapes.object_coverages(packed, size)
    solid = cover > 0.5
    for k in range(shapes.MAX_OBJECTS):
        a = cover[:, k : k + 1]
        over = (solid[:, k : k + 1] & solid[:, :k].any(1, keepdim=True)).flatten(1).any(1) if k else None
        depth = (
            torch.full((n, 1, 1, 1), DEPTH[0])
            if over is None
            else torch.where(over.view(n, 1, 1, 1), DEPTH[1], DEPTH[0])
        )
        out = out * (1 - a) + depth * a
    return out.expand(n, 3, size, size).contiguous()


def jitter_depth_maps(maps: torch.Tensor, gen: torch.Generator, p: float) -> torch.Tensor:
    """Depth maps (N, C, H, W) in [0, 1], each with probability `p` given the look of another depth source: a
    depth estimator's output is relative, normalised per image, and a user paints grey levels of their own,
    so neither has the renderer's levels or hard edges. A chosen map's values v go through a random increasing
    curve lo + (hi - lo) * v ** gamma (lo 0-0.2, hi 0.75-1, gamma 0.5-2 log-uniform: the background is then lo, the
    renderer's back object anywhere from ~0.3 to ~0.75) and, half the time, a Gaussian blur of 0.3-1.2 px.
    Nearer stays brighter; the others are returned as they are."""
    n = maps.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    chosen = torch.rand(n, generator=gen) < p
    lo, hi, gamma = uniform(0.0, 0.2), uniform(0.75, 1.0), uniform(-1.0, 1.0).exp2()  # gamma log-uniform
    blur = torch.rand(n, generator=gen) < 0.5
    sigma = uniform(0.3, 1.2)
    out = maps.clone()
    for i in torch.nonzero(chosen).flatten().tolist():
        m = float(lo[i]) + float(hi[i] - lo[i]) * maps[i : i + 1].clamp(0, 1) ** float(gamma[i])
        if blur[i]:
            m = gaussian_blur(m, float(sigma[i]))
        out[i] = m[0]
    return out


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
    """Two objects of different shapes and colours and one size whose shapes overlap (centres 0.7-1.1 radii
    apart); the first one is drawn first (behind). Different shapes, so that a prompt naming both ("a red circle
    and a blue star") says which colour each silhouette of the map takes: of two circles, the map could not say
    which colour is in front."""
    background = rng.choice(shapes.COLOUR_NAMES)
    a_colour = shapes._pick_colour(rng, [background])
    b_colour = shapes._pick_colour(rng, [background, a_colour])
    size = rng.choice(("medium", "large"))
    r = shapes.SIZES[size]
    cx, cy = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65)
    angle = rng.uniform(0, 2 * math.pi)
    dx, dy = r * rng.uniform(0.35, 0.55) * math.cos(angle), r * rng.uniform(0.35, 0.55) * math.sin(angle)
    objs = []
    left = list(shapes.SHAPES)
    for colour, (x, y) in ((a_colour, (cx - dx, cy - dy)), (b_colour, (cx + dx, cy + dy))):
        shape = rng.choice(left)
        left.remove(shape)
        obj = shapes.make_object(shape, colour, size, _nearest_position(x, y))
        objs.append(shapes.ShapeObject(shape, colour, size, obj.position, x, y, r))
    return shapes.Scene(background, tuple(objs))


def _nearest_position(x: float, y: float) -> str:
    return min(shapes.POSITIONS, key=lambda p: (shapes.POSITIONS[p][0] - x) ** 2 + (shapes.POSITIONS[p][1] - y) ** 2)


# ---------------------------------------------------------------------------------------------- from an image


def _read_objects(image) -> tuple[np.ndarray, list[tuple[np.ndarray, str]]]:
    """(H x W x 3 float image, [(mask, colour name)]) of the objects in an image of the built-in world."""
    import cv2

    from .analyser import FG_THRESHOLD, MIN_AREA_FRACTION, _background, to_rgb_array

    img = to_rgb_array(image)
    h, w = img.shape[:2]
    bg_name, bg_rgb = _background(img)
    fg = np.linalg.norm(img - bg_rgb[None, None], axis=2) > FG_THRESHOLD
    palette = np.array([shapes.COLOURS[c] for c in shapes.COLOUR_NAMES], dtype=np.float32)
    names = np.argmin(np.linalg.norm(img[:, :, None, :] - palette[None, None], axis=3), axis=2)
    kernel = np.ones((3, 3), np.uint8)
    groups = []
    for i, colour in enumerate(shapes.COLOUR_NAMES):
        mask = (fg & (names == i)).astype(np.uint8)
        if colour == bg_name or not mask.any():
            continue
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)  # antialiased rims are 1 px: not objects
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        for j in range(1, n):
            if stats[j, cv2.CC_STAT_AREA] >= max(4, MIN_AREA_FRACTION * h * w):
                groups.append((labels == j, colour))
    return img, groups


def object_colours(image) -> set[str]:
    """The colour names of the objects in an image of the built-in world, overlapping ones included (the
    analyser reads touching objects as one component; here each colour is its own object)."""
    return {colour for _, colour in _read_objects(image)[1]}


def _touching(a: np.ndarray, b: np.ndarray) -> bool:
    import cv2

    return bool((cv2.dilate(a.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool) & b).any())


def _hull(mask: np.ndarray) -> np.ndarray:
    import cv2

    pts = cv2.findNonZero(mask.astype(np.uint8))
    out = np.zeros(mask.shape, np.uint8)
    cv2.fillConvexPoly(out, cv2.convexHull(pts), 1)
    return out.astype(bool)


def _paint(out: np.ndarray, mask: np.ndarray, value) -> None:
    import cv2

    grown = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)  # cover the rim back
    out[grown] = value


def _fronts(groups: list) -> list[bool]:
    """Per object: drawn over a touching one (owns most of the pixels where their convex hulls overlap)."""
    front = [False] * len(groups)
    hulls = [_hull(m) for m, _ in groups]
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            if not _touching(groups[i][0], groups[j][0]):
                continue
            both = hulls[i] & hulls[j]
            mine, theirs = int((groups[i][0] & both).sum()), int((groups[j][0] & both).sum())
            front[i if mine >= theirs else j] = True
    return front


def read_seg_map(image) -> Image.Image:
    """The segmentation map (`SEG_PALETTE`) of an image of the built-in world. An object partly hidden by
    another is classified by its convex hull (its visible part has a bite taken out)."""
    from .analyser import classify_shape, mask_features

    img, groups = _read_objects(image)
    out = np.empty(img.shape, np.uint8)
    out[:] = SEG_PALETTE["background"]
    fronts = _fronts(groups)
    order = sorted(range(len(groups)), key=lambda i: fronts[i])  # hidden ones first, the front painted over
    for i in order:
        mask, _ = groups[i]
        hidden = any(_touching(mask, m) for k, (m, _) in enumerate(groups) if k != i) and not fronts[i]
        shape = classify_shape(mask_features(_hull(mask) if hidden else mask))
        if shape in SEG_PALETTE:
            _paint(out, mask, SEG_PALETTE[shape])
    return Image.fromarray(out, "RGB")


def read_depth_map(image) -> Image.Image:
    """The depth map (near bright, `DEPTH`) of an image of the built-in world."""
    img, groups = _read_objects(image)
    out = np.zeros(img.shape[:2], np.float32)
    fronts = _fronts(groups)
    for i in sorted(range(len(groups)), key=lambda i: fronts[i]):
        _paint(out, groups[i][0], DEPTH[1] if fronts[i] else DEPTH[0])
    return Image.fromarray((out * 255).round().astype(np.uint8), "L").convert("RGB")


# ---------------------------------------------------------------------------------------------- drawn by hand


#: Side of the canvas a hand-drawn map is painted on (a user's drawing, larger than the model's size).
DRAWN_CANVAS = 512


def _wobbly(points: list[tuple[float, float]], r: float, rng: random.Random, wobble: float) -> list:
    """A closed polygon through `points` as a hand would draw it: each edge in short strokes that stray
    from the straight line by up to `wobble` * r."""
    out = []
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1], strict=True):
        for t in np.linspace(0.0, 1.0, 6, endpoint=False):
            out.append(
                (
                    x0 + (x1 - x0) * t + rng.uniform(-wobble, wobble) * r,
                    y0 + (y1 - y0) * t + rng.uniform(-wobble, wobble) * r,
                )
            )
    return out


def drawn_outline(obj: shapes.ShapeObject, rng: random.Random) -> list[tuple[float, float]]:
    """The outline of `obj` (0..1 image units) drawn freehand: not the renderer's geometry but one of the
    same kind, size and place, with its own proportions, a tilt, uneven corners and wobbling edges."""
    r = obj.radius * rng.uniform(0.9, 1.12)
    tilt = rng.uniform(-0.25, 0.25)
    if obj.shape == "circle":
        aspect = rng.uniform(0.85, 1.15)
        pts = [(math.cos(a) * aspect, math.sin(a) / aspect) for a in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
    elif obj.shape == "square":
        pts = [(-0.9, -0.9), (0.9, -0.9), (0.9, 0.9), (-0.9, 0.9)]
    elif obj.shape == "triangle":
        pts = [(0.0, -1.15), (1.05, 0.7), (-1.05, 0.7)]
    elif obj.shape == "diamond":
        w = rng.uniform(0.75, 1.05)
        pts = [(0.0, -1.15), (w, 0.0), (0.0, 1.15), (-w, 0.0)]
    else:  # star: five points, a hand's inner/outer ratio
        inner = rng.uniform(0.38, 0.55)
        pts = [
            (
                (1.15 if k % 2 == 0 else 1.15 * inner) * math.cos(-math.pi / 2 + k * math.pi / 5),
                (1.15 if k % 2 == 0 else 1.15 * inner) * math.sin(-math.pi / 2 + k * math.pi / 5),
            )
            for k in range(10)
        ]
    c, s = math.cos(tilt), math.sin(tilt)
    corners = [
        (
            obj.cx + r * (x * c - y * s + rng.uniform(-0.08, 0.08)),
            obj.cy + r * (x * s + y * c + rng.uniform(-0.08, 0.08)),
        )
        for x, y in pts
    ]
    return _wobbly(corners, r, rng, 0.025 if obj.shape == "circle" else 0.04)


def _drawn_outlines(scene: shapes.Scene, seed: str) -> list[list[tuple[float, float]]]:
    rng = random.Random(f"drawn:{seed}:{scene!r}")
    return [drawn_outline(o, rng) for o in scene.objects]


def drawn_masks(scene: shapes.Scene, size: int, seed: str = "") -> np.ndarray:
    """Each object's hand-drawn region (`drawn_map` with the same seed) at `size`: bool (objects, size, size)."""
    from PIL import ImageDraw

    out = []
    for poly in _drawn_outlines(scene, seed):
        im = Image.new("L", (size * 4, size * 4), 0)
        ImageDraw.Draw(im).polygon([(x * size * 4, y * size * 4) for x, y in poly], fill=255)
        out.append(np.asarray(im.resize((size, size), Image.BOX)) > 127)
    return np.stack(out)


def drawn_map(scene: shapes.Scene, condition: str, seed: str = "", canvas: int = DRAWN_CANVAS) -> Image.Image:
    """A map of `scene` as a user might paint one in an image editor (not made by the renderer): freehand
    outlines (`drawn_outline`) on a `canvas`-px image, antialiased. seg: filled in colours a little off the
    palette, sometimes saved as JPEG; depth: filled in grey levels of the user's choosing (the later object
    nearer, so brighter), softened as a depth estimator's output is; canny: a sketch to give the canny
    preprocessor, the outlines stroked with a dark pen of some width on light paper, sometimes JPEG."""
    from PIL import ImageDraw, ImageFilter

    rng = random.Random(f"drawn-map:{seed}:{scene!r}")
    big = canvas * 2
    if condition == "canny":
        paper = tuple(rng.randint(225, 255) for _ in range(3))
        im = Image.new("RGB", (big, big), paper)
        draw = ImageDraw.Draw(im)
        for poly in _drawn_outlines(scene, seed):
            pen = tuple(rng.randint(0, 60) for _ in range(3))
            pts = [(x * big, y * big) for x, y in poly]
            draw.line([*pts, pts[0]], fill=pen, width=max(2, round(big * rng.uniform(0.006, 0.02))), joint="curve")
        im = im.resize((canvas, canvas), Image.LANCZOS)
        return _maybe_jpeg(im, rng)

    def off(rgb) -> tuple[int, ...]:
        return tuple(int(np.clip(v + rng.randint(-8, 8), 0, 255)) for v in rgb)

    if condition == "seg":
        background = off(SEG_PALETTE["background"])
        fills = [off(SEG_PALETTE[o.shape]) for o in scene.objects]
    else:
        grey = [rng.uniform(0.0, 0.15), rng.uniform(0.35, 0.6), rng.uniform(0.8, 1.0)]
        background = (round(grey[0] * 255),) * 3
        fills = [(round(grey[1 + min(k, 1)] * 255),) * 3 for k in range(len(scene.objects))]
    im = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(im)
    for poly, fill in zip(_drawn_outlines(scene, seed), fills, strict=True):
        draw.polygon([(x * big, y * big) for x, y in poly], fill=fill)
    im = im.resize((canvas, canvas), Image.LANCZOS)
    if condition == "depth":
        return im.filter(ImageFilter.GaussianBlur(canvas / 128))
    return _maybe_jpeg(im, rng)


def _maybe_jpeg(im: Image.Image, rng: random.Random) -> Image.Image:
    """`im` as it comes back from a JPEG at quality 80 half the time (users save their drawings so)."""
    if rng.random() < 0.5:
        import io

        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=80)
        im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return im
