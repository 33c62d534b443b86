"""The Settings tab: output folder and file-name pattern, generation defaults, preview interval, model
folders, attention and memory options. Saved to `config.json`; what a running engine can change (outputs,
previews, VAE tiling) applies at once through a new EngineConfig, UI defaults at the next page load, the
rest at the next start."""

from __future__ import annotations

from typing import Any

import gradio as gr

from .common import UiContext
from .settings_store import SETTINGS, SETTINGS_BY_KEY, Setting, config_from_settings, live_config

APPLIES_TEXT = {
    "live": "now",
    "reload": "at the next page load",
    "model": "at the next model load",
    "restart": "after a restart",
}


def apply_settings(ctx: UiContext, changes: dict[str, Any]) -> str:
    """Save `changes` (setting key -> value) and apply what can be applied now; returns a message saying
    what changed and when it takes effect. ValueError on a bad value (nothing saved)."""
    changed = ctx.settings.update(changes)
    if not changed:
        return "No changes."
    engine = ctx.engine
    wanted = config_from_settings(
        engine.config, ctx.settings.all(), locked=frozenset(ctx.flags.get("locked_fields", ()))
    )
    engine.config = live_config(engine.config, wanted)
    by_when: dict[str, list[str]] = {}
    for key in changed:
        by_when.setdefault(SETTINGS_BY_KEY[key].applies, []).append(key)
    parts = [f"{', '.join(keys)}: applies {APPLIES_TEXT[when]}" for when, keys in by_when.items()]
    return "Saved. " + "; ".join(parts) + "."


def _component(s: Setting, value: Any, choices: list[str] | None) -> Any:
    eid = f"setting_{s.key}"
    if isinstance(s.default, bool):
        return gr.Checkbox(value, label=s.label, elem_id=eid)
    if choices:
        return gr.Dropdown(
            choices,
            value=value if value in choices else choices[0],
            label=s.label,
            elem_id=eid,
            allow_custom_value=True,
        )
    if isinstance(s.default, int | float) and s.minimum is not None and s.maximum is not None:
        return gr.Slider(s.minimum, s.maximum, value=value, step=s.step or 1, label=s.label, elem_id=eid)
    if isinstance(s.default, int | float):
        return gr.Number(value, label=s.label, elem_id=eid)
    return gr.Textbox(value, label=s.label, elem_id=eid)


def _choices(ctx: UiContext, s: Setting) -> list[str] | None:
    eng = ctx.engine
    if s.key == "default_sampler":
        from .common import sampler_names

        return sampler_names(eng)
    if s.key == "default_scheduler":
        from .common import schedule_types

        return schedule_types(eng)
    if s.key == "attention":
        reg = getattr(eng, "attention", None)
        names = list(reg.names()) if reg is not None and hasattr(reg, "names") else []
        return ["auto", *[n for n in names if n != "auto"]] if names else list(s.choices or ())
    if s.key == "sd_model_checkpoint":
        from .common import checkpoint_titles

        return ["", *checkpoint_titles(eng)]
    return list(s.choices) if s.choices else None


def build(ctx: UiContext) -> dict[str, Any]:
    """The Settings tab (call inside a gr.Tab); returns the components by setting key."""
    values = ctx.settings.all()
    comps: dict[str, Any] = {}
    with gr.Row():
        save = gr.Button(
            "Apply settings", variant="primary", elem_id="settings_apply", scale=0, min_width=200, size="md"
        )
        reload = gr.Button("Reload config.json", elem_id="settings_reload", scale=0, min_width=200, size="md")
    status = gr.HTML(
        f"<div class='ldm-saved'>Settings file: <code>{ctx.settings.path}</code></div>",
        elem_id="settings_status",
    )
    sections: dict[str, list[Setting]] = {}
    for s in SETTINGS:
        sections.setdefault(s.section, []).append(s)
    for section, items in sections.items():
        with gr.Accordion(section, open=True, elem_id=f"settings_section_{section.lower().replace(' ', '_')}"):
            for s in items:
                comps[s.key] = _component(s, values[s.key], _choices(ctx, s))
    keys = list(comps)

    def on_save(*vals):
        try:
            msg = apply_settings(ctx, dict(zip(keys, vals, strict=True)))
        except ValueError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        gr.Info(msg)
        return f"<div class='ldm-saved'>{msg}</div>"

    def on_reload():
        ctx.settings.load()
        current = ctx.settings.all()
        return [current[k] for k in keys]

    save.click(on_save, [comps[k] for k in keys], [status], queue=False)
    reload.click(on_reload, None, [comps[k] for k in keys], queue=False)
    return comps
