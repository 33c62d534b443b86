"""The Settings tab: every option of the one options store (`ldm_core.options`, also served by
`/sdapi/v1/options`) by section: saving, previews, UI defaults, sampler parameters, model folders, attention
and memory. Saved to `config.json`; what a running engine can change applies at once (the next job), UI
defaults at the next page load, the rest at the next start. The values shown are read again on every page
load, so a change made through the API shows up after a reload. Settings the store locks (folders while the
server is exposed, `ldm_core.exposure`) are shown read-only with the reason; the store refuses them anyway."""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from ldm_core.options import apply_to_engine

from .common import UiContext
from .settings_store import APPLIES_TEXT, SETTINGS, SETTINGS_BY_KEY, Setting, effective_applies


def apply_settings(ctx: UiContext, changes: dict[str, Any]) -> str:
    """Save `changes` (setting key -> value) and apply what can be applied now; returns a message saying
    what changed and when it takes effect. ValueError on a bad value (nothing saved)."""
    changed = ctx.settings.update(changes)
    if not changed:
        return "No changes."
    apply_to_engine(ctx.engine, ctx.settings.all(), frozenset(ctx.flags.get("locked_fields", ())))
    by_when: dict[str, list[str]] = {}
    for key in changed:
        by_when.setdefault(effective_applies(SETTINGS_BY_KEY[key]), []).append(key)
    parts = [f"{', '.join(keys)}: applies {APPLIES_TEXT[when]}" for when, keys in by_when.items()]
    return "Saved. " + "; ".join(parts) + "."


def _label(s: Setting) -> str:
    when = effective_applies(s)
    return f"{s.label} (stored for A1111 clients; not used here)" if when == "stored" else s.label


def locked_settings(ctx: UiContext) -> dict[str, str]:
    """Settings the options store refuses to change (key -> why), e.g. folders while the server is exposed
    (`ldm_core.exposure`); the store enforces it for the API too, the tab shows them read-only."""
    return dict(getattr(ctx.settings, "locked", None) or {})


def _component(ctx: UiContext, s: Setting, choices: list[str] | None) -> Any:
    eid = f"setting_{s.key}"
    label = _label(s)
    why = locked_settings(ctx).get(s.key)
    extra: dict[str, Any] = {}
    if why:
        label, extra = f"{label} (locked)", {"interactive": False, "info": f"{s.key} {why}"}

    def current(key: str = s.key) -> Any:  # called on every page load: shows what the API may have changed
        value = ctx.settings.get(key)
        if choices and value not in choices:
            return choices[0]
        return "" if value is None else value

    if isinstance(s.default, bool):
        return gr.Checkbox(current, label=label, elem_id=eid, **extra)
    if choices:
        return gr.Dropdown(choices, value=current, label=label, elem_id=eid, allow_custom_value=True, **extra)
    if isinstance(s.default, int | float) and s.minimum is not None and s.maximum is not None:
        return gr.Slider(s.minimum, s.maximum, value=current, step=s.step or 1, label=label, elem_id=eid, **extra)
    if isinstance(s.default, int | float):
        return gr.Number(
            current, label=label, elem_id=eid, precision=0 if isinstance(s.default, int) else None, **extra
        )
    return gr.Textbox(current, label=label, elem_id=eid, **extra)


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
    if s.key == "sd_vae":
        from .common import vae_titles

        return vae_titles(eng)
    return list(s.choices) if s.choices else None


def build(ctx: UiContext) -> dict[str, Any]:
    """The Settings tab (call inside a gr.Tab); returns the components by setting key."""
    comps: dict[str, Any] = {}
    with gr.Row():
        save = gr.Button(
            "Apply settings", variant="primary", elem_id="settings_apply", scale=0, min_width=200, size="md"
        )
        reload = gr.Button("Reload config.json", elem_id="settings_reload", scale=0, min_width=200, size="md")
    status = gr.HTML(
        f"<div class='ldm-saved'>Settings file: <code>{ctx.settings.path}</code> (the same settings as "
        "<code>/sdapi/v1/options</code>)</div>",
        elem_id="settings_status",
    )
    locked = locked_settings(ctx)
    if locked:
        reasons = sorted(set(locked.values()))
        gr.HTML(
            "<div class='ldm-saved' id='settings_locked_note'>Locked: "
            + html.escape(", ".join(sorted(locked)))
            + " — "
            + html.escape("; ".join(reasons))
            + "</div>",
            elem_id="settings_locked",
        )
    sections: dict[str, list[Setting]] = {}
    for s in SETTINGS:
        sections.setdefault(s.section, []).append(s)
    for section, items in sections.items():
        eid = f"settings_section_{section.lower().replace(' ', '_')}"
        with gr.Accordion(section, open=True, elem_id=eid):
            for s in items:
                comps[s.key] = _component(ctx, s, _choices(ctx, s))
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
        return ["" if current[k] is None else current[k] for k in keys]

    save.click(on_save, [comps[k] for k in keys], [status], queue=False)
    reload.click(on_reload, None, [comps[k] for k in keys], queue=False)
    return comps
