"""Trainer for the built-in neural upscaler: a small Real-ESRGAN "Compact" (SRVGGNetCompact) network, x2.

The network is spandrel's own `Compact` architecture, so the saved `.safetensors` (fp16, keys `body.N.*`) is
detected and built by spandrel like any community Compact model. Training data: the sample images that
scikit-image ships (`skimage/data/*.png|jpg`, read from its package folder, no download) plus renders
of the built-in model's shapes world (`ldm_core.train.shapes`); three held-out photographs (HELD_OUT, never
trained on) measure PSNR against Lanczos.

Low-resolution inputs are made on the fly from random high-resolution crops: optional light Gaussian blur,
then a bicubic (antialiased) or box downscale, optional Gaussian noise, 8-bit quantisation and optional JPEG.
The learning rate warms up, then follows a cosine driven by steps or by `--max-minutes`, whichever ends first.

Recipe (CPU, about 10 minutes on two shared cores; 32 features x 8 convolutions, 160 kB in fp16):
    nice -n 10 python -m ldm_core.train upscaler --out models/ESRGAN/ldm-builtin-x2.safetensors \
        --steps 1500 --max-minutes 10 --device cpu
Data can be prepared once and carried elsewhere (e.g. to a GPU box) as one compressed .npz (~10 MB):
    python -m ldm_core.train upscaler --save-data-npz upscaler-data.npz
    python -m ldm_core.train upscaler --data-npz upscaler-data.npz --out FILE --steps 6000 --batch 32 \
        --device cuda
(`python -m ldm_core.train.upscaler ...` takes the same arguments.)
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .blur import gaussian_blur

log = logging.getLogger(__name__)

#: scikit-image sample images kept out of training, used only to measure PSNR.
HELD_OUT = ("coffee.png", "camera.png", "rocket.jpg")
#: left out entirely: near-duplicates of other images, motion-blurred or not photographs of anything.
EXCLUDED = (
    "motorcycle_right.png",
    "motorcycle_disp.npz",
    "clock_motion.png",
    "no_time_for_that_tiny.gif",
    "chessboard_GRAY.png",
    "multipage.tif",
    "multipage_rgb.tif",
    "lfw_subset.npy",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class UpscalerSpec:
    """Shape of the Compact network: `num_feat` channels, `num_conv` body convolutions, `scale` x."""

    scale: int = 2
    num_feat: int = 32
    num_conv: int = 8


def build_model(spec: UpscalerSpec) -> torch.nn.Module:
    """A fresh spandrel `Compact` (SRVGGNetCompact) module with PReLU activations, RGB in and out."""
    from spandrel.architectures.Compact import Compact

    return Compact(
        num_in_ch=3, num_out_ch=3, num_feat=spec.num_feat, num_conv=spec.num_conv, upscale=spec.scale, act_type="prelu"
    )


# ---- data ---------------------------------------------------------------------------------------------
def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def skimage_images() -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """(train, held_out, train_names): the RGB uint8 HxWx3 sample images scikit-image ships, read from its
    package folder (nothing is downloaded)."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    train, held, names = [], [], []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.name in EXCLUDED:
            continue
        with Image.open(path) as im:
            arr = _to_rgb(im)
        if min(arr.shape[:2]) < 64:
            continue
        if path.name in HELD_OUT:
            held.append(arr)
        else:
            train.append(arr)
            names.append(path.name)
    return train, held, names


def procedural_images(count: int = 24, size: int = 256, seed: int = 0) -> list[np.ndarray]:
    """`count` renders (RGB uint8 size x size) of the built-in model's shapes world
    (`ldm_core.train.shapes`: flat shapes with ~1 px antialiased edges); empty when that module is absent."""
    try:
        from . import shapes
    except ImportError:
        return []
    scenes = shapes.sample_scenes(f"upscaler:{seed}", count)
    batch = shapes.render(scenes, size=size)
    return [np.asarray(shapes.to_pil(im), dtype=np.uint8).copy() for im in batch]


def save_data_npz(path: Path, train: Sequence[np.ndarray], held: Sequence[np.ndarray]) -> int:
    """Write the images as one compressed .npz (`train_i`, `val_i` keys); returns the file size in bytes."""
    arrays = {f"train_{i}": a for i, a in enumerate(train)}
    arrays.update({f"val_{i}": a for i, a in enumerate(held)})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)
    return path.stat().st_size


