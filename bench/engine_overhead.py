"""Engine overhead: time per image through `Engine.generate` against calling diffusers' StableDiffusionPipeline
directly, on the same model folder, sampler (Euler a), steps, seed, prompt and size, in one process.

  python bench/engine_overhead.py [--model DIR] [--steps 20] [--runs 7] [--size N]

Without --model it uses the built-in model when present, else builds the tests' tiny SD1 model. Prints JSON lines
and the ratio engine/diffusers of the median times (1.00 = no overhead).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ldm_core.config import BUILTIN_MODEL_DIR  # noqa: E402
from ldm_core.engine import scratch_engine  # noqa: E402
from ldm_core.generation_requests import GenerationRequest  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--size", type=int)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tmp = tempfile.TemporaryDirectory()
    folder = args.model
    if folder is None:
        if (BUILTIN_MODEL_DIR / "model_index.json").exists():
            folder = BUILTIN_MODEL_DIR
        else:
            sys.path.insert(0, str(ROOT / "tests"))
            from tiny_models import build_all

            folder = build_all(Path(tmp.name))["sd1"]["diffusers"]
    with scratch_engine(folder) as (engine, model):
        measure(args, engine, model, folder)


def measure(args: argparse.Namespace, engine, model, folder: Path) -> None:
    """Median seconds per image of the engine and of diffusers' pipeline on the same weights, interleaved."""
    size = args.size or model.native_size
    prompt, negative = "a red circle on a blue background", "green"
    req = GenerationRequest.build(
        prompt=prompt,
        negative_prompt=negative,
        steps=args.steps,
        seed=7,
        sampler_name="Euler a",
        cfg_scale=7,
        width=size,
        height=size,
        save_images=False,
    )

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=engine.samplers.create("Euler a", "Automatic", dict(model.scheduler_config)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def run_engine():
        engine.generate(req)

    def run_diffusers():
        pipe(
            prompt,
            negative_prompt=negative,
            num_inference_steps=args.steps,
            guidance_scale=7,
            width=size,
            height=size,
            generator=torch.Generator("cpu").manual_seed(7),
        )

    times: dict[str, list[float]] = {"engine": [], "diffusers": []}
    run_engine(), run_diffusers()  # warm-up
    for _ in range(args.runs):  # interleaved so drift affects both alike
        for name, fn in (("engine", run_engine), ("diffusers", run_diffusers)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(
            json.dumps(
                {
                    "runner": k,
                    "median_s": round(v, 4),
                    "runs": args.runs,
                    "steps": args.steps,
                    "size": size,
                    "model": str(folder),
                }
            )
        )
    print(json.dumps({"ratio_engine_over_diffusers": round(med["engine"] / med["diffusers"], 3)}))


if __name__ == "__main__":
    main()
