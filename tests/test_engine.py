"""The engine end to end on tiny random-weight models: every family in both file layouts, every sampler,
seeds, variation seeds, interrupt/skip, img2img, inpaint (normal and 9-channel models), hires fix, styles,
outputs, bad input, and an exact match against the plain diffusers pipeline."""

from __future__ import annotations

import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_core.config import EngineConfig
from ldm_core.engine import Engine
from ldm_core.generation_requests import GenerationRequest, Img2ImgRequest, InpaintRequest, RequestError
from ldm_core.outputs import read_image_info
from ldm_core.progress import JobContext

SIZE = 64


def make_engine(tmp: Path, models: dict[str, Path], **over) -> Engine:
    """An engine whose checkpoint folder holds exactly `models` (name -> diffusers folder or file)."""
    ckpt = tmp / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True, exist_ok=True)
    for name, src in models.items():
        dst = ckpt / (name + (src.suffix if src.is_file() else ""))
        if not dst.exists():
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy(src, dst)
    cfg = EngineConfig.from_data_dir(tmp, builtin_model_dir=None, **over)
    return Engine(cfg)


def arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im).astype(np.int16)


@pytest.fixture(scope="module")
def sd1_engine(tmp_path_factory, tiny_models):
    tmp = tmp_path_factory.mktemp("eng")
    return make_engine(tmp, {"tiny-sd1": tiny_models["sd1"]["diffusers"]})


def req(**kw):
    base = dict(
        prompt="a red circle",
        negative_prompt="blue",
        steps=3,
        width=SIZE,
        height=SIZE,
        seed=11,
        sampler_name="Euler a",
        save_images=False,
    )
    base.update(kw)
    return GenerationRequest.build(**base)


@pytest.mark.parametrize("family", ["sd1", "sd1_inpaint", "sd2_v", "sdxl"])
@pytest.mark.parametrize("layout", ["diffusers", "single_file"])
def test_every_family_and_layout_generates(tmp_path, tiny_models, family, layout):
    engine = make_engine(tmp_path, {f"m-{family}": tiny_models[family][layout]})
    res = engine.generate(req(steps=2))
    assert len(res.images) == 1 and res.images[0].size == (SIZE, SIZE)
    assert np.asarray(res.images[0]).std() > 0
    model = engine.current_model
    assert model.kind.family == family.split("_")[0]
    assert "Model hash: " + model.sha256[:10] in res.infotexts[0]


def test_both_layouts_give_the_same_image(tmp_path, tiny_models):
    e1 = make_engine(tmp_path / "a", {"a": tiny_models["sd1"]["diffusers"]})
    e2 = make_engine(tmp_path / "b", {"b": tiny_models["sd1"]["single_file"]})
    a = e1.generate(req()).images[0]
    b = e2.generate(req()).images[0]
    assert np.abs(arr(a) - arr(b)).max() <= 1


def test_every_sampler_runs(sd1_engine):
    names = sd1_engine.samplers.names()
    assert len(names) >= 10
    for name in names:
        res = sd1_engine.generate(req(sampler_name=name, steps=4))
        a = np.asarray(res.images[0])
        assert a.shape == (SIZE, SIZE, 3), name
        # a uint8 image is always finite: NaN latents decode to a flat (black) image, so ask for real content
        assert a.std() > 1.0 and 0 < a.max(), name
        assert f"Sampler: {name}" in res.infotexts[0]


def test_seeds_reproducible_and_distinct(sd1_engine):
    a = sd1_engine.generate(req(seed=5)).images[0]
    b = sd1_engine.generate(req(seed=5)).images[0]
    c = sd1_engine.generate(req(seed=6)).images[0]
    assert np.array_equal(arr(a), arr(b))
    assert not np.array_equal(arr(a), arr(c))


