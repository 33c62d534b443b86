"""`RayService`: the service of a Ray pool. The same interface as `ldm_core.service.Service` (`engine`, `queue`,
`submit`, `submit_script`, `generate`, `run_task`, `switch_model`, `interrupt`, `skip`, `shutdown`), so the UI,
the API and the CLI never know which one runs their jobs.

The head keeps the one job queue (positions, cancel, the jobs API) with one worker thread per replica; each
worker sends its job to the Serve deployment (`replica.py`) with the job's checkpoint as the multiplexed model
id and reads the job's stream: the worker id, progress and previews go into the job's context, interrupt/skip
go back through the `CancelBoard`, and the result (a `GenerationResult`, pixels unchanged) becomes the job's.

Scripts (X/Y/Z plot, ...) run as one job on one replica, which runs all their cells: a script's cells share one
model switch sequence and one grid, as they do in-process.

Faults: when a replica dies while running a job (its stream breaks), the job is sent once more (Serve replaces
the replica meanwhile); a second death fails the job. The head stops at the first result, so a client gets one
result per job, and an attempt that never started (no replica reached) is not counted.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import serve

from ..config import EngineConfig
from ..generation_requests import GenerationRequest
from ..grids import GridOptions
from ..jobs import Job, JobQueue
from ..progress import JobContext
from ..scripts import find_script
from ..service import QueueFront
from .board import CancelBoard
from .head import HeadEngine
from .replica import deploy, is_replica_failure

log = logging.getLogger(__name__)

APP_NAME = "ldm-engine"
NAMESPACE = "ldm-webui"
UNSTARTED_RETRY_S = 60.0  # how long a job waits for a live replica when its attempts do not even start
RETRIES = 1  # a job whose replica dies mid-job runs once more elsewhere


@dataclass(frozen=True)
class RayOptions:
    """Where the pool runs and how big it is. `address`: "auto" or "ray://host:port" (an existing cluster);
    `local_workers`: start a local cluster with that many CPU workers (or one per GPU, at most that many);
    `threads`: torch threads per CPU replica; `min_replicas`/`max_replicas`: autoscaling bounds (default:
    the worker count, fixed)."""

    address: str | None = None
    local_workers: int = 0
    threads: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None


@dataclass(frozen=True)
class PoolShape:
    replicas_min: int
    replicas_max: int
    gpus: bool
    started_local: bool


def start_cluster(options: RayOptions) -> PoolShape:
    """Connect to (or start) the Ray cluster and work out how many replicas, of which kind, the pool has."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing phones home
    repo_root = str(Path(__file__).resolve().parents[2])
    env = {"PYTHONPATH": os.pathsep.join(p for p in (repo_root, os.environ.get("PYTHONPATH", "")) if p)}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env[name] = os.environ.get(name, "1")
    started_local = not options.address
    if started_local:
        import torch

        gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        workers = options.local_workers
        if gpu_count:
            workers = min(workers, gpu_count)
        else:
            env["OMP_NUM_THREADS"] = str(options.threads)
        # a cluster of our own, with no dashboard to show metrics: the Serve controller checks its replicas
        # every 0.5 s instead of 0.1 s and nothing collects metrics, which frees CPU for the replicas (on a
        # small machine the pool's own processes take it from them); set either variable to override
        os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5")
        ray.init(
            address="local",  # a new cluster of our own, even when another one runs on this machine
            num_cpus=workers * options.threads if not gpu_count else None,
            num_gpus=gpu_count,
            include_dashboard=False,
            namespace=NAMESPACE,
            runtime_env={"env_vars": env},
            object_store_memory=512 * 2**20,
            log_to_driver=True,
            _system_config={"enable_metrics_collection": os.environ.get("RAY_enable_metrics_collection") == "1"},
        )
        gpus = bool(gpu_count)
    else:
        # the workers must have this project installed (same version) and see the same model/output folders
        ray.init(address=options.address, namespace=NAMESPACE, runtime_env={"env_vars": env})
        resources = ray.cluster_resources()
        gpu_count = int(resources.get("GPU", 0))
        gpus = gpu_count > 0
        workers = gpu_count if gpus else max(1, int(resources.get("CPU", 1)) // options.threads)
    hi = options.max_replicas or max(workers, options.min_replicas or 1)
    lo = options.min_replicas if options.min_replicas is not None else hi
    if not 0 <= lo <= hi or hi < 1:
        raise ValueError(f"ray replicas: need 0 <= min ({lo}) <= max ({hi}) and max >= 1")
    return PoolShape(replicas_min=lo, replicas_max=hi, gpus=gpus, started_local=started_local)


class RayService(QueueFront):
    """A job queue on the head whose jobs run on a Ray Serve pool of engines (other work, e.g. upscales and
    model selection, runs on the head in queue order). Construct once per process."""

    def __init__(self, config: EngineConfig, options: RayOptions, *, max_queued: int = 64):
        self.engine = HeadEngine(config)
        self.extensions = None
        self.options = options
        try:
            self.shape = start_cluster(options)
            serve.start(proxy_location="Disabled")  # no Serve HTTP: the UI and the API are the one front door
            self._board = CancelBoard.remote()
            self._handle = deploy(
                config,
                board=self._board,
                threads=options.threads,
                gpus=self.shape.gpus,
                min_replicas=self.shape.replicas_min,
                max_replicas=self.shape.replicas_max,
                app_name=APP_NAME,
            )
        except BaseException:
            ray.shutdown()
            raise
        self.queue = JobQueue(max_queued=max_queued, workers=self.shape.replicas_max)
        log.info(
            "Ray pool: %d-%d %s replicas (%s)",
            self.shape.replicas_min,
            self.shape.replicas_max,
            "GPU" if self.shape.gpus else f"CPU x{options.threads} thread(s)",
            options.address or "local cluster",
        )

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    # ---- jobs ---------------------------------------------------------------------------------------
    def _model_id(self, request: GenerationRequest) -> tuple[GenerationRequest, str]:
        """The request naming its checkpoint by title (the head's selection when it names none): the
        multiplexed model id that routes it to a replica with that checkpoint loaded."""
        entry = None
        if request.model:
            try:
                entry = self.engine.models.find_checkpoint(request.model)
            except (KeyError, LookupError, ValueError):
                return request, ""  # the replica reports the unknown model as the job's error
        else:
            entry = self.engine.current_model_entry()
        if entry is None:
            return request, ""
        return request.model_copy(update={"model": entry.title}), entry.title

    def _submit_remote(self, request: GenerationRequest, payload: dict[str, Any]) -> Job:
        request, model_id = self._model_id(request)
        payload = {**payload, "request": request}
        return self.queue.submit(
            lambda ctx: self._run_remote(payload, model_id, ctx), kind=request.mode, request=request
        )

    def submit(self, request: GenerationRequest, *, grid: GridOptions | None = None) -> Job:
        """Queue a generation on the pool; returns at once (see `Service.submit`)."""
        return self._submit_remote(request, {"kind": "generate", "grid": grid})

    def submit_script(
        self, request: GenerationRequest, name: str, args: list[Any], *, grid: GridOptions | None = None
    ) -> Job:
        """Queue A1111 script `name` as one job that one replica runs whole (all its cells there). The script
        and its arguments are checked on the head first (RequestError before anything is queued)."""
        script = find_script(name, request.mode)
        script.prepare(self.engine, request, list(args or []))
        options = grid or GridOptions(return_grid=True, save=False)
        return self._submit_remote(
            request, {"kind": "script", "script": name, "args": list(args or []), "grid": options}
        )

    def _run_remote(self, payload: dict[str, Any], model_id: str, ctx: JobContext) -> Any:
        """Run one job on the pool; send it once more when the replica running it dies mid-job. Each attempt
        has its own id on the cancel board, and an abandoned attempt is told to stop (should its replica still
        live), so one attempt at most completes for the head."""
        job_id = uuid.uuid4().hex
        payload = {
            **payload,
            "config": self.engine.config,
            "refreshes": self.engine.refreshes,
            "extensions": self.extensions is not None,  # the launcher loaded extensions: replicas load them too
        }
        attempt = started_attempts = 0
        deadline = time.monotonic() + UNSTARTED_RETRY_S
        while True:
            attempt += 1
            key = f"{job_id}.{attempt}"
            started: list[str] = []
            try:
                return self._attempt({**payload, "id": key}, model_id, ctx, started)
            except Exception as exc:
                if not is_replica_failure(exc):
                    raise
                self._board.interrupt.remote(key)  # abandoned: should that replica live on, it stops
                worker = started[0] if started else "a replica"
                started_attempts += bool(started)
                if ctx.cancel.interrupted:
                    raise RuntimeError(f"interrupted, and {worker} running the job was lost") from exc
                if started_attempts > RETRIES or (not started and time.monotonic() > deadline):
                    raise RuntimeError(f"the job's replica failed ({worker}): {exc}") from exc
                log.warning("job %s: %s failed (%s); sending the job again", job_id, worker, type(exc).__name__)
                ctx.progress.update(worker="", textinfo="retrying on another worker")
                time.sleep(0.5)
            finally:
                self._board.forget.remote(key)

    def _attempt(self, payload: dict[str, Any], model_id: str, ctx: JobContext, started: list[str]) -> Any:
        """Send the job to the replica Serve picks (one with checkpoint `model_id` loaded, if any) and follow
        its stream into `ctx`; `started` gets the worker id once the replica has taken the job."""
        key = payload["id"]
        interrupt_posted = False
        stream = self._handle.options(stream=True, multiplexed_model_id=model_id).run.remote(payload)
        for event in stream:
            kind = event[0]
            cancel = ctx.cancel  # interrupt (once) and each new skip go to the board, where the replica reads them
            if cancel.interrupted and not interrupt_posted:
                self._board.interrupt.remote(key)
                interrupt_posted = True
            if cancel.skipped:
                cancel.clear_skip()
                self._board.skip.remote(key)
            if kind == "started":
                started.append(event[1])
                ctx.progress.update(worker=event[1], started_at=time.monotonic())
            elif kind == "progress":
                changes = dict(event[1])
                if event[2] is not None:
                    changes["preview"] = event[2]
                ctx.progress.update(**changes)
            elif kind == "result":
                return event[1]
            elif kind == "error":
                raise event[1]
        raise RuntimeError("the replica's stream ended without a result")

    def switch_model(self, name: str) -> str:
        """Select checkpoint `name` for the jobs that name none; a replica loads it with the first such job
        (and keeps it: later jobs go to that replica). Returns its title."""
        return self.engine.load_checkpoint(name).entry.title

    def shutdown(self) -> None:
        self.queue.shutdown()
        try:
            if self.shape.started_local:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()
