"""The sampler registry: A1111 sampler labels and schedule types -> scheduler objects for the denoising loop.

Every scheduler the registry creates has the diffusers scheduler interface (`set_timesteps`, `timesteps`,
`init_noise_sigma`, `order`, `scale_model_input`, `step(...).prev_sample`, `add_noise`). The k-diffusion
family of A1111 (Euler, DPM++ ..., Restart), DDIM, PLMS and LCM are our own sigma-space algorithms
(`ldm_core.samplers`), so that every one of them works with every schedule type, `eta`, `s_noise` and
churn the same way; UniPC is diffusers' `UniPCMultistepScheduler`.

Two of them need more from the loop: "DPM adaptive" decides its evaluations while sampling (an
`OpenEndedSigmaScheduler`, `open_ended` is True), "DDIM CFG++" reads the unconditional prediction
(`uses_uncond`); the denoising loop (`pipeline.loop.denoise`) serves both.

`default_sampler_registry()` builds a fresh registry; the engine owns it and extensions `register` more.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from diffusers import UniPCMultistepScheduler

from .generation_requests import RequestError
from .samplers import SIGMA_SCHEDULES, SigmaScheduler
from .samplers.base import Algorithm
from .samplers.cfg_pp import ddim_cfg_pp
from .samplers.dpm_adaptive import dpm_adaptive
from .samplers.dpm_solver import dpm_fast
from .samplers.dpm_solver_pp import (
    dpmpp_2m,
    dpmpp_2m_sde,
    dpmpp_2m_sde_heun,
    dpmpp_2s_ancestral,
    dpmpp_3m_sde,
    dpmpp_sde,
)
from .samplers.first_order import euler, euler_ancestral, lcm
from .samplers.multistep import lms, plms
from .samplers.open_ended import OpenEndedSigmaScheduler
from .samplers.restart import restart
from .samplers.second_order import dpm2, dpm2_ancestral, heun

#: Schedule types in A1111's order. "Automatic" means the sampler's default (`SamplerInfo.default_schedule`).
SCHEDULE_TYPES: tuple[str, ...] = ("Automatic", *SIGMA_SCHEDULES)

#: A factory builds a scheduler from (model scheduler config, concrete schedule type, options). Options:
#: eta (None = the sampler's default), s_churn, s_tmin, s_tmax, s_noise, model_family.
SamplerFactory = Callable[[Mapping, str, dict], Any]


@dataclass(frozen=True)
class SamplerInfo:
    """One sampler as users and the API see it.

    `name`: the A1111 label ("DPM++ 2M"); `aliases`: other accepted names (A1111's API aliases such as
    "k_dpmpp_2m"); `options`: A1111-style descriptive flags for /sdapi/v1/samplers (string values);
    `default_schedule`: what "Automatic" means for it; `schedule_types`: the schedule types it supports
    (empty when registering = all of `SCHEDULE_TYPES`)."""

    name: str
    aliases: tuple[str, ...] = ()
    options: dict = field(default_factory=dict)
    default_schedule: str = "Uniform"
    schedule_types: tuple[str, ...] = ()


def schedule_api_name(label: str) -> str:
    """A1111's internal name of a schedule type, as /sdapi/v1/schedulers lists it ("SGM Uniform" ->
    "sgm_uniform")."""
    return label.lower().replace(" ", "_")


def _key(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def _schedule_key(text: str) -> str:
    return _key(str(text).replace("_", " ").replace("-", " "))


class SamplerRegistry:
    """Sampler labels -> scheduler factories. Lookups are case-insensitive and accept aliases and A1111's
    old combined names ("DPM++ 2M Karras", "k_dpmpp_2m_ka")."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[SamplerInfo, SamplerFactory]] = {}
        self._lookup: dict[str, str] = {}

    def register(self, info: SamplerInfo, factory: SamplerFactory) -> None:
        """Add a sampler. `factory(base_config, schedule_type, options)` returns a scheduler with the
        diffusers interface; `schedule_type` is always one of `info.schedule_types` (never "Automatic")."""
        if not info.name.strip():
            raise ValueError("a sampler needs a name")
        types = info.schedule_types or SCHEDULE_TYPES[1:]
        unknown = [t for t in types if t not in SCHEDULE_TYPES[1:]]
        if unknown:
            raise ValueError(f"{info.name}: unknown schedule types {unknown}")
        if info.default_schedule not in types:
            raise ValueError(f"{info.name}: default schedule {info.default_schedule!r} not in {types}")
        keys = [_key(n) for n in (info.name, *info.aliases)]
        taken = [k for k in keys if k in self._lookup]
        if taken:
            raise ValueError(f"{info.name}: name or alias already registered: {taken}")
        info = replace(info, schedule_types=tuple(types), options=dict(info.options))
        self._entries[info.name] = (info, factory)
        for k in keys:
            self._lookup[k] = info.name

    def names(self) -> list[str]:
        return list(self._entries)

    def infos(self) -> list[SamplerInfo]:
        return [info for info, _ in self._entries.values()]

    def schedule_types(self, sampler: str | None = None) -> list[str]:
        """The schedule types any sampler supports ("Automatic" first), or those of one sampler."""
        if sampler is not None:
            return ["Automatic", *self._find(sampler)[0].schedule_types]
        used = {t for info in self.infos() for t in info.schedule_types}
        return [t for t in SCHEDULE_TYPES if t == "Automatic" or t in used]

    def resolve(self, name: str, schedule_type: str | None = "Automatic") -> tuple[SamplerInfo, str]:
        """The sampler and the concrete schedule type for a request's `sampler_name` and `scheduler`.

        A schedule named inside an old combined sampler name applies when `schedule_type` is "Automatic";
        "Automatic" otherwise means the sampler's default. Raises RequestError("sampler_name", ...) or
        RequestError("scheduler", ...) listing the allowed values."""
        info, implied = self._find(name)
        label = self._schedule_label(schedule_type or "Automatic")
        if label == "Automatic":
            label = implied or info.default_schedule
        if label not in info.schedule_types:
            allowed = ", ".join(["Automatic", *info.schedule_types])
            raise RequestError(
                "scheduler",
                f"schedule type '{label}' is not available for {info.name}; choose one of: {allowed}",
            )
        return info, label

    def create(
        self,
        name: str,
        schedule_type: str | None,
        base_config: Mapping,
        *,
        eta: float | None = None,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = math.inf,
        s_noise: float = 1.0,
        model_family: str | None = None,
    ) -> Any:
        """A fresh scheduler for one run. `base_config` is the model's diffusers scheduler config (betas,
        `prediction_type` "epsilon" / "v_prediction" / "sample", `steps_offset`, ...). `eta`: noise of the
        ancestral/SDE samplers and DDIM (None = the sampler's default: 1 for ancestral/SDE, 0 for DDIM);
        `s_churn`/`s_tmin`/`s_tmax`: churn for Euler, Heun, DPM2; `s_noise`: multiplies all added noise;
        `model_family` ("sd1", "sdxl") picks the Align Your Steps table."""
        info, label = self.resolve(name, schedule_type)
        options = dict(eta=eta, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
        options["model_family"] = model_family
        return self._entries[info.name][1](base_config, label, options)

    # -- lookups ------------------------------------------------------------------------------------------

    def _find(self, name: str) -> tuple[SamplerInfo, str | None]:
        key = _key(name or "")
        if key in self._lookup:
            return self._entries[self._lookup[key]][0], None
        for label in sorted(SCHEDULE_TYPES[1:], key=len, reverse=True):  # "DPM++ 2M Karras"
            suffix = " " + _key(label)
            if key.endswith(suffix) and key[: -len(suffix)] in self._lookup:
                return self._entries[self._lookup[key[: -len(suffix)]]][0], label
        for suffix, label in (("_ka", "Karras"), ("_exp", "Exponential")):  # "k_dpmpp_2m_ka"
            if key.endswith(suffix) and key[: -len(suffix)] in self._lookup:
                return self._entries[self._lookup[key[: -len(suffix)]]][0], label
        raise RequestError("sampler_name", f"unknown sampler '{name}'; choose one of: {', '.join(self.names())}")

    @staticmethod
    def _schedule_label(schedule_type: str) -> str:
        key = _schedule_key(schedule_type)
        for label in SCHEDULE_TYPES:
            if key == _schedule_key(label):
                return label
        raise RequestError(
            "scheduler",
            f"unknown schedule type '{schedule_type}'; choose one of: {', '.join(SCHEDULE_TYPES)}",
        )


# -------------------------------------------------------------------------------------------------------
# Built-in samplers
# -------------------------------------------------------------------------------------------------------


def _sigma_factory(
    name: str, algorithm: Algorithm, default_eta: float, kind: type[SigmaScheduler] = SigmaScheduler, **extra
) -> SamplerFactory:
    return partial(_make_sigma_scheduler, name, algorithm, default_eta, kind, extra)


def _make_sigma_scheduler(
    name: str,
    algorithm: Algorithm,
    default_eta: float,
    kind: type[SigmaScheduler],
    extra: dict,
    base_config: Mapping,
    schedule: str,
    options: dict,
) -> SigmaScheduler:
    return kind(base_config, schedule, algorithm, name=name, default_eta=default_eta, **extra, **options)


#: Schedule types UniPC supports through diffusers' config flags.
_UNIPC_SPACING = MappingProxyType(
    {"Uniform": "linspace", "Normal": "linspace", "SGM Uniform": "trailing", "Simple": "trailing"}
)
_UNIPC_SCHEDULES = (
    "Uniform",
    "Karras",
    "Exponential",
    "Polyexponential",
    "SGM Uniform",
    "Simple",
    "Normal",
    "DDIM",
)


class _UniPC(UniPCMultistepScheduler):
    """diffusers' UniPC with the loop's `step(..., generator=...)` signature (UniPC adds no noise)."""

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, **kwargs):
        return super().step(model_output, timestep, sample, return_dict=return_dict, **kwargs)


