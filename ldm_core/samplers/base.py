"""`SigmaScheduler`: runs a sigma-space sampling algorithm behind the diffusers scheduler interface.

A sampling algorithm is written once, as a plain loop over the noise levels, in the style of the papers
(x = x0 + sigma * eps, "denoised" = the model's estimate of x0). Wherever it needs the model it writes

    x, denoised = yield x, sigma      # "evaluate the model at this point and noise level"

and gets back the point the loop actually evaluated (the loop may have edited it, e.g. inpainting blends
the known region in) and the model's x0 estimate there. At the end it `return`s the final sample.

`SigmaScheduler` turns such a generator into `set_timesteps` / `timesteps` / `scale_model_input` / `step`:
one entry of `timesteps` per model evaluation (so second-order samplers list a noise level twice, as
diffusers' Heun scheduler does), `step` feeds one model output into the algorithm and returns the point of
the next evaluation (or the final sample) as `prev_sample`. The list of evaluations is found by running
the algorithm once on a one-element tensor with zero noise: every algorithm here picks its noise levels
from the schedule alone, never from the data, and `step` checks that the real run asks for the same ones.

The loop's `sample` lives in the sigma (VE) scale: pure noise is `randn * init_noise_sigma`, the model
input is `sample / sqrt(sigma**2 + 1)` (the VP x_t the model was trained on), the final sample is x0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .sigmas import NoiseLevels, alphas_cumprod_from_config, make_sigmas

#: What an algorithm yields (the point to evaluate, or None at the very start; the noise level) and what it
#: is sent back (the point evaluated, the model's x0 estimate there).
Evaluation = Generator[tuple[torch.Tensor | None, float], tuple[torch.Tensor, torch.Tensor], torch.Tensor]
Algorithm = Callable[[Sequence[float], "SamplerContext"], Evaluation]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class SigmaSchedulerOutput(BaseOutput):
    """`prev_sample`: where the model is evaluated next (after the last step: the result).
    `pred_original_sample`: the model's x0 estimate at the evaluation just made (for previews)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class SamplerContext:
    """What an algorithm may use besides the schedule: its options and a noise source.

    `eta` scales ancestral/SDE noise (0 = deterministic), `s_noise` multiplies every noise draw, and
    `s_churn`, `s_tmin`, `s_tmax` are the "churn" of Karras et al. 2022 (Algorithm 2) for the samplers
    that use it. `noise(like)` draws standard normal noise shaped like `like` from the generator the loop
    passed to the current `step` (zeros while the scheduler lists the evaluations). `sigma_min` is the
    model's smallest noise level.

    Two fields change during a run. `denoised_uncond`: the unconditional x0 estimate at the evaluation just
    sent (None when the loop made no unconditional pass, or the scheduler was not built with
    `uses_uncond`), for samplers that guide differently from plain CFG (CFG++). `remaining`: an open-ended
    algorithm's (see `open_ended`) current forecast of the evaluations it still needs, for progress; `span`:
    the noise levels (start, end) it runs between, set before its first evaluation."""

    def __init__(
        self,
        *,
        eta: float,
        s_noise: float = 1.0,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = math.inf,
        noise: Callable[[torch.Tensor], torch.Tensor] | None = None,
        sigma_min: float = 0.0,
    ):
        self.eta = float(eta)
        self.s_noise = float(s_noise)
        self.s_churn = float(s_churn)
        self.s_tmin = float(s_tmin)
        self.s_tmax = float(s_tmax)
        self._noise = noise or torch.zeros_like
        self.sigma_min = float(sigma_min)
        self.denoised_uncond: torch.Tensor | None = None
        self.remaining: int | None = None
        self.span: tuple[float, float] | None = None

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        return self._noise(like)

    def churn(self, sigma: float, steps: int) -> float:
        """The raised noise level sigma_hat = sigma * (1 + gamma) of Karras et al. 2022, Algorithm 2
        (gamma = min(s_churn / steps, sqrt(2) - 1) inside [s_tmin, s_tmax], else 0)."""
        if self.s_churn <= 0.0 or not (self.s_tmin <= sigma <= self.s_tmax):
            return sigma
        return sigma * (1.0 + min(self.s_churn / steps, math.sqrt(2.0) - 1.0))


