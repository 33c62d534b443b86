"""Upscalers: the registry of image upscalers (None, Lanczos, Nearest, model files built by spandrel,
extension-registered ones) and the latent upscale modes used by hires fix.

Model upscalers are `.safetensors` or `.pth`/`.pt`/`.ckpt` files (the latter listed, but loadable only when
pickles are allowed, then weights-only) in the upscaler folders (A1111's models/ESRGAN, RealESRGAN, SwinIR,
DAT, HAT), listed by file stem. Their state dicts are read only through
`ldm_core.models.loading.load_state_dict` (the one loading choke point), the architecture is detected and
built by `spandrel`, and inference runs tile by tile (`ldm_core.tiling`) so memory stays bounded for any
image size. The project's own Compact x2 model ships in the repository's models/ESRGAN folder and is always
listed.

Sizes for images are (width, height) in pixels, PIL's order; sizes for latents are (height, width) in latent
pixels, torch's order.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .colour_fix import colour_fix
from .diffusion_upscalers import (
    DiffusionUpscaleOptions,
    DiffusionUpscaler,
    X2LatentUpscaler,
    image_prompt,
    upscaler_class,
    upscaler_file_class,
)
from .generation_requests import RequestError
from .models.suffixes import UPSCALER_SUFFIXES
from .tiling import tiled_apply

log = logging.getLogger(__name__)

#: The upscaler trained and shipped by the project (see ldm_core.train.upscaler).
BUILTIN_UPSCALER = Path(__file__).resolve().parent.parent / "models" / "ESRGAN" / "ldm-builtin-x2.safetensors"
#: the shipped diffusion upscaler for the built-in model (a StableDiffusionUpscalePipeline folder)
BUILTIN_DIFFUSION_UPSCALER = BUILTIN_UPSCALER.parent.parent / "SD-Upscale" / "ldm-builtin-x4"
#: Folder names (under models/) that hold model upscalers, as in A1111.
UPSCALER_FOLDERS: tuple[str, ...] = ("ESRGAN", "RealESRGAN", "SwinIR", "DAT", "HAT")
#: Names that are not model files; "None" resizes with Lanczos when a size is asked (A1111 behaviour).
BASIC_UPSCALERS: tuple[str, ...] = ("None", "Lanczos", "Nearest")
#: The most times a model is applied in a row to reach a large scale (A1111 uses 3 too).
MAX_PASSES = 3

#: Latent upscale modes (A1111 names) -> (torch interpolate mode, antialias).
LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}

#: Words in the names of model upscalers clients ask for by name (A1111's built-ins, which it downloads on first
#: use: "R-ESRGAN 4x+", "ESRGAN_4x", "SwinIR 4x", "LDSR", "ScuNET GAN", "DAT x4", ...; and popular community
#: files: "4x-UltraSharp", "4x_foolhardy_Remacri", ...). An unknown name with one of these words or a scale
#: ("4x", "x2") names a model upscaler this server lacks: it falls back (`UpscalerRegistry.fallback`).
_MODEL_NAME_RE = re.compile(
    r"esrgan|swinir|scunet|ldsr|\bdat\b|\bhat\b|bsrgan|srformer|realesr|ultrasharp|ultramix|remacri|nmkd|upscal",
    re.IGNORECASE,
)

#: An extension upscaler: (RGB image, wanted scale factor >= 0) -> upscaled image of any size; the registry
#: then resizes it (Lanczos) to the exact target size.
UpscaleFn = Callable[[Image.Image, float], Image.Image]
ProgressFn = Callable[[int, int], None]


def latent_modes() -> list[str]:
    """The latent upscale mode names, in A1111's order (for /sdapi/v1/latent-upscale-modes)."""
    return list(LATENT_MODES)


def is_latent_mode(name: str) -> bool:
    return name in LATENT_MODES


