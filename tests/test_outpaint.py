"""Outpainting: the grown canvas, its mask (new area + blend band), the InpaintRequest, "Resize and fill"."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ldm_core.generation_requests import InpaintRequest, RequestError  # noqa: E402
from ldm_core.pipeline.images import paste_back  # noqa: E402
from ldm_core.pipeline.outpaint import (  # noqa: E402
    outpaint_canvas,
    outpaint_mask,
    outpaint_request,
    resize_and_fill_canvas,
)


def _img(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_outpaint_grows_canvas_and_mask_covers_new_area_plus_band():
    img = _img(64, 48)
    op = outpaint_canvas(img, left=16, down=24, blend=8)
    assert op.canvas.size == (80, 72) and op.box == (16, 0, 80, 48)
    canvas, mask = np.asarray(op.canvas), np.asarray(op.mask)
    assert np.array_equal(canvas[0:48, 16:80], np.asarray(img))  # original kept in place
    new = np.ones((72, 80), bool)
    new[0:48, 16:80] = False
    assert (mask[new] == 255).all()
    inner = mask[0:48, 16:80]
    assert (inner[:-8, 8:] == 0).all()  # beyond the band on the grown sides (left, bottom): untouched
    assert (inner[:, 0] > 200).all() and (inner[-1, :] > 200).all()  # the band starts high at the seam...
    assert np.all(np.diff(inner[10, :9].astype(int)) < 0) and inner[10, 8] == 0  # ...and falls to 0 in 8 px
    assert (inner[:, -1][:-8] == 0).all() and (inner[0, :][8:] == 0).all()  # sides that did not grow: no band
    # the new area starts from the edge colours, not black
    assert canvas[60:, :16].mean() > 20


def test_grown_axes_are_rounded_to_multiples_of_8():
    op = outpaint_canvas(_img(50, 30), right=5, up=3)
    assert op.canvas.size == (56, 40) and op.box == (0, 10, 50, 40)  # 33 -> 40: the extra goes up
    assert outpaint_canvas(_img(50, 30), left=10).canvas.size == (64, 30)  # height did not grow: kept


def test_paste_back_keeps_the_original_outside_the_band():
    img = _img(64, 64)
    op = outpaint_canvas(img, left=32, right=32, up=16, down=16, blend=12)
    generated = _img(*op.canvas.size, seed=1)  # whatever the model painted
    out = np.asarray(paste_back(op.canvas, generated, op.mask, None))
    x0, y0, x1, y1 = op.box
    keep = np.asarray(op.mask) == 0
    assert keep.sum() == (64 - 24) * (64 - 24)
    assert np.array_equal(out[keep], np.asarray(op.canvas)[keep])
    assert np.array_equal(out[keep], np.asarray(img)[12:52, 12:52].reshape(-1, 3))
    assert np.array_equal(out[0, 0], np.asarray(generated)[0, 0])  # new area: painted


def test_outpaint_request_is_an_inpaint_request():
    req = outpaint_request(_img(64, 64), right=64, prompt="a wide view", seed=3, denoising_strength=0.9)
    assert isinstance(req, InpaintRequest)
    assert (req.width, req.height) == (128, 64) and req.init_images[0].size == (128, 64)
    assert req.mask.size == (128, 64) and req.mask_blur == 0 and req.inpainting_fill == "fill"
    assert req.prompt == "a wide view" and req.seed == 3 and req.denoising_strength == 0.9
    assert outpaint_request(_img(60, 60), up=8, mask_blur=4).width == 64  # un-grown 60 px axis works at 64
    with pytest.raises(RequestError):
        outpaint_request(_img(64, 64))
    with pytest.raises(RequestError):
        outpaint_canvas(_img(64, 64), left=-8)
    with pytest.raises(RequestError):
        outpaint_canvas(_img(64, 64), right=4000)


def test_resize_and_fill_inpaints_the_bars():
    op = resize_and_fill_canvas(_img(100, 50), 64, 64, blend=4)
    assert op.canvas.size == (64, 64) and op.box == (0, 16, 64, 48)
    mask = np.asarray(op.mask)
    assert (mask[:16] == 255).all() and (mask[48:] == 255).all()
    assert (mask[20:44] == 0).all()  # inside the image, beyond the 4 px bands
    assert (mask[16:20, 0] > 0).all()
    assert outpaint_mask((10, 10), (0, 0, 10, 10), 4).getextrema() == (0, 0)  # nothing grown: nothing masked
