"""The extension manager: discover `extensions/*/extension.toml`, import each enabled extension in isolation,
hook what they register into the engine (samplers, upscalers, conditioning, post-processors, infotext),
enable/disable, list; `load_extensions` is the app's entry point. Installing lives in `installer`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..config import EngineConfig
from ..extension_api import (
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
)
from ..generation_requests import Img2ImgRequest, RequestError
from ..pipeline.loop import Hooks
from .hooks import GatedCfg, GatedProvider, PreprocessorView
from .installer import GitInstaller
from .manifest import Manifest, ManifestError, RequirementStatus, api_compatible, check_requirement
from .policy import ExtensionPolicy
from .state import STATE_FILE_NAME, ExtensionRecord, StateFile

log = logging.getLogger("ldm_core.extensions")


#: Extensions shipped with the project (e.g. controlnet).
REPO_EXTENSIONS_DIR = Path(__file__).resolve().parent.parent.parent / "extensions"


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
        "annotators": tuple(config.annotator_dirs),
    }


class ExtensionManager(GitInstaller):
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
        self.state = StateFile(Path(state_file) if state_file else None)
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
        ctx.all_preprocessors = PreprocessorView(self)
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
        width, height = model.work_size(request.width, request.height)  # the size the engine runs at
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
            width=width,
            height=height,
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
                        GatedProvider(rec.name, unit, parts.unet_inputs, ctype.applies_weight, job.unet_config)
                    )
                if parts.cfg is not None:
                    hooks.cfg.append(GatedCfg(rec.name, unit, parts.cfg))
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
        samplers/upscalers stay until restart); enabling an extension that is not loaded needs a restart.
        Gated like install (ExtensionAccessError while the server is exposed, see ExtensionPolicy)."""
        self.policy.check("enable" if enabled else "disable")
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
