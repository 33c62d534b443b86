"""The A1111 generation fields the engine honours (issue 14), each on tiny random models, each with a check
that fails when the field is ignored: seamless `tiling`, `initial_noise_multiplier`, `s_min_uncond`,
`mask_blur_x`/`mask_blur_y`, `disable_extra_networks`, the hires checkpoint / sampler / schedule type, the
refiner switch (`refiner_checkpoint`, `refiner_switch_at`, also from the UI's form values), and
`restore_faces` (accepted, reported as not applied). Infotext keys are A1111's.

The refiner tests use two SD1 checkpoints of different weights (the engine takes any refiner that shares
the latent space and prediction type), and one SDXL base with an SD1 refiner to show a switch across families;
the real SDXL refiner family is tested in tests/test_sdxl_refiner.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from test_engine import make_engine
from test_lora import factors, kohya_file
from tiny_models import build_tiny_model

from ldm_core.generation_requests import GenerationRequest, Img2ImgRequest, InpaintRequest, RequestError
from ldm_core.infotext import parse_infotext
from ldm_core.pipeline.images import prepare_mask
from ldm_core.pipeline.loop import Hooks, skips_uncond
from ldm_core.seamless import circular_padding

SIZE = 64


def req(cls=GenerationRequest, **kw):
    base = dict(prompt="a red circle", negative_prompt="blue", steps=4, width=SIZE, height=SIZE, seed=7)
    base.update(save_images=False, sampler_name="Euler")
    base.update(kw)
    return cls.build(**base)


def arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im).astype(np.float64)


def differ(a, b) -> bool:
    """Whether two results' first images differ beyond rounding (mean absolute difference over 0.1/255)."""
    return float(np.abs(arr(a.images[0]) - arr(b.images[0])).mean()) > 0.1


def params(text: str) -> dict:
    return parse_infotext(text)


@pytest.fixture(scope="module")
def other_sd1(tmp_path_factory) -> Path:
    """A second tiny SD1 checkpoint with other weights (hires checkpoint, refiner)."""
    return build_tiny_model("sd1", tmp_path_factory.mktemp("sd1b"), seed=4321)["single_file"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_models, other_sd1):
    tmp = tmp_path_factory.mktemp("honoured")
    lora = tmp / "models" / "Lora"
    lora.mkdir(parents=True)
    from tiny_models import tiny_loaded_model

    kohya_file(factors(tiny_loaded_model("sd1"), 5), lora / "shiny.safetensors", "sd1")
    return make_engine(
        tmp,
        {
            "main": tiny_models["sd1"]["single_file"],
            "second": other_sd1,
            "vpred": tiny_models["sd2_v"]["single_file"],
            "xl": tiny_models["sdxl"]["single_file"],
        },
        lora_dirs=(lora,),
    )


def gen(engine, **kw):
    kw.setdefault("model", "main")
    res = engine.generate(req(**kw))
    return res


