"""The ControlNet extension on tiny random models: both single-file layouts (original `control_model.*` SD1
and SDXL, diffusers keys) and diffusers folders load exactly, change the output through the engine, respect
guidance start/end, control modes, several units, family checks, preprocessors, A1111's API unit fields
and the infotext round trip; and the ControlNet trainer on a tiny model."""

from __future__ import annotations

import base64
import dataclasses
import importlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from ldm_core.config import EngineConfig
from ldm_core.engine import Engine
from ldm_core.extensions import REPO_EXTENSIONS_DIR, ExtensionManager
from ldm_core.generation_requests import GenerationRequest, Img2ImgRequest, RequestError
from ldm_core.infotext import build_infotext, parse_infotext
from ldm_core.pipeline.loop import StepState

torch.set_num_threads(1)
SIZE = 64


# ---------------------------------------------------------------------------------------------- helpers
def tiny_controlnet(unet_dir: Path, seed: int = 5):
    """A ControlNet copied from a tiny UNet, with random (not zero) output convolutions so it acts."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(unet_dir)
    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet)
    with torch.no_grad():
        for m in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
            m.weight.normal_(0, 0.3)
            m.bias.normal_(0, 0.1)
    return cn.eval()


def to_original_layout(cn) -> dict[str, torch.Tensor]:
    """A diffusers ControlNet in the original `control_model.*` key layout, mapped with the project's own
    UNet key tables (an implementation independent of the diffusers converter the extension uses)."""
    from ldm_core.models.single_file import UNetLayout

    sd = cn.state_dict()
    body = {k: v for k, v in sd.items() if not k.startswith("controlnet_")}
    out, unmatched = UNetLayout.from_config(dict(cn.config)).key_map().convert(body, to_diffusers=False)
    assert not unmatched, unmatched[:5]
    nb = len(cn.controlnet_cond_embedding.blocks)
    for k, v in sd.items():
        if k.startswith("controlnet_cond_embedding."):
            rest = k[len("controlnet_cond_embedding.") :]
            if rest.startswith("conv_in."):
                out["input_hint_block.0." + rest[len("conv_in.") :]] = v
            elif rest.startswith("conv_out."):
                out[f"input_hint_block.{2 * (nb + 1)}." + rest[len("conv_out.") :]] = v
            else:
                _, i, p = rest.split(".", 2)
                out[f"input_hint_block.{2 * (int(i) + 1)}.{p}"] = v
        elif k.startswith("controlnet_down_blocks."):
            _, i, p = k.split(".", 2)
            out[f"zero_convs.{i}.0.{p}"] = v
        elif k.startswith("controlnet_mid_block."):
            out["middle_block_out.0." + k.split(".", 1)[1]] = v
    return {"control_model." + k: v.contiguous() for k, v in out.items()}


def square_outline(size: int = SIZE, box=(18, 30, 50, 58)) -> Image.Image:
    img = Image.new("RGB", (size, size))
    ImageDraw.Draw(img).rectangle(box, outline=(255, 255, 255), width=2)
    return img


def b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im).astype(np.int16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models):
    """An engine with tiny SD1, SD2 and SDXL models and tiny ControlNets in every layout, the extension loaded."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("cn")
    ckpt = root / "models" / "Stable-diffusion"
    cnd = root / "models" / "ControlNet"
    ckpt.mkdir(parents=True)
    cnd.mkdir(parents=True)
    nets = {}
    for fam in ("sd1", "sdxl"):
        (ckpt / f"tiny-{fam}").symlink_to(tiny_models[fam]["diffusers"], target_is_directory=True)
        cn = tiny_controlnet(tiny_models[fam]["diffusers"] / "unet")
        nets[fam] = cn
        save_file(to_original_layout(cn), str(cnd / f"cn-{fam}-orig.safetensors"))
        save_file({k: v.contiguous() for k, v in cn.state_dict().items()}, str(cnd / f"cn-{fam}-keys.safetensors"))
        cn.save_pretrained(str(cnd / f"cn-{fam}-folder"))
    (ckpt / "tiny-sd2").symlink_to(tiny_models["sd2_v"]["diffusers"], target_is_directory=True)
    cfg = EngineConfig.from_data_dir(root, builtin_model_dir=None, save_images=False, preview_every=0)
    engine = Engine(cfg)
    manager = ExtensionManager([REPO_EXTENSIONS_DIR], config=cfg, state_file=root / "extensions.json")
    manager.load(engine)
    assert manager.get("controlnet").status == "loaded", manager.get("controlnet").message
    return {"engine": engine, "manager": manager, "root": root, "nets": nets, "cnd": cnd}


def cn_module(name: str):
    return importlib.import_module(f"ldm_ext_controlnet.{name}")


def req(model: str, units: list[dict] | None = None, **kw) -> GenerationRequest:
    base = dict(
        prompt="a red circle",
        negative_prompt="blue",
        steps=3,
        width=SIZE,
        height=SIZE,
        seed=7,
        sampler_name="Euler a",
        model=model,
        save_images=False,
    )
    base.update(kw)
    if units is not None:
        base["alwayson_scripts"] = {"controlnet": {"args": units}}
    return GenerationRequest.build(**base)


def unit(model: str, **kw) -> dict:
    u = {"enabled": True, "module": "none", "model": model, "image": square_outline()}
    u.update(kw)
    return u


# ---------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("fam", ["sd1", "sdxl"])
@pytest.mark.parametrize("layout", ["orig", "keys", "folder"])
def test_every_layout_loads_exactly(setup, fam, layout):
    cm = cn_module("control_models")
    entry = next(e for e in cm.scan([setup["cnd"]]) if e.name == f"cn-{fam}-{layout}")
    model = setup["engine"].load_checkpoint(f"tiny-{fam}")
    loaded = cm.load_controlnet(entry, dict(model.unet.config))
    want = setup["nets"][fam].state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    for key in ("block_out_channels", "attention_head_dim", "transformer_layers_per_block", "addition_embed_type"):
        assert loaded.config[key] == setup["nets"][fam].config[key] or list(loaded.config[key]) == list(
            setup["nets"][fam].config[key]
        )
    assert cm.family_of(loaded.config) == fam