def test_batch_seeds_are_seed_plus_i_and_match_single(sd1_engine):
    res = sd1_engine.generate(req(seed=20, batch_size=2, n_iter=2))
    assert res.seeds == [20, 21, 22, 23]
    single = sd1_engine.generate(req(seed=22)).images[0]
    assert np.abs(arr(res.images[2]) - arr(single)).max() <= 1


def test_variation_seed(sd1_engine):
    base = sd1_engine.generate(req(seed=5)).images[0]
    zero = sd1_engine.generate(req(seed=5, subseed=99, subseed_strength=0.0)).images[0]
    half = sd1_engine.generate(req(seed=5, subseed=99, subseed_strength=0.5))
    assert np.array_equal(arr(base), arr(zero))
    assert not np.array_equal(arr(base), arr(half.images[0]))
    assert "Variation seed: 99" in half.infotexts[0]


def test_random_seed_is_resolved_and_recorded(sd1_engine):
    res = sd1_engine.generate(req(seed=-1))
    assert res.seeds[0] >= 0
    assert f"Seed: {res.seeds[0]}" in res.infotexts[0]


def test_resize_seed_from(sd1_engine):
    res = sd1_engine.generate(req(seed=3, seed_resize_from_w=48, seed_resize_from_h=48))
    assert "Seed resize from: 48x48" in res.infotexts[0]


def test_interrupt_returns_partial_image(sd1_engine):
    ctx = JobContext()
    t = _when_step(ctx, 2, ctx.cancel.interrupt)
    res = sd1_engine.generate(req(steps=60, n_iter=3), ctx)
    t.join()
    assert res.interrupted
    assert len(res.images) == 1  # the partial image of the first batch, decoded
    assert ctx.progress.snapshot().job_no == 3 or ctx.progress.snapshot().interrupted


def _when_step(ctx, step, action):
    def watch():
        for _ in range(4000):
            s = ctx.progress.snapshot()
            if s.job_no == 0 and s.step >= step:
                action()
                return
            threading.Event().wait(0.002)

    t = threading.Thread(target=watch)
    t.start()
    return t


def test_skip_moves_to_next_batch(sd1_engine):
    ctx = JobContext()
    t = _when_step(ctx, 1, ctx.cancel.skip)
    res = sd1_engine.generate(req(steps=40, n_iter=2), ctx)
    t.join()
    assert not res.interrupted
    assert res.skipped_batches == 1
    assert len(res.images) == 2  # the partial first image and the complete second one


def test_img2img_strength(sd1_engine):
    init = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))

    def i2i(strength, seed):
        base = {**req().model_dump(exclude={"mode", "denoising_strength"}), "seed": seed}
        return sd1_engine.generate(Img2ImgRequest.build(**base, init_images=[init], denoising_strength=strength))

    keep_a, keep_b = i2i(0.0, 1), i2i(0.0, 2)
    assert "Denoising strength: 0" in keep_a.infotexts[0]
    # strength 0 runs no step: the image is the VAE round trip of the init image, whatever the seed
    assert np.array_equal(arr(keep_a.images[0]), arr(keep_b.images[0]))
    far_a, far_b = i2i(0.9, 1), i2i(0.9, 2)
    assert not np.array_equal(arr(far_a.images[0]), arr(far_b.images[0]))
    assert not np.array_equal(arr(far_a.images[0]), arr(keep_a.images[0]))


