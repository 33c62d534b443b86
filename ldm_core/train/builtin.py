"""Training recipe of the built-in model: a miniature Stable Diffusion (AutoencoderKL, CLIP text encoder,
UNet2DConditionModel with cross-attention) trained from scratch on the shapes world, saved as a standard
diffusers folder.

Phases: (1) the VAE on rendered images (L1 + MSE + a tiny KL; posterior started narrow), then its latent
scaling factor is measured (1 / std of the latents); (2) with the encoder frozen, the text encoder and
the UNet together (v-prediction, caption dropout for classifier-free guidance, EMA of both, extra loss
weight on the latent cells the objects cover), while the decoder alone keeps fine-tuning every few steps
(the latent space does not move). Data are rendered on the fly on the training device; batch k of a run
is a function of (seed, phase, k) only, so a resumed run sees the same data as an uninterrupted one.

Time budget: with `max_seconds` each phase's learning-rate schedule (warmup, then cosine) runs on
progress = max(steps done / steps planned, time used / time budgeted), so a run stopped by the clock
still ends annealed. A checkpoint lands in the work dir every `checkpoint_every` seconds and at the end
of each sitting; the diffusers folder is written at the end of the VAE phase, every `export_every`
seconds of the UNet phase and at the end.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm_core.train import shapes

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "models" / "tokenizers" / "clip"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "models" / "builtin"
CHECKPOINT_NAME = "checkpoint.pt"
MAX_TOKENS = 77


# ------------------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class ModelSpec:
    """Architecture and noise schedule of the built-in model (all sizes in channels/pixels)."""

    resolution: int = 64
    vae_channels: tuple[int, ...] = (32, 64, 96, 96)  # 4 blocks -> downsampling factor 8
    vae_layers: int = 1
    vae_groups: int = 8  # 4-12 channels per group (SD: 4-16): flat colours survive the group norms
    latent_channels: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_ffn: int = 512
    unet_channels: tuple[int, ...] = (64, 128, 192)
    unet_layers: int = 1
    unet_head_dim: int = 32
    unet_groups: int = 8  # 8-24 channels per group (SD: 10-40)
    # which UNet levels have cross-attention (None: all but the lowest-resolution one, SD's layout); at a
    # 16x16 latent, attention at the two coarser levels keeps the full-resolution level cheap convolutions
    unet_attention: tuple[bool, ...] | None = None
    # SD's scaled_linear family with a larger beta_end: SD's 0.012 leaves sqrt(alpha_bar) = 0.068 of the
    # image at t = T (x8 for a colour spread over all 64 latent cells of an 8x8 latent); 0.02 leaves 0.015,
    # keeps SD-like noise levels mid-way (SNR 1.06 at t = 300, SD 1.44: img2img at 0.3 keeps the layout)
    # and a moderate sigma_max (66) for Karras-type schedules.
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.02
    prediction_type: str = "v_prediction"
    timestep_spacing: str = "trailing"
    num_train_timesteps: int = 1000


PRESETS: dict[str, ModelSpec] = {
    "builtin": ModelSpec(),
    # built-in model v2 candidates (issue 15): a 16x16 latent either way; which autoencoder is chosen by a
    # measured ablation (same CPU time for both VAEs, PSNR and analyser accuracy on reconstructions)
    # the UNet keeps 16x16 to cheap convolutions and attends at 8x8 and 4x4: 48.4 ms per CFG pair eager at
    # 1 thread (45.6 with attention at 16x16 and 8x8 instead), 1.71 s per bf16 training step of 64 (2.43)
    "v2-f4": ModelSpec(
        resolution=64,
        vae_channels=(32, 64, 96),
        unet_channels=(48, 96, 192),
        unet_attention=(False, True, True),
    ),
    "v2-f8": ModelSpec(resolution=128, vae_channels=(32, 64, 96, 96)),
    # a toy size for tests and smoke runs: seconds per step on a CPU
    "tiny": ModelSpec(
        vae_channels=(8, 16, 16, 16),
        vae_groups=8,
        text_hidden=32,
        text_layers=1,
        text_heads=2,
        text_ffn=64,
        unet_channels=(32, 32, 64),
        unet_head_dim=16,
        unet_groups=8,
    ),
}


def build_vae(spec: ModelSpec):
    """A fresh `AutoencoderKL` (3 -> latent_channels, factor 2**(len(vae_channels)-1))."""
    from diffusers import AutoencoderKL

    n = len(spec.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(spec.vae_channels),
        layers_per_block=spec.vae_layers,
        latent_channels=spec.latent_channels,
        norm_num_groups=spec.vae_groups,
        sample_size=spec.resolution,
        scaling_factor=1.0,
    )


@torch.no_grad()
def init_vae_for_training(vae, logvar_bias: float = -8.0):
    """Start the posterior narrow (std ~0.02 instead of ~1): with a tiny KL weight the posterior ends up
    narrow anyway, and starting there lets the decoder see usable latents from the first step."""
    c = vae.config.latent_channels
    vae.quant_conv.bias[c:] += logvar_bias
    return vae


def build_text_encoder(spec: ModelSpec):
    """A fresh small `CLIPTextModel` over the full CLIP BPE vocabulary (49,408 tokens, 77 positions)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_ffn,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="quick_gelu",
        projection_dim=spec.text_hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(cfg)


