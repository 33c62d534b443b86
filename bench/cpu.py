"""CPU speed of the product on the built-in model: one native-size image, 20 steps, Euler a, CFG 7, timed
three ways in one run, interleaved so that drift affects all alike:

  diffusers  plain diffusers' StableDiffusionPipeline on the same folder (the baseline)
  engine     `Engine.generate` as the UI's jobs run it (text encoding, loop, VAE decode, infotext, PNG)
  api        a `POST /sdapi/v1/txt2img` round trip to `python -m api.server` (a second process, started here,
             idle while the others run): request parsing, the job queue, the engine, base64 PNG encoding

    python bench/cpu.py [--model DIR] [--runs 7] [--steps 20] [--threads 1] [--no-api] [--compile] [--bf16]

`--compile` adds "engine-compiled" (the engine with `compile="on"`, as `--compile` starts it: frozen weights,
C++ wrapper); `--bf16` adds "engine-compiled-bf16" (`--compile --precision bf16`: bf16 weights, AMX/AVX512-BF16
kernels where the CPU has them). Prints one JSON line per runner (median seconds, all runs, the first run with
its compile) and the ratios against diffusers and against the eager engine.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PROMPT, NEGATIVE = "a red circle on a blue background", ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ApiRunner:
    """`python -m api.server` on the model's folder in a throw-away data folder, and one timed request."""

    def __init__(self, model: Path, builtin: bool, threads: int, steps: int, size: int, extra: list[str]):
        import requests

        self.requests = requests
        self.tmp = tempfile.TemporaryDirectory()
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        cmd = [
            sys.executable,
            "-m",
            "api.server",
            "--port",
            str(port),
            "--data-dir",
            self.tmp.name,
            "--threads",
            str(threads),
        ]
        cmd += ["--device", "cpu", "--log-level", "warning", *extra]
        if not builtin:
            cmd += ["--no-builtin-model", "--ckpt-dir", str(model.parent)]
        self.log = open(Path(self.tmp.name) / "server.log", "wb")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(self.url + "/sdapi/v1/options", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("api server did not start: " + (Path(self.tmp.name) / "server.log").read_text())
            time.sleep(0.3)
        self.payload = {
            "prompt": PROMPT,
            "negative_prompt": NEGATIVE,
            "steps": steps,
            "sampler_name": "Euler a",
            "cfg_scale": 7,
            "width": size,
            "height": size,
            "seed": 7,
        }
        if not builtin:
            self.payload["override_settings"] = {"sd_model_checkpoint": model.name}

    def __call__(self) -> None:
        r = self.requests.post(self.url + "/sdapi/v1/txt2img", json=self.payload, timeout=600)
        r.raise_for_status()
        base64.b64decode(r.json()["images"][0])

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self.log.close()
        self.tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    from ldm_core.config import BUILTIN_MODEL_DIR
    from ldm_core.engine import scratch_engine
    from ldm_core.generation_requests import GenerationRequest

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=BUILTIN_MODEL_DIR)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-api", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time the engine with compile='on'")
    ap.add_argument("--bf16", action="store_true", help="also time the engine with compile='on', precision='bf16'")
    ap.add_argument("--api-flag", action="append", default=[], help="extra flag for the API server (repeatable)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(a.model), local_files_only=True, dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor

    def diffusers_one() -> None:
        with torch.inference_mode():
            pipe(
                PROMPT,
                negative_prompt=NEGATIVE,
                num_inference_steps=a.steps,
                guidance_scale=7,
                height=size,
                width=size,
                generator=torch.Generator().manual_seed(7),
            )

    def request(**over):
        return GenerationRequest.build(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            steps=a.steps,
            seed=7,
            sampler_name="Euler a",
            cfg_scale=7,
            width=size,
            height=size,
            **over,
        )

    runners = {"diffusers": diffusers_one}
    closers = []
    with scratch_engine(a.model, device="cpu") as (engine, _model):
        req = request(save_images=False)
        runners["engine"] = lambda: engine.generate(req)
        from contextlib import ExitStack

        stack = ExitStack()
        closers.append(stack.close)
        variants = {"engine-compiled": ("fp32", a.compile), "engine-compiled-bf16": ("bf16", a.bf16)}
        for name, (precision, wanted) in variants.items():
            if wanted:
                eng, _ = stack.enter_context(scratch_engine(a.model, device="cpu", compile="on", precision=precision))
                runners[name] = lambda eng=eng: eng.generate(req)
        if not a.no_api:
            builtin = a.model.resolve() == BUILTIN_MODEL_DIR.resolve()
            api = ApiRunner(a.model, builtin, a.threads, a.steps, size, a.api_flag)
            closers.append(api.close)
            runners["api"] = api
        try:
            first = {}
            for name, fn in runners.items():  # warm-up (and the compiled path's compile)
                t0 = time.perf_counter()
                fn()
                first[name] = time.perf_counter() - t0
            times: dict[str, list[float]] = {k: [] for k in runners}
            for _ in range(a.runs):
                for name, fn in runners.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        finally:
            for close in closers:
                close()
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(
            json.dumps(
                {
                    "runner": k,
                    "median_s": round(med[k], 4),
                    "first_s": round(first[k], 3),
                    "runs_s": [round(x, 4) for x in v],
                    "threads": a.threads,
                    "steps": a.steps,
                    "size": size,
                    "model": str(a.model),
                }
            )
        )
    print(json.dumps({f"{k}/diffusers": round(v / med["diffusers"], 3) for k, v in med.items() if k != "diffusers"}))
    print(json.dumps({f"{k}/engine": round(v / med["engine"], 3) for k, v in med.items() if k != "engine"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
