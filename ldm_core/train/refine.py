"""`python -m ldm_core.train refine`: continue training a built-in model folder on a CPU, in sittings.

Where `builtin` trains everything end to end (right on a GPU), this recipe spends a small CPU budget where
it buys most, in four resumable phases:

1. **text**: the text encoder is pre-trained to read captions (`text_pretrain`: attribute heads on its
   pooled state), then frozen for the rest — SD's own recipe keeps CLIP frozen too.
2. **cache**: N scenes of the shapes world are rendered and encoded once by the (frozen) VAE encoder; the
   posterior mean/std and the objects' coverage per latent cell are kept (fp16, ~1 KB a scene). Encoding
   64x64 images costs more than a UNet step on 8x8 latents, so every UNet step after this is ~2x cheaper;
   each scene gets a fresh caption, noise and timestep every time it is drawn.
3. **unet**: the UNet (started from the folder's) learns from the cache with the frozen text encoder,
   object-weighted v/epsilon loss, caption dropout, EMA. With `--low-noise-lies P` a share P of the captions
   of samples noised below `--low-noise-max-t` is swapped for another scene's while the target stays the
   image: where a lightly noised image and the prompt disagree (img2img at a low denoising strength), the UNet
   learns to keep what the image shows instead of redrawing it from the words. With `--shape-weight W` the
   cells where an object's shape differs from a blob of its size (a square's corners, a star's points) weigh W
   times more (a few cells of 256). Measured from v2.1 with W=3 (2026-12-06, n=200): after one sitting squares
   and circles read as on v2.1 (37 of 39, 48 of 51), after a second squares 39 of 39 but circles 47 of 51; off
   by default.
4. **decoder**: the VAE decoder alone is fine-tuned on fresh renders (L1 + MSE); the encoder, hence the
   latent space the UNet learned, does not move. With `--decoder-unet-share P` a share P of each batch is
   decoded not from the encoder's latents but from the folder's UNet's own estimate of them (its x0 from
   the latents noised at a timestep below `--decoder-unet-max-t`, given a caption of the scene), still
   against the render: at generation the decoder sees the UNet's latents, whose shapes carry the UNet's
   habits (pinched squares), not the encoder's.

`--phases` picks which of them run (e.g. `--phases decoder` polishes only the decoder of a folder and leaves
its text encoder and UNet as they are); a skipped phase changes nothing. The UNet phase needs the cache.
`--unet-cycle K` (K above the last one) gives a finished run's UNet a new warmup + cosine cycle.

Checkpoints go to --work-dir after each phase and every few minutes; the same command resumes. The folder
written to --out keeps the input folder's architecture, schedule and scaling factor, and its TRAINING.json
appends this sitting to the input's history.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm_core.train import shapes, text_pretrain
from ldm_core.train.builtin import (
    EMA,
    PRESETS,
    CaptionTokenizer,
    PhaseClock,
    _autocast,
    _named_shadow,
    _save_atomic,
    build_scheduler,
    build_text_encoder,
    build_unet,
    build_vae,
    command_line,
    decoder_step,
    diffusion_target,
    edge_weight,
    export_folder,
    heldout_renders,
    load_folder_state,
    lr_at,
    object_loss_weight,
    spec_from_folder,
    vae_psnr,
    warmup_cosine,
)
from ldm_core.train.cell_weights import shape_loss_weights
from ldm_core.train.step_loop import STALL_SECONDS

PHASES = ("text", "cache", "unet", "decoder", "done")


@dataclass
class RefineOptions:
    init: Path
    out: Path
    work_dir: Path
    seed: int = 0
    text_steps: int = 800
    text_batch: int = 256
    text_lr: float = 1e-3
    cache_scenes: int = 60000
    cache_batch: int = 256
    unet_steps: int = 6000  # planned; --unet-seconds usually ends the phase first (cosine on the clock)
    unet_seconds: float | None = None
    unet_batch: int = 128
    unet_lr: float = 3e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    ema_decay: float = 0.998
    caption_dropout: float = 0.1
    object_weight: float = 3.0
    # loss weight of the cells where an object's shape differs from a blob of its size (a square's corners, a
    # star's points; cell_weights.shape_loss_weights), on top of object_weight: 1 = off
    shape_weight: float = 1.0
    # share of the captions below --low-noise-max-t swapped for another scene's (the target stays this image):
    # teaches the UNet to keep what a lightly noised image shows when the prompt says otherwise (img2img at low
    # denoising strength); no effect where the caption and the image agree
    low_noise_lies: float = 0.0
    low_noise_max_t: int = 400
    # how far a lone object's centre moves from its position class in the cached scenes (shapes.sample_scene):
    # the default small jitter draws objects only near nine places; up to shapes.MAX_POSITION_JITTER (0.12)
    # draws them anywhere, which the motion module needs for objects in between
    position_jitter: float = shapes.POSITION_JITTER
    decoder_steps: int = 400
    decoder_seconds: float | None = None
    decoder_batch: int = 32
    decoder_lr: float = 5e-5
    decoder_warmup: int = 25
    decoder_edge_weight: float = 0.0  # extra loss weight on object edges (see builtin.edge_weight)
    decoder_grad_weight: float = 0.0  # image-gradient L1 in the decoder loss
    decoder_unet_share: float = 0.0  # share of each decoder batch decoded from the UNet's x0 estimate
    decoder_unet_max_t: int = 400  # ... from the renders' latents noised at a timestep below this
    unet_cycle: int = 0  # raise it to run the UNet phase again: a new cosine cycle of --unet-seconds more
    checkpoint_every: float = 300.0
    export_every: float | None = None  # seconds of UNet training between exports to --out (a learning-curve point)
    eval_n: int = 200  # held-out prompts evaluated at each curve point (0: record samples and time only)
    threads: int | None = None
    fresh_unet: str | None = None  # a preset name: a new, randomly initialised UNet of that preset's layout
    autocast: str = "off"  # "bf16": the UNet's forward and the decoder's in bf16 autocast (AMX / AVX512-BF16 CPUs)
    phases: tuple[str, ...] = PHASES[:-1]
    command: str = ""

    def __post_init__(self) -> None:
        self.phases = tuple(self.phases)
        unknown = [ph for ph in self.phases if ph not in PHASES[:-1]]
        if unknown:
            raise ValueError(f"phases: unknown {unknown}; choose from {', '.join(PHASES[:-1])}")
        if "unet" in self.phases and "cache" not in self.phases:
            raise ValueError("phases: the unet phase trains from the latent cache; include cache")

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class _Progress:
    phase: str = "text"
    text_step: int = 0
    text_accuracy: dict = field(default_factory=dict)
    text_seconds: float = 0.0
    cache_done: int = 0
    cache_seconds: float = 0.0
    unet_step: int = 0
    unet_progress: float = 0.0
    unet_seconds: float = 0.0
    unet_loss: float | None = None
    unet_cycle: int = 0
    unet_cycle_start: dict = field(default_factory=dict)  # cycle -> [unet_step, unet_seconds] when it began
    decoder_step: int = 0
    decoder_seconds: float = 0.0
    decoder_loss: float | None = None
    vae_psnr_before: float | None = None
    vae_psnr_after: float | None = None
    decoder_kept: bool = True
    sittings: list = field(default_factory=list)  # one entry per invocation: command, phase and step at start
    curve: list = field(default_factory=list)  # learning-curve points: samples seen, seconds, eval summary


def low_noise_lies(
    cond: torch.Tensor,
    own: torch.Tensor,
    t: torch.Tensor,
    dropped: torch.Tensor,
    share: float,
    max_t: int,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's text states with a `share` of the rows whose timestep is below `max_t` (and whose caption
    was not dropped) replaced by the next row's own caption state (`own`, before dropout): another random
    scene's caption, which names other colours, shapes or places than the image the row is trained to give
    back. Returns (states, which rows lie)."""
    lie = (t < max_t) & ~dropped & (torch.rand(len(t), generator=gen) < share)
    return torch.where(lie.view(-1, 1, 1), own.roll(1, 0), cond), lie


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Refiner:
    def __init__(self, o: RefineOptions):
        self.o = o
        if o.threads:
            torch.set_num_threads(o.threads)
        self.work = Path(o.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.spec = spec_from_folder(o.init)
        if o.fresh_unet is not None:  # the folder's VAE (and text encoder) under a new UNet layout
            ref = PRESETS[o.fresh_unet]
            unet_fields = ("unet_channels", "unet_layers", "unet_head_dim", "unet_groups", "unet_attention")
            self.spec = replace(self.spec, **{k: getattr(ref, k) for k in unet_fields})
        self.base_record = json.loads((Path(o.init) / "TRAINING.json").read_text(encoding="utf-8"))
        vae_sd, te_sd, unet_sd, sf = load_folder_state(o.init)
        self.sf = sf
        torch.manual_seed(o.seed)
        self.vae, self.te, self.unet = build_vae(self.spec), build_text_encoder(self.spec), build_unet(self.spec)
        self.vae.load_state_dict(vae_sd)
        self.te.load_state_dict(te_sd, strict=False)
        if o.fresh_unet is None:
            self.unet.load_state_dict(unet_sd)
        self.tokenizer = CaptionTokenizer()
        self.p = _Progress()
        self.heads: text_pretrain.AttributeHeads | None = None
        self.unet_opt = torch.optim.AdamW(self.unet.parameters(), lr=o.unet_lr, betas=(0.9, 0.99), weight_decay=0.01)
        self.ema = EMA(list(self.unet.parameters()), o.ema_decay)
        self.dec_params = list(self.vae.post_quant_conv.parameters()) + list(self.vae.decoder.parameters())
        self.dec_opt = torch.optim.AdamW(self.dec_params, lr=o.decoder_lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.cache: dict[str, torch.Tensor] | None = None
        self._resume()

    # -- checkpoints
    @property
    def ckpt_path(self) -> Path:
        return self.work / "refine.pt"

    @property
    def cache_path(self) -> Path:
        return self.work / "latent-cache.pt"

    def save(self) -> None:
        _save_atomic(
            {
                "progress": asdict(self.p),
                "vae": self.vae.state_dict(),
                "te": self.te.state_dict(),
                "heads": self.heads.state_dict() if self.heads is not None else None,
                "unet": self.unet.state_dict(),
                "unet_opt": self.unet_opt.state_dict(),
                "ema": self.ema.state_dict(),
                "dec_opt": self.dec_opt.state_dict(),
            },
            self.ckpt_path,
        )

    def _resume(self) -> None:
        if not self.ckpt_path.exists():
            return
        ck = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        self.p = _Progress(**ck["progress"])
        self.vae.load_state_dict(ck["vae"])
        self.te.load_state_dict(ck["te"])
        if ck["heads"] is not None:
            self.heads = text_pretrain.AttributeHeads(self.te.config.hidden_size)
            self.heads.load_state_dict(ck["heads"])
        self.unet.load_state_dict(ck["unet"])
        self.unet_opt.load_state_dict(ck["unet_opt"])
        self.ema.load(ck["ema"])
        self.dec_opt.load_state_dict(ck["dec_opt"])
        _log(f"resumed {self.ckpt_path}: phase {self.p.phase}")

    # -- phase 1
    def run_text(self) -> None:
        o, t0 = self.o, time.monotonic()
        self.te.requires_grad_(True)
        self.heads, step = text_pretrain.pretrain_text_encoder(
            self.te,
            self.tokenizer,
            steps=o.text_steps,
            batch=o.text_batch,
            lr=o.text_lr,
            seed=o.seed,
            heads=self.heads,
            start_step=self.p.text_step,
            log=_log,
        )
        self.p.text_step = step
        self.p.text_seconds += time.monotonic() - t0
        self.p.text_accuracy = text_pretrain.evaluate(self.te, self.heads, self.tokenizer, n=2048)
        _log(f"text encoder held-out head accuracy {self.p.text_accuracy}")
        self.p.phase = "cache"
        self.save()

    # -- phase 2
    def cache_scenes(self) -> list[shapes.Scene]:
        return shapes.sample_scenes(
            f"refine-cache:{self.o.seed}", self.o.cache_scenes, position_jitter=self.o.position_jitter
        )

    @torch.no_grad()
    def run_cache(self) -> None:
        o, t0 = self.o, time.monotonic()
        scenes = self.cache_scenes()
        n, lat = len(scenes), self.spec.resolution // 2 ** (len(self.spec.vae_channels) - 1)  # the VAE's factor
        if self.cache_path.exists():
            cache = torch.load(self.cache_path, map_location="cpu", weights_only=True)
        else:
            cache = {
                "mean": torch.zeros(n, self.spec.latent_channels, lat, lat, dtype=torch.float16),
                "std": torch.zeros(n, self.spec.latent_channels, lat, lat, dtype=torch.float16),
                "cover": torch.zeros(n, 1, lat, lat, dtype=torch.float16),
            }
        self.vae.eval()
        last = time.monotonic()
        i = self.p.cache_done
        while i < n:
            chunk = scenes[i : i + o.cache_batch]
            ims, cover = shapes.render_packed(shapes.pack_scenes(chunk), self.spec.resolution, with_coverage=True)
            post = self.vae.encode(ims * 2 - 1).latent_dist
            j = i + len(chunk)
            cache["mean"][i:j] = post.mean.half()
            cache["std"][i:j] = post.std.half()
            cache["cover"][i:j] = F.adaptive_avg_pool2d(cover.float(), lat).half()
            i = j
            if time.monotonic() - last > 60 or i >= n:
                last = time.monotonic()
                self.p.cache_done = i
                _save_atomic(cache, self.cache_path)
                self.save()
                _log(f"cache {i}/{n} scenes encoded")
        self.p.cache_seconds += time.monotonic() - t0
        self.p.phase = "unet"
        self.save()

    # -- phase 3
    def run_unet(self) -> None:
        o, p = self.o, self.p
        cache = torch.load(self.cache_path, map_location="cpu", weights_only=True)
        scenes = self.cache_scenes()
        n = len(scenes)
        self.te.eval().requires_grad_(False)
        self.vae.eval().requires_grad_(False)
        self.unet.train()
        sched = build_scheduler(self.spec)
        ab = sched.alphas_cumprod.float()
        with torch.no_grad():
            empty = self.te(self.tokenizer([""]))[0]
        step0, spent0 = p.unet_cycle_start.get(str(p.unet_cycle), [0, 0.0])  # where this cycle began
        budget = None if o.unet_seconds is None else max(0.0, o.unet_seconds - (p.unet_seconds - spent0))
        t0 = last_log = last_ck = prev = time.monotonic()
        sec0 = p.unet_seconds
        clock = PhaseClock(o.unet_steps, p.unet_step - step0, p.unet_progress, budget)
        smooth = p.unet_loss
        step_s = 0.0  # wall time of the last step that ran unstopped
        while p.unet_progress < 1.0:
            step = p.unet_step
            rng = random.Random(f"refine-unet:{o.seed}:{step}")
            idx = torch.tensor([rng.randrange(n) for _ in range(o.unet_batch)])
            caps = [shapes.caption(scenes[k], rng) for k in idx.tolist()]
            gen = torch.Generator().manual_seed(rng.getrandbits(62))
            with torch.no_grad():
                cond = self.te(self.tokenizer(caps))[0]
            drop = torch.rand(len(caps), generator=gen) < o.caption_dropout
            own = cond
            cond = torch.where(drop.view(-1, 1, 1), empty.expand_as(cond), cond)
            mean, std = cache["mean"][idx].float(), cache["std"][idx].float()
            lat = (mean + std * torch.randn(mean.shape, generator=gen)) * self.sf
            noise = torch.randn(lat.shape, generator=gen)
            t = torch.randint(0, self.spec.num_train_timesteps, (len(caps),), generator=gen)
            x_t, target = diffusion_target(lat, noise, ab[t], self.spec.prediction_type)
            if o.low_noise_lies > 0:
                lie_gen = torch.Generator().manual_seed(rng.getrandbits(62))
                cond, _ = low_noise_lies(cond, own, t, drop, o.low_noise_lies, o.low_noise_max_t, lie_gen)
            lr = lr_at(o.unet_lr, step - step0, p.unet_progress, o.warmup_steps, o.min_lr_ratio)
            for g in self.unet_opt.param_groups:
                g["lr"] = lr
            with _autocast(torch.device("cpu"), o.autocast):
                pred = self.unet(x_t, t, cond).sample
            err = (pred.float() - target).pow(2)
            if o.object_weight > 0:  # the cache's cover is already averaged per latent cell
                err = err * object_loss_weight(cache["cover"][idx], lat.shape[-1], o.object_weight)
            if o.shape_weight != 1:
                err = err * shape_loss_weights([scenes[k] for k in idx.tolist()], lat.shape[-1], o.shape_weight)
            loss = err.mean()
            self.unet_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
            self.unet_opt.step()
            self.ema.update(step)
            p.unet_step += 1
            lv = float(loss.detach())
            smooth = lv if smooth is None else 0.98 * smooth + 0.02 * lv
            p.unet_loss = smooth
            now = time.monotonic()
            if now - prev > STALL_SECONDS:  # the process was stopped (SIGSTOP, a suspended machine) mid-step:
                t0 += now - prev - step_s  # the stopped time is not training time
                clock.pause(now - prev - step_s)
            else:
                step_s = now - prev
            prev = now
            p.unet_seconds = sec0 + (now - t0)
            p.unet_progress = clock.progress(p.unet_step - step0)
            if now - last_log > 30:
                last_log = now
                _log(f"unet step {p.unet_step} progress {p.unet_progress:.3f} loss {smooth:.4f} lr {lr:.2e}")
            if now - last_ck > o.checkpoint_every:
                last_ck = now
                self.save()
            if o.export_every and p.unet_seconds - self._last_point_seconds() >= o.export_every:
                before = time.monotonic()
                self.curve_point()
                spent = time.monotonic() - before  # exporting and evaluating is not training time
                t0 += spent
                clock.pause(spent)
                last_ck = last_log = prev = time.monotonic()
        p.phase = "decoder"
        self.save()

    # -- phase 4
    def run_decoder(self) -> None:
        o, p = self.o, self.p
        held = heldout_renders(256, self.spec.resolution)
        self.vae.eval()
        if p.vae_psnr_before is None:
            p.vae_psnr_before = vae_psnr(self.vae, held, torch.device("cpu"))
            _log(f"VAE held-out PSNR before decoder tuning {p.vae_psnr_before:.2f} dB")
        before = {k: v.detach().clone() for k, v in self.vae.state_dict().items()}
        self.vae.encoder.requires_grad_(False)
        self.vae.quant_conv.requires_grad_(False)
        for q in self.dec_params:
            q.requires_grad_(True)
        alpha_bar = None
        if o.decoder_unet_share > 0:  # decode the UNet's own latents too (see the module docstring)
            alpha_bar = build_scheduler(self.spec).alphas_cumprod.float()
            self.te.eval().requires_grad_(False)
            self.unet.eval().requires_grad_(False)
        budget = None if o.decoder_seconds is None else max(0.0, o.decoder_seconds - p.decoder_seconds)
        t0 = last_log = last_ck = time.monotonic()
        sec0 = p.decoder_seconds
        smooth = p.decoder_loss
        while p.decoder_step < o.decoder_steps:
            now = time.monotonic()
            if budget is not None and now - t0 > budget:
                break
            step = p.decoder_step
            scenes = shapes.sample_scenes(f"refine-decoder:{o.seed}:{step}", o.decoder_batch)
            weight = None
            if o.decoder_edge_weight > 0:
                packed = shapes.pack_scenes(scenes)
                ims, cover = shapes.render_packed(packed, self.spec.resolution, with_coverage=True)
                weight = edge_weight(cover, o.decoder_edge_weight)
            else:
                ims = shapes.render(scenes, self.spec.resolution)
            with torch.no_grad():
                raw = self.vae.encode(ims * 2 - 1).latent_dist.mean
                if alpha_bar is not None:
                    raw = self._unet_estimates(raw, scenes, step, alpha_bar)
            frac = step / max(1, o.decoder_steps)
            if budget is not None:
                frac = max(frac, (now - t0) / max(budget, 1e-9))
            lr = warmup_cosine(o.decoder_lr, step, frac, o.decoder_warmup, 0.0)
            self.vae.decoder.train()
            loss = decoder_step(
                self.vae,
                self.dec_params,
                self.dec_opt,
                raw,
                ims,
                lr,
                amp=_autocast(torch.device("cpu"), o.autocast),
                weight=weight,
                grad_weight=o.decoder_grad_weight,
            )
            p.decoder_step += 1
            lv = float(loss.detach())
            smooth = lv if smooth is None else 0.95 * smooth + 0.05 * lv
            p.decoder_loss = smooth
            p.decoder_seconds = sec0 + (time.monotonic() - t0)
            if time.monotonic() - last_log > 30:
                last_log = time.monotonic()
                _log(f"decoder step {p.decoder_step} loss {smooth:.4f} lr {lr:.2e}")
            if time.monotonic() - last_ck > o.checkpoint_every:
                last_ck = time.monotonic()
                self.save()
        self.vae.eval()
        p.vae_psnr_after = vae_psnr(self.vae, held, torch.device("cpu"))
        _log(f"VAE held-out PSNR after decoder tuning {p.vae_psnr_after:.2f} dB")
        if p.vae_psnr_after < p.vae_psnr_before:  # never ship a worse decoder than the one we started from
            self.vae.load_state_dict(before)
            p.decoder_kept = False
            _log("decoder tuning lowered the PSNR: the previous decoder is kept")
        p.phase = "done"
        self.save()

    def _unet_estimates(self, raw: torch.Tensor, scenes: list, step: int, alpha_bar: torch.Tensor) -> torch.Tensor:
        """`raw` (unscaled encoder latents of `scenes`) with a `decoder_unet_share` of its rows replaced by the
        UNet's x0 estimate from them noised at a timestep in [0, decoder_unet_max_t), given a caption."""
        o = self.o
        rng = random.Random(f"refine-decoder-unet:{o.seed}:{step}")
        rows = [i for i in range(raw.shape[0]) if rng.random() < o.decoder_unet_share]
        if not rows:
            return raw
        gen = torch.Generator().manual_seed(rng.getrandbits(62))
        idx = torch.tensor(rows)
        lat = raw[idx] * self.sf
        t = torch.randint(0, max(1, o.decoder_unet_max_t), (len(rows),), generator=gen)
        x_t, _ = diffusion_target(lat, torch.randn(lat.shape, generator=gen), alpha_bar[t], "epsilon")
        cond = self.te(self.tokenizer([shapes.caption(scenes[i], rng) for i in rows]))[0]
        with _autocast(torch.device("cpu"), o.autocast):
            pred = self.unet(x_t, t, cond).sample.float()
        a = alpha_bar[t].view(-1, 1, 1, 1)
        if self.spec.prediction_type == "v_prediction":
            x0 = a.sqrt() * x_t - (1 - a).sqrt() * pred
        else:
            x0 = (x_t - (1 - a).sqrt() * pred) / a.sqrt()
        out = raw.clone()
        out[idx] = x0 / self.sf
        return out

    # -- learning curve
    def _last_point_seconds(self) -> float:
        return self.p.curve[-1]["unet_seconds"] if self.p.curve else 0.0

    def curve_point(self) -> dict:
        """Export the folder now and record a learning-curve point (samples seen, UNet seconds, and with
        `eval_n` the held-out evaluation of single- and two-object prompts)."""
        self.save()
        self.export()
        point = {
            "unet_step": self.p.unet_step,
            "samples_seen": self.p.unet_step * self.o.unet_batch,
            "unet_seconds": round(self.p.unet_seconds, 3),  # finer than a step, so the next export is due on time
            "time": time.time(),
        }
        if self.o.eval_n > 0:
            from ldm_core.train.evaluate import EvalOptions, evaluate

            opts = EvalOptions(model=Path(self.o.out), n=self.o.eval_n, device="cpu", only=("single", "double"))
            rep = evaluate(opts)
            point["eval"] = {
                "n": self.o.eval_n,
                **{k: rep["single"][k] for k in ("shape_colour", "position", "background")},
                "two_objects_both_right": rep["double"]["both_right"],
            }
        self.p.curve.append(point)
        _log(f"learning-curve point {point}")
        self.save()
        # the folder's weights are the ones just evaluated: only its TRAINING.json gains the point
        tmp = Path(self.o.out) / "TRAINING.json.tmp"
        tmp.write_text(json.dumps(self.record(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, Path(self.o.out) / "TRAINING.json")
        return point

    # -- output
    def record(self) -> dict:
        """The TRAINING.json of the folder this run writes."""
        return {
            "command": self.o.command,
            "recipe": "refine (ldm_core/train/refine.py) on top of the folder below",
            "init": str(self.o.init),
            "options": self.o.to_json(),
            "progress": asdict(self.p),
            "torch": torch.__version__,
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "spec": json.loads(json.dumps(asdict(self.spec))),  # the folder's, or with --fresh-unet's layout
            "scaling_factor": self.sf,
            "history": [*self.base_record.get("history", []), _strip(self.base_record)],
        }

    def export(self) -> dict:
        rec = self.record()
        export_folder(
            Path(self.o.out),
            self.spec,
            {k: v.detach().cpu() for k, v in self.vae.state_dict().items()},
            {k: v.detach().cpu() for k, v in self.te.state_dict().items()},
            _named_shadow(self.unet, self.ema),
            self.sf,
            extra_files={"TRAINING.json": json.dumps(rec, indent=2) + "\n"},
        )
        _log(f"wrote {self.o.out}")
        return rec

    def start_unet_cycle(self) -> None:
        """Train the UNet again, from where it is, for a new warmup + cosine cycle of --unet-seconds (or
        --unet-steps): the way to give a finished run more time in a later sitting. Later phases that were
        done (the decoder) run again only as far as their own budget allows."""
        p = self.p
        if PHASES.index(p.phase) < PHASES.index("unet"):
            raise ValueError("unet_cycle: the first cycle has not run yet; leave --unet-cycle at 0")
        p.unet_cycle = self.o.unet_cycle
        p.unet_cycle_start[str(p.unet_cycle)] = [p.unet_step, p.unet_seconds]
        p.unet_progress = 0.0
        p.phase = "unet"
        _log(f"UNet cycle {p.unet_cycle} starts at step {p.unet_step}")
        self.save()

    def run(self) -> dict:
        self.p.sittings.append(
            {"command": self.o.command, "phase": self.p.phase, "unet_step": self.p.unet_step, "start": time.time()}
        )
        if self.o.unet_cycle > self.p.unet_cycle and "unet" in self.o.phases:
            self.start_unet_cycle()
        runners = {"text": self.run_text, "cache": self.run_cache, "unet": self.run_unet, "decoder": self.run_decoder}
        for name, fn in runners.items():
            if self.p.phase != name:
                continue
            if name in self.o.phases:
                fn()  # each ends by moving p.phase on and saving
            else:
                self.p.phase = PHASES[PHASES.index(name) + 1]
        return self.export()


def _strip(record: dict) -> dict:
    """A previous TRAINING.json without its own history (that is carried separately)."""
    return {k: v for k, v in record.items() if k != "history"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = RefineOptions(init=Path("."), out=Path("."), work_dir=Path("."))
    p.add_argument("--init", type=Path, required=True, help="diffusers folder written by `builtin` or `refine`")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work-dir", type=Path, required=True, help="checkpoints and the latent cache; resumed")
    p.add_argument("--seed", type=int, default=d.seed)
    for name in (
        "text_steps",
        "text_batch",
        "cache_scenes",
        "cache_batch",
        "unet_steps",
        "unet_batch",
        "warmup_steps",
        "decoder_steps",
        "decoder_warmup",
        "decoder_batch",
        "unet_cycle",
        "threads",
        "eval_n",
        "decoder_unet_max_t",
        "low_noise_max_t",
    ):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in (
        "text_lr",
        "unet_lr",
        "unet_seconds",
        "min_lr_ratio",
        "ema_decay",
        "caption_dropout",
        "object_weight",
        "shape_weight",
        "low_noise_lies",
        "position_jitter",
        "decoder_seconds",
        "decoder_lr",
        "decoder_edge_weight",
        "decoder_grad_weight",
        "decoder_unet_share",
        "checkpoint_every",
        "export_every",
    ):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument(
        "--fresh-unet",
        choices=sorted(PRESETS),
        default=None,
        help="start a new UNet of this preset's layout (random weights) on the folder's VAE and text encoder",
    )
    p.add_argument(
        "--autocast",
        choices=("off", "bf16"),
        default=d.autocast,
        help="bf16: the UNet and decoder phases in bf16 autocast (fast on CPUs with AMX or AVX512-BF16; the decoder "
        "step at batch 32 on 2 cores: 0.59 s against 0.95 s in fp32)",
    )
    p.add_argument(
        "--phases",
        type=lambda v: tuple(x.strip() for x in v.split(",") if x.strip()),
        default=d.phases,
        help=f"comma-separated phases to run, in this order: {','.join(PHASES[:-1])} (default: all)",
    )


def run(a: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    fields = RefineOptions.__dataclass_fields__
    opts = RefineOptions(**{k: getattr(a, k) for k in fields if k != "command" and hasattr(a, k)})
    opts.command = command_line()
    rec = Refiner(opts).run()
    print(json.dumps(rec["progress"], indent=2))
    return 0