# ---- tiling ----------------------------------------------------------------------------------------------
def _corr(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.ravel() - x.mean(), y.ravel() - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def _seams(im: Image.Image) -> tuple[float, float, float]:
    """(left|right seam, top|bottom seam, neighbouring columns): correlations of pixel lines. Neighbouring
    lines of a decoded image are strongly correlated; the two edges of a wrapping image are neighbours."""
    a = arr(im)
    inner = float(np.mean([_corr(a[:, j], a[:, j + 1]) for j in range(a.shape[1] - 1)]))
    return _corr(a[:, 0], a[:, -1]), _corr(a[0], a[-1]), inner


def test_tiling_wraps_the_edges_and_restores_the_model(engine):
    plain = gen(engine, seed=3)
    tiled = gen(engine, seed=3, tiling=True)
    lr, tb, inner = _seams(tiled.images[0])
    assert inner > 0.6 and lr > 0.8 * inner and tb > 0.8 * inner  # the edges continue each other
    lr0, tb0, _ = _seams(plain.images[0])
    assert lr0 < 0.3 and tb0 < 0.3  # without tiling they are unrelated
    assert params(tiled.infotexts[0])["Tiling"] == "True" and "Tiling" not in params(plain.infotexts[0])
    model = engine.current_model
    convs = [m for m in [*model.unet.modules(), *model.vae.modules()] if isinstance(m, torch.nn.Conv2d)]
    assert {m.padding_mode for m in convs} == {"zeros"}  # switched for the job only
    assert np.array_equal(arr(gen(engine, seed=3).images[0]), arr(plain.images[0]))


def test_circular_padding_context_switches_instances_only():
    conv, other = torch.nn.Conv2d(1, 1, 3, padding=1), torch.nn.Conv2d(1, 1, 3, padding=1)
    flat = torch.nn.Conv2d(1, 1, 1)
    with circular_padding(torch.nn.Sequential(conv, flat)) as n:
        assert (conv.padding_mode, other.padding_mode, flat.padding_mode, n) == ("circular", "zeros", "zeros", 1)
    assert conv.padding_mode == "zeros"
    with pytest.raises(RuntimeError), circular_padding(conv):
        raise RuntimeError("job failed")
    assert conv.padding_mode == "zeros"


# ---- initial noise multiplier ----------------------------------------------------------------------------
def test_initial_noise_multiplier_scales_the_img2img_noise(engine):
    init = Image.new("RGB", (SIZE, SIZE), (200, 40, 40))
    one = engine.generate(req(Img2ImgRequest, model="main", init_images=[init], denoising_strength=0.6))
    low = engine.generate(
        req(Img2ImgRequest, model="main", init_images=[init], denoising_strength=0.6, initial_noise_multiplier=0.0)
    )
    assert differ(one, low)
    assert params(low.infotexts[0])["Noise multiplier"] == "0" and "Noise multiplier" not in params(one.infotexts[0])


# ---- s_min_uncond ----------------------------------------------------------------------------------------
def test_s_min_uncond_skips_every_other_uncond_pass_below_the_sigma(engine):
    seen: list[bool] = []

    def record(state):
        seen.append(state.has_uncond)

    engine.hooks_factories.append(lambda _e, _r, _m: Hooks(unet_inputs=[record]))
    try:
        base = gen(engine, steps=6)
        assert seen == [True] * 6
        seen.clear()
        skipped = gen(engine, steps=6, s_min_uncond=1000.0)
        assert seen == [True, False] * 3  # A1111 alternates: odd evaluations only
    finally:
        engine.hooks_factories.pop()
    assert differ(base, skipped)
    assert params(skipped.infotexts[0])["NGMS"] == "1000" and "NGMS" not in params(base.infotexts[0])
    assert skips_uncond(3, 0.5, 1.0) and not skips_uncond(3, 2.0, 1.0) and not skips_uncond(2, 0.5, 1.0)


# ---- asymmetric mask blur ----------------------------------------------------------------------------------
def _square_mask() -> Image.Image:
    m = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(m).rectangle((24, 24, 40, 40), fill=255)
    return m


def test_mask_blur_x_and_y_blur_each_axis_and_mask_blur_sets_both(engine):
    m = np.asarray(prepare_mask(_square_mask(), invert=False, blur=(6, 0))).astype(int)
    assert m[32, 16] > 0 and m[16, 32] == 0  # spread sideways, not up/down
    init = Image.new("RGB", (SIZE, SIZE), (30, 160, 30))
    kw = dict(model="main", init_images=[init], mask=_square_mask(), denoising_strength=0.8)
    wide = engine.generate(req(InpaintRequest, mask_blur_x=12, mask_blur_y=0, **kw))
    even = engine.generate(req(InpaintRequest, **kw))
    assert differ(wide, even)
    p = params(wide.infotexts[0])
    assert (p["Mask blur x"], p["Mask blur y"]) == ("12", "0") and params(even.infotexts[0])["Mask blur"] == "4"
    both = req(InpaintRequest, mask_blur=2, mask_blur_x=12, mask_blur_y=0, **kw)
    assert both.mask_blur_xy == (2, 2)


# ---- extra networks ----------------------------------------------------------------------------------------
def test_disable_extra_networks_strips_the_tags_without_applying_them(engine):
    plain = gen(engine, prompt="a red circle")
    lora = gen(engine, prompt="a red circle <lora:shiny:1>")
    off = gen(engine, prompt="a red circle <lora:shiny:1>", disable_extra_networks=True)
    assert differ(lora, plain)
    assert np.array_equal(arr(off.images[0]), arr(plain.images[0]))
    assert "Lora hashes" in params(lora.infotexts[0]) and "Lora hashes" not in params(off.infotexts[0])


# ---- hires checkpoint / sampler / schedule type ------------------------------------------------------------
def test_hires_checkpoint_sampler_and_schedule_type(engine):
    hr = dict(enable_hr=True, hr_scale=1.5, denoising_strength=0.6, hr_second_pass_steps=6)
    same = gen(engine, **hr, hr_checkpoint_name="Use same checkpoint", hr_scheduler="Use same scheduler")
    other = gen(engine, **hr, hr_checkpoint_name="second")
    assert differ(other, same)
    second = engine.models.find_checkpoint("second")
    assert params(other.infotexts[0])["Hires checkpoint"] == f"second [{second.short_hash}]"
    assert "Hires checkpoint" not in params(same.infotexts[0])
    assert engine.current_model.entry.name == "main"  # the job's model stays current
    karras = gen(engine, **hr, hr_scheduler="Karras")
    assert differ(karras, same)
    assert params(karras.infotexts[0])["Hires schedule type"] == "Karras"
    dpm = gen(engine, **hr, hr_sampler_name="DPM++ 2M", hr_scheduler="Use same scheduler")
    assert params(dpm.infotexts[0])["Hires sampler"] == "DPM++ 2M"
    with pytest.raises(RequestError) as exc:
        gen(engine, **hr, hr_scheduler="Sideways")
    assert exc.value.field == "hr_scheduler"
    with pytest.raises(RequestError) as exc:
        gen(engine, **hr, hr_checkpoint_name="nope")
    assert exc.value.field == "hr_checkpoint_name"


# ---- refiner -------------------------------------------------------------------------------------------------
def test_refiner_switch_changes_the_output_and_says_so(engine):
    base = gen(engine, steps=6)
    refined = gen(engine, steps=6, refiner_checkpoint="second", refiner_switch_at=0.5)
    assert differ(refined, base)
    second = engine.models.find_checkpoint("second")
    p = params(refined.infotexts[0])
    assert (p["Refiner"], p["Refiner switch at"]) == (f"second [{second.short_hash}]", "0.5")
    assert engine.current_model.entry.name == "main"
    assert refined.manifests[0]["refiner"] == {
        "name": "second",
        "sha256": second.sha256,
        "switch_at": 0.5,
        "used": True,
    }
    # a later switch leaves more of the run to the first model
    late = gen(engine, steps=6, refiner_checkpoint="second", refiner_switch_at=0.9)
    assert differ(late, refined)
    # never reached (A1111 compares (999 - t) / 1000): no switch, no infotext
    never = gen(engine, steps=6, refiner_checkpoint="second", refiner_switch_at=1.0)
    assert np.array_equal(arr(never.images[0]), arr(base.images[0])) and "Refiner" not in params(never.infotexts[0])
    off = gen(engine, steps=6, refiner_checkpoint="None", refiner_switch_at=0.5)
    assert np.array_equal(arr(off.images[0]), arr(base.images[0]))


def test_refiner_in_img2img_across_families_and_bad_refiners(engine):
    init = Image.new("RGB", (SIZE, SIZE), (40, 40, 200))
    kw = dict(model="xl", init_images=[init], denoising_strength=0.8, steps=5)
    plain = engine.generate(req(Img2ImgRequest, **kw))
    refined = engine.generate(req(Img2ImgRequest, refiner_checkpoint="main", refiner_switch_at=0.3, **kw))
    assert differ(refined, plain)
    assert params(refined.infotexts[0])["Refiner"].startswith("main [")
    with pytest.raises(RequestError) as exc:
        gen(engine, refiner_checkpoint="vpred", refiner_switch_at=0.5)
    assert exc.value.field == "refiner_checkpoint" and "prediction" in exc.value.message
    with pytest.raises(RequestError) as exc:
        gen(engine, refiner_checkpoint="nope", refiner_switch_at=0.5)
    assert exc.value.field == "refiner_checkpoint"


def test_refiner_and_hires_choices_from_the_ui(tmp_path):
    from ui_fixtures import fake_context

    from ui.app import create_ui
    from ui.common import build_request, fields_from_text

    base = dict(prompt="a cat", steps=3, width=64, height=64, seed=1, sampler_name="Euler a", model="", vae="")
    r = build_request("txt2img", {**base, "refiner_checkpoint": "None", "refiner_switch_at": 0.8})
    assert r.refiner_checkpoint is None
    ctx = fake_context(tmp_path)
    try:
        web = create_ui(ctx)
        for mode in ("txt2img", "img2img"):
            tab = web.tabs[mode]
            assert tab.fields["refiner_checkpoint"].elem_id == f"{mode}_refiner_checkpoint"
            assert "tiny-a.safetensors" in str(tab.fields["refiner_checkpoint"].choices)
        t2i = web.tabs["txt2img"]
        handler = next(f for f in web.blocks.fns.values() if f.api_name == "txt2img_generate")
        values = {**base, "refiner_checkpoint": "tiny-a.safetensors", "refiner_switch_at": 0.6}
        values.update(enable_hr=True, hr_scheduler="Karras", hr_checkpoint_name="Use same checkpoint")
        data = {c: values[n] for n, c in t2i.fields.items() if n in values}
        data[web.tabs["top"].checkpoint], data[web.tabs["top"].vae] = "tiny-b.safetensors", "Automatic"
        list(handler.fn(data))
        sent = ctx.engine.requests[-1]
        assert (sent.refiner_checkpoint, sent.refiner_switch_at, sent.hr_scheduler) == (
            "tiny-a.safetensors",
            0.6,
            "Karras",
        )
    finally:
        ctx.service.shutdown()
    # pasting an infotext brings the choices back
    f = fields_from_text(
        "x\nSteps: 4, Seed: 1, Size: 64x64, Hires schedule type: Karras, Refiner: b [0123456789], "
        "Refiner switch at: 0.7"
    )
    assert (f["hr_scheduler"], f["refiner_checkpoint"], f["refiner_switch_at"]) == ("Karras", "b [0123456789]", 0.7)
    assert fields_from_text("x\nSteps: 4, Seed: 1")["refiner_checkpoint"] == "None"


# ---- restore_faces ---------------------------------------------------------------------------------------------
def test_restore_faces_is_accepted_and_reported_as_not_applied(engine):
    res = gen(engine, restore_faces=True, steps=2)
    info = res.info(req(restore_faces=True))
    assert info["restore_faces"] is True and info["face_restoration_model"] is None
    assert "restore_faces: not applied" in info["comments"]
    assert "Face restoration" not in params(res.infotexts[0])


# ---- through the A1111 API's request models ---------------------------------------------------------------------
def test_a1111_payloads_reach_the_engine(engine):
    import base64
    import io

    from api.schemas import (
        StableDiffusionImg2ImgProcessingAPI,
        StableDiffusionTxt2ImgProcessingAPI,
        a1111_engine_values,
        build_engine_request,
    )

    def run(model, payload):
        values = a1111_engine_values(model(**payload))
        return engine.generate(build_engine_request({**values, "model": "main"}))

    t2i = {"prompt": "a red circle", "steps": 4, "width": 64, "height": 64, "seed": 7, "sampler_name": "Euler"}
    t2i.update(tiling=True, s_min_uncond=2.0, refiner_checkpoint="second", refiner_switch_at=0.5)
    p = params(run(StableDiffusionTxt2ImgProcessingAPI, t2i).infotexts[0])
    assert (p["Tiling"], p["NGMS"], p["Refiner switch at"]) == ("True", "2", "0.5") and p["Refiner"].startswith(
        "second"
    )

    def b64(im: Image.Image) -> str:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    i2i = {**t2i, "tiling": False, "init_images": [b64(Image.new("RGB", (SIZE, SIZE), (9, 99, 199)))]}
    i2i.update(mask=b64(_square_mask()), mask_blur_x=10, mask_blur_y=0, initial_noise_multiplier=0.5)
    p = params(run(StableDiffusionImg2ImgProcessingAPI, i2i).infotexts[0])
    assert (p["Mask blur x"], p["Mask blur y"], p["Noise multiplier"]) == ("10", "0", "0.5")


# ---- CFG rescale -------------------------------------------------------------------------------------------
def test_rescale_guidance_matches_the_positive_spread_and_mixes_by_phi():
    from ldm_core.pipeline.loop import rescale_guidance

    g = torch.Generator().manual_seed(0)
    positive = torch.randn(3, 4, 8, 8, generator=g)
    guided = 5.0 * torch.randn(3, 4, 8, 8, generator=g) + 1.0
    full = rescale_guidance(guided, positive, 1.0)
    assert torch.allclose(full.std(dim=(1, 2, 3)), positive.std(dim=(1, 2, 3)), rtol=1e-5)  # per image
    assert torch.equal(rescale_guidance(guided, positive, 0.0), guided)
    half = rescale_guidance(guided, positive, 0.5)
    assert torch.allclose(half, 0.5 * full + 0.5 * guided, atol=1e-6)


def test_rescale_cfg_from_request_alwayson_scripts_and_the_model_sidecar(engine):
    ckpt = Path(engine.config.ckpt_dirs[0])
    src = ckpt / "vpred.safetensors"
    shutil.copy(src, ckpt / "rescaled.safetensors")
    (ckpt / "rescaled.json").write_text('{"rescale_cfg": 0.7}', encoding="utf-8")
    engine.refresh_models()
    plain = gen(engine, model="vpred", cfg_scale=12)
    own = gen(engine, model="rescaled", cfg_scale=12)  # the sidecar's recommendation applies
    assert params(own.infotexts[0])["Rescale CFG"] == "0.7" and "Rescale CFG" not in params(plain.infotexts[0])
    assert differ(plain, own)
    off = gen(engine, model="rescaled", cfg_scale=12, rescale_cfg=0.0)  # the request's 0 wins
    assert "Rescale CFG" not in params(off.infotexts[0])
    assert np.array_equal(arr(off.images[0]), arr(plain.images[0]))
    asked = gen(engine, model="vpred", cfg_scale=12, rescale_cfg=0.7)
    assert np.array_equal(arr(asked.images[0]), arr(own.images[0]))
    # a hires pass on another checkpoint runs at the job's value (the one its infotext records), not at
    # that checkpoint's recommendation: "rescaled" is "vpred"'s weights with a sidecar saying 0.7
    hr = dict(model="vpred", cfg_scale=12, enable_hr=True, hr_scale=1.5, denoising_strength=0.6, hr_second_pass_steps=4)
    same = gen(engine, **hr)
    other = gen(engine, **hr, hr_checkpoint_name="rescaled")
    assert "Rescale CFG" not in params(other.infotexts[0])
    assert np.array_equal(arr(other.images[0]), arr(same.images[0]))
    # the alwayson_scripts A1111-family clients send it in
    for scripts, phi in (
        ({"RescaleCFG": {"args": [0.7]}}, 0.7),  # Forge's built-in
        ({"CFG Rescale Extension": {"args": [0.5, False]}}, 0.5),  # A1111 extension
        ({"RescaleCFG for reForge": {"args": [True, 0.3]}}, 0.3),
        ({"RescaleCFG for reForge": {"args": [False, 0.3]}}, 0.0),
    ):
        assert req(alwayson_scripts=scripts).rescale_cfg == phi, scripts
    assert req(rescale_cfg=0.2, alwayson_scripts={"RescaleCFG": {"args": [0.7]}}).rescale_cfg == 0.2
    with pytest.raises(RequestError) as err:
        req(rescale_cfg=1.5)
    assert err.value.field == "rescale_cfg"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"rescale_cfg": 2}', "rescale_cfg 2 must be a number from 0 to 1"),
        ('{"sampler_name": ""}', "sampler_name '' must be a sampler or schedule type label"),
        ('{"scheduler": 3}', "scheduler 3 must be a sampler or schedule type label"),
    ],
)
def test_a_bad_value_in_a_sidecar_names_the_file(tmp_path, content, message):
    from ldm_core.models.sidecar import SidecarError, read_sidecar

    (tmp_path / "m.safetensors").write_bytes(b"")
    (tmp_path / "m.json").write_text(content, encoding="utf-8")
    with pytest.raises(SidecarError, match=r"m\.json: " + message):
        read_sidecar(tmp_path / "m.safetensors")


