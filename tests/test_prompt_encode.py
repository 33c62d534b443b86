"""Prompt encoding on tiny random text encoders: 75-token chunks, comma word-wrap, BREAK, emphasis weights and
their normalisation, clip skip per family, SDXL's two encoders and pooled embedding, caching, and the per-step
prompt schedule (editing, alternation, AND, negative prompt)."""

from __future__ import annotations

import pytest
import torch

from ldm_core.prompts.encode import CHUNK, PromptEncoder, count_tokens, tokenize_weighted
from ldm_core.prompts.schedule import PromptSchedule

WORD = "cat"  # one CLIP token


def words(n: int, word: str = WORD) -> str:
    return " ".join([word] * n)


def reference(encoder, tokenizer, text: str, pad: int, layer=None, final_norm=False) -> torch.Tensor:
    """One 77-token chunk encoded the plain way (what diffusers pipelines do for short prompts)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    row = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [pad] * (CHUNK - len(ids))
    with torch.no_grad():
        out = encoder(torch.tensor([row]), output_hidden_states=True)
    if layer is None:
        return out.last_hidden_state
    h = out.hidden_states[layer]
    return encoder.final_layer_norm(h) if final_norm else h


# ------------------------------------------------------------------------------------------ chunking
@pytest.mark.parametrize(("n", "chunks"), [(0, 1), (1, 1), (75, 1), (76, 2), (150, 2), (151, 3)])
def test_chunk_count_at_75_76_150(sd1, n, chunks):
    enc = PromptEncoder(sd1)
    cond = enc.encode(words(n))
    assert cond.chunks == chunks
    assert cond.embeds.shape == (1, 77 * chunks, 32)
    tc = tokenize_weighted(sd1.tokenizer, words(n))
    assert [len(c) for c in tc.ids] == ([n] if n <= 75 else [75] * (n // 75) + ([n % 75] if n % 75 else []))


def test_each_chunk_is_encoded_on_its_own(sd1):
    enc = PromptEncoder(sd1)
    long = enc.encode(words(75) + " dog").embeds
    first = reference(sd1.text_encoder, sd1.tokenizer, words(75), sd1.tokenizer.eos_token_id)
    second = reference(sd1.text_encoder, sd1.tokenizer, "dog", sd1.tokenizer.eos_token_id)
    assert torch.allclose(long[:, :77], first, atol=1e-6)
    assert torch.allclose(long[:, 77:], second, atol=1e-6)


def test_short_prompt_matches_plain_encoding(sd1):
    got = PromptEncoder(sd1).encode("a red circle on blue").embeds
    want = reference(sd1.text_encoder, sd1.tokenizer, "a red circle on blue", sd1.tokenizer.eos_token_id)
    assert torch.equal(got, want)


def test_padding_to_more_chunks_appends_empty_chunks(sd1):
    enc = PromptEncoder(sd1)
    one = enc.encode("a red circle").embeds
    three = enc.encode("a red circle", 3).embeds
    empty = reference(sd1.text_encoder, sd1.tokenizer, "", sd1.tokenizer.eos_token_id)
    assert three.shape[1] == 3 * 77
    assert torch.equal(three[:, :77], one)
    assert torch.allclose(three[:, 77:154], empty, atol=1e-6)
    assert torch.allclose(three[:, 154:], empty, atol=1e-6)


def test_comma_word_wrap_moves_the_tail_to_the_next_chunk(sd1):
    text = words(70) + ", " + words(10)  # the comma is token 71; 81 tokens in all
    tc = tokenize_weighted(sd1.tokenizer, text)
    assert [len(c) for c in tc.ids] == [71, 10]
    assert tc.token_count == 75 + 10
    tc0 = tokenize_weighted(sd1.tokenizer, text, comma_backtrack=0)
    assert [len(c) for c in tc0.ids] == [75, 6]
    far = words(40) + ", " + words(40)  # comma 35 tokens back: too far, cut at 75
    assert [len(c) for c in tokenize_weighted(sd1.tokenizer, far).ids] == [75, 6]


def test_count_tokens(sd1):
    assert count_tokens(sd1.tokenizer, words(10)) == (10, 75)
    assert count_tokens(sd1.tokenizer, words(76)) == (76, 150)
    assert count_tokens(sd1.tokenizer, "a BREAK b") == (76, 150)


# ---------------------------------------------------------------------------------------------- BREAK
def test_break_starts_a_new_chunk(sd1):
    enc = PromptEncoder(sd1)
    cond = enc.encode("red circle BREAK blue square").embeds
    assert cond.shape[1] == 154
    assert torch.allclose(cond[:, :77], enc.encode("red circle").embeds, atol=1e-6)
    assert torch.allclose(cond[:, 77:], enc.encode("blue square").embeds, atol=1e-6)
    assert enc.chunk_count("BREAK blue") == 2  # like A1111, a leading BREAK closes an empty chunk
    assert enc.chunk_count(words(75) + " BREAK dog") == 2  # a full chunk is not followed by an empty one
    assert enc.chunk_count("break dog") == 1  # only the upper-case word


def test_emphasis_none_keeps_brackets_and_break_as_text(sd1):
    tc = tokenize_weighted(sd1.tokenizer, "(red:1.5) BREAK x", emphasis="None")
    assert len(tc.ids) == 1 and set(tc.weights[0]) == {1.0}
    assert len(tc.ids[0]) > len(tokenize_weighted(sd1.tokenizer, "red x").ids[0])


# -------------------------------------------------------------------------------------------- weights
def test_weights_change_the_embedding_and_original_keeps_the_mean(sd1):
    plain = PromptEncoder(sd1).encode("red circle").embeds
    orig = PromptEncoder(sd1, emphasis="Original").encode("(red:1.5) circle").embeds
    nonorm = PromptEncoder(sd1, emphasis="No norm").encode("(red:1.5) circle").embeds
    ignore = PromptEncoder(sd1, emphasis="Ignore").encode("(red:1.5) circle").embeds
    assert not torch.allclose(orig, plain) and not torch.allclose(nonorm, plain)
    assert not torch.allclose(orig, nonorm)
    assert torch.equal(ignore, plain)
    # "No norm": the weighted token's row is exactly 1.5x, the others untouched
    assert torch.allclose(nonorm[0, 1], plain[0, 1] * 1.5, atol=1e-6)
    assert torch.equal(nonorm[0, 2:], plain[0, 2:])
    # "Original": the whole chunk is rescaled so its mean is the unweighted mean
    assert torch.isclose(orig.mean(), plain.mean(), atol=1e-6)
    assert torch.allclose(orig, nonorm * (plain.mean() / nonorm.mean()), atol=1e-6)


def test_original_normalises_each_chunk_separately(sd1):
    text = "(red:1.5) circle BREAK blue square"
    orig = PromptEncoder(sd1).encode(text).embeds
    plain = PromptEncoder(sd1).encode("red circle BREAK blue square").embeds
    assert torch.equal(orig[:, 77:], plain[:, 77:])  # chunk 2 has no weights: untouched
    assert torch.isclose(orig[:, :77].mean(), plain[:, :77].mean(), atol=1e-6)


def test_bracket_weights_follow_the_parser(sd1):
    tc = tokenize_weighted(sd1.tokenizer, "a ((red)) [blue]")
    assert tc.weights[0] == pytest.approx([1.0, 1.21, 1 / 1.1])


# ------------------------------------------------------------------------------------------ clip skip
def test_clip_skip_sd1_uses_an_earlier_layer_with_final_norm(sd1):
    te = sd1.text_encoder
    skip2 = PromptEncoder(sd1, clip_skip=2).encode("red circle").embeds
    want = reference(te, sd1.tokenizer, "red circle", sd1.tokenizer.eos_token_id, layer=-2, final_norm=True)
    assert torch.allclose(skip2, want, atol=1e-6)
    assert not torch.allclose(skip2, PromptEncoder(sd1).encode("red circle").embeds)


def test_sd2_pads_with_zero_and_uses_the_last_state(sd2):
    got = PromptEncoder(sd2).encode("red circle").embeds
    want = reference(sd2.text_encoder, sd2.tokenizer, "red circle", 0)
    assert torch.equal(got, want)
    eos_padded = reference(sd2.text_encoder, sd2.tokenizer, "red circle", sd2.tokenizer.eos_token_id)
    assert not torch.allclose(got, eos_padded)


def test_sdxl_two_encoders_and_pooled(sdxl):
    enc = PromptEncoder(sdxl)
    cond = enc.encode("red circle")
    w1 = sdxl.text_encoder.config.hidden_size
    w2 = sdxl.text_encoder_2.config.hidden_size
    assert cond.embeds.shape == (1, 77, w1 + w2)  # 768 + 1280 = 2048 on real SDXL
    assert cond.pooled.shape == (1, sdxl.text_encoder_2.config.projection_dim)
    l_part = reference(sdxl.text_encoder, sdxl.tokenizer, "red circle", sdxl.tokenizer.eos_token_id, layer=-2)
    g_part = reference(sdxl.text_encoder_2, sdxl.tokenizer_2, "red circle", 0, layer=-2)
    assert torch.allclose(cond.embeds[..., :w1], l_part, atol=1e-6)
    assert torch.allclose(cond.embeds[..., w1:], g_part, atol=1e-6)
    ids = sdxl.tokenizer_2("red circle", add_special_tokens=False)["input_ids"]
    row = [sdxl.tokenizer_2.bos_token_id, *ids, sdxl.tokenizer_2.eos_token_id] + [0] * (CHUNK - len(ids))
    with torch.no_grad():
        pooled = sdxl.text_encoder_2(torch.tensor([row])).text_embeds
    assert torch.allclose(cond.pooled, pooled, atol=1e-6)
    # long prompts: pooled comes from the first chunk
    long = enc.encode("red circle BREAK " + words(5))
    assert long.embeds.shape[1] == 154 and torch.allclose(long.pooled, pooled, atol=1e-6)


def test_sdxl_clip_skip_1_and_2_are_both_penultimate(sdxl):
    a = PromptEncoder(sdxl, clip_skip=1).encode("red circle").embeds
    b = PromptEncoder(sdxl, clip_skip=2).encode("red circle").embeds
    c = PromptEncoder(sdxl, clip_skip=3).encode("red circle").embeds
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_bad_emphasis_name_is_refused(sd1):
    with pytest.raises(ValueError, match="emphasis"):
        PromptEncoder(sd1, emphasis="Loud")


# -------------------------------------------------------------------------------------------- caching
def test_each_text_is_encoded_once(sd1):
    calls = []
    handle = sd1.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        enc = PromptEncoder(sd1)
        a = enc.encode("red circle")
        b = enc.encode("red circle")
        assert a is b and len(calls) == 1
        enc.encode("red circle", 2)
        assert len(calls) == 2
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------- schedule
def test_schedule_switches_at_the_right_step(sd1):
    enc = PromptEncoder(sd1)
    sched = PromptSchedule(enc, "a [red:blue:0.5] circle", "[ugly:blurry:3]", steps=10)
    for i in range(10):
        neg, parts = sched.texts_at(i)
        assert parts == [("a red circle" if i < 5 else "a blue circle", 1.0)]
        assert neg == ("ugly" if i < 3 else "blurry")
        uncond, conds = sched.at(i)
        assert torch.equal(conds[0][0].embeds, enc.encode(parts[0][0]).embeds)
        assert torch.equal(uncond.embeds, enc.encode(neg).embeds)


def test_schedule_alternation_and_and_parts(sd1):
    enc = PromptEncoder(sd1)
    sched = PromptSchedule(enc, "[red|blue] circle AND square :0.5", "", steps=4)
    seen = [sched.texts_at(i)[1] for i in range(4)]
    assert seen[0] == [("red circle", 1.0), ("square", 0.5)]
    assert seen[1] == [("blue circle", 1.0), ("square", 0.5)]
    assert seen[2] == seen[0] and seen[3] == seen[1]
    _, conds = sched.at(1)
    assert len(conds) == 2 and conds[1][1] == 0.5


def test_schedule_pads_positive_and_negative_to_the_same_chunks(sd1):
    enc = PromptEncoder(sd1)
    sched = PromptSchedule(enc, words(100), "blurry", steps=2)
    uncond, conds = sched.at(0)
    assert uncond.embeds.shape == conds[0][0].embeds.shape == (1, 154, 32)
    sched = PromptSchedule(enc, "red", words(160), steps=2)
    uncond, conds = sched.at(0)
    assert uncond.embeds.shape[1] == conds[0][0].embeds.shape[1] == 231
