"""The Extensions tab, driven by the extension manager (`ctx.service.extensions`, an
`ldm_core.extensions.ExtensionManager`):

- Installed: name, version, pinned commit, status (with the reason when it is not loaded) and whether it is
  enabled; enable/disable (persisted; enabling an extension that is not loaded takes effect at the next
  start), check for updates, update (optionally to another ref), remove, install missing requirements.
- Install from URL: `git clone` of URL[@ref] pinned to a commit; no extension code runs. The declared Python
  requirements are listed, and pip-installed only when the user ticks the confirmation box.
- Available: an index JSON (a local file or an https:// URL) listed with what is installed; an entry installs
  through the same path.

Install, update, remove and pip are refused when the server is reachable from other machines (--listen,
--share, a non-local server name) unless the app was started with --enable-insecure-extension-access: the
buttons are disabled and the handlers refuse too (`policy.check`), so a crafted request cannot get past the
page. Every handler is a plain function that returns text (tests call them without a browser) and turns
every error into a message: the server keeps running.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from ldm_core.extensions import ExtensionAccessError, ExtensionError, ExtensionPolicy, split_source

from .common import UiContext

log = logging.getLogger(__name__)

MANIFEST_NAMES = ("extension.toml", "extension.json", "manifest.json", "pyproject.toml")
REPO_EXTENSIONS = Path(__file__).resolve().parent.parent / "extensions"
SHORT = 12  # characters of a commit id shown in tables
RESTART_NOTE = "Restart the web UI to load it."


# ---- without a manager: the folders -------------------------------------------------------------------
def extension_folders(dirs: list[Path]) -> list[dict[str, Any]]:
    """One row per extension folder (dot-folders and __pycache__ skipped): name, folder, manifest file name,
    version and description when the manifest is JSON. Shown when no extension manager runs."""
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
    """The folder listing as HTML (used when no extension manager runs)."""
    note = (
        "Installing extensions from the UI is disabled while the server listens beyond localhost or shares "
        "a public link."
        if install_locked
        else "The extension manager is not running in this session, so extensions are listed but not loaded."
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


# ---- policy ---------------------------------------------------------------------------------------------
def effective_policy(manager: Any, flags: dict[str, Any] | None = None) -> ExtensionPolicy:
    """The stricter of the manager's policy and the one the UI's launch flags describe: exposed when either
    says so; --enable-insecure-extension-access from either."""
    from_flags = ExtensionPolicy.from_flags(flags or {})
    mine = getattr(manager, "policy", None)
    if not isinstance(mine, ExtensionPolicy):
        return from_flags
    return ExtensionPolicy(
        listen=mine.listen or from_flags.listen,
        share=mine.share or from_flags.share,
        server_name=mine.server_name if mine.server_name is not None else from_flags.server_name,
        allow_insecure=mine.allow_insecure or from_flags.allow_insecure,
    )


def locked_note(policy: ExtensionPolicy) -> str:
    """Why install/update/remove/enable/disable are disabled ("" when they are allowed)."""
    if policy.changes_allowed:
        return ""
    return (
        "Installing, updating, removing, enabling and disabling extensions is disabled because "
        f"{policy.exposure()}: anyone who can reach the server could run code on this machine. Restart with "
        "--enable-insecure-extension-access to allow it."
    )


def _refusal(policy: ExtensionPolicy, action: str) -> str | None:
    try:
        policy.check(action)
    except ExtensionAccessError as exc:
        return f"Refused: {exc}"
    return None


def _error(exc: BaseException) -> str:
    if isinstance(exc, ExtensionAccessError):
        return f"Refused: {exc}"
    if isinstance(exc, KeyError):
        return f"Error: {exc.args[0] if exc.args else exc}"
    if isinstance(exc, ExtensionError | ValueError | OSError):
        return f"Error: {exc}"
    log.exception("extensions tab")
    return f"Error: {type(exc).__name__}: {exc}"


def _no_manager() -> str:
    return "Extensions are not available: the extension manager is not running in this session."


# ---- installed ------------------------------------------------------------------------------------------
def installed_rows(manager: Any) -> list[dict[str, Any]]:
    """The Installed table's rows from `manager.info()`: name, version, commit (short), status (with the
    message when there is one), enabled, source."""
    rows = []
    for item in manager.info():
        status = str(item.get("status", ""))
        if item.get("message"):
            status += f": {item['message']}"
        source = item.get("url") or ("shipped with the app" if item.get("builtin") else item.get("path", ""))
        if item.get("url") and item.get("ref"):
            source += f" @ {item['ref']}"
        rows.append(
            {
                "name": str(item.get("name", "")),
                "version": str(item.get("version", "")),
                "commit": str(item.get("commit") or "")[:SHORT],
                "status": status,
                "enabled": bool(item.get("enabled")),
                "source": source,
                "description": str(item.get("description", "")),
            }
        )
    return rows


def installed_html(manager: Any) -> str:
    if manager is None:
        return f"<div class='ldm-extensions'><p>{html.escape(_no_manager())}</p></div>"
    try:
        rows = installed_rows(manager)
    except Exception as exc:
        return f"<div class='ldm-extensions'><p>{html.escape(_error(exc))}</p></div>"
    if not rows:
        return "<div class='ldm-extensions'><p>No extensions found.</p></div>"
    trs = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(v)}</td>"
            for v in (
                r["name"],
                r["version"],
                r["commit"] or "—",
                r["status"],
                "yes" if r["enabled"] else "no",
                r["source"],
            )
        )
        + "</tr>"
        for r in rows
    )
    head = "".join(f"<th>{h}</th>" for h in ("Name", "Version", "Commit", "Status", "Enabled", "Source"))
    return f"<div class='ldm-extensions'><table class='ldm-info-table'><tr>{head}</tr>{trs}</table></div>"


def toggle_names(manager: Any) -> list[str]:
    """Names that can be enabled/disabled (extensions with a readable manifest)."""
    if manager is None:
        return []
    return [k for k, r in manager.records.items() if r.manifest is not None and k == r.name]


def enabled_names(manager: Any) -> list[str]:
    if manager is None:
        return []
    return [n for n in toggle_names(manager) if manager.records[n].enabled]


def extension_names(manager: Any) -> list[str]:
    """Names for the Update / Remove menu."""
    return [] if manager is None else list(manager.records)


def apply_enabled(manager: Any, names: list[str] | None) -> str:
    """Enable the listed extensions and disable the others (persisted in extensions.json). Says what
    changed and what needs a restart."""
    if manager is None:
        return _no_manager()
    keep = {n.casefold() for n in names or []}
    lines = []
    try:
        for name in toggle_names(manager):
            rec = manager.records[name]
            want = name.casefold() in keep
            if rec.enabled == want:
                continue
            rec = manager.set_enabled(name, want)
            if want and rec.status == "restart-needed":
                lines.append(f"Enabled {name}: restart the web UI to load it.")
            elif want:
                lines.append(f"Enabled {name}: its conditioning and post-processing work again now.")
            elif rec.status == "loaded":
                lines.append(
                    f"Disabled {name}: its conditioning and post-processing stop now; its samplers, upscalers and "
                    "UI sections go at the next restart."
                )
            else:
                lines.append(f"Disabled {name}: it will not load at the next start.")
    except Exception as exc:
        lines.append(_error(exc))
    return "\n".join(lines) or "Nothing changed."


def check_updates(manager: Any, name: str | None = None) -> str:
    """Fetch and compare each git extension's pinned commit with its ref's newest commit (`name`: only
    that one). One line per extension."""
    if manager is None:
        return _no_manager()
    try:
        infos = manager.check_updates(name or None)
    except Exception as exc:
        return _error(exc)
    if not infos:
        return "No extension was installed from git (shipped extensions update with the app)."
    lines = []
    for i in infos:
        ref = i.ref or "the default branch"
        if i.error:
            lines.append(f"{i.name}: could not check ({i.error})")
        elif i.has_update:
            n = f"{i.behind} new commit{'s' if i.behind != 1 else ''}" if i.behind else "another commit"
            lines.append(f"{i.name}: update available on {ref}: {n}, {i.current[:SHORT]} -> {i.latest[:SHORT]}")
        else:
            lines.append(f"{i.name}: up to date at {i.current[:SHORT]} ({ref})")
    return "\n".join(lines)


def update_extension(manager: Any, policy: ExtensionPolicy, name: str | None, ref: str | None = None) -> str:
    """Move an extension to the newest commit of its ref (or of `ref`, which becomes the new pin)."""
    refused = _refusal(policy, "update")
    if refused:
        return refused
    if manager is None:
        return _no_manager()
    if not name:
        return "Choose an extension to update."
    try:
        info = manager.update(name, (ref or "").strip() or None)
    except Exception as exc:
        return _error(exc)
    if info.current == info.latest:
        return f"{info.name} is already at the newest commit of {info.ref or 'its branch'}: {info.latest[:SHORT]}."
    return f"Updated {info.name}: {info.current[:SHORT]} -> {info.latest} (pinned). {RESTART_NOTE}"


def remove_extension(manager: Any, policy: ExtensionPolicy, name: str | None) -> str:
    """Delete an installed extension's folder and its record (shipped ones can only be disabled)."""
    refused = _refusal(policy, "remove")
    if refused:
        return refused
    if manager is None:
        return _no_manager()
    if not name:
        return "Choose an extension to remove."
    try:
        path = manager.remove(name)
    except Exception as exc:
        return _error(exc)
    return f"Removed {name} ({path}). If it was loaded it keeps running until the web UI restarts."


