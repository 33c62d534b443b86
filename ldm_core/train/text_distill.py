"""A narrower copy of a model's text encoder, distilled from it, for add-ons whose size budget its token table
would eat: the built-in model's `CLIPTextModel` has a 49408 x 128 token table (12.6 MB in fp16), which is most
of the diffusion upscaler's 20 MB; at width 32 the same tokenizer's table is 3.2 MB.

The student is a `CLIPTextModel` of the same vocabulary, tokenizer and positions, `hidden` wide. Its target is the
teacher's last hidden states projected on their `hidden` principal directions (measured over captions of the
shapes world and the empty prompt), so the student keeps as much of what tells captions apart as `hidden`
numbers per token can; its token table starts as the teacher's, projected the same way. Captions are the shapes
world's (a fresh batch per step, as the add-ons' trainers draw theirs) and, a tenth of them, the empty prompt
(classifier-free guidance's). The report says how much of the teacher's variance the projection keeps and how
much of the projected target the student explains (R^2 on held-out captions).

`python -m ldm_core.train text-distill --base models/builtin --out OUT --hidden 32`; an add-on trainer takes OUT
(`sr --text-encoder OUT`), and its exported folder carries the student as its `text_encoder/`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import shapes


@dataclass
class DistillOptions:
    base: str = "models/builtin"
    out: str = "text-encoder-32"  # a folder: text_encoder/ (fp16) and TRAINING.json
    hidden: int = 32
    layers: int = 2
    heads: int = 2
    steps: int = 3000
    max_seconds: float | None = None
    batch: int = 128
    lr: float = 2e-3
    empty_share: float = 0.1  # of each batch: the empty prompt
    seed: int = 0
    threads: int = 0
    log_every: int = 100


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def captions(seed: str, n: int, empty_share: float) -> list[str]:
    """`n` shapes-world captions from the stream `seed`, every 1/empty_share-th one the empty prompt."""
    every = round(1 / empty_share) if empty_share > 0 else 0
    scenes = shapes.sample_scenes(seed, n)
    return ["" if every and i % every == every - 1 else s.caption for i, s in enumerate(scenes)]


def principal_directions(states: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """(P (width, k): the top-k principal directions of `states` (N, width), the share of variance they keep)."""
    x = states.float() - states.float().mean(0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    var = s**2
    return vh[:k].T.contiguous(), float(var[:k].sum() / var.sum())


def _embeddings(model):
    """A CLIPTextModel's embeddings (token, position): at the top in transformers 5, under text_model before."""
    inner = getattr(model, "text_model", model)
    return inner.embeddings


def student_config(teacher_config, o: DistillOptions):
    from transformers import CLIPTextConfig

    t = teacher_config
    if o.hidden % o.heads:
        raise ValueError(f"hidden: {o.hidden} is not a multiple of heads ({o.heads})")
    return CLIPTextConfig(
        vocab_size=t.vocab_size,
        hidden_size=o.hidden,
        intermediate_size=4 * o.hidden,
        projection_dim=o.hidden,
        num_hidden_layers=o.layers,
        num_attention_heads=o.heads,
        max_position_embeddings=t.max_position_embeddings,
        hidden_act=t.hidden_act,
        layer_norm_eps=t.layer_norm_eps,
        bos_token_id=t.bos_token_id,
        eos_token_id=t.eos_token_id,
        pad_token_id=t.pad_token_id,
    )


