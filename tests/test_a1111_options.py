"""A1111 options and values the engine now acts on, each with a check that fails when it is ignored:
`eta_noise_seed_delta` (ENSD: step noise re-seeded with seed + delta, infotext "ENSD"), seeds up to 2**64 - 1
used as given, `img2img_fix_steps`, `jpeg_quality`, SDXL's `sdxl_crop_top`/`sdxl_crop_left`, upscaler names
of models this server lacks (a fallback with a warning instead of a failed job), and `token_merging_ratio`
(reported as not applied). Each option is also reachable from the options store (Settings tab and
/sdapi/v1/options), which shows it as applying to the next job.
"""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_engine import make_engine

from ldm_core.config import EngineConfig
from ldm_core.generation_requests import GenerationRequest, Img2ImgRequest, RequestError
from ldm_core.infotext import build_infotext, parse_infotext
from ldm_core.options import OPTIONS_BY_KEY, OptionsStore, bind_engine, effective_applies, request_values
from ldm_core.rng import batch_noise
from ldm_core.schedulers import img2img_steps

SIZE = 64


def req(cls=GenerationRequest, **kw):
    base = dict(prompt="a red circle", negative_prompt="blue", steps=4, width=SIZE, height=SIZE, seed=7)
    base.update(save_images=False, sampler_name="Euler", model="main")
    base.update(kw)
    return cls.build(**base)


def arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im).astype(np.float64)


def same(a, b) -> bool:
    return np.array_equal(arr(a.images[0]), arr(b.images[0]))


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_models):
    tmp = tmp_path_factory.mktemp("a1111opts")
    return make_engine(tmp, {"main": tiny_models["sd1"]["single_file"], "xl": tiny_models["sdxl"]["single_file"]})


# ---- eta noise seed delta ------------------------------------------------------------------------------------
def test_ensd_reseeds_the_step_noise_of_ancestral_samplers(engine):
    # the generators: the first image noise is the seed's; step noise comes from seed + delta (A1111 1.6+)
    noise, gens = batch_noise((4, 8, 8), [7, 8], noise_seed_delta=31337)
    plain, _ = batch_noise((4, 8, 8), [7, 8])
    assert torch.equal(noise, plain)
    expected = torch.randn(5, generator=torch.Generator().manual_seed(7 + 31337))
    assert torch.equal(torch.randn(5, generator=gens[0]), expected)

    a0 = engine.generate(req(sampler_name="Euler a"))
    a1 = engine.generate(req(sampler_name="Euler a", eta_noise_seed_delta=31337))
    assert not same(a0, a1)
    assert parse_infotext(a1.infotexts[0])["ENSD"] == "31337" and "ENSD" not in parse_infotext(a0.infotexts[0])
    assert a1.manifests[0]["eta_noise_seed_delta"] == 31337
    # a sampler without step noise is unchanged, and its infotext does not claim ENSD (as A1111)
    e0 = engine.generate(req())
    e1 = engine.generate(req(eta_noise_seed_delta=31337))
    assert same(e0, e1) and "ENSD" not in parse_infotext(e1.infotexts[0])
    # eta 0 draws no step noise either
    z = engine.generate(req(sampler_name="Euler a", eta=0.0, eta_noise_seed_delta=31337))
    assert "ENSD" not in parse_infotext(z.infotexts[0])
    # DDIM CFG++ with eta above 0 draws step noise like DDIM: ENSD changes it and is written
    c0 = engine.generate(req(sampler_name="DDIM CFG++", eta=0.5))
    c1 = engine.generate(req(sampler_name="DDIM CFG++", eta=0.5, eta_noise_seed_delta=31337))
    assert not same(c0, c1) and parse_infotext(c1.infotexts[0])["ENSD"] == "31337"


def test_ensd_round_trips_and_comes_from_the_options_store():
    from ui.common import fields_from_text

    text = build_infotext("a cat", "", {"Steps": 4, "Sampler": "Euler a", "Seed": 7, "ENSD": 31337})
    assert "ENSD: 31337" in text and fields_from_text(text)["eta_noise_seed_delta"] == 31337
    saved = {**OptionsStore(None).all(), "eta_noise_seed_delta": 31337}
    values, _ = request_values(saved, {}, explicit=set(), sampler_name="Euler a")
    assert values["eta_noise_seed_delta"] == 31337
    values, skipped = request_values(OptionsStore(None).all(), {"eta_noise_seed_delta": 5}, set(), "Euler a")
    assert values["eta_noise_seed_delta"] == 5 and skipped == []
    for key in ("eta_noise_seed_delta", "img2img_fix_steps", "sdxl_crop_top", "sdxl_crop_left", "jpeg_quality"):
        assert effective_applies(OPTIONS_BY_KEY[key]) == "live", key
    assert effective_applies(OPTIONS_BY_KEY["token_merging_ratio"]) == "stored"