def _requirements_text(reqs) -> str:
    if not reqs:
        return "Requirements: none declared."
    parts = [f"{r.spec} ({'installed' if r.met else 'missing'})" for r in reqs]
    return "Requirements: " + ", ".join(parts)


def install_extension(
    manager: Any, policy: ExtensionPolicy, url: str | None, ref: str | None = None, install_requirements: bool = False
) -> str:
    """Clone `url` (at `ref`, or the `@ref` in the URL, or the default branch), pin the commit, and report the
    declared requirements; pip runs only when `install_requirements` (the user's confirmation)."""
    refused = _refusal(policy, "install")
    if refused:
        return refused
    if manager is None:
        return _no_manager()
    url = (url or "").strip()
    if not url:
        return "Enter a git URL (https://, ssh://, git://, file:// or a local folder)."
    source = url
    if (ref or "").strip():
        source = f"{split_source(url)[0]}@{ref.strip()}"  # type: ignore[union-attr]
    try:
        res = manager.install(source, install_requirements=bool(install_requirements))
    except Exception as exc:
        return _error(exc)
    lines = [
        f"Installed {res.name} {res.version} from {res.url}" + (f" ({res.ref})" if res.ref else "") + ".",
        f"Pinned commit: {res.commit}",
        _requirements_text(res.requirements),
    ]
    missing = [r.spec for r in res.requirements if not r.met]
    if res.pip_ran:
        lines.append("pip installed the missing requirements.")
    elif missing:
        lines.append(
            "They were not installed: tick the confirmation and use 'Install missing requirements' in the "
            "Installed tab, or run python -m ldm_core.extensions_cli requirements " + res.name + " --install."
        )
    lines.append(RESTART_NOTE)
    return "\n".join(lines)


