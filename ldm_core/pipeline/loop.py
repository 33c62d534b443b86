"""The one denoising loop that txt2img, img2img, inpaint, hires fix and SD upscale all run.

Per step: check the cancel token; pick the step's conditioning from the prompt schedule; build the
classifier-free-guidance batch [uncond, cond_1..cond_k] (AND parts); ask every UNet-input provider (hook) for
extra UNet inputs (e.g. ControlNet residuals); run the UNet; combine with guidance (composable weights);
let CFG hooks adjust the result; take a scheduler step; for inpainting with a normal model, put the known
region back (noised to the next level); report progress with the predicted clean latents for previews.

Two kinds of scheduler get more from the loop. One with `uses_uncond` (DDIM CFG++) also gets the unconditional
prediction, `step(..., model_output_uncond=u)` (None when the step had no unconditional pass). One that is
`open_ended` (DPM adaptive) decides its evaluations while sampling: the loop runs until the scheduler's
`timesteps` has no next entry (it grows by one after each step) and reports the scheduler's
`estimated_evaluations` as the total, an estimate that may change from step to step; the cancel token is
still checked before every evaluation. Its evaluations get the conditioning of the planned evaluation (out
of the estimate made before the run, which the caller planned the prompt schedule with) at the same share
of the noise range, `scheduler.position(i)`.

Two A1111 options act inside the loop: `s_min_uncond` (A1111's "NGMS": on every other evaluation whose noise
level is below it, the unconditional pass is skipped and the step is guided by the conditional prediction
alone) and the refiner switch (`ModelSwitch`: from a given evaluation on, the run continues with another
checkpoint's UNet and conditioning on the same latents).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..progress import CancelToken, Interrupted


@dataclass
class StepState:
    """What hooks see at one step. `x_in` is the scaled UNet input batch laid out as `rows` groups of the
    image batch: group 0 is the unconditional half when `has_uncond`, then one group per AND part."""

    index: int  # 0-based step index
    total: int  # steps in this run (an estimate for an open-ended scheduler, see the module doc)
    timestep: torch.Tensor
    x_in: torch.Tensor
    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None
    batch_size: int
    has_uncond: bool
    cond_weights: list[float]

    @property
    def fraction(self) -> float:
        """Progress through the run, 0 at the first step, approaching 1 at the last."""
        return self.index / max(1, self.total)


class UNetInputProvider(Protocol):
    """A hook that adds UNet inputs for one step (e.g. ControlNet residuals). Returns a dict of UNet keyword
    arguments (`down_block_additional_residuals`, `mid_block_additional_residual`, ...) or None to skip."""

    def __call__(self, state: StepState) -> dict[str, Any] | None: ...


#: A CFG hook: (state, uncond prediction or None, per-part cond predictions, guided prediction) -> guided.
CfgHook = Callable[[StepState, torch.Tensor | None, list[torch.Tensor], torch.Tensor], torch.Tensor]


@dataclass
class Hooks:
    """Extension points of the loop. Providers' residual outputs are summed when several are active."""

    unet_inputs: list[UNetInputProvider] = field(default_factory=list)
    cfg: list[CfgHook] = field(default_factory=list)


def _merge_unet_kwargs(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for k, v in extra.items():
        if v is None:
            continue
        if k not in base or base[k] is None:
            base[k] = v
        elif k == "down_block_additional_residuals":
            base[k] = tuple(a + b for a, b in zip(base[k], v, strict=True))
        elif k == "mid_block_additional_residual":
            base[k] = base[k] + v
        elif k == "down_intrablock_additional_residuals":  # T2I-Adapters: several add up, level by level
            base[k] = [a + b for a, b in zip(base[k], v, strict=True)]
        else:
            base[k] = v


@dataclass
class InpaintBlend:
    """Known-region handling for inpainting with a normal (4-channel) model: after each step, the unmasked
    region is replaced by the init latents noised to the next step's level. `mask` is (B,1,h,w), 1 = repaint."""

    init_latents: torch.Tensor
    noise: torch.Tensor
    mask: torch.Tensor


@dataclass
class ModelSwitch:
    """The refiner: from evaluation `at` on (0-based), the loop runs `unet` with `conditioning`,
    `added_cond_kwargs` and `unet_concat` (same meanings as in `LoopInputs`) instead of the first model's.
    `keep_unet_inputs=False` drops the UNet-input hooks after the switch (their residuals fit the first
    model's architecture only)."""

    at: int
    unet: Any
    conditioning: Callable[[int], tuple[Any, list[tuple[Any, float]]]]
    added_cond_kwargs: Callable[[bool, list[torch.Tensor]], dict] | None = None
    unet_concat: torch.Tensor | None = None
    keep_unet_inputs: bool = True


def rescale_guidance(guided: torch.Tensor, positive: torch.Tensor, phi: float) -> torch.Tensor:
    """CFG rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", 3.4):
    the guided prediction scaled, per image, to the standard deviation of the positive (conditional) one, and
    mixed back with the unscaled guided prediction by `phi` (0 = plain CFG, 1 = fully rescaled). High CFG
    inflates the guided prediction's spread, which a v-prediction model turns into blown-out colours (the
    built-in model paints the background in the object's colour); rescaling undoes the inflation."""
    dims = tuple(range(1, guided.ndim))
    ratio = positive.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-8)
    return guided + phi * (guided * ratio - guided)


