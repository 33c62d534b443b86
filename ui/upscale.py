"""The Upscale tab (A1111's "Extras": same element ids, `extras` output folder and `/sdapi/v1/extra-*`
routes): upscale one image or a batch. Upscaler 1, optional upscaler 2 blended in by "visibility",
resize by a factor or to a size (with optional centre crop). Lanczos and Nearest work through PIL; an engine
upscaler registry (`engine.upscalers`, the upscale issue) adds model upscalers by name.

Results are saved to `outputs/extras/<date>/` with the source's infotext plus the postprocess keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from ldm_core.extras import MAX_UPSCALE, RESIZE_MODES, ExtrasParams, postprocess_text, upscale_image
from ldm_core.generation_requests import MAX_SIDE, RequestError
from ldm_core.outputs import output_folder, read_image_info, save_image

from .common import UiContext, readable_error

RESIZE_BY, RESIZE_TO = RESIZE_MODES


def upscaler_registry(ctx: UiContext):
    """The engine's upscaler registry, or (until the engine owns one) a registry over the configured upscaler
    folders, made once per UI."""
    reg = getattr(ctx.engine, "upscalers", None)
    if reg is not None:
        return reg
    if ctx.upscalers is None:
        from ldm_core.upscalers import UpscalerRegistry

        cfg = ctx.engine.config
        ctx.upscalers = UpscalerRegistry(cfg.upscaler_dirs, allow_pickle=cfg.allow_pickle)
    return ctx.upscalers


def upscaler_names(ctx: UiContext) -> list[str]:
    """ "None", "Lanczos", "Nearest", then model upscalers."""
    try:
        return list(upscaler_registry(ctx).names())
    except Exception:
        return ["None", "Lanczos", "Nearest"]


def extras_params(
    upscaler_1: str,
    upscaler_2: str,
    visibility: float,
    mode: str,
    factor: float,
    width: int,
    height: int,
    crop: bool,
) -> ExtrasParams:
    """The Extras form as A1111's parameters; RequestError names a bad one."""
    return ExtrasParams(
        upscaler_1=upscaler_1 or "None",
        upscaler_2=upscaler_2 or "None",
        extras_upscaler_2_visibility=float(visibility or 0.0),
        resize_mode=mode,
        upscaling_resize=float(factor),
        upscaling_resize_w=int(width),
        upscaling_resize_h=int(height),
        upscaling_crop=bool(crop),
    )


def _open(path_or_image: Any) -> tuple[Image.Image, str | None]:
    if isinstance(path_or_image, Image.Image):
        return path_or_image, read_image_info(path_or_image)[0]
    try:
        with Image.open(path_or_image) as im:
            im.load()
            return im.copy(), read_image_info(im)[0]
    except OSError as exc:
        raise RequestError("image", f"cannot read {Path(str(path_or_image)).name} as an image: {exc}") from None


def run_extras(ctx: UiContext, sources: list[Any], params: ExtrasParams) -> tuple[list[Any], list[str]]:
    """Upscale each source (a path or PIL image) through the job queue; returns (gallery items, texts).

    Saved files (outputs/extras/<date>/) keep the source's infotext; the Extras settings go into the manifest
    as A1111's "postprocessing" text. Items are the saved paths (downloads keep the metadata), or the images
    when saving is off. Texts are the source infotext plus the postprocessing line, for display."""
    if not sources:
        raise RequestError("image", "upload an image first")
    registry = upscaler_registry(ctx)
    params.validate(registry)
    engine = ctx.engine

    def work(job_ctx):
        items, texts = [], []
        for src in sources:
            job_ctx.cancel.check()
            image, text = _open(src)
            out = upscale_image(image, params, registry, cancel=job_ctx.cancel.check)
            post = postprocess_text(image.size, params)
            cfg = engine.config
            if cfg.save_images:
                manifest = {"mode": "extras", "postprocessing": post}
                path = save_image(
                    out,
                    output_folder(cfg.outputs_dir, "extras"),
                    infotext=text or "",
                    manifest=manifest,
                    seed=0,
                    pattern="[number]",
                )
                items.append(str(path))
            else:
                items.append(out)
            texts.append("\n".join(t for t in (text, post) if t))
        return items, texts

    return ctx.service.run_task(work, kind="upscale")


