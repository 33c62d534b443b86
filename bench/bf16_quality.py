"""How far bf16 moves the built-in model's images from fp32: 4 prompts x 3 seeds, 20 steps, Euler a, CFG 7,
the engine in fp32 eager against the engine in bf16 (compiled with `--compile`, as the fast CPU path runs).
Prints the mean, 99th-percentile and max absolute pixel difference (0-255) and how many images the analyser
reads the same (largest object's shape and colour, and the background).

    python bench/bf16_quality.py [--compile] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = (
    "a red circle on a blue background",
    "a green square in the top left on a white background",
    "a yellow triangle on a black background",
    "a purple star at the bottom on a grey background",
)


def _images(**config) -> list[np.ndarray]:
    from ldm_core.config import BUILTIN_MODEL_DIR
    from ldm_core.engine import scratch_engine
    from ldm_core.generation_requests import GenerationRequest

    out = []
    with scratch_engine(BUILTIN_MODEL_DIR, device="cpu", **config) as (engine, _):
        for prompt in PROMPTS:
            for seed in range(3):
                req = GenerationRequest.build(
                    prompt=prompt, steps=20, seed=seed, sampler_name="Euler a", cfg_scale=7, save_images=False
                )
                out.append(np.asarray(engine.generate(req).images[0]))
    return out


def _reading(image: np.ndarray) -> tuple:
    from ldm_core.train.analyser import analyse

    a = analyse(image)
    top = a.objects[0] if a.objects else None
    return a.background, top and top.shape, top and top.colour


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile", action="store_true", help="the bf16 side compiled (the fast CPU path)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    ref = _images(precision="fp32", compile="off")
    test = _images(precision="bf16", compile="on" if a.compile else "off")
    diffs = [np.abs(x.astype(np.int16) - y.astype(np.int16)) for x, y in zip(ref, test, strict=True)]
    same = sum(_reading(x) == _reading(y) for x, y in zip(ref, test, strict=True))
    print(
        json.dumps(
            {
                "images": len(ref),
                "bf16": "compiled" if a.compile else "eager",
                "mean_abs_diff": round(float(np.mean([d.mean() for d in diffs])), 3),
                "p99_abs_diff": round(float(np.mean([np.percentile(d, 99) for d in diffs])), 2),
                "max_abs_diff": int(max(d.max() for d in diffs)),
                "analyser_same_reading": same,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
