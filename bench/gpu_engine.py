"""GPU check of the engine: builds random-weight SD 1.5 and SDXL models at their real sizes from the shipped
configs (speed does not depend on weight values), saves each as a diffusers folder, then loads it through the
engine with default settings and measures a 20-step txt2img (it/s of the denoising loop, and the whole job),
against plain diffusers `StableDiffusion(XL)Pipeline` on the same folder, sampler, steps and seed. Also shows
what happens when xformers is requested (probe and fallback). Prints one JSON line per measurement.

  python bench/gpu_engine.py [--only sd15|sdxl] [--steps 20]
Runs on CPU with --tiny (shrunken configs) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm_core.attention import AttentionRegistry  # noqa: E402
from ldm_core.config import EngineConfig  # noqa: E402
from ldm_core.engine import Engine  # noqa: E402
from ldm_core.generation_requests import GenerationRequest  # noqa: E402
from ldm_core.progress import JobContext  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "ldm_core" / "models" / "configs"


def report(**kw):
    print(json.dumps(kw), flush=True)


def build_random_folder(family: str, out: Path, tiny: bool) -> Path:
    """Write a diffusers folder with random weights for `family` ('sd1' or 'sdxl') using the shipped configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    src = CONFIGS / family
    folder = out / family
    folder.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if torch.cuda.is_available() else torch.float32

    def shrink(cfg: dict, kind: str) -> dict:
        if not tiny:
            return cfg
        cfg = dict(cfg)
        if kind == "unet":
            n = len(cfg["block_out_channels"])
            cfg.update(
                block_out_channels=[32] * n,
                attention_head_dim=2,
                norm_num_groups=8,
                transformer_layers_per_block=1,
                cross_attention_dim=cfg["cross_attention_dim"],
            )
        if kind == "vae":
            cfg.update(block_out_channels=[32] * len(cfg["block_out_channels"]), norm_num_groups=8)
        return cfg

    import shutil

    for name in ("model_index.json",):
        shutil.copy(src / name, folder / name)
    for sub in ("scheduler", "tokenizer", "tokenizer_2"):
        if (src / sub).exists():
            shutil.copytree(src / sub, folder / sub, dirs_exist_ok=True)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        unet = UNet2DConditionModel.from_config(
            shrink(UNet2DConditionModel.load_config(src / "unet"), "unet")
        )
        unet.to(dtype).save_pretrained(folder / "unet")
        del unet
        vae = AutoencoderKL.from_config(shrink(AutoencoderKL.load_config(src / "vae"), "vae"))
        vae.to(dtype).save_pretrained(folder / "vae")
        del vae
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(src / "text_encoder"))
        te.to(dtype).save_pretrained(folder / "text_encoder")
        del te
        if (src / "text_encoder_2").exists():
            te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(src / "text_encoder_2"))
            te2.to(dtype).save_pretrained(folder / "text_encoder_2")
            del te2
    for sub in ("tokenizer", "tokenizer_2"):
        if not (folder / sub).exists() and (sub == "tokenizer" or (folder / "text_encoder_2").exists()):
            CLIPTokenizer.from_pretrained(CONFIGS.parent / "tokenizers" / "clip").save_pretrained(
                folder / sub
            )
    return folder


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_case(family: str, root: Path, size: int, steps: int, tiny: bool):
    folder = build_random_folder(family, root, tiny)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    cfg = EngineConfig.from_data_dir(
        root / "data", ckpt_dirs=(root,), builtin_model_dir=None, save_images=False, preview_every=0
    )
    engine = Engine(cfg)
    t0 = time.perf_counter()
    engine.load_checkpoint(folder.name)
    sync()
    load_s = time.perf_counter() - t0
    req = GenerationRequest.build(
        prompt="a photo of a cat",
        negative_prompt="blurry",
        steps=steps,
        sampler_name="Euler a",
        cfg_scale=7,
        seed=1,
        width=size,
        height=size,
        save_images=False,
    )
    engine.generate(req)  # warm-up
    times = []
    for _ in range(3):
        ctx = JobContext()
        sync()
        t0 = time.perf_counter()
        engine.generate(req, ctx)
        sync()
        times.append(time.perf_counter() - t0)
    best = min(times)
    report(
        case=f"{family}_{size}",
        engine="ldm_core",
        load_s=round(load_s, 2),
        job_s=round(best, 4),
        it_per_s_including_encode_decode=round(steps / best, 2),
        dtype=str(engine.policy.dtype),
        attention=engine.attention_choice.name,
        device=engine.policy.name,
    )
    model = engine.current_model
    # plain diffusers on the same folder, same sampler, steps, seed
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    engine.unload()
    del engine, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    kw = {"safety_checker": None, "requires_safety_checker": False} if family != "sdxl" else {}
    pipe = cls.from_pretrained(folder, torch_dtype=dtype, local_files_only=True, **kw)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    pipe.set_progress_bar_config(disable=True)

    def call():
        g = torch.Generator("cpu").manual_seed(1)
        pipe(
            "a photo of a cat",
            negative_prompt="blurry",
            num_inference_steps=steps,
            guidance_scale=7,
            width=size,
            height=size,
            generator=g,
        )

    call()
    times = []
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - t0)
    base = min(times)
    report(
        case=f"{family}_{size}",
        engine="diffusers",
        job_s=round(base, 4),
        it_per_s_including_encode_decode=round(steps / base, 2),
        ratio_engine_over_diffusers=round(best / base, 3),
    )
    pipe = None  # free it before the peak-memory report (call() is not used after this)
    if torch.cuda.is_available():
        report(case=f"{family}_{size}", peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["sd15", "sdxl"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__)
    choice = AttentionRegistry().choose("xformers", dev)
    report(xformers_requested=True, attention_used=choice.name, reason=choice.reason)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.only in (None, "sd15"):
            run_case("sd1", root, 64 if args.tiny else 512, args.steps, args.tiny)
        if args.only in (None, "sdxl"):
            run_case("sdxl", root, 64 if args.tiny else 1024, args.steps, args.tiny)


if __name__ == "__main__":
    main()
