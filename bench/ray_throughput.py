"""Throughput of the job service in images per second: in-process (1 torch thread), then the Ray pool with
1 worker x 1 thread and 2 workers x 1 thread, on the built-in model (64x64, Euler a, 20 steps, CFG 7, CPU),
the same prompts and seeds for each, warm-up excluded. Prints a table and the ratio 2-worker / 1-worker
(issue 18's bar on a 2-core machine: >= 1.7).

    python bench/ray_throughput.py                       # inproc, procs2, ray1, ray2; 16 timed images each
    python bench/ray_throughput.py --images 32 --steps 20 --configs ray1,ray2,ray4
    python bench/ray_throughput.py --json results.json   # also write the numbers as JSON

`procs2` runs two in-process services in two plain processes side by side (no Ray, each half the images, timed
from one common start): what two workers can get out of this machine at best, the ceiling for `ray2`.
Each configuration runs in its own child process (so a Ray cluster of one size is gone before the next starts
and the in-process run gets a clean torch thread setting). In a child, every job is submitted at once (more
than the workers can take, so the queue is never empty), after a warm-up of 2 jobs per worker that loads the
model on every worker. `images/s` is timed images / wall seconds from the first timed submit to the last result;
`s/image (worker)` is the median time a job held a queue worker (started -> finished: for Ray, sending it to
a replica, the run there and the result's way back), i.e. the per-image time without queueing; `dispatch s`
(Ray) is the median time from the head starting a job to its replica reporting it started; `head+Ray cores`
(Ray) is the CPU the head process and Ray's own processes (raylet, GCS, Serve controller, ...) used meanwhile, in
cores: what the replicas could not have (a `cores by process` line per Ray run splits it, replicas included).
Run it on a quiet machine: `other CPU` is the share of the machine's CPU time that processes outside the
benchmark (and outside the Ray cluster it started) used during the timed part, and a warning names every
configuration where that passed 5%.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "inproc": (0, "in-process"),
    "procs2": (0, "2 processes"),  # two in-process services side by side, no Ray: the machine's own ceiling
    "ray1": (1, "Ray"),
    "ray2": (2, "Ray"),
    "ray3": (3, "Ray"),
    "ray4": (4, "Ray"),
}
PROMPTS = [
    "a red circle on a white background",
    "a blue square on a black background",
    "a green triangle at the top left",
    "a yellow star in the middle",
]


def _busy_ticks() -> int:
    """CPU time (clock ticks, all cores) the whole machine spent not idle, from /proc/stat."""
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    return sum(cpu) - cpu[3] - (cpu[4] if len(cpu) > 4 else 0)  # minus idle and iowait


def _is_replica(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"ServeReplica" in f.read() or b"SERVE_REPLICA" in open(f"/proc/{pid}/comm", "rb").read()
    except OSError:
        return False


def _process_name(pid: int) -> str:
    """A short name for a Ray process: its actor/worker title or its program's file name."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return "?"
    first = args[0].decode(errors="replace")
    if first.startswith("ray::"):  # ray::ServeController.method, ray::ServeReplica:app:Deployment.method
        return first[5:].split(".")[0].split(":")[-1]
    script = next((a.decode(errors="replace") for a in args[1:3] if a.endswith(b".py")), first)
    return Path(script).name


def _tree_ticks(root: int) -> dict[int, int]:
    """CPU ticks (user + system) of `root` and every process descended from it (the local Ray cluster it
    started included), by pid."""
    parent, ticks = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)] = int(fields[1])
        ticks[int(entry)] = int(fields[11]) + int(fields[12])
    mine = {root}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parent.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                changed = True
    return {pid: ticks[pid] for pid in mine if pid in ticks}


class OtherLoad:
    """CPU seconds that processes outside this benchmark used between `start()` and `stop()`: how quiet the
    machine was (a shared machine's other work slows every configuration it overlaps)."""

    def start(self) -> None:
        self.busy, self.tree = _busy_ticks(), _tree_ticks(os.getpid())

    def stop(self) -> tuple[float, float]:
        """(CPU seconds of other processes, CPU seconds of this benchmark's head and Ray's own processes,
        i.e. everything in its process tree but the engine replicas)."""
        busy, tree = _busy_ticks(), _tree_ticks(os.getpid())
        delta = {pid: t - self.tree.get(pid, 0) for pid, t in tree.items()}
        own = sum(delta.values())
        replicas = sum(d for pid, d in delta.items() if _is_replica(pid))
        tick = os.sysconf("SC_CLK_TCK")
        self.by_process: dict[str, float] = {}  # CPU seconds of each process, by its name
        for pid, d in delta.items():
            if d:
                name = "head" if pid == os.getpid() else _process_name(pid)
                name = f"replica {pid}" if _is_replica(pid) else name
                self.by_process[name] = self.by_process.get(name, 0.0) + d / tick
        return max(0.0, (busy - self.busy - own) / tick), (own - replicas) / tick