def install_requirements(manager: Any, policy: ExtensionPolicy, name: str | None, confirmed: bool) -> str:
    """pip-install the declared requirements of an installed extension that are missing (after the user
    confirmed)."""
    refused = _refusal(policy, "install")
    if refused:
        return refused
    if manager is None:
        return _no_manager()
    if not name:
        return "Choose an extension."
    try:
        reqs = manager.requirements(name)
        missing = [r.spec for r in reqs if not r.met]
        if not missing:
            return f"{name}: every declared requirement is installed. " + _requirements_text(reqs)
        if not confirmed:
            return (
                f"{name} needs: {', '.join(missing)}. Tick the confirmation to let pip install them "
                "(only for extensions you trust)."
            )
        manager.pip_install(missing)
        reqs = manager.requirements(name)
    except Exception as exc:
        return _error(exc)
    return f"pip installed {', '.join(missing)} for {name}. {_requirements_text(reqs)} {RESTART_NOTE}"


# ---- available ------------------------------------------------------------------------------------------
def load_available(manager: Any, source: str | None) -> tuple[str, list[dict[str, Any]]]:
    """(HTML table, entries) of an index JSON (file or URL); on error the message and []."""
    if manager is None:
        return f"<p>{html.escape(_no_manager())}</p>", []
    source = (source or "").strip()
    if not source:
        return "<p>Enter the path or https:// URL of an extension index JSON.</p>", []
    try:
        entries = manager.available(source)
    except Exception as exc:
        return f"<p>{html.escape(_error(exc))}</p>", []
    return available_html(entries), entries


