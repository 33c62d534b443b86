"""A ControlNet trainer for the built-in model (or any SD 1.x/2.x diffusers folder) on the shapes world:
canny edges, a depth map or a segmentation map of a scene -> its render (`condition`; the maps come from the
renderer, `ldm_core.train.condition_maps`), and its evaluation through the engine and the ControlNet extension.

Recipe (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"): the ControlNet
starts as a copy of the base UNet's encoder and middle block with zero-initialised output convolutions
(`ControlNetModel.from_unet`), the base model stays frozen, and the ControlNet learns to make the frozen
UNet denoise towards the image whose edges it is given. Loss: the usual denoising MSE in the base
model's prediction type (v for the built-in), timesteps uniform (or, with `timesteps="cubic"`, drawn as
t = (1 - u^3) T, u uniform, as the T2I-Adapter paper does, so that more steps are spent at the high noise levels
where the layout and shape of the image are decided: the edges must win over a prompt that names another shape
there, not later). Data are rendered on the fly (a batch is
a function of (seed, step)); the control map is OpenCV's Canny (thresholds 100/200, as the extension's
"canny" preprocessor) of the render at the model's native size. Captions are the scene's own, except:
with probability `prompt_mismatch` they describe the same colours with other shapes and positions (so the
edges, not the text, decide shape and position), and with `caption_dropout` they are empty (so the
ControlNet works under classifier-free guidance).

On a CPU, rendering and VAE-encoding every batch costs more than the ControlNet step itself, so with
`cache_scenes` > 0 a fixed set of scenes is rendered and encoded once (latent mean and std, fp16, and the
Canny map as packed bits: ~1.5 KB per 64 px scene) into `work_dir`, and each step samples its batch from the
cache (a fresh latent sample, fresh captions). With `work_dir`, training also writes a resumable checkpoint
(fp32 weights, optimiser, step, seconds spent) there and picks it up when run again with the same options.

Output: a diffusers ControlNet folder (config.json + fp16 diffusion_pytorch_model.safetensors + TRAINING.json)
which the extension finds in models/ControlNet. Evaluation (`evaluate`): held-out edge maps of a circle in
the bottom right with the prompt "a red square"; success = the analyser's largest object is a red circle
in the bottom right. Also reported: random shapes/positions with a prompt naming another shape.

Depth and seg: half of the depth ControlNet's scenes are two overlapping objects of different shapes in a
random drawing order (only the map says which is in front; `overlap_weight` > 1 weighs the loss on the few
latent cells where they overlap, where that order shows; `shape_weight` > 1 likewise weighs the cells where a
shape differs from a blob of its size, where the map's shape shows against the prompt's; `depth_jitter` gives
that share of the depth maps other levels and softer edges, as an estimator's or a user's maps have). Their evaluations:
"seg", a held-out map of one shape at one position with a prompt naming another shape, another position and a
colour (shape, position and colour are scored separately: the map should decide the first two, the prompt the
colour); "depth", two overlapping objects of different shapes named in the prompt in random order, scored by
which object's colour fills the overlap (the map's front one should; chance is one half).

CLI: `python -m ldm_core.train.controlnet train --base models/builtin --out models/ControlNet/builtin-canny`
(`--condition depth|seg` for the others) and `python -m ldm_core.train.controlnet eval --base models/builtin
--controlnet models/ControlNet/builtin-canny [--condition ...]`.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ldm_core.models.geometry import latent_normalisation
from ldm_core.train import shapes
from ldm_core.train.builtin import (
    _autocast,
    _resolve_device,
    _save_atomic,
    command_line,
    export_fp16_folder,
    warmup_cosine,
)
from ldm_core.train.cell_weights import overlap_loss_weights, shape_loss_weights
from ldm_core.train.condition_maps import (
    CONDITIONS,
    condition_maps,
    depth_maps,
    drawn_map,
    drawn_masks,
    jitter_depth_maps,
    object_colours,
    overlapping_scene,
    seg_maps,
)

CANNY_LOW, CANNY_HIGH = 100, 200
EVAL_PROMPT = "a red square"


@dataclass
class ControlNetTrainOptions:
    """One training run. `resolution` None = the base model's native size; `max_seconds` a wall-clock
    budget (the learning-rate schedule then runs on time); `export_every` seconds between exports of the
    folder during training (0 = only at the end)."""

    base: Path
    out: Path
    steps: int = 20000
    batch: int = 64
    lr: float = 1e-4
    warmup_steps: int = 500
    min_lr_ratio: float = 0.1
    resolution: int | None = None
    seed: int = 0
    device: str = "auto"
    caption_dropout: float = 0.1
    prompt_mismatch: float = 0.3
    max_seconds: float | None = None
    export_every: float = 900.0
    log_every: int = 100
    resume: bool = False
    eval_n: int = 200
    allow_pickle: bool = False
    work_dir: Path | None = None
    cache_scenes: int = 0
    cache_batch: int = 256
    checkpoint_every: float = 300.0
    condition: str = "canny"  # canny, depth or seg (ldm_core.train.condition_maps)
    autocast: str = "auto"  # "auto" (bf16 on CUDA), "bf16" (also on CPU: faster on AVX512-BF16/AMX), "off"
    timesteps: str = "uniform"  # "uniform" or "cubic" (more high-noise steps; see the module docstring)
    size_weights: str = ""  # e.g. "large=3": draw cached scenes whose largest object is large 3x as often
    shape_weights: str = ""  # e.g. "star=3": draw cached scenes with a star 3x as often (times size_weights)
    overlap_weight: float = 1.0  # loss weight of the latent cells where two objects overlap (depth: the front)
    shape_weight: float = 1.0  # loss weight of the latent cells where a shape differs from a blob (seg, canny)
    depth_jitter: float = 0.0  # depth: share of maps given another source's levels and blur (jitter_depth_maps)


#: The held-out cases of each condition's evaluation.
#: "-drawn": the same cases with maps painted freehand (`condition_maps.drawn_map`), not by the renderer the
#: ControlNet learnt from (canny: a pen sketch of the outlines, given with preprocessor `canny` as users do).
EVAL_KINDS = {
    "canny": ("circle", "random", "circle-drawn", "random-drawn"),
    "depth": ("depth", "depth-drawn"),
    "seg": ("seg", "seg-drawn"),
}


def canny_maps(images: torch.Tensor, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> torch.Tensor:
    """Canny edge maps of (N, 3, H, W) images in [0, 1]: float32 (N, 3, H, W) in {0, 1} on the CPU."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    edges = np.stack([cv2.Canny(np.ascontiguousarray(a), low, high) for a in arr])
    return torch.from_numpy(edges).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def lying_caption(scene: shapes.Scene, rng: random.Random) -> str:
    """A caption with the scene's colours and sizes but other shapes and positions."""
    objs = []
    for o in scene.objects:
        shape = rng.choice([s for s in shapes.SHAPES if s != o.shape])
        pos = rng.choice([p for p in shapes.POSITIONS if p != o.position])
        objs.append(shapes.make_object(shape, o.colour, o.size, pos))
    return shapes.caption(shapes.Scene(scene.background, tuple(objs)), rng)


