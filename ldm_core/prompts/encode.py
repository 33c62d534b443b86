"""Prompt text -> UNet conditioning, for SD 1.x (CLIP-L), SD 2.x (OpenCLIP-H, penultimate layer), SDXL
(CLIP-L + OpenCLIP-bigG, pooled embedding) and the SDXL refiner (OpenCLIP-bigG alone, pooled embedding); the
size/crop/aesthetic-score conditioning is `time_ids`'.

Long prompts are cut into 75-token chunks, each wrapped in BOS/EOS and padded to 77 tokens and encoded
separately; the chunk embeddings are concatenated along the sequence axis. `BREAK` ends the current chunk
(also an empty one). When a chunk fills up, the tokens after its last comma move to the next chunk if that
comma is at most `comma_backtrack` tokens back (A1111's "prompt word wrap length limit", default 20).

Each token carries the weight the emphasis syntax gave it; the hidden states are multiplied by it. Emphasis
modes (A1111's names): "Original" rescales each weighted chunk so its mean is unchanged, "No norm" does not,
"Ignore" drops the weights, "None" does not parse emphasis at all (brackets and BREAK are plain text).

Which hidden state (A1111 and Forge agree on clip skip 1 and 2):

* SD 1.x: clip skip N takes the hidden state N-1 layers before the last, then the final layer norm.
* SD 2.x: the diffusers text encoder already ends at OpenCLIP's penultimate layer; clip skip counts from
  there.
* SDXL: both encoders use the penultimate hidden state without the final norm; clip skip 1 and 2 both mean
  that, 3 and more go further back. The pooled embedding is CLIP-G's projection of chunk 0's EOS state.
* SDXL refiner: CLIP-G alone, with SDXL's rules (diffusers' refiner pipeline encodes with `text_encoder_2`
  only, A1111's refiner has only that embedder).

Padding after EOS: CLIP-L encoders pad with EOS, OpenCLIP encoders (SD2, SDXL's second) with token 0.

An empty negative prompt on a model whose pipeline config sets `force_zeros_for_empty_prompt` (SDXL) is
conditioned on zeros: hidden states and pooled embedding, as A1111 (for every SDXL model) and diffusers do.
Only the exact empty text counts (after extra-network tags are removed), per prompt-editing step; an empty
positive prompt is still encoded. The SDXL refiner follows A1111 here, which zeroes the empty negative prompt's
text embeddings for every SDXL-architecture model, although the refiner's diffusers config sets
`force_zeros_for_empty_prompt: false` (its time ids keep the low aesthetic score).

Textual-inversion embeddings (`embeddings.EmbeddingLibrary`) are used by writing their name: the name's
tokens are replaced by the embedding's vectors. The vectors are written into the output of the text
encoder's token-embedding layer through a forward hook that exists only during that encoder call, so the
shared tokenizer and text encoder are never changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..devices import execution_device
from ..generation_requests import RequestError
from .parser import BREAK_WEIGHT, parse_prompt_attention

CHUNK = 75  # tokens of text per chunk (77 with BOS and EOS)
EMPHASIS_MODES: tuple[str, ...] = ("Original", "No norm", "Ignore", "None")
COMMA_BACKTRACK = 20  # A1111's default "prompt word wrap length limit", in tokens
_PLACEHOLDER = 0  # token id written where embedding vectors go (replaced before the first layer)


@dataclass
class Conditioning:
    """Text conditioning of one prompt. `embeds` is (1, 77*k, D) with D = 768 (SD1), 1024 (SD2), 2048
    (SDXL: CLIP-L 768 then CLIP-G 1280) or 1280 (SDXL refiner: CLIP-G); `pooled` is (1, 1280) for SDXL and
    the refiner, else None."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    @property
    def chunks(self) -> int:
        return self.embeds.shape[1] // (CHUNK + 2)


