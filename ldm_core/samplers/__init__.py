"""Our own samplers: sigma-space sampling algorithms (one small generator function each, paper cited in
its docstring) run behind the diffusers scheduler interface by `SigmaScheduler`, and the noise schedules
("Schedule type") they sample on. `ldm_core.schedulers` puts them in the sampler registry."""

from .base import SamplerContext, SigmaScheduler, SigmaSchedulerOutput, ancestral_split
from .sigmas import SIGMA_SCHEDULES, NoiseLevels, alphas_cumprod_from_config, make_sigmas

__all__ = [
    "SIGMA_SCHEDULES",
    "NoiseLevels",
    "SamplerContext",
    "SigmaScheduler",
    "SigmaSchedulerOutput",
    "alphas_cumprod_from_config",
    "ancestral_split",
    "make_sigmas",
]
