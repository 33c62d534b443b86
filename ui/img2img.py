"""The img2img tab: an uploaded image, resize mode and denoising strength, plus the shared controls."""

from __future__ import annotations

import gradio as gr

from ldm_core.generation_requests import RESIZE_MODES

from .common import UiContext
from .scripts import build_section as build_script_section
from .widgets import GenerationTab, TopBar, build_generation_tab, build_refiner_section


def _inputs(tab: GenerationTab) -> None:
    image = gr.Image(
        label="Image for img2img",
        type="pil",
        image_mode="RGB",
        sources=["upload", "clipboard"],
        elem_id="img2img_image",
        height=360,
    )
    resize_mode = gr.Radio(
        list(RESIZE_MODES), value=RESIZE_MODES[0], label="Resize mode", elem_id="img2img_resize_mode"
    )
    denoise = gr.Slider(
        0.0, 1.0, value=0.75, step=0.01, label="Denoising strength", elem_id="img2img_denoising_strength"
    )
    tab.fields.update(init_image=image, resize_mode=resize_mode, denoising_strength=denoise)
    tab.image = image


def build(ctx: UiContext, top: TopBar) -> GenerationTab:
    """The img2img tab (call inside a gr.Tab)."""

    def extra(tab: GenerationTab) -> None:
        build_refiner_section(ctx, tab)
        tab.scripts = build_script_section(ctx, "img2img")

    return build_generation_tab(ctx, top, "img2img", inputs_section=_inputs, extra_section=extra)
