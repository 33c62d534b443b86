"""Textual-inversion embeddings: the files in `embeddings/`, used in a prompt by writing their file name.

Formats read (one file = one embedding, named by its file stem):

* A1111 `.pt`: ``{"string_to_param": {"*": tensor (n, D)}, "name": ..., "step": ..., ...}``;
* A1111 / civitai `.safetensors`: ``{"emb_params": tensor (n, D)}``;
* diffusers `learned_embeds.bin` / `.safetensors`: ``{"<token>": tensor (D,) or (n, D)}``;
* SDXL: ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``.

Every file is read through the engine's loading choke point (`ldm_core.models.loading.load_state_dict`),
which refuses `.pt`/`.bin` pickles unless `allow_pickle` is set and then unpickles with `weights_only=True`.

Vectors are kept as float32 on the CPU, keyed by the text encoder they are for: "" for a single-encoder
embedding (SD1: D=768, SD2: D=1024), "clip_l" / "clip_g" for SDXL. `vectors(name, role, dim)` picks the
ones that fit a given text encoder, or None (the name then stays plain text).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..files import scan_named_files
from ..models.hashes import HashCache, file_sha256
from ..models.suffixes import EMBEDDING_SUFFIXES

log = logging.getLogger(__name__)

TI_HASH_LEN = 12  # hex digits of the SHA-256 in "TI hashes"
_FAMILY_BY_DIM = {768: "sd1", 1024: "sd2"}


@dataclass
class Embedding:
    """One loaded embedding: `vectors` maps an encoder role ("", "clip_l", "clip_g") to (n, D) float32."""

    name: str
    path: Path
    vectors: dict[str, torch.Tensor]
    step: int | None = None
    checkpoint: str | None = None  # A1111's sd_checkpoint_name, when the file records it

    @property
    def n_vectors(self) -> int:
        return max(v.shape[0] for v in self.vectors.values())

    @property
    def family(self) -> str | None:
        """ "sdxl", "sd1", "sd2" or None (unknown width), from the vectors' keys and width."""
        if "clip_g" in self.vectors:
            return "sdxl"
        v = self.vectors.get("") if "" in self.vectors else self.vectors.get("clip_l")
        return _FAMILY_BY_DIM.get(int(v.shape[1])) if v is not None else None


@dataclass
class EmbeddingEntry:
    """What the UI/API lists for one embedding file. `sha256` is None until the file was hashed (pass
    `hashes=True` to `entries`); `error` says why a file could not be read."""

    name: str
    path: Path
    sha256: str | None = None
    vectors: int | None = None
    shape: int | None = None  # width D of the (first) vectors
    family: str | None = None
    step: int | None = None
    checkpoint: str | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)


class EmbeddingError(ValueError):
    """A file that is not a textual-inversion embedding in a known format."""


def _as_2d(value, what: str) -> torch.Tensor:
    if isinstance(value, torch.nn.ParameterDict | dict):
        items = list(value.values())
        if len(items) != 1:
            raise EmbeddingError(f"{what}: expected one tensor, found {len(items)}")
        value = items[0]
    if not isinstance(value, torch.Tensor):
        raise EmbeddingError(f"{what}: not a tensor ({type(value).__name__})")
    t = value.detach().to("cpu", torch.float32)
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2 or t.shape[0] == 0:
        raise EmbeddingError(f"{what}: expected a (vectors, width) tensor, got shape {tuple(value.shape)}")
    return t.contiguous()


def parse_embedding(data: dict, name: str, path: Path) -> Embedding:
    """Build an `Embedding` from a loaded file's contents (see the module docstring for the formats)."""
    if not isinstance(data, dict) or not data:
        raise EmbeddingError(f"{path.name}: empty or not a dict")
    step = data.get("step") if isinstance(data.get("step"), int) else None
    ckpt = data.get("sd_checkpoint_name") if isinstance(data.get("sd_checkpoint_name"), str) else None
    if "string_to_param" in data:
        return Embedding(name, path, {"": _as_2d(data["string_to_param"], path.name)}, step, ckpt)
    flat = [k for k in data if isinstance(k, str) and k.startswith("string_to_param.")]
    if len(flat) == 1:
        return Embedding(name, path, {"": _as_2d(data[flat[0]], path.name)}, step, ckpt)
    if "emb_params" in data:
        return Embedding(name, path, {"": _as_2d(data["emb_params"], path.name)}, step, ckpt)
    if "clip_l" in data or "clip_g" in data:
        vecs = {k: _as_2d(data[k], f"{path.name}[{k}]") for k in ("clip_l", "clip_g") if k in data}
        return Embedding(name, path, vecs, step, ckpt)
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:  # diffusers: {"<token>": vectors}
        return Embedding(name, path, {"": _as_2d(next(iter(tensors.values())), path.name)})
    keys = ", ".join(sorted(map(str, data))[:6])
    raise EmbeddingError(f"{path.name}: not a textual-inversion embedding (keys: {keys})")