def _make_unipc(base_config: Mapping, schedule: str, options: dict) -> Any:
    """diffusers' UniPC (Zhao et al. 2023, arXiv:2302.04867), order 3 as in A1111. Variant bh2, not A1111's
    bh1: diffusers' bh1 turns the final step to sigma = 0 into NaN."""
    return _UniPC.from_config(
        dict(base_config),
        solver_order=3,
        solver_type="bh2",
        lower_order_final=True,
        final_sigmas_type="zero",
        use_karras_sigmas=schedule == "Karras",
        use_exponential_sigmas=schedule in ("Exponential", "Polyexponential"),
        use_beta_sigmas=False,
        use_flow_sigmas=False,
        timestep_spacing=_UNIPC_SPACING.get(schedule, "leading"),
    )


class _Own(NamedTuple):
    """A built-in sigma-space sampler: label, API aliases, algorithm, default schedule, default eta,
    supported schedule types (() = all), A1111-style options, the scheduler class and its extra arguments."""

    name: str
    aliases: tuple[str, ...]
    algorithm: Algorithm
    default_schedule: str
    eta: float = 0.0
    schedule_types: tuple[str, ...] = ()
    options: tuple[str, ...] = ()  # flags set to "True"
    kind: type[SigmaScheduler] = SigmaScheduler
    extra: tuple[tuple[str, Any], ...] = ()


