"""`OpenEndedSigmaScheduler`: a sigma-space algorithm whose evaluations are decided while sampling.

`SigmaScheduler` lists every model evaluation before the run (by running the algorithm on a zero probe),
which works because its algorithms pick their noise levels from the schedule alone. An adaptive step size
solver (DPM adaptive) picks them from error estimates on the real data, so before the run only its first
evaluation is known. This scheduler keeps the same interface with one difference, which the denoising loop
knows about (`open_ended` is True):

- `timesteps` holds the evaluations made so far plus the next one; it grows by one after every `step`
  that is not the last (`sigmas` likewise: the evaluations' noise levels, then the run's final one);
- `estimated_evaluations` is the number of evaluations the whole run is expected to take: those done plus
  the algorithm's own forecast of the rest (`SamplerContext.remaining`, evaluations still to come). It is an
  estimate and changes as the run goes; until the algorithm has a forecast it assumes
  `evaluations_per_step` evaluations for every step of the schedule the run was given (the user's step
  count), and once the run is complete it is the number made;
- `position(i)` says how far evaluation i is through the run, 0..1, by noise level (log sigma between the
  `SamplerContext.span` the algorithm declared). The loop uses it to pick the prompt-schedule step of an
  evaluation (prompt editing, alternation): the share of the user's steps an evaluation stands for is the
  share of the noise range it has covered.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .base import SigmaScheduler


class OpenEndedSigmaScheduler(SigmaScheduler):
    """A `SigmaScheduler` for algorithms that choose their noise levels while sampling (see the module doc).

    `evaluations_per_step` only shapes the estimate made before the run starts."""

    open_ended = True

    def __init__(self, *args, evaluations_per_step: int = 3, **kwargs):
        self.evaluations_per_step = max(1, int(evaluations_per_step))
        self._finished = False
        self._span: tuple[float, float] = (1.0, 1.0)
        super().__init__(*args, **kwargs)

    @property
    def estimated_evaluations(self) -> int:
        """Evaluations done so far plus the forecast of those still to come (at least 1 more until done)."""
        done = self._step_index or 0
        if self._finished:
            return done
        remaining = self._ctx.remaining if self._ctx is not None else None
        if remaining is None:
            remaining = self.evaluations_per_step * max(1, len(self._run_schedule) - 1) - done
        return done + max(1, int(remaining), len(self._eval_sigmas) - done)

    # -- SigmaScheduler hooks -----------------------------------------------------------------------------

    def _planned_evaluations(self) -> list[float]:
        """Only the first evaluation is known before the run: where the algorithm starts."""
        self._finished = False
        ctx = self._context(None)
        run = self.algorithm(self._run_schedule, ctx)
        try:
            _, first = next(run)
        finally:
            run.close()
        self._span = ctx.span or (float(first), float(first))
        return [float(first)]

    def position(self, i: int) -> float:
        """How far evaluation i is through the run by noise level: 0 at the start, 1 at the end."""
        start, end = self._span
        if not start > end > 0.0:
            return 1.0
        return min(1.0, max(0.0, math.log(start / self._eval_sigmas[i]) / math.log(start / end)))

    def _check_next(self, i: int, next_sigma: float) -> None:
        if not math.isfinite(next_sigma) or next_sigma <= 0.0:
            raise RuntimeError(f"{self.name}: evaluation {i + 1} asked at sigma {next_sigma}")
        self._eval_sigmas.append(next_sigma)
        t = float(self.levels.sigma_to_t(np.array([next_sigma]))[0])
        nxt = torch.tensor([t], dtype=torch.float32, device=self.timesteps.device)
        self.timesteps = torch.cat([self.timesteps, nxt])
        self.sigmas = torch.tensor(self._eval_sigmas + [self._run_schedule[-1]], dtype=torch.float32)

    def _check_end(self, i: int) -> None:
        self._finished = True
