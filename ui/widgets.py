"""Gradio widgets shared by the txt2img, img2img and inpaint tabs: the prompt row (prompts, token counters,
styles, Generate / Interrupt / Skip), the sampling controls, the results panel, and the handlers that wire
them to the service. The tab modules only add their own inputs (init image, mask options, hires fix).

Every component that carries a request value is registered in `GenerationTab.fields` under the request
field name; handlers receive the values as a dict and go through `ui.common.build_request`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from ldm_core.generation_requests import MAX_SIDE, MIN_SIDE, RequestError
from ldm_core.options import request_fields, request_values

from . import extension_sections
from .common import (
    UiContext,
    build_request,
    checkpoint_titles,
    default_dims,
    default_sampling,
    error_html,
    fields_from_text,
    finished_html,
    follow_job,
    gallery_items,
    idle_html,
    outputs_note,
    pick,
    readable_error,
    recommended_rescale_cfg,
    result_record,
    sampler_names,
    schedule_types,
    size_step,
    token_count,
    token_counter_html,
)

log = logging.getLogger(__name__)


@dataclass
class TopBar:
    """The checkpoint and VAE menus above the tabs; their values go into every request."""

    checkpoint: gr.Dropdown
    refresh: gr.Button
    vae: gr.Dropdown
    status: gr.HTML


@dataclass
class ResultsPanel:
    """Right-hand column of a generation tab."""

    progress: gr.HTML
    preview: gr.Image
    gallery: gr.Gallery
    infotext: gr.Textbox
    saved: gr.HTML
    record: gr.State  # result_record() of the last result
    selected: gr.State  # index of the selected gallery image
    job_id: gr.State  # id of this page's unfinished job (for Interrupt / Skip)
    open_folder: gr.Button
    send_img2img: gr.Button
    send_inpaint: gr.Button
    send_extras: gr.Button
    send_video: gr.Button


@dataclass
class GenerationTab:
    """The components of one generation tab; `fields` maps request field names to components."""

    mode: str
    fields: dict[str, Any] = field(default_factory=dict)
    generate: gr.Button | None = None
    interrupt: gr.Button | None = None
    skip: gr.Button | None = None
    results: ResultsPanel | None = None
    image: Any = None  # the init image (img2img) or the editor (inpaint)
    defaults: dict[Any, Callable[[], Any]] = field(default_factory=dict)  # set on each page load
    extensions: list[Any] = field(default_factory=list)  # extension_sections.BoundSection accordions
    scripts: Any = None  # ui.scripts.ScriptSection: the Script menu (A1111's scripts), when the tab has one
    # a tab's own result components (the Video tab's player) and their values for a finished job's result
    extra_outputs: list[Any] = field(default_factory=list)
    result_updates: Callable[[Any], dict[Any, Any]] | None = None


#: Hover titles of the icon buttons, by label (set on the page by app.py's script).
#: Symbols are ones common fonts have (DejaVu, Segoe UI Symbol), not emoji.
ICON_APPLY, ICON_REFRESH, ICON_SWAP, ICON_RANDOM, ICON_REUSE, ICON_PASTE = "✎", "↻", "⇅", "⚄", "♻", "↙"
TOOLTIPS: dict[str, str] = {
    ICON_APPLY: "Apply the selected styles to the prompts",
    ICON_REFRESH: "Reload the list",
    ICON_SWAP: "Swap width and height",
    ICON_RANDOM: "Random (-1)",
    ICON_REUSE: "Reuse the seed of the selected image",
    ICON_PASTE: "Read generation parameters from the prompt box (or the selected image) into the fields",
}


def tool_button(label: str, elem_id: str) -> gr.Button:
    """A small square icon button."""
    return gr.Button(label, elem_id=elem_id, elem_classes=["ldm-tool"], size="sm", min_width=40, scale=0)


# ---- prompt row ---------------------------------------------------------------------------------------
def build_prompt_row(ctx: UiContext, tab: GenerationTab) -> None:
    """Prompt and negative prompt with token counters; styles; Generate / Interrupt / Skip."""
    m = tab.mode
    with gr.Row(elem_classes=["ldm-prompt-row"]):
        with gr.Column(scale=6):
            with gr.Group(elem_classes=["ldm-prompt-box"]):
                prompt = gr.Textbox(
                    label="Prompt",
                    lines=3,
                    max_lines=12,
                    elem_id=f"{m}_prompt",
                    placeholder="Prompt (A1111 syntax: (word:1.2), [from:to:when], BREAK, AND)",
                )
                counter = gr.HTML(
                    token_counter_html(0, 75),
                    elem_id=f"{m}_token_counter",
                    elem_classes=["ldm-token-counter"],
                )
            with gr.Group(elem_classes=["ldm-prompt-box"]):
                negative = gr.Textbox(label="Negative prompt", lines=2, max_lines=12, elem_id=f"{m}_neg_prompt")
                neg_counter = gr.HTML(
                    token_counter_html(0, 75),
                    elem_id=f"{m}_neg_token_counter",
                    elem_classes=["ldm-token-counter"],
                )
        with gr.Column(scale=2, min_width=220):
            generate = gr.Button("Generate", variant="primary", elem_id=f"{m}_generate", size="lg")
            with gr.Row(elem_classes=["ldm-run-row"]):
                interrupt = gr.Button("Interrupt", elem_id=f"{m}_interrupt", size="sm", min_width=60)
                skip = gr.Button("Skip", elem_id=f"{m}_skip", size="sm", min_width=60)
                paste = tool_button(ICON_PASTE, f"{m}_paste")
            styles = build_styles(ctx, m, prompt, negative)
    tab.fields.update(prompt=prompt, negative_prompt=negative, styles=styles[0], _apply_style=styles[1])
    tab.generate, tab.interrupt, tab.skip = generate, interrupt, skip
    tab.fields["_counter"] = counter
    tab.fields["_neg_counter"] = neg_counter
    tab.fields["_paste"] = paste


def build_styles(ctx: UiContext, m: str, prompt: gr.Textbox, negative: gr.Textbox) -> tuple[gr.Dropdown, gr.Button]:
    """Styles menu (from styles.csv) with apply, refresh and "save the prompts as a style"; returns the
    menu and its apply button."""
    store = ctx.styles
    names = store.names() if store is not None else []
    with gr.Row(equal_height=True):
        styles = gr.Dropdown(
            names,
            value=[],
            multiselect=True,
            label="Styles",
            elem_id=f"{m}_styles",
            scale=4,
            min_width=120,
            interactive=store is not None,
        )
        apply_btn = tool_button(ICON_APPLY, f"{m}_style_apply")
        refresh_btn = tool_button(ICON_REFRESH, f"{m}_style_refresh")
    with gr.Accordion("Save prompts as a style", open=False, elem_id=f"{m}_style_save_box"):
        with gr.Row(equal_height=True):
            style_name = gr.Textbox(label="Style name", elem_id=f"{m}_style_name", scale=4)
            save_btn = gr.Button("Save", elem_id=f"{m}_style_save", size="sm", scale=1, min_width=60)
    if store is None:
        return styles, apply_btn

    def apply(p: str, n: str, chosen: list[str]):
        try:
            p2, n2 = store.apply_styles(p or "", n or "", chosen or [])
        except RequestError as exc:
            raise gr.Error(readable_error(exc), print_exception=False) from None
        return p2, n2, []

    def refresh(chosen: list[str]):
        store.reload()
        names = store.names()
        return gr.Dropdown(choices=names, value=[c for c in chosen or [] if c in names])

    def save(name: str, p: str, n: str, chosen: list[str]):
        from ldm_core.prompts.styles import PromptStyle

        try:
            store.save_style(PromptStyle((name or "").strip(), p or "", n or ""))
        except RequestError as exc:
            raise gr.Error(readable_error(exc), print_exception=False) from None
        gr.Info(f"Saved style {name.strip()!r}")
        return gr.Dropdown(choices=store.names(), value=chosen or []), ""

    apply_btn.click(apply, [prompt, negative, styles], [prompt, negative, styles], queue=False)
    refresh_btn.click(refresh, [styles], [styles], queue=False)
    save_btn.click(save, [style_name, prompt, negative, styles], [styles, style_name], queue=False)
    return styles, apply_btn


# ---- sampling controls --------------------------------------------------------------------------------
def build_sampling_controls(ctx: UiContext, tab: GenerationTab) -> dict[str, Any]:
    """Sampler, schedule, steps, size, batch, CFG, seed and the "Extra" seed options; returns the helper
    buttons (swap, random seed, reuse seed) by name."""
    m, eng, st = tab.mode, ctx.engine, ctx.settings
    samplers, schedules = sampler_names(eng), schedule_types(eng)

    def default_sampler():
        return default_sampling(eng, st, m)[0]

    def default_schedule():
        return default_sampling(eng, st, m)[1]

    with gr.Row():
        sampler = gr.Dropdown(
            samplers,
            value=default_sampler(),
            label="Sampling method",
            elem_id=f"{m}_sampler",
            allow_custom_value=True,
        )
        scheduler = gr.Dropdown(
            schedules,
            value=default_schedule(),
            label="Schedule type",
            elem_id=f"{m}_scheduler",
            allow_custom_value=True,
        )
    steps = gr.Slider(1, 150, value=st.get("default_steps"), step=1, label="Sampling steps", elem_id=f"{m}_steps")
    with gr.Row(equal_height=True):
        with gr.Column(scale=4):
            step = size_step(eng)  # the model's VAE factor: sizes are multiples of it
            width = gr.Slider(
                MIN_SIDE,
                MAX_SIDE,
                value=default_dims(eng, st)[0],
                step=step,
                label="Width",
                elem_id=f"{m}_width",
            )
            height = gr.Slider(
                MIN_SIDE,
                MAX_SIDE,
                value=default_dims(eng, st)[1],
                step=step,
                label="Height",
                elem_id=f"{m}_height",
            )
        swap = tool_button(ICON_SWAP, f"{m}_swap_dims")
        with gr.Column(scale=2, min_width=160):
            n_iter = gr.Slider(1, 100, value=1, step=1, label="Batch count", elem_id=f"{m}_batch_count")
            batch_size = gr.Slider(1, 16, value=1, step=1, label="Batch size", elem_id=f"{m}_batch_size")
    cfg = gr.Slider(
        1.0,
        30.0,
        value=st.get("default_cfg_scale"),
        step=0.5,
        label="CFG Scale",
        elem_id=f"{m}_cfg_scale",
    )
    rescale = gr.Slider(
        0.0,
        1.0,
        value=recommended_rescale_cfg(eng),
        step=0.05,
        label="Rescale CFG (0: off; starts at the model's recommendation)",
        info="Scales the guided prediction back to the spread of the prompt's own: high CFG then stops "
        "blowing colours out (v-prediction models, the built-in one)",
        elem_id=f"{m}_rescale_cfg",
    )
    with gr.Row(equal_height=True):
        seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id=f"{m}_seed", scale=4)
        random_seed = tool_button(ICON_RANDOM, f"{m}_random_seed")
        reuse_seed = tool_button(ICON_REUSE, f"{m}_reuse_seed")
    with gr.Accordion("Extra (variation seed)", open=False, elem_id=f"{m}_seed_extras"):
        with gr.Row(equal_height=True):
            subseed = gr.Number(value=-1, precision=0, label="Variation seed", elem_id=f"{m}_subseed", scale=4)
            random_subseed = tool_button(ICON_RANDOM, f"{m}_random_subseed")
            subseed_strength = gr.Slider(
                0.0,
                1.0,
                value=0.0,
                step=0.01,
                label="Variation strength",
                elem_id=f"{m}_subseed_strength",
                scale=4,
            )
        with gr.Row():
            resize_w = gr.Slider(
                0,
                MAX_SIDE,
                value=0,
                step=step,
                label="Resize seed from width (0: off)",
                elem_id=f"{m}_seed_resize_from_w",
            )
            resize_h = gr.Slider(
                0,
                MAX_SIDE,
                value=0,
                step=step,
                label="Resize seed from height (0: off)",
                elem_id=f"{m}_seed_resize_from_h",
            )
    tab.fields.update(
        sampler_name=sampler,
        scheduler=scheduler,
        steps=steps,
        width=width,
        height=height,
        n_iter=n_iter,
        batch_size=batch_size,
        cfg_scale=cfg,
        rescale_cfg=rescale,
        seed=seed,
        subseed=subseed,
        subseed_strength=subseed_strength,
        seed_resize_from_w=resize_w,
        seed_resize_from_h=resize_h,
    )
    # a new page starts from the current settings and model (set by one load event in app.py)
    tab.defaults.update(
        {
            sampler: default_sampler,
            scheduler: default_schedule,
            steps: lambda: st.get("default_steps"),
            # a new page: the model's native size, stepping by its VAE factor
            width: lambda: gr.update(value=default_dims(ctx.engine, st)[0], step=size_step(ctx.engine)),
            height: lambda: gr.update(value=default_dims(ctx.engine, st)[1], step=size_step(ctx.engine)),
            cfg: lambda: st.get("default_cfg_scale"),
            rescale: lambda: recommended_rescale_cfg(ctx.engine),
        }
    )
    swap.click(lambda w, h: (h, w), [width, height], [width, height], queue=False)
    random_seed.click(lambda: -1, None, [seed], queue=False)
    random_subseed.click(lambda: -1, None, [subseed], queue=False)
    return {"reuse_seed": reuse_seed}


# ---- refiner (A1111's Refiner accordion) ----------------------------------------------------------------
REFINER_NONE = "None"


def build_refiner_section(ctx: UiContext, tab: GenerationTab) -> None:
    """The Refiner accordion: a checkpoint that takes over the run and the share of the run before it does
    (request fields `refiner_checkpoint`, `refiner_switch_at`; "None" = no refiner)."""
    m = tab.mode

    def choices() -> list[str]:
        return [REFINER_NONE, *checkpoint_titles(ctx.engine)]

    with gr.Accordion("Refiner", open=False, elem_id=f"{m}_refiner"):
        with gr.Row():
            checkpoint = gr.Dropdown(
                choices(),
                value=REFINER_NONE,
                label="Checkpoint",
                allow_custom_value=True,
                elem_id=f"{m}_refiner_checkpoint",
            )
            switch_at = gr.Slider(0.01, 1.0, value=0.8, step=0.01, label="Switch at", elem_id=f"{m}_refiner_switch_at")
    tab.fields.update(refiner_checkpoint=checkpoint, refiner_switch_at=switch_at)
    tab.defaults[checkpoint] = lambda: gr.Dropdown(choices=choices(), value=REFINER_NONE)


# ---- results ------------------------------------------------------------------------------------------
def build_results(ctx: UiContext, m: str) -> ResultsPanel:
    progress = gr.HTML(idle_html(), elem_id=f"{m}_progress", elem_classes=["ldm-progress-box"])
    preview = gr.Image(
        label="Live preview",
        visible=False,
        interactive=False,
        elem_id=f"{m}_preview",
        height=320,
        format="png",
    )
    gallery = gr.Gallery(
        label="Output",
        elem_id=f"{m}_gallery",
        columns=3,
        height=420,
        object_fit="contain",
        preview=True,
        interactive=False,
        format="png",
    )
    with gr.Row(elem_classes=["ldm-send-row"]):
        open_folder = gr.Button("Output folder", elem_id=f"{m}_open_folder", size="sm")
        send_img2img = gr.Button("→ img2img", elem_id=f"{m}_send_img2img", size="sm")
        send_inpaint = gr.Button("→ inpaint", elem_id=f"{m}_send_inpaint", size="sm")
        send_extras = gr.Button("→ upscale", elem_id=f"{m}_send_extras", size="sm")
        send_video = gr.Button("→ video", elem_id=f"{m}_send_video", size="sm")
    infotext = gr.Textbox(
        label="Generation parameters",
        lines=3,
        max_lines=12,
        interactive=False,
        elem_id=f"{m}_infotext",
        buttons=["copy"],
    )
    saved = gr.HTML("", elem_id=f"{m}_saved")
    panel = ResultsPanel(
        progress,
        preview,
        gallery,
        infotext,
        saved,
        gr.State(None),
        gr.State(0),
        gr.State(None),
        open_folder,
        send_img2img,
        send_inpaint,
        send_extras,
        send_video,
    )

    def on_select(record, evt: gr.SelectData):
        return pick(record, "infotexts", evt.index) or "", evt.index

    gallery.select(on_select, [panel.record], [infotext, panel.selected], queue=False)
    open_folder.click(
        lambda rec: outputs_note(rec, ctx.engine.config.outputs_dir), [panel.record], [saved], queue=False
    )
    return panel


# ---- generation handlers ------------------------------------------------------------------------------
def field_updates(tab: GenerationTab, values: dict[str, Any]) -> dict[Any, Any]:
    """{component: value} for the form values this tab has (others are ignored)."""
    return {tab.fields[k]: v for k, v in values.items() if k in tab.fields and not k.startswith("_")}


def value_components(tab: GenerationTab) -> list[Any]:
    """The components that carry request values, extension fields infotext can set included (the outputs
    of a "fill the form" handler)."""
    return (
        [c for n, c in tab.fields.items() if not n.startswith("_")]
        + extension_sections.restorable_components(tab.extensions)
        + (tab.scripts.restorable() if tab.scripts is not None else [])
    )


def infotext_updates(ctx: UiContext, tab: GenerationTab, text: str) -> dict[Any, Any]:
    """{component: value} for raw infotext: the form's fields and the extension sections' units."""
    manager = getattr(ctx.service, "extensions", None)
    return {
        **field_updates(tab, fields_from_text(text, ctx.engine)),
        **extension_sections.restore_updates(manager, tab.extensions, text),
        **(tab.scripts.restore_updates(text) if tab.scripts is not None else {}),
    }


def form_values(fields: dict[str, Any], data: dict) -> dict[str, Any]:
    """Request values from a handler's input dict (component -> value); "_"-prefixed entries are widgets
    that carry no request value."""
    return {name: data[comp] for name, comp in fields.items() if not name.startswith("_") and comp in data}


def wire_generation(ctx: UiContext, tab: GenerationTab, top: TopBar) -> None:
    """Generate (queued job, live progress and preview), Interrupt, Skip, token counters, reuse seed."""
    res = tab.results
    assert res is not None and tab.generate is not None
    inputs = {c for n, c in tab.fields.items() if not n.startswith("_")} | {top.checkpoint, top.vae}
    inputs |= set(extension_sections.input_components(tab.extensions))
    if tab.scripts is not None:
        inputs |= set(tab.scripts.inputs())
    outputs = [
        res.progress,
        res.preview,
        res.gallery,
        res.infotext,
        res.record,
        res.selected,
        res.job_id,
        res.saved,
        *tab.extra_outputs,
    ]

    def generate(data: dict):
        values = form_values(tab.fields, data)
        values["model"] = data.get(top.checkpoint)
        values["vae"] = data.get(top.vae)
        # -- the options store (ldm_core.options): saved generation options (clip skip, eta, sigma params,
        #    NGMS, ...) fill the fields this form has no control for, as they do for API requests --
        explicit = {k for k, v in values.items() if v is not None}
        saved, _ = request_values(ctx.settings, {}, explicit, values.get("sampler_name"), request_fields(tab.mode))
        values.update({k: v for k, v in saved.items() if values.get(k) is None})
        try:
            manager = getattr(ctx.service, "extensions", None)
            if tab.extensions:
                active = extension_sections.active_section_names(manager)
                scripts = extension_sections.alwayson_scripts(tab.extensions, data, active)
                if scripts:
                    values["alwayson_scripts"] = scripts
            request = build_request(tab.mode, values)
            if manager is not None and request.alwayson_scripts:
                manager.validate_request(request)  # a bad extension value fails here, before queueing
            job = _submit(ctx, tab, request, data)
        except (RequestError, RuntimeError, ValueError) as exc:
            yield {res.progress: error_html(readable_error(exc))}
            raise gr.Error(readable_error(exc), print_exception=False) from None
        t0 = time.monotonic()
        shown = False
        for upd in follow_job(ctx.service.queue, job):
            out: dict = {res.progress: upd.html, res.job_id: job.id}
            if upd.preview is not None:
                out[res.preview] = upd.preview if shown else gr.Image(value=upd.preview, visible=True)
                shown = True
            yield out
        if job.error is not None:
            log.info("job %s failed: %s", job.id, job.error)
            yield {
                res.progress: error_html(readable_error(job.error)),
                res.preview: gr.Image(value=None, visible=False),
                res.job_id: None,
            }
            raise gr.Error(readable_error(job.error), print_exception=False)
        result = job.result
        if result is None:  # cancelled while it waited
            yield {
                res.progress: finished_html(time.monotonic() - t0, 0, interrupted=True),
                res.preview: gr.Image(value=None, visible=False),
                res.job_id: None,
            }
            return
        record = result_record(result)
        yield {
            res.progress: finished_html(
                time.monotonic() - t0,
                len(result.images),
                result.interrupted,
                getattr(result, "skipped_batches", 0),
            ),
            res.preview: gr.Image(value=None, visible=False),
            res.gallery: gr.Gallery(value=gallery_items(result), selected_index=0 if result.images else None),
            res.infotext: pick(record, "infotexts", 0) or "",
            res.record: record,
            res.selected: 0,
            res.job_id: None,
            res.saved: outputs_note(record, ctx.engine.config.outputs_dir),
            **(tab.result_updates(result) if tab.result_updates is not None else {}),
        }

    tab.generate.click(
        generate,
        inputs=inputs,
        outputs=outputs,
        concurrency_limit=None,
        show_progress="hidden",
        api_name=f"{tab.mode}_generate",
    )

    def own_job(job_id: str | None):
        """This page's unfinished job; else (e.g. after a page reload) the running job of this tab's mode."""
        job = ctx.service.queue.get(job_id) if job_id else None
        if job is not None and not job.finished:
            return job
        current = ctx.service.queue.current
        return current if current is not None and current.kind == tab.mode else None

    def interrupt(job_id: str | None):
        job = own_job(job_id)
        if job is not None:
            log.info("%s: interrupt job %s (%s)", tab.mode, job.id, job.state)
            ctx.service.queue.cancel(job.id)

    def skip(job_id: str | None):
        job = own_job(job_id)
        if job is not None and job.state == "running":
            log.info("%s: skip the current batch of job %s", tab.mode, job.id)
            job.ctx.cancel.skip()

    def paste(text: str, record, selected):
        source = text if "Steps: " in (text or "") else pick(record, "infotexts", selected)
        if not source:
            raise gr.Error(
                "Nothing to paste: put generation parameters in the prompt box, or generate first",
                print_exception=False,
            )
        return infotext_updates(ctx, tab, source)

    tab.fields["_paste"].click(
        paste, [tab.fields["prompt"], res.record, res.selected], value_components(tab), queue=False
    )
    tab.interrupt.click(interrupt, [res.job_id], None, queue=False)
    tab.skip.click(skip, [res.job_id], None, queue=False)

    def count(text: str, steps: float):
        try:
            return token_counter_html(*token_count(ctx, text, int(steps or 1)))
        except Exception as exc:  # the counter must never break typing
            log.debug("token count failed: %s", exc)
            return gr.skip()

    steps = tab.fields["steps"]
    for box, counter in (
        (tab.fields["prompt"], tab.fields["_counter"]),
        (tab.fields["negative_prompt"], tab.fields["_neg_counter"]),
    ):
        box.change(count, [box, steps], [counter], queue=False, show_progress="hidden", trigger_mode="always_last")


def _submit(ctx: UiContext, tab: GenerationTab, request, data: dict):
    """Queue the request: through the chosen script (ui.scripts), else plainly; a batch of several images
    gets A1111's grid first."""
    from .scripts import grid_options

    choice = tab.scripts.choice(data) if tab.scripts is not None else None
    if choice is not None:
        return ctx.service.submit_script(request, *choice, grid=grid_options(ctx))
    if request.batch_size * request.n_iter > 1:
        grid = grid_options(ctx)
        if grid.return_grid or grid.save:
            return ctx.service.submit(request, grid=grid)
    return ctx.service.submit(request)


