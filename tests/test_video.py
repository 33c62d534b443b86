"""Video (issue 19): AnimateDiff motion modules in both file layouts, patched into SD 1.x and SDXL UNets, clips
through the engine (text-, image- and video-to-video, context windows, prompt travel) and the clip files."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import save_motion_module, tiny_components, tiny_motion_adapter

from ldm_core.config import EngineConfig
from ldm_core.engine import Engine
from ldm_core.generation_requests import GenerationRequest, Img2ImgRequest, RequestError
from ldm_core.outputs import read_image_info
from ldm_core.video.clips import CLIP_TYPES, decode_clip, encode_clip
from ldm_core.video.context_windows import context_windows
from ldm_core.video.job import VideoPlan, blend_image_to_video
from ldm_core.video.motion_modules import (
    MotionModule,
    MotionModuleError,
    config_from_original,
    load_motion_module,
    motion_patch,
)
from ldm_core.video.options import AnimateDiffArgs
from ldm_core.video.prompt_travel import frame_weights, parse_travel

SIZE = 64


@pytest.fixture(scope="module")
def motion_files(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD1 and SDXL motion modules, each as a diffusers folder and as an original-layout file."""
    root = tmp_path_factory.mktemp("mm")
    out = {}
    for name in ("sd1", "sdxl"):
        adapter = tiny_motion_adapter(name)
        out[f"{name}-diffusers"] = save_motion_module(adapter, root / f"mm-{name}-diffusers", "diffusers")
        out[f"{name}-original"] = save_motion_module(adapter, root / f"mm_{name}_tiny.safetensors", "original")
    return out


def _reference(unet, adapter, x, t, ehs, added, frames):
    """diffusers' own UNetMotionModel on the same weights: (clips*frames, C, H, W) in, same layout out."""
    from diffusers import UNetMotionModel

    ref = UNetMotionModel.from_unet2d(unet, adapter)
    if added is not None:  # from_unet2d leaves SDXL's add_embedding at its random init
        ref.add_embedding.load_state_dict(unet.add_embedding.state_dict())
    clips = x.shape[0] // frames
    sample = x.view(clips, frames, *x.shape[1:]).permute(0, 2, 1, 3, 4)
    per_clip = None if added is None else {k: v[::frames] for k, v in added.items()}
    out = ref(sample, t, ehs, added_cond_kwargs=per_clip).sample
    return out.permute(0, 2, 1, 3, 4).reshape(x.shape)


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_patched_unet_matches_diffusers_unet_motion_model(name, layout, motion_files):
    unet = tiny_components(name)["unet"]
    module = load_motion_module(motion_files[f"{name}-{layout}"])
    assert module.layout == layout
    frames = 6
    torch.manual_seed(0)
    x = torch.randn(2 * frames, 4, 8, 8)
    t = torch.tensor(500.0)
    ehs = torch.randn(2 * frames, 77, unet.config.cross_attention_dim)
    added = None
    if name == "sdxl":
        added = {
            k: v.repeat_interleave(frames, 0)
            for k, v in {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}.items()
        }
    with torch.no_grad():
        plain = unet(x, t, ehs, added_cond_kwargs=added).sample
        with motion_patch(unet, module) as patch:
            patch.set_frames(frames)
            got = unet(x, t, ehs, added_cond_kwargs=added).sample
        after = unet(x, t, ehs, added_cond_kwargs=added).sample
        ref = _reference(unet, module.adapter, x, t, ehs, added, frames)
    assert (got - ref).abs().max() < 1e-4  # the same temporal layers in the same places as diffusers
    assert (got - plain).abs().max() > 1e-2  # and they do something
    assert torch.equal(after, plain)  # removed exactly after the job


def test_original_layout_config_is_read_from_the_shapes(motion_files):
    from safetensors.torch import load_file

    cfg = config_from_original(load_file(str(motion_files["sd1-original"])), motion_files["sd1-original"])
    assert cfg["block_out_channels"] == [32, 64]
    assert cfg["motion_layers_per_block"] == [2, 2]
    assert cfg["use_motion_mid_block"] is True
    assert cfg["motion_max_seq_length"] == 32
    xl = config_from_original(load_file(str(motion_files["sdxl-original"])), motion_files["sdxl-original"])
    assert xl["use_motion_mid_block"] is False


def test_pickled_module_refused_unless_allowed(tmp_path):
    path = save_motion_module(tiny_motion_adapter("sd1"), tmp_path / "mm_sd_v15.ckpt", "original")
    with pytest.raises(MotionModuleError, match="allow-pickle"):
        load_motion_module(path)
    assert load_motion_module(path, allow_pickle=True).layout == "original"


def test_not_a_motion_module_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(MotionModuleError, match="LoRA"):
        load_motion_module(bad)
    other = tmp_path / "other.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(MotionModuleError, match="original key layout"):
        load_motion_module(other)


# ---------------------------------------------------------------------------------------------------- engine


def _engine(tmp: Path, model: Path, modules: list[Path], **over) -> Engine:
    ckpt = tmp / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True, exist_ok=True)
    dst = ckpt / model.name
    if not dst.exists():
        (shutil.copytree if model.is_dir() else shutil.copy)(model, dst)
    mm = tmp / "models" / "AnimateDiff"
    mm.mkdir(parents=True, exist_ok=True)
    for m in modules:
        if not (mm / m.name).exists():
            (shutil.copytree if m.is_dir() else shutil.copy)(m, mm / m.name)
    return Engine(EngineConfig.from_data_dir(tmp, builtin_model_dir=None, **over))


@pytest.fixture(scope="module")
def sd1_video(tmp_path_factory, tiny_models, motion_files):
    tmp = tmp_path_factory.mktemp("video")
    return _engine(
        tmp, tiny_models["sd1"]["single_file"], [motion_files["sd1-original"], motion_files["sdxl-diffusers"]]
    )


def vreq(cls=GenerationRequest, **kw):
    ad = kw.pop("animatediff", {})
    base = dict(
        prompt="a red circle",
        negative_prompt="blue",
        steps=3,
        width=SIZE,
        height=SIZE,
        seed=5,
        sampler_name="Euler a",
        save_images=False,
    )
    base.update(kw)
    base["animatediff"] = {"model": "mm_sd1_tiny", "video_length": 6, "batch_size": 6, "format": ["GIF"], **ad}
    return cls.build(**base)


def _frames_differ(images) -> float:
    a = [np.asarray(im).astype(np.float32) for im in images]
    return float(np.mean([np.abs(a[i] - a[i + 1]).mean() for i in range(len(a) - 1)]))


def _hooks(unet) -> int:
    return sum(len(m._forward_hooks) for m in unet.modules())


