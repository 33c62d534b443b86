"""SHA-256 of model files, with a cache keyed by (path, size, mtime) so a file is hashed once.

A1111 shows the first 10 hex digits of a checkpoint's SHA-256 as "Model hash" (LoRA and embedding hashes
use 12). Hashing a multi-GB file takes seconds, so results live in a `HashCache` object that the model
registry owns (optionally persisted to a JSON file); there is no module-level cache. Two threads asking for
the same file's digest at once (the registry's background hashing and a model load) read it only once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

from .suffixes import WEIGHT_SUFFIXES

log = logging.getLogger(__name__)

#: Hex digits of the SHA-256 that A1111 shows as "Model hash" / "VAE hash".
SHORT_HASH_LEN = 10

_CHUNK = 1 << 20


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class HashCache:
    """SHA-256 digests keyed by resolved path, valid while the file's size and mtime are unchanged.

    `path` (optional) is a JSON file the cache is loaded from and saved to after each new digest, so hashes
    survive restarts. Thread-safe.
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = {}
        self._gates: dict[str, threading.Lock] = {}  # one per file being hashed: concurrent callers wait
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if isinstance(data, dict):
                    self._entries = {k: v for k, v in data.items() if isinstance(v, dict)}
            except (OSError, ValueError) as e:
                log.warning("ignoring unreadable hash cache %s: %s", self.path, e)

    @staticmethod
    def _key(path: Path) -> tuple[str, int, int]:
        st = path.stat()
        return str(path.resolve()), st.st_size, st.st_mtime_ns

    def cached(self, path: str | os.PathLike) -> str | None:
        """The cached digest of `path` if it is still valid, else None (never hashes)."""
        try:
            key, size, mtime = self._key(Path(path))
        except OSError:
            return None
        with self._lock:
            e = self._entries.get(key)
        if e and e.get("size") == size and e.get("mtime_ns") == mtime:
            return e.get("sha256")
        return None

    def sha256(self, path: str | os.PathLike) -> str:
        """The full hex SHA-256 of the file at `path`, computed at most once per (size, mtime)."""
        p = Path(path)
        hit = self.cached(p)
        if hit:
            return hit
        key, size, mtime = self._key(p)
        with self._lock:
            gate = self._gates.setdefault(key, threading.Lock())
        with gate:
            hit = self.cached(p)
            if hit:
                return hit
            digest = _sha256_of(p)
            with self._lock:
                self._entries[key] = {"size": size, "mtime_ns": mtime, "sha256": digest}
                self._save_locked()
        return digest

    def _save_locked(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self._entries, indent=1, sort_keys=True), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("could not save hash cache %s: %s", self.path, e)


def file_sha256(path: str | os.PathLike, cache: HashCache | None = None) -> str:
    """Full hex SHA-256 of a file. With `cache`, a digest is computed once per (path, size, mtime).

    A1111's "Model hash" is `file_sha256(p)[:10]`.
    """
    return cache.sha256(path) if cache is not None else _sha256_of(Path(path))


def folder_sha256(folder: str | os.PathLike, cache: HashCache | None = None) -> str:
    """A SHA-256 identifying a diffusers folder: the hash of the sorted lines `relpath<TAB>file_sha256` of
    every weights file (`WEIGHT_SUFFIXES`; configs and tokenizers are not hashed) under it. Two folders with
    the same weights get the same digest."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()}\t{file_sha256(p, cache)}\n".encode())
    return h.hexdigest()


def cached_folder_sha256(folder: str | os.PathLike, cache: HashCache) -> str | None:
    """`folder_sha256` when every weights file's digest is already in `cache`, else None (never hashes)."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    h = hashlib.sha256()
    for p in files:
        digest = cache.cached(p)
        if digest is None:
            return None
        h.update(f"{p.relative_to(root).as_posix()}\t{digest}\n".encode())
    return h.hexdigest()


def short_hash(sha256: str, length: int = SHORT_HASH_LEN) -> str:
    """The first `length` hex digits of a digest (10 for model/VAE hashes, 12 for LoRA/embedding hashes)."""
    return sha256[:length]
