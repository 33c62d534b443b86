"""Preprocessors backed by local models: depth, normal-from-depth and ADE20K semantic segmentation.

Each annotator reads one folder, `models/annotators/<name>/`, in the layout `transformers` saves
(`save_pretrained`: config.json, model.safetensors, preprocessor_config.json), and nothing is ever downloaded:

- `depth_midas`, `depth_anything`, `depth_anything_v2`: any depth-estimation model (`AutoModelForDepthEstimation`:
  DPT / MiDaS, Depth Anything v1 and v2, ...). The map is the model's relative depth (near = bright), scaled
  to 0-255 per image, as depth ControlNets were trained on.
- `normal_midas`: surface normals from the `depth_midas` folder's depth: the depth's Sobel gradients give the
  x and y components, threshold A (0-1) marks as background (a flat normal facing the viewer) what is farther
  than that fraction of the depth range; RGB = (normal + 1) / 2.
- `seg_ofade20k`, `seg_ufade20k`: any semantic-segmentation model (`AutoModelForSemanticSegmentation`: UperNet,
  SegFormer, BEiT, DPT, ...); each pixel's class drawn in the ADE20K colour palette that seg ControlNets read.

Weights load through the one safe policy: `model.safetensors` always; pickled `pytorch_model.bin` only with
`--allow-pickle`. A missing folder, or one without weights, is a `RequestError` that names the folder to fill.
Loaded models stay in the extension's model cache (keyed by folder and file times).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from ldm_core.extension_api import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    ModelCache,
    Preprocessor,
    RequestError,
    Slider,
)

from .preprocessors import resize_short_side

FOLDER_KIND = "annotators"  # the key of `ExtensionContext.model_dirs` (models/annotators/)

#: ADE20K's 150 class colours, in class order (the palette seg ControlNets were trained with).
ADE20K_PALETTE = np.array(
    [
        *(120, 120, 120, 180, 120, 120, 6, 230, 230, 80, 50, 50, 4, 200, 3, 120, 120, 80, 140, 140, 140, 204, 5, 255),
        *(230, 230, 230, 4, 250, 7, 224, 5, 255, 235, 255, 7, 150, 5, 61, 120, 120, 70, 8, 255, 51, 255, 6, 82),
        *(143, 255, 140, 204, 255, 4, 255, 51, 7, 204, 70, 3, 0, 102, 200, 61, 230, 250, 255, 6, 51, 11, 102, 255),
        *(255, 7, 71, 255, 9, 224, 9, 7, 230, 220, 220, 220, 255, 9, 92, 112, 9, 255, 8, 255, 214, 7, 255, 224),
        *(255, 184, 6, 10, 255, 71, 255, 41, 10, 7, 255, 255, 224, 255, 8, 102, 8, 255, 255, 61, 6, 255, 194, 7),
        *(255, 122, 8, 0, 255, 20, 255, 8, 41, 255, 5, 153, 6, 51, 255, 235, 12, 255, 160, 150, 20, 0, 163, 255),
        *(140, 140, 140, 250, 10, 15, 20, 255, 0, 31, 255, 0, 255, 31, 0, 255, 224, 0, 153, 255, 0, 0, 0, 255),
        *(255, 71, 0, 0, 235, 255, 0, 173, 255, 31, 0, 255, 11, 200, 200, 255, 82, 0, 0, 255, 245, 0, 61, 255),
        *(0, 255, 112, 0, 255, 133, 255, 0, 0, 255, 163, 0, 255, 102, 0, 194, 255, 0, 0, 143, 255, 51, 255, 0),
        *(0, 82, 255, 0, 255, 41, 0, 255, 173, 10, 0, 255, 173, 255, 0, 0, 255, 153, 255, 92, 0, 255, 0, 255),
        *(255, 0, 245, 255, 0, 102, 255, 173, 0, 255, 0, 20, 255, 184, 184, 0, 31, 255, 0, 255, 61, 0, 71, 255),
        *(255, 0, 204, 0, 255, 194, 0, 255, 82, 0, 10, 255, 0, 112, 255, 51, 0, 255, 0, 194, 255, 0, 122, 255),
        *(0, 255, 163, 255, 153, 0, 0, 255, 10, 255, 112, 0, 143, 255, 0, 82, 0, 255, 163, 255, 0, 255, 235, 0),
        *(8, 184, 170, 133, 0, 255, 0, 255, 92, 184, 0, 255, 255, 0, 31, 0, 184, 255, 0, 214, 255, 255, 0, 112),
        *(92, 255, 0, 0, 224, 255, 112, 224, 255, 70, 184, 160, 163, 0, 255, 153, 0, 255, 71, 255, 0, 255, 0, 163),
        *(255, 204, 0, 255, 0, 143, 0, 255, 235, 133, 255, 0, 255, 0, 235, 245, 0, 255, 255, 0, 122, 255, 245, 0),
        *(10, 190, 212, 214, 255, 0, 0, 204, 255, 20, 0, 255, 255, 255, 0, 0, 153, 255, 0, 41, 255, 0, 255, 204),
        *(41, 0, 255, 41, 255, 0, 173, 0, 255, 0, 245, 255, 71, 0, 255, 122, 0, 255, 0, 255, 184, 0, 92, 255),
        *(184, 255, 0, 0, 133, 255, 255, 214, 0, 25, 194, 194, 102, 255, 0, 92, 0, 255),
    ],
    dtype=np.uint8,
).reshape(150, 3)


@dataclass(frozen=True)
class AnnotatorSpec:
    """One model-backed preprocessor: its name (= its folder under models/annotators/), what it runs, the
    folder it reads (normal_midas reads depth_midas's) and what that folder must hold."""

    name: str
    kind: str  # "depth", "normal" or "seg"
    label: str
    folder: str
    what: str  # for the missing-folder message


SPECS: tuple[AnnotatorSpec, ...] = (
    AnnotatorSpec("depth_midas", "depth", "Depth (MiDaS / DPT)", "depth_midas", "a depth-estimation model (DPT/MiDaS)"),
    AnnotatorSpec("depth_anything", "depth", "Depth Anything", "depth_anything", "a Depth Anything model"),
    AnnotatorSpec("depth_anything_v2", "depth", "Depth Anything V2", "depth_anything_v2", "a Depth Anything V2 model"),
    AnnotatorSpec("normal_midas", "normal", "Normal map (from MiDaS depth)", "depth_midas", "a depth-estimation model"),
    AnnotatorSpec(
        "seg_ofade20k", "seg", "Segmentation (ADE20K)", "seg_ofade20k", "an ADE20K semantic-segmentation model"
    ),
    AnnotatorSpec(
        "seg_ufade20k", "seg", "Segmentation (ADE20K, UperNet)", "seg_ufade20k", "an ADE20K semantic-segmentation model"
    ),
)


class Annotators:
    """Finds, loads (cached) and runs the annotator models. `dirs()` gives the annotator folders (the user's
    models/annotators/ and any others configured); `allow_pickle` is the process's pickle policy."""

    def __init__(self, dirs: Callable[[], tuple[Path, ...]], cache: ModelCache, allow_pickle: bool = False):
        self.dirs, self.cache, self.allow_pickle = dirs, cache, allow_pickle

    def folder(self, spec: AnnotatorSpec) -> Path:
        roots = self.dirs()
        for root in roots:
            path = Path(root) / spec.folder
            if (path / "config.json").is_file():
                return path
        where = Path(roots[0]) / spec.folder if roots else Path("models") / FOLDER_KIND / spec.folder
        raise RequestError(
            "module",
            f"the {spec.name} preprocessor needs {spec.what} in {where}/ (the folder transformers' save_pretrained "
            "writes: config.json, model.safetensors, preprocessor_config.json); nothing is downloaded",
        )

    def load(self, spec: AnnotatorSpec):
        """(image processor, model) of the spec's folder, cached."""
        path = self.folder(spec)
        weights = [p for p in path.iterdir() if p.suffix in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES]
        safe = any(p.suffix in SAFETENSORS_SUFFIXES for p in weights)
        if not safe and not (weights and self.allow_pickle):
            raise RequestError(
                "module",
                f"{path} has no model.safetensors"
                + (" (its pytorch_model.bin is pickled: start with --allow-pickle to load it)" if weights else ""),
            )
        stamp = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file()))
        key = ("annotator", spec.kind if spec.kind != "normal" else "depth", str(path), stamp)

        def build():
            from transformers import (
                AutoImageProcessor,
                AutoModelForDepthEstimation,
                AutoModelForSemanticSegmentation,
            )

            cls = AutoModelForSemanticSegmentation if spec.kind == "seg" else AutoModelForDepthEstimation
            try:
                processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
                model = cls.from_pretrained(str(path), local_files_only=True, use_safetensors=safe)
            except (OSError, ValueError, KeyError) as exc:
                raise RequestError("module", f"cannot load the {spec.name} model from {path}: {exc}") from None
            return processor, model.eval().to(_device())

        return self.cache.get(key, build)

    @torch.inference_mode()
    def depth(self, spec: AnnotatorSpec, image: Image.Image) -> np.ndarray:
        """Relative depth (near = large) at the image's size, float32 scaled to 0-1."""
        processor, model = self.load(spec)
        inputs = processor(images=image, return_tensors="pt").to(_device())
        pred = model(**inputs).predicted_depth  # (1, h, w)
        pred = torch.nn.functional.interpolate(
            pred[:, None].float(), size=(image.height, image.width), mode="bicubic", align_corners=False
        )[0, 0]
        lo, hi = pred.min(), pred.max()
        return ((pred - lo) / (hi - lo).clamp(min=1e-12)).cpu().numpy().astype(np.float32)

    @torch.inference_mode()
    def segment(self, spec: AnnotatorSpec, image: Image.Image) -> np.ndarray:
        """Class index per pixel (H, W) at the image's size."""
        processor, model = self.load(spec)
        inputs = processor(images=image, return_tensors="pt").to(_device())
        logits = model(**inputs).logits  # (1, classes, h, w)
        logits = torch.nn.functional.interpolate(
            logits.float(), size=(image.height, image.width), mode="bilinear", align_corners=False
        )
        return logits[0].argmax(0).cpu().numpy()


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def depth_map(depth: np.ndarray) -> Image.Image:
    g = (depth * 255.0).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([g, g, g], -1), "RGB")


