"""Per-step conditioning: a prompt with editing `[a:b:when]`, alternation `[a|b]` and `AND` parts becomes, for
each sampling step, one unconditional and one or more weighted conditional embeddings. Each distinct text is
encoded once (the PromptEncoder caches it)."""

from __future__ import annotations

from bisect import bisect_left

from .encode import Conditioning, PromptEncoder
from .parser import get_prompt_schedule, split_and_prompts


class PromptSchedule:
    """`at(i)` gives (uncond, [(cond, weight), ...]) for 0-based step i of `steps`. All embeddings share one
    chunk count, so positive and negative (and every AND part) stack into one UNet batch."""

    def __init__(self, encoder: PromptEncoder, prompt: str, negative_prompt: str, steps: int):
        self.encoder = encoder
        self.steps = max(1, steps)
        self.pos = get_prompt_schedule(prompt, self.steps)  # [(end_step, text)], end_step 1-based inclusive
        self.neg = get_prompt_schedule(negative_prompt, self.steps)
        self.pos_parts = {text: split_and_prompts(text) for _, text in self.pos}
        texts = [p for parts in self.pos_parts.values() for p, _ in parts] + [t for _, t in self.neg]
        self.n_chunks = max(encoder.chunk_count(t) for t in texts) if texts else 1

    @staticmethod
    def _pick(schedule: list[tuple[int, str]], step: int) -> str:
        ends = [e for e, _ in schedule]
        i = min(bisect_left(ends, step), len(schedule) - 1)
        return schedule[i][1]

    def texts_at(self, i: int) -> tuple[str, list[tuple[str, float]]]:
        step = i + 1
        return self._pick(self.neg, step), self.pos_parts[self._pick(self.pos, step)]

    def at(self, i: int) -> tuple[Conditioning, list[tuple[Conditioning, float]]]:
        neg, parts = self.texts_at(i)
        uncond = self.encoder.encode(neg, self.n_chunks, negative=True)
        return uncond, [(self.encoder.encode(t, self.n_chunks), w) for t, w in parts]
