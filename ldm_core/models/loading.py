"""The one loading choke point for weight files, and building ready-to-run models from registry entries.

`load_state_dict` is the only function that reads weight files: `.safetensors` through safetensors;
pickle-based files (`.ckpt`, `.pt`, `.pth`, `.bin`) are refused unless the caller opts in (the
`--allow-pickle` flag), and then read only with `torch.load(weights_only=True)`. Empty, truncated, corrupt,
HTML and git-LFS-pointer files raise `ModelFileError` naming the file and what is wrong.

`load_model` turns a registry entry (a diffusers folder or an original single file) into a `LoadedModel`;
`load_vae` does the same for a separate VAE. Both load straight into the dtype and onto the device the model
will run with: a single file's tensors are cast and moved one at a time into models built on the `meta`
device, a diffusers folder's components are read in the target dtype and moved one component at a time, so no
full fp32 copy is ever held on the CPU. Nothing here touches the network: diffusers and transformers are called
with `local_files_only=True` and configs/tokenizers come from the package.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from .detect import CheckpointKind, UnsupportedCheckpointError, detect_checkpoint, detect_diffusers
from .entry import ModelEntry
from .geometry import round_down, vae_scale_factor
from .hashes import file_sha256  # re-exported: A1111 "Model hash" = file_sha256(path)[:10]
from .sidecar import Sidecar, SidecarError, read_sidecar
from .single_file import (
    LayoutError,
    convert_checkpoint,
    convert_vae,
    infer_vae_config,
    text_encoder_slots,
)
from .suffixes import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, WEIGHT_SUFFIXES

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

__all__ = [
    "ModelFileError",
    "LoadedModel",
    "load_state_dict",
    "read_tensor_shapes",
    "check_weights_file",
    "file_sha256",
    "load_model",
    "load_vae",
    "load_shipped_tokenizer",
    "inspect_model",
]

log = logging.getLogger(__name__)

TOKENIZERS_DIR = Path(__file__).resolve().parent / "tokenizers"
#: Shipped tokenizer variant per family and text encoder (CLIP ViT-L pads with <|endoftext|>, OpenCLIP
#: with "!"), in the order of `single_file.text_encoder_slots` (the refiner's one is `tokenizer_2`).
FAMILY_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "sd1": ("clip",),
    "sd2": ("clip_g",),
    "sdxl": ("clip", "clip_g"),
    "sdxl-refiner": ("clip_g",),
}


def _tokenizer_name(text_encoder_name: str) -> str:
    return text_encoder_name.replace("text_encoder", "tokenizer")


_LFS_MAGIC = b"version https://git-lfs.github.com/spec/"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors caps its JSON header at 100 MB


class ModelFileError(Exception):
    """A model file or folder cannot be used; the message names it and says what is wrong."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


# ----------------------------------------------------------------------------------------------------------
# files


def check_weights_file(path: str | os.PathLike) -> None:
    """Cheap sanity checks of a weights file before loading: exists, not empty, not a git-LFS pointer or
    an HTML page; for safetensors also a well-formed header whose tensors fit in the file (truncation)."""
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(p, "file not found")
    size = p.stat().st_size
    if size == 0:
        raise ModelFileError(p, "file is empty (an interrupted download?)")
    with open(p, "rb") as f:
        head = f.read(512)
    if head.startswith(_LFS_MAGIC):
        raise ModelFileError(
            p,
            "is a git-LFS pointer, not the weights: fetch the real file (git lfs pull) or download it again",
        )
    if head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
        raise ModelFileError(p, "is an HTML page, not weights (a failed download?)")
    if p.suffix.lower() in SAFETENSORS_SUFFIXES:
        _safetensors_header(p)


