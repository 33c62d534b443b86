"""A deterministic analyser for images of the built-in world: background colour, the objects, and each
object's colour, shape, position and size.

How it works (all plain numpy/OpenCV, no learned parts):
1. background: the most common named colour among the border pixels; its RGB is their median;
2. objects: pixels far (RGB distance > `FG_THRESHOLD`) from the background, split into 8-connected
   components, tiny ones dropped;
3. colour: median RGB of a component's core pixels, named by the nearest palette colour;
4. shape: the component's coverage map (distance to background / object-to-background distance) is
   upsampled 4x and thresholded at 0.5, then classified by mask geometry: solidity (area / convex hull
   area) tells the star, fill ratio of the bounding box tells square (1.0) from circle (0.79) from the
   half-filled triangle and diamond (a mask between circle and square by extent, such as a square drawn with
   bowed sides, is a square when its bbox corners are filled: `corner_fill`), and the share of the area in
   the top half tells triangle (0.25) from diamond (0.5) and names a heart (0.65, lobes up; the example
   LoRA's shape);
5. position: the bounding box centre in a 3x3 grid of thirds; size: the radius that gives the mask's area
   for that shape (`shapes.SHAPE_AREA`), nearest size class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from ldm_core.train.shapes import COLOUR_NAMES, COLOURS, SHAPE_AREA, SIZES

#: Shapes outside the built-in world that the analyser also names (the example LoRA teaches the heart):
#: area in units of the half width squared, measured on 100 renders at 256 px (2.452 +- 0.009).
EXTRA_SHAPE_AREA = {"heart": 2.452}
#: A heart has two thirds of its area above its bounding-box centre (0.63-0.67 on renders); the five
#: world shapes have at most 0.52 (triangle 0.25-0.28, the others 0.49-0.51).
HEART_TOP_SHARE = 0.58
FG_THRESHOLD = 40.0  # RGB (0-255) distance from the background above which a pixel is foreground
MIN_AREA_FRACTION = 0.004  # components smaller than this share of the image are noise
_PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)
_UPSAMPLE = 4
CORNER_BOX = 0.2  # side of the corner boxes of `corner_fill`, as a share of the bbox side
#: corner_fill from which a round-ish mask is a square: halfway between a rendered circle's (0.13) and a
#: rendered square's (1.0), as the extent threshold 0.89 is halfway between theirs (0.785 and 1.0)
SQUARE_CORNER_FILL = 0.565

_GRID = (
    ("top left", "top", "top right"),
    ("left", "centre", "right"),
    ("bottom left", "bottom", "bottom right"),
)


@dataclass(frozen=True)
class DetectedObject:
    """One object found in an image. `bbox` is (x0, y0, x1, y1) in pixels (exclusive end), `cx, cy` the
    bounding box centre in image-side units (0..1), `features` the raw geometry numbers."""

    shape: str
    colour: str
    position: str
    size: str
    rgb: tuple[int, int, int]
    area: int
    bbox: tuple[float, float, float, float]
    cx: float
    cy: float
    features: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Analysis:
    """What the analyser saw: background name and RGB, objects sorted by area (largest first)."""

    background: str
    background_rgb: tuple[int, int, int]
    objects: tuple[DetectedObject, ...]

    def find(self, shape: str | None = None, colour: str | None = None) -> DetectedObject | None:
        """The largest object matching the given shape and/or colour, or None."""
        for o in self.objects:
            if (shape is None or o.shape == shape) and (colour is None or o.colour == colour):
                return o
        return None


def to_rgb_array(image) -> np.ndarray:
    """PIL image, HxWx3 array (uint8 0-255 or float 0-1) or torch (3, H, W) tensor in [0, 1] as a float32
    HxWx3 array in 0-255."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if hasattr(image, "detach"):  # torch tensor (3, H, W) in [0, 1]
        arr = image.detach().float().cpu().clamp(0, 1).numpy()
        return np.ascontiguousarray(arr.transpose(1, 2, 0) * 255.0, dtype=np.float32)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    arr = arr.astype(np.float32)
    return arr * 255.0 if arr.max() <= 1.0 + 1e-6 else arr


def nearest_colour(rgb) -> str:
    """The palette colour name nearest (Euclidean RGB 0-255) to `rgb`."""
    d = np.linalg.norm(_PALETTE - np.asarray(rgb, dtype=np.float32)[None, :], axis=1)
    return COLOUR_NAMES[int(np.argmin(d))]


def _background(img: np.ndarray) -> tuple[str, np.ndarray]:
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]], axis=0)
    d = np.linalg.norm(border[:, None, :] - _PALETTE[None, :, :], axis=2)
    names = np.argmin(d, axis=1)
    counts = np.bincount(names, minlength=len(COLOUR_NAMES))
    best = int(np.argmax(counts))
    rgb = np.median(border[names == best], axis=0)
    return COLOUR_NAMES[best], rgb


def classify_shape(features: dict) -> str:
    """Name the shape from mask geometry (see module docstring); `features` as made by `mask_features`."""
    if features["solidity"] < 0.8:
        return "star"
    if features["top_share"] > HEART_TOP_SHARE:
        return "heart"
    extent = features["extent"]
    if extent > 0.89:
        return "square"
    if extent > 0.64:
        # a square drawn with bowed sides fills its bbox less than 0.89 but keeps its corners
        return "square" if features["corner_fill"] >= SQUARE_CORNER_FILL else "circle"
    return "triangle" if features["top_share"] < 0.375 else "diamond"