def wire_reuse_seed(tab: GenerationTab, button: gr.Button) -> None:
    res = tab.results
    assert res is not None

    def reuse(record, selected, current):
        seed = pick(record, "seeds", selected)
        return current if seed is None else int(seed)

    button.click(reuse, [res.record, res.selected, tab.fields["seed"]], [tab.fields["seed"]], queue=False)


def build_generation_tab(
    ctx: UiContext,
    top: TopBar,
    mode: str,
    inputs_section: Callable[[GenerationTab], None] | None = None,
    extra_section: Callable[[GenerationTab], None] | None = None,
    results_section: Callable[[GenerationTab], None] | None = None,
) -> GenerationTab:
    """A whole generation tab: prompt row, then the controls column (the tab's own inputs first, its extra
    options last) next to the results column."""
    tab = GenerationTab(mode)
    build_prompt_row(ctx, tab)
    with gr.Row():
        with gr.Column(scale=1, min_width=360, elem_classes=["ldm-controls"]):
            if inputs_section is not None:
                inputs_section(tab)
            buttons = build_sampling_controls(ctx, tab)
            if extra_section is not None:
                extra_section(tab)
            tab.extensions = extension_sections.build_sections(ctx, mode)
        with gr.Column(scale=1, min_width=360, elem_classes=["ldm-results"]):
            tab.results = build_results(ctx, mode)
            if results_section is not None:
                results_section(tab)
    wire_generation(ctx, tab, top)
    wire_reuse_seed(tab, buttons["reuse_seed"])
    return tab
