"""The built-in diffusion upscaler's trainer (ldm_core.train.sr): a few steps on a tiny UNet over a tiny factor-4
VAE write a StableDiffusionUpscalePipeline folder that the upscaler registry lists and runs 4x like Stability's
x4 upscaler; the edge measure of sr-eval tells a blurred edge from a sharp one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_core.config import DiffusionUpscaleOptions
from ldm_core.train import shapes
from ldm_core.train.sr import (
    SOFT_EDGE,
    X4_SCALING,
    SRTrainOptions,
    border_mask,
    edge_ratio,
    new_unet,
    photo_crops,
    train_sr,
)
from ldm_core.upscalers import UpscalerRegistry

BUILTIN = Path(__file__).resolve().parents[1] / "models" / "builtin"


def test_a_few_steps_make_an_upscaler_the_registry_runs(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        scaling_factor=0.9,  # the built-in VAE's is about 0.9: the UNet learns latents at that scale
    )
    vae.save_pretrained(str(tmp_path / "f4" / "vae"))
    out = tmp_path / "SD-Upscale" / "builtin-x4"
    o = SRTrainOptions(base=str(BUILTIN), vae=str(tmp_path / "f4"), out=str(out), work_dir=str(tmp_path / "work"),
                       scenes=16, photo_crops=4, dead_leaves=3, crop=16, channels=(16, 32), batch=4, steps=3,
                       warmup_steps=1)
    record = train_sr(o, log=lambda m: None)
    assert record["steps"] == 3 and (out / "TRAINING.json").is_file()
    cache = torch.load(tmp_path / "work" / "sr-cache.pt", weights_only=True)
    assert len(cache["caption"]) == 16 + 4 + 3 and (cache["caption"][-7:] == cache["empty"]).all()
    ck = torch.load(tmp_path / "work" / "sr-train.pt", weights_only=True)  # resumable
    from safetensors.torch import load_file

    exported = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    name = "conv_in.weight"
    index = [n for n, _ in new_unet((16, 32), 128, 4).named_parameters()]
    averaged = ck["average"][index.index(name)]
    assert torch.allclose(exported[name].float(), averaged, atol=1e-3)  # the exported UNet is the average
    assert not torch.allclose(exported[name].float(), ck["unet"][name], atol=1e-6)  # not the last trained weights
    # the x4 pipeline forces its VAE's scaling factor to 0.08333 and decodes latents / 0.08333: the exported VAE
    # must turn the latents the UNet learnt (this VAE's, times 0.9) into the same images
    x = shapes.render(shapes.sample_scenes("vae", 2), 64) * 2 - 1
    exported_vae = AutoencoderKL.from_pretrained(str(out / "vae")).float()
    assert exported_vae.config.scaling_factor == X4_SCALING
    with torch.no_grad():
        learnt = vae.encode(x).latent_dist.mean * 0.9
        assert torch.allclose(exported_vae.encode(x).latent_dist.mean * X4_SCALING, learnt, atol=2e-3)
        want = vae.decode(learnt / 0.9).sample
        assert torch.allclose(exported_vae.decode(learnt / X4_SCALING).sample, want, atol=2e-2)
    reg = UpscalerRegistry([out.parent], builtin=None, diffusion=DiffusionUpscaleOptions(steps=2))
    assert "builtin-x4" in reg.names()
    image = shapes.to_pil(shapes.render(shapes.sample_scenes("t", 1), 24)[0])
    assert reg.upscale(image, "builtin-x4", scale=4).size == (96, 96)


def test_dead_leaves_images_have_photographs_statistics():
    """Occluding discs with radii ~ r^-3: covered, in the palette's colours, a spectrum falling about as 1/f^2."""
    from ldm_core.train.dead_leaves import dead_leaves, disc_radii

    palette = np.array([[200, 30, 30], [20, 20, 180], [240, 240, 240], [10, 90, 10]], np.uint8)
    a = dead_leaves(128, np.random.default_rng(1), palette, blur_share=0.0)
    assert a.shape == (128, 128, 3) and a.dtype == np.uint8
    assert np.array_equal(a, dead_leaves(128, np.random.default_rng(1), palette, blur_share=0.0))  # seeded
    exact = (a[:, :, None, :] == palette[None, None]).all(-1).any(-1)
    assert exact.mean() > 0.6  # disc interiors are palette colours; only the antialiased rims mix them
    assert len({tuple(c) for c in a[exact]}) == 4

    r = disc_radii(np.random.default_rng(0), 20000, 1.0, 64.0)
    assert r.min() >= 1.0 and r.max() <= 64.0
    assert abs((r < 2.0).mean() - 0.75) < 0.02  # p(r) ~ r^-3: three quarters of the discs below twice r_min

    def slope(img):
        g = img.astype(np.float32).mean(2)
        power = np.abs(np.fft.fftshift(np.fft.fft2(g - g.mean()))) ** 2
        y, x = np.indices(power.shape)
        ring = np.hypot(x - 64, y - 64).astype(int)
        profile = np.bincount(ring.ravel(), power.ravel()) / np.bincount(ring.ravel())
        f = np.arange(4, 60)
        return np.polyfit(np.log(f), np.log(profile[f]), 1)[0]

    slopes = [slope(dead_leaves(128, np.random.default_rng(s), blur_share=0.0)) for s in range(6)]
    assert all(-3.2 < k < -1.6 for k in slopes)  # natural images: about -2
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3)).astype(np.uint8)
    assert abs(slope(noise)) < 0.5  # white noise is flat: the test tells the two apart


