"""The model registry: scans the checkpoint and VAE folders and finds models by the names users type.

Names follow A1111 so infotexts, API clients and habits carry over:

- checkpoint `filename`: path relative to its folder, with extension ("sub/model.safetensors");
  `name` (infotext "Model", A1111's model_name): the same without extension ("sub/model");
  `title` (UI/API choice): `filename [short hash]` once the hash is known, else `filename`.
- VAE `name` and `title`: the file name with extension ("vae-ft-mse-840000-ema-pruned.safetensors").
- diffusers folders (a `model_index.json` inside; for VAEs a `config.json` of an AutoencoderKL) use the
  folder's relative path for all three.

Hashes are SHA-256 of the file (A1111 "Model hash" = first 10 hex digits), cached in the registry's
`HashCache`; a diffusers folder's hash covers all its weights files (`folder_sha256`). Every scan starts a
background thread (one at a time) that hashes the checkpoints whose digest is not cached yet, so model lists
(the API's `/sdapi/v1/sd-models` `hash`/`sha256`, titles `file [hash]`) show hashes soon after startup
without delaying it; until a file's turn comes its hash reads as unknown. `hash_in_background=False` turns
this off (hashes are then computed when a model is loaded or looked up by hash).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from .entry import ModelEntry  # re-exported: what the registry lists
from .hashes import HashCache
from .suffixes import CHECKPOINT_SUFFIXES, VAE_SUFFIXES

__all__ = ["ModelEntry", "ModelRegistry", "UnknownModelError"]

log = logging.getLogger(__name__)

_HASH_RE = re.compile(r"^[0-9a-fA-F]{8,64}$")
_TITLE_HASH_RE = re.compile(r"^(.*?)\s*\[([0-9a-fA-F]{8,64})\]$")


class UnknownModelError(KeyError):
    """No model matches a name; the message lists the valid choices."""

    def __init__(self, kind: str, query: str, choices: list[str]) -> None:
        self.kind, self.query, self.choices = kind, query, choices
        if choices:
            msg = f"unknown {kind} {query!r}; choose one of: {', '.join(choices)}"
        else:
            msg = f"unknown {kind} {query!r}: no {kind}s were found"
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _is_diffusers_vae(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("_class_name") == "AutoencoderKL"
    except (OSError, ValueError, AttributeError):
        return False


def _scan(
    root: Path, suffixes: tuple[str, ...], role: Literal["checkpoint", "vae"], hashes: HashCache
) -> list[ModelEntry]:
    """Entries under `root`, recursively; a diffusers folder is one entry and is not descended into."""
    out: list[ModelEntry] = []
    if not root.is_dir():
        return out
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        d = Path(dirpath)
        real = os.path.realpath(d)
        if real in seen:  # symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        keep = []
        for n in dirnames:
            sub = d / n
            rel = sub.relative_to(root).as_posix()
            if (sub / "model_index.json").is_file() and role == "checkpoint":
                out.append(ModelEntry(rel, rel, sub, "diffusers", role=role, hashes=hashes))
            elif role == "vae" and (_is_diffusers_vae(sub) or _is_diffusers_vae(sub / "vae")):
                out.append(ModelEntry(rel, rel, sub, "diffusers", role=role, hashes=hashes))
            else:
                keep.append(n)
        dirnames[:] = keep
        for n in sorted(filenames):
            p = d / n
            if n.startswith(".") or p.suffix.lower() not in suffixes:
                continue
            rel = p.relative_to(root).as_posix()
            name = n if role == "vae" else rel[: -len(p.suffix)]
            out.append(ModelEntry(name, rel, p, "single_file", role=role, hashes=hashes))
    return out


def _as_paths(dirs: str | os.PathLike | Iterable[str | os.PathLike] | None) -> tuple[Path, ...]:
    if dirs is None:
        return ()
    if isinstance(dirs, (str, os.PathLike)):
        return (Path(dirs),)
    return tuple(Path(d) for d in dirs)


class ModelRegistry:
    """Checkpoints and VAEs found in the configured folders, plus the built-in model.

    `ckpt_dirs` / `vae_dirs`: one folder or several (scanned recursively, in order; the first of two
    equal names wins). `builtin_dir`: the project's own diffusers folder, listed last and used when no
    other checkpoint exists; folders named `<builtin_dir>-*` beside it are listed after it as built-in too.
    `hash_cache`: where digests are cached (in memory if None).
    `hash_in_background`: hash uncached checkpoints in a background thread after each scan (see the module
    docstring); `wait_for_hashes` waits for it.
    """

    def __init__(
        self,
        ckpt_dirs: str | os.PathLike | Iterable[str | os.PathLike] | None,
        vae_dirs: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
        builtin_dir: str | os.PathLike | None = None,
        *,
        hash_cache: HashCache | None = None,
        hash_in_background: bool = True,
    ) -> None:
        self.ckpt_dirs = _as_paths(ckpt_dirs)
        self.vae_dirs = _as_paths(vae_dirs)
        self.builtin_dir = Path(builtin_dir) if builtin_dir is not None else None
        self.hashes = hash_cache if hash_cache is not None else HashCache()
        self._lock = threading.Lock()
        self._checkpoints: list[ModelEntry] = []
        self._vaes: list[ModelEntry] = []
        self.hash_in_background = hash_in_background
        self._hasher: threading.Thread | None = None
        self._hash_again = False
        self._hashed = threading.Event()
        self.refresh()

    def refresh(self) -> None:
        """Rescan the folders (cheap: no file is read or hashed here; new checkpoints are hashed in the
        background when `hash_in_background`)."""
        ckpts = self._dedupe(
            e for d in self.ckpt_dirs for e in _scan(d, CHECKPOINT_SUFFIXES, "checkpoint", self.hashes)
        )
        ckpts.sort(key=lambda e: e.filename.lower())
        for b in self._builtin_dirs():
            ckpts.append(ModelEntry(b.name, b.name, b, "diffusers", builtin=True, hashes=self.hashes))
        vaes = self._dedupe(e for d in self.vae_dirs for e in _scan(d, VAE_SUFFIXES, "vae", self.hashes))
        vaes.sort(key=lambda e: e.filename.lower())
        with self._lock:
            self._checkpoints, self._vaes = ckpts, vaes
        if self.hash_in_background:
            self._start_hashing()

    # ---- background hashing ---------------------------------------------------------------------------
    def _start_hashing(self) -> None:
        with self._lock:
            self._hash_again = True
            self._hashed.clear()
            if self._hasher is not None:  # the running thread picks up the new scan
                return
            self._hasher = threading.Thread(target=self._hash_all, name="checkpoint-hashes", daemon=True)
            thread = self._hasher
        thread.start()

    def _hash_all(self) -> None:
        while True:
            with self._lock:
                if not self._hash_again:
                    self._hasher = None
                    self._hashed.set()
                    return
                self._hash_again = False
            for e in self.checkpoints():
                if e.cached_sha256() is not None:
                    continue
                try:
                    e.sha256  # noqa: B018 - computes and caches the digest
                except OSError as exc:  # a file removed or unreadable meanwhile: listed without a hash
                    log.warning("cannot hash %s: %s", e.path, exc)

    def wait_for_hashes(self, timeout: float | None = None) -> bool:
        """Wait until the background hashing has caught up with the last scan; False on timeout."""
        return self._hashed.wait(timeout) if self.hash_in_background else True

    @staticmethod
    def _dedupe(entries: Iterable[ModelEntry]) -> list[ModelEntry]:
        out: dict[str, ModelEntry] = {}
        for e in entries:
            out.setdefault(e.filename, e)
        return list(out.values())

    def checkpoints(self) -> list[ModelEntry]:
        """Diffusers folders and .safetensors/.ckpt files, sorted by file name; the built-in model last."""
        with self._lock:
            return list(self._checkpoints)

    def _builtin_dirs(self) -> list[Path]:
        """The built-in model's folder, then its shipped siblings (`builtin-*` next to it: other built-in
        models, e.g. a newer one that is not the default yet)."""
        b = self.builtin_dir
        if b is None:
            return []
        dirs = [b, *sorted(p for p in b.parent.glob(b.name + "-*") if p.is_dir())]
        return [d for d in dirs if (d / "model_index.json").is_file()]

    def vaes(self) -> list[ModelEntry]:
        """VAE files (.safetensors, .pt, .ckpt, ...) and diffusers VAE folders, sorted by name."""
        with self._lock:
            return list(self._vaes)

    def default_checkpoint(self) -> ModelEntry | None:
        """The first user checkpoint, else the built-in model, else None."""
        entries = self.checkpoints()
        user = [e for e in entries if not e.builtin]
        return (user or entries or [None])[0]

    def find_checkpoint(self, name: str) -> ModelEntry:
        """Find a checkpoint by title, file name, name (with or without extension, or just the file's own
        name when unique) or hash (short or full SHA-256). Raises `UnknownModelError` listing titles."""
        return _find(self.checkpoints(), name, "model")

    def find_vae(self, name: str) -> ModelEntry:
        """Find a VAE like `find_checkpoint`. Raises `UnknownModelError` listing VAE names."""
        return _find(self.vaes(), name, "VAE")

    def find_path(self, path: str | os.PathLike) -> ModelEntry | None:
        """The entry whose file or folder is `path`, if any."""
        target = os.path.realpath(path)
        return next((e for e in self.checkpoints() + self.vaes() if os.path.realpath(e.path) == target), None)


def _stem(e: ModelEntry) -> str:
    """Relative path without the file extension (folders unchanged)."""
    return e.filename[: -len(e.path.suffix)] if e.format == "single_file" and e.path.suffix else e.filename


def _find(entries: list[ModelEntry], query: str, kind: str) -> ModelEntry:
    q = str(query).strip().replace("\\", "/")
    m = _TITLE_HASH_RE.match(q)
    base, bracket_hash = (m.group(1), m.group(2).lower()) if m else (q, None)
    for key in (lambda e: e.title, lambda e: e.filename, lambda e: e.name):
        hit = [e for e in entries if key(e) == q or key(e) == base]
        if hit:
            return hit[0]
    lowered = base.lower()
    for key in (
        lambda e: e.filename.lower(),
        lambda e: e.name.lower(),
        lambda e: _stem(e).lower(),
        lambda e: Path(e.filename).name.lower(),
        lambda e: Path(_stem(e)).name.lower(),
    ):
        hit = [e for e in entries if key(e) == lowered]
        if len(hit) == 1:
            return hit[0]
    digest = bracket_hash or (q.lower() if _HASH_RE.match(q) else None)
    if digest:
        # known hashes first; then hash the rest (slow for big files, but the user asked for a hash)
        for e in entries:
            known = e.cached_sha256()
            if known and known.startswith(digest):
                return e
        for e in entries:
            if e.cached_sha256() is None and e.sha256.startswith(digest):
                return e
    raise UnknownModelError(kind, str(query), [e.title for e in entries])