def test_hires_fix_size_and_infotext(sd1_engine):
    res = sd1_engine.generate(
        req(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", hr_second_pass_steps=2, denoising_strength=0.5)
    )
    assert res.images[0].size == (96, 96)
    text = res.infotexts[0]
    assert "Size: 64x64" in text and "Hires upscale: 1.5" in text and "Hires upscaler: Latent" in text
    assert "Hires steps: 2" in text and "Denoising strength: 0.5" in text
    res = sd1_engine.generate(req(enable_hr=True, hr_resize_x=128, hr_upscaler="Lanczos", denoising_strength=0.3))
    assert res.images[0].size == (128, 128)
    assert "Hires resize: 128x128" in res.infotexts[0]
    with pytest.raises(RequestError) as exc:
        sd1_engine.generate(req(enable_hr=True, hr_upscaler="nope"))
    assert exc.value.field == "hr_upscaler" and "Lanczos" in exc.value.message


def test_styles_applied(sd1_engine, tmp_path):
    sd1_engine.styles.path.write_text("name,prompt,negative_prompt\nred,{prompt} in red,ugly\n")
    res = sd1_engine.generate(req(prompt="a circle", styles=["red"]))
    assert res.infotexts[0].startswith("a circle in red\nNegative prompt: blue, ugly")
    # A1111 skips style names it does not know (clients send ["None"] or Swagger's ["string"])
    res = sd1_engine.generate(req(prompt="a circle", styles=["missing", "red"]))
    assert res.infotexts[0].startswith("a circle in red\nNegative prompt: blue, ugly")


@pytest.mark.parametrize("family", ["sd1", "sd1_inpaint"])
@pytest.mark.parametrize("fill", ["fill", "original", "latent noise", "latent nothing"])
def test_inpaint_keeps_unmasked_pixels(tmp_path, tiny_models, family, fill):
    engine = make_engine(tmp_path, {family: tiny_models[family]["diffusers"]})
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    r = InpaintRequest.build(
        **{
            **req().model_dump(exclude={"mode"}),
            "init_images": [init],
            "mask": mask,
            "mask_blur": 0,
            "inpainting_fill": fill,
            "denoising_strength": 1.0,
        }
    )
    out = engine.generate(r).images[0]
    a, b = arr(out), arr(init)
    assert np.array_equal(a[:8], b[:8])  # far from the mask: untouched
    assert np.abs(a[20:44, 20:44] - b[20:44, 20:44]).mean() > 5  # inside: repainted


def test_inpaint_repaints_or_keeps_whole_latent_cells(sd1_engine, monkeypatch):
    """A1111 rounds the blurred mask at latent size: a half-kept cell would fade what is drawn at the mask's
    edge towards the original (measured on the built-in model: 'a blue star' in a quadrant landed in 34.5% of
    200 cases with the soft mask)."""
    import ldm_core.engine as engine_module

    masks = []
    real = engine_module.InpaintBlend

    def spy(init_latents, noise, mask):
        masks.append(mask)
        return real(init_latents, noise, mask)

    monkeypatch.setattr(engine_module, "InpaintBlend", spy)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (20, 20, 44, 44))  # edges in the middle of latent cells, and blurred
    r = InpaintRequest.build(
        **{
            **req().model_dump(exclude={"mode"}),
            "init_images": [Image.new("RGB", (SIZE, SIZE), (10, 120, 200))],
            "mask": mask,
            "mask_blur": 4,
            "denoising_strength": 1.0,
        }
    )
    sd1_engine.generate(r)
    values = set(masks[0].unique().tolist())
    assert values == {0.0, 1.0}


