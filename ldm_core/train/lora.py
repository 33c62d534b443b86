"""A LoRA trainer for SD-family models (the built-in model, any SD 1.x/2.x model, SDXL), writing a
kohya-format `.safetensors` that `<lora:NAME:1>` loads (see `ldm_core.prompts.networks`).

Recipe: the base model is frozen; a low-rank pair (down: rank x in, up: out x rank, up initialised to zero) is
added to each UNet attention projection (`to_q`, `to_k`, `to_v`, `to_out.0`) and, with
`train_text_encoder`, to the text encoder's `q_proj`, `k_proj`, `v_proj`, `out_proj`. The pair acts through a
forward hook on the frozen layer (output += up(down(x)) * alpha / rank), so the model's classes are untouched
and the hooks are removed afterwards. Loss: the usual denoising MSE against the model's own prediction type
(epsilon or v), timesteps uniform over the training schedule, images encoded once by the VAE (a fresh latent
sample each step), captions encoded with the same `PromptEncoder` the engine uses at inference time.

Data: a folder of images with same-name `.txt` captions (as `python -m ldm_core.train data` writes), resized
(shorter side) and centre-cropped to the model's native size. `write_heart_dataset` renders the example
LoRA's data: hearts (a shape the built-in model never saw) in the shapes world's style.

CLI: `python -m ldm_core.train lora --data FOLDER --base MODEL --out FILE.safetensors [--rank 4 ...]`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


@dataclass
class LoraTrainOptions:
    """One training run. `alpha` None means alpha = rank (scale 1); `resolution` None means the model's
    native size; `text_encoder_lr` None means `lr`. Seconds are wall-clock."""

    data: Path
    base: Path
    out: Path
    rank: int = 4
    alpha: float | None = None
    steps: int = 500
    lr: float = 1e-4
    batch: int = 4
    resolution: int | None = None
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None
    caption_dropout: float = 0.0
    flip: bool = False
    warmup_steps: int = 0
    seed: int = 0
    device: str = "auto"
    save_dtype: str = "fp16"
    name: str | None = None  # ss_output_name (default: the output file's stem)
    allow_pickle: bool = False
    log_every: int = 50
    max_seconds: float | None = None


class LoraPair(torch.nn.Module):
    """The trainable low-rank pair of one frozen Linear layer."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.down = torch.nn.Linear(base.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.up.weight)
        self.scale = alpha / rank

    def hook(self, _module, inputs, output):
        x = inputs[0]
        return output + self.up(self.down(x.to(self.down.weight.dtype))).to(output.dtype) * self.scale


def _targets(module: torch.nn.Module, suffixes: tuple[str, ...]) -> dict[str, torch.nn.Linear]:
    return {
        n: m
        for n, m in module.named_modules()
        if isinstance(m, torch.nn.Linear) and any(n == s or n.endswith("." + s) for s in suffixes)
    }


def _kohya_name(prefix: str, name: str, text: bool, encoder: torch.nn.Module) -> str:
    if text and not hasattr(encoder, "text_model"):
        name = "text_model." + name
    return prefix + name.replace(".", "_")


def attach_pairs(
    module: torch.nn.Module, prefix: str, suffixes: tuple[str, ...], rank: int, alpha: float, text: bool = False
) -> tuple[dict[str, LoraPair], list]:
    """A LoraPair on each Linear of `module` whose name ends in one of `suffixes`, acting through a forward hook
    on the frozen layer; returns ({kohya key: pair}, hook handles to remove afterwards)."""
    pairs, hooks = {}, []
    dev = next(module.parameters()).device
    for name, layer in _targets(module, suffixes).items():
        pair = LoraPair(layer, rank, alpha).to(dev)
        pairs[_kohya_name(prefix, name, text, module)] = pair
        hooks.append(layer.register_forward_hook(pair.hook))
    return pairs, hooks


