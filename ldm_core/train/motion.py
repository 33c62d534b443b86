"""The built-in model's motion module: an AnimateDiff-class `MotionAdapter` trained on clips of the shapes
world, with the base model (UNet, VAE, text encoder) frozen.

Clips (`sample_clip`): one shape on a plain background that moves left, right, up or down across about half
the image, grows, shrinks, or changes colour, over `frames` frames, captioned as a user would ask for it
("a red circle moving to the right on a blue background", "blue square, growing, white background").
Direction words reach the temporal layers only through the base UNet's spatial cross-attention, as in
AnimateDiff.

Training: frames are the UNet batch (one timestep per clip), the temporal layers are hooked into the frozen
UNet (ldm_core.video.motion_modules.MotionPatch) and only they learn, from a zero-initialised output
projection (the module starts as the identity: the base's images). Resumable (`--work-dir`), with a wall-clock
budget; exports an fp16 diffusers folder (`config.json`, `diffusion_pytorch_model.safetensors`, TRAINING.json).
With `--object-weight W` the latent cells on and next to each frame's object weigh up to 1 + W in the loss (the
base trainers' `object_loss_weight`): the object is a few cells of 256, and it is what has to move and hold its
shape; off (a plain mean) by default, as the shipped module's first sittings trained.

Evaluation (`evaluate_motion`): held-out seeds and prompts phrased in ways the training captions never are;
the analyser finds the object in every frame: the measured direction (first to last frame, the larger axis)
must be the one the prompt names, and the shape and colour must read the same in every frame. The same clips
without the module are the baseline.

    python -m ldm_core.train motion --base models/builtin --out models/AnimateDiff/builtin-motion \\
        --work-dir /tmp/motion-work --max-seconds 5400
    python -m ldm_core.train motion-eval --module models/AnimateDiff/builtin-motion --n 100

A later sitting whose checkpoint is gone continues from the committed export with `--init FOLDER` (its weights,
a new optimiser and schedule; only a module made for the same base fits).

With `--lora-rank R` a LoRA on the base UNet's cross-attention keys and values (`attn2.to_k`, `attn2.to_v`:
where the prompt's words enter the image features) trains with the module, so that direction words can shape
what the temporal layers see (the frozen base barely tells "moving up" from "moving down"); it is written as
a kohya-format LoRA (`--lora-out`, default `models/Lora/<module name>-adapter.safetensors`) that the clip's
prompt loads with `<lora:NAME:1>`, as AnimateDiff v3's adapter LoRA is used beside its module.
`--init-lora FILE` continues one. `motion-eval --lora FILE` measures the pair. `--lora-targets attention` puts it on
every attention projection instead (the layers that draw, where the base's habit of nine object places lives), and
`--object-sizes base` gives the clips' objects the base's own size classes.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..video.options import TIMELINE_DEFAULT, add_timeline_argument, timeline_options
from ..video.spatiotemporal import ATTENTIONS, CONFIG_KEY, LEVEL_KEY, check_attentions, check_level
from . import shapes
from .step_loop import StepLoop, read_checkpoint

DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}
MOTIONS = (*DIRECTIONS, "grow", "shrink", "colour")
MOTION_WEIGHTS = (3, 3, 3, 3, 1, 1, 1)  # directions are what the bar measures

#: training phrasings of each motion ({o}: the object, {b}: the background phrase)
TRAIN_TEMPLATES = {
    "right": (
        "{o} moving to the right {b}",
        "{o} moves right {b}",
        "{o} sliding to the right {b}",
        "{o} going right {b}",
        "{o}, moving right, {b}",
        "{o} heading right {b}",
        "{o} gliding to the right {b}",
        "{o} moving from left to right {b}",
        "{o} passing by to the right {b}",
        "{o}, shifting right, {b}",
    ),
    "left": (
        "{o} moving to the left {b}",
        "{o} moves left {b}",
        "{o} sliding to the left {b}",
        "{o} going left {b}",
        "{o}, moving left, {b}",
        "{o} heading left {b}",
        "{o} gliding to the left {b}",
        "{o} moving from right to left {b}",
        "{o} passing by to the left {b}",
        "{o}, shifting left, {b}",
    ),
    "up": (
        "{o} moving up {b}",
        "{o} moves upwards {b}",
        "{o} rising {b}",
        "{o} going up {b}",
        "{o}, moving up, {b}",
        "{o} heading up {b}",
        "{o} climbing {b}",
        "{o} moving from bottom to top {b}",
        "{o} ascending {b}",
        "{o}, lifting up, {b}",
        "{o} rising to the top {b}",
        "{o} going up to the top {b}",
    ),
    "down": (
        "{o} moving down {b}",
        "{o} moves downwards {b}",
        "{o} falling {b}",
        "{o} going down {b}",
        "{o}, moving down, {b}",
        "{o} heading down {b}",
        "{o} dropping {b}",
        "{o} moving from top to bottom {b}",
        "{o} descending {b}",
        "{o}, coming down, {b}",
        "{o} falling to the bottom {b}",
        "{o} going down to the bottom {b}",
    ),
    "grow": ("{o} growing {b}", "{o} getting bigger {b}", "{o}, growing, {b}"),
    "shrink": ("{o} shrinking {b}", "{o} getting smaller {b}", "{o}, shrinking, {b}"),
    "colour": ("{o} changing colour {b}", "{o} turning {c2} {b}", "{o}, changing to {c2}, {b}"),
}
#: evaluation phrasings, never used in training
EVAL_TEMPLATES = {
    "right": ("{o} travels rightward across {b}", "{o} drifting toward the right edge, {b}"),
    "left": ("{o} travels leftward across {b}", "{o} drifting toward the left edge, {b}"),
    "up": ("{o} floats upward across {b}", "{o} drifting toward the top edge, {b}"),
    "down": ("{o} sinks downward across {b}", "{o} drifting toward the bottom edge, {b}"),
}


@dataclass(frozen=True)
class Clip:
    """One training or evaluation clip: packed scenes (frames, PACKED_WIDTH), its motion and caption."""

    packed: torch.Tensor
    motion: str
    caption: str
    shape: str
    colour: str
    background: str


def _object_phrase(shape: str, colour: str, rng: random.Random) -> str:
    word = rng.choice(shapes.SHAPE_WORDS[shape])
    c = rng.choice(shapes.COLOUR_WORDS[colour])
    return f"{shapes.article(c)} {c} {word}" if rng.random() < 0.85 else f"{c} {word}"


def _background(bg: str, rng: random.Random) -> str:
    c = rng.choice(shapes.COLOUR_WORDS[bg])
    return rng.choice((f"on a {c} background", f"on a {c} background", f"against a {c} background", f"on {c}"))


def _row(bg: str, shape: str, cx: float, cy: float, r: float, rgb) -> list[float]:
    row = [c / 255.0 for c in shapes.COLOURS[bg]]
    row += [1.0, float(shapes.SHAPES.index(shape)), cx, cy, r, *[c / 255.0 for c in rgb]]
    row += [0.0] * (shapes.PACKED_WIDTH - len(row))
    return row


#: the object sizes of training clips: "clip" (radius 0.11-0.16 of the image, as the shipped module trained) or
#: "base" (the base model's own size classes, `shapes.SIZES`, each +-0.01: the sizes its scenes drew objects at)
OBJECT_SIZES = ("clip", "base")


def _radius(rng: random.Random, sizes: str) -> float:
    if sizes == "clip":
        return rng.uniform(0.11, 0.16)
    if sizes == "base":
        return shapes.SIZES[rng.choice(sorted(shapes.SIZES))] + rng.uniform(-0.01, 0.01)
    raise ValueError(f"object_sizes: {sizes!r} is not one of {', '.join(OBJECT_SIZES)}")


def sample_clip(
    rng: random.Random, frames: int, motion: str | None = None, templates=None, sizes: str = "clip"
) -> Clip:
    """A random clip (see the module doc); `motion` fixes the kind, `templates` the phrasings, `sizes` the object
    sizes (`OBJECT_SIZES`)."""
    templates = templates or TRAIN_TEMPLATES
    motion = motion or rng.choices(MOTIONS, weights=MOTION_WEIGHTS)[0]
    bg = rng.choice(shapes.COLOUR_NAMES)
    shape = rng.choice(shapes.SHAPES)
    colour = shapes._pick_colour(rng, [bg])
    r = _radius(rng, sizes)
    hx, hy = shapes.SHAPE_EXTENT[shape]
    speed = rng.uniform(0.8, 1.2)  # of the travel below
    cx0 = cy0 = 0.5
    cols = [shapes.COLOURS[colour]] * frames
    radii = [r] * frames
    if motion in DIRECTIONS:
        dx, dy = DIRECTIONS[motion]
        travel = 0.42 * speed
        lo_x, hi_x = 0.02 + hx * r, 0.98 - hx * r
        lo_y, hi_y = 0.02 + hy * r, 0.98 - hy * r
        start = 0.5 - travel / 2 + rng.uniform(-0.06, 0.06)
        across = rng.uniform(0.3, 0.7)
        pts = []
        for f in range(frames):
            s = start + travel * f / max(1, frames - 1)
            if dx:
                x = s if dx > 0 else 1 - s
                pts.append((min(max(x, lo_x), hi_x), across))
            else:
                y = s if dy > 0 else 1 - s
                pts.append((across, min(max(y, lo_y), hi_y)))
    else:
        pts = [(rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65))] * frames
        cx0, cy0 = pts[0]
        if motion in ("grow", "shrink"):
            a, b = 0.08, min(0.24, 0.46 / max(hx, hy))
            if motion == "shrink":
                a, b = b, a
            radii = [a + (b - a) * f / max(1, frames - 1) for f in range(frames)]
        else:
            c2 = shapes._pick_colour(rng, [bg, colour])
            ca, cb = shapes.COLOURS[colour], shapes.COLOURS[c2]
            cols = [tuple(ca[k] + (cb[k] - ca[k]) * f / max(1, frames - 1) for k in range(3)) for f in range(frames)]
    packed = torch.tensor([_row(bg, shape, x, y, rad, c) for (x, y), rad, c in zip(pts, radii, cols, strict=True)])
    fmt = {"o": _object_phrase(shape, colour, rng), "b": _background(bg, rng)}
    if motion == "colour":
        fmt["c2"] = rng.choice(shapes.COLOUR_WORDS[c2])
    caption = rng.choice(templates[motion]).format(**fmt).replace(" ,", ",")
    return Clip(packed, motion, caption, shape, colour, bg)


def write_frame_dataset(out_dir: str | Path, n: int = 8000, seed: str = "motion-frames", size: int = 64) -> list[Path]:
    """The motion module's domain-adapter data: one random frame of each of `n` training clips, as PNG with the
    clip's caption in a same-name .txt (`python -m ldm_core.train lora --data` reads the folder).

    Why: the built-in model puts a lone object at one of nine places, its scenes' position classes (frames of
    held-out clip prompts, base alone: 123 of 128 within 1/16 of 0.25, 0.5 or 0.75 on both axes), so a frozen
    base pulls a moving object back to those places and morphs it on the way. A LoRA trained on these frames (objects
    anywhere along a path, at clip sizes, under clip captions) lets the base draw what the motion module asks
    for, as AnimateDiff v3's domain adapter absorbs the gap between its base's images and video frames."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        clip = sample_clip(rng, 16)
        f = rng.randrange(16)
        p = out / f"{i:05d}.png"
        shapes.to_pil(shapes.render_packed(clip.packed[f : f + 1], size)[0]).save(p)
        p.with_suffix(".txt").write_text(clip.caption + "\n", encoding="utf-8")
        paths.append(p)
    return paths


