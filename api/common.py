"""What both API families share: the per-install context, the route class that applies auth, the body size
limit and the error mapping, blocking work in threads, and job submission with early choice checks.

Bodies: a POST body that parses as JSON is read as JSON whatever its Content-Type (missing, text/plain,
application/x-www-form-urlencoded), as A1111 clients posting `data=json.dumps(payload)` expect.

Exposure (`ldm_core.exposure`, the launch's policy in `ApiContext.exposure`): before anything else a request
whose `Host` the policy refuses gets 403 `ForeignHost` (DNS rebinding; --allowed-hosts), and a server reachable
from the network without any login refuses every API request with 403 `LoginRequired` naming --api-auth,
--gradio-auth and --insecure-expose; then the login is checked (401).

Origins: a state-changing request (POST, PUT, PATCH, DELETE) that carries a browser's `Origin` header for
another site than the one it is sent to is refused with 403, so a web page the user visits cannot drive
this server (cross-site request forgery: a page may post `text/plain` JSON without a preflight, and the
bodies above are read whatever their content type). Python, Go, Rust and plugin clients send no `Origin`
and are not affected; the server's own pages are same-origin. `--cors-allow-origins` lists other origins
that may (e.g. a front-end served on another port).

Limits (`ApiLimits`, set by server flags): a request over a protective limit gets a 422 that names the setting,
e.g. `max_pixels` (--max-pixels) or `max_batch_size` (--max-batch-size); the queue limit gives 503.

Errors: bad input (pydantic or `RequestError`) -> 422 `{"detail": [{"loc": [...], "msg": ..., "type": ...}]}`;
a full queue -> 503; a wrong or missing password -> 401; a body over the limit -> 413; anything unexpected
-> 500 `{"error": <type>, "detail": <message>}` (logged; the server keeps serving).
"""

from __future__ import annotations

import base64
import binascii
import email.message
import json
import logging
import math
import secrets
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import HTTPException, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from ldm_core.generation_requests import (
    GenerationRequest,
    RequestError,
    RequestLimits,
    check_limits,
)
from ldm_core.jobs import Job, QueueFull

log = logging.getLogger(__name__)
T = TypeVar("T")
GENERATION_KINDS = ("txt2img", "img2img", "inpaint")


ApiLimits = RequestLimits  # the server's protective limits (ldm_core.generation_requests); the queue's cap gives 503


@dataclass
class ApiContext:
    """Everything the routes of one `install()` share. `options` are the A1111 settings kept by the API
    (guarded by `lock`); `limiter` bounds the threads that wait on jobs (separate from FastAPI's pool)."""

    service: Any
    flags: dict[str, Any] = field(default_factory=dict)
    auth: list[tuple[str, str]] | None = None
    max_body_bytes: int = 50 * 2**20
    options: Any = field(default_factory=dict)  # the ldm_core.options.OptionsStore (install() sets it)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # held while a job and its override-restoring tasks are queued together (api/overrides.py)
    queue_lock: threading.Lock = field(default_factory=threading.Lock)
    limiter: anyio.CapacityLimiter | None = None
    upscalers: Any = None  # an ldm_core.upscalers.UpscalerRegistry
    styles: Any = None  # a StyleStore
    limits: ApiLimits = field(default_factory=ApiLimits)
    allowed_origins: tuple[str, ...] = ()  # other origins whose pages may post here (--cors-allow-origins)
    exposure: Any = None  # the launch's ldm_core.exposure.ExposurePolicy (None: no Host check, no refusal)

    @property
    def engine(self):
        return self.service.engine


async def in_thread(ctx: ApiContext, fn: Callable[..., T], *args: Any) -> T:
    """Run blocking `fn(*args)` off the event loop (job waits, model switches, image encoding)."""
    if ctx.limiter is None:
        ctx.limiter = anyio.CapacityLimiter(256)
    return await anyio.to_thread.run_sync(fn, *args, limiter=ctx.limiter, abandon_on_cancel=True)


def error_detail(field_path: list[str] | str, message: str, kind: str = "value_error") -> list[dict]:
    loc = ["body", *([field_path] if isinstance(field_path, str) else field_path)]
    return [{"loc": loc, "msg": message, "type": kind}]


def unprocessable(field_path: list[str] | str, message: str) -> HTTPException:
    """A 422 naming the field, in FastAPI's validation error shape."""
    return HTTPException(status_code=422, detail=error_detail(field_path, message))


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    errors = []
    for err in exc.errors():
        item = {
            "loc": list(err.get("loc", ())),
            "msg": err.get("msg", "invalid"),
            "type": err.get("type", ""),
        }
        got = err.get("input")
        # only what JSON can carry (issue 16: a NaN or a non-UTF-8 body echoed here made the 422 itself a 500)
        if isinstance(got, float) and not math.isfinite(got):
            got = str(got)
        if isinstance(got, str | int | float | bool) and len(repr(got)) <= 80:
            item["input"] = got
        if err.get("ctx"):
            item["ctx"] = {k: str(v) for k, v in err["ctx"].items()}
        errors.append(item)
    return JSONResponse(status_code=422, content=jsonable_encoder({"detail": errors}))