def test_inpainting_model_sees_masked_pixels_as_mid_grey(tmp_path, tiny_models, monkeypatch):
    """A 9-channel model's extra input: the latent mask and the latent of the image with its masked pixels at
    0 in [-1, 1], as SD's inpainting models were trained (A1111 and diffusers give them so; black there reads
    to such a model as a black object to keep); in txt2img, all masked: a mask of ones and an all-grey image."""
    from diffusers import AutoencoderKL

    folder = tiny_models["sd1_inpaint"]["diffusers"]
    engine = make_engine(tmp_path, {"sd1_inpaint": folder})
    seen = []
    real = Engine._unet_concat

    def spy(self, job, model, unet_concat, noise):
        out = real(self, job, model, unet_concat, noise)
        seen.append(out)
        return out

    monkeypatch.setattr(Engine, "_unet_concat", spy)
    colour = (200, 30, 30)
    init = Image.new("RGB", (SIZE, SIZE), colour)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    fields = {**req().model_dump(exclude={"mode"}), "init_images": [init], "mask": mask, "mask_blur": 0}
    engine.generate(InpaintRequest.build(**{**fields, "denoising_strength": 1.0}))
    engine.generate(req())
    vae = AutoencoderKL.from_pretrained(str(Path(folder) / "vae"))
    pix = torch.tensor(colour, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, SIZE, SIZE) / 127.5 - 1
    pix = pix.clone()
    pix[:, :, 16:48, 16:48] = 0.0
    with torch.no_grad():
        want = vae.encode(pix).latent_dist.mode() * vae.config.scaling_factor
        want_grey = vae.encode(torch.zeros(1, 3, SIZE, SIZE)).latent_dist.mode() * vae.config.scaling_factor
    got = seen[0][:1].float().cpu()
    f = SIZE // want.shape[-1]
    assert torch.equal(got[:, :1, 16 // f : 48 // f, 16 // f : 48 // f], torch.ones(1, 1, 32 // f, 32 // f))
    assert got[:, :1].sum() == (32 // f) ** 2
    assert torch.allclose(got[:, 1:], want, atol=1e-4)
    txt = seen[-1][:1].float().cpu()
    assert torch.equal(txt[:, :1], torch.ones_like(txt[:, :1]))
    assert torch.allclose(txt[:, 1:], want_grey, atol=1e-4)


def test_inpaint_only_masked(sd1_engine):
    init = Image.new("RGB", (128, 96), (10, 120, 200))
    mask = Image.new("L", (128, 96), 0)
    mask.paste(255, (90, 60, 110, 80))
    r = InpaintRequest.build(
        **{
            **req().model_dump(exclude={"mode"}),
            "init_images": [init],
            "mask": mask,
            "inpaint_full_res": True,
            "inpaint_full_res_padding": 8,
        }
    )
    res = sd1_engine.generate(r)
    assert res.images[0].size == (128, 96)
    assert np.array_equal(arr(res.images[0])[:40, :60], arr(init)[:40, :60])
    assert "Inpaint area: Only masked" in res.infotexts[0]


def test_outputs_saved_with_infotext_and_manifest(tmp_path, tiny_models):
    engine = make_engine(tmp_path, {"tiny": tiny_models["sd1"]["diffusers"]})
    res = engine.generate(req(save_images=True, seed=42, batch_size=2))
    assert len(res.paths) == 2
    for p, text in zip(res.paths, res.infotexts, strict=True):
        assert p.exists() and p.parent.parent.name == "txt2img"
        assert p.name.endswith(".png")
        params, manifest, _ = read_image_info(Image.open(p))
        assert params == text
        assert manifest["model"]["sha256"] == engine.current_model.sha256
        assert manifest["attention"] == engine.attention_choice.name
        assert manifest["dtype"] == "float32" and manifest["device"] == "cpu"
    again = engine.generate(req(save_images=True, seed=42))
    assert again.paths[0] not in res.paths  # never overwrites


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"width": 32}, "width"),
        ({"width": "wide"}, "width"),
        ({"steps": 0}, "steps"),
        ({"steps": "many"}, "steps"),
        ({"cfg_scale": "high"}, "cfg_scale"),
        ({"batch_size": 0}, "batch_size"),
        ({"seed": 2**70}, "seed"),
        ({"enable_hr": True, "hr_scale": 0}, "hr_scale"),
        ({"enable_hr": True, "denoising_strength": -0.1}, "denoising_strength"),
    ],
)
def test_bad_values_name_the_field(kw, field):
    with pytest.raises(RequestError) as exc:
        req(**kw)
    assert exc.value.field == field
    assert field in str(exc.value)


