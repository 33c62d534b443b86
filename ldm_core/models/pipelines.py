"""Whole diffusers pipeline folders that run as they are (SD x4 / x2 latent upscalers, Stable Video Diffusion):
loaded offline from safetensors (pickled weights only with --allow-pickle), progress bars off, on a device."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..generation_requests import RequestError

log = logging.getLogger(__name__)


def load_pipeline_folder(
    pipeline_cls, folder: Path, *, device: torch.device, dtype: torch.dtype, allow_pickle: bool, field: str
) -> Any:
    """`pipeline_cls.from_pretrained(folder)` as the module doc says; a folder that cannot be used is a
    RequestError naming `field` (the request field that chose it)."""
    folder = Path(folder)
    safe = any(folder.rglob("*.safetensors"))
    if not safe and not allow_pickle:
        raise RequestError(field, f"{folder.name}: no .safetensors weights (pickled weights need --allow-pickle)")
    try:
        pipe = pipeline_cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=safe, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise RequestError(field, f"cannot load {folder.name}: {exc}") from None
    pipe.set_progress_bar_config(disable=True)
    log.info("loaded %s %s on %s", pipeline_cls.__name__, folder.name, device)
    return pipe.to(device)


class PipelineFolder:
    """A pipeline folder loaded on first use (`pipeline()`) and kept. Subclasses name the pipeline class and the
    request field that chooses them (for errors)."""

    field = "model"

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype, allow_pickle: bool = False):
        self.folder, self.device, self.dtype, self.allow_pickle = Path(folder), device, dtype, allow_pickle
        self._pipe: Any = None

    def pipeline_class(self):
        raise NotImplementedError

    def pipeline(self):
        if self._pipe is None:
            self._pipe = load_pipeline_folder(
                self.pipeline_class(),
                self.folder,
                device=self.device,
                dtype=self.dtype,
                allow_pickle=self.allow_pickle,
                field=self.field,
            )
        return self._pipe
