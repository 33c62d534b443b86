"""An extension's manifest (`extension.toml`): reading and checking it, the extension API version rule, and
the declared Python requirements (checked against installed distributions, turned into pip arguments).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import tomllib
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet

from ..extension_api import (
    API_VERSION,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


MANIFEST_NAME = "extension.toml"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")
_SEMVER_RE = re.compile(r"^(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:[-+][0-9A-Za-z.\-+]*)?$")


class ManifestError(ValueError):
    """An `extension.toml` is missing or invalid; the message says which field and why."""


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
        if not NAME_RE.match(name):
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
