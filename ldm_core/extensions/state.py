"""One discovered extension's record (status, manifest, install pin) and the persisted state file
`extensions.json` (disabled names, installed pins), written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..extension_api import (
    ExtensionContext,
)
from .manifest import Manifest, RequirementStatus

log = logging.getLogger("ldm_core.extensions")


STATE_FILE_NAME = "extensions.json"


@dataclass
class ExtensionRecord:
    """One discovered extension. `status`: "loaded", "disabled", "failed", "incompatible",
    "missing-requirements", "all-disabled" (--disable-all-extensions) or "restart-needed" (installed or
    enabled after start). `message` says why when not loaded."""

    folder: Path
    manifest: Manifest | None
    status: str = "discovered"
    message: str = ""
    enabled: bool = True
    builtin: bool = False
    ctx: ExtensionContext | None = None
    requirements: tuple[RequirementStatus, ...] = ()
    install: dict = field(default_factory=dict)  # url, ref, commit, installed_at, updated_at
    attached: bool = False  # its samplers/upscalers are registered in the engine

    @property
    def name(self) -> str:
        return self.manifest.name if self.manifest else self.folder.name

    @property
    def active(self) -> bool:
        """Loaded and (still) enabled: its conditioning types and post-processors run."""
        return self.status == "loaded" and self.enabled


class StateFile:
    """`extensions.json`: {"format": 1, "disabled": [names], "installed": {name: {url, ref, commit, ...}}}.
    Written atomically."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.RLock()

    def read(self) -> dict:
        with self._lock:
            if self.path is None or not self.path.is_file():
                return {"format": 1, "disabled": [], "installed": {}}
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                log.warning("extensions state %s unreadable (%s); starting from defaults", self.path, exc)
                return {"format": 1, "disabled": [], "installed": {}}
            data.setdefault("format", 1)
            data.setdefault("disabled", [])
            data.setdefault("installed", {})
            return data

    def update(self, fn) -> dict:
        with self._lock:
            data = self.read()
            fn(data)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
                os.replace(tmp, self.path)
            return data
