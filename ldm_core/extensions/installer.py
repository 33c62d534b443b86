"""Installing extensions from git: URL checks, clone/checkout of a pinned commit, updates, removal, pip for
declared requirements (only when the caller confirms), and the "Available" extension index.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..extension_api import (
    API_VERSION,
    ExtensionError,
)
from .manifest import (
    NAME_RE,
    Manifest,
    ManifestError,
    RequirementStatus,
    api_compatible,
    check_requirement,
    pip_arguments,
)
from .policy import ExtensionPolicy
from .state import ExtensionRecord, StateFile

log = logging.getLogger("ldm_core.extensions")


GIT_TIMEOUT_S = 300
INDEX_MAX_BYTES = 5 * 2**20


@dataclass(frozen=True)
class InstallResult:
    """What `install` did: where, which pinned commit, the declared requirements and whether pip ran."""

    name: str
    path: Path
    url: str
    ref: str | None
    commit: str
    version: str
    requirements: tuple[RequirementStatus, ...]
    pip_ran: bool = False
    message: str = ""


@dataclass(frozen=True)
class UpdateInfo:
    """Update state of one git extension: `current` and `latest` commits for its ref, commits `behind`."""

    name: str
    current: str
    latest: str
    behind: int
    ref: str | None = None
    error: str = ""

    @property
    def has_update(self) -> bool:
        return not self.error and self.current != self.latest


def split_source(source: str) -> tuple[str, str | None]:
    """ "URL[@ref]" -> (url, ref). The ref is the text after the last "@" when what precedes it is a
    complete URL or path (so "git@host:repo" and "https://user@host/repo" keep their "@")."""
    s = source.strip()
    if "@" in s:
        left, ref = s.rsplit("@", 1)
        rest = left.split("://", 1)[-1]
        if ref and ":" not in ref and ("/" in rest or ":" in rest):
            return left, ref
    return s, None


_URL_OK = re.compile(r"^(https?|ssh|git|file)://", re.I)
_SCP_OK = re.compile(r"^[\w.\-]+@[\w.\-]+:[^:]")


def check_git_url(url: str) -> None:
    """Refuse what git could turn into a command or option: only http(s)://, ssh://, git://, file://,
    user@host:path and existing local folders. Raises ValueError."""
    if not url or url.startswith("-"):
        raise ValueError(f"invalid repository URL {url!r}")
    if _URL_OK.match(url) or _SCP_OK.match(url):
        return
    if "::" not in url and Path(url).expanduser().is_dir():
        return
    raise ValueError(f"unsupported repository URL {url!r}: use https://, ssh://, git://, file:// or a local folder")


class GitInstaller:
    """Install, update and remove extensions from git, pip-install their declared requirements, and read
    the "Available" index. A mixin of ExtensionManager: it uses the manager's `git` (executable),
    `install_dir`, `policy`, `state`, `records`, `_lock`, `get(name)` and `discover()`. No extension code
    runs at install (no `install.py`, no import)."""

    git: str
    install_dir: Path | None
    policy: ExtensionPolicy
    state: StateFile
    records: dict[str, ExtensionRecord]

    # ---- git ----------------------------------------------------------------------------------------
    def _git(self, *args: str, cwd: Path | None = None, timeout: float = GIT_TIMEOUT_S) -> str:
        env = {
            **os.environ,
            "GIT_TERMINAL_PROMPT": "0",
            "GCM_INTERACTIVE": "never",
            "GIT_ASKPASS": "",
            "SSH_ASKPASS": "",
        }
        cmd = [
            self.git,
            "-c",
            "protocol.ext.allow=never",
            "-c",
            f"core.hooksPath={os.devnull}",
            "-c",
            "advice.detachedHead=false",
            *args,
        ]
        try:
            proc = subprocess.run(
                cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
            )
        except FileNotFoundError:
            raise ExtensionError("git is not installed (needed to install extensions)") from None
        except subprocess.TimeoutExpired:
            raise ExtensionError(f"git {args[0]} took longer than {timeout:.0f}s and was stopped") from None
        if proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise ExtensionError(f"git {args[0]} failed: {' '.join(msg[-3:]) or proc.returncode}")
        return proc.stdout.strip()

    def _head(self, folder: Path) -> str:
        if not (folder / ".git").exists():
            return ""
        try:
            return self._git("rev-parse", "HEAD", cwd=folder, timeout=20)
        except ExtensionError:
            return ""

    def _commit_date(self, folder: Path) -> int | None:
        if not (folder / ".git").exists():
            return None
        try:
            return int(self._git("log", "-1", "--format=%ct", cwd=folder, timeout=20))
        except (ExtensionError, ValueError):
            return None

    def _resolve(self, folder: Path, ref: str | None) -> str:
        """The commit a ref names in a clone: remote branch first (so a branch follows upstream), then
        tags / commits / local names; None = the remote's default branch."""
        candidates = ["origin/HEAD", "HEAD"] if not ref else [f"origin/{ref}", ref]
        for c in candidates:
            try:
                return self._git("rev-parse", "--verify", "--quiet", f"{c}^{{commit}}", cwd=folder, timeout=30)
            except ExtensionError:
                continue
        raise ExtensionError(f"ref {ref!r} not found in the repository (a branch, tag or commit)")

    def install(self, source: str, *, install_requirements: bool = False, force: bool = False) -> InstallResult:
        """Clone `URL[@ref]` into the install dir and pin the commit; no extension code runs.

        The manifest is checked before the folder is moved into place: an incompatible `api_version`
        is refused (unless `force`), a name that is already installed is refused. Declared requirements
        are reported; pip runs only with `install_requirements=True`. The extension loads at the next
        start. Raises ExtensionAccessError (policy), ExtensionError, ValueError (bad URL)."""
        self.policy.check("install")
        url, ref = split_source(source)
        check_git_url(url)
        if self.install_dir is None:
            raise ExtensionError("no extensions folder configured")
        self.install_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.install_dir / f".installing-{uuid.uuid4().hex[:8]}"
        try:
            self._git("clone", "--no-checkout", "--quiet", "--", url, str(tmp))
            commit = self._resolve(tmp, ref)
            self._git("checkout", "--detach", "--quiet", commit, cwd=tmp)
            try:
                man = Manifest.read(tmp)
            except ManifestError as exc:
                raise ExtensionError(str(exc).replace(tmp.name, url)) from None
            if not api_compatible(man.api_version) and not force:
                raise ExtensionError(
                    f"{man.name} {man.version} needs extension API {man.api_version}; this build provides "
                    f"{API_VERSION}. Not installed."
                )
            target = self.install_dir / man.name
            if target.exists() or man.name in self.records:
                raise ExtensionError(f"an extension named {man.name!r} is already installed; use update")
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                rmtree(tmp)
        now = time.strftime("%Y-%m-%dT%H:%M:%S")

        def record(data):
            data["installed"][man.name] = {
                "url": url,
                "ref": ref,
                "commit": commit,
                "installed_at": now,
                "updated_at": now,
                "version": man.version,
            }

        self.state.update(record)
        reqs = tuple(check_requirement(r) for r in man.requirements)
        missing = [r.spec for r in reqs if not r.met]
        pip_ran = False
        msg = f"installed {man.name} {man.version} at commit {commit[:12]}; restart to load it"
        if missing and install_requirements:
            self.pip_install(missing)
            pip_ran = True
            reqs = tuple(check_requirement(r) for r in man.requirements)
        elif missing:
            msg += (
                f". It needs Python packages that are not installed: {', '.join(missing)} (install them with "
                f"`python -m ldm_core.extensions_cli requirements {man.name} --install`)"
            )
        self.discover()
        rec = self.records.get(man.name)
        if rec is not None:
            rec.status, rec.message = "restart-needed", "installed; restart to load it"
        log.info(msg)
        return InstallResult(man.name, target, url, ref, commit, man.version, reqs, pip_ran, msg)

    def pip_install(self, specs: Iterable[str]) -> str:
        """Install requirements with pip (only call after the user confirmed). Returns pip's output."""
        args = pip_arguments(specs)
        if not args:
            return ""
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL
        )
        if proc.returncode != 0:
            raise ExtensionError(f"pip install failed: {(proc.stderr or proc.stdout).strip()[-800:]}")
        return proc.stdout

    def requirements(self, name: str) -> tuple[RequirementStatus, ...]:
        rec = self.get(name)
        return tuple(check_requirement(r) for r in (rec.manifest.requirements if rec.manifest else ()))

    def _git_record(self, name: str) -> ExtensionRecord:
        rec = self.get(name)
        if not (rec.folder / ".git").exists():
            raise ExtensionError(f"{rec.name} is not a git checkout (shipped with the app?); it cannot be updated")
        return rec

    def check_updates(self, name: str | None = None) -> list[UpdateInfo]:
        """Fetch and compare each git extension's pinned commit with the latest commit of its ref (an
        extension pinned to a commit id has no updates). Network errors are reported per extension."""
        names = [name] if name else [r.name for r in self.records.values() if (r.folder / ".git").exists()]
        out = []
        for n in names:
            rec = self._git_record(n)
            ref = rec.install.get("ref")
            current = self._head(rec.folder)
            try:
                self._git("fetch", "--quiet", "--tags", "origin", cwd=rec.folder)
                latest = self._resolve(rec.folder, ref)
                behind = int(self._git("rev-list", "--count", f"{current}..{latest}", cwd=rec.folder) or 0)
                out.append(UpdateInfo(rec.name, current, latest, behind, ref))
            except ExtensionError as exc:
                out.append(UpdateInfo(rec.name, current, current, 0, ref, str(exc)))
        return out

    def update(self, name: str, ref: str | None = None) -> UpdateInfo:
        """Fetch and check out the latest commit of the extension's ref (or of `ref`, which becomes the
        new pin), detached. A new version whose api_version this build does not satisfy is refused and the
        old commit kept. Takes effect at the next start."""
        self.policy.check("update")
        rec = self._git_record(name)
        ref = ref if ref is not None else rec.install.get("ref")
        old = self._head(rec.folder)
        self._git("fetch", "--quiet", "--tags", "origin", cwd=rec.folder)
        new = self._resolve(rec.folder, ref)
        if new != old:
            self._git("checkout", "--detach", "--quiet", new, cwd=rec.folder)
            try:
                man = Manifest.read(rec.folder)
                if not api_compatible(man.api_version):
                    raise ExtensionError(
                        f"{man.name} {man.version} at {new[:12]} needs extension API {man.api_version}; this build "
                        f"provides {API_VERSION}. Kept {old[:12]}."
                    )
            except (ManifestError, ExtensionError):
                self._git("checkout", "--detach", "--quiet", old, cwd=rec.folder)
                raise
        behind = 0
        now = time.strftime("%Y-%m-%dT%H:%M:%S")

        def record(data):
            entry = data["installed"].setdefault(rec.name, {})
            entry.update(commit=new, ref=ref, updated_at=now)
            entry.setdefault("url", self._remote_url(rec.folder))

        self.state.update(record)
        rec.install.update(commit=new, ref=ref)
        if new != old and rec.status == "loaded":
            rec.message = "updated; restart to load the new version"
        return UpdateInfo(rec.name, old, new, behind, ref)

    def _remote_url(self, folder: Path) -> str:
        try:
            return self._git("remote", "get-url", "origin", cwd=folder, timeout=20)
        except ExtensionError:
            return ""

    def remove(self, name: str) -> Path:
        """Delete an installed extension's folder and its state (shipped extensions can only be disabled).
        A loaded one keeps running until restart."""
        self.policy.check("remove")
        rec = self.get(name)
        if rec.builtin:
            raise ExtensionError(f"{rec.name} ships with the app and cannot be removed; disable it instead")
        if self.install_dir is None or self.install_dir not in rec.folder.resolve().parents:
            raise ExtensionError(f"{rec.name} is not in the extensions folder {self.install_dir}; remove it by hand")
        rmtree(rec.folder)

        def forget(data):
            data["installed"].pop(rec.name, None)
            data["disabled"] = [d for d in data.get("disabled", []) if d != rec.name]

        self.state.update(forget)
        with self._lock:
            self.records.pop(rec.name, None)
        return rec.folder

    # ---- the "Available" index ----------------------------------------------------------------------
    def available(self, source: str | os.PathLike) -> list[dict[str, Any]]:
        """Entries of an index JSON (a local file or an http(s) URL; format in docs/EXTENSIONS.md), each
        with `source` (what to pass to `install`: URL@commit, else URL@ref, else URL), `installed` (bool),
        `installed_commit` and `compatible` (its api_version vs ours) added."""
        data = read_index(source)
        installed = {r.name: r for r in self.records.values()}
        out = []
        for e in data:
            rec = installed.get(e["name"])
            compat = True
            if e.get("api_version"):
                try:
                    compat = api_compatible(e["api_version"])
                except ValueError:
                    compat = False
            pin = e.get("commit") or e.get("ref")
            out.append(
                {
                    **e,
                    "source": f"{e['url']}@{pin}" if pin else e["url"],
                    "installed": rec is not None,
                    "installed_commit": (rec.install.get("commit") if rec else "") or "",
                    "compatible": compat,
                }
            )
        return out


