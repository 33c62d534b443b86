"""The README's sample images: a few prompts through the engine on the built-in model (CPU, native size,
20 steps, Euler a, CFG 7, fixed seeds), saved as one small labelled PNG grid.

    python bench/readme_samples.py                        # writes docs/images/builtin-samples.png
    python bench/readme_samples.py --model DIR --out x.png --scale 2

Each tile is the engine's image at 64x64, upscaled `--scale` times with nearest-neighbour (no detail is
added) so it can be seen on a page; the caption under it is the prompt.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image, ImageDraw  # noqa: E402

from ldm_core.config import BUILTIN_MODEL_DIR  # noqa: E402
from ldm_core.engine import scratch_engine  # noqa: E402
from ldm_core.generation_requests import GenerationRequest  # noqa: E402

PROMPTS: tuple[tuple[str, str, int], ...] = (
    ("a red circle on a blue background", "", 1),
    ("a yellow star in the top left corner, black background", "", 2),
    ("a big green square on a white background", "", 3),
    ("a pink triangle at the bottom, gray background", "", 4),
    ("a blue diamond on the right on an orange background", "", 5),
    ("a white circle and a red square on a green background", "", 6),
    ("a circle", "", 7),
    ("a circle", "red, blue, green", 7),
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=BUILTIN_MODEL_DIR)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "builtin-samples.png")
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--columns", type=int, default=4)
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    with scratch_engine(a.model) as (engine, model):
        size = model.native_size
        tiles = []
        for prompt, negative, seed in PROMPTS:
            req = GenerationRequest.build(
                prompt=prompt,
                negative_prompt=negative,
                steps=20,
                seed=seed,
                sampler_name="Euler a",
                cfg_scale=7,
                width=size,
                height=size,
                save_images=False,
            )
            im = engine.generate(req).images[0]
            label = prompt if not negative else f"{prompt} (negative: {negative})"
            tiles.append((im.resize((size * a.scale,) * 2, Image.NEAREST), label))
            print(f"{label}: done")
    tile, text_h, pad = size * a.scale, 44, 6
    cols = a.columns
    rows = (len(tiles) + cols - 1) // cols
    cell_w = max(tile, 200)
    grid = Image.new("RGB", (cols * (cell_w + pad) + pad, rows * (tile + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, label) in enumerate(tiles):
        x = pad + (i % cols) * (cell_w + pad)
        y = pad + (i // cols) * (tile + text_h + pad)
        grid.paste(im, (x + (cell_w - tile) // 2, y))
        words, lines, line = label.split(), [], ""
        for w in words:  # wrap the caption to the cell width
            if draw.textlength(f"{line} {w}".strip()) > cell_w and line:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        for k, ln in enumerate(lines[:3]):
            draw.text((x, y + tile + 2 + 12 * k), ln, fill="black")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(a.out, optimize=True)
    print(f"wrote {a.out} ({a.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