def test_text_to_video_writes_the_clip_with_infotext(sd1_video, tmp_path):
    res = sd1_video.generate(vreq(save_images=True, animatediff={"format": ["GIF", "MP4", "WEBP", "PNG", "TXT"]}))
    assert len(res.images) == 6 and len(res.seeds) == 6
    assert [c.format for c in res.videos] == ["GIF", "MP4", "WEBP"]
    for clip in res.videos:
        assert clip.path is not None and clip.path.parent.parent.name == "video"
        assert clip.path.read_bytes() == clip.data
        assert len(decode_clip(clip.data).frames) == 6
    gif = Image.open(res.videos[0].path)
    text, _, _ = read_image_info(gif)
    assert text is not None and "AnimateDiff: " in text and "mm_sd1_tiny" in text
    pngs = [p for p in res.paths if p.suffix == ".png"]
    assert len(pngs) == 6 and all(p.parent == res.videos[0].path.parent for p in pngs)
    assert [p for p in res.paths if p.suffix == ".txt"]
    model = sd1_video.current_model
    assert _hooks(model.unet) == 0  # the motion module is only patched in while its job runs


def test_motion_module_changes_frames_and_a_plain_batch_is_unchanged(sd1_video):
    plain = sd1_video.generate(vreq(animatediff={"enable": False}, batch_size=6))
    clip = sd1_video.generate(vreq())
    assert plain.videos == [] and len(plain.images) == 6
    diffs = [
        np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean()
        for a, b in zip(plain.images, clip.images, strict=True)
    ]
    assert min(diffs) > 0.5  # every frame is touched by the temporal layers
    again = sd1_video.generate(vreq(animatediff={"enable": False}, batch_size=6))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain.images, again.images, strict=True))


def test_long_clip_runs_in_context_windows(sd1_video, monkeypatch):
    calls = []
    from ldm_core.video import context_windows as cw

    real = cw.ContextWindowUNet.__call__

    def spy(self, x, t, **kw):
        calls.append(len(self.windows))
        return real(self, x, t, **kw)

    monkeypatch.setattr(cw.ContextWindowUNet, "__call__", spy)
    res = sd1_video.generate(vreq(animatediff={"video_length": 10, "batch_size": 4, "overlap": 1, "closed_loop": "N"}))
    assert len(res.images) == 10
    assert calls and calls[0] == len(context_windows(10, 4, 1, 1)) > 1
    assert "batch_size: 4" in res.infotexts[0] and "overlap: 1" in res.infotexts[0]


def test_context_windows_cover_every_frame():
    assert context_windows(16, 16) == [list(range(16))]
    wins = context_windows(24, 16)
    assert wins[0] == list(range(16)) and wins[-1] == list(range(8, 24))
    looped = context_windows(24, 16, closed_loop=True)
    assert any(w[0] > w[-1] for w in looped)  # a window wraps around the end
    strided = context_windows(8, 4, stride=2, overlap=0)
    assert [0, 2, 4, 6] in strided
    for n, c in ((40, 16), (17, 8), (9, 3)):
        assert set().union(*map(set, context_windows(n, c))) == set(range(n))


def test_prompt_travel_conditions_each_frame(sd1_video):
    assert parse_travel("0: a red circle, 8: a blue circle").keyframes == ((0, "a red circle"), (8, "a blue circle"))
    multi = parse_travel("best quality\n0: a red circle\n4: a blue circle\non grey")
    assert multi.keyframes == ((0, "best quality, a red circle, on grey"), (4, "best quality, a blue circle, on grey"))
    assert parse_travel("a circle, 16:9") is None
    w = frame_weights([0, 4], 6, closed_loop=False)
    assert w[0] == (0, 1, 0.0) and w[2] == (0, 1, 0.5) and w[5] == (1, 1, 0.0)
    travel = sd1_video.generate(vreq(prompt="0: a red circle, 5: a blue square"))
    fixed = sd1_video.generate(vreq(prompt="a red circle"))
    first = np.abs(np.asarray(travel.images[0], np.float32) - np.asarray(fixed.images[0], np.float32)).mean()
    last = np.abs(np.asarray(travel.images[-1], np.float32) - np.asarray(fixed.images[-1], np.float32)).mean()
    assert last > first  # the travelling prompt moves away from the first keyframe over the clip


def test_shared_noise_blends_each_frame_towards_the_first_frames_noise():
    noise = torch.randn(8, 4, 32, 32, generator=torch.Generator().manual_seed(0))

    def plan(share):
        return VideoPlan(AnimateDiffArgs(shared_noise=share), None, 8, 8, [list(range(8))], 8.0)

    assert torch.equal(plan(0.0).starting_noise(noise), noise)  # independent frames, as every tool has them
    assert all(torch.equal(f, noise[0]) for f in plan(1.0).starting_noise(noise))
    half = plan(0.5).starting_noise(noise)
    assert torch.equal(half[0], noise[0])
    corr = [float(torch.corrcoef(torch.stack([f.flatten(), noise[0].flatten()]))[0, 1]) for f in half[1:]]
    assert all(0.6 < c < 0.8 for c in corr)  # cos(pi/4) of the first frame's noise in each frame
    assert abs(float(half.std()) - float(noise.std())) < 0.05  # still noise of one draw's scale
    with pytest.raises(ValueError, match="shared_noise"):
        AnimateDiffArgs(shared_noise=1.5)


def test_shared_noise_makes_frames_alike_and_is_in_the_infotext(sd1_video):
    from ui.common import fields_from_text

    apart = sd1_video.generate(vreq())
    alike = sd1_video.generate(vreq(animatediff={"shared_noise": 0.9}))
    assert _frames_differ(alike.images) < 0.5 * _frames_differ(apart.images)
    assert "shared_noise" not in apart.infotexts[0] and "shared_noise: 0.9" in alike.infotexts[0]
    assert fields_from_text(alike.infotexts[0])["video_shared_noise"] == pytest.approx(0.9)


def _max_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def test_motion_timeline_runs_the_module_only_in_its_span_and_is_in_the_infotext(sd1_video, monkeypatch):
    from ldm_core.video.motion_modules import MotionPatch
    from ui.common import fields_from_text

    plain = sd1_video.generate(vreq(animatediff={"enable": False}, batch_size=6, sampler_name="Euler"))
    off = sd1_video.generate(vreq(sampler_name="Euler", animatediff={"motion_effect": 0.0}))
    same = [_max_diff(a, b) for a, b in zip(plain.images, off.images, strict=True)]
    assert max(same) <= 1.0  # effect 0: the base UNet alone, as a plain batch of the same seeds

    effects: list[float] = []
    apply = MotionPatch._apply
    monkeypatch.setattr(MotionPatch, "_apply", lambda self, m, h: (effects.append(self.effect), apply(self, m, h))[1])
    full = sd1_video.generate(vreq(sampler_name="Euler", steps=4))
    calls_full = list(effects)
    effects.clear()
    half = sd1_video.generate(vreq(sampler_name="Euler", steps=4, animatediff={"motion_end_percent": 0.5}))
    assert set(calls_full) == {1.0}
    per_step = len(effects) // 4  # the temporal layers the UNet calls per step (one call of the batch per step)
    assert effects[: 2 * per_step] == [1.0] * (2 * per_step) and set(effects[2 * per_step :]) == {0.0}
    assert max(_max_diff(a, b) for a, b in zip(full.images, half.images, strict=True)) > 0
    assert "motion_end_percent" not in full.infotexts[0]
    assert "motion_start_percent: 0, motion_end_percent: 0.5, motion_effect: 1" in half.infotexts[0]
    assert fields_from_text(half.infotexts[0])["video_motion_end_percent"] == pytest.approx(0.5)

    with pytest.raises(RequestError, match="motion_end_percent 0.2 is before motion_start_percent 0.6"):
        vreq(animatediff={"motion_start_percent": 0.6, "motion_end_percent": 0.2})


