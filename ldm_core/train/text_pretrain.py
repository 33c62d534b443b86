"""Pre-training the built-in model's text encoder to *read* shapes-world captions before the UNet learns
to draw them.

Trained only through the diffusion loss, a small CLIP text encoder learns the background colour (it
dominates the pixels) long before it learns which colour word belongs to the object, which is why the
first built-in model drew the right background and layout but the wrong object colour and shape. Here the
encoder gets a direct, cheap (text-only) objective first: linear heads on its pooled output must recover
what the caption says — background colour, object count, and the bindings shape x colour, shape x
position, colour x position, shape x size of every object it names — so the 128-dimensional state the
UNet cross-attends to already separates "a red circle on blue" from "a blue circle on red".

Labels come from the scene *and* the caption: an attribute a caption leaves out is "unspecified", never
the drawn value (the caption "a circle" says nothing about its colour).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldm_core.train import shapes
from ldm_core.train.builtin import warmup_cosine

_UNSPEC = "unspecified"
SHAPE_VALUES = (*shapes.SHAPES, _UNSPEC)
COLOUR_VALUES = (*shapes.COLOUR_NAMES, _UNSPEC)
POSITION_VALUES = (*shapes.POSITIONS, _UNSPEC)
SIZE_VALUES = (*shapes.SIZES, _UNSPEC)

#: Head name -> number of outputs. "background" and "count" are single-label (cross-entropy); the rest
#: are multi-hot over pairs (binary cross-entropy), one hot entry per object the caption names.
HEADS: dict[str, int] = {
    "background": len(COLOUR_VALUES),
    "count": 2,
    "shape_colour": len(SHAPE_VALUES) * len(COLOUR_VALUES),
    "shape_position": len(SHAPE_VALUES) * len(POSITION_VALUES),
    "colour_position": len(COLOUR_VALUES) * len(POSITION_VALUES),
    "shape_size": len(SHAPE_VALUES) * len(SIZE_VALUES),
}
_SINGLE = ("background", "count")

_WORD = re.compile(r"[a-z]+")


def _words(text: str) -> str:
    return " " + " ".join(_WORD.findall(text.lower())) + " "


def _says(text_words: str, phrases) -> bool:
    return any(_words(p) in text_words for p in phrases)


@dataclass(frozen=True)
class ObjectMention:
    shape: str
    colour: str
    position: str
    size: str


def caption_mentions(scene: shapes.Scene, caption: str) -> tuple[str, list[ObjectMention]]:
    """What `caption` says about `scene`: the background colour (or "unspecified") and, per object, its
    shape/colour/position/size where a word for it occurs in the caption."""
    w = _words(caption)
    bg = scene.background if _says(w, shapes.COLOUR_WORDS[scene.background]) else _UNSPEC
    objs = []
    for o in scene.objects:
        pos_phrases = (*shapes.POSITION_PHRASES[o.position], *shapes.POSITION_TAGS[o.position])
        objs.append(
            ObjectMention(
                shape=o.shape if _says(w, shapes.SHAPE_WORDS[o.shape]) else _UNSPEC,
                colour=o.colour if _says(w, shapes.COLOUR_WORDS[o.colour]) else _UNSPEC,
                position=o.position if _says(w, pos_phrases) else _UNSPEC,
                size=o.size if _says(w, shapes.SIZE_WORDS[o.size]) else _UNSPEC,
            )
        )
    return bg, objs


def caption_targets(scene: shapes.Scene, caption: str) -> dict[str, torch.Tensor]:
    """Per-head targets of one (scene, caption): class index for the single-label heads, a multi-hot
    float vector for the pair heads."""
    bg, objs = caption_mentions(scene, caption)
    out = {
        "background": torch.tensor(COLOUR_VALUES.index(bg)),
        "count": torch.tensor(len(objs) - 1),
    }
    pairs = {k: torch.zeros(n) for k, n in HEADS.items() if k not in _SINGLE}
    for m in objs:
        s, c = SHAPE_VALUES.index(m.shape), COLOUR_VALUES.index(m.colour)
        p, z = POSITION_VALUES.index(m.position), SIZE_VALUES.index(m.size)
        pairs["shape_colour"][s * len(COLOUR_VALUES) + c] = 1
        pairs["shape_position"][s * len(POSITION_VALUES) + p] = 1
        pairs["colour_position"][c * len(POSITION_VALUES) + p] = 1
        pairs["shape_size"][s * len(SIZE_VALUES) + z] = 1
    out.update(pairs)
    return out


def batch_targets(scenes: list[shapes.Scene], captions: list[str]) -> dict[str, torch.Tensor]:
    rows = [caption_targets(s, c) for s, c in zip(scenes, captions, strict=True)]
    return {k: torch.stack([r[k] for r in rows]) for k in HEADS}


class AttributeHeads(torch.nn.Module):
    """Linear read-outs of the text encoder's pooled (EOS) state, one per head in `HEADS`."""

    def __init__(self, hidden: int):
        super().__init__()
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(hidden, n) for k, n in HEADS.items()})

    def forward(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: h(pooled) for k, h in self.heads.items()}