def result_note(first: Any) -> str:
    """HTML with the first result's size and where it was saved."""
    if isinstance(first, Image.Image):
        return f'<div class="ldm-saved">Result: {first.width}x{first.height} (not saved)</div>'
    with Image.open(first) as im:
        w, h = im.size
    return f'<div class="ldm-saved">Result: {w}x{h} · saved in <code>{Path(first).parent}</code></div>'


def _file_path(f: Any) -> str:
    return f if isinstance(f, str) else getattr(f, "name", None) or str(f)


def build(ctx: UiContext) -> dict[str, Any]:
    """The Upscale tab (call inside a gr.Tab); returns its components by name."""
    names = upscaler_names(ctx)
    with gr.Row():
        with gr.Column(scale=1, min_width=360):
            with gr.Tabs(elem_id="extras_source_tabs") as source_tabs:
                with gr.Tab("Single image", id="single", elem_id="extras_single_tab"):
                    image = gr.Image(
                        label="Source",
                        type="filepath",
                        sources=["upload", "clipboard"],
                        elem_id="extras_image",
                        height=360,
                    )
                with gr.Tab("Batch", id="batch", elem_id="extras_batch_tab"):
                    batch = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="extras_batch")
            mode = gr.Radio([RESIZE_BY, RESIZE_TO], value=RESIZE_BY, label="Resize", elem_id="extras_resize_mode")
            with gr.Row(visible=True) as by_row:
                factor = gr.Slider(1.0, MAX_UPSCALE, value=2.0, step=0.05, label="Scale by", elem_id="extras_factor")
            with gr.Row(visible=False) as to_row:
                width = gr.Slider(64, 4 * MAX_SIDE, value=1024, step=8, label="Width", elem_id="extras_width")
                height = gr.Slider(64, 4 * MAX_SIDE, value=1024, step=8, label="Height", elem_id="extras_height")
                crop = gr.Checkbox(True, label="Crop to fit", elem_id="extras_crop")
            with gr.Row():
                up1 = gr.Dropdown(names, value="Lanczos", label="Upscaler 1", elem_id="extras_upscaler_1")
                up2 = gr.Dropdown(names, value="None", label="Upscaler 2", elem_id="extras_upscaler_2")
                vis = gr.Slider(
                    0.0,
                    1.0,
                    value=0.0,
                    step=0.01,
                    label="Upscaler 2 visibility",
                    elem_id="extras_upscaler_2_visibility",
                )
            run = gr.Button("Upscale", variant="primary", elem_id="extras_generate")
        with gr.Column(scale=1, min_width=360):
            gallery = gr.Gallery(
                label="Output",
                elem_id="extras_gallery",
                columns=3,
                height=420,
                object_fit="contain",
                preview=True,
                interactive=False,
                format="png",
            )
            info = gr.Textbox(
                label="Parameters", lines=3, interactive=False, elem_id="extras_infotext", buttons=["copy"]
            )
            size_note = gr.HTML("", elem_id="extras_size")
    which = gr.State("single")

    def on_tab(evt: gr.SelectData):
        return "batch" if evt.index == 1 else "single"

    source_tabs.select(on_tab, None, [which], queue=False)
    mode.change(
        lambda m: (gr.Row(visible=m == RESIZE_BY), gr.Row(visible=m == RESIZE_TO)),
        [mode],
        [by_row, to_row],
        queue=False,
    )

    def go(which_tab, single, files, u1, u2, v, m, f, w, h, c):
        sources = [_file_path(x) for x in (files or [])] if which_tab == "batch" else ([single] if single else [])
        try:
            items, texts = run_extras(ctx, sources, extras_params(u1, u2, v, m, f, w, h, c))
        except Exception as exc:  # readable message in the UI; the job queue logged unexpected ones
            raise gr.Error(readable_error(exc), print_exception=False) from None
        return gr.Gallery(value=items, selected_index=0), texts[0], result_note(items[0])

    run.click(
        go,
        [which, image, batch, up1, up2, vis, mode, factor, width, height, crop],
        [gallery, info, size_note],
        concurrency_limit=None,
        api_name="extras_upscale",
    )
    return {"image": image, "gallery": gallery, "infotext": info, "tabs": source_tabs}