def _authorized(header: str | None, credentials: list[tuple[str, str]]) -> bool:
    """HTTP Basic check against every credential pair, in constant time per pair."""
    if not header or not header[:6].lower() == "basic ":
        return False
    try:
        user, sep, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return False
    if not sep:
        return False
    ok = False
    for u, p in credentials:
        same_user = secrets.compare_digest(user.encode("utf-8"), u.encode("utf-8"))
        same_pass = secrets.compare_digest(password.encode("utf-8"), p.encode("utf-8"))
        ok |= same_user & same_pass
    return ok


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse(
        status_code=413,
        content={"error": "RequestTooLarge", "detail": f"request body is larger than {limit} bytes"},
    )


def host_refusal(policy: Any, request: Request) -> JSONResponse | None:
    """403 `ForeignHost` when the exposure policy refuses the request's Host header (DNS rebinding), else None."""
    host = request.headers.get("host")
    if policy.host_allowed(host):
        return None
    return JSONResponse(status_code=403, content={"error": "ForeignHost", "detail": policy.host_refusal(host)})


def access_refusal(ctx: ApiContext, request: Request) -> JSONResponse | None:
    """The answer refusing `request` before its route runs, or None: 403 `ForeignHost` for a Host the
    exposure policy refuses (DNS rebinding), 403 `LoginRequired` while the server is exposed without any
    login, 401 for a missing or wrong password."""
    policy = ctx.exposure
    if policy is not None:
        refused = host_refusal(policy, request)
        if refused is not None:
            return refused
        why = policy.api_refusal()
        if why:
            return JSONResponse(status_code=403, content={"error": "LoginRequired", "detail": why})
    if ctx.auth and not _authorized(request.headers.get("authorization"), ctx.auth):
        return JSONResponse(
            status_code=401,
            content={"detail": "Incorrect username or password"},
            headers={"WWW-Authenticate": "Basic"},
        )
    return None


def make_route_class(ctx: ApiContext) -> type[APIRoute]:
    """An APIRoute that checks auth and the body size before reading the body, and maps errors."""

    class ApiRoute(APIRoute):
        def get_route_handler(self) -> Callable:
            inner = super().get_route_handler()

            async def handler(request: Request) -> Response:
                refused = access_refusal(ctx, request)
                if refused is not None:
                    return refused
                if request.method in STATE_CHANGING and not origin_allowed(request, ctx.allowed_origins):
                    return JSONResponse(
                        status_code=403,
                        content={
                            "error": "ForeignOrigin",
                            "detail": f"requests from pages of {request.headers.get('origin')!r} are refused "
                            "(cross-site request forgery); start the server with --cors-allow-origins to allow "
                            "that origin",
                        },
                    )
                length = request.headers.get("content-length")
                if length is not None:
                    if not length.strip().isdigit():
                        return JSONResponse(status_code=400, content={"detail": "bad Content-Length"})
                    if int(length) > ctx.max_body_bytes:
                        return _too_large(ctx.max_body_bytes)
                elif request.method in ("POST", "PUT", "PATCH"):
                    request = Request(request.scope, _counting_receive(request.receive, ctx.max_body_bytes))
                try:
                    if request.method in ("POST", "PUT", "PATCH") and not _declares_json(request):
                        request = await _json_if_it_parses(request)
                    return await inner(request)
                except RequestValidationError as exc:
                    return _validation_response(exc)
                except RequestError as exc:
                    return JSONResponse(status_code=422, content={"detail": error_detail(exc.field, exc.message)})
                except QueueFull as exc:
                    return JSONResponse(
                        status_code=503,
                        headers={"Retry-After": "5"},
                        content={"error": "QueueFull", "detail": str(exc)},
                    )
                except JobFailed as exc:
                    return JSONResponse(
                        status_code=500, content={"error": type(exc.error).__name__, "detail": str(exc.error)}
                    )
                except StarletteHTTPException:  # fastapi's and starlette's (a body that is not UTF-8: 400)
                    raise
                except Exception as exc:  # never an HTML page or a dropped connection
                    log.exception("API error on %s", request.url.path)
                    return JSONResponse(status_code=500, content={"error": type(exc).__name__, "detail": str(exc)})

            return handler

    return ApiRoute


STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")


