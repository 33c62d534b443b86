"""Start the web UI: `python webui.py [--listen] [--port 7860] [--api] ...` (see --help). The one launcher:
`python webui.py --nowebui` and `python -m api.server` (port 7861) run this same code.

Launch flags -> logins and the exposure policy (`ldm_core.exposure`: who can reach the server and what that
allows) -> EngineConfig (over the settings in `<data dir>/config.json`, the one options store that the Settings
tab and `/sdapi/v1/options` share; a change there reaches the running engine) -> one `Service` (engine + job
queue) -> the Gradio UI (`ui.app`) and, with --api / --nowebui, the REST API (`api.install`), both on one
FastAPI app served by uvicorn. Every request's Host header is checked (DNS rebinding); the browser may fetch
files only from the outputs folder, its own uploads and Gradio's assets, never dot-files.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

from ldm_core import exposure

REPO = Path(__file__).resolve().parent
LOCALHOST = exposure.LOOPBACK
ALL_INTERFACES = exposure.ALL_INTERFACES
FILE_ROUTE_PREFIXES = ("/gradio_api/file=", "/file=")

log = logging.getLogger("webui")


def build_parser(*, api_only: bool = False) -> argparse.ArgumentParser:
    """The launch flags (A1111 names). `api_only`: the `python -m api.server` defaults (REST API only, port
    7861, data dir = the current folder); everything else is the same launcher."""
    from ldm_core.generation_requests import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_STEPS, MAX_PIXELS

    p = argparse.ArgumentParser(
        prog="python -m api.server" if api_only else "python webui.py",
        description=(
            "The REST API only (the same launcher as `python webui.py --nowebui`, on port 7861)."
            if api_only
            else "A local web UI for Stable Diffusion-family models (A1111-compatible flags)."
        ),
    )
    net = p.add_argument_group("network and access (README: Exposure)")
    net.add_argument(
        "--listen",
        action="store_true",
        help="listen on all network interfaces (0.0.0.0) instead of 127.0.0.1 only",
    )
    net.add_argument(
        "--server-name",
        "--host",
        dest="server_name",
        default=None,
        metavar="ADDRESS",
        help="interface or name to bind (default: 127.0.0.1; 0.0.0.0 with --listen); anything but a loopback "
        "name counts as exposed, like --listen",
    )
    net.add_argument(
        "--port",
        type=int,
        default=7861 if api_only else 7860,
        help=f"port to serve on (default: {7861 if api_only else 7860})",
    )
    net.add_argument(
        "--share",
        action="store_true",
        help="also open a public gradio.live link (needs internet; set --gradio-auth!)",
    )
    net.add_argument(
        "--gradio-auth",
        default=None,
        metavar="USER:PASS[,USER:PASS]",
        help="require a login for the web UI (split on the first ':', so a password may hold ':' and spaces; "
        "while exposed the REST API accepts it too)",
    )
    net.add_argument(
        "--gradio-auth-path",
        default=None,
        metavar="FILE",
        help="file with one USER:PASS login per line (the rest of the line is the password, commas included)",
    )
    net.add_argument("--api", action="store_true", help="serve the REST API (/sdapi/v1 and /api/v1) too")
    net.add_argument(
        "--api-auth",
        default=None,
        metavar="USER:PASS[,USER:PASS]",
        help="require HTTP Basic auth on the REST API",
    )
    net.add_argument(
        "--api-auth-path",
        default=None,
        metavar="FILE",
        help="file with one USER:PASS login per line for the REST API",
    )
    net.add_argument(
        "--nowebui",
        action="store_true",
        default=api_only,
        help="serve only the REST API, no web UI (implies --api)" + (" (always on here)" if api_only else ""),
    )
    net.add_argument(
        "--insecure-expose",
        action="store_true",
        help="when listening or sharing: serve the REST API without a login and let anyone who can reach the "
        "server change folder settings (off: the API is refused without --api-auth/--gradio-auth, and the "
        "folder settings are locked)",
    )
    net.add_argument(
        "--allowed-hosts",
        default="",
        metavar="NAME[,NAME]",
        help="other Host names to answer to, e.g. behind a reverse proxy (.example.com: its sub-domains too; "
        "*: any). IP addresses, localhost, --server-name and, with --listen, this machine's names always work",
    )
    net.add_argument(
        "--cors-allow-origins",
        default="",
        metavar="ORIGIN[,ORIGIN]",
        help="REST API: other origins (e.g. http://localhost:3000) whose web pages may send POST requests; "
        "pages of any other site are refused (403)",
    )
    net.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        help=f"REST API: largest width x height of any image a job makes, hires target included (else 422; "
        f"default {MAX_PIXELS})",
    )
    net.add_argument(
        "--max-batch-size",
        type=int,
        default=DEFAULT_MAX_BATCH_SIZE,
        help=f"REST API: largest batch_size (else 422; default {DEFAULT_MAX_BATCH_SIZE}); n_iter is not capped",
    )
    net.add_argument(  # issue 16: 10**9 steps allocated GBs of sigmas and killed the server
        "--max-steps",
        type=int,
        default=DEFAULT_MAX_STEPS,
        help=f"REST API: largest steps / hr_second_pass_steps (else 422; default {DEFAULT_MAX_STEPS})",
    )
    net.add_argument("--max-queued", type=int, default=64, help="queued jobs beyond which requests get 503")
    net.add_argument("--max-body-mb", type=float, default=50.0, help="REST API: largest request body, MiB (else 413)")
    models = p.add_argument_group("models and folders")
    models.add_argument(
        "--data-dir",
        default="." if api_only else str(REPO),
        metavar="DIR",
        help="folder with models/, embeddings/, outputs/, styles.csv, config.json (A1111 layout; "
        + ("default: the current folder)" if api_only else "default: the folder of webui.py)"),
    )
    models.add_argument(
        "--outputs-dir",
        default=None,
        metavar="DIR",
        help="folder for generated images (default: <data dir>/outputs, or the Settings tab's output folder)",
    )
    models.add_argument(
        "--ckpt",
        default=None,
        metavar="FILE_OR_NAME",
        help="checkpoint to load at start: a file path, or a name/title from the checkpoint list",
    )
    models.add_argument(
        "--ckpt-dir",
        default=None,
        metavar="DIR",
        help="folder of checkpoints (default: <data dir>/models/Stable-diffusion)",
    )
    models.add_argument("--vae-dir", default=None, metavar="DIR", help="folder of VAEs (default: models/VAE)")
    models.add_argument("--lora-dir", default=None, metavar="DIR", help="folder of LoRAs (default: models/Lora)")
    models.add_argument(
        "--embeddings-dir",
        default=None,
        metavar="DIR",
        help="folder of textual-inversion embeddings (default: embeddings)",
    )
    models.add_argument("--no-builtin-model", action="store_true", help="do not offer the built-in model")
    models.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow .ckpt/.pt pickle checkpoints (loaded with weights_only=True); only for files you trust",
    )
    dev = p.add_argument_group("device and memory")
    dev.add_argument(
        "--device",
        default=None,
        metavar="DEVICE",
        help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:1, mps (default: auto)",
    )
    dev.add_argument(
        "--precision",
        default=None,
        choices=["auto", "fp16", "bf16", "fp32"],
        help="model weights precision (default: auto = fp16 on CUDA, fp32 elsewhere)",
    )
    dev.add_argument(
        "--attention",
        default=None,
        metavar="NAME",
        help="attention backend: auto, sdpa, xformers (only if it works), sliced (low memory)",
    )
    dev.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch CPU threads (default: all CPUs but one, at least 1; idle threads sleep; README: Speed)",
    )
    comp = dev.add_mutually_exclusive_group()
    comp.add_argument(
        "--compile",
        dest="compile",
        action="store_const",
        const="on",
        default=None,
        help="torch.compile the UNet and VAE decoder on any device (default: on CUDA only; on a CPU the first image "
        "waits ~1 min, then images take ~0.56x the time, ~0.47x with --precision bf16 on a CPU with AMX/AVX512-BF16)",
    )
    comp.add_argument("--no-compile", dest="compile", action="store_const", const="off", help="never torch.compile")
    mem = dev.add_mutually_exclusive_group()
    mem.add_argument(
        "--medvram",
        action="store_true",
        help="keep only the model part in use on the GPU (model CPU offload)",
    )
    mem.add_argument(
        "--lowvram",
        action="store_true",
        help="move weights to the GPU layer by layer (sequential offload; slowest, least memory)",
    )
    ext = p.add_argument_group("extensions")
    ext.add_argument("--disable-all-extensions", action="store_true", help="start without loading any extension")
    ext.add_argument(
        "--enable-insecure-extension-access",
        action="store_true",
        help="allow installing/updating/removing extensions even with --listen/--share (off by default)",
    )
    ext.add_argument(
        "--install-extension",
        metavar="URL[@REF]",
        default=None,
        help="clone an extension from git (pinned to the commit), print it, and exit; its code is not run",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="server log level (default: info)",
    )
    from ldm_core.scaleout import add_ray_flags

    add_ray_flags(p.add_argument_group("Ray pool (optional: pip install -r requirements-ray.txt; docs/scaling.md)"))
    return p


# ---- flags -> logins, exposure policy, config ---------------------------------------------------------
def parse_auth(text: str | None) -> list[tuple[str, str]]:
    """A login flag's value ("user:pass,user2:pass2", newlines also separate) -> [(user, pass), ...]; split
    on the first ':' (ldm_core.exposure.parse_auth, the one parser). ValueError names the bad entry."""
    return exposure.parse_auth(text, flag="--gradio-auth/--api-auth")


def logins(args: argparse.Namespace) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
    """(web UI logins, REST API logins, warnings) from --gradio-auth[-path] and --api-auth[-path].
    OSError/ValueError name the flag, file and line."""
    ui = exposure.parse_auth(args.gradio_auth, flag="--gradio-auth")
    api = exposure.parse_auth(args.api_auth, flag="--api-auth")
    warnings: list[str] = []
    for path, flag, into in (
        (args.gradio_auth_path, "--gradio-auth-path", ui),
        (getattr(args, "api_auth_path", None), "--api-auth-path", api),
    ):
        if path:
            pairs, notes = exposure.parse_auth_file(path, flag=flag)
            if not pairs:
                raise ValueError(f"{flag} {path}: no USER:PASSWORD line")
            into += pairs
            warnings += notes
    return ui, api, warnings


def ui_auth(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The web UI's logins (--gradio-auth and --gradio-auth-path)."""
    return logins(args)[0]


