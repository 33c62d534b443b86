"""Start the web UI: `python webui.py [--listen] [--port 7860] [--api] ...` (see --help).

Launch flags -> EngineConfig (over the settings in `<data dir>/config.json`, the one options store that the
Settings tab and `/sdapi/v1/options` share; a change there reaches the running engine) -> one `Service` (engine + job
queue) -> the Gradio UI (`ui.app`) and, with --api / --nowebui, the REST API (`api.install`), both on one
FastAPI app served by uvicorn. The browser may fetch files only from the outputs folder, its own uploads and
Gradio's assets, never dot-files.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent
LOCALHOST = "127.0.0.1"
ALL_INTERFACES = "0.0.0.0"
FILE_ROUTE_PREFIXES = ("/gradio_api/file=", "/file=")

log = logging.getLogger("webui")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python webui.py",
        description="A local web UI for Stable Diffusion-family models (A1111-compatible flags).",
    )
    net = p.add_argument_group("network")
    net.add_argument(
        "--listen",
        action="store_true",
        help="listen on all network interfaces (0.0.0.0) instead of 127.0.0.1 only",
    )
    net.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    net.add_argument(
        "--share",
        action="store_true",
        help="also open a public gradio.live link (needs internet; set --gradio-auth!)",
    )
    net.add_argument(
        "--gradio-auth", default=None, metavar="USER:PASS[,USER:PASS]", help="require a login for the web UI"
    )
    net.add_argument(
        "--gradio-auth-path",
        default=None,
        metavar="FILE",
        help="file with USER:PASS entries (one per line or comma-separated) for the web UI login",
    )
    net.add_argument("--api", action="store_true", help="serve the REST API (/sdapi/v1 and /api/v1) too")
    net.add_argument(
        "--api-auth",
        default=None,
        metavar="USER:PASS[,USER:PASS]",
        help="require HTTP Basic auth on the REST API",
    )
    net.add_argument("--nowebui", action="store_true", help="serve only the REST API, no web UI (implies --api)")
    net.add_argument(
        "--max-pixels",
        type=int,
        default=2048 * 2048,
        help="REST API: largest width x height of any image a job makes, hires target included (else 422)",
    )
    net.add_argument("--max-batch-size", type=int, default=16, help="REST API: largest batch_size (else 422)")
    net.add_argument(
        "--cors-allow-origins",
        default="",
        metavar="ORIGIN[,ORIGIN]",
        help="REST API: other origins (e.g. http://localhost:3000) whose web pages may send POST requests; "
        "pages of any other site are refused (403)",
    )
    models = p.add_argument_group("models and folders")
    models.add_argument(
        "--data-dir",
        default=str(REPO),
        metavar="DIR",
        help="folder with models/, embeddings/, outputs/, styles.csv, config.json (A1111 layout; "
        "default: the folder of webui.py)",
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


# ---- flags -> config ----------------------------------------------------------------------------------
def parse_auth(text: str | None) -> list[tuple[str, str]]:
    """ "user:pass,user2:pass2" (and newlines) -> [(user, pass), ...]. The password may contain ':'.
    ValueError names an entry without a user or ':'."""
    pairs = []
    for item in (text or "").replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, password = item.partition(":")
        if not sep or not user.strip():
            raise ValueError(f"auth entry {item!r} must be user:password")
        pairs.append((user.strip(), password))
    return pairs


def ui_auth(args: argparse.Namespace) -> list[tuple[str, str]]:
    text = args.gradio_auth or ""
    if args.gradio_auth_path:
        text += "\n" + Path(args.gradio_auth_path).read_text(encoding="utf-8")
    return parse_auth(text)


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
    for name in ("device", "precision", "attention"):
        if getattr(args, name):
            flags[name] = getattr(args, name)
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
    return config.with_(**flags), frozenset(flags)


def security_warnings(args: argparse.Namespace, has_ui_auth: bool) -> list[str]:
    """Warnings to print for a server reachable beyond this machine."""
    out = []
    if args.listen:
        if has_ui_auth or args.nowebui:
            out.append("Note: listening on all network interfaces (--listen): other machines can reach this server.")
        else:
            out.append(
                "WARNING: listening on all network interfaces (--listen) without --gradio-auth: anyone on "
                "your network can use this UI, run jobs and see your outputs."
            )
        if (args.api or args.nowebui) and not args.api_auth:
            out.append("WARNING: the REST API is reachable from the network without --api-auth.")
    if args.share and not has_ui_auth:
        out.append(
            "WARNING: --share without --gradio-auth: anyone with the public link can use this UI and see your outputs."
        )
    return out


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


def install_api(app, service, args: argparse.Namespace, options=None) -> bool:
    try:
        import api
    except ImportError:
        api = None
    install = getattr(api, "install", None)
    if install is None:
        print("The REST API is not available in this build (api/ is missing); --api ignored.", flush=True)
        return False
    auth = parse_auth(args.api_auth) if args.api_auth else None
    flags = {k: v for k, v in vars(args).items() if k not in ("api_auth", "gradio_auth")}
    from api.common import ApiLimits  # the protective limits A1111 lacks (a 422 names the setting)

    limits = ApiLimits(max_pixels=args.max_pixels, max_batch_size=args.max_batch_size)
    from api import split_origins

    origins = split_origins(args.cors_allow_origins)
    install(app, service, auth=auth, flags=flags, options=options, limits=limits, allowed_origins=origins)
    manager = getattr(service, "extensions", None)
    if manager is not None:
        from api.extensions_api import install_extension_routes

        install_extension_routes(app, service, manager)
    return True


def create_app(
    args: argparse.Namespace,
    service,
    settings,
    *,
    auth: list[tuple[str, str]] | None = None,
    locked: frozenset[str] = frozenset(),
):
    """The FastAPI app: the REST API (with --api / --nowebui) and the Gradio UI mounted at "/" (unless
    --nowebui), with the file-fetch guard."""
    import fastapi

    from ldm_core import __version__

    api_on = bool(args.api or args.nowebui)
    app = fastapi.FastAPI(
        title="ldm web UI",
        version=__version__,
        docs_url="/docs" if api_on else None,
        redoc_url=None,
        openapi_url="/openapi.json" if api_on else None,
    )
    if api_on:
        install_api(app, service, args, settings)
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
        flags={"listen": args.listen, "share": args.share, "locked_fields": sorted(locked)},
    )
    web = create_ui(ctx)
    outputs_dir = Path(service.engine.config.outputs_dir).resolve()
    outputs_dir.mkdir(parents=True, exist_ok=True)
    add_file_guard(app, lambda: gradio_file_roots(Path(service.engine.config.outputs_dir).resolve()))
    return gr.mount_gradio_app(
        app,
        web.blocks,
        path="/",
        auth=auth or None,
        auth_message="Log in to the web UI",
        allowed_paths=[str(outputs_dir)],
        show_error=False,
        ssr_mode=False,
        mcp_server=False,
        footer_links=["api"] if api_on else [],
        css=web.css,
        js=web.js,
        max_file_size="64mb",
        server_name=ALL_INTERFACES if args.listen else LOCALHOST,
        server_port=args.port,
    )


def serve(app, args: argparse.Namespace, service) -> int:
    """Run uvicorn until Ctrl+C; print the local URL and, with --share, try the public link."""
    import uvicorn

    host = ALL_INTERFACES if args.listen else LOCALHOST
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=args.port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.05)
    if not thread.is_alive():
        print(f"error: could not serve on {host}:{args.port} (port in use?)", file=sys.stderr)
        service.shutdown()
        return 1
    local_url = f"http://{LOCALHOST}:{args.port}/"
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from ldm_core.options import OptionsStore, bind_engine
    from ldm_core.scaleout import ray_service_args
    from ldm_core.service import make_service

    if args.install_extension:
        from ldm_core.extensions_cli import main as extensions_main

        return extensions_main(["--data-dir", str(args.data_dir), "install", args.install_extension])

    try:
        auth = ui_auth(args)
        if args.api_auth:
            parse_auth(args.api_auth)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir).expanduser().resolve()
    settings = OptionsStore(data_dir / "config.json")
    config, locked = engine_config(args, settings.all())
    for line in security_warnings(args, bool(auth)):
        print(line, flush=True)
    try:
        service = make_service(config, **ray_service_args(args))
    except (RuntimeError, ValueError) as exc:  # Ray missing, bad pool flags
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bind_engine(settings, service.engine, locked)  # a change from the UI or the API reaches the running engine
    from ldm_core.extensions import ExtensionPolicy, load_extensions

    service.extensions = load_extensions(
        service.engine,
        service.config,
        disable_all=args.disable_all_extensions,
        policy=ExtensionPolicy.from_flags(args),
    )
    load_initial_model(service, initial_model_name(args, settings.get("sd_model_checkpoint")))
    app = create_app(args, service, settings, auth=auth, locked=locked)
    return serve(app, args, service)


if __name__ == "__main__":
    raise SystemExit(main())