def test_a_sidecars_recommendations_are_read(tmp_path):
    from ldm_core.models.sidecar import read_sidecar

    (tmp_path / "m.safetensors").write_bytes(b"")
    text = '{"rescale_cfg": 0.25, "sampler_name": " Euler ", "scheduler": "Exponential"}'
    (tmp_path / "m.json").write_text(text, encoding="utf-8")
    side = read_sidecar(tmp_path / "m.safetensors")
    assert (side.rescale_cfg, side.sampler_name, side.scheduler) == (0.25, "Euler", "Exponential")


def test_rescale_cfg_pastes_back_from_infotext():
    from ui.common import fields_from_text

    assert fields_from_text("a red circle\nSteps: 20, CFG scale: 7, Rescale CFG: 0.7")["rescale_cfg"] == 0.7
    assert fields_from_text("a red circle\nSteps: 20, CFG scale: 7, CFG Rescale: 0.5")["rescale_cfg"] == 0.5
    assert fields_from_text("a red circle\nSteps: 20, CFG scale: 7")["rescale_cfg"] == 0.0


def test_rescale_cfg_through_the_a1111_request_models():
    from api.schemas import StableDiffusionTxt2ImgProcessingAPI, a1111_engine_values, build_engine_request

    def engine_request(payload):
        return build_engine_request(a1111_engine_values(StableDiffusionTxt2ImgProcessingAPI(**payload)))

    base = {"prompt": "a red circle", "steps": 4}
    assert engine_request(base).rescale_cfg is None  # the model's recommendation
    assert engine_request({**base, "rescale_cfg": 0.6}).rescale_cfg == 0.6
    forge = {**base, "alwayson_scripts": {"RescaleCFG": {"args": [0.7]}}}
    assert engine_request(forge).rescale_cfg == 0.7


