"""The native jobs API (`/api/v1`): submit a job and get its id at once, poll it, stream its progress,
previews and result as Server-Sent Events, cancel it, and look at the queue (shared with the web UI).

Routes:
  POST   /api/v1/jobs               JobRequest -> 202 {"id", "state", "position"}
  GET    /api/v1/jobs/{id}          state, progress, error, result (images as base64 PNGs with infotext)
  GET    /api/v1/jobs/{id}/events   SSE: `state`, `progress`, `preview`, `result` or `error`, then `end`
  DELETE /api/v1/jobs/{id}          cancel a queued job or interrupt a running one (partial result kept)
  GET    /api/v1/queue              the running job and the queued ones, in order
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, StreamingResponse

from ldm_core.engine import GenerationResult
from ldm_core.jobs import Job
from ldm_core.options import request_fields, request_values

from .common import ApiContext, in_thread, job_error, make_route_class, submit
from .images import encode_png_b64, encode_preview_b64
from .schemas import JobCreated, JobRequest, build_engine_request, native_engine_values

POLL_S = 0.1  # how often an event stream looks at its job, seconds
KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing an idle stream


def _progress(job: Job) -> dict[str, Any]:
    p = job.progress()
    fraction = 1.0 if job.state == "done" else 0.0 if job.state == "queued" else p.fraction
    return {
        "fraction": round(fraction, 4),
        "step": p.step,
        "steps": p.steps,
        "job_no": p.job_no,
        "job_count": p.job_count,
        "eta": None if p.eta is None else round(p.eta, 2),
        "textinfo": p.textinfo,
        "preview_step": p.preview_step,
        "worker": p.worker or None,
    }


def job_summary(ctx: ApiContext, job: Job) -> dict[str, Any]:
    """State, queue position (0 = running, None when finished), the worker that runs (ran) it (None
    in-process; a Ray pool replica's host:pid), timestamps (Unix seconds), progress, error."""
    pos = ctx.service.queue.position(job)
    return {
        "id": job.id,
        "kind": job.kind,
        "state": job.state,
        "worker": job.progress().worker or None,
        "position": None if pos < 0 else pos,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "progress": _progress(job),
        "error": job_error(job),
    }


def job_result(job: Job, *, images: bool = True) -> dict[str, Any] | None:
    """The finished job's images (base64 PNGs with infotext), infotexts, seeds and A1111 info."""
    result = job.result
    if not isinstance(result, GenerationResult):
        return None if result is None else {"value": jsonable_encoder(result)}
    out: dict[str, Any] = {
        "infotexts": result.infotexts,
        "seeds": result.seeds,
        "interrupted": result.interrupted,
        "paths": [str(p) for p in result.paths],
        "info": jsonable_encoder(result.info(job.request)) if job.request else None,
    }
    if result.videos:  # a video job's clip files (ldm_core.video)
        out["videos"] = [
            {
                "format": v.format,
                "mime": v.mime,
                "path": str(v.path) if v.path else None,
                **({"data": base64.b64encode(v.data).decode("ascii")} if images else {}),
            }
            for v in result.videos
        ]
    if images:
        out["images"] = [
            encode_png_b64(im, text, man)
            for im, text, man in zip(result.images, result.infotexts, result.manifests, strict=False)
        ]
    return out


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(jsonable_encoder(data), separators=(',', ':'))}\n\n".encode()


def build_router(ctx: ApiContext) -> APIRouter:
    """The `/api/v1` routes bound to `ctx`."""
    router = APIRouter(prefix="/api/v1", tags=["jobs"], route_class=make_route_class(ctx))
    queue = ctx.service.queue

    def _job(job_id: str) -> Job:
        job = queue.get(job_id)
        if job is None:
            raise HTTPException(status_code=404, detail=f"no job {job_id!r} (unknown, or finished long ago)")
        return job

    @router.post("/jobs", status_code=202, response_model=JobCreated)
    async def create_job(body: JobRequest):  # type: ignore[valid-type]
        def prepare_and_submit():  # decoding images and resolving a model by hash may take a while
            values, mode = native_engine_values(body)
            # saved generation options (ldm_core.options: clip skip, eta, sigma params, ...) fill the fields
            # the job leaves unset, as they do for /sdapi/v1 and the web UI
            explicit = {k for k in body.model_fields_set if values.get(k) is not None}
            saved, _ = request_values(ctx.options, {}, explicit, values.get("sampler_name"), request_fields(mode))
            values.update({k: v for k, v in saved.items() if k not in explicit})
            return submit(ctx, build_engine_request(values, mode))

        job = await in_thread(ctx, prepare_and_submit)
        pos = queue.position(job)
        return {"id": job.id, "state": job.state, "position": max(pos, 0)}

    @router.get("/jobs/{job_id}")
    async def get_job(job_id: str, images: bool = True, preview: bool = False):
        job = _job(job_id)

        def run():
            out = job_summary(ctx, job)
            out["result"] = job_result(job, images=images) if job.state == "done" else None
            if preview:
                p = job.progress().preview
                out["preview"] = encode_preview_b64(p) if p is not None else None
            return out

        return await in_thread(ctx, run)

    @router.delete("/jobs/{job_id}")
    def cancel_job(job_id: str):
        job = _job(job_id)
        was = job.state
        cancelled = queue.cancel(job_id)
        return {"id": job.id, "cancelled": cancelled, "was": was, "state": job.state}

    @router.get("/jobs/{job_id}/events")
    async def job_events(job_id: str):
        job = _job(job_id)
        return StreamingResponse(
            _events(job),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _events(job: Job) -> AsyncIterator[bytes]:
        last_state = last_progress = None
        last_preview = None
        last_sent = time.monotonic()
        while True:
            finished = job.finished
            summary = job_summary(ctx, job)
            state = (summary["state"], summary["position"])
            if state != last_state:
                last_state = state
                yield _sse("state", {k: summary[k] for k in ("id", "kind", "state", "position")})
                last_sent = time.monotonic()
            prog = summary["progress"]
            key = (prog["job_no"], prog["step"], prog["steps"])
            if summary["state"] != "queued" and key != last_progress:
                last_progress = key
                yield _sse("progress", prog)
                last_sent = time.monotonic()
            snap = job.progress()
            if snap.preview is not None and snap.preview is not last_preview:
                last_preview = snap.preview
                image = await in_thread(ctx, encode_preview_b64, snap.preview)
                yield _sse("preview", {"job_no": snap.job_no, "step": snap.preview_step, "image": image})
                last_sent = time.monotonic()
            if finished:
                break
            if time.monotonic() - last_sent > KEEPALIVE_S:
                yield b": keepalive\n\n"
                last_sent = time.monotonic()
            await asyncio.sleep(POLL_S)
        if job.state == "done":
            yield _sse("result", await in_thread(ctx, job_result, job))
        elif job.state == "failed":
            yield _sse("error", job_error(job))
        yield _sse("end", {"id": job.id, "state": job.state})

    @router.get("/queue")
    def get_queue():
        current = queue.current
        return JSONResponse(
            jsonable_encoder(
                {
                    "running": job_summary(ctx, current) if current is not None else None,
                    # every running job: one per worker of a Ray pool (the same one job in-process)
                    "running_all": [job_summary(ctx, j) for j in queue.running()],
                    "queued": [job_summary(ctx, j) for j in queue.queued()],
                    "max_queued": queue.max_queued,
                    "completed": queue.completed,
                }
            )
        )

    return router
