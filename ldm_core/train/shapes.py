"""The built-in model's world: scenes of one or two flat shapes on a coloured background, their captions,
and a vectorised renderer.

A `Scene` is a background colour plus one or two `ShapeObject`s (shape, colour, size class, position
class, and the exact centre/radius that were drawn). `sample_scenes(seed, n)` draws scenes and captions
deterministically from a seed; `render(scenes)` draws them as a float tensor batch with signed-distance
functions and ~1 px antialiasing, on any torch device (so training renders on the GPU directly).

Coordinates: x to the right, y downwards, both in [0, 1] of the image side; a shape's `cx, cy` is the
centre of its bounding box and `radius` its size in image-side units (see `SHAPE_EXTENT` for the
bounding box half-size of each shape in units of `radius`).

The shape "heart" is deliberately absent: it is kept for the LoRA demo (a concept the base model lacks).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

#: Named colours, sRGB 0-255. Pairwise distances are >= ~95 so the analyser can tell them apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (240, 130, 25),
    "yellow": (250, 225, 35),
    "green": (40, 165, 60),
    "cyan": (40, 200, 215),
    "blue": (35, 75, 215),
    "purple": (135, 55, 185),
    "pink": (245, 125, 190),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "black": (25, 25, 25),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
#: Words a caption may use for a colour (the first is the canonical one).
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red",),
    "orange": ("orange",),
    "yellow": ("yellow",),
    "green": ("green",),
    "cyan": ("cyan", "turquoise"),
    "blue": ("blue",),
    "purple": ("purple", "violet"),
    "pink": ("pink",),
    "white": ("white",),
    "gray": ("gray", "grey"),
    "black": ("black",),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round dot"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star", "five-pointed star"),
    "diamond": ("diamond", "rhombus"),
}
#: Half width and half height of each shape's bounding box, in units of the object's `radius`.
SHAPE_EXTENT: dict[str, tuple[float, float]] = {
    "circle": (1.0, 1.0),
    "square": (0.9, 0.9),
    "triangle": (1.08, 0.935),  # equilateral, side 2.16 r, pointing up
    "star": (1.05, 1.0),  # five points, one pointing up
    "diamond": (1.05, 1.05),  # square turned 45 degrees
}
_STAR_INNER = 0.5  # inner radius / outer radius of the star
_STAR_OUTER = SHAPE_EXTENT["star"][0] / math.sin(math.radians(72))
#: Area of each shape in units of radius**2 (the analyser estimates sizes from it).
SHAPE_AREA: dict[str, float] = {
    "circle": math.pi,
    "square": (2 * SHAPE_EXTENT["square"][0]) ** 2,
    "triangle": math.sqrt(3) / 4 * (2 * SHAPE_EXTENT["triangle"][0]) ** 2,
    "star": 5 * _STAR_OUTER * (_STAR_INNER * _STAR_OUTER) * math.sin(math.radians(36)),
    "diamond": 2 * SHAPE_EXTENT["diamond"][0] ** 2,
}

#: Size classes: radius in image-side units (before a +-7 % jitter).
SIZES: dict[str, float] = {"small": 0.13, "medium": 0.17, "large": 0.22}
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium", "medium-sized", "mid-sized"),
    "large": ("large", "big", "huge"),
}

#: Position classes: the centre of the object's bounding box (before a +-0.03 jitter).
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top": (0.5, 0.25),
    "top right": (0.75, 0.25),
    "left": (0.25, 0.5),
    "centre": (0.5, 0.5),
    "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom": (0.5, 0.75),
    "bottom right": (0.75, 0.75),
}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "at the top left", "in the upper left", "top-left"),
    "top": ("at the top", "at the top of the image", "near the top", "in the upper middle"),
    "top right": ("in the top right corner", "at the top right", "in the upper right", "top-right"),
    "left": ("on the left", "at the left side", "on the left side", "to the left"),
    "centre": ("in the centre", "in the center", "in the middle", "centred"),
    "right": ("on the right", "at the right side", "on the right side", "to the right"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left", "bottom-left"),
    "bottom": ("at the bottom", "at the bottom of the image", "near the bottom", "in the lower middle"),
    "bottom right": (
        "in the bottom right corner",
        "at the bottom right",
        "in the lower right",
        "bottom-right",
    ),
}
#: Short tag form of each position, for tag-style captions ("red circle, top left, white background").
POSITION_TAGS: dict[str, tuple[str, ...]] = {
    "top left": ("top left", "upper left"),
    "top": ("top",),
    "top right": ("top right", "upper right"),
    "left": ("left",),
    "centre": ("centre", "center", "middle"),
    "right": ("right",),
    "bottom left": ("bottom left", "lower left"),
    "bottom": ("bottom",),
    "bottom right": ("bottom right", "lower right"),
}

MIN_COLOUR_DISTANCE = 90.0  # objects differ at least this much (RGB 0-255) from the background
TWO_OBJECT_FRACTION = 0.35
MAX_OBJECTS = 2
#: how far an object's centre moves from its position class in the training scenes (each axis), by default
POSITION_JITTER = 0.03
#: the widest `position_jitter` that still leaves every object nearest its own position class (half their spacing)
MAX_POSITION_JITTER = 0.12
_SIZE_JITTER = 0.07


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape. `cx, cy, radius` are in image-side units (0..1), y downwards."""

    shape: str
    colour: str
    size: str
    position: str
    cx: float
    cy: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """A background colour name and one or two shapes; `caption` is the text the model is trained on."""

    background: str
    objects: tuple[ShapeObject, ...]
    caption: str = ""
    extras: dict = field(default_factory=dict, compare=False)

    def attributes(self) -> dict:
        """A JSON-friendly record of what was drawn (for eval reports and the data dump)."""
        return {
            "background": self.background,
            "caption": self.caption,
            "objects": [
                {
                    "shape": o.shape,
                    "colour": o.colour,
                    "size": o.size,
                    "position": o.position,
                    "cx": round(o.cx, 4),
                    "cy": round(o.cy, 4),
                    "radius": round(o.radius, 4),
                }
                for o in self.objects
            ],
        }


