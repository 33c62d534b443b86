"""Infotext: the A1111 "parameters" text is written in A1111's layout and key order and reads back exactly."""

import json
import re

import pytest

from ldm_core.infotext import INFOTEXT_KEY_ORDER, build_infotext, parse_infotext

# the regex model-sharing sites and other UIs use on the last line (written out here, not imported)
READER_RE = re.compile(r"""\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)""")

A1111_TEXT = (
    "masterpiece, best quality, 1girl, solo, <lora:add_detail:0.7>,\n"
    "(looking at viewer:1.2), smile, [outdoors|indoors]\n"
    "Negative prompt: (worst quality, low quality:1.4), EasyNegative,\n"
    "bad hands\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3456789012, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, "
    'Hires prompt: "a \\"quoted\\" word, caf\u00e9", Hires upscale: 2, Hires steps: 10, '
    "Hires upscaler: Latent, "
    'Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "EasyNegative: c74b4e810b03", '
    "ADetailer model: face_yolov8n.pt, Version: v1.10.1"
)


def test_a1111_text_parses_and_round_trips_exactly():
    p = parse_infotext(A1111_TEXT)
    assert p["Prompt"] == (
        "masterpiece, best quality, 1girl, solo, <lora:add_detail:0.7>,\n"
        "(looking at viewer:1.2), smile, [outdoors|indoors]"
    )
    assert p["Negative prompt"] == "(worst quality, low quality:1.4), EasyNegative,\nbad hands"
    assert p["Steps"] == "28"
    assert p["Sampler"] == "DPM++ 2M"
    assert p["Schedule type"] == "Karras"
    assert p["Seed"] == "3456789012"
    assert (p["Size"], p["Size-1"], p["Size-2"]) == ("512x768", "512", "768")
    assert p["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert p["TI hashes"] == "EasyNegative: c74b4e810b03"
    assert p["Hires prompt"] == 'a "quoted" word, caf\u00e9'
    assert p["ADetailer model"] == "face_yolov8n.pt"
    assert p["Version"] == "v1.10.1"
    params = {k: v for k, v in p.items() if k not in ("Prompt", "Negative prompt")}
    assert build_infotext(p["Prompt"], p["Negative prompt"], params) == A1111_TEXT


def test_build_layout_order_and_formatting():
    params = {
        "Version": "v1",
        "my ext/key": "on",  # unknown: after the known keys, before Version
        "Seed": 1234,
        "Steps": 20,
        "Clip skip": 1,  # only written when > 1
        "VAE": None,  # left out
        "Model": "",  # left out
        "Size": (512, 768),
        "CFG scale": 7.0,
        "Denoising strength": 0.45,
        "Sampler": "Euler a",
        "another ext": True,
    }
    text = build_infotext("a cat", "", params)
    assert text == (
        "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x768, "
        "Denoising strength: 0.45, my ext/key: on, another ext: True, Version: v1"
    )
    assert "Negative prompt" not in text
    assert INFOTEXT_KEY_ORDER[-1] == "Version"
    assert INFOTEXT_KEY_ORDER[:4] == ("Steps", "Sampler", "Schedule type", "CFG scale")


TRICKY = {
    "Steps": 20,
    "Sampler": "DPM++ 2M SDE",
    "Seed": 7,
    "Size": "64x64",
    "Hires prompt": "line one,\nline two: with colon",
    "Hires negative prompt": '"starts with a quote',
    "Lora hashes": "a: 0123456789ab, b: ba9876543210",
    "Model": "folder/model name (v2)",
    "ext value": "  padded  ",
    "ext backslash": "C:\\models\\x",
    "ext unicode": "\u732b\u3068\u72ac",
    "Version": "test",
}


def test_round_trip_of_tricky_values_is_exact():
    prompt = "line 1 (with: colon), comma\n  indented line 2\nSteps in words, not params"
    negative = "neg 1\nneg: 2"
    text = build_infotext(prompt, negative, TRICKY)
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == prompt
    assert parsed["Negative prompt"] == negative
    for key, value in TRICKY.items():
        assert parsed[key] == str(value)
    params = {k: v for k, v in parsed.items() if k not in ("Prompt", "Negative prompt")}
    assert build_infotext(parsed["Prompt"], parsed["Negative prompt"], params) == text


def test_readers_regex_reads_every_value():
    text = build_infotext("p", "n", TRICKY)
    last = text.split("\n")[-1]
    found = {}
    for key, raw in READER_RE.findall(last):
        found[key] = json.loads(raw) if raw.startswith('"') else raw
    assert found == {k: str(v) for k, v in TRICKY.items()}


def test_text_without_parameters_is_all_prompt():
    assert parse_infotext("just a prompt\nover two lines") == {
        "Prompt": "just a prompt\nover two lines",
        "Negative prompt": "",
    }
    # a prompt line with a few "word: word" pieces is not mistaken for parameters
    p = parse_infotext("masterpiece, style: anime, (cat:1.2)")
    assert p == {"Prompt": "masterpiece, style: anime, (cat:1.2)", "Negative prompt": ""}
    assert parse_infotext("") == {"Prompt": "", "Negative prompt": ""}


def test_missing_negative_and_empty_prompt():
    p = parse_infotext("a dog\nSteps: 20, Sampler: Euler, Seed: 1")
    assert p["Prompt"] == "a dog" and p["Negative prompt"] == "" and p["Seed"] == "1"
    only_neg = build_infotext("", "blurry", {"Steps": 5})
    assert only_neg == "Negative prompt: blurry\nSteps: 5"
    assert parse_infotext(only_neg) == {"Prompt": "", "Negative prompt": "blurry", "Steps": "5"}
    # one known key is enough to recognise our own short parameter lines
    assert parse_infotext(build_infotext("x", "", {"Seed": 3}))["Seed"] == "3"


def test_size_pairs_fold_back_into_size():
    assert build_infotext("x", "", {"Steps": 1, "Size-1": 640, "Size-2": 480}) == "x\nSteps: 1, Size: 640x480"
    text = build_infotext("x", "", {"Steps": 1, "Seed resize from": "256x128"})
    p = parse_infotext(text)
    assert (p["Seed resize from-1"], p["Seed resize from-2"]) == ("256", "128")
    params = {k: v for k, v in p.items() if k not in ("Prompt", "Negative prompt")}
    assert build_infotext("x", "", params) == text


def test_bad_key_is_refused():
    with pytest.raises(ValueError, match="infotext key"):
        build_infotext("x", "", {"bad:key": 1})