def _child(a: argparse.Namespace) -> dict:
    """Run one configuration in this process; its numbers as a dict."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(a.threads)
    from ldm_core.config import EngineConfig
    from ldm_core.generation_requests import GenerationRequest
    from ldm_core.service import make_service

    workers, _ = CONFIGS[a.child]
    config = EngineConfig.from_data_dir(a.data_dir, device="cpu", save_images=False, preview_every=0)
    t0 = time.perf_counter()
    service = make_service(config, max_queued=max(64, a.images + 8), ray_local=workers, ray_threads=a.threads)
    start_s = time.perf_counter() - t0

    def request(i: int) -> GenerationRequest:
        return GenerationRequest.build(
            prompt=PROMPTS[i % len(PROMPTS)], seed=1000 + i, steps=a.steps, sampler_name=a.sampler,
            cfg_scale=7.0, width=64, height=64, save_images=False, model=a.model,
        )  # fmt: skip

    def run(n: int, offset: int) -> tuple[float, list]:
        t = time.perf_counter()
        jobs = [service.submit(request(offset + i)) for i in range(n)]
        for job in jobs:
            job.wait()
        wall = time.perf_counter() - t
        bad = [job.error for job in jobs if job.error is not None]
        if bad:
            raise RuntimeError(f"{len(bad)} job(s) failed, first: {bad[0]!r}")
        return wall, jobs

    other = OtherLoad()
    try:
        warm_s, _ = run(a.warmup * max(1, workers), 10_000)
        if a.start_at:  # procs2: both processes start their timed part together
            time.sleep(max(0.0, a.start_at - time.time()))
        other.start()
        wall, jobs = run(a.images, 0)
        other_s, infra_s = other.stop()
        end_wall = time.time()
    finally:
        service.shutdown()
    per_job = [j.finished_at - j.started_at for j in jobs if j.started_at and j.finished_at]
    # Ray: when the replica's "started" event reached the head (progress.started_at, monotonic clock): the
    # dispatch latency is head start -> replica start, the rest of the job's time is the replica's run
    to_wall = time.time() - time.monotonic()
    dispatch = [j.progress().started_at + to_wall - j.started_at for j in jobs if workers and j.progress().started_at]
    by_worker: dict[str, int] = {}
    for job in jobs:
        w = job.progress().worker or "-"
        by_worker[w] = by_worker.get(w, 0) + 1
    return {
        "config": a.child,
        "workers": workers,
        "threads": a.threads,
        "images": a.images,
        "start_s": round(start_s, 2),
        "warmup_s": round(warm_s, 2),
        "wall_s": round(wall, 3),
        "images_per_s": round(a.images / wall, 3),
        "s_per_image_worker": round(statistics.median(per_job), 3) if per_job else None,
        "dispatch_s": round(statistics.median(dispatch), 3) if dispatch else None,
        "jobs_by_worker": by_worker,
        "end_wall": end_wall,
        "other_cpu_pct": round(100 * other_s / (wall * (os.cpu_count() or 1)), 1),
        # Ray: the head and Ray's daemons, in cores (in-process: the whole process, i.e. the engine too)
        "head_and_ray_cores": round(infra_s / wall, 2) if workers else None,
        # cores by process (replicas included): where the pool's CPU goes
        "head_and_ray_by_process": {
            k: round(v / wall, 3)
            for k, v in sorted(other.by_process.items(), key=lambda kv: -kv[1])
            if v / wall >= 0.002
        }
        if workers
        else None,
    }


def head_costs(sizes: tuple[int, ...] = (64, 512, 1024), runs: int = 5) -> list[dict]:
    """What each finished image costs the head, by size: the pickled PIL image a replica sends back (bytes over
    the network/object store) and encoding it as a PNG with infotext (what the batch and the API do per image).
    The test image is a smooth gradient plus mild noise, so PNG sizes are between a flat and a random image."""
    import pickle

    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(ROOT))
    from ldm_core.outputs import encode_png_bytes

    out = []
    rng = np.random.default_rng(0)
    for size in sizes:
        ramp = np.linspace(0, 255, size, dtype=np.float32)
        base = np.stack(
            [ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), np.full((size, size), 128.0)], -1
        )
        pixels = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            png = encode_png_bytes(image, "a prompt\nSteps: 20, Sampler: Euler a, Seed: 1", {"seed": 1})
            times.append(time.perf_counter() - t)
        out.append(
            {"size": size, "pickled_bytes": len(pickle.dumps(image)), "png_bytes": len(png),
             "png_encode_ms": round(1000 * statistics.median(times), 2)}
        )  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="inproc,procs2,ray1,ray2", help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--images", type=int, default=16, help="timed images per configuration")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up jobs per worker (not timed)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="Euler a")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    ap.add_argument("--data-dir", default=str(ROOT), help="data dir; the built-in model when it has no checkpoint")
    ap.add_argument("--model", default=None, help="checkpoint name (default: the data dir's default model)")
    ap.add_argument(
        "--procs-start-s", type=float, default=40.0, help="procs2: seconds the two processes get to load and warm up"
    )
    ap.add_argument("--no-head-costs", action="store_true", help="skip the per-image PNG/transfer size table")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(_child(a)), flush=True)
        return 0

    names = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    print(
        f"built-in model 64x64, {a.sampler}, {a.steps} steps, CFG 7, CPU; {a.images} timed images per config, "
        f"{a.warmup} warm-up job(s) per worker; {os.cpu_count()} CPU cores; "
        f"load average at start: {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1"}
    results = []

    def command(child: str, images: int, start_at: float = 0.0) -> list[str]:
        return [sys.executable, __file__, "--child", child] + [
            f"--{k}={v}" for k, v in (
                ("images", images), ("warmup", a.warmup), ("steps", a.steps), ("sampler", a.sampler),
                ("threads", a.threads), ("data-dir", a.data_dir), ("start-at", start_at),
            )
        ] + ([f"--model={a.model}"] if a.model else [])  # fmt: skip

    def finish(name: str, proc: subprocess.Popen) -> dict | None:
        out, err = proc.communicate()
        line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{name}: failed (exit {proc.returncode})\n{err[-3000:]}", file=sys.stderr)
            return None
        return json.loads(line[len("RESULT ") :])

    def spawn(cmd: list[str]) -> subprocess.Popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)

    for name in names:
        if name == "procs2":
            start_at = time.time() + a.procs_start_s
            half = max(1, a.images // 2)
            procs = [spawn(command("inproc", half, start_at)) for _ in range(2)]
            parts = [finish(name, p) for p in procs]
            if None in parts:
                return 1
            wall = max(p["end_wall"] for p in parts) - start_at
            result = {**parts[0], "config": name, "workers": 2, "images": 2 * half, "wall_s": round(wall, 3),
                      "images_per_s": round(2 * half / wall, 3), "other_cpu_pct": None,
                      "s_per_image_worker": max(p["s_per_image_worker"] for p in parts)}  # fmt: skip
        else:
            result = finish(name, spawn(command(name, a.images)))
            if result is None:
                return 1
        results.append(result)
        print(f"  {name}: {results[-1]['images_per_s']:.3f} images/s", flush=True)

    print()
    print(f"{'config':<10} {'service':<11} {'workers':>7} {'threads':>7} {'images':>6} {'wall s':>8} "
          f"{'images/s':>9} {'s/image (worker)':>17} {'dispatch s':>10} {'head+Ray cores':>14} {'other CPU':>9}"
          "  jobs by worker")  # fmt: skip
    for r in results:
        kind = CONFIGS[r["config"]][1]
        per = f"{r['s_per_image_worker']:.3f}" if r["s_per_image_worker"] is not None else "-"
        dispatch = f"{r['dispatch_s']:.3f}" if r.get("dispatch_s") is not None else "-"
        infra = f"{r['head_and_ray_cores']:.2f}" if r.get("head_and_ray_cores") is not None else "-"
        other = f"{r['other_cpu_pct']:.1f}%" if r.get("other_cpu_pct") is not None else "-"
        print(
            f"{r['config']:<10} {kind:<11} {max(1, r['workers']):>7} {r['threads']:>7} {r['images']:>6} "
            f"{r['wall_s']:>8.2f} {r['images_per_s']:>9.3f} {per:>17} {dispatch:>10} {infra:>14} "
            f"{other:>9}  {r['jobs_by_worker']}"
        )
    for r in results:
        if r.get("head_and_ray_by_process"):
            parts = ", ".join(f"{k} {v:.3f}" for k, v in r["head_and_ray_by_process"].items())
            print(f"{r['config']} cores by process: {parts}")
    rate = {r["config"]: r["images_per_s"] for r in results}
    if "ray1" in rate and "ray2" in rate:
        ratio = rate["ray2"] / rate["ray1"]
        print(f"\nratio 2 workers / 1 worker: {ratio:.2f}x (issue 18's bar: >= 1.7x)")
    busy = [r["config"] for r in results if (r["other_cpu_pct"] or 0) > 5]
    if busy:
        print(f"WARNING: other processes used > 5% of the CPUs during {busy}: the machine was not quiet")
    if "procs2" in rate and "inproc" in rate:
        print(f"ratio 2 plain processes / 1 (no Ray: this machine's ceiling): {rate['procs2'] / rate['inproc']:.2f}x")
    if "inproc" in rate and "ray1" in rate:
        print(f"ratio Ray 1 worker / in-process: {rate['ray1'] / rate['inproc']:.2f}x (the pool's overhead)")
    costs = [] if a.no_head_costs else head_costs()
    if costs:
        print("\nper finished image, on the head:  size  pickled image (sent back)  PNG file  PNG encode")
        for c in costs:
            print(
                f"{'':34}{c['size']:>4}² {c['pickled_bytes'] / 1024:>19.0f} KiB {c['png_bytes'] / 1024:>5.0f} KiB "
                f"{c['png_encode_ms']:>7.1f} ms"
            )
    if a.json:
        data = {"argv": sys.argv, "results": results, "head_costs": costs}
        Path(a.json).write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
