"""The Extensions tab (placeholder until the extension loader lands): lists the folders under `extensions/`
with any manifest they carry. Installing from the UI is not offered; with --listen or --share it would be
disabled anyway (A1111's rule)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import gradio as gr

from .common import UiContext

MANIFEST_NAMES = ("extension.json", "manifest.json", "extension.toml", "pyproject.toml")
REPO_EXTENSIONS = Path(__file__).resolve().parent.parent / "extensions"


def extension_folders(dirs: list[Path]) -> list[dict[str, Any]]:
    """One row per extension folder (dot-folders and __pycache__ skipped): name, folder, manifest file name,
    version and description when the manifest is JSON."""
    rows, seen = [], set()
    for d in dirs:
        if not d.is_dir():
            continue
        for sub in sorted(d.iterdir()):
            if not sub.is_dir() or sub.name.startswith((".", "__")) or sub.resolve() in seen:
                continue
            seen.add(sub.resolve())
            manifest = next((sub / n for n in MANIFEST_NAMES if (sub / n).is_file()), None)
            row: dict[str, Any] = {
                "name": sub.name,
                "path": str(sub),
                "manifest": manifest.name if manifest else "",
                "version": "",
                "description": "",
            }
            if manifest is not None and manifest.suffix == ".json":
                try:
                    data = json.loads(manifest.read_text(encoding="utf-8"))
                    row["version"] = str(data.get("version", ""))
                    row["description"] = str(data.get("description", ""))
                except (OSError, ValueError, AttributeError):
                    row["description"] = "(unreadable manifest)"
            rows.append(row)
    return rows


def extensions_html(rows: list[dict[str, Any]], install_locked: bool) -> str:
    note = (
        "Installing extensions from the UI is disabled while the server listens beyond localhost or shares "
        "a public link."
        if install_locked
        else "Put an extension folder under extensions/ and restart."
    )
    if not rows:
        body = "<p>No extensions found.</p>"
    else:
        trs = "".join(
            f"<tr><td>{html.escape(r['name'])}</td><td>{html.escape(r['version'])}</td>"
            f"<td>{html.escape(r['manifest'] or '—')}</td><td>{html.escape(r['description'])}</td>"
            f"<td><code>{html.escape(r['path'])}</code></td></tr>"
            for r in rows
        )
        body = (
            "<table class='ldm-info-table'><tr><th>Name</th><th>Version</th><th>Manifest</th>"
            f"<th>Description</th><th>Folder</th></tr>{trs}</table>"
        )
    return f"<div class='ldm-extensions'>{body}<p class='ldm-note'>{html.escape(note)}</p></div>"


def build(ctx: UiContext) -> dict[str, Any]:
    """The Extensions tab (call inside a gr.Tab)."""
    dirs = [ctx.data_dir / "extensions", REPO_EXTENSIONS]
    locked = bool(ctx.flags.get("listen") or ctx.flags.get("share"))
    table = gr.HTML(extensions_html(extension_folders(dirs), locked), elem_id="extensions_table")
    refresh = gr.Button("Refresh", elem_id="extensions_refresh", scale=0, min_width=160)
    refresh.click(lambda: extensions_html(extension_folders(dirs), locked), None, [table], queue=False)
    return {"table": table}
