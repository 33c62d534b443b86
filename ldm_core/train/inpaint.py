"""Train an inpainting model from a base (the built-in model, or any SD 1.x/2.x diffusers folder): the
9-channel UNet of Stable Diffusion's inpainting checkpoints (sd-v1-5-inpainting, sd-2-inpainting), which the
engine and A1111 run when such a model is picked for img2img/inpaint.

Recipe (as Stability's inpainting models were made): the UNet's input takes, besides the noisy latent (4
channels), the mask at latent size (1) and the VAE latent of the image with the masked pixels set to 0 in
[-1, 1], i.e. mid grey (4). It starts as the base UNet with zero weights on the five new input channels (so it
first behaves exactly as the base) and is fine-tuned on shapes-world renders with random masks; the text
encoder and VAE are the base's, frozen. Loss: the base's denoising loss (v for the built-in) on the whole
latent, timesteps uniform.

Masks (`MASK_KINDS`, drawn per image): a quadrant or half of the image, a rectangle, an ellipse, brush strokes
(thick polylines, as painted in the UI), an object's own area dilated or its box, or everything (so the model
still draws a whole image); a tenth are inverted (repaint around a kept region, as outpainting does).
Captions: the scene's caption from the shapes world's templates; with probability `object_caption`, when the
mask covers (more than 60% of) exactly the objects named, only those objects ("a blue star"), as users type
what to paint there; with `caption_dropout` none (for CFG). Scenes are rendered and encoded on the fly (a
batch is a function of (seed, step)), so no scene repeats.

`work_dir` keeps a resumable checkpoint (fp32 UNet, optimiser, step, seconds, RNG); `out` is written as a whole
diffusers folder (the base's text encoder, tokenizer, VAE and scheduler beside the new UNet), which the model
list shows next to the base. `python -m ldm_core.train inpaint --base models/builtin --out
models/builtin-inpainting --work-dir W --max-seconds 3600`; measure it with `python -m ldm_core.train eval
--model models/builtin-inpainting --only inpaint --edits engine`.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ldm_core.models.geometry import latent_normalisation
from ldm_core.train import shapes
from ldm_core.train.builtin import _autocast, _save_atomic, command_line, warmup_cosine, write_folder_atomic
from ldm_core.train.step_loop import StepLoop, read_checkpoint

#: Mask kinds and how often each is drawn.
MASK_KINDS = {"quadrant": 0.2, "rect": 0.2, "ellipse": 0.15, "strokes": 0.15, "object": 0.2, "all": 0.1}
#: An object counts as masked (and may be named alone) when this share of its area is inside the mask.
MASKED_SHARE = 0.6


@dataclass
class InpaintTrainOptions:
    base: Path
    out: Path
    work_dir: Path | None = None
    steps: int = 100_000
    max_seconds: float | None = None
    batch: int = 64
    lr: float = 1e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    caption_dropout: float = 0.1
    object_caption: float = 0.4
    invert: float = 0.1
    seed: int = 0
    device: str = "cpu"
    autocast: str = "auto"
    export_every: float = 900.0
    checkpoint_every: float = 300.0
    log_every: int = 20


def random_mask(rng: random.Random, res: int, covers: np.ndarray, invert: float = 0.1) -> np.ndarray:
    """One binary mask (res, res) uint8 in {0, 1}; `covers` (K, res, res) are the scene's objects' own
    coverages (an all-zero plane for an absent object)."""
    kind = rng.choices(list(MASK_KINDS), weights=list(MASK_KINDS.values()))[0]
    present = [k for k in range(len(covers)) if covers[k].max() > 0.5]
    m = np.zeros((res, res), np.uint8)
    if kind == "object" and not present:
        kind = "rect"
    if kind == "quadrant":
        h = res // 2
        if rng.random() < 0.75:
            qx, qy = rng.randrange(2), rng.randrange(2)
            m[qy * h : (qy + 1) * h, qx * h : (qx + 1) * h] = 1
        else:  # a half
            side = rng.randrange(4)
            sl = slice(0, h) if side % 2 == 0 else slice(h, res)
            if side < 2:
                m[:, sl] = 1
            else:
                m[sl, :] = 1
    elif kind == "rect":
        w, h = (int(res * rng.uniform(0.2, 0.8)) for _ in range(2))
        x, y = rng.randrange(res - w + 1), rng.randrange(res - h + 1)
        m[y : y + h, x : x + w] = 1
    elif kind == "ellipse":
        c = (rng.randrange(res), rng.randrange(res))
        axes = (int(res * rng.uniform(0.1, 0.4)), int(res * rng.uniform(0.1, 0.4)))
        cv2.ellipse(m, c, axes, rng.uniform(0, 180), 0, 360, 1, -1)
    elif kind == "strokes":
        for _ in range(rng.randint(1, 4)):
            pts = np.array([[rng.randrange(res), rng.randrange(res)] for _ in range(rng.randint(2, 5))], np.int32)
            thick = max(2, int(res * rng.uniform(1 / 16, 1 / 5)))
            cv2.polylines(m, [pts], False, 1, thick)
    elif kind == "object":
        obj = covers[rng.choice(present)] > 0.3
        if rng.random() < 0.5:  # the object's area, dilated
            r = rng.randint(1, max(1, res // 8))
            m = cv2.dilate(obj.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8))
        else:  # its box with a margin
            ys, xs = np.nonzero(obj)
            pad = rng.randint(1, max(1, res // 8))
            m[max(0, ys.min() - pad) : ys.max() + pad + 1, max(0, xs.min() - pad) : xs.max() + pad + 1] = 1
    else:  # everything
        m[:] = 1
    if kind != "all" and rng.random() < invert:
        m = 1 - m
    return m


def masked_objects(mask: np.ndarray, covers: np.ndarray) -> list[int]:
    """Indices of the objects with more than MASKED_SHARE of their area under `mask`."""
    out = []
    for k, c in enumerate(covers):
        area = float(c.sum())
        if area > 0 and float((c * mask).sum()) / area > MASKED_SHARE:
            out.append(k)
    return out


def training_caption(
    scene: shapes.Scene, mask: np.ndarray, covers: np.ndarray, rng: random.Random, opts: InpaintTrainOptions
) -> str:
    r = rng.random()
    if r < opts.caption_dropout:
        return ""
    inside = masked_objects(mask, covers)
    if inside and r < opts.caption_dropout + opts.object_caption:
        return " and ".join(shapes.object_phrase(scene.objects[k], rng) for k in inside)
    return shapes.caption(scene, rng)


def training_batch(seed: int, step: int, n: int, res: int, opts: InpaintTrainOptions):
    """(images (n,3,res,res) in [0,1], masks (n,1,res,res) in {0,1}, captions) for one step."""
    rng = random.Random(f"inpaint-train:{seed}:{step}")
    scenes = [shapes.sample_scene(rng) for _ in range(n)]
    packed = shapes.pack_scenes(scenes)
    images = shapes.render_packed(packed, res)
    covers = shapes.object_coverages(packed, res).numpy()
    masks, captions = [], []
    for s, cov in zip(scenes, covers, strict=True):
        m = random_mask(rng, res, cov, opts.invert)
        masks.append(m)
        captions.append(training_caption(s, m, cov, rng, opts))
    return images, torch.from_numpy(np.stack(masks)).float()[:, None], captions


def unet_concat(vae, images: torch.Tensor, masks: torch.Tensor, factor: int, scaling: float, shift: float = 0.0):
    """The inpainting UNet's extra input: mask at latent size (a cell is masked when more than half its pixels
    are, as the engine rounds it) and the latent of the image with masked pixels at 0 in [-1, 1]."""
    masked = (images * 2 - 1) * (1 - masks)
    z = vae.encode(masked).latent_dist.mode()
    lmask = (F.avg_pool2d(masks, factor) > 0.5).float()
    return torch.cat([lmask, (z - shift) * scaling], dim=1)


def inpainting_unet(base_unet):
    """A 9-channel UNet with the base's weights; the five new input channels start at zero."""
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in dict(base_unet.config).items() if not k.startswith("_")}
    lat_c = cfg["in_channels"]
    cfg["in_channels"] = 2 * lat_c + 1
    unet = UNet2DConditionModel.from_config(cfg)
    sd = {k: v.float() for k, v in base_unet.state_dict().items()}
    w = sd["conv_in.weight"]
    grown = torch.zeros(w.shape[0], cfg["in_channels"], *w.shape[2:])
    grown[:, :lat_c] = w
    sd["conv_in.weight"] = grown
    unet.load_state_dict(sd)
    return unet


