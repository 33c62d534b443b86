"""Real A1111 clients against a real server: each request exactly as a public client sends it (its headers,
its content type or lack of one, its field values and their JSON types), and every response field that
client reads checked for presence and type. The server is `python -m api.server` in a subprocess with a
tiny random SD1 model; images are 64x64 and 1-3 steps (a client's own size/steps are scaled down to that,
and noted where they are).

A1111's own `test/` payloads are in tests/clients/a1111_test_payloads.json (verbatim). Each other client's
test names its repository and file in the comment above it.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import requests
from api_server import png_b64, running_api_server
from PIL import Image

PAYLOADS = json.loads((Path(__file__).parent / "clients" / "a1111_test_payloads.json").read_text())
TIMEOUT = 120
SIZE = 64


# ---- the server ------------------------------------------------------------------------------------------
class Server:
    def __init__(self, url: str, data: Path):
        self.url, self.data = url, data

    def __call__(self, path: str) -> str:
        return self.url + "/" + path.lstrip("/")


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    data = tmp_path_factory.mktemp("clientdata")
    (data / "models" / "Stable-diffusion").mkdir(parents=True)
    (data / "models" / "Lora").mkdir(parents=True)
    (data / "styles.csv").write_text("name,prompt,negative_prompt\nsunny,{prompt} in the sun,rain\n")

    def prepare():
        tiny = request.getfixturevalue("tiny_models")["sd1"]["diffusers"]
        shutil.copytree(tiny, data / "models" / "Stable-diffusion" / "tiny")

    with running_api_server(data, [], prepare) as (url, _proc, _log):
        yield Server(url, data)


# ---- helpers ---------------------------------------------------------------------------------------------
def init_image(size: int = SIZE) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def mask_image(size: int = SIZE) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return mask


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + png_b64(image)


def decoded(b64: str) -> Image.Image:
    """What clients do with an image: b64decode (after a possible data: prefix) and open it."""
    image = Image.open(io.BytesIO(base64.b64decode(b64.split(",", 1)[-1] if b64.startswith("data:") else b64)))
    image.load()
    return image


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# Typed decoding as serde / encoding/json would do it: a value of the wrong JSON type fails the client.
TYPES = {
    "u32": lambda v: is_int(v) and v >= 0,
    "i32": is_int,
    "i64": is_int,
    "f64": is_num,
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "vec_str": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "vec_i64": lambda v: isinstance(v, list) and all(is_int(x) for x in v),
    "map": lambda v: isinstance(v, dict),
    "vec": lambda v: isinstance(v, list),
    "any": lambda v: True,
}


def check_typed(obj: dict, spec: dict[str, str], *, optional: bool, where: str) -> None:
    for key, kind in spec.items():
        if key not in obj or obj[key] is None:
            assert optional, f"{where}: {key} missing"
            continue
        assert TYPES[kind](obj[key]), f"{where}: {key}={obj[key]!r} does not decode as {kind}"


def generation_ok(r: requests.Response, n_images: int = 1, size: tuple[int, int] = (SIZE, SIZE)) -> dict:
    """The A1111 generation response every client relies on: 200, images (base64 PNGs), parameters (an
    object), info (a JSON *string*)."""
    assert r.status_code == 200, (r.status_code, r.text[:2000])
    body = r.json()
    assert isinstance(body["images"], list) and len(body["images"]) == n_images, len(body["images"])
    assert all(isinstance(b, str) and decoded(b).size == size for b in body["images"])
    assert isinstance(body["parameters"], dict)
    assert isinstance(body["info"], str)
    info = json.loads(body["info"])
    assert isinstance(info, dict)
    return body


def titles(server: Server) -> list[str]:
    return [m["title"] for m in requests.get(server("/sdapi/v1/sd-models"), timeout=TIMEOUT).json()]


# =========================================================================================================
# AUTOMATIC1111/stable-diffusion-webui test/ folder (payloads verbatim in tests/clients/a1111_test_payloads.json)
# =========================================================================================================
def _a1111_txt2img(server: Server, **changes) -> requests.Response:
    body = copy.deepcopy(PAYLOADS["txt2img"])
    body.update(changes)
    return requests.post(server("/sdapi/v1/txt2img"), json=body, timeout=TIMEOUT)


def _a1111_img2img(server: Server, **changes) -> requests.Response:
    body = copy.deepcopy(PAYLOADS["img2img"])
    body["init_images"] = [data_url(init_image())]  # conftest.py: file_to_base64 -> "data:image/png;base64,..."
    body.update(changes)
    return requests.post(server("/sdapi/v1/img2img"), json=body, timeout=TIMEOUT)


# test/test_txt2img.py: simple, negative prompt, complex prompt, not square, hires fix, tiling, restore faces,
# the vanilla samplers, n_iter 2, batch_size 2 -- every one must answer 200
@pytest.mark.parametrize(
    ("changes", "n", "size"),
    [
        ({}, 1, (64, 64)),
        ({"negative_prompt": "example negative prompt"}, 1, (64, 64)),
        ({"prompt": PAYLOADS["txt2img_complex_prompt"]}, 1, (64, 64)),
        ({"height": 128}, 1, (64, 128)),
        ({"enable_hr": True}, 1, (128, 128)),  # A1111's defaults: hr_scale 2, latent upscaler
        ({"tiling": True}, 1, (64, 64)),
        ({"restore_faces": True}, 1, (64, 64)),
        *[({"sampler_index": s}, 1, (64, 64)) for s in PAYLOADS["txt2img_vanilla_samplers"]],
        ({"n_iter": 2}, 2, (64, 64)),
        ({"batch_size": 2}, 2, (64, 64)),
    ],
)
def test_a1111_own_txt2img_tests(server, changes, n, size):
    r = _a1111_txt2img(server, **changes)
    assert r.status_code == 200, r.text[:2000]
    body = r.json()
    # with several images A1111 puts the batch grid first (its return_grid option, on by default)
    assert len(body["images"]) in (n, n + 1) if n > 1 else len(body["images"]) == 1
    assert all(decoded(b).size == size for b in body["images"][-n:])
    # the echo is A1111's: the sent values, A1111's declared types
    assert body["parameters"]["seed_resize_from_h"] == -1 and body["parameters"]["subseed_strength"] == 0


# test/test_img2img.py: simple, masked, inverted mask, SD upscale script
@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"mask": "mask"},
        {"mask": "mask", "inpainting_mask_invert": True},
        PAYLOADS["img2img_sd_upscale"],
    ],
    ids=["simple", "masked", "inverted", "sd_upscale"],
)
def test_a1111_own_img2img_tests(server, changes):
    changes = dict(changes)
    if changes.get("mask") == "mask":
        changes["mask"] = data_url(mask_image())
    r = _a1111_img2img(server, **changes)
    assert r.status_code == 200, r.text[:2000]
    assert r.json()["images"] and r.json()["parameters"]["init_images"] is None


# test/test_extras.py: upscaling, "png info" and "interrogate" (both posted to extra-single-image)
@pytest.mark.parametrize("name", ["extras_upscaling", "extras_png_info", "extras_interrogate"])
def test_a1111_own_extras_tests(server, name):
    payload = dict(PAYLOADS[name])
    payload["image"] = data_url(init_image())
    r = requests.post(server("/sdapi/v1/extra-single-image"), json=payload, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["image"], str) and isinstance(r.json()["html_info"], str)


# test/test_utils.py: options write (send_seed) and the GET lists
def test_a1111_own_utils_tests(server):
    url_options = server("/sdapi/v1/options")
    response = requests.get(url_options, timeout=TIMEOUT)
    assert response.status_code == 200
    pre_value = response.json()["send_seed"]
    assert requests.post(url_options, json={"send_seed": (not pre_value)}, timeout=TIMEOUT).status_code == 200
    response = requests.get(url_options, timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.json()["send_seed"] == (not pre_value)
    requests.post(url_options, json={"send_seed": pre_value}, timeout=TIMEOUT)
    for url in PAYLOADS["utils_get_urls"]:
        assert requests.get(server(url), timeout=TIMEOUT).status_code == 200, url


# =========================================================================================================
# Other public clients
# =========================================================================================================
# mix1009/sdwebuiapi, webuiapi/webuiapi.py: WebUIApi(sampler="Euler a", steps=20) then txt2img(), img2img() with
# mask_image, extra_single_image(), png_info(), util_set_model(), util_wait_for_ready(), interrupt(), skip()
def test_webuiapi(server):
    s = requests.Session()
    scripts = s.get(server("/sdapi/v1/scripts")).json()  # check_extensions() at construction
    assert isinstance(scripts["txt2img"], list) and "controlnet m2m" not in scripts["txt2img"]
    payload = {
        "enable_hr": False,
        "hr_scale": 2,
        "hr_upscaler": "Latent",
        "hr_second_pass_steps": 0,
        "hr_resize_x": 0,
        "hr_resize_y": 0,
        "denoising_strength": 0.7,
        "firstphase_width": 0,
        "firstphase_height": 0,
        "prompt": "a cat",
        "styles": [],
        "seed": 7,
        "subseed": -1,
        "subseed_strength": 0.0,
        "seed_resize_from_h": 0,
        "seed_resize_from_w": 0,
        "batch_size": 1,
        "n_iter": 1,
        "steps": 2,  # the caller's steps (library default 20)
        "cfg_scale": 7.0,
        "width": SIZE,  # the caller's size (library default 512)
        "height": SIZE,
        "restore_faces": False,
        "tiling": False,
        "do_not_save_samples": False,
        "do_not_save_grid": False,
        "negative_prompt": "",
        "eta": 1.0,
        "s_churn": 0,
        "s_tmax": 0,
        "s_tmin": 0,
        "s_noise": 1,
        "override_settings": {},
        "override_settings_restore_afterwards": True,
        "sampler_name": "Euler a",
        "sampler_index": "Euler a",
        "script_name": None,
        "script_args": [],
        "send_images": True,
        "save_images": False,
        "alwayson_scripts": {},
    }
    body = generation_ok(s.post(url=server("/sdapi/v1/txt2img"), json=payload))
    info = json.loads(body["info"])  # _to_api_result: json.loads(r["info"]), r["parameters"]
    assert info["seed"] == 7 and body["parameters"]["prompt"] == "a cat"
    img2img = {
        "init_images": [data_url(init_image())],
        "resize_mode": 0,
        "denoising_strength": 0.75,
        "mask_blur": 4,
        "inpainting_fill": 0,
        "inpaint_full_res": True,
        "inpaint_full_res_padding": 0,
        "inpainting_mask_invert": 0,
        "initial_noise_multiplier": 1,
        "prompt": "a cat",
        "styles": [],
        "seed": -1,
        "subseed": -1,
        "subseed_strength": 0,
        "seed_resize_from_h": 0,
        "seed_resize_from_w": 0,
        "batch_size": 1,
        "n_iter": 1,
        "steps": 2,
        "cfg_scale": 7.0,
        "image_cfg_scale": 1.5,
        "width": SIZE,
        "height": SIZE,
        "restore_faces": False,
        "tiling": False,
        "do_not_save_samples": False,
        "do_not_save_grid": False,
        "negative_prompt": "",
        "eta": 1.0,
        "s_churn": 0,
        "s_tmax": 0,
        "s_tmin": 0,
        "s_noise": 1,
        "override_settings": {},
        "override_settings_restore_afterwards": True,
        "sampler_name": "Euler a",
        "sampler_index": "Euler a",
        "include_init_images": False,
        "script_name": None,
        "script_args": [],
        "send_images": True,
        "save_images": False,
        "alwayson_scripts": {},
        "mask": data_url(mask_image()),
    }
    generation_ok(s.post(url=server("/sdapi/v1/img2img"), json=img2img))
    extra = {
        "resize_mode": 0,
        "show_extras_results": True,
        "gfpgan_visibility": 0,
        "codeformer_visibility": 0,
        "codeformer_weight": 0,
        "upscaling_resize": 2,
        "upscaling_resize_w": 512,
        "upscaling_resize_h": 512,
        "upscaling_crop": True,
        "upscaler_1": "Lanczos",
        "upscaler_2": "None",
        "extras_upscaler_2_visibility": 0,
        "upscale_first": False,
        "image": data_url(init_image()),
    }
    r = s.post(url=server("/sdapi/v1/extra-single-image"), json=extra)
    assert r.status_code == 200 and decoded(r.json()["image"]).size == (2 * SIZE, 2 * SIZE)
    assert isinstance(r.json()["html_info"], str)
    r = s.post(url=server("/sdapi/v1/png-info"), json={"image": data_url(decoded(body["images"][0]))})
    assert r.status_code == 200 and isinstance(r.json()["info"], str)
    # util_set_model / util_get_current_model / util_wait_for_ready
    models = sorted(m["title"] for m in s.get(url=server("/sdapi/v1/sd-models")).json())
    assert s.post(url=server("/sdapi/v1/options"), json={"sd_model_checkpoint": models[0]}).status_code == 200
    assert s.get(url=server("/sdapi/v1/options")).json()["sd_model_checkpoint"] == models[0]
    progress = s.get(url=server("/sdapi/v1/progress")).json()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
    assert s.post(url=server("/sdapi/v1/interrupt")).json() is not None  # response.json()
    assert s.post(url=server("/sdapi/v1/skip")).json() is not None
    s.post(url=server("/sdapi/v1/refresh-checkpoints")).json()
    for path in ("cmd-flags", "samplers", "sd-vae", "upscalers", "latent-upscale-modes", "loras", "hypernetworks"):
        s.get(url=server(f"/sdapi/v1/{path}")).json()
    for path in ("face-restorers", "realesrgan-models", "prompt-styles", "embeddings", "memory"):
        s.get(url=server(f"/sdapi/v1/{path}")).json()


# Kilvoctu/aiyabot, core/stablecog.py: dream(): /login, options (model), txt2img with styles ["None"] and
# denoising_strength None, then png-info of every image; img2img when an init image is given
def test_aiyabot(server):
    s = requests.Session()
    s.post(server("/login"))  # the bot posts /login and ignores the answer
    assert s.post(url=server("/sdapi/v1/options"), json={"sd_model_checkpoint": titles(server)[0]}).ok
    payload = {
        "prompt": "a dog",
        "negative_prompt": "",
        "steps": 2,
        "width": SIZE,
        "height": SIZE,
        "cfg_scale": 7.0,
        "sampler_index": "Euler a",
        "seed": 1234,
        "seed_resize_from_h": 0,
        "seed_resize_from_w": 0,
        "denoising_strength": None,
        "n_iter": 1,
        "styles": ["None"],
        "override_settings": {"CLIP_stop_at_last_layers": 1},
    }
    response_data = generation_ok(s.post(url=server("/sdapi/v1/txt2img"), json=payload))
    for image_base64 in response_data["images"]:
        Image.open(io.BytesIO(base64.b64decode(image_base64.split(",", 1)[0])))
        png = s.post(url=server("/sdapi/v1/png-info"), json={"image": "data:image/png;base64," + image_base64})
        assert isinstance(png.json().get("info"), str) and "Seed: 1234" in png.json()["info"]
    payload.update({"init_images": ["data:image/png;base64," + png_b64(init_image())], "denoising_strength": 0.5})
    generation_ok(s.post(url=server("/sdapi/v1/img2img"), json=payload))


# ArtBIT/stable-gimpfusion, stable_gimpfusion.py: ApiClient posts json.dumps(data) with urllib to "<endpoint>?"
# (empty query) and Content-Type/Accept JSON; inpainting() sends width/height as floats (roundToMultiple);
# ResponseLayers reads info["infotexts"] and info["all_seeds"]
def test_stable_gimpfusion(server):
    def post(endpoint, data):
        url = server(endpoint) + "?" + urllib.parse.urlencode({})
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        request = urllib.request.Request(url=url, data=json.dumps(data).encode(), headers=headers)
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return json.loads(response.read())

    def get(endpoint):
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        request = urllib.request.Request(url=server(endpoint) + "?", headers=headers)
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return json.loads(response.read())

    options = get("/sdapi/v1/options")
    assert isinstance(options.get("sd_model_checkpoint"), str)
    assert all(isinstance(t, str) for t in (m["title"] for m in get("/sdapi/v1/sd-models")))
    common = {
        "prompt": "a castle",
        "negative_prompt": "",
        "cfg_scale": 7.5,
        "denoising_strength": 0.8,
        "steps": 2,
        "sampler_index": "Euler a",
        "batch_size": 1,
        "seed": -1,
    }
    layer = png_b64(init_image())  # Layer.toBase64(): a bare base64 PNG
    for endpoint, extra in (
        ("/sdapi/v1/txt2img", {"width": SIZE, "height": SIZE}),
        ("/sdapi/v1/img2img", {"resize_mode": 0, "init_images": [layer], "width": SIZE, "height": SIZE}),
        (
            "/sdapi/v1/img2img",
            {
                "mask": png_b64(mask_image()),
                "inpaint_full_res": True,
                "inpaint_full_res_padding": 10,
                "inpainting_mask_invert": 0,
                "resize_mode": 0,
                "init_images": [layer],
                "width": float(SIZE),
                "height": float(SIZE),
            },
        ),
    ):
        response = post(endpoint, {**common, **extra})
        info = json.loads(response["info"])
        infotexts, seeds = info["infotexts"], info["all_seeds"]
        assert len(seeds) == len(response["images"]) == 1 and isinstance(infotexts[0], str) and is_int(seeds[0])
        assert decoded(response["images"][0]).size == (SIZE, SIZE)


# benrugg/AI-Render, sd_backends/automatic1111_api.py (+ operators.py params): img2img with the add-on's own keys
# (image_similarity, sampler) left in, denoising_strength and sampler_index mapped, Blender's headers;
# handle_success reads images[0]; load_upscaler_models reads each upscaler's name
def test_ai_render_blender(server):
    params = {
        "prompt": "a red house",
        "negative_prompt": "ugly",
        "width": SIZE,
        "height": SIZE,
        "image_similarity": 0.4,
        "seed": 42,
        "cfg_scale": 7,
        "steps": 2,
        "sampler": "LMS",
    }
    params["denoising_strength"] = round(1 - params["image_similarity"], 2)
    params["sampler_index"] = params["sampler"]
    params["init_images"] = ["data:image/png;base64," + png_b64(init_image())]
    headers = {"User-Agent": "Blender/4.1.0", "Accept": "*/*", "Accept-Encoding": "gzip, deflate, br"}
    response = requests.post(server("/sdapi/v1/img2img"), json=params, headers=headers, timeout=TIMEOUT)
    base64_img = generation_ok(response)["images"][0]
    base64.b64decode(base64_img.replace("data:image/png;base64,", ""))
    upscalers = requests.get(server("/sdapi/v1/upscalers"), headers={"Accept": "application/json"}, timeout=5)
    assert all(isinstance(m["name"], str) for m in upscalers.json())


# SillyTavern/SillyTavern, src/endpoints/stable-diffusion.js (+ public/scripts/extensions/stable-diffusion/index.js):
# the server side forwards the browser's body -- including its own "url" and "auth" keys -- with
# Content-Type JSON and an Authorization header; it reads options.sd_model_checkpoint, the names of samplers,
# schedulers, upscalers and latent modes, model titles, VAE model_names, progress while switching models
def test_sillytavern(server):
    auth = {"Authorization": "Basic " + base64.b64encode(b"").decode()}
    options = requests.get(server("/sdapi/v1/options"), headers=auth, timeout=TIMEOUT).json()
    assert isinstance(options["sd_model_checkpoint"], str) and "forge_preset" not in options
    for path, key in (
        ("samplers", "name"),
        ("schedulers", "name"),
        ("upscalers", "name"),
        ("latent-upscale-modes", "name"),
        ("sd-models", "title"),
        ("sd-vae", "model_name"),
    ):
        data = requests.get(server(f"/sdapi/v1/{path}"), headers=auth, timeout=TIMEOUT).json()
        assert isinstance(data, list) and all(isinstance(x[key], str) for x in data), path
    model = requests.get(server("/sdapi/v1/sd-models"), headers=auth, timeout=TIMEOUT).json()[0]["title"]
    r = requests.post(
        server("/sdapi/v1/options"),
        data=json.dumps({"sd_model_checkpoint": model}),
        headers={"Content-Type": "application/json", **auth},
        timeout=TIMEOUT,
    )
    assert r.ok
    progress = requests.get(server("/sdapi/v1/progress"), headers=auth, timeout=TIMEOUT).json()
    assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
    body = {
        "url": server.url,
        "auth": "",
        "prompt": "a knight",
        "negative_prompt": "lowres",
        "sampler_name": "DPM++ 2M",
        "steps": 2,
        "cfg_scale": 7,
        "width": SIZE,
        "height": SIZE,
        "restore_faces": False,
        "enable_hr": False,
        "hr_upscaler": "Latent",
        "hr_scale": 2.0,
        "denoising_strength": 0.7,
        "hr_second_pass_steps": 0,
        "save_images": True,
        "send_images": True,
        "do_not_save_grid": False,
        "do_not_save_samples": False,
    }
    r = requests.post(
        server("/sdapi/v1/txt2img"),
        data=json.dumps(body),
        headers={"Content-Type": "application/json", **auth},
        timeout=TIMEOUT,
    )
    assert isinstance(generation_ok(r)["images"][0], str)


# open-webui/open-webui, backend/open_webui/routers/images.py: txt2img with {prompt, batch_size, width, height,
# steps, negative_prompt} and an "authorization" header that is empty without API auth; it reads images and
# info; set_image_model posts options; the model list reads title and model_name
def test_open_webui(server):
    models = requests.get(server("/sdapi/v1/sd-models"), headers={"authorization": ""}, timeout=TIMEOUT).json()
    assert all(isinstance(m["title"], str) and isinstance(m["model_name"], str) for m in models)
    r = requests.post(server("/sdapi/v1/options"), json={"sd_model_checkpoint": models[0]["title"]}, timeout=TIMEOUT)
    assert r.ok
    data = {"prompt": "a boat", "batch_size": 1, "width": SIZE, "height": SIZE, "steps": 2, "negative_prompt": ""}
    res = requests.post(server("/sdapi/v1/txt2img"), json=data, headers={"authorization": ""}, timeout=TIMEOUT)
    body = generation_ok(res)
    assert isinstance(body["info"], str) and body["images"]


# oobabooga/text-generation-webui, extensions/sd_api_pictures/script.py: get_SD_pictures() sends hr_scale as the
# string '1.0' and hr_upscaler 'ESRGAN_4x' with enable_hr False; give_VRAM_priority() posts json='' to
# unload-checkpoint/reload-checkpoint and calls raise_for_status(); get_checkpoints() reads sd_model_checkpoint
# and the titles; get_samplers() reads the names
def test_text_generation_webui_sd_api_pictures(server):
    response = requests.post(url=server("/sdapi/v1/unload-checkpoint"), json="", timeout=TIMEOUT)
    response.raise_for_status()
    response = requests.post(url=server("/sdapi/v1/reload-checkpoint"), json="", timeout=TIMEOUT)
    response.raise_for_status()
    payload = {
        "prompt": "(Masterpiece:1.1), detailed, intricate, colorful" + "(a fox in the snow:1)",
        "seed": -1,
        "sampler_name": "DPM++ 2M",
        "enable_hr": False,
        "hr_scale": "1.0",
        "hr_upscaler": "ESRGAN_4x",
        "denoising_strength": 0.61,
        "steps": 2,  # params['steps'] is 32
        "cfg_scale": 7,
        "width": SIZE,  # params['width'] is 512
        "height": SIZE,
        "restore_faces": False,
        "override_settings_restore_afterwards": True,
        "negative_prompt": "(worst quality, low quality:1.3)",
    }
    response = requests.post(url=server("/sdapi/v1/txt2img"), json=payload, timeout=TIMEOUT)
    response.raise_for_status()
    for img_str in response.json()["images"]:
        Image.open(io.BytesIO(base64.b64decode(img_str.split(",", 1)[0]))).thumbnail((300, 300))
    models = requests.get(url=server("/sdapi/v1/sd-models"), timeout=TIMEOUT)
    options = requests.get(url=server("/sdapi/v1/options"), timeout=TIMEOUT)
    assert isinstance(options.json()["sd_model_checkpoint"], str)
    assert [result["title"] for result in models.json()]
    assert [x["name"] for x in requests.get(url=server("/sdapi/v1/samplers"), timeout=TIMEOUT).json()]


# danny-avila/LibreChat, api/app/clients/tools/structured/StableDiffusion.js: axios posts {prompt, negative_prompt,
# cfg_scale 4.5, steps 22, width 1024, height 1024} (scaled down here); it reads images[0] and from info:
# height, width, seed and infotexts[0] (its last line)
def test_librechat(server):
    payload = {"prompt": "a lighthouse", "negative_prompt": "blurry", "cfg_scale": 4.5, "steps": 2}
    payload.update(width=SIZE, height=SIZE)
    body = generation_ok(requests.post(server("/sdapi/v1/txt2img"), json=payload, timeout=TIMEOUT))
    Image.open(io.BytesIO(base64.b64decode(body["images"][0].split(",", 1)[0])))
    info = json.loads(body["info"])
    assert info["height"] == SIZE and info["width"] == SIZE and is_int(info["seed"])
    assert info["infotexts"][0].split("\n").pop().startswith("Steps: 2")


# langgenius/dify, api/core/tools/provider/builtin/stablediffusion/tools/stable_diffusion.py: posts
# data=json.dumps(...) with no Content-Type, both to options and to txt2img/img2img (DRAW_TEXT_OPTIONS:
# sampler_index 'DPM++ SDE Karras', s_noise 0, refiner_switch_at 0, ...); img2img sends script_args without a
# script_name; the model list reads model_name; it reads images[0]
def test_dify(server):
    models = [d["model_name"] for d in requests.get(server("/sdapi/v1/sd-models"), timeout=10).json()]
    response = requests.post(server("/sdapi/v1/options"), data=json.dumps({"sd_model_checkpoint": models[0]}))
    assert response.status_code == 200, response.text
    draw_options = {
        "prompt": "",
        "negative_prompt": "",
        "seed": -1,
        "subseed": -1,
        "subseed_strength": 0,
        "seed_resize_from_h": -1,
        "sampler_index": "DPM++ SDE Karras",
        "seed_resize_from_w": -1,
        "batch_size": 1,
        "n_iter": 1,
        "steps": 10,
        "cfg_scale": 7,
        "width": 1024,
        "height": 1024,
        "restore_faces": False,
        "do_not_save_samples": False,
        "do_not_save_grid": False,
        "eta": 0,
        "denoising_strength": 0,
        "s_min_uncond": 0,
        "s_churn": 0,
        "s_tmax": 0,
        "s_tmin": 0,
        "s_noise": 0,
        "override_settings": {},
        "override_settings_restore_afterwards": True,
        "refiner_switch_at": 0,
        "disable_extra_networks": False,
        "comments": {},
        "enable_hr": False,
        "firstphase_width": 0,
        "firstphase_height": 0,
        "hr_scale": 2,
        "hr_second_pass_steps": 0,
        "hr_resize_x": 0,
        "hr_resize_y": 0,
        "hr_prompt": "",
        "hr_negative_prompt": "",
        "script_args": [],
        "send_images": True,
        "save_images": False,
        "alwayson_scripts": {},
    }
    draw_options.update(prompt="a tree", width=SIZE, height=SIZE, steps=1, negative_prompt="")
    draw_options["override_settings"]["sd_model_checkpoint"] = models[0]
    response = requests.post(server("/sdapi/v1/txt2img"), data=json.dumps(draw_options), timeout=TIMEOUT)
    base64.b64decode(generation_ok(response)["images"][0])
    img2img = {
        "init_images": [png_b64(init_image())],
        "prompt": "a tree",
        "negative_prompt": "",
        "denoising_strength": 0.9,
        "width": SIZE,
        "height": SIZE,
        "cfg_scale": 7,
        "sampler_name": "Euler a",
        "restore_faces": False,
        "steps": 1,
        "script_args": ["outpainting mk2"],
        "override_settings": {"sd_model_checkpoint": models[0]},
    }
    response = requests.post(server("/sdapi/v1/img2img"), data=json.dumps(img2img), timeout=TIMEOUT)
    base64.b64decode(generation_ok(response)["images"][0])


# rexleimo/stable-diffusion-sdk, sdapi/payload/sd_params.go + sdapi/handle/text_2_imgapi.go (Go): resty
# marshals the whole SDParams struct -- Go zero values included: sampler_name "", eta 0, integer cfg_scale,
# denoising_strength 7 with hires off, alwayson_scripts null -- and decodes {images []string, info string}
def test_go_stable_diffusion_sdk(server):
    params = {
        "sampler_name": "",
        "prompt": "a bridge,masterpiece",
        "negative_prompt": "lowres,",
        "seed": -1,
        "width": SIZE,
        "height": SIZE,
        "cfg_scale": 7,
        "steps": 2,
        "restore_faces": False,
        "tiling": False,
        "eta": 0,
        "denoising_strength": 7,
        "sampler_index": "Euler",
        "batch_size": 1,
        "override_settings": {"sd_model_checkpoint": titles(server)[0]},
        "alwayson_scripts": None,
    }
    r = requests.post(
        server("/sdapi/v1/txt2img"), data=json.dumps(params), headers={"Content-Type": "application/json"}
    )
    body = generation_ok(r)
    check_typed(body, {"images": "vec_str", "info": "str"}, optional=False, where="SDResponse")


# SpenserCai/sd-webui-go, stablediffusion/models/stable_diffusion_processing_txt2_img.go (go-swagger): fields
# are omitempty except "styles" and "script_args", which a Go caller leaves nil and so sends as null;
# intersvc/sdapi_v1_txt2img_model.go decodes {images []string, info string}
def test_go_sd_webui_go(server):
    request = {
        "batch_size": 1,
        "cfg_scale": 7.0,
        "height": SIZE,
        "n_iter": 1,
        "negative_prompt": "bad",
        "prompt": "a mountain",
        "sampler_index": "Euler a",
        "script_args": None,
        "seed": -1,
        "steps": 2,
        "styles": None,
        "width": SIZE,
    }
    body = generation_ok(requests.post(server("/sdapi/v1/txt2img"), json=request, timeout=TIMEOUT))
    check_typed(body, {"images": "vec_str", "info": "str"}, optional=False, where="SdapiV1Txt2imgResponse")


# capslock/stable-diffusion-bot, crates/stable-diffusion-api/src/txt2img.rs + src/lib.rs (Rust): serde skips
# unset fields; the response decodes into ImgResponse<Txt2ImgRequest> (typed parameters: subseed_strength
# Option<u32>, eta Option<u32>, ...) and info() into ImgInfo (typed, subseed_strength u32 among them)
RUST_TXT2IMG_REQUEST = {
    "enable_hr": "bool",
    "denoising_strength": "f64",
    "firstphase_width": "u32",
    "firstphase_height": "u32",
    "hr_scale": "f64",
    "hr_upscaler": "str",
    "hr_second_pass_steps": "u32",
    "hr_resize_x": "u32",
    "hr_resize_y": "u32",
    "prompt": "str",
    "styles": "vec_str",
    "seed": "i64",
    "subseed": "i64",
    "subseed_strength": "u32",
    "seed_resize_from_h": "i32",
    "seed_resize_from_w": "i32",
    "sampler_name": "str",
    "batch_size": "u32",
    "n_iter": "u32",
    "steps": "u32",
    "cfg_scale": "f64",
    "width": "u32",
    "height": "u32",
    "restore_faces": "bool",
    "tiling": "bool",
    "do_not_save_samples": "bool",
    "do_not_save_grid": "bool",
    "negative_prompt": "str",
    "eta": "u32",
    "s_churn": "f64",
    "s_tmax": "f64",
    "s_tmin": "f64",
    "s_noise": "f64",
    "override_settings": "map",
    "override_settings_restore_afterwards": "bool",
    "script_args": "vec",
    "sampler_index": "str",
    "script_name": "str",
    "send_images": "bool",
    "save_images": "bool",
    "alwayson_scripts": "map",
}
RUST_IMG_INFO = {
    "prompt": "str",
    "all_prompts": "vec_str",
    "negative_prompt": "str",
    "all_negative_prompts": "vec_str",
    "seed": "i64",
    "all_seeds": "vec_i64",
    "subseed": "i64",
    "all_subseeds": "vec_i64",
    "subseed_strength": "u32",
    "width": "i32",
    "height": "i32",
    "sampler_name": "str",
    "cfg_scale": "f64",
    "steps": "u32",
    "batch_size": "u32",
    "restore_faces": "bool",
    "face_restoration_model": "any",
    "sd_model_name": "str",
    "sd_model_hash": "str",
    "sd_vae_name": "str",
    "sd_vae_hash": "str",
    "seed_resize_from_w": "i32",
    "seed_resize_from_h": "i32",
    "denoising_strength": "f64",
    "extra_generation_params": "map",
    "index_of_first_image": "u32",
    "infotexts": "vec_str",
    "styles": "vec_str",
    "job_timestamp": "str",
    "clip_skip": "u32",
    "is_using_inpainting_conditioning": "bool",
}


def test_rust_stable_diffusion_api(server):
    request = {"prompt": "a watercolor of a corgi wearing a tophat", "steps": 2, "width": SIZE, "height": SIZE}
    request.update(seed=-1, negative_prompt="", sampler_name="Euler a", batch_size=1, n_iter=1, cfg_scale=7.0)
    body = generation_ok(requests.post(server("/sdapi/v1/txt2img"), json=request, timeout=TIMEOUT))
    check_typed(body["parameters"], RUST_TXT2IMG_REQUEST, optional=True, where="parameters: Txt2ImgRequest")
    info = json.loads(body["info"])
    check_typed(info, RUST_IMG_INFO, optional=True, where="ImgInfo")
    extra = info.get("extra_generation_params") or {}
    check_typed(extra, {"Lora hashes": "str", "TI hashes": "str"}, optional=True, where="ExtraGenParams")
    assert body["parameters"]["subseed_strength"] == 0 and is_int(info["subseed_strength"])


# hollowstrawberry/bz-cogs, aimage/apis/a1111.py (Discord Red bot): update_autocomplete_cache() reads scripts
# (txt2img list), loras (name), sd-models and sd-modules (model_name; a 404 is skipped), samplers, prompt-styles
# and schedulers (name); _generate_payload() sends override_settings {sd_model_checkpoint, sd_vae} and the
# "Never OOM Integrated" alwayson args; _post_image_gen reads images[0] and info: infotexts[0],
# extra_generation_params
def test_bz_cogs_aimage(server):
    mapping = {"scripts": None, "loras": "name", "sd-models": "model_name", "sd-modules": "model_name"}
    mapping.update({"samplers": "name", "prompt-styles": "name", "schedulers": "name", "upscalers": "name"})
    for page, key in mapping.items():
        response = requests.get(server(f"/sdapi/v1/{page}"), timeout=TIMEOUT)
        if page == "sd-modules":
            continue  # Forge only; the cog logs a warning and goes on
        data = response.json()
        if page == "scripts":
            assert isinstance(data["txt2img"], list)
        else:
            assert all(isinstance(choice[key], str) for choice in data), page
    models = [m["model_name"] for m in requests.get(server("/sdapi/v1/sd-models"), timeout=TIMEOUT).json()]
    payload = {
        "prompt": "a lake ",
        "negative_prompt": "(worst quality, low quality:1.4)",
        "styles": [],
        "cfg_scale": 7,
        "steps": 2,
        "seed": -1,
        "subseed": -1,
        "subseed_strength": 0.0,
        "sampler_name": "Euler a",
        "scheduler": "Automatic",
        "override_settings": {"sd_model_checkpoint": models[0], "sd_vae": "Automatic"},
        "width": SIZE,
        "height": SIZE,
        "alwayson_scripts": {"Never OOM Integrated": {"args": [False, True, 960, 64]}},
    }
    r = generation_ok(requests.post(server("/sdapi/v1/txt2img"), json=payload, timeout=TIMEOUT))
    base64.b64decode(r["images"][0])
    info = json.loads(r["info"])
    assert isinstance(info.get("infotexts")[0], str)
    assert isinstance(info.get("extra_generation_params", {}).get("nsfw", []), list | str | bool)


# Neverland-XFX/Astrbot_Plugin_SDWebuiApi, main.py (QQ/Telegram bot on AstrBot): httpx posts txt2img with
# sampler_index and, with hires fix on, hr_second_pass_steps int(steps / 2); img2img with bare base64;
# extra-single-image with resize_mode 0; resource lists read model_name / name / loaded
def test_astrbot_sdwebuiapi(server):
    import httpx

    with httpx.Client(timeout=TIMEOUT) as cli:
        assert [m["model_name"] for m in cli.get(server("/sdapi/v1/sd-models")).json()]
        assert [m["name"] for m in cli.get(server("/sdapi/v1/samplers")).json()]
        assert [m["name"] for m in cli.get(server("/sdapi/v1/upscalers")).json()]
        assert isinstance([m["name"] for m in cli.get(server("/sdapi/v1/loras")).json()], list)
        assert isinstance(list(cli.get(server("/sdapi/v1/embeddings")).json().get("loaded", {}).keys()), list)
        payload = {
            "prompt": "a robot",
            "negative_prompt": "",
            "steps": 2,
            "cfg_scale": 7.0,
            "sampler_index": "Euler a",
            "width": SIZE,
            "height": SIZE,
            "batch_size": 1,
            "n_iter": 1,
            "seed": -1,
        }
        hires = {**payload, "enable_hr": True, "hr_scale": 2.0, "hr_upscaler": "Latent"}
        hires["hr_second_pass_steps"] = int(hires["steps"] / 2)
        for body, size in ((payload, SIZE), (hires, 2 * SIZE)):
            resp = cli.post(server("/sdapi/v1/txt2img"), json=body)
            resp.raise_for_status()
            images = resp.json().get("images", [])
            assert images and decoded(images[0]).size == (size, size)
        i2i = {**payload, "init_images": [base64.b64encode(base64.b64decode(png_b64(init_image()))).decode()]}
        resp = cli.post(server("/sdapi/v1/img2img"), json=i2i)
        resp.raise_for_status()
        assert resp.json().get("images", [])
        up = {
            "image": png_b64(init_image()),
            "upscaling_resize": 2.0,
            "upscaler_1": "Lanczos",
            "resize_mode": 0,
            "show_extras_results": True,
        }
        resp = cli.post(server("/sdapi/v1/extra-single-image"), json=up)
        resp.raise_for_status()
        assert decoded(resp.json().get("image", "")).size == (2 * SIZE, 2 * SIZE)


# p1atdev/stable-journey-bot, auto1111.ts + types/txt2img.ts (Deno Discord bot): imagine() starts from
# defaultTxt2ImgOptions (sampler_index "", eta 0, s_tmax 0, override_settings_restore_afterwards false, ...)
# and fetch()es it as JSON; switchModel() parses the options POST answer as JSON; it reads images, parameters
# and info
def test_stable_journey_bot(server):
    r = requests.post(
        server("/sdapi/v1/options"),
        data=json.dumps({"sd_model_checkpoint": titles(server)[0]}),
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    r.json()  # `const data: SDAPIOptions = await res.json()`
    req_body = {
        "enable_hr": False,
        "denoising_strength": 0.0,
        "firstphase_width": 0,
        "firstphase_height": 0,
        "prompt": "a fox",
        "styles": [],
        "seed": 99,
        "subseed": -1,
        "subseed_strength": 0,
        "seed_resize_from_h": -1,
        "seed_resize_from_w": -1,
        "sampler_name": "Euler a",
        "batch_size": 1,
        "n_iter": 1,
        "steps": 2,
        "cfg_scale": 7,
        "width": SIZE,
        "height": SIZE,
        "restore_faces": False,
        "tiling": False,
        "negative_prompt": "",
        "eta": 0,
        "s_churn": 0,
        "s_tmax": 0,
        "s_tmin": 0,
        "s_noise": 1,
        "override_settings": {},
        "override_settings_restore_afterwards": False,
        "sampler_index": "",
    }
    r = requests.post(
        server("/sdapi/v1/txt2img"),
        data=json.dumps(req_body),
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    body = generation_ok(r)
    assert json.loads(body["info"])["seed"] == 99 and body["parameters"]["sampler_name"] == "Euler a"


# =========================================================================================================
# What many clients do that A1111 accepts (the list), each checked once on its own
# =========================================================================================================
def test_json_body_without_or_with_another_content_type(server):
    """`requests.post(url, data=json.dumps(payload))` sends no Content-Type; others send text/plain or
    form-urlencoded with a JSON body. All are read as JSON; a body that is not JSON still gets a 422."""
    body = json.dumps({"prompt": "x", "steps": 1, "width": SIZE, "height": SIZE, "seed": 5})
    for headers in ({}, {"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}):
        r = requests.post(server("/sdapi/v1/txt2img"), data=body, headers=headers, timeout=TIMEOUT)
        assert json.loads(generation_ok(r)["info"])["seed"] == 5, headers
    r = requests.post(
        server("/sdapi/v1/txt2img"),
        data="prompt=x&steps=1",
        timeout=TIMEOUT,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 422


def test_liberal_values_mean_what_they_mean_in_a1111(server):
    """String numbers and booleans, a float for an integer, unknown keys, null, unknown styles, -1 seed
    resize, hires fields with hires off, a size that is not a multiple of 8 (rounded down)."""
    body = {
        "prompt": "a bird",
        "steps": "2",
        "cfg_scale": "7.5",
        "seed": "11",
        "width": 70,
        "height": 64.9,
        "enable_hr": "false",
        "hr_scale": 0,
        "hr_resize_x": -5,
        "denoising_strength": 3,
        "restore_faces": "False",
        "seed_resize_from_h": -1,
        "seed_resize_from_w": -1,
        "styles": ["None", "", "string", "sunny"],
        "eta": None,
        "some_client_key": {"x": 1},
        "negative_prompt": None,
    }
    r = requests.post(server("/sdapi/v1/txt2img"), json=body, timeout=TIMEOUT)
    out = generation_ok(r)
    info = json.loads(out["info"])
    assert info["seed"] == 11 and info["steps"] == 2 and (info["width"], info["height"]) == (64, 64)
    assert "in the sun" in info["infotexts"][0]  # the one known style applied, the others skipped
    assert out["parameters"]["width"] == 70  # echoed as sent, like A1111
    # img2img: a denoising strength above 1 is a full denoise (A1111 runs min(strength, 0.999) of the steps);
    # a mask of another size is stretched onto the image, as A1111 resizes both
    i2i = {"init_images": [png_b64(init_image())], "mask": png_b64(mask_image(32)), "denoising_strength": 1.5}
    i2i.update(steps=1, width=SIZE, height=SIZE)
    info = json.loads(generation_ok(requests.post(server("/sdapi/v1/img2img"), json=i2i, timeout=TIMEOUT))["info"])
    assert "Denoising strength: 1," in info["infotexts"][0]


def test_parameters_echo_a1111_defaults_and_types(server):
    out = generation_ok(
        requests.post(
            server("/sdapi/v1/txt2img"), json={"prompt": "p", "steps": 1, "width": 64, "height": 64}, timeout=TIMEOUT
        )
    )
    p = out["parameters"]
    assert p["subseed_strength"] == 0 and is_int(p["subseed_strength"])
    assert p["seed"] == -1 and p["subseed"] == -1 and p["seed_resize_from_h"] == -1
    assert p["sampler_index"] == "Euler" and p["sampler_name"] is None and p["styles"] is None
    assert p["denoising_strength"] == 0.75 and p["hr_scale"] == 2.0 and p["eta"] is None
    assert "model" not in p and "clip_skip" not in p  # only A1111's keys unless sent
    info = json.loads(out["info"])
    assert info["sampler_name"] == "Euler"  # A1111's default sampler when none is named
    i2i = {"init_images": [png_b64(init_image())], "steps": 1, "width": 64, "height": 64, "inpainting_fill": 1}
    p = generation_ok(requests.post(server("/sdapi/v1/img2img"), json=i2i, timeout=TIMEOUT))["parameters"]
    assert p["resize_mode"] == 0 and p["inpainting_fill"] == 1 and p["inpainting_mask_invert"] == 0
    assert p["inpaint_full_res"] is True and p["mask_blur_x"] == 4 and p["init_images"] is None


# Stability-AI/StableStudio, packages/stablestudio-plugin-webui/src/Utilities.ts (+ index.ts): constructPayload()
# sends its own camelCase cfgScale (unknown to A1111) next to sampler_name/sampler_index, bare base64 from a
# data URL, inpainting_mask_invert 1 / inpainting_fill 1; setOptions() parses the options POST as JSON;
# getImageInfo() splits png-info's info into lines and each detail of the last line at ":"
def test_stablestudio_webui_plugin(server):
    headers = {"Content-Type": "application/json"}
    options = requests.get(server("/sdapi/v1/options"), headers=headers, timeout=TIMEOUT).json()
    assert isinstance(options, dict)
    for path in ("embeddings", "hypernetworks", "loras"):
        requests.get(server(f"/sdapi/v1/{path}"), headers=headers, timeout=TIMEOUT).json()
    body = json.dumps({"sd_model_checkpoint": options["sd_model_checkpoint"]})
    requests.post(server("/sdapi/v1/options"), data=body, headers=headers, timeout=TIMEOUT).json()
    data = {"seed": -1, "cfgScale": 7, "width": SIZE, "height": SIZE, "sampler_name": "Euler a"}
    data.update(sampler_index="Euler a", prompt="a cabin", negative_prompt="fog", steps=2, batch_size=1)
    data.update(save_images=True, denoising_strength=1 - 0.35)
    data["init_images"] = [data_url(init_image()).split(",")[1]]
    data["mask"] = data_url(mask_image()).split(",")[1]
    data.update(inpainting_mask_invert=1, inpainting_fill=1, inpaint_full_res=False)
    r = requests.post(server("/sdapi/v1/img2img"), data=json.dumps(data), headers=headers, timeout=TIMEOUT)
    image = generation_ok(r)["images"][0]
    r = requests.post(server("/sdapi/v1/png-info"), data=json.dumps({"image": image}), headers=headers)
    info = r.json()["info"].split("\n")
    assert len(info) == 3 and info[1].split(":")[1].strip() == "fog"
    details = {d.strip().split(":")[0]: d.strip().split(":")[1].strip() for d in info[2].split(",")}
    assert details["Steps"] == "2" and details["Sampler"] == "Euler a"
    upscale = {"seed": -1, "cfgScale": 7, "upscaling_resize_w": 128, "upscaling_resize_h": 128}
    upscale.update(upscaler_1="Lanczos", image=data_url(init_image()).split(",")[1])
    r = requests.post(server("/sdapi/v1/extra-single-image"), data=json.dumps(upscale), headers=headers)
    assert r.status_code == 200 and decoded(r.json()["image"]).size == (2 * SIZE, 2 * SIZE)