@dataclass
class TokenChunks:
    """Token ids and per-token weights of one prompt, in chunks of at most 75 (without BOS/EOS).

    `fixes[i]` lists (offset, name, vectors) for chunk i: `vectors` (n, D) replace the token embeddings at
    positions offset .. offset+n-1 of the chunk (0-based, not counting BOS).
    """

    ids: list[list[int]]
    weights: list[list[float]]
    fixes: list[list[tuple[int, str, torch.Tensor]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        while len(self.fixes) < len(self.ids):
            self.fixes.append([])

    @property
    def token_count(self) -> int:
        """Tokens as A1111's counter shows them: every chunk but the last counts as a full 75."""
        if not self.ids:
            return 0
        return CHUNK * (len(self.ids) - 1) + len(self.ids[-1])


class EmbeddingLookup:
    """Finds textual-inversion names in a token stream, for one tokenizer and one text encoder.

    `library` is an `embeddings.EmbeddingLibrary`; `role` says which vectors of an embedding fit this encoder
    ("" for SD1/SD2's single encoder, "clip_l" or "clip_g" for SDXL's) and `dim` is the encoder's width. An
    embedding whose vectors do not fit is not matched (its name stays plain text). Names are matched as
    token sequences, longest first, so matching is as case-insensitive as the tokenizer.
    """

    def __init__(self, library, tokenizer, role: str, dim: int):
        self.library = library
        self.role = role
        self.dim = dim
        self.used: dict[str, str] = {}  # name -> 12-hex hash of every embedding matched so far
        self._by_first: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        for name in library.names():
            ids = tuple(tokenizer(name, add_special_tokens=False, truncation=False)["input_ids"])
            if ids:
                self._by_first.setdefault(ids[0], []).append((ids, name))
        for cands in self._by_first.values():
            cands.sort(key=lambda c: -len(c[0]))

    def match(self, tokens: Sequence[int], pos: int) -> tuple[str, torch.Tensor, int] | None:
        """(name, vectors (n, D), tokens consumed) of the embedding whose name starts at `pos`, or None."""
        for ids, name in self._by_first.get(tokens[pos], ()):
            if tuple(tokens[pos : pos + len(ids)]) != ids:
                continue
            vectors = self.library.vectors(name, self.role, self.dim)
            if vectors is None:
                continue
            self.used[name] = self.library.short_hash(name)
            return name, vectors, len(ids)
        return None


def tokenize_weighted(
    tokenizer,
    text: str,
    *,
    emphasis: str = "Original",
    lookup: EmbeddingLookup | None = None,
    comma_backtrack: int = COMMA_BACKTRACK,
) -> TokenChunks:
    """Split a prompt into 75-token chunks with per-token weights, honouring BREAK, comma word-wrap and
    textual-inversion names (see the module docstring). A prompt always gives at least one chunk."""
    parsed = [(text, 1.0)] if emphasis == "None" else parse_prompt_attention(text)
    comma = _comma_id(tokenizer)
    out = TokenChunks([], [], [])
    ids: list[int] = []
    weights: list[float] = []
    fixes: list[tuple[int, str, torch.Tensor]] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, fixes, last_comma
        out.ids.append(ids)
        out.weights.append(weights)
        out.fixes.append(fixes)
        ids, weights, fixes, last_comma = [], [], [], -1

    for fragment, weight in parsed:
        if emphasis != "None" and fragment == "BREAK" and weight == BREAK_WEIGHT:
            close()
            continue
        if emphasis == "Ignore":
            weight = 1.0
        tokens = tokenizer(fragment, add_special_tokens=False, truncation=False)["input_ids"]
        pos = 0
        while pos < len(tokens):
            tok = tokens[pos]
            if tok == comma:
                last_comma = len(ids)
            elif (
                comma_backtrack > 0
                and len(ids) == CHUNK
                and last_comma != -1
                and len(ids) - last_comma <= comma_backtrack
            ):
                cut = last_comma + 1
                moved = ids[cut:], weights[cut:], [(o - cut, n, v) for o, n, v in fixes if o >= cut]
                ids, weights, fixes = ids[:cut], weights[:cut], [f for f in fixes if f[0] < cut]
                close()
                ids, weights, fixes = list(moved[0]), list(moved[1]), moved[2]
            if len(ids) == CHUNK:
                close()
            found = lookup.match(tokens, pos) if lookup is not None else None
            if found is None:
                ids.append(tok)
                weights.append(weight)
                pos += 1
                continue
            name, vectors, consumed = found
            vectors = vectors[:CHUNK]
            if len(ids) + len(vectors) > CHUNK:
                close()
            fixes.append((len(ids), name, vectors))
            ids.extend([_PLACEHOLDER] * len(vectors))
            weights.extend([weight] * len(vectors))
            pos += consumed
    if ids or not out.ids:
        close()
    return out


def count_tokens(tokenizer, text: str) -> tuple[int, int]:
    """(tokens used, token limit) for a prompt, as the UI's counter shows them: the limit grows by 75 per
    chunk; a BREAK counts the rest of its chunk as used."""
    chunks = tokenize_weighted(tokenizer, text)
    used = chunks.token_count
    return used, max(1, -(-used // CHUNK)) * CHUNK


def _comma_id(tokenizer) -> int | None:
    ids = tokenizer(",", add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


@dataclass
class _Side:
    """One text encoder with its tokenizer and the rules for using it."""

    encoder: torch.nn.Module
    tokenizer: object
    role: str  # "" (the only text encoder of SD1/SD2), "clip_l" or "clip_g" (SDXL's two)
    pad_id: int
    layer: int | None  # None: last_hidden_state (final norm included); -k: hidden_states[-k]
    final_norm: bool  # apply the final layer norm to hidden_states[layer]
    lookup: EmbeddingLookup | None = None


@contextmanager
def _token_embedding_fixes(encoder: torch.nn.Module, fixes: list[list[tuple[int, str, torch.Tensor]]]):
    """Within the block, the encoder's token-embedding layer writes each chunk's embedding vectors over the
    placeholder positions (offset + 1 for BOS). The hook is removed on exit."""
    if not any(fixes):
        yield
        return

    def hook(_module, _inputs, output):
        output = output.clone()
        for row, chunk_fixes in enumerate(fixes):
            for offset, _name, vectors in chunk_fixes:
                output[row, 1 + offset : 1 + offset + len(vectors)] = vectors.to(output.device, output.dtype)
        return output

    handle = encoder.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _text_model(encoder: torch.nn.Module) -> torch.nn.Module:
    """The CLIP text transformer (transformers 5's CLIPTextModel is one; ...WithProjection wraps one)."""
    return getattr(encoder, "text_model", encoder)


def _apply_weights(z: torch.Tensor, w: torch.Tensor, emphasis: str) -> torch.Tensor:
    """Multiply hidden states z (k, 77, D) by token weights w (k, 77); "Original" restores each chunk's
    mean afterwards (A1111's normalisation)."""
    if emphasis in ("Ignore", "None") or bool(torch.all(w == 1.0)):
        return z
    mean_before = z.mean(dim=(1, 2), keepdim=True)
    z = z * w.unsqueeze(-1)
    if emphasis == "Original":
        mean_after = z.mean(dim=(1, 2), keepdim=True)
        # a chunk whose mean is exactly 0 (possible after the final layer norm) stays as it is, not 0/0
        ratio = torch.where(mean_after == 0, torch.ones_like(mean_after), mean_before / mean_after)
        z = z * ratio
    return z


def _encode_side(
    side: _Side, chunks: TokenChunks, n_chunks: int, emphasis: str, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run one text encoder over the chunks (padded to `n_chunks` with empty ones) where its weights are, or
    on `device` when they are offloaded to `meta` (`devices.execution_device`). Returns (hidden
    (1, 77*n_chunks, D) with weights applied, pooled projection of chunk 0 or None)."""
    tok = side.tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    rows, weights, fixes = [], [], []
    for i in range(n_chunks):
        ids = chunks.ids[i] if i < len(chunks.ids) else []
        w = chunks.weights[i] if i < len(chunks.weights) else []
        rows.append([bos, *ids, eos, *([side.pad_id] * (CHUNK - len(ids)))])
        weights.append([1.0, *w, *([1.0] * (CHUNK + 1 - len(w)))])
        fixes.append(chunks.fixes[i] if i < len(chunks.fixes) else [])
    n_layers = getattr(getattr(side.encoder, "config", None), "num_hidden_layers", None)
    # hidden_states holds the embeddings' output and one entry per layer: n_layers + 1 (issue 16: an IndexError)
    if side.layer is not None and n_layers is not None and -side.layer > n_layers + 1:
        raise RequestError(
            "clip_skip", f"is {-side.layer}, but this model's text encoder allows 1..{n_layers + 1} ({n_layers} layers)"
        )
    ids_t = torch.tensor(rows, device=execution_device(side.encoder, device))
    with _token_embedding_fixes(side.encoder, fixes):
        out = side.encoder(ids_t, output_hidden_states=True)
    if side.layer is None:
        hidden = out.last_hidden_state
    else:
        hidden = out.hidden_states[side.layer]
        if side.final_norm:
            hidden = _text_model(side.encoder).final_layer_norm(hidden)
    w_t = torch.tensor(weights, device=hidden.device, dtype=hidden.dtype)
    hidden = _apply_weights(hidden, w_t, emphasis)
    pooled = out.text_embeds[:1] if getattr(out, "text_embeds", None) is not None else None
    return hidden.reshape(1, -1, hidden.shape[-1]), pooled


class PromptEncoder:
    """Encodes prompts for one loaded model (a `LoadedModel`: kind.family, text_encoder, tokenizer and for
    SDXL text_encoder_2, tokenizer_2; the SDXL refiner has only text_encoder_2, tokenizer_2).

    `clip_skip` >= 1 (see the module docstring per family); `emphasis` one of `EMPHASIS_MODES`;
    `embeddings` an `EmbeddingLibrary` or None; `comma_backtrack` tokens (0 disables word wrap);
    `zero_empty_negative` conditions an empty negative prompt on zeros (None: the model's
    `force_zeros_for_empty_prompt` flag, false when it has none; always for the SDXL refiner, as A1111).
    Each distinct (text, chunk count) is encoded once per encoder object, so a prompt schedule re-encodes only
    when its text changes; make a new encoder when the model's weights change (e.g. a LoRA is applied).
    """

    def __init__(
        self,
        model,
        *,
        clip_skip: int = 1,
        emphasis: str = "Original",
        embeddings=None,
        comma_backtrack: int = COMMA_BACKTRACK,
        zero_empty_negative: bool | None = None,
        device: torch.device | str | None = None,
    ):
        if emphasis not in EMPHASIS_MODES:
            raise ValueError(f"emphasis must be one of {', '.join(EMPHASIS_MODES)}; got {emphasis!r}")
        self.model = model
        self.clip_skip = max(1, int(clip_skip))
        self.emphasis = emphasis
        self.embeddings = embeddings
        self.comma_backtrack = comma_backtrack
        if zero_empty_negative is None:
            zero_empty_negative = bool(getattr(model, "force_zeros_for_empty_prompt", False)) or (
                model.kind.family == "sdxl-refiner"  # A1111 zeroes it for the refiner too (see the module doc)
            )
        self.zero_empty_negative = zero_empty_negative
        self.device = device  # where offloaded text encoders (weights on `meta`) execute
        self._sides: list[_Side] | None = None
        self._cache: dict[tuple[str, int | None], Conditioning] = {}
        self._tokens: dict[str, list[TokenChunks]] = {}

    # ---- configuration --------------------------------------------------------------------------------
    def sides(self) -> list[_Side]:
        """The text encoders this model uses, in the order their outputs are concatenated."""
        if self._sides is None:
            m = self.model
            family = m.kind.family
            if family == "sdxl":
                layer = -max(2, self.clip_skip)
                sides = [
                    _Side(m.text_encoder, m.tokenizer, "clip_l", m.tokenizer.eos_token_id, layer, False),
                    _Side(m.text_encoder_2, m.tokenizer_2, "clip_g", 0, layer, False),
                ]
            elif family == "sdxl-refiner":
                sides = [_Side(m.text_encoder_2, m.tokenizer_2, "clip_g", 0, -max(2, self.clip_skip), False)]
            else:
                layer = None if self.clip_skip == 1 else -self.clip_skip
                pad = 0 if family == "sd2" else m.tokenizer.eos_token_id
                sides = [_Side(m.text_encoder, m.tokenizer, "", pad, layer, True)]
            if self.embeddings is not None:
                for s in sides:
                    dim = s.encoder.get_input_embeddings().weight.shape[1]
                    s.lookup = EmbeddingLookup(self.embeddings, s.tokenizer, s.role, dim)
            self._sides = sides
        return self._sides

    # ---- tokens -------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[TokenChunks]:
        """The token chunks of `text` for each text encoder (cached)."""
        if text not in self._tokens:
            self._tokens[text] = [
                tokenize_weighted(
                    s.tokenizer,
                    text,
                    emphasis=self.emphasis,
                    lookup=s.lookup,
                    comma_backtrack=self.comma_backtrack,
                )
                for s in self.sides()
            ]
        return self._tokens[text]

    def chunk_count(self, text: str) -> int:
        """How many 77-token chunks `text` needs (at least 1)."""
        return max(1, *(len(c.ids) for c in self.tokenize(text)))

    def token_count(self, text: str) -> tuple[int, int]:
        """(tokens used, token limit) as the UI's counter shows them, embeddings counted by their vectors."""
        used = max(c.token_count for c in self.tokenize(text))
        return used, max(1, -(-used // CHUNK)) * CHUNK

    # ---- encoding -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, text: str, n_chunks: int | None = None, *, negative: bool = False) -> Conditioning:
        """Conditioning of `text` (emphasis syntax and BREAK allowed; no AND, no editing, no extra-network
        tags: those are resolved before). `n_chunks` pads with empty chunks to that many (never fewer
        than the text needs). `negative` marks the negative prompt: an empty one gives zeros when
        `zero_empty_negative` is set."""
        if negative and text == "" and self.zero_empty_negative:
            encoded = self.encode("", n_chunks)
            pooled = torch.zeros_like(encoded.pooled) if encoded.pooled is not None else None
            return Conditioning(torch.zeros_like(encoded.embeds), pooled)
        asked = (text, n_chunks)
        if asked in self._cache:  # every step of a job asks again: no tokenizing for a text already encoded
            return self._cache[asked]
        n = max(n_chunks or 0, self.chunk_count(text))
        key = (text, n)
        if key not in self._cache:
            parts, pooled = [], None
            for side, chunks in zip(self.sides(), self.tokenize(text), strict=True):
                hidden, p = _encode_side(side, chunks, n, self.emphasis, self.device)
                parts.append(hidden)
                if side.role == "clip_g":
                    pooled = p
            embeds = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
            self._cache[key] = Conditioning(embeds, pooled)
        self._cache[asked] = self._cache[key]
        return self._cache[key]

    def encode_batch(
        self, texts: list[str], n_chunks: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embeds (B, 77*n, D), pooled (B, P) or None) for several texts, without the cache and with
        gradients flowing into the text encoders (for training them)."""
        n = max(n_chunks or 0, *(self.chunk_count(t) for t in texts))
        embeds, pooled = [], []
        for text in texts:
            parts = []
            for side, chunks in zip(self.sides(), self.tokenize(text), strict=True):
                hidden, p = _encode_side(side, chunks, n, self.emphasis, self.device)
                parts.append(hidden)
                if side.role == "clip_g":
                    pooled.append(p)
            embeds.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1))
        return torch.cat(embeds), (torch.cat(pooled) if pooled else None)

    # ---- infotext -----------------------------------------------------------------------------------
    @property
    def used_embeddings(self) -> dict[str, str]:
        """name -> 12-hex hash of every textual-inversion embedding used by the prompts encoded so far."""
        used: dict[str, str] = {}
        for s in self._sides or ():
            if s.lookup is not None:
                used.update(s.lookup.used)
        return used

    def infotext_params(self) -> dict[str, str]:
        """{"TI hashes": "name: hash, ..."} when embeddings were used, else {}."""
        used = self.used_embeddings
        if not used:
            return {}
        return {"TI hashes": ", ".join(f"{name}: {h}" for name, h in used.items())}