# ---------------------------------------------------------------------------------------------- training


@dataclass
class MotionTrainOptions:
    base: str = "models/builtin"
    out: str = "models/AnimateDiff/builtin-motion"
    work_dir: str | None = None
    init: str | None = None  # start from this exported module's weights (fresh optimiser and schedule)
    frames: int = 16
    clips: int = 2  # clips per step (batch = clips x frames)
    resolution: int | None = None  # None: the base model's native size
    steps: int = 100_000
    max_seconds: float | None = None
    lr: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    caption_dropout: float = 0.1
    # extra loss weight on the latent cells on and next to the object in each frame (as the base's own
    # trainers weigh them): the object covers a few cells of 256, and it is what has to move and keep its shape
    object_weight: float = 0.0
    seed: int = 0
    threads: int = 0
    autocast: str = "off"  # "bf16": bf16 autocast (faster on CPUs with AVX512-BF16/AMX, and on a GPU)
    device: str = "cpu"  # "cpu", "cuda", "cuda:N" or "auto" (CUDA when torch sees one)
    heads: int = 8
    mid_block: bool = True
    checkpoint_every: float = 300.0
    export_every: float = 0.0
    log_every: int = 20
    timesteps: str = "uniform"  # or "cubic": more high-noise steps, where the object goes is decided
    # train only at t >= min_timestep: for a module run with a timeline that ends before the low-noise steps
    # (motion_end_percent = 1 - min_timestep / T), whose capacity then goes where the motion is decided
    min_timestep: int = 0
    # > 0: each clip's frame noises blended towards its first frame's by this share (`ldm_core.rng.towards_first`,
    # the video job's `shared_noise`), the correlated noise prior of PYoCo (Ge et al. 2023), for a module run with
    # that shared_noise: frames that start alike leave the module only the motion to make
    shared_noise: float = 0.0
    lora_rank: int = 0  # > 0: an adapter LoRA on the base (its layers: lora_targets) trains with the module
    lora_out: str | None = None  # None: models/Lora/<out's name>-adapter.safetensors
    init_lora: str | None = None  # start the adapter LoRA from this file's weights
    # which base layers the adapter LoRA trains: "cross-kv" (ADAPTER_TARGETS) or "attention" (every attention
    # projection, the `lora` trainer's UNET_TARGETS: the layers that draw, so that objects can be drawn between
    # the base's nine places)
    lora_targets: str = "cross-kv"
    object_sizes: str = "clip"  # OBJECT_SIZES
    # a LoRA merged into the frozen base for the whole sitting (its weight 1), as the engine merges it when a
    # clip's prompt names it: the module's domain adapter (`motion-frames` + `lora`), which the module is
    # then made for and is run with
    base_lora: str | None = None
    # the temporal blocks' attentions that attend over every cell of every frame of a clip instead of along time
    # at one cell (`ldm_core.video.spatiotemporal`): () is AnimateDiff's module; ("attn2",) lets each block's
    # second attention see the object wherever it is in the other frames
    spatiotemporal: tuple[str, ...] = ()
    spatiotemporal_from_level: int = 0  # the first UNet level (0: the finest) where they do