def training_captions(scenes: Sequence[shapes.Scene], rng: random.Random, opts: ControlNetTrainOptions) -> list[str]:
    """One training caption per scene: empty (caption dropout), lying (prompt mismatch) or the scene's own."""
    captions = []
    for s in scenes:
        u = rng.random()
        if u < opts.caption_dropout:
            captions.append("")
        elif u < opts.caption_dropout + opts.prompt_mismatch:
            captions.append(lying_caption(s, rng))
        else:
            captions.append(s.caption)
    return captions


TIMESTEP_SAMPLING = ("uniform", "cubic")


def sample_timesteps(n: int, n_train: int, mode: str, gen: torch.Generator) -> torch.Tensor:
    """`n` training timesteps in [0, n_train): uniform, or "cubic" (t = (1 - u^3) n_train, u uniform: three
    quarters of them above t = 0.58 n_train, against 42% uniformly: the high-noise steps that decide the layout)."""
    check_timestep_sampling(mode)
    if mode == "uniform":
        return torch.randint(0, n_train, (n,), generator=gen)
    u = torch.rand(n, generator=gen)
    return ((1 - u**3) * n_train).long().clamp(0, n_train - 1)


def check_timestep_sampling(mode: str) -> None:
    """ValueError naming `timesteps` unless `mode` is one of TIMESTEP_SAMPLING (a trainer checks before loading)."""
    if mode not in TIMESTEP_SAMPLING:
        raise ValueError(f"timesteps: {mode!r} is not one of {', '.join(TIMESTEP_SAMPLING)}")


def condition_scenes(stream: str, n: int, condition: str) -> list[shapes.Scene]:
    """`n` training scenes; for depth every other one is two overlapping objects (captioned)."""
    scenes = shapes.sample_scenes(stream, n)
    if condition != "depth":
        return scenes
    from dataclasses import replace

    rng = random.Random(f"{stream}:overlap")
    for i in range(0, n, 2):
        sc = overlapping_scene(rng)
        scenes[i] = replace(sc, caption=shapes.caption(sc, rng))
    return scenes


def training_batch(seed: int, step: int, n: int, opts: ControlNetTrainOptions) -> tuple[list[shapes.Scene], list[str]]:
    """Scenes and captions of batch `step` (a function of seed and step only)."""
    scenes = condition_scenes(f"controlnet:{seed}:{step}", n, opts.condition)
    rng = random.Random(f"controlnet-captions:{seed}:{step}")
    return scenes, training_captions(scenes, rng, opts)


