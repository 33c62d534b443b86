"""The README's clip: four prompts (right, left, up, down) made by the built-in model with its motion module,
through the engine as the Video tab runs them (16 frames, 20 steps, Euler a, CFG 7), side by side at 2x, as an
animated GIF.

    python bench/readme_video.py                      # -> docs/images/video-sample.gif
    python bench/readme_video.py --seed 3 --out /tmp/clip.gif
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
PROMPTS = (
    "a red circle moving to the right on a blue background",
    "a yellow square moving to the left on a purple background",
    "a white star moving up on a green background",
    "an orange triangle moving down on a black background",
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=REPO / "models" / "builtin")
    p.add_argument("--module", type=Path, default=REPO / "models" / "AnimateDiff" / "builtin-motion")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "video-sample.gif")
    a = p.parse_args(argv)

    from PIL import Image

    from ldm_core.engine import scratch_engine
    from ldm_core.generation_requests import GenerationRequest
    from ldm_core.video.clips import encode_clip

    clips = []
    with scratch_engine(a.model, motion_dirs=(a.module.parent,)) as (engine, _):
        for i, prompt in enumerate(PROMPTS):
            req = GenerationRequest.build(
                prompt=prompt,
                steps=20,
                seed=a.seed + i,
                save_images=False,
                animatediff={"model": a.module.name, "video_length": 16, "format": [], "closed_loop": "N"},
            )
            clips.append(engine.generate(req).images)
    w, h = clips[0][0].size
    frames = []
    for f in range(len(clips[0])):
        row = Image.new("RGB", (w * len(clips) * 2 + 4 * (len(clips) - 1), h * 2), "white")
        for c, clip in enumerate(clips):
            row.paste(clip[f].resize((w * 2, h * 2), Image.NEAREST), (c * (w * 2 + 4), 0))
        frames.append(row)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    data = encode_clip(frames, "GIF", 8, infotext="\n".join(PROMPTS))
    a.out.write_bytes(data)
    print(f"wrote {a.out} ({len(io.BytesIO(data).getvalue()) / 1024:.0f} KB): {', '.join(PROMPTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