def ancestral_split(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Split an ancestral step sigma -> sigma_next into a deterministic step to `sigma_down` and fresh
    noise of std `sigma_up` (sigma_down**2 + sigma_up**2 = sigma_next**2).

    With eta = 1 this is DDPM's ancestral sampling (Ho et al. 2020); eta scales the noise exactly like DDIM's
    eta (Song et al. 2020, eq. 16): rewritten with sigma = sqrt((1 - a) / a), DDIM's noise std divided by
    sqrt(a_prev) is eta * sigma_next * sqrt(sigma**2 - sigma_next**2) / sigma."""
    if sigma_next <= 0.0 or eta <= 0.0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * sigma_next * math.sqrt(max(sigma**2 - sigma_next**2, 0.0)) / sigma)
    return math.sqrt(sigma_next**2 - up**2), up


def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE derivative dx/dsigma = (x - denoised) / sigma (Karras et al. 2022, eq. 3);
    also the model's noise estimate eps."""
    return (x - denoised) / sigma


def _trace(algorithm: Algorithm, sigmas: Sequence[float], ctx: SamplerContext) -> list[float]:
    """The noise levels at which `algorithm` evaluates the model on this schedule, in order."""
    probe = torch.zeros(1, dtype=torch.float64)
    gen = algorithm(sigmas, ctx)
    wanted: list[float] = []
    try:
        _, sigma = next(gen)
        while True:
            wanted.append(float(sigma))
            if len(wanted) > 100_000:
                raise RuntimeError("sampling algorithm does not terminate")
            _, sigma = gen.send((probe, probe))
    except StopIteration:
        pass
    return wanted


class SigmaScheduler:
    """A sigma-space sampling algorithm with the diffusers scheduler interface (see the module doc).

    `base_config` is the model's diffusers scheduler config (betas, `prediction_type`, `steps_offset`);
    `schedule_type` a label of `sigmas.SIGMA_SCHEDULES`. `eta=None` takes `default_eta`.
    `model_family` ("sd1", "sdxl") only picks the Align Your Steps table. `uses_uncond`: the algorithm reads
    `SamplerContext.denoised_uncond`, so the loop passes the unconditional prediction to `step` as
    `model_output_uncond`."""

    order = 1
    #: Whether the evaluations are decided while sampling (see `open_ended.OpenEndedSigmaScheduler`).
    open_ended = False

    def __init__(
        self,
        base_config: Mapping,
        schedule_type: str,
        algorithm: Algorithm,
        *,
        name: str = "",
        eta: float | None = None,
        default_eta: float = 0.0,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = math.inf,
        s_noise: float = 1.0,
        model_family: str | None = None,
        uses_uncond: bool = False,
    ):
        prediction_type = base_config.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} not supported; one of {PREDICTION_TYPES}")
        self.algorithm = algorithm
        self.name = name
        self.schedule_type = schedule_type
        self.model_family = model_family
        self.uses_uncond = bool(uses_uncond)
        self.levels = NoiseLevels(alphas_cumprod_from_config(base_config))
        self.ctx_options = dict(
            eta=default_eta if eta is None else float(eta),
            s_noise=s_noise,
            s_churn=s_churn,
            s_tmin=s_tmin,
            s_tmax=s_tmax,
        )
        config = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
        config.update(prediction_type=prediction_type, sampler=name, schedule_type=schedule_type)
        config.setdefault("num_train_timesteps", self.levels.num_train_timesteps)
        self.config = FrozenDict(config)
        self.num_inference_steps: int | None = None
        self.schedule = np.zeros(0)  # the full sampling schedule (steps + 1 sigmas)
        self.timesteps = torch.zeros(0)
        self.sigmas = torch.zeros(0)  # noise level of each evaluation, then the final one
        self._eval_sigmas: list[float] = []
        self._run_schedule: list[float] = []
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._run: Evaluation | None = None
        self._ctx: SamplerContext | None = None
        self._device: str | torch.device | None = None
        self._generator: torch.Generator | list[torch.Generator] | None = None

    # -- diffusers interface ------------------------------------------------------------------------------

    @property
    def init_noise_sigma(self) -> float:
        """Std of the starting latents for txt2img: sqrt(sigma**2 + 1) at the first evaluation (x0 + sigma *
        eps with unit-variance data; as diffusers, and the VP x_T = randn that DDIM/PLMS start from)."""
        sigma = self._eval_sigmas[0] if self._eval_sigmas else self.levels.sigma_max
        return math.sqrt(sigma**2 + 1.0)

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Build the schedule for `num_inference_steps` steps and list the model evaluations."""
        self.num_inference_steps = int(num_inference_steps)
        self.schedule = make_sigmas(
            self.schedule_type,
            self.num_inference_steps,
            self.levels,
            steps_offset=int(self.config.get("steps_offset", 1) or 0),
            model_family=self.model_family,
        )
        self._plan(self.schedule, device)

    def set_sigmas(self, sigmas: Sequence[float], device: str | torch.device | None = None) -> None:
        """Use a custom schedule instead of `schedule_type`: descending noise levels, normally ending in 0
        (one step per interval)."""
        sigmas = np.asarray(sigmas, dtype=np.float64).reshape(-1)
        if len(sigmas) < 2 or np.any(np.diff(sigmas) >= 0) or sigmas[-1] < 0:
            raise ValueError("sigmas must be at least two strictly descending noise levels >= 0")
        self.num_inference_steps = len(sigmas) - 1
        self.schedule = sigmas
        self._plan(self.schedule, device)

    def set_begin_step(self, step: int, device: str | torch.device | None = None) -> torch.Tensor:
        """img2img: run only the schedule from step `step` on (0 <= step < steps), as if the algorithm had
        been given that tail of the schedule (A1111's img2img). Replaces `timesteps` with the evaluations
        of the tail and returns them; `timesteps[0]` is the noise level the init latents need."""
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps first")
        if not 0 <= step < self.num_inference_steps:
            raise ValueError(f"step must be in [0, {self.num_inference_steps}); got {step}")
        device = device if device is not None else self.timesteps.device
        self._plan(self.schedule[step:], device)
        self._begin_index = 0
        return self.timesteps

    def set_begin_index(self, begin_index: int = 0) -> None:
        """diffusers' hook for img2img. Only 0 is accepted: this scheduler starts later in the schedule
        through `set_begin_step` (which `img2img_timesteps` calls), because a sampler's evaluations on a
        shortened schedule need not be a suffix of those on the full one."""
        if begin_index != 0:
            raise ValueError("SigmaScheduler starts mid-schedule through set_begin_step (img2img_timesteps)")
        self._begin_index = 0

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """The model input for the current evaluation: sample / sqrt(sigma**2 + 1)."""
        self._ensure_started(timestep)
        sigma = self._eval_sigmas[self._step_index]
        return sample / math.sqrt(sigma**2 + 1.0)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor | None,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        model_output_uncond: torch.Tensor | None = None,
    ) -> SigmaSchedulerOutput | tuple:
        """Feed the model output at the current evaluation; `prev_sample` is the point of the next
        evaluation, or the finished sample after the last one. `generator` seeds any noise this step adds
        (drawn on the generator's device, then moved, so CPU generators give device-independent results).
        `model_output_uncond`: the unconditional prediction there, for a scheduler built with `uses_uncond`
        (ignored otherwise)."""
        self._ensure_started(timestep)
        i = self._step_index
        if i >= len(self._eval_sigmas):
            raise RuntimeError("step() called after the last timestep")
        sigma = self._eval_sigmas[i]
        x = sample.to(torch.float32)
        denoised = self._denoised(model_output.to(torch.float32), x, sigma)
        self._ctx.denoised_uncond = None
        if self.uses_uncond and model_output_uncond is not None:
            self._ctx.denoised_uncond = self._denoised(model_output_uncond.to(torch.float32), x, sigma)
        self._generator = generator
        try:
            nxt, next_sigma = self._run.send((x, denoised))
        except StopIteration as done:
            nxt = done.value
            self._check_end(i)
        else:
            self._check_next(i, float(next_sigma))
        finally:
            self._generator = None
        self._step_index = i + 1
        prev = nxt.to(model_output.dtype)
        if not return_dict:
            return (prev, denoised)
        return SigmaSchedulerOutput(prev_sample=prev, pred_original_sample=denoised)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """original + sigma * noise at the noise level of the evaluation at `timesteps` (sigma scale, like
        the loop's sample).

        Before the first step this is the first evaluation's noise level (the starting point of img2img);
        during the run it is the current evaluation's (inpainting re-noises the known region to it)."""
        timesteps = torch.as_tensor(timesteps).reshape(-1)
        if self._step_index is not None:
            idx = [self._step_index] * len(timesteps)
        elif self._begin_index is not None:
            idx = [self._begin_index] * len(timesteps)
        else:
            idx = [self._index_of(t) for t in timesteps]
        values = [self._eval_sigmas[j] if j < len(self._eval_sigmas) else 0.0 for j in idx]
        sigma = torch.tensor(values, dtype=original_samples.dtype, device=original_samples.device)
        sigma = sigma.reshape(-1, *([1] * (original_samples.dim() - 1)))
        return original_samples + noise * sigma

    def __len__(self) -> int:
        return self.levels.num_train_timesteps

    # -- internals ----------------------------------------------------------------------------------------

    def _context(self, noise: Callable[[torch.Tensor], torch.Tensor] | None) -> SamplerContext:
        return SamplerContext(noise=noise, sigma_min=self.levels.sigma_min, **self.ctx_options)

    def _plan(self, schedule: np.ndarray, device) -> None:
        self._run_schedule = [float(s) for s in schedule]
        self._eval_sigmas = self._planned_evaluations()
        if not self._eval_sigmas:
            raise RuntimeError(f"{self.name}: the algorithm evaluates the model nowhere")
        self._device = device
        self._set_tables()
        self._step_index = None
        self._begin_index = None
        self._run = None
        self._ctx = None

    def _planned_evaluations(self) -> list[float]:
        """The noise levels of the run's evaluations, known before it starts."""
        return _trace(self.algorithm, self._run_schedule, self._context(None))

    def _set_tables(self) -> None:
        """`timesteps` and `sigmas` from the evaluations' noise levels."""
        t = self.levels.sigma_to_t(np.array(self._eval_sigmas))
        self.timesteps = torch.from_numpy(t.astype(np.float32)).to(self._device)
        self.sigmas = torch.tensor(self._eval_sigmas + [self._run_schedule[-1]], dtype=torch.float32)

    def _check_next(self, i: int, next_sigma: float) -> None:
        """After evaluation i, the algorithm asked for the next one at `next_sigma`: it must be the planned one."""
        expected = self._eval_sigmas[i + 1] if i + 1 < len(self._eval_sigmas) else None
        if expected is None or not math.isclose(next_sigma, expected, rel_tol=1e-9, abs_tol=1e-12):
            raise RuntimeError(f"{self.name}: evaluation {i + 1} at sigma {next_sigma}, planned {expected}")

    def _check_end(self, i: int) -> None:
        """The algorithm finished after evaluation i: it must have been the last planned one."""
        if i != len(self._eval_sigmas) - 1:
            raise RuntimeError(
                f"{self.name}: the run ended after {i + 1} of {len(self._eval_sigmas)} evaluations"
            ) from None

    def _ensure_started(self, timestep) -> None:
        if self._step_index is not None:
            return
        if not self._eval_sigmas:
            raise RuntimeError("call set_timesteps first")
        start = self._begin_index or 0
        if start != 0:
            raise RuntimeError("SigmaScheduler always starts at the first of its timesteps")
        if timestep is not None:
            t = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
            if abs(t - float(self.timesteps[0])) > 1e-3 * max(1.0, abs(t)):
                raise ValueError(
                    f"first step at timestep {t}, but this run starts at {float(self.timesteps[0])}; "
                    "start img2img through img2img_timesteps()"
                )
        self._ctx = self._context(self._draw_noise)
        self._run = self.algorithm(self._run_schedule, self._ctx)
        _, first = next(self._run)
        if not math.isclose(first, self._eval_sigmas[0], rel_tol=1e-9, abs_tol=1e-12):
            raise RuntimeError(f"{self.name}: first evaluation at sigma {first}, planned {self._eval_sigmas[0]}")
        self._step_index = 0

    def _draw_noise(self, like: torch.Tensor) -> torch.Tensor:
        return randn_tensor(like.shape, generator=self._generator, device=like.device, dtype=like.dtype)

    def _denoised(self, model_output: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """The model's x0 estimate from its raw output at noise level sigma (x is in the sigma scale)."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return x - sigma * model_output
        if kind == "v_prediction":
            # v = sqrt(a) eps - sqrt(1 - a) x0 with sqrt(a) = 1 / sqrt(sigma^2 + 1) (Salimans & Ho 2022)
            return x / (sigma**2 + 1.0) - model_output * (sigma / math.sqrt(sigma**2 + 1.0))
        return model_output

    def _index_of(self, t: torch.Tensor) -> int:
        return int(torch.argmin((self.timesteps.to(t.device) - t).abs()).item())