def test_free_init_filters_keep_low_frequencies_and_take_the_rest_from_fresh_noise():
    from ldm_core.video.free_init import FILTERS, low_pass, mix_frequencies, reinitialised_noise

    for kind in FILTERS:
        m = low_pass(8, 16, 16, kind)
        assert m.shape == (8, 16, 16) and float(m[4, 8, 8]) == 1.0  # the centre (DC) is kept
        assert float(m[0, 0, 0]) < 0.01 and 0 <= float(m.min()) and float(m.max()) <= 1
    assert float(low_pass(8, 16, 16, "box", ds=0.25, dt=1.0)[0, 8, 8]) == 1.0  # dt: the temporal stop alone
    with pytest.raises(ValueError, match="filter 'median'"):
        low_pass(8, 16, 16, "median")
    with pytest.raises(ValueError, match="ds and dt"):
        low_pass(8, 16, 16, ds=0)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 4, 16, 16, generator=g), torch.randn(8, 4, 16, 16, generator=g)
    assert torch.allclose(mix_frequencies(a, b, torch.ones(8, 16, 16)), a, atol=1e-5)
    assert torch.allclose(mix_frequencies(a, b, torch.zeros(8, 16, 16)), b, atol=1e-5)
    mixed = mix_frequencies(a, b, low_pass(8, 16, 16))
    assert torch.allclose(mixed.mean(dim=(0, 2, 3)), a.mean(dim=(0, 2, 3)), atol=1e-5)  # DC from the low side
    assert float((mixed - b).abs().mean()) < 0.2 * float((a - b).abs().mean())  # most of it is the fresh noise
    # the clip, diffused to the last timestep (alpha 0.01: a tenth of it), carries its low frequencies into the
    # next start on top of the first noise's; the high ones are fresh
    clean = torch.randn(1, 4, 16, 16, generator=g).repeat(8, 1, 1, 1)  # frames alike
    mask = low_pass(8, 16, 16)
    start = reinitialised_noise(clean, b, a, 0.01, mask)
    without = reinitialised_noise(torch.zeros_like(clean), b, a, 0.01, mask)
    expected = mix_frequencies(0.1 * clean, torch.zeros_like(clean), mask)
    assert torch.allclose(start - without, expected, atol=1e-4) and float(expected.abs().mean()) > 0.01
    assert abs(float(start.std()) - 1) < 0.15


def test_free_init_samples_the_clip_again_and_is_in_the_infotext(sd1_video, monkeypatch):
    from ui.common import fields_from_text

    passes = []
    real = Engine._denoise_pass

    def spy(self, job, stage, sampler, schedule_type, steps, noise, *a, **k):
        passes.append(noise.clone())
        return real(self, job, stage, sampler, schedule_type, steps, noise, *a, **k)

    monkeypatch.setattr(Engine, "_denoise_pass", spy)
    plain = sd1_video.generate(vreq())
    assert len(passes) == 1
    passes.clear()
    fi = {"freeinit_enable": True, "freeinit_iters": 3, "freeinit_filter": "gaussian", "freeinit_ds": 0.5}
    res = sd1_video.generate(vreq(animatediff=fi))
    assert len(passes) == 3 and not torch.equal(passes[1], passes[0]) and not torch.equal(passes[2], passes[1])
    sd1_video.generate(vreq(animatediff=fi))  # the same seed: the same start and the same restarts
    assert all(torch.equal(passes[i], passes[i + 3]) for i in range(3))
    text = res.infotexts[0]
    assert "freeinit_iters: 3, freeinit_filter: gaussian, freeinit_ds: 0.5, freeinit_dt: 0.25" in text
    assert "freeinit" not in plain.infotexts[0]
    fields = fields_from_text(text)
    assert fields["video_freeinit_enable"] is True and fields["video_freeinit_iters"] == 3
    assert fields["video_freeinit_filter"] == "gaussian" and fields["video_freeinit_ds"] == pytest.approx(0.5)
    assert any(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).mean() > 1
               for x, y in zip(plain.images, res.images, strict=True))
    passes.clear()  # image-to-video: one sampling, and a note saying why
    i2v = sd1_video.generate(vreq(Img2ImgRequest, init_images=[_red(1)], denoising_strength=0.8, animatediff=fi))
    assert len(passes) == 1 and any("FreeInit: text-to-video only" in n for n in i2v.notes)
    with pytest.raises(RequestError) as e:
        GenerationRequest.build(animatediff={"freeinit_filter": "median"})
    assert e.value.field == "animatediff.freeinit_filter"


def test_image_to_video_blend_follows_latent_power_and_scale():
    init, noise = torch.ones(4, 1, 1, 1), torch.zeros(4, 1, 1, 1)
    args = AnimateDiffArgs(latent_power=1, latent_scale=2, latent_scale_last=2)
    out = blend_image_to_video(init, noise, args).flatten().tolist()
    assert out == pytest.approx([1.0, 0.5, 0.0, 0.0])
    last = torch.full((4, 1, 1, 1), 2.0)
    both = blend_image_to_video(init, noise, args, last).flatten().tolist()
    assert both[0] == pytest.approx(1.0) and both[-1] == pytest.approx(2.0)


def _red(i: int) -> Image.Image:
    return Image.new("RGB", (SIZE, SIZE), (200, 20 * i, 20))


def test_image_and_video_to_video(sd1_video, monkeypatch):
    encoded = []
    real = Engine._encode_images

    def spy(self, vae, images):
        encoded.append([np.asarray(im)[..., 1].mean() for im in images])
        return real(self, vae, images)

    monkeypatch.setattr(Engine, "_encode_images", spy)
    i2v = sd1_video.generate(vreq(Img2ImgRequest, init_images=[_red(0)], denoising_strength=0.6))
    assert len(i2v.images) == 6 and len(encoded[-1]) == 1  # one image, spread over the frames
    clip = encode_clip([_red(i) for i in range(5)], "MP4", 5)
    v2v = sd1_video.generate(
        vreq(
            Img2ImgRequest,
            init_images=[_red(0)],
            denoising_strength=0.3,
            animatediff={"video_length": 0, "video_source": base64.b64encode(clip).decode(), "format": ["GIF"]},
        )
    )
    assert len(v2v.images) == 5  # the source's length
    assert "fps: 5" in v2v.infotexts[0]  # the source's frame rate
    greens = encoded[-1]
    assert len(greens) == 5 and greens == sorted(greens) and greens[-1] > greens[0] + 50  # one source frame each