def test_edge_ratio_tells_blur_from_sharp():
    scene = shapes.sample_scenes("edges", 1)
    hr, cov = shapes.render_packed(shapes.pack_scenes(scene), 256, with_coverage=True)
    gt = np.asarray(shapes.to_pil(hr[0]))
    low = shapes.to_pil(shapes.render(scene, 64)[0])
    mask = border_mask(cov[0, 0].numpy())
    assert mask.any() and not mask.all()
    assert abs(edge_ratio(gt, gt, mask) - 1) < 1e-6
    blurred = np.asarray(low.resize((256, 256), Image.BILINEAR))
    assert edge_ratio(blurred, gt, mask) < 0.8


SHIPPED_X4 = Path(__file__).resolve().parents[1] / "models" / "SD-Upscale" / "ldm-builtin-x4"


def test_shipped_diffusion_upscaler_draws_the_scene_4x_as_sharp_as_the_truth():
    """The shipped diffusion upscaler (<= 20 MB), as Extras runs it (the default registry, default settings):
    held-out built-in-world scenes drawn at 64 px come out at 256 px with every object's shape and colour read
    back, edges steeper than Lanczos's and none visibly soft (below sr-eval's SOFT_EDGE line, 0.9 of the true
    render's steepness), and PSNR above 28 dB."""
    from ldm_core.train.analyser import analyse
    from ldm_core.train.upscaler import psnr

    size = sum(f.stat().st_size for f in SHIPPED_X4.rglob("*.safetensors"))
    assert size <= 20e6
    reg = UpscalerRegistry([])
    assert "ldm-builtin-x4" in reg.names()
    for i, scene in enumerate(shapes.sample_scenes("sr-test", 3)):
        packed = shapes.pack_scenes([scene])
        hr, cov = shapes.render_packed(packed, 256, with_coverage=True)
        gt = np.asarray(shapes.to_pil(hr[0]))
        low = shapes.to_pil(shapes.render_packed(packed, 64)[0])
        low.info["parameters"] = f"{scene.caption}\nSteps: 20, Seed: {i}"  # Extras prompts with the image's own
        out = np.asarray(reg.upscale(low, "ldm-builtin-x4", scale=4))
        mask = border_mask(cov[0, 0].numpy())
        lanczos = np.asarray(low.resize((256, 256), Image.LANCZOS))
        assert psnr(out, gt) > 28, (i, scene.caption)
        assert edge_ratio(out, gt, mask) > max(SOFT_EDGE, edge_ratio(lanczos, gt, mask)), (i, scene.caption)
        found = analyse(out)
        for obj in scene.objects:
            assert found.find(shape=obj.shape, colour=obj.colour) is not None, (i, scene.caption, found.objects)


