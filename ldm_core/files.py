"""Finding user files by name: one scan used by the LoRA and embedding libraries (name = file stem)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)


def scan_named_files(dirs: Iterable[Path], suffixes: Iterable[str], what: str) -> dict[str, Path]:
    """Files under `dirs` (recursively) whose suffix is in `suffixes`, keyed by stem. Dot-files are skipped; of
    two files with one stem the first (in folder order, then sorted path) wins and the other is logged."""
    allowed = {s.lower() for s in suffixes}
    files: dict[str, Path] = {}
    for d in dirs:
        if not d.is_dir():
            continue
        for p in sorted(d.rglob("*")):
            if p.suffix.lower() not in allowed or p.name.startswith(".") or not p.is_file():
                continue
            if p.stem in files:
                log.warning("%s %s ignored: %s has the same name", what, p, files[p.stem])
                continue
            files[p.stem] = p
    return files