def test_family_mismatch_and_unknown_module_are_clear_errors(sd1_video):
    with pytest.raises(RequestError) as e:
        sd1_video.generate(vreq(animatediff={"model": "mm-sdxl-diffusers"}))
    assert e.value.field == "animatediff.model"
    assert "mm-sdxl-diffusers" in e.value.message and "(sd1)" in e.value.message and "family" in e.value.message
    from diffusers import MotionAdapter

    wide = MotionAdapter(block_out_channels=(64, 128), motion_layers_per_block=1, use_motion_mid_block=False)
    folder = sd1_video.config.motion_dirs[0] / "mm-wide"
    wide.save_pretrained(folder)
    with pytest.raises(RequestError) as e:
        sd1_video.generate(vreq(animatediff={"model": "mm-wide"}))
    assert "made for a UNet with channels 64/128" in e.value.message and "channels 32/64" in e.value.message
    shutil.rmtree(folder)
    with pytest.raises(RequestError, match="no motion module named 'nope'"):
        sd1_video.generate(vreq(animatediff={"model": "nope"}))


def test_sdxl_video_through_the_engine(tmp_path, tiny_models, motion_files):
    eng = _engine(tmp_path, tiny_models["sdxl"]["single_file"], [motion_files["sdxl-original"]])
    res = eng.generate(
        vreq(
            prompt="0: a red circle, 3: a blue circle",
            animatediff={"model": "mm_sdxl_tiny", "video_length": 4, "batch_size": 4},
        )
    )
    assert len(res.images) == 4 and res.videos[0].format == "GIF"


def test_clip_files_round_trip_with_infotext():
    frames = [_red(i) for i in range(4)]
    for fmt in CLIP_TYPES:
        data = encode_clip(frames, fmt, 8, infotext="a red circle\nSteps: 3")
        back = decode_clip(base64.b64encode(data).decode())
        assert len(back.frames) == 4 and back.fps == pytest.approx(8, rel=0.1)
        if fmt in ("GIF", "WEBP"):
            assert read_image_info(Image.open(io.BytesIO(data)))[0] == "a red circle\nSteps: 3"


def test_request_lifts_sd_webui_animatediff_args():
    r = GenerationRequest.build(
        prompt="x",
        alwayson_scripts={
            "AnimateDiff": {
                "args": [
                    {
                        "model": "mm_sd_v15_v2.ckpt",
                        "format": ["GIF", "Frame"],
                        "enable": True,
                        "video_length": 16,
                        "fps": 8,
                        "loop_number": 0,
                        "closed_loop": "R+P",
                        "batch_size": 16,
                        "stride": 1,
                        "overlap": -1,
                        "interp": "Off",
                        "interp_x": 10,
                        "request_id": "",
                        "is_i2i_batch": False,
                    }
                ]
            }
        },
    )
    assert r.animatediff.model == "mm_sd_v15_v2.ckpt" and r.animatediff.format == ["GIF", "Frame"]
    off = GenerationRequest.build(alwayson_scripts={"AnimateDiff": {"args": [{"enable": False}]}})
    assert off.animatediff is None
    with pytest.raises(RequestError) as e:
        GenerationRequest.build(alwayson_scripts={"animatediff": {"args": [{"fps": 0}]}})
    assert e.value.field == "animatediff.fps"
    with pytest.raises(RequestError, match="unknown format"):
        GenerationRequest.build(animatediff={"format": ["AVI"]})


def test_module_registry_lists_both_layouts(sd1_video):
    names = sd1_video.motion_modules.names()
    assert "mm_sd1_tiny.safetensors" in names and "mm-sdxl-diffusers" in names
    assert isinstance(sd1_video.motion_modules.load("mm_sd1_tiny"), MotionModule)


# ------------------------------------------------------------------------------------------------------- API


@pytest.fixture
def api_client(request, tmp_path, tiny_models, motion_files):
    import fastapi
    from fastapi.testclient import TestClient

    from api import install
    from ldm_core.service import Service

    family, layout = getattr(request, "param", ("sd1", "original"))
    # lays out the folders: the family's model and its module in the given file layout
    _engine(tmp_path, tiny_models[family]["single_file"], [motion_files[f"{family}-{layout}"]])
    service = Service(EngineConfig.from_data_dir(tmp_path, builtin_model_dir=None, device="cpu"))
    app = fastapi.FastAPI()
    install(app, service)
    try:
        with TestClient(app) as client:
            yield client, tmp_path
    finally:
        service.shutdown()


def test_sdapi_txt2img_with_sd_webui_animatediff_args(api_client):
    client, data = api_client
    assert [m["model_name"] for m in client.get("/sdapi/v1/motion-modules").json()] == ["mm_sd1_tiny.safetensors"]
    # the payload shape sd-webui-animatediff documents for its API (its README), with a client's usual fields
    body = {
        "prompt": "a red circle",
        "negative_prompt": "",
        "steps": 3,
        "width": SIZE,
        "height": SIZE,
        "seed": -1,
        "sampler_name": "Euler a",
        "alwayson_scripts": {
            "AnimateDiff": {
                "args": [
                    {
                        "model": "mm_sd1_tiny.safetensors",
                        "format": ["GIF", "Frame"],
                        "enable": True,
                        "video_length": 5,
                        "fps": 10,
                        "loop_number": 0,
                        "closed_loop": "R-P",
                        "batch_size": 16,
                        "stride": 1,
                        "overlap": -1,
                        "interp": "Off",
                        "interp_x": 10,
                        "video_source": None,
                        "video_path": "",
                        "latent_power": 1,
                        "latent_scale": 32,
                        "last_frame": None,
                        "latent_power_last": 1,
                        "latent_scale_last": 32,
                        "request_id": "",
                    }
                ]
            }
        },
    }
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    images = r.json()["images"]
    assert len(images) == 1 + 5  # the GIF, then the frames ("Frame")
    gif = Image.open(io.BytesIO(base64.b64decode(images[0])))
    assert gif.format == "GIF" and gif.n_frames == 5
    assert Image.open(io.BytesIO(base64.b64decode(images[1]))).format == "PNG"
    info = __import__("json").loads(r.json()["info"])
    assert "AnimateDiff: " in info["infotexts"][0]
    body["alwayson_scripts"]["AnimateDiff"]["args"][0]["model"] = "mm_sd15_v3.safetensors"
    bad = client.post("/sdapi/v1/txt2img", json=body)
    assert bad.status_code == 422 and "mm_sd15_v3" in bad.text


