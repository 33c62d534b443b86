"""Command line: `python -m ldm_core txt2img|img2img|inpaint|models|samplers ...`.

Writes PNGs with their infotext into --out and shows a progress bar. Stable form:
  python -m ldm_core txt2img --prompt "..." [--negative-prompt "..."] [--model NAME] [--sampler "Euler a"]
      [--steps 20] [--cfg-scale 7] [--seed 1] [--width 512] [--height 512] [--batch-size 1] --out DIR
      [--controlnet MODEL --control-image FILE [--control-module canny] [--control-weight 1] [--control-mode M]
       [--guidance-start 0] [--guidance-end 1]] [--alwayson-scripts JSON|@file.json]
  python -m ldm_core img2img --init-image FILE [--denoising-strength 0.75] ... --out DIR
  python -m ldm_core inpaint --init-image FILE --mask FILE ... --out DIR
  python -m ldm_core batch prompts.jsonl|prompts.csv --out DIR [--model NAME] [--ray-local N | --ray-address auto]
      [--ray-threads 1] [--window N] [--limit N]      (ldm_core.batch: resumable, writes DIR/manifest.jsonl)
  python -m ldm_core detect --module depth_midas --image FILE --out MAP.png [--resolution 512]
      [--threshold-a A] [--threshold-b B]    (a ControlNet preprocessor, as /controlnet/detect runs it)
  python -m ldm_core upscale IMAGE... | FOLDER --out DIR [--upscaler NAME] [--scale 4 | --width W --height H
      [--no-crop]] [--upscaler-2 NAME --upscaler-2-visibility V]     (the Extras tab; infotext kept)
  python -m ldm_core upscalers       (list the upscaler names: Lanczos, model files, LDSR, SD x4, extensions)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import threading
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .config import COLOUR_FIXES, EngineConfig
from .generation_requests import GenerationRequest, Img2ImgRequest, InpaintRequest, RequestError
from .models.loading import ModelFileError
from .scaleout import add_ray_flags, ray_service_args
from .threads import thread_policy
from .video.free_init import FILTERS as FREEINIT_FILTERS
from .video.options import add_timeline_argument, timeline_options


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default="")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--model", default=None, help="checkpoint name (default: the first model found, else built-in)")
    p.add_argument("--vae", default=None)
    p.add_argument(
        "--sampler",
        default=None,
        help="sampler label, e.g. 'Euler a'; default: the model's recommendation (its sidecar's sampler_name and "
        "scheduler), else Euler a",
    )
    p.add_argument("--scheduler", default="Automatic", help="schedule type, e.g. Karras")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg-scale", type=float, default=7.0)
    p.add_argument(
        "--rescale-cfg",
        type=float,
        default=None,
        help="CFG rescale 0..1 (0: plain CFG); default: the model's recommendation (its sidecar's rescale_cfg)",
    )
    p.add_argument("--seed", type=int, default=-1)
    p.add_argument("--subseed", type=int, default=-1)
    p.add_argument("--subseed-strength", type=float, default=0.0)
    p.add_argument("--width", type=int, default=None, help="default: the model's native size")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--n-iter", type=int, default=1, help="batch count")
    p.add_argument("--clip-skip", type=int, default=1)
    p.add_argument("--out", required=True, help="folder for the PNGs")
    _add_control_flags(p)
    _add_engine_flags(p)


def _add_control_flags(p: argparse.ArgumentParser) -> None:
    """One ControlNet / T2I-Adapter unit by flags, and any extension's arguments as A1111's alwayson_scripts."""
    g = p.add_argument_group("ControlNet (one unit here; more units and other extensions by --alwayson-scripts)")
    g.add_argument(
        "--controlnet", default=None, metavar="MODEL", help="a model in models/ControlNet, e.g. builtin-canny"
    )
    g.add_argument("--control-image", default=None, help="the unit's image (img2img/inpaint: default the init image)")
    g.add_argument(
        "--control-module",
        default="none",
        help="preprocessor run on the image: canny, scribble, shapes_seg, depth_midas, ... (none: it is a map already)",
    )
    g.add_argument("--control-weight", type=float, default=1.0)
    g.add_argument(
        "--control-mode",
        default="Balanced",
        help='"Balanced", "My prompt is more important" or "ControlNet is more important"',
    )
    g.add_argument("--guidance-start", type=float, default=0.0, help="fraction of the steps where the unit starts")
    g.add_argument("--guidance-end", type=float, default=1.0, help="fraction of the steps where it stops")
    g.add_argument(
        "--alwayson-scripts",
        default=None,
        metavar="JSON",
        help='extensions\' arguments as the API takes them, JSON text or @file.json: {"controlnet": {"args": [...]}}',
    )


def _alwayson_scripts(args) -> dict:
    """The request's alwayson_scripts: --alwayson-scripts, plus the unit the --controlnet flags describe."""
    text = args.alwayson_scripts
    scripts: dict = {}
    if text:
        if text.startswith("@"):
            try:
                text = Path(text[1:]).read_text(encoding="utf-8")
            except OSError as exc:
                raise RequestError("alwayson_scripts", f"cannot read {text[1:]}: {exc}") from None
        try:
            scripts = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RequestError("alwayson_scripts", f"not JSON: {exc}") from None
        if not isinstance(scripts, dict):
            raise RequestError("alwayson_scripts", "must be a JSON object keyed by extension name")
    if args.control_image and not args.controlnet:
        raise RequestError("controlnet", "--control-image needs --controlnet MODEL (see models/ControlNet)")
    if args.controlnet:
        if not args.control_image and args.command in ("txt2img", "video") and not getattr(args, "init_image", None):
            raise RequestError(
                "control_image", "--controlnet needs --control-image FILE (the map or the image to detect it from)"
            )
        unit = {
            "enabled": True,
            "model": args.controlnet,
            "module": args.control_module,
            "weight": args.control_weight,
            "control_mode": args.control_mode,
            "guidance_start": args.guidance_start,
            "guidance_end": args.guidance_end,
        }
        if args.control_image:
            unit["image"] = _open_image(args.control_image, "control_image")
        entry = scripts.setdefault("controlnet", {})
        if not isinstance(entry, dict):
            raise RequestError("alwayson_scripts", "alwayson_scripts.controlnet must be an object with args")
        entry["args"] = [*(entry.get("args") or []), unit]
    return scripts


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    """The flags that build the engine's config: folders, device, precision, attention, pickle policy."""
    p.add_argument("--data-dir", default=".", help="folder holding models/ (A1111 layout)")
    p.add_argument("--ckpt-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    p.add_argument("--attention", default="auto")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pt files (weights_only loading)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: all but one)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile UNet + VAE decoder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ldm_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _common(sub.add_parser("txt2img", help="generate from a prompt"))
    p = sub.add_parser("img2img", help="transform an image")
    _common(p)
    p.add_argument("--init-image", required=True)
    p.add_argument("--denoising-strength", type=float, default=0.75)
    p.add_argument("--resize-mode", default="Just resize")
    p = sub.add_parser("inpaint", help="repaint the masked part of an image")
    _common(p)
    p.add_argument("--init-image", required=True)
    p.add_argument("--mask", required=True, help="white = repaint")
    p.add_argument("--denoising-strength", type=float, default=0.75)
    p.add_argument("--mask-blur", type=int, default=4)
    p.add_argument("--inpainting-fill", default="original")
    p.add_argument("--inpaint-full-res", action="store_true", help='inpaint area "Only masked"')
    p.add_argument("--inpaint-full-res-padding", type=int, default=32)
    p.add_argument("--invert-mask", action="store_true")
    p = sub.add_parser("video", help="make a clip with a motion module (text-, image- or video-to-video)")
    _common(p)
    p.add_argument("--motion-module", default=None, help="a module in models/AnimateDiff (default: the first)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--fps", type=float, default=8)
    p.add_argument("--context", type=int, default=16, help="frames the module sees at once")
    p.add_argument("--overlap", type=int, default=-1, help="-1: context / 4")
    p.add_argument("--closed-loop", default="R-P", choices=["N", "R-P", "R+P", "A"])
    p.add_argument(
        "--shared-noise", type=float, default=0.0, help="0-1: share of each frame's noise from the first frame's"
    )
    add_timeline_argument(p)
    p.add_argument(
        "--freeinit-iters",
        type=int,
        default=1,
        help="FreeInit: samplings in all (1: off; 3 is sd-webui-animatediff's default); text-to-video only",
    )
    p.add_argument("--freeinit-filter", default="butterworth", choices=FREEINIT_FILTERS)
    p.add_argument("--format", default="GIF,MP4", help="comma-separated: GIF, MP4, WEBP, WEBM, PNG, TXT")
    p.add_argument("--init-image", default=None, help="image-to-video: the start image")
    p.add_argument("--video-source", default=None, help="video-to-video: a clip (GIF, WebP, MP4, WebM)")
    p.add_argument("--denoising-strength", type=float, default=0.75)
    p = sub.add_parser("models", help="list the models found")
    p.add_argument("--data-dir", default=".")
    p.add_argument("--ckpt-dir", default=None)
    sub.add_parser("samplers", help="list sampler names and schedule types")
    _batch_parser(sub)
    p = sub.add_parser("detect", help="run a ControlNet preprocessor (canny, depth_midas, seg_ufade20k, ...)")
    p.add_argument("--module", required=True, help="preprocessor name (see /controlnet/module_list)")
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True, help="PNG file for the control map")
    p.add_argument("--resolution", type=int, default=512, help="short side to process at")
    p.add_argument("--threshold-a", type=float, default=-1, help="default: the preprocessor's")
    p.add_argument("--threshold-b", type=float, default=-1)
    _add_engine_flags(p)
    _upscale_parser(sub)
    p = sub.add_parser("upscalers", help="list the upscalers found (names for upscale --upscaler)")
    _add_engine_flags(p)
    return parser


