"""The inpaint tab: an image with a mask painted in the browser (brush, eraser) or uploaded, and the inpaint
options users know (mask blur, mask mode, masked content, inpaint area and padding)."""

from __future__ import annotations

import gradio as gr

from ldm_core.generation_requests import INPAINT_FILLS, RESIZE_MODES

from .common import INPAINT_AREAS, MASK_MODES, UiContext
from .widgets import GenerationTab, TopBar, build_generation_tab

MASK_COLOUR = "#ffffff"
#: Shown under the mask: inpainting checkpoints are picked in the top bar, as in A1111.
INPAINT_MODEL_HINT = (
    "An *inpainting* checkpoint paints what the prompt names into the mask more often than its base model: "
    "pick one in the checkpoint list above (the built-in model's is **builtin-inpainting**)."
)


def _inputs(tab: GenerationTab) -> None:
    editor = gr.ImageEditor(
        label="Image and mask (paint the area to repaint)",
        type="pil",
        image_mode="RGBA",
        sources=["upload", "clipboard"],
        elem_id="inpaint_editor",
        height=420,
        layers=False,
        transforms=(),
        brush=gr.Brush(colors=[MASK_COLOUR], default_color=MASK_COLOUR, color_mode="fixed", default_size=24),
        eraser=gr.Eraser(default_size=24),
        canvas_size=(512, 512),
        format="png",
    )
    with gr.Accordion("Upload a mask instead (white = repaint)", open=False, elem_id="inpaint_mask_upload_box"):
        mask_upload = gr.Image(
            label="Mask",
            type="pil",
            image_mode="L",
            sources=["upload", "clipboard"],
            elem_id="inpaint_mask_upload",
            height=240,
        )
    gr.Markdown(INPAINT_MODEL_HINT, elem_id="inpaint_model_hint")
    with gr.Row():
        mask_blur = gr.Slider(0, 64, value=4, step=1, label="Mask blur", elem_id="inpaint_mask_blur")
        mask_mode = gr.Radio(list(MASK_MODES), value=MASK_MODES[0], label="Mask mode", elem_id="inpaint_mask_mode")
    fill = gr.Radio(list(INPAINT_FILLS), value="original", label="Masked content", elem_id="inpaint_fill")
    with gr.Row():
        area = gr.Radio(list(INPAINT_AREAS), value=INPAINT_AREAS[0], label="Inpaint area", elem_id="inpaint_area")
        padding = gr.Slider(
            0, 256, value=32, step=4, label="Only masked padding, pixels", elem_id="inpaint_full_res_padding"
        )
    resize_mode = gr.Radio(
        list(RESIZE_MODES), value=RESIZE_MODES[0], label="Resize mode", elem_id="inpaint_resize_mode"
    )
    denoise = gr.Slider(
        0.0, 1.0, value=0.75, step=0.01, label="Denoising strength", elem_id="inpaint_denoising_strength"
    )
    tab.fields.update(
        inpaint_editor=editor,
        mask_upload=mask_upload,
        mask_blur=mask_blur,
        mask_mode=mask_mode,
        inpainting_fill=fill,
        inpaint_area=area,
        inpaint_full_res_padding=padding,
        resize_mode=resize_mode,
        denoising_strength=denoise,
    )
    tab.image = editor


def build(ctx: UiContext, top: TopBar) -> GenerationTab:
    """The inpaint tab (call inside a gr.Tab)."""
    return build_generation_tab(ctx, top, "inpaint", inputs_section=_inputs)