def mask_features(mask: np.ndarray) -> dict:
    """Geometry of a binary mask (H, W): area, bbox size, extent (fill of the bbox), solidity (area over
    convex hull area), top_share (share of the area above the bbox centre), aspect (width / height)."""
    ys, xs = np.nonzero(mask)
    area = float(len(xs))
    if area == 0:
        return {
            "area": 0.0,
            "w": 0.0,
            "h": 0.0,
            "extent": 0.0,
            "solidity": 0.0,
            "top_share": 0.0,
            "aspect": 1.0,
            "corner_fill": 0.0,
        }
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    w, h = float(x1 - x0), float(y1 - y0)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    pts = np.concatenate([c.reshape(-1, 2) for c in contours], axis=0)
    hull_area = cv2.contourArea(cv2.convexHull(pts))
    # a pixel mask's contour runs through pixel centres: add back the half-pixel rim of the hull
    hull_area += cv2.arcLength(cv2.convexHull(pts), True) / 2.0 + 1.0
    mid = (y0 + y1) / 2.0
    # corners: the fill of the four boxes CORNER_BOX x (w, h) in the bbox's corners (a square's corners are
    # there however its sides bow; a circle leaves them nearly empty)
    cw, ch = max(1, round(CORNER_BOX * w)), max(1, round(CORNER_BOX * h))
    sub = mask[y0:y1, x0:x1]
    corner_fill = float(
        np.mean([sub[:ch, :cw].mean(), sub[:ch, -cw:].mean(), sub[-ch:, :cw].mean(), sub[-ch:, -cw:].mean()])
    )
    top = float(np.count_nonzero(ys + 0.5 < mid)) + 0.5 * float(np.count_nonzero(np.abs(ys + 0.5 - mid) < 1e-6))
    return {
        "area": area,
        "w": w,
        "h": h,
        "extent": area / (w * h),
        "solidity": min(1.0, area / max(hull_area, 1.0)),
        "top_share": top / area,
        "aspect": w / h,
        "corner_fill": corner_fill,
        "x0": float(x0),
        "y0": float(y0),
    }


def _position(cx: float, cy: float) -> str:
    col = 0 if cx < 1 / 3 else (2 if cx > 2 / 3 else 1)
    row = 0 if cy < 1 / 3 else (2 if cy > 2 / 3 else 1)
    return _GRID[row][col]


def _size(shape: str, area: float) -> str:
    """Size class from the mask area (in image-side units squared) and the shape's area factor."""
    r = math.sqrt(area / (SHAPE_AREA.get(shape) or EXTRA_SHAPE_AREA[shape]))
    names = list(SIZES)
    return names[int(np.argmin([abs(np.log(r / SIZES[n])) for n in names]))]


def analyse(image, max_objects: int = 4) -> Analysis:
    """Analyse one RGB image (see `to_rgb_array` for the accepted types). Deterministic."""
    img = to_rgb_array(image)
    hgt, wid = img.shape[:2]
    bg_name, bg_rgb = _background(img)
    dist = np.linalg.norm(img - bg_rgb[None, None, :], axis=2)
    fg = (dist > FG_THRESHOLD).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    min_area = max(4, int(MIN_AREA_FRACTION * hgt * wid))
    comps = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= min_area]
    comps.sort(key=lambda i: (-int(stats[i, cv2.CC_STAT_AREA]), i))
    objects = []
    for i in comps[:max_objects]:
        comp = labels == i
        # colour: pixels of the component in its strongest half (the flat interior, not the blended rim)
        dcomp = dist[comp]
        core = comp & (dist >= np.percentile(dcomp, 50))
        rgb = np.median(img[core], axis=0)
        colour = nearest_colour(rgb)
        obj_dist = max(float(np.linalg.norm(rgb - bg_rgb)), FG_THRESHOLD * 2)
        # coverage map of this component only (pixels of other components count as background)
        x, y, w, h = (int(v) for v in stats[i, :4])
        pad = 2
        xa, ya, xb, yb = max(0, x - pad), max(0, y - pad), min(wid, x + w + pad), min(hgt, y + h + pad)
        near = cv2.dilate(comp.astype(np.uint8), np.ones((3, 3), np.uint8))[ya:yb, xa:xb] > 0
        cover = np.where(near, np.clip(dist[ya:yb, xa:xb] / obj_dist, 0.0, 1.0), 0.0).astype(np.float32)
        up = cv2.resize(cover, ((xb - xa) * _UPSAMPLE, (yb - ya) * _UPSAMPLE), interpolation=cv2.INTER_LINEAR)
        mask = up >= 0.5
        feats = mask_features(mask)
        if feats["area"] == 0:
            continue
        shape = classify_shape(feats)
        bw, bh = feats["w"] / _UPSAMPLE, feats["h"] / _UPSAMPLE
        bx0 = xa + feats["x0"] / _UPSAMPLE
        by0 = ya + feats["y0"] / _UPSAMPLE
        cx, cy = (bx0 + bw / 2) / wid, (by0 + bh / 2) / hgt
        objects.append(
            DetectedObject(
                shape=shape,
                colour=colour,
                position=_position(cx, cy),
                size=_size(shape, feats["area"] / (_UPSAMPLE**2 * wid * hgt)),
                rgb=tuple(int(round(v)) for v in rgb),
                area=int(stats[i, cv2.CC_STAT_AREA]),
                bbox=(bx0, by0, bx0 + bw, by0 + bh),
                cx=cx,
                cy=cy,
                features={k: round(float(v), 4) for k, v in feats.items()},
            )
        )
    return Analysis(bg_name, tuple(int(round(v)) for v in bg_rgb), tuple(objects))