def _upscale_parser(sub) -> None:
    p = sub.add_parser(
        "upscale",
        help="upscale images or a folder, as the Extras tab does (model files, LDSR, SD x4, Lanczos)",
        description="Each image goes to OUT/<its name>.png (never overwriting: -1, -2, ... is appended), keeping "
        "its infotext; the settings are recorded as A1111's postprocessing text. Model upscalers are the files in "
        "models/ESRGAN, models/DAT, ... (see `python -m ldm_core upscalers`).",
    )
    p.add_argument("inputs", nargs="+", help="image files, or one folder (its images, sorted by name)")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--upscaler", default="Lanczos", help="upscaler 1 (default: Lanczos)")
    p.add_argument("--scale", type=float, default=None, help="scale by this factor (default 4; up to 8)")
    p.add_argument("--width", type=int, default=None, help="scale to this width (with --height)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--no-crop", action="store_true", help="with --width/--height: keep the aspect, no crop")
    p.add_argument("--upscaler-2", default="None")
    p.add_argument("--upscaler-2-visibility", type=float, default=0.0, help="0..1: how much of upscaler 2")
    g = p.add_argument_group("diffusion upscalers (LDSR, SD x4, SD x2 latent)")
    g.add_argument("--steps", type=int, default=None, help="SD x4 / x2 denoising steps (default: the setting, 20)")
    g.add_argument("--ldsr-steps", type=int, default=None, help="LDSR DDIM steps (default: the setting, 100)")
    g.add_argument("--noise-level", type=int, default=None, help="SD x4 noise level")
    g.add_argument("--image-guidance", type=float, default=None,
                   help="SD x4 guidance toward the low-resolution image, 0-10 (1: off; default: the setting, 0: "
                        "the upscaler's recommended one)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--prompt", default=None, help="default: each image's own prompt, from its infotext")
    g.add_argument("--colour-fix", default=None, choices=COLOUR_FIXES,
                   help="the output's large-scale colour from the input (default: the setting, Wavelet)")
    _add_engine_flags(p)


