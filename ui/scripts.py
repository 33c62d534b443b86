"""The "Script" menu of the txt2img and img2img tabs (A1111's scripts: X/Y/Z plot, Prompt matrix, Prompts
from file or textbox, SD upscale, Outpainting mk2), with each script's controls shown when it is chosen.

The controls are built from `ldm_core.scripts` (labels, defaults, ranges, choices), in A1111's
`script_args` order, so a Generate with a script sends the same arguments an A1111 API client would; the
generate handler (ui.widgets) then queues `Service.submit_script`. Grids go first in the gallery.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from ldm_core.grids import GridOptions
from ldm_core.infotext import parse_infotext
from ldm_core.scripts import ScriptArg, scripts_for

from .common import UiContext

log = logging.getLogger(__name__)
NONE = "None"
XYZ_TITLE = "X/Y/Z plot"
XYZ_RESTORED = (0, 1, 3, 4, 6, 7)  # x_type, x_values, y_type, y_values, z_type, z_values


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


@dataclass
class ScriptSection:
    """The Script menu and, per script title, its controls in `script_args` order (None for an info text,
    which carries no value)."""

    menu: gr.Dropdown
    controls: dict[str, list[Any]] = field(default_factory=dict)
    groups: dict[str, Any] = field(default_factory=dict)

    def inputs(self) -> list[Any]:
        """Every component whose value a Generate needs."""
        return [self.menu, *[c for cs in self.controls.values() for c in cs if c is not None]]

    def restorable(self) -> list[Any]:
        """The components `restore_updates` may set (outputs of a "fill the form from infotext" handler)."""
        xyz = self.controls.get(XYZ_TITLE) or []
        return [self.menu, *[xyz[i] for i in XYZ_RESTORED if i < len(xyz) and xyz[i] is not None]]

    def restore_updates(self, text: str) -> dict[Any, Any]:
        """{component: value} from an infotext that names a script (A1111 writes "Script: X/Y/Z plot" with
        "X Type", "X Values", ... into the grid's infotext): that script chosen and its axes filled."""
        try:
            params = parse_infotext(text or "")
        except Exception:  # an unreadable infotext restores nothing here
            return {}
        title = str(params.get("Script") or "")
        if title not in self.controls:
            return {}
        out: dict[Any, Any] = {self.menu: title}
        if title == XYZ_TITLE:
            xyz = self.controls[title]
            for k, axis in enumerate("XYZ"):
                kind = params.get(f"{axis} Type")
                out[xyz[3 * k]] = str(kind) if kind else "Nothing"
                out[xyz[3 * k + 1]] = str(params.get(f"{axis} Values") or "") if kind else ""
        return out

    def choice(self, data: dict) -> tuple[str, list[Any]] | None:
        """(script title, script_args) from a handler's input dict, or None when no script is chosen."""
        title = data.get(self.menu)
        if not title or title == NONE or title not in self.controls:
            return None
        return title, [None if c is None else data.get(c) for c in self.controls[title]]


def _control(arg: ScriptArg, elem_id: str) -> Any:
    label = arg.label or ""
    if arg.kind == "html":
        gr.HTML(f"<p class='ldm-script-info'>{arg.value}</p>", elem_id=elem_id)
        return None
    if arg.kind == "checkbox":
        return gr.Checkbox(bool(arg.value), label=label, elem_id=elem_id)
    if arg.kind == "slider":
        return gr.Slider(arg.minimum, arg.maximum, value=arg.value, step=arg.step, label=label, elem_id=elem_id)
    if arg.kind in ("radio",):
        return gr.Radio(arg.choices or [], value=arg.value, label=label, elem_id=elem_id)
    if arg.kind == "checkboxgroup":
        return gr.CheckboxGroup(arg.choices or [], value=arg.value, label=label, elem_id=elem_id)
    if arg.kind in ("dropdown", "multiselect"):
        return gr.Dropdown(
            arg.choices or [],
            value=arg.value,
            label=label,
            multiselect=arg.kind == "multiselect",
            visible=arg.visible,
            allow_custom_value=True,
            elem_id=elem_id,
        )
    lines = 4 if arg.kind == "textarea" else 1
    return gr.Textbox(str(arg.value or ""), label=label, lines=lines, elem_id=elem_id)


def build_section(ctx: UiContext, mode: str) -> ScriptSection:
    """The Script menu for `mode` ("txt2img" or "img2img") and every script's (hidden) controls. Control
    elem_ids: `{mode}_script_{script slug}_{argument index}`."""
    scripts = scripts_for(mode)
    menu = gr.Dropdown(
        [NONE, *[s.title for s in scripts]], value=NONE, label="Script", elem_id=f"{mode}_script", interactive=True
    )
    section = ScriptSection(menu)
    for script in scripts:
        try:
            arguments = script.arguments(ctx.engine, mode)
        except Exception as exc:  # a script whose choices cannot be read must not break the tab
            log.warning("script %s left out of the UI: %s", script.title, exc)
            continue
        with gr.Group(visible=False, elem_id=f"{mode}_script_{slug(script.title)}") as group:
            section.controls[script.title] = [
                _control(arg, f"{mode}_script_{slug(script.title)}_{i}") for i, arg in enumerate(arguments)
            ]
        section.groups[script.title] = group

    titles = list(section.groups)

    def show(choice: str):
        return [gr.Group(visible=t == choice) for t in titles]

    menu.change(show, [menu], [section.groups[t] for t in titles], queue=False)
    return section


def grid_options(ctx: UiContext) -> GridOptions:
    """The grid settings (A1111's return_grid and grid_save, both on unless set otherwise)."""

    def setting(key: str) -> bool:
        try:
            value = ctx.settings.get(key)
        except (KeyError, LookupError):
            value = None
        return True if value is None else bool(value)

    return GridOptions(return_grid=setting("return_grid"), save=setting("grid_save") and ctx.engine.config.save_images)