def colour_distance(a: str, b: str) -> float:
    """Euclidean distance between two named colours in RGB 0-255."""
    return math.dist(COLOURS[a], COLOURS[b])


def _pairs_far_apart() -> tuple[tuple[str, str], ...]:
    """Position pairs whose centres are at least 0.5 apart along x or y (two objects never touch)."""
    names = list(POSITIONS)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            (ax, ay), (bx, by) = POSITIONS[a], POSITIONS[b]
            if max(abs(ax - bx), abs(ay - by)) >= 0.5 - 1e-9:
                out.append((a, b))
    return tuple(out)


TWO_OBJECT_POSITION_PAIRS = _pairs_far_apart()


def make_object(
    shape: str,
    colour: str,
    size: str,
    position: str,
    rng: random.Random | None = None,
    position_jitter: float = POSITION_JITTER,
) -> ShapeObject:
    """A shape at a named position/size; `rng` adds the same small jitter the training data has (the centre moves
    up to `position_jitter` of the image along each axis)."""
    r = SIZES[size]
    x, y = POSITIONS[position]
    if rng is not None:
        r *= 1.0 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER)
        x += rng.uniform(-position_jitter, position_jitter)
        y += rng.uniform(-position_jitter, position_jitter)
    hx, hy = SHAPE_EXTENT[shape]
    margin = 0.02  # keep the whole shape inside the image
    x = min(max(x, margin + hx * r), 1.0 - margin - hx * r)
    y = min(max(y, margin + hy * r), 1.0 - margin - hy * r)
    return ShapeObject(shape, colour, size, position, x, y, r)


def _pick_colour(rng: random.Random, avoid: list[str]) -> str:
    while True:
        c = rng.choice(COLOUR_NAMES)
        if all(colour_distance(c, a) >= MIN_COLOUR_DISTANCE for a in avoid):
            return c