def read_embedding_file(
    path: str | os.PathLike, *, allow_pickle: bool = False, name: str | None = None
) -> Embedding:
    """Load one embedding file. Raises EmbeddingError for unknown formats, and the loader's error for
    refused pickles."""
    from ..models.loading import load_state_dict

    p = Path(path)
    return parse_embedding(load_state_dict(p, allow_pickle=allow_pickle), name or p.stem, p)


class EmbeddingLibrary:
    """The embeddings under `dirs` (searched recursively), by name (file stem; the first file found wins
    when two share a name). Loaded files are cached by (path, size, mtime). Thread-safe."""

    def __init__(
        self,
        dirs: Iterable[str | os.PathLike],
        allow_pickle: bool = False,
        hash_cache: HashCache | None = None,
    ):
        self.dirs = tuple(Path(d) for d in dirs)
        self.allow_pickle = allow_pickle
        self.hash_cache = hash_cache or HashCache()
        self._lock = threading.RLock()
        self._files: dict[str, Path] = {}
        self._loaded: dict[Path, tuple[tuple[int, int], Embedding | Exception]] = {}
        self.refresh()

    def refresh(self) -> None:
        """Rescan the folders."""
        files = scan_named_files(self.dirs, EMBEDDING_SUFFIXES, "embedding")
        with self._lock:
            self._files = files

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._files)

    def path(self, name: str) -> Path:
        with self._lock:
            if name not in self._files:
                raise KeyError(f"unknown embedding {name!r}")
            return self._files[name]

    def load(self, name: str) -> Embedding:
        """The embedding called `name`; raises KeyError, EmbeddingError or the loader's error."""
        p = self.path(name)
        st = p.stat()
        stamp = (st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._loaded.get(p)
        if hit is None or hit[0] != stamp:
            try:
                value: Embedding | Exception = read_embedding_file(
                    p, allow_pickle=self.allow_pickle, name=name
                )
            except Exception as exc:  # remembered so a broken file is not re-read every prompt
                value = exc
            with self._lock:
                self._loaded[p] = (stamp, value)
            hit = (stamp, value)
        if isinstance(hit[1], Exception):
            raise hit[1]
        return hit[1]

    def vectors(self, name: str, role: str, dim: int) -> torch.Tensor | None:
        """The (n, dim) vectors of `name` for a text encoder of width `dim` and role ("" for a model with one
        text encoder, "clip_l" / "clip_g" for SDXL's two), or None when the embedding is missing, unreadable
        or made for another model family (A1111 skips those too)."""
        try:
            emb = self.load(name)
        except Exception as exc:
            log.warning("embedding %s skipped: %s", name, exc)
            return None
        v = emb.vectors.get(role)
        return v if v is not None and v.shape[1] == dim else None

    def fits(self, name: str, model) -> bool:
        """Whether embedding `name` has vectors for one of `model`'s text encoders (a `LoadedModel`: SD1/SD2
        use `text_encoder`, SDXL `text_encoder` as "clip_l" and `text_encoder_2` as "clip_g")."""
        if model.kind.family in ("sdxl", "sdxl-refiner"):  # the refiner has only the "clip_g" encoder
            sides = [("clip_l", model.text_encoder), ("clip_g", model.text_encoder_2)]
        else:
            sides = [("", model.text_encoder)]
        return any(
            enc is not None and self.vectors(name, role, enc.get_input_embeddings().weight.shape[1]) is not None
            for role, enc in sides
        )

    def sha256(self, name: str) -> str:
        return file_sha256(self.path(name), self.hash_cache)

    def short_hash(self, name: str) -> str:
        """The first 12 hex digits of the file's SHA-256, as "TI hashes" writes them."""
        return self.sha256(name)[:TI_HASH_LEN]

    def entries(self, hashes: bool = False) -> list[EmbeddingEntry]:
        """Every embedding found by the last scan (`refresh`) with what can be read from it; `hashes`
        computes missing SHA-256s (slow once)."""
        out = []
        for name in self.names():
            p = self.path(name)
            e = EmbeddingEntry(name, p, sha256=self.hash_cache.cached(p))
            if hashes and e.sha256 is None:
                e.sha256 = self.sha256(name)
            try:
                emb = self.load(name)
                first = next(iter(emb.vectors.values()))
                e.vectors, e.shape, e.family = emb.n_vectors, int(first.shape[1]), emb.family
                e.step, e.checkpoint = emb.step, emb.checkpoint
            except Exception as exc:
                e.error = str(exc)
            out.append(e)
        return out
