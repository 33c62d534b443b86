"""Fast tests of the web UI's wiring, without a browser: form values -> requests, infotext -> form values,
inpaint masks, progress text, following a queued job, settings, Extras, PNG Info, the launch flags and the
file-fetch guard, and the Generate handler of the built Blocks run against a stand-in service."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from ui_fixtures import FakeEngine, FakeService, fake_context

from ldm_core.config import EngineConfig
from ldm_core.generation_requests import GenerationRequest, Img2ImgRequest, InpaintRequest, RequestError
from ldm_core.infotext import build_infotext, parse_infotext
from ldm_core.outputs import read_image_info, save_image
from ldm_core.progress import ProgressState
from ui import common
from ui.common import build_request, fields_from_infotext, fields_from_text, image_and_mask


@pytest.fixture
def ctx(tmp_path):
    c = fake_context(tmp_path)
    yield c
    c.service.shutdown()


def _values(**kw):
    base = dict(
        prompt="a cat",
        negative_prompt="",
        styles=[],
        sampler_name="Euler a",
        scheduler="Automatic",
        steps=3.0,
        cfg_scale=7.0,
        width=64.0,
        height=64.0,
        n_iter=1.0,
        batch_size=1.0,
        seed=5.0,
        subseed=-1.0,
        subseed_strength=0.0,
        seed_resize_from_w=0.0,
        seed_resize_from_h=0.0,
        model="",
        vae="Automatic",
    )
    base.update(kw)
    return base


# ---- form values -> request ---------------------------------------------------------------------------
def test_txt2img_request_from_form():
    req = build_request("txt2img", _values(styles=["moody", ""], negative_prompt="blurry"))
    assert type(req) is GenerationRequest
    # styles travel by name: the engine applies them (once), as for API requests
    assert (req.prompt, req.negative_prompt, req.styles) == ("a cat", "blurry", ["moody"])
    assert (req.steps, req.width, req.height, req.seed) == (3, 64, 64, 5)
    assert isinstance(req.seed, int) and req.vae is None and req.model is None


def test_zero_size_means_native_and_names_bad_fields():
    req = build_request("txt2img", _values(width=0, height=0))
    assert req.width is None and req.height is None
    with pytest.raises(RequestError) as e:
        build_request("txt2img", _values(width=4000))
    assert e.value.field == "width" and "2048" in e.value.message
    with pytest.raises(RequestError) as e:
        build_request("txt2img", _values(seed=2**64))  # seeds go up to 2**64 - 1 (A1111)
    assert e.value.field == "seed"
    with pytest.raises(RequestError) as e:
        build_request("img2img", _values(init_image=None, denoising_strength=0.5))
    assert e.value.field == "init_images"


def test_img2img_request_keeps_image_and_drops_hires_fields():
    img = Image.new("RGB", (64, 48), "red")
    req = build_request(
        "img2img",
        _values(
            init_image=img,
            denoising_strength=0.3,
            resize_mode="Crop and resize",
            enable_hr=True,
            hr_scale=2.0,
        ),
    )
    assert type(req) is Img2ImgRequest
    assert req.init_images[0].size == (64, 48) and req.denoising_strength == 0.3
    assert req.resize_mode == "Crop and resize"


def _editor(size=(64, 64), box=(10, 10, 30, 30)):
    bg = Image.new("RGBA", size, (0, 0, 255, 255))
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    if box:
        ImageDraw.Draw(layer).rectangle(box, fill=(255, 255, 255, 255))
    return {"background": bg, "layers": [layer], "composite": bg}


def test_inpaint_mask_from_painted_layer_and_options():
    req = build_request(
        "inpaint",
        _values(
            inpaint_editor=_editor(),
            mask_upload=None,
            mask_blur=2.0,
            mask_mode="Inpaint not masked",
            inpaint_area="Only masked",
            inpaint_full_res_padding=8.0,
            inpainting_fill="fill",
            denoising_strength=0.8,
        ),
    )
    assert type(req) is InpaintRequest
    assert req.mask.mode == "L" and req.mask.size == (64, 64)
    assert req.mask.getpixel((20, 20)) == 255 and req.mask.getpixel((50, 50)) == 0
    assert req.inpainting_mask_invert is True and req.inpaint_full_res is True
    assert (req.mask_blur, req.inpaint_full_res_padding, req.inpainting_fill) == (2, 8, "fill")
    assert req.init_images[0].mode == "RGB" and req.init_images[0].getpixel((50, 50)) == (0, 0, 255)


def test_uploaded_mask_wins_and_empty_mask_is_refused():
    up = Image.new("L", (32, 32), 0)
    up.paste(255, (0, 0, 16, 32))  # left half, at half the size: resized to the image
    image, mask = image_and_mask(_editor(), up)
    assert mask.size == (64, 64) and mask.getpixel((5, 40)) == 255 and mask.getpixel((60, 40)) == 0
    with pytest.raises(RequestError) as e:
        image_and_mask(_editor(box=None), None)
    assert e.value.field == "mask"
    with pytest.raises(RequestError) as e:
        image_and_mask(None, None)
    assert e.value.field == "init_images"


# ---- infotext -> form values --------------------------------------------------------------------------
def test_infotext_fills_every_known_field():
    text = build_infotext(
        "a (red:1.2) fox",
        "ugly",
        {
            "Steps": 31,
            "Sampler": "DPM++ 2M",
            "Schedule type": "Karras",
            "CFG scale": 6.5,
            "Seed": 42,
            "Size": "320x448",
            "Variation seed": 7,
            "Variation seed strength": 0.25,
            "Seed resize from": "256x256",
            "Denoising strength": 0.45,
            "Clip skip": 2,
            "Hires upscale": 2,
            "Hires steps": 10,
            "Hires upscaler": "Latent",
            "Mask blur": 6,
            "Inpaint area": "Only masked",
            "Masked area padding": 40,
            "Masked content": "latent noise",
            "Mask mode": "Inpaint not masked",
        },
    )
    f = fields_from_infotext(parse_infotext(text))
    assert f["prompt"] == "a (red:1.2) fox" and f["negative_prompt"] == "ugly"
    assert (f["steps"], f["sampler_name"], f["scheduler"], f["cfg_scale"], f["seed"]) == (
        31,
        "DPM++ 2M",
        "Karras",
        6.5,
        42,
    )
    assert (f["width"], f["height"]) == (320, 448)
    assert (f["subseed"], f["subseed_strength"], f["seed_resize_from_w"], f["seed_resize_from_h"]) == (
        7,
        0.25,
        256,
        256,
    )
    assert (f["denoising_strength"], f["clip_skip"]) == (0.45, 2)
    assert (f["enable_hr"], f["hr_scale"], f["hr_second_pass_steps"], f["hr_upscaler"]) == (
        True,
        2.0,
        10,
        "Latent",
    )
    assert (f["mask_blur"], f["inpaint_area"], f["inpaint_full_res_padding"]) == (6, "Only masked", 40)
    assert (f["inpainting_fill"], f["mask_mode"]) == ("latent noise", "Inpaint not masked")
    # the fields go back into a valid request with the same values
    req = build_request("txt2img", {**_values(), **{k: v for k, v in f.items() if k in _values()}})
    assert (req.seed, req.steps, req.width, req.sampler_name) == (42, 31, 320, "DPM++ 2M")


def test_old_combined_sampler_names_are_split_and_plain_text_is_prompt_only():
    engine = FakeEngine(EngineConfig())
    f = fields_from_text("cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 64x64", engine)
    assert (f["sampler_name"], f["scheduler"]) == ("DPM++ 2M", "Karras")
    assert f["subseed_strength"] == 0.0 and f["enable_hr"] is False  # absent -> off
    assert fields_from_text("just a prompt, nothing else") == {
        "prompt": "just a prompt, nothing else",
        "negative_prompt": "",
    }


# ---- progress -----------------------------------------------------------------------------------------
def test_progress_texts():
    assert 'data-position="2"' in common.queued_html(2, 3) and "position 2 of 3" in common.queued_html(2, 3)
    st = ProgressState(job_no=1, job_count=2, step=5, steps=10, started_at=time.monotonic() - 3)
    html = common.progress_html(st)
    assert "Step 5/10" in html and "batch 2/2" in html and "ETA 1s" in html and "width:75.0%" in html
    assert "Starting" in common.progress_html(ProgressState())
    assert "Interrupted after 2.0s: 3 images, the last one unfinished" in common.finished_html(2.0, 3, True)
    assert 'data-state="done"' in common.finished_html(2.0, 3, skipped=1)


def test_follow_job_reports_queue_position_then_steps_and_previews(tmp_path):
    service = FakeService(FakeEngine(EngineConfig.from_data_dir(tmp_path), step_seconds=0.05))
    try:
        first = service.submit(GenerationRequest.build(steps=8, width=64, height=64, save_images=False))
        deadline = time.monotonic() + 10
        while first.state == "queued" and time.monotonic() < deadline:
            time.sleep(0.005)
        second = service.submit(GenerationRequest.build(steps=2, width=64, height=64, save_images=False))
        updates = list(common.follow_job(service.queue, second, poll=0.02, preview_every=0))
        assert first.state == "done" and second.state == "done"
        states = [u.html.split('data-state="')[1].split('"')[0] for u in updates]
        assert states[0] == "queued" and 'data-position="1"' in updates[0].html
        assert "running" in states
        assert any(u.preview is not None for u in updates)
        # only changes are sent, and previews at most every `preview_every` seconds
        third = service.submit(GenerationRequest.build(steps=40, width=64, height=64, save_images=False))
        t0 = time.monotonic()
        updates = list(common.follow_job(service.queue, third, poll=0.01, preview_every=0.5))
        took = time.monotonic() - t0
        previews = sum(u.preview is not None for u in updates)
        assert 1 <= previews <= took / 0.5 + 1
        assert all(a.html != b.html or b.preview is not None for a, b in zip(updates, updates[1:], strict=False))
    finally:
        service.shutdown()


def test_sizes_follow_the_model():
    engine = FakeEngine(EngineConfig(), sizes={"a": 64, "b": 128})
    assert common.native_size(engine) == 64  # default checkpoint, nothing loaded
    engine.load_checkpoint("b")
    assert common.native_size(engine) == 128
    assert common.size_after_switch(64, 96, old_native=64, new_native=128) == (128, 96)
    assert common.native_size(object()) == common.DEFAULT_SIZE


def test_token_counter_counts_chunks(ctx):
    used, limit = common.token_count(ctx, "a cat <lora:foo:0.5>")
    assert (used, limit) == (2, 75)
    used, limit = common.token_count(ctx, "cat " * 80)
    assert used == 80 and limit == 150
    assert common.token_count(ctx, "cat BREAK dog")[1] == 150
    assert "80/150" in common.token_counter_html(80, 150)


# ---- settings -----------------------------------------------------------------------------------------
def test_settings_store_validates_persists_and_applies(ctx, tmp_path):
    from ui.settings import apply_settings
    from ui.settings_store import SettingsStore

    with pytest.raises(ValueError):
        ctx.settings.update({"default_steps": 999})
    with pytest.raises(ValueError):
        ctx.settings.update({"nope": 1})
    msg = apply_settings(
        ctx,
        {
            "outdir_samples": "elsewhere",
            "samples_filename_pattern": "[seed]",
            "show_progress_every_n_steps": 3,
            "attention": "sliced",
            "default_steps": 9,
        },
    )
    cfg = ctx.engine.config
    assert cfg.outputs_dir == tmp_path / "elsewhere" and cfg.filename_pattern == "[seed]" and cfg.preview_every == 3
    assert cfg.attention == "auto"  # needs a restart
    assert "applies now" in msg and "after a restart" in msg and "next page load" in msg
    reread = SettingsStore(tmp_path / "config.json")
    assert reread.get("default_steps") == 9 and reread.get("attention") == "sliced"
    assert apply_settings(ctx, {"default_steps": 9}) == "No changes."


def test_settings_apply_under_launch_flags(tmp_path):
    from ui.settings_store import config_from_settings

    base = EngineConfig.from_data_dir(tmp_path)
    cfg = config_from_settings(base, {"ckpt_dir": "/x/ckpts", "attention": "sliced"}, locked=frozenset({"attention"}))
    assert cfg.ckpt_dirs == (Path("/x/ckpts"),) and cfg.attention == "auto"


# ---- extras, png info, extensions ---------------------------------------------------------------------
def test_extras_scale_by_and_to_save_with_source_infotext(ctx, tmp_path):
    from ui.upscale import extras_params, run_extras

    src = tmp_path / "src.png"
    save_image(
        Image.new("RGB", (32, 40), "green"),
        tmp_path,
        infotext="cat\nSteps: 3, Seed: 9",
        manifest=None,
        seed=9,
        pattern="src",
    )
    items, texts = run_extras(ctx, [str(src)], extras_params("Lanczos", "None", 0, "Scale by", 2, 0, 0, False))
    out = Path(items[0])
    assert out.parent.parent.name == "extras" and out.parent.parent.parent == ctx.engine.config.outputs_dir
    with Image.open(out) as im:
        text, manifest, _ = read_image_info(im)
        assert im.size == (64, 80)
    assert text == "cat\nSteps: 3, Seed: 9" and "Postprocess upscale by: 2" in manifest["postprocessing"]
    assert "Postprocess upscaler: Lanczos" in texts[0]
    items, _ = run_extras(
        ctx,
        [Image.new("RGB", (32, 40))],
        extras_params("Nearest", "Lanczos", 0.5, "Scale to", 1, 50, 50, True),
    )
    with Image.open(items[0]) as im:
        assert im.size == (50, 50)
    with pytest.raises(RequestError):
        run_extras(ctx, [], extras_params("Lanczos", "None", 0, "Scale by", 2, 0, 0, False))
    with pytest.raises(RequestError) as e:
        run_extras(ctx, [str(src)], extras_params("Bogus", "None", 0, "Scale by", 2, 0, 0, False))
    assert e.value.field == "upscaler_1"


def test_pnginfo_reads_ours_and_says_when_there_is_nothing(tmp_path):
    from ui.pnginfo import NO_PARAMETERS, info_html, read_info

    text = build_infotext("a cat", "dog", {"Steps": 4, "Sampler": "Euler a", "Seed": 3, "Size": "64x64"})
    p = save_image(Image.new("RGB", (8, 8)), tmp_path, infotext=text, manifest={"seed": 3}, seed=3)
    info = read_info(str(p))
    assert info.infotext == text and info.manifest == {"seed": 3}
    html = info_html(info)
    assert "<th>Seed</th><td>3</td>" in html and "Size-1" not in html and "manifest" in html
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert NO_PARAMETERS.split(" (")[0] in info_html(read_info(str(plain)))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError):
        read_info(str(bad))


def test_extension_folders_listed(tmp_path):
    from ui.extensions import extension_folders, extensions_html

    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "extension.json").write_text('{"version": "1.2.0", "description": "does <b>"}')
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "bare").mkdir()
    rows = extension_folders([tmp_path, tmp_path / "missing"])
    assert [r["name"] for r in rows] == ["bare", "good"] and rows[1]["version"] == "1.2.0"
    html = extensions_html(rows, install_locked=True)
    assert "does &lt;b&gt;" in html and "disabled" in html


# ---- launch flags and file guard ----------------------------------------------------------------------
def test_flags_help_and_auth():
    import webui

    text = webui.build_parser().format_help()
    for flag in (
        "--listen",
        "--port",
        "--share",
        "--gradio-auth",
        "--gradio-auth-path",
        "--api",
        "--api-auth",
        "--nowebui",
        "--ckpt",
        "--ckpt-dir",
        "--data-dir",
        "--device",
        "--precision",
        "--attention",
        "--lowvram",
        "--medvram",
        "--allow-pickle",
    ):
        assert flag in text
    assert webui.parse_auth("a:b, c:d:e\nf:g") == [("a", "b"), ("c", "d:e"), ("f", "g")]
    with pytest.raises(ValueError):
        webui.parse_auth("nopassword")


def test_warnings_and_engine_config_from_flags(tmp_path):
    import webui

    p = webui.build_parser()
    args = p.parse_args(["--listen", "--api"])
    warnings = webui.security_warnings(args, has_ui_auth=False)
    assert any("WARNING" in w and "--gradio-auth" in w for w in warnings)
    assert any("--api-auth" in w for w in warnings)
    assert any("WARNING" in w for w in webui.security_warnings(p.parse_args(["--share"]), False))
    assert webui.security_warnings(p.parse_args([]), False) == []
    ckpt = tmp_path / "elsewhere" / "m.safetensors"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    args = p.parse_args(
        [
            "--data-dir",
            str(tmp_path),
            "--medvram",
            "--precision",
            "fp32",
            "--ckpt",
            str(ckpt),
            "--attention",
            "sdpa",
        ]
    )
    cfg, locked = webui.engine_config(args, {"attention": "sliced", "samples_filename_pattern": "[seed]"})
    assert cfg.offload == "model" and cfg.precision == "fp32" and cfg.attention == "sdpa"
    assert cfg.filename_pattern == "[seed]" and ckpt.parent.resolve() in cfg.ckpt_dirs
    assert webui.initial_model_name(args, "") == "m.safetensors"


def test_a_data_dir_elsewhere_still_offers_the_built_in_models_shipped_add_ons(tmp_path):
    """`python webui.py --data-dir DIR` (and the CLI, and the API-only server in another folder) keep the built-in
    model, so they keep what ships for it in the repository's models/: its motion module, ControlNets, upscalers
    and LoRA come after DIR's own folders (a first run found the Video tab saying "no motion module is installed").
    Without the built-in model nothing is added."""
    import webui
    from ldm_core.cli import _config as cli_config
    from ldm_core.cli import build_parser as cli_parser
    from ldm_core.config import BUILTIN_MODEL_DIR, EngineConfig
    from ldm_core.video.motion_modules import MotionModules

    repo_models = BUILTIN_MODEL_DIR.parent
    p = webui.build_parser()
    cfg, _ = webui.engine_config(p.parse_args(["--data-dir", str(tmp_path)]), {})
    assert cfg.motion_dirs[:2] == (tmp_path / "models" / "AnimateDiff", tmp_path / "models" / "SVD")  # DIR's first
    assert repo_models / "AnimateDiff" in cfg.motion_dirs and repo_models / "ControlNet" in cfg.controlnet_dirs
    assert {repo_models / "ESRGAN", repo_models / "SD-Upscale"} <= set(cfg.upscaler_dirs)
    assert repo_models / "Lora" in cfg.lora_dirs
    assert MotionModules(cfg.motion_dirs).default() == "builtin-motion"
    at_home, _ = webui.engine_config(p.parse_args([]), {})  # the repository itself: each folder listed once
    assert at_home.motion_dirs.count(repo_models / "AnimateDiff") == 1
    off, _ = webui.engine_config(p.parse_args(["--data-dir", str(tmp_path), "--no-builtin-model"]), {})
    assert repo_models / "AnimateDiff" not in off.motion_dirs and repo_models / "Lora" not in off.lora_dirs
    other = EngineConfig.from_data_dir(tmp_path, builtin_model_dir=tmp_path / "tiny")
    assert other.with_shipped_addons() == other  # made for the built-in model only
    cli = cli_config(cli_parser().parse_args(["txt2img", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")]))
    assert repo_models / "ControlNet" in cli.controlnet_dirs


def test_fetch_guard(tmp_path):
    import webui

    out = tmp_path / "outputs"
    (out / "txt2img").mkdir(parents=True)
    ok = out / "txt2img" / "00001-1.png"
    ok.write_bytes(b"x")
    assert webui.fetch_allowed(str(ok), [out])
    assert not webui.fetch_allowed(str(out / "txt2img" / ".00001.reserve"), [out])
    assert not webui.fetch_allowed(str(out / ".git" / "config"), [out])
    assert not webui.fetch_allowed(str(out / ".." / "config.json"), [out])
    assert not webui.fetch_allowed("/etc/passwd", [out])


# ---- the built Blocks ---------------------------------------------------------------------------------
def _handler(blocks, api_name=None, name=None, trigger=None):
    for f in blocks.fns.values():
        if api_name is not None and f.api_name == api_name:
            return f
        if name is not None and f.name == name and any(t[0] == trigger._id for t in f.targets):
            return f
    raise LookupError(api_name or name)


def test_built_ui_handlers_generate_switch_send_and_style(ctx):
    import gradio as gr

    from ui.app import create_ui

    web = create_ui(ctx)
    t2i = web.tabs["txt2img"]
    fn = _handler(web.blocks, "txt2img_generate")
    values = _values(prompt="a fox", seed=11, steps=2)
    data = {comp: values[name] for name, comp in t2i.fields.items() if name in values}
    data[web.tabs["top"].checkpoint] = "tiny-b.safetensors"
    data[web.tabs["top"].vae] = "Automatic"
    outs = list(fn.fn(data))
    res = t2i.results
    final = outs[-1]
    assert 'data-state="done"' in final[res.progress]
    record = final[res.record]
    assert record["seeds"] == [11] and "Seed: 11" in final[res.infotext] and "Model: tiny-b" in final[res.infotext]
    assert Path(record["paths"][0]).is_file()
    assert ctx.engine.requests[-1].model == "tiny-b.safetensors"
    # a bad value is a readable gr.Error, and the next job still runs
    data[t2i.fields["width"]] = 4000
    with pytest.raises(gr.Error) as e:
        list(fn.fn(data))
    assert "width" in str(e.value)
    data[t2i.fields["width"]] = 64
    assert 'data-state="done"' in list(fn.fn(data))[-1][res.progress]
    # every tab is there, with the ids the browser tests use
    config_ids = {getattr(b, "elem_id", None) for b in web.blocks.blocks.values()}
    for eid in (
        "txt2img_generate",
        "img2img_image",
        "inpaint_editor",
        "extras_image",
        "pnginfo_image",
        "settings_apply",
        "extensions_table",
        "sd_model_checkpoint",
    ):
        assert eid in config_ids
    # switching the checkpoint loads it through the queue and moves sizes still at the old native size
    top = web.tabs["top"]
    switch = _handler(web.blocks, name="switch", trigger=top.checkpoint)
    assert ctx.engine.current_model.entry.name == "tiny-b"  # the last job's model (native 128)
    # (then the tabs' Rescale CFG sliders: one still at the old model's recommendation follows the new one's)
    # (four tabs: txt2img, img2img, inpaint, video)
    # (and the tabs' sampler and schedule type dropdowns: one still at the old model's default, here the
    # settings' Euler a / Automatic, follows the new one's recommendation, DPM++ 2M / Karras for tiny-a)
    # (the Video tab's menus keep the settings' defaults: the recommendation is for images)
    picks = ["Euler a", "Automatic", "Euler", "Automatic", "Euler a", "Uniform"]
    outs = list(switch.fn("tiny-a.safetensors", 128, 128, 128, 96, 128, 128, 128, 128, 0.0, 0.4, 0.0, 0.0, *picks))
    assert "Loading" in outs[0][0] and "Loaded tiny-a.safetensors" in outs[-1][0]
    assert outs[-1][2:14] == [64, 64, 64, 96, 64, 64, 64, 64, 0.7, 0.4, 0.7, 0.7]
    assert outs[-1][14:] == ["DPM++ 2M", "Karras", "Euler", "Karras", "DPM++ 2M", "Uniform"]
    # a new page starts at the loaded model's recommendation (the Video tab at the settings')
    assert t2i.defaults[t2i.fields["sampler_name"]]() == "DPM++ 2M"
    assert t2i.defaults[t2i.fields["scheduler"]]() == "Karras"
    video = web.tabs["video"]
    assert video.defaults[video.fields["sampler_name"]]() == "Euler a"
    assert ctx.engine.current_model.entry.name == "tiny-a"
    assert ctx.settings.get("sd_model_checkpoint") == "tiny-a.safetensors"
    # "send to img2img" opens the image and fills the fields from its infotext
    i2i = web.tabs["img2img"]
    send = _handler(web.blocks, name="send", trigger=res.send_img2img)
    out = send.fn(record, 0, [(record["paths"][0], None)])
    assert out[i2i.image].size == (64, 64) and out[i2i.fields["prompt"]] == "a fox"
    assert out[i2i.fields["seed"]] == 11 and out[web.tabs["tabs"]].selected == "img2img"
    # applying a style rewrites the prompts and clears the selection
    from ldm_core.prompts.styles import PromptStyle

    ctx.styles.save_style(PromptStyle("warm", "{prompt}, warm light", ""))
    apply = _handler(web.blocks, name="apply", trigger=web.tabs["txt2img"].fields["_apply_style"])
    p, n, dd = apply.fn("a fox", "", ["warm"])
    assert (p, n, dd) == ("a fox, warm light", "", [])


def test_interrupt_acts_on_this_pages_job_or_this_tabs_running_job(tmp_path):
    from ui.app import create_ui

    ctx = fake_context(tmp_path, step_seconds=0.05)
    try:
        web = create_ui(ctx)
        t2i = web.tabs["txt2img"]
        interrupt = _handler(web.blocks, name="interrupt", trigger=t2i.interrupt)
        q = ctx.service.queue
        other = ctx.service.submit(build_request("img2img", _values(init_image=Image.new("RGB", (64, 64)), steps=40)))
        mine = ctx.service.submit(build_request("txt2img", _values(steps=40)))
        while other.state == "queued":
            time.sleep(0.01)
        interrupt.fn(None)  # no job on this page, and the running job is an img2img one: left alone
        assert not other.ctx.cancel.interrupted
        interrupt.fn(mine.id)  # this page's queued job: cancelled before it starts
        assert mine.wait(5) and mine.state == "cancelled"
        assert other.wait(10) and other.result.interrupted is False
        again = ctx.service.submit(build_request("txt2img", _values(steps=150)))
        while again.state == "queued":
            time.sleep(0.01)
        interrupt.fn(None)  # after a page reload: the running txt2img job
        assert again.wait(10) and again.result.interrupted is True and len(again.result.images) == 1
        skip = _handler(web.blocks, name="skip", trigger=t2i.skip)
        batches = ctx.service.submit(build_request("txt2img", _values(steps=30, n_iter=2.0)))
        while batches.progress().step < 2:
            time.sleep(0.01)
        skip.fn(batches.id)  # ends the first batch early; the second one runs
        assert batches.wait(10) and batches.result.skipped_batches == 1 and not batches.result.interrupted
        assert len(batches.result.images) == 2
        assert q.pending_count() == 0
    finally:
        ctx.service.shutdown()


def test_app_serves_the_api_and_the_ui_as_the_flags_say(ctx):
    import webui

    def build(*flags):
        args = webui.build_parser().parse_args([*flags, "--data-dir", str(ctx.data_dir)])
        app = webui.create_app(webui.Launch.of(args, ctx.service, ctx.settings))
        api = args.api or args.nowebui
        paths = set(app.openapi()["paths"]) if api else set()
        return paths, any(type(r).__name__ == "Mount" for r in app.routes)  # the Gradio app, at "/"

    paths, ui = build("--nowebui")
    assert "/sdapi/v1/txt2img" in paths and not ui
    paths, ui = build("--api")
    assert "/sdapi/v1/txt2img" in paths and ui
    paths, ui = build()
    assert ui and not paths
