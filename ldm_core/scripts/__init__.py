"""A1111's scripts (X/Y/Z plot, Prompt matrix, Prompts from file or textbox, SD upscale, Outpainting mk2):
chosen by `script_name` (the title, any case) with `script_args` in A1111's order, run as one job through
the shared queue (`Service.submit_script`), so progress, interrupt and skip work as for any generation.

`find_script(name, mode)` raises RequestError("script_name") listing the scripts of that mode;
`script_infos(engine)` is what /sdapi/v1/script-info lists.
"""

from __future__ import annotations

from typing import Any

from ..engine import Engine
from ..generation_requests import RequestError
from . import outpainting_mk2, prompt_matrix, prompts_from_file, sd_upscale, xyz_plot
from .base import Script, ScriptArg, ScriptRun, script_mode

__all__ = [
    "SCRIPTS",
    "Script",
    "ScriptArg",
    "ScriptRun",
    "find_script",
    "script_infos",
    "script_mode",
    "script_names",
    "scripts_for",
]

#: Every script, in the order the UI lists them.
SCRIPTS: tuple[Script, ...] = (
    prompt_matrix.SCRIPT,
    prompts_from_file.SCRIPT,
    xyz_plot.SCRIPT,
    sd_upscale.SCRIPT,
    outpainting_mk2.SCRIPT,
)


def scripts_for(mode: str) -> list[Script]:
    """The scripts of the txt2img or img2img tab (inpaint counts as img2img)."""
    m = "txt2img" if mode == "txt2img" else "img2img"
    return [s for s in SCRIPTS if m in s.modes]


def script_names(mode: str) -> list[str]:
    """A1111's /sdapi/v1/scripts list for a mode: lower-case titles."""
    return [s.name for s in scripts_for(mode)]


def find_script(name: str, mode: str) -> Script:
    """The script titled `name` (case-insensitive; A1111's lower-case names work) for `mode`."""
    key = (name or "").strip().lower()
    for s in scripts_for(mode):
        if key == s.name or key in s.aliases:
            return s
    available = [s.title for s in scripts_for(mode)]
    other = [s.title for s in SCRIPTS if s.name == key or key in s.aliases]
    if other:
        raise RequestError("script_name", f"script {name!r} is not available in {mode}; available: {available}")
    raise RequestError("script_name", f"script {name!r} not found; available: {available}")


def script_infos(engine: Engine) -> list[dict[str, Any]]:
    """/sdapi/v1/script-info: one entry per script and tab, with its arguments in `script_args` order."""
    out = []
    for mode in ("txt2img", "img2img"):
        for s in scripts_for(mode):
            out.append(
                {
                    "name": s.name,
                    "is_alwayson": False,
                    "is_img2img": mode == "img2img",
                    "args": [a.info() for a in s.arguments(engine, mode)],
                }
            )
    return out
