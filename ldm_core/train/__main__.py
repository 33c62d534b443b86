"""`python -m ldm_core.train <command>`: train the built-in model (`builtin`), evaluate a model folder
(`eval`), dump sample renders of the shapes world (`data`).

Each command is a pair of functions (add its arguments, run it) in `COMMANDS`; another command (e.g.
`lora`) is added by one more entry.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path


def _add_builtin(p: argparse.ArgumentParser) -> None:
    from ldm_core.train.builtin import DEFAULT_OUT, PRESETS, TrainOptions

    d = TrainOptions()
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="diffusers folder to write (default: %(default)s)")
    p.add_argument("--work-dir", type=Path, default=d.work_dir, help="checkpoints; resumed when present")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=d.preset, help="model size")
    p.add_argument("--vae-steps", type=int, default=d.vae_steps, help="planned VAE steps (upper bound)")
    p.add_argument("--unet-steps", type=int, default=d.unet_steps, help="planned UNet steps (upper bound)")
    p.add_argument("--batch", type=int, default=None, help="batch size of both phases (sets both below)")
    p.add_argument("--vae-batch", type=int, default=d.vae_batch)
    p.add_argument("--unet-batch", type=int, default=d.unet_batch)
    p.add_argument("--vae-lr", type=float, default=d.vae_lr)
    p.add_argument("--unet-lr", type=float, default=d.unet_lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--caption-dropout", type=float, default=d.caption_dropout)
    p.add_argument("--kl-weight", type=float, default=d.kl_weight)
    p.add_argument(
        "--decoder-lr",
        type=float,
        default=d.decoder_lr,
        help="decoder fine-tuning during the UNet phase (encoder frozen)",
    )
    p.add_argument(
        "--decoder-every",
        type=int,
        default=d.decoder_every,
        help="UNet steps per decoder step (0: no decoder fine-tuning)",
    )
    p.add_argument("--decoder-batch", type=int, default=d.decoder_batch)
    p.add_argument(
        "--object-weight",
        type=float,
        default=d.object_weight,
        help="extra UNet loss weight on latent cells covered by objects (0: plain MSE)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="wall-clock budget of this invocation; stops early, saves, reports steps done",
    )
    p.add_argument(
        "--vae-seconds",
        type=float,
        default=None,
        help="time budget of the VAE phase (default: --vae-share of --max-seconds)",
    )
    p.add_argument("--vae-share", type=float, default=d.vae_share)
    p.add_argument(
        "--sitting-steps",
        type=int,
        default=None,
        help="at most this many optimizer steps now (a CPU run over several sittings)",
    )
    p.add_argument("--checkpoint-every", type=float, default=d.checkpoint_every, help="seconds")
    p.add_argument("--export-every", type=float, default=d.export_every, help="seconds")
    p.add_argument("--num-workers", type=int, default=None, help="data workers (default 6 on CUDA, 0 on CPU)")
    p.add_argument("--data", type=Path, default=None, help="folder of images + same-name .txt captions")
    p.add_argument("--init", type=Path, default=None, help="start from this diffusers folder (fine-tune)")
    p.add_argument(
        "--latent-samples",
        type=int,
        default=d.latent_samples,
        help="held-out renders used to measure the latent std (VAE scaling factor)",
    )
    p.add_argument(
        "--autocast",
        choices=("auto", "bf16", "off"),
        default=d.autocast,
        help="bf16 autocast: auto = on CUDA only",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (log lines only)")


def _run_builtin(a: argparse.Namespace) -> int:
    from ldm_core.train.builtin import TrainOptions, command_line, train_builtin

    opts = TrainOptions(
        out=a.out,
        work_dir=a.work_dir,
        seed=a.seed,
        device=a.device,
        preset=a.preset,
        vae_steps=a.vae_steps,
        unet_steps=a.unet_steps,
        vae_batch=a.batch or a.vae_batch,
        unet_batch=a.batch or a.unet_batch,
        vae_lr=a.vae_lr,
        unet_lr=a.unet_lr,
        warmup_steps=a.warmup_steps,
        ema_decay=a.ema_decay,
        caption_dropout=a.caption_dropout,
        kl_weight=a.kl_weight,
        decoder_lr=a.decoder_lr,
        decoder_every=a.decoder_every,
        decoder_batch=a.decoder_batch,
        object_weight=a.object_weight,
        max_seconds=a.max_seconds,
        vae_seconds=a.vae_seconds,
        vae_share=a.vae_share,
        sitting_steps=a.sitting_steps,
        checkpoint_every=a.checkpoint_every,
        export_every=a.export_every,
        num_workers=a.num_workers,
        data=a.data,
        init=a.init,
        progress_bar=not a.no_progress,
        latent_samples=a.latent_samples,
        autocast=a.autocast,
        command=command_line(),
    )
    rec = train_builtin(opts)
    keys = (
        "complete",
        "stop_reason",
        "vae_steps_done",
        "unet_steps_done",
        "vae_seconds",
        "unet_seconds",
        "wall_seconds_this_sitting",
        "final_vae_loss",
        "final_unet_loss",
        "scaling_factor",
    )
    print(json.dumps({k: rec[k] for k in keys}, indent=2))
    return 0


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="diffusers folder")
    p.add_argument("--n", type=int, default=200, help="single-object images (other tests scale from it)")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument(
        "--rescale-cfg",
        type=float,
        default=None,
        help="CFG rescale 0..1 of the text-to-image tests (and of img2img and inpaint with --edits engine); "
        "default: the model's sidecar recommendation",
    )
    p.add_argument(
        "--sampler",
        default=None,
        help="the sampler, a name the UI lists: of the text-to-image tests, and of img2img and inpaint with --edits "
        "engine (diffusers' edit pipelines run Euler a); default: the model's recommendation (its sidecar's "
        "sampler_name and scheduler), else Euler a",
    )
    p.add_argument("--schedule", default="Automatic", help="its schedule type, e.g. Karras (default: %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="images per pipeline call")
    p.add_argument("--save-images", type=Path, default=None, help="also write a contact sheet per test here")
    p.add_argument("--only", default=None, help="comma list of tests: single,double,negative,img2img,inpaint,vae")
    p.add_argument(
        "--edits",
        choices=("diffusers", "engine"),
        default="diffusers",
        help="what runs the img2img and inpaint tests: diffusers' pipelines (plain CFG), or the engine as the "
        "img2img and inpaint tabs run it (the model's recommended CFG rescale, mask blur 4) (default: %(default)s)",
    )


def _run_eval(a: argparse.Namespace) -> int:
    from ldm_core.train.evaluate import EvalOptions, evaluate, format_report

    only = tuple(s.strip() for s in a.only.split(",")) if a.only else None
    rep = evaluate(
        EvalOptions(
            model=a.model,
            n=a.n,
            device=a.device,
            steps=a.steps,
            cfg=a.cfg,
            rescale_cfg=a.rescale_cfg,
            batch=a.batch,
            save_images=a.save_images,
            only=only,
            sampler=a.sampler,
            schedule=a.schedule,
            edits=a.edits,
        )
    )
    print(format_report(rep))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rep, indent=2) + "\n", encoding="utf-8")
        print(f"report written to {a.json}")
    return 0


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder for PNG + .txt + scenes.jsonl")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64)


def _run_data(a: argparse.Namespace) -> int:
    from ldm_core.train.shapes import dump_samples

    paths = dump_samples(a.out, a.n, a.seed, a.size)
    print(f"wrote {len(paths)} renders with captions to {a.out}")
    return 0


def _module(name: str):
    """`ldm_core.train.<name>`, imported when its command runs (torch and diffusers load only then)."""
    import importlib

    return importlib.import_module(f"ldm_core.train.{name}")


def _lazy(name: str, add: str = "add_arguments", run: str = "run") -> tuple[Callable, Callable]:
    """(add its arguments, run it) for a command whose two functions are `add` and `run` of
    `ldm_core.train.<name>`, imported when the command is parsed."""
    return (lambda p: getattr(_module(name), add)(p)), (lambda a: getattr(_module(name), run)(a))


#: name -> (help, add_arguments, run)
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "builtin": (
        "train the built-in model from scratch (or fine-tune with --data/--init)",
        _add_builtin,
        _run_builtin,
    ),
    "eval": ("score a model folder on held-out prompts with the image analyser", _add_eval, _run_eval),
    "data": ("write sample renders of the shapes world with captions", _add_data, _run_data),
    "refine": (
        "continue a built-in model on a CPU: text-encoder pre-training, latent cache, UNet, decoder",
        *_lazy("refine"),
    ),
    "curve": ("draw a model folder's learning curve (refine --export-every points) as a PNG", *_lazy("curve")),
    "motion": (
        "train the built-in model's motion module (AnimateDiff-class) on shapes-world clips, base frozen",
        *_lazy("motion"),
    ),
    "motion-frames": (
        "write single frames of motion-training clips with their captions: the motion module's domain-adapter data",
        *_lazy("motion", "add_frames_arguments", "run_frames"),
    ),
    "motion-eval": (
        "score a motion module: does the object move the way the prompt says, and stay the same shape/colour?",
        *_lazy("motion", "add_eval_arguments", "run_eval"),
    ),
    "sr": (
        "train the built-in diffusion upscaler (SD x4 upscaler structure) on shapes-world renders and photos",
        *_lazy("sr"),
    ),
    "sr-eval": (
        "score a diffusion upscaler 4x against Lanczos and the x2 model twice: PSNR, edge sharpness, analyser",
        *_lazy("sr", "add_eval_arguments", "run_eval"),
    ),
    "sr-vae": (
        "continue a factor-4 VAE on photographs and shapes renders for the diffusion upscaler (sr --vae)",
        *_lazy("sr_vae"),
    ),
    "text-distill": (
        "distil a narrower text encoder from a model's (for add-ons with a size budget: sr --text-encoder)",
        *_lazy("text_distill"),
    ),
    "inpaint": (
        "train an inpainting model (9-channel UNet, as sd-v1-5-inpainting) from a base on shapes-world masks",
        *_lazy("inpaint"),
    ),
    "lora": ("train a LoRA on images + .txt captions, written in the kohya format", *_lazy("lora")),
    "lora-eval": (
        "does <lora:heart:1> bring hearts in? analyser counts with and without the tag",
        *_lazy("lora", "add_eval_arguments", "run_eval"),
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm_core.train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add, _) in COMMANDS.items():
        add(sub.add_parser(name, help=help_))
    args = parser.parse_args(argv)
    warn_emulated_bf16(args)
    return COMMANDS[args.command][2](args)


def warn_emulated_bf16(args: argparse.Namespace, log=lambda m: print(m, file=sys.stderr, flush=True)) -> bool:
    """Say so when `--autocast bf16` would run on a CPU without bf16 hardware (emulated: about ten times slower
    than fp32, `ldm_core.devices.cpu_has_fast_bf16`); True when it warned. The run goes on as asked."""
    import torch

    from ldm_core.devices import cpu_has_fast_bf16

    if getattr(args, "autocast", None) != "bf16" or torch.cuda.is_available() or cpu_has_fast_bf16() is not False:
        return False
    log(
        "warning: --autocast bf16 on a CPU without bf16 hardware (no avx512_bf16 / amx_bf16 flag): it is emulated "
        "and about ten times slower than fp32 here; --autocast off is faster on this machine"
    )
    return True


if __name__ == "__main__":
    sys.exit(main())