# ---------------------------------------------------------------------------------------------- engine
@pytest.mark.parametrize(("fam", "layout"), [("sd1", "orig"), ("sdxl", "orig"), ("sdxl", "folder")])
def test_controlnet_changes_output_and_respects_guidance_window(setup, fam, layout):
    engine = setup["engine"]
    name = f"cn-{fam}-{layout}"
    base = engine.generate(req(f"tiny-{fam}")).images[0]
    full = engine.generate(req(f"tiny-{fam}", [unit(name)])).images[0]
    # 3 steps at fractions 0, 1/3, 2/3: a window [0.9, 1] never acts, [0, 0.2] acts at the first step only
    never = engine.generate(req(f"tiny-{fam}", [unit(name, guidance_start=0.9, guidance_end=1.0)])).images[0]
    first = engine.generate(req(f"tiny-{fam}", [unit(name, guidance_start=0.0, guidance_end=0.2)])).images[0]
    off = engine.generate(req(f"tiny-{fam}", [unit(name, enabled=False)])).images[0]
    d_full = np.abs(arr(full) - arr(base)).mean()
    assert d_full > 1.0
    assert np.array_equal(arr(never), arr(base))
    assert np.array_equal(arr(off), arr(base))
    d_first = np.abs(arr(first) - arr(base)).mean()
    assert 0 < d_first and not np.array_equal(arr(first), arr(full))
    # weight 0 is no control; a smaller weight is closer to no control
    zero = engine.generate(req(f"tiny-{fam}", [unit(name, weight=0.0)])).images[0]
    assert np.array_equal(arr(zero), arr(base))


def test_two_units_chain_and_img2img_uses_the_init_image(setup):
    engine = setup["engine"]
    one = engine.generate(req("tiny-sd1", [unit("cn-sd1-orig")])).images[0]
    two = engine.generate(
        req("tiny-sd1", [unit("cn-sd1-orig"), unit("cn-sd1-keys", image=square_outline(box=(5, 5, 20, 20)))])
    ).images[0]
    assert np.abs(arr(one) - arr(two)).mean() > 0.5
    init = square_outline()
    kw = dict(
        prompt="x",
        steps=3,
        width=SIZE,
        height=SIZE,
        seed=3,
        model="tiny-sd1",
        save_images=False,
        init_images=[init],
        denoising_strength=0.9,
    )
    plain = engine.generate(Img2ImgRequest.build(**kw)).images[0]
    controlled = engine.generate(
        Img2ImgRequest.build(
            **kw, alwayson_scripts={"controlnet": {"args": [{"enabled": True, "model": "cn-sd1-orig"}]}}
        )
    ).images[0]
    assert np.abs(arr(plain) - arr(controlled)).mean() > 0.5


def test_family_mismatch_and_missing_things_fail_before_denoising(setup):
    engine = setup["engine"]
    with pytest.raises(RequestError) as e:
        engine.generate(req("tiny-sd1", [unit("cn-sdxl-orig")]))
    assert "SDXL" in str(e.value) and "SD 1.x" in str(e.value) and e.value.field.endswith(".model")
    with pytest.raises(RequestError) as e:
        engine.generate(req("tiny-sd2", [unit("cn-sd1-folder")]))
    assert "SD 2.x" in str(e.value)
    with pytest.raises(RequestError) as e:
        engine.generate(req("tiny-sd1", [unit("no-such-net")]))
    assert "not found" in str(e.value) and "cn-sd1-orig" in str(e.value)
    with pytest.raises(RequestError) as e:
        engine.generate(req("tiny-sd1", [unit("cn-sd1-orig", image=None)]))
    assert "no image" in str(e.value)
    with pytest.raises(RequestError) as e:
        engine.generate(req("tiny-sd1", [unit("cn-sd1-orig", module="no-such-module")]))
    assert e.value.field.endswith(".module")


