"""Diffusion upscalers (ldm_core.diffusion_upscalers): a tiny random SD x4 upscaler in its real diffusers folder
layout (StableDiffusionUpscalePipeline: factor-4 VAE, 7-channel UNet with noise-level class embedding, CLIP
text encoder, DDPM low-res scheduler) is listed with the model upscalers, upscales through the registry (Extras
and hires fix call it) and the API's /sdapi/v1/upscalers and /extra-single-image, tile by tile for a large
image, reads the image's own prompt from its infotext, and a folder of pickled weights is refused. A tiny SD x2
latent upscaler (StableDiffusionLatentUpscalePipeline: k-diffusion UNet reading latents + the low-res latents)
upscales the hires fix's latents without decoding them, and images through its own VAE."""

from __future__ import annotations

import base64
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from tiny_models import tiny_x4_pipeline

from ldm_core.diffusion_upscalers import DiffusionUpscaleOptions, X4Upscaler, image_prompt
from ldm_core.upscalers import UpscalerRegistry

TOKENIZER = Path(__file__).resolve().parents[1] / "models" / "builtin" / "tokenizer"
FAST = DiffusionUpscaleOptions(steps=2)  # the default 20 steps would only make the tests slower


def tiny_clip():
    """A one-layer CLIP text encoder over the full vocabulary (the shipped tokenizer), 32 wide."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=32,
    )
    return CLIPTextModel(cfg)


def build_tiny_x4(folder: Path) -> Path:
    tiny_x4_pipeline().save_pretrained(str(folder), safe_serialization=True)
    return folder


def build_tiny_x2(folder: Path) -> Path:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionLatentUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTokenizer

    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        act_fn="gelu",
        attention_head_dim=8,
        norm_num_groups=None,
        block_out_channels=[32, 32, 64, 64],
        time_cond_proj_dim=160,  # noise-level embedding (128) + pooled text (32)
        conv_in_kernel=1,
        conv_out_kernel=1,
        cross_attention_dim=32,
        down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
        in_channels=8,
        mid_block_type=None,
        only_cross_attention=False,
        out_channels=5,
        resnet_time_scale_shift="scale_shift",
        time_embedding_type="fourier",
        timestep_post_act="gelu",
        up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"),
    )
    vae = AutoencoderKL(
        block_out_channels=[16, 32, 32, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        norm_num_groups=8,
    )
    te = tiny_clip()
    pipe = StableDiffusionLatentUpscalePipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=CLIPTokenizer.from_pretrained(str(TOKENIZER), local_files_only=True),
        unet=unet,
        scheduler=EulerDiscreteScheduler(prediction_type="sample"),
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def x4_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sdup") / "SD-Upscale"
    build_tiny_x4(root / "tiny-x4")
    build_tiny_x2(root / "tiny-x2-latent")
    return root


def smooth(w: int = 24, h: int = 20) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([x / w, y / h, 0.5 + 0.5 * np.sin(x / 3)], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def test_listed_and_upscales_4x_through_the_registry(x4_dir):
    reg = UpscalerRegistry([x4_dir], builtin=None, diffusion=FAST)
    assert "tiny-x4" in reg.names()
    info = next(i for i in reg.infos() if i["name"] == "tiny-x4")
    assert info["scale"] == 4 and info["model_path"].endswith("tiny-x4")
    out = reg.upscale(smooth(), "tiny-x4", scale=4)
    assert out.size == (96, 80)
    again = reg.upscale(smooth(), "tiny-x4", scale=4)
    assert np.array_equal(np.asarray(out), np.asarray(again))  # fixed seed: the same image
    assert np.asarray(out).std() > 1  # not a flat image
    half = reg.upscale(smooth(), "tiny-x4", scale=2)  # one x4 pass, then Lanczos down to the asked size
    assert half.size == (48, 40)


def test_a_shipped_pipeline_folder_is_listed_beside_the_users_folders(x4_dir, tmp_path):
    """The registry's `builtin` takes pipeline folders as well as files (the project ships its diffusion upscaler
    as one), once even when a scanned folder holds it too."""
    reg = UpscalerRegistry([tmp_path / "none"], builtin=[x4_dir / "tiny-x4"], diffusion=FAST)
    assert "tiny-x4" in reg.names() and "tiny-x2-latent" not in reg.names()
    info = next(i for i in reg.infos() if i["name"] == "tiny-x4")
    assert info["scale"] == 4 and Path(info["model_path"]) == x4_dir / "tiny-x4"
    both = UpscalerRegistry([x4_dir], builtin=[x4_dir / "tiny-x4"], diffusion=FAST)
    assert both.names().count("tiny-x4") == 1 and "tiny-x2-latent" in both.names()


def test_large_images_go_tile_by_tile(x4_dir, monkeypatch):
    reg = UpscalerRegistry([x4_dir], builtin=None, diffusion=FAST)
    seen = []
    upscale = X4Upscaler.upscale

    def counting(self, image, prompt, options, cancel=None):
        seen.append((image.height, image.width))
        return upscale(self, image, prompt, options, cancel)

    monkeypatch.setattr(X4Upscaler, "upscale", counting)
    big = smooth(200, 100)  # two 128 px tiles across, one down
    ticks = []
    out = reg.upscale(big, "tiny-x4", scale=4, progress=lambda d, t: ticks.append((d, t)))
    assert out.size == (800, 400)
    assert len(seen) > 1 and max(max(s) for s in seen) <= 128  # 128 px input tiles
    assert ticks[-1][0] == ticks[-1][1] == len(seen)


def test_prompt_comes_from_the_images_infotext(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a red circle on a blue background\nSteps: 20, Sampler: Euler a, Seed: 1")
    path = tmp_path / "with-info.png"
    smooth().save(path, pnginfo=info)
    with Image.open(path) as im:
        im.load()
        assert image_prompt(im) == "a red circle on a blue background"
        assert image_prompt(im.convert("RGB")) == "a red circle on a blue background"
    assert image_prompt(smooth()) == ""


def test_pickled_folder_refused_unless_allowed(tmp_path, x4_dir):
    import shutil

    from ldm_core.generation_requests import RequestError

    bad = tmp_path / "SD-Upscale" / "pickled-x4"
    shutil.copytree(x4_dir / "tiny-x4", bad)
    for f in bad.rglob("*.safetensors"):
        f.unlink()
    reg = UpscalerRegistry([bad.parent], builtin=None, diffusion=FAST)
    with pytest.raises(RequestError, match="--allow-pickle"):
        reg.upscale(smooth(), "pickled-x4", scale=4)


def test_api_lists_and_runs_it(tmp_path, x4_dir):
    import shutil

    import fastapi
    from fastapi.testclient import TestClient

    from api import install
    from ldm_core.config import EngineConfig
    from ldm_core.service import Service

    shutil.copytree(x4_dir, tmp_path / "models" / "SD-Upscale")
    service = Service(EngineConfig.from_data_dir(tmp_path, builtin_model_dir=None, device="cpu", save_images=False))
    app = fastapi.FastAPI()
    install(app, service)
    try:
        with TestClient(app) as client:
            names = [u["name"] for u in client.get("/sdapi/v1/upscalers").json()]
            assert "tiny-x4" in names
            buf = io.BytesIO()
            smooth().save(buf, format="PNG")
            body = {"image": base64.b64encode(buf.getvalue()).decode(), "upscaler_1": "tiny-x4", "upscaling_resize": 4}
            r = client.post("/sdapi/v1/extra-single-image", json=body)
            assert r.status_code == 200, r.text
            out = Image.open(io.BytesIO(base64.b64decode(r.json()["image"])))
            assert out.size == (96, 80)
    finally:
        service.shutdown()


def test_hires_fix_upscales_with_it(tmp_path, x4_dir, tiny_models):
    import shutil

    from test_engine import make_engine

    from ldm_core.generation_requests import GenerationRequest

    shutil.copytree(x4_dir, tmp_path / "models" / "SD-Upscale")
    engine = make_engine(tmp_path, {"tiny-sd1": tiny_models["sd1"]["diffusers"]}, device="cpu", save_images=False)
    req = GenerationRequest.build(
        prompt="a red circle",
        steps=2,
        width=64,
        height=64,
        seed=3,
        enable_hr=True,
        hr_scale=2,
        hr_upscaler="tiny-x4",
        hr_second_pass_steps=2,
        denoising_strength=0.3,
        save_images=False,
    )
    res = engine.generate(req)
    assert res.images[0].size == (128, 128)
    assert "Hires upscaler: tiny-x4" in res.infotexts[0]


def test_x2_latent_upscaler_in_the_hires_fix_keeps_latents(tmp_path, x4_dir, tiny_models, monkeypatch):
    import shutil

    from test_engine import make_engine

    from ldm_core.diffusion_upscalers import X2LatentUpscaler
    from ldm_core.generation_requests import GenerationRequest, RequestError

    shutil.copytree(x4_dir, tmp_path / "models" / "SD-Upscale")
    models = {"tiny-sd1": tiny_models["sd1"]["diffusers"], "tiny-sdxl": tiny_models["sdxl"]["diffusers"]}
    engine = make_engine(tmp_path, models, device="cpu", save_images=False)
    assert engine.upscalers.entry("tiny-x2-latent").scale == 2
    calls = []
    real = X2LatentUpscaler.latents

    def spy(self, z, prompt, options, cancel=None):
        calls.append((tuple(z.shape), prompt, cancel is not None))
        return real(self, z, prompt, options, cancel)

    monkeypatch.setattr(X2LatentUpscaler, "latents", spy)
    decoded = []
    real_decode = engine.decode
    monkeypatch.setattr(engine, "decode", lambda vae, z: decoded.append(tuple(z.shape)) or real_decode(vae, z))

    def hires(model: str, upscaler: str):
        return GenerationRequest.build(
            prompt="a red circle",
            steps=2,
            width=128,
            height=128,
            seed=3,
            enable_hr=True,
            hr_scale=2,
            hr_upscaler=upscaler,
            hr_second_pass_steps=2,
            denoising_strength=0.4,
            model=model,
            save_images=False,
        )

    res = engine.generate(hires("tiny-sd1", "tiny-x2-latent"))
    assert res.images[0].size == (256, 256) and "Hires upscaler: tiny-x2-latent" in res.infotexts[0]
    assert calls == [((1, 4, 16, 16), "a red circle", True)]  # and the job's interrupt reaches its steps
    assert decoded == [(1, 4, 32, 32)]  # only the final latents were decoded: the first pass never was
    plain = engine.generate(hires("tiny-sd1", "Latent"))
    assert np.abs(np.asarray(plain.images[0], np.int16) - np.asarray(res.images[0], np.int16)).max() > 0
    with pytest.raises(RequestError, match="SD 1.x/2.x"):
        engine.generate(hires("tiny-sdxl", "tiny-x2-latent"))


def test_x2_latent_upscaler_on_an_image(x4_dir):
    reg = UpscalerRegistry([x4_dir], builtin=None, diffusion=FAST)
    out = reg.upscale(smooth(128, 96), "tiny-x2-latent", scale=2)
    assert out.size == (256, 192) and np.asarray(out).std() > 0


def test_settings_set_steps_noise_cfg_seed_and_prompt(tmp_path, x4_dir, monkeypatch):
    import shutil

    from ldm_core.config import EngineConfig
    from ldm_core.diffusion_upscalers import X4Upscaler
    from ldm_core.engine import Engine
    from ldm_core.options import OPTIONS_BY_KEY, OptionsStore, bind_engine

    shutil.copytree(x4_dir, tmp_path / "models" / "SD-Upscale")
    engine = Engine(EngineConfig.from_data_dir(tmp_path, builtin_model_dir=None, device="cpu", save_images=False))
    store = OptionsStore(tmp_path / "config.json")
    bind_engine(store, engine)
    assert {"diffusion_upscale_steps", "diffusion_upscale_noise_level", "diffusion_upscale_prompt"} <= set(
        OPTIONS_BY_KEY
    )
    seen = []

    def spy(self, image, prompt, options, output_type, cancel=None):
        seen.append((prompt, options.steps, options.noise_level, options.guidance_scale, options.seed,
                     options.image_guidance))
        return torch.zeros(1, 3, image.height * 4, image.width * 4)

    monkeypatch.setattr(X4Upscaler, "_run", spy)
    engine.upscalers.upscale(smooth(), "tiny-x4", scale=4)
    assert seen[-1] == ("", 20, 20, 9.0, 0, 1.0)  # the defaults; no infotext: no prompt
    store.update(
        {
            "diffusion_upscale_steps": 5,
            "diffusion_upscale_noise_level": 60,
            "diffusion_upscale_cfg_scale": 4,
            "diffusion_upscale_seed": 9,
            "diffusion_upscale_prompt": "sharp shapes",
            "diffusion_upscale_image_guidance": 2.5,
        }
    )
    engine.upscalers.upscale(smooth(), "tiny-x4", scale=4)
    assert seen[-1] == ("sharp shapes", 5, 60, 4.0, 9, 2.5)  # applied without a restart


def test_cfg_zero_runs_each_upscaler_at_its_recommended_scale(tmp_path, x4_dir, monkeypatch):
    """CFG 0 (the setting's default) is the upscaler's sidecar `cfg_scale` (the shipped one recommends 3), else
    9; a scale set in Settings wins; an invalid recommendation is an error naming the sidecar file. The hires
    fix's latent path resolves it the same way."""
    import shutil

    from ldm_core.diffusion_upscalers import X2LatentUpscaler
    from ldm_core.models.sidecar import SidecarError

    root = tmp_path / "SD-Upscale"
    shutil.copytree(x4_dir, root)
    seen = []

    def spy(self, image, prompt, options, output_type, cancel=None):
        seen.append(options.guidance_scale)
        return torch.zeros(1, 3, image.height * self.scale, image.width * self.scale)

    def latent_spy(self, z, prompt, options, output_type, cancel=None):
        seen.append(options.guidance_scale)
        return z

    monkeypatch.setattr(X4Upscaler, "_run", spy)
    monkeypatch.setattr(X2LatentUpscaler, "_run", latent_spy)
    default = DiffusionUpscaleOptions()
    assert default.guidance_scale == 0
    reg = UpscalerRegistry([root], builtin=None, diffusion=default)
    reg.upscale(smooth(), "tiny-x4", scale=4)
    assert seen[-1] == 9.0  # no sidecar: Stability's default
    (root / "tiny-x4.json").write_text('{"cfg_scale": 3}')
    (root / "tiny-x2-latent.json").write_text('{"cfg_scale": 2.5}')
    reg.upscale(smooth(), "tiny-x4", scale=4)
    assert seen[-1] == 3.0
    reg.load("tiny-x2-latent").latents(torch.zeros(1, 4, 8, 8), "a", default)
    assert seen[-1] == 2.5
    reg.diffusion = DiffusionUpscaleOptions(guidance_scale=4)
    reg.upscale(smooth(), "tiny-x4", scale=4)
    assert seen[-1] == 4.0
    reg.diffusion = default
    (root / "tiny-x4.json").write_text('{"cfg_scale": 0}')
    with pytest.raises(SidecarError, match=r"tiny-x4\.json: cfg_scale 0 must be a number from 1 to 30"):
        reg.upscale(smooth(), "tiny-x4", scale=4)


def test_image_guidance_zero_runs_each_x4_upscaler_at_its_recommended_one(tmp_path, x4_dir, monkeypatch):
    """Image guidance 0 (the setting's default) is the sidecar's `image_guidance`, else 1 (off); a value set in
    Settings wins; an out-of-range recommendation is an error naming the sidecar file."""
    import shutil

    from ldm_core.models.sidecar import SidecarError

    root = tmp_path / "SD-Upscale"
    shutil.copytree(x4_dir, root)
    seen = []

    def spy(self, image, prompt, options, output_type, cancel=None):
        seen.append(options.image_guidance)
        return torch.zeros(1, 3, image.height * 4, image.width * 4)

    monkeypatch.setattr(X4Upscaler, "_run", spy)
    reg = UpscalerRegistry([root], builtin=None, diffusion=DiffusionUpscaleOptions())
    reg.upscale(smooth(), "tiny-x4", scale=4)
    assert seen[-1] == 1.0
    (root / "tiny-x4.json").write_text('{"image_guidance": 3}')
    reg.upscale(smooth(), "tiny-x4", scale=4)
    assert seen[-1] == 3.0
    reg.diffusion = DiffusionUpscaleOptions(image_guidance=1.5)
    reg.upscale(smooth(), "tiny-x4", scale=4)
    assert seen[-1] == 1.5
    reg.diffusion = DiffusionUpscaleOptions()
    (root / "tiny-x4.json").write_text('{"image_guidance": 12}')
    with pytest.raises(SidecarError, match=r"tiny-x4\.json: image_guidance 12 must be a number from 1 to 10"):
        reg.upscale(smooth(), "tiny-x4", scale=4)


def test_x4_sampling_is_the_pipelines_and_image_guidance_extrapolates_from_the_withheld_image(x4_dir):
    """`x4_sample` at image guidance 1 gives the diffusers pipeline's image for the same seed (with and
    without CFG); above 1 each step is e_far + s * (e - e_far), e_far the UNet's prediction with the image at
    the highest noise level, so the output changes."""
    from diffusers import StableDiffusionUpscalePipeline

    from ldm_core.diffusion_upscalers import x4_sample

    pipe = StableDiffusionUpscalePipeline.from_pretrained(x4_dir / "tiny-x4", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    low = smooth(16, 12)
    for cfg, prompt in ((1.0, ""), (4.0, "a red circle")):
        ref = pipe(prompt=prompt, image=low, num_inference_steps=3, noise_level=20, guidance_scale=cfg,
                   generator=torch.Generator().manual_seed(5), output_type="pt").images
        opts = DiffusionUpscaleOptions(steps=3, guidance_scale=cfg, seed=5, image_guidance=1.0)
        assert torch.equal(x4_sample(pipe, low, prompt, opts), ref)
        guided = x4_sample(pipe, low, prompt, replace(opts, image_guidance=3.0))
        assert guided.shape == ref.shape and (guided - ref).abs().max() > 1e-3
    # a folder whose scheduler takes no eta (DDPM, whose steps draw noise from the generator) samples as the pipeline
    from diffusers import DDPMScheduler

    ddpm = StableDiffusionUpscalePipeline(
        **{**pipe.components, "scheduler": DDPMScheduler.from_config(pipe.scheduler.config)}
    )
    ref = ddpm(prompt="", image=low, num_inference_steps=3, noise_level=20, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(5), output_type="pt").images
    opts = DiffusionUpscaleOptions(steps=3, guidance_scale=1.0, seed=5, image_guidance=1.0)
    assert torch.equal(x4_sample(ddpm, low, "", opts), ref)
    with pytest.raises(ValueError, match="noise_level"):  # the pipeline's own checks still run
        x4_sample(pipe, low, "", replace(opts, noise_level=pipe.config.max_noise_level + 1))
    # one step by hand: the prediction the sampler steps with
    s, opts = 3.0, DiffusionUpscaleOptions(steps=1, guidance_scale=1.0, seed=5, image_guidance=3.0)
    got = x4_sample(pipe, low, "", opts, "latent")
    gen = torch.Generator().manual_seed(5)
    clean = pipe.image_processor.preprocess(low)
    noise = torch.randn(clean.shape, generator=gen)
    latents = torch.randn((1, 4, *clean.shape[2:]), generator=gen)
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    text = pipe.encode_prompt("", "cpu", 1, False)[0]
    with torch.no_grad():
        def e(level):
            img = pipe.low_res_scheduler.add_noise(clean, noise, torch.tensor([level]))
            return pipe.unet(torch.cat([latents, img], 1), t, text, class_labels=torch.tensor([level])).sample
        far = e(pipe.config.max_noise_level)
        want = sched.step(far + s * (e(20) - far), t, latents).prev_sample
    assert torch.allclose(got, want, atol=1e-5)


def test_shipped_upscaler_recommends_the_cfg_and_image_guidance_its_probes_measured():
    from ldm_core.models.sidecar import read_sidecar

    shipped = Path(__file__).resolve().parents[1] / "models" / "SD-Upscale" / "ldm-builtin-x4"
    assert read_sidecar(shipped).cfg_scale == 3.0
    assert read_sidecar(shipped).image_guidance == 3.0


def test_colour_fix_setting_gives_the_output_the_inputs_colour(tmp_path, x4_dir, monkeypatch):
    """Settings > Upscaling's colour fix (default Wavelet) runs after the diffusion upscaler: an output whose
    colour drifted comes back in the input's; "None" leaves the sample as it came."""
    import shutil

    from ldm_core.config import EngineConfig
    from ldm_core.engine import Engine
    from ldm_core.options import OptionsStore, bind_engine

    shutil.copytree(x4_dir, tmp_path / "models" / "SD-Upscale")
    engine = Engine(EngineConfig.from_data_dir(tmp_path, builtin_model_dir=None, device="cpu", save_images=False))
    store = OptionsStore(tmp_path / "config.json")
    bind_engine(store, engine)

    def grey(self, image, prompt, options, output_type, cancel=None):  # a sample that lost the input's colour
        return torch.full((1, 3, image.height * 4, image.width * 4), 0.5)

    monkeypatch.setattr(X4Upscaler, "_run", grey)
    src = smooth()
    want = np.asarray(src.resize((96, 80), Image.BICUBIC), np.float32).mean((0, 1))
    fixed = np.asarray(engine.upscalers.upscale(src, "tiny-x4", scale=4), np.float32)
    assert np.abs(fixed.mean((0, 1)) - want).max() < 3
    store.update({"diffusion_upscale_colour_fix": "None"})
    as_sampled = np.asarray(engine.upscalers.upscale(src, "tiny-x4", scale=4), np.float32)
    assert np.abs(as_sampled - 128).max() <= 1