def test_init_unet_starts_from_an_upscaler_folders_unet(tmp_path):
    """`sr --init-unet F` starts from F's UNet (e.g. to continue the shipped upscaler on a new VAE); a UNet of
    other channels is refused, naming the option."""
    import pytest
    from safetensors.torch import load_file

    base = dict(base=str(BUILTIN), scenes=4, photo_crops=0, crop=16, batch=2, warmup_steps=1, ema_decay=0.0)
    first = tmp_path / "first"
    train_sr(SRTrainOptions(out=str(first), channels=(16, 32), steps=2, **base), log=lambda m: None)
    second = tmp_path / "second"
    train_sr(SRTrainOptions(out=str(second), channels=(16, 32), steps=0, init_unet=str(first), **base),
             log=lambda m: None)
    a = load_file(str(first / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(second / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="--init-unet"):
        train_sr(SRTrainOptions(out=str(tmp_path / "third"), channels=(16, 16), steps=0, init_unet=str(first), **base),
                 log=lambda m: None)


def test_a_distilled_narrower_text_encoder_trains_into_an_upscaler_that_carries_it(tmp_path):
    """`text-distill` writes a CLIPTextModel of the base's vocabulary `hidden` wide that explains more of the
    teacher's projected caption states after training than before; `sr --text-encoder` builds the UNet's
    cross-attention at that width and exports the narrow encoder, which the upscaler registry runs."""
    import json

    import pytest
    from transformers import CLIPTextModel

    from ldm_core.train.text_distill import DistillOptions, distill_text_encoder

    te = tmp_path / "te16"
    o = DistillOptions(base=str(BUILTIN), out=str(te), hidden=16, layers=1, heads=2, steps=40, batch=16, log_every=0)
    rec = distill_text_encoder(o, log=lambda m: None)
    assert 0 < rec["variance_kept_by_projection"] <= 1 and rec["heldout_r2"] > rec["heldout_r2_before"]
    student = CLIPTextModel.from_pretrained(str(te / "text_encoder"))
    assert student.config.hidden_size == 16 and student.config.vocab_size == 49408
    assert json.loads((te / "TRAINING.json").read_text())["steps"] == 40
    with pytest.raises(ValueError, match="hidden: 15 is not a multiple of heads"):
        distill_text_encoder(DistillOptions(base=str(BUILTIN), out=str(tmp_path / "x"), hidden=15), log=lambda m: None)

    out = tmp_path / "SD-Upscale" / "narrow-x4"
    o = SRTrainOptions(base=str(BUILTIN), text_encoder=str(te), out=str(out), scenes=4, photo_crops=0, crop=16,
                       channels=(16, 32), batch=2, steps=1, warmup_steps=1, work_dir=str(tmp_path / "work"))
    train_sr(o, log=lambda m: None)
    with pytest.raises(SystemExit, match="caption cache is 16 wide, this text encoder 128"):  # resumed, base's
        train_sr(SRTrainOptions(**{**o.__dict__, "text_encoder": "", "steps": 2}), log=lambda m: None)
    assert json.loads((out / "unet" / "config.json").read_text())["cross_attention_dim"] == 16
    assert json.loads((out / "text_encoder" / "config.json").read_text())["hidden_size"] == 16
    reg = UpscalerRegistry([out.parent], builtin=None, diffusion=DiffusionUpscaleOptions(steps=2))
    image = shapes.to_pil(shapes.render(shapes.sample_scenes("t", 1), 24)[0])
    assert reg.upscale(image, "narrow-x4", scale=4).size == (96, 96)


def test_photo_crops_tile_a_photograph_from_its_top_left_corner():
    im = np.arange(600 * 530 * 3, dtype=np.int64).reshape(600, 530, 3).astype(np.uint8)
    crops = photo_crops(im)
    assert len(crops) == 4 and all(c.shape == (256, 256, 3) for c in crops)  # 2 down x 2 across; the rest is left
    assert np.array_equal(crops[0], im[:256, :256]) and np.array_equal(crops[3], im[256:512, 256:512])
    small = photo_crops(im[:150, :203])  # smaller than a crop: one crop of its size, trimmed to a multiple of 4
    assert len(small) == 1 and small[0].shape == (148, 200, 3)