def sample_scene(rng: random.Random, n_objects: int | None = None, position_jitter: float = POSITION_JITTER) -> Scene:
    """Draw one random scene (without caption). `n_objects` 1 or 2; None picks 2 with p=0.35. A lone object's
    centre moves up to `position_jitter` from its position class (at most `MAX_POSITION_JITTER`, so that the
    caption's place word stays the nearest; `MAX_POSITION_JITTER` covers the image continuously); two objects
    keep the small default jitter, so that they never touch."""
    if not 0 <= position_jitter <= MAX_POSITION_JITTER:
        raise ValueError(f"position_jitter: {position_jitter} is outside 0..{MAX_POSITION_JITTER}")
    if n_objects is None:
        n_objects = 2 if rng.random() < TWO_OBJECT_FRACTION else 1
    background = rng.choice(COLOUR_NAMES)
    if n_objects == 1:
        obj = make_object(
            rng.choice(SHAPES),
            _pick_colour(rng, [background]),
            rng.choice(tuple(SIZES)),
            rng.choice(tuple(POSITIONS)),
            rng,
            position_jitter,
        )
        return Scene(background, (obj,))
    pa, pb = rng.choice(TWO_OBJECT_POSITION_PAIRS)
    if rng.random() < 0.5:
        pa, pb = pb, pa
    first_shape, first_colour = rng.choice(SHAPES), _pick_colour(rng, [background])
    while True:  # two objects never share both shape and colour, so captions stay unambiguous
        second_shape, second_colour = rng.choice(SHAPES), _pick_colour(rng, [background])
        if (second_shape, second_colour) != (first_shape, first_colour):
            break
    objs = (
        make_object(first_shape, first_colour, rng.choice(("small", "medium")), pa, rng),
        make_object(second_shape, second_colour, rng.choice(("small", "medium")), pb, rng),
    )
    return Scene(background, objs)


# ----------------------------------------------------------------------------------------- captions
def article(word: str) -> str:
    """ "a" or "an" before `word`."""
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(o: ShapeObject, rng: random.Random, p_size: float, p_colour: float) -> str:
    """'small red circle' with size/colour words present with the given probabilities."""
    words = []
    if rng.random() < p_size:
        words.append(rng.choice(SIZE_WORDS[o.size]))
    if rng.random() < p_colour:
        words.append(rng.choice(COLOUR_WORDS[o.colour]))
    words.append(rng.choice(SHAPE_WORDS[o.shape]))
    return " ".join(words)


def object_phrase(o: ShapeObject, rng: random.Random) -> str:
    """One object alone, as a user names what to paint into a mask: "a blue star", "one small red circle"
    (the colour nearly always, the size sometimes; no position, no background)."""
    return _with_article(_noun_phrase(o, rng, 0.3, 0.95), rng)


def _with_article(phrase: str, rng: random.Random) -> str:
    r = rng.random()
    if r < 0.8:
        return f"{article(phrase)} {phrase}"
    if r < 0.9:
        return f"one {phrase}"
    return phrase


def _background_phrase(bg: str, rng: random.Random) -> str:
    c = rng.choice(COLOUR_WORDS[bg])
    a = article(c)
    return rng.choice(
        (
            f"on {a} {c} background",
            f"on {a} {c} background",
            f"against {a} {c} background",
            f"with {a} {c} background",
            f", {c} background",
            f"on {c}",
            f"over a plain {c} backdrop",
        )
    )


def _join(*parts: str) -> str:
    s = " ".join(p for p in parts if p)
    return s.replace(" ,", ",").strip(" ,")


def caption_single(scene: Scene, rng: random.Random) -> str:
    """A caption for a one-object scene, from varied templates; some attributes are left out."""
    o = scene.objects[0]
    use_pos = rng.random() < 0.65
    use_bg = rng.random() < 0.7
    style = rng.random()
    if style < 0.25:  # tag style, shuffled
        if rng.random() < 0.45:  # colour and shape as separate tags ("red, circle, ..."); either may be absent
            tags = []
            if rng.random() < 0.92:
                tags.append(rng.choice(COLOUR_WORDS[o.colour]))
            if rng.random() < 0.85 or not tags:
                tags.append(rng.choice(SHAPE_WORDS[o.shape]))
        else:
            tags = [_noun_phrase(o, rng, 0.0, 0.9)]
        if rng.random() < 0.5:
            tags.append(rng.choice(SIZE_WORDS[o.size]))
        if use_pos:
            tags.append(rng.choice(POSITION_TAGS[o.position]))
        if use_bg:
            tags.append(f"{rng.choice(COLOUR_WORDS[scene.background])} background")
        rng.shuffle(tags)
        return ", ".join(tags)
    noun = _noun_phrase(o, rng, 0.5, 0.9)
    pos = rng.choice(POSITION_PHRASES[o.position]) if use_pos else ""
    bg = _background_phrase(scene.background, rng) if use_bg else ""
    if style < 0.62:
        return _join(_with_article(noun, rng), pos, bg)
    if style < 0.72:
        lead = rng.choice(("a picture of", "an image of", "a drawing of", "a simple drawing of"))
        return _join(lead, _with_article(noun, rng), pos, bg)
    if style < 0.82 and use_bg:
        c = rng.choice(COLOUR_WORDS[scene.background])
        return _join(f"{c} background with", _with_article(noun, rng), pos)
    if style < 0.9 and pos:
        return _join(pos[0].upper() + pos[1:], ",", _with_article(noun, rng), bg).lower()
    return _join(noun, pos, bg)