#: the base UNet layers the adapter LoRA trains (cross-attention: where the prompt's words enter)
ADAPTER_TARGETS = ("attn2.to_k", "attn2.to_v")
LORA_TARGETS = ("cross-kv", "attention")


def adapter_targets(name: str) -> tuple[str, ...]:
    from ldm_core.train.lora import UNET_TARGETS

    if name not in LORA_TARGETS:
        raise ValueError(f"lora_targets: {name!r} is not one of {', '.join(LORA_TARGETS)}")
    return ADAPTER_TARGETS if name == "cross-kv" else UNET_TARGETS


def adapter_lora_path(o: MotionTrainOptions) -> Path:
    return Path(o.lora_out) if o.lora_out else Path("models/Lora") / f"{Path(o.out).name}-adapter.safetensors"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def new_adapter(
    unet, heads: int = 8, mid_block: bool = True, max_frames: int = 32, spatiotemporal=(), from_level: int = 0
):
    """A motion module shaped for `unet`, its output projections zeroed (starts as the identity); `spatiotemporal`
    names the attentions that attend over all cells and frames at the levels from `from_level` on (written to its
    config.json)."""
    from diffusers import MotionAdapter

    from ldm_core.video.motion_modules import _groups

    ch = tuple(unet.config.block_out_channels)
    adapter = MotionAdapter(
        block_out_channels=ch,
        motion_layers_per_block=unet.config.layers_per_block,
        motion_num_attention_heads=heads,
        motion_norm_num_groups=_groups(ch),
        motion_max_seq_length=max_frames,
        use_motion_mid_block=mid_block,
    )
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if ".proj_out." in name:
                p.zero_()
    if spatiotemporal:
        adapter.register_to_config(
            **{CONFIG_KEY: list(check_attentions(spatiotemporal)), LEVEL_KEY: check_level(from_level)}
        )
    return adapter