def upscale_latents(latents: torch.Tensor, mode: str, size: tuple[int, int]) -> torch.Tensor:
    """Resize latents (n, c, h, w) to `size` = (height, width) in latent pixels with a latent mode
    ("Latent" is bilinear; see LATENT_MODES). Keeps dtype and device. Unknown mode -> RequestError."""
    if mode not in LATENT_MODES:
        raise RequestError("hr_upscaler", f"unknown latent mode {mode!r}; choose one of {latent_modes()}")
    interp, antialias = LATENT_MODES[mode]
    h, w = int(size[0]), int(size[1])
    if (h, w) == tuple(latents.shape[-2:]):
        return latents
    dtype = latents.dtype
    half_on_cpu = dtype in (torch.float16, torch.bfloat16) and latents.device.type == "cpu"
    x = latents.float() if half_on_cpu else latents
    kwargs: dict[str, Any] = {}
    if interp in ("bilinear", "bicubic"):
        kwargs = {"align_corners": False, "antialias": antialias}
    return F.interpolate(x, size=(h, w), mode=interp, **kwargs).to(dtype)


def target_size(
    image_size: tuple[int, int], *, scale: float | None = None, size: tuple[int, int] | None = None
) -> tuple[int, int]:
    """The (width, height) asked: `size` as given, or the image size times `scale` (rounded, at least 1)."""
    if size is not None:
        w, h = int(size[0]), int(size[1])
        if w < 1 or h < 1:
            raise RequestError("upscaling_resize", f"size must be positive; got {w}x{h}")
        return w, h
    if scale is None or scale <= 0:
        raise RequestError("upscaling_resize", f"scale must be a positive number; got {scale!r}")
    return max(1, round(image_size[0] * scale)), max(1, round(image_size[1] * scale))


def _scale_from_name(stem: str) -> int | None:
    """A model's scale guessed from its file name (4x_foo, foo_x2, RealESRGAN_x4plus); None if not named."""
    m = re.search(r"(?:^|[^a-z0-9])(\d)x(?:[^a-z0-9]|$)|x(\d)(?:[^0-9]|$)", stem.lower())
    if not m:
        return None
    return int(m.group(1) or m.group(2))


@dataclass(frozen=True)
class Fallback:
    """What an upscaler name resolves to: `name` (the one that runs) and `warning` (None when the name was
    found as asked)."""

    name: str
    warning: str | None = None


@dataclass
class UpscalerEntry:
    """One listed upscaler. `kind` is "basic", "model" (a spandrel file), "diffusion" (an SD x4 or x2 latent
    upscaler folder; `pipeline` its `ldm_core.diffusion_upscalers` class) or "extension"; `scale` the native
    factor if known."""

    name: str
    kind: str
    path: Path | None = None
    scale: float | None = None
    fn: UpscaleFn | None = None
    pipeline: type[DiffusionUpscaler] | None = None

    def info(self) -> dict:
        """The /sdapi/v1/upscalers item."""
        return {
            "name": self.name,
            "model_name": self.path.stem if self.path else (self.name if self.kind == "extension" else None),
            "model_path": str(self.path) if self.path else None,
            "model_url": None,
            "scale": self.scale if self.scale is not None else 4,
        }


