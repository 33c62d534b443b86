"""The extension loader and manager: discover `extensions/*/extension.toml`, check each manifest, import each
extension in isolation, hook what they register into the engine, and install/update/remove them from git.

Loading: every folder under the extension dirs with an `extension.toml` is one extension. A manifest whose
`api_version` this build does not satisfy, or whose declared Python requirements are missing, is refused
with a message saying what to do; the entry module is imported from its file path as its own package
(`ldm_ext_<name>`, so it may use relative imports), and `register(ctx)` is called. Any exception (or
`SystemExit`) marks that one extension "failed" with the error, the others keep working. Enable/disable is
persisted in `<data dir>/extensions.json`; `disable_all` (`--disable-all-extensions`) loads none.

Installing: `git clone` into the install dir, check out the requested ref detached, record the pinned
commit. No extension code runs at install (no `install.py`, no import); declared requirements are listed
and installed with pip only when the caller confirms (`install_requirements=True`). When the server is
reachable beyond localhost (`--listen`, `--share`, a non-local server name), install/update/remove are
refused unless `allow_insecure` (`--enable-insecure-extension-access`).

Engine wiring (no engine code changes needed): `load_extensions(engine, config)` appends the manager's
hooks factory to `engine.hooks_factories` and registers samplers/upscalers in the engine's registries.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from PIL import Image

from .config import EngineConfig
from .extension_api import (
    API_VERSION,
    ApiRoute,
    ConditioningType,
    ExtensionContext,
    ExtensionError,
    Job,
    PostProcessor,
    Preprocessor,
    UISection,
    UnitHooks,
    UnitParams,
    parse_units,
    ui_fields,
    unet_residual_shapes,
)
from .generation_requests import Img2ImgRequest, RequestError
from .pipeline.loop import Hooks

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

#: Extensions shipped with the project (e.g. controlnet).
REPO_EXTENSIONS_DIR = Path(__file__).resolve().parent.parent / "extensions"
MANIFEST_NAME = "extension.toml"
STATE_FILE_NAME = "extensions.json"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")
_SEMVER_RE = re.compile(r"^(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:[-+][0-9A-Za-z.\-+]*)?$")
_RESIDUAL_KEYS = ("down_block_additional_residuals", "mid_block_additional_residual")
GIT_TIMEOUT_S = 300
INDEX_MAX_BYTES = 5 * 2**20


class ManifestError(ValueError):
    """An `extension.toml` is missing or invalid; the message says which field and why."""


class ExtensionAccessError(PermissionError):
    """Install/update/remove refused by the security policy (server reachable from the network)."""


# ----------------------------------------------------------------------------------------------------------
# versions and requirements


def parse_semver(text: str) -> tuple[int, int, int]:
    """ "1.2.3" / "1.2" / "1" (pre-release and build suffixes ignored) -> (1, 2, 3). Raises ValueError."""
    m = _SEMVER_RE.match(str(text).strip())
    if not m:
        raise ValueError(f"not a semantic version: {text!r} (expected MAJOR.MINOR.PATCH)")
    return int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)


def api_compatible(required: str, provided: str = API_VERSION) -> bool:
    """Whether `provided` (this build's API_VERSION) satisfies a manifest's `api_version`: a plain version
    "1.2" (or "^1.2") means >= 1.2 and < 2.0; anything else is a PEP 440 specifier (">=1.0,<3")."""
    req = str(required).strip()
    if req.startswith("^") or _SEMVER_RE.match(req):
        want = parse_semver(req.lstrip("^"))
        have = parse_semver(provided)
        return have[0] == want[0] and have >= want
    try:
        return SpecifierSet(req).contains(provided, prereleases=True)
    except InvalidSpecifier:
        raise ValueError(f"api_version {required!r} is neither a version nor a version specifier") from None


@dataclass(frozen=True)
class RequirementStatus:
    """One declared requirement ("pkg>=1" or alternatives "a | b"): whether it is met, and what is
    installed (distribution==version) when it is."""

    spec: str
    met: bool
    installed: str = ""


def check_requirement(spec: str) -> RequirementStatus:
    """Check one declared requirement against the installed distributions (no import, no network)."""
    for alt in (a.strip() for a in spec.split("|")):
        try:
            req = Requirement(alt)
        except InvalidRequirement:
            return RequirementStatus(spec, False, "")
        if req.marker is not None and not req.marker.evaluate():
            return RequirementStatus(spec, True, "(not needed on this platform)")
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if not req.specifier or req.specifier.contains(version, prereleases=True):
            return RequirementStatus(spec, True, f"{req.name}=={version}")
    return RequirementStatus(spec, False, "")


def pip_arguments(specs: Iterable[str]) -> list[str]:
    """Validated pip arguments for declared requirements: named packages from the index only (no URLs,
    paths or options); for alternatives "a | b" the first is installed. Raises ValueError."""
    out = []
    for spec in specs:
        first = spec.split("|")[0].strip()
        try:
            req = Requirement(first)
        except InvalidRequirement as exc:
            raise ValueError(f"invalid requirement {spec!r}: {exc}") from None
        if req.url or first.startswith("-"):
            raise ValueError(f"requirement {spec!r}: only package names from the index are allowed")
        out.append(first)
    return out


# ----------------------------------------------------------------------------------------------------------
# manifest


@dataclass(frozen=True)
class Manifest:
    """An extension's `extension.toml`.

    Fields: `name` (lowercase letters, digits, `_` and `-`; the alwayson_scripts key is usually the same),
    `version` (semver), `api_version` (the API it needs, "1.0" = any 1.x >= 1.0), `description`,
    `homepage`, `families` (base model families it supports; empty = any), `requirements` (pip
    requirement strings, "a | b" for alternatives), `entry` (the entry module, a .py file relative to
    the folder, default `main.py`)."""

    name: str
    version: str
    api_version: str
    path: Path
    description: str = ""
    homepage: str = ""
    families: tuple[str, ...] = ()
    requirements: tuple[str, ...] = ()
    entry: str = "main.py"

    @classmethod
    def read(cls, folder: str | os.PathLike) -> Manifest:
        """Read and validate `folder/extension.toml`. Raises ManifestError."""
        folder = Path(folder)
        f = folder / MANIFEST_NAME
        if not f.is_file():
            raise ManifestError(
                f"{folder.name}: no {MANIFEST_NAME} (not an extension for this app; A1111 extensions that "
                "patch the model are not supported)"
            )
        try:
            data = tomllib.loads(f.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{folder.name}: {MANIFEST_NAME} is not valid TOML ({exc})") from None
        data = data.get("extension", data) if isinstance(data.get("extension"), dict) else data

        def need(key: str) -> str:
            v = data.get(key)
            if not isinstance(v, str) or not v.strip():
                raise ManifestError(f"{folder.name}: {MANIFEST_NAME} needs a string field {key!r}")
            return v.strip()

        name = need("name")
        if not _NAME_RE.match(name):
            raise ManifestError(f"{folder.name}: name {name!r} must be lowercase letters, digits, '_' or '-' (max 64)")
        version = need("version")
        try:
            parse_semver(version)
        except ValueError as exc:
            raise ManifestError(f"{name}: version: {exc}") from None
        api = need("api_version")
        try:
            api_compatible(api)
        except ValueError as exc:
            raise ManifestError(f"{name}: {exc}") from None
        entry = str(data.get("entry", "main.py"))
        entry_path = (folder / entry).resolve()
        if not entry.endswith(".py") or folder.resolve() not in entry_path.parents:
            raise ManifestError(f"{name}: entry {entry!r} must be a .py file inside the extension folder")

        def str_list(key: str) -> tuple[str, ...]:
            v = data.get(key, [])
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise ManifestError(f"{name}: {key} must be a list of strings")
            return tuple(x.strip() for x in v if x.strip())

        reqs = str_list("requirements")
        for r in reqs:
            try:
                pip_arguments([r])
            except ValueError as exc:
                raise ManifestError(f"{name}: {exc}") from None
        return cls(
            name=name,
            version=version,
            api_version=api,
            path=folder,
            description=str(data.get("description", "")),
            homepage=str(data.get("homepage", "")),
            families=str_list("families"),
            requirements=reqs,
            entry=entry,
        )


# ----------------------------------------------------------------------------------------------------------
# policy


_GERUND = {"install": "installing", "update": "updating", "remove": "removing"}
_LOCAL_NAMES = {"", "127.0.0.1", "localhost", "::1", "0:0:0:0:0:0:0:1"}


@dataclass(frozen=True)
class ExtensionPolicy:
    """Who may change installed extensions. A server reachable beyond this machine (`listen`, `share`,
    or a `server_name` that is not a loopback name) refuses install/update/remove unless
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
        """Raise ExtensionAccessError when `action` ("install", "update", "remove") is not allowed."""
        why = self.exposure()
        if why and not self.allow_insecure:
            raise ExtensionAccessError(
                f"{_GERUND.get(action, action).capitalize()} extensions is disabled because {why}: anyone who "
                "can reach the server could "
                "run code on this machine. Restart with --enable-insecure-extension-access to allow it."
            )


# ----------------------------------------------------------------------------------------------------------
# records and state


@dataclass
class ExtensionRecord:
    """One discovered extension. `status`: "loaded", "disabled", "failed", "incompatible",
    "missing-requirements", "all-disabled" (--disable-all-extensions) or "restart-needed" (installed or
    enabled after start). `message` says why when not loaded."""

    folder: Path
    manifest: Manifest | None
    status: str = "discovered"
    message: str = ""
    enabled: bool = True
    builtin: bool = False
    ctx: ExtensionContext | None = None
    requirements: tuple[RequirementStatus, ...] = ()
    install: dict = field(default_factory=dict)  # url, ref, commit, installed_at, updated_at
    attached: bool = False  # its samplers/upscalers are registered in the engine

    @property
    def name(self) -> str:
        return self.manifest.name if self.manifest else self.folder.name

    @property
    def active(self) -> bool:
        """Loaded and (still) enabled: its conditioning types and post-processors run."""
        return self.status == "loaded" and self.enabled


class _StateFile:
    """`extensions.json`: {"format": 1, "disabled": [names], "installed": {name: {url, ref, commit, ...}}}.
    Written atomically."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.RLock()

    def read(self) -> dict:
        with self._lock:
            if self.path is None or not self.path.is_file():
                return {"format": 1, "disabled": [], "installed": {}}
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                log.warning("extensions state %s unreadable (%s); starting from defaults", self.path, exc)
                return {"format": 1, "disabled": [], "installed": {}}
            data.setdefault("format", 1)
            data.setdefault("disabled", [])
            data.setdefault("installed", {})
            return data

    def update(self, fn) -> dict:
        with self._lock:
            data = self.read()
            fn(data)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
                os.replace(tmp, self.path)
            return data


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


# ----------------------------------------------------------------------------------------------------------
# the manager


def _model_dirs(config: EngineConfig | None) -> dict[str, tuple[Path, ...]]:
    if config is None:
        return {}
    return {
        "Stable-diffusion": tuple(config.ckpt_dirs),
        "VAE": tuple(config.vae_dirs),
        "Lora": tuple(config.lora_dirs),
        "embeddings": tuple(config.embeddings_dirs),
        "ESRGAN": tuple(config.upscaler_dirs),
        "ControlNet": tuple(config.controlnet_dirs),
    }


def _scale_residuals(out: dict[str, Any], weight: float) -> dict[str, Any]:
    res = dict(out)
    down = res.get(_RESIDUAL_KEYS[0])
    if down is not None:
        res[_RESIDUAL_KEYS[0]] = tuple(r * weight for r in down)
    mid = res.get(_RESIDUAL_KEYS[1])
    if mid is not None:
        res[_RESIDUAL_KEYS[1]] = mid * weight
    return res


class ExtensionManager:
    """Discovers, loads and manages extensions; one per process (webui.py / api.server build it).

    `dirs`: folders holding extension folders (the shipped `extensions/` and the data dir's).
    `install_dir`: where `install` clones to. `state_file`: the persisted enable/install state.
    `config`: the engine config (model folders for extensions; pickle policy)."""

    def __init__(
        self,
        dirs: Sequence[str | os.PathLike],
        *,
        install_dir: str | os.PathLike | None = None,
        state_file: str | os.PathLike | None = None,
        config: EngineConfig | None = None,
        disable_all: bool = False,
        policy: ExtensionPolicy | None = None,
        git: str = "git",
    ) -> None:
        seen: list[Path] = []
        for d in dirs:
            p = Path(d).expanduser().resolve()
            if p not in seen:
                seen.append(p)
        self.dirs = seen
        self.install_dir = Path(install_dir).expanduser().resolve() if install_dir else (seen[-1] if seen else None)
        self.state = _StateFile(Path(state_file) if state_file else None)
        self.config = config
        self.disable_all = disable_all
        self.policy = policy or ExtensionPolicy()
        self.git = git
        self.records: dict[str, ExtensionRecord] = {}
        self.pending_upscalers: list[tuple[str, Any, float | None]] = []
        self._lock = threading.RLock()
        self._engine = None

    # ---- discovery and loading ----------------------------------------------------------------------
    def discover(self) -> list[ExtensionRecord]:
        """Read every manifest (no code runs) and return the records, refreshed."""
        state = self.state.read()
        disabled = set(state.get("disabled", []))
        installed = state.get("installed", {})
        found: dict[str, ExtensionRecord] = {}
        for d in self.dirs:
            if not d.is_dir():
                continue
            for folder in sorted(p for p in d.iterdir() if p.is_dir()):
                if folder.name.startswith((".", "_")):
                    continue
                try:
                    man: Manifest | None = Manifest.read(folder)
                    err = ""
                except ManifestError as exc:
                    man, err = None, str(exc)
                rec = ExtensionRecord(folder, man)
                if man is None:
                    rec.status, rec.message = "failed", err
                    found.setdefault(f"{folder.name} ({folder})", rec)
                    continue
                if man.name in found:
                    rec.status = "failed"
                    rec.message = f"another extension named {man.name!r} is in {found[man.name].folder}"
                    found[f"{man.name} ({folder})"] = rec
                    continue
                rec.enabled = man.name not in disabled
                rec.install = dict(installed.get(man.name, {}))
                rec.builtin = not rec.install and REPO_EXTENSIONS_DIR.resolve() in folder.resolve().parents
                old = self.records.get(man.name)
                if old is not None and old.folder == folder and old.status != "discovered":
                    rec.status, rec.message, rec.ctx = old.status, old.message, old.ctx
                    rec.requirements, rec.attached = old.requirements, old.attached
                found[man.name] = rec
        with self._lock:
            self.records = found
        return list(found.values())

    def _check(self, rec: ExtensionRecord) -> bool:
        man = rec.manifest
        assert man is not None
        if not api_compatible(man.api_version):
            rec.status = "incompatible"
            rec.message = (
                f"{man.name} {man.version} needs extension API {man.api_version}, this build provides "
                f"{API_VERSION}: update the extension (or the app)"
            )
            return False
        rec.requirements = tuple(check_requirement(r) for r in man.requirements)
        missing = [r.spec for r in rec.requirements if not r.met]
        if missing:
            rec.status = "missing-requirements"
            rec.message = (
                f"{man.name} needs Python packages that are not installed: {', '.join(missing)}. Install them "
                f"with: python -m ldm_core.extensions_cli requirements {man.name} --install"
            )
            return False
        return True

    def load(self, engine: Any = None) -> list[ExtensionRecord]:
        """Discover and import every enabled extension (each in isolation), then hook them into `engine`
        (optional). Safe to call once per process."""
        self._engine = engine
        if engine is not None and self.config is None:
            self.config = getattr(engine, "config", None)
        records = self.discover()
        for rec in records:
            if rec.manifest is None or rec.status == "failed":
                continue
            if rec.status == "loaded":
                continue
            if self.disable_all:
                rec.status, rec.message = "all-disabled", "all extensions are disabled (--disable-all-extensions)"
                continue
            if not rec.enabled:
                rec.status, rec.message = "disabled", "disabled by the user"
                continue
            if not self._check(rec):
                log.warning("extension %s not loaded: %s", rec.name, rec.message)
                continue
            self._import(rec)
        if engine is not None:
            self.attach(engine)
        loaded = [r.name for r in records if r.status == "loaded"]
        log.info("extensions loaded: %s", ", ".join(loaded) or "none")
        return records

    def _import(self, rec: ExtensionRecord) -> None:
        man = rec.manifest
        assert man is not None
        modname = "ldm_ext_" + re.sub(r"\W", "_", man.name)
        entry = man.path / man.entry
        data_root = self.state.path.parent if self.state.path else (self.install_dir or man.path.parent)
        ctx = ExtensionContext(
            name=man.name,
            path=man.path,
            version=man.version,
            data_dir=Path(data_root) / "extension-data" / man.name,
            model_dirs=_model_dirs(self.config),
            allow_pickle=bool(getattr(self.config, "allow_pickle", False)),
            log=logging.getLogger(f"extensions.{man.name}"),
        )
        ctx.all_preprocessors = _PreprocessorView(self)
        try:
            if not entry.is_file():
                raise ExtensionError(f"entry module {man.entry} not found")
            spec = importlib.util.spec_from_file_location(modname, entry, submodule_search_locations=[str(man.path)])
            if spec is None or spec.loader is None:
                raise ExtensionError(f"cannot import {entry}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[modname] = module
            spec.loader.exec_module(module)
            register = getattr(module, "register", None)
            if not callable(register):
                raise ExtensionError(f"{man.entry} defines no register(ctx) function")
            register(ctx)
            self._validate_registrations(rec, ctx)
        except (Exception, SystemExit) as exc:  # a broken extension must never take the others down
            for name in [m for m in sys.modules if m == modname or m.startswith(modname + ".")]:
                del sys.modules[name]
            rec.status = "failed"
            rec.message = f"{type(exc).__name__}: {exc}"
            log.error("extension %s failed to load: %s\n%s", man.name, rec.message, traceback.format_exc())
            return
        rec.ctx = ctx
        rec.status, rec.message = "loaded", ""

    def _validate_registrations(self, rec: ExtensionRecord, ctx: ExtensionContext) -> None:
        taken_ct = {
            c.name.casefold(): r.name
            for r in self.records.values()
            if r.ctx and r is not rec
            for c in (*r.ctx.conditioning, *r.ctx.postprocessors)
        }
        for c in (*ctx.conditioning, *ctx.postprocessors):
            if c.name.casefold() in taken_ct:
                raise ExtensionError(f"{c.name!r} is already registered by extension {taken_ct[c.name.casefold()]}")
        taken_pre = {
            n.casefold()
            for r in self.records.values()
            if r.ctx and r is not rec
            for p in r.ctx.preprocessors
            for n in (p.name, *p.aliases)
        }
        for p in ctx.preprocessors:
            clash = [n for n in (p.name, *p.aliases) if n.casefold() in taken_pre]
            if clash:
                raise ExtensionError(f"preprocessor {clash[0]!r} is already registered by another extension")
        if self._engine is not None:
            names = {n.casefold() for n in self._engine.samplers.names()}
            for info, _ in ctx.samplers:
                if info.name.casefold() in names:
                    raise ExtensionError(f"sampler {info.name!r} already exists")

    def attach(self, engine: Any) -> None:
        """Hook loaded extensions into `engine`: the hooks factory (once), samplers, upscalers, and
        (when the engine has these lists) infotext providers and post-processors."""
        self._engine = engine
        factories = engine.hooks_factories
        if not any(getattr(f, "__self__", None) is self for f in factories):
            factories.append(self.hooks_for)
            if isinstance(getattr(engine, "infotext_providers", None), list):
                engine.infotext_providers.append(self.infotext_params)
            if isinstance(getattr(engine, "postprocessors", None), list):
                engine.postprocessors.append(self.postprocess)
        upscalers = getattr(engine, "upscalers", None)
        for rec in self.records.values():
            if rec.status != "loaded" or rec.ctx is None or rec.attached:
                continue
            rec.attached = True
            for info, factory in rec.ctx.samplers:
                try:
                    engine.samplers.register(info, factory)
                except ValueError as exc:
                    log.error("extension %s: sampler %s not registered: %s", rec.name, info.name, exc)
            for item in rec.ctx.upscalers:
                if upscalers is not None:
                    self._register_upscaler(upscalers, rec.name, item)
                else:
                    self.pending_upscalers.append(item)

    def attach_upscalers(self, registry: Any) -> None:
        """Register extension upscalers in `registry` (an UpscalerRegistry the API or UI built itself)."""
        for rec in self.records.values():
            if rec.status == "loaded" and rec.ctx is not None:
                for item in rec.ctx.upscalers:
                    self._register_upscaler(registry, rec.name, item)

    @staticmethod
    def _register_upscaler(registry: Any, ext: str, item) -> None:
        name, fn, scale = item
        try:
            registry.register(name, fn, scale=scale)
        except ValueError as exc:
            log.warning("extension %s: upscaler %s not registered: %s", ext, name, exc)

    # ---- what loaded extensions provide -------------------------------------------------------------
    def get(self, name: str) -> ExtensionRecord:
        rec = self.records.get(name)
        if rec is None:
            rec = next((r for r in self.records.values() if r.name.casefold() == name.casefold()), None)
        if rec is None:
            raise KeyError(f"no extension named {name!r}; installed: {sorted(self.records)}")
        return rec

    def _active(self) -> list[ExtensionRecord]:
        return [r for r in self.records.values() if r.active and r.ctx is not None]

    def conditioning_types(self) -> dict[str, tuple[ExtensionRecord, ConditioningType]]:
        """Conditioning types of active extensions by casefolded name."""
        return {c.name.casefold(): (r, c) for r in self._active() for c in r.ctx.conditioning}  # type: ignore[union-attr]

    def postprocessors(self) -> dict[str, tuple[ExtensionRecord, PostProcessor]]:
        return {p.name.casefold(): (r, p) for r in self._active() for p in r.ctx.postprocessors}  # type: ignore[union-attr]

    @property
    def preprocessors(self) -> dict[str, Preprocessor]:
        """Every preprocessor of active extensions by name and alias (exact and casefolded)."""
        out: dict[str, Preprocessor] = {}
        for r in self._active():
            for p in r.ctx.preprocessors:  # type: ignore[union-attr]
                for n in (p.name, *p.aliases):
                    out.setdefault(n, p)
                    out.setdefault(n.casefold(), p)
        return out

    def api_routes(self) -> list[tuple[str, ApiRoute]]:
        return [(r.name, a) for r in self._active() for a in r.ctx.api_routes]  # type: ignore[union-attr]

    def ui_sections(self, tab: str | None = None) -> list[UISection]:
        """UI sections of active extensions for `tab` ("txt2img"/"img2img"; None = all)."""
        out: list[UISection] = []
        for r in self._active():
            ctx = r.ctx
            assert ctx is not None
            for c in (*ctx.conditioning, *ctx.postprocessors):
                sec = c.ui or UISection(
                    c.name,
                    c.title or c.name,
                    ui_fields(c.params, defaults={"enabled": False}),
                    units=getattr(c, "max_units", 1),
                )
                out.append(sec)
            out.extend(ctx.ui_sections)
        return [s for s in out if tab is None or tab in s.tabs]

    # ---- jobs ---------------------------------------------------------------------------------------
    def _units(self, request: Any) -> list[tuple[ExtensionRecord, Any, list[tuple[int, UnitParams]]]]:
        """(record, type, [(index, unit)]) for every alwayson_scripts entry an active extension knows;
        entries of known but inactive extensions raise RequestError; unknown names are ignored."""
        scripts = getattr(request, "alwayson_scripts", None) or {}
        if not scripts:
            return []
        ctypes = self.conditioning_types()
        posts = self.postprocessors()
        inactive = {
            c.name.casefold(): r
            for r in self.records.values()
            if not r.active and r.ctx is not None
            for c in (*r.ctx.conditioning, *r.ctx.postprocessors)
        }
        out = []
        for key, raw in scripts.items():
            k = str(key).casefold()
            found = ctypes.get(k) or posts.get(k)
            if found is None:
                rec = inactive.get(k) or next(
                    (r for r in self.records.values() if r.manifest and r.name.casefold() == k and not r.active), None
                )
                if rec is not None:
                    state = "disabled" if not rec.enabled else rec.status
                    why = rec.message if rec.enabled else "disabled by the user"
                    raise RequestError(
                        f"alwayson_scripts.{key}", f"extension {rec.name} is {state}" + (f" ({why})" if why else "")
                    )
                log.debug("alwayson_scripts: no extension handles %r; ignored", key)
                continue
            rec, typ = found
            units = parse_units(typ.params, raw, name=str(key), max_units=getattr(typ, "max_units", 1))
            out.append((rec, typ, [(i, u) for i, u in enumerate(units) if u.enabled]))
        return out

    def validate_request(self, request: Any) -> None:
        """Check a request's extension arguments before queueing (no models load). Raises RequestError."""
        self._units(request)

    def build_job(self, engine: Any, request: Any, model: Any) -> Job:
        """The extension-facing view of one job on `engine` with loaded `model`."""
        native = model.native_size
        init = request.init_images[0] if isinstance(request, Img2ImgRequest) and request.init_images else None
        unet_cfg = dict(model.unet.config)
        return Job(
            request=request,
            mode=request.mode,
            family=model.kind.family,
            inpaint=bool(model.kind.inpaint),
            prediction_type=model.kind.prediction_type,
            model_name=model.entry.name,
            model_hash=model.entry.short_hash if hasattr(model.entry, "short_hash") else "",
            unet_config=unet_cfg,
            width=request.width or native,
            height=request.height or native,
            latent_scale=model.vae_scale_factor,
            batch_size=request.batch_size,
            steps=request.steps,
            cfg_scale=request.cfg_scale,
            device=engine.policy.device,
            dtype=engine.policy.dtype,
            init_image=init,
            model_dirs=_model_dirs(engine.config),
            allow_pickle=bool(engine.config.allow_pickle),
            preprocessors=self.preprocessors,
        )

    def hooks_for(self, engine: Any, request: Any, model: Any) -> Hooks | None:
        """The engine's hooks factory: prepare every enabled unit of every conditioning type the request
        names (models load, compatibility is checked, images are preprocessed: errors surface here,
        before denoising), and return their per-step providers gated by guidance start/end and scaled
        by weight."""
        entries = [e for e in self._units(request) if isinstance(e[1], ConditioningType)]
        if not entries:
            return None
        job = self.build_job(engine, request, model)
        hooks = Hooks()
        for rec, ctype, units in entries:
            if ctype.families and job.family not in ctype.families:
                raise RequestError(
                    f"alwayson_scripts.{ctype.name}",
                    f"{ctype.title or ctype.name} supports {', '.join(ctype.families)} models; the loaded model "
                    f"{job.model_name} is {job.family}",
                )
            for index, unit in units:
                try:
                    out = ctype.prepare(job, unit, index)
                except (RequestError, ExtensionError):
                    raise
                except Exception as exc:
                    raise ExtensionError(f"extension {rec.name}: {type(exc).__name__}: {exc}") from exc
                if out is None:
                    continue
                parts = out if isinstance(out, UnitHooks) else UnitHooks(unet_inputs=out)
                if parts.unet_inputs is not None:
                    hooks.unet_inputs.append(
                        _GatedProvider(rec.name, unit, parts.unet_inputs, ctype.applies_weight, job.unet_config)
                    )
                if parts.cfg is not None:
                    hooks.cfg.append(_GatedCfg(rec.name, unit, parts.cfg))
        return hooks

    def infotext_params(self, request: Any, model: Any = None) -> dict[str, str]:
        """Infotext keys the request's extensions write (e.g. `ControlNet 0`)."""
        out: dict[str, str] = {}
        try:
            entries = self._units(request)
        except RequestError:
            return out
        for rec, typ, units in entries:
            try:
                if isinstance(typ, ConditioningType) and typ.to_infotext and units:
                    out.update(typ.to_infotext(units))
                elif isinstance(typ, PostProcessor) and typ.to_infotext and units:
                    out.update(typ.to_infotext(units[0][1]))
            except Exception as exc:
                log.warning("extension %s: infotext failed: %s", rec.name, exc)
        return out

    def args_from_infotext(self, params: Mapping[str, Any]) -> dict[str, dict[str, list]]:
        """alwayson_scripts reconstructed from parsed infotext (for "send to txt2img" / paste)."""
        out: dict[str, dict[str, list]] = {}
        for rec in self._active():
            for typ in (*rec.ctx.conditioning, *rec.ctx.postprocessors):  # type: ignore[union-attr]
                if typ.from_infotext is None:
                    continue
                try:
                    units = typ.from_infotext({str(k): str(v) for k, v in params.items()})
                except Exception as exc:
                    log.warning("extension %s: reading infotext failed: %s", rec.name, exc)
                    continue
                if units:
                    out[typ.name] = {"args": units}
        return out

    def postprocess(
        self, request: Any, images: list[Image.Image], engine: Any = None, model: Any = None
    ) -> list[Image.Image]:
        """Run the post-processors the request enables on finished images (in request order)."""
        entries = [e for e in self._units(request) if isinstance(e[1], PostProcessor) and e[2]]
        if not entries:
            return images
        engine = engine or self._engine
        model = model or (engine.current_model if engine is not None else None)
        job = self.build_job(engine, request, model) if engine is not None and model is not None else None
        for rec, post, units in entries:
            try:
                images = list(post.fn(images, job, units[0][1]))  # type: ignore[arg-type]
            except (RequestError, ExtensionError):
                raise
            except Exception as exc:
                raise ExtensionError(f"extension {rec.name}: {type(exc).__name__}: {exc}") from exc
        return images

    # ---- enable / disable ---------------------------------------------------------------------------
    def set_enabled(self, name: str, enabled: bool) -> ExtensionRecord:
        """Persist the toggle. Disabling stops its conditioning types and post-processors at once (its
        samplers/upscalers stay until restart); enabling an extension that is not loaded needs a restart."""
        rec = self.get(name)

        def change(data):
            dis = set(data.get("disabled", []))
            (dis.discard if enabled else dis.add)(rec.name)
            data["disabled"] = sorted(dis)

        self.state.update(change)
        rec.enabled = enabled
        if enabled and rec.status in ("disabled", "all-disabled"):
            rec.status, rec.message = "restart-needed", "enabled; restart to load it"
        elif not enabled and rec.status == "restart-needed":
            rec.status, rec.message = "disabled", "disabled by the user"
        return rec

    def set_enabled_many(self, enabled_names: Iterable[str]) -> None:
        """Apply a UI checkbox list: names listed are enabled, the others disabled."""
        keep = {n.casefold() for n in enabled_names}
        for rec in list(self.records.values()):
            if rec.manifest is not None:
                self.set_enabled(rec.name, rec.name.casefold() in keep)

    # ---- listing ------------------------------------------------------------------------------------
    def info(self) -> list[dict[str, Any]]:
        """Every discovered extension as a JSON-friendly dict (for the UI's Installed table and the API)."""
        out = []
        for rec in self.records.values():
            man = rec.manifest
            provides: dict[str, list[str]] = {}
            if rec.ctx is not None:
                provides = {
                    "conditioning": [c.name for c in rec.ctx.conditioning],
                    "preprocessors": [p.name for p in rec.ctx.preprocessors],
                    "samplers": [i.name for i, _ in rec.ctx.samplers],
                    "upscalers": [n for n, _, _ in rec.ctx.upscalers],
                    "postprocessors": [p.name for p in rec.ctx.postprocessors],
                    "api_routes": [a.path for a in rec.ctx.api_routes],
                }
            out.append(
                {
                    "name": rec.name,
                    "version": man.version if man else "",
                    "api_version": man.api_version if man else "",
                    "description": man.description if man else "",
                    "homepage": man.homepage if man else "",
                    "families": list(man.families) if man else [],
                    "path": str(rec.folder),
                    "status": rec.status,
                    "message": rec.message,
                    "enabled": rec.enabled,
                    "builtin": rec.builtin,
                    "url": rec.install.get("url", ""),
                    "ref": rec.install.get("ref"),
                    "commit": rec.install.get("commit") or self._head(rec.folder),
                    "requirements": [
                        {"spec": r.spec, "met": r.met, "installed": r.installed}
                        for r in (
                            rec.requirements or tuple(check_requirement(s) for s in (man.requirements if man else ()))
                        )
                    ],
                    "provides": provides,
                }
            )
        return out

    @staticmethod
    def _requirements(rec: ExtensionRecord) -> tuple[RequirementStatus, ...]:
        if rec.requirements or rec.manifest is None:
            return rec.requirements
        return tuple(check_requirement(s) for s in rec.manifest.requirements)

    def preflight(self) -> list[ExtensionRecord]:
        """Discover and check manifests, API versions and requirements without importing anything (for
        the command line): unloaded records get status "not-loaded", "disabled", "incompatible" or
        "missing-requirements"."""
        for rec in self.discover():
            if rec.manifest is None or rec.status != "discovered":
                continue
            if not rec.enabled:
                rec.status, rec.message = "disabled", "disabled by the user"
            elif self._check(rec):
                rec.status, rec.message = "not-loaded", ""
        return list(self.records.values())

    def a1111_info(self) -> list[dict[str, Any]]:
        """`/sdapi/v1/extensions` items in A1111's shape."""
        out = []
        for item in self.info():
            out.append(
                {
                    "name": item["name"],
                    "remote": item["url"] or None,
                    "branch": item["ref"] or "",
                    "commit_hash": item["commit"] or "",
                    "commit_date": self._commit_date(Path(item["path"])),
                    "version": item["version"],
                    "enabled": bool(item["enabled"]) and item["status"] == "loaded",
                }
            )
        return out

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
                _rmtree(tmp)
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
        _rmtree(rec.folder)

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
        if not _NAME_RE.match(e["name"]):
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


def _rmtree(path: Path) -> None:
    def onerror(func, p, _exc):  # git makes pack files read-only (Windows refuses to delete those)
        os.chmod(p, stat.S_IWRITE)
        func(p)

    shutil.rmtree(path, onexc=onerror) if sys.version_info >= (3, 12) else shutil.rmtree(path, onerror=onerror)


class _PreprocessorView(Mapping):
    """A live read-only mapping of every active preprocessor (for `ExtensionContext.all_preprocessors`)."""

    def __init__(self, manager: ExtensionManager) -> None:
        self._m = manager

    def __getitem__(self, key: str) -> Preprocessor:
        pre = self._m.preprocessors
        if key in pre:
            return pre[key]
        return pre[key.casefold()]

    def __iter__(self):
        return iter({p.name for p in self._m.preprocessors.values()})

    def __len__(self) -> int:
        return len({p.name for p in self._m.preprocessors.values()})


class _GatedProvider:
    """A unit's UNet-input provider, called only inside its guidance window, residuals scaled by weight."""

    def __init__(
        self, ext: str, unit: UnitParams, fn, applies_weight: bool, unet_config: Mapping[str, Any] | None = None
    ) -> None:
        self.ext, self.unit, self.fn, self.applies_weight = ext, unit, fn, applies_weight
        self.unet_config = unet_config

    def __call__(self, step) -> dict[str, Any] | None:
        if not self.unit.active_at(step.fraction) or (self.unit.weight == 0 and not self.applies_weight):
            return None
        try:
            out = self.fn(step)
        except (RequestError, ExtensionError):
            raise
        except Exception as exc:
            raise ExtensionError(f"extension {self.ext}: {type(exc).__name__}: {exc}") from exc
        if not out:
            return None
        if not self.applies_weight and self.unit.weight != 1.0:
            out = _scale_residuals(out, self.unit.weight)
        down, mid = out.get(_RESIDUAL_KEYS[0]), out.get(_RESIDUAL_KEYS[1])
        if (down is None) != (mid is None) and self.unet_config is not None:
            x = step.x_in
            down_shapes, mid_shape = unet_residual_shapes(self.unet_config, x.shape[-2], x.shape[-1])
            out = dict(out)
            if down is None:
                out[_RESIDUAL_KEYS[0]] = tuple(x.new_zeros((x.shape[0], *s)) for s in down_shapes)
            else:
                out[_RESIDUAL_KEYS[1]] = x.new_zeros((x.shape[0], *mid_shape))
        return out


class _GatedCfg:
    """A unit's CFG hook, applied only inside its guidance window."""

    def __init__(self, ext: str, unit: UnitParams, fn) -> None:
        self.ext, self.unit, self.fn = ext, unit, fn

    def __call__(self, step, uncond, conds, guided):
        if not self.unit.active_at(step.fraction):
            return guided
        return self.fn(step, uncond, conds, guided)


# ----------------------------------------------------------------------------------------------------------
# entry point for the app


def load_extensions(
    engine: Any,
    config_or_paths: EngineConfig | Sequence[str | os.PathLike] | None = None,
    *,
    disable_all: bool = False,
    policy: ExtensionPolicy | None = None,
    state_file: str | os.PathLike | None = None,
    install_dir: str | os.PathLike | None = None,
) -> ExtensionManager:
    """Discover and load extensions and hook them into `engine` (may be None: list/manage only).

    `config_or_paths`: an EngineConfig (default: `engine.config`) -> the shipped `extensions/` plus
    `<data_dir>/extensions/` (where installs go), state in `<data_dir>/extensions.json`; or a list of
    extension folders (installs go to the last; state next to it unless `state_file`)."""
    config = config_or_paths if isinstance(config_or_paths, EngineConfig) else None
    if config_or_paths is None and engine is not None:
        config = engine.config
    if config is not None:
        data = Path(config.data_dir).expanduser()
        dirs: list[str | os.PathLike] = [REPO_EXTENSIONS_DIR, data / "extensions"]
        install_dir = install_dir or data / "extensions"
        state_file = state_file or data / STATE_FILE_NAME
    else:
        dirs = list(config_or_paths or [REPO_EXTENSIONS_DIR])
        install_dir = install_dir or dirs[-1]
        state_file = state_file or Path(install_dir).parent / STATE_FILE_NAME
    manager = ExtensionManager(
        dirs,
        install_dir=install_dir,
        state_file=state_file,
        config=config or getattr(engine, "config", None),
        disable_all=disable_all,
        policy=policy,
    )
    manager.load(engine)
    return manager
