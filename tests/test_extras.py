"""Extras: upscaler 1 + 2 blended by visibility, resize by factor / to size with crop, batches, folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ldm_core.extras import (  # noqa: E402
    ExtrasParams,
    output_size,
    postprocess_text,
    upscale_batch,
    upscale_folder,
    upscale_image,
)
from ldm_core.generation_requests import RequestError  # noqa: E402
from ldm_core.outputs import read_image_info  # noqa: E402
from ldm_core.upscalers import UpscalerRegistry  # noqa: E402


@pytest.fixture()
def reg() -> UpscalerRegistry:
    return UpscalerRegistry([], device="cpu", builtin=None)


def _img(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_scale_by_two_gives_exactly_twice_the_size(reg):
    for w, h in [(37, 23), (64, 64), (1, 5)]:
        out = upscale_image(_img(w, h), ExtrasParams(upscaler_1="Lanczos", upscaling_resize=2), reg)
        assert out.size == (2 * w, 2 * h)
    out = upscale_image(_img(10, 10), ExtrasParams(upscaler_1="Nearest", upscaling_resize=2.5), reg)
    assert out.size == (25, 25)


def test_upscaler_2_visibility_blends(reg):
    img = _img(20, 16)
    lanczos = np.asarray(img.resize((40, 32), Image.LANCZOS), float)
    nearest = np.asarray(img.resize((40, 32), Image.NEAREST), float)
    assert np.abs(lanczos - nearest).max() > 50  # the two really differ

    def run(v: float) -> np.ndarray:
        p = ExtrasParams(upscaler_1="Lanczos", upscaler_2="Nearest", extras_upscaler_2_visibility=v)
        return np.asarray(upscale_image(img, p, reg), float)

    assert np.array_equal(run(0.0), lanczos)
    assert np.array_equal(run(1.0), nearest)
    assert np.abs(run(0.25) - (0.75 * lanczos + 0.25 * nearest)).max() <= 1.0


def test_resize_to_size_with_and_without_crop(reg):
    img = _img(100, 50)
    crop = ExtrasParams(upscaler_1="Nearest", resize_mode=1, upscaling_resize_w=64, upscaling_resize_h=64)
    out = upscale_image(img, crop, reg)
    assert out.size == (64, 64)
    # scaled by max(64/100, 64/50) = 1.28 to 128x64, then centre-cropped: columns 32..95
    full = img.resize((128, 64), Image.NEAREST)
    assert np.array_equal(np.asarray(out), np.asarray(full.crop((32, 0, 96, 64))))
    no_crop = ExtrasParams(
        upscaler_1="Nearest", resize_mode="Scale to", upscaling_resize_w=64, upscaling_resize_h=64, upscaling_crop=False
    )
    assert upscale_image(img, no_crop, reg).size == (128, 64)
    assert output_size((100, 50), crop) == ((128, 64), (64, 64))


def test_none_leaves_the_image_and_bad_values_are_request_errors(reg):
    img = _img(12, 9)
    assert np.array_equal(np.asarray(upscale_image(img, ExtrasParams(), reg)), np.asarray(img))
    with pytest.raises(RequestError) as err:
        upscale_image(img, ExtrasParams(upscaler_1="4x-UltraSharp"), reg)
    assert err.value.field == "upscaler_1" and "Lanczos" in err.value.message
    with pytest.raises(RequestError) as err:
        ExtrasParams(upscaler_1="Lanczos", extras_upscaler_2_visibility=1.5)
    assert err.value.field == "extras_upscaler_2_visibility"
    with pytest.raises(RequestError) as err:
        ExtrasParams(upscaling_resize=0)
    assert err.value.field == "upscaling_resize"
    with pytest.raises(RequestError):
        ExtrasParams(resize_mode=2)


def test_from_api_ignores_unknown_keys_and_alpha_survives(reg):
    p = ExtrasParams.from_api(
        {
            "upscaler_1": "Lanczos",
            "upscaling_resize": 3,
            "gfpgan_visibility": 0,
            "image": "data:...",
            "upscaling_resize_w": None,
            "resize_mode": 0,
        }
    )
    assert p.upscaling_resize == 3 and p.upscaling_resize_w == 512
    q = ExtrasParams.from_api(
        {
            "upscaler_1": "Lanczos",
            "upscaling_resize": "2.5",
            "upscaling_crop": "false",
            "resize_mode": "Scale to",
            "upscaling_resize_w": "64",
        }
    )
    assert (q.upscaling_resize, q.upscaling_crop, q.resize_mode, q.upscaling_resize_w) == (2.5, False, 1, 64)
    with pytest.raises(RequestError) as err:
        ExtrasParams.from_api({"upscaling_resize": "twice"})
    assert err.value.field == "upscaling_resize"
    rgba = _img(8, 8).convert("RGBA")
    rgba.putalpha(100)
    out = upscale_image(rgba, p, reg)
    assert out.mode == "RGBA" and out.size == (24, 24) and out.getpixel((5, 5))[3] == 100
    assert postprocess_text((8, 8), p) == "Postprocess upscale by: 3, Postprocess upscaler: Lanczos"


def test_batch_list_and_progress(reg):
    seen = []
    outs = upscale_batch(
        [_img(10, 10), _img(7, 5)], ExtrasParams(upscaler_1="Lanczos"), reg, progress=lambda d, t: seen.append((d, t))
    )
    assert [o.size for o in outs] == [(20, 20), (14, 10)]
    assert seen == [(1, 2), (2, 2)]


def test_folder_in_folder_out(tmp_path: Path, reg):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20, Seed: 1")
    _img(10, 8).save(src / "a.png", pnginfo=info)
    _img(6, 6).save(src / "b.jpg")
    (src / "broken.png").write_bytes(b"not an image")
    (src / "notes.txt").write_text("ignored")
    params = ExtrasParams(upscaler_1="Lanczos", upscaling_resize=2)
    res = upscale_folder(src, dst, params, reg)
    assert [p.name for p in res.written] == ["a.png", "b.png"]
    assert [p.name for p, _ in res.skipped] == ["broken.png"]
    with Image.open(dst / "a.png") as im:
        assert im.size == (20, 16)
        text, manifest, _ = read_image_info(im)
    assert text == "a cat\nSteps: 20, Seed: 1"
    assert manifest["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    again = upscale_folder(src, dst, params, reg)  # never overwrites
    assert [p.name for p in again.written] == ["a-1.png", "b-1.png"]
    with pytest.raises(RequestError):
        upscale_folder(src, src, params, reg)