def parse_weights(text: str, names: Sequence[str], field: str) -> dict[str, float]:
    """ "large=3,small=0.5" -> {"small": 0.5, "medium": 1.0, "large": 3.0}: a weight per name (`names`), 1 for
    those not given; errors name `field`."""
    weights = dict.fromkeys(names, 1.0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in weights:
            raise ValueError(f"{field}: {part!r} is not NAME=WEIGHT with NAME one of {', '.join(names)}")
        try:
            w = float(value)
        except ValueError:
            w = -1.0
        if not w >= 0:
            raise ValueError(f"{field}: the weight of {name!r} must be a number >= 0, got {value.strip()!r}")
        weights[name] = w
    if not any(weights.values()):
        raise ValueError(f"{field}: at least one name needs a weight above 0")
    return weights


def parse_size_weights(text: str) -> dict[str, float]:
    """ "large=3,small=0.5" -> {"small": 0.5, "medium": 1.0, "large": 3.0}; sizes not named weigh 1."""
    return parse_weights(text, tuple(shapes.SIZES), "size_weights")


def parse_shape_weights(text: str) -> dict[str, float]:
    """ "star=3" -> star 3, every other shape 1."""
    return parse_weights(text, tuple(shapes.SHAPES), "shape_weights")


def loss_weights(scenes: Sequence[shapes.Scene], size: int, opts: ControlNetTrainOptions) -> torch.Tensor | None:
    """The per-cell loss weights of a batch (overlap and shape weights multiply); None for the plain mean."""
    w = None
    if opts.overlap_weight != 1:
        w = overlap_loss_weights(scenes, size, opts.overlap_weight)
    if opts.shape_weight != 1:
        s = shape_loss_weights(scenes, size, opts.shape_weight)
        w = s if w is None else w * s
    return w


def scene_sampling_weights(
    scenes: Sequence[shapes.Scene], size_weights: dict[str, float], shape_weights: dict[str, float] | None = None
) -> list[float]:
    """Each scene's weight: that of its largest object's size, times the highest weight of its objects' shapes
    (`shape_weights`, default all 1); a scene without objects weighs 1."""
    order = {name: i for i, name in enumerate(shapes.SIZES)}
    out = []
    for s in scenes:
        sizes = [o.size for o in s.objects if o.size in order]
        w = size_weights[max(sizes, key=order.__getitem__)] if sizes else 1.0
        if shape_weights and s.objects:
            w *= max(shape_weights.get(o.shape, 1.0) for o in s.objects)
        out.append(w)
    return out


def cache_scenes(opts: ControlNetTrainOptions) -> list[shapes.Scene]:
    return condition_scenes(f"controlnet-cache:{opts.seed}", opts.cache_scenes, opts.condition)


@torch.no_grad()
def build_cache(
    vae,
    scenes: list[shapes.Scene],
    res: int,
    path: Path,
    batch: int,
    log: Callable[[str], None],
    seed: int = 0,
    condition: str = "canny",
) -> dict:
    """Render `scenes` once at `res`, keep the VAE posterior (mean, std; fp16) and the control map of each
    (canny: packed bits; depth: one uint8 channel; seg: three); resumable: a partial cache at `path` for the
    same scenes (by a fingerprint of their description), size and condition is continued (saved about once a
    minute), any other is rebuilt: a cache of other scenes would pair their latents with these captions."""
    n = len(scenes)
    cache = torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None
    scenes_id = hashlib.sha256(repr(list(scenes)).encode()).hexdigest()[:16]
    key = [seed, n, res, condition, scenes_id]
    if (
        cache is None
        or [
            int(cache.get("seed", -1)),
            int(cache["n"]),
            int(cache["res"]),
            cache.get("condition", "canny"),
            cache.get("scenes", ""),
        ]
        != key
    ):
        cache = {
            "scenes": scenes_id,
            "seed": seed,
            "n": n,
            "res": res,
            "condition": condition,
            "done": 0,
            "mean": None,
            "std": None,
            "edges": None,
            "maps": None,
        }
    done, t0, last = int(cache["done"]), time.monotonic(), time.monotonic()
    dev = next(vae.parameters()).device
    while done < n:
        chunk = scenes[done : done + batch]
        images = shapes.render(chunk, res, device=dev)
        post = vae.encode(images * 2 - 1).latent_dist
        if cache["mean"] is None:
            shape = (n, *post.mean.shape[1:])
            cache["mean"] = torch.zeros(shape, dtype=torch.float16)
            cache["std"] = torch.zeros(shape, dtype=torch.float16)
            if condition == "canny":
                cache["edges"] = torch.zeros((n, res, (res + 7) // 8), dtype=torch.uint8)
            else:
                cache["maps"] = torch.zeros((n, 1 if condition == "depth" else 3, res, res), dtype=torch.uint8)
        j = done + len(chunk)
        cache["mean"][done:j] = post.mean.half().cpu()
        cache["std"][done:j] = post.std.half().cpu()
        if condition == "canny":
            edges = canny_maps(images)[:, 0].bool().numpy()
            cache["edges"][done:j] = torch.from_numpy(np.packbits(edges, axis=-1))
        else:
            maps = condition_maps(condition, shapes.pack_scenes(chunk), images, res)
            maps = maps[:, :1] if condition == "depth" else maps
            cache["maps"][done:j] = (maps * 255).round().byte().cpu()
        done = cache["done"] = j
        if time.monotonic() - last > 60 or done >= n:
            last = time.monotonic()
            _save_atomic(cache, path)
            log(f"cache {done}/{n} scenes rendered and encoded ({time.monotonic() - t0:.0f}s)")
    return cache


def cached_control(cache: dict, idx: torch.Tensor) -> torch.Tensor:
    """The control maps of cache rows `idx` as float32 (B, 3, res, res) in [0, 1], like `condition_maps`."""
    if cache.get("maps") is not None:
        maps = cache["maps"][idx].float() / 255
        return maps.expand(-1, 3, -1, -1).contiguous()
    res = int(cache["res"])
    bits = np.unpackbits(cache["edges"][idx].numpy(), axis=-1)[..., :res]
    return torch.from_numpy(bits).float().unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


class TextEncoder:
    """Batched caption encoding for training: one text-encoder call per batch for SD 1.x/2.x (the same
    hidden states the engine's PromptEncoder gives plain captions), PromptEncoder otherwise."""

    def __init__(self, model) -> None:
        from ldm_core.prompts.encode import PromptEncoder
        from ldm_core.train.builtin import CaptionTokenizer

        self.model = model
        self.batched = model.kind.family in ("sd1", "sd2")
        self.tok = CaptionTokenizer(model.tokenizer) if self.batched else None
        self.prompts = PromptEncoder(model)

    @torch.no_grad()
    def __call__(self, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.batched:
            ids = self.tok(texts).to(device)
            return self.model.text_encoder(ids)[0], None
        embeds, pooled = self.prompts.encode_batch(texts, 1)
        return embeds, pooled


def train_controlnet(opts: ControlNetTrainOptions, log: Callable[[str], None] = print) -> dict:
    """Train and export; returns the training record (steps, losses, seconds, parameters, bytes)."""
    from diffusers import ControlNetModel, DDPMScheduler

    from ldm_core.models import load_model

    size_weights = parse_size_weights(opts.size_weights)  # a bad spec fails before any model loads
    shape_weights = parse_shape_weights(opts.shape_weights)
    if opts.depth_jitter and opts.condition != "depth":
        raise ValueError(f"depth_jitter is for depth maps; condition is {opts.condition!r}")
    if not 0 <= opts.depth_jitter <= 1:
        raise ValueError(f"depth_jitter is a share of the maps: 0 to 1, got {opts.depth_jitter}")
    for field in ("size_weights", "shape_weights"):
        if getattr(opts, field) and opts.cache_scenes <= 0:
            raise ValueError(f"{field} draws from the scene cache: give cache_scenes > 0 too")
    torch.manual_seed(opts.seed)
    dev = _resolve_device(opts.device)
    model = load_model(opts.base, dtype=torch.float32, allow_pickle=opts.allow_pickle)
    for m in (model.unet, model.vae, model.text_encoder, model.text_encoder_2):
        if m is not None:
            m.to(dev).eval().requires_grad_(False)
    res = opts.resolution or model.native_size
    work = Path(opts.work_dir) if opts.work_dir is not None else None
    ckpt_path = work / "controlnet-train.pt" if work is not None else None
    ckpt = None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
    if ckpt_path is not None and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if opts.resume and ckpt is None and (Path(opts.out) / "config.json").is_file():
        from ldm_core.models import load_state_dict

        cfg = json.loads((Path(opts.out) / "config.json").read_text(encoding="utf-8"))
        controlnet = ControlNetModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
        controlnet.load_state_dict(load_state_dict(Path(opts.out) / "diffusion_pytorch_model.safetensors"))
        controlnet.float()
        log(f"resuming from {opts.out}")
    else:
        # the hint encoder halves the map once per channel step after the first: as often as the VAE does
        # (diffusers' default (16, 32, 96, 256) is SD's factor 8; the v2 built-in model's VAE is factor 4)
        steps = int(math.log2(model.vae_scale_factor))
        controlnet = ControlNetModel.from_unet(
            model.unet, conditioning_embedding_out_channels=(16, 32, 96, 256)[: steps + 1]
        )
    if ckpt is not None:
        controlnet.load_state_dict(ckpt["controlnet"])
    controlnet.to(dev).train()
    n_params = sum(p.numel() for p in controlnet.parameters())
    log(f"ControlNet with {n_params / 1e6:.2f}M parameters on a {model.kind.family} base at {res}px, device {dev}")
    kw = {"fused": True} if dev.type == "cuda" else {}
    optim = torch.optim.AdamW(controlnet.parameters(), lr=opts.lr, betas=(0.9, 0.99), weight_decay=0.0, **kw)
    text = TextEncoder(model)
    sched = DDPMScheduler.from_config(dict(model.scheduler_config))
    prediction = sched.config.prediction_type
    n_train = sched.config.num_train_timesteps
    vae = model.vae
    scaling, shift = latent_normalisation(vae.config)
    amp = _autocast(dev, opts.autocast)
    cache = scenes_all = cum_weights = None
    if opts.cache_scenes > 0:
        if work is None:
            raise ValueError("cache_scenes needs a work_dir to keep the cache in")
        scenes_all = cache_scenes(opts)
        cache = build_cache(
            vae, scenes_all, res, work / "controlnet-cache.pt", opts.cache_batch, log, opts.seed, opts.condition
        )
        if opts.size_weights or opts.shape_weights:
            per_scene = scene_sampling_weights(scenes_all, size_weights, shape_weights)
            cum_weights = list(itertools.accumulate(per_scene))
    losses: list[float] = []
    ema = None
    step = 0
    spent = 0.0  # seconds of earlier sittings (from the checkpoint)
    gen = torch.Generator(device="cpu").manual_seed(opts.seed)
    if ckpt is not None:
        optim.load_state_dict(ckpt["optim"])
        step, ema, spent = int(ckpt["step"]), ckpt["ema"], float(ckpt["seconds"])
        gen.set_state(ckpt["gen"])
        log(f"resuming from {ckpt_path} at step {step} ({spent:.0f}s spent)")
    t_train = time.perf_counter()
    last_export = last_ckpt = time.perf_counter()

    def seconds() -> float:
        return spent + time.perf_counter() - t_train

    def record() -> dict:
        return {
            "recipe": f"ldm_core.train.controlnet ({opts.condition} map -> shapes render)",
            "condition": opts.condition,
            "options": {k: str(v) for k, v in asdict(opts).items()},
            "base": str(opts.base),
            "family": model.kind.family,
            "resolution": res,
            "steps": step,
            "final_loss": ema,
            "seconds": round(seconds(), 1),
            "parameters": n_params,
            "canny": [CANNY_LOW, CANNY_HIGH],
            "command": command_line("ldm_core.train.controlnet"),
        }

    def checkpoint() -> None:
        state = {"controlnet": controlnet.state_dict(), "optim": optim.state_dict(), "step": step, "ema": ema}
        _save_atomic({**state, "seconds": seconds(), "gen": gen.get_state()}, ckpt_path)

    while step < opts.steps:
        if opts.max_seconds is not None and seconds() > opts.max_seconds:
            log(f"time budget reached after {step} steps")
            break
        step += 1
        progress = step / opts.steps
        if opts.max_seconds:
            progress = max(progress, seconds() / opts.max_seconds)
        for g in optim.param_groups:
            g["lr"] = warmup_cosine(opts.lr, step - 1, progress, opts.warmup_steps, opts.min_lr_ratio)
        if cache is None:
            scenes, captions = training_batch(opts.seed, step, opts.batch, opts)
            images = shapes.render(scenes, res, device=dev)
            control = condition_maps(opts.condition, shapes.pack_scenes(scenes).to(dev), images, res).to(dev)
            with torch.no_grad():
                z = vae.encode(images * 2 - 1).latent_dist.sample(generator=None)
        else:
            rng = random.Random(f"controlnet-cached:{opts.seed}:{step}")
            if cum_weights is None:
                idx = torch.tensor([rng.randrange(len(scenes_all)) for _ in range(opts.batch)])
            else:
                idx = torch.tensor(rng.choices(range(len(scenes_all)), cum_weights=cum_weights, k=opts.batch))
            scenes = [scenes_all[k] for k in idx.tolist()]
            captions = training_captions(scenes, rng, opts)
            control = cached_control(cache, idx).to(dev)
            mean, std = cache["mean"][idx].float(), cache["std"][idx].float()
            z = (mean + std * torch.randn(mean.shape, generator=gen)).to(dev)
        if opts.depth_jitter > 0:
            jitter_gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + step)
            control = jitter_depth_maps(control, jitter_gen, opts.depth_jitter)
        latents = (z - shift) * scaling
        with torch.no_grad():
            embeds, pooled = text(captions, dev)
        noise = torch.randn(latents.shape, generator=gen).to(dev)
        t = sample_timesteps(latents.shape[0], n_train, opts.timesteps, gen).to(dev)
        noisy = sched.add_noise(latents, noise, t)
        target = sched.get_velocity(latents, noise, t) if prediction == "v_prediction" else noise
        added = None
        if model.kind.family == "sdxl":
            time_ids = torch.tensor([[res, res, 0, 0, res, res]], device=dev, dtype=embeds.dtype)
            added = {"text_embeds": pooled, "time_ids": time_ids.repeat(latents.shape[0], 1)}
        with amp:
            down, mid = controlnet(
                noisy,
                t,
                encoder_hidden_states=embeds,
                controlnet_cond=control,
                added_cond_kwargs=added,
                return_dict=False,
            )
            pred = model.unet(
                noisy,
                t,
                encoder_hidden_states=embeds,
                added_cond_kwargs=added,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
            ).sample
        w = loss_weights(scenes, latents.shape[-1], opts)
        if w is None:
            loss = F.mse_loss(pred.float(), target.float())
        else:
            loss = (w.to(dev) * (pred.float() - target.float()) ** 2).mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optim.step()
        losses.append(float(loss.detach()))
        ema = losses[-1] if ema is None else 0.98 * ema + 0.02 * losses[-1]
        if opts.log_every and (step % opts.log_every == 0 or step == opts.steps):
            log(f"step {step}/{opts.steps} loss {ema:.4f} lr {optim.param_groups[0]['lr']:.2e} ({seconds():.0f}s)")
        if ckpt_path is not None and time.perf_counter() - last_ckpt > opts.checkpoint_every:
            checkpoint()
            last_ckpt = time.perf_counter()
        if opts.export_every and time.perf_counter() - last_export > opts.export_every:
            export_fp16_folder(controlnet.eval(), opts.out, record())
            controlnet.train()
            last_export = time.perf_counter()
    if ckpt_path is not None:
        checkpoint()
    controlnet.eval()
    rec = record()
    rec["first_loss"] = losses[0] if losses else None
    export_fp16_folder(controlnet, opts.out, rec)
    weights = Path(opts.out) / "diffusion_pytorch_model.safetensors"
    rec["bytes"] = weights.stat().st_size
    log(f"wrote {opts.out} ({rec['bytes'] / 1e6:.1f} MB) after {step} steps, loss {ema}")
    return rec


# ----------------------------------------------------------------------------------------------------------
# evaluation


def _edge_image(scene: shapes.Scene, size: int):
    from PIL import Image

    edges = canny_maps(shapes.render([scene], size))[0]
    arr = (edges.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def eval_cases(n: int, size: int, kind: str = "circle", seed: int = 0) -> list[tuple[shapes.Scene, str]]:
    """Held-out (scene whose map is the control, prompt) pairs. "circle": a circle in the bottom right
    (random colour, size, background, jitter) with the prompt "a red square"; "random": a random shape
    and position with a prompt naming a random colour and another shape; "seg": the same with the prompt
    also naming another position; "depth": two overlapping objects named in random order. A "-drawn" kind has
    cases of its own (its maps come from `control_image`)."""
    rng = random.Random(f"controlnet-eval:{kind}:{seed}")
    kind = kind.removesuffix("-drawn")
    out = []
    for _ in range(n):
        if kind == "depth":
            scene = overlapping_scene(rng)
            a, b = scene.objects if rng.random() < 0.5 else scene.objects[::-1]
            out.append((scene, f"a {a.colour} {a.shape} and a {b.colour} {b.shape}"))
            continue
        bg = rng.choice(shapes.COLOUR_NAMES)
        colour = rng.choice(
            [c for c in shapes.COLOUR_NAMES if shapes.colour_distance(c, bg) >= shapes.MIN_COLOUR_DISTANCE]
        )
        size = rng.choice(tuple(shapes.SIZES))
        if kind == "circle":
            obj = shapes.make_object("circle", colour, size, "bottom right", rng)
            prompt = EVAL_PROMPT
        else:
            obj = shapes.make_object(rng.choice(shapes.SHAPES), colour, size, rng.choice(tuple(shapes.POSITIONS)), rng)
            want = rng.choice(["red", "blue", "green", "yellow", "purple"])
            other = rng.choice([s for s in shapes.SHAPES if s != obj.shape])
            prompt = f"a {want} {other}"
            if kind == "seg":  # the prompt contradicts the map's position too
                where = rng.choice([p for p in shapes.POSITIONS if p != obj.position])
                prompt += " " + rng.choice(shapes.POSITION_PHRASES[where][:3])
        out.append((shapes.Scene(bg, (obj,)), prompt))
    return out


def _drawn_condition(kind: str) -> str | None:
    """The condition a "-drawn" eval kind is sketched for (canny for circle/random), None for rendered maps."""
    if not kind.endswith("-drawn"):
        return None
    drawn = kind.removesuffix("-drawn")
    return "canny" if drawn in EVAL_KINDS["canny"] else drawn


def control_preprocessor(kind: str) -> str:
    """The unit's preprocessor for an eval kind: a pen sketch goes through "canny" as a user's would; the
    renderer's maps (and drawn depth/seg maps, already maps) go in as they are."""
    return "canny" if _drawn_condition(kind) == "canny" else "none"


def control_image(scene: shapes.Scene, size: int, kind: str):
    """The control map of an eval case as the PIL image a user would give the ControlNet unit."""
    if kind in ("circle", "random"):
        return _edge_image(scene, size)
    if (drawn := _drawn_condition(kind)) is not None:
        return drawn_map(scene, drawn)
    fn = depth_maps if kind == "depth" else seg_maps
    return shapes.to_pil(fn(shapes.pack_scenes([scene]), size)[0])


def front_drawn_in_front(image, scene: shapes.Scene, masks: np.ndarray | None = None) -> bool | None:
    """Whether the colour in the two objects' overlap is nearer the front (second-drawn) object's than the
    back one's; None when there is no overlap at this size. `masks`: the objects' regions when the map was
    not the renderer's (bool (2, H, W)); default: the renderer's coverage."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    if masks is None:
        masks = shapes.object_coverages(shapes.pack_scenes([scene]), arr.shape[0])[0].numpy() > 0.5
    overlap = masks[0] & masks[1]
    if not overlap.any():
        return None
    pix = arr[overlap]
    back, front = (np.array(shapes.COLOURS[o.colour], dtype=np.float32) for o in scene.objects)
    return float(np.linalg.norm(pix - front, axis=1).mean()) < float(np.linalg.norm(pix - back, axis=1).mean())


def _prompt_colour(prompt: str) -> str:
    return next(c for c in shapes.COLOUR_NAMES if f" {c} " in f" {prompt} ")


def evaluate(
    base: Path,
    controlnet: Path,
    *,
    n: int = 200,
    device: str = "auto",
    steps: int = 20,
    sampler: str | None = None,  # None: the base's recommendation (as the engine runs a request naming none)
    cfg_scale: float = 5.0,
    seed: int = 0,
    sheet: Path | None = None,
    size: int | None = None,
    log: Callable[[str], None] = print,
    condition: str = "canny",
    weight: float = 1.0,
    control_mode: str = "Balanced",
    kinds: Sequence[str] | None = None,
    vae: Path | None = None,
) -> dict:
    """Generate the held-out cases of `condition` (`EVAL_KINDS`) through the engine with the ControlNet
    extension (as users run it) and score them with the shapes analyser. Returns rates and per-case results.
    `vae`: a VAE folder or file the jobs pick as their SD VAE (default: the base's own)."""
    from ldm_core.engine import scratch_engine
    from ldm_core.extensions import REPO_EXTENSIONS_DIR, ExtensionManager

    unknown = set(kinds or ()) - set(EVAL_KINDS[condition])
    if unknown:
        raise ValueError(f"kinds: {sorted(unknown)} are not {condition} kinds ({', '.join(EVAL_KINDS[condition])})")
    controlnet = Path(controlnet)
    extra = {} if vae is None else {"vae_dirs": (Path(vae).parent,)}
    with scratch_engine(base, device=device, controlnet_dirs=(controlnet.parent,), **extra) as (engine, model):
        manager = ExtensionManager([REPO_EXTENSIONS_DIR], config=engine.config)
        manager.load(engine)
        rec = manager.get("controlnet")
        if rec.status != "loaded":
            raise RuntimeError(f"the ControlNet extension is {rec.status}: {rec.message}")
        picked = None if vae is None else engine.models.find_path(vae)
        if vae is not None and picked is None:
            raise ValueError(f"vae: {vae} is not a VAE folder or file the engine can list")
        return _evaluate_cases(
            engine,
            model,
            controlnet,
            base,
            n,
            steps,
            sampler,
            cfg_scale,
            seed,
            sheet,
            size,
            log,
            condition,
            {"weight": weight, "control_mode": control_mode},
            kinds,
            None if picked is None else picked.name,  # the name the engine lists it under
        )


def _evaluate_cases(
    engine,
    model,
    controlnet,
    base,
    n,
    steps,
    sampler,
    cfg_scale,
    seed,
    sheet,
    size,
    log,
    condition="canny",
    unit_options: dict | None = None,
    kinds: Sequence[str] | None = None,
    vae_name: str | None = None,
) -> dict:
    from ldm_core.generation_requests import GenerationRequest
    from ldm_core.train.analyser import analyse

    size = size or model.native_size
    report: dict = {
        "controlnet": str(controlnet),
        "base": str(base),
        "steps": steps,
        # what runs: the base's recommendation where `sampler` is None (the same for every case)
        "sampler": " ".join(engine.sampling(GenerationRequest.build(sampler_name=sampler))),
        "cfg_scale": cfg_scale,
        "n": n,
        "condition": condition,
        "unit": {"weight": 1.0, "control_mode": "Balanced", **(unit_options or {})},
        "vae": vae_name or "Automatic",
    }
    images = []
    for kind in kinds or EVAL_KINDS[condition]:
        cases = eval_cases(n, size, kind, seed)
        results = []
        for i, (scene, prompt) in enumerate(cases):
            control = control_image(scene, size, kind)
            unit = {
                "enabled": True,
                "module": control_preprocessor(kind),
                "model": controlnet.name,
                "image": control,
                **report["unit"],
            }
            req = GenerationRequest.build(
                prompt=prompt,
                steps=steps,
                sampler_name=sampler,
                cfg_scale=cfg_scale,
                seed=seed * 100000 + i,
                width=size,
                height=size,
                save_images=False,
                vae=report["vae"],
                alwayson_scripts={"controlnet": {"args": [unit]}},
            )
            img = engine.generate(req).images[0]
            if len(images) < 40:
                images += [control, img]
            if kind.startswith("depth"):
                drawn = drawn_masks(scene, img.height) if kind.endswith("-drawn") else None
                front = front_drawn_in_front(img, scene, drawn)
                found = object_colours(img)
                both = all(o.colour in found for o in scene.objects)
                results.append({"prompt": prompt, "front": front, "both_objects": both, "ok": bool(front)})
                continue
            a = analyse(img)
            top = a.objects[0] if a.objects else None
            want = scene.objects[0]
            colour = _prompt_colour(prompt)
            shape_ok = top is not None and top.shape == want.shape
            pos_ok = top is not None and top.position == want.position
            colour_ok = top is not None and top.colour == colour
            results.append(
                {
                    "prompt": prompt,
                    "want": [want.shape, want.position, colour],
                    "got": [top.shape, top.position, top.colour] if top else None,
                    "ok": shape_ok and pos_ok and colour_ok,
                    "shape": shape_ok,
                    "position": pos_ok,
                    "colour": colour_ok,
                }
            )
        m = len(results)
        if kind.startswith("depth"):
            report[kind] = {
                "front_right": sum(r["ok"] for r in results) / m,
                "both_objects": sum(r["both_objects"] for r in results) / m,
                "chance": 0.5,
                "cases": results,
            }
            log(
                f"{kind}: the map's front object drawn in front in {report[kind]['front_right']:.1%}, both objects "
                f"present in {report[kind]['both_objects']:.1%} of {m} held-out cases"
            )
            continue
        report[kind] = {
            "success": sum(r["ok"] for r in results) / m,
            "shape": sum(r["shape"] for r in results) / m,
            "position": sum(r["position"] for r in results) / m,
            "colour": sum(r["colour"] for r in results) / m,
            "cases": results,
        }
        log(
            f"{kind}: success {report[kind]['success']:.1%} (shape {report[kind]['shape']:.1%}, position "
            f"{report[kind]['position']:.1%}, colour {report[kind]['colour']:.1%}) over {m} held-out cases"
        )
    if sheet is not None and images:
        _sheet(images, Path(sheet))
    return report


def _sheet(images: list, path: Path, cols: int = 10) -> None:
    from PIL import Image

    w, h = images[0].size
    rows = -(-len(images) // cols)
    canvas = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        canvas.paste(im, ((i % cols) * w, (i // cols) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


# ----------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldm_core.train.controlnet", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = ControlNetTrainOptions(base=Path("."), out=Path("."))
    t = sub.add_parser("train", help="train a canny, depth or seg ControlNet on the shapes world, then evaluate it")
    t.add_argument("--base", type=Path, default=Path("models/builtin"))
    t.add_argument("--out", type=Path, default=Path("models/ControlNet/builtin-canny"))
    for name in ("steps", "batch", "warmup_steps", "seed", "log_every", "eval_n", "cache_scenes", "cache_batch"):
        t.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in (
        "lr",
        "caption_dropout",
        "prompt_mismatch",
        "export_every",
        "min_lr_ratio",
        "checkpoint_every",
        "overlap_weight",
        "shape_weight",
        "depth_jitter",
    ):
        t.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    t.add_argument("--resolution", type=int, default=None)
    t.add_argument("--max-seconds", type=float, default=None)
    t.add_argument("--device", default="auto")
    t.add_argument("--resume", action="store_true", help="start from the weights already in --out")
    t.add_argument(
        "--work-dir", type=Path, default=None, help="resumable checkpoints and the latent cache (outside the repo)"
    )
    t.add_argument("--report", type=Path, default=None, help="write the evaluation report JSON here")
    t.add_argument("--condition", choices=CONDITIONS, default=d.condition, help="the control maps to learn")
    t.add_argument(
        "--autocast", choices=("auto", "bf16", "off"), default=d.autocast, help="bf16 autocast: auto = on CUDA only"
    )
    t.add_argument(
        "--size-weights",
        default=d.size_weights,
        help='draw cached scenes by their largest object\'s size, e.g. "large=3" (needs --cache-scenes)',
    )
    t.add_argument(
        "--shape-weights",
        default=d.shape_weights,
        help='draw cached scenes by their objects\' shapes, e.g. "star=3" (times --size-weights; needs --cache-scenes)',
    )
    t.add_argument(
        "--timesteps", choices=TIMESTEP_SAMPLING, default=d.timesteps, help="cubic: more high-noise (layout) steps"
    )
    e = sub.add_parser("eval", help="measure a trained ControlNet on held-out control maps")
    e.add_argument("--base", type=Path, default=Path("models/builtin"))
    e.add_argument("--controlnet", type=Path, default=Path("models/ControlNet/builtin-canny"))
    e.add_argument("--n", type=int, default=200)
    e.add_argument("--steps", type=int, default=20)
    e.add_argument(
        "--sampler",
        default=None,
        help="default: the base's recommendation (its sidecar's sampler and schedule type), else Euler a",
    )
    e.add_argument("--cfg-scale", type=float, default=5.0)
    e.add_argument(
        "--seed", type=int, default=0, help="which held-out set: its cases and generation seeds (0: the one reported)"
    )
    e.add_argument("--device", default="auto")
    e.add_argument("--report", type=Path, default=None)
    e.add_argument("--sheet", type=Path, default=None, help="write a contact sheet (control map, output) PNG")
    e.add_argument("--condition", choices=CONDITIONS, default="canny", help="the ControlNet's control maps")
    e.add_argument("--weight", type=float, default=1.0, help="the unit's control weight")
    e.add_argument("--control-mode", default="Balanced", help='e.g. "ControlNet is more important"')
    e.add_argument("--kinds", nargs="+", default=None, help="only these held-out kinds (default: all of --condition)")
    e.add_argument(
        "--vae", type=Path, default=None, help="a VAE the jobs pick as SD VAE (a folder or file in models/VAE)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.command == "train":
        opts = ControlNetTrainOptions(
            **{k: v for k, v in vars(a).items() if k in ControlNetTrainOptions.__dataclass_fields__}
        )
        rec = train_controlnet(opts)
        report = None
        if opts.eval_n > 0:
            report = evaluate(
                opts.base,
                opts.out,
                n=opts.eval_n,
                device=opts.device,
                sheet=Path(opts.out).with_name(Path(opts.out).name + "-eval.png"),
                condition=opts.condition,
            )
            summary = {k: report[k].get("success", report[k].get("front_right")) for k in EVAL_KINDS[opts.condition]}
            rec["eval"] = summary
            info = json.loads((Path(opts.out) / "TRAINING.json").read_text(encoding="utf-8"))
            info["eval"] = summary
            (Path(opts.out) / "TRAINING.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        if a.report is not None and report is not None:
            a.report.write_text(json.dumps(report, indent=2), encoding="utf-8")
        print(json.dumps({k: v for k, v in rec.items() if k != "options"}, indent=2, default=str))
        return 0
    report = evaluate(
        a.base,
        a.controlnet,
        n=a.n,
        device=a.device,
        steps=a.steps,
        sampler=a.sampler,
        cfg_scale=a.cfg_scale,
        seed=a.seed,
        sheet=a.sheet,
        condition=a.condition,
        weight=a.weight,
        control_mode=a.control_mode,
        kinds=a.kinds,
        vae=a.vae,
    )
    if a.report is not None:
        a.report.write_text(json.dumps(report, indent=2), encoding="utf-8")
    kinds = a.kinds or EVAL_KINDS[a.condition]
    print(json.dumps({k: {m: v for m, v in report[k].items() if m != "cases"} for k in kinds}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
