"""Every size path follows the VAE's own factor: a tiny SD1 model with a factor-4 autoencoder (native 64 px from
16x16 latents, the built-in model v2's geometry) gives exactly the asked size at multiples of 4 that are not
multiples of 8 (txt2img, img2img, inpaint, hires fix, ControlNet), live previews at the image's size,
outpainting mk2 and SD upscale at multiples of 4, and the UI's size sliders step by the model's factor and
start at its native size (and follow a switch to a factor-8 model and back)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw

from ldm_core.config import EngineConfig
from ldm_core.engine import Engine
from ldm_core.extensions import REPO_EXTENSIONS_DIR, ExtensionManager
from ldm_core.generation_requests import GenerationRequest, Img2ImgRequest, InpaintRequest, RequestError
from ldm_core.progress import JobContext, Progress
from ldm_core.service import Service

torch.set_num_threads(1)
F4 = "tiny-f4"
F8 = "tiny-f8"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A service over an engine holding the factor-4 model and a factor-8 SD1 model, a ControlNet for the
    factor-4 UNet (its hint embedding downsamples by 4) and the ControlNet extension."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from tiny_models import build_tiny_f4, save_diffusers_folder, tiny_components

    root = tmp_path_factory.mktemp("f4")
    ckpt = root / "models" / "Stable-diffusion"
    build_tiny_f4(ckpt, name=F4)
    save_diffusers_folder(tiny_components("sd1"), "sd1", ckpt / F8)
    unet = UNet2DConditionModel.from_pretrained(ckpt / F4 / "unet")
    torch.manual_seed(5)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 32))
    with torch.no_grad():
        for m in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
            m.weight.normal_(0, 0.3)
            m.bias.normal_(0, 0.1)
    cn.save_pretrained(str(root / "models" / "ControlNet" / "cn-f4"))
    # the same UNet with the standard hint encoder (1/8): it cannot drive a factor-4 model
    ControlNetModel.from_unet(unet).save_pretrained(str(root / "models" / "ControlNet" / "cn-f8-hint"))
    cfg = EngineConfig.from_data_dir(root, builtin_model_dir=None, save_images=False, preview_every=1, device="cpu")
    engine = Engine(cfg)
    manager = ExtensionManager([REPO_EXTENSIONS_DIR], config=cfg, state_file=root / "extensions.json")
    manager.load(engine)
    assert manager.get("controlnet").status == "loaded", manager.get("controlnet").message
    engine.load_checkpoint(F4)
    svc = Service(cfg, engine=engine)
    yield svc
    svc.shutdown()


def _fields(**kw):
    base = dict(prompt="a red circle", steps=2, seed=3, sampler_name="Euler", model=F4, save_images=False)
    base.update(kw)
    return base


def _picture(w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h), (30, 60, 200))
    ImageDraw.Draw(img).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(220, 30, 30))
    return img


def test_factor_and_native_size_come_from_the_vae_config(service):
    model = service.engine.load_checkpoint(F4)
    assert (model.vae_scale_factor, model.native_size) == (4, 64)
    assert service.engine.size_multiple(F4) == 4 and service.engine.size_multiple(F8) == 8
    assert model.work_size(None, None) == (64, 64) and model.work_size(70, 45) == (68, 44)


def test_txt2img_at_native_size_and_at_multiples_of_4(service):
    eng = service.engine
    assert eng.generate(GenerationRequest.build(**_fields())).images[0].size == (64, 64)  # native by default
    res = eng.generate(GenerationRequest.build(**_fields(width=68, height=76)))
    assert res.images[0].size == (68, 76) and "Size: 68x76" in res.infotexts[0]
    # a size off the factor is rounded down to a multiple of 4 (A1111 rounds down to its VAE's factor)
    assert eng.generate(GenerationRequest.build(**_fields(width=71, height=66))).images[0].size == (68, 64)


def test_img2img_and_inpaint_at_multiples_of_4(service):
    eng = service.engine
    init = _picture(68, 76)
    i2i = Img2ImgRequest.build(**_fields(init_images=[init], width=68, height=76, denoising_strength=0.5))
    assert eng.generate(i2i).images[0].size == (68, 76)
    mask = Image.new("L", (68, 76), 0)
    mask.paste(255, (20, 20, 48, 56))
    inp = InpaintRequest.build(**_fields(init_images=[init], mask=mask, width=68, height=76, denoising_strength=0.8))
    out = eng.generate(inp).images[0]
    assert out.size == (68, 76)
    assert out.getpixel((2, 2)) == init.getpixel((2, 2))  # outside the mask: the original, pasted back


def test_hires_fix_rounds_to_the_models_factor(service):
    req = GenerationRequest.build(
        **_fields(width=72, height=88, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6)
    )
    res = service.engine.generate(req)
    assert res.images[0].size == (108, 132)  # 1.5x is a multiple of 4 (not of 8): kept
    assert "Size: 72x88" in res.infotexts[0] and "Hires upscale: 1.5" in res.infotexts[0]


class _Previews(Progress):
    """A progress sink that keeps every live preview it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list = []

    def update(self, **changes) -> None:
        if changes.get("preview_source") is not None:
            self.sources.append(changes["preview_source"])
        super().update(**changes)


