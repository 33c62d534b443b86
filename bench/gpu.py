"""GPU speed of the engine against plain diffusers, in one run: random-weight SD 1.5 (512x512) and SDXL
(1024x1024) at their real sizes, built from the shipped configs (speed does not depend on weight values) and
saved as diffusers folders; 20-step Euler a, CFG 7. For each of diffusers, the engine eager (`--no-compile`)
and the engine compiled (the default on CUDA) it prints:

  loop_it_s     denoising-loop iterations per second, from two job lengths: (N2 - N1) / (t(N2) - t(N1)),
                so text encoding, VAE decode and saving cancel out (CFG's two halves are one iteration)
  image_s       one whole 20-step job, median of --runs (text encoding, loop, VAE decode, PNG)
  peak_vram_gib torch.cuda.max_memory_allocated during that runner's jobs (reset before each runner)
  first_s       the runner's first image (for the compiled engine: compile included)
and, for the compiled engine, the first image of a second process that finds the compile cache warm.

  python bench/gpu.py [--only sd15|sdxl] [--runs 5]
  python bench/gpu.py --tiny          # shrunken configs on any device: checks the script itself
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CONFIGS = ROOT / "ldm_core" / "models" / "configs"
PROMPT, NEGATIVE = "a photo of a cat", "blurry"


def report(**kw) -> None:
    print(json.dumps(kw), flush=True)


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_random_folder(family: str, out: Path, tiny: bool) -> Path:
    """A diffusers folder with random weights for `family` ("sd1" or "sdxl") from the shipped configs."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    src, folder = CONFIGS / family, out / family
    if (folder / "unet").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if torch.cuda.is_available() else torch.float32

    def shrink(cfg: dict, kind: str) -> dict:
        if not tiny:
            return cfg
        cfg = dict(cfg)
        n = len(cfg["block_out_channels"])
        if kind == "unet":
            cfg.update(block_out_channels=[32] * n, attention_head_dim=2, norm_num_groups=8,
                       transformer_layers_per_block=1)
        else:
            cfg.update(block_out_channels=[32] * n, norm_num_groups=8)
        return cfg

    shutil.copy(src / "model_index.json", folder / "model_index.json")
    for sub in ("scheduler", "tokenizer", "tokenizer_2"):
        if (src / sub).exists():
            shutil.copytree(src / sub, folder / sub, dirs_exist_ok=True)
    with torch.device(_device()):
        UNet2DConditionModel.from_config(shrink(UNet2DConditionModel.load_config(src / "unet"), "unet")).to(
            dtype
        ).save_pretrained(folder / "unet")
        AutoencoderKL.from_config(shrink(AutoencoderKL.load_config(src / "vae"), "vae")).to(dtype).save_pretrained(
            folder / "vae"
        )
        CLIPTextModel(CLIPTextConfig.from_pretrained(src / "text_encoder")).to(dtype).save_pretrained(
            folder / "text_encoder"
        )
        if (src / "text_encoder_2").exists():
            CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(src / "text_encoder_2")).to(
                dtype
            ).save_pretrained(folder / "text_encoder_2")
    for sub in ("tokenizer", "tokenizer_2"):
        if not (folder / sub).exists() and (sub == "tokenizer" or (folder / "text_encoder_2").exists()):
            CLIPTokenizer.from_pretrained(CONFIGS.parent / "tokenizers" / "clip").save_pretrained(folder / sub)
    return folder


def engine_runner(folder: Path, data: Path, compile_mode: str):
    """(run(steps), engine) for the engine on `folder`."""
    from ldm_core.config import EngineConfig
    from ldm_core.engine import Engine
    from ldm_core.generation_requests import GenerationRequest

    cfg = EngineConfig.from_data_dir(data, ckpt_dirs=(folder.parent,), builtin_model_dir=None, save_images=False,
                                     preview_every=0, compile=compile_mode, device=str(_device()))
    engine = Engine(cfg)
    engine.load_checkpoint(folder.name)
    size = engine.current_model.native_size

    def run(steps: int) -> None:
        engine.generate(GenerationRequest.build(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, seed=1,
                                                sampler_name="Euler a", cfg_scale=7, width=size, height=size,
                                                save_images=False))

    return run, engine


def diffusers_runner(folder: Path, family: str):
    import torch
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    kw = {"safety_checker": None, "requires_safety_checker": False} if family != "sdxl" else {}
    pipe = cls.from_pretrained(folder, torch_dtype=dtype, local_files_only=True, **kw).to(_device())
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor

    def run(steps: int) -> None:
        pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7, width=size, height=size,
             generator=torch.Generator("cpu").manual_seed(1))

    return run, pipe


def timed(fn, *args) -> float:
    sync()
    t0 = time.perf_counter()
    fn(*args)
    sync()
    return time.perf_counter() - t0


def measure(name: str, case: str, make, steps: int, runs: int) -> None:
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run, owner = make()
    load_s = time.perf_counter() - t0
    first = timed(run, steps)
    images = [timed(run, steps) for _ in range(runs)]
    short = statistics.median(timed(run, steps) for _ in range(runs))
    long_ = statistics.median(timed(run, 2 * steps) for _ in range(runs))
    extra = {}
    if hasattr(owner, "compiler"):
        extra = {"compiles": owner.compiler.count, "compile_failures": owner.compiler.failures}
    report(case=case, runner=name, load_s=round(load_s, 2), first_s=round(first, 3),
           image_s=round(statistics.median(images), 4), loop_it_s=round(steps / max(long_ - short, 1e-9), 1),
           peak_vram_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None, runs=runs, **extra)
    del run, owner


def child_first_image(folder: Path, data: Path, steps: int) -> None:
    """In a fresh process: the compiled engine's load + first image (the compile cache is what differs)."""
    t0 = time.perf_counter()
    run, engine = engine_runner(folder, data, "on")
    load_s = time.perf_counter() - t0
    first = timed(run, steps)
    print(json.dumps({"load_s": round(load_s, 2), "first_s": round(first, 3), "compiles": engine.compiler.count}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["sd15", "sdxl"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--child", nargs=3, metavar=("FOLDER", "DATA", "STEPS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if a.child:
        child_first_image(Path(a.child[0]), Path(a.child[1]), int(a.child[2]))
        return
    import torch

    from ldm_core.attention import AttentionRegistry

    dev = _device()
    report(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__)
    choice = AttentionRegistry().choose("xformers", dev)
    report(xformers_requested=True, attention_used=choice.name, reason=choice.reason)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor-cache")  # cold for the first compiled run
        for family, key, size in (("sd1", "sd15", 512), ("sdxl", "sdxl", 1024)):
            if a.only not in (None, key):
                continue
            folder = build_random_folder(family, root / "models", a.tiny)
            case = f"{key}_{64 if a.tiny else size}"
            measure("diffusers", case, lambda f=folder, fam=family: diffusers_runner(f, fam), a.steps, a.runs)
            measure("engine", case, lambda f=folder: engine_runner(f, root / "data", "off"), a.steps, a.runs)
            measure("engine-compiled", case, lambda f=folder: engine_runner(f, root / "data", "on"), a.steps, a.runs)
            warm = subprocess.run([sys.executable, __file__, "--child", str(folder), str(root / "data"), str(a.steps)],
                                  capture_output=True, text=True, env=dict(os.environ), timeout=1800)
            lines = [x for x in warm.stdout.splitlines() if x.startswith("{")]
            report(case=case, runner="engine-compiled, second process (warm compile cache)",
                   **(json.loads(lines[-1]) if lines else {"error": warm.stderr[-500:]}))


if __name__ == "__main__":
    main()