def export_folder(unet, base: Path, out: Path, record: dict) -> Path:
    """`out` as a whole diffusers folder: the base's components (not its UNet or records) and `unet` in fp16."""
    import copy

    def write(tmp: Path) -> None:
        shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("unet", "TRAINING.json", "*.png", "README*"))
        index = json.loads((tmp / "model_index.json").read_text(encoding="utf-8"))
        index["_class_name"] = "StableDiffusionInpaintPipeline"
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        copy.deepcopy(unet).to("cpu", torch.float16).save_pretrained(str(tmp / "unet"), safe_serialization=True)

    return write_folder_atomic(out, write, record)


def train_inpaint(opts: InpaintTrainOptions, log=print) -> dict:
    """Train and export; returns the training record."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from ldm_core.models import load_model
    from ldm_core.train.builtin import _resolve_device
    from ldm_core.train.controlnet import TextEncoder

    torch.manual_seed(opts.seed)
    dev = _resolve_device(opts.device)
    model = load_model(opts.base, dtype=torch.float32)
    if model.kind.family not in ("sd1", "sd2"):
        raise ValueError(f"inpaint training takes an SD 1.x/2.x base; {opts.base} is {model.kind.family}")
    for m in (model.vae, model.text_encoder):
        m.to(dev).eval().requires_grad_(False)
    work = Path(opts.work_dir) if opts.work_dir is not None else None
    ckpt_path = work / "inpaint-train.pt" if work is not None else None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
    ckpt = read_checkpoint(ckpt_path)
    out_unet = Path(opts.out) / "unet"
    if ckpt is None and (out_unet / "config.json").is_file():  # go on from the exported weights
        unet = UNet2DConditionModel.from_pretrained(str(out_unet), torch_dtype=torch.float32)
        log(f"resuming from {opts.out}")
    else:
        unet = inpainting_unet(model.unet)
    if ckpt is not None:
        unet.load_state_dict(ckpt["unet"])
    del model.unet
    unet.to(dev).train()
    res = model.native_size
    factor = model.vae_scale_factor
    optim = torch.optim.AdamW(unet.parameters(), lr=opts.lr, betas=(0.9, 0.99), weight_decay=0.0)
    text = TextEncoder(model)
    sched = DDPMScheduler.from_config(dict(model.scheduler_config))
    prediction = sched.config.prediction_type
    n_train = sched.config.num_train_timesteps
    scaling, shift = latent_normalisation(model.vae.config)
    amp = _autocast(dev, opts.autocast)
    gen = torch.Generator().manual_seed(opts.seed)
    first = None
    if ckpt is not None:
        first = ckpt.get("first")
        gen.set_state(ckpt["gen"])

    def record() -> dict:
        return {
            "recipe": "ldm_core.train.inpaint (9-channel inpainting UNet from the base, random masks)",
            "options": {k: str(v) for k, v in asdict(opts).items()},
            "base": str(opts.base),
            "steps": loop.step,
            "samples_seen": loop.step * opts.batch,
            "first_loss": first,
            "final_loss": loop.ema,
            "seconds": round(loop.seconds(), 1),
            "command": command_line("ldm_core.train"),
        }

    def checkpoint() -> None:
        if ckpt_path is not None:
            state = {"unet": unet.state_dict(), "first": first, "gen": gen.get_state()}
            _save_atomic({**state, **loop.state()}, ckpt_path)

    loop = StepLoop.resume(
        ckpt,
        optim,
        list(unet.parameters()),
        log=log,
        log_every=opts.log_every,
        checkpoint=checkpoint,
        checkpoint_every=opts.checkpoint_every,
    )
    last_export = time.monotonic()
    while loop.step < opts.steps:
        if opts.max_seconds is not None and loop.seconds() > opts.max_seconds:
            log(f"time budget reached after {loop.step} steps")
            break
        progress = loop.progress(opts.steps, opts.max_seconds)
        loop.set_lr(warmup_cosine(opts.lr, loop.step, progress, opts.warmup_steps, opts.min_lr_ratio))
        images, masks, captions = training_batch(opts.seed, loop.step + 1, opts.batch, res, opts)
        images, masks = images.to(dev), masks.to(dev)
        with torch.no_grad(), amp:
            z = model.vae.encode(images * 2 - 1).latent_dist.sample(generator=None).float()
            extra = unet_concat(model.vae, images, masks, factor, scaling, shift).float()
            embeds, _ = text(captions, dev)
        latents = (z - shift) * scaling
        noise = torch.randn(latents.shape, generator=gen).to(dev)
        t = torch.randint(0, n_train, (latents.shape[0],), generator=gen).to(dev)
        noisy = sched.add_noise(latents, noise, t)
        target = sched.get_velocity(latents, noise, t) if prediction == "v_prediction" else noise
        with amp:
            pred = unet(torch.cat([noisy, extra], dim=1), t, encoder_hidden_states=embeds).sample
        loop.update(F.mse_loss(pred.float(), target.float()))
        first = loop.ema if first is None else first
        if opts.export_every and time.monotonic() - last_export > opts.export_every:
            export_folder(unet.eval(), Path(opts.base), Path(opts.out), record())
            unet.train()
            last_export = time.monotonic()
    checkpoint()
    rec = record()
    export_folder(unet.eval(), Path(opts.base), Path(opts.out), rec)
    log(f"wrote {opts.out} after {loop.step} steps, loss {loop.ema}")
    return rec


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = InpaintTrainOptions(base=Path("."), out=Path("."))
    p.add_argument("--base", type=Path, default=Path("models/builtin"))
    p.add_argument("--out", type=Path, default=Path("models/builtin-inpainting"))
    p.add_argument("--work-dir", type=Path, default=None, help="resumable checkpoint (outside the repo)")
    for name in ("steps", "batch", "warmup_steps", "seed", "log_every"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in (
        "lr",
        "min_lr_ratio",
        "caption_dropout",
        "object_caption",
        "invert",
        "export_every",
        "checkpoint_every",
    ):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--max-seconds", type=float, default=None, help="wall-clock budget (the LR schedule follows it)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--autocast", choices=("auto", "bf16", "off"), default=d.autocast)


def run(a: argparse.Namespace) -> int:
    opts = InpaintTrainOptions(**{k: v for k, v in vars(a).items() if k in InpaintTrainOptions.__dataclass_fields__})
    rec = train_inpaint(opts)
    print(json.dumps({k: v for k, v in rec.items() if k != "options"}, indent=2, default=str))
    return 0