def build_unet(spec: ModelSpec):
    """A fresh `UNet2DConditionModel`: cross-attention at the levels `spec.unet_attention` names (default all but
    the lowest-resolution one) and in the middle block."""
    from diffusers import UNet2DConditionModel

    n = len(spec.unet_channels)
    attn = spec.unet_attention if spec.unet_attention is not None else (True,) * (n - 1) + (False,)
    if len(attn) != n:
        raise ValueError(f"unet_attention has {len(attn)} entries for {n} UNet levels")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    factor = 2 ** (len(spec.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=spec.resolution // factor,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        block_out_channels=tuple(spec.unet_channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=spec.unet_layers,
        cross_attention_dim=spec.text_hidden,
        attention_head_dim=[max(1, c // spec.unet_head_dim) for c in spec.unet_channels],
        norm_num_groups=spec.unet_groups,
    )


def scheduler_config(spec: ModelSpec) -> dict:
    """Keyword arguments of the shipped scheduler (Euler a, the default sampler); any diffusers
    scheduler's `from_config` reads the same keys."""
    return {
        "num_train_timesteps": spec.num_train_timesteps,
        "beta_schedule": spec.beta_schedule,
        "beta_start": spec.beta_start,
        "beta_end": spec.beta_end,
        "prediction_type": spec.prediction_type,
        "timestep_spacing": spec.timestep_spacing,
        "steps_offset": 1,
    }


def build_scheduler(spec: ModelSpec):
    from diffusers import EulerAncestralDiscreteScheduler

    return EulerAncestralDiscreteScheduler(**scheduler_config(spec))


def load_tokenizer(path: str | Path = TOKENIZER_DIR):
    """The shipped CLIP tokenizer (no download)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------- tokenizing
_PIECE = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")
_SIMPLE = re.compile(r"^[a-z0-9 ,.:;\-]*$")


class CaptionTokenizer:
    """CLIP token ids padded to 77, exactly as the pipeline tokenizes prompts, with a per-word cache so
    the shapes captions (a closed vocabulary) cost microseconds. Anything unusual goes through the real
    tokenizer."""

    def __init__(self, tokenizer=None):
        self.tok = tokenizer if tokenizer is not None else load_tokenizer()
        self.bos, self.eos = self.tok.bos_token_id, self.tok.eos_token_id
        self._cache: dict[str, list[int]] = {}

    def _slow(self, text: str) -> list[int]:
        return self.tok(text, padding="max_length", max_length=MAX_TOKENS, truncation=True).input_ids

    def ids(self, text: str) -> list[int]:
        """Token ids of one caption, length 77."""
        text = " ".join(text.split())
        if text != text.lower() or not _SIMPLE.match(text):
            return self._slow(text)
        out = [self.bos]
        for piece in _PIECE.findall(text):
            got = self._cache.get(piece)
            if got is None:
                got = self.tok(piece, add_special_tokens=False).input_ids
                self._cache[piece] = got
            out.extend(got)
        out = out[: MAX_TOKENS - 1] + [self.eos]
        return out + [self.eos] * (MAX_TOKENS - len(out))

    def __call__(self, captions: list[str]) -> torch.Tensor:
        """int64 (N, 77) token ids."""
        return torch.tensor([self.ids(c) for c in captions], dtype=torch.long)

    def __getstate__(self):  # picklable for spawn-started workers
        return {"tok": self.tok, "bos": self.bos, "eos": self.eos, "_cache": dict(self._cache)}


# ------------------------------------------------------------------------------------- data
class ShapesBatches(torch.utils.data.IterableDataset):
    """Infinite stream of training batches: (packed scenes float32 (B, shapes.PACKED_WIDTH), token ids
    int64 (B, 77), captions). Batch k depends only on (seed, phase, k); with several DataLoader workers
    each takes every W-th step, and the loader's round-robin keeps them in order."""

    def __init__(self, seed: int, phase: str, batch: int, start_step: int, tokenizer: CaptionTokenizer | None):
        super().__init__()
        self.seed, self.phase, self.batch, self.start = seed, phase, batch, start_step
        self.tokenizer = tokenizer

    def make(self, step: int):
        scenes = shapes.sample_scenes(f"train:{self.seed}:{self.phase}:{step}", self.batch)
        captions = [s.caption for s in scenes]
        ids = self.tokenizer(captions) if self.tokenizer is not None else torch.zeros(0, dtype=torch.long)
        return shapes.pack_scenes(scenes), ids, captions

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start + wid
        while True:
            yield self.make(step)
            step += nw


class FolderImages:
    """A folder of images with same-name .txt captions, loaded once, resized (shorter side) and
    centre-cropped to `resolution`: `images` float32 (N, 3, R, R) in [0, 1], `captions` list[str]."""

    EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

    def __init__(self, folder: str | Path, resolution: int):
        from PIL import Image

        paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in self.EXTS)
        if not paths:
            raise FileNotFoundError(f"no images ({', '.join(self.EXTS)}) in {folder}")
        ims, caps = [], []
        for p in paths:
            im = Image.open(p).convert("RGB")
            s = resolution / min(im.size)
            im = im.resize(
                (max(resolution, round(im.width * s)), max(resolution, round(im.height * s))),
                Image.Resampling.LANCZOS,
            )
            left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
            ims.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3))
            txt = p.with_suffix(".txt")
            caps.append(txt.read_text(encoding="utf-8").strip() if txt.exists() else "")
        self.images = torch.stack(ims).permute(0, 3, 1, 2).float() / 255.0
        self.captions = caps

    def batch(self, seed: int, phase: str, step: int, size: int):
        """Random batch (with replacement) for a step: (images (B,3,R,R) in [0,1], captions)."""
        rng = random.Random(f"folder:{seed}:{phase}:{step}")
        idx = [rng.randrange(len(self.captions)) for _ in range(size)]
        return self.images[idx], [self.captions[i] for i in idx]