def read_index(source: str | os.PathLike) -> list[dict[str, Any]]:
    """Read and validate an extension index: `{"format": 1, "extensions": [{"name", "url", ...}]}`.
    Raises ValueError naming the bad entry."""
    text: str
    s = str(source)
    if re.match(r"^https?://", s, re.I):
        with urllib.request.urlopen(s, timeout=20) as resp:  # noqa: S310 (http(s) only, checked above)
            raw = resp.read(INDEX_MAX_BYTES + 1)
        if len(raw) > INDEX_MAX_BYTES:
            raise ValueError(f"index {s} is larger than {INDEX_MAX_BYTES} bytes")
        text = raw.decode("utf-8")
    else:
        text = Path(s).expanduser().read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"index {s} is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != 1 or not isinstance(data.get("extensions"), list):
        raise ValueError(f'index {s}: expected {{"format": 1, "extensions": [...]}}')
    out = []
    for i, e in enumerate(data["extensions"]):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not isinstance(e.get("url"), str):
            raise ValueError(f"index {s}: extensions[{i}] needs string fields 'name' and 'url'")
        if not NAME_RE.match(e["name"]):
            raise ValueError(f"index {s}: extensions[{i}]: invalid name {e['name']!r}")
        item = {
            "name": e["name"],
            "url": e["url"],
            "ref": e.get("ref"),
            "commit": e.get("commit"),
            "description": str(e.get("description", "")),
            "homepage": str(e.get("homepage", "")),
            "version": str(e.get("version", "")),
            "api_version": str(e.get("api_version", "")),
            "families": list(e.get("families", [])),
            "tags": list(e.get("tags", [])),
        }
        out.append(item)
    return out


def rmtree(path: Path) -> None:
    def onerror(func, p, _exc):  # git makes pack files read-only (Windows refuses to delete those)
        os.chmod(p, stat.S_IWRITE)
        func(p)

    shutil.rmtree(path, onexc=onerror) if sys.version_info >= (3, 12) else shutil.rmtree(path, onerror=onerror)
