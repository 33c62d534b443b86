"""Extras (A1111's "Extras" tab and /sdapi/v1/extra-*-image): upscale with upscaler 1, optionally blend in
upscaler 2 by its visibility, resize by a factor or to a size (optionally centre-cropped to that size); for
one image, a list, or a folder in and a folder out.

Parameter names follow the A1111 API: upscaler_1, upscaler_2, extras_upscaler_2_visibility, resize_mode
(0 = "Scale by" upscaling_resize, 1 = "Scale to" upscaling_resize_w x upscaling_resize_h), upscaling_crop.
As in A1111, upscaler_1 "None" leaves the image untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from .generation_requests import RequestError
from .outputs import read_image_info, save_image
from .upscalers import UpscalerRegistry

MAX_UPSCALE = 8.0
MAX_OUTPUT_SIDE = 16384
MAX_OUTPUT_PIXELS = 8192 * 8192
RESIZE_MODES: tuple[str, ...] = ("Scale by", "Scale to")  # index = A1111's integer resize_mode
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class ExtrasParams:
    """One Extras job's settings (see the module docstring). `resize_mode` is 0 or 1 (or its label)."""

    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0  # 0..1: 0 = upscaler 1 only, 1 = upscaler 2 only
    resize_mode: int = 0
    upscaling_resize: float = 2.0  # factor, 1..8 (mode 0)
    upscaling_resize_w: int = 512  # px (mode 1)
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True  # mode 1: centre-crop to exactly w x h

    def __post_init__(self) -> None:
        if isinstance(self.resize_mode, str):
            if self.resize_mode not in RESIZE_MODES:
                raise RequestError("resize_mode", f"must be 0, 1 or one of {list(RESIZE_MODES)}")
            object.__setattr__(self, "resize_mode", RESIZE_MODES.index(self.resize_mode))
        if self.resize_mode not in (0, 1):
            raise RequestError("resize_mode",
                               f"must be 0 (scale by) or 1 (scale to); got {self.resize_mode!r}")
        if not 0.0 <= self.extras_upscaler_2_visibility <= 1.0:
            raise RequestError("extras_upscaler_2_visibility",
                               f"allowed: 0 to 1; got {self.extras_upscaler_2_visibility!r}")
        if self.resize_mode == 0 and not 0 < self.upscaling_resize <= MAX_UPSCALE:
            raise RequestError("upscaling_resize", f"allowed: above 0 up to {MAX_UPSCALE}; "
                                                   f"got {self.upscaling_resize!r}")
        if self.resize_mode == 1:
            for name in ("upscaling_resize_w", "upscaling_resize_h"):
                v = getattr(self, name)
                if not 1 <= v <= MAX_OUTPUT_SIDE:
                    raise RequestError(name, f"allowed: 1 to {MAX_OUTPUT_SIDE}; got {v!r}")

    @classmethod
    def from_api(cls, values: dict[str, Any]) -> ExtrasParams:
        """From an API/UI dict: known keys are used, others (image, imageList, gfpgan_visibility, ...)
        ignored; `None` values mean the default."""
        types = {f.name: f.type for f in fields(cls)}
        kw: dict[str, Any] = {}
        for k, v in values.items():
            if k not in types or v is None:
                continue
            kind = types[k]
            try:
                if kind == "bool":
                    kw[k] = v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes", "on")
                elif kind == "float":
                    kw[k] = float(v)
                elif kind == "int" and not (k == "resize_mode" and isinstance(v, str) and v in RESIZE_MODES):
                    kw[k] = int(v)
                else:
                    kw[k] = v if isinstance(v, int) else str(v)
            except (TypeError, ValueError):
                raise RequestError(k, f"expected a {kind}; got {v!r}") from None
        return cls(**kw)

    def with_fallbacks(self, registry: UpscalerRegistry) -> tuple[ExtrasParams, list[str]]:
        """These params with upscaler names clients send for model upscalers this server lacks ("R-ESRGAN
        4x+", "SwinIR_4x") replaced by what runs instead (`UpscalerRegistry.fallback`), and the warnings that
        say so. A name that is no upscaler at all stays a RequestError naming upscaler_1 / upscaler_2."""
        changes: dict[str, str] = {}
        warnings: list[str] = []
        for name in ("upscaler_1", "upscaler_2"):
            fallback = registry.fallback(getattr(self, name), name)
            changes[name] = fallback.name
            if fallback.warning:
                warnings.append(fallback.warning)
        return replace(self, **changes), warnings

    def validate(self, registry: UpscalerRegistry) -> None:
        """Raise RequestError("upscaler_1"/"upscaler_2", ...) for a name the registry does not know."""
        for name in ("upscaler_1", "upscaler_2"):
            value = getattr(self, name)
            if value not in registry.names():
                raise RequestError(name, f"unknown upscaler {value!r}; choose one of {registry.names()}")


