"""The bad-input matrix (issue 16, item 4): one test per kind of bad input, across the REST API, the CLI,
the web UI's handlers and model files on disk. Each must get a 4xx (API) or a clear message (CLI, UI) that
names the field or the file; the server keeps serving (a good request right after succeeds) and nothing
already saved is lost (every file under outputs/ keeps its bytes).

The server is `python -m api.server` (tests/api_server.py) with a tiny random SD1 model and, beside it, the
broken files: random bytes, truncated, git-LFS pointer and empty `.safetensors` as checkpoint, LoRA, VAE,
ControlNet and embedding, and wrong-family LoRA (SDXL widths) and ControlNet (built from the tiny SDXL).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from api_server import png_b64, running_api_server
from PIL import Image
from safetensors.torch import save_file

from ldm_core.generation_requests import GenerationRequest, RequestError, RequestLimits, check_limits

SIZE = 64
TIMEOUT = 120
LFS_POINTER = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4b1d0e3f5f0a0c9a3c7a1f0e0f5e6f1f2a3b4c5d6e7f8091a2b3c4d5e6f70812\nsize 1999139576\n"
)


# ---- files ------------------------------------------------------------------------------------------------
def _random_bytes(path: Path, n: int = 4096) -> None:
    path.write_bytes(np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8).tobytes())


def _truncated(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 3])


def _sdxl_lora(path: Path) -> None:
    """A LoRA whose widths are SDXL's (2048-wide cross-attention): the wrong family for an SD1 model."""
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 2048), f"{key}.lora_up.weight": torch.zeros(640, 4)}, path)


def _sdxl_controlnet(unet_dir: Path, path: Path) -> None:
    from diffusers import ControlNetModel, UNet2DConditionModel

    cn = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(unet_dir))
    save_file({k: v.contiguous() for k, v in cn.state_dict().items()}, str(path))


def _populate(data: Path, tiny: dict) -> None:
    models = data / "models"
    ckpt, lora, vae, cn, emb = (
        models / "Stable-diffusion",
        models / "Lora",
        models / "VAE",
        models / "ControlNet",
        data / "embeddings",
    )
    for d in (ckpt, lora, vae, cn, emb):
        d.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tiny["sd1"]["diffusers"], ckpt / "a-tiny")  # first by name: the default
    single = tiny["sd1"]["single_file"]
    _random_bytes(ckpt / "ck-random.safetensors")
    _truncated(single, ckpt / "ck-truncated.safetensors")
    (ckpt / "ck-lfs.safetensors").write_bytes(LFS_POINTER)
    (ckpt / "ck-empty.safetensors").write_bytes(b"")
    _random_bytes(lora / "lora-random.safetensors")
    (lora / "lora-lfs.safetensors").write_bytes(LFS_POINTER)
    _sdxl_lora(lora / "lora-sdxl.safetensors")
    _truncated(single, vae / "vae-truncated.safetensors")
    (vae / "vae-lfs.safetensors").write_bytes(LFS_POINTER)
    save_file({"not_a_vae.weight": torch.zeros(3, 3)}, str(vae / "vae-wrong.safetensors"))
    _random_bytes(cn / "cn-random.safetensors")
    _sdxl_controlnet(tiny["sdxl"]["diffusers"] / "unet", cn / "cn-sdxl.safetensors")
    _random_bytes(emb / "emb-random.safetensors")
    (emb / "emb-lfs.safetensors").write_bytes(LFS_POINTER)


# ---- the server -------------------------------------------------------------------------------------------
class Server:
    def __init__(self, url: str, data: Path, proc: subprocess.Popen):
        self.url, self.data, self.proc = url, data, proc
        self.saved: dict[Path, str] = {}

    def post(self, path: str, body: dict | str | bytes, **kw) -> requests.Response:
        if isinstance(body, dict):
            return requests.post(self.url + path, json=body, timeout=TIMEOUT, **kw)
        return requests.post(self.url + path, data=body, timeout=TIMEOUT, **kw)

    def outputs(self) -> dict[Path, str]:
        root = self.data / "outputs"
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def txt(**kw) -> dict:
    return {"prompt": "a cat", "steps": 1, "width": SIZE, "height": SIZE, "seed": 1, "sampler_name": "Euler", **kw}


def init_image(mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).convert(mode)


def img(**kw) -> dict:
    return txt(**{"init_images": [png_b64(init_image())], "denoising_strength": 0.5, **kw})


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    data = tmp_path_factory.mktemp("badinput")

    def prepare():
        _populate(data, request.getfixturevalue("tiny_models"))

    with running_api_server(data, [], prepare) as (url, proc, _log):
        srv = Server(url, data, proc)
        first = srv.post("/sdapi/v1/txt2img", txt(save_images=True))
        assert first.status_code == 200, first.text
        srv.saved = srv.outputs()
        assert srv.saved, "the good request saved nothing"
        yield srv