def merge_base_lora(model, path: str) -> None:
    """Merge the LoRA file at `path` (weight 1) into `model` through the engine's own path
    (`NetworkLibrary.merge`, what `<lora:NAME:1>` in a prompt does), so that training sees the weights a clip
    naming it runs with."""
    from ldm_core.prompts.networks import NetworkLibrary
    from ldm_core.prompts.parser import ExtraNetworkCall

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"base_lora: no LoRA file at {p}")
    NetworkLibrary([p.parent]).merge(model, [ExtraNetworkCall("lora", p.stem, ("1",))])


def _init_from(adapter, path: str, log) -> None:
    """Load into `adapter` the weights of the exported module at `path` (a folder or file), which must have the
    same config: made for the same base. A run continued in a later sitting, when its checkpoint is gone."""
    from ldm_core.video.motion_modules import MotionModuleError, load_motion_module

    module = load_motion_module(path)

    def same(a, b) -> bool:  # a config read from JSON has lists where a built one has tuples
        return list(a) == list(b) if isinstance(a, list | tuple) and isinstance(b, list | tuple) else a == b

    # the attention mode may change between sittings: the weights are the same shapes either way
    diff = sorted(
        k
        for k in adapter.config
        if not k.startswith("_")
        and k not in (CONFIG_KEY, LEVEL_KEY)
        and not same(module.adapter.config.get(k), adapter.config[k])
    )
    if diff:
        raise MotionModuleError(f"--init {path}: made for another base or shape (differs in {', '.join(diff)})")
    adapter.load_state_dict(module.adapter.state_dict())
    log(f"starting from the weights of {path}")


def clip_timesteps(
    clips: int, frames: int, n_train: int, mode: str, gen: torch.Generator, min_t: int = 0
) -> torch.Tensor:
    """One training timestep per clip in [min_t, n_train), repeated for its frames (clip after clip, as the UNet
    batch), drawn uniformly or "cubic" (`ldm_core.train.controlnet.sample_timesteps`) over that range."""
    from ldm_core.train.controlnet import sample_timesteps

    span = n_train - min_t
    return (min_t + sample_timesteps(clips, span, mode, gen)).repeat_interleave(frames)


def clip_noise(noise: torch.Tensor, frames: int, share: float) -> torch.Tensor:
    """A training batch's noise (clips x frames, C, H, W) with each clip's frames blended towards that clip's
    first frame's noise by `share` (`ldm_core.rng.towards_first`: what the video job's `shared_noise` does)."""
    from ldm_core.rng import towards_first

    return torch.cat([towards_first(n, share) for n in noise.split(frames)]) if share > 0 else noise


