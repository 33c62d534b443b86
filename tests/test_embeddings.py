"""Textual-inversion embeddings: files built by the tests in the A1111, diffusers and SDXL formats are picked
up by their file name in a prompt, give exactly the conditioning of the words their vectors were copied
from, leave the shared tokenizer and text encoder unchanged, and report "TI hashes"."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm_core.prompts.embeddings import EmbeddingLibrary, parse_embedding
from ldm_core.prompts.encode import PromptEncoder, tokenize_weighted


def token_vectors(encoder, tokenizer, text: str) -> torch.Tensor:
    """The token-embedding rows of `text`: an embedding made of them must act exactly like the text."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return encoder.get_input_embeddings().weight[ids].detach().clone()


@pytest.fixture()
def emb_dir(tmp_path: Path, sd1, sdxl) -> Path:
    d = tmp_path / "embeddings"
    (d / "sub").mkdir(parents=True)
    # A1111 / civitai safetensors: emb_params (2 vectors)
    save_file(
        {"emb_params": token_vectors(sd1.text_encoder, sd1.tokenizer, "green star")},
        d / "mystyle.safetensors",
    )
    # diffusers format {token: vector} (1 vector), in a subfolder
    save_file(
        {"<tok>": token_vectors(sd1.text_encoder, sd1.tokenizer, "purple")[0]},
        d / "sub" / "purplish.safetensors",
    )
    # SDXL pair
    save_file(
        {
            "clip_l": token_vectors(sdxl.text_encoder, sdxl.tokenizer, "green star"),
            "clip_g": token_vectors(sdxl.text_encoder_2, sdxl.tokenizer_2, "green star"),
        },
        d / "xlstyle.safetensors",
    )
    (d / "broken.safetensors").write_bytes(b"not a safetensors file")
    return d


def test_library_lists_names_and_entries(emb_dir):
    lib = EmbeddingLibrary([emb_dir])
    assert lib.names() == ["broken", "mystyle", "purplish", "xlstyle"]
    entries = {e.name: e for e in lib.entries(hashes=True)}
    assert entries["mystyle"].vectors == 2 and entries["mystyle"].shape == 32
    assert entries["xlstyle"].family == "sdxl"
    assert entries["broken"].error
    want = hashlib.sha256((emb_dir / "mystyle.safetensors").read_bytes()).hexdigest()
    assert entries["mystyle"].sha256 == want


def test_embedding_is_picked_up_by_name_and_acts_like_its_words(sd1, emb_dir):
    lib = EmbeddingLibrary([emb_dir])
    with_lib = PromptEncoder(sd1, embeddings=lib)
    plain = PromptEncoder(sd1)
    got = with_lib.encode("a mystyle on blue").embeds
    assert torch.allclose(got, plain.encode("a green star on blue").embeds, atol=1e-6)
    assert not torch.allclose(got, plain.encode("a mystyle on blue").embeds)
    assert torch.allclose(with_lib.encode("purplish circle").embeds, plain.encode("purple circle").embeds, atol=1e-6)
    assert with_lib.infotext_params() == {
        "TI hashes": f"mystyle: {lib.short_hash('mystyle')}, purplish: {lib.short_hash('purplish')}"
    }
    assert len(lib.short_hash("mystyle")) == 12
    assert plain.infotext_params() == {}


def test_shared_model_is_unchanged_after_an_embedding_job(sd1, emb_dir):
    before = PromptEncoder(sd1).encode("a red circle").embeds
    weight = sd1.text_encoder.get_input_embeddings().weight.detach().clone()
    vocab = len(sd1.tokenizer)
    PromptEncoder(sd1, embeddings=EmbeddingLibrary([emb_dir])).encode("a mystyle and a purplish")
    assert torch.equal(PromptEncoder(sd1).encode("a red circle").embeds, before)
    assert torch.equal(sd1.text_encoder.get_input_embeddings().weight, weight)
    assert len(sd1.tokenizer) == vocab
    assert not sd1.text_encoder.get_input_embeddings()._forward_hooks


def test_embedding_takes_the_weight_of_its_brackets(sd1, emb_dir):
    lib = EmbeddingLibrary([emb_dir])
    weighted = PromptEncoder(sd1, embeddings=lib, emphasis="No norm").encode("a (mystyle:1.5)").embeds
    words = PromptEncoder(sd1, emphasis="No norm").encode("a (green star:1.5)").embeds
    assert torch.allclose(weighted, words, atol=1e-6)


