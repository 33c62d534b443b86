"""The PNG Info tab: drop an image, see its generation parameters (ours, A1111's or other text chunks) and
send them, with the image, to txt2img / img2img / inpaint. The send buttons are wired in `ui.app`."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import gradio as gr
from PIL import Image, UnidentifiedImageError

from ldm_core.infotext import parse_infotext
from ldm_core.outputs import read_image_info

NO_PARAMETERS = 'This image has no generation parameters (no "parameters" text chunk or EXIF comment).'
MAX_CHUNK_CHARS = 2000


@dataclass
class ImageInfo:
    """What PNG Info shows: the raw infotext ("" when absent), our manifest and other text chunks."""

    infotext: str
    manifest: dict | None
    others: dict[str, str]


def read_info(path: str | None) -> ImageInfo | None:
    """The parameters of the image file at `path` (None for no file). ValueError for a non-image."""
    if not path:
        return None
    try:
        with Image.open(path) as im:
            text, manifest, others = read_image_info(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read this file as an image: {exc}") from None
    return ImageInfo(text or "", manifest, others)


def info_html(info: ImageInfo | None) -> str:
    """The parameters as an HTML table (prompt, negative prompt, each key), plus other text chunks."""
    if info is None:
        return ""
    parts: list[str] = []
    if info.infotext:
        params = parse_infotext(info.infotext)
        rows = []
        for key, value in params.items():
            if key.endswith(("-1", "-2")) and key[:-2] in params:
                continue
            if key in ("Prompt", "Negative prompt") and not value:
                continue
            rows.append(f"<tr><th>{html.escape(key)}</th><td>{html.escape(str(value))}</td></tr>")
        origin = "ldm_core (with reproducibility manifest)" if info.manifest else "A1111-style parameters"
        parts.append(
            f'<div class="ldm-info-origin">{html.escape(origin)}</div>'
            f'<table class="ldm-info-table">{"".join(rows)}</table>'
        )
    else:
        parts.append(f'<div class="ldm-info-none">{html.escape(NO_PARAMETERS)}</div>')
    for key, value in info.others.items():
        short = value if len(value) <= MAX_CHUNK_CHARS else value[:MAX_CHUNK_CHARS] + " …"
        parts.append(f'<div class="ldm-info-chunk"><b>{html.escape(key)}</b><pre>{html.escape(short)}</pre></div>')
    return f'<div class="ldm-pnginfo">{"".join(parts)}</div>'


def build(ctx: Any) -> dict[str, Any]:
    """The PNG Info tab (call inside a gr.Tab); returns its components by name."""
    with gr.Row():
        with gr.Column(scale=1, min_width=320):
            image = gr.Image(
                label="Source",
                type="filepath",
                sources=["upload", "clipboard"],
                elem_id="pnginfo_image",
                height=400,
            )
        with gr.Column(scale=1, min_width=320):
            table = gr.HTML("", elem_id="pnginfo_html")
            raw = gr.Textbox(
                label="Parameters (raw text)",
                lines=4,
                interactive=False,
                elem_id="pnginfo_text",
                buttons=["copy"],
            )
            with gr.Row():
                to_txt2img = gr.Button("Send to txt2img", elem_id="pnginfo_send_txt2img", size="md")
                to_img2img = gr.Button("Send to img2img", elem_id="pnginfo_send_img2img", size="md")
                to_inpaint = gr.Button("Send to inpaint", elem_id="pnginfo_send_inpaint", size="md")

    def show(path: str | None):
        try:
            info = read_info(path)
        except ValueError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        return info_html(info), (info.infotext if info else "")

    image.change(show, [image], [table, raw], queue=False)
    return {
        "image": image,
        "text": raw,
        "html": table,
        "send_txt2img": to_txt2img,
        "send_img2img": to_img2img,
        "send_inpaint": to_inpaint,
    }