def available_html(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return "<p>The index lists no extensions.</p>"
    trs = []
    for e in entries:
        if e.get("installed"):
            installed = "yes" + (f" ({str(e.get('installed_commit'))[:SHORT]})" if e.get("installed_commit") else "")
        else:
            installed = "no"
        compat = "" if e.get("compatible", True) else f" (needs extension API {e.get('api_version')})"
        cells = (
            e.get("name", ""),
            str(e.get("description", "")) + compat,
            e.get("source") or e.get("url", ""),
            installed,
        )
        trs.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("Name", "Description", "URL", "Installed"))
    return f"<table class='ldm-info-table'><tr>{head}</tr>{''.join(trs)}</table>"


def install_available(
    manager: Any,
    policy: ExtensionPolicy,
    entries: list[dict[str, Any]] | None,
    name: str | None,
    install_requirements: bool = False,
) -> str:
    """Install the index entry `name` (from the last loaded list) through `install_extension`."""
    refused = _refusal(policy, "install")
    if refused:
        return refused
    entry = next((e for e in entries or [] if e.get("name") == name), None)
    if entry is None:
        return "Load an index and choose an extension from it."
    if entry.get("installed"):
        return f"{name} is already installed; use Update in the Installed tab."
    return install_extension(manager, policy, entry.get("source") or entry["url"], None, install_requirements)


# ---- the tab --------------------------------------------------------------------------------------------
def _safe(fn: Callable[..., Any], fallback: Callable[[str], Any]) -> Callable[..., Any]:
    """Wrap a handler so that an unexpected error becomes a message (the page never sees a crash)."""

    def run(*args):
        try:
            return fn(*args)
        except Exception as exc:  # pragma: no cover - the handlers already catch what they expect
            return fallback(_error(exc))

    return run