def load_data_npz(path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(train, held_out) images from a file written by `save_data_npz` (no pickles are allowed)."""
    with np.load(path, allow_pickle=False) as z:
        train = [z[k] for k in sorted((k for k in z.files if k.startswith("train_")), key=_index)]
        held = [z[k] for k in sorted((k for k in z.files if k.startswith("val_")), key=_index)]
    return train, held


def _index(key: str) -> int:
    return int(key.rsplit("_", 1)[1])


class PatchSampler:
    """Random HR crops (`patch` px square, multiple of the scale) with flips, 90-degree turns and channel
    permutations; images are drawn with probability proportional to sqrt(area)."""

    def __init__(self, images: Sequence[np.ndarray], patch: int, seed: int = 0):
        self.images = [im for im in images if min(im.shape[:2]) >= patch]
        if not self.images:
            raise ValueError(f"no training image is at least {patch} px on each side")
        w = np.array([math.sqrt(im.shape[0] * im.shape[1]) for im in self.images])
        self.p = w / w.sum()
        self.patch = patch
        self.rng = np.random.default_rng(seed)

    def batch(self, n: int) -> torch.Tensor:
        """n crops as float32 (n, 3, patch, patch) in [0, 1]."""
        out = np.empty((n, self.patch, self.patch, 3), dtype=np.uint8)
        for i in range(n):
            im = self.images[self.rng.choice(len(self.images), p=self.p)]
            y = self.rng.integers(0, im.shape[0] - self.patch + 1)
            x = self.rng.integers(0, im.shape[1] - self.patch + 1)
            crop = im[y : y + self.patch, x : x + self.patch]
            if self.rng.random() < 0.5:
                crop = crop[:, ::-1]
            crop = np.rot90(crop, k=int(self.rng.integers(4)))
            out[i] = crop[..., self.rng.permutation(3)]
        return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0)


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    arr = x.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        back = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(back).permute(2, 0, 1).float().div(255.0).to(x.device)


def degrade(hr: torch.Tensor, scale: int, rng: np.random.Generator, *, light: bool = True) -> torch.Tensor:
    """Low-resolution versions of `hr` (n, 3, H, W) in [0, 1] -> (n, 3, H/scale, W/scale), 8-bit quantised.

    Per image: blur (p 0.2, sigma 0.2..0.7 px), bicubic-antialiased (p 0.7) or box downscale, noise
    (p 0.15, sigma up to 1.5/255), JPEG (p 0.1, quality 80..95). `light=False`: a plain bicubic downscale.
    """
    outs = []
    for img in hr.split(1):
        if light and rng.random() < 0.2:
            img = gaussian_blur(img, float(rng.uniform(0.2, 0.7)))
        if not light or rng.random() < 0.7:
            lr = F.interpolate(img, scale_factor=1 / scale, mode="bicubic", antialias=True, align_corners=False)
        else:
            lr = F.avg_pool2d(img, scale)
        if light and rng.random() < 0.15:
            lr = lr + torch.randn_like(lr) * float(rng.uniform(0.0, 1.5 / 255))
        lr = lr.clamp(0, 1).mul(255).round().div(255)
        if light and rng.random() < 0.1:
            lr = _jpeg(lr[0], int(rng.integers(80, 96)))[None]
        outs.append(lr)
    return torch.cat(outs)


# ---- evaluation ---------------------------------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray, border: int = 4) -> float:
    """PSNR in dB of two uint8 HxWx3 images, ignoring `border` px at each edge."""
    if border:
        a = a[border:-border, border:-border]
        b = b[border:-border, border:-border]
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    images: Sequence[np.ndarray],
    scale: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Mean PSNR (dB) of the model and of Lanczos on `images`, each bicubic-downscaled by `scale` (PIL)."""
    was_training = model.training
    model.eval()
    ours, lanczos = [], []
    for hr in images:
        h, w = (hr.shape[0] // scale) * scale, (hr.shape[1] // scale) * scale
        hr = hr[:h, :w]
        lr = Image.fromarray(hr).resize((w // scale, h // scale), Image.BICUBIC)
        base = np.asarray(lr.resize((w, h), Image.LANCZOS))
        x = torch.from_numpy(np.asarray(lr).copy()).permute(2, 0, 1)[None].to(device, dtype) / 255
        y = model(x).float().clamp(0, 1)[0].permute(1, 2, 0).mul(255).round().byte().cpu().numpy()
        ours.append(psnr(y, hr))
        lanczos.append(psnr(base, hr))
    model.train(was_training)
    o, lz = float(np.mean(ours)), float(np.mean(lanczos))
    return {"psnr": o, "psnr_lanczos": lz, "gain_db": o - lz, "per_image": list(zip(ours, lanczos, strict=True))}


# ---- training -----------------------------------------------------------------------------------------
def train(
    train_images: Sequence[np.ndarray],
    held_out: Sequence[np.ndarray],
    *,
    spec: UpscalerSpec,
    steps: int,
    batch: int = 16,
    patch: int = 96,
    lr: float = 1e-3,
    device: str = "cpu",
    seed: int = 0,
    max_minutes: float | None = None,
    eval_every: int = 250,
    init: Path | None = None,
    log_fn: Callable[[str], None] = print,
) -> tuple[torch.nn.Module, dict]:
    """Train a Compact x`spec.scale` network with L1 loss, Adam and a cosine learning-rate decay.
    `patch` is the HR crop size in px (a multiple of the scale). Stops after `steps` or `max_minutes`
    (the decay follows whichever budget runs out first). `init`: start from these weights (same spec).
    Returns (model in fp32 on `device`, final evaluation on `held_out`)."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    model = build_model(spec)
    if init is not None:
        from ..models.loading import load_state_dict

        model.load_state_dict({k: v.float() for k, v in load_state_dict(init).items()})
    model = model.to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99))
    sampler = PatchSampler(train_images, patch - patch % spec.scale, seed=seed)
    rng = np.random.default_rng(seed + 1)
    start = time.monotonic()
    limit = max_minutes * 60 if max_minutes else None
    warmup = max(1, min(100, steps // 20))
    done = 0
    running = 0.0
    for step in range(1, steps + 1):
        # progress through the run: by steps, or by time when a time limit comes first; the learning rate
        # warms up linearly, then follows a cosine down to 1% so that a run cut by the clock still anneals
        elapsed = time.monotonic() - start
        frac = max(step / steps, elapsed / limit if limit else 0.0)
        cur_lr = lr * min(1.0, step / warmup) * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for g in opt.param_groups:
            g["lr"] = cur_lr
        hr = sampler.batch(batch)
        lr_img = degrade(hr, spec.scale, rng)
        hr, lr_img = hr.to(dev), lr_img.to(dev)
        loss = F.l1_loss(model(lr_img), hr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        minutes = (time.monotonic() - start) / 60
        if step % 50 == 0:
            log_fn(f"step {step}/{steps} loss {running:.4f} lr {cur_lr:.2e} {minutes:.1f} min")
        if held_out and eval_every and step % eval_every == 0 and step < steps:
            r = evaluate(model, held_out, spec.scale, dev)
            log_fn(f"  held-out PSNR {r['psnr']:.2f} dB vs Lanczos {r['psnr_lanczos']:.2f} dB ({r['gain_db']:+.2f} dB)")
        if limit is not None and time.monotonic() - start >= limit:
            log_fn(f"time limit reached after {step} steps")
            break
    result = evaluate(model, held_out, spec.scale, dev) if held_out else {}
    result.update(steps=done, minutes=(time.monotonic() - start) / 60)
    return model, result


def save_upscaler(model: torch.nn.Module, path: Path, spec: UpscalerSpec, meta: dict | None = None) -> None:
    """Save the weights as fp16 .safetensors (spandrel-detectable key layout) with string metadata."""
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    info = {
        "architecture": "Compact",
        "scale": str(spec.scale),
        "num_feat": str(spec.num_feat),
        "num_conv": str(spec.num_conv),
        "trainer": "ldm_core.train.upscaler",
    }
    for k, v in (meta or {}).items():
        info[k] = v if isinstance(v, str) else json.dumps(v)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(sd, str(tmp), metadata=info)
    tmp.replace(path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command-line options (for `python -m ldm_core.train upscaler` and this module's `main`)."""
    p.add_argument("--out", type=Path, help="where to write the fp16 .safetensors")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--patch", type=int, default=96, help="HR crop size in px")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--scale", type=int, default=2, choices=[2, 4])
    p.add_argument("--num-feat", type=int, default=32)
    p.add_argument("--num-conv", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=None, help="stop early after this much wall time")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--init", type=Path, default=None, help="start from this .safetensors (fine-tune)")
    p.add_argument("--data-npz", type=Path, default=None, help="train from images saved by --save-data-npz")
    p.add_argument("--save-data-npz", type=Path, default=None, help="write the training images as one .npz")
    p.add_argument("--no-renders", action="store_true", help="do not add procedural renders to the data")


def run(args: argparse.Namespace) -> int:
    """Prepare data and/or train and save, from parsed `add_arguments` options. Returns the exit code."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data_npz:
        train_imgs, held = load_data_npz(args.data_npz)
    else:
        train_imgs, held, names = skimage_images()
        renders = [] if args.no_renders else procedural_images()
        train_imgs = train_imgs + renders
        print(f"{len(names)} scikit-image images, {len(renders)} renders, {len(held)} held out", flush=True)
    if args.save_data_npz:
        size = save_data_npz(args.save_data_npz, train_imgs, held)
        print(f"wrote {args.save_data_npz} ({size / 1e6:.1f} MB)")
    if args.out is None:
        return 0
    spec = UpscalerSpec(scale=args.scale, num_feat=args.num_feat, num_conv=args.num_conv)
    model, result = train(
        train_imgs,
        held,
        spec=spec,
        steps=args.steps,
        batch=args.batch,
        patch=args.patch,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        max_minutes=args.max_minutes,
        eval_every=args.eval_every,
        init=args.init,
        log_fn=lambda s: print(s, flush=True),
    )
    meta = {"steps": result.get("steps"), "held_out": list(HELD_OUT), "init": args.init.name if args.init else None}
    if "psnr" in result:
        meta.update(psnr_db=round(result["psnr"], 3), psnr_lanczos_db=round(result["psnr_lanczos"], 3))
    save_upscaler(model, args.out, spec, meta)
    if "psnr" in result:
        print(
            f"held-out PSNR {result['psnr']:.2f} dB vs Lanczos {result['psnr_lanczos']:.2f} dB "
            f"({result['gain_db']:+.2f} dB) after {result['steps']} steps, {result['minutes']:.1f} min"
        )
    print(f"saved {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ldm_core.train.upscaler", description="train the built-in Compact x2 upscaler"
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
