"""The txt2img tab: prompts and sampling controls, plus Hires. fix once the engine has an upscaler
registry."""

from __future__ import annotations

import gradio as gr

from ldm_core.generation_requests import MAX_SIDE

from .common import (
    SAME_CHECKPOINT,
    SAME_SAMPLER,
    SAME_SCHEDULER,
    UiContext,
    checkpoint_titles,
    hires_upscalers,
    sampler_names,
    schedule_types,
    size_step,
)
from .scripts import build_section as build_script_section
from .widgets import GenerationTab, TopBar, build_generation_tab, build_refiner_section


def _hires_section(ctx: UiContext, tab: GenerationTab) -> None:
    upscalers = hires_upscalers(ctx.engine)
    if not upscalers:
        return
    with gr.Accordion("Hires. fix", open=False, elem_id="txt2img_hires"):
        enable = gr.Checkbox(False, label="Enable Hires. fix", elem_id="txt2img_enable_hr")
        with gr.Row():
            upscaler = gr.Dropdown(
                upscalers,
                value=upscalers[0],
                label="Upscaler",
                allow_custom_value=True,
                elem_id="txt2img_hr_upscaler",
            )
            hr_steps = gr.Slider(
                0,
                150,
                value=0,
                step=1,
                label="Hires steps (0: same as sampling steps)",
                elem_id="txt2img_hires_steps",
            )
            denoise = gr.Slider(
                0.0,
                1.0,
                value=0.7,
                step=0.01,
                label="Denoising strength",
                elem_id="txt2img_denoising_strength",
            )
        with gr.Row():
            scale = gr.Slider(1.0, 4.0, value=2.0, step=0.05, label="Upscale by", elem_id="txt2img_hr_scale")
            rx = gr.Slider(
                0,
                MAX_SIDE,
                value=0,
                step=size_step(ctx.engine),
                label="Resize width to (0: use Upscale by)",
                elem_id="txt2img_hr_resize_x",
            )
            ry = gr.Slider(
                0,
                MAX_SIDE,
                value=0,
                step=size_step(ctx.engine),
                label="Resize height to (0: use Upscale by)",
                elem_id="txt2img_hr_resize_y",
            )
        with gr.Row():
            hr_checkpoint = gr.Dropdown(
                [SAME_CHECKPOINT, *checkpoint_titles(ctx.engine)],
                value=SAME_CHECKPOINT,
                label="Hires checkpoint",
                allow_custom_value=True,
                elem_id="txt2img_hr_checkpoint",
            )
            hr_sampler = gr.Dropdown(
                [SAME_SAMPLER, *sampler_names(ctx.engine)],
                value=SAME_SAMPLER,
                label="Hires sampling method",
                allow_custom_value=True,
                elem_id="txt2img_hr_sampler",
            )
            hr_scheduler = gr.Dropdown(
                [SAME_SCHEDULER, *schedule_types(ctx.engine)],
                value=SAME_SCHEDULER,
                label="Hires schedule type",
                allow_custom_value=True,
                elem_id="txt2img_hr_scheduler",
            )
    tab.fields.update(
        hr_checkpoint_name=hr_checkpoint,
        hr_sampler_name=hr_sampler,
        hr_scheduler=hr_scheduler,
        enable_hr=enable,
        hr_upscaler=upscaler,
        hr_second_pass_steps=hr_steps,
        denoising_strength=denoise,
        hr_scale=scale,
        hr_resize_x=rx,
        hr_resize_y=ry,
    )


def build(ctx: UiContext, top: TopBar) -> GenerationTab:
    """The txt2img tab (call inside a gr.Tab)."""

    def extra(tab: GenerationTab) -> None:
        _hires_section(ctx, tab)
        build_refiner_section(ctx, tab)
        tab.scripts = build_script_section(ctx, "txt2img")

    return build_generation_tab(ctx, top, "txt2img", extra_section=extra)
