"""API-only server: `python -m api.server --port 7861 --data-dir DIR [--api-auth user:pass]`.

The same launcher as `python webui.py --nowebui` (one code path: flags, logins, exposure policy, the one options
store `<data dir>/config.json`, limits, service, extensions; see `webui.prepare`), with the API-only defaults:
port 7861, the data dir is the current folder. `--help` lists the flags. This module is an entry point above the
`api` package's routes, like `webui.py`, so it may import the launcher.
"""

from __future__ import annotations

import argparse


def _launcher():
    """The `webui` launcher module (it lives beside the `api` package, so it imports wherever `api` does)."""
    import webui

    return webui


def build_parser() -> argparse.ArgumentParser:
    """The launch flags with the API-only defaults (`python -m api.server --help`)."""
    return _launcher().build_parser(api_only=True)


def main(argv: list[str] | None = None) -> int:
    return _launcher().main(argv, api_only=True)


if __name__ == "__main__":
    raise SystemExit(main())
