"""The Ray Serve deployment of the pool: one `Engine` per replica (one per GPU, or CPU replicas with a few
torch threads each), with Serve's model multiplexing so a job goes to a replica that has its checkpoint loaded.

`run(job)` is a streaming method: it yields `("started", worker)`, then `("progress", fields, preview)` at most
every `HEARTBEAT_S` seconds when the progress changed and at least every `KEEPALIVE_S` (the head forwards
interrupt/skip to the cancel board when an event arrives; the replica long-polls the board), and ends with
`("result", value)` or `("error", exception)`. The job's own errors are yielded, never raised, so an exception
the head sees from the stream means the replica itself failed (it died) and the job may be retried.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

import ray
from ray import serve

from ..config import EngineConfig
from ..engine import Engine
from ..grids import with_batch_grid
from ..options import live_config
from ..progress import JobContext, ProgressState
from ..scripts import ScriptRun, find_script

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.2  # progress events at most this often while a job runs, seconds (when something changed)
KEEPALIVE_S = 1.0  # and at least this often, so the head can forward interrupt/skip during a long step
CANCEL_WAIT_S = 30.0  # the replica's long poll on the cancel board returns after this at the latest
PROGRESS_FIELDS = ("job_no", "job_count", "step", "steps", "textinfo", "preview_step", "interrupted", "skipped")


def progress_fields(state: ProgressState) -> dict[str, Any]:
    """The part of a progress snapshot that travels to the head (the preview goes separately, when new)."""
    return {name: getattr(state, name) for name in PROGRESS_FIELDS}


def replica_class(max_models: int) -> type:
    """The deployment class, keeping up to `max_models` checkpoints per replica (the engine's model cache)."""

    class EngineReplica:
        """One engine. Serve sends it one job at a time (`max_ongoing_requests=1`)."""

        def __init__(self, config: EngineConfig, threads: int, board: Any):
            import torch

            if not torch.cuda.is_available():
                torch.set_num_threads(threads)
            self.engine = Engine(config)
            self.board = board
            self.worker = f"{socket.gethostname()}:{os.getpid()}"
            self.refreshes = 0  # the head's rescan count this replica's folders are up to date with
            self.extensions: Any = None  # the ExtensionManager, once a job says the head loaded extensions
            log.info("replica %s ready on %s", self.worker, self.engine.policy.device)

        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def checkpoint(self, model_id: str) -> str:
            """Load checkpoint `model_id` (a title); Serve routes jobs naming it to this replica from now on."""
            model = await asyncio.to_thread(self._load, model_id or None)
            return model.entry.title

        def _load(self, title: str | None) -> Any:
            try:
                self.engine.models.find_checkpoint(title) if title else None
            except KeyError:  # a file added since this replica scanned its folders
                self.engine.refresh_models()
            return self.engine.load_checkpoint(title)

        def worker_id(self) -> str:
            return self.worker

        async def run(self, job: dict[str, Any]):
            yield ("started", self.worker)
            ctx = JobContext()
            task = asyncio.ensure_future(self._job(job, ctx, serve.get_multiplexed_model_id()))
            loop = asyncio.get_running_loop()
            job_id, skips_seen, last, last_preview, last_sent = job["id"], 0, None, None, loop.time()
            board = self._wait_board(job_id, 0)
            try:
                while True:
                    await asyncio.wait({task, board}, timeout=HEARTBEAT_S, return_when=asyncio.FIRST_COMPLETED)
                    if board.done():  # the head posted an interrupt or a skip (or the long poll timed out)
                        interrupted, skips = board.result()
                        if skips > skips_seen:
                            skips_seen = skips
                            ctx.cancel.skip()
                        if interrupted:
                            ctx.cancel.interrupt()
                            board = loop.create_future()  # final: nothing more to wait for
                        else:
                            board = self._wait_board(job_id, skips_seen)
                        if not task.done():
                            continue
                    if task.done():
                        break
                    snap = ctx.progress.snapshot()
                    fields = progress_fields(snap)
                    preview = snap.preview if snap.preview is not last_preview else None
                    last_preview = snap.preview
                    # what changed, or a keepalive (the head forwards interrupt/skip when an event arrives)
                    if fields != last or preview is not None or loop.time() - last_sent >= KEEPALIVE_S:
                        yield ("progress", fields, preview)
                        last, last_sent = fields, loop.time()
                snap = ctx.progress.snapshot()
                if progress_fields(snap) != last:  # the final counts (a skipped/interrupted flag, the last step)
                    yield ("progress", progress_fields(snap), None)
                yield ("result", task.result())
            except Exception as exc:  # the job's own failure (bad request, ...): the head re-raises it
                yield ("error", exc)
            finally:
                board.cancel()
                if not task.done():
                    ctx.cancel.interrupt()

        def _wait_board(self, job_id: str, skips_seen: int) -> asyncio.Future:
            """The long poll on the cancel board for `job_id`, as an asyncio future."""
            return asyncio.wrap_future(self.board.wait.remote(job_id, skips_seen, CANCEL_WAIT_S).future())

        async def _job(self, job: dict[str, Any], ctx: JobContext, model_id: str) -> Any:
            if job.get("refreshes", 0) != self.refreshes:  # the head rescanned the model folders
                await asyncio.to_thread(self.engine.refresh_models)
                self.refreshes = job["refreshes"]
            if model_id:
                await self.checkpoint(model_id)
            return await asyncio.to_thread(self._work, job, ctx)

        def _work(self, job: dict[str, Any], ctx: JobContext) -> Any:
            engine = self.engine
            engine.config = live_config(engine.config, job["config"])  # the head's live options (Settings)
            if job.get("extensions") and self.extensions is None:
                # the same extensions as the head (its enabled/disabled state file), hooked into this engine
                from ..extensions import load_extensions

                self.extensions = load_extensions(engine, engine.config)
            request = job["request"]
            if job["kind"] == "script":
                script = find_script(job["script"], request.mode)
                plan = script.prepare(engine, request, list(job["args"]))
                return script.run(ScriptRun(engine, ctx, job["grid"]), request, plan)
            result = engine.generate(request, ctx)
            grid = job.get("grid")
            if grid is not None:
                result = with_batch_grid(result, grid, engine.config.outputs_dir, request.mode, request.prompt)
            return result

    return EngineReplica


def deploy(
    config: EngineConfig,
    *,
    board: Any,
    threads: int,
    gpus: bool,
    min_replicas: int,
    max_replicas: int,
    app_name: str,
) -> Any:
    """Run the deployment (no HTTP route: the UI and API are the front door) and return its handle."""
    actor_options: dict[str, Any] = {"num_gpus": 1} if gpus else {"num_cpus": threads}
    scaling: dict[str, Any]
    if min_replicas == max_replicas:
        scaling = {"num_replicas": max_replicas}
    else:
        scaling = {
            "autoscaling_config": {
                "min_replicas": min_replicas,
                "initial_replicas": max(min_replicas, 1),
                "max_replicas": max_replicas,
                "target_ongoing_requests": 1,
                "upscale_delay_s": 2.0,
                "downscale_delay_s": 120.0,
            }
        }
    deployment = serve.deployment(
        name="EngineReplica",
        ray_actor_options=actor_options,
        max_ongoing_requests=1,
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=2.0,
        **scaling,
    )(replica_class(max(1, config.model_cache_size)))
    app = deployment.bind(config, threads, board)
    return serve.run(app, name=app_name, route_prefix=None, blocking=False)


def is_replica_failure(exc: BaseException) -> bool:
    """True when `exc` (raised while reading a job's stream) means the replica died or became unreachable."""
    return isinstance(exc, ray.exceptions.RayError) and not isinstance(exc, ray.exceptions.RayTaskError)
