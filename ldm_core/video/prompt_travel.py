"""Prompt travel: a prompt that changes over the frames of a clip.

Two ways to write it (both as sd-webui-animatediff users do, the second for one-line prompt boxes):

    masterpiece, best quality        <- head lines (optional)
    0: a red circle                  <- "frame: prompt" lines
    8: a blue circle
    on a white background            <- tail lines (optional)

    0: a red circle, 8: a blue circle

Keyframe k's prompt is "head, prompt_k, tail". Every frame's text conditioning is the spherical interpolation
(slerp) of the two keyframes around it; before the first keyframe the first one holds, after the last the last
one holds, unless the clip is a closed loop, where the last keyframe travels back to the first. Prompt syntax
(weights, [from:to:when] editing, AND, LoRA tags) works inside each keyframe prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..generation_requests import RequestError
from ..prompts.encode import Conditioning
from ..prompts.schedule import PromptSchedule

_LINE = re.compile(r"^\s*(\d+)\s*:\s*(.*)$")
_INLINE = re.compile(r"(?:^|,)\s*(\d+)\s*:\s*")


@dataclass(frozen=True)
class Travel:
    """Keyframe prompts by frame (sorted); `None` from `parse_travel` for a prompt without keyframes."""

    keyframes: tuple[tuple[int, str], ...]


def _join(*parts: str) -> str:
    return ", ".join(p.strip().strip(",").strip() for p in parts if p and p.strip().strip(","))


def parse_travel(prompt: str) -> Travel | None:
    lines = prompt.strip().splitlines()
    if any(_LINE.match(line) for line in lines) and len(lines) > 1:
        head, keys, tail = [], {}, []
        mode = "head"
        for line in lines:
            m = _LINE.match(line)
            if mode == "head" and m:
                mode = "keys"
            if mode == "keys":
                if m:
                    keys[int(m.group(1))] = m.group(2)
                    continue
                mode = "tail"
            (head if mode == "head" else tail).append(line)
        h, t = _join(*head), _join(*tail)
        return Travel(tuple((f, _join(h, p, t)) for f, p in sorted(keys.items())))
    text = prompt.strip()
    if re.match(r"^\d+\s*:", text):
        marks = list(_INLINE.finditer(text))
        keys = {}
        for i, m in enumerate(marks):
            end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
            keys[int(m.group(1))] = text[m.end() : end].strip().strip(",").strip()
        return Travel(tuple(sorted(keys.items())))
    return None


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation of two embeddings (linear when they are almost parallel)."""
    a, b = v0.float(), v1.float()
    dot = (a / a.norm() * (b / b.norm())).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        out = (1 - t) * a + t * b
    else:
        omega = dot.acos()
        out = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    return out.to(v0.dtype)


def frame_weights(keyframes: list[int], frames: int, closed_loop: bool) -> list[tuple[int, int, float]]:
    """For each frame: (index of the keyframe before, index of the keyframe after, 0..1 share of the latter)."""
    out = []
    n = len(keyframes)
    for f in range(frames):
        after = next((i for i, k in enumerate(keyframes) if k > f), None)
        before = (after - 1) if after is not None else n - 1
        if after is None or before < 0:
            if closed_loop and n > 1:  # between the last keyframe and the first one again (wrapping)
                last, first = keyframes[-1], keyframes[0] + frames
                pos = f if f >= last else f + frames
                out.append((n - 1, 0, (pos - last) / max(1, first - last)))
            else:
                out.append((max(0, before), max(0, before), 0.0))
            continue
        a, b = keyframes[before], keyframes[after]
        out.append((before, after, (f - a) / (b - a)))
    return out


class TravelSchedule:
    """`PromptSchedule`'s interface (`at(step)` -> (uncond, [(cond, weight), ...])) for a travelling prompt:
    each cond holds one embedding per frame, (frames, tokens, width), slerped between the keyframes' encodings
    of that step (prompt editing and AND work inside every keyframe prompt; all keyframes need the same number
    of AND parts). All keyframes are padded to the same number of 75-token chunks."""

    def __init__(self, encoder, travel: Travel, negative: str, steps: int, frames: int, closed_loop: bool):
        self.schedules = [PromptSchedule(encoder, text, negative, steps) for _, text in travel.keyframes]
        n = max(s.n_chunks for s in self.schedules)
        for s in self.schedules:
            s.n_chunks = n
        self.n_chunks = n
        self.weights = frame_weights([k for k, _ in travel.keyframes], frames, closed_loop)
        self._cache: dict[tuple, tuple] = {}

    def at(self, i: int):
        texts = tuple((neg, tuple(parts)) for neg, parts in (s.texts_at(i) for s in self.schedules))
        if texts in self._cache:
            return self._cache[texts]
        per_key = [s.at(i) for s in self.schedules]
        counts = {len(conds) for _, conds in per_key}
        if len(counts) != 1:
            raise RequestError("prompt", "every keyframe of a travelling prompt needs the same number of AND parts")
        conds = []
        for k in range(counts.pop()):
            parts = [c[k][0] for _, c in per_key]
            embeds = torch.cat([slerp(parts[a].embeds, parts[b].embeds, w) for a, b, w in self.weights])
            pooled = None
            if parts[0].pooled is not None:
                pooled = torch.cat([slerp(parts[a].pooled, parts[b].pooled, w) for a, b, w in self.weights])
            conds.append((Conditioning(embeds, pooled), per_key[0][1][k][1]))
        out = (per_key[0][0], conds)
        self._cache[texts] = out
        return out