def test_native_video_job(api_client):
    import time

    client, data = api_client
    body = {
        "prompt": "a red circle",
        "steps": 3,
        "width": SIZE,
        "height": SIZE,
        "save_images": True,
        "animatediff": {"video_length": 4, "format": ["MP4", "WEBP"]},
    }
    r = client.post("/api/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    for _ in range(600):
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["state"] in ("done", "failed", "cancelled", "interrupted"):
            break
        time.sleep(0.1)
    assert job["state"] == "done", job
    videos = job["result"]["videos"]
    assert [v["format"] for v in videos] == ["MP4", "WEBP"] and videos[0]["mime"] == "video/mp4"
    assert len(decode_clip(videos[0]["data"]).frames) == 4
    assert Path(videos[0]["path"]).is_file() and Path(videos[0]["path"]).parent.parent == data / "outputs" / "video"
    assert len(job["result"]["images"]) == 4


# ------------------------------------------------------------------------------------- the shipped recipe


def test_training_clips_move_the_way_their_caption_says():
    import random

    from ldm_core.train import shapes
    from ldm_core.train.analyser import analyse
    from ldm_core.train.motion import DIRECTIONS, EVAL_TEMPLATES, TRAIN_TEMPLATES, measured_direction, sample_clip

    rng = random.Random(3)
    for motion in DIRECTIONS:
        clip = sample_clip(rng, 8, motion)
        frames = [shapes.to_pil(im) for im in shapes.render_packed(clip.packed, 64)]
        centres = []
        for im in frames:
            o = analyse(im).find(clip.shape, clip.colour)
            centres.append((o.cx, o.cy) if o else None)
        assert measured_direction(centres) == motion, clip.caption
    train = {t for ts in TRAIN_TEMPLATES.values() for t in ts}
    assert not train & {t for ts in EVAL_TEMPLATES.values() for t in ts}  # held-out phrasings

    def words(templates):
        return {w for ts in templates.values() for t in ts for w in re.findall(r"[a-z]+", t.format(o="", b="", c2=""))}

    # held-out words too: the two share only the directions' own nouns
    assert words(TRAIN_TEMPLATES) & words(EVAL_TEMPLATES) <= {"the", "left", "right", "top", "bottom"}
    assert measured_direction([(0.5, 0.5), (0.52, 0.5)]) is None  # too small a move is no direction


def test_motion_eval_says_where_consistency_breaks():
    """score_clip counts the frames whose tracked object is lost or has another shape or colour than the first
    frame's; a clip rendered as its caption says has none and is consistent."""
    import random

    from ldm_core.train import shapes
    from ldm_core.train.motion import sample_clip, score_clip

    clip = sample_clip(random.Random(5), 12, "right")
    frames = lambda packed: [shapes.to_pil(im) for im in shapes.render_packed(packed, 64)]  # noqa: E731
    clean = score_clip(frames(clip.packed), clip)
    assert clean["consistent"] and clean["direction_ok"]
    assert (clean["lost_frames"], clean["shape_changes"], clean["colour_changes"]) == (0, 0, 0)
    broken = clip.packed.clone()
    other_shape = next(i for i, s in enumerate(shapes.SHAPES) if s != clip.shape and s in ("circle", "square"))
    broken[3, 4] = float(other_shape)  # frame 3: another shape
    other = next(c for c in ("red", "blue", "yellow") if c not in (clip.colour, clip.background))
    broken[6, 8:11] = torch.tensor(shapes.COLOURS[other]) / 255.0  # frame 6: another colour
    broken[9, 3] = 0.0  # frame 9: no object
    got = score_clip(frames(broken), clip)
    assert not got["consistent"]
    assert (got["lost_frames"], got["shape_changes"], got["colour_changes"]) == (1, 1, 1)


def tiny_motion_options(tiny_models, out, **kw):
    """Motion-trainer options for the tiny SD 1.x model: 4-frame clips, one per step, 2 steps, 64 px, silent."""
    from ldm_core.train.motion import MotionTrainOptions

    base = dict(base=str(tiny_models["sd1"]["diffusers"]), frames=4, clips=1, steps=2, log_every=0, resolution=64)
    return MotionTrainOptions(**{**base, "out": str(out), **kw})


def test_motion_training_runs_resumes_and_exports_a_loadable_module(tmp_path, tiny_models):
    from ldm_core.train.motion import MotionTrainOptions, new_adapter, train_motion

    unet = tiny_components("sd1")["unet"]
    adapter = new_adapter(unet)
    x, ehs = torch.randn(4, 4, 8, 8), torch.randn(4, 77, 32)
    with torch.no_grad():
        plain = unet(x, 10, ehs).sample
        with motion_patch(unet, MotionModule("new", tmp_path, adapter, "diffusers")) as patch:
            patch.set_frames(4)
            assert torch.allclose(unet(x, 10, ehs).sample, plain, atol=1e-6)  # a new module is the identity
    opts = tiny_motion_options(tiny_models, tmp_path / "mm", work_dir=str(tmp_path / "work"))
    rec = train_motion(opts, log=lambda m: None)
    assert rec["steps"] == 2 and (tmp_path / "work" / "motion-train.pt").is_file()
    rec = train_motion(MotionTrainOptions(**{**opts.__dict__, "steps": 3}), log=lambda m: None)
    assert rec["steps"] == 3  # resumed from the checkpoint, one more step
    module = load_motion_module(tmp_path / "mm")
    assert module.layout == "diffusers" and module.channels == (32, 64)
    assert (tmp_path / "mm" / "diffusion_pytorch_model.safetensors").stat().st_size < 10e6


def test_motion_training_with_an_adapter_lora_writes_a_lora_the_engine_loads(tmp_path, tiny_models):
    """--lora-rank: a LoRA on the base's cross-attention keys/values trains with the module, resumes from the
    checkpoint, is written in kohya format next to the module's export, changes a clip when its prompt loads it
    (<lora:NAME:1>), and --init-lora continues it (a LoRA of another rank is a clear error)."""
    from safetensors.torch import load_file

    from ldm_core.train.motion import MotionTrainOptions, train_motion

    lora = tmp_path / "Lora" / "mm-adapter.safetensors"
    opts = tiny_motion_options(
        tiny_models, tmp_path / "AnimateDiff" / "mm", work_dir=str(tmp_path / "work"), lr=1e-2, lora_rank=2,
        lora_out=str(lora),
    )
    rec = train_motion(opts, log=lambda m: None)
    assert rec["adapter_lora"] == str(lora) and lora.is_file()
    first = load_file(lora)
    keys = {k.rsplit(".", 2)[0] for k in first}
    assert keys and all("attn2_to_k" in k or "attn2_to_v" in k for k in keys)  # cross-attention keys/values only
    assert any(float(v.abs().max()) > 0 for k, v in first.items() if k.endswith("lora_up.weight"))  # it learned
    rec = train_motion(MotionTrainOptions(**{**opts.__dict__, "steps": 3}), log=lambda m: None)
    assert rec["steps"] == 3
    resumed = load_file(lora)
    assert any(not torch.equal(first[k], resumed[k]) for k in first)

    data = tmp_path / "data"
    engine = Engine(
        EngineConfig.from_data_dir(
            data,
            ckpt_dirs=(Path(opts.base).parent,),
            lora_dirs=(lora.parent,),
            motion_dirs=(tmp_path / "AnimateDiff",),
            builtin_model_dir=None,
            device="cpu",
            save_images=False,
        )
    )
    engine.load_checkpoint(Path(opts.base).name)
    ad = {"model": "mm", "video_length": 4, "batch_size": 4, "format": []}
    req = dict(prompt="a red circle moving to the right", steps=2, width=64, height=64, seed=3, sampler_name="Euler")
    plain = engine.generate(GenerationRequest.build(**req, animatediff=ad))
    req["prompt"] += " <lora:mm-adapter:1>"
    with_lora = engine.generate(GenerationRequest.build(**req, animatediff=ad))
    assert any("mm-adapter" in t for t in with_lora.infotexts)
    pairs = zip(plain.images, with_lora.images, strict=True)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs)

    more = MotionTrainOptions(**{**opts.__dict__, "work_dir": None, "steps": 1, "init_lora": str(lora),
                                 "lora_out": str(tmp_path / "next.safetensors")})
    train_motion(more, log=lambda m: None)
    continued = load_file(tmp_path / "next.safetensors")  # started from the file's weights, not from zero
    up = [k for k in resumed if k.endswith("lora_up.weight")]
    assert all(float((continued[k].float() - resumed[k].float()).abs().max()) < 0.5 * float(resumed[k].abs().max())
               for k in up if float(resumed[k].abs().max()) > 0)
    with pytest.raises(ValueError, match="lora_down.weight: expected"):
        train_motion(MotionTrainOptions(**{**more.__dict__, "lora_rank": 3}), log=lambda m: None)


