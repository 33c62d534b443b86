"""A factor-4 VAE for the built-in diffusion upscaler that reconstructs photographs, not only the shapes world.

The diffusion upscaler (`ldm_core.train.sr`) works in a factor-4 VAE's latent space, as Stability's x4
upscaler does: its output can be no better than that VAE's reconstruction. The built-in model's VAE only ever
saw flat shapes, and reconstructs the held-out photographs at about 20 dB, so on photos the upscaler loses to
Lanczos whatever its UNet learns. This trainer continues a factor-4 AutoencoderKL (default: the built-in
model's, so the shapes world stays as it was) on crops of the scikit-image photographs the x2 upscaler trains on
(`upscaler.skimage_images`, three held out) and on shapes-world renders at the upscaler's output size, with
L1 + MSE + an image-gradient L1 and a small KL term, keeps an EMA of the weights and exports it as `<out>/vae`
with the scaling factor measured on its latents, which `python -m ldm_core.train sr --vae <out>` reads.

    python -m ldm_core.train sr-vae --init models/builtin --out /tmp/sr-vae --work-dir /tmp/sr-vae-work \\
        --max-seconds 2700

Resumable: checkpoints go to `--work-dir` every few minutes and a rerun continues from them (its clock too).
The record (`<out>/TRAINING.json`) has the reconstruction PSNR of the held-out photographs and of held-out
renders before and after.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import shapes
from .sr import SCALE, require_factor
from .step_loop import StepLoop, read_checkpoint

HR_SIZE = 256  # the upscaler's output size for the built-in model's 64 px images
MIN_LR_RATIO = 0.1


@dataclass
class SRVAEOptions:
    init: str = "models/builtin"  # a folder with a factor-4 vae/
    out: str = ""  # writes <out>/vae: a folder to give `sr --vae`
    work_dir: str | None = None
    seed: int = 0
    crop: int = 128
    batch: int = 8
    photo_share: float = 0.5  # the share of each batch that is photograph crops (the rest: renders)
    lr: float = 1e-4
    warmup_steps: int = 100
    steps: int = 100_000
    max_seconds: float | None = None
    grad_weight: float = 0.5
    kl_weight: float = 1e-6
    ema_decay: float = 0.999
    autocast: str = "off"  # "bf16": bf16 autocast (faster on CPUs with bf16 support); the loss is taken in fp32
    threads: int = 0
    checkpoint_every: float = 300.0
    log_every: int = 20


def _log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


class CropStream:
    """Training crops, float (n, 3, crop, crop) in [0, 1]: photograph crops (flips, turns, channel orders) and
    crops of shapes-world scenes rendered at `HR_SIZE`, a function of the seed and the batch's index."""

    def __init__(self, crop: int, photo_share: float, seed: int, first_step: int = 0):
        from .upscaler import PatchSampler, skimage_images

        train, _, _ = skimage_images()
        # a run resumed at `first_step` draws new photograph crops, not the first run's again
        self.photos = PatchSampler(train, crop, seed=seed if not first_step else [seed, first_step])
        self.crop, self.photo_share, self.seed = crop, photo_share, seed

    def batch(self, step: int, n: int) -> torch.Tensor:
        k = int(round(n * self.photo_share))
        parts = [self.photos.batch(k)] if k else []
        if n - k:
            scenes = shapes.sample_scenes(f"sr-vae:{self.seed}:{step}", n - k)
            hr = shapes.render(scenes, HR_SIZE)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            ys = torch.randint(0, HR_SIZE - self.crop + 1, (n - k,), generator=gen).tolist()
            xs = torch.randint(0, HR_SIZE - self.crop + 1, (n - k,), generator=gen).tolist()
            parts.append(
                torch.stack([h[:, y : y + self.crop, x : x + self.crop] for h, y, x in zip(hr, ys, xs, strict=True)])
            )
        return torch.cat(parts)