def _provider(setup, mode: str):
    engine, manager = setup["engine"], setup["manager"]
    model = engine.load_checkpoint("tiny-sd1")
    r = req("tiny-sd1", [unit("cn-sd1-orig", control_mode=mode, weight=0.5)])
    hooks = manager.hooks_for(engine, r, model)
    (provider,) = hooks.unet_inputs
    torch.manual_seed(0)
    b = 1
    x = torch.randn(2 * b, 4, SIZE // 8, SIZE // 8)
    ctx = torch.randn(2 * b, 77, model.unet.config.cross_attention_dim)
    step = StepState(0, 3, torch.tensor(500), x, ctx, None, b, True, [1.0])
    with torch.inference_mode():
        return provider(step)


def test_control_modes(setup):
    bal = _provider(setup, "Balanced")
    prompt = _provider(setup, "My prompt is more important")
    control = _provider(setup, 2)  # A1111's index for "ControlNet is more important"
    down_b, mid_b = bal["down_block_additional_residuals"], bal["mid_block_additional_residual"]
    n = len(down_b) + 1
    # balanced: both CFG halves get control; prompt mode: SD's ramp 0.825**(12-k) over 13 residuals, spread
    # over this model's 7: the middle block at full weight, the shallowest at 0.825**12
    assert down_b[0][:1].abs().sum() > 0 and down_b[0][1:].abs().sum() > 0
    for k, (p, q) in enumerate(
        zip(
            (*prompt["down_block_additional_residuals"], prompt["mid_block_additional_residual"]),
            (*down_b, mid_b),
            strict=True,
        )
    ):
        torch.testing.assert_close(p, q * 0.825 ** (12 * (n - 1 - k) / (n - 1)), rtol=1e-4, atol=1e-6)
    assert n == 7
    torch.testing.assert_close(prompt["mid_block_additional_residual"], mid_b)
    scales = cn_module("main").control_scales(13, 0.5, "My prompt is more important")
    assert scales == pytest.approx([0.5 * 0.825 ** (12 - k) for k in range(13)])  # SD 1.x/2.x: as A1111
    # controlnet mode: the unconditional half gets nothing, the conditional half as in prompt mode
    for p, c in zip(prompt["down_block_additional_residuals"], control["down_block_additional_residuals"], strict=True):
        assert c[:1].abs().sum() == 0
        torch.testing.assert_close(c[1:], p[1:], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- preprocessors
def test_preprocessors_and_pixel_perfect(setup):
    pre = setup["manager"].preprocessors
    img = Image.new("RGB", (128, 96), (250, 250, 250))
    ImageDraw.Draw(img).rectangle((40, 30, 90, 70), fill=(20, 20, 20))
    edges = np.asarray(pre["canny"](img, 96))
    assert edges.shape == (96, 128, 3) and set(np.unique(edges)) == {0, 255}
    assert edges[30, 40:91, 0].max() == 255 and edges[50, 60, 0] == 0 and edges[5, 5, 0] == 0
    thr = np.asarray(pre["threshold"](img, 96))
    assert thr[50, 60, 0] == 0 and thr[5, 5, 0] == 255
    inv = np.asarray(pre["invert (from white bg & black line)"](img, 96))
    assert inv[50, 60, 0] == 235 and inv[5, 5, 0] == 5
    scr = np.asarray(pre["scribble_xdog"](img, 96))
    assert scr.max() == 255 and scr[5, 5, 0] == 0
    assert pre["none"](img, 32).size == img.size
    main = cn_module("main")
    assert main.pixel_perfect_resolution(Image.new("RGB", (512, 512)), 64, 64, "Crop and Resize") == 64
    wide = Image.new("RGB", (100, 200))
    assert main.pixel_perfect_resolution(wide, 64, 64, "Crop and Resize") == 64
    assert main.pixel_perfect_resolution(wide, 64, 64, "Resize and Fill") == 32
    thin = Image.new("RGB", (512, 512))
    ImageDraw.Draw(thin).line((0, 256, 511, 256), fill=(255, 255, 255), width=1)
    small = np.asarray(main.fit_map(thin, 64, 64, "Just Resize"))
    assert set(np.unique(small)) == {0, 255} and small[32, :, 0].min() == 255


# ---------------------------------------------------------------------------------------------- API fields, infotext
def test_a1111_unit_fields(setup):
    from ldm_core.extension_api import parse_units

    units = cn_module("units")
    raw = {
        "args": [
            {
                "enabled": True,
                "module": "canny",
                "model": "cn-sd1-orig [12345678]",
                "weight": 0.5,
                "image": "data:image/png;base64," + b64(square_outline()),
                "resize_mode": 2,
                "processor_res": 64,
                "threshold_a": 50,
                "threshold_b": 150,
                "guidance_start": 0.1,
                "guidance_end": 0.9,
                "pixel_perfect": True,
                "control_mode": 2,
                "low_vram": False,
                "hr_option": "Both",
            },
            {
                "input_image": {"image": b64(square_outline()), "mask": None},
                "resize_mode": "Inner Fit (Scale to Fit)",
                "control_mode": "My prompt is more important",
                "model": None,
            },
        ]
    }
    u0, u1 = parse_units(units.ControlNetUnit, raw, name="controlnet", max_units=3)
    assert (u0.resize_mode, u0.control_mode, u0.processor_res, u0.pixel_perfect) == (
        "Resize and Fill",
        "ControlNet is more important",
        64,
        True,
    )
    assert u0.image.size == (SIZE, SIZE) and u1.image.size == (SIZE, SIZE)
    assert (u1.resize_mode, u1.control_mode, u1.model, u1.has_model) == (
        "Crop and Resize",
        "My prompt is more important",
        "None",
        False,
    )
    with pytest.raises(RequestError) as e:
        parse_units(units.ControlNetUnit, {"args": [{"control_mode": 7}]}, name="controlnet", max_units=3)
    assert e.value.field == "alwayson_scripts.controlnet.args[0].control_mode"
    with pytest.raises(RequestError) as e:
        parse_units(units.ControlNetUnit, {"args": [{"image": "not base64 at all"}]}, name="controlnet")
    assert e.value.field.endswith("args[0].image")
    with pytest.raises(RequestError):
        parse_units(units.ControlNetUnit, {"args": [{}, {}, {}, {}]}, name="controlnet", max_units=3)


def test_infotext_round_trip(setup):
    manager = setup["manager"]
    r = req(
        "tiny-sd1",
        [
            unit("cn-sd1-orig", module="canny", weight=0.75, guidance_end=0.5, pixel_perfect=True),
            {"enabled": False},
            unit("cn-sd1-folder", control_mode=1),
        ],
    )
    params = manager.infotext_params(r)
    assert set(params) == {"ControlNet 0", "ControlNet 2"}
    assert params["ControlNet 0"].startswith("Module: canny, Model: cn-sd1-orig [")
    assert "Weight: 0.75" in params["ControlNet 0"] and "Threshold A: 100, Threshold B: 200" in params["ControlNet 0"]
    assert "Control Mode: My prompt is more important" in params["ControlNet 2"]
    text = build_infotext("a red circle", "", {"Steps": 3, "Seed": 7, **params, "Version": "x"})
    assert 'ControlNet 0: "Module: canny' in text
    back = manager.args_from_infotext(parse_infotext(text))
    u0, u1, u2 = back["controlnet"]["args"]
    assert u1 == {"enabled": False}
    assert (u0["module"], u0["weight"], u0["guidance_end"], u0["pixel_perfect"]) == ("canny", 0.75, 0.5, True)
    assert u0["model"].startswith("cn-sd1-orig [") and u2["control_mode"] == "My prompt is more important"
    # what was read back is a valid request again (the model name with its hash resolves)
    again = manager.infotext_params(req("tiny-sd1", [{**u0, "image": square_outline()}]))
    assert again["ControlNet 0"] == params["ControlNet 0"]


def test_ui_section_and_routes(setup):
    manager = setup["manager"]
    (sec,) = [s for s in manager.ui_sections("txt2img") if s.name == "controlnet"]
    names = [f.name for f in sec.fields]
    assert names[:5] == ["enabled", "module", "model", "weight", "image"] and sec.units == 3
    model_field = next(f for f in sec.fields if f.name == "model")
    assert "cn-sd1-orig" in model_field.current_choices()
    assert next(f for f in sec.fields if f.name == "enabled").default is False
    # every slider can show its default, and the preprocessor resolution can be set to the usual 512
    for f in sec.fields:
        if f.kind == "slider":
            k = (f.default - f.minimum) / (f.step or 1)
            assert abs(k - round(k)) < 1e-6, f.name
    res = next(f for f in sec.fields if f.name == "processor_res")
    k = (512 - res.minimum) / (res.step or 1)
    assert abs(k - round(k)) < 1e-6 and res.minimum <= 512 <= res.maximum
    args = sec.args_from_values([f.default for f in sec.fields] * 3)
    assert len(args["args"]) == 3 and args["args"][0]["control_mode"] == "Balanced"
    routes = {r.path: r for _, r in manager.api_routes()}
    assert "cn-sd1-orig" in routes["/controlnet/model_list"].handler(None)["model_list"]
    out = routes["/controlnet/detect"].handler(
        {
            "controlnet_module": "canny",
            "controlnet_input_images": [b64(square_outline())],
            "controlnet_processor_res": 64,
        }
    )
    assert len(out["images"]) == 1


def test_model_folder_is_scanned_once_not_per_job(setup, monkeypatch):
    """Jobs find their ControlNet in the cached listing; the model list route rescans; a name the listing lacks
    (a file added since) rescans once before failing; a deleted file is a clear error, not a crash."""
    engine, manager, cnd = setup["engine"], setup["manager"], setup["cnd"]
    control_models = cn_module("control_models")
    real_scan, scans = control_models.scan, []
    monkeypatch.setattr(control_models, "scan", lambda *a, **k: scans.append(1) or real_scan(*a, **k))
    engine.generate(req("tiny-sd1", [unit("cn-sd1-orig")]))
    scans.clear()
    for _ in range(2):
        engine.generate(req("tiny-sd1", [unit("cn-sd1-orig")]))
    assert scans == []  # nothing rescanned per job (prepare and the infotext both use the listing)
    shutil.copy(cnd / "cn-sd1-orig.safetensors", cnd / "cn-sd1-added.safetensors")
    try:
        engine.generate(req("tiny-sd1", [unit("cn-sd1-added")]))  # not in the listing: one rescan finds it
        assert len(scans) == 1
        engine.generate(req("tiny-sd1", [unit("cn-sd1-added")]))
        assert len(scans) == 1
        with pytest.raises(RequestError, match="not found"):
            engine.generate(req("tiny-sd1", [unit("no-such-net")]))
        assert len(scans) == 2  # once, then the error
        routes = {r.path: r for _, r in manager.api_routes()}
        assert "cn-sd1-added" in routes["/controlnet/model_list"].handler(None)["model_list"]
        assert len(scans) == 3  # the model list always rescans (A1111's refresh)
    finally:
        (cnd / "cn-sd1-added.safetensors").unlink()
    with pytest.raises(RequestError, match="not found") as e:  # still listed, but the file is gone
        engine.generate(req("tiny-sd1", [unit("cn-sd1-added")]))
    assert e.value.field.endswith(".model")


# ---------------------------------------------------------------------------------------------- trainer
def test_trainer_runs_on_a_tiny_model_and_its_output_loads(tmp_path, tiny_models):
    from ldm_core.models import load_model
    from ldm_core.prompts.encode import PromptEncoder
    from ldm_core.train import controlnet as trainer
    from ldm_core.train import shapes

    base = tiny_models["sd1"]["diffusers"]
    # the batched caption encoder gives what the engine's prompt encoder gives
    model = load_model(base)
    enc = trainer.TextEncoder(model)
    caps = ["a red circle in the bottom right", ""]
    got, _ = enc(caps, torch.device("cpu"))
    want = torch.cat([PromptEncoder(model).encode(c, 1).embeds for c in caps])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    out = tmp_path / "models" / "ControlNet" / "tiny-canny"
    opts = _tiny_train_options(base, out, steps=3, resolution=SIZE, log_every=1)
    logs: list[str] = []
    rec = trainer.train_controlnet(opts, log=logs.append)
    assert rec["steps"] == 3 and np.isfinite(rec["final_loss"]) and rec["bytes"] > 0
    assert (out / "config.json").is_file() and (out / "TRAINING.json").is_file()
    opts.resume, opts.steps = True, 1
    assert trainer.train_controlnet(opts, log=logs.append)["steps"] == 1
    scenes, captions = trainer.training_batch(
        0, 5, 8, trainer.ControlNetTrainOptions(base=base, out=out, caption_dropout=0.0, prompt_mismatch=1.0)
    )
    assert all(c != s.caption for c, s in zip(captions, scenes, strict=True))
    edges = trainer.canny_maps(shapes.render(scenes[:2], SIZE))
    assert edges.shape == (2, 3, SIZE, SIZE) and edges.max() == 1.0
    # from a latent cache in a work dir: the cached control maps are the renders' Canny maps, and a second
    # sitting resumes from the checkpoint there (steps continue, nothing starts over)
    work = tmp_path / "work"
    copts = dataclasses.replace(
        opts, out=tmp_path / "cached", resume=False, steps=2, work_dir=work, cache_scenes=5, cache_batch=2
    )
    assert trainer.train_controlnet(copts, log=logs.append)["steps"] == 2
    cache = torch.load(work / "controlnet-cache.pt", weights_only=True)
    assert cache["done"] == 5 and cache["mean"].shape[0] == 5 and (cache["std"] > 0).all()
    cached = trainer.cached_control(cache, torch.tensor([3, 0]))
    scenes5 = trainer.cache_scenes(copts)
    want = trainer.canny_maps(shapes.render([scenes5[3], scenes5[0]], SIZE))
    assert cached.max() == 1.0 and torch.equal(cached, want)
    copts.steps = 4
    logs.clear()
    assert trainer.train_controlnet(copts, log=logs.append)["steps"] == 4
    assert any("at step 2" in m for m in logs) and sum(m.startswith("step ") for m in logs) == 2
    # a cache made for another seed (other scenes) is rebuilt, not reused
    logs.clear()
    other = dataclasses.replace(copts, seed=1, work_dir=tmp_path / "work-seed1", steps=1)
    (tmp_path / "work-seed1").mkdir()
    (tmp_path / "work-seed1" / "controlnet-cache.pt").write_bytes((work / "controlnet-cache.pt").read_bytes())
    trainer.train_controlnet(other, log=logs.append)
    assert any(m.startswith("cache 5/5") for m in logs)
    assert torch.load(tmp_path / "work-seed1" / "controlnet-cache.pt", weights_only=True)["seed"] == 1
    # the evaluation runs end to end through the engine and the extension (2 cases, 2 steps)
    report = trainer.evaluate(base, out, n=2, device="cpu", steps=2, size=SIZE, log=logs.append)
    assert set(report) >= {"circle", "random"} and 0.0 <= report["circle"]["success"] <= 1.0
    assert len(report["circle"]["cases"]) == 2


def test_shape_weight_weighs_the_cells_where_a_shape_differs_from_a_blob():
    from ldm_core.train import controlnet as trainer
    from ldm_core.train import shapes

    def scene(shape, position="centre"):
        return shapes.Scene("white", (shapes.make_object(shape, "red", "large", position),))

    sq, circ, star = scene("square"), scene("circle"), scene("star", "top left")
    w = trainer.shape_loss_weights([sq, circ, star], 16, 4.0)
    assert w.shape == (3, 1, 16, 16) and set(w.unique().tolist()) == {1.0, 4.0}
    cover = shapes.object_coverages(shapes.pack_scenes([sq, circ, star]), 16)[:, 0]
    ys, xs = torch.nonzero(cover[0] > 0.5, as_tuple=True)
    top, left, bottom, right = int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())
    # the square's corners tell it from a circle; its middle and the far background do not
    assert all(float(w[0, 0, y, x]) == 4.0 for y in (top, bottom) for x in (left, right))
    assert float(w[0, 0, (top + bottom) // 2, (left + right) // 2]) == 1.0 and float(w[0, 0, 0, 0]) == 1.0
    # a circle's marked cells are the corners it leaves empty: weighed, though no object covers them
    assert bool(((w[1, 0] == 4.0) & (cover[1] < 0.5)).any())
    # the weighted cells follow the object: the star's lie in the top left quarter
    ys, xs = torch.nonzero(w[2, 0] == 4.0, as_tuple=True)
    assert len(ys) and int(ys.max()) < 10 and int(xs.max()) < 10
    # few cells against the plain mean's 256: the point of the weight
    assert 0 < int((w[0] == 4.0).sum()) < 64
    # overlap and shape weights multiply; both at 1 is the plain mean
    opts = trainer.ControlNetTrainOptions(base=Path("."), out=Path("."), overlap_weight=2.0, shape_weight=4.0)
    both = trainer.loss_weights([sq], 16, opts)
    assert torch.equal(both, trainer.overlap_loss_weights([sq], 16, 2.0) * w[:1])
    assert trainer.loss_weights([sq], 16, trainer.ControlNetTrainOptions(base=Path("."), out=Path("."))) is None


def test_depth_jitter_gives_other_levels_and_keeps_near_bright(tmp_path):
    import random

    from ldm_core.train import condition_maps as cm
    from ldm_core.train import controlnet as trainer
    from ldm_core.train import shapes

    scenes = [cm.overlapping_scene(random.Random(k)) for k in range(16)]
    maps = cm.depth_maps(shapes.pack_scenes(scenes), 32)
    assert torch.equal(cm.jitter_depth_maps(maps, torch.Generator().manual_seed(0), 0.0), maps)
    out = cm.jitter_depth_maps(maps, torch.Generator().manual_seed(0), 1.0)
    assert out.shape == maps.shape and out.min() >= 0 and out.max() <= 1
    levels = set()
    for m, j in zip(maps[:, 0], out[:, 0], strict=True):
        bg, back, front = (m == 0), (m - cm.DEPTH[0]).abs() < 1e-6, (m - cm.DEPTH[1]).abs() < 1e-6
        # read the levels away from the (maybe blurred) edges: the median of each region
        b, k, f = (float(j[r].median()) for r in (bg, back, front))
        assert b < k < f, (b, k, f)  # nearer stays brighter
        levels.add(round(k, 2))
    assert len(levels) > 8  # the back object's grey differs from map to map: not the renderer's one level
    # half the maps at p=0.5, the others untouched
    half = cm.jitter_depth_maps(maps, torch.Generator().manual_seed(1), 0.5)
    same = sum(torch.equal(a, b) for a, b in zip(half, maps, strict=True))
    assert 2 <= same <= 14
    # the option is for depth maps only, and a share
    with pytest.raises(ValueError, match="depth_jitter"):
        trainer.train_controlnet(
            trainer.ControlNetTrainOptions(base=tmp_path, out=tmp_path, condition="seg", depth_jitter=0.5)
        )
    with pytest.raises(ValueError, match="0 to 1"):
        trainer.train_controlnet(
            trainer.ControlNetTrainOptions(base=tmp_path, out=tmp_path, condition="depth", depth_jitter=2.0)
        )


@pytest.mark.parametrize("condition", ["depth", "seg"])
def test_depth_and_seg_controlnets_train_from_the_renderers_maps(tmp_path, tiny_models, condition):
    from ldm_core.train import condition_maps as cm
    from ldm_core.train import controlnet as trainer
    from ldm_core.train import shapes

    base = tiny_models["sd1"]["diffusers"]
    work = tmp_path / "work"
    opts = _tiny_train_options(
        base,
        tmp_path / f"tiny-{condition}",
        steps=2,
        resolution=SIZE,
        work_dir=work,
        cache_scenes=4,
        cache_batch=2,
        condition=condition,
        overlap_weight=4.0 if condition == "depth" else 1.0,
        shape_weight=1.0 if condition == "depth" else 4.0,
        depth_jitter=0.5 if condition == "depth" else 0.0,
    )
    rec = trainer.train_controlnet(opts, log=lambda _m: None)
    assert rec["condition"] == condition and rec["steps"] == 2 and np.isfinite(rec["final_loss"])
    cache = torch.load(work / "controlnet-cache.pt", weights_only=True)
    scenes = trainer.cache_scenes(opts)
    want = cm.condition_maps(condition, shapes.pack_scenes(scenes[:2]), None, SIZE)
    got = trainer.cached_control(cache, torch.tensor([0, 1]))
    assert got.shape == want.shape and (got - want).abs().max() <= 1 / 255 + 1e-6
    # a cache left by other scenes of the same count (an older scene generator) is rebuilt, not paired with
    # these scenes' captions
    from ldm_core.models import load_model

    vae = load_model(base, dtype=torch.float32).vae
    other = trainer.build_cache(vae, scenes[::-1], SIZE, work / "controlnet-cache.pt", 2, lambda _m: None, 0, condition)
    flipped = cm.condition_maps(condition, shapes.pack_scenes(scenes[::-1][:2]), None, SIZE)
    assert (trainer.cached_control(other, torch.tensor([0, 1])) - flipped).abs().max() <= 1 / 255 + 1e-6
    if condition == "depth":  # half the depth scenes overlap, and the map says which object is in front
        assert len(scenes[0].objects) == 2 and scenes[0].caption
        assert scenes[0].objects[0].shape != scenes[0].objects[1].shape  # the prompt can tell them apart
        cover = shapes.object_coverages(shapes.pack_scenes(scenes[:1]), SIZE)[0]
        overlap = (cover[0] > 0.5) & (cover[1] > 0.5)
        assert overlap.any() and torch.allclose(want[0, 0][overlap], torch.tensor(cm.DEPTH[1]))
        # the overlap-weighted loss weighs exactly the cells both objects cover
        w = trainer.overlap_loss_weights(scenes[:1], SIZE, 4.0)
        assert w.shape == (1, 1, SIZE, SIZE) and torch.equal(w[0, 0] == 4.0, overlap) and (w[0, 0][~overlap] == 1).all()
    # the evaluation's cases contradict the map in the prompt, and the depth score reads the overlap's colour
    kind = trainer.EVAL_KINDS[condition][0]
    cases = trainer.eval_cases(6, SIZE, kind)
    assert len(cases) == 6
    if condition == "seg":
        for scene, prompt in cases:
            assert scene.objects[0].shape not in prompt
            assert not any(p in prompt for p in shapes.POSITION_PHRASES[scene.objects[0].position][:3])
    else:
        scene, _ = cases[0]
        truth = shapes.to_pil(shapes.render([scene], 64)[0])
        assert trainer.front_drawn_in_front(truth, scene) is True  # the render itself: front object in front
        swapped = shapes.Scene(scene.background, scene.objects[::-1])
        assert trainer.front_drawn_in_front(truth, swapped) is False
        # the "both objects present" count sees both overlapping objects of a render (the analyser alone
        # reads them as one component)
        found = [cm.object_colours(shapes.to_pil(shapes.render([s], 64)[0])) for s, _ in cases]
        assert all({o.colour for o in s.objects} <= f for (s, _), f in zip(cases, found, strict=True)), found
    image = trainer.control_image(cases[0][0], SIZE, kind)
    assert image.size == (SIZE, SIZE)
    report = trainer.evaluate(
        base, opts.out, n=2, device="cpu", steps=2, size=SIZE, log=lambda _m: None, condition=condition
    )
    assert kind in report and len(report[kind]["cases"]) == 2
    assert len(report[kind + "-drawn"]["cases"]) == 2  # and the same on maps painted freehand


@pytest.mark.parametrize("condition", ["seg", "depth"])
def test_hand_drawn_maps_are_the_scene_but_not_the_renderers_geometry(condition):
    """The evaluation's freehand maps (a user's painting, not the training renderer's): each object where the
    scene puts it, in its class colour (seg) or grey level with the later object brighter (depth), and a
    region that overlaps the renderer's but is not it."""
    from ldm_core.train import condition_maps as cm
    from ldm_core.train import controlnet as trainer
    from ldm_core.train import shapes

    ious = []
    for scene, _prompt in trainer.eval_cases(8, 64, condition + "-drawn"):
        image = trainer.control_image(scene, 64, condition + "-drawn")
        assert image.size == (cm.DRAWN_CANVAS, cm.DRAWN_CANVAS)
        arr = np.asarray(image.resize((64, 64), Image.BOX), dtype=np.float32)
        masks = cm.drawn_masks(scene, 64)
        cover = shapes.object_coverages(shapes.pack_scenes([scene]), 64)[0].numpy() > 0.5
        for k, obj in enumerate(scene.objects):
            visible = masks[k] & ~masks[k + 1 :].any(0) if k + 1 < len(masks) else masks[k]
            core = visible & (np.abs(np.gradient(arr.mean(2))[0]) + np.abs(np.gradient(arr.mean(2))[1]) < 4)
            pix = arr[core].mean(0)
            if condition == "seg":
                assert np.abs(pix - np.array(cm.SEG_PALETTE[obj.shape])).max() < 24, (obj.shape, pix)
            ious.append((masks[k] & cover[k]).sum() / (masks[k] | cover[k]).sum())
        if condition == "depth":
            back = arr[masks[0] & ~masks[1]].mean()
            front = arr[masks[1]].mean()
            assert front > back + 40 and back > arr[~masks.any(0)].mean() + 40
    assert 0.5 < float(np.mean(ious)) < 0.95, ious


def test_hand_drawn_canny_sketches_are_pen_outlines_of_the_scene():
    """The canny evaluation's freehand kinds: a dark pen outline on light paper around each drawn region (what
    a user sketches and gives with preprocessor `canny`), the renderer's edge map only roughly."""
    from ldm_core.train import condition_maps as cm
    from ldm_core.train import controlnet as trainer

    assert {"circle-drawn", "random-drawn"} <= set(trainer.EVAL_KINDS["canny"])
    for kind in ("circle-drawn", "random-drawn"):
        for scene, _prompt in trainer.eval_cases(6, 64, kind):
            image = trainer.control_image(scene, 64, kind)
            assert image.size == (cm.DRAWN_CANVAS, cm.DRAWN_CANVAS)
            ink = np.asarray(image.convert("L").resize((64, 64), Image.BOX)) < 200
            region = cm.drawn_masks(scene, 64)[0]

            def grow(mask, k):  # k > 0 dilates, k < 0 erodes (k x k window)
                f = ImageFilter.MaxFilter(k) if k > 0 else ImageFilter.MinFilter(-k)
                return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(f)) > 127

            near = grow(region, 5) & ~grow(region, -5)
            assert ink.sum() > 10 and (ink & near).sum() >= 0.9 * ink.sum(), kind  # strokes on the outline
            inside = grow(region, -9)[4:-4, 4:-4]  # (a stroke that leaves the picture runs along its border)
            assert not ink[4:-4, 4:-4][inside].any(), kind  # an outline, not a filled shape


def test_cubic_timesteps_favour_high_noise():
    from ldm_core.train import controlnet as trainer

    gen = torch.Generator().manual_seed(0)
    cubic = trainer.sample_timesteps(20000, 1000, "cubic", gen)
    uniform = trainer.sample_timesteps(20000, 1000, "uniform", gen)
    assert cubic.min() >= 0 and cubic.max() <= 999 and cubic.dtype == uniform.dtype
    assert abs((cubic > 580).float().mean() - 0.75) < 0.02 and abs((uniform > 580).float().mean() - 0.42) < 0.02
    with pytest.raises(ValueError, match="timesteps"):
        trainer.sample_timesteps(2, 1000, "cosine", gen)


def test_size_weights_draw_large_scenes_more_often():
    """--size-weights large=3 must make scenes whose largest object is large three times as likely per scene."""
    import random as _random

    from ldm_core.train import controlnet as trainer
    from ldm_core.train import shapes

    weights = trainer.parse_size_weights("large=3")
    assert weights == {"small": 1.0, "medium": 1.0, "large": 3.0}
    scenes = shapes.sample_scenes("size-weights-test", 600)
    per_scene = trainer.scene_sampling_weights(scenes, weights)
    large = [any(o.size == "large" for o in s.objects) for s in scenes]
    assert all(w == (3.0 if is_large else 1.0) for w, is_large in zip(per_scene, large, strict=True))
    rng = _random.Random(0)
    drawn = rng.choices(range(len(scenes)), weights=per_scene, k=20000)
    share = sum(large[i] for i in drawn) / len(drawn)
    base = sum(large) / len(large)
    expected = 3 * base / (3 * base + (1 - base))
    assert abs(share - expected) < 0.02 and share > base + 0.15
    for bad in ("huge=2", "large", "large=-1", "large=x", "small=0,medium=0,large=0"):
        with pytest.raises(ValueError, match="size_weights"):
            trainer.parse_size_weights(bad)


def test_shape_weights_draw_scenes_with_that_shape_more_often():
    """--shape-weights star=3 must weigh a scene holding a star three times (times its size weight), and a bad
    spec must name the field."""
    from ldm_core.train import controlnet as trainer
    from ldm_core.train import shapes

    weights = trainer.parse_shape_weights("star=3,square=1.5")
    assert weights == {"circle": 1.0, "square": 1.5, "triangle": 1.0, "star": 3.0, "diamond": 1.0}
    sizes = trainer.parse_size_weights("small=2")
    scenes = shapes.sample_scenes("shape-weights-test", 300)
    per_scene = trainer.scene_sampling_weights(scenes, sizes, weights)
    for s, w in zip(scenes, per_scene, strict=True):
        largest = max(s.objects, key=lambda o: list(shapes.SIZES).index(o.size)).size if s.objects else None
        want = (sizes[largest] if largest else 1.0) * max((weights[o.shape] for o in s.objects), default=1.0)
        assert w == want
    assert any(w == 6.0 for w in per_scene)  # a small star
    assert trainer.scene_sampling_weights(scenes, sizes) == trainer.scene_sampling_weights(scenes, sizes, None)
    for bad in ("hexagon=2", "star", "star=-1"):
        with pytest.raises(ValueError, match="shape_weights"):
            trainer.parse_shape_weights(bad)


def test_trainer_fits_the_hint_encoder_to_a_factor_4_base(tmp_path):
    """On a base whose VAE halves twice (the v2 built-in model's geometry) the ControlNet's hint encoder must
    halve twice too, or the first training step fails on mismatched shapes."""
    from tiny_models import build_tiny_f4

    from ldm_core.train import controlnet as trainer

    base = build_tiny_f4(tmp_path / "models")
    opts = _tiny_train_options(base, tmp_path / "cn-f4", steps=1, condition="seg")
    assert trainer.train_controlnet(opts, log=lambda _m: None)["steps"] == 1
    cfg = json.loads((tmp_path / "cn-f4" / "config.json").read_text())
    assert cfg["conditioning_embedding_out_channels"] == [16, 32, 96]
    report = trainer.evaluate(base, opts.out, n=1, device="cpu", steps=1, log=lambda _m: None, condition="seg")
    assert len(report["seg"]["cases"]) == 1  # and the engine runs it on that base through the extension


def _tiny_train_options(base, out, **kw):
    """Training options for a test-sized ControlNet run on the CPU: batch 2, no exports, logs or evaluation
    unless `kw` says otherwise."""
    from ldm_core.train import controlnet as trainer

    defaults = dict(batch=2, warmup_steps=1, device="cpu", export_every=0, log_every=0, eval_n=0)
    return trainer.ControlNetTrainOptions(base=base, out=out, **{**defaults, **kw})


SHIPPED = Path(__file__).resolve().parents[1] / "models" / "ControlNet" / "builtin-canny"


def test_shipped_controlnet_puts_the_object_where_the_edge_map_says():
    """The built-in model's ControlNet (shipped, <= 10 MB), through the engine and the extension as users run it:
    a circle's edge map in the bottom right with the prompt "a red square" gives a red circle there, and a
    random shape's edge map moves the object to that shape's position (the base model alone never puts "a red
    square" in the bottom right)."""
    from ldm_core.config import BUILTIN_MODEL_DIR
    from ldm_core.train import controlnet as trainer

    weights = SHIPPED / "diffusion_pytorch_model.safetensors"
    assert (SHIPPED / "config.json").is_file() and weights.stat().st_size <= 10e6
    with pytest.raises(ValueError, match="depth"):  # a kind of another condition, refused before any work
        trainer.evaluate(BUILTIN_MODEL_DIR, SHIPPED, n=4, kinds=("circle", "depth"))
    report = trainer.evaluate(
        BUILTIN_MODEL_DIR, SHIPPED, n=4, device="cpu", steps=20, log=lambda _m: None, kinds=("circle", "random")
    )
    assert set(report) >= {"circle", "random"} and "circle-drawn" not in report
    assert report["circle"]["success"] >= 0.75, report["circle"]["cases"]
    assert report["random"]["position"] >= 0.75, report["random"]["cases"]


SHIPPED_SEG = SHIPPED.parent / "builtin-seg"
SHIPPED_DEPTH = SHIPPED.parent / "builtin-depth"


def _shipped_eval(folder: Path, condition: str, n: int) -> dict:
    """A shipped built-in-model ControlNet of `condition` (<= 10 MB, its TRAINING.json says so) on the first `n`
    held-out cases of its renderer's maps, through the engine and the extension: that kind's report."""
    from ldm_core.config import BUILTIN_MODEL_DIR
    from ldm_core.train import controlnet as trainer

    weights = folder / "diffusion_pytorch_model.safetensors"
    assert (folder / "config.json").is_file() and weights.stat().st_size <= 10e6
    assert json.loads((folder / "TRAINING.json").read_text())["condition"] == condition
    report = trainer.evaluate(
        BUILTIN_MODEL_DIR,
        folder,
        n=n,
        device="cpu",
        steps=20,
        log=lambda _m: None,
        condition=condition,
        kinds=(condition,),
    )
    return report[condition]


def test_shipped_seg_controlnet_puts_the_object_where_the_map_says_in_the_prompts_colour():
    """The built-in model's segmentation ControlNet (shipped, <= 10 MB), as users run it (the extension, an
    ADE20K-palette map with preprocessor `none`): a map of one shape at one place, with a prompt naming another
    shape at another place, gives an object at the map's place in the prompt's colour."""
    seg = _shipped_eval(SHIPPED_SEG, "seg", n=4)
    assert seg["position"] >= 0.75, seg["cases"]
    assert seg["colour"] >= 0.75, seg["cases"]


def test_shipped_depth_controlnet_draws_the_maps_front_object_in_front():
    """The built-in model's depth ControlNet (shipped, <= 10 MB), as users run it (the extension, a depth map
    with preprocessor `none`): two overlapping objects named in the prompt in either order, and the one the map
    puts nearer (brighter) is the one whose colour fills the overlap."""
    depth = _shipped_eval(SHIPPED_DEPTH, "depth", n=6)
    assert depth["front_right"] >= 4 / 6, depth["cases"]


def test_controlnet_acts_on_every_frame_of_a_clip_in_context_windows(setup):
    from tiny_models import save_motion_module, tiny_motion_adapter

    engine = setup["engine"]
    mm = setup["root"] / "models" / "AnimateDiff" / "mm_tiny.safetensors"
    if not mm.exists():
        save_motion_module(tiny_motion_adapter("sd1"), mm, "original")
    clip = {"model": "mm_tiny", "video_length": 5, "batch_size": 3, "overlap": 1, "closed_loop": "N", "format": []}
    plain = engine.generate(req("tiny-sd1", animatediff=clip))
    ctrl = engine.generate(req("tiny-sd1", [unit("cn-sd1-orig")], animatediff=clip))
    assert len(ctrl.images) == 5
    diffs = [np.abs(arr(a) - arr(b)).mean() for a, b in zip(plain.images, ctrl.images, strict=True)]
    assert min(diffs) > 0.5  # the residuals reach every frame, sliced window by window