def bind_address(args: argparse.Namespace) -> str:
    """The address uvicorn binds: --server-name, else 0.0.0.0 with --listen, else 127.0.0.1 (A1111's rule)."""
    return args.server_name or (ALL_INTERFACES if args.listen else LOCALHOST)


def exposure_policy(
    args: argparse.Namespace,
    ui: list[tuple[str, str]] | tuple = (),
    api: list[tuple[str, str]] | tuple = (),
) -> exposure.ExposurePolicy:
    """The exposure policy of these flags and logins (ldm_core.exposure), with this machine's host names."""
    return exposure.ExposurePolicy(
        server_name=bind_address(args),
        port=args.port,
        share=bool(args.share),
        api_auth=exposure.credentials(api),
        ui_auth=exposure.credentials(ui),
        insecure_expose=bool(getattr(args, "insecure_expose", False)),
        allowed_hosts=tuple(h.strip() for h in (getattr(args, "allowed_hosts", "") or "").split(",") if h.strip()),
        machine_names=exposure.machine_names([socket.gethostname()]),
        api_enabled=bool(args.api or args.nowebui),
    )


def security_warnings(args: argparse.Namespace, has_ui_auth: bool) -> list[str]:
    """What to print at start for a server reachable beyond this machine (the exposure policy's messages)."""
    ui = [("user", "set")] if has_ui_auth else []
    api = [("user", "set")] if args.api_auth else []
    return exposure_policy(args, ui, api).messages(ui=not args.nowebui)