def _safetensors_header(p: Path) -> dict[str, Any]:
    size = p.stat().st_size
    with open(p, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelFileError(p, f"truncated: only {size} bytes, not a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise ModelFileError(p, "not a safetensors file (corrupt header length)")
        if 8 + n > size:
            raise ModelFileError(
                p, f"truncated: the header needs {8 + n} bytes but the file has {size}; download it again"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as e:
            raise ModelFileError(p, f"corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ModelFileError(p, "corrupt safetensors header (not a JSON object)")
    data = size - 8 - n
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise ModelFileError(p, "corrupt safetensors header (bad tensor entries)") from None
    if end > data:
        raise ModelFileError(p, f"truncated: holds {data} of the {end} bytes of tensor data; download it again")
    return header


def read_tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a `.safetensors` file, read from its header only (no weights loaded)."""
    p = Path(path)
    check_weights_file(p)
    if p.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise ModelFileError(p, "shapes can only be read without loading from .safetensors files")
    header = _safetensors_header(p)
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


#: Keys that wrap the real weights in training checkpoints, tried in order (Lightning/A1111, BasicSR).
WRAPPER_KEYS = ("state_dict", "params_ema", "params")


def _unwrap(obj: Any) -> Any:
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            return obj
        obj = inner
    return obj


def _flatten(obj: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a (nested) mapping; nested keys joined with "." (A1111 `.pt` embeddings nest theirs)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
        elif isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
    return out


def load_state_dict(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read every tensor of a weights file onto the CPU: the project's one loading choke point.

    `.safetensors` loads through safetensors. `.ckpt`/`.pt`/`.pth`/`.bin` are pickles, which can run code
    when loaded: they are refused unless `allow_pickle`, and then read with `torch.load(weights_only=True)`.
    Wrappers (`"state_dict"`, BasicSR's `"params_ema"`/`"params"`) are unwrapped, other nested dicts are
    flattened with dotted keys (`{"a": {"b": t}}` -> `"a.b"`), and non-tensor entries are dropped.
    Raises `ModelFileError` (naming the file) for missing, empty, truncated, corrupt, HTML and git-LFS
    pointer files and for refused pickles.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise ModelFileError(
            p,
            f"unsupported file type {suffix or '(none)'}; expected .safetensors "
            f"(or {', '.join(PICKLE_SUFFIXES)} with --allow-pickle)",
        )
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelFileError(
            p,
            f"refusing to load a pickle-based {suffix} file: pickles can run code when "
            "loaded. Prefer a .safetensors version of the model, or pass --allow-pickle "
            "to load it (weights only)",
        )
    check_weights_file(p)
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(p), device="cpu")
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ModelFileError(p, f"not a readable safetensors file ({e}); download it again") from None
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ModelFileError(
                p,
                "holds Python objects besides tensors, which the safe loader "
                f"(weights_only=True) refuses: {str(e).splitlines()[0]}",
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, struct.error) as e:
            raise ModelFileError(p, f"not a readable PyTorch checkpoint, truncated or corrupt ({e})") from None
    obj = _unwrap(obj)
    if not isinstance(obj, Mapping):
        raise ModelFileError(p, f"holds a {type(obj).__name__}, not a dict of tensors")
    tensors = _flatten(obj)
    if not tensors:
        raise ModelFileError(p, "holds no tensors")
    return tensors


# ----------------------------------------------------------------------------------------------------------
# tokenizers


def load_shipped_tokenizer(name: Literal["clip", "clip_g"] = "clip"):
    """A CLIPTokenizer from the files shipped in `ldm_core/models/tokenizers/`. "clip" pads with
    <|endoftext|> (OpenAI CLIP: SD 1.x, SDXL's first encoder); "clip_g" pads with "!" (OpenCLIP: SD 2.x,
    SDXL's second encoder). Both share the BPE vocabulary and merges in `tokenizers/clip/`."""
    from transformers import CLIPTokenizer

    folder = TOKENIZERS_DIR / name
    if not (folder / "tokenizer_config.json").is_file():
        raise ValueError(f"unknown shipped tokenizer {name!r}; choose clip or clip_g")
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    kwargs = {
        k: cfg[k]
        for k in (
            "bos_token",
            "eos_token",
            "pad_token",
            "unk_token",
            "model_max_length",
            "do_lower_case",
            "errors",
            "clean_up_tokenization_spaces",
        )
        if k in cfg
    }
    vocab_dir = TOKENIZERS_DIR / "clip"
    return CLIPTokenizer(vocab=str(vocab_dir / "vocab.json"), merges=str(vocab_dir / "merges.txt"), **kwargs)


# ----------------------------------------------------------------------------------------------------------
# loaded models


@dataclass
class LoadedModel:
    """A checkpoint's components on the CPU, ready to move to a device.

    `native_size` is the training resolution in pixels (UNet sample_size x `vae_scale_factor`);
    `vae_scale_factor` is pixels per latent, from the VAE's config (8 for every SD family, 4 for a three-level
    VAE); `work_size` rounds a requested size to it; `scheduler_config` is a diffusers
    scheduler config dict with the right `prediction_type`. `text_encoder_2`/`tokenizer_2` are SDXL's
    OpenCLIP ViT-bigG pair, None otherwise; the SDXL refiner has only that pair (`text_encoder` and
    `tokenizer` are None, as in its diffusers pipeline). `force_zeros_for_empty_prompt` is the pipeline config flag of
    that name (SDXL: true): an empty negative prompt is then conditioned on zeros, not on encoded "".
    """

    entry: ModelEntry
    kind: CheckpointKind
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    text_encoder_2: Any | None
    tokenizer_2: Any | None
    scheduler_config: dict[str, Any]
    native_size: int
    vae_scale_factor: int
    force_zeros_for_empty_prompt: bool = False
    rescale_cfg: float = 0.0  # the sidecar's recommended CFG rescale (0: off), for requests that set none

    def work_size(self, width: int | None, height: int | None) -> tuple[int, int]:
        """The size in pixels a request of `width` x `height` runs at: None/0 = `native_size`, other sizes
        rounded down to a multiple of `vae_scale_factor` (A1111 works at size // factor latents)."""
        f = self.vae_scale_factor
        return (
            round_down(width, f) if width else self.native_size,
            round_down(height, f) if height else self.native_size,
        )

    @property
    def sha256(self) -> str:
        """Full SHA-256 of the checkpoint (see `ModelEntry.sha256`)."""
        return self.entry.sha256

    @property
    def short_hash(self) -> str:
        """A1111's "Model hash": the first 10 hex digits of `sha256`."""
        return self.entry.short_hash

    def components(self) -> dict[str, Any]:
        """The parts under the argument names of diffusers' StableDiffusion(XL)(Img2Img)Pipeline (no
        scheduler); the refiner's `text_encoder`/`tokenizer` are None."""
        out = {
            "unet": self.unet,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
        }
        if self.text_encoder_2 is not None:
            out.update(text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2)
        return out


def _entry(entry_or_path: ModelEntry | str | os.PathLike) -> ModelEntry:
    if isinstance(entry_or_path, ModelEntry):
        return entry_or_path
    return ModelEntry.from_path(entry_or_path)


#: A VAE's dtype: fixed, or chosen from its config (e.g. `devices.vae_dtype_for`: fp16 only if `force_upcast`
#: is false); None = the model's dtype.
VaeDtype = torch.dtype | Callable[[Mapping[str, Any]], torch.dtype] | None


def _vae_dtype(vae_dtype: VaeDtype, config: Mapping[str, Any], dtype: torch.dtype) -> torch.dtype:
    if vae_dtype is None:
        return dtype
    return vae_dtype if isinstance(vae_dtype, torch.dtype) else vae_dtype(config)


def _float(
    sd: Mapping[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """Floating-point tensors cast to `dtype`, every tensor moved to `device`, one tensor at a time: a dict
    `sd` is emptied as it goes, so the source and the result never both hold every tensor."""
    out: dict[str, torch.Tensor] = {}
    pop = sd.pop if isinstance(sd, dict) else sd.__getitem__
    for k in list(sd):
        v = pop(k)
        out[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
    return out


def _mismatch(what: str, missing: set[str], unexpected: set[str], wrong: list[str]) -> str:
    parts = []
    for label, keys in (
        ("missing", sorted(missing)),
        ("unexpected", sorted(unexpected)),
        ("wrong shape", wrong),
    ):
        if keys:
            parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
    return f"{what} weights do not fit its config: " + "; ".join(parts)


def _build_diffusers(
    cls,
    config: dict[str, Any],
    sd: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    what: str,
    device: torch.device | str | None = None,
):
    """Instantiate a diffusers model on the meta device and assign `sd`, cast to `dtype` on `device` (no
    random init, no second copy)."""
    with torch.device("meta"):
        model = cls.from_config(config)
    expected = model.state_dict()
    missing, unexpected = set(expected) - set(sd), set(sd) - set(expected)
    wrong = [k for k in set(expected) & set(sd) if tuple(expected[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or wrong:
        raise LayoutError(_mismatch(what, missing, unexpected, wrong))
    model.load_state_dict(_float(sd, dtype, device), strict=True, assign=True)
    return model.eval()


def _build_text_encoder(
    config: dict[str, Any],
    sd: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    what: str,
    device: torch.device | str | None = None,
):
    """A CLIPTextModel (or ...WithProjection when `sd` has a text projection) from canonical weights, in
    `dtype` (built on the CPU, then moved to `device`)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if "text_projection.weight" in sd else CLIPTextModel
    cfg = CLIPTextConfig.from_dict({k: v for k, v in config.items() if k != "architectures"})
    cfg.architectures = [cls.__name__]
    with torch.device("meta"):
        expected = cls(cfg).state_dict()
    flat = "text_model.embeddings.token_embedding.weight" not in expected
    sd = {(k[len("text_model.") :] if flat and k.startswith("text_model.") else k): v for k, v in sd.items()}
    missing, unexpected = set(expected) - set(sd), set(sd) - set(expected)
    missing.discard("text_model.embeddings.position_ids")
    missing.discard("embeddings.position_ids")
    wrong = [k for k in set(expected) & set(sd) if tuple(expected[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or wrong:
        raise LayoutError(_mismatch(what, missing, unexpected, wrong))
    model, info = cls.from_pretrained(
        None, config=cfg, state_dict=_float(sd, dtype), dtype=dtype, output_loading_info=True
    )
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise LayoutError(f"{what}: transformers reports {info}")
    if device is not None:
        model.to(device)
    return model.eval()


def _sidecar(path: Path) -> Sidecar:
    try:
        return read_sidecar(path)
    except SidecarError as e:
        raise ModelFileError(path, f"bad sidecar: {e}") from None


def _kind_with_sidecar(path: Path, kind: CheckpointKind) -> CheckpointKind:
    side = _sidecar(path)
    if side.family or side.prediction_type:
        log.info(
            "%s: sidecar %s sets family=%s prediction_type=%s",
            path.name,
            ", ".join(map(str, side.sources)),
            side.family,
            side.prediction_type,
        )
    return kind.with_overrides(side.family, side.prediction_type)


def inspect_model(entry: ModelEntry | str | os.PathLike, *, allow_pickle: bool = False) -> CheckpointKind:
    """The kind of a checkpoint without building it: configs for a diffusers folder, the header for a
    `.safetensors` file (a pickle is loaded, so it needs `allow_pickle`), then the sidecar's overrides."""
    e = _entry(entry)
    if e.format == "diffusers":
        return _diffusers_kind(e.path)
    if e.path.suffix.lower() in SAFETENSORS_SUFFIXES:
        shapes: Mapping[str, Any] = read_tensor_shapes(e.path)
    else:
        shapes = load_state_dict(e.path, allow_pickle=allow_pickle)
    try:
        kind = detect_checkpoint(shapes)
    except UnsupportedCheckpointError as err:
        raise ModelFileError(e.path, str(err)) from None
    return _kind_with_sidecar(e.path, kind)


def _vae_scale(vae) -> int:
    return vae_scale_factor(vae.config)


def load_model(
    entry: ModelEntry | str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    vae_dtype: VaeDtype = None,
    device: torch.device | str | None = None,
) -> LoadedModel:
    """Load a checkpoint (diffusers folder or original single file) in `dtype` (the VAE in `vae_dtype`: a
    dtype, or a function of the VAE's config; None = `dtype`) straight onto `device` (None = the CPU).

    Single files: detect the kind from keys and shapes, apply the sidecar, build configs from the shipped
    family config plus the shapes, convert keys, and use the shipped tokenizers. Raises `ModelFileError`
    naming the file for unreadable, refused or unrecognised checkpoints.
    """
    e = _entry(entry)
    model = (
        _load_diffusers(e, dtype, allow_pickle, vae_dtype, device)
        if e.format == "diffusers"
        else _load_single_file(e, dtype, allow_pickle, vae_dtype, device)
    )
    model.rescale_cfg = _sidecar(e.path).rescale_cfg or 0.0
    return model


def _load_single_file(
    e: ModelEntry, dtype: torch.dtype, allow_pickle: bool, vae_dtype: VaeDtype, device: torch.device | str | None
) -> LoadedModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    sd = load_state_dict(e.path, allow_pickle=allow_pickle)
    try:
        kind = _kind_with_sidecar(e.path, detect_checkpoint(sd))
        conv = convert_checkpoint(sd, kind)
        del sd
        unet = _build_diffusers(
            UNet2DConditionModel, conv.configs["unet"], conv.state_dicts.pop("unet"), dtype, "UNet", device
        )
        vae_cfg = conv.configs["vae"]
        vae = _build_diffusers(
            AutoencoderKL, vae_cfg, conv.state_dicts.pop("vae"), _vae_dtype(vae_dtype, vae_cfg, dtype), "VAE", device
        )
        slots = [name for name, _, _ in text_encoder_slots(kind.family)]
        texts: dict[str, Any] = {
            n: _build_text_encoder(conv.configs[n], conv.state_dicts.pop(n), dtype, n.replace("_", " "), device)
            for n in slots
        }
    except (UnsupportedCheckpointError, LayoutError) as err:
        raise ModelFileError(e.path, str(err)) from None
    for n, tok in zip(slots, FAMILY_TOKENIZERS[kind.family], strict=True):
        texts[_tokenizer_name(n)] = load_shipped_tokenizer(tok)  # type: ignore[arg-type]
    scale = _vae_scale(vae)
    return LoadedModel(
        entry=e,
        kind=kind,
        unet=unet,
        vae=vae,
        text_encoder=texts.get("text_encoder"),
        tokenizer=texts.get("tokenizer"),
        text_encoder_2=texts.get("text_encoder_2"),
        tokenizer_2=texts.get("tokenizer_2"),
        scheduler_config=conv.configs["scheduler"],
        native_size=int(unet.config.sample_size) * scale,
        vae_scale_factor=scale,
        force_zeros_for_empty_prompt=zeros_for_empty_prompt(conv.configs["model_index"], kind),
    )


def zeros_for_empty_prompt(model_index: Mapping[str, Any], kind: CheckpointKind) -> bool:
    """The pipeline's `force_zeros_for_empty_prompt` flag from a model_index.json; when the key is absent,
    diffusers' default for the family's pipeline (true for SDXL; the refiner's own config says false)."""
    flag = model_index.get("force_zeros_for_empty_prompt")
    if flag is None:
        return kind.family == "sdxl"
    return bool(flag)


# ----------------------------------------------------------------------------------------------------------
# diffusers folders


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(path, "file not found") from None
    except (OSError, ValueError) as e:
        raise ModelFileError(path, f"unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFileError(path, "not a JSON object")
    return data


def _diffusers_kind(root: Path) -> CheckpointKind:
    unet_cfg = _read_json(root / "unet" / "config.json")
    sched_path = root / "scheduler" / "scheduler_config.json"
    sched = _read_json(sched_path) if sched_path.is_file() else {}
    index_path = root / "model_index.json"
    index = _read_json(index_path) if index_path.is_file() else {}
    kind = detect_diffusers(unet_cfg, sched, index)
    if kind.family == "sdxl" and (root / "text_encoder_2").is_dir() and not (root / "text_encoder").is_dir():
        kind = kind.with_overrides(family="sdxl-refiner")  # bigG alone: the refiner's layout
    elif (root / "text_encoder_2").is_dir() and kind.family not in ("sdxl", "sdxl-refiner"):
        kind = kind.with_overrides(family="sdxl")
    return _kind_with_sidecar(root, kind)


def _weights_kwargs(folder: Path, allow_pickle: bool) -> dict[str, Any]:
    """Check a component folder's weights files and pick from_pretrained's format/variant arguments."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES]
    safe = [p for p in files if p.suffix.lower() in SAFETENSORS_SUFFIXES]
    if not files:
        raise ModelFileError(folder, "holds no weights file")
    if not safe and not allow_pickle:
        raise ModelFileError(
            folder,
            "holds only pickle-based weights (.bin): prefer a .safetensors version, or "
            "pass --allow-pickle to load it (weights only)",
        )
    for p in safe or files:
        check_weights_file(p)
    chosen = safe or files
    kwargs: dict[str, Any] = {"use_safetensors": bool(safe)}
    if not any(len(p.name.split(".")) == 2 for p in chosen):  # only variant files such as *.fp16.safetensors
        kwargs["variant"] = chosen[0].name.split(".")[-2]
    return kwargs


def _moved(model, device: torch.device | str | None):
    """`model` in eval mode, on `device` when one is given."""
    if device is not None:
        model.to(device)
    return model.eval()


def _folder_tokenizer(root: Path, sub: str, fallback: str):
    folder = root / sub
    if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
        from transformers import CLIPTokenizer

        try:
            return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelFileError(folder, f"unreadable tokenizer ({e})") from None
    return load_shipped_tokenizer(fallback)  # type: ignore[arg-type]


def _load_diffusers(
    e: ModelEntry,
    dtype: torch.dtype,
    allow_pickle: bool,
    vae_dtype: VaeDtype = None,
    device: torch.device | str | None = None,
) -> LoadedModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = e.path
    if not (root / "model_index.json").is_file():
        raise ModelFileError(root, "not a diffusers folder (no model_index.json)")
    kind = _diffusers_kind(root)
    sched_path = root / "scheduler" / "scheduler_config.json"
    scheduler_config = _read_json(sched_path) if sched_path.is_file() else {}
    if not scheduler_config:
        from .single_file import scheduler_config_for

        scheduler_config = scheduler_config_for(kind)
    scheduler_config["prediction_type"] = kind.prediction_type

    def component(sub: str, load):
        folder = root / sub
        if not folder.is_dir():
            raise ModelFileError(root, f"has no {sub}/ folder")
        kwargs = _weights_kwargs(folder, allow_pickle)
        try:
            return load(folder, kwargs)
        except ModelFileError:
            raise
        except Exception as err:  # noqa: BLE001 - library errors vary; report them against the folder
            raise ModelFileError(folder, f"could not load {sub}: {err}") from err

    # each component is read in its final dtype (low_cpu_mem_usage: no random init) and moved on before the
    # next one is read, so the CPU holds at most one component
    def diffusers_model(cls, dt: torch.dtype = dtype):
        return lambda folder, kw: _moved(
            cls.from_pretrained(folder, local_files_only=True, torch_dtype=dt, low_cpu_mem_usage=True, **kw), device
        )

    def text_model(cls):
        return lambda folder, kw: _moved(cls.from_pretrained(folder, local_files_only=True, dtype=dtype, **kw), device)

    unet = component("unet", diffusers_model(UNet2DConditionModel))
    vae_config_path = root / "vae" / "config.json"
    vae_cfg = _read_json(vae_config_path) if vae_config_path.is_file() else {}
    vae = component("vae", diffusers_model(AutoencoderKL, _vae_dtype(vae_dtype, vae_cfg, dtype)))
    texts: dict[str, Any] = {}
    classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    slots = [name for name, _, _ in text_encoder_slots(kind.family)]
    for n, tok_name in zip(slots, FAMILY_TOKENIZERS[kind.family], strict=True):
        texts[n] = component(n, text_model(classes[n]))
        texts[_tokenizer_name(n)] = _folder_tokenizer(root, _tokenizer_name(n), tok_name)
    te, tok = texts.get("text_encoder"), texts.get("tokenizer")
    te2, tok2 = texts.get("text_encoder_2"), texts.get("tokenizer_2")
    scale = _vae_scale(vae)
    model_index = _read_json(root / "model_index.json")
    return LoadedModel(
        entry=e,
        kind=kind,
        unet=unet,
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        text_encoder_2=te2,
        tokenizer_2=tok2,
        scheduler_config=scheduler_config,
        native_size=int(unet.config.sample_size) * scale,
        vae_scale_factor=scale,
        force_zeros_for_empty_prompt=zeros_for_empty_prompt(model_index, kind),
    )


# ----------------------------------------------------------------------------------------------------------
# separate VAEs

#: Scaling factor of SD 1.x / 2.x VAEs; SDXL's is 0.13025.
DEFAULT_VAE_SCALING_FACTOR = 0.18215
_VAE_PREFIXES = ("first_stage_model.", "vae.")


def load_vae(
    entry: ModelEntry | str | os.PathLike,
    *,
    dtype: VaeDtype = torch.float32,
    allow_pickle: bool = False,
    scaling_factor: float | None = None,
    device: torch.device | str | None = None,
) -> AutoencoderKL:
    """Load a separate VAE (models/VAE): a diffusers VAE folder, or a single file in the original layout
    (with or without a `first_stage_model.` prefix) or in diffusers naming.

    A VAE file does not say which family it was trained for, so its `scaling_factor` is
    `scaling_factor` if given, else the folder's config value, else 0.18215 (SD 1.x/2.x). Callers
    swapping a checkpoint's VAE should pass the checkpoint VAE's own factor (SDXL: 0.13025). `dtype` is a
    dtype or a function of the VAE's config (see `load_model`); `device` where it is loaded to (None: CPU).
    """
    from diffusers import AutoencoderKL

    from .configs import shipped_config

    e = _entry(entry)
    p = e.path
    if p.is_dir():
        folder = p / "vae" if (p / "vae" / "config.json").is_file() else p
        kwargs = _weights_kwargs(folder, allow_pickle)
        dt = _vae_dtype(dtype, _read_json(folder / "config.json"), torch.float32)
        try:
            vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, torch_dtype=dt, **kwargs)
        except Exception as err:  # noqa: BLE001
            raise ModelFileError(folder, f"could not load VAE: {err}") from err
        if scaling_factor is not None:
            vae.register_to_config(scaling_factor=scaling_factor)
        return _moved(vae, device)

    sd = load_state_dict(p, allow_pickle=allow_pickle)
    for prefix in _VAE_PREFIXES:
        if any(k.startswith(prefix + "encoder.") for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    sd = {k: v for k, v in sd.items() if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}
    if not sd:
        raise ModelFileError(p, "holds no VAE weights (encoder.*/decoder.* tensors)")
    try:
        if any(k.startswith("encoder.down_blocks.") for k in sd):  # diffusers naming: map back to infer shapes
            levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down_blocks."))
            lpb = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down_blocks.0.resnets."))
            ldm = convert_vae(sd, {"block_out_channels": [0] * levels, "layers_per_block": lpb}, False)
        else:
            ldm = sd
        cfg = {**shipped_config("sd1", "vae"), **infer_vae_config(ldm)}
        cfg["scaling_factor"] = scaling_factor or DEFAULT_VAE_SCALING_FACTOR
        weights = convert_vae(ldm, cfg, to_diffusers=True)
        return _build_diffusers(AutoencoderKL, cfg, weights, _vae_dtype(dtype, cfg, torch.float32), "VAE", device)
    except LayoutError as err:
        raise ModelFileError(p, str(err)) from None
