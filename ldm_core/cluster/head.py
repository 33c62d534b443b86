"""The head's engine in a Ray pool: the model registry, listings and choices the UI and API show, and the
"current model" they select, without loading any checkpoint on the head (the replicas load them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..engine import Engine, GenerationResult
from ..generation_requests import GenerationRequest
from ..models.registry import ModelEntry
from ..progress import JobContext


@dataclass(frozen=True)
class SelectedModel:
    """What `HeadEngine.load_checkpoint` returns: the chosen checkpoint's entry (its weights stay unloaded)."""

    entry: ModelEntry


class HeadEngine(Engine):
    """An `Engine` whose `load_checkpoint` only selects: the selected checkpoint is the one jobs without a
    `model` run on (each job names it, so a replica that has it loaded gets the job). `current_model` stays
    None on the head; `current_model_entry()` is the selection (or the default checkpoint)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._selected: ModelEntry | None = None
        self.refreshes = 0  # jobs carry it: a replica rescans its folders when the head has rescanned since

    def refresh_models(self) -> None:
        super().refresh_models()
        with self._lock:
            self.refreshes += 1

    def load_checkpoint(self, name: str | None = None) -> SelectedModel:  # type: ignore[override]
        with self._lock:
            entry = self.checkpoint_entry(name)
            self._selected = entry
            return SelectedModel(entry)

    def current_model_entry(self) -> ModelEntry | None:
        with self._lock:
            return self._selected or self.models.default_checkpoint()

    def unload(self) -> None:
        with self._lock:
            self._selected = None
        super().unload()

    def generate(self, request: GenerationRequest, ctx: JobContext | None = None) -> GenerationResult:
        raise RuntimeError("the head of a Ray pool runs no generation: submit it through the service")
