"""Prompt text -> UNet conditioning, for SD 1.x (CLIP-L), SD 2.x (OpenCLIP-H, penultimate layer) and SDXL
(CLIP-L + OpenCLIP-bigG, pooled embedding and size/crop conditioning).

Long prompts are cut into 75-token chunks, each wrapped in BOS/EOS to 77 tokens and encoded separately; the
chunk embeddings are concatenated along the sequence axis. `BREAK` ends the current chunk. Each token carries
the weight the emphasis syntax gave it; "Original" emphasis rescales the weighted embedding so its mean is
unchanged, "No norm" does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .parser import parse_prompt_attention

CHUNK = 75  # tokens of text per chunk (77 with BOS and EOS)


@dataclass
class Conditioning:
    """Text conditioning of one prompt. `embeds` is (1, 77*k, D); `pooled` is (1, P) for SDXL, else None."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    @property
    def chunks(self) -> int:
        return self.embeds.shape[1] // (CHUNK + 2)


@dataclass
class TokenChunks:
    """Token ids and per-token weights of one prompt, in chunks of 75 (without BOS/EOS)."""

    ids: list[list[int]]
    weights: list[list[float]]


def tokenize_weighted(tokenizer, text: str) -> TokenChunks:
    """Split a prompt into 75-token chunks with per-token weights, honouring BREAK."""
    ids: list[list[int]] = [[]]
    weights: list[list[float]] = [[]]
    for fragment, weight in parse_prompt_attention(text):
        if fragment == "BREAK" and weight == -1:
            if ids[-1]:
                ids.append([])
                weights.append([])
            continue
        tokens = tokenizer(fragment, add_special_tokens=False, truncation=False)["input_ids"]
        for tok in tokens:
            if len(ids[-1]) >= CHUNK:
                ids.append([])
                weights.append([])
            ids[-1].append(tok)
            weights[-1].append(weight)
    return TokenChunks(ids, weights)


def count_tokens(tokenizer, text: str) -> tuple[int, int]:
    """(tokens used, token limit) for a prompt: the limit grows by 75 per chunk, as the UI's counter shows."""
    chunks = tokenize_weighted(tokenizer, text)
    used = sum(len(c) for c in chunks.ids)
    return used, max(1, len(chunks.ids)) * CHUNK


def _pad_chunk(tokenizer, ids: list[int], weights: list[float]) -> tuple[list[int], list[float]]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    body = ids + [tokenizer.eos_token_id] + [pad] * (CHUNK - len(ids))
    return [tokenizer.bos_token_id, *body], [1.0, *weights, *([1.0] * (CHUNK + 1 - len(weights)))]


def _encode_chunks(
    text_encoder, tokenizer, chunks: TokenChunks, n_chunks: int, layer: int | None, final_norm: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run one text encoder over every chunk. Returns (hidden (1,77k,D), weights (1,77k), pooled of chunk 0).

    `layer` None = last hidden state; -k = the k-th hidden state from the end; `final_norm` applies the
    encoder's final layer norm to a non-final hidden state (SD1 clip skip does, SDXL does not).
    """
    device = text_encoder.device
    all_ids, all_w = [], []
    for i in range(n_chunks):
        ids = chunks.ids[i] if i < len(chunks.ids) else []
        w = chunks.weights[i] if i < len(chunks.weights) else []
        pid, pw = _pad_chunk(tokenizer, ids, w)
        all_ids.append(pid)
        all_w.append(pw)
    ids_t = torch.tensor(all_ids, device=device)
    out = text_encoder(ids_t, output_hidden_states=True)
    if layer is None:
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.hidden_states[-1]
    else:
        hidden = out.hidden_states[layer]
        if final_norm:
            hidden = text_encoder.text_model.final_layer_norm(hidden)
    pooled = None
    if hasattr(out, "text_embeds"):
        pooled = out.text_embeds[:1]
    hidden = hidden.reshape(1, -1, hidden.shape[-1])
    weights = torch.tensor(all_w, device=device, dtype=hidden.dtype).reshape(1, -1)
    return hidden, weights, pooled


def _apply_weights(z: torch.Tensor, w: torch.Tensor, emphasis: str) -> torch.Tensor:
    if torch.all(w == 1.0):
        return z
    mean_before = z.mean()
    z = z * w.unsqueeze(-1)
    if emphasis == "Original":
        z = z * (mean_before / z.mean())
    return z


class PromptEncoder:
    """Encodes prompts for one loaded model; caches each distinct (text, chunk count) so a prompt schedule
    re-encodes only when its text changes."""

    def __init__(self, model, *, clip_skip: int = 1, emphasis: str = "Original"):
        self.model = model
        self.clip_skip = clip_skip
        self.emphasis = emphasis
        self._cache: dict[tuple[str, int], Conditioning] = {}

    def chunk_count(self, text: str) -> int:
        return max(1, len(tokenize_weighted(self.model.tokenizer, text).ids))

    @torch.no_grad()
    def encode(self, text: str, n_chunks: int | None = None) -> Conditioning:
        n = n_chunks or self.chunk_count(text)
        key = (text, n)
        if key not in self._cache:
            self._cache[key] = self._encode(text, n)
        return self._cache[key]

    def _encode(self, text: str, n: int) -> Conditioning:
        m = self.model
        family = m.kind.family
        if family == "sdxl":
            c1 = tokenize_weighted(m.tokenizer, text)
            c2 = tokenize_weighted(m.tokenizer_2, text)
            layer = -2 - (self.clip_skip - 1)
            h1, w1, _ = _encode_chunks(m.text_encoder, m.tokenizer, c1, n, layer, final_norm=False)
            h2, w2, pooled = _encode_chunks(m.text_encoder_2, m.tokenizer_2, c2, n, layer, final_norm=False)
            z = torch.cat([_apply_weights(h1, w1, self.emphasis), _apply_weights(h2, w2, self.emphasis)], dim=-1)
            return Conditioning(z, pooled)
        chunks = tokenize_weighted(m.tokenizer, text)
        if self.clip_skip > 1:
            h, w, _ = _encode_chunks(
                m.text_encoder, m.tokenizer, chunks, n, -self.clip_skip, final_norm=True
            )
        else:
            h, w, _ = _encode_chunks(m.text_encoder, m.tokenizer, chunks, n, None, final_norm=False)
        return Conditioning(_apply_weights(h, w, self.emphasis))