@pytest.fixture
def api(server):
    """The server; after the test: still serving (a good txt2img succeeds), earlier outputs intact."""
    yield server
    assert server.proc.poll() is None, "the server died"
    after = server.post("/sdapi/v1/txt2img", txt(save_images=True))
    assert after.status_code == 200, after.text[:500]
    now = server.outputs()
    lost = {p for p, h in server.saved.items() if now.get(p) != h}
    assert not lost, f"saved files lost or changed: {lost}"
    server.saved = now


def assert_4xx(r: requests.Response, *fields: str) -> str:
    """A 4xx whose body names one of `fields`; returns the body text."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:1000])
    text = r.text
    assert any(f in text for f in fields), f"{fields} not named in {text[:1000]}"
    return text


# ---- model files ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, what",
    [
        ("ck-random", "corrupt"),
        ("ck-truncated", "truncated"),
        ("ck-lfs", "git-LFS"),
        ("ck-empty", "empty"),
    ],
)
def test_broken_checkpoint_file(api, name, what):
    r = api.post("/sdapi/v1/txt2img", txt(override_settings={"sd_model_checkpoint": name}))
    text = assert_4xx(r, "sd_model_checkpoint")
    assert name in text


@pytest.mark.parametrize("name", ["lora-random", "lora-lfs"])
def test_broken_lora_file(api, name):
    r = api.post("/sdapi/v1/txt2img", txt(prompt=f"a cat <lora:{name}:1>"))
    text = assert_4xx(r, "prompt")
    assert name in text


def test_wrong_family_lora(api):
    r = api.post("/sdapi/v1/txt2img", txt(prompt="a cat <lora:lora-sdxl:1>"))
    assert "SDXL" in assert_4xx(r, "prompt")


@pytest.mark.parametrize("name", ["vae-truncated", "vae-lfs", "vae-wrong"])
def test_broken_or_wrong_vae_file(api, name):
    r = api.post("/sdapi/v1/txt2img", txt(override_settings={"sd_vae": f"{name}.safetensors"}))
    text = assert_4xx(r, "sd_vae")
    assert name in text


def _cn(model: str) -> dict:
    image = png_b64(init_image())
    return {"controlnet": {"args": [{"enabled": True, "model": model, "image": image, "module": "none"}]}}


def test_corrupt_controlnet_file(api):
    r = api.post("/sdapi/v1/txt2img", txt(alwayson_scripts=_cn("cn-random")))
    assert "cn-random" in assert_4xx(r, "controlnet")


def test_wrong_family_controlnet(api):
    r = api.post("/sdapi/v1/txt2img", txt(alwayson_scripts=_cn("cn-sdxl")))
    assert "SDXL" in assert_4xx(r, "controlnet")


@pytest.mark.parametrize("name", ["emb-random", "emb-lfs"])
def test_broken_embedding_file(api, name):
    """A broken embedding file is not a token: the prompt runs (the word is plain text) or is refused by name,
    never a 500."""
    r = api.post("/sdapi/v1/txt2img", txt(prompt=f"a cat, {name}"))
    if r.status_code != 200:
        assert name in assert_4xx(r, "prompt")
    listed = requests.get(api.url + "/sdapi/v1/embeddings", timeout=TIMEOUT).json()
    assert name in json.dumps(listed.get("skipped", {})) or name not in json.dumps(listed.get("loaded", {}))


# ---- sizes and numbers --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, field",
    [
        (txt(width=0), "width"),
        (txt(height=-64), "height"),
        (txt(width=10**6, height=10**6), "max_pixels"),
        (txt(batch_size=10**6), "batch_size"),
        (txt(steps=0), "steps"),
        (txt(steps=-1), "steps"),
        (txt(steps=10**9), "steps"),
        (txt(seed=2**70), "seed"),
    ],
    ids=["zero-width", "negative-height", "huge-size", "huge-batch", "steps-0", "steps-neg", "steps-1e9", "seed-2^70"],
)
def test_size_and_count_out_of_range(api, body, field):
    assert_4xx(api.post("/sdapi/v1/txt2img", body), field)


def test_unset_size_counts_against_the_pixel_limit():
    """width/height null (= the model's native size) had skipped --max-pixels: the fuzzer's 64x64-capped
    server ran 512x512 jobs. An unset side now counts as the largest native size (1024)."""
    request = GenerationRequest.build(prompt="x", width=None, height=64)
    with pytest.raises(RequestError) as err:
        check_limits(request, RequestLimits(max_pixels=64 * 64))
    assert err.value.field == "width" and "native size" in err.value.message


def test_clip_skip_beyond_the_text_encoder(api):
    """The tiny model's text encoder has 2 layers: skipping 5 was an IndexError (500), found by the fuzzer."""
    r = api.post("/sdapi/v1/txt2img", txt(override_settings={"CLIP_stop_at_last_layers": 5}))
    assert "2 layers" in assert_4xx(r, "clip_skip")


def test_cfg_scale_1e30(api):
    assert_4xx(api.post("/sdapi/v1/txt2img", txt(cfg_scale=1e30)), "cfg_scale")


def test_denoising_nan(api):
    # Python's json (the server's parser) reads the bare NaN token some clients write
    body = json.dumps(img()).replace('"denoising_strength": 0.5', '"denoising_strength": NaN')
    assert "NaN" in body
    assert_4xx(api.post("/sdapi/v1/img2img", body), "denoising_strength")


def test_infinite_cfg_native(api):
    body = json.dumps({"prompt": "x", "steps": 1, "width": SIZE, "height": SIZE, "cfg_scale": 1}).replace(
        '"cfg_scale": 1', '"cfg_scale": Infinity'
    )
    assert_4xx(api.post("/api/v1/jobs", body), "cfg_scale")


# ---- prompts --------------------------------------------------------------------------------------------
def test_very_long_prompt(api):
    r = api.post("/sdapi/v1/txt2img", txt(prompt="a red cat on a mat, " * 5000))
    if r.status_code != 200:
        assert_4xx(r, "prompt")


def test_rtl_and_zero_width_prompt(api):
    prompt = "\u202equ\u200b\u200dcat \u05d7\u05ea\u05d5\u05dc \ufeff\u2066\u0627\u0644\u0642\u0637 \U0001f408"
    r = api.post("/sdapi/v1/txt2img", txt(prompt=prompt, save_images=True))
    assert r.status_code == 200, r.text[:500]
    assert prompt in json.loads(r.json()["info"])["prompt"]


def test_lone_surrogate_in_json(api):
    body = json.dumps(txt(prompt="cat")).replace('"cat"', '"cat \\ud800 dog"')
    r = api.post("/sdapi/v1/txt2img", body, headers={"Content-Type": "application/json"})
    assert_4xx(r, "prompt")


def test_nul_in_prompt(api):
    r = api.post("/sdapi/v1/txt2img", txt(prompt="cat\x00dog", negative_prompt="\x00", save_images=True))
    if r.status_code != 200:
        assert_4xx(r, "prompt")


# ---- images -----------------------------------------------------------------------------------------------
def test_twenty_mb_base64_image(api):
    rng = np.random.default_rng(3)
    big = Image.fromarray(rng.integers(0, 255, (2600, 2600, 3), dtype=np.uint8))
    b64 = png_b64(big)
    assert len(b64) > 20 * 10**6
    r = api.post("/sdapi/v1/img2img", txt(init_images=[b64], denoising_strength=0.5))
    if r.status_code != 200:
        assert_4xx(r, "init_images")


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA", "CMYK", "I;16", "1"])
def test_image_modes(api, mode):
    image = init_image("L" if mode == "I;16" else mode)
    if mode == "I;16":
        image = Image.fromarray((np.asarray(image).astype(np.uint16) * 257), mode="I;16")
    buf = io.BytesIO()
    image.save(buf, "TIFF" if mode == "CMYK" else "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == mode
    r = api.post("/sdapi/v1/img2img", img(init_images=[base64.b64encode(buf.getvalue()).decode()]))
    assert r.status_code == 200, r.text[:500]


def test_truncated_png(api):
    raw = base64.b64decode(png_b64(init_image()))
    r = api.post("/sdapi/v1/img2img", img(init_images=[base64.b64encode(raw[: len(raw) // 2]).decode()]))
    assert_4xx(r, "init_images")


def test_data_url_prefix_works(api):
    r = api.post("/sdapi/v1/img2img", img(init_images=["data:image/png;base64," + png_b64(init_image())]))
    assert r.status_code == 200, r.text[:500]


def test_garbage_base64(api):
    assert_4xx(api.post("/sdapi/v1/img2img", img(init_images=["data:image/png;base64,@@not base64!!"])), "init_images")


def _mask(color: int, size: int = SIZE) -> str:
    return png_b64(Image.new("L", (size, size), color))


@pytest.mark.parametrize("mask", ["wrong-size", "all-white", "all-black"])
def test_odd_masks_work(api, mask):
    b64 = {"wrong-size": _mask(255, 40), "all-white": _mask(255), "all-black": _mask(0)}[mask]
    r = api.post("/sdapi/v1/img2img", img(mask=b64, inpaint_full_res=True))
    assert r.status_code == 200, r.text[:500]


def test_mask_not_an_image(api):
    assert_4xx(api.post("/sdapi/v1/img2img", img(mask=base64.b64encode(b"hello").decode())), "mask")


def test_png_info_garbage(api):
    assert_4xx(api.post("/sdapi/v1/png-info", {"image": "garbage"}), "image")


def test_extras_16_bit_image(api):
    image = Image.fromarray((np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE) * 16), mode="I;16")
    r = api.post("/sdapi/v1/extra-single-image", {"image": png_b64(image), "upscaling_resize": 2})
    assert r.status_code == 200, r.text[:500]


def test_body_not_json(api):
    assert_4xx(api.post("/sdapi/v1/txt2img", b"\xff\xfe not json"), "body", "json")


# ---- the command line (ldm_core.cli.main: what `python -m ldm_core` runs, in-process to skip a torch import) ----
def _cli(capsys, *args: str, data: Path) -> tuple[int, str]:
    from ldm_core.cli import main

    code = main([*args, "--data-dir", str(data), "--device", "cpu"])
    return code, capsys.readouterr().err


def test_cli_steps_zero(server, tmp_path, capsys):
    code, err = _cli(capsys, "txt2img", "--prompt", "x", "--steps", "0", "--out", str(tmp_path), data=server.data)
    assert code == 2 and "steps" in err and "at least 1" in err, err


def test_cli_broken_checkpoint(server, tmp_path, capsys):
    code, err = _cli(
        capsys, "txt2img", "--prompt", "x", "--steps", "1", "--width", "64", "--height", "64", "--model", "ck-lfs",
        "--out", str(tmp_path), data=server.data,
    )  # fmt: skip
    assert code == 2 and "ck-lfs" in err and "git-LFS" in err, err
    assert not list(tmp_path.iterdir())


def test_cli_truncated_init_image(server, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    raw = base64.b64decode(png_b64(init_image()))
    bad.write_bytes(raw[: len(raw) // 2])
    code, err = _cli(capsys, "img2img", "--init-image", str(bad), "--out", str(tmp_path / "o"), data=server.data)
    assert code == 2 and "init" in err, err


def test_cli_nan_cfg_scale(server, tmp_path, capsys):
    code, err = _cli(capsys, "txt2img", "--cfg-scale", "nan", "--out", str(tmp_path), data=server.data)
    assert code == 2 and "cfg_scale" in err, err


# ---- the web UI (ui.common: what the Generate buttons build and show) ----------------------------------------
UI_FORM = dict(prompt="a cat", negative_prompt="", styles=[], sampler_name="Euler", scheduler="Automatic", steps=3,
               cfg_scale=7.0, width=64, height=64, seed=5, batch_size=1, n_iter=1)  # fmt: skip


@pytest.mark.parametrize(
    "values, field",
    [
        ({"steps": "abc"}, "steps"),
        ({"prompt": "a \ud800 cat"}, "prompt"),
        ({"styles": ["x\udc00"]}, "styles"),
        ({"s_noise": float("nan")}, "s_noise"),
        ({"width": 4096}, "width"),
    ],
    ids=["steps-not-a-number", "prompt-lone-surrogate", "style-lone-surrogate", "nan-setting", "over-slider-size"],
)
def test_ui_form_refuses_naming_the_field(values, field):
    from ui.common import build_request, readable_error

    with pytest.raises(RequestError) as err:
        build_request("txt2img", {**UI_FORM, **values})
    assert err.value.field == field and readable_error(err.value).startswith(field + ":")


@pytest.mark.parametrize("mode", ["I;16", "CMYK", "P", "1"])
def test_ui_inpaint_odd_image_and_mask_modes(mode):
    from ui.common import build_request

    if mode == "I;16":
        image = Image.fromarray(np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE) * 16)
    else:
        image = init_image("RGB").convert(mode)
    mask = Image.new("1", (SIZE // 2, SIZE // 2), 1)  # 1-bit, half size: resized to the image
    editor = {"background": image, "layers": [], "composite": image}
    request = build_request(
        "inpaint", {**UI_FORM, "inpaint_editor": editor, "mask_upload": mask, "denoising_strength": 0.5}
    )
    assert request.init_images[0].mode == "RGB" and request.mask.mode == "L" and request.mask.size == (SIZE, SIZE)


def test_ui_shows_a_broken_model_file_by_name(server):
    from ldm_core.models.loading import ModelFileError, check_weights_file
    from ui.common import readable_error

    with pytest.raises(ModelFileError) as err:
        check_weights_file(server.data / "models" / "Stable-diffusion" / "ck-truncated.safetensors")
    text = readable_error(err.value)
    assert "ck-truncated.safetensors" in text and "truncated" in text and "Traceback" not in text