# ------------------------------------------------------------------------------------- options
@dataclass
class TrainOptions:
    """Everything a training run needs; the CLI builds one. Seconds are wall-clock."""

    out: Path = DEFAULT_OUT
    work_dir: Path = REPO_ROOT / "work" / "builtin"
    seed: int = 0
    device: str = "cpu"
    preset: str = "builtin"
    vae_steps: int = 20000  # upper bounds: with max_seconds the clock usually ends each phase
    unet_steps: int = 20000
    vae_batch: int = 256
    unet_batch: int = 512
    vae_lr: float = 2e-3
    unet_lr: float = 6e-4
    warmup_steps: int = 200
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    kl_weight: float = 1e-5
    grad_weight: float = 0.0  # image-gradient L1 (slowed PSNR gains in CPU trials, so off)
    decoder_lr: float = 4e-4  # decoder fine-tuning during the UNet phase (encoder frozen)
    decoder_every: int = 4  # UNet steps per decoder step; 0 turns decoder fine-tuning off
    decoder_batch: int = 128
    object_weight: float = 3.0  # extra UNet loss weight on latent cells covered by objects
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    max_seconds: float | None = None
    vae_seconds: float | None = None  # default: vae_share of max_seconds
    vae_share: float = 0.35
    reserve_seconds: float = 12.0  # kept free at the end of max_seconds for the final export
    sitting_steps: int | None = None  # at most this many optimizer steps in this invocation
    checkpoint_every: float = 90.0
    export_every: float = 120.0
    num_workers: int | None = None  # data workers; default 6 on CUDA, 0 on CPU
    data: Path | None = None  # folder of images + .txt captions instead of the shapes world
    init: Path | None = None  # start from this diffusers folder (VAE frozen, TE + UNet fine-tuned)
    progress_bar: bool = True
    log_every: float = 20.0
    latent_samples: int = 1024  # held-out renders used to measure the latent std (scaling factor)
    autocast: str = "auto"  # "auto" (bf16 on CUDA), "bf16" (also on CPU), "off"
    command: str = ""

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


# ------------------------------------------------------------------------------------- helpers
class PhaseClock:
    """Training progress in [0, 1] of one phase: max(steps done / steps planned, time part), where the
    time part spreads the progress still left at the start of this sitting over the seconds budgeted."""

    def __init__(self, total_steps: int, step0: int, progress0: float, seconds: float | None):
        self.total, self.step0, self.p0, self.seconds = max(1, total_steps), step0, progress0, seconds
        self.t0 = time.monotonic()

    def pause(self, seconds: float) -> None:
        """Leave `seconds` of wall time out of the time part (the process was stopped, not training)."""
        self.t0 += seconds

    def progress(self, step: int) -> float:
        p = max(self.p0, step / self.total)
        if self.seconds is not None:
            if self.seconds <= 0:
                return 1.0
            p = max(p, self.p0 + (time.monotonic() - self.t0) / self.seconds * (1.0 - self.p0))
        return min(1.0, p)


WARMUP_FRACTION = 0.03  # warmup also ends once this share of a phase's progress is reached


def warmup_cosine(
    base: float, step: int, progress: float, warmup: int, min_ratio: float, warmup_fraction: float | None = None
) -> float:
    """Linear warmup over `warmup` steps (or, given `warmup_fraction`, until that share of the progress is
    reached, whichever ends first) times a cosine from `base` to `base * min_ratio` over progress (0..1)."""
    w = (step + 1) / max(1, warmup)
    if warmup_fraction:
        w = max(w, progress / warmup_fraction)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return base * min(1.0, w) * (min_ratio + (1 - min_ratio) * cos)


def lr_at(base: float, step: int, progress: float, warmup: int, min_ratio: float) -> float:
    """The phases' learning rate: `warmup_cosine` whose warmup also ends at WARMUP_FRACTION of the progress."""
    return warmup_cosine(base, step, progress, warmup, min_ratio, WARMUP_FRACTION)


class EMA:
    """Exponential moving average of some parameters (fp32), decay warmed up as (1+k)/(10+k)."""

    def __init__(self, params: list[torch.Tensor], decay: float):
        self.params = params
        self.shadow = [p.detach().clone().float() for p in params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - d)

    def state_dict(self) -> list[torch.Tensor]:
        return [s.detach().cpu() for s in self.shadow]

    def load(self, tensors: list[torch.Tensor]) -> None:
        for s, t in zip(self.shadow, tensors, strict=True):
            s.copy_(t)

    @classmethod
    def resume(cls, params: list[torch.Tensor], decay: float, saved: list[torch.Tensor] | None) -> EMA | None:
        """The average of `params` (None when `decay` is 0), continued from `saved` (a `state_dict()`) when given,
        else starting at the parameters' current values."""
        if not decay:
            return None
        ema = cls(params, decay)
        if saved:
            ema.load(saved)
        return ema


def _named_shadow(module: torch.nn.Module, ema: EMA) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with the EMA values in place of the trained parameters."""
    sd = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    for (n, _), s in zip(module.named_parameters(), ema.shadow, strict=True):
        sd[n] = s.detach().cpu().clone()
    return sd


def diffusion_target(
    x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The noised latents x_t = sqrt(a) x0 + sqrt(1-a) noise and the UNet's regression target (v =
    sqrt(a) noise - sqrt(1-a) x0 for "v_prediction", the noise for "epsilon"); `alpha_bar` (B,) is the
    cumulative alpha product at each sample's timestep."""
    a = alpha_bar.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    if prediction_type == "v_prediction":
        return x_t, a.sqrt() * noise - (1 - a).sqrt() * x0
    if prediction_type == "epsilon":
        return x_t, noise
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def object_loss_weight(cover: torch.Tensor, latent_size: int, weight: float) -> torch.Tensor:
    """Per-latent-pixel loss weight (B, 1, l, l): 1 on background, up to 1 + `weight` on and next to the
    objects (their pixel coverage averaged over each latent cell, then dilated by one cell). Objects
    cover ~5-15 % of an image; without this the background dominates the loss."""
    c = F.adaptive_avg_pool2d(cover.float(), latent_size)
    c = F.max_pool2d(c, 3, stride=1, padding=1)
    return 1.0 + weight * c