def engine_config(args: argparse.Namespace, settings_values: dict[str, Any]):
    """(EngineConfig, fields set by flags). Settings from config.json apply first; flags win."""
    from ldm_core.config import EngineConfig
    from ldm_core.options import config_from_options

    data_dir = Path(args.data_dir).expanduser().resolve()
    flags: dict[str, Any] = {}
    for flag, field in (
        ("ckpt_dir", "ckpt_dirs"),
        ("vae_dir", "vae_dirs"),
        ("lora_dir", "lora_dirs"),
        ("embeddings_dir", "embeddings_dirs"),
    ):
        if getattr(args, flag):
            flags[field] = (Path(getattr(args, flag)).expanduser().resolve(),)
    if getattr(args, "outputs_dir", None):
        flags["outputs_dir"] = Path(args.outputs_dir).expanduser().resolve()
    for name in ("device", "precision", "attention"):
        if getattr(args, name) and getattr(args, name) != "auto":
            flags[name] = getattr(args, name)
    if getattr(args, "compile", None):
        flags["compile"] = args.compile
    if args.medvram:
        flags["offload"] = "model"
    if args.lowvram:
        flags["offload"] = "sequential"
    if args.allow_pickle:
        flags["allow_pickle"] = True
    if args.no_builtin_model:
        flags["builtin_model_dir"] = None
    base = EngineConfig.from_data_dir(data_dir)
    config = config_from_options(base, settings_values, locked=frozenset(flags))
    if args.ckpt and Path(args.ckpt).expanduser().exists():
        # a checkpoint file outside the checkpoint folders: offer its folder too
        folder = Path(args.ckpt).expanduser().resolve().parent
        dirs = flags.get("ckpt_dirs", config.ckpt_dirs)
        if folder not in dirs:
            flags["ckpt_dirs"] = (*dirs, folder)
    return config.with_(**flags).with_shipped_addons(), frozenset(flags)


