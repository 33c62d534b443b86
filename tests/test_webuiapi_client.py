"""The `webuiapi` package (PyPI, github.com/mix1009/sdwebuiapi), the most-used Python client of A1111's API, run
unmodified against a real server: what its users call — txt2img (batch, hires fix with an ESRGAN name we do not
ship), img2img, inpainting, extras, png-info, the list and option helpers, model switching, and the X/Y/Z plot
the way its README shows — must work and return what the package decodes."""

from __future__ import annotations

import json
import shutil

import pytest
import webuiapi
from api_server import running_api_server
from PIL import Image

SIZE = 64


@pytest.fixture(scope="module")
def api(tmp_path_factory, request):
    data = tmp_path_factory.mktemp("webuiapidata")
    (data / "models" / "Stable-diffusion").mkdir(parents=True)

    def prepare():
        tiny = request.getfixturevalue("tiny_models")["sd1"]["diffusers"]
        shutil.copytree(tiny, data / "models" / "Stable-diffusion" / "tiny")

    with running_api_server(data, [], prepare) as (url, _proc, _log):
        host, port = url.removeprefix("http://").split(":")
        yield webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=2)


def _image() -> Image.Image:
    im = Image.new("RGB", (SIZE, SIZE), "white")
    im.paste((200, 30, 30), (16, 16, 48, 48))
    return im


def test_txt2img_batch_and_hires(api):
    r = api.txt2img(prompt="a red circle", width=SIZE, height=SIZE, seed=5, styles=["None"])
    assert r.image.size == (SIZE, SIZE) and r.info["seed"] == 5 and r.parameters["prompt"] == "a red circle"
    r = api.txt2img(prompt="a red circle", width=SIZE, height=SIZE, seed=5, batch_size=2)
    assert len(r.images) == 3 and r.info["index_of_first_image"] == 1  # A1111's grid first, then the images
    r = api.txt2img(
        prompt="a red circle",
        width=SIZE,
        height=SIZE,
        enable_hr=True,
        hr_scale=2,
        hr_upscaler=webuiapi.HiResUpscaler.ESRGAN_4x,  # not installed here: a real upscaler stands in
        denoising_strength=0.5,
    )
    assert r.image.size == (2 * SIZE, 2 * SIZE) and r.info.get("warnings")


def test_img2img_inpaint_extras_and_png_info(api):
    r = api.img2img(images=[_image()], prompt="a blue square", denoising_strength=0.5, width=SIZE, height=SIZE)
    assert r.image.size == (SIZE, SIZE)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    r = api.img2img(images=[_image()], mask_image=mask, inpainting_fill=1, prompt="x", width=SIZE, height=SIZE)
    assert "Mask blur" in r.info["infotexts"][0]
    r = api.extra_single_image(image=_image(), upscaler_1=webuiapi.Upscaler.Lanczos, upscaling_resize=2)
    assert r.image.size == (2 * SIZE, 2 * SIZE)
    r = api.extra_batch_images(images=[_image(), _image()], upscaler_1=webuiapi.Upscaler.Nearest, upscaling_resize=2)
    assert [im.size for im in r.images] == [(2 * SIZE, 2 * SIZE)] * 2
    made = api.txt2img(prompt="a green star", width=SIZE, height=SIZE, seed=7).image
    info = api.png_info(made).info
    assert info.startswith("a green star") and "Seed: 7" in info


def test_lists_options_and_model_switch(api):
    assert "Euler a" in api.util_get_sampler_names()
    assert "karras" in [s["name"] for s in api.get_schedulers()]
    names = api.util_get_model_names()  # titles: "tiny [hash]" once the background hashing has reached it
    assert len(names) == 1 and names[0].startswith("tiny")
    api.util_set_model("tiny")
    assert api.util_get_current_model().startswith("tiny")
    api.set_options({"send_seed": True, "CLIP_stop_at_last_layers": 2})
    options = api.get_options()
    assert options["CLIP_stop_at_last_layers"] == 2 and options["sd_model_checkpoint"].startswith("tiny")
    r = api.txt2img(prompt="x", width=SIZE, height=SIZE)
    assert "Clip skip: 2" in r.info["infotexts"][0]
    api.set_options({"CLIP_stop_at_last_layers": 1})
    for listing in (api.get_sd_models, api.get_upscalers, api.get_prompt_styles, api.get_embeddings, api.get_loras):
        listing()  # each decodes as JSON


def test_xyz_plot_as_its_readme_shows(api):
    # webuiapi's README: script_args = [x type index, x values, y type index, y values, z type, z values,
    # draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, margin_size] with A1111's axis list
    # of that era (1: Seed, 4: Steps)
    script_args = [4, "1,2", 1, "3,4", 0, "", True, True, False, False, 0]
    r = api.txt2img(prompt="x", width=SIZE, height=SIZE, script_name="X/Y/Z Plot", script_args=script_args)
    assert len(r.images) == 5  # the labelled grid, then the 4 cells
    assert r.images[0].size[0] > 2 * SIZE
    texts = r.info["infotexts"][1:]
    assert sorted((("Steps: 1," in t) + 2 * ("Steps: 2," in t), "Seed: 3," in t) for t in texts) == [
        (1, False),
        (1, True),
        (2, False),
        (2, True),
    ]
    assert json.dumps(r.info)  # the info stays plain JSON