def heldout_photos() -> list[torch.Tensor]:
    """The held-out photographs (`upscaler.HELD_OUT`), each (1, 3, H, W) in [0, 1], cropped to multiples of 4."""
    from .upscaler import skimage_images

    _, held, _ = skimage_images()
    out = []
    for im in held:
        h, w = (im.shape[0] // SCALE) * SCALE, (im.shape[1] // SCALE) * SCALE
        out.append(torch.from_numpy(np.ascontiguousarray(im[:h, :w])).permute(2, 0, 1)[None].float() / 255)
    return out


@torch.no_grad()
def reconstruction_psnr(vae, n_renders: int = 32) -> dict:
    """PSNR (dB) of the VAE's reconstructions (posterior mean) of the held-out photographs (mean over them) and
    of `n_renders` held-out shapes-world renders at `HR_SIZE`."""
    from .builtin import heldout_renders, vae_psnr

    cpu = torch.device("cpu")
    photos = [vae_psnr(vae, x, cpu) for x in heldout_photos()]  # one at a time: their sizes differ
    return {
        "photos_db": round(float(np.mean(photos)), 3),
        "photos_db_each": [round(p, 3) for p in photos],
        "renders_db": round(vae_psnr(vae, heldout_renders(n_renders, HR_SIZE), cpu, batch=8), 3),
        "n_renders": n_renders,
    }


def vae_loss(vae, x: torch.Tensor, grad_weight: float, kl_weight: float, autocast: str = "off") -> torch.Tensor:
    """L1 + MSE of a posterior sample's reconstruction of `x` (in [0, 1]), plus `grad_weight` times the
    image-gradient L1 (edges and texture, which L1/MSE alone blur) and `kl_weight` times the KL term."""
    from .builtin import _autocast, _grad_l1

    target = x * 2 - 1
    with _autocast(x.device, autocast):
        post = vae.encode(target).latent_dist
        rec = vae.decode(post.sample()).sample
    rec = rec.float()
    d = rec - target
    loss = d.abs().mean() + d.pow(2).mean()
    if grad_weight:
        loss = loss + grad_weight * _grad_l1(rec, target)
    if kl_weight:
        loss = loss + kl_weight * post.kl().mean()
    return loss


def train_sr_vae(o: SRVAEOptions, log=_log) -> dict:
    from ldm_core.models import load_vae
    from ldm_core.train.builtin import EMA, _named_shadow, _save_atomic, command_line, measure_latents, warmup_cosine

    if o.threads:
        torch.set_num_threads(o.threads)
    if o.crop % SCALE:
        raise SystemExit(f"--crop must be a multiple of {SCALE} (got {o.crop})")
    if not 0.0 <= o.photo_share <= 1.0:
        raise SystemExit(f"--photo-share must be between 0 and 1 (got {o.photo_share})")
    torch.manual_seed(o.seed)
    vae = load_vae(Path(o.init) / "vae")
    require_factor(vae)
    vae.eval()
    before = reconstruction_psnr(vae)
    log(f"before: held-out photos {before['photos_db']} dB, renders {before['renders_db']} dB")
    work = Path(o.work_dir) if o.work_dir else None
    ckpt_path = work / "sr-vae-train.pt" if work else None
    if work:
        work.mkdir(parents=True, exist_ok=True)
    params = [p for p in vae.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=o.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ck = read_checkpoint(ckpt_path)
    if ck is not None:
        vae.load_state_dict(ck["vae"])
    average = EMA.resume(params, o.ema_decay, ck.get("average") if ck else None)
    loop = StepLoop.resume(
        ck,
        optim,
        params,
        log=log,
        log_every=o.log_every,
        checkpoint=lambda: checkpoint(),
        checkpoint_every=o.checkpoint_every,
    )
    stream = CropStream(o.crop, o.photo_share, o.seed, loop.step)

    def checkpoint() -> None:
        if ckpt_path is not None:
            state = {"vae": vae.state_dict(), "average": average.state_dict() if average else None}
            _save_atomic({**state, **loop.state()}, ckpt_path)

    vae.train()
    while loop.step < o.steps:
        if o.max_seconds is not None and loop.seconds() > o.max_seconds:
            log(f"time budget reached after {loop.step} steps")
            break
        x = stream.batch(loop.step, o.batch)
        loop.set_lr(warmup_cosine(o.lr, loop.step, loop.progress(o.steps, o.max_seconds), o.warmup_steps, MIN_LR_RATIO))
        loop.update(vae_loss(vae, x, o.grad_weight, o.kl_weight, o.autocast))
        if average is not None:
            average.update(loop.step)
    checkpoint()
    if average is not None:  # export the average: the last steps' weights are noisier
        vae.load_state_dict(_named_shadow(vae, average))
    vae.eval()
    after = reconstruction_psnr(vae)
    log(f"after: held-out photos {after['photos_db']} dB, renders {after['renders_db']} dB")
    sample = torch.cat([stream.batch(10**9 + i, 16) for i in range(4)])  # the latents' spread on both kinds
    spread = measure_latents(vae, sample, torch.device("cpu"), batch=16)
    vae.register_to_config(scaling_factor=round(1.0 / spread["std"], 5))
    record = {
        "recipe": "ldm_core.train.sr_vae (factor-4 VAE continued on scikit-image photographs + shapes renders)",
        "command": command_line("ldm_core.train"),
        "options": {k: str(v) for k, v in asdict(o).items()},
        "steps": loop.step,
        "seconds": round(loop.seconds(), 1),
        "final_loss": loop.ema,
        "latents": spread,
        "reconstruction_before": before,
        "reconstruction_after": after,
    }
    out = Path(o.out)
    (out / "vae").mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    (out / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {out / 'vae'} after {loop.step} steps (scaling factor {vae.config.scaling_factor})")
    return record


def add_arguments(p) -> None:
    d = SRVAEOptions()
    p.add_argument("--init", default=d.init, help="a folder with the factor-4 vae/ to continue")
    p.add_argument("--out", required=True, help="writes <out>/vae and <out>/TRAINING.json (for sr --vae <out>)")
    p.add_argument("--work-dir", default=None, help="checkpoints; resumed when present")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--crop", type=int, default=d.crop, help="training crop size in pixels (a multiple of 4)")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--photo-share", type=float, default=d.photo_share, help="share of each batch that is photos")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--max-seconds", type=float, default=None, help="training-time budget (resumes count it)")
    p.add_argument("--grad-weight", type=float, default=d.grad_weight)
    p.add_argument("--kl-weight", type=float, default=d.kl_weight)
    p.add_argument("--autocast", choices=("off", "bf16"), default=d.autocast, help="bf16 autocast for the VAE")
    p.add_argument("--threads", type=int, default=0)


def run(a) -> int:
    o = SRVAEOptions(
        init=a.init,
        out=a.out,
        work_dir=a.work_dir,
        seed=a.seed,
        crop=a.crop,
        batch=a.batch,
        photo_share=a.photo_share,
        lr=a.lr,
        warmup_steps=a.warmup_steps,
        steps=a.steps,
        max_seconds=a.max_seconds,
        grad_weight=a.grad_weight,
        kl_weight=a.kl_weight,
        autocast=a.autocast,
        threads=a.threads,
    )
    print(json.dumps(train_sr_vae(o), indent=2, default=str))
    return 0