# ---- the model's recommended sampling (sidecar sampler_name / scheduler) -----------------------------------
def test_a_request_naming_no_sampler_runs_the_models_recommended_sampling(engine):
    ckpt = Path(engine.config.ckpt_dirs[0])
    shutil.copy(ckpt / "main.safetensors", ckpt / "advised.safetensors")
    (ckpt / "advised.json").write_text('{"sampler_name": "dpm++ 2m", "scheduler": "exponential"}', encoding="utf-8")
    engine.refresh_models()
    assert engine.recommended_sampling("advised") == ("DPM++ 2M", "Exponential")  # the registry's labels
    assert engine.recommended_sampling("main") == (None, None)

    def sampling(model, **kw):
        p = params(engine.generate(req(model=model, **kw)).infotexts[0])
        return p["Sampler"], p.get("Schedule type")

    assert sampling("advised", sampler_name=None) == ("DPM++ 2M", "Exponential")
    assert sampling("advised", sampler_name=None, scheduler="Karras") == ("DPM++ 2M", "Karras")  # named wins
    assert sampling("advised", sampler_name="Euler a") == ("Euler a", "Uniform")  # named: its own default
    assert sampling("main", sampler_name=None)[0] == "Euler a"  # no recommendation: the default sampler
    same = engine.generate(req(model="advised", sampler_name=None))
    asked = engine.generate(req(model="main", sampler_name="DPM++ 2M", scheduler="Exponential"))
    assert np.array_equal(arr(same.images[0]), arr(asked.images[0]))  # "advised" holds main's weights
    # the recommendation is for images: a clip naming no sampler runs the default one
    clip = req(model="advised", sampler_name=None, animatediff={"enable": True, "model": "any", "video_length": 8})
    assert engine.sampling(clip) == ("Euler a", "Automatic")
    # an unknown sampler in a sidecar is ignored (logged), not a failed job
    (ckpt / "advised.json").write_text('{"sampler_name": "Euler z"}', encoding="utf-8")
    assert engine.recommended_sampling("advised") == (None, None)
    assert sampling("advised", sampler_name=None)[0] == "Euler a"
