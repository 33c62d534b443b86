"""Who can reach the server, and what that allows: the exposure policy, decided once from the launch flags.

Pure decisions (no web framework here): `webui.py` builds one `ExposurePolicy` and the REST API (`api/`), the
Host guard and the Settings tab ask it. The rules (README, "Exposure"):

- **Exposed** means reachable beyond this machine: `--listen` (or `--server-name` other than a loopback name)
  or `--share`.
- Exposed without any login (`--api-auth`/`--api-auth-path` or `--gradio-auth`/`--gradio-auth-path`), the REST
  API (`/sdapi`, `/api`, `/docs`, `/openapi.json`, extension routes) answers 403 naming the flags, unless
  `--insecure-expose` says the network is trusted. Exposed, the API accepts the `--api-auth` logins and also
  the `--gradio-auth` ones (so `--share --gradio-auth` protects the API too); on loopback only `--api-auth`
  applies (A1111's rule).
- Folder settings (outputs and model folders) are locked while exposed, unless `--insecure-expose`: a remote
  user could otherwise point them at any folder of this machine.
- `Host` header (DNS rebinding: a web page whose name an attacker re-points at 127.0.0.1 or a LAN address):
  accepted are IP literals (a rebinding page always uses a name), `localhost`, the `--server-name`, this
  machine's host names when listening on all interfaces, `*.gradio.live` with `--share`, and the names in
  `--allowed-hosts` (`.example.com` matches sub-domains; `*` turns the check off, e.g. behind a proxy that
  rewrites Host). Anything else gets 403 naming `--allowed-hosts`.

Logins (`parse_auth`, `parse_auth_file`): `USER:PASSWORD`, split on the FIRST colon, so a password may hold
colons, spaces and any other character; spaces around the user and the password are dropped. The flag form
(`--gradio-auth`, `--api-auth`) separates entries with commas (and newlines), so a password there cannot hold a
comma; a file (`--gradio-auth-path`, `--api-auth-path`) holds one entry per line and the whole rest of the line
is the password, commas included.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ALL_INTERFACES",
    "FOLDER_OPTIONS",
    "LOOPBACK",
    "Credentials",
    "ExposurePolicy",
    "credentials",
    "host_name_of",
    "machine_names",
    "parse_auth",
    "parse_auth_file",
]

LOOPBACK = "127.0.0.1"
ALL_INTERFACES = "0.0.0.0"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "0:0:0:0:0:0:0:1"})
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})
SHARE_DOMAIN = ".gradio.live"

#: the options that name folders of this machine (where images are written, where models are read from)
FOLDER_OPTIONS = frozenset({"outdir_samples", "ckpt_dir", "vae_dir", "lora_dir", "embeddings_dir"})

Credentials = tuple[tuple[str, str], ...]

# a file line whose password looks like more "user:password" entries (A1111 files allow commas)
_LOOKS_LIKE_LIST = re.compile(r",\s*[^,:\s]+:")


# ---- logins ---------------------------------------------------------------------------------------------
def _entry(item: str, where: str) -> tuple[str, str]:
    user, sep, password = item.strip().partition(":")
    if not sep or not user.strip():
        raise ValueError(f"{where}: login {_masked(item)!r} must be USER:PASSWORD")
    if not password:
        raise ValueError(f"{where}: login for {user.strip()!r} has an empty password")
    return user.strip(), password.strip()


def _masked(item: str) -> str:
    user, sep, _ = item.strip().partition(":")
    return f"{user}:***" if sep else (item.strip()[:2] + "***" if len(item.strip()) > 2 else "***")


def parse_auth(text: str | None, *, flag: str = "--api-auth") -> list[tuple[str, str]]:
    """A login flag's value, `"user:pass,user2:pass2"` (newlines also separate entries) -> [(user, pass), ...].
    Split on the first colon: the password may contain colons and spaces, not commas (use a file for those).
    ValueError names `flag` and the bad entry (its password masked)."""
    out = []
    for item in (text or "").replace("\r", "\n").replace("\n", ",").split(","):
        if item.strip():
            out.append(_entry(item, flag))
    return out


def parse_auth_file(path: str | Path, *, flag: str = "--gradio-auth-path") -> tuple[list[tuple[str, str]], list[str]]:
    """The logins in a file, one `user:password` per line (the rest of the line after the first colon is the
    password, commas included), and warnings for lines that look like several comma-separated logins.
    Blank lines and lines starting with '#' are skipped. OSError/ValueError name the file and line."""
    text = Path(path).expanduser().read_text(encoding="utf-8")
    pairs, warnings = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, password = _entry(line, f"{flag} {path} line {number}")
        if _LOOKS_LIKE_LIST.search(password):
            warnings.append(
                f"{flag} {path} line {number}: the password of {user!r} contains ',name:'; a file holds one "
                "login per line (the whole rest of the line is the password): put each login on its own line"
            )
        pairs.append((user, password))
    return pairs, warnings


# ---- hosts ----------------------------------------------------------------------------------------------
def host_name_of(host_header: str) -> str:
    """The name part of a Host header value, lower case, without the port or IPv6 brackets."""
    value = host_header.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value[1:]
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _matches(name: str, pattern: str) -> bool:
    pattern = pattern.strip().lower().rstrip(".")
    if pattern.startswith("."):
        return name == pattern[1:] or name.endswith(pattern)
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == host_name_of(pattern)


# ---- the policy -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExposurePolicy:
    """The launch facts that decide who may do what (see the module docstring). `machine_names`: this
    machine's host names (the launcher fills them), accepted as Host when listening on all interfaces."""

    server_name: str = LOOPBACK
    port: int = 7860
    share: bool = False
    api_auth: Credentials = ()
    ui_auth: Credentials = ()
    insecure_expose: bool = False
    allowed_hosts: tuple[str, ...] = ()
    machine_names: tuple[str, ...] = ()
    api_enabled: bool = True

    # ---- who can reach us ----
    @property
    def listens_beyond_loopback(self) -> bool:
        return host_name_of(self.server_name) not in LOOPBACK_NAMES

    def exposure(self) -> str | None:
        """Why the server is reachable beyond this machine (naming the flag), or None when it is not."""
        if self.share:
            return "a public share link is open (--share)"
        if host_name_of(self.server_name) in WILDCARD_BINDS:
            return "the server listens on all network interfaces (--listen)"
        if self.listens_beyond_loopback:
            return f"the server listens on {self.server_name} (--server-name)"
        return None

    @property
    def exposed(self) -> bool:
        return self.exposure() is not None

    # ---- the REST API ----
    @property
    def api_credentials(self) -> Credentials:
        """The logins the REST API accepts: --api-auth, plus --gradio-auth while exposed. Empty: open."""
        if self.exposed:
            return tuple(dict.fromkeys((*self.api_auth, *self.ui_auth)))
        return tuple(self.api_auth)

    def api_refusal(self) -> str | None:
        """Why the REST API refuses every request (exposed, no login, no --insecure-expose), or None."""
        why = self.exposure()
        if why is None or self.api_credentials or self.insecure_expose:
            return None
        return (
            f"The REST API is refused because {why} and no login is set: anyone who can reach the server could "
            "use it. Restart with --api-auth USER:PASSWORD (or --gradio-auth USER:PASSWORD, which the API also "
            "accepts while exposed), or with --insecure-expose to serve it without a login."
        )

    # ---- Host header ----
    def host_allowed(self, host_header: str | None) -> bool:
        """Whether a request with this Host header may be served (a missing Host is not a browser's)."""
        if host_header is None:
            return True
        if any(p.strip() == "*" for p in self.allowed_hosts):
            return True
        name = host_name_of(host_header)
        if not name:
            return False
        if _is_ip(name) or name in LOOPBACK_NAMES:
            return True
        if name == host_name_of(self.server_name) and name not in WILDCARD_BINDS:
            return True
        if host_name_of(self.server_name) in WILDCARD_BINDS:
            if any(name == m.lower().rstrip(".") for m in self.machine_names if m):
                return True
        if self.share and name.endswith(SHARE_DOMAIN):
            return True
        return any(_matches(name, p) for p in self.allowed_hosts if p.strip())

    def host_refusal(self, host_header: str | None) -> str:
        return (
            f"Host {host_header!r} is refused: this server answers to its own addresses and names only "
            "(protection against DNS rebinding). Behind a reverse proxy or under another name, start it with "
            "--allowed-hosts NAME[,NAME]."
        )

    # ---- settings ----
    def locked_options(self) -> dict[str, str]:
        """Settings that may not be changed while exposed (key -> why, naming the flag), else {}."""
        why = self.exposure()
        if why is None or self.insecure_expose:
            return {}
        reason = (
            f"is locked because {why}: folder settings cannot be changed from the UI or the API then (set the "
            "folder with a launch flag or in config.json, or restart with --insecure-expose)"
        )
        return dict.fromkeys(sorted(FOLDER_OPTIONS), reason)

    # ---- what to tell the user ----
    def messages(self, *, ui: bool = True) -> list[str]:
        """Lines for the console at start and for the web UI's banner (empty when local only)."""
        why = self.exposure()
        if why is None:
            return []
        out = []
        if ui and not self.ui_auth:
            out.append(
                f"WARNING: {why} without --gradio-auth: anyone who can reach it can use this UI, run jobs and see "
                "your outputs."
            )
        elif ui:
            out.append(f"Note: {why}; the web UI asks for the --gradio-auth login.")
        if self.api_enabled:
            refusal = self.api_refusal()
            if refusal:
                out.append("WARNING: " + refusal)
            elif self.insecure_expose and not self.api_credentials:
                out.append(
                    "WARNING: --insecure-expose: the REST API is served without a login to anyone who can reach "
                    "the server; set --api-auth to require one."
                )
            elif not self.api_auth:
                out.append("Note: the REST API accepts the --gradio-auth login (no --api-auth is set).")
        if self.locked_options():
            out.append(
                "Folder settings (outputs, model folders) are locked while the server is exposed; "
                "--insecure-expose unlocks them."
            )
        else:
            out.append("WARNING: --insecure-expose: folder settings can be changed by anyone who can reach the server.")
        return out


def machine_names(names: Iterable[str]) -> tuple[str, ...]:
    """Host names of this machine as Host values may spell them (each name, plus `<name>.local` for mDNS)."""
    out: list[str] = []
    for n in names:
        n = (n or "").strip().lower().rstrip(".")
        if n:
            out += [n, f"{n.split('.', 1)[0]}.local"]
    return tuple(dict.fromkeys(out))


def credentials(*groups: Iterable[tuple[str, str]] | None) -> Credentials:
    """Merge login lists (duplicates dropped, order kept)."""
    return tuple(dict.fromkeys(p for g in groups if g for p in g))