def _origin_key(url: str) -> tuple[str, str] | None:
    """(scheme, host:port) of an origin or URL, the port made explicit; None when it has no host."""
    parts = urllib.parse.urlsplit(url.strip().rstrip("/"))
    if not parts.scheme or not parts.hostname:
        return None
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower(), 0)
    except ValueError:
        return None
    return parts.scheme.lower(), f"{parts.hostname.lower()}:{port}"


def origin_allowed(request: Request, allowed: tuple[str, ...] = ()) -> bool:
    """True when the request has no `Origin` (non-browser clients), comes from a page of the same host and
    port it is sent to, or from an origin in `allowed`."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    key = _origin_key(origin)
    if key is None:  # "null" (sandboxed frames, file: pages) or garbage
        return False
    if key in {_origin_key(a) for a in allowed}:
        return True
    host = request.headers.get("host")
    if not host:
        return False
    same = _origin_key(f"{key[0]}://{host}")
    return same == key


def _declares_json(request: Request) -> bool:
    value = request.headers.get("content-type")
    if not value:
        return False
    message = email.message.Message()
    message["content-type"] = value
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


async def _json_if_it_parses(request: Request) -> Request:
    """The request with `Content-Type: application/json` when its body parses as JSON (A1111 clients post
    `data=json.dumps(...)` with no header, or as text/plain or form-urlencoded); otherwise unchanged."""
    if (request.headers.get("content-type") or "").lower().startswith("multipart/"):
        return request
    body = await request.body()
    if not body.strip():
        return request
    try:
        json.loads(body)
    except ValueError:  # not JSON (UnicodeDecodeError included): FastAPI answers as before
        return request
    headers = [(k, v) for k, v in request.scope["headers"] if k.lower() != b"content-type"]
    scope = {**request.scope, "headers": [*headers, (b"content-type", b"application/json")]}
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, replay)


def _counting_receive(receive: Callable, limit: int) -> Callable:
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message.get("type") == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(status_code=413, detail=f"request body is larger than {limit} bytes")
        return message

    return wrapped


# ---- choices ---------------------------------------------------------------------------------------------
def checkpoint_titles(engine) -> list[str]:
    return [e.title for e in engine.models.checkpoints()]


def vae_names(engine) -> list[str]:
    return [e.name for e in engine.models.vaes()]


def find_checkpoint(engine, name: str, field_name: str = "model"):
    """The registry entry for `name`, or RequestError(field_name) listing the valid titles."""
    try:
        return engine.models.find_checkpoint(name)
    except (KeyError, LookupError, ValueError):
        raise RequestError(field_name, f"unknown model {name!r}; choose one of: {checkpoint_titles(engine)}") from None


def check_choices(engine, request: GenerationRequest, *, model_field: str = "model") -> None:
    """Fail fast (before queueing) on an unknown model, VAE, sampler or schedule type."""
    try:
        engine.samplers.resolve(*engine.sampling(request))
    except RequestError:
        raise
    except (KeyError, LookupError, ValueError) as exc:
        raise RequestError("sampler_name", str(exc.args[0] if exc.args else exc)) from None
    if request.model:
        find_checkpoint(engine, request.model, model_field)
    if request.vae and request.vae not in ("Automatic", "None"):
        try:
            engine.models.find_vae(request.vae)
        except (KeyError, LookupError, ValueError):
            raise RequestError(
                "vae",
                f"unknown VAE {request.vae!r}; choose one of: {['Automatic', 'None', *vae_names(engine)]}",
            ) from None


def submit(
    ctx: ApiContext,
    request: GenerationRequest,
    *,
    model_field: str = "model",
    grid: Any = None,
    script: tuple[str, list[Any]] | None = None,
) -> Job:
    """Check the request's limits and choices and queue it (QueueFull -> 503 through the route class).
    `grid`: an ldm_core.grids.GridOptions for A1111's batch grid (None: no grid). `script`: (A1111 script
    title, script_args) to run the request through that script instead."""
    check_limits(request, ctx.limits)
    check_choices(ctx.engine, request, model_field=model_field)
    if script is not None:
        return ctx.service.submit_script(request, script[0], script[1], grid=grid)
    if grid is not None:
        return ctx.service.submit(request, grid=grid)
    return ctx.service.submit(request)


def job_error(job: Job) -> dict[str, Any] | None:
    """A failed job's error as {"type", "message", "field"} (field only for bad input)."""
    exc = job.error
    if exc is None:
        return None
    out: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, RequestError):
        out.update(field=exc.field, message=exc.message)
    return out


class JobFailed(Exception):
    """A job ended with an error that is not the client's fault (answered 500 with the error's type)."""

    def __init__(self, error: BaseException):
        self.error = error
        super().__init__(str(error))


def raise_job_error(job: Job) -> None:
    """Turn a failed job into the HTTP error its client should see (422 for bad input, else 500)."""
    exc = job.error
    if exc is None:
        return
    if isinstance(exc, RequestError):
        raise exc
    raise JobFailed(exc)
