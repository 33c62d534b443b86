"""Extension routes: A1111's `GET /sdapi/v1/extensions`, the native `/api/v1/extensions` management routes,
and the HTTP routes extensions register (e.g. the ControlNet extension's `/controlnet/model_list`).

`install_extension_routes(app, service, manager)` adds them to an app on which `api.install` already ran
(it reuses that install's exposure policy, auth and error mapping, extension-defined routes included);
these routes take precedence over the placeholder `/sdapi/v1/extensions` of `api.sdapi`.
Install/update/remove/enable/disable obey the manager's policy: 403 when the server is reachable from the
network without --enable-insecure-extension-access.
"""

from __future__ import annotations

from typing import Any

import fastapi
from fastapi import APIRouter, Body
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ldm_core.extensions import ExtensionAccessError, ExtensionError, ExtensionManager

from .common import ApiContext, in_thread, make_route_class

__all__ = ["install_extension_routes"]


class InstallBody(BaseModel):
    url: str = Field(description="git URL, optionally with @ref (branch, tag or commit)")
    install_requirements: bool = Field(False, description="also pip-install declared requirements")


class UpdateBody(BaseModel):
    ref: str | None = Field(None, description="switch to this ref (default: the installed ref)")


def _refused(exc: Exception) -> JSONResponse:
    code = 403 if isinstance(exc, ExtensionAccessError) else 400
    return JSONResponse(status_code=code, content={"error": type(exc).__name__, "detail": str(exc)})


def _extension_route(ctx: ApiContext, handler):
    async def endpoint(request: fastapi.Request):
        body: Any = None
        if request.method == "POST":
            raw = await request.body()
            body = await request.json() if raw else None
        return jsonable_encoder(await in_thread(ctx, handler, body))

    return endpoint


def install_extension_routes(app: fastapi.FastAPI, service: Any, manager: ExtensionManager) -> None:
    """Add the extension routes to `app` (after `api.install(app, service, ...)`), served by `manager`."""
    ctx: ApiContext = getattr(app.state, "api_context", None) or ApiContext(service=service)
    route_class = make_route_class(ctx)

    sd = APIRouter(prefix="/sdapi/v1", tags=["sdapi"], route_class=route_class)

    @sd.get("/extensions")
    def a1111_extensions():
        return jsonable_encoder(manager.a1111_info())

    native = APIRouter(prefix="/api/v1/extensions", tags=["extensions"], route_class=route_class)

    @native.get("")
    def list_extensions():
        return {
            "extensions": jsonable_encoder(manager.info()),
            "changes_allowed": manager.policy.changes_allowed,
            "exposure": manager.policy.exposure(),
        }

    @native.post("/install")
    async def install(body: InstallBody):
        try:
            res = await in_thread(
                ctx, lambda: manager.install(body.url, install_requirements=body.install_requirements)
            )
        except (ExtensionAccessError, ExtensionError, ValueError) as exc:
            return _refused(exc)
        return jsonable_encoder(
            {
                "name": res.name,
                "commit": res.commit,
                "ref": res.ref,
                "url": res.url,
                "version": res.version,
                "requirements": [{"spec": r.spec, "met": r.met} for r in res.requirements],
                "pip_ran": res.pip_ran,
                "message": res.message,
            }
        )

    @native.post("/{name}/enable")
    def enable(name: str):
        return _toggle(name, True)

    @native.post("/{name}/disable")
    def disable(name: str):
        return _toggle(name, False)

    def _toggle(name: str, on: bool):
        try:
            rec = manager.set_enabled(name, on)  # gated like install: 403 while exposed
        except KeyError as exc:
            return JSONResponse(status_code=404, content={"detail": str(exc.args[0])})
        except ExtensionAccessError as exc:
            return _refused(exc)
        return {"name": rec.name, "enabled": rec.enabled, "status": rec.status, "message": rec.message}

    @native.get("/updates")
    async def updates():
        infos = await in_thread(ctx, manager.check_updates)
        return [
            {
                "name": i.name,
                "current": i.current,
                "latest": i.latest,
                "behind": i.behind,
                "has_update": i.has_update,
                "error": i.error,
            }
            for i in infos
        ]

    @native.post("/{name}/update")
    async def update(name: str, body: UpdateBody = Body(default_factory=UpdateBody)):
        try:
            info = await in_thread(ctx, manager.update, name, body.ref)
        except KeyError as exc:
            return JSONResponse(status_code=404, content={"detail": str(exc.args[0])})
        except (ExtensionAccessError, ExtensionError, ValueError) as exc:
            return _refused(exc)
        return {"name": info.name, "previous": info.current, "commit": info.latest}

    @native.post("/{name}/remove")
    async def remove(name: str):
        try:
            path = await in_thread(ctx, manager.remove, name)
        except KeyError as exc:
            return JSONResponse(status_code=404, content={"detail": str(exc.args[0])})
        except (ExtensionAccessError, ExtensionError) as exc:
            return _refused(exc)
        return {"name": name, "removed": str(path)}

    ext = APIRouter(tags=["extension routes"], route_class=route_class)
    for ext_name, route in manager.api_routes():
        ext.add_api_route(
            route.path,
            _extension_route(ctx, route.handler),
            methods=[route.method],
            summary=route.summary or f"{ext_name}: {route.path}",
            name=f"{ext_name}:{route.path}",
        )

    before = len(app.router.routes)
    for router in (sd, native, ext):
        app.include_router(router)
    # ours first, so they win over api.sdapi's placeholder /sdapi/v1/extensions
    added = app.router.routes[before:]
    del app.router.routes[before:]
    app.router.routes[0:0] = added