def caption_double(scene: Scene, rng: random.Random) -> str:
    """A caption for a two-object scene: both objects named, in either order."""
    a, b = scene.objects
    if rng.random() < 0.5:
        a, b = b, a
    use_pos = rng.random() < 0.4
    use_bg = rng.random() < 0.6
    na, nb = _noun_phrase(a, rng, 0.3, 0.95), _noun_phrase(b, rng, 0.3, 0.95)
    if rng.random() < 0.2:  # tag style
        tags = [na, nb]
        if use_bg:
            tags.append(f"{rng.choice(COLOUR_WORDS[scene.background])} background")
        return ", ".join(tags)
    pa = rng.choice(POSITION_PHRASES[a.position]) if use_pos else ""
    pb = rng.choice(POSITION_PHRASES[b.position]) if use_pos else ""
    bg = _background_phrase(scene.background, rng) if use_bg else ""
    joiner = rng.choice(("and", "and", "and", "next to", "with"))
    if use_pos:
        joiner = "and"
    lead = rng.choice(("", "", "", "two shapes:", "a picture of"))
    return _join(lead, _with_article(na, rng), pa, joiner, _with_article(nb, rng), pb, bg)


def caption(scene: Scene, rng: random.Random) -> str:
    """A caption for `scene` (single- or two-object templates)."""
    return caption_single(scene, rng) if len(scene.objects) == 1 else caption_double(scene, rng)


def sample_scenes(
    seed: int | str, n: int, n_objects: int | None = None, position_jitter: float = POSITION_JITTER
) -> list[Scene]:
    """`n` captioned scenes, the same for the same (seed, n, n_objects, position_jitter) on every machine."""
    rng = random.Random(f"ldm-shapes:{seed}")
    out = []
    for _ in range(n):
        s = sample_scene(rng, n_objects, position_jitter)
        out.append(Scene(s.background, s.objects, caption(s, rng)))
    return out


# ----------------------------------------------------------------------------------------- renderer
#: Columns of the packed (N, PACKED_WIDTH) float tensor a batch of scenes travels as.
_OBJ_FIELDS = 8  # present, shape index, cx, cy, radius, r, g, b
PACKED_WIDTH = 3 + MAX_OBJECTS * _OBJ_FIELDS


def pack_scenes(scenes: list[Scene]) -> torch.Tensor:
    """Scenes as a float32 (N, PACKED_WIDTH) tensor: background RGB (0..1) then per object
    [present, shape index, cx, cy, radius, R, G, B]. Cheap to send to workers/devices."""
    out = torch.zeros(len(scenes), PACKED_WIDTH)
    rows = []
    for s in scenes:
        row = [c / 255.0 for c in COLOURS[s.background]]
        for k in range(MAX_OBJECTS):
            if k < len(s.objects):
                o = s.objects[k]
                row += [1.0, float(SHAPES.index(o.shape)), o.cx, o.cy, o.radius]
                row += [c / 255.0 for c in COLOURS[o.colour]]
            else:
                row += [0.0] * _OBJ_FIELDS
        rows.append(row)
    if rows:
        out[:] = torch.tensor(rows, dtype=torch.float32)
    return out


