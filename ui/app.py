"""The whole web UI: top bar (checkpoint, VAE), the tabs, and the wiring between tabs (send an image and its
parameters to another tab, model switch updates the default sizes). `create_ui(ctx)` returns the Blocks with
the CSS and page script that `webui.py` passes to `launch`."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from typing import Any

import gradio as gr

from . import extensions, img2img, inpaint, pnginfo, settings, txt2img, upscale, video
from .common import (
    UiContext,
    checkpoint_titles,
    current_checkpoint_title,
    default_sampling,
    native_size,
    open_gallery_image,
    pick,
    readable_error,
    recommended_rescale_cfg,
    size_after_switch,
    size_step,
    vae_titles,
)
from .widgets import ICON_REFRESH, TOOLTIPS, GenerationTab, TopBar, infotext_updates, value_components

TITLE = "ldm web UI"

CSS = """
.ldm-tool { max-width: 2.8em !important; min-width: 2.8em !important; padding: 0 !important;
  align-self: end; }
.ldm-prompt-box { position: relative; }
.ldm-token-counter { position: absolute; top: 4px; right: 8px; z-index: 5; width: auto !important;
  min-height: 0 !important; padding: 0 !important; background: transparent !important; }
.ldm-tokens { font-size: 0.8em; padding: 1px 6px; border-radius: 6px;
  background: var(--block-background-fill);
  border: 1px solid var(--border-color-primary); opacity: 0.85; }
.ldm-tokens-multi { border-color: var(--color-accent); }
.ldm-progress { position: relative; height: 1.7em; border-radius: 6px; overflow: hidden;
  background: var(--block-background-fill); border: 1px solid var(--border-color-primary); }