def head_losses(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k in HEADS:
        if k in _SINGLE:
            out[k] = F.cross_entropy(logits[k], targets[k])
        else:
            out[k] = F.binary_cross_entropy_with_logits(logits[k], targets[k], reduction="sum") / len(targets[k])
    return out


@torch.no_grad()
def head_accuracy(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, float]:
    """Single-label heads: share of right classes; pair heads: share of captions whose whole multi-hot
    set is right (every logit on the right side of 0)."""
    out = {}
    for k in HEADS:
        if k in _SINGLE:
            out[k] = float((logits[k].argmax(-1) == targets[k]).float().mean())
        else:
            out[k] = float(((logits[k] > 0).float() == targets[k]).all(-1).float().mean())
    return out


def _batch(seed: str, step: int, n: int, tokenizer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    scenes = shapes.sample_scenes(f"{seed}:{step}", n)
    caps = [s.caption for s in scenes]
    return trim_padding(tokenizer(caps), tokenizer.eos), batch_targets(scenes, caps)


def trim_padding(ids: torch.Tensor, eos: int) -> torch.Tensor:
    """`ids` cut after the last caption's end token. CLIP's text attention is causal, so the states up to
    and including each end token (the pooled output among them) are exactly those of the 77-token input;
    pre-training on the shorter input is 2-3x faster."""
    first_eos = (ids == eos).int().argmax(-1)
    return ids[:, : int(first_eos.max()) + 1]


def evaluate(te, heads: AttributeHeads, tokenizer, n: int = 1024) -> dict[str, float]:
    """Head accuracy on `n` held-out captions (a scene stream training never sees)."""
    was = te.training
    te.eval()
    ids, tg = _batch("heldout-text", 0, n, tokenizer)
    with torch.no_grad():
        logits = heads(te(ids).pooler_output.float())
    te.train(was)
    return {k: round(v, 4) for k, v in head_accuracy(logits, tg).items()}


def pretrain_text_encoder(
    te,
    tokenizer,
    *,
    steps: int,
    batch: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    warmup: int = 50,
    heads: AttributeHeads | None = None,
    start_step: int = 0,
    max_seconds: float | None = None,
    log=print,
    log_every: float = 20.0,
) -> tuple[AttributeHeads, int]:
    """Train `te` (a CLIPTextModel, in place) with the attribute heads for up to `steps` steps; returns the
    heads and the step reached (less than `steps` when `max_seconds` ran out). Deterministic per seed."""
    torch.manual_seed(seed)
    if heads is None:
        heads = AttributeHeads(te.config.hidden_size)
    params = [p for p in te.parameters() if p.requires_grad] + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    te.train()
    t0 = last = time.monotonic()
    step = start_step
    while step < steps:
        if max_seconds is not None and time.monotonic() - t0 > max_seconds:
            break
        cur = warmup_cosine(lr, step, step / steps, warmup, 0.05)
        for g in opt.param_groups:
            g["lr"] = cur
        ids, tg = _batch(f"train-text:{seed}", step, batch, tokenizer)
        losses = head_losses(heads(te(ids).pooler_output.float()), tg)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if time.monotonic() - last > log_every or step == steps:
            last = time.monotonic()
            log(f"text step {step}/{steps} loss {float(loss.detach()):.4f} lr {cur:.2e}")
    return heads, step


__all__ = [
    "HEADS",
    "AttributeHeads",
    "batch_targets",
    "caption_mentions",
    "caption_targets",
    "evaluate",
    "head_losses",
    "pretrain_text_encoder",
]
