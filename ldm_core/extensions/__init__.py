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

from ..extension_api import ExtensionError
from .hooks import GatedCfg, GatedProvider, PreprocessorView
from .installer import (
    GIT_TIMEOUT_S,
    INDEX_MAX_BYTES,
    InstallResult,
    UpdateInfo,
    check_git_url,
    read_index,
    split_source,
)
from .manager import REPO_EXTENSIONS_DIR, ExtensionManager, load_extensions
from .manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    RequirementStatus,
    api_compatible,
    check_requirement,
    parse_semver,
    pip_arguments,
)
from .policy import ExtensionAccessError, ExtensionPolicy
from .state import STATE_FILE_NAME, ExtensionRecord

__all__ = [
    "GIT_TIMEOUT_S",
    "INDEX_MAX_BYTES",
    "MANIFEST_NAME",
    "REPO_EXTENSIONS_DIR",
    "STATE_FILE_NAME",
    "ExtensionAccessError",
    "ExtensionError",
    "ExtensionManager",
    "ExtensionPolicy",
    "ExtensionRecord",
    "GatedCfg",
    "GatedProvider",
    "InstallResult",
    "Manifest",
    "ManifestError",
    "PreprocessorView",
    "RequirementStatus",
    "UpdateInfo",
    "api_compatible",
    "check_git_url",
    "check_requirement",
    "load_extensions",
    "parse_semver",
    "pip_arguments",
    "read_index",
    "split_source",
]