def _grad_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dxa, dxb = a[..., :, 1:] - a[..., :, :-1], b[..., :, 1:] - b[..., :, :-1]
    dya, dyb = a[..., 1:, :] - a[..., :-1, :], b[..., 1:, :] - b[..., :-1, :]
    return (dxa - dxb).abs().mean() + (dya - dyb).abs().mean()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of two (N, 3, H, W) batches in [0, 1]."""
    mse = (a.float().clamp(0, 1) - b.float().clamp(0, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


def decoder_step(
    vae,
    params: list[torch.Tensor],
    opt: torch.optim.Optimizer,
    raw: torch.Tensor,
    ims: torch.Tensor,
    lr: float,
    amp=None,
    weight: torch.Tensor | None = None,
    grad_weight: float = 0.0,
) -> torch.Tensor:
    """One step of decoder-only fine-tuning: decode the (unscaled) latents `raw`, L1 + MSE against `ims`
    (in [0, 1]) — per pixel weighted by `weight` (N, 1, H, W) when given, normalised by its mean — plus
    `grad_weight` times the image-gradient L1; clip the decoder's gradient norm to 1, step `opt` at `lr`.
    Returns the loss (detached)."""
    for g in opt.param_groups:
        g["lr"] = lr
    with amp if amp is not None else contextlib.nullcontext():
        rec = vae.decode(raw).sample
    rec, tgt = rec.float(), ims * 2 - 1
    if weight is None:
        loss = (rec - tgt).abs().mean() + (rec - tgt).pow(2).mean()
    else:
        d = rec - tgt
        loss = (weight * (d.abs() + d.pow(2))).mean() / weight.mean()
    if grad_weight:
        loss = loss + grad_weight * _grad_l1(rec, tgt)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.detach()


def edge_weight(coverage: torch.Tensor, strength: float, width: int = 5) -> torch.Tensor:
    """Per-pixel loss weight 1 + `strength` near object edges: where the renders' object coverage
    (N, 1, H, W) is partial (antialiased boundary), widened by a `width` max-pool. Thin parts of a shape
    (a star's points) are few pixels, so an unweighted loss lets a decoder round them off."""
    rim = (coverage * (1 - coverage) * 4).float()
    return 1.0 + strength * F.max_pool2d(rim, width, stride=1, padding=width // 2)


def _autocast(dev: torch.device, mode: str = "auto"):
    """bf16 autocast: on CUDA with mode "auto", always with "bf16" (tests use it to run the CUDA code path
    on a CPU), never with "off"."""
    on = mode == "bf16" or (mode == "auto" and dev.type == "cuda")
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=on)


def export_fp16_folder(model, out: Path, record: dict) -> Path:
    """Write a diffusers model (a ControlNet, a motion module) as an fp16 folder (`save_pretrained`, safetensors)
    with TRAINING.json beside it, atomically (`write_folder_atomic`)."""
    import copy

    return write_folder_atomic(
        out,
        lambda tmp: copy.deepcopy(model).to("cpu", torch.float16).save_pretrained(str(tmp), safe_serialization=True),
        record,
    )


def write_folder_atomic(out: Path, write, record: dict) -> Path:
    """`write(tmp)` fills a temporary folder beside `out`, TRAINING.json (`record`) is added, then the folder
    takes `out`'s place: readers see the old folder or the new one, never half of one."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    write(tmp)
    (tmp / "TRAINING.json").write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    old = out.with_name(out.name + f".old{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)
    return out


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device")
    return dev


def _optimizer(params, lr: float, wd: float, dev: torch.device) -> torch.optim.AdamW:
    kw = {"fused": True} if dev.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=wd, **kw)


def _step_seed(seed: int, phase: str, step: int) -> int:
    return random.Random(f"noise:{seed}:{phase}:{step}").getrandbits(62)


@torch.no_grad()
def measure_latents(vae, images: torch.Tensor, dev: torch.device, batch: int = 256) -> dict:
    """Mean/std of the VAE posterior means over `images` (N, 3, H, W) in [0, 1]: overall std, per-channel
    mean and std, mean posterior std."""
    zs, stds = [], []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].to(dev) * 2 - 1
        with _autocast(dev):
            d = vae.encode(x).latent_dist
        zs.append(d.mean.float().cpu())
        stds.append(d.std.float().mean().cpu())
    z = torch.cat(zs)
    return {
        "std": float(z.std()),
        "mean": float(z.mean()),
        "channel_mean": [round(float(v), 4) for v in z.mean((0, 2, 3))],
        "channel_std": [round(float(v), 4) for v in z.std((0, 2, 3))],
        "posterior_std": float(torch.stack(stds).mean()),
    }


@torch.no_grad()
def vae_psnr(vae, images: torch.Tensor, dev: torch.device, batch: int = 256) -> float:
    """Mean per-image PSNR (dB) of VAE reconstructions (posterior mean) of `images` in [0, 1]."""
    vals = []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].to(dev)
        with _autocast(dev):
            rec = vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample
        vals.append(psnr(rec.float() * 0.5 + 0.5, x).cpu())
    return float(torch.cat(vals).mean())


def heldout_renders(n: int, resolution: int) -> torch.Tensor:
    """`n` renders from the held-out scene stream (never used for training): (n, 3, R, R) in [0, 1]."""
    return shapes.render(shapes.sample_scenes("heldout-vae", n), resolution)


# ------------------------------------------------------------------------------------- export
def export_folder(
    out: Path,
    spec: ModelSpec,
    vae_sd: dict,
    te_sd: dict,
    unet_sd: dict,
    scaling_factor: float,
    extra_files: dict[str, str] | None = None,
) -> None:
    """Write an fp16 diffusers folder (model_index.json, vae/, text_encoder/, tokenizer/, unet/,
    scheduler/) atomically: built next to `out`, then swapped in."""
    from diffusers import StableDiffusionPipeline

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    vae, te, unet = build_vae(spec), build_text_encoder(spec), build_unet(spec)
    vae.load_state_dict(vae_sd)
    te.load_state_dict(te_sd, strict=False)  # position_ids buffers differ between versions
    unet.load_state_dict(unet_sd)
    vae.register_to_config(scaling_factor=float(scaling_factor))
    pipe = StableDiffusionPipeline(
        vae=vae.half(),
        text_encoder=te.half(),
        tokenizer=load_tokenizer(),
        unet=unet.half(),
        scheduler=build_scheduler(spec),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    tok_dir = tmp / "tokenizer"
    shutil.rmtree(tok_dir, ignore_errors=True)
    tok_dir.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(TOKENIZER_DIR / name, tok_dir / name)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    old = out.with_name(out.name + f".old{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)


def load_folder_state(folder: Path) -> tuple[dict, dict, dict, float]:
    """fp32 state dicts (vae, text encoder, unet) and the VAE scaling factor of a diffusers folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True, dtype=torch.float32)
    te = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True, dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True, dtype=torch.float32)
    return vae.state_dict(), te.state_dict(), unet.state_dict(), float(vae.config.scaling_factor)


