"""Who may change installed extensions: the security policy that refuses install/update/remove when the
server is reachable beyond this machine (A1111's --enable-insecure-extension-access rule).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class ExtensionAccessError(PermissionError):
    """Install/update/remove refused by the security policy (server reachable from the network)."""


_GERUND = {
    "install": "installing",
    "update": "updating",
    "remove": "removing",
    "enable": "enabling",
    "disable": "disabling",
}
_LOCAL_NAMES = {"", "127.0.0.1", "localhost", "::1", "0:0:0:0:0:0:0:1"}


@dataclass(frozen=True)
class ExtensionPolicy:
    """Who may change installed extensions. A server reachable beyond this machine (`listen`, `share`,
    or a `server_name` that is not a loopback name) refuses install/update/remove/enable/disable unless
    `allow_insecure` (A1111's rule and flag name: --enable-insecure-extension-access)."""

    listen: bool = False
    share: bool = False
    server_name: str | None = None
    allow_insecure: bool = False

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any] | Any) -> ExtensionPolicy:
        """From launch flags (an argparse Namespace or a dict): listen, share, server_name/host,
        enable_insecure_extension_access."""
        get = flags.get if isinstance(flags, Mapping) else (lambda k, d=None: getattr(flags, k, d))
        host = get("server_name", None) or get("host", None)
        return cls(
            listen=bool(get("listen", False)),
            share=bool(get("share", False)),
            server_name=host,
            allow_insecure=bool(get("enable_insecure_extension_access", False)),
        )

    def exposure(self) -> str | None:
        """Why the server counts as reachable from the network, or None when it is local only."""
        if self.share:
            return "a public share link is open (--share)"
        if self.listen:
            return "the server listens on all interfaces (--listen)"
        if self.server_name is not None and self.server_name.strip("[]") not in _LOCAL_NAMES:
            return f"the server listens on {self.server_name}"
        return None

    @property
    def changes_allowed(self) -> bool:
        return self.allow_insecure or self.exposure() is None

    def check(self, action: str) -> None:
        """Raise ExtensionAccessError when `action` ("install", "update", "remove", "enable", "disable") is
        not allowed."""
        why = self.exposure()
        if why and not self.allow_insecure:
            raise ExtensionAccessError(
                f"{_GERUND.get(action, action).capitalize()} extensions is disabled because {why}: anyone who "
                "can reach the server could "
                "run code on this machine. Restart with --enable-insecure-extension-access to allow it."
            )
