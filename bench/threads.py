"""Torch CPU thread policies side by side, on a quiet machine and with competing processes: seconds per
built-in-model image (native size, 20 steps, Euler a, CFG 7) through the engine, each policy in a fresh process
(OpenMP reads its wait policy once, at start).

    python bench/threads.py [--runs 5] [--loads 0,1,2] [--policies 1,2,2-passive,auto]

Policies: "N" = N threads with OpenMP's default (spinning) wait, "N-passive" = N threads that sleep when idle
(OMP_WAIT_POLICY=PASSIVE), "auto" = what `ldm_core.threads.thread_policy` picks on this machine. A load of K
runs K busy processes (one core each) for the whole measurement, as other programs on a shared machine do.
Prints one JSON line per (policy, load) with the median and all runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _busy(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def _child(threads: int, runs: int) -> None:
    import torch

    from ldm_core.config import BUILTIN_MODEL_DIR
    from ldm_core.engine import scratch_engine
    from ldm_core.generation_requests import GenerationRequest

    torch.set_num_threads(threads)
    with scratch_engine(BUILTIN_MODEL_DIR, device="cpu") as (engine, model):
        size = model.native_size
        req = GenerationRequest.build(
            prompt="a red circle on a blue background",
            steps=20,
            seed=1,
            cfg_scale=7,
            sampler_name="Euler a",
            width=size,
            height=size,
            save_images=False,
        )
        engine.generate(req)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            engine.generate(req)
            times.append(time.perf_counter() - t0)
    print(json.dumps({"times": times}))


def _policy_env(policy: str) -> tuple[int, dict[str, str]]:
    from ldm_core.threads import thread_policy

    if policy == "auto":
        chosen = thread_policy(None)
        return chosen.threads, chosen.environ()
    n, _, wait = policy.partition("-")
    env = {"OMP_WAIT_POLICY": "PASSIVE"} if wait == "passive" else {}
    return int(n), env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--loads", default="0,1,2", help="comma list of competing busy processes")
    ap.add_argument("--policies", default="1,2,2-passive,auto")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child is not None:
        _child(a.child, a.runs)
        return 0
    for load in (int(x) for x in a.loads.split(",")):
        for policy in a.policies.split(","):
            threads, extra = _policy_env(policy)
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
            env.update(extra, HF_HUB_OFFLINE="1")
            stop = multiprocessing.Event()
            busy = [multiprocessing.Process(target=_busy, args=(stop,), daemon=True) for _ in range(load)]
            for b in busy:
                b.start()
            try:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(threads), "--runs", str(a.runs)],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=3600,
                    cwd=ROOT,
                )
            finally:
                stop.set()
                for b in busy:
                    b.join(5)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                return 1
            times = json.loads(out.stdout.strip().splitlines()[-1])["times"]
            print(
                json.dumps(
                    {
                        "policy": policy,
                        "threads": threads,
                        "env": extra,
                        "competing_processes": load,
                        "median_s": round(statistics.median(times), 3),
                        "runs_s": [round(t, 3) for t in times],
                        "cpus": os.cpu_count(),
                    }
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