# ---- files the browser may fetch ----------------------------------------------------------------------
def fetch_allowed(path_text: str, roots: list[Path]) -> bool:
    """Whether a browser may fetch `path_text` through Gradio's file route: it must lie inside one of
    `roots` (after resolving "..", links) with no dot-file or dot-folder below that root."""
    try:
        path = Path(path_text).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return False
    for root in roots:
        try:
            rel = path.relative_to(root.resolve())
        except ValueError:
            continue
        return not any(part.startswith(".") for part in rel.parts)
    return False


def add_file_guard(app, roots_fn) -> None:
    """Middleware: 403 for file-route requests outside `roots_fn()` or naming a dot-file."""
    from starlette.responses import PlainTextResponse

    @app.middleware("http")
    async def guard(request, call_next):
        path = request.url.path
        for prefix in FILE_ROUTE_PREFIXES:
            at = path.find(prefix)
            if at >= 0:
                target = path[at + len(prefix) :]
                if not target.startswith(("http://", "https://")) and not fetch_allowed(target, roots_fn()):
                    return PlainTextResponse("File not allowed.", status_code=403)
                break
        return await call_next(request)


def gradio_file_roots(outputs_dir: Path) -> list[Path]:
    """The outputs folder, Gradio's upload/cache folder, and Gradio's own static paths."""
    from gradio import utils as gr_utils
    from gradio.data_classes import _StaticFiles

    roots = [outputs_dir, Path(gr_utils.get_upload_folder()), Path(gr_utils.get_cache_folder())]
    roots += [Path(p) for p in _StaticFiles.all_paths]
    return roots


# ---- start ---------------------------------------------------------------------------------------------
def load_initial_model(service, name: str | None) -> None:
    """Load `name` (or the default checkpoint) so sizes and the checkpoint menu show the real model.
    A failure is printed and the server starts anyway."""
    try:
        if name:
            title = service.switch_model(name)
        else:
            model = service.run_task(lambda ctx: service.engine.load_checkpoint(None), kind="load-model")
            title = model.entry.title
        print(f"Model loaded: {title}", flush=True)
    except Exception as exc:
        dirs = service.engine.config.ckpt_dirs
        folder = dirs[0] if dirs else "models/Stable-diffusion"
        print(
            f"Could not load a model ({exc}); the UI starts without one. Put a checkpoint in {folder} "
            "and press the refresh button.",
            flush=True,
        )


def initial_model_name(args: argparse.Namespace, saved: str) -> str | None:
    if args.ckpt:
        p = Path(args.ckpt).expanduser()
        return p.name if p.exists() else args.ckpt
    return saved or None


def open_share_tunnel(port: int, local_url: str) -> None:
    """Try the public gradio.live tunnel; print its URL or one line saying it is unavailable."""
    try:
        from gradio import networking

        url = networking.setup_tunnel(LOCALHOST, port, secrets.token_urlsafe(32), None, None)
        print(f"Running on public URL: {url}", flush=True)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"Could not open the --share link ({reason}); still serving locally at {local_url}", flush=True)


