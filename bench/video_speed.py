"""Speed of a clip on the CPU: median seconds for a 16-frame clip of the built-in model with its motion module
(64x64, 20 steps, Euler a, CFG 7), through the engine as the Video tab's jobs run it (`Engine.generate` with
`animatediff`: prompt encoding, the loop over the 16 frames with the temporal layers, VAE decode of every frame,
the GIF encoded), nothing saved; next to the same 16 frames as independent images (a batch of 16, no module).

    python bench/video_speed.py                        # models/builtin + models/AnimateDiff/builtin-motion
    python bench/video_speed.py --module DIR --runs 7 --threads 2

The first run of each kind is a warm-up and is not counted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=REPO / "models" / "builtin")
    p.add_argument("--module", type=Path, default=REPO / "models" / "AnimateDiff" / "builtin-motion")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from ldm_core.engine import scratch_engine
    from ldm_core.generation_requests import GenerationRequest

    prompt = "a red circle moving to the right on a blue background"
    clip = {"model": a.module.name, "video_length": a.frames, "format": ["GIF"], "closed_loop": "N"}
    times: dict[str, list[float]] = {"clip": [], "independent": []}
    with scratch_engine(a.model, motion_dirs=(a.module.parent,)) as (engine, _):
        for run in range(a.runs + 1):
            for kind in times:
                extra = {"animatediff": clip} if kind == "clip" else {"batch_size": a.frames}
                req = GenerationRequest.build(prompt=prompt, steps=a.steps, seed=run, save_images=False, **extra)
                t0 = time.perf_counter()
                engine.generate(req)
                if run:  # the first run warms up
                    times[kind].append(time.perf_counter() - t0)
    for kind, ts in times.items():
        print(
            f"{kind:12s} {a.frames} frames, {a.steps} steps, {a.threads} threads: median {statistics.median(ts):.2f} s "
            f"(min {min(ts):.2f}, max {max(ts):.2f}, n={len(ts)})"
        )
    ratio = statistics.median(times["clip"]) / statistics.median(times["independent"])
    print(f"clip / independent frames: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
