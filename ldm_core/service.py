"""The service: the engine plus its job queue, as the web UI, the REST API and the CLI see them.

Every piece of GPU work (generation, model switch, upscale) goes through the one queue, so the UI and the API
share queue positions, progress, interrupt and skip. Both clients call these methods with the same request
objects and parameter names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .config import EngineConfig
from .engine import Engine, GenerationResult
from .generation_requests import GenerationRequest
from .grids import GridOptions, with_batch_grid
from .jobs import Job, JobQueue
from .progress import JobContext
from .scripts import ScriptRun, find_script


class QueueFront:
    """What every service does through its `queue` alone, wherever its jobs run (this process or a pool):
    wait for a generation, run other work in queue order, interrupt and skip. Subclasses provide `submit`."""

    queue: JobQueue

    def submit(self, request: GenerationRequest, *, grid: GridOptions | None = None) -> Job:
        raise NotImplementedError

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> GenerationResult:
        """Queue a generation and wait for it; re-raises the job's error."""
        job = self.submit(request)
        job.wait(timeout)
        if job.error is not None:
            raise job.error
        return job.result

    def run_task(self, fn: Callable[[JobContext], Any], kind: str = "task") -> Any:
        """Run other work (model switch, upscale) in queue order and wait for it."""
        return self.queue.call(fn, kind=kind)

    def interrupt(self) -> bool:
        return self.queue.interrupt_current()

    def skip(self) -> bool:
        return self.queue.skip_current()


class Service(QueueFront):
    """One engine and one queue. Construct once per process (webui.py does)."""

    def __init__(self, config: EngineConfig, *, engine: Engine | None = None, max_queued: int = 64):
        self.engine = engine or Engine(config)
        self.queue = JobQueue(max_queued=max_queued)
        self.extensions = None  # the ExtensionManager, once the launcher has loaded extensions

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    def submit(self, request: GenerationRequest, *, grid: GridOptions | None = None) -> Job:
        """Queue a generation; returns at once. `job.result` is a GenerationResult when `job.state == 'done'`.
        With `grid`, a batch of several images gets A1111's grid first (and saved, per the options)."""
        if grid is None:
            return self.queue.submit(lambda ctx: self.engine.generate(request, ctx), kind=request.mode, request=request)

        def run(ctx: JobContext) -> GenerationResult:
            result = self.engine.generate(request, ctx)
            return with_batch_grid(result, grid, self.config.outputs_dir, request.mode, request.prompt)

        return self.queue.submit(run, kind=request.mode, request=request)

    # ---- A1111 scripts (ldm_core.scripts) ----------------------------------------------------------------
    def submit_script(
        self, request: GenerationRequest, name: str, args: list[Any], *, grid: GridOptions | None = None
    ) -> Job:
        """Queue A1111 script `name` (a title, any case) with `args` in A1111's `script_args` order, as one
        job. Unknown script or a bad argument -> RequestError before anything is queued."""
        script = find_script(name, request.mode)
        plan = script.prepare(self.engine, request, list(args or []))
        options = grid or GridOptions(return_grid=True, save=False)
        return self.queue.submit(
            lambda ctx: script.run(ScriptRun(self.engine, ctx, options), request, plan),
            kind=request.mode,
            request=request,
        )

    def switch_model(self, name: str) -> str:
        """Load checkpoint `name` (through the queue); returns its title."""
        model = self.run_task(lambda ctx: self.engine.load_checkpoint(name), kind="load-model")
        return model.entry.title

    def shutdown(self) -> None:
        self.queue.shutdown()


def make_service(
    config: EngineConfig,
    *,
    max_queued: int = 64,
    ray_address: str | None = None,
    ray_local: int = 0,
    ray_threads: int = 1,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
) -> Service:
    """The service the launchers run: the in-process `Service` by default, or, with `ray_address` ("auto",
    "ray://host:port") or `ray_local=N` (start a local Ray cluster of N workers), a `RayService` that runs each
    job on a pool of engine replicas (Ray Serve). Both have the same interface; Ray is imported only here,
    only when asked, and is an optional dependency (requirements-ray.txt)."""
    if ray_local < 0:
        raise ValueError(f"ray_local must be >= 0 (got {ray_local})")
    if ray_threads < 1:
        raise ValueError(f"ray_threads must be >= 1 (got {ray_threads})")
    if ray_address and ray_local:
        raise ValueError("give either ray_address (join a cluster) or ray_local (start one), not both")
    if min_replicas is not None and min_replicas < 0:
        raise ValueError(f"min_replicas must be >= 0 (got {min_replicas})")
    if max_replicas is not None and (max_replicas < 1 or max_replicas < (min_replicas or 0)):
        raise ValueError(f"max_replicas must be >= 1 and >= min_replicas (got {max_replicas})")
    if not ray_address and not ray_local:
        return Service(config, max_queued=max_queued)
    try:
        from .cluster import RayOptions, RayService
    except ImportError as exc:  # ray is optional
        raise RuntimeError(f"--ray-address/--ray-local need Ray: pip install -r requirements-ray.txt ({exc})") from exc
    options = RayOptions(
        address=ray_address,
        local_workers=ray_local,
        threads=ray_threads,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
    )
    return RayService(config, options, max_queued=max_queued)