def output_size(size: tuple[int, int], params: ExtrasParams) -> tuple[tuple[int, int], tuple[int, int]]:
    """((upscaled w, h), (final w, h)) for an image of `size` = (w, h). In mode 1 the image is scaled by the
    larger of the two ratios (no distortion) and, with crop, centre-cropped to exactly the asked size."""
    w, h = size
    if params.resize_mode == 0:
        up = (max(1, round(w * params.upscaling_resize)), max(1, round(h * params.upscaling_resize)))
        final = up
    else:
        tw, th = params.upscaling_resize_w, params.upscaling_resize_h
        by = max(tw / w, th / h)
        up = (max(tw, round(w * by)), max(th, round(h * by)))
        final = (tw, th) if params.upscaling_crop else up
    if final[0] * final[1] > MAX_OUTPUT_PIXELS or up[0] * up[1] > MAX_OUTPUT_PIXELS:
        raise RequestError("upscaling_resize", f"the result would be {up[0]}x{up[1]} pixels; at most "
                                               f"{MAX_OUTPUT_PIXELS} pixels are allowed")
    return up, final


def postprocess_text(image_size: tuple[int, int], params: ExtrasParams) -> str:
    """A1111's "postprocessing" text for this job, e.g.
    'Postprocess upscale by: 2, Postprocess upscaler: Lanczos, Postprocess upscaler 2: Nearest'."""
    if params.upscaler_1 == "None":
        return ""
    parts = []
    if params.resize_mode == 0:
        parts.append(f"Postprocess upscale by: {_num(params.upscaling_resize)}")
    else:
        parts.append(f"Postprocess upscale to: {params.upscaling_resize_w}x{params.upscaling_resize_h}")
        if params.upscaling_crop:
            parts.append("Postprocess crop to fit: True")
    parts.append(f"Postprocess upscaler: {params.upscaler_1}")
    if params.upscaler_2 != "None" and params.extras_upscaler_2_visibility > 0:
        parts.append(f"Postprocess upscaler 2: {params.upscaler_2}")
        parts.append(f"Postprocess upscaler 2 visibility: {_num(params.extras_upscaler_2_visibility)}")
    return ", ".join(parts)


def _num(v: float) -> int | float:
    return int(v) if float(v).is_integer() else round(float(v), 3)