def test_embedding_never_straddles_two_chunks(sd1, emb_dir):
    lib = EmbeddingLibrary([emb_dir])
    enc = PromptEncoder(sd1, embeddings=lib)
    tc = enc.tokenize(" ".join(["cat"] * 74) + " mystyle")[0]
    assert [len(c) for c in tc.ids] == [74, 2]
    assert tc.fixes[1][0][0] == 0 and tc.fixes[1][0][1] == "mystyle"


def test_wrong_family_embedding_stays_text(sd1, sdxl, emb_dir):
    lib = EmbeddingLibrary([emb_dir])
    # an SDXL embedding on SD1 and an SD1 embedding on SDXL are not used (as in A1111)
    assert torch.equal(
        PromptEncoder(sd1, embeddings=lib).encode("xlstyle").embeds,
        PromptEncoder(sd1).encode("xlstyle").embeds,
    )
    assert torch.equal(
        PromptEncoder(sdxl, embeddings=lib).encode("mystyle").embeds,
        PromptEncoder(sdxl).encode("mystyle").embeds,
    )


def test_sdxl_embedding_feeds_both_encoders(sdxl, emb_dir):
    lib = EmbeddingLibrary([emb_dir])
    got = PromptEncoder(sdxl, embeddings=lib).encode("a xlstyle")
    want = PromptEncoder(sdxl).encode("a green star")
    assert torch.allclose(got.embeds, want.embeds, atol=1e-6)
    assert torch.allclose(got.pooled, want.pooled, atol=1e-6)


def test_a1111_pt_and_diffusers_bin_through_the_safe_loader(sd1, tmp_path):
    vec = token_vectors(sd1.text_encoder, sd1.tokenizer, "green star")
    d = tmp_path / "emb"
    d.mkdir()
    torch.save({"<x>": vec[0]}, d / "learned.bin")  # diffusers learned_embeds.bin
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": vec},
            "name": "old",
            "step": 500,
            "sd_checkpoint_name": "base",
        },
        d / "old.pt",
    )
    refused = EmbeddingLibrary([d])  # pickles refused by default: the names stay plain text
    assert all(e.error for e in refused.entries())
    assert torch.equal(
        PromptEncoder(sd1, embeddings=refused).encode("learned").embeds,
        PromptEncoder(sd1).encode("learned").embeds,
    )
    lib = EmbeddingLibrary([d], allow_pickle=True)
    assert lib.load("learned").n_vectors == 1
    old = lib.load("old")  # an A1111 .pt: nested dicts pass through the safe loader (flattened)
    assert old.n_vectors == 2
    got = PromptEncoder(sd1, embeddings=lib).encode("an old").embeds
    assert torch.allclose(got, PromptEncoder(sd1).encode("an green star").embeds, atol=1e-6)


def test_parse_formats():
    v = torch.randn(3, 8)
    p = Path("x.pt")
    assert torch.equal(parse_embedding({"string_to_param": {"*": v}}, "x", p).vectors[""], v)
    assert torch.equal(parse_embedding({"string_to_param.*": v}, "x", p).vectors[""], v)
    assert torch.equal(parse_embedding({"emb_params": v}, "x", p).vectors[""], v)
    assert parse_embedding({"<t>": v[0]}, "x", p).vectors[""].shape == (1, 8)
    xl = parse_embedding({"clip_l": v, "clip_g": torch.randn(3, 16)}, "x", p)
    assert set(xl.vectors) == {"clip_l", "clip_g"}
    with pytest.raises(ValueError):
        parse_embedding({"a": v, "b": v}, "x", p)


def test_names_match_like_the_tokenizer(sd1, emb_dir):
    lib = EmbeddingLibrary([emb_dir])
    enc = PromptEncoder(sd1, embeddings=lib)
    assert enc.tokenize("MyStyle")[0].fixes[0]  # CLIP lower-cases, so does matching
    assert not enc.tokenize("mystyles")[0].fixes[0]  # another word
    assert tokenize_weighted(sd1.tokenizer, "mystyle").fixes == [[]]  # no library, no match