def spec_from_folder(folder: Path) -> ModelSpec:
    """The ModelSpec of a folder this trainer wrote (read from its TRAINING.json)."""
    info = json.loads((Path(folder) / "TRAINING.json").read_text(encoding="utf-8"))
    d = info["spec"]
    return ModelSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ------------------------------------------------------------------------------------- trainer
@dataclass
class _State:
    phase: str = "vae"  # "vae" -> "unet" -> "done"
    vae_step: int = 0
    vae_progress: float = 0.0
    unet_step: int = 0
    unet_progress: float = 0.0
    scaling_factor: float = 1.0
    latent_stats: dict = field(default_factory=dict)
    vae_seconds: float = 0.0
    unet_seconds: float = 0.0
    vae_loss: float | None = None
    vae_psnr_train: float | None = None
    vae_psnr_heldout: float | None = None
    unet_loss: float | None = None
    decoder_loss: float | None = None
    vae_psnr_final: float | None = None
    vae_ended_by: str = ""  # "steps" (all planned steps done) or "time budget" (annealed on the clock)
    unet_ended_by: str = ""
    sittings: list = field(default_factory=list)


class Trainer:
    """Runs `TrainOptions`; `run()` returns the TRAINING.json record."""

    def __init__(self, opts: TrainOptions):
        self.o = opts
        self.t_start = time.monotonic()
        self.dev = _resolve_device(opts.device)
        if self.dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(opts.seed)
        self.folder = FolderImages(opts.data, self._spec_for_data().resolution) if opts.data else None
        self.spec = self._spec_for_data()
        self.vae = init_vae_for_training(build_vae(self.spec)).to(self.dev)
        self.te = build_text_encoder(self.spec).to(self.dev)
        self.unet = build_unet(self.spec).to(self.dev)
        self.tokenizer = CaptionTokenizer()
        self.state = _State()
        self.vae_opt = _optimizer(self.vae.parameters(), opts.vae_lr, 0.0, self.dev)
        self.dec_params = list(self.vae.post_quant_conv.parameters()) + list(self.vae.decoder.parameters())
        self.dec_opt = _optimizer(self.dec_params, opts.decoder_lr, 0.0, self.dev)
        self.unet_params = [p for p in list(self.te.parameters()) + list(self.unet.parameters())]
        self.unet_opt = _optimizer(self.unet_params, opts.unet_lr, opts.weight_decay, self.dev)
        self.ema_te = EMA(list(self.te.parameters()), opts.ema_decay)
        self.ema_unet = EMA(list(self.unet.parameters()), opts.ema_decay)
        self.work = Path(opts.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.steps_this_sitting = 0
        self.stop_reason = ""
        self._last_ckpt = time.monotonic()
        self._last_export = time.monotonic()
        if opts.init is not None and not (self.work / CHECKPOINT_NAME).exists():
            self._load_init(Path(opts.init))
        self._maybe_resume()

    # -- setup
    def _spec_for_data(self) -> ModelSpec:
        if self.o.init is not None and (Path(self.o.init) / "TRAINING.json").exists():
            return spec_from_folder(Path(self.o.init))
        return PRESETS[self.o.preset]

    def _load_init(self, folder: Path) -> None:
        vae_sd, te_sd, unet_sd, sf = load_folder_state(folder)
        self.vae.load_state_dict(vae_sd)
        self.te.load_state_dict(te_sd, strict=False)
        self.unet.load_state_dict(unet_sd)
        self.ema_te = EMA(list(self.te.parameters()), self.o.ema_decay)
        self.ema_unet = EMA(list(self.unet.parameters()), self.o.ema_decay)
        self.state.phase, self.state.scaling_factor = "unet", sf
        self.log(f"initialised from {folder} (VAE frozen, scaling factor {sf:.4f})")

    def _maybe_resume(self) -> None:
        path = self.work / CHECKPOINT_NAME
        if not path.exists():
            return
        ck = torch.load(path, map_location="cpu", weights_only=True)
        if ck["spec"] != asdict(self.spec) and ck["spec"] != json.loads(json.dumps(asdict(self.spec))):
            raise RuntimeError(f"{path} holds a different model spec; use another --work-dir")
        self.vae.load_state_dict(ck["vae"])
        self.te.load_state_dict(ck["te"])
        self.unet.load_state_dict(ck["unet"])
        self.vae_opt.load_state_dict(ck["vae_opt"])
        self.dec_opt.load_state_dict(ck["dec_opt"])
        self.unet_opt.load_state_dict(ck["unet_opt"])
        self.ema_te.load(ck["ema_te"])
        self.ema_unet.load(ck["ema_unet"])
        st = dict(ck["state"])
        self.state = _State(**st)
        self.log(
            f"resumed from {path}: phase {self.state.phase}, vae step {self.state.vae_step}, "
            f"unet step {self.state.unet_step}"
        )

    def checkpoint(self) -> None:
        _save_atomic(
            {
                "spec": json.loads(json.dumps(asdict(self.spec))),
                "vae": self.vae.state_dict(),
                "te": self.te.state_dict(),
                "unet": self.unet.state_dict(),
                "vae_opt": self.vae_opt.state_dict(),
                "dec_opt": self.dec_opt.state_dict(),
                "unet_opt": self.unet_opt.state_dict(),
                "ema_te": self.ema_te.state_dict(),
                "ema_unet": self.ema_unet.state_dict(),
                "state": asdict(self.state),
            },
            self.work / CHECKPOINT_NAME,
        )
        self._last_ckpt = time.monotonic()

    # -- time
    def elapsed(self) -> float:
        return time.monotonic() - self.t_start

    def seconds_left(self) -> float | None:
        if self.o.max_seconds is None:
            return None
        return self.o.max_seconds - self.o.reserve_seconds - self.elapsed()

    def _sitting_done(self) -> bool:
        if self.o.sitting_steps is not None and self.steps_this_sitting >= self.o.sitting_steps:
            self.stop_reason = f"sitting_steps={self.o.sitting_steps} reached"
            return True
        left = self.seconds_left()
        if left is not None and left <= 0:
            self.stop_reason = f"max_seconds={self.o.max_seconds} reached"
            return True
        return False

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {msg}", file=sys.stderr, flush=True)

    def _bar(self, total: int, initial: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            initial=initial,
            desc=desc,
            disable=not self.o.progress_bar,
            mininterval=2.0,
            dynamic_ncols=True,
        )

    def _loader(self, phase: str, batch: int, start: int, with_tokens: bool):
        ds = ShapesBatches(self.o.seed, phase, batch, start, self.tokenizer if with_tokens else None)
        nw = self.o.num_workers if self.o.num_workers is not None else (6 if self.dev.type == "cuda" else 0)
        if nw > 0:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked
        if nw == 0:

            def gen():
                step = start
                while True:
                    yield ds.make(step)
                    step += 1

            return gen()
        return iter(
            torch.utils.data.DataLoader(
                ds,
                batch_size=None,
                num_workers=nw,
                prefetch_factor=4,
                pin_memory=self.dev.type == "cuda",
                persistent_workers=False,
            )
        )

    def _images(self, phase: str, step: int, batch: int, it):
        """A batch for `step`: images (B,3,R,R) in [0,1] on the device, captions, token ids or None, and the
        objects' coverage (B,1,R,R) or None (folder data)."""
        if self.folder is not None:
            ims, caps = self.folder.batch(self.o.seed, phase, step, batch)
            return ims.to(self.dev, non_blocking=True), caps, None, None
        packed, ids, caps = next(it)
        ims, cover = shapes.render_packed(
            packed.to(self.dev, non_blocking=True), self.spec.resolution, with_coverage=True
        )
        return ims, caps, (ids if ids.numel() else None), cover

    # -- phases
    def run_vae(self) -> None:
        o, st = self.o, self.state
        budget = o.vae_seconds
        if budget is None and o.max_seconds is not None:
            budget = o.vae_share * o.max_seconds - self.elapsed()
        clock = PhaseClock(o.vae_steps, st.vae_step, st.vae_progress, budget)
        self.vae.train()
        it = self._loader("vae", o.vae_batch, st.vae_step, with_tokens=False) if self.folder is None else None
        bar = self._bar(o.vae_steps, st.vae_step, "vae")
        gen = torch.Generator(device=self.dev)
        t_phase, last_log = time.monotonic(), time.monotonic()
        smooth = None
        while st.vae_progress < 1.0 and not self._sitting_done():
            step = st.vae_step
            x, _, _, _ = self._images("vae", step, o.vae_batch, it)
            x = x * 2 - 1
            gen.manual_seed(_step_seed(o.seed, "vae", step))
            lr = lr_at(o.vae_lr, step, st.vae_progress, o.warmup_steps, o.min_lr_ratio)
            for g in self.vae_opt.param_groups:
                g["lr"] = lr
            with _autocast(self.dev, o.autocast):
                post = self.vae.encode(x).latent_dist
                z = post.mean + post.std * torch.randn(
                    post.mean.shape, generator=gen, device=self.dev, dtype=post.mean.dtype
                )
                rec = self.vae.decode(z).sample
            rec = rec.float()
            l1 = (rec - x).abs().mean()
            mse = (rec - x).pow(2).mean()
            kl = post.kl().float().mean() / z[0].numel()
            loss = l1 + mse + o.grad_weight * _grad_l1(rec, x) + o.kl_weight * kl
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
            self.vae_opt.step()
            st.vae_step += 1
            self.steps_this_sitting += 1
            st.vae_progress = clock.progress(st.vae_step)
            if st.vae_step % 10 == 0 or st.vae_progress >= 1.0:
                lv = float(loss.detach())
                p = float(10 * torch.log10(4.0 / mse.detach().clamp(min=1e-10)))  # [-1,1] range -> peak 2
                smooth = lv if smooth is None else 0.9 * smooth + 0.1 * lv
                st.vae_loss, st.vae_psnr_train = smooth, p
                bar.set_postfix(loss=f"{smooth:.4f}", psnr=f"{p:.1f}", lr=f"{lr:.1e}", refresh=False)
            bar.update(1)
            now = time.monotonic()
            if now - last_log > o.log_every:
                last_log = now
                self.log(
                    f"vae step {st.vae_step} progress {st.vae_progress:.3f} loss {st.vae_loss} "
                    f"batch psnr {st.vae_psnr_train} lr {lr:.2e}"
                )
            if now - self._last_ckpt > o.checkpoint_every:
                st.vae_seconds += now - t_phase
                t_phase = now
                self.checkpoint()
        bar.close()
        st.vae_seconds += time.monotonic() - t_phase
        if st.vae_progress >= 1.0:
            st.vae_ended_by = "steps" if st.vae_step >= o.vae_steps else "time budget"
            self.finish_vae()

    def finish_vae(self) -> None:
        st = self.state
        self.vae.eval()
        n = self.o.latent_samples
        held = heldout_renders(n, self.spec.resolution) if self.folder is None else self.folder.images[:n]
        stats = measure_latents(self.vae, held, self.dev)
        st.scaling_factor = 1.0 / max(stats["std"], 1e-6)
        st.latent_stats = stats
        st.vae_psnr_heldout = vae_psnr(self.vae, held, self.dev)
        st.phase = "unet"
        self.log(
            f"vae done after {st.vae_step} steps; held-out PSNR {st.vae_psnr_heldout:.2f} dB; latent std "
            f"{stats['std']:.4f} -> scaling factor {st.scaling_factor:.4f}; posterior std "
            f"{stats['posterior_std']:.4f}"
        )
        self.checkpoint()
        self.export(final=False)

    def _encode_prompts(self, ids: torch.Tensor) -> torch.Tensor:
        return self.te(ids)[0]

    def run_unet(self) -> None:
        o, st = self.o, self.state
        budget = None
        if o.max_seconds is not None:
            budget = max(0.0, o.max_seconds - o.reserve_seconds - self.elapsed())
        clock = PhaseClock(o.unet_steps, st.unet_step, st.unet_progress, budget)
        self.vae.eval().requires_grad_(False)
        tune_decoder = o.decoder_every > 0
        for p in self.dec_params:
            p.requires_grad_(tune_decoder)
        self.te.train()
        self.unet.train()
        it = self._loader("unet", o.unet_batch, st.unet_step, with_tokens=True) if self.folder is None else None
        sched = build_scheduler(self.spec)
        ab = sched.alphas_cumprod.to(self.dev, torch.float32)
        empty = self.tokenizer([""]).to(self.dev)
        gen = torch.Generator(device=self.dev)
        bar = self._bar(o.unet_steps, st.unet_step, "unet")
        t_phase, last_log = time.monotonic(), time.monotonic()
        smooth = dsmooth = None
        sf = st.scaling_factor
        while st.unet_progress < 1.0 and not self._sitting_done():
            step = st.unet_step
            ims, caps, ids, cover = self._images("unet", step, o.unet_batch, it)
            if ids is None:
                ids = self.tokenizer(caps)
            ids = ids.to(self.dev, non_blocking=True)
            gen.manual_seed(_step_seed(o.seed, "unet", step))
            b = ims.shape[0]
            with torch.no_grad(), _autocast(self.dev, o.autocast):
                post = self.vae.encode(ims * 2 - 1).latent_dist
                raw = post.mean.float()
                raw = raw + post.std.float() * torch.randn(raw.shape, generator=gen, device=self.dev)
                lat = raw * sf
            noise = torch.randn(lat.shape, generator=gen, device=self.dev)
            t = torch.randint(0, self.spec.num_train_timesteps, (b,), generator=gen, device=self.dev)
            drop = torch.rand(b, generator=gen, device=self.dev) < o.caption_dropout
            ids = torch.where(drop.view(-1, 1), empty.expand(b, -1), ids)
            x_t, target = diffusion_target(lat, noise, ab[t], self.spec.prediction_type)
            lr = lr_at(o.unet_lr, step, st.unet_progress, o.warmup_steps, o.min_lr_ratio)
            for g in self.unet_opt.param_groups:
                g["lr"] = lr
            with _autocast(self.dev, o.autocast):
                cond = self._encode_prompts(ids)
                pred = self.unet(x_t, t, cond).sample
            err = (pred.float() - target).pow(2)
            if cover is not None and o.object_weight > 0:
                err = err * object_loss_weight(cover, lat.shape[-1], o.object_weight)
            loss = err.mean()
            self.unet_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.unet_params, 1.0)
            self.unet_opt.step()
            self.ema_te.update(step)
            self.ema_unet.update(step)
            if tune_decoder and step % o.decoder_every == 0:
                dl = self._decoder_step(raw, ims, step, st.unet_progress)
                if step % (10 * o.decoder_every) == 0:
                    dv = float(dl)
                    dsmooth = dv if dsmooth is None else 0.9 * dsmooth + 0.1 * dv
                    st.decoder_loss = dsmooth
            st.unet_step += 1
            self.steps_this_sitting += 1
            st.unet_progress = clock.progress(st.unet_step)
            if st.unet_step % 10 == 0 or st.unet_progress >= 1.0:
                lv = float(loss.detach())
                smooth = lv if smooth is None else 0.95 * smooth + 0.05 * lv
                st.unet_loss = smooth
                bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{lr:.1e}", refresh=False)
            bar.update(1)
            now = time.monotonic()
            if now - last_log > o.log_every:
                last_log = now
                self.log(
                    f"unet step {st.unet_step} progress {st.unet_progress:.3f} loss {st.unet_loss} "
                    f"lr {lr:.2e} decoder loss {st.decoder_loss}"
                )
            if now - self._last_ckpt > o.checkpoint_every:
                st.unet_seconds += now - t_phase
                t_phase = now
                self.checkpoint()
            if now - self._last_export > o.export_every:
                self.export(final=False)
        bar.close()
        st.unet_seconds += time.monotonic() - t_phase
        if st.unet_progress >= 1.0:
            st.unet_ended_by = "steps" if st.unet_step >= o.unet_steps else "time budget"
            st.phase = "done"

    def _decoder_step(self, raw: torch.Tensor, ims: torch.Tensor, step: int, progress: float) -> torch.Tensor:
        """One decoder fine-tuning step on (unscaled) latents of the current batch and their images; the
        encoder stays frozen, so the latent space the UNet learns does not move. Returns the loss."""
        o = self.o
        k = min(o.decoder_batch, raw.shape[0])
        lr = lr_at(o.decoder_lr, step, progress, o.warmup_steps, o.min_lr_ratio)
        return decoder_step(
            self.vae, self.dec_params, self.dec_opt, raw[:k], ims[:k], lr, _autocast(self.dev, o.autocast)
        )

    # -- output
    def record(self, final: bool) -> dict:
        st, o = self.state, self.o
        dev_name = torch.cuda.get_device_name(self.dev) if self.dev.type == "cuda" else "cpu"
        import diffusers
        import transformers

        return {
            "command": o.command,
            "seed": o.seed,
            "device": str(self.dev),
            "device_name": dev_name,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "complete": st.phase == "done",
            "final_export": final,
            "phase": st.phase,
            "stop_reason": self.stop_reason or ("finished" if st.phase == "done" else ""),
            "vae_steps_done": st.vae_step,
            "unet_steps_done": st.unet_step,
            "vae_ended_by": st.vae_ended_by,
            "unet_ended_by": st.unet_ended_by,
            "vae_seconds": round(st.vae_seconds, 1),
            "unet_seconds": round(st.unet_seconds, 1),
            "wall_seconds_this_sitting": round(self.elapsed(), 1),
            "final_vae_loss": st.vae_loss,
            "final_vae_batch_psnr": st.vae_psnr_train,
            "vae_psnr_heldout_db": st.vae_psnr_heldout,
            "final_unet_loss": st.unet_loss,
            "final_decoder_loss": st.decoder_loss,
            "vae_psnr_final_db": st.vae_psnr_final,
            "scaling_factor": st.scaling_factor,
            "latent_stats": st.latent_stats,
            "params": {
                "vae": param_count(self.vae),
                "text_encoder": param_count(self.te),
                "unet": param_count(self.unet),
            },
            "sittings": st.sittings,
            "spec": json.loads(json.dumps(asdict(self.spec))),
            "options": o.to_json(),
        }

    def export(self, final: bool) -> dict:
        rec = self.record(final)
        export_folder(
            Path(self.o.out),
            self.spec,
            {k: v.detach().cpu() for k, v in self.vae.state_dict().items()},
            _named_shadow(self.te, self.ema_te),
            _named_shadow(self.unet, self.ema_unet),
            self.state.scaling_factor,
            extra_files={"TRAINING.json": json.dumps(rec, indent=2) + "\n"},
        )
        self._last_export = time.monotonic()
        self.log(f"wrote {self.o.out} ({'final' if final else 'intermediate'})")
        return rec

    def run(self) -> dict:
        st = self.state
        t0 = time.monotonic()
        if st.phase == "vae":
            if self.o.vae_steps <= 0:
                self.finish_vae()
            else:
                self.run_vae()
        if st.phase == "unet" and not self._sitting_done():
            self.run_unet()
        st.sittings.append(
            {
                "seconds": round(time.monotonic() - t0, 1),
                "steps": self.steps_this_sitting,
                "stop": self.stop_reason,
                "device": str(self.dev),
            }
        )
        if st.phase in ("unet", "done"):
            n = min(self.o.latent_samples, 512)
            held = heldout_renders(n, self.spec.resolution) if self.folder is None else self.folder.images[:n]
            self.vae.eval()
            st.vae_psnr_final = vae_psnr(self.vae, held, self.dev)
            self.log(f"VAE held-out PSNR {st.vae_psnr_final:.2f} dB")
        self.checkpoint()
        rec = self.export(final=True)
        if st.phase == "done":
            self.log(f"training complete: vae {st.vae_step} steps, unet {st.unet_step} steps")
        else:
            self.log(f"stopped early ({self.stop_reason}) in phase {st.phase}; run the same command to resume")
        return rec


def train_builtin(opts: TrainOptions) -> dict:
    """Train (or resume) the built-in model per `opts`; returns the TRAINING.json record."""
    return Trainer(opts).run()


def command_line(module: str = "ldm_core.train") -> str:
    """The command that started this process as `python -m <module> ...`, shell-quoted (for TRAINING.json)."""
    args = [Path(sys.executable).name, "-m", module] + sys.argv[1:]
    return shlex.join(args)


__all__ = [
    "ModelSpec",
    "PRESETS",
    "TrainOptions",
    "Trainer",
    "train_builtin",
    "build_vae",
    "build_text_encoder",
    "build_unet",
    "build_scheduler",
    "scheduler_config",
    "export_folder",
    "CaptionTokenizer",
    "replace",
]
