"""Upscaler registry, spandrel model upscalers, tiled inference, latent modes, SD upscale and the upscaler
trainer (tiny models, CPU, seconds)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ldm_core.generation_requests import Img2ImgRequest, RequestError  # noqa: E402
from ldm_core.pipeline.sd_upscale import sd_upscale  # noqa: E402
from ldm_core.tiling import TileGrid, tile_starts, tiled_apply  # noqa: E402
from ldm_core.upscalers import (  # noqa: E402
    BUILTIN_UPSCALER,
    UpscalerRegistry,
    latent_modes,
    upscale_latents,
)

A1111_LATENT_MODES = [
    "Latent",
    "Latent (antialiased)",
    "Latent (bicubic)",
    "Latent (bicubic antialiased)",
    "Latent (nearest)",
    "Latent (nearest-exact)",
]


def _compact(num_conv: int = 2, feat: int = 8, scale: int = 2, seed: int = 0) -> torch.nn.Module:
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(seed)
    return Compact(num_in_ch=3, num_out_ch=3, num_feat=feat, num_conv=num_conv, upscale=scale).eval()


def _esrgan(seed: int = 0) -> torch.nn.Module:
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    return ESRGAN(num_filters=8, num_blocks=1, scale=2).eval()


def _save(model: torch.nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth gradient with a few antialiased shapes: something with edges to upscale."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : h * 4, 0 : w * 4].astype(np.float32)
    base = np.stack([xx / (w * 4) * 200 + 30, yy / (h * 4) * 180 + 40, (xx + yy) / ((w + h) * 4) * 150 + 60], -1)
    im = Image.fromarray(base.astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = rng.integers(0, w * 4 - 20), rng.integers(0, h * 4 - 20)
        s = int(rng.integers(12, max(13, min(w, h) * 2)))
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)((x0, y0, x0 + s, y0 + s), fill=col)
    return im.resize((w, h), Image.LANCZOS)


@pytest.fixture()
def upscaler_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ESRGAN"
    _save(_compact(), d / "tiny-compact-x2.safetensors")
    _save(_esrgan(), d / "tiny_esrgan_2x.safetensors")
    _save(_compact(seed=1), d / "tiny-pickled.pth")
    return d


def _registry(d: Path, **kw) -> UpscalerRegistry:
    kw.setdefault("builtin", None)
    return UpscalerRegistry([d, d.parent / "missing"], device="cpu", dtype=torch.float32, **kw)


# ---- latent modes ------------------------------------------------------------------------------------
def test_latent_modes_are_a1111_names_and_give_the_asked_size():
    assert latent_modes() == A1111_LATENT_MODES
    x = torch.randn(2, 4, 8, 12)
    for mode in latent_modes():
        y = upscale_latents(x, mode, (16, 20))
        assert y.shape == (2, 4, 16, 20) and y.dtype == x.dtype
    near = upscale_latents(x, "Latent (nearest)", (16, 24))
    assert torch.equal(near[:, :, ::2, ::2], x)  # nearest x2 repeats the pixels
    assert not torch.allclose(upscale_latents(x, "Latent", (16, 24)), upscale_latents(x, "Latent (bicubic)", (16, 24)))
    with pytest.raises(RequestError, match="choose one of"):
        upscale_latents(x, "Bilinear", (16, 24))


# ---- registry ----------------------------------------------------------------------------------------
def test_registry_lists_basic_models_and_infos(upscaler_dir: Path):
    reg = _registry(upscaler_dir)
    names = reg.names()
    assert names[:3] == ["None", "Lanczos", "Nearest"]
    assert {"tiny-compact-x2", "tiny_esrgan_2x", "tiny-pickled"} <= set(names)
    assert not set(latent_modes()) & set(names)
    infos = {i["name"]: i for i in reg.infos()}
    assert set(infos["tiny-compact-x2"]) == {"name", "model_name", "model_path", "model_url", "scale"}
    assert infos["tiny-compact-x2"]["scale"] == 2 and infos["tiny-compact-x2"]["model_url"] is None
    assert infos["tiny-compact-x2"]["model_path"].endswith("tiny-compact-x2.safetensors")
    assert infos["Lanczos"]["model_path"] is None
    with pytest.raises(RequestError, match="choose one of") as err:
        reg.upscale(Image.new("RGB", (8, 8)), "4x-UltraSharp", scale=2)
    assert err.value.field == "upscaler"


def test_spandrel_loads_written_models_and_upscales_exact_sizes(upscaler_dir: Path):
    reg = _registry(upscaler_dir, tile=32, overlap=8)
    img = _photo(37, 29)
    compact = reg.load("tiny-compact-x2")
    assert compact.architecture.name == "RealESRGAN Compact" and compact.scale == 2
    assert reg.upscale(img, "tiny-compact-x2", scale=2).size == (74, 58)
    assert reg.upscale(img, "tiny_esrgan_2x", size=(50, 40)).size == (50, 40)
    assert reg.load("tiny_esrgan_2x").architecture.name == "ESRGAN"
    assert reg.upscale(img, "Lanczos", scale=1.5).size == (56, 44)
    assert reg.upscale(img, "Nearest", scale=2).getpixel((1, 1)) == img.getpixel((0, 0))
    rgba = img.convert("RGBA")
    rgba.putalpha(77)
    out = reg.upscale(rgba, "tiny-compact-x2", scale=2)
    assert out.mode == "RGBA" and out.getpixel((10, 10))[3] == 77


def test_pickled_upscaler_refused_unless_allowed(upscaler_dir: Path):
    img = _photo(16, 16)
    with pytest.raises(RequestError, match="pickle") as err:
        _registry(upscaler_dir).upscale(img, "tiny-pickled", scale=2)
    assert err.value.field == "upscaler"
    out = _registry(upscaler_dir, allow_pickle=True).upscale(img, "tiny-pickled", scale=2)
    assert out.size == (32, 32)


def test_real_esrgan_style_nested_pth_loads_when_allowed(tmp_path: Path):
    d = tmp_path / "RealESRGAN"
    d.mkdir()
    torch.save({"params_ema": _compact().state_dict()}, d / "nested_x2.pth")
    out = _registry(d, allow_pickle=True).upscale(_photo(16, 16), "nested_x2", scale=2)
    assert out.size == (32, 32)


def test_model_is_repeated_when_scale_exceeds_native(upscaler_dir: Path):
    reg = _registry(upscaler_dir, tile=16, overlap=4)
    calls: list[tuple[int, int]] = []
    out = reg.upscale(_photo(20, 12), "tiny-compact-x2", scale=3, progress=lambda d, t: calls.append((d, t)))
    assert out.size == (60, 36)
    # pass 1 on 20x12 (2 tiles), pass 2 on 40x24 (3x2 tiles), then Lanczos down to 60x36
    total = len(TileGrid(20, 12, 16, 16, 4)) + len(TileGrid(40, 24, 16, 16, 4))
    assert calls[-1] == (total, total) and [d for d, _ in calls] == list(range(1, total + 1))
    # a target no larger than the image does not run the model
    assert reg.upscale(_photo(20, 12), "tiny-compact-x2", scale=0.5).size == (10, 6)


def test_extension_upscaler_registered_and_resized_exactly(upscaler_dir: Path):
    reg = _registry(upscaler_dir)
    seen = []

    def double(image: Image.Image, scale: float) -> Image.Image:
        seen.append(scale)
        return image.resize((image.width * 2, image.height * 2), Image.NEAREST)

    reg.register("Doubler", double, scale=2)
    assert "Doubler" in reg.names()
    reg.refresh()
    assert reg.names()[-1] == "Doubler"
    assert reg.upscale(_photo(10, 10), "Doubler", size=(25, 15)).size == (25, 15)
    assert seen == [2.5]
    with pytest.raises(ValueError):
        reg.register("Lanczos", double)


def test_builtin_upscaler_ships_loads_and_beats_lanczos():
    assert BUILTIN_UPSCALER.is_file(), f"the built-in upscaler ships with the repo: {BUILTIN_UPSCALER}"
    assert BUILTIN_UPSCALER.stat().st_size < 5_000_000
    reg = UpscalerRegistry([], device="cpu", dtype=torch.float32, tile=64, overlap=16)
    name = BUILTIN_UPSCALER.stem
    assert name in reg.names()
    desc = reg.load(name)
    assert desc.architecture.name == "RealESRGAN Compact" and desc.scale == 2
    assert reg.upscale(_photo(30, 20), name, scale=2).size == (60, 40)
    # the held-out photographs (never trained on): 128 px centre crops, bicubic-downscaled x2
    pytest.importorskip("skimage")
    from ldm_core.train.upscaler import psnr, skimage_images

    _, held, _ = skimage_images()
    gains = []
    for hr in held:
        y, x = (hr.shape[0] - 128) // 2, (hr.shape[1] - 128) // 2
        hr = hr[y : y + 128, x : x + 128]
        lr = Image.fromarray(hr).resize((64, 64), Image.BICUBIC)
        ours = psnr(np.asarray(reg.upscale(lr, name, scale=2)), hr)
        gains.append(ours - psnr(np.asarray(lr.resize((128, 128), Image.LANCZOS)), hr))
    assert min(gains) > 0 and sum(gains) / len(gains) > 0.3, gains


# ---- tiling ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("w,h,tile,overlap", [(300, 200, 64, 16), (65, 64, 64, 16), (200, 50, 48, 16)])
def test_tile_weights_are_a_partition_of_unity(w, h, tile, overlap):
    grid = TileGrid(w, h, tile, tile, overlap)
    for scale in (1, 2):
        total = torch.zeros(h * scale, w * scale)
        for t in grid.tiles:
            wt = grid.weight(t, scale)
            assert wt.shape == (t.h * scale, t.w * scale)
            total[t.y * scale : (t.y + t.h) * scale, t.x * scale : (t.x + t.w) * scale] += wt
        assert torch.allclose(total, torch.ones_like(total), atol=1e-6)
    starts = tile_starts(w, tile, overlap)
    assert starts[0] == 0 and starts[-1] == w - min(tile, w)
    assert all(b - a <= min(tile, w) - overlap for a, b in zip(starts, starts[1:], strict=False))


def test_tiled_equals_untiled_when_receptive_field_fits_the_margin():
    model = _compact(num_conv=2)  # 4 convolutions: receptive radius 4 px <= overlap / 4
    x = torch.rand(1, 3, 70, 90)
    with torch.no_grad():
        full = model(x)
        tiled = tiled_apply(x, model, tile=48, overlap=16)
    assert tiled.shape == full.shape
    assert torch.allclose(tiled, full, atol=1e-5)


def _near_inner_edges(grid: TileGrid, radius: int, scale: int) -> torch.Tensor:
    """Output px within `radius` input px of any tile edge that lies inside the image."""
    mask = torch.zeros(grid.height * scale, grid.width * scale, dtype=torch.bool)
    for t in grid.tiles:
        for edge in (t.x, t.x + t.w):
            if 0 < edge < grid.width:
                mask[:, max(0, edge - radius) * scale : (edge + radius) * scale] = True
        for edge in (t.y, t.y + t.h):
            if 0 < edge < grid.height:
                mask[max(0, edge - radius) * scale : (edge + radius) * scale, :] = True
    return mask


def test_tiled_seams_bounded_for_wide_receptive_fields():
    model = _compact(num_conv=10, feat=8)  # 12 convolutions: radius 12 px > the 4 px margin
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 15, 20), size=(120, 160), mode="bilinear")
    with torch.no_grad():
        full = model(x)
        tiled = tiled_apply(x, model, tile=64, overlap=16)
    diff = (tiled - full).abs()[0].amax(0)
    near_seam = _near_inner_edges(TileGrid(160, 120, 64, 64, 16), 12, 2)
    assert near_seam.any() and (~near_seam).any()
    assert diff[~near_seam].max() < 1e-5  # away from seams: identical
    assert 0 < diff.max() < 0.25 * full.std()  # at seams: different, but little next to the image's variation
    # no visible step: neighbouring-pixel differences of the tiled output stay like the untiled ones
    for dim in (-1, -2):
        step_t = tiled.diff(dim=dim).abs().max()
        step_f = full.diff(dim=dim).abs().max()
        assert step_t < step_f * 1.25 + 1e-3


# ---- SD upscale --------------------------------------------------------------------------------------
class _Stub:
    """A stand-in for Engine.generate: returns each init image changed by `fn`, records the requests."""

    def __init__(self, fn=lambda im, i: im, stop_after: int | None = None):
        self.fn, self.stop_after, self.requests = fn, stop_after, []

    def __call__(self, request):
        self.requests.append(request)
        n = len(self.requests)
        images = [self.fn(im.resize((request.width, request.height)), n) for im in request.init_images]
        return type(
            "R",
            (),
            {
                "images": images,
                "infotexts": [f"tile job {n}"] * len(images),
                "interrupted": self.stop_after is not None and n >= self.stop_after,
            },
        )()


def test_sd_upscale_tiles_and_blends_to_the_target_size():
    reg = UpscalerRegistry([], device="cpu", builtin=None)
    src = _photo(60, 44)
    req = Img2ImgRequest.build(init_images=[src], width=64, height=64, seed=5, prompt="x", denoising_strength=0.3)
    identity = _Stub()
    res = sd_upscale(req, identity, reg, upscaler="Lanczos", scale=2, overlap=16)
    big = src.resize((120, 88), Image.LANCZOS)
    assert res.images[0].size == (120, 88) and res.seeds == [5]
    grid = TileGrid(120, 88, 64, 64, 16)
    assert len(identity.requests) == len(grid) == res.tiles
    assert all(
        r.width == 64
        and r.height == 64
        and r.seed == 5
        and r.init_images[0].size == (64, 64)
        and r.denoising_strength == 0.3
        and r.prompt == "x"
        for r in identity.requests
    )
    diff = np.abs(np.asarray(res.images[0], int) - np.asarray(big, int))
    assert diff.max() <= 1  # identity tiles blend back to the upscaled image
    # per-tile brightness: overlaps blend smoothly between the tiles' values
    bright = _Stub(lambda im, n: Image.new("RGB", im.size, (n * 20,) * 3))
    out = np.asarray(sd_upscale(req, bright, reg, upscaler="Nearest", scale=2, overlap=16).images[0], int)
    assert out[0, 0, 0] == 20 and out[-1, -1, 0] == len(grid) * 20
    row = out[0, :, 0]
    assert np.all(np.diff(row) >= 0) and np.abs(np.diff(row)).max() < 20  # ramps, no jumps


def test_sd_upscale_batches_iterations_and_interrupts():
    reg = UpscalerRegistry([], device="cpu", builtin=None)
    src = _photo(40, 40)
    req = Img2ImgRequest.build(init_images=[src], width=64, height=64, seed=9, batch_size=2, n_iter=2)
    stub = _Stub()
    res = sd_upscale(req, stub, reg, upscaler="Lanczos", scale=2, overlap=16)
    assert len(res.images) == 2 and res.seeds == [9, 10] and res.infotexts[0] == "tile job 1"
    assert all(len(r.init_images) == r.batch_size <= 2 for r in stub.requests)
    stopping = _Stub(lambda im, n: Image.new("RGB", im.size, (255, 0, 0)), stop_after=1)
    res = sd_upscale(req, stopping, reg, upscaler="Lanczos", scale=2, overlap=16)
    assert res.interrupted and len(res.images) == 1 and len(stopping.requests) == 1
    assert res.images[0].getpixel((0, 0)) == (255, 0, 0)  # the tile that ran
    big = src.resize((80, 80), Image.LANCZOS)
    assert res.images[0].getpixel((79, 79)) == big.getpixel((79, 79))  # the rest: the upscaled image


# ---- trainer -----------------------------------------------------------------------------------------
def test_trainer_smoke_writes_a_spandrel_loadable_fp16_file(tmp_path: Path):
    from ldm_core.train.upscaler import UpscalerSpec, load_data_npz, save_data_npz, save_upscaler, train

    imgs = [np.asarray(_photo(64, 64, seed=s)) for s in range(3)]
    npz = tmp_path / "data.npz"
    save_data_npz(npz, imgs[:2], imgs[2:])
    train_imgs, held = load_data_npz(npz)
    assert len(train_imgs) == 2 and len(held) == 1 and np.array_equal(held[0], imgs[2])
    spec = UpscalerSpec(scale=2, num_feat=8, num_conv=2)
    model, result = train(train_imgs, held, spec=spec, steps=3, batch=2, patch=32, eval_every=0, log_fn=lambda s: None)
    assert result["steps"] == 3 and math.isfinite(result["psnr"]) and math.isfinite(result["psnr_lanczos"])
    out = tmp_path / "ESRGAN" / "trained-x2.safetensors"
    save_upscaler(model, out, spec, {"steps": 3})
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["architecture"] == "Compact"
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    reg = _registry(out.parent)
    assert reg.upscale(_photo(20, 20), "trained-x2", scale=2).size == (40, 40)