class HostGuard:
    """ASGI middleware: a request or WebSocket whose `Host` header the exposure policy refuses (DNS
    rebinding) gets 403 naming --allowed-hosts, before any route (UI, API, files) sees it."""

    def __init__(self, app, policy: exposure.ExposurePolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            from starlette.datastructures import Headers
            from starlette.responses import JSONResponse

            host = Headers(scope=scope).get("host")
            if not self.policy.host_allowed(host):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008, "reason": "Host refused"})
                    return
                detail = {"error": "ForeignHost", "detail": self.policy.host_refusal(host)}
                await JSONResponse(detail, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def install_api(app, launch: Launch) -> bool:
    """Add the REST API (and the extensions' routes) to `app`, guarded by the launch's exposure policy."""
    try:
        import api
    except ImportError:
        api = None
    install = getattr(api, "install", None)
    if install is None:
        print("The REST API is not available in this build (api/ is missing); --api ignored.", flush=True)
        return False
    args = launch.args
    secret = ("api_auth", "gradio_auth", "api_auth_path", "gradio_auth_path")
    flags = {k: v for k, v in vars(args).items() if k not in secret}
    from api.common import ApiLimits  # the protective limits A1111 lacks (a 422 names the setting)

    limits = ApiLimits(max_pixels=args.max_pixels, max_batch_size=args.max_batch_size, max_steps=args.max_steps)
    install(
        app,
        launch.service,
        flags=flags,
        options=launch.settings,
        limits=limits,
        max_body_bytes=int(args.max_body_mb * 2**20),
        allowed_origins=api.split_origins(args.cors_allow_origins),
        exposure=launch.policy,
    )
    manager = getattr(launch.service, "extensions", None)
    if manager is not None:
        from api.extensions_api import install_extension_routes

        install_extension_routes(app, launch.service, manager)
    return True


@dataclass
class Launch:
    """What one start of the server is made of, built by `prepare` for `webui.py` and `python -m api.server`
    alike: the flags, the exposure policy, the web UI's logins, the one options store, the service (engine +
    queue, extensions loaded) and the EngineConfig fields the flags set (locked against the settings)."""

    args: argparse.Namespace
    policy: exposure.ExposurePolicy
    ui_auth: list[tuple[str, str]]
    settings: Any  # ldm_core.options.OptionsStore
    service: Any  # ldm_core.service.Service (or a RayService)
    locked: frozenset[str]
    warnings: list[str] = dc_field(default_factory=list)

    @classmethod
    def of(cls, args: argparse.Namespace, service: Any, settings: Any) -> Launch:
        """A launch for an existing service and options store (its logins and policy from `args`)."""
        ui, api, warnings = logins(args)
        return cls(args, exposure_policy(args, ui, api), ui, settings, service, frozenset(), warnings)


def prepare(args: argparse.Namespace) -> Launch:
    """Logins and exposure policy, the options store (folder settings locked while exposed), EngineConfig,
    service and extensions: the one start-up path. OSError/ValueError/RuntimeError say what is wrong."""
    from ldm_core.extensions import ExtensionPolicy, load_extensions
    from ldm_core.options import OptionsStore, bind_engine
    from ldm_core.scaleout import ray_service_args
    from ldm_core.service import make_service

    ui, api, warnings = logins(args)
    policy = exposure_policy(args, ui, api)
    data_dir = Path(args.data_dir).expanduser().resolve()
    settings = OptionsStore(data_dir / "config.json", locked=policy.locked_options())
    config, locked = engine_config(args, settings.all())
    service = make_service(config, max_queued=args.max_queued, **ray_service_args(args))
    bind_engine(settings, service.engine, locked)  # a change from the UI or the API reaches the running engine
    service.extensions = load_extensions(
        service.engine,
        service.config,
        disable_all=args.disable_all_extensions,
        policy=ExtensionPolicy(
            listen=bool(args.listen),
            share=policy.share,
            server_name=policy.server_name,
            allow_insecure=bool(args.enable_insecure_extension_access),
        ),
    )
    return Launch(args, policy, ui, settings, service, locked, warnings)


def create_app(launch: Launch):
    """The FastAPI app: the REST API (with --api / --nowebui) and the Gradio UI mounted at "/" (unless
    --nowebui), behind the Host guard and the file-fetch guard."""
    import fastapi

    from ldm_core import __version__

    args, service, settings = launch.args, launch.service, launch.settings
    api_on = bool(args.api or args.nowebui)
    app = fastapi.FastAPI(
        title="ldm web UI",
        version=__version__,
        description="A1111-compatible /sdapi/v1 and the native /api/v1 jobs API",
        docs_url="/docs" if api_on else None,
        redoc_url=None,
        openapi_url="/openapi.json" if api_on else None,
    )
    app.add_middleware(HostGuard, policy=launch.policy)
    if api_on:
        install_api(app, launch)
    if args.nowebui:
        return app
    import gradio as gr

    from ui.app import create_ui
    from ui.common import UiContext

    data_dir = Path(args.data_dir).expanduser().resolve()
    styles = getattr(service.engine, "styles", None)  # one store shared with the engine, which applies styles
    if styles is None:
        from ldm_core.prompts.styles import StyleStore

        styles = StyleStore(data_dir / "styles.csv")
    ctx = UiContext(
        service=service,
        settings=settings,
        styles=styles,
        data_dir=data_dir,
        flags={
            "listen": bool(args.listen),
            "share": args.share,
            "server_name": launch.policy.server_name,
            "enable_insecure_extension_access": args.enable_insecure_extension_access,
            "locked_fields": sorted(launch.locked),
            "exposure_messages": launch.policy.messages(),
        },
    )
    web = create_ui(ctx)
    outputs_dir = Path(service.engine.config.outputs_dir).resolve()
    outputs_dir.mkdir(parents=True, exist_ok=True)
    add_file_guard(app, lambda: gradio_file_roots(Path(service.engine.config.outputs_dir).resolve()))
    return gr.mount_gradio_app(
        app,
        web.blocks,
        path="/",
        auth=launch.ui_auth or None,
        auth_message="Log in to the web UI",
        allowed_paths=[str(outputs_dir)],
        show_error=False,
        ssr_mode=False,
        mcp_server=False,
        footer_links=["api"] if api_on else [],
        css=web.css,
        js=web.js,
        max_file_size="64mb",
        server_name=launch.policy.server_name,
        server_port=args.port,
    )


def serve(app, launch: Launch) -> int:
    """Run uvicorn until Ctrl+C; print the local URL and, with --share, try the public link."""
    import uvicorn

    args, service = launch.args, launch.service
    host = launch.policy.server_name
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=args.port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.05)
    if not thread.is_alive():
        print(f"error: could not serve on {host}:{args.port} (port in use?)", file=sys.stderr)
        service.shutdown()
        return 1
    shown = LOCALHOST if host in (ALL_INTERFACES, "::", "") else host
    local_url = f"http://{f'[{shown}]' if ':' in shown else shown}:{args.port}/"
    print(f"Running on local URL: {local_url}" + ("  (REST API only)" if args.nowebui else ""), flush=True)
    if args.share:
        threading.Thread(target=open_share_tunnel, args=(args.port, local_url), daemon=True).start()
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        print("Stopping…", flush=True)
        server.should_exit = True
        thread.join(5)
    finally:
        service.shutdown()
    return 0


def main(argv: list[str] | None = None, *, api_only: bool = False) -> int:
    """`python webui.py` (and, with `api_only`, `python -m api.server`): flags -> `prepare` -> messages ->
    initial model (web UI only; the API loads one at its first job) -> `create_app` -> `serve`."""
    args = build_parser(api_only=api_only).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.install_extension:
        from ldm_core.extensions_cli import main as extensions_main

        return extensions_main(["--data-dir", str(args.data_dir), "install", args.install_extension])
    from ldm_core.threads import prepare_process, thread_policy

    try:
        threads = thread_policy(args.threads)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    prepare_process(threads)  # before torch starts its OpenMP threads
    threads.apply()
    try:
        launch = prepare(args)
    except (OSError, ValueError, RuntimeError) as exc:  # bad logins or auth file, Ray missing, bad pool flags
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in [*launch.warnings, *launch.policy.messages(ui=not args.nowebui)]:
        print(line, flush=True)
    if not args.nowebui:
        load_initial_model(launch.service, initial_model_name(args, launch.settings.get("sd_model_checkpoint")))
    app = create_app(launch)
    return serve(app, launch)


if __name__ == "__main__":
    raise SystemExit(main())
