"""Extension UI sections in the generation tabs: each `UISection` of an active extension becomes an accordion
whose components are built from its `UIField`s (`units` > 1 repeats them in sub-tabs "Unit 0", "Unit 1", ...).

At Generate time the values go into the request as `alwayson_scripts[section.name] =
section.args_from_values(values)`, the same `{"args": [unit dicts]}` an API client sends, so the engine's
extension manager validates and applies them the same way. A section none of whose units is enabled is left
out (an absent entry and a disabled unit do the same), and so is one whose extension was disabled after the
page was built (the manager would refuse its arguments).

Pasting infotext (the paste button, PNG Info's and the result panels' "Send to") fills the sections back in
from the keys the extensions wrote (`ExtensionManager.args_from_infotext`): `restore_updates`.

The functions here are plain so the tests call them without a browser.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from ldm_core.extension_api import UIField, UISection
from ldm_core.infotext import parse_infotext

log = logging.getLogger(__name__)

#: Which extension sections each generation tab shows (inpaint builds on img2img's request).
TAB_SECTIONS: dict[str, tuple[str, ...]] = {
    "txt2img": ("txt2img",),
    "img2img": ("img2img",),
    "inpaint": ("inpaint", "img2img"),
}


@dataclass
class BoundSection:
    """A built section: its components, flat in `args_from_values` order (unit 0's fields, then unit 1's)."""

    section: UISection
    components: list[Any] = field(default_factory=list)
    refresh: Any = None  # the button that reloads dynamic choice lists (None when there are none)

    @property
    def fields(self) -> list[UIField]:
        """The UIField of each component (the section's fields repeated per unit)."""
        return list(self.section.fields) * max(1, self.section.units)


def sections_for(manager: Any, mode: str) -> list[UISection]:
    """The UI sections of active extensions for a generation tab (`mode`: txt2img, img2img, inpaint), each
    name once. [] without a manager or when listing them fails."""
    if manager is None:
        return []
    out: list[UISection] = []
    seen: set[str] = set()
    for tab in TAB_SECTIONS.get(mode, (mode,)):
        try:
            found = manager.ui_sections(tab)
        except Exception as exc:  # a broken extension must not take the tab down
            log.error("extension UI sections for %s: %s", tab, exc)
            continue
        for sec in found:
            if sec.name.casefold() not in seen:
                seen.add(sec.name.casefold())
                out.append(sec)
    return out


def field_choices(f: UIField) -> list[str]:
    """The field's current choices ([] when its callable fails)."""
    try:
        return [str(c) for c in f.current_choices()]
    except Exception as exc:
        log.warning("choices of %s: %s", f.name, exc)
        return []


def _number(v: Any) -> float | None:
    return None if v is None else float(v)


def build_field(f: UIField, elem_id: str) -> Any:
    """One Gradio component for a UIField (call inside a Blocks context)."""
    label = f.label or f.name.replace("_", " ").capitalize()
    info = f.info or None
    kind = f.kind
    if kind == "checkbox":
        return gr.Checkbox(value=bool(f.default), label=label, info=info, elem_id=elem_id)
    if kind == "slider" and f.minimum is not None and f.maximum is not None:
        value = f.default if f.default is not None else f.minimum
        return gr.Slider(
            minimum=f.minimum,
            maximum=f.maximum,
            value=value,
            step=f.step if f.step is not None else 1,
            label=label,
            info=info,
            elem_id=elem_id,
        )
    if kind in ("number", "slider"):  # a slider without bounds is a number box
        return gr.Number(
            value=f.default,
            minimum=_number(f.minimum),
            maximum=_number(f.maximum),
            step=f.step if f.step is not None else 1,
            label=label,
            info=info,
            elem_id=elem_id,
        )
    if kind in ("text", "textarea"):
        lines = 4 if kind == "textarea" else 1
        value = "" if f.default is None else str(f.default)
        return gr.Textbox(value=value, lines=lines, max_lines=lines * 3, label=label, info=info, elem_id=elem_id)
    if kind == "dropdown":
        choices = field_choices(f)
        dynamic = callable(f.choices)
        value = f.default if f.default in choices or dynamic else (choices[0] if choices else None)
        return gr.Dropdown(choices, value=value, label=label, info=info, elem_id=elem_id, allow_custom_value=dynamic)
    if kind == "radio":
        choices = field_choices(f)
        value = f.default if f.default in choices else (choices[0] if choices else None)
        return gr.Radio(choices, value=value, label=label, info=info, elem_id=elem_id)
    if kind == "image":
        return gr.Image(
            label=label,
            type="pil",
            image_mode="RGB",
            sources=["upload", "clipboard"],
            elem_id=elem_id,
            height=240,
        )
    raise ValueError(f"field {f.name}: unknown kind {kind!r}")


def build_section(section: UISection, mode: str) -> BoundSection:
    """An accordion for `section` in the tab `mode` (call inside a Blocks context)."""
    bound = BoundSection(section)
    dynamic = [i for i, f in enumerate(section.fields) if f.kind == "dropdown" and callable(f.choices)]
    base = f"{mode}_ext_{section.name}"
    with gr.Accordion(section.title or section.name, open=section.open, elem_id=base):
        if dynamic:
            bound.refresh = gr.Button("↻ Reload lists", elem_id=f"{base}_refresh", size="sm", scale=0, min_width=140)
        units = max(1, section.units)
        if units == 1:
            bound.components += [build_field(f, f"{base}_{f.name}") for f in section.fields]
        else:
            with gr.Tabs(elem_id=f"{base}_units"):
                for k in range(units):
                    with gr.Tab(f"Unit {k}", id=f"{base}_unit{k}"):
                        bound.components += [build_field(f, f"{base}_{k}_{f.name}") for f in section.fields]
    if bound.refresh is not None:
        wire_refresh(bound, dynamic)
    return bound


def wire_refresh(bound: BoundSection, dynamic: list[int]) -> None:
    """The refresh button reloads the dropdowns whose choices come from a callable (e.g. model files)."""
    n = len(bound.section.fields)
    targets = [bound.components[k * n + i] for k in range(max(1, bound.section.units)) for i in dynamic]
    fields = [bound.section.fields[i] for _ in range(max(1, bound.section.units)) for i in dynamic]

    def refresh(*current):
        out = []
        for f, value in zip(fields, current, strict=True):
            choices = field_choices(f)
            out.append(gr.Dropdown(choices=choices, value=value if value in choices else f.default))
        return out

    assert bound.refresh is not None
    bound.refresh.click(refresh, targets, targets, queue=False)


def build_sections(ctx: Any, mode: str) -> list[BoundSection]:
    """Every extension section for the tab `mode` (call inside the tab's controls column). A section that
    cannot be built is replaced by a note; the tab still works."""
    manager = getattr(ctx.service, "extensions", None)
    out = []
    for section in sections_for(manager, mode):
        try:
            out.append(build_section(section, mode))
        except Exception as exc:
            log.error("extension section %s: %s", section.name, exc)
            text = f"Extension section {section.name!r} could not be shown: {type(exc).__name__}: {exc}"
            gr.HTML(f"<div class='ldm-note'>{html.escape(text)}</div>", elem_id=f"{mode}_ext_{section.name}_error")
    return out


# ---- values -> alwayson_scripts ------------------------------------------------------------------------
def image_value(value: Any) -> Image.Image | None:
    """An RGB PIL image (what `extension_api.ImageInput` accepts) from a Gradio image value: PIL, a numpy
    array, a file path, or an editor dict ({background, composite}). None when empty."""
    if value is None:
        return None
    if isinstance(value, dict):
        inner = value.get("composite") or value.get("background") or value.get("image") or value.get("path")
        return image_value(inner)
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, np.ndarray):
        arr = value
        if arr.dtype != np.uint8:
            scale = 255.0 if arr.size and float(arr.max()) <= 1.0 else 1.0
            arr = np.clip(arr * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if isinstance(value, str | Path):
        if not str(value):
            return None
        with Image.open(value) as im:
            return im.convert("RGB")
    raise ValueError(f"expected an image, got {type(value).__name__}")


def ui_value(f: UIField, value: Any) -> Any:
    """A component's value as the extension expects it (images -> RGB PIL; the rest as Gradio gives them)."""
    if f.kind == "image":
        return image_value(value)
    return value


def section_args(section: UISection, values: list[Any]) -> dict[str, Any] | None:
    """`section.args_from_values(values)`, or None when the section has an `enabled` field and no unit is
    enabled (nothing to send)."""
    args = section.args_from_values(values)
    if any(f.name == "enabled" for f in section.fields) and not any(u.get("enabled") for u in args["args"]):
        return None
    return args


def active_section_names(manager: Any) -> set[str] | None:
    """Casefolded names of the sections of extensions that are active now (None: no manager, send all)."""
    if manager is None:
        return None
    try:
        return {s.name.casefold() for s in manager.ui_sections(None)}
    except Exception:
        return None


def alwayson_scripts(bound: list[BoundSection], data: dict[Any, Any], active: set[str] | None = None) -> dict[str, Any]:
    """`alwayson_scripts` for a request from a handler's input dict (component -> value). Sections with no
    enabled unit, and (when `active` is given) sections not in `active`, are left out."""
    out: dict[str, Any] = {}
    for b in bound:
        if active is not None and b.section.name.casefold() not in active:
            continue
        values = [ui_value(f, data.get(c)) for f, c in zip(b.fields, b.components, strict=True)]
        args = section_args(b.section, values)
        if args is not None:
            out[b.section.name] = args
    return out


def input_components(bound: list[BoundSection]) -> list[Any]:
    """Every component whose value the Generate handler needs."""
    return [c for b in bound for c in b.components]


# ---- infotext -> component values ----------------------------------------------------------------------
def restorable_components(bound: list[BoundSection]) -> list[Any]:
    """The components infotext can set (every field but images: infotext holds no pictures)."""
    return [c for b in bound for f, c in zip(b.fields, b.components, strict=True) if f.kind != "image"]


def section_updates(bound: list[BoundSection], scripts: dict[str, Any]) -> dict[Any, Any]:
    """{component: value} from `alwayson_scripts` read back from infotext. For each section named there unit k
    gets unit k's values (a field the unit does not name gets its default; units past the list get defaults,
    i.e. off); image fields keep what they show. Sections not named are left as they are."""
    by_name = {str(k).casefold(): v for k, v in scripts.items()}
    out: dict[Any, Any] = {}
    for b in bound:
        entry = by_name.get(b.section.name.casefold())
        if entry is None:
            continue
        units = entry.get("args", []) if isinstance(entry, dict) else entry
        units = [units] if isinstance(units, dict) else list(units or [])
        n = len(b.section.fields)
        for k in range(max(1, b.section.units)):
            unit = units[k] if k < len(units) and isinstance(units[k], dict) else {}
            for i, f in enumerate(b.section.fields):
                if f.kind != "image":
                    out[b.components[k * n + i]] = unit.get(f.name, f.default)
    return out


def restore_updates(manager: Any, bound: list[BoundSection], text: str) -> dict[Any, Any]:
    """`section_updates` for raw infotext, through the extensions that wrote it ({} without a manager or
    sections, or when reading fails: a paste must never break on an extension)."""
    if manager is None or not bound or not text:
        return {}
    try:
        scripts = manager.args_from_infotext(parse_infotext(text))
    except Exception as exc:
        log.warning("extension fields from infotext: %s", exc)
        return {}
    return section_updates(bound, scripts)