_ANCESTRAL = ("uses_ensd",)  # adds noise: the seed matters beyond the starting noise
_SECOND = ("second_order",)
_OWN_SAMPLERS = (
    _Own("DPM++ 2M", ("k_dpmpp_2m",), dpmpp_2m, "Karras"),
    _Own("DPM++ SDE", ("k_dpmpp_sde",), dpmpp_sde, "Karras", 1.0, options=_SECOND + _ANCESTRAL),
    _Own("DPM++ 2M SDE", ("k_dpmpp_2m_sde",), dpmpp_2m_sde, "Exponential", 1.0, options=_ANCESTRAL),
    _Own(
        "DPM++ 2M SDE Heun",
        ("k_dpmpp_2m_sde_heun",),
        dpmpp_2m_sde_heun,
        "Exponential",
        1.0,
        options=_ANCESTRAL,
    ),
    _Own("DPM++ 2S a", ("k_dpmpp_2s_a",), dpmpp_2s_ancestral, "Karras", 1.0, options=_SECOND + _ANCESTRAL),
    _Own("DPM++ 3M SDE", ("k_dpmpp_3m_sde",), dpmpp_3m_sde, "Exponential", 1.0, options=_ANCESTRAL),
    _Own("Euler a", ("k_euler_a", "k_euler_ancestral"), euler_ancestral, "Uniform", 1.0, options=_ANCESTRAL),
    _Own("Euler", ("k_euler",), euler, "Uniform"),
    _Own("LMS", ("k_lms",), lms, "Uniform"),
    _Own("Heun", ("k_heun",), heun, "Uniform", options=_SECOND),
    _Own("DPM2", ("k_dpm_2",), dpm2, "Karras", options=_SECOND),
    _Own("DPM2 a", ("k_dpm_2_a",), dpm2_ancestral, "Karras", 1.0, options=_SECOND + _ANCESTRAL),
    _Own("DPM fast", ("k_dpm_fast",), dpm_fast, "Exponential", schedule_types=("Exponential",)),
    # A1111 passes eta (default 1) to DPM adaptive and flags it "uses_ensd"; it picks its own steps
    _Own("DPM adaptive", ("k_dpm_ad",), dpm_adaptive, "Uniform", 1.0, options=_ANCESTRAL, kind=OpenEndedSigmaScheduler),
    _Own("Restart", ("restart", "k_restart"), restart, "Karras", options=_SECOND + _ANCESTRAL),
    _Own("DDIM", ("ddim",), euler_ancestral, "DDIM"),
    _Own("DDIM CFG++", ("ddim_cfgpp",), ddim_cfg_pp, "DDIM", extra=(("uses_uncond", True),)),
    _Own("PLMS", ("plms",), plms, "DDIM"),
)