def upscale_image(image: Image.Image, params: ExtrasParams, registry: UpscalerRegistry, *,
                  progress: ProgressFn | None = None,
                  cancel: Callable[[], None] | None = None) -> Image.Image:
    """One image through Extras. The result is RGB (RGBA when the input has alpha)."""
    params.validate(registry)
    image = ImageOps.exif_transpose(image) if image.getexif() else image
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
    if params.upscaler_1 == "None":
        return image.copy()
    up, final = output_size(image.size, params)
    second = params.upscaler_2 != "None" and params.extras_upscaler_2_visibility > 0
    only_second = second and params.extras_upscaler_2_visibility >= 1.0

    def part(k: int, n: int) -> ProgressFn | None:
        if progress is None:
            return None
        return lambda d, t: progress(k * 1000 + (1000 * d) // max(t, 1), n * 1000)

    n = 2 if second and not only_second else 1
    out = None
    if not only_second:
        out = registry.upscale(image, params.upscaler_1, size=up, progress=part(0, n), cancel=cancel)
    if second:
        out2 = registry.upscale(image, params.upscaler_2, size=up, progress=part(n - 1, n), cancel=cancel)
        out = out2 if out is None else Image.blend(out, out2.convert(out.mode),
                                                   params.extras_upscaler_2_visibility)
    assert out is not None
    if final != up:
        left, top = (up[0] - final[0]) // 2, (up[1] - final[1]) // 2
        out = out.crop((left, top, left + final[0], top + final[1]))
    return out


def upscale_batch(images: Iterable[Image.Image], params: ExtrasParams, registry: UpscalerRegistry, *,
                  progress: ProgressFn | None = None,
                  cancel: Callable[[], None] | None = None) -> list[Image.Image]:
    """Several images with the same settings; `progress(done, total)` counts images."""
    images = list(images)
    out = []
    for i, im in enumerate(images):
        if cancel is not None:
            cancel()
        out.append(upscale_image(im, params, registry, cancel=cancel))
        if progress is not None:
            progress(i + 1, len(images))
    return out


@dataclass
class FolderResult:
    """What `upscale_folder` did: written files, and inputs skipped with the reason."""

    written: list[Path]
    skipped: list[tuple[Path, str]]

    def as_dict(self) -> dict:
        return {"written": [str(p) for p in self.written],
                "skipped": [[str(p), why] for p, why in self.skipped]}


def upscale_folder(input_dir: Path, output_dir: Path, params: ExtrasParams, registry: UpscalerRegistry, *,
                   progress: ProgressFn | None = None,
                   cancel: Callable[[], None] | None = None) -> FolderResult:
    """Every image file directly in `input_dir` (sorted by name) through `upscale_files`."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise RequestError("input_dir", f"{input_dir} is not a folder")
    if input_dir.resolve() == output_dir.resolve():
        raise RequestError("output_dir", "must differ from the input folder")
    files = sorted(p for p in input_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return upscale_files(files, output_dir, params, registry, progress=progress, cancel=cancel)


def upscale_files(files: Iterable[Path], output_dir: Path, params: ExtrasParams, registry: UpscalerRegistry, *,
                  progress: ProgressFn | None = None,
                  cancel: Callable[[], None] | None = None) -> FolderResult:
    """Each image file to a PNG of the same stem in `output_dir` (created; an existing file is never
    overwritten: '-1', '-2', ... is appended). The original's infotext is kept and the Extras settings are
    added as A1111's "postprocessing" entry of the manifest. Unreadable files are skipped and reported;
    `progress(done, total)` counts files."""
    files = [Path(p) for p in files]
    output_dir = Path(output_dir)
    params.validate(registry)
    result = FolderResult([], [])
    for i, path in enumerate(files):
        if cancel is not None:
            cancel()
        try:
            with Image.open(path) as im:
                im.load()
                infotext, _manifest, _other = read_image_info(im)
                src = im.copy()
        except (OSError, UnidentifiedImageError) as exc:
            result.skipped.append((path, f"cannot read: {exc}"))
            continue
        out = upscale_image(src, params, registry, cancel=cancel)
        manifest = {"mode": "extras", "source": path.name, "params": asdict(params),
                    "postprocessing": postprocess_text(src.size, params)}
        pattern = path.stem.replace("[", "(").replace("]", ")")
        result.written.append(save_image(out, output_dir, infotext=infotext or "", manifest=manifest, seed=0,
                                         pattern=pattern))
        if progress is not None:
            progress(i + 1, len(files))
    return result
