"""The bookkeeping around each optimiser step of the add-on trainers (motion module, diffusion upscaler):
backward, gradient clipping and the step; a smoothed loss; training seconds that leave out the time a process
was stopped; a log line every few steps and a checkpoint every few minutes of wall clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

#: A step that took longer than this was a stopped process (SIGSTOP, a suspended machine), not a slow step:
#: its time is not training time.
STALL_SECONDS = 60.0


def read_checkpoint(path: Path | None) -> dict | None:
    """A trainer's checkpoint (CPU tensors; no pickled objects are loaded), None when there is none yet."""
    if path is None or not Path(path).exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


class StepLoop:
    """Counts `step` and `seconds()` from a resumed `step`/`spent`; `ema` is the loss smoothed over ~50 steps."""

    def __init__(self, optim: torch.optim.Optimizer, params: list, *, step: int = 0, spent: float = 0.0,
                 ema: float | None = None, log: Callable[[str], None] = print, log_every: int = 20,
                 checkpoint: Callable[[], None] | None = None, checkpoint_every: float = 300.0):
        self.optim, self.params = optim, params
        self.step, self.spent, self.ema = step, spent, ema
        self.log, self.log_every = log, log_every
        self.checkpoint, self.checkpoint_every = checkpoint, checkpoint_every
        self.t0 = self.prev = self.last_checkpoint = time.monotonic()

    @classmethod
    def resume(cls, saved: dict | None, optim: torch.optim.Optimizer, params: list, **kwargs) -> StepLoop:
        """A loop that goes on where checkpoint `saved` (a dict holding `state()`) left off: the optimiser's
        state, step, training seconds and smoothed loss; a fresh loop when it is None. `kwargs` as for the
        constructor."""
        if saved is None:
            return cls(optim, params, **kwargs)
        optim.load_state_dict(saved["optim"])
        step, spent = int(saved["step"]), float(saved["seconds"])
        kwargs.get("log", print)(f"resuming at step {step} ({spent:.0f}s spent)")
        return cls(optim, params, step=step, spent=spent, ema=saved["ema"], **kwargs)

    def state(self) -> dict:
        """The loop's part of a checkpoint (`resume` reads it back): optimiser state, step, seconds, smoothed loss."""
        return {"optim": self.optim.state_dict(), "step": self.step, "seconds": self.seconds(), "ema": self.ema}

    def seconds(self) -> float:
        return self.spent + time.monotonic() - self.t0

    def progress(self, steps: int, max_seconds: float | None) -> float:
        """How far the run is, 0..1 (or past 1): the larger of steps done / `steps` and training seconds /
        `max_seconds` (when given), so that a run the clock ends still finishes its learning-rate schedule."""
        return max(self.step / steps, self.seconds() / max_seconds if max_seconds else 0.0)

    def set_lr(self, lr: float) -> None:
        for g in self.optim.param_groups:
            g["lr"] = lr

    def update(self, loss: torch.Tensor) -> None:
        """One optimiser step on `loss`, then the clock, the log and the checkpoint."""
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optim.step()
        self.step += 1
        value = float(loss.detach())
        self.ema = value if self.ema is None else 0.98 * self.ema + 0.02 * value
        now = time.monotonic()
        if now - self.prev > STALL_SECONDS:
            self.t0 += now - self.prev
        self.prev = now
        if self.log_every and self.step % self.log_every == 0:
            lr = self.optim.param_groups[0]["lr"]
            self.log(f"step {self.step} loss {self.ema:.4f} lr {lr:.2e} ({self.seconds():.0f}s)")
        if self.checkpoint is not None and now - self.last_checkpoint > self.checkpoint_every:
            self.checkpoint()
            self.last_checkpoint = now