def train_motion(o: MotionTrainOptions, log=_log) -> dict:
    from diffusers import DDPMScheduler

    from ldm_core.models import load_model
    from ldm_core.train.builtin import (
        _autocast,
        _optimizer,
        _resolve_device,
        _save_atomic,
        command_line,
        diffusion_target,
        export_fp16_folder,
        object_loss_weight,
        warmup_cosine,
    )
    from ldm_core.train.controlnet import TextEncoder, check_timestep_sampling
    from ldm_core.video.motion_modules import MotionModule, MotionPatch

    check_timestep_sampling(o.timesteps)
    targets = adapter_targets(o.lora_targets)
    _radius(random.Random(0), o.object_sizes)  # a bad name fails before the model loads
    if not 0 <= o.shared_noise <= 1:
        raise ValueError(f"shared_noise: {o.shared_noise} is outside 0..1")
    check_level(o.spatiotemporal_from_level)  # a bad level fails before the model loads
    dev = _resolve_device(o.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if o.threads:
        torch.set_num_threads(o.threads)
    torch.manual_seed(o.seed)
    model = load_model(o.base, dtype=torch.float32)
    for m in (model.unet, model.vae, model.text_encoder):
        m.eval().requires_grad_(False)
    if o.base_lora:
        merge_base_lora(model, o.base_lora)
        log(f"base with the LoRA {o.base_lora} merged (weight 1)")
    for m in (model.unet, model.vae, model.text_encoder):
        m.to(dev)
    res = o.resolution or model.native_size
    adapter = new_adapter(model.unet, o.heads, o.mid_block, 32, o.spatiotemporal, o.spatiotemporal_from_level)
    work = Path(o.work_dir) if o.work_dir else None
    ckpt_path = work / "motion-train.pt" if work else None
    if work:
        work.mkdir(parents=True, exist_ok=True)
    ckpt = read_checkpoint(ckpt_path)
    if ckpt is not None:
        adapter.load_state_dict(ckpt["adapter"])
    elif o.init:
        _init_from(adapter, o.init, log)
    adapter.to(dev).train()
    params = [p for p in adapter.parameters()]
    lora_pairs, lora_hooks = {}, []
    if o.lora_rank > 0:
        from ldm_core.train.lora import attach_pairs, load_pair_tensors

        lora_pairs, lora_hooks = attach_pairs(model.unet, "lora_unet_", targets, o.lora_rank, o.lora_rank)
        if ckpt is not None and "lora" in ckpt:
            for key, pair in lora_pairs.items():
                pair.load_state_dict(ckpt["lora"][key])
        elif o.init_lora:
            from safetensors.torch import load_file

            load_pair_tensors(lora_pairs, load_file(o.init_lora))
            log(f"adapter LoRA from {o.init_lora}")
        params += [p for pair in lora_pairs.values() for p in pair.parameters()]
    optim = _optimizer(params, o.lr, 0.0, dev)
    module = MotionModule(
        "training", Path(o.out), adapter, "diffusers", None, tuple(o.spatiotemporal), o.spatiotemporal_from_level
    )
    patch = MotionPatch(model.unet, module).install()
    patch.set_frames(o.frames)
    text = TextEncoder(model)
    sched = DDPMScheduler.from_config(dict(model.scheduler_config))
    prediction, n_train = sched.config.prediction_type, sched.config.num_train_timesteps
    if not 0 <= o.min_timestep < n_train:
        raise ValueError(f"min_timestep: {o.min_timestep} is outside 0..{n_train - 1} (the base's timesteps)")
    ab = sched.alphas_cumprod.float().to(dev)
    vae = model.vae
    scaling = vae.config.scaling_factor
    n_params = sum(p.numel() for p in adapter.parameters())
    if lora_pairs:
        log(f"adapter LoRA: {len(lora_pairs)} layers, rank {o.lora_rank}, -> {adapter_lora_path(o)}")
    log(
        f"motion module: {n_params / 1e6:.2f}M parameters for a UNet with channels "
        f"{tuple(model.unet.config.block_out_channels)}; {o.clips} clips x {o.frames} frames per step at {res}px, "
        f"device {dev}"
    )
    with torch.no_grad():
        empty = text([""], dev)[0]
    loop = StepLoop.resume(
        ckpt,
        optim,
        params,
        log=log,
        log_every=o.log_every,
        checkpoint=lambda: checkpoint(),
        checkpoint_every=o.checkpoint_every,
    )
    last_export = time.monotonic()

    def record() -> dict:
        return {
            "recipe": "ldm_core.train.motion (shapes-world clips, base frozen)",
            "command": command_line(),
            "options": {k: str(v) for k, v in asdict(o).items()},
            "steps": loop.step,
            "clips_seen": loop.step * o.clips,
            "final_loss": loop.ema,
            "seconds": round(loop.seconds(), 1),
            "parameters": n_params,
            **(
                {"adapter_lora": str(adapter_lora_path(o)), "adapter_lora_rank": o.lora_rank, "lora_targets": targets}
                if lora_pairs
                else {}
            ),
            **({"base_lora": o.base_lora} if o.base_lora else {}),
            **(
                {"spatiotemporal_attention": list(o.spatiotemporal), "from_level": o.spatiotemporal_from_level}
                if o.spatiotemporal
                else {}
            ),
        }

    def checkpoint() -> None:
        if ckpt_path is not None:
            lora = {"lora": {k: pair.state_dict() for k, pair in lora_pairs.items()}} if lora_pairs else {}
            _save_atomic({"adapter": adapter.state_dict(), **lora, **loop.state()}, ckpt_path)

    def export() -> Path:
        out = export_fp16_folder(adapter, Path(o.out), record())
        if lora_pairs:
            from ldm_core.train.lora import network_metadata, pair_tensors, write_lora_file

            comment = f"adapter LoRA of the motion module {Path(o.out).name} (ldm_core.train.motion)"
            meta = network_metadata(o.lora_rank, o.lora_rank, adapter_lora_path(o).stem, comment)
            write_lora_file(pair_tensors(lora_pairs, float(o.lora_rank), torch.float16), meta, adapter_lora_path(o))
        return out

    while loop.step < o.steps:
        step = loop.step
        if o.max_seconds is not None and loop.seconds() > o.max_seconds:
            log(f"time budget reached after {step} steps")
            break
        rng = random.Random(f"motion:{o.seed}:{step}")
        gen = torch.Generator().manual_seed(rng.getrandbits(62))
        clips = [sample_clip(rng, o.frames, sizes=o.object_sizes) for _ in range(o.clips)]
        packed = torch.cat([c.packed for c in clips]).to(dev)
        images, cover = shapes.render_packed(packed, res, with_coverage=True)
        with torch.no_grad():
            # the latent's sample drawn from the CPU generator on any device (one seed, one run)
            post = vae.encode(images * 2 - 1).latent_dist
            z = (post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(dev)) * scaling
            cond = text([c.caption for c in clips], dev)[0]
        drop = (torch.rand(len(clips), generator=gen) < o.caption_dropout).to(dev)
        cond = torch.where(drop.view(-1, 1, 1), empty.expand_as(cond), cond)
        cond = cond.repeat_interleave(o.frames, 0)
        noise = clip_noise(torch.randn(z.shape, generator=gen), o.frames, o.shared_noise).to(dev)
        t = clip_timesteps(len(clips), o.frames, n_train, o.timesteps, gen, o.min_timestep).to(dev)
        x_t, target = diffusion_target(z, noise, ab[t], prediction)
        progress = loop.progress(o.steps, o.max_seconds)
        loop.set_lr(warmup_cosine(o.lr, step, progress, o.warmup_steps, o.min_lr_ratio))
        with _autocast(dev, o.autocast):
            pred = model.unet(x_t, t, cond).sample
        err = (pred.float() - target).pow(2)
        if o.object_weight > 0:
            err = err * object_loss_weight(cover, z.shape[-1], o.object_weight)
        loop.update(err.mean())
        now = time.monotonic()
        if o.export_every and now - last_export > o.export_every:
            export()
            last_export = now
    patch.remove()
    for h in lora_hooks:
        h.remove()
    checkpoint()
    rec = record()
    out = export()
    rec["bytes"] = (out / "diffusion_pytorch_model.safetensors").stat().st_size
    log(f"wrote {out} ({rec['bytes'] / 1e6:.1f} MB) after {loop.step} steps, loss {loop.ema}")
    return rec


# -------------------------------------------------------------------------------------------- evaluation


def measured_direction(centres: list[tuple[float, float] | None]) -> str | None:
    """The direction of travel from the first to the last frame where the object was found (the larger
    axis), or None when it moved less than 0.08 of the image or was not found twice."""
    found = [c for c in centres if c is not None]
    if len(found) < 2:
        return None
    dx, dy = found[-1][0] - found[0][0], found[-1][1] - found[0][1]
    if max(abs(dx), abs(dy)) < 0.08:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def eval_clips(n: int, frames: int, seed: str = "motion-eval", phrasing: str = "heldout") -> list[Clip]:
    """`n` held-out direction clips, directions in turn, prompts in the evaluation phrasings ("heldout", never
    trained on) or in the training ones ("train")."""
    rng = random.Random(seed)
    dirs = list(DIRECTIONS)
    templates = EVAL_TEMPLATES if phrasing == "heldout" else TRAIN_TEMPLATES
    return [sample_clip(rng, frames, dirs[i % 4], templates) for i in range(n)]


def score_clip(frames_imgs, clip: Clip) -> dict:
    """The analyser's reading of one generated clip against its prompt. The object is the first frame's
    largest one, tracked by colour (then shape) through the others: `direction_ok` when its measured travel is
    the prompt's direction; `consistent` when every frame has an object of its shape and colour;
    `matches_prompt` when that shape and colour are the prompt's (the base model's part of the job). Where
    consistency breaks: `lost_frames` (no object found), `shape_changes` and `colour_changes` (frames whose
    tracked object has another shape / colour than the first frame's)."""
    from ldm_core.train.analyser import analyse

    readings = [analyse(im) for im in frames_imgs]
    first = readings[0].objects[0] if readings[0].objects else None
    centres, lost, shape_changes, colour_changes = [], 0, 0, 0
    for a in readings:
        o = None
        if first is not None:
            o = (
                a.find(first.shape, first.colour)
                or a.find(colour=first.colour)
                or (a.objects[0] if a.objects else None)
            )
        centres.append((o.cx, o.cy) if o is not None else None)
        lost += o is None
        shape_changes += o is not None and o.shape != first.shape
        colour_changes += o is not None and o.colour != first.colour
    direction = measured_direction(centres)
    return {
        "want": clip.motion,
        "got": direction,
        "direction_ok": direction == clip.motion,
        "consistent": first is not None and lost == shape_changes == colour_changes == 0,
        "matches_prompt": first is not None and (first.shape, first.colour) == (clip.shape, clip.colour),
        "lost_frames": lost,
        "shape_changes": shape_changes,
        "colour_changes": colour_changes,
    }


def evaluate_motion(
    module: str | None,
    n: int = 100,
    frames: int = 16,
    steps: int = 20,
    base: str = "models/builtin",
    sheet: Path | None = None,
    log=_log,
    phrasing: str = "heldout",
    shared_noise: float = 0.0,
    freeinit_iters: int = 1,
    lora: str | None = None,
    lora_weight: float = 1.0,
    sampler: str | None = None,  # None: the base's recommendation, as the engine runs a request naming none
    timeline: tuple[float, float, float] = TIMELINE_DEFAULT,
    cfg_scale: float = 7.0,
    device: str = "auto",
) -> dict:
    """Generate `n` held-out clips through the engine (with `module`, or without one as the baseline: the
    frames are then independent images of one batch) on `device` (the engine's choice: "auto" is CUDA where
    torch sees it, in fp16 there) and score them (see `score_clip`)."""
    from ldm_core.engine import scratch_engine
    from ldm_core.generation_requests import GenerationRequest

    clips = eval_clips(n, frames, phrasing=phrasing)
    results = []
    sheets = []
    dirs = (Path(module).parent,) if module is not None else ()
    lora_dirs = (Path(lora).parent,) if lora else ()
    tag = f" <lora:{Path(lora).stem}:{lora_weight:g}>" if lora else ""  # the module's adapter LoRA, if any
    # no torch.compile: a report measures what the clips show, and compiling would cost a GPU sitting minutes
    with scratch_engine(base, motion_dirs=dirs, lora_dirs=lora_dirs, device=device, compile="off") as (engine, _m):
        for i, clip in enumerate(clips):
            values = dict(
                prompt=clip.caption + tag, steps=steps, seed=1000 + i, save_images=False, cfg_scale=cfg_scale,
                sampler_name=sampler,
            )
            if module is not None:
                values["animatediff"] = {
                    "model": Path(module).name,
                    "video_length": frames,
                    "batch_size": frames,
                    "format": [],
                    "closed_loop": "N",
                    "shared_noise": shared_noise,
                    "freeinit_enable": freeinit_iters > 1,
                    "freeinit_iters": max(1, freeinit_iters),
                    **timeline_options(timeline),
                }
            else:
                values["batch_size"] = frames
            req = GenerationRequest.build(**values)
            res = engine.generate(req)
            s = score_clip(res.images, clip)
            results.append(s)
            if sheet is not None and i < 8:
                sheets.append(res.images)
            if (i + 1) % 20 == 0:
                ok = sum(r["direction_ok"] for r in results) / len(results)
                log(f"{i + 1}/{n} clips: direction {ok:.2f}")
        used = " ".join(engine.sampling(req)) if n else sampler  # what ran
        ran_on = str(engine.policy.device)
    rep = {
        "module": module,
        "device": ran_on,
        "n": n,
        "phrasing": phrasing,
        "shared_noise": shared_noise,
        "freeinit_iters": freeinit_iters,
        "lora": f"{lora}:{lora_weight:g}" if lora else None,
        "sampler": used,
        "motion_start_end_effect": list(timeline),
        "frames": frames,
        "steps": steps,
        "cfg_scale": cfg_scale,
        "direction": sum(r["direction_ok"] for r in results) / n,
        "moved": sum(r["got"] is not None for r in results) / n,  # travelled at least 0.08 of the image
        "consistent_shape_colour": sum(r["consistent"] for r in results) / n,
        # where consistency breaks: clips with a frame whose object is lost, or changes shape, or colour
        "clips_losing_the_object": sum(r["lost_frames"] > 0 for r in results) / n,
        "clips_changing_shape": sum(r["shape_changes"] > 0 for r in results) / n,
        "clips_changing_colour": sum(r["colour_changes"] > 0 for r in results) / n,
        "first_frame_matches_prompt": sum(r["matches_prompt"] for r in results) / n,
        "by_direction": {
            d: sum(r["direction_ok"] for r in results if r["want"] == d) / max(1, sum(r["want"] == d for r in results))
            for d in DIRECTIONS
        },
        "clips": results,
    }
    if sheet is not None and sheets:
        from PIL import Image

        w, h = sheets[0][0].size
        grid = Image.new("RGB", (w * frames, h * len(sheets)))
        for r, row in enumerate(sheets):
            for c, im in enumerate(row):
                grid.paste(im, (c * w, r * h))
        sheet.parent.mkdir(parents=True, exist_ok=True)
        grid.save(sheet)
    return rep


# ------------------------------------------------------------------------------------------ command line


def add_arguments(p) -> None:
    from ldm_core.train.controlnet import TIMESTEP_SAMPLING

    d = MotionTrainOptions()
    p.add_argument("--base", default=d.base, help="the base model folder (default: %(default)s)")
    p.add_argument("--out", default=d.out, help="diffusers folder to write (default: %(default)s)")
    p.add_argument("--work-dir", default=None, help="checkpoints; resumed when present")
    p.add_argument(
        "--init", default=None, help="start from an exported module's weights (a new schedule; same base only)"
    )
    p.add_argument("--frames", type=int, default=d.frames)
    p.add_argument("--clips", type=int, default=d.clips, help="clips per step")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--max-seconds", type=float, default=None, help="wall-clock budget (the cosine follows it)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument(
        "--object-weight",
        type=float,
        default=d.object_weight,
        help="extra loss weight on the cells on and next to each frame's object (0: a plain mean; default: "
        "%(default)s)",
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        default=d.lora_rank,
        help="> 0: train an adapter LoRA on the base with the module (default: off); its layers: --lora-targets",
    )
    p.add_argument(
        "--lora-targets",
        choices=LORA_TARGETS,
        default=d.lora_targets,
        help="the adapter LoRA's layers: cross-kv (cross-attention keys and values, where the words enter) or "
        "attention (every attention projection, the layers that draw) (default: %(default)s)",
    )
    p.add_argument(
        "--object-sizes",
        choices=OBJECT_SIZES,
        default=d.object_sizes,
        help="clip: objects of radius 0.11-0.16; base: the base model's own small/medium/large (default: %(default)s)",
    )
    p.add_argument("--lora-out", default=None, help="the adapter LoRA file (default: models/Lora/<out>-adapter...)")
    p.add_argument("--init-lora", default=None, help="start the adapter LoRA from this file")
    p.add_argument(
        "--base-lora",
        default=None,
        help="a LoRA file merged into the frozen base (weight 1) for the whole sitting: the module's domain adapter, "
        "which its clips then run with (the module's sidecar {\"adapter_lora\": NAME}, or <lora:NAME:1> in the prompt)",
    )
    p.add_argument(
        "--spatiotemporal",
        nargs="*",
        choices=ATTENTIONS,
        default=list(d.spatiotemporal),
        help="the temporal blocks' attentions that attend over every cell of every frame (e.g. attn2), so that a frame "
        "sees the object where it is in the others; default: none (AnimateDiff's attention along time at one cell)",
    )
    p.add_argument(
        "--spatiotemporal-from-level",
        type=int,
        default=d.spatiotemporal_from_level,
        help="the first UNet level (0: the finest) whose blocks attend that way (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--autocast", choices=("off", "bf16"), default=d.autocast)
    p.add_argument(
        "--device",
        default=d.device,
        help="cpu (default), cuda, cuda:N or auto (CUDA when torch sees one); on a GPU give --clips 32 or more",
    )
    p.add_argument("--no-mid-block", action="store_true", help="no temporal layer in the UNet's mid block")
    p.add_argument("--export-every", type=float, default=d.export_every, help="seconds between exports")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument(
        "--timesteps",
        choices=TIMESTEP_SAMPLING,
        default=d.timesteps,
        help="training noise levels: uniform, or cubic (t = (1 - u^3) T: three quarters above 0.58 T, where the "
        "layout of every frame, and so the motion, is decided)",
    )
    p.add_argument(
        "--min-timestep",
        type=int,
        default=d.min_timestep,
        help="train at t >= this only, for a module run with motion_end_percent 1 - this / T (default: 0)",
    )
    p.add_argument(
        "--shared-noise",
        type=float,
        default=d.shared_noise,
        help="0-1: blend each clip's frame noises towards its first frame's by this share (PYoCo's correlated "
        "noise), for a module run with that shared_noise (default: %(default)s: independent)",
    )


def run(a) -> int:
    o = MotionTrainOptions(
        base=a.base,
        out=a.out,
        work_dir=a.work_dir,
        init=a.init,
        frames=a.frames,
        clips=a.clips,
        steps=a.steps,
        max_seconds=a.max_seconds,
        lr=a.lr,
        object_weight=a.object_weight,
        seed=a.seed,
        threads=a.threads,
        autocast=a.autocast,
        device=a.device,
        mid_block=not a.no_mid_block,
        export_every=a.export_every,
        log_every=a.log_every,
        timesteps=a.timesteps,
        min_timestep=a.min_timestep,
        shared_noise=a.shared_noise,
        lora_rank=a.lora_rank,
        lora_out=a.lora_out,
        init_lora=a.init_lora,
        lora_targets=a.lora_targets,
        object_sizes=a.object_sizes,
        base_lora=a.base_lora,
        spatiotemporal=tuple(a.spatiotemporal),
        spatiotemporal_from_level=a.spatiotemporal_from_level,
    )
    rec = train_motion(o)
    print(json.dumps({k: v for k, v in rec.items() if k != "options"}, indent=2))
    return 0


def add_eval_arguments(p) -> None:
    p.add_argument("--module", default=None, help="a motion module folder or file; none: the baseline")
    p.add_argument("--base", default="models/builtin")
    p.add_argument("--n", type=int, default=100, help="clips (directions in turn)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg-scale", type=float, default=7.0, help="the clips' CFG scale (default: %(default)s)")
    p.add_argument(
        "--shared-noise", type=float, default=0.0, help="the clips' shared_noise option (default: %(default)s)"
    )
    p.add_argument(
        "--freeinit-iters", type=int, default=1, help="the clips' FreeInit samplings (1: off; default: %(default)s)"
    )
    p.add_argument("--lora", default=None, help="the module's adapter LoRA file, added to every prompt")
    p.add_argument("--lora-weight", type=float, default=1.0)
    p.add_argument(
        "--sampler",
        default=None,
        help="the clips' sampler; default: the base's recommendation (its sidecar's sampler and schedule type), "
        "else Euler a (every recorded report until 2026-12-07 ran Euler a)",
    )
    add_timeline_argument(p, "--timeline")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: CUDA where torch sees it)")
    p.add_argument("--sheet", type=Path, default=None, help="a PNG of the first 8 clips' frames")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.add_argument(
        "--phrasing",
        choices=("heldout", "train"),
        default="heldout",
        help="prompts in phrasings never trained on (default) or in the training ones",
    )


def add_frames_arguments(p) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder to write (PNG + .txt caption pairs)")
    p.add_argument("--n", type=int, default=8000, help="frames, one per clip (default: %(default)s)")
    p.add_argument("--seed", default="motion-frames")


def run_frames(a) -> int:
    paths = write_frame_dataset(a.out, a.n, a.seed)
    print(f"wrote {len(paths)} frames to {a.out}")
    return 0


def run_eval(a) -> int:
    if a.threads:
        torch.set_num_threads(a.threads)
    rep = evaluate_motion(
        a.module,
        a.n,
        a.frames,
        a.steps,
        a.base,
        a.sheet,
        phrasing=a.phrasing,
        shared_noise=a.shared_noise,
        freeinit_iters=a.freeinit_iters,
        lora=a.lora,
        lora_weight=a.lora_weight,
        sampler=a.sampler,
        timeline=tuple(a.motion_timeline),
        cfg_scale=a.cfg_scale,
        device=a.device,
    )
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rep, indent=2))
    summary = {k: v for k, v in rep.items() if k != "clips"}
    print(json.dumps(summary, indent=2))
    return 0
