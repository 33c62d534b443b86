"""API-only server: `python -m api.server --port 7861 --data-dir DIR [--api-auth user:pass]`.

Runs uvicorn on a bare FastAPI app with both API families installed (what `--nowebui` starts). The data dir
has the A1111 layout (models/Stable-diffusion, models/VAE, models/Lora, embeddings, outputs, styles.csv).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import fastapi
import uvicorn

from ldm_core import __version__
from ldm_core.config import EngineConfig
from ldm_core.extensions import ExtensionPolicy, load_extensions
from ldm_core.generation_requests import DEFAULT_MAX_BATCH_SIZE, MAX_PIXELS
from ldm_core.scaleout import add_ray_flags, ray_service_args
from ldm_core.service import make_service

from . import install, parse_auth, split_origins
from .common import ApiLimits
from .extensions_api import install_extension_routes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m api.server", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=7861)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--listen", action="store_true", help="bind 0.0.0.0 (all interfaces)")
    p.add_argument("--disable-all-extensions", action="store_true", help="load no extension")
    p.add_argument("--enable-insecure-extension-access", action="store_true",
                   help="allow installing/updating/removing extensions even when listening beyond localhost")
    p.add_argument(
        "--data-dir", default=".", help="folder with models/, embeddings/, outputs/ (A1111 layout)"
    )
    p.add_argument("--ckpt-dir", default=None)
    p.add_argument("--vae-dir", default=None)
    p.add_argument("--lora-dir", default=None)
    p.add_argument("--embeddings-dir", default=None)
    p.add_argument("--outputs-dir", default=None)
    p.add_argument("--no-builtin-model", action="store_true", help="do not offer the built-in model")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    p.add_argument("--attention", default="auto")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pt checkpoints (weights only)")
    p.add_argument("--api-auth", default=None, help="user:pass[,user2:pass2] for HTTP Basic auth")
    p.add_argument(
        "--api-auth-path", default=None, help="file with user:pass entries (one per line or comma)"
    )
    p.add_argument("--max-queued", type=int, default=64, help="queued jobs beyond which requests get 503")
    p.add_argument("--max-body-mb", type=float, default=50.0, help="largest request body, MiB (else 413)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        help=f"largest width x height of any image a job makes, hires target included (else 422; "
        f"default {MAX_PIXELS})",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=DEFAULT_MAX_BATCH_SIZE,
        help=f"largest batch_size (else 422; default {DEFAULT_MAX_BATCH_SIZE}); n_iter is not capped",
    )
    p.add_argument(
        "--cors-allow-origins",
        default="",
        metavar="ORIGIN[,ORIGIN]",
        help="REST API: other origins (e.g. http://localhost:3000) whose web pages may send POST requests; "
        "pages of any other site are refused (403)",
    )
    p.add_argument("--log-level", default="info")
    add_ray_flags(p.add_argument_group("Ray pool (optional: pip install -r requirements-ray.txt)"))
    return p


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    over: dict = {
        "device": args.device,
        "precision": args.precision,
        "attention": args.attention,
        "allow_pickle": args.allow_pickle,
    }
    for flag, fieldname in (
        ("ckpt_dir", "ckpt_dirs"),
        ("vae_dir", "vae_dirs"),
        ("lora_dir", "lora_dirs"),
        ("embeddings_dir", "embeddings_dirs"),
    ):
        if getattr(args, flag):
            over[fieldname] = (Path(getattr(args, flag)),)
    if args.outputs_dir:
        over["outputs_dir"] = Path(args.outputs_dir)
    if args.no_builtin_model:
        over["builtin_model_dir"] = None
    return EngineConfig.from_data_dir(args.data_dir, **over)


def _auth(args: argparse.Namespace) -> list[tuple[str, str]] | None:
    parts = [args.api_auth or ""]
    if args.api_auth_path:
        parts.append(",".join(Path(args.api_auth_path).read_text(encoding="utf-8").split()))
    return parse_auth(",".join(p for p in parts if p))


def host_name(args: argparse.Namespace) -> str:
    return "0.0.0.0" if args.listen else args.host


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        service = make_service(config_from_args(args), max_queued=args.max_queued, **ray_service_args(args))
    except (RuntimeError, ValueError) as exc:  # Ray missing, bad pool flags
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = fastapi.FastAPI(
        title="ldm-webui API",
        version=__version__,
        description="A1111-compatible /sdapi/v1 and the native /api/v1 jobs API",
    )
    flags = {k: v for k, v in vars(args).items() if k not in ("api_auth",)}
    manager = load_extensions(
        service.engine, service.config, disable_all=args.disable_all_extensions,
        policy=ExtensionPolicy(listen=args.listen, share=False, server_name=host_name(args),
                               allow_insecure=args.enable_insecure_extension_access),
    )
    service.extensions = manager  # as webui.py does (a Ray pool's replicas load the same extensions)
    limits = ApiLimits(max_pixels=args.max_pixels, max_batch_size=args.max_batch_size)
    install(
        app, service, auth=_auth(args), flags=flags, max_body_bytes=int(args.max_body_mb * 2**20), limits=limits,
        allowed_origins=split_origins(args.cors_allow_origins),
    )
    install_extension_routes(app, service, manager)
    host = host_name(args)
    try:
        uvicorn.run(app, host=host, port=args.port, log_level=args.log_level.lower(), access_log=False)
    finally:
        service.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