def default_sampler_registry() -> SamplerRegistry:
    """A new registry with the built-in samplers, in A1111's order."""
    registry = SamplerRegistry()
    for own in _OWN_SAMPLERS:
        options = dict.fromkeys(own.options, "True")
        if own.default_schedule != "Uniform":
            options = {"scheduler": schedule_api_name(own.default_schedule), **options}
        info = SamplerInfo(own.name, own.aliases, options, own.default_schedule, own.schedule_types)
        registry.register(info, _sigma_factory(own.name, own.algorithm, own.eta, own.kind, **dict(own.extra)))
    registry.register(SamplerInfo("UniPC", ("unipc",), {}, "Uniform", _UNIPC_SCHEDULES), _make_unipc)
    lcm_info = SamplerInfo("LCM", ("k_lcm", "lcm"), dict.fromkeys(_ANCESTRAL, "True"), "Uniform")
    registry.register(lcm_info, _sigma_factory("LCM", lcm, 0.0))
    return registry


def img2img_steps(steps: int, strength: float, fix_steps: bool = False) -> tuple[int, int]:
    """(schedule length, steps run) of an img2img pass asked for `steps` at denoising `strength`.

    Normally the schedule has `steps` steps and its last int(steps * strength) run. With `fix_steps` (A1111's
    option "With img2img, do exactly the amount of steps the slider specifies", and always in A1111's hires
    pass) exactly `steps` run, over the tail of a schedule of int(steps / min(strength, 0.999)) steps, so the
    run starts at the same noise level; strength 0 runs none."""
    if not fix_steps:
        return steps, min(max(int(steps * strength), 0), steps)
    if strength <= 0:
        return steps, 0
    return max(steps, int(steps / min(strength, 0.999))), steps


def img2img_timesteps(
    scheduler: Any, steps: int, strength: float, device: str | torch.device | None = None, run: int | None = None
) -> torch.Tensor:
    """The timesteps img2img runs, after `scheduler.set_timesteps(steps)`: the last int(steps * strength)
    steps of the schedule, or the last `run` when given (see `img2img_steps`); A1111/diffusers semantics,
    strength in [0, 1]. The first returned timestep is the noise level to which the init latents are noised
    (`scheduler.add_noise(init, noise, ts[:1])`). Returns an empty tensor when no step runs (strength too
    small): the init latents are then the result.

    Our sigma-space schedulers re-plan their run on the tail of the schedule (`set_begin_step`); diffusers
    schedulers get `set_begin_index(first_step * order)`, as diffusers' img2img pipelines do."""
    run = min(max(int(steps * strength), 0), steps) if run is None else min(max(run, 0), steps)
    if run == 0:
        return scheduler.timesteps[:0]
    first_step = steps - run
    if hasattr(scheduler, "set_begin_step"):
        return scheduler.set_begin_step(first_step, device)
    begin = first_step * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return scheduler.timesteps[begin:]