def test_live_previews_have_the_images_size(service):
    # 132 px = 33 latents per side: above the full-decode area, so the cheap linear preview is used
    for size in (132, 64):
        sink = _Previews()
        res = service.engine.generate(
            GenerationRequest.build(**_fields(width=size, height=size)), JobContext(progress=sink)
        )
        assert res.images[0].size == (size, size)
        previews = [s.image() for s in sink.sources]
        assert previews and all(p is not None and p.size == (size, size) for p in previews)


def test_controlnet_hint_at_multiples_of_4(service):
    unit = {"enabled": True, "module": "none", "model": "cn-f4", "image": _picture(68, 76), "weight": 1.0}
    plain = service.engine.generate(GenerationRequest.build(**_fields(width=68, height=76)))
    req = GenerationRequest.build(**_fields(width=68, height=76, alwayson_scripts={"controlnet": {"args": [unit]}}))
    res = service.engine.generate(req)
    assert res.images[0].size == (68, 76)
    assert res.images[0].tobytes() != plain.images[0].tobytes()  # the ControlNet acted
    assert "ControlNet 0" in res.infotexts[0]
    # a ControlNet whose hint encoder shrinks by 8 is refused up front, naming the unit's model field
    unit.update(model="cn-f8-hint")
    req = GenerationRequest.build(**_fields(width=68, height=76, alwayson_scripts={"controlnet": {"args": [unit]}}))
    with pytest.raises(RequestError) as e:
        service.engine.generate(req)
    assert e.value.field == "alwayson_scripts.controlnet.args[0].model" and "1/8" in e.value.message


def _script(service, request, name, args):
    job = service.submit_script(request, name, args)
    job.wait(120)
    if job.error is not None:
        raise job.error
    return job.result


def test_outpainting_mk2_works_at_multiples_of_4(service):
    i2i = Img2ImgRequest.build(**_fields(init_images=[_picture(68, 68)], denoising_strength=0.8))
    res = _script(service, i2i, "outpainting mk2", ["", 8, 4, ["right"], 1.0, 0.05])
    # 68 + 8 = 76 is already a multiple of 4 (not grown to 80), and the 68 px height is worked at 68 (not 64)
    assert res.images[0].size == (76, 68) and "Size: 76x68" in res.infotexts[0]


def test_sd_upscale_tiles_at_multiples_of_4(service):
    i2i = Img2ImgRequest.build(**_fields(init_images=[_picture(48, 48)], width=76, height=68, denoising_strength=0.3))
    res = _script(service, i2i, "sd upscale", [None, 8, "Lanczos", 2.0])
    assert res.images[0].size == (96, 96)
    assert "Size: 76x68" in res.infotexts[0]  # tiles worked at their own size (8 would make it 80x64)


def test_ui_size_sliders_follow_the_model(service, tmp_path):
    from ui.app import create_ui
    from ui.common import UiContext
    from ui.settings_store import SettingsStore

    service.engine.load_checkpoint(F4)
    ctx = UiContext(service=service, settings=SettingsStore(tmp_path / "config.json"), data_dir=tmp_path)
    web = create_ui(ctx)
    tabs = [web.tabs[t] for t in ("txt2img", "img2img", "inpaint")]
    for tab in tabs:
        for name in ("width", "height"):
            cfg = tab.fields[name].get_config()
            assert (cfg["value"], cfg["step"]) == (64, 4), (name, cfg)
            assert cfg["minimum"] % 4 == 0
    # a page opened now starts at the model's native size
    for tab in tabs:
        for name in ("width", "height"):
            assert _value_and_step(tab.defaults[tab.fields[name]]()) == (64, 4)
    switch = next(
        f
        for f in web.blocks.fns.values()
        if f.name == "switch" and any(t[0] == web.tabs["top"].checkpoint._id for t in f.targets)
    )
    sizes = [64, 64, 64, 96, 64, 64]  # txt2img, img2img, inpaint (width, height); one side changed by the user
    out = list(switch.fn(F8, *sizes))[-1]
    assert [_value_and_step(u) for u in out[2:]] == [(512, 8)] * 3 + [(96, 8)] + [(512, 8)] * 2
    out = list(switch.fn(F4, 512, 512, 512, 96, 512, 512))[-1]
    assert [_value_and_step(u) for u in out[2:]] == [(64, 4)] * 3 + [(96, 4)] + [(64, 4)] * 2


def _value_and_step(update) -> tuple:
    """(value, step) of a slider update (a component or an update dict); step None when it does not set one."""
    if isinstance(update, dict):
        return update.get("value"), update.get("step")
    if hasattr(update, "get_config"):
        return update.value, update.step
    return update, None


def test_latent_normalisation_reads_the_scaling_and_an_optional_shift():
    """Every path that turns posteriors into a model's latents (engine encode/decode, previews, trainers) takes
    (scaling, shift) from here: SD VAEs have no shift_factor (or null), newer VAEs have one."""
    from types import SimpleNamespace

    from ldm_core.models.geometry import latent_normalisation

    assert latent_normalisation(SimpleNamespace(scaling_factor=0.18215)) == (0.18215, 0.0)
    assert latent_normalisation(SimpleNamespace(scaling_factor=0.5, shift_factor=None)) == (0.5, 0.0)
    assert latent_normalisation(SimpleNamespace(scaling_factor=1.5, shift_factor=0.1)) == (1.5, 0.1)
