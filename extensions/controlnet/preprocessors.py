"""Preprocessors that need no downloaded weights: image -> control map (white structure on black).

- `none`: the image as given (it already is a control map);
- `canny`: OpenCV's Canny edge detector; threshold A / B are its low / high hysteresis thresholds
  (gradient magnitude, 0-255 scale; defaults 100 / 200);
- `threshold`: binarise the grey level at threshold A (default 127): brighter -> white;
- `scribble_xdog`: difference of Gaussians (sigma 0.5 and 5 px at the processing resolution) of the grey
  image, lines where it exceeds threshold A (default 32): turns a drawing or photo into scribble lines;
- `invert` ("invert (from white bg & black line)"): 255 - value, for black-on-white line drawings;
- `shapes_seg` / `shapes_depth`: the segmentation / depth map of an image of the built-in model's world, in
  the form its seg and depth ControlNets were trained on (`ldm_core.train.condition_maps`: objects read by
  colour and geometry, no learned model), so a generated image can be turned into a map and reused.

Every preprocessor except `none` first resizes the image so its short side is `resolution` pixels.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from ldm_core.extension_api import Preprocessor, Slider


def resize_short_side(image: Image.Image, resolution: int) -> Image.Image:
    """Scale so the shorter side is `resolution` px (aspect kept); unchanged when resolution <= 0."""
    if resolution <= 0 or min(image.size) == resolution:
        return image
    k = resolution / min(image.size)
    size = (max(1, round(image.width * k)), max(1, round(image.height * k)))
    return image.resize(size, Image.LANCZOS if k < 1 else Image.BICUBIC)


def _rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(gray.astype(np.uint8), "L").convert("RGB")


def _gray(image: Image.Image, resolution: int) -> np.ndarray:
    return np.asarray(resize_short_side(image, resolution).convert("L"))


def canny(image: Image.Image, resolution: int, low: float, high: float) -> Image.Image:
    arr = np.asarray(resize_short_side(image, resolution).convert("RGB"))
    return _rgb(cv2.Canny(arr, int(low), int(high)))


def threshold(image: Image.Image, resolution: int, level: float, _unused: float) -> Image.Image:
    g = _gray(image, resolution)
    return _rgb(np.where(g > level, 255, 0))


def scribble_xdog(image: Image.Image, resolution: int, level: float, _unused: float) -> Image.Image:
    g = _gray(image, resolution).astype(np.float32)
    fine = cv2.GaussianBlur(g, (0, 0), 0.5)
    coarse = cv2.GaussianBlur(g, (0, 0), 5.0)
    dog = coarse - fine  # positive on the dark side of an edge: a line drawn there
    return _rgb(np.where(dog > level, 255, 0))


def invert(image: Image.Image, resolution: int, _a: float, _b: float) -> Image.Image:
    return _rgb(255 - _gray(image, resolution))


def identity(image: Image.Image, _resolution: int, _a: float, _b: float) -> Image.Image:
    return image.convert("RGB")


def shapes_seg(image: Image.Image, _resolution: int, _a: float, _b: float) -> Image.Image:
    from ldm_core.train.condition_maps import read_seg_map

    return read_seg_map(image.convert("RGB"))


def shapes_depth(image: Image.Image, _resolution: int, _a: float, _b: float) -> Image.Image:
    from ldm_core.train.condition_maps import read_depth_map

    return read_depth_map(image.convert("RGB"))


ALL: tuple[Preprocessor, ...] = (
    Preprocessor("none", identity, "None (the image is the control map)", uses_resolution=False),
    Preprocessor(
        "canny",
        canny,
        "Canny edges",
        threshold_a=Slider("Canny low threshold", 100, 1, 255),
        threshold_b=Slider("Canny high threshold", 200, 1, 255),
    ),
    Preprocessor(
        "threshold",
        threshold,
        "Threshold",
        aliases=("binary",),
        threshold_a=Slider("Binarization threshold", 127, 0, 255),
    ),
    Preprocessor(
        "scribble_xdog",
        scribble_xdog,
        "Scribble (XDoG)",
        aliases=("scribble",),
        threshold_a=Slider("XDoG threshold", 32, 1, 64),
    ),
    Preprocessor(
        "invert", invert, "Invert (white background, black lines)", aliases=("invert (from white bg & black line)",)
    ),
    Preprocessor("shapes_seg", shapes_seg, "Segmentation of a built-in-model image", uses_resolution=False),
    Preprocessor("shapes_depth", shapes_depth, "Depth of a built-in-model image", uses_resolution=False),
)