def pair_tensors(pairs: dict[str, LoraPair], alpha: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The kohya-format tensors of trained pairs (`KEY.lora_down.weight`, `KEY.lora_up.weight`, `KEY.alpha`)."""
    tensors: dict[str, torch.Tensor] = {}
    for key, pair in pairs.items():
        tensors[key + ".lora_down.weight"] = pair.down.weight.detach().to("cpu", dtype).contiguous()
        tensors[key + ".lora_up.weight"] = pair.up.weight.detach().to("cpu", dtype).contiguous()
        tensors[key + ".alpha"] = torch.tensor(alpha, dtype=dtype)
    return tensors


def load_pair_tensors(pairs: dict[str, LoraPair], tensors: dict[str, torch.Tensor]) -> None:
    """Put a kohya-format file's weights into `pairs` (the same keys, ranks and shapes, or ValueError)."""
    for key, pair in pairs.items():
        for part, layer in (("lora_down", pair.down), ("lora_up", pair.up)):
            w = tensors.get(f"{key}.{part}.weight")
            if w is None or w.shape != layer.weight.shape:
                got = None if w is None else tuple(w.shape)
                raise ValueError(f"{key}.{part}.weight: expected {tuple(layer.weight.shape)}, got {got}")
            with torch.no_grad():
                layer.weight.copy_(w.to(layer.weight))


def _load_folder(folder: Path, resolution: int) -> tuple[torch.Tensor, list[str]]:
    from ldm_core.train.builtin import FolderImages

    data = FolderImages(folder, resolution)
    return data.images, data.captions


def network_metadata(rank: int, alpha: float, name: str, comment: str) -> dict[str, str]:
    """The kohya `ss_*` metadata every LoRA file this project writes carries (network kind, rank, alpha, name)."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{alpha:g}",
        "ss_output_name": name,
        "ss_training_comment": comment,
    }


def write_lora_file(tensors: dict[str, torch.Tensor], meta: dict[str, str], out: Path) -> None:
    """Write a kohya-format LoRA atomically, with its `sshs_model_hash` (the data section's SHA-256) in the
    metadata."""
    import hashlib

    from safetensors.torch import save

    blob = save(tensors)  # the data section is the same with or without metadata
    n = int.from_bytes(blob[:8], "little")
    meta = {**meta, "sshs_model_hash": hashlib.sha256(blob[8 + n :]).hexdigest()}
    blob = save(tensors, metadata=meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_bytes(blob)
    os.replace(tmp, out)


def train_lora(opts: LoraTrainOptions, log: Callable[[str], None] = print) -> dict:
    """Train and write a LoRA; returns a record (steps, losses, seconds, keys, file size)."""
    from diffusers import DDPMScheduler

    from ldm_core.models import load_model
    from ldm_core.prompts.encode import PromptEncoder
    from ldm_core.train.builtin import _resolve_device

    t0 = time.perf_counter()
    torch.manual_seed(opts.seed)
    rng = random.Random(opts.seed)
    dev = _resolve_device(opts.device)
    model = load_model(opts.base, dtype=torch.float32, allow_pickle=opts.allow_pickle)
    family = model.kind.family
    encoders = [e for e in (model.text_encoder, model.text_encoder_2) if e is not None]
    for m in (model.unet, model.vae, *encoders):
        m.to(dev).eval().requires_grad_(False)
    res = opts.resolution or model.native_size
    images, captions = _load_folder(Path(opts.data), res)
    log(f"{len(captions)} images at {res}px, base {family} model {opts.base}, device {dev}")

    # latents once (mean and std of the VAE posterior; flipped copies when asked)
    vae = model.vae
    from ldm_core.models.geometry import latent_normalisation

    scaling, shift = latent_normalisation(vae.config)
    with torch.no_grad():
        variants = [images] + ([images.flip(-1)] if opts.flip else [])
        means, stds = [], []
        for imgs in variants:
            dist = vae.encode((imgs * 2 - 1).to(dev)).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    lat_mean, lat_std = torch.stack(means), torch.stack(stds)  # (V, N, C, h, w)

    # LoRA pairs, hooked onto the frozen layers
    alpha = float(opts.alpha if opts.alpha is not None else opts.rank)
    pairs: dict[str, LoraPair] = {}
    hooks = []
    groups = [("lora_unet_", model.unet, UNET_TARGETS, False)]
    if opts.train_text_encoder:
        te_prefixes = ("lora_te1_", "lora_te2_") if family == "sdxl" else ("lora_te_",)
        groups += [(p, e, TEXT_TARGETS, True) for p, e in zip(te_prefixes, encoders, strict=False)]
    for prefix, module, suffixes, text in groups:
        more, handles = attach_pairs(module, prefix, suffixes, opts.rank, alpha, text)
        pairs.update(more)
        hooks += handles
    if not pairs:
        raise ValueError("the base model has no attention projections to train")
    unet_params = [p for k, pair in pairs.items() if k.startswith("lora_unet_") for p in pair.parameters()]
    te_params = [p for k, pair in pairs.items() if not k.startswith("lora_unet_") for p in pair.parameters()]
    param_groups = [{"params": unet_params, "lr": opts.lr}]
    if te_params:
        param_groups.append({"params": te_params, "lr": opts.text_encoder_lr or opts.lr})
    optim = torch.optim.AdamW(param_groups, weight_decay=0.0)
    base_lrs = [g["lr"] for g in param_groups]
    n_params = sum(p.numel() for g in param_groups for p in g["params"])
    log(f"{len(pairs)} LoRA layers, rank {opts.rank}, alpha {alpha:g}, {n_params} parameters")

    prompt_encoder = PromptEncoder(model)
    n_chunks = max(prompt_encoder.chunk_count(c) for c in [*captions, ""])
    cache = {}

    def conditioning(texts: list[str]):
        if opts.train_text_encoder:
            return prompt_encoder.encode_batch(texts, n_chunks)
        for t in texts:
            if t not in cache:
                cache[t] = prompt_encoder.encode(t, n_chunks)
        embeds = torch.cat([cache[t].embeds for t in texts])
        pooled = torch.cat([cache[t].pooled for t in texts]) if cache[texts[0]].pooled is not None else None
        return embeds, pooled

    sched = DDPMScheduler.from_config(dict(model.scheduler_config))
    prediction = sched.config.prediction_type
    n_train = sched.config.num_train_timesteps
    gen = torch.Generator(device="cpu").manual_seed(opts.seed)
    losses: list[float] = []
    ema = None
    step = 0
    amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    try:
        for step in range(1, opts.steps + 1):
            if opts.max_seconds is not None and time.perf_counter() - t0 > opts.max_seconds:
                log(f"time budget reached after {step - 1} steps")
                step -= 1
                break
            idx = [rng.randrange(len(captions)) for _ in range(opts.batch)]
            var = [rng.randrange(lat_mean.shape[0]) for _ in idx]
            texts = ["" if rng.random() < opts.caption_dropout else captions[i] for i in idx]
            mean = lat_mean[var, idx]
            std = lat_std[var, idx]
            eps = torch.randn(mean.shape, generator=gen).to(dev)
            latents = ((mean + std * torch.randn(mean.shape, generator=gen).to(dev)) - shift) * scaling
            t = torch.randint(0, n_train, (len(idx),), generator=gen).to(dev)
            noisy = sched.add_noise(latents, eps, t)
            target = sched.get_velocity(latents, eps, t) if prediction == "v_prediction" else eps
            for g, lr in zip(optim.param_groups, base_lrs, strict=True):
                g["lr"] = lr * min(1.0, step / opts.warmup_steps) if opts.warmup_steps else lr
            with amp:
                embeds, pooled = conditioning(texts)
                added = None
                if family == "sdxl":
                    time_ids = torch.tensor([[res, res, 0, 0, res, res]], device=dev, dtype=embeds.dtype)
                    added = {"text_embeds": pooled, "time_ids": time_ids.repeat(len(idx), 1)}
                pred = model.unet(noisy, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
            loss = F.mse_loss(pred.float(), target.float())
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            losses.append(float(loss.detach()))
            ema = losses[-1] if ema is None else 0.95 * ema + 0.05 * losses[-1]
            if opts.log_every and (step % opts.log_every == 0 or step == opts.steps):
                log(f"step {step}/{opts.steps} loss {ema:.4f} ({time.perf_counter() - t0:.0f}s)")
    finally:
        for h in hooks:
            h.remove()

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[opts.save_dtype]
    tensors = pair_tensors(pairs, alpha, dtype)
    out = Path(opts.out)
    meta = {
        **network_metadata(opts.rank, alpha, opts.name or out.stem, "ldm_core LoRA trainer"),
        "ss_base_model_version": BASE_MODEL_VERSION.get(family, family),
        "ss_steps": str(step),
        "ss_learning_rate": f"{opts.lr:g}",
        "ss_resolution": f"({res}, {res})",
        "ss_num_train_images": str(len(captions)),
        "ldm_core_options": json.dumps({k: str(v) for k, v in asdict(opts).items()}),
    }
    write_lora_file(tensors, meta, out)
    record = {
        "out": str(out),
        "steps": step,
        "layers": len(pairs),
        "parameters": n_params,
        "first_loss": losses[0] if losses else None,
        "final_loss": ema,
        "seconds": time.perf_counter() - t0,
        "bytes": out.stat().st_size,
    }
    log(f"wrote {out} ({record['bytes']} bytes, {len(tensors)} tensors)")
    return record


# ------------------------------------------------------------------------------------- heart dataset
@dataclass
class HeartScene:
    """One rendered heart: colours by name, size/position class names, the centre (0..1, y down) and the
    half width `radius` in image-side units, and the caption."""

    background: str
    colour: str
    size: str
    position: str
    cx: float
    cy: float
    radius: float
    caption: str = ""
    extras: dict = field(default_factory=dict)


#: The heart's extent in units of its half width: full width 2, height `HEART_HEIGHT`.
_HEART_W = 0.25 + math.sqrt(2) / 4  # half width of the unit heart below (tip at the origin)
_HEART_H = 0.75 + math.sqrt(2) / 4  # its height
HEART_HEIGHT = _HEART_H / _HEART_W


def _heart_sdf(px: torch.Tensor, py_up: torch.Tensor) -> torch.Tensor:
    """Signed distance to a heart with its tip at the origin, lobes up (I. Quilez's formula), unit size."""
    x = px.abs()
    y = py_up
    lobe = torch.sqrt((x - 0.25) ** 2 + (y - 0.75) ** 2) - math.sqrt(2) / 4
    m = (x + y).clamp(min=0) * 0.5
    lower = torch.sqrt(torch.minimum(x * x + (y - 1.0) ** 2, (x - m) ** 2 + (y - m) ** 2)) * torch.sign(x - y)
    return torch.where(x + y > 1.0, lobe, lower)


def render_hearts(scenes: list[HeartScene], size: int = 64) -> torch.Tensor:
    """Float32 (N, 3, size, size) in [0, 1]: each heart over its background with a ~1 px antialiased edge."""
    from ldm_core.train.shapes import COLOURS

    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    gy, gx = coords.view(size, 1), coords.view(1, size)
    out = torch.empty(len(scenes), 3, size, size)
    for i, s in enumerate(scenes):
        k = s.radius / _HEART_W  # image units per unit-heart unit
        px = (gx - s.cx) / k
        py_up = (s.cy - gy) / k + _HEART_H / 2  # bbox centre -> tip at y=0
        sd_px = _heart_sdf(px, py_up) * k * size
        alpha = (0.5 - sd_px).clamp(0, 1)
        bg = torch.tensor(COLOURS[s.background], dtype=torch.float32).view(3, 1, 1) / 255
        fg = torch.tensor(COLOURS[s.colour], dtype=torch.float32).view(3, 1, 1) / 255
        out[i] = bg * (1 - alpha) + fg * alpha
    return out


def _heart_caption(s: HeartScene, rng: random.Random) -> str:
    from ldm_core.train.shapes import COLOUR_WORDS, POSITION_PHRASES, POSITION_TAGS, SIZE_WORDS, article

    colour = rng.choice(COLOUR_WORDS[s.colour])
    bg = rng.choice(COLOUR_WORDS[s.background])
    size = rng.choice(SIZE_WORDS[s.size]) + " " if rng.random() < 0.5 else ""
    noun = f"{size}{colour} heart"
    art = article(noun)
    if rng.random() < 0.2:  # tag style
        tags = [f"{colour} heart"]
        if rng.random() < 0.6:
            tags.append(rng.choice(POSITION_TAGS[s.position]))
        if rng.random() < 0.7:
            tags.append(f"{bg} background")
        return ", ".join(tags)
    parts = [f"{art} {noun}"]
    if rng.random() < 0.65:
        parts.append(rng.choice(POSITION_PHRASES[s.position]))
    if rng.random() < 0.7:
        parts.append(rng.choice((f"on a {bg} background", f"against a {bg} background", f"on {bg}")))
    return " ".join(parts)


def sample_hearts(seed: int | str, n: int) -> list[HeartScene]:
    """`n` captioned heart scenes, the same for the same (seed, n): size and position classes, jitter and
    colour rules as in `shapes` (the heart's colour is far enough from the background)."""
    from ldm_core.train.shapes import COLOUR_NAMES, MIN_COLOUR_DISTANCE, POSITIONS, SIZES, colour_distance

    rng = random.Random(f"ldm-hearts:{seed}")
    out = []
    for _ in range(n):
        bg = rng.choice(COLOUR_NAMES)
        colour = rng.choice([c for c in COLOUR_NAMES if colour_distance(c, bg) >= MIN_COLOUR_DISTANCE])
        size, position = rng.choice(tuple(SIZES)), rng.choice(tuple(POSITIONS))
        r = SIZES[size] * (1 + rng.uniform(-0.07, 0.07))
        x, y = POSITIONS[position]
        x += rng.uniform(-0.03, 0.03)
        y += rng.uniform(-0.03, 0.03)
        hx, hy = r, r * HEART_HEIGHT / 2
        x = min(max(x, 0.02 + hx), 0.98 - hx)
        y = min(max(y, 0.02 + hy), 0.98 - hy)
        s = HeartScene(bg, colour, size, position, x, y, r)
        s.caption = _heart_caption(s, rng)
        out.append(s)
    return out


def write_heart_dataset(
    out_dir: str | Path, n: int = 400, seed: int = 0, size: int = 64, regular_fraction: float = 0.25
) -> list[Path]:
    """Write `n` heart renders plus round(n * regular_fraction) ordinary shapes-world scenes (so the LoRA
    keeps the rest of the world) as PNG with same-name .txt captions, and a scenes.jsonl record."""
    from ldm_core.train import shapes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hearts = sample_hearts(seed, n)
    regular = shapes.sample_scenes(f"lora-regular:{seed}", round(n * regular_fraction))
    images = (
        torch.cat([render_hearts(hearts, size), shapes.render(regular, size)])
        if regular
        else render_hearts(hearts, size)
    )
    records = [{"heart": True, **asdict(h)} for h in hearts] + [{"heart": False, **s.attributes()} for s in regular]
    captions = [h.caption for h in hearts] + [s.caption for s in regular]
    paths = []
    with open(out / "scenes.jsonl", "w", encoding="utf-8") as f:
        for i, (im, cap, rec) in enumerate(zip(images, captions, records, strict=True)):
            p = out / f"{i:05d}.png"
            shapes.to_pil(im).save(p)
            p.with_suffix(".txt").write_text(cap + "\n", encoding="utf-8")
            f.write(json.dumps({"file": p.name, **rec}) + "\n")
            paths.append(p)
    return paths


# ------------------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `python -m ldm_core.train lora`."""
    d = LoraTrainOptions(Path("."), Path("."), Path("."))
    p.add_argument("--data", type=Path, required=True, help="folder of images + same-name .txt captions")
    p.add_argument("--base", type=Path, required=True, help="base model: diffusers folder or .safetensors file")
    p.add_argument("--out", type=Path, required=True, help="LoRA file to write (.safetensors)")
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=None, help="default: the rank (scale 1)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--resolution", type=int, default=None, help="default: the model's native size")
    p.add_argument("--train-text-encoder", action="store_true", help="also train the text encoder(s)")
    p.add_argument("--text-encoder-lr", type=float, default=None)
    p.add_argument("--caption-dropout", type=float, default=d.caption_dropout)
    p.add_argument("--flip", action="store_true", help="also train on mirrored images")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--save-dtype", choices=("fp16", "bf16", "fp32"), default=d.save_dtype)
    p.add_argument("--name", default=None, help="name stored in the file (default: the file's stem)")
    p.add_argument("--allow-pickle", action="store_true", help="allow a pickle-based base model (weights only)")
    p.add_argument("--max-seconds", type=float, default=None, help="stop (and save) after this long")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument(
        "--render-hearts",
        type=int,
        default=0,
        metavar="N",
        help="first render the example dataset (N hearts + 25%% shapes scenes) into --data",
    )


def run(a: argparse.Namespace) -> int:
    """Run `python -m ldm_core.train lora` from parsed arguments."""
    if a.render_hearts:
        paths = write_heart_dataset(a.data, a.render_hearts, seed=a.seed)
        print(f"rendered {len(paths)} images into {a.data}")
    opts = LoraTrainOptions(
        data=a.data,
        base=a.base,
        out=a.out,
        rank=a.rank,
        alpha=a.alpha,
        steps=a.steps,
        lr=a.lr,
        batch=a.batch,
        resolution=a.resolution,
        train_text_encoder=a.train_text_encoder,
        text_encoder_lr=a.text_encoder_lr,
        caption_dropout=a.caption_dropout,
        flip=a.flip,
        warmup_steps=a.warmup_steps,
        seed=a.seed,
        device=a.device,
        save_dtype=a.save_dtype,
        name=a.name,
        allow_pickle=a.allow_pickle,
        log_every=a.log_every,
        max_seconds=a.max_seconds,
    )
    rec = train_lora(opts)
    print(json.dumps(rec, indent=2))
    return 0


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate_heart_lora(
    base: Path,
    lora: Path,
    n: int = 48,
    steps: int = 20,
    cfg_scale: float = 7.0,
    weight: float = 1.0,
    sampler: str | None = None,
) -> dict:
    """Does `<lora:NAME:weight>` bring hearts in? For `n` held-out prompts "a {colour} heart on a {bg}
    background" (fixed seeds), generate through the engine with and without the tag and count the images
    where the project's analyser finds a heart, and a heart of the asked colour. `sampler` None: the base's
    recommended sampling (as the engine runs a request naming none; Euler a before 2026-12-07)."""
    from ldm_core.engine import scratch_engine
    from ldm_core.generation_requests import GenerationRequest
    from ldm_core.train.analyser import analyse

    base, lora = Path(base), Path(lora)
    cases = sample_hearts("heldout-eval", n)
    out: dict = {"base": str(base), "lora": str(lora), "n": n, "steps": steps, "cfg_scale": cfg_scale}
    t0 = time.perf_counter()
    with scratch_engine(base, lora_dirs=(lora.parent,)) as (engine, model):
        for label, tag in (("without", ""), ("with", f" <lora:{lora.stem}:{weight:g}>")):
            hearts = right_colour = 0
            for i, s in enumerate(cases):
                prompt = f"a {s.colour} heart on a {s.background} background{tag}"
                req = GenerationRequest.build(
                    prompt=prompt,
                    steps=steps,
                    seed=2_000_000 + i,
                    sampler_name=sampler,
                    cfg_scale=cfg_scale,
                    width=model.native_size,
                    height=model.native_size,
                    save_images=False,
                )
                objs = analyse(engine.generate(req).images[0]).objects
                hearts += any(o.shape == "heart" for o in objs)
                right_colour += any(o.shape == "heart" and o.colour == s.colour for o in objs)
            out[label] = {"heart": hearts / n, "heart_right_colour": right_colour / n}
        out["sampler"] = " ".join(engine.sampling(GenerationRequest.build(sampler_name=sampler)))  # what ran
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `python -m ldm_core.train lora-eval`."""
    p.add_argument("--base", type=Path, default=Path("models/builtin"))
    p.add_argument("--lora", type=Path, default=Path("models/Lora/heart.safetensors"))
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg-scale", type=float, default=7.0)
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--sampler", default=None, help="default: the base's recommendation (its sidecar's), else Euler a")
    p.add_argument("--json", type=Path, default=None, help="write the report here")


def run_eval(a: argparse.Namespace) -> int:
    """Run `python -m ldm_core.train lora-eval` from parsed arguments."""
    rep = evaluate_heart_lora(a.base, a.lora, a.n, a.steps, a.cfg_scale, a.weight, a.sampler)
    text = json.dumps(rep, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n", encoding="utf-8")
    return 0
