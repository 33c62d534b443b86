"""Manage extensions from the command line (no extension code runs here):

    python -m ldm_core.extensions_cli install URL[@ref] [--install-requirements] [--force]
    python -m ldm_core.extensions_cli list [--json]
    python -m ldm_core.extensions_cli enable NAME | disable NAME | remove NAME
    python -m ldm_core.extensions_cli update NAME [--ref REF] | check [NAME]
    python -m ldm_core.extensions_cli requirements NAME [--install]
    python -m ldm_core.extensions_cli available INDEX_FILE_OR_URL

Common options: `--data-dir DIR` (extensions/ and extensions.json live there; default "."), and the
server's exposure flags (`--listen`, `--share`, `--server-name`, `--enable-insecure-extension-access`) so
that the same policy as the running server applies. Exit status: 0 ok, 1 refused or failed, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import EngineConfig
from .extensions import (
    REPO_EXTENSIONS_DIR,
    STATE_FILE_NAME,
    ExtensionAccessError,
    ExtensionError,
    ExtensionManager,
    ExtensionPolicy,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldm_core.extensions_cli", description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=".", help="folder holding extensions/ and extensions.json")
    p.add_argument("--listen", action="store_true", help="the server listens on all interfaces")
    p.add_argument("--share", action="store_true", help="the server has a public share link")
    p.add_argument("--server-name", default=None, help="the interface the server binds")
    p.add_argument(
        "--enable-insecure-extension-access",
        action="store_true",
        help="allow install/update/remove even when the server is reachable from the network",
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("install", help="git clone URL[@ref] into extensions/, pinned; runs no extension code")
    s.add_argument("source", metavar="URL[@ref]")
    s.add_argument(
        "--install-requirements",
        "--yes",
        action="store_true",
        help="also pip-install the extension's declared requirements (you confirm by passing this)",
    )
    s.add_argument("--force", action="store_true", help="install even if its api_version is not supported")
    s = sub.add_parser("list", help="installed extensions with version, commit and status")
    s.add_argument("--json", action="store_true")
    for name, text in (
        ("enable", "enable (loads at the next start)"),
        ("disable", "disable"),
        ("remove", "delete an installed extension"),
    ):
        sub.add_parser(name, help=text).add_argument("name")
    s = sub.add_parser("update", help="fetch and check out the latest commit of its ref (pinned)")
    s.add_argument("name")
    s.add_argument("--ref", default=None, help="switch to this branch, tag or commit")
    s = sub.add_parser("check", help="check for updates (fetches)")
    s.add_argument("name", nargs="?")
    s = sub.add_parser("requirements", help="show (or pip-install) an extension's declared requirements")
    s.add_argument("name")
    s.add_argument("--install", action="store_true", help="pip-install the missing ones")
    s = sub.add_parser("available", help="list an index of available extensions (file or URL)")
    s.add_argument("index")
    return p


def manager_for(args: argparse.Namespace) -> ExtensionManager:
    """The manager for the data dir and exposure flags in `args` (discovered, nothing imported)."""
    data = Path(args.data_dir).expanduser()
    m = ExtensionManager(
        [REPO_EXTENSIONS_DIR, data / "extensions"],
        install_dir=data / "extensions",
        state_file=data / STATE_FILE_NAME,
        config=EngineConfig.from_data_dir(data),
        policy=ExtensionPolicy.from_flags(vars(args)),
    )
    m.preflight()
    return m


def _print_list(m: ExtensionManager, as_json: bool) -> None:
    items = m.info()
    if as_json:
        print(json.dumps(items, indent=2))
        return
    if not items:
        print("no extensions installed")
        return
    for it in items:
        commit = (it["commit"] or "")[:12] or "-"
        state = "enabled" if it["enabled"] else "disabled"
        origin = "shipped" if it["builtin"] else (it["url"] or it["path"])
        print(f"{it['name']:<20} {it['version'] or '?':<10} {commit:<13} {state:<9} {it['status']:<21} {origin}")
        if it["message"] and it["status"] not in ("not-loaded", "disabled"):
            print(f"    {it['message']}")
        missing = [r["spec"] for r in it["requirements"] if not r["met"]]
        if missing:
            print(f"    missing requirements: {', '.join(missing)}")


def run(args: argparse.Namespace) -> int:
    m = manager_for(args)
    cmd = args.command
    if cmd == "install":
        res = m.install(args.source, install_requirements=args.install_requirements, force=args.force)
        print(f"installed {res.name} {res.version} from {res.url}" + (f" @ {res.ref}" if res.ref else ""))
        print(f"pinned commit: {res.commit}")
        print(f"folder: {res.path}")
        if res.requirements:
            print("declared requirements:")
            for r in res.requirements:
                print(f"  {'ok     ' if r.met else 'MISSING'} {r.spec}" + (f"  ({r.installed})" if r.installed else ""))
            if any(not r.met for r in res.requirements) and not res.pip_ran:
                print(f"install them with: python -m ldm_core.extensions_cli requirements {res.name} --install")
        print("restart the app to load it")
    elif cmd == "list":
        _print_list(m, args.json)
    elif cmd in ("enable", "disable"):
        rec = m.set_enabled(args.name, cmd == "enable")
        print(f"{rec.name} {cmd}d (takes effect at the next start)")
    elif cmd == "remove":
        path = m.remove(args.name)
        print(f"removed {args.name} ({path})")
    elif cmd == "update":
        info = m.update(args.name, args.ref)
        if info.current == info.latest:
            print(f"{info.name} is up to date at {info.latest[:12]}")
        else:
            print(f"{info.name} updated {info.current[:12]} -> {info.latest[:12]} (pinned); restart to load it")
    elif cmd == "check":
        for info in m.check_updates(args.name):
            if info.error:
                print(f"{info.name}: {info.error}")
            elif info.has_update:
                print(
                    f"{info.name}: update available {info.current[:12]} -> {info.latest[:12]} ({info.behind} commits)"
                )
            else:
                print(f"{info.name}: up to date ({info.current[:12]})")
    elif cmd == "requirements":
        reqs = m.requirements(args.name)
        missing = [r.spec for r in reqs if not r.met]
        for r in reqs:
            print(f"{'ok     ' if r.met else 'MISSING'} {r.spec}" + (f"  ({r.installed})" if r.installed else ""))
        if missing and args.install:
            print(m.pip_install(missing))
        elif missing:
            print("pass --install to pip-install the missing ones")
    elif cmd == "available":
        for e in m.available(args.index):
            flag = "installed" if e["installed"] else ("" if e["compatible"] else "incompatible")
            print(f"{e['name']:<20} {flag:<12} {e['url']}  {e['description']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ExtensionAccessError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    except (ExtensionError, KeyError, ValueError, OSError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