def test_unknown_sampler_and_model_list_choices(sd1_engine):
    with pytest.raises(RequestError) as exc:
        sd1_engine.generate(req(sampler_name="No Such Sampler"))
    assert exc.value.field == "sampler_name" and "Euler a" in exc.value.message
    with pytest.raises(RequestError) as exc:
        sd1_engine.generate(req(model="nope"))
    assert exc.value.field == "model" and "tiny-sd1" in exc.value.message


def test_a1111_values_are_accepted_with_a1111_meaning():
    # A1111 resizes the mask with the image: a mask of another size is stretched onto it
    init = Image.new("RGB", (64, 64))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    r = InpaintRequest.build(prompt="x", init_images=[init], mask=mask, mask_blur=-1)
    assert r.mask.size == (64, 64) and r.mask.getpixel((5, 30)) == 255 and r.mask.getpixel((60, 30)) == 0
    assert r.mask_blur_xy == (0, 0)  # A1111 blurs only for values above 0
    # sizes are kept as sent (the engine rounds them down to the model's VAE factor: LoadedModel.work_size);
    # -1 sentinels and ranges A1111 does not impose are accepted; hires fields are not looked at with hires off
    g = GenerationRequest.build(
        width=65,
        height=127,
        seed_resize_from_h=-1,
        seed_resize_from_w=-1,
        steps=500,
        cfg_scale=-2,
        eta=3,
        hr_scale=0,
        hr_resize_x=-1,
        denoising_strength=5,
        subseed_strength=2,
        seed=-5,
    )
    assert (g.width, g.height, g.steps, g.cfg_scale, g.seed) == (65, 127, 500, -2, -5)  # any negative: random
    assert Img2ImgRequest.build(init_images=[init], denoising_strength=1.5).denoising_strength == 1.0


def test_legacy_sampler_alias(sd1_engine):
    res = sd1_engine.generate(req(sampler_name="DPM++ 2M Karras"))
    assert "Sampler: DPM++ 2M" in res.infotexts[0] and "Schedule type: Karras" in res.infotexts[0]


def test_matches_plain_diffusers_pipeline(tmp_path, tiny_models):
    """Same model, sampler, steps, seed and prompt: the engine's txt2img equals diffusers' own pipeline."""
    from diffusers import StableDiffusionPipeline

    folder = tiny_models["sd1"]["diffusers"]
    engine = make_engine(tmp_path, {"tiny": folder})
    r = req(sampler_name="Euler", steps=5, cfg_scale=6.0)
    ours = engine.generate(r).images[0]
    pipe = StableDiffusionPipeline.from_pretrained(
        folder,
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = engine.samplers.create("Euler", "Automatic", dict(engine.current_model.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        r.prompt,
        negative_prompt=r.negative_prompt,
        num_inference_steps=5,
        guidance_scale=6.0,
        width=SIZE,
        height=SIZE,
        generator=torch.Generator("cpu").manual_seed(11),
    ).images[0]
    assert np.abs(arr(ours) - arr(theirs)).max() <= 2


def test_no_network_during_load_and_generation(tmp_path, tiny_models, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    engine = make_engine(tmp_path, {"x": tiny_models["sdxl"]["single_file"]})
    engine.generate(req(steps=2))


def test_sd_upscale_with_the_real_engine(sd1_engine):
    """SD upscale end to end on the tiny model: upscale x2, img2img tile by tile, blend to the target size."""
    from ldm_core.pipeline.sd_upscale import sd_upscale

    init = Image.new("RGB", (64, 64), (40, 160, 90))
    base = {**req().model_dump(exclude={"mode", "denoising_strength", "width", "height"})}
    r = Img2ImgRequest.build(**base, init_images=[init], denoising_strength=0.3, width=64, height=64)
    res = sd_upscale(r, sd1_engine.generate, sd1_engine.upscalers, upscaler="Lanczos", scale=2.0, overlap=16)
    assert res.images[0].size == (128, 128)
    assert res.tiles > 1
