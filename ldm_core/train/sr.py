"""The built-in diffusion upscaler: a small latent diffusion 4x super-resolution model in the SD x4 upscaler's
structure, trained on the shapes world (and the photographs the x2 upscaler uses), saved as a diffusers
`StableDiffusionUpscalePipeline` folder that `ldm_core.diffusion_upscalers.X4Upscaler` runs like Stability's.

Structure (as the x4 upscaler): a factor-4 VAE (a copy of the one given, frozen) whose latents live at the
low-resolution image's size; the UNet reads the noised latents concatenated with the low-resolution image
(in [-1, 1]) which is itself noised by the DDPM low-res schedule at a random noise level (0-350) that the UNet
gets as its class label; text conditioning from the given model's text encoder (frozen); v-prediction on
the x4's beta schedule. Only the UNet learns.

Data: shapes-world scenes rendered at 4x the low-resolution size (the low-resolution image is either the same
scene rendered small, as the built-in model draws it, or the large render area-downscaled), and crops of the
scikit-image photographs (bicubic-downscaled; three held out), and with `--dead-leaves N` N synthetic images with
photographs' statistics in their colours (`ldm_core.train.dead_leaves`: endless variety where the photographs
are twenty); training uses aligned crops of `crop` low-res pixels; latents are cached once. Captions are the
scenes' (dropped 10% of the time, so CFG works); photos and dead-leaves images get the empty prompt.

    python -m ldm_core.train sr --base models/builtin --vae /tmp/v2/v2-f4-vae \\
        --out models/SD-Upscale/ldm-builtin-x4 --work-dir /tmp/sr-work --max-seconds 2700
    python -m ldm_core.train sr-eval --model models/SD-Upscale/ldm-builtin-x4 --n 200

`sr-eval` upscales held-out scenes (and the held-out photographs) 4x with the model, Lanczos and the shipped
x2 model applied twice, and reports PSNR, an edge measure (mean gradient magnitude at the ground truth's
object borders, relative to the ground truth's: below 1 is blurred, above 1 overshoots), the PSNR on those
border pixels alone (a blurred edge and a ringing one both lose there) and how often the analyser reads each
object's shape and colour right.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import COLOUR_FIXES
from . import shapes
from .step_loop import StepLoop, read_checkpoint

SCALE = 4  # the VAE's factor: the upscaler's latents live at the low-resolution image's size
MAX_NOISE_LEVEL = 350
MIN_LR_RATIO = 0.05  # the cosine ends at this share of the learning rate
#: The VAE scaling factor StableDiffusionUpscalePipeline sets on any VAE it is given (Stability's x4 value).
X4_SCALING = 0.08333


@dataclass
class SRTrainOptions:
    base: str = "models/builtin"  # text encoder + tokenizer
    # a `text-distill` folder whose narrower text encoder (same tokenizer) replaces the base's: the UNet's
    # cross-attention takes its width, and the exported folder carries it
    text_encoder: str = ""
    vae: str = ""  # a folder with a factor-4 `vae/` (default: the base's, which must be factor 4)
    init_unet: str = ""  # an upscaler folder whose `unet/` the training starts from (default: a new UNet)
    out: str = "models/SD-Upscale/ldm-builtin-x4"
    work_dir: str | None = None
    seed: int = 0
    scenes: int = 3000
    photo_crops: int = 600
    dead_leaves: int = 0  # dead-leaves images (`ldm_core.train.dead_leaves`: photographs' statistics, endless variety)
    lr_size: int = 64  # low-resolution scene size (the built-in model's images)
    crop: int = 32  # low-resolution pixels per training crop
    channels: tuple[int, ...] = (32, 48, 48)  # 1.03M parameters: with the text encoder and VAE copies, 19.7 MB
    heads: int = 4
    batch: int = 32
    lr: float = 4e-4
    warmup_steps: int = 100
    steps: int = 100000
    max_seconds: float | None = None
    caption_dropout: float = 0.1
    ema_decay: float = 0.999  # the exported UNet is this average of the trained one (0: the trained weights)
    threads: int = 0
    checkpoint_every: float = 300.0
    log_every: int = 20


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def new_unet(channels: tuple[int, ...], cross_dim: int, heads: int):
    """The x4 upscaler's UNet shape, small: 7 input channels (4 latent + 3 image), a noise-level embedding,
    cross-attention on the lowest level only."""
    from diffusers import UNet2DConditionModel

    n = len(channels)
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=7,
        out_channels=4,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * (n - 1) + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        cross_attention_dim=cross_dim,
        attention_head_dim=heads,
        use_linear_projection=True,
        norm_num_groups=8,
        num_class_embeds=1000,
    )


def require_factor(vae) -> None:
    """Stop (naming the VAE's blocks) unless `vae` is the factor-`SCALE` autoencoder the upscaler needs."""
    from ldm_core.models.geometry import vae_scale_factor

    if vae_scale_factor(vae.config) != SCALE:
        raise SystemExit(f"the VAE must be factor {SCALE} (block_out_channels {vae.config.block_out_channels})")


def schedulers():
    """(DDIM v-prediction scheduler, DDPM low-res scheduler) with the x4 upscaler's configs."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from ldm_core.models.configs import shipped_config

    return (
        DDIMScheduler.from_config(shipped_config("sd-x4-upscaler", "scheduler")),
        DDPMScheduler.from_config(shipped_config("sd-x4-upscaler", "low_res_scheduler")),
    )


def _bicubic_lows(images: list[np.ndarray]) -> torch.Tensor:
    """RGB uint8 HxWx3 images bicubic-downscaled by SCALE, as the photographs' training pairs have them: float
    (n, 3, h, w) in [0, 1]."""
    from PIL import Image

    lows = [np.asarray(Image.fromarray(im).resize((im.shape[1] // SCALE, im.shape[0] // SCALE), Image.BICUBIC))
            for im in images]
    return torch.from_numpy(np.stack(lows)).permute(0, 3, 1, 2).float() / 255


def _photo_pairs(n: int, hr: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n (HR crop, bicubic LR) pairs from the training photographs, float (n, 3, h, w) in [0, 1]."""
    from .upscaler import PatchSampler, skimage_images

    train, _, _ = skimage_images()
    crops = PatchSampler(train, hr, seed=seed).batch(n)
    return crops, _bicubic_lows([(c.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for c in crops])


def _dead_leaves_pairs(n: int, hr: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n (HR dead-leaves image in the training photographs' colours, bicubic LR) pairs, as `_photo_pairs`."""
    from .dead_leaves import dead_leaves, photo_palette
    from .upscaler import skimage_images

    palette = photo_palette(skimage_images()[0], seed=seed)
    rng = np.random.default_rng(seed)
    highs = [dead_leaves(hr, rng, palette) for _ in range(n)]
    return torch.from_numpy(np.stack(highs)).permute(0, 3, 1, 2).float() / 255, _bicubic_lows(highs)


def scene_pairs(scenes: list, lr_size: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """(HR renders at 4x, LR images) for scenes: half rendered small (as the model draws them), half the HR
    render area-downscaled."""
    packed = shapes.pack_scenes(scenes)
    hr = shapes.render_packed(packed, lr_size * SCALE)
    small = shapes.render_packed(packed, lr_size)
    area = F.interpolate(hr, size=(lr_size, lr_size), mode="area")
    pick = torch.tensor([rng.random() < 0.5 for _ in scenes]).view(-1, 1, 1, 1)
    return hr, torch.where(pick, small, area)


@torch.no_grad()
def build_cache(o: SRTrainOptions, vae, text, log=_log) -> dict:
    """Latents of aligned HR crops (B, 4, crop, crop), their LR crops in [-1, 1] and caption embeddings."""
    rng = random.Random(f"sr:{o.seed}")
    scenes = shapes.sample_scenes(f"sr-train:{o.seed}", o.scenes)
    c, s = o.crop, vae.config.scaling_factor
    lat, low, caps = [], [], []
    t0 = time.monotonic()
    for i in range(0, len(scenes), 32):
        part = scenes[i : i + 32]
        hr, lr = scene_pairs(part, o.lr_size, rng)
        ys = [rng.randrange(0, o.lr_size - c + 1) for _ in part]
        xs = [rng.randrange(0, o.lr_size - c + 1) for _ in part]
        hr = torch.stack([h[:, y * SCALE : (y + c) * SCALE, x * SCALE : (x + c) * SCALE]
                          for h, y, x in zip(hr, ys, xs, strict=True)])
        lr = torch.stack([v[:, y : y + c, x : x + c] for v, y, x in zip(lr, ys, xs, strict=True)])
        lat.append((vae.encode(hr * 2 - 1).latent_dist.mean * s).half())
        low.append((lr * 2 - 1).half())
        caps += [sc.caption for sc in part]
    for count, pairs in ((o.photo_crops, _photo_pairs), (o.dead_leaves, _dead_leaves_pairs)):
        if not count:
            continue
        hr, lr = pairs(count, c * SCALE, o.seed)
        for i in range(0, len(hr), 32):
            lat.append((vae.encode(hr[i : i + 32] * 2 - 1).latent_dist.mean * s).half())
        low.append((lr * 2 - 1).half())
        caps += [""] * len(hr)
    uniq = sorted(set(caps))
    emb = torch.cat([text(uniq[i : i + 64], torch.device("cpu"))[0] for i in range(0, len(uniq), 64)]).half()
    index = {t: i for i, t in enumerate(uniq)}
    log(f"cached {len(caps)} crops ({o.scenes} scenes, {o.photo_crops} photo crops, {o.dead_leaves} dead-leaves "
        f"images) in {time.monotonic() - t0:.0f}s")
    return {"latents": torch.cat(lat), "low": torch.cat(low), "caption": torch.tensor([index[t] for t in caps]),
            "embeds": emb, "empty": index.get("", None)}


def train_sr(o: SRTrainOptions, log=_log) -> dict:
    from ldm_core.models import load_model, load_vae
    from ldm_core.train.builtin import (
        EMA,
        _named_shadow,
        _save_atomic,
        command_line,
        diffusion_target,
        warmup_cosine,
    )
    from ldm_core.train.controlnet import TextEncoder

    if o.threads:
        torch.set_num_threads(o.threads)
    torch.manual_seed(o.seed)
    model = load_model(o.base, dtype=torch.float32)
    if o.text_encoder:
        from .text_distill import load_student

        model.text_encoder = load_student(o.text_encoder)
    vae = load_vae(Path(o.vae) / "vae" if o.vae else Path(o.base) / "vae")
    require_factor(vae)
    for m in (model.text_encoder, vae):
        m.eval().requires_grad_(False)
    text = TextEncoder(model)
    work = Path(o.work_dir) if o.work_dir else None
    if work:
        work.mkdir(parents=True, exist_ok=True)
    cache_path, ckpt_path = (work / "sr-cache.pt", work / "sr-train.pt") if work else (None, None)
    if cache_path and cache_path.exists():
        cache = torch.load(cache_path, map_location="cpu", weights_only=True)
        width = model.text_encoder.config.hidden_size
        if cache["embeds"].shape[-1] != width:  # cached by another text encoder (--text-encoder changed)
            raise SystemExit(
                f"--work-dir {work}: its caption cache is {cache['embeds'].shape[-1]} wide, this text encoder "
                f"{width} (--text-encoder): use a new work folder"
            )
    else:
        cache = build_cache(o, vae, text, log)
        if cache_path:
            _save_atomic(cache, cache_path)
    unet = new_unet(o.channels, model.text_encoder.config.hidden_size, o.heads)
    if o.init_unet:
        load_init_unet(unet, Path(o.init_unet))
    params = list(unet.parameters())
    optim = torch.optim.AdamW(params, lr=o.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ck = read_checkpoint(ckpt_path)
    if ck is not None:
        unet.load_state_dict(ck["unet"])
    average = EMA.resume(params, o.ema_decay, ck.get("average") if ck else None)
    unet.train()
    sched, low_sched = schedulers()
    ab, low_ab = sched.alphas_cumprod.float(), low_sched.alphas_cumprod.float()
    n_train = sched.config.num_train_timesteps
    n_params = sum(p.numel() for p in params)
    n = len(cache["caption"])
    log(f"diffusion upscaler UNet: {n_params / 1e6:.2f}M parameters, channels {o.channels}; {n} cached crops")
    loop = StepLoop.resume(ck, optim, params, log=log, log_every=o.log_every,
                           checkpoint=lambda: checkpoint(), checkpoint_every=o.checkpoint_every)

    def checkpoint() -> None:
        if ckpt_path is not None:
            state = {"unet": unet.state_dict(), "average": average.state_dict() if average else None}
            _save_atomic({**state, **loop.state()}, ckpt_path)

    while loop.step < o.steps:
        step = loop.step
        if o.max_seconds is not None and loop.seconds() > o.max_seconds:
            log(f"time budget reached after {step} steps")
            break
        gen = torch.Generator().manual_seed(hash((o.seed, step)) & (2**62 - 1))
        idx = torch.randint(0, n, (o.batch,), generator=gen)
        z, low = cache["latents"][idx].float(), cache["low"][idx].float()
        if torch.rand(1, generator=gen).item() < 0.5:  # the same flip for latents and image
            z, low = z.flip(-1), low.flip(-1)
        cond = cache["embeds"][cache["caption"][idx]].float()
        if cache["empty"] is not None:
            drop = torch.rand(o.batch, generator=gen) < o.caption_dropout
            cond = torch.where(drop.view(-1, 1, 1), cache["embeds"][cache["empty"]].float().expand_as(cond), cond)
        # noise levels: half near the default (20), half anywhere the x4 pipeline allows
        level = torch.where(torch.rand(o.batch, generator=gen) < 0.5,
                            torch.randint(0, 60, (o.batch,), generator=gen),
                            torch.randint(0, MAX_NOISE_LEVEL + 1, (o.batch,), generator=gen))
        la = low_ab[level].view(-1, 1, 1, 1)
        low = la.sqrt() * low + (1 - la).sqrt() * torch.randn(low.shape, generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, n_train, (o.batch,), generator=gen)
        x_t, target = diffusion_target(z, noise, ab[t], "v_prediction")
        progress = loop.progress(o.steps, o.max_seconds)
        loop.set_lr(warmup_cosine(o.lr, step, progress, o.warmup_steps, MIN_LR_RATIO))
        pred = unet(torch.cat([x_t, low], 1), t, cond, class_labels=level).sample
        loop.update(F.mse_loss(pred, target))
        if average is not None:
            average.update(loop.step)
    checkpoint()
    record = {
        "recipe": "ldm_core.train.sr (shapes-world renders + scikit-image photos, x4-upscaler structure)",
        "command": command_line("ldm_core.train"),
        "options": {k: str(v) for k, v in asdict(o).items()},
        "steps": loop.step,
        "crops_seen": loop.step * o.batch,
        "final_loss": loop.ema,
        "seconds": round(loop.seconds(), 1),
        "unet_parameters": n_params,
    }
    if average is not None:  # export the average: the weights of the last steps are noisier
        unet.load_state_dict(_named_shadow(unet, average))
    out = export_pipeline(unet, vae, model, Path(o.out), record, Path(o.base) / "tokenizer")
    record["bytes"] = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    log(f"wrote {out} ({record['bytes'] / 1e6:.1f} MB) after {loop.step} steps, loss {loop.ema}")
    return record


@torch.no_grad()
def load_init_unet(unet, folder: Path) -> None:
    """Load the weights of upscaler folder `folder`'s `unet/` into `unet` (whose shape --channels set)."""
    from safetensors.torch import load_file

    config = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    if list(config["block_out_channels"]) != list(unet.config.block_out_channels):
        raise SystemExit(
            f"--init-unet: {folder}'s UNet has channels {config['block_out_channels']}, "
            f"--channels gives {list(unet.config.block_out_channels)}"
        )
    state = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    unet.load_state_dict({k: v.float() for k, v in state.items()})


@torch.no_grad()
def x4_vae(vae):
    """A copy of `vae` that the x4 pipeline decodes right. The pipeline forces the VAE's scaling factor to 0.08333
    (Stability's VAE has latents about 12 wide) and decodes `latents / 0.08333`, while the UNet learns latents at
    this VAE's own scaling. The copy's latent space is stretched by k = scaling / 0.08333 (the encoder's mean
    moments times k, its log-variance plus 2 ln k; the decoder's first convolution divided by k), so it encodes
    and decodes the same images, and its latents times 0.08333 are the original's times its scaling."""
    import copy

    k = vae.config.scaling_factor / X4_SCALING
    out = copy.deepcopy(vae)
    enc = out.quant_conv if out.quant_conv is not None else out.encoder.conv_out  # -> (mean, log-variance)
    c = enc.out_channels // 2
    enc.weight[:c] *= k
    enc.bias[:c] *= k
    enc.bias[c:] += 2 * math.log(k)
    dec = out.post_quant_conv if out.post_quant_conv is not None else out.decoder.conv_in
    dec.weight /= k
    out.register_to_config(scaling_factor=X4_SCALING)
    return out


def export_pipeline(unet, vae, model, out: Path, record: dict, tokenizer_dir: Path | None = None) -> Path:
    """Write the StableDiffusionUpscalePipeline folder in fp16 (atomically replaced), TRAINING.json beside."""
    import copy
    import shutil

    from diffusers import StableDiffusionUpscalePipeline

    from .builtin import write_folder_atomic

    sched, low_sched = schedulers()
    pipe = StableDiffusionUpscalePipeline(
        vae=x4_vae(vae).half(), text_encoder=copy.deepcopy(model.text_encoder).half(),
        tokenizer=model.tokenizer, unet=copy.deepcopy(unet).eval().half(), low_res_scheduler=low_sched,
        scheduler=sched, max_noise_level=MAX_NOISE_LEVEL,
    )

    def write(tmp: Path) -> None:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer_dir is not None and tokenizer_dir.is_dir():  # the base's vocab + merges, not tokenizer.json
            shutil.rmtree(tmp / "tokenizer")
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")

    return write_folder_atomic(out, write, record)


# -------------------------------------------------------------------------------------------- evaluation


def gradient(a: np.ndarray) -> np.ndarray:
    """Gradient magnitude (Sobel) of an RGB uint8 image's grey, float32 HxW."""
    import cv2

    g = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY).astype(np.float32)
    return np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1))


def edge_ratio(out: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> float:
    """Mean gradient magnitude (Sobel, grey) of `out` on `mask` relative to the ground truth's there: 1 is as
    sharp as the truth, a blurred edge is below 1."""
    gt_g = gradient(gt)[mask].mean()
    return float(gradient(out)[mask].mean() / max(gt_g, 1e-6))


SOFT_EDGE = 0.9  # an edge ratio below this is a visibly soft border (sr-eval's soft_edge_share)


def border_mask(coverage: np.ndarray) -> np.ndarray:
    """Pixels within 2 px of an object border (where the coverage changes)."""
    import cv2

    cov = (coverage > 0.5).astype(np.uint8)
    edge = cv2.morphologyEx(cov, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
    return cv2.dilate(edge, np.ones((3, 3), np.uint8)).astype(bool)


def photo_crops(im: np.ndarray, size: int = 256) -> list[np.ndarray]:
    """The held-out photograph `im` as whole `size` px crops on a grid from its top-left corner (one crop of its
    size, trimmed to a multiple of SCALE, when it is smaller)."""
    h, w = (min(im.shape[0], size) // SCALE) * SCALE, (min(im.shape[1], size) // SCALE) * SCALE
    return [np.ascontiguousarray(im[y : y + h, x : x + w])
            for y in range(0, im.shape[0] - h + 1, h) for x in range(0, im.shape[1] - w + 1, w)]


@torch.no_grad()
def evaluate_sr(model_dir: str, n: int = 200, steps: int = 20, noise_level: int = 20, guidance: float = 0.0,
                lr_size: int = 64, seed: str = "sr-eval", eta: float = 0.0, colour_fix: str = "Wavelet",
                image_guidance: float = 0.0, log=_log) -> dict:
    """Held-out scenes (drawn small, as the built-in model draws them) upscaled 4x by the model, Lanczos and
    the shipped x2 model twice; PSNR, edge ratio at object borders and analyser reads; then the held-out
    photographs, every whole 256 px crop of them (PSNR and edge ratio at the truth's strongest 10% gradients;
    `photos_top_left_crops`: each photograph's first crop alone, as sr-eval measured before). "vae round trip"
    is the truth encoded and decoded by the model's VAE: the best the model's output can be. `guidance` 0 is the model's
    recommended CFG scale, as Extras runs it (its sidecar's `cfg_scale`, else 9); `image_guidance` 0 likewise its
    recommended guidance by the low-resolution image (its sidecar's `image_guidance`, else 1: off), sampled by
    `diffusion_upscalers.x4_sample` as Extras samples. `eta` is the DDIM sampler's step
    noise (0: deterministic, as Extras runs it; 1: ancestral). `colour_fix` (`ldm_core.colour_fix`) is applied to
    the model's output as Extras applies it (default Wavelet); the output without it is reported too, as
    "diffusion, no colour fix"."""
    from diffusers import StableDiffusionUpscalePipeline
    from PIL import Image

    from ldm_core.colour_fix import check_colour_fix
    from ldm_core.colour_fix import colour_fix as fix_colour
    from ldm_core.config import DiffusionUpscaleOptions
    from ldm_core.diffusion_upscalers import X4Upscaler, x4_sample
    from ldm_core.upscalers import UpscalerRegistry

    from .analyser import analyse
    from .upscaler import psnr, skimage_images

    # 0s as Extras resolves them: the model's recommended values
    base = X4Upscaler(Path(model_dir), torch.device("cpu"), torch.float32).resolved(DiffusionUpscaleOptions(
        steps=steps, noise_level=noise_level, guidance_scale=guidance, image_guidance=image_guidance))
    guidance, image_guidance = base.guidance_scale, base.image_guidance
    pipe = StableDiffusionUpscalePipeline.from_pretrained(model_dir, local_files_only=True, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    reg = UpscalerRegistry([])  # the shipped x2 model is always listed
    x2 = "ldm-builtin-x2" in reg.names()
    scenes = shapes.sample_scenes(seed, n)
    colour_fix = check_colour_fix(colour_fix)
    unfixed = [] if colour_fix == "None" else ["diffusion, no colour fix"]
    methods = ["diffusion", *unfixed, "lanczos"] + (["x2 twice"] if x2 else []) + ["vae round trip"]

    def diffusion(prompt: str, low: Image.Image, k: int) -> dict:
        out = x4_sample(pipe, low, prompt, replace(base, seed=k), "pil", eta=eta)[0]
        return {"diffusion": fix_colour(out, low, colour_fix), **({unfixed[0]: out} if unfixed else {})}

    def round_trip(gt: np.ndarray) -> Image.Image:
        x = torch.from_numpy(gt).permute(2, 0, 1)[None].float() / 127.5 - 1
        y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample[0]
        return Image.fromarray(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
    stats = {m: {"psnr": [], "edge": [], "border": [], "shape": 0, "colour": 0} for m in [*methods, "truth"]}
    total = 0
    t0 = time.monotonic()

    def read(img: np.ndarray, scene) -> tuple[int, int]:
        a = analyse(img)
        s = c = 0
        for obj in scene.objects:
            s += a.find(shape=obj.shape) is not None
            c += a.find(colour=obj.colour) is not None
        return s, c

    for i, scene in enumerate(scenes):
        packed = shapes.pack_scenes([scene])
        hr_t, cov = shapes.render_packed(packed, lr_size * SCALE, with_coverage=True)
        gt = np.asarray(shapes.to_pil(hr_t[0]))
        low = shapes.to_pil(shapes.render_packed(packed, lr_size)[0])
        mask = border_mask(cov[0, 0].numpy())
        outs = {**diffusion(scene.caption, low, i), "lanczos": low.resize(gt.shape[1::-1], Image.LANCZOS)}
        if x2:
            outs["x2 twice"] = reg.upscale(low, "ldm-builtin-x2", scale=SCALE)
        outs["vae round trip"] = round_trip(gt)
        outs_np = {k: np.asarray(v.convert("RGB")) for k, v in outs.items()}
        outs_np["truth"] = gt
        total += len(scene.objects)
        for k, img in outs_np.items():
            st = stats[k]
            if k != "truth":
                st["psnr"].append(psnr(img, gt))
                st["edge"].append(edge_ratio(img, gt, mask))
                st["border"].append(psnr(img[mask][None], gt[mask][None], border=0))
            s, c = read(img, scene)
            st["shape"] += s
            st["colour"] += c
        if (i + 1) % 20 == 0:
            log(f"{i + 1}/{n} scenes ({time.monotonic() - t0:.0f}s)")
    report: dict = {"n_scenes": n, "n_objects": total, "steps": steps, "noise_level": noise_level,
                    "guidance": guidance, "image_guidance": image_guidance, "eta": eta, "colour_fix": colour_fix,
                    "lr_size": lr_size, "scenes": {}}
    for k, st in stats.items():
        report["scenes"][k] = {
            "psnr": float(np.mean(st["psnr"])) if st["psnr"] else None,
            "edge_ratio": float(np.mean(st["edge"])) if st["edge"] else None,
            # scenes whose borders come out clearly softer than the truth's (the mean can hide a soft tail)
            "soft_edge_share": float(np.mean(np.asarray(st["edge"]) < SOFT_EDGE)) if st["edge"] else None,
            "border_psnr": float(np.mean(st["border"])) if st["border"] else None,
            "shape_read": st["shape"] / total if total else None,
            "colour_read": st["colour"] / total if total else None,
        }
    _, held, _ = skimage_images()
    photos = {m: {"psnr": [], "edge": []} for m in methods}
    top_left = {m: {"psnr": [], "edge": []} for m in methods}  # each photograph's first crop alone
    crops = [(i, c, gt) for i, im in enumerate(held) for c, gt in enumerate(photo_crops(im))]
    for i, c, gt in crops:  # seed i for each photograph's top-left crop, as sr-eval ran it before reading all
        h, w = gt.shape[:2]
        low = Image.fromarray(gt).resize((w // SCALE, h // SCALE), Image.BICUBIC)
        mag = gradient(gt)
        mask = mag >= np.percentile(mag, 90)
        outs = {**diffusion("", low, i + 1000 * c), "lanczos": low.resize((w, h), Image.LANCZOS)}
        if x2:
            outs["x2 twice"] = reg.upscale(low, "ldm-builtin-x2", scale=SCALE)
        outs["vae round trip"] = round_trip(np.ascontiguousarray(gt))
        for k, v in outs.items():
            a = np.asarray(v.convert("RGB").resize((w, h)))
            p, e = psnr(a, gt), edge_ratio(a, gt, mask)
            for acc in (photos, top_left) if c == 0 else (photos,):
                acc[k]["psnr"].append(p)
                acc[k]["edge"].append(e)

    def summary(acc: dict) -> dict:
        return {k: {"psnr": float(np.mean(v["psnr"])), "edge_ratio": float(np.mean(v["edge"]))} for k, v in acc.items()}

    report["photos"] = summary(photos)
    # each photograph's top-left crop alone: the measure sr-eval reported before it read every crop
    report["photos_top_left_crops"] = summary(top_left)
    report["n_photos"] = len(held)
    report["n_photo_crops"] = len(crops)
    report["seconds"] = round(time.monotonic() - t0, 1)
    return report


# -------------------------------------------------------------------------------------------- CLI


def add_arguments(p) -> None:
    d = SRTrainOptions()
    p.add_argument("--base", default=d.base, help="model folder whose text encoder and tokenizer are used")
    p.add_argument("--vae", default=d.vae, help="model folder with a factor-4 vae/ (default: the base's)")
    p.add_argument(
        "--text-encoder", default=d.text_encoder, help="a text-distill folder whose narrower text encoder to use"
    )
    p.add_argument("--init-unet", default=d.init_unet, help="upscaler folder whose unet/ to start from")
    p.add_argument("--out", default=d.out, help="StableDiffusionUpscalePipeline folder to write")
    p.add_argument("--work-dir", default=None, help="latent cache and checkpoints; resumed when present")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--scenes", type=int, default=d.scenes)
    p.add_argument("--photo-crops", type=int, default=d.photo_crops)
    p.add_argument("--dead-leaves", type=int, default=d.dead_leaves,
                   help="dead-leaves images (synthetic, with photographs' statistics) in the cache (default: 0)")
    p.add_argument("--crop", type=int, default=d.crop, help="low-resolution pixels per training crop")
    p.add_argument("--channels", default=",".join(map(str, d.channels)), help="UNet channels per level")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--max-seconds", type=float, default=None, help="training-time budget (resumes count it)")
    p.add_argument("--threads", type=int, default=0)


def run(a) -> int:
    o = SRTrainOptions(
        base=a.base, vae=a.vae, text_encoder=a.text_encoder, init_unet=a.init_unet, out=a.out, work_dir=a.work_dir,
        seed=a.seed, scenes=a.scenes, photo_crops=a.photo_crops, dead_leaves=a.dead_leaves,
        crop=a.crop, channels=tuple(int(c) for c in a.channels.split(",")),
        batch=a.batch, lr=a.lr, steps=a.steps, max_seconds=a.max_seconds, threads=a.threads,
    )
    print(json.dumps(train_sr(o), indent=2, default=str))
    return 0


def add_eval_arguments(p) -> None:
    p.add_argument("--model", default=SRTrainOptions().out, help="StableDiffusionUpscalePipeline folder")
    p.add_argument("--n", type=int, default=200, help="held-out scenes")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--noise-level", type=int, default=20)
    p.add_argument("--guidance", type=float, default=0.0,
                   help="CFG scale (0: the model's recommended one, its sidecar's cfg_scale, else 9)")
    p.add_argument("--image-guidance", type=float, default=0.0,
                   help="guidance by the low-resolution image (0: the model's recommended one, as Extras runs it; "
                        "1: off)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM step noise (0: deterministic, as Extras runs it)")
    p.add_argument("--colour-fix", default="Wavelet", choices=COLOUR_FIXES,
                   help="applied to the model's output as Extras applies it (default: %(default)s)")
    p.add_argument("--out", default=None, help="write the report here as JSON too")


def run_eval(a) -> int:
    report = evaluate_sr(a.model, n=a.n, steps=a.steps, noise_level=a.noise_level, guidance=a.guidance, eta=a.eta,
                         colour_fix=a.colour_fix, image_guidance=a.image_guidance)
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n", encoding="utf-8")
    return 0