def test_motion_training_can_draw_with_an_all_attention_lora_at_the_bases_own_sizes(tmp_path, tiny_models):
    """--lora-targets attention: the adapter LoRA also covers self-attention and the query/output projections (the
    layers that draw, where the base's placement prior lives), and --object-sizes base gives the clips' objects
    the base's own size classes; a bad name for either is an error naming the option."""
    import random

    from safetensors.torch import load_file

    from ldm_core.train import shapes
    from ldm_core.train.motion import sample_clip, train_motion

    rng = random.Random(0)
    radii = [float(sample_clip(rng, 4, "right", sizes="base").packed[0, 7]) for _ in range(60)]
    assert all(any(abs(r - v) <= 0.0101 for v in shapes.SIZES.values()) for r in radii)
    assert {min(shapes.SIZES, key=lambda k: abs(shapes.SIZES[k] - r)) for r in radii} == set(shapes.SIZES)
    clip_radii = [float(sample_clip(rng, 4, "right").packed[0, 7]) for _ in range(20)]
    assert all(0.11 <= r <= 0.16 for r in clip_radii)  # the default is what the shipped module trained on

    lora = tmp_path / "adapter.safetensors"
    opts = tiny_motion_options(
        tiny_models, tmp_path / "mm", lr=1e-2, lora_rank=2, lora_out=str(lora), lora_targets="attention",
        object_sizes="base",
    )
    rec = train_motion(opts, log=lambda m: None)
    assert rec["lora_targets"] == ("to_q", "to_k", "to_v", "to_out.0")
    layers = {k.rsplit(".", 2)[0] for k in load_file(lora)}
    assert any("attn1_to_q" in k for k in layers) and any("attn2_to_out_0" in k for k in layers)
    with pytest.raises(ValueError, match="lora_targets: 'convs'"):
        train_motion(tiny_motion_options(tiny_models, tmp_path / "x", lora_rank=2, lora_targets="convs"))
    with pytest.raises(ValueError, match="object_sizes: 'huge'"):
        train_motion(tiny_motion_options(tiny_models, tmp_path / "x", object_sizes="huge"))


def test_motion_training_object_weight_changes_what_is_learned(tmp_path, tiny_models):
    from ldm_core.models import load_state_dict
    from ldm_core.train.motion import train_motion

    def trained(name, weight):
        rec = train_motion(tiny_motion_options(tiny_models, tmp_path / name, object_weight=weight), log=lambda m: None)
        assert rec["options"]["object_weight"] == str(weight)
        return load_state_dict(tmp_path / name / "diffusion_pytorch_model.safetensors")

    plain, again, weighted = trained("a", 0.0), trained("b", 0.0), trained("c", 4.0)
    assert all(torch.equal(plain[k], again[k]) for k in plain)  # the same seed learns the same
    assert any(not torch.equal(plain[k], weighted[k]) for k in plain)


def test_motion_training_with_shared_noise_blends_each_clips_frames_towards_its_own_first(tmp_path, tiny_models):
    """--shared-noise: the correlated noise a module run with that shared_noise sees (PYoCo's noise prior)."""
    from ldm_core.models import load_state_dict
    from ldm_core.train.motion import clip_noise, train_motion

    noise = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(clip_noise(noise, 4, 0.0), noise)
    same = clip_noise(noise, 4, 1.0)
    assert all(torch.equal(same[i], noise[0]) for i in range(4))  # the first clip: all its first frame's noise
    assert all(torch.equal(same[i], noise[4]) for i in range(4, 8))  # the second clip its own first frame's
    half = clip_noise(noise, 4, 0.5)
    corr = float(torch.corrcoef(torch.stack([half[5].flatten(), noise[4].flatten()]))[0, 1])
    assert 0.6 < corr < 0.8 and torch.equal(half[4], noise[4])

    def trained(name, share):
        rec = train_motion(tiny_motion_options(tiny_models, tmp_path / name, shared_noise=share), log=lambda m: None)
        assert rec["options"]["shared_noise"] == str(share)
        return load_state_dict(tmp_path / name / "diffusion_pytorch_model.safetensors")

    plain, shared = trained("a", 0.0), trained("b", 0.7)
    assert any(not torch.equal(plain[k], shared[k]) for k in plain)
    with pytest.raises(ValueError, match="shared_noise"):
        train_motion(tiny_motion_options(tiny_models, tmp_path / "c", shared_noise=1.5), log=lambda m: None)