def _sd_circle(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(px * px + py * py) - 1.0


def _sd_box(px: torch.Tensor, py: torch.Tensor, half: float) -> torch.Tensor:
    dx, dy = px.abs() - half, py.abs() - half
    outside = torch.sqrt(dx.clamp(min=0) ** 2 + dy.clamp(min=0) ** 2)
    return outside + torch.maximum(dx, dy).clamp(max=0)


def _sd_triangle(px: torch.Tensor, py_up: torch.Tensor, half_side: float) -> torch.Tensor:
    """Equilateral triangle pointing up, centroid at the origin, y upwards (I. Quilez's formula)."""
    k = math.sqrt(3.0)
    x = px.abs() - half_side
    y = py_up + half_side / k
    fold = (x + k * y) > 0
    x2 = torch.where(fold, (x - k * y) / 2, x)
    y2 = torch.where(fold, (-k * x - y) / 2, y)
    x2 = x2 - x2.clamp(min=-2 * half_side, max=0)
    return -torch.sqrt(x2 * x2 + y2 * y2) * torch.sign(y2)


def _sd_star5(px: torch.Tensor, py_up: torch.Tensor, r: float, rf: float) -> torch.Tensor:
    """Five-pointed star of outer radius r, inner/outer ratio rf, one point up (I. Quilez's formula)."""
    k1x, k1y = 0.809016994375, -0.587785252292
    k2x, k2y = -k1x, k1y
    x, y = px.abs(), py_up
    d = (k1x * x + k1y * y).clamp(min=0) * 2
    x, y = x - d * k1x, y - d * k1y
    d = (k2x * x + k2y * y).clamp(min=0) * 2
    x, y = x - d * k2x, y - d * k2y
    x = x.abs()
    y = y - r
    bax, bay = rf * (-k1y) * r, rf * k1x * r - r  # rf*(-k1.y, k1.x)*r - (0, r)
    h = ((x * bax + y * bay) / (bax * bax + bay * bay)).clamp(0.0, 1.0)
    dx, dy = x - bax * h, y - bay * h
    return torch.sqrt(dx * dx + dy * dy) * torch.sign(y * bax - x * bay)


def _shape_sdf(shape_idx: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Signed distance in units of the object radius, for coordinates relative to the bbox centre
    (y downwards) also in units of the radius. `shape_idx` broadcasts against px/py."""
    up = -py
    sd = _sd_circle(px, py)
    sd = torch.where(shape_idx == SHAPES.index("square"), _sd_box(px, py, SHAPE_EXTENT["square"][0]), sd)
    half_side = SHAPE_EXTENT["triangle"][0]
    # the centroid sits below the bbox centre by (2/sqrt3 - 1/sqrt3)/2 * half_side = half_side/(2 sqrt3)
    tri = _sd_triangle(px, up + half_side / (2 * math.sqrt(3.0)), half_side)
    sd = torch.where(shape_idx == SHAPES.index("triangle"), tri, sd)
    # star: outer radius R, bbox from -R*cos36 to R vertically -> centre offset R*(1-cos36)/2
    r_star = 1.0 / math.sin(math.radians(72))  # half width = R sin72 = 1 ... scaled below
    r_star *= SHAPE_EXTENT["star"][0]
    off = r_star * (1 - math.cos(math.radians(36))) / 2
    sd = torch.where(shape_idx == SHAPES.index("star"), _sd_star5(px, up + off, r_star, _STAR_INNER), sd)
    h = SHAPE_EXTENT["diamond"][0]
    dia = (px.abs() + py.abs() - h) / math.sqrt(2.0)
    sd = torch.where(shape_idx == SHAPES.index("diamond"), dia, sd)
    return sd


def render_packed(packed: torch.Tensor, size: int = 64, with_coverage: bool = False):
    """Render packed scenes (see `pack_scenes`) on `packed.device`: float32 (N, 3, size, size) in [0, 1];
    with `with_coverage` also the objects' union coverage, float32 (N, 1, size, size) in [0, 1].

    Each object's coverage is clamp(0.5 - signed distance in pixels, 0, 1): a ~1 px antialiased edge.
    """
    n = packed.shape[0]
    img = packed[:, 0:3].view(n, 3, 1, 1).expand(n, 3, size, size).clone()
    empty = torch.ones(n, 1, size, size, device=packed.device)
    alphas = object_coverages(packed, size)
    for k in range(MAX_OBJECTS):
        alpha = alphas[:, k : k + 1]
        f = packed[:, 3 + k * _OBJ_FIELDS : 3 + (k + 1) * _OBJ_FIELDS]
        img = img * (1 - alpha) + f[:, 5:8].view(n, 3, 1, 1) * alpha
        empty = empty * (1 - alpha)
    return (img, 1 - empty) if with_coverage else img


def _object_frames(packed: torch.Tensor, size: int):
    """For each object slot k in drawing order: (k, present (N, 1, 1) float, shape index (N, 1, 1) long, radius
    (N, 1, 1), px, py), with px, py the centres of a `size` x `size` pixel grid relative to the object's centre
    in units of its radius (what `_shape_sdf` takes)."""
    n = packed.shape[0]
    coords = (torch.arange(size, device=packed.device, dtype=torch.float32) + 0.5) / size
    gy, gx = coords.view(1, size, 1), coords.view(1, 1, size)
    for k in range(MAX_OBJECTS):
        f = packed[:, 3 + k * _OBJ_FIELDS : 3 + (k + 1) * _OBJ_FIELDS]
        present, shape_idx = f[:, 0].view(n, 1, 1), f[:, 1].round().long().view(n, 1, 1)
        cx, cy, rad = f[:, 2].view(n, 1, 1), f[:, 3].view(n, 1, 1), f[:, 4].view(n, 1, 1).clamp(min=1e-4)
        yield k, present, shape_idx, rad, (gx - cx) / rad, (gy - cy) / rad


def object_coverages(packed: torch.Tensor, size: int) -> torch.Tensor:
    """Each object's own coverage, float32 (N, MAX_OBJECTS, size, size) in [0, 1], in drawing order (a later
    object is drawn over an earlier one); zero for absent objects."""
    out = torch.zeros(packed.shape[0], MAX_OBJECTS, size, size, device=packed.device)
    for k, present, shape_idx, rad, px, py in _object_frames(packed, size):
        sd = _shape_sdf(shape_idx, px, py) * rad * size  # in pixels
        out[:, k] = (0.5 - sd).clamp(0.0, 1.0) * present
    return out


def shape_contrast(packed: torch.Tensor, size: int, supersample: int = 4) -> torch.Tensor:
    """Where the objects' shapes show, bool (N, 1, size, size): the cells in which a present object's own shape
    and a blob of the same centre and radius disagree on coverage — a circle for the other shapes (a square's
    corners, a star's points and notches, a triangle's apex), a square for a circle (the corners it leaves
    empty). A model that does not know the shape draws the blob, so these cells are the ones that tell.
    Worked out at `supersample` x `size` and kept where any sub-cell disagrees, so a small object's few
    telling pixels still mark their cell."""
    fine = size * supersample
    circle, square = SHAPES.index("circle"), SHAPES.index("square")
    out = torch.zeros(packed.shape[0], fine, fine, dtype=torch.bool, device=packed.device)
    for _k, present, own, _rad, px, py in _object_frames(packed, fine):
        blob = torch.where(own == circle, torch.full_like(own, square), torch.full_like(own, circle))
        differs = (_shape_sdf(own, px, py) < 0) != (_shape_sdf(blob, px, py) < 0)
        out |= differs & (present > 0.5)
    pooled = F.max_pool2d(out.float().unsqueeze(1), supersample)
    return pooled > 0


def render(scenes: list[Scene], size: int = 64, device: str | torch.device = "cpu") -> torch.Tensor:
    """Render scenes: float32 (N, 3, size, size) in [0, 1] on `device`."""
    return render_packed(pack_scenes(scenes).to(device), size)


def to_pil(image: torch.Tensor):
    """One (3, H, W) tensor in [0, 1] as a PIL RGB image."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


def dump_samples(out_dir: str | Path, n: int = 32, seed: int = 0, size: int = 64) -> list[Path]:
    """Write `n` renders as PNG with same-name .txt captions (the `--data` folder format) and a
    scenes.jsonl attribute record. Returns the PNG paths."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scenes = sample_scenes(seed, n)
    images = render(scenes, size)
    paths = []
    with open(out / "scenes.jsonl", "w", encoding="utf-8") as f:
        for i, (s, im) in enumerate(zip(scenes, images, strict=True)):
            p = out / f"{i:05d}.png"
            to_pil(im).save(p)
            p.with_suffix(".txt").write_text(s.caption + "\n", encoding="utf-8")
            f.write(json.dumps({"file": p.name, **s.attributes()}) + "\n")
            paths.append(p)
    return paths
