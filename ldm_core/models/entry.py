"""`ModelEntry`: one checkpoint or VAE found on disk (a file or a diffusers folder), with its names and hashes.

Its own module because both the registry (which lists entries) and the loaders (which build models from them)
need it, and neither should import the other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .hashes import HashCache, cached_folder_sha256, file_sha256, folder_sha256, short_hash

__all__ = ["ModelEntry"]


@dataclass(frozen=True)
class ModelEntry:
    """One checkpoint or VAE found on disk. `format` is "diffusers" (a folder) or "single_file";
    `builtin` marks the model that ships with the project."""

    name: str
    filename: str
    path: Path
    format: Literal["diffusers", "single_file"]
    builtin: bool = False
    role: Literal["checkpoint", "vae"] = "checkpoint"
    hashes: HashCache | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike,
        *,
        role: Literal["checkpoint", "vae"] = "checkpoint",
        hashes: HashCache | None = None,
    ) -> ModelEntry:
        """An entry for a file or diffusers folder outside any registry (e.g. `--ckpt FILE`)."""
        p = Path(path)
        fmt: Literal["diffusers", "single_file"] = "diffusers" if p.is_dir() else "single_file"
        if role == "vae" or fmt == "diffusers":
            return cls(p.name, p.name, p, fmt, role=role, hashes=hashes)
        return cls(p.stem, p.name, p, fmt, role=role, hashes=hashes)

    def cached_sha256(self) -> str | None:
        """The SHA-256 if already computed (never hashes; a diffusers folder's when all its files are)."""
        if self.hashes is None:
            return None
        if self.format == "diffusers":
            return cached_folder_sha256(self.path, self.hashes)
        return self.hashes.cached(self.path)

    @property
    def sha256(self) -> str:
        """Full hex SHA-256 of the file (or of a diffusers folder's weights), computed once and cached."""
        if self.format == "diffusers":
            return folder_sha256(self.path, self.hashes)
        return file_sha256(self.path, self.hashes)

    @property
    def short_hash(self) -> str:
        """A1111's "Model hash" / "VAE hash": the first 10 hex digits of `sha256`."""
        return short_hash(self.sha256)

    @property
    def title(self) -> str:
        """The label in model lists: `filename [short hash]` for checkpoints whose hash is known."""
        if self.role == "vae":
            return self.name
        known = self.cached_sha256()
        return f"{self.filename} [{short_hash(known)}]" if known else self.filename
