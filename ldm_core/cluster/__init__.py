"""Scale-out on Ray: the job queue's jobs run on a pool of engine replicas (Ray Serve) instead of in-process.

Imported only when a launcher asks for Ray (`--ray-address`, `--ray-local`), through
`ldm_core.service.make_service`; the rest of ldm_core never imports Ray, and Ray is an optional dependency
(`pip install -r requirements-ray.txt`).

- `service.RayService`: what the UI, the API and the CLI use (the same interface as `ldm_core.service.Service`).
- `head.HeadEngine`: the head's engine: listings, choices, registries; it selects checkpoints, never loads them.
- `replica`: the Serve deployment holding one `Engine` per replica, with model multiplexing.
- `board.CancelBoard`: the actor that carries interrupt/skip from the head to the replica running a job.
"""

from .service import RayOptions, RayService

__all__ = ["RayOptions", "RayService"]