def skips_uncond(index: int, sigma: float, s_min_uncond: float) -> bool:
    """A1111's s_min_uncond rule: the unconditional pass of evaluation `index` is skipped when the noise
    level `sigma` is below `s_min_uncond` (> 0), on odd evaluations only (alternating keeps the quality)."""
    return s_min_uncond > 0 and index % 2 == 1 and sigma < s_min_uncond


@dataclass
class LoopInputs:
    """Everything one denoising run needs. `latents` are already noised to `timesteps[0]`'s level.
    `conditioning(step_index)` returns (uncond or None, [(cond, weight), ...]) as Conditioning objects.
    `added_cond_kwargs(uncond_first, pooled)` gives the UNet's added conditioning (SDXL) of a step's groups:
    `pooled` holds each group's pooled embedding and `uncond_first` says whether group 0 is the unconditional
    one (the SDXL refiner conditions it on another aesthetic score).
    `unet_concat` (B,C',h,w) is concatenated to the UNet input (9-channel inpainting models)."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    scheduler: Any
    conditioning: Callable[[int], tuple[Any, list[tuple[Any, float]]]]
    cfg_scale: float
    generators: list[torch.Generator] | None = None
    added_cond_kwargs: Callable[[bool, list[torch.Tensor]], dict] | None = None
    unet_concat: torch.Tensor | None = None
    inpaint: InpaintBlend | None = None
    s_min_uncond: float = 0.0  # see `skips_uncond`; needs `sigmas`
    sigmas: Sequence[float] | None = None  # noise level (sigma) of each evaluation
    switch: ModelSwitch | None = None
    rescale_cfg: float = 0.0  # see `rescale_guidance`; 0 = plain CFG


@dataclass
class LoopResult:
    latents: torch.Tensor  # final latents, or the latest predicted clean latents when stopped early
    steps_done: int
    stopped: Interrupted | None = None
    switched: bool = False  # whether the run reached `LoopInputs.switch`


def denoise(
    unet,
    inputs: LoopInputs,
    *,
    hooks: Hooks | None = None,
    cancel: CancelToken | None = None,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
) -> LoopResult:
    """Run the loop. `on_step(step_done, total, predicted_clean_latents)` is called after every step."""
    hooks = hooks or Hooks()
    sched = inputs.scheduler
    latents = inputs.latents
    open_ended = bool(getattr(sched, "open_ended", False))
    pass_uncond = bool(getattr(sched, "uses_uncond", False))
    timesteps, sigmas = inputs.timesteps, inputs.sigmas
    total = len(timesteps)
    planned = max(1, int(sched.estimated_evaluations)) if open_ended else total
    b = latents.shape[0]
    denoised = latents
    dtype = next(unet.parameters()).dtype
    step_kwargs: dict[str, Any] = {}
    if "generator" in inspect.signature(sched.step).parameters:
        step_kwargs["generator"] = inputs.generators
    conditioning, added_fn, concat = inputs.conditioning, inputs.added_cond_kwargs, inputs.unet_concat
    providers = hooks.unet_inputs
    switch, switched = inputs.switch, False
    i = 0
    while i < len(timesteps):
        t = timesteps[i]
        if open_ended:
            total = max(int(sched.estimated_evaluations), i + 1)
        if cancel is not None:
            try:
                cancel.check()
            except Interrupted as stop:
                return LoopResult(denoised, i, stop, switched)
        if switch is not None and not switched and i >= switch.at:
            unet, conditioning, added_fn, concat = (
                switch.unet,
                switch.conditioning,
                switch.added_cond_kwargs,
                switch.unet_concat,
            )
            dtype = next(unet.parameters()).dtype
            providers = providers if switch.keep_unet_inputs else []
            switched = True
        uncond, conds = conditioning(min(planned - 1, int(sched.position(i) * planned)) if open_ended else i)
        use_uncond = uncond is not None and inputs.cfg_scale != 1.0
        skip_uncond = use_uncond and sigmas is not None and skips_uncond(i, float(sigmas[i]), inputs.s_min_uncond)
        if skip_uncond:
            use_uncond = False
        groups = ([uncond] if use_uncond else []) + [c for c, _ in conds]
        weights = [w for _, w in conds]
        x = sched.scale_model_input(latents, t)
        if concat is not None:
            x = torch.cat([x, concat.to(x)], dim=1)
        x_in = torch.cat([x] * len(groups)).to(dtype)
        ctx = torch.cat([g.embeds.expand(b, -1, -1) for g in groups]).to(dtype)
        added = None
        if added_fn is not None:
            pooled = [g.pooled.expand(b, -1) for g in groups]  # one per image (a travelling prompt: per frame)
            added = added_fn(use_uncond, pooled)
            # per-group values (SDXL's time ids) repeat over the batch; per-image ones are already there
            added = {
                k: (v.repeat_interleave(b, dim=0) if v.shape[0] == len(groups) and b > 1 else v).to(dtype)
                for k, v in added.items()
            }
        state = StepState(i, total, t, x_in, ctx, added, b, use_uncond, weights)
        kwargs: dict[str, Any] = {}
        for provider in providers:
            extra = provider(state)
            if extra:
                _merge_unet_kwargs(kwargs, extra)
        # the UNet turns timesteps into float32 embeddings anyway: one fresh float32 tensor for every scheduler
        # means one compiled graph for all of them (DDIM/LCM step on integer timesteps, UniPC's are made
        # outside inference mode, the k-samplers' are floats)
        t_in = t.to(torch.float32, copy=True) if torch.is_tensor(t) else t
        out = unet(x_in, t_in, encoder_hidden_states=ctx, added_cond_kwargs=added, **kwargs).sample.float()
        parts = list(out.chunk(len(groups)))
        u = parts.pop(0) if use_uncond else None
        if skip_uncond:
            # A1111: the first conditional prediction stands in for the unconditional one, guidance scale 1
            guided = parts[0] + sum(w * (p - parts[0]) for w, p in zip(weights, parts, strict=True))
        elif u is None:
            guided = sum(w * p for w, p in zip(weights, parts, strict=True)) / max(sum(weights), 1e-8)
        else:
            guided = u + inputs.cfg_scale * sum(w * (p - u) for w, p in zip(weights, parts, strict=True))
            if inputs.rescale_cfg > 0:
                positive = sum(w * p for w, p in zip(weights, parts, strict=True)) / max(sum(weights), 1e-8)
                guided = rescale_guidance(guided, positive, inputs.rescale_cfg)
        for hook in hooks.cfg:
            guided = hook(state, u, parts, guided)
        if pass_uncond:
            step_kwargs["model_output_uncond"] = u
        step_out = sched.step(guided, t, latents, return_dict=True, **step_kwargs)
        if open_ended:  # the scheduler has appended its next evaluation, unless the run is complete
            timesteps, sigmas = sched.timesteps, sched.sigmas
            total = i + 1 if len(timesteps) <= i + 1 else max(int(sched.estimated_evaluations), i + 2)
        latents = step_out.prev_sample
        pred = getattr(step_out, "pred_original_sample", None)
        denoised = pred if pred is not None else latents
        if inputs.inpaint is not None:
            latents = _blend_known(sched, inputs.inpaint, latents, timesteps, i)
            denoised = inputs.inpaint.init_latents * (1 - inputs.inpaint.mask) + denoised * inputs.inpaint.mask
        if on_step is not None:
            on_step(i + 1, total, denoised)
        i += 1
    return LoopResult(latents, i, None, switched)


def _blend_known(sched, blend: InpaintBlend, latents, timesteps, i) -> torch.Tensor:
    if i + 1 < len(timesteps):
        t_next = timesteps[i + 1 : i + 2]
        known = sched.add_noise(blend.init_latents, blend.noise, t_next)
    else:
        known = blend.init_latents
    return known * (1 - blend.mask) + latents * blend.mask