def normal_from_depth(depth: np.ndarray, background: float) -> Image.Image:
    """Normals of the depth surface (near = large depth): x right, y up, z towards the viewer, RGB = (n+1)/2;
    where depth < `background` (0-1) the normal faces the viewer."""
    d = depth.astype(np.float32)
    gx = cv2.Sobel(d, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(d, cv2.CV_32F, 0, 1, ksize=3)
    strength = 2.0 * np.pi  # how steep a unit of depth change per pixel looks (Sobel sums 8 neighbours)
    n = np.stack([-gx * strength, gy * strength, np.ones_like(d)], -1)
    n[d < background] = (0.0, 0.0, 1.0)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    return Image.fromarray(((n + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8), "RGB")


def seg_map(classes: np.ndarray) -> Image.Image:
    return Image.fromarray(ADE20K_PALETTE[classes % len(ADE20K_PALETTE)], "RGB")


def preprocessors(
    model_dirs: Callable[[], Mapping[str, tuple[Path, ...]]], cache: ModelCache, allow_pickle: bool
) -> tuple[Preprocessor, ...]:
    """The model-backed preprocessors, reading `model_dirs()["annotators"]` when they run."""
    ann = Annotators(lambda: tuple(model_dirs().get(FOLDER_KIND, ())), cache, allow_pickle)

    def make(spec: AnnotatorSpec) -> Callable[[Image.Image, int, float, float], Image.Image]:
        def run(image: Image.Image, resolution: int, a: float, _b: float) -> Image.Image:
            image = resize_short_side(image, resolution)
            if spec.kind == "seg":
                return seg_map(ann.segment(spec, image))
            depth = ann.depth(spec, image)
            return normal_from_depth(depth, a) if spec.kind == "normal" else depth_map(depth)

        return run

    out = []
    for spec in SPECS:
        slider = Slider("Normal background threshold", 0.4, 0.0, 1.0, 0.01) if spec.kind == "normal" else None
        out.append(Preprocessor(spec.name, make(spec), spec.label, threshold_a=slider, needs_model=True))
    return tuple(out)
