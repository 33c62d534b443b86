"""Memory at run time: freeing it, recovering from out-of-memory errors, and the fault hook that tests both.

**Out-of-memory recovery.** When a batch raises an out-of-memory error (`torch.OutOfMemoryError`, or the
"out of memory" RuntimeError of MPS and older CUDA builds), the engine frees memory (`free_memory`: garbage
collection, then the CUDA cache) and runs the batch again with the next lighter step of `FALLBACK_STEPS`:

1. ``vae tiling``: the VAE decodes (and encodes) in overlapping tiles;
2. ``attention slicing``: the UNets' attention runs one head slice at a time;
3. ``model offload``: the models wait on the CPU and move to the device only while they run (``--medvram``).

Each step is tried once, in that order, skipping a step the configuration already has (``--vae-tiling``,
``--medvram``/``--lowvram``); when none is left, the error goes to the caller. The steps a job needed are its
degradation record: the infotext key ``Memory fallback`` (e.g. ``Memory fallback: vae tiling``) and a warning in
the job's result (`info["warnings"]`). A `JobMemoryPlan` applies the steps to one job's models and `undo`
puts them back afterwards, so the next job starts at full speed again.

**Fault hook.** `FaultHook` is an explicit diagnostic and test hook: give one to the engine
(``Engine(config, fault_hook=FaultHook(oom_at={"decode": 1}))`` or set ``engine.fault_hook``) and the engine
reports to it at named points of a job (`FAULT_POINTS`). It records every point with the device the work
runs on there, may call a function at each point (a test checks the state at that moment), and raises
`torch.OutOfMemoryError` at chosen points a chosen number of times, which exercises the recovery above on
any machine, a CPU included. Without a hook (the default) nothing is called.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)

#: The lighter steps tried after an out-of-memory error, in order (also their infotext names).
FALLBACK_STEPS: tuple[str, ...] = ("vae tiling", "attention slicing", "model offload")
#: The infotext key that records the steps a job needed.
INFOTEXT_KEY = "Memory fallback"
#: Where the engine reports to a `FaultHook`: before a checkpoint's weights are read (after the previous model
#: was evicted), before prompt encoding, before the denoising loop, before a VAE decode.
FAULT_POINTS: tuple[str, ...] = ("load", "encode", "denoise", "decode")

T = TypeVar("T")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is a device out-of-memory error (CUDA's OutOfMemoryError, or MPS's RuntimeError)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory(device: torch.device | str | None = None) -> None:
    """Collect garbage, then hand the CUDA caching allocator's free blocks back (when CUDA is in use)."""
    gc.collect()
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
    elif dev is not None and dev.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


class FaultHook:
    """A diagnostic hook the engine reports to at the `FAULT_POINTS` of a job (see the module docstring).

    `oom_at`: point -> how many times to raise `torch.OutOfMemoryError` when the point is reached (counted
    down; other points pass). `on_point`: called with (point, device) before anything else, e.g. to check that
    the previous model is gone when "load" is reached. `seen` lists every (point, device) reached, in order.
    """

    def __init__(
        self,
        oom_at: Mapping[str, int] | None = None,
        on_point: Callable[[str, torch.device], None] | None = None,
    ) -> None:
        unknown = set(oom_at or {}) - set(FAULT_POINTS)
        if unknown:
            raise ValueError(f"oom_at: unknown point(s) {sorted(unknown)} (allowed: {', '.join(FAULT_POINTS)})")
        self.remaining: dict[str, int] = dict(oom_at or {})
        self.on_point = on_point
        self.seen: list[tuple[str, torch.device]] = []

    def reached(self, point: str, device: torch.device | str) -> None:
        """The engine is at `point`, about to run on `device`; raises the injected error when one is due."""
        dev = torch.device(device)
        self.seen.append((point, dev))
        if self.on_point is not None:
            self.on_point(point, dev)
        if self.remaining.get(point, 0) > 0:
            self.remaining[point] -= 1
            raise torch.OutOfMemoryError(f"injected by FaultHook at {point!r} on {dev} (a simulated out-of-memory)")

    def points(self) -> list[str]:
        """The points reached so far, in order."""
        return [p for p, _ in self.seen]


@dataclass
class JobMemoryPlan:
    """The lighter steps one job took after out-of-memory errors, applied to that job's models.

    `unets`, `vaes` and `text_encoders` are the job's modules; `attention` (an `AttentionRegistry`) and
    `attention_name` say how to put the UNets' attention back. `config_vae_tiling` / `config_offload` are the
    engine's own settings: a step they already cover is skipped. `device` is the execution device.
    """

    unets: list[Any]
    vaes: list[Any]
    text_encoders: list[Any]
    attention: Any
    attention_name: str
    device: torch.device
    config_vae_tiling: bool = False
    config_offload: str = "none"
    applied: list[str] = field(default_factory=list)

    def available(self) -> list[str]:
        """The steps still left to try, in order."""
        skip = set(self.applied)
        if self.config_vae_tiling:
            skip.add("vae tiling")
        if self.attention_name == "sliced":
            skip.add("attention slicing")
        if self.config_offload != "none":
            skip.add("model offload")
        return [s for s in FALLBACK_STEPS if s not in skip]

    @property
    def model_offload(self) -> bool:
        """Whether the models wait on the CPU between uses (the "model offload" step was taken)."""
        return "model offload" in self.applied

    def apply_next(self) -> str | None:
        """Take the next step (None when none is left) and return its name."""
        left = self.available()
        if not left:
            return None
        step = left[0]
        if step == "vae tiling":
            for vae in self.vaes:
                vae.enable_tiling()
        elif step == "attention slicing":
            for unet in self.unets:
                self.attention.apply(unet, "sliced")
        else:
            for m in self._modules():
                m.to("cpu")
        self.applied.append(step)
        return step

    def undo(self) -> None:
        """Put the models back as the engine's configuration has them."""
        if "vae tiling" in self.applied and not self.config_vae_tiling:
            for vae in self.vaes:
                vae.disable_tiling()
        if "attention slicing" in self.applied:
            for unet in self.unets:
                self.attention.apply(unet, self.attention_name)
        if self.model_offload:
            for m in self._modules():
                m.to(self.device)
        self.applied.clear()

    def _modules(self) -> list[Any]:
        seen: dict[int, Any] = {}
        for m in (*self.unets, *self.vaes, *self.text_encoders):
            if m is not None:
                seen.setdefault(id(m), m)
        return list(seen.values())

    def infotext(self) -> dict[str, str]:
        """``{"Memory fallback": "vae tiling, ..."}`` once a step was taken, else empty."""
        return {INFOTEXT_KEY: ", ".join(self.applied)} if self.applied else {}

    def warning(self) -> str | None:
        """The line the job's result shows, or None when the job needed no step."""
        if not self.applied:
            return None
        return f"out of memory: retried with {', '.join(self.applied)} (slower; see the infotext's {INFOTEXT_KEY})"


def run_with_fallbacks(run: Callable[[], T], plan: JobMemoryPlan, *, device: torch.device | None = None) -> T:
    """`run()`; after an out-of-memory error, free memory, take `plan`'s next step and run again, until it
    succeeds or no step is left (then the last error is raised)."""
    while True:
        try:
            return run()
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc) or not plan.available():
                raise
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # outside the except block: the traceback (and the tensors its frames hold) is gone before freeing
        free_memory(device)
        step = plan.apply_next()
        log.warning("out of memory (%s): retrying with %s", reason, step)