def _batch_parser(sub) -> None:
    p = sub.add_parser(
        "batch",
        help="run many requests from a JSONL or CSV file (resumable; fans out over a Ray pool with --ray-*)",
        description="Each JSONL line (or CSV row under a header of field names) is one request in the A1111 "
        "API's txt2img shape. Images go to OUT/<line>-<n>.png, a record per item to OUT/manifest.jsonl; "
        "items already done are skipped on rerun. Exit status 1 when any line was bad or failed.",
    )
    p.add_argument("input", help="prompts.jsonl (one JSON object per line) or prompts.csv (header row)")
    p.add_argument("--out", required=True, help="folder for the images and manifest.jsonl")
    p.add_argument("--format", choices=["jsonl", "csv"], default=None, help="default: by the file's extension")
    p.add_argument("--model", default=None, help="checkpoint for lines that name none")
    p.add_argument("--limit", type=int, default=None, help="look at the first N requests only")
    p.add_argument("--window", type=int, default=None, help="jobs kept submitted at once (default: 2 x workers)")
    add_ray_flags(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_engine_flags(p)


def _open_image(path: str, field: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise RequestError(field, f"file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise RequestError(field, f"cannot decode image {path}: {exc}") from None


def _config(args) -> EngineConfig:
    over = {}
    if getattr(args, "ckpt_dir", None):
        over["ckpt_dirs"] = (Path(args.ckpt_dir),)
    for name in ("device", "precision", "attention", "allow_pickle", "compile"):
        if hasattr(args, name):
            over[name] = getattr(args, name)
    if hasattr(args, "out"):
        over["outputs_dir"] = Path(args.out)
    return EngineConfig.from_data_dir(args.data_dir, **over).with_shipped_addons()


def _request(args):
    values = dict(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        model=args.model,
        vae=args.vae,
        sampler_name=args.sampler,
        scheduler=args.scheduler,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        rescale_cfg=args.rescale_cfg,
        seed=args.seed,
        subseed=args.subseed,
        subseed_strength=args.subseed_strength,
        width=args.width,
        height=args.height,
        batch_size=args.batch_size,
        n_iter=args.n_iter,
        clip_skip=args.clip_skip,
    )
    if scripts := _alwayson_scripts(args):
        values["alwayson_scripts"] = scripts
    if args.command == "txt2img":
        return GenerationRequest.build(**values)
    if args.command == "video":
        return _video_request(args, values)
    values.update(init_images=[_open_image(args.init_image, "init_image")], denoising_strength=args.denoising_strength)
    if args.command == "img2img":
        return Img2ImgRequest.build(resize_mode=args.resize_mode, **values)
    return InpaintRequest.build(
        mask=_open_image(args.mask, "mask"),
        mask_blur=args.mask_blur,
        inpainting_fill=args.inpainting_fill,
        inpaint_full_res=args.inpaint_full_res,
        inpaint_full_res_padding=args.inpaint_full_res_padding,
        inpainting_mask_invert=args.invert_mask,
        **values,
    )


def _video_request(args, values: dict):
    values.pop("batch_size")  # the frames are the batch
    clip = {
        "model": args.motion_module,
        "video_length": args.frames,
        "fps": args.fps,
        "batch_size": args.context,
        "overlap": args.overlap,
        "closed_loop": args.closed_loop,
        "shared_noise": args.shared_noise,
        **timeline_options(args.motion_timeline),
        "freeinit_enable": args.freeinit_iters > 1,
        "freeinit_iters": max(1, args.freeinit_iters),
        "freeinit_filter": args.freeinit_filter,
        "format": [f.strip() for f in args.format.split(",") if f.strip()],
    }
    init = _open_image(args.init_image, "init_image") if args.init_image else None
    if args.video_source:
        from .video.clips import read_source_clip

        clip["video_source"], first = read_source_clip(args.video_source)
        init = init or first
    if init is None:
        return GenerationRequest.build(animatediff=clip, **values)
    return Img2ImgRequest.build(
        animatediff=clip, init_images=[init], denoising_strength=args.denoising_strength, **values
    )


def _generate(args) -> int:
    from tqdm import tqdm

    from .engine import Engine
    from .progress import JobContext

    request = _request(args)
    # extensions run their alwayson_scripts (ControlNet units, ...), as in the UI; without any, none are loaded
    engine = _engine_with_extensions(_config(args))[0] if request.alwayson_scripts else Engine(_config(args))
    ctx = JobContext()
    done = threading.Event()
    result: dict = {}

    def work():
        try:
            result["r"] = engine.generate(request, ctx)
        except BaseException as exc:  # reported below, on the main thread
            result["e"] = exc
        finally:
            done.set()

    threading.Thread(target=work, daemon=True).start()
    bar = tqdm(total=request.steps * request.n_iter, unit="step", file=sys.stderr)
    last = 0
    while not done.wait(0.1):
        s = ctx.progress.snapshot()
        pos = s.job_no * s.steps + s.step
        if pos > last:
            bar.update(pos - last)
            last = pos
    bar.close()
    if "e" in result:
        raise result["e"]
    for path in result["r"].paths:
        print(path)
    return 0


def _batch(args) -> int:
    from .batch import count_images, read_items, run_batch, summary
    from .service import make_service

    for name in ("limit", "window"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise RequestError(name, f"must be at least 1; got {value}")
    source = Path(args.input)
    if not source.is_file():
        raise RequestError("input", f"file not found: {source}")
    try:
        # no live previews (nobody watches them; they cost a decode per step) and no saving on the worker:
        # the batch writes each image itself, on this machine, whichever worker made it
        config = dataclasses.replace(_config(args), preview_every=0, save_images=False)
        service = make_service(
            config,
            max_queued=max(64, args.window or 0),
            **ray_service_args(args),
        )
    except (RuntimeError, ValueError) as exc:  # Ray flags without Ray installed, no cluster at the address, ...
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # keep every worker busy with one job in hand and one waiting (the queue runs `workers` jobs at once)
    window = args.window or 2 * max(1, int(getattr(service.queue, "workers", 1)), args.ray_local)
    try:
        from .extensions import load_extensions

        # extensions run the lines' alwayson_scripts (ControlNet units, ...), as the server's do; Ray replicas
        # load the same ones when a job says the head has them
        service.extensions = load_extensions(service.engine, service.config)
        expected = count_images(read_items(source, fmt=args.format), Path(args.out), limit=args.limit)
        items = read_items(source, fmt=args.format)
        report = run_batch(
            service,
            items,
            Path(args.out),
            window=window,
            limit=args.limit,
            default_model=args.model,
            progress=not args.no_progress,
            expected_images=expected,
        )
    except ValueError as exc:  # the file as a whole is unreadable (e.g. a CSV without a prompt column)
        if isinstance(exc, RequestError):
            raise
        raise RequestError("input", str(exc)) from None
    except KeyboardInterrupt:
        print("interrupted: what is done is in the manifest; run the same command again to go on", file=sys.stderr)
        return 130
    finally:
        service.shutdown()
    print(summary(report), file=sys.stderr)
    return 0 if report.ok else 1


def _engine_with_extensions(cfg: EngineConfig):
    """An engine with the enabled extensions loaded (their preprocessors, upscalers, ...), as the UI has it."""
    from .engine import Engine
    from .extensions import load_extensions

    engine = Engine(cfg)
    return engine, load_extensions(engine, cfg)


def _detect(args) -> int:
    """One preprocessor of the loaded extensions on one image; the map is written to --out."""
    out = Path(args.out)
    cfg = EngineConfig.from_data_dir(args.data_dir, device=args.device, allow_pickle=args.allow_pickle)
    cfg = cfg.with_shipped_addons()
    _engine, manager = _engine_with_extensions(cfg)
    pre = manager.preprocessors.get(args.module) or manager.preprocessors.get(args.module.casefold())
    if pre is None:
        names = sorted({p.name for p in manager.preprocessors.values()})
        raise RequestError("module", f"unknown preprocessor {args.module!r}; available: {', '.join(names)}")
    image = _open_image(args.image, "image").convert("RGB")
    detected = pre(image, args.resolution, args.threshold_a, args.threshold_b)
    out.parent.mkdir(parents=True, exist_ok=True)
    detected.save(out)
    print(f"{out} ({detected.width}x{detected.height}, {pre.name})")
    return 0


def _upscale_params(args):
    from .extras import ExtrasParams

    if (args.width is None) != (args.height is None):
        raise RequestError("width" if args.width is None else "height", "give --width and --height together")
    if args.width is not None and args.scale is not None:
        raise RequestError("scale", "give either --scale or --width/--height, not both")
    if args.width is not None:
        sizing = dict(
            resize_mode=1,
            upscaling_resize_w=args.width,
            upscaling_resize_h=args.height,
            upscaling_crop=not args.no_crop,
        )
    else:
        sizing = dict(resize_mode=0, upscaling_resize=4.0 if args.scale is None else args.scale)
    return ExtrasParams(
        upscaler_1=args.upscaler,
        upscaler_2=args.upscaler_2,
        extras_upscaler_2_visibility=args.upscaler_2_visibility,
        **sizing,
    )


def _upscale_inputs(inputs: list[str]) -> list[Path]:
    from .extras import IMAGE_SUFFIXES

    paths = [Path(p) for p in inputs]
    if len(paths) == 1 and paths[0].is_dir():
        files = sorted(p for p in paths[0].iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise RequestError("inputs", f"no images ({', '.join(IMAGE_SUFFIXES)}) in {paths[0]}")
        return files
    for p in paths:
        if p.is_dir():
            raise RequestError("inputs", f"{p} is a folder: give one folder alone, or image files")
        if not p.is_file():
            raise RequestError("inputs", f"file not found: {p}")
    return paths


def _upscale_config(args) -> EngineConfig:
    cfg = _config(args)
    over = {
        name: getattr(args, arg)
        for name, arg in (
            ("steps", "steps"),
            ("ldsr_steps", "ldsr_steps"),
            ("noise_level", "noise_level"),
            ("seed", "seed"),
            ("prompt", "prompt"),
            ("colour_fix", "colour_fix"),
            ("image_guidance", "image_guidance"),
        )
        if getattr(args, arg, None) is not None
    }
    if "image_guidance" in over:  # the setting's range (Settings > Upscaling)
        from .options import OPTIONS_BY_KEY, OptionError, coerce

        try:
            coerce(OPTIONS_BY_KEY["diffusion_upscale_image_guidance"], over["image_guidance"])
        except OptionError as exc:
            raise RequestError("image_guidance", f"--image-guidance {exc.message}") from None
    if over:
        cfg = dataclasses.replace(cfg, diffusion_upscale=dataclasses.replace(cfg.diffusion_upscale, **over))
    return cfg


def _upscale(args) -> int:
    """The Extras tab from the command line: each input to a PNG in --out, with its infotext kept."""
    from tqdm import tqdm

    from .extras import upscale_files

    params = _upscale_params(args)
    files = _upscale_inputs(args.inputs)
    out = Path(args.out)
    if any(f.parent.resolve() == out.resolve() for f in files):
        raise RequestError("out", "must differ from the folder the images are in")
    engine, _manager = _engine_with_extensions(_upscale_config(args))
    params, _warnings = params.with_fallbacks(engine.upscalers)  # the registry logs each warning
    bar = tqdm(total=len(files), unit="image", file=sys.stderr)
    done = [0]

    def progress(d: int, _total: int) -> None:
        bar.update(d - done[0])
        done[0] = d

    try:
        result = upscale_files(files, out, params, engine.upscalers, progress=progress)
    finally:
        bar.close()
    for path in result.written:
        print(path)
    for path, why in result.skipped:
        print(f"skipped {path}: {why}", file=sys.stderr)
    return 0 if not result.skipped else 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if hasattr(args, "threads"):
        try:
            thread_policy(args.threads).apply()
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        if args.command == "samplers":
            from .schedulers import default_sampler_registry

            reg = default_sampler_registry()
            for info in reg.infos():
                print(f"{info.name}\t(aliases: {', '.join(info.aliases)})")
            print("schedule types:", ", ".join(reg.schedule_types()))
            return 0
        if args.command == "models":
            from .models import ModelRegistry

            cfg = _config(args)
            reg = ModelRegistry(cfg.ckpt_dirs, cfg.vae_dirs, cfg.builtin_model_dir)
            for e in reg.checkpoints():
                print(f"{e.title}\t{e.path}")
            return 0
        if args.command == "batch":
            return _batch(args)
        if args.command == "detect":
            return _detect(args)
        if args.command == "upscale":
            return _upscale(args)
        if args.command == "upscalers":
            engine, _manager = _engine_with_extensions(_config(args))
            for name in engine.upscalers.names():
                print(name)
            return 0
        return _generate(args)
    except RequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModelFileError as exc:  # a broken weights file (corrupt, truncated, git-LFS pointer): name it, no traceback
        print(f"error: model file {exc}", file=sys.stderr)
        return 2