def test_motion_training_timesteps_are_one_per_clip_and_cubic_spends_them_at_high_noise(tmp_path, tiny_models):
    from ldm_core.train.motion import MotionTrainOptions, clip_timesteps, train_motion

    t = clip_timesteps(3, 4, 1000, "uniform", torch.Generator().manual_seed(0))
    assert t.shape == (12,) and all(len(set(t[i * 4 : i * 4 + 4].tolist())) == 1 for i in range(3))
    uni = clip_timesteps(2000, 1, 1000, "uniform", torch.Generator().manual_seed(1)).float()
    cub = clip_timesteps(2000, 1, 1000, "cubic", torch.Generator().manual_seed(1)).float()
    assert 0.38 < (uni > 580).float().mean() < 0.46 and 0.71 < (cub > 580).float().mean() < 0.79
    assert cub.min() >= 0 and cub.max() <= 999
    late = clip_timesteps(2000, 1, 1000, "uniform", torch.Generator().manual_seed(1), min_t=500)
    assert late.min() >= 500 and late.max() <= 999 and 700 < late.float().mean() < 800
    base = dict(base=str(tiny_models["sd1"]["diffusers"]), frames=4, clips=1, steps=1, log_every=0, resolution=64)
    rec = train_motion(MotionTrainOptions(**base, out=str(tmp_path / "c"), timesteps="cubic"), log=lambda m: None)
    assert rec["options"]["timesteps"] == "cubic"
    with pytest.raises(ValueError, match="timesteps"):
        train_motion(MotionTrainOptions(**base, out=str(tmp_path / "x"), timesteps="late"), log=lambda m: None)
    with pytest.raises(ValueError, match="min_timestep: 1000 is outside 0..999"):
        train_motion(MotionTrainOptions(**base, out=str(tmp_path / "y"), min_timestep=1000), log=lambda m: None)


