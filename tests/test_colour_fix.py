"""The diffusion upscalers' colour fix (`ldm_core.colour_fix`): large-scale colour from the input, detail from
the output."""

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_core.colour_fix import check_colour_fix, coarse, colour_fix, fix_tensor


def gradient(w: int = 64, h: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([40 + 150 * x / w, 60 + 120 * y / h, np.full_like(x, 90)], -1)


def checker(w: int = 64, h: int = 48, amp: float = 30) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return ((x + y) % 2 * 2 - 1)[..., None].astype(np.float32) * amp * np.ones(3, np.float32)


def img(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))


def test_wavelet_takes_the_inputs_colour_and_keeps_the_outputs_detail():
    truth = gradient() + checker()
    drifted = truth + np.array([25, -20, 30], np.float32)  # a sample whose colour drifted: greener, bluer
    source = img(gradient()).resize((16, 12), Image.BICUBIC)  # the small image it was upscaled from
    fixed = np.asarray(colour_fix(img(drifted), source, "Wavelet")).astype(np.float32)
    # the drift is gone: the mean colour is the truth's within a grey level or two
    assert np.abs(fixed.mean((0, 1)) - truth.mean((0, 1))).max() < 2.5
    assert np.abs(drifted.mean((0, 1)) - truth.mean((0, 1))).max() > 19
    # the one-pixel checker (the output's detail) is kept: its amplitude survives in the high frequencies
    detail = fixed - np.asarray(img(gradient()), np.float32)
    assert np.corrcoef(detail[..., 0].ravel(), checker()[..., 0].ravel())[0, 1] > 0.95


def test_adain_matches_each_channels_mean_and_spread():
    out = torch.rand(1, 3, 32, 32) * 0.2 + 0.6
    ref = torch.rand(1, 3, 32, 32) * 0.8 + 0.1
    y = fix_tensor(out, ref, "adain")
    assert torch.allclose(y.mean((-2, -1)), ref.mean((-2, -1)), atol=1e-4)
    assert torch.allclose(y.std((-2, -1)), ref.std((-2, -1)), atol=1e-3)


def test_none_keeps_the_output_and_unknown_names_fail_with_the_choices():
    out = img(gradient())
    assert colour_fix(out, out.resize((16, 12)), "None") is out
    assert check_colour_fix("wavelet") == "Wavelet" and check_colour_fix(" ADAIN ") == "AdaIN"
    with pytest.raises(ValueError, match="Wavelet, AdaIN, None"):
        check_colour_fix("histogram")


def test_coarse_of_a_flat_image_is_that_image_even_at_small_sizes():
    """Edges are replicated, so a dilation wider than the image (16 px on a 6 px tile) is fine."""
    flat = torch.full((1, 3, 6, 5), 0.3)
    assert torch.allclose(coarse(flat), flat, atol=1e-6)