# ---- 64-bit seeds --------------------------------------------------------------------------------------------
def test_seeds_up_to_2_64_are_used_as_given(engine):
    big = 2**64 - 1
    res = engine.generate(req(seed=big - 1, subseed=2**40 + 3, subseed_strength=0.5, batch_size=2))
    assert res.seeds == [big - 1, big]  # used as given: no 32-bit mask
    p = parse_infotext(res.infotexts[1])
    assert p["Seed"] == str(big) and p["Variation seed"] == str(2**40 + 4)
    assert res.info(req(seed=big - 1))["all_seeds"] == [big - 1, big]
    with pytest.raises(RequestError) as exc:
        req(seed=2**64)
    assert exc.value.field == "seed" and str(big) in exc.value.message
    # the X/Y/Z seed axis takes them too (ranges in exact integers)
    from ldm_core.scripts.xyz_plot import prepare

    plan = prepare(engine, req(), ["Seed", f"{big - 2}-{big}", [], "Nothing", "", [], "Nothing", "", []])
    assert plan.x.values == [big - 2, big - 1, big]
    assert [cell[3].seed for cell in plan.cells] == [big - 2, big - 1, big]


# ---- img2img_fix_steps ---------------------------------------------------------------------------------------
def test_img2img_fix_steps_runs_exactly_the_steps_asked(engine):
    assert img2img_steps(8, 0.5) == (8, 4)
    assert img2img_steps(8, 0.5, fix_steps=True) == (16, 8)
    assert img2img_steps(8, 0.0, fix_steps=True)[1] == 0
    init = Image.new("RGB", (SIZE, SIZE), (200, 40, 40))

    def unet_calls(request) -> tuple[int, object]:
        engine.load_checkpoint("main")
        calls = []
        handle = engine.current_model.unet.register_forward_hook(lambda *a: calls.append(1))
        try:
            res = engine.generate(request)
        finally:
            handle.remove()
        return len(calls), res

    i2i = dict(init_images=[init], steps=8, denoising_strength=0.5)
    normal, r0 = unet_calls(req(Img2ImgRequest, **i2i))
    fixed, r1 = unet_calls(req(Img2ImgRequest, img2img_fix_steps=True, **i2i))
    assert fixed == 2 * normal and normal > 0
    assert not same(r0, r1) and r1.manifests[0]["img2img_fix_steps"] is True
    # A1111's hires pass always runs its steps exactly (it passes them explicitly): 4 + 6, not 4 + 3
    first, _ = unet_calls(req(steps=4))
    both, hr = unet_calls(req(steps=4, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=6, denoising_strength=0.5))
    assert both - first == 6 * (first // 4) and hr.images[0].size == (96, 96)


# ---- jpeg_quality --------------------------------------------------------------------------------------------
def test_jpeg_quality_sets_the_saved_files_quality(engine, tmp_path):
    store = OptionsStore(None)
    old = engine.config
    try:
        bind_engine(store, engine)
        store.update({"samples_format": "jpg", "jpeg_quality": 95})
        assert engine.config.jpeg_quality == 95
        engine.config = engine.config.with_(outputs_dir=tmp_path / "out")
        hi = engine.generate(req(save_images=True, steps=2)).paths[0]
        store.update({"jpeg_quality": 10})
        engine.config = engine.config.with_(outputs_dir=tmp_path / "out")
        lo = engine.generate(req(save_images=True, steps=2)).paths[0]
        assert hi.suffix == lo.suffix == ".jpg"
        assert lo.stat().st_size < hi.stat().st_size
        store.update({"samples_format": "webp"})
        engine.config = engine.config.with_(outputs_dir=tmp_path / "out")
        w_lo = engine.generate(req(save_images=True, steps=2)).paths[0]
        store.update({"jpeg_quality": 95})
        engine.config = engine.config.with_(outputs_dir=tmp_path / "out")
        w_hi = engine.generate(req(save_images=True, steps=2)).paths[0]
        assert w_lo.suffix == ".webp" and w_lo.stat().st_size < w_hi.stat().st_size
    finally:
        engine.config = old


# ---- SDXL crop coordinates -----------------------------------------------------------------------------------
def test_sdxl_crop_coordinates_condition_the_unet(engine):
    base = engine.generate(req(model="xl"))
    cropped = engine.generate(req(model="xl", sdxl_crop_top=256, sdxl_crop_left=128))
    assert not same(base, cropped)
    assert cropped.manifests[0]["sdxl_crop"] == [256, 128]
    # an SD1 model has no such conditioning: the values change nothing
    assert same(engine.generate(req()), engine.generate(req(sdxl_crop_top=256)))


# ---- token merging -------------------------------------------------------------------------------------------
def test_token_merging_ratio_is_reported_as_not_applied(engine):
    res = engine.generate(req(token_merging_ratio=0.5))
    assert "token_merging_ratio" in res.info(req())["comments"]
    assert "token_merging_ratio" not in engine.generate(req()).info(req())["comments"]
    saved = {**OptionsStore(None).all(), "token_merging_ratio": 0.3}
    values, _ = request_values(saved, {}, explicit=set(), sampler_name="Euler")
    assert values["token_merging_ratio"] == 0.3


# ---- upscaler fallbacks through the API ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_models):
    import fastapi
    from fastapi.testclient import TestClient

    from api import install
    from ldm_core.service import Service

    data = tmp_path_factory.mktemp("fallback")
    shutil.copytree(tiny_models["sd1"]["diffusers"], data / "models" / "Stable-diffusion" / "tiny")
    service = Service(EngineConfig.from_data_dir(data, builtin_model_dir=None, device="cpu", save_images=False))
    store = OptionsStore(data / "config.json")
    bind_engine(store, service.engine)
    app = fastapi.FastAPI()
    install(app, service, options=store)
    with TestClient(app) as client:
        yield client, service
    service.shutdown()


def _b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _t2i(**kw):
    return {"prompt": "a cat", "steps": 1, "width": 64, "height": 64, "seed": 1, "sampler_name": "Euler", **kw}


def test_unknown_model_upscalers_fall_back_with_a_warning(api):
    client, service = api
    two_x = [n for n in service.engine.upscalers.names() if "x2" in n.lower()]
    hr = dict(enable_hr=True, hr_scale=1.5, denoising_strength=0.5, hr_second_pass_steps=1)
    r = client.post("/sdapi/v1/txt2img", json=_t2i(hr_upscaler="R-ESRGAN 4x+", **hr))
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert any(w.startswith("hr_upscaler") and "R-ESRGAN 4x+" in w and "Lanczos" in w for w in info["warnings"])
    assert "Hires upscaler: Lanczos" in info["infotexts"][0]
    if two_x:  # the shipped 2x model: a 2x name falls back to it
        info = json.loads(client.post("/sdapi/v1/txt2img", json=_t2i(hr_upscaler="R-ESRGAN 2x+", **hr)).json()["info"])
        assert f"Hires upscaler: {two_x[0]}" in info["infotexts"][0]
    info = json.loads(client.post("/sdapi/v1/txt2img", json=_t2i(hr_upscaler="Latent (fancy)", **hr)).json()["info"])
    assert "Hires upscaler: Latent," in info["infotexts"][0] and info["warnings"]
    r = client.post("/sdapi/v1/txt2img", json=_t2i(hr_upscaler="nope", **hr))
    assert r.status_code == 422 and "hr_upscaler" in r.text
    info = json.loads(client.post("/sdapi/v1/txt2img", json=_t2i(hr_upscaler="Lanczos", **hr)).json()["info"])
    assert "warnings" not in info

    image = _b64(Image.new("RGB", (32, 32), (10, 200, 30)))
    r = client.post(
        "/sdapi/v1/extra-single-image",
        json={"image": image, "upscaler_1": "4x-UltraSharp", "upscaler_2": "SwinIR_4x", "upscaling_resize": 2},
    )
    assert r.status_code == 200, r.text
    html = r.json()["html_info"]
    assert "upscaler_1" in html and "4x-UltraSharp" in html and "upscaler_2" in html and "Postprocess upscaler:" in html
    r = client.post("/sdapi/v1/extra-single-image", json={"image": image, "upscaler_1": "garbage"})
    assert r.status_code == 422

    init = _b64(Image.new("RGB", (64, 64), (120, 60, 200)))
    body = {
        **_t2i(),
        "init_images": [init],
        "denoising_strength": 0.3,
        "script_name": "SD upscale",
        "script_args": ["", 16, "ESRGAN_4x", 1.5],
    }
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert any("ESRGAN_4x" in w for w in info["warnings"])
    assert "SD upscale upscaler: Lanczos" in info["infotexts"][-1]


def test_ensd_and_jpeg_quality_through_options_and_override_settings(api):
    client, service = api
    assert client.post("/sdapi/v1/options", json={"eta_noise_seed_delta": 31337, "jpeg_quality": 33}).status_code == 200
    assert service.engine.config.jpeg_quality == 33
    try:
        r = client.post("/sdapi/v1/txt2img", json=_t2i(sampler_name="Euler a"))
        info = json.loads(r.json()["info"])
        assert "ENSD: 31337" in info["infotexts"][0] and "warnings" not in info
        body = _t2i(sampler_name="Euler a", override_settings={"eta_noise_seed_delta": 0, "token_merging_ratio": 0.5})
        info = json.loads(client.post("/sdapi/v1/txt2img", json=body).json()["info"])
        assert "ENSD" not in info["infotexts"][0] and "token_merging_ratio" in info["comments"]
        assert [w for w in info["warnings"] if w.startswith("override_settings.token_merging_ratio")]
        info = json.loads(client.post("/sdapi/v1/txt2img", json=_t2i(eta_noise_seed_delta=7)).json()["info"])
        assert "ENSD" not in info["infotexts"][0]  # Euler draws no step noise: A1111 writes no ENSD either
    finally:
        client.post("/sdapi/v1/options", json={"eta_noise_seed_delta": 0, "jpeg_quality": 80})
