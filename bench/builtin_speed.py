"""Speed of the built-in model on the CPU: median seconds for one image at the native resolution, 20 steps,
the model's recommended sampling (the built-in model's sidecar: DPM++ 2M, Exponential; Euler a for a model that
recommends none), CFG 7, through the engine as the UI's jobs run it (`Engine.generate`: prompt
parsing, text encoding, the loop, VAE decode, infotext), images not saved. `bench/cpu.py` puts the same
job next to plain diffusers and the REST API in one run.

    python bench/builtin_speed.py                 # the shipped model (models/builtin)
    python bench/builtin_speed.py --random        # an untrained model of the same architecture
    python bench/builtin_speed.py --model DIR --runs 7 --threads 1,2

Speed does not depend on weight values, so `--random` measures the architecture before any training.
Each thread count is timed separately: on a busy 2-core machine two OpenMP threads can be many times
slower than one (they spin-wait for each other while other processes hold the cores), so both are
printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def _random_model(folder: Path, preset: str) -> Path:
    from ldm_core.train import builtin

    spec = builtin.PRESETS[preset]
    vae, te, unet = builtin.build_vae(spec), builtin.build_text_encoder(spec), builtin.build_unet(spec)
    builtin.export_folder(folder, spec, vae.state_dict(), te.state_dict(), unet.state_dict(), 1.0)
    return folder


def main(argv: list[str] | None = None) -> int:
    from ldm_core.engine import scratch_engine
    from ldm_core.generation_requests import GenerationRequest
    from ldm_core.train.builtin import DEFAULT_OUT

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--random", action="store_true", help="benchmark an untrained model of the builtin preset")
    ap.add_argument("--preset", default="builtin")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--sampler", default=None, help="default: the model's recommendation, else Euler a")
    ap.add_argument("--threads", default="1,2", help="comma list of torch CPU thread counts to time")
    ap.add_argument("--compile", default="off", choices=["auto", "on", "off"], help="the engine's compile setting")
    a = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = _random_model(Path(tmp) / "m", a.preset) if a.random else a.model
        t = time.perf_counter()
        with scratch_engine(model, device="cpu", compile=a.compile) as (engine, loaded):
            load_s = time.perf_counter() - t
            res = loaded.native_size

            def one(seed: int) -> float:
                req = GenerationRequest.build(
                    prompt="a red circle on a white background",
                    steps=a.steps,
                    cfg_scale=a.cfg,
                    seed=seed,
                    sampler_name=a.sampler,  # None: the model's recommendation, as the UI starts at
                    width=res,
                    height=res,
                    save_images=False,
                )
                t0 = time.perf_counter()
                engine.generate(req)
                return time.perf_counter() - t0

            probe = GenerationRequest.build(prompt="", sampler_name=a.sampler)
            sampling = " ".join(engine.sampling(probe))
            print(
                f"model: {'random ' + a.preset if a.random else model}  ({res}x{res}, {sampling}, {a.steps} steps, "
                f"CFG {a.cfg}, CPU, through the engine, compile {a.compile}), load {load_s:.2f} s"
            )
            for n in (int(x) for x in a.threads.split(",")):
                torch.set_num_threads(n)
                warm = one(0)
                times = [one(1 + i) for i in range(a.runs)]
                print(f"{n} thread(s): first image {warm:.3f} s; runs {', '.join(f'{x:.3f}' for x in times)}")
                print(f"{n} thread(s): median seconds per image: {statistics.median(times):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
