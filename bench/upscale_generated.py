"""The built-in diffusion upscaler on the built-in model's own images (not the renderer's, which it was trained
on): generate images from simple prompts, upscale each 4x with `ldm-builtin-x4` and with Lanczos, and count how
often the analyser reads the 64 px image's main object (same shape and colour) in the 4x image.

    python bench/upscale_generated.py --n 40
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="generated images")
    ap.add_argument("--upscaler", default="ldm-builtin-x4")
    a = ap.parse_args()
    from PIL import Image

    from ldm_core.config import EngineConfig
    from ldm_core.engine import Engine
    from ldm_core.generation_requests import GenerationRequest
    from ldm_core.train import shapes
    from ldm_core.train.analyser import analyse

    engine = Engine(EngineConfig.from_data_dir(tempfile.mkdtemp(), save_images=False))  # the built-in model
    rng = random.Random("gen-check")
    same = {a.upscaler: 0, "Lanczos": 0}
    read = 0
    for i in range(a.n):
        shape, colour = rng.choice(shapes.SHAPES), rng.choice(["red", "blue", "green", "yellow", "purple", "orange"])
        prompt = f"a {colour} {shape} on a {rng.choice(['white', 'black', 'grey'])} background"
        img = engine.generate(GenerationRequest.build(prompt=prompt, steps=20, seed=1000 + i)).images[0]
        found = analyse(img).objects
        if not found:
            continue
        read += 1
        top = found[0]
        outs = {
            a.upscaler: engine.upscalers.upscale(img, a.upscaler, scale=4),
            "Lanczos": img.resize((img.width * 4, img.height * 4), Image.LANCZOS),
        }
        for name, out in outs.items():
            same[name] += analyse(out).find(shape=top.shape, colour=top.colour) is not None
    print(
        f"{a.n} generated images, {read} with an object read at 64 px; the same shape and colour read at 4x: "
        + ", ".join(f"{k} {v}/{read}" for k, v in same.items())
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
