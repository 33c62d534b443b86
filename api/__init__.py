"""The REST API: A1111's `/sdapi/v1` (so existing clients work) and the native `/api/v1` jobs API, both thin
clients of the same `ldm_core.service.Service` and its job queue as the web UI.

`install(app, service, ...)` adds both route families to a FastAPI app (the one `webui.py` builds, also for
`--nowebui` and `python -m api.server`). The exposure policy (Host check, refusal while exposed without a
login), auth, the body size limit and the error mapping apply to these routes; `/docs` and `/openapi.json` get
the Host check and, while exposed, the refusal and the login. Logins are parsed by
`ldm_core.exposure.parse_auth` (re-exported here).
"""

from __future__ import annotations

from pathlib import Path

import fastapi
from fastapi import Depends
from fastapi.security import HTTPBasic

from ldm_core.exposure import ExposurePolicy, credentials, parse_auth
from ldm_core.options import OptionsStore, bind_engine

from . import jobs_api, sdapi
from .common import ApiContext, ApiLimits, access_refusal, host_refusal

__all__ = ["install", "parse_auth", "split_origins"]


def split_origins(text: str | None) -> list[str]:
    """The --cors-allow-origins value as a list of origins."""
    return [o.strip() for o in (text or "").split(",") if o.strip()]


def install(
    app: fastapi.FastAPI,
    service,
    *,
    auth: list[tuple[str, str]] | None = None,
    flags: dict | None = None,
    max_body_bytes: int = 50 * 2**20,
    limits: ApiLimits | None = None,
    options: OptionsStore | None = None,
    allowed_origins: tuple[str, ...] | list[str] = (),
    exposure: ExposurePolicy | None = None,
) -> None:
    """Add `/sdapi/v1/*` and `/api/v1/*` to `app`, served by `service` (an `ldm_core.service.Service`).

    `auth`: HTTP Basic credentials required on every API route (None: open). `flags`: the launch flags,
    returned by `/sdapi/v1/cmd-flags`. `max_body_bytes`: larger request bodies get 413. `limits`: the
    protective limits (pixels, batch size) whose excess gets a 422 naming the setting. `options`: the one
    options store, shared with the web UI's Settings tab (webui.py passes it and applies it to the engine);
    without it the API opens `<data dir>/config.json` itself and applies its live options to the engine
    (a launch flag's folder, e.g. --outputs-dir, still wins). `allowed_origins`: other sites whose pages may
    send state-changing requests (--cors-allow-origins); pages of any other origin get 403. `exposure`: the
    launch's policy (`ldm_core.exposure`): a refused Host gets 403, an exposed server without a login refuses
    every API request (403 naming the flags), and its `api_credentials` (--api-auth, plus --gradio-auth while
    exposed) are required besides `auth`. None: no Host check, `auth` alone (tests, embedding apps).
    """
    ctx = ApiContext(
        service=service,
        flags=dict(flags or {}),
        auth=list(credentials(auth, exposure.api_credentials if exposure else ())) or None,
        max_body_bytes=int(max_body_bytes),
        limits=limits or ApiLimits(),
        allowed_origins=tuple(allowed_origins),
        exposure=exposure,
    )
    if options is None:
        options = OptionsStore(Path(service.engine.config.data_dir) / "config.json")
        locked = {"outputs_dir"} if (flags or {}).get("outputs_dir") else set()
        bind_engine(options, service.engine, locked)
    ctx.options = options
    try:
        from ldm_core.prompts.styles import StyleStore

        ctx.styles = StyleStore(Path(service.engine.config.data_dir) / "styles.csv")
    except ImportError:  # pragma: no cover - styles module missing
        ctx.styles = None
    ctx.upscalers = getattr(service.engine, "upscalers", None) or _upscaler_registry(service.engine)
    # the security scheme only documents Basic auth in OpenAPI; the route class enforces it
    deps = [Depends(HTTPBasic(auto_error=False))] if ctx.auth else []
    app.include_router(sdapi.build_router(ctx), dependencies=deps)
    app.include_router(jobs_api.build_router(ctx), dependencies=deps)
    app.state.api_context = ctx
    _guard_docs(app, ctx)


DOC_PATHS = ("/docs", "/openapi.json", "/redoc")


def _guard_docs(app: fastapi.FastAPI, ctx: ApiContext) -> None:
    """The schema and docs pages, which FastAPI serves itself, get the Host check and, while the server is
    exposed, the API's refusal and login; on loopback they stay open, as in A1111."""
    policy = ctx.exposure
    if policy is None:
        return

    @app.middleware("http")
    async def docs_guard(request: fastapi.Request, call_next):
        if request.url.path.rstrip("/") in DOC_PATHS or request.url.path.startswith("/docs/"):
            refused = access_refusal(ctx, request) if policy.exposed else host_refusal(policy, request)
            if refused is not None:
                return refused
        return await call_next(request)


def _upscaler_registry(engine):
    """An upscaler registry for the engine's folders and device (until the engine owns one)."""
    from ldm_core.upscalers import UpscalerRegistry

    cfg = engine.config
    return UpscalerRegistry(
        list(cfg.upscaler_dirs),
        device=engine.policy.device,
        dtype=engine.policy.dtype,
        allow_pickle=cfg.allow_pickle,
    )