class UpscalerRegistry:
    """Lists and runs image upscalers. One instance per engine; no module-level state.

    `dirs`: folders scanned for model files (missing ones are fine). `device`/`dtype`: where models run and
    the preferred half type (fp16/bf16 is used only on CUDA and only when the architecture supports it).
    `allow_pickle`: load .pth/.pt/.ckpt files (through the safe loader; refused otherwise).
    `tile`/`overlap`: tile size and overlap in input pixels. `builtin`: the shipped upscalers (a file or a
    pipeline folder each; listed whenever they exist; None: none). `cache_size`: how many loaded models stay in
    memory. `diffusion`: the options of diffusion upscalers (steps, noise level, CFG, seed, tile).
    """

    def __init__(
        self,
        dirs: list[Path] | tuple[Path, ...],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        allow_pickle: bool = False,
        tile: int = 256,
        overlap: int = 16,
        builtin: Sequence[Path] | None = (BUILTIN_UPSCALER, BUILTIN_DIFFUSION_UPSCALER),
        cache_size: int = 1,
        diffusion: DiffusionUpscaleOptions | None = None,
    ):
        self.dirs = [Path(d) for d in dirs]
        self.device = torch.device(device)
        self.dtype = dtype
        self.allow_pickle = allow_pickle
        self.tile = tile
        self.overlap = overlap
        self.builtin = [Path(b) for b in builtin or ()]
        self.cache_size = max(0, cache_size)
        self.diffusion = diffusion or DiffusionUpscaleOptions()  # steps, noise level, ... of diffusion upscalers
        self._entries: dict[str, UpscalerEntry] = {}
        self._extensions: dict[str, UpscalerEntry] = {}
        self._loaded: OrderedDict[Path, Any] = OrderedDict()
        self._lock = threading.RLock()
        self.refresh()

    # ---- listing ------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Rescan the folders. Files are listed by stem; the first of two equal stems wins (logged)."""
        suffixes = UPSCALER_SUFFIXES  # pickles are listed; loading refuses them unless allowed
        entries: dict[str, UpscalerEntry] = {n: UpscalerEntry(n, "basic") for n in BASIC_UPSCALERS}
        files: list[Path] = [b for b in self.builtin if b.is_file()]
        for d in self.dirs:
            if d.is_dir():
                files.extend(sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in suffixes))
        folders = [b for b in self.builtin if b.is_dir()]
        folders += [p for d in self.dirs if d.is_dir() for p in sorted(d.iterdir()) if p.is_dir()]
        seen: set[Path] = set()
        for p in folders:
            cls = upscaler_class(p)
            if cls is not None and p.name not in entries:
                entries[p.name] = UpscalerEntry(p.name, "diffusion", p, cls.scale, pipeline=cls)
        for p in sorted(files, key=lambda f: f.suffix.lower() != ".safetensors"):  # safetensors before pickles
            real = p.resolve()
            if real in seen:
                continue
            seen.add(real)
            diffusion = upscaler_file_class(p)
            name = diffusion[0] if diffusion else p.stem
            if name in entries:
                log.warning("upscaler %s: %s hides %s", name, entries[name].path, p)
                continue
            if diffusion:
                entries[name] = UpscalerEntry(name, "diffusion", p, diffusion[1].scale, pipeline=diffusion[1])
            else:
                entries[name] = UpscalerEntry(name, "model", p, _scale_from_name(p.stem))
        with self._lock:
            for name, e in self._entries.items():  # keep scales learned by loading
                if name in entries and e.path == entries[name].path and e.scale is not None:
                    entries[name].scale = e.scale
            for name, e in self._extensions.items():
                entries.setdefault(name, e)
            self._entries = entries

    def names(self) -> list[str]:
        """ "None", "Lanczos", "Nearest", then model and diffusion upscalers (sorted), then extension ones.
        Latent modes are not here: see `latent_modes()`."""
        with self._lock:
            basic = [n for n in BASIC_UPSCALERS]
            models = sorted((n for n, e in self._entries.items() if e.kind in ("model", "diffusion")), key=str.lower)
            ext = [n for n, e in self._entries.items() if e.kind == "extension"]
        return basic + models + ext

    def fallback(self, name: str, field: str, *, latent: bool = False) -> Fallback:
        """Resolve an upscaler name as clients send it. A listed name (any case) is used; with `latent` (the
        hires fix) so is a latent mode, and an unknown "Latent ..." name becomes "Latent". A name of a model
        upscaler this server does not have ("R-ESRGAN 4x+", "4x-UltraSharp", "SwinIR_4x": A1111 downloads
        some on first use, this server never downloads) falls back, with a warning naming `field`, to an
        installed model upscaler of the same scale (default 4) or else to Lanczos. Anything else is a
        RequestError(`field`) listing the choices (A1111 fails on it too)."""
        text = (name or "").strip()
        names = self.names()
        choices = [*latent_modes(), *names] if latent else names
        for n in choices:
            if n.lower() == text.lower():
                return Fallback(n)
        if latent and text.lower().startswith("latent"):
            return self._fell_back(field, text, "Latent", "a latent upscale mode")
        scale = _scale_from_name(text)
        if scale is None and not _MODEL_NAME_RE.search(text):
            raise RequestError(field, f"unknown upscaler {text!r}; choose one of: " + ", ".join(choices))
        scale = scale or 4
        with self._lock:
            same = sorted(
                (n for n, e in self._entries.items() if e.kind == "model" and e.scale == scale), key=str.lower
            )
        if same:
            return self._fell_back(field, text, same[0], f"the installed {scale}x model upscaler")
        return self._fell_back(field, text, "Lanczos", f"no {scale}x model upscaler is installed")

    @staticmethod
    def _fell_back(field: str, asked: str, used: str, why: str) -> Fallback:
        warning = f"{field}: upscaler {asked!r} is not available here (nothing is downloaded); used {used!r} ({why})"
        log.warning("%s", warning)
        return Fallback(used, warning)

    def infos(self) -> list[dict]:
        """/sdapi/v1/upscalers: {name, model_name, model_path, model_url, scale} per upscaler."""
        with self._lock:
            return [self._entries[n].info() for n in self.names()]

    def entry(self, name: str) -> UpscalerEntry:
        """The entry for `name`, or RequestError naming the choices."""
        with self._lock:
            e = self._entries.get(name)
        if e is None:
            raise RequestError("upscaler", f"unknown upscaler {name!r}; choose one of {self.names()}")
        return e

    def register(self, name: str, fn: UpscaleFn, *, scale: float | None = None) -> None:
        """Add an extension upscaler `fn(image, scale) -> image`. Names must be new."""
        if not name or name in LATENT_MODES:
            raise ValueError(f"invalid upscaler name {name!r}")
        with self._lock:
            if name in self._entries:
                raise ValueError(f"an upscaler named {name!r} exists already")
            e = UpscalerEntry(name, "extension", None, scale, fn)
            self._extensions[name] = e
            self._entries[name] = e

    # ---- models -------------------------------------------------------------------------------------
    def load(self, name: str) -> Any:
        """The spandrel ImageModelDescriptor of a model upscaler, or the `DiffusionUpscaler` of a diffusion one,
        on the registry's device (cached)."""
        e = self.entry(name)
        if e.kind not in ("model", "diffusion") or e.path is None:
            raise RequestError("upscaler", f"{name!r} is not a model upscaler")
        with self._lock:
            if e.path in self._loaded:
                self._loaded.move_to_end(e.path)
                return self._loaded[e.path]
            if e.pipeline is not None:
                desc = e.pipeline(e.path, self.device, self._diffusion_dtype(), self.allow_pickle)
            else:
                desc = self._build(e.path)
            e.scale = desc.scale
            if self.cache_size:
                self._loaded[e.path] = desc
                while len(self._loaded) > self.cache_size:
                    self._loaded.popitem(last=False)
            return desc

    def _build(self, path: Path) -> Any:
        from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError, canonicalize_state_dict

        from .models.loading import ModelFileError, load_state_dict

        try:
            state = load_state_dict(path, allow_pickle=self.allow_pickle)
        except ModelFileError as exc:
            raise RequestError("upscaler", f"{path.stem}: {exc.reason}") from None
        state = canonicalize_state_dict(dict(state))
        try:
            desc = ModelLoader(device="cpu").load_from_state_dict(state)
        except UnsupportedModelError:
            raise RequestError("upscaler", f"{path.name}: not an architecture spandrel knows") from None
        if not isinstance(desc, ImageModelDescriptor) or desc.input_channels not in (1, 3):
            raise RequestError("upscaler", f"{path.name}: a {desc.architecture.name} model, not an image upscaler")
        dtype = self._run_dtype(desc)
        desc.to(self.device, dtype).eval()
        log.info(
            "loaded upscaler %s (%s x%d, %s on %s)", path.name, desc.architecture.name, desc.scale, dtype, self.device
        )
        return desc

    def _run_dtype(self, desc: Any) -> torch.dtype:
        if self.device.type == "cuda":
            if self.dtype == torch.float16 and desc.supports_half:
                return torch.float16
            if self.dtype == torch.bfloat16 and desc.supports_bfloat16:
                return torch.bfloat16
        return torch.float32

    def is_latent_upscaler(self, name: str) -> bool:
        """Whether `name` is an SD x2 latent upscaler (the hires fix then keeps its latents)."""
        with self._lock:
            e = self._entries.get(name)
        return e is not None and e.pipeline is X2LatentUpscaler

    def _diffusion_dtype(self) -> torch.dtype:
        return self.dtype if self.device.type == "cuda" else torch.float32

    def unload(self) -> None:
        """Forget loaded models (frees their memory)."""
        with self._lock:
            self._loaded.clear()

    # ---- running ------------------------------------------------------------------------------------
    def upscale(
        self,
        image: Image.Image,
        name: str,
        *,
        scale: float | None = None,
        size: tuple[int, int] | None = None,
        progress: ProgressFn | None = None,
        cancel: Callable[[], None] | None = None,
    ) -> Image.Image:
        """Upscale `image` with upscaler `name` by `scale` or to `size` = (width, height) exactly.

        Model upscalers run (tiled) until the image is at least the target size, at most MAX_PASSES times,
        then Lanczos gives the exact size; a target no larger than the image is a plain Lanczos resize.
        `progress(done, total)` counts tiles; `cancel()` is called before each tile (and after each denoising
        step of a diffusion upscaler) and may raise.
        An alpha channel is resized with Lanczos. Unknown `name` -> RequestError("upscaler", ...).
        """
        e = self.entry(name)
        tw, th = target_size(image.size, scale=scale, size=size)
        if e.kind == "basic":
            out = (
                image
                if (tw, th) == image.size
                else image.resize((tw, th), Image.NEAREST if name == "Nearest" else Image.LANCZOS)
            )
            if progress is not None:
                progress(1, 1)
            return out
        alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
        src_mode = image.mode
        rgb = image.convert("RGB")
        if e.kind == "extension":
            assert e.fn is not None
            out = e.fn(rgb, max(tw / rgb.width, th / rgb.height)).convert("RGB")
            if progress is not None:
                progress(1, 1)
        else:
            prompt = self.diffusion.prompt or image_prompt(image)
            out = self._run_model(rgb, name, (tw, th), progress, cancel, prompt=prompt)
        if out.size != (tw, th):
            out = out.resize((tw, th), Image.LANCZOS)
        if alpha is not None:
            out = out.convert("RGBA")
            out.putalpha(alpha.resize((tw, th), Image.LANCZOS))
        elif src_mode == "L":
            out = out.convert("L")
        return out

    def _run_model(
        self,
        image: Image.Image,
        name: str,
        target: tuple[int, int],
        progress: ProgressFn | None,
        cancel: Callable[[], None] | None,
        prompt: str = "",
    ) -> Image.Image:
        desc = self.load(name)
        diffusion = isinstance(desc, DiffusionUpscaler)
        opts = self.diffusion
        s = desc.scale
        sizes = [image.size]
        if s == 1:  # a 1x restoration model (denoise, de-JPEG): applied once
            sizes.append(image.size)
        while s > 1 and len(sizes) <= MAX_PASSES and (sizes[-1][0] < target[0] or sizes[-1][1] < target[1]):
            w, h = sizes[-1]
            sizes.append((w * s, h * s))
        passes = len(sizes) - 1
        if passes == 0:
            return image
        from .tiling import TileGrid

        base_tile, overlap = (opts.tile, opts.overlap) if diffusion else (self.tile, self.overlap)
        totals = [len(TileGrid(w, h, base_tile, base_tile, overlap)) for w, h in sizes[:-1]]
        total, done = sum(totals), 0

        def tick(i: int, _n: int) -> None:
            if progress is not None:
                progress(done + i, total)

        if diffusion:  # tiles go through the pipeline as images; it places and casts them itself
            fn, dtype, channels = (lambda x: desc.upscale(_to_image(x), prompt, opts, cancel)), torch.float32, 3
        else:
            fn, dtype, channels = desc, next(desc.model.parameters()).dtype, desc.input_channels
        out = image
        for k in range(passes):
            x = _to_tensor(out, channels).to("cpu" if diffusion else self.device, dtype)
            tile = base_tile
            while True:
                try:
                    y = tiled_apply(x, fn, tile=tile, overlap=overlap, progress=tick, cancel=cancel)
                    break
                except torch.OutOfMemoryError:
                    if tile <= 64:
                        raise
                    tile //= 2  # progress restarts this pass with more, smaller tiles
                    log.warning("upscaler %s ran out of memory; retrying with %d px tiles", name, tile)
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
            if diffusion:  # its large-scale colour from the pass's input (`ldm_core.colour_fix`)
                out = colour_fix(_to_image(y), out, opts.colour_fix)
            else:
                out = _to_image(y)
            done += totals[k]
        return out


def _to_tensor(image: Image.Image, channels: int) -> torch.Tensor:
    """PIL -> float32 (1, channels, h, w) in [0, 1]."""
    arr = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    t = torch.from_numpy(arr)
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    return t[None]


def _to_image(t: torch.Tensor) -> Image.Image:
    """(1, c, h, w) in [0, 1] -> PIL RGB (c = 1 is replicated)."""
    arr = t[0].float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return Image.fromarray(arr, "RGB")