def distill_text_encoder(o: DistillOptions, log=_log) -> dict:
    """Train the student (see the module doc), write `out/text_encoder` in fp16 and `out/TRAINING.json`; returns
    the record."""
    from transformers import CLIPTextModel

    from ldm_core.models import load_model

    from .builtin import CaptionTokenizer, warmup_cosine

    if o.hidden < 1 or o.layers < 1 or o.heads < 1:
        raise ValueError("hidden, layers and heads must be at least 1")
    if o.threads:
        torch.set_num_threads(o.threads)
    torch.manual_seed(o.seed)
    model = load_model(o.base, dtype=torch.float32)
    teacher = model.text_encoder.eval().requires_grad_(False)
    width = teacher.config.hidden_size
    if o.hidden > width:
        raise ValueError(f"hidden: {o.hidden} is wider than the teacher's {width}")
    tok = CaptionTokenizer(model.tokenizer)

    @torch.no_grad()
    def teach(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = tok(texts)
        return ids, teacher(ids)[0]

    ids, states = teach(captions(f"distill-pca:{o.seed}", 1024, o.empty_share))
    proj, kept = principal_directions(states.reshape(-1, width), o.hidden)
    log(f"{o.hidden} of the teacher's {width} directions keep {kept:.1%} of its caption states' variance")
    student = CLIPTextModel(student_config(teacher.config, o))
    with torch.no_grad():
        mine, theirs = _embeddings(student), _embeddings(teacher)
        mine.token_embedding.weight.copy_(theirs.token_embedding.weight @ proj)
        mine.position_embedding.weight.copy_(theirs.position_embedding.weight @ proj)
    held_ids, held = teach(captions(f"distill-heldout:{o.seed}", 256, o.empty_share))
    held_target = held @ proj

    def r2() -> float:
        with torch.no_grad():
            pred = student(held_ids)[0]
        resid = (pred - held_target).pow(2).sum()
        total = (held_target - held_target.reshape(-1, o.hidden).mean(0)).pow(2).sum()
        return float(1 - resid / total)

    r2_start = r2()
    optim = torch.optim.AdamW(student.parameters(), lr=o.lr, weight_decay=0.0)
    student.train()
    t0, step, loss_ema = time.monotonic(), 0, None
    while step < o.steps:
        elapsed = time.monotonic() - t0
        if o.max_seconds is not None and elapsed >= o.max_seconds:
            break
        progress = max(step / o.steps, elapsed / o.max_seconds if o.max_seconds else 0.0)
        for g in optim.param_groups:
            g["lr"] = warmup_cosine(o.lr, step, progress, 50, 0.05)
        ids, target = teach(captions(f"distill:{o.seed}:{step}", o.batch, o.empty_share))
        loss = F.mse_loss(student(ids)[0], target @ proj)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        step += 1
        value = loss.item()
        loss_ema = value if loss_ema is None else 0.98 * loss_ema + 0.02 * value
        if o.log_every and step % o.log_every == 0:
            log(f"step {step} loss {loss_ema:.5f}")
    student.eval()
    record = {
        "recipe": "ldm_core.train.text_distill (a narrower CLIPTextModel distilled from the base's)",
        "options": {k: str(v) for k, v in asdict(o).items()},
        "teacher_hidden": width,
        "variance_kept_by_projection": kept,
        "heldout_r2_before": r2_start,
        "heldout_r2": r2(),
        "steps": step,
        "seconds": round(time.monotonic() - t0, 1),
        "final_loss": loss_ema,
        "parameters": sum(p.numel() for p in student.parameters()),
    }
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    student.half().save_pretrained(str(out / "text_encoder"), safe_serialization=True)
    (out / "TRAINING.json").write_text(json.dumps(record, indent=1) + "\n")
    log(f"wrote {out / 'text_encoder'}: held-out R^2 {record['heldout_r2']:.3f} after {step} steps")
    return record


def load_student(folder: str | Path):
    """The `text_encoder/` that `distill_text_encoder` wrote in `folder`, in fp32."""
    from transformers import CLIPTextModel

    path = Path(folder) / "text_encoder"
    if not (path / "config.json").is_file():
        raise SystemExit(f"--text-encoder: {path} has no config.json (make one with `text-distill --out {folder}`)")
    return CLIPTextModel.from_pretrained(str(path), torch_dtype=torch.float32)


def add_arguments(p) -> None:
    d = DistillOptions()
    p.add_argument("--base", default=d.base, help="the model whose text encoder is the teacher")
    p.add_argument("--out", required=True, help="folder for text_encoder/ and TRAINING.json")
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--max-seconds", type=float, default=None)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads)


def run(a) -> int:
    o = DistillOptions(
        base=a.base,
        out=a.out,
        hidden=a.hidden,
        layers=a.layers,
        heads=a.heads,
        steps=a.steps,
        max_seconds=a.max_seconds,
        batch=a.batch,
        lr=a.lr,
        seed=a.seed,
        threads=a.threads,
    )
    try:
        rec = distill_text_encoder(o)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    print(json.dumps({k: v for k, v in rec.items() if k != "options"}, indent=2))
    return 0