.ldm-progress[data-state="idle"] { visibility: hidden; }
.ldm-progress[data-state="error"] { border-color: var(--error-border-color, #ef4444); }
.ldm-progress-bar { position: absolute; inset: 0 auto 0 0; background: var(--color-accent); opacity: 0.35;
  transition: width 0.25s linear; }
.ldm-progress-text { position: relative; padding-left: 8px; line-height: 1.7em; font-size: 0.9em; }
.ldm-progress-box { min-height: 0 !important; padding: 0 !important; }
.ldm-saved { font-size: 0.85em; opacity: 0.85; word-break: break-all; }
.ldm-info-table { border-collapse: collapse; width: 100%; font-size: 0.9em; border: none !important; }
.ldm-info-table th, .ldm-info-table td { border: none !important; padding: 3px 8px !important;
  border-bottom: 1px solid var(--border-color-primary) !important; vertical-align: top; text-align: left; }
.ldm-info-table th { white-space: nowrap; width: 1%; font-weight: 600; }
.ldm-info-table td { word-break: break-word; white-space: pre-wrap; }
.ldm-info-none { padding: 8px; opacity: 0.8; }
.ldm-info-chunk pre { max-height: 12em; overflow: auto; font-size: 0.8em; }
.ldm-send-row button { min-width: 0 !important; }
.ldm-run-row { flex-wrap: nowrap !important; }
#ldm_topbar { align-items: end; }
.ldm-exposure { border: 1px solid var(--error-border-color, #ef4444); border-radius: 6px; padding: 4px 8px;
  font-size: 0.9em; }
.ldm-exposure ul { margin: 0; padding-left: 1.2em; }
"""

# Hover titles for icon buttons, and Ctrl+Enter in a prompt clicks the visible Generate button.
JS = """
() => {
  const tips = __TIPS__;
  const apply = () => document.querySelectorAll('button.ldm-tool').forEach((b) => {
    const t = tips[b.textContent.trim()]; if (t && !b.title) b.title = t; });
  apply();
  new MutationObserver(apply).observe(document.body, {childList: true, subtree: true});
  // a gallery laid out while its tab was hidden measures itself again when the tab is shown
  document.addEventListener('click', (e) => {
    if (e.target.closest && e.target.closest('[role="tab"]')) {
      setTimeout(() => window.dispatchEvent(new Event('resize')), 60);
    }
  });
  document.addEventListener('keydown', (e) => {
    if (e.key !== 'Enter' || !(e.ctrlKey || e.metaKey)) return;
    const box = e.target.closest && e.target.closest('[id$="_prompt"]');
    if (!box) return;
    const mode = box.id.replace(/_(neg_)?prompt$/, '');
    const btn = document.getElementById(mode + '_generate');
    if (btn) { e.preventDefault(); btn.click(); }
  });
}
""".replace("__TIPS__", json.dumps(TOOLTIPS))


@dataclass
class WebApp:
    """The built UI: pass `css` and `js` to `blocks.launch` (Gradio 6 takes them there)."""

    blocks: gr.Blocks
    css: str
    js: str
    tabs: dict[str, Any]


def build_top_bar(ctx: UiContext) -> TopBar:
    eng = ctx.engine
    with gr.Row(elem_id="ldm_topbar", equal_height=True):
        checkpoint = gr.Dropdown(
            checkpoint_titles(eng),
            value=current_checkpoint_title(eng),
            label="Stable Diffusion checkpoint",
            elem_id="sd_model_checkpoint",
            scale=4,
            allow_custom_value=True,
        )
        refresh = gr.Button(
            ICON_REFRESH,
            elem_id="refresh_checkpoints",
            elem_classes=["ldm-tool"],
            size="sm",
            min_width=40,
            scale=0,
        )
        vae = gr.Dropdown(vae_titles(eng), value="Automatic", label="SD VAE", elem_id="sd_vae", scale=3)
        status = gr.HTML("", elem_id="sd_model_status")
    return TopBar(checkpoint, refresh, vae, status)


def wire_top_bar(ctx: UiContext, top: TopBar, gen_tabs: list[GenerationTab]) -> None:
    dims = [c for t in gen_tabs for c in (t.fields["width"], t.fields["height"])]
    rescales = [t.fields["rescale_cfg"] for t in gen_tabs if "rescale_cfg" in t.fields]
    # each image tab's (sampler, schedule type) dropdowns (the Video tab keeps the settings', see default_sampling)
    image_tabs = [t for t in gen_tabs if "sampler_name" in t.fields and t.mode != "video"]
    samplings = [t.fields[k] for t in image_tabs for k in ("sampler_name", "scheduler")]

    def switch(name: str | None, *values):
        if not name:
            return
        sizes, phis = values[: len(dims)], values[len(dims) : len(dims) + len(rescales)]
        picks = values[len(dims) + len(rescales) :]
        old, old_step = native_size(ctx.engine), size_step(ctx.engine)
        old_phi = recommended_rescale_cfg(ctx.engine)
        old_sampling = default_sampling(ctx.engine, ctx.settings)
        yield [f"<span class='ldm-saved'>Loading {html.escape(name)}…</span>", gr.skip()] + [gr.skip()] * len(values)
        try:
            title = ctx.service.switch_model(name)
        except Exception as exc:  # report, keep serving with the old model
            raise gr.Error(f"Could not load {name}: {readable_error(exc)}", print_exception=False) from None
        try:
            ctx.settings.update({"sd_model_checkpoint": title})
        except (OSError, ValueError):
            pass
        new, step = native_size(ctx.engine), size_step(ctx.engine)
        out: list[Any] = [
            f"<span class='ldm-saved'>Loaded {html.escape(title)} (native size {new}px)</span>",
            gr.Dropdown(choices=checkpoint_titles(ctx.engine), value=title),
        ]
        for i in range(0, len(sizes), 2):
            dims_now = size_after_switch(int(sizes[i]), int(sizes[i + 1]), old, new)
            # the sliders step by the new model's VAE factor (sent only when it changed)
            out += [v if step == old_step else gr.update(value=v, step=step) for v in dims_now]
        # a Rescale CFG slider still at the old model's recommendation follows the new one's
        new_phi = recommended_rescale_cfg(ctx.engine)
        out += [new_phi if abs(float(phi) - old_phi) < 1e-6 else phi for phi in phis]
        # so do a sampler and a schedule type still at the old model's defaults (its recommendation or the
        # settings'): the built-in model recommends DPM++ 2M with the Exponential schedule
        new_sampling = default_sampling(ctx.engine, ctx.settings)
        out += [new_sampling[i % 2] if pick == old_sampling[i % 2] else pick for i, pick in enumerate(picks)]
        yield out

    top.checkpoint.input(
        switch,
        [top.checkpoint, *dims, *rescales, *samplings],
        [top.status, top.checkpoint, *dims, *rescales, *samplings],
        concurrency_limit=None,
        show_progress="minimal",
    )

    def refresh(current: str | None, current_vae: str | None):
        ctx.engine.refresh_models()
        names, vaes = checkpoint_titles(ctx.engine), vae_titles(ctx.engine)
        cur = current if current in names else current_checkpoint_title(ctx.engine)
        return (
            gr.Dropdown(choices=names, value=cur),
            gr.Dropdown(choices=vaes, value=current_vae if current_vae in vaes else "Automatic"),
        )

    top.refresh.click(refresh, [top.checkpoint, top.vae], [top.checkpoint, top.vae], queue=False)

    # the VAE menu is the sd_vae option of the one options store (also GET/POST /sdapi/v1/options)
    def save_vae(name: str | None) -> None:
        try:
            ctx.settings.update({"sd_vae": name or "Automatic"})
        except (OSError, ValueError) as exc:
            raise gr.Error(f"Could not save the VAE choice: {exc}", print_exception=False) from None

    top.vae.input(save_vae, [top.vae], None, queue=False)


def saved_vae(ctx: UiContext) -> Any:
    """The VAE menu on a page load: the saved sd_vae when this server has it, else Automatic."""
    vaes = vae_titles(ctx.engine)
    value = ctx.settings.get("sd_vae")
    return gr.Dropdown(choices=vaes, value=value if value in vaes else "Automatic")


def wire_send_to(
    ctx: UiContext, tabs: gr.Tabs, gen: dict[str, GenerationTab], extras: dict[str, Any], png: dict[str, Any]
) -> None:
    """ "Send to" buttons of every result panel and of PNG Info."""

    def fill(target: GenerationTab, text: str | None, image=None) -> dict:
        out = infotext_updates(ctx, target, text) if text else {}
        if image is not None and target.image is not None:
            out[target.image] = (
                {"background": image, "layers": [], "composite": image} if target.mode == "inpaint" else image
            )
        out[tabs] = gr.Tabs(selected=target.mode)
        return out

    for source in gen.values():
        res = source.results
        assert res is not None
        for button, name in ((res.send_img2img, "img2img"), (res.send_inpaint, "inpaint"), (res.send_video, "video")):
            target = gen[name]

            def send(record, selected, items, _target=target):
                item = pick({"items": items}, "items", selected)
                image = open_gallery_image(item)
                if image is None:
                    raise gr.Error("No image to send: generate first", print_exception=False)
                return fill(_target, pick(record, "infotexts", selected), image)

            outputs = [*value_components(target), target.image, tabs]
            button.click(send, [res.record, res.selected, res.gallery], outputs, queue=False)

        def send_extras(selected, items):
            item = pick({"items": items}, "items", selected)
            path = item[0] if isinstance(item, list | tuple) else item
            if path is None:
                raise gr.Error("No image to send: generate first", print_exception=False)
            return path, gr.Tabs(selected="extras")

        res.send_extras.click(send_extras, [res.selected, res.gallery], [extras["image"], tabs], queue=False)

    for name in ("txt2img", "img2img", "inpaint"):
        target = gen[name]

        def from_png(path, text, _target=target):
            if not path:
                raise gr.Error("Drop an image into PNG Info first", print_exception=False)
            image = open_gallery_image(path) if _target.image is not None else None
            return fill(_target, text or "", image)

        outputs = [*value_components(target), tabs] + ([target.image] if target.image is not None else [])
        png[f"send_{name}"].click(from_png, [png["image"], png["text"]], outputs, queue=False)


def exposure_banner(ctx: UiContext) -> gr.HTML | None:
    """The launch's exposure messages (who can reach this server, what is refused or locked, which flag to
    set; webui.py passes them as `flags["exposure_messages"]`) as a banner above the tabs; None when local."""
    lines = [str(m) for m in ctx.flags.get("exposure_messages") or ()]
    if not lines:
        return None
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    return gr.HTML(f"<div class='ldm-exposure'><ul>{items}</ul></div>", elem_id="exposure_banner")


def create_ui(ctx: UiContext) -> WebApp:
    """Build the Blocks for `ctx` (does not launch)."""
    with gr.Blocks(title=TITLE, fill_width=True, analytics_enabled=False, delete_cache=(3600, 6 * 3600)) as blocks:
        exposure_banner(ctx)
        top = build_top_bar(ctx)
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img"):
                t2i = txt2img.build(ctx, top)
            with gr.Tab("img2img", id="img2img", elem_id="tab_img2img"):
                i2i = img2img.build(ctx, top)
            with gr.Tab("Inpaint", id="inpaint", elem_id="tab_inpaint"):
                inp = inpaint.build(ctx, top)
            with gr.Tab("Video", id="video", elem_id="tab_video"):
                vid = video.build(ctx, top)
            with gr.Tab("Upscale", id="extras", elem_id="tab_extras"):  # A1111's Extras: same ids and routes
                ext = upscale.build(ctx)
            with gr.Tab("PNG Info", id="pnginfo", elem_id="tab_pnginfo"):
                png = pnginfo.build(ctx)
            with gr.Tab("Settings", id="settings", elem_id="tab_settings"):
                sett = settings.build(ctx)
            with gr.Tab("Extensions", id="extensions", elem_id="tab_extensions"):
                exts = extensions.build(ctx)
        gen = {"txt2img": t2i, "img2img": i2i, "inpaint": inp, "video": vid}
        wire_top_bar(ctx, top, list(gen.values()))
        wire_send_to(ctx, tabs, gen, ext, png)
        defaults = {c: fn for t in gen.values() for c, fn in t.defaults.items()}
        defaults[top.checkpoint] = lambda: gr.Dropdown(
            choices=checkpoint_titles(ctx.engine), value=current_checkpoint_title(ctx.engine)
        )
        defaults[top.vae] = lambda: saved_vae(ctx)
        blocks.load(lambda: {c: fn() for c, fn in defaults.items()}, None, list(defaults), queue=False)
    blocks.queue(default_concurrency_limit=None, max_size=256)
    return WebApp(
        blocks,
        CSS,
        JS,
        {
            **gen,
            "extras": ext,
            "pnginfo": png,
            "settings": sett,
            "extensions": exts,
            "top": top,
            "tabs": tabs,
        },
    )
