"""EngineConfig: everything the engine needs to know about its environment, built once from flags and
settings and passed in explicitly. No module of ldm_core reads global settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Literal

Precision = Literal["auto", "fp16", "bf16", "fp32"]
Offload = Literal["none", "model", "sequential"]

#: The built-in model that ships with the project (a diffusers folder).
BUILTIN_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "builtin"
#: the folders beside it (the repository's models/) that hold its shipped add-ons, by config field: its LoRA,
#: upscalers, ControlNets and motion module
SHIPPED_ADDON_DIRS: dict[str, tuple[str, ...]] = {
    "lora_dirs": ("Lora",),
    "upscaler_dirs": ("ESRGAN", "SD-Upscale"),
    "controlnet_dirs": ("ControlNet",),
    "motion_dirs": ("AnimateDiff",),
}


#: how a diffusion upscaler's output takes its large-scale colour from its input (`ldm_core.colour_fix`)
COLOUR_FIXES = ("Wavelet", "AdaIN", "None")


@dataclass(frozen=True)
class DiffusionUpscaleOptions:
    """What a diffusion upscaler runs with (Settings > Upscaling, `diffusion_upscale_*` options). `prompt` ""
    means the image's own prompt, read from its infotext (none: an empty prompt). `guidance_scale` 0 means the
    upscaler's recommended CFG (its sidecar's `cfg_scale`; 9, Stability's x4 default, when it has none); CFG
    is off at 1 or below, as in diffusers."""

    steps: int = 20
    noise_level: int = 20
    guidance_scale: float = 0.0
    seed: int = 0
    prompt: str = ""
    ldsr_steps: int = 100  # LDSR's DDIM steps (A1111's "ldsr_steps" setting and default)
    colour_fix: str = "Wavelet"  # the output's large-scale colour from the input: one of COLOUR_FIXES
    # SD x4 upscalers: guidance by the low-resolution image (`diffusion_upscalers.x4_sample`); 0: the
    # upscaler's recommended one (its sidecar's `image_guidance`, else 1: off)
    image_guidance: float = 0.0
    tile: int = 128  # input pixels per tile (the x4 model was trained on 128 px crops)
    overlap: int = 16


@dataclass(frozen=True)
class EngineConfig:
    """Paths and policies of one engine instance.

    Folders follow the A1111 names so users can point us at existing installs. `device` is "auto"
    (CUDA > MPS > CPU) or a torch device string. `precision` "auto" means fp16 on CUDA and fp32 elsewhere.
    `attention` is a name in the attention registry ("auto", "sdpa", "xformers", "sliced").
    """

    data_dir: Path = Path(".")
    ckpt_dirs: tuple[Path, ...] = ()
    vae_dirs: tuple[Path, ...] = ()
    lora_dirs: tuple[Path, ...] = ()
    embeddings_dirs: tuple[Path, ...] = ()
    upscaler_dirs: tuple[Path, ...] = ()
    controlnet_dirs: tuple[Path, ...] = ()
    annotator_dirs: tuple[Path, ...] = ()  # preprocessor models (depth, segmentation): models/annotators/<name>/
    motion_dirs: tuple[Path, ...] = ()  # AnimateDiff motion modules (and SVD folders): models/AnimateDiff/, models/SVD/
    outputs_dir: Path = Path("outputs")
    builtin_model_dir: Path | None = BUILTIN_MODEL_DIR
    device: str = "auto"
    precision: Precision = "auto"
    vae_precision: Precision = "auto"
    attention: str = "auto"
    offload: Offload = "none"
    vae_tiling: bool = False
    vae_slicing: bool = False
    channels_last: bool | None = None  # None: on for CUDA
    allow_pickle: bool = False
    model_cache_size: int = 1
    cpu_noise: bool = True  # randn_source "CPU": noise drawn on the CPU (a seed, one image on any device); False: "GPU"
    save_images: bool = True
    filename_pattern: str = "[number]-[seed]"
    samples_format: str = "png"  # file format of saved images: png, jpg/jpeg or webp (A1111's samples_format)
    jpeg_quality: int = 80  # quality of saved jpg/webp images, 1..100 (A1111's jpeg_quality)
    preview_every: int = 1  # steps between live previews; 0 disables previews
    # how saved images are written (ldm_core.outputs.Writer; None: write + fsync); a test injects a failing one
    # (outputs.disk_full_writer) to check that a full disk is a clear error with no partial file (issue 16)
    output_writer: Callable[[BinaryIO, bytes], None] | None = None
    # steps, noise level, CFG, seed and prompt of the SD x4 / x2 latent upscalers (Settings > Upscaling)
    diffusion_upscale: DiffusionUpscaleOptions = field(default_factory=DiffusionUpscaleOptions)
    # torch.compile of the UNet: "auto" = on CUDA, "on", "off" (ldm_core.compiled)
    compile: Literal["auto", "on", "off"] = "auto"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_data_dir(cls, data_dir: str | Path = ".", **overrides) -> EngineConfig:
        """A config with the A1111 folder layout under `data_dir`; keyword arguments override fields."""
        d = Path(data_dir)
        base = cls(
            data_dir=d,
            ckpt_dirs=(d / "models" / "Stable-diffusion",),
            vae_dirs=(d / "models" / "VAE",),
            lora_dirs=(d / "models" / "Lora",),
            embeddings_dirs=(d / "embeddings",),
            upscaler_dirs=tuple(
                d / "models" / n for n in ("ESRGAN", "RealESRGAN", "SwinIR", "DAT", "HAT", "SD-Upscale", "LDSR")
            ),
            controlnet_dirs=(d / "models" / "ControlNet",),
            annotator_dirs=(d / "models" / "annotators",),
            motion_dirs=(d / "models" / "AnimateDiff", d / "models" / "SVD"),
            outputs_dir=d / "outputs",
        )
        return replace(base, **overrides)

    def with_shipped_addons(self) -> EngineConfig:
        """This config with the built-in model's shipped add-ons (`SHIPPED_ADDON_DIRS` under the repository's
        models/) after the data dir's own folders, so that a data dir elsewhere (`--data-dir`, or the current folder
        of the API-only server and the CLI) still offers what ships with the built-in model; unchanged when the
        built-in model is off or another, and where a folder is listed already."""
        if self.builtin_model_dir is None or self.builtin_model_dir.resolve() != BUILTIN_MODEL_DIR.resolve():
            return self
        root = BUILTIN_MODEL_DIR.parent
        changes = {}
        for name, folders in SHIPPED_ADDON_DIRS.items():
            have = getattr(self, name)
            listed = {p.resolve() for p in have}
            extra = tuple(root / f for f in folders if (root / f).resolve() not in listed)
            if extra:
                changes[name] = (*have, *extra)
        return replace(self, **changes)

    def with_(self, **changes) -> EngineConfig:
        """A copy with some fields changed (settings applied without a restart)."""
        return replace(self, **changes)