def test_motion_training_continues_from_an_exported_module_and_refuses_another_bases(tmp_path, tiny_models):
    """--init: a later sitting starts from the committed export (its checkpoint gone); a module made for a
    UNet of other channels is a clear error, not a silent fresh start."""
    from diffusers import MotionAdapter
    from safetensors.torch import load_file

    from ldm_core.train.motion import MotionTrainOptions, train_motion

    base = dict(base=str(tiny_models["sd1"]["diffusers"]), frames=4, clips=1, steps=1, log_every=0, resolution=64)
    train_motion(MotionTrainOptions(**base, out=str(tmp_path / "first")), log=lambda m: None)
    first = load_file(tmp_path / "first" / "diffusion_pytorch_model.safetensors")
    proj = [k for k in first if ".proj_out.weight" in k]
    assert proj and any(first[k].abs().sum() > 0 for k in proj)  # one step moved the zeroed projections
    said = []
    opts = MotionTrainOptions(**{**base, "lr": 0.0}, out=str(tmp_path / "second"), init=str(tmp_path / "first"))
    train_motion(opts, log=said.append)
    second = load_file(tmp_path / "second" / "diffusion_pytorch_model.safetensors")
    assert any("starting from the weights" in m for m in said)
    assert all(torch.equal(first[k], second[k]) for k in first)  # lr 0: the export is the init, unchanged
    other = save_motion_module(
        MotionAdapter(block_out_channels=(48, 96), motion_layers_per_block=2, motion_norm_num_groups=16),
        tmp_path / "other",
        "diffusers",
    )
    with pytest.raises(MotionModuleError, match="block_out_channels"):
        train_motion(MotionTrainOptions(**base, out=str(tmp_path / "x"), init=str(other)), log=lambda m: None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch sees no CUDA device")
def test_motion_training_on_a_gpu_torch_does_not_see_is_a_clear_error_before_any_work(tmp_path, tiny_models):
    from ldm_core.train.motion import train_motion

    opts = tiny_motion_options(tiny_models, tmp_path / "mm", device="cuda", work_dir=str(tmp_path / "work"))
    with pytest.raises(RuntimeError, match="--device cuda asked for, but torch sees no CUDA device"):
        train_motion(opts, log=lambda m: None)
    assert not (tmp_path / "mm").exists() and not (tmp_path / "work").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_motion_training_on_a_gpu_resumes_on_the_cpu_and_exports_a_module_the_engine_runs(tmp_path, tiny_models):
    """`--device cuda` (bf16 autocast, the fused optimiser): the checkpoint resumes on the CPU, the export is a CPU
    fp16 folder that loads like any other."""
    from ldm_core.train.motion import MotionTrainOptions, train_motion

    opts = tiny_motion_options(tiny_models, tmp_path / "mm", device="cuda", autocast="bf16", clips=2,
                               work_dir=str(tmp_path / "work"))
    rec = train_motion(opts, log=lambda m: None)
    assert rec["steps"] == 2 and math.isfinite(rec["final_loss"])
    rec = train_motion(MotionTrainOptions(**{**opts.__dict__, "device": "cpu", "steps": 3}), log=lambda m: None)
    assert rec["steps"] == 3
    module = load_motion_module(tmp_path / "mm")
    assert all(p.device.type == "cpu" for p in module.adapter.parameters())


def test_stable_video_diffusion_folder_makes_a_clip_from_an_image(tmp_path, tiny_models):
    from tiny_models import build_tiny_svd

    eng = _engine(tmp_path, tiny_models["sd1"]["single_file"], [])
    build_tiny_svd(tmp_path / "models" / "SVD" / "tiny-svd")
    assert "tiny-svd" in eng.motion_modules.names() and eng.motion_modules.is_svd("tiny-svd")
    assert eng.motion_modules.default() is None  # SVD is chosen by name, never as the default module
    with pytest.raises(RequestError, match="start image"):
        eng.generate(vreq(animatediff={"model": "tiny-svd"}))
    res = eng.generate(
        vreq(
            Img2ImgRequest,
            init_images=[_red(0)],
            save_images=True,
            steps=2,
            animatediff={
                "model": "tiny-svd",
                "video_length": 3,
                "fps": 6,
                "motion_bucket_id": 200,
                "format": ["GIF", "MP4"],
            },
        )
    )
    assert len(res.images) == 3 and res.images[0].size == (SIZE, SIZE)
    assert [c.format for c in res.videos] == ["GIF", "MP4"] and all(c.path.is_file() for c in res.videos)
    assert "SVD: " in res.infotexts[0] and "motion_bucket_id: 200" in res.infotexts[0]


@pytest.mark.parametrize("api_client", [("sdxl", "diffusers")], indirect=True)
def test_sdxl_clip_through_the_api(api_client):
    client, _ = api_client
    body = {
        "prompt": "0: a red circle, 2: a blue circle",
        "steps": 2,
        "width": SIZE,
        "height": SIZE,
        "alwayson_scripts": {
            "AnimateDiff": {"args": [{"model": "mm-sdxl-diffusers", "video_length": 4, "format": ["WEBP"]}]}
        },
    }
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    clip = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert clip.format == "WEBP" and clip.n_frames == 4


def test_pickled_module_is_a_422_through_the_api(api_client, motion_files):
    client, data = api_client
    save_motion_module(tiny_motion_adapter("sd1"), data / "models" / "AnimateDiff" / "mm_pickled.ckpt", "original")
    body = {
        "prompt": "a red circle",
        "steps": 2,
        "width": SIZE,
        "height": SIZE,
        "alwayson_scripts": {"AnimateDiff": {"args": [{"model": "mm_pickled.ckpt", "video_length": 2}]}},
    }
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 422 and "allow-pickle" in r.text


def test_interrupted_clip_keeps_its_partial_frames_and_file(sd1_video):
    import threading

    from ldm_core.progress import JobContext

    ctx = JobContext()

    def watch():
        for _ in range(20000):
            if ctx.progress.snapshot().step >= 2:
                ctx.cancel.interrupt()
                return
            threading.Event().wait(0.002)

    t = threading.Thread(target=watch)
    t.start()
    res = sd1_video.generate(vreq(steps=60, save_images=True), ctx)
    t.join()
    assert res.interrupted and len(res.images) == 6
    assert res.videos and res.videos[0].path.is_file()  # nothing already produced is lost


def test_clip_infotext_fills_the_video_tab(sd1_video):
    from ui.common import fields_from_text

    text = sd1_video.generate(vreq(animatediff={"video_length": 5, "fps": 12, "closed_loop": "N"})).infotexts[0]
    fields = fields_from_text(text)
    assert fields["video_model"] == "mm_sd1_tiny.safetensors"
    assert (fields["video_length"], fields["video_fps"], fields["video_closed_loop"]) == (5, 12, "N")
    assert fields["prompt"] == "a red circle" and fields["steps"] == 3


def test_a_source_clip_file_from_the_ui_and_the_cli(tmp_path):
    from ldm_core.video.clips import read_source_clip
    from ui.common import _video_request

    frames = [Image.new("RGB", (32, 32), (40 * i, 0, 0)) for i in range(3)]
    path = tmp_path / "source.gif"
    path.write_bytes(encode_clip(frames, "GIF", 8))
    data, first = read_source_clip(path)
    assert data == path.read_bytes() and first.size == (32, 32)
    req = _video_request({"prompt": "a red circle", "video_source": str(path), "steps": 2})
    assert isinstance(req, Img2ImgRequest) and req.animatediff.video_source  # v2v starts from the first frame
    (tmp_path / "broken.mp4").write_bytes(b"not a clip")
    for bad in (tmp_path / "broken.mp4", tmp_path / "missing.gif"):
        with pytest.raises(RequestError) as err:
            read_source_clip(bad)
        assert err.value.field == "video_source" and bad.name in str(err.value)


def test_motion_frames_feed_a_domain_adapter_that_motion_training_merges_and_clips_add(tmp_path, tiny_models):
    """motion-frames writes single frames of training clips with their captions (the domain adapter's data);
    a LoRA trained on them and passed as --base-lora is merged into the frozen base for the sitting (the
    module then learns against other base weights than without it) and named in the record; a missing file is
    an error naming base_lora. A module whose sidecar names that LoRA (`adapter_lora`) runs with it: a clip
    whose prompt does not name it equals one whose prompt says <lora:NAME:1>, says so in its notes and hashes
    it in the infotext; <lora:NAME:0> in the prompt leaves it out; a missing LoRA is a note, not a failure."""
    from ldm_core.train.lora import LoraTrainOptions, train_lora
    from ldm_core.train.motion import TRAIN_TEMPLATES, train_motion, write_frame_dataset

    paths = write_frame_dataset(tmp_path / "frames", 3)
    assert [p.name for p in paths] == ["00000.png", "00001.png", "00002.png"]
    assert Image.open(paths[0]).size == (64, 64)
    kinds = {t.split("{o}")[1].split("{b}")[0].strip(" ,").split()[0] for ts in TRAIN_TEMPLATES.values() for t in ts}
    for p in paths:
        caption = p.with_suffix(".txt").read_text().strip()
        assert kinds & set(re.findall(r"[a-z]+", caption)), caption  # a clip's caption, with its motion words
    assert write_frame_dataset(tmp_path / "again", 3)[2].read_bytes() == paths[2].read_bytes()  # reproducible

    lora = tmp_path / "Lora" / "domain.safetensors"
    base = tiny_models["sd1"]["diffusers"]
    train_lora(
        LoraTrainOptions(data=tmp_path / "frames", base=base, out=lora, rank=2, steps=2, lr=1e-2, batch=2,
                         resolution=64, device="cpu", log_every=0),
        log=lambda s: None,
    )
    same = dict(steps=2, lr=1e-2, warmup_steps=0)
    plain = train_motion(tiny_motion_options(tiny_models, tmp_path / "plain", **same), log=lambda m: None)
    module_dir = tmp_path / "AnimateDiff" / "adapted"
    adapted = train_motion(
        tiny_motion_options(tiny_models, module_dir, **same, base_lora=str(lora)), log=lambda m: None
    )
    assert "base_lora" not in plain and adapted["base_lora"] == str(lora)
    a, b = load_motion_module(tmp_path / "plain").adapter, load_motion_module(module_dir).adapter
    assert any(not torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    with pytest.raises(FileNotFoundError, match="base_lora"):
        train_motion(tiny_motion_options(tiny_models, tmp_path / "x", base_lora=str(tmp_path / "no.safetensors")))

    assert load_motion_module(module_dir).adapter_lora is None
    sidecar = tmp_path / "AnimateDiff" / "adapted.json"
    sidecar.write_text(json.dumps({"adapter_lora": "domain"}))
    assert load_motion_module(module_dir).adapter_lora == "domain"
    engine = Engine(
        EngineConfig.from_data_dir(
            tmp_path / "data", ckpt_dirs=(Path(base).parent,), lora_dirs=(lora.parent,),
            motion_dirs=(module_dir.parent,), builtin_model_dir=None, device="cpu", save_images=False,
        )
    )
    engine.load_checkpoint(Path(base).name)
    ad = {"model": "adapted", "video_length": 4, "batch_size": 4, "format": []}
    req = dict(prompt="a red circle moving to the right", steps=2, width=64, height=64, seed=3, sampler_name="Euler")

    def clip(prompt):
        res = engine.generate(GenerationRequest.build(**{**req, "prompt": prompt}, animatediff=ad))
        return res, [np.asarray(im) for im in res.images]

    auto, auto_frames = clip(req["prompt"])
    named, named_frames = clip(req["prompt"] + " <lora:domain:1>")
    off, off_frames = clip(req["prompt"] + " <lora:domain:0>")
    assert all(np.array_equal(x, y) for x, y in zip(auto_frames, named_frames, strict=True))
    assert any(not np.array_equal(x, y) for x, y in zip(auto_frames, off_frames, strict=True))
    assert any("added <lora:domain:1>" in n for n in auto.notes) and not any("added" in n for n in named.notes)
    assert "domain: " in auto.infotexts[0]  # Lora hashes
    lora.rename(tmp_path / "elsewhere.safetensors")
    engine.networks.refresh()
    missing, _ = clip(req["prompt"])
    assert any("'domain' is not in the LoRA folder" in n for n in missing.notes)
    sidecar.write_text(json.dumps({"adapter_lora": "a/b"}))
    with pytest.raises(MotionModuleError, match="adapter_lora"):
        load_motion_module(module_dir)