def build(ctx: UiContext) -> dict[str, Any]:
    """The Extensions tab (call inside a gr.Tab)."""
    manager = getattr(ctx.service, "extensions", None)
    policy = effective_policy(manager, ctx.flags)
    allowed = policy.changes_allowed
    if manager is None:
        rows = extension_folders([ctx.data_dir / "extensions", REPO_EXTENSIONS])
        gr.HTML(f"<p class='ldm-note'>{html.escape(_no_manager())}</p>", elem_id="extensions_note")
        table = gr.HTML(extensions_html(rows, not allowed), elem_id="extensions_table")
        return {"table": table, "policy": policy, "manager": None}

    note = locked_note(policy)
    gr.HTML(f"<p class='ldm-note'>{html.escape(note)}</p>" if note else "", elem_id="extensions_note")

    def lists(message: str):
        names = extension_names(manager)
        return (
            message,
            installed_html(manager),
            gr.CheckboxGroup(choices=toggle_names(manager), value=enabled_names(manager)),
            gr.Dropdown(choices=names, value=None),
        )

    with gr.Tabs(elem_id="extensions_tabs"):
        with gr.Tab("Installed", id="extensions_installed"):
            table = gr.HTML(installed_html(manager), elem_id="extensions_table")
            with gr.Row(equal_height=True):
                enabled = gr.CheckboxGroup(
                    toggle_names(manager),
                    value=enabled_names(manager),
                    label="Enabled extensions",
                    elem_id="extensions_enabled",
                    scale=4,
                )
                apply = gr.Button("Apply", elem_id="extensions_apply", scale=0, min_width=120)
                refresh = gr.Button("Refresh", elem_id="extensions_refresh", scale=0, min_width=120)
            with gr.Row(equal_height=True):
                name = gr.Dropdown(
                    extension_names(manager), value=None, label="Extension", elem_id="extensions_name", scale=2
                )
                update_ref = gr.Textbox(
                    label="Update to ref (optional: branch, tag or commit; default: the installed ref)",
                    elem_id="extensions_update_ref",
                    scale=2,
                )
            with gr.Row():
                check = gr.Button("Check for updates", elem_id="extensions_check")
                update = gr.Button("Update", elem_id="extensions_update", interactive=allowed)
                remove = gr.Button("Remove", elem_id="extensions_remove", variant="stop", interactive=allowed)
            with gr.Row(equal_height=True):
                req_confirm = gr.Checkbox(
                    False,
                    label="Let pip install this extension's missing Python requirements (only if you trust it)",
                    elem_id="extensions_requirements_confirm",
                    interactive=allowed,
                    scale=3,
                )
                req_install = gr.Button(
                    "Install missing requirements", elem_id="extensions_requirements", interactive=allowed, scale=1
                )
        with gr.Tab("Install from URL", id="extensions_install_tab"):
            url = gr.Textbox(
                label="Git repository URL",
                placeholder="https://github.com/someone/extension (optionally URL@ref)",
                elem_id="extensions_install_url",
            )
            ref = gr.Textbox(
                label="Ref (optional: branch, tag or commit; default: the default branch)",
                elem_id="extensions_install_ref",
            )
            pip_confirm = gr.Checkbox(
                False,
                label="Also pip-install the Python requirements it declares (runs pip; only for extensions you trust)",
                elem_id="extensions_install_requirements",
                interactive=allowed,
            )
            install = gr.Button("Install", variant="primary", elem_id="extensions_install", interactive=allowed)
        with gr.Tab("Available", id="extensions_available_tab"):
            with gr.Row(equal_height=True):
                index = gr.Textbox(
                    value=str(ctx.flags.get("extensions_index") or ""),
                    label="Extension index (JSON file path or https:// URL)",
                    elem_id="extensions_index",
                    scale=4,
                )
                load = gr.Button("Load", elem_id="extensions_load", scale=0, min_width=120)
            available = gr.HTML("", elem_id="extensions_available")
            entries = gr.State([])
            with gr.Row(equal_height=True):
                pick = gr.Dropdown([], value=None, label="Extension to install", elem_id="extensions_pick", scale=3)
                av_confirm = gr.Checkbox(
                    False,
                    label="Also pip-install its declared requirements",
                    elem_id="extensions_available_requirements",
                    interactive=allowed,
                    scale=2,
                )
                av_install = gr.Button("Install", elem_id="extensions_available_install", interactive=allowed, scale=1)
    message = gr.Textbox(label="Result", lines=4, max_lines=20, interactive=False, elem_id="extensions_message")
    listed = [message, table, enabled, name]
    serial = {"concurrency_limit": 1, "concurrency_id": "extensions"}

    def fallback(text: str):
        return lists(text)

    apply.click(_safe(lambda names: lists(apply_enabled(manager, names)), fallback), [enabled], listed, **serial)
    refresh.click(_safe(lambda: lists(""), fallback), None, listed, queue=False)
    check.click(_safe(lambda n: lists(check_updates(manager, n)), fallback), [name], listed, **serial)
    update.click(
        _safe(lambda n, r: lists(update_extension(manager, policy, n, r)), fallback),
        [name, update_ref],
        listed,
        **serial,
    )
    remove.click(_safe(lambda n: lists(remove_extension(manager, policy, n)), fallback), [name], listed, **serial)
    req_install.click(
        _safe(lambda n, ok: lists(install_requirements(manager, policy, n, ok)), fallback),
        [name, req_confirm],
        listed,
        **serial,
    )
    install.click(
        _safe(lambda u, r, ok: lists(install_extension(manager, policy, u, r, ok)), fallback),
        [url, ref, pip_confirm],
        listed,
        **serial,
    )

    def load_index(source: str):
        text, items = load_available(manager, source)
        return text, items, gr.Dropdown(choices=[e["name"] for e in items], value=None)

    load.click(
        _safe(load_index, lambda text: (f"<p>{html.escape(text)}</p>", [], gr.skip())),
        [index],
        [available, entries, pick],
        **serial,
    )

    def install_picked(items, chosen, ok, source):
        out = lists(install_available(manager, policy, items, chosen, ok))
        text, fresh = load_available(manager, source) if items else (available_html([]), [])
        return (*out, text if fresh else available_html(items or []), fresh or items)

    av_install.click(
        _safe(install_picked, lambda text: (*lists(text), gr.skip(), gr.skip())),
        [entries, pick, av_confirm, index],
        [*listed, available, entries],
        **serial,
    )
    return {
        "table": table,
        "enabled": enabled,
        "apply": apply,
        "refresh": refresh,
        "name": name,
        "update_ref": update_ref,
        "check": check,
        "update": update,
        "remove": remove,
        "requirements_confirm": req_confirm,
        "requirements": req_install,
        "url": url,
        "ref": ref,
        "install_requirements": pip_confirm,
        "install": install,
        "index": index,
        "load": load,
        "available": available,
        "entries": entries,
        "pick": pick,
        "available_requirements": av_confirm,
        "available_install": av_install,
        "message": message,
        "policy": policy,
        "manager": manager,
    }
