"""A1111's scripts and grids on a tiny random SD1 model: X/Y/Z axis value syntax, the X/Y/Z grid (size,
labels, per-cell infotext), prompt matrix, prompts from file, SD upscale and outpainting mk2 through
`script_name`, the batch grid, and the REST API (`script_name` "x/y/z plot" with A1111-order script_args,
/scripts and /script-info) served in-process."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from ldm_core.config import EngineConfig
from ldm_core.generation_requests import GenerationRequest, Img2ImgRequest, RequestError
from ldm_core.grids import GridOptions, grid_rows, image_grid
from ldm_core.infotext import parse_infotext
from ldm_core.outputs import read_image_info
from ldm_core.scripts import find_script, script_names
from ldm_core.scripts.xyz_plot import AXES, axes_for, find_axis, normalise_args, parse_axis_values, split_values
from ldm_core.service import Service

SIZE = 64


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("scripts")
    sd1 = build_tiny_model("sd1", root / "build")["diffusers"]
    ckpt = root / "data" / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    (ckpt / "tiny-sd1").symlink_to(sd1, target_is_directory=True)
    (ckpt / "tiny-other").symlink_to(sd1, target_is_directory=True)
    cfg = EngineConfig.from_data_dir(root / "data", builtin_model_dir=None, device="cpu", preview_every=0)
    svc = Service(cfg)
    yield svc
    svc.shutdown()


def t2i(**kw) -> GenerationRequest:
    base = dict(prompt="a red circle", steps=1, width=SIZE, height=SIZE, seed=5, save_images=False)
    base.update(kw)
    return GenerationRequest.build(**base)


def run_script(service, request, name, args, grid=None):
    job = service.submit_script(request, name, args, grid=grid)
    job.wait(120)
    if job.error is not None:
        raise job.error
    return job.result


def xyz_args(x_type, x_values, y_type="Nothing", y_values="", z_type="Nothing", z_values="", **flags):
    """A1111's 16 X/Y/Z arguments."""
    return [
        x_type, x_values, [], y_type, y_values, [], z_type, z_values, [],
        flags.get("draw_legend", True), flags.get("include_lone_images", True), flags.get("include_sub_grids", False),
        flags.get("no_fixed_seeds", False), flags.get("margin_size", 0), True, False,
    ]  # fmt: skip


# ---- axis values (no model) ------------------------------------------------------------------------------
def test_axis_value_syntax_follows_a1111():
    steps = find_axis("Steps", "txt2img", "X")
    cfg = find_axis("CFG Scale", "txt2img", "X")
    assert parse_axis_values(steps, "1-5") == [1, 2, 3, 4, 5]
    assert parse_axis_values(steps, "1-10 (+3)") == [1, 4, 7, 10]
    assert parse_axis_values(steps, "10-1 (-4)") == [10, 6, 2]
    assert parse_axis_values(steps, "1-10 [4]") == [1, 4, 7, 10]
    assert parse_axis_values(steps, " 3, 7 ,, 9-10") == [3, 7, 9, 10]
    assert parse_axis_values(cfg, "1-2 (+0.5)") == [1.0, 1.5, 2.0]
    assert parse_axis_values(cfg, "0-1 [3], 7") == [0.0, 0.5, 1.0, 7.0]
    assert split_values('a, "b, c", d') == ["a", "b, c", "d"]
    assert parse_axis_values(find_axis("Prompt S/R", "txt2img", "X"), 'cat, "dog, big"') == ["cat", "dog, big"]
    with pytest.raises(ValueError, match="not an integer"):
        parse_axis_values(steps, "1, two")
    # A1111's indexes: the same axis by index and by label, per tab
    t2i_labels = [a.label for a in axes_for("txt2img")]
    assert t2i_labels[:7] == ["Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "Hires steps", "CFG Scale"]
    assert find_axis(4, "txt2img", "X").label == "Steps" and find_axis(4, "img2img", "X").label == "Steps"
    assert find_axis(5, "img2img", "X").label == "CFG Scale"  # no Hires steps in img2img
    assert find_axis("hires. sampler", "txt2img", "X").label == "Hires sampler"
    assert {"Checkpoint name", "Schedule type", "Denoising", "Clip skip", "Size"} <= {a.label for a in AXES}
    # older layouts index older lists (webuiapi's documented 11-argument one, A1111 1.1-1.5's 14 arguments)
    assert [len(axes_for(m, "v1.0")) for m in ("txt2img", "img2img")] == [21, 21]
    assert [len(axes_for(m, "v1.2")) for m in ("txt2img", "img2img")] == [24, 23]
    assert find_axis(10, "img2img", "X", "v1.0").label == "Checkpoint name"
    assert find_axis(20, "txt2img", "X", "v1.2").label == "VAE" and find_axis(19, "txt2img", "X", "v1.0").label == "VAE"
    assert normalise_args([4, "1,2", 9, "Euler", 0, "", "True", "False", "False", "False", 0])[1] == "v1.0"


def test_batch_grid_layout():
    assert [grid_rows(n) for n in (1, 2, 3, 4, 5, 6, 9, 10)] == [1, 1, 2, 2, 2, 2, 3, 3]
    ims = [Image.new("RGB", (8, 6), (i * 40, 0, 0)) for i in range(5)]
    g = image_grid(ims)
    assert g.size == (3 * 8, 2 * 6)
    assert g.getpixel((8 + 1, 1))[0] == 40 and g.getpixel((8 + 1, 6 + 1))[0] == 160
    assert g.getpixel((16 + 1, 6 + 1)) == (0, 0, 0)  # the empty spot


def test_registry_names_modes_and_unknown_script():
    assert script_names("txt2img") == ["prompt matrix", "prompts from file or textbox", "x/y/z plot"]
    assert "sd upscale" in script_names("img2img") and "outpainting mk2" in script_names("img2img")
    assert find_script("X/Y/Z plot", "txt2img").title == "X/Y/Z plot"
    with pytest.raises(RequestError, match="available") as e:
        find_script("loopback wave", "txt2img")
    assert e.value.field == "script_name" and "X/Y/Z plot" in e.value.message
    with pytest.raises(RequestError, match="not available in txt2img"):
        find_script("sd upscale", "txt2img")


# ---- engine level ----------------------------------------------------------------------------------------
def test_xyz_plot_grid_and_per_cell_infotext(service):
    res = run_script(service, t2i(), "x/y/z plot", xyz_args(1, "1, 2", 4, "1-2"))
    assert res.index_of_first_image == 1 and len(res.images) == 1 + 4
    grid = res.images[0]
    assert grid.width > 2 * SIZE and grid.height > 2 * SIZE  # two columns, two rows and the labels
    cells = [parse_infotext(t) for t in res.infotexts[1:]]
    assert [(c["Seed"], c["Steps"]) for c in cells] == [("1", "1"), ("2", "1"), ("1", "2"), ("2", "2")]
    head = parse_infotext(res.infotexts[0])
    assert head["Script"] == "X/Y/Z plot" and head["X Type"] == "Seed" and head["X Values"] == "1, 2"
    assert head["Y Type"] == "Steps" and head["Y Values"] == "1-2"
    # the cell with seed 1 and steps 1 is the plain generation with those values
    plain = service.generate(t2i(seed=1, steps=1))
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(res.images[1]))
    assert not np.array_equal(np.asarray(res.images[1]), np.asarray(res.images[2]))
    # the grid holds the cells (bottom-right corner = the last cell) under the labels
    last = np.asarray(res.images[4]).astype(int)
    corner = np.asarray(grid.crop((grid.width - SIZE, grid.height - SIZE, grid.width, grid.height))).astype(int)
    assert np.abs(corner - last).max() == 0
    info = res.info(t2i())
    assert info["all_seeds"] == [1, 2, 1, 2] and len(info["infotexts"]) == 5 and info["index_of_first_image"] == 1


def test_xyz_without_lone_images_and_legend_returns_only_the_plain_grid(service):
    res = run_script(
        service, t2i(), "X/Y/Z plot", xyz_args("CFG Scale", "3,7", include_lone_images=False, draw_legend=False)
    )
    assert len(res.images) == 1 and res.images[0].size == (2 * SIZE, SIZE)
    assert parse_infotext(res.infotexts[0])["CFG scale"] == "3"


def test_xyz_prompt_sr_sampler_and_bad_values(service):
    res = run_script(
        service, t2i(prompt="a red circle"), "x/y/z plot", xyz_args("Prompt S/R", "red, blue", "Sampler", "Euler,DDIM")
    )
    prompts = [parse_infotext(t)["Prompt"] for t in res.infotexts[1:]]
    samplers = [parse_infotext(t)["Sampler"] for t in res.infotexts[1:]]
    assert prompts == ["a red circle", "a blue circle"] * 2 and samplers == ["Euler", "Euler", "DDIM", "DDIM"]
    with pytest.raises(RequestError, match="did not find") as e:
        service.submit_script(t2i(), "x/y/z plot", xyz_args("Prompt S/R", "green, blue"))
    assert e.value.field == "script_args"
    with pytest.raises(RequestError, match="unknown sampler"):
        service.submit_script(t2i(), "x/y/z plot", xyz_args("Sampler", "Euler, Nope"))
    with pytest.raises(RequestError, match="steps"):
        service.submit_script(t2i(), "x/y/z plot", xyz_args("Steps", "1, 0"))
    with pytest.raises(RequestError, match="not supported"):
        service.submit_script(t2i(), "x/y/z plot", xyz_args("UniPC Order", "1, 2"))


def test_xyz_checkpoint_axis_and_interrupt(service):
    service.switch_model("tiny-sd1")
    res = run_script(service, t2i(), "x/y/z plot", xyz_args("Checkpoint name", "tiny-sd1, tiny-other"))
    assert [parse_infotext(t)["Model"] for t in res.infotexts[1:]] == ["tiny-sd1", "tiny-other"]
    assert service.engine.current_model.entry.name == "tiny-sd1"  # the model loaded before comes back
    # interrupt while the plot runs: the job stops after the current cell and keeps what it made
    job = service.submit_script(t2i(steps=8), "x/y/z plot", xyz_args("Seed", "1-40"))
    while job.progress().job_no < 2 and not job.finished:
        job.wait(0.01)
    assert job.progress().job_count == 40
    service.interrupt()
    job.wait(60)
    r = job.result
    made = [t for t in r.infotexts[1:] if t]
    assert r.interrupted and 2 <= len(made) < 40
    assert r.images[0].width == 40 * SIZE  # the grid keeps all 40 columns (unfinished ones black, as A1111)
    assert np.asarray(r.images[-1]).max() == 0


def test_xyz_axes_set_their_request_fields(service):
    from ldm_core.scripts import xyz_plot

    engine = service.engine

    def cells(x_type, x_values, request=None):
        plan = xyz_plot.prepare(engine, request or t2i(enable_hr=True), xyz_args(x_type, x_values))
        return [c for _, _, _, c in plan.cells]

    assert [c.scheduler for c in cells("Schedule type", "karras, Automatic")] == ["Karras", "Automatic"]
    assert [c.denoising_strength for c in cells("Denoising", "0.25-0.75 [3]")] == [0.25, 0.5, 0.75]
    assert [c.clip_skip for c in cells("Clip skip", "1,2")] == [1, 2]
    assert [(c.width, c.height) for c in cells("Size", "96x64, 64x128")] == [(96, 64), (64, 128)]
    assert [c.subseed_strength for c in cells("Var. strength", "0, 0.5")] == [0.0, 0.5]
    assert [c.rescale_cfg for c in cells("Rescale CFG", "0-1 [3]")] == [0.0, 0.5, 1.0]
    assert [c.hr_second_pass_steps for c in cells("Hires steps", "1, 3")] == [1, 3]
    assert [c.hr_upscaler for c in cells("Hires upscaler", "Latent, Lanczos")] == ["Latent", "Lanczos"]
    assert [c.hr_sampler_name for c in cells("Hires sampler", "DDIM")] == ["DDIM"]
    assert [c.styles for c in cells("Styles", '"a, b"')] == [["a", "b"]]
    assert [c.prompt for c in cells("Prompt order", "red, circle", t2i(prompt="a red circle"))] == [
        "a red circle",
        "a circle red",
    ]
    # fixed seeds: -1 becomes one concrete seed shared by every cell; "Keep -1 for seeds" leaves it random
    fixed = xyz_plot.prepare(engine, t2i(seed=-1), xyz_args("Steps", "1,2"))
    assert len({c.seed for _, _, _, c in fixed.cells}) == 1 and fixed.cells[0][3].seed >= 0
    kept = xyz_plot.prepare(engine, t2i(seed=-1), xyz_args("Steps", "1,2", no_fixed_seeds=True))
    assert {c.seed for _, _, _, c in kept.cells} == {-1}
    with pytest.raises(RequestError, match="WIDTHxHEIGHT"):
        cells("Size", "big")


def test_xyz_margins_and_hires_steps(service):
    res = run_script(
        service,
        t2i(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5),
        "x/y/z plot",
        xyz_args("Hires steps", "1,2", draw_legend=False, margin_size=10),
    )
    side = int(SIZE * 1.5)
    assert res.images[0].size == (2 * side + 10, side)  # two hires cells, 10 px apart
    assert [parse_infotext(t)["Hires steps"] for t in res.infotexts[1:]] == ["1", "2"]


def test_prompt_matrix_makes_every_combination(service):
    res = run_script(service, t2i(prompt="a circle|red|big"), "Prompt matrix", [False, False, "positive", "comma", 0])
    assert res.index_of_first_image == 1 and len(res.images) == 1 + 4
    prompts = [parse_infotext(t)["Prompt"] for t in res.infotexts[1:]]
    assert prompts == ["a circle", "a circle, red", "a circle, big", "a circle, red, big"]
    assert res.images[0].width > 2 * SIZE  # 2x2 with labels
    assert res.info(t2i())["all_prompts"] == prompts


def test_prompts_from_file_lines_and_options(service):
    text = 'a cat\n\n--prompt "a dog" --steps 2 --seed 42\n'
    res = run_script(service, t2i(prompt="photo"), "prompts from file or textbox", [False, False, "end", text])
    texts = [parse_infotext(t) for t in res.infotexts]
    assert [t["Prompt"] for t in texts] == ["photo a cat", "photo a dog"]
    assert texts[1]["Steps"] == "2" and texts[1]["Seed"] == "42" and texts[0]["Seed"] == "5"
    old = run_script(service, t2i(prompt="photo"), "Prompts from file or textbox", [True, False, "x\ny"])
    assert [parse_infotext(t)["Prompt"] for t in old.infotexts] == ["x", "y"]
    assert [parse_infotext(t)["Seed"] for t in old.infotexts] == ["5", "6"]  # iterate seed every line


def test_sd_upscale_and_outpainting_through_script_name(service):
    src = Image.new("RGB", (SIZE, SIZE), (200, 40, 40))
    i2i = Img2ImgRequest.build(
        init_images=[src], prompt="red", steps=2, width=SIZE, height=SIZE, seed=3, denoising_strength=0.3,
        save_images=False,
    )  # fmt: skip
    up = run_script(service, i2i, "sd upscale", [None, 16, "Lanczos", 2])
    assert len(up.images) == 1 and up.images[0].size == (2 * SIZE, 2 * SIZE)
    p = parse_infotext(up.infotexts[0])
    assert p["SD upscale upscaler"] == "Lanczos" and p["SD upscale overlap"] == "16"
    out = run_script(service, i2i, "Outpainting mk2", ["", 32, 4, ["right"], 1.0, 0.05])
    assert len(out.images) == 1 and out.images[0].size == (SIZE + 32, SIZE)
    left = np.asarray(out.images[0])[:, : SIZE - 16].astype(int)
    assert np.abs(left - np.asarray(src)[:, : SIZE - 16]).max() <= 2  # the original stays
    with pytest.raises(RequestError, match="Outpainting direction"):
        service.submit_script(i2i, "outpainting mk2", ["", 32, 4, ["sideways"], 1.0, 0.05])
    with pytest.raises(RequestError, match="not available in txt2img"):
        service.submit_script(t2i(), "SD upscale", [None, 16, 1, 2])


def test_outpainting_matched_noise_follows_the_known_pixels():
    from ldm_core.scripts.outpainting_mk2 import matched_noise

    rng = np.random.default_rng(1)
    src = np.zeros((32, 64, 3), np.uint8)
    src[:, :32] = rng.integers(0, 256, (32, 32, 3))  # known: random colours left; right half is new
    mask = Image.new("L", (64, 32), 0)
    mask.paste(255, (32, 0, 64, 32))
    out = np.asarray(matched_noise(Image.fromarray(src), mask, 1.0, 0.5, seed=3)).astype(int)
    assert np.array_equal(out[:, :32], src[:, :32])  # the known pixels stay
    for c in range(3):  # the new area takes the known area's value distribution
        assert abs(np.percentile(out[:, 32:, c], 50) - np.percentile(src[:, :32, c], 50)) < 20
        assert out[:, 32:, c].std() > 40
    again = np.asarray(matched_noise(Image.fromarray(src), mask, 1.0, 0.5, seed=3)).astype(int)
    other = np.asarray(matched_noise(Image.fromarray(src), mask, 3.0, 0.5, seed=3)).astype(int)
    assert np.array_equal(out, again) and not np.array_equal(out, other)


def test_batch_grid_first_and_saved(service, tmp_path):
    res = service.submit(t2i(batch_size=2, n_iter=2), grid=GridOptions(return_grid=True, save=True))
    res.wait(60)
    r = res.result
    assert len(r.images) == 5 and r.index_of_first_image == 1 and r.images[0].size == (2 * SIZE, 2 * SIZE)
    assert r.info(t2i())["all_seeds"] == [5, 6, 7, 8]
    saved = list((service.config.outputs_dir / "txt2img-grids").rglob("*-grid.png"))
    assert len(saved) == 1 and read_image_info(Image.open(saved[0]))[0] == r.infotexts[0]
    one = service.submit(t2i(), grid=GridOptions(return_grid=True, save=True))
    one.wait(60)
    assert len(one.result.images) == 1  # no grid for a single image


# ---- REST API (in-process) ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(service):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from api import install

    app = FastAPI()
    install(app, service)
    with TestClient(app) as c:
        yield c


def _decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_api_xyz_plot_with_a1111_order_args(client):
    body = {
        "prompt": "a red circle",
        "steps": 1,
        "width": SIZE,
        "height": SIZE,
        "seed": 9,
        "script_name": "x/y/z plot",
        # A1111 1.6+: x_type, x_values, x_values_dropdown, y..., z..., draw_legend, include_lone_images,
        # include_sub_grids, no_fixed_seeds, margin_size, csv_mode, raw_mode
        "script_args": [1, "1,2", [], 4, "1,2", [], 0, "", [], True, True, False, False, 0, True, False],
    }
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    info = json.loads(data["info"])
    assert len(data["images"]) == 5 and info["index_of_first_image"] == 1 and len(info["infotexts"]) == 5
    cells = [parse_infotext(t) for t in info["infotexts"][1:]]
    assert [(c["Seed"], c["Steps"]) for c in cells] == [("1", "1"), ("2", "1"), ("1", "2"), ("2", "2")]
    for b64, text in zip(data["images"], info["infotexts"], strict=True):
        assert read_image_info(_decode(b64))[0] == text  # each PNG carries its own infotext
    assert _decode(data["images"][0]).width > 2 * SIZE
    bad = client.post("/sdapi/v1/txt2img", json={**body, "script_name": "no such script"})
    assert bad.status_code == 422 and "x/y/z plot" in bad.text.lower() and "script_name" in bad.text
    scripts = client.get("/sdapi/v1/scripts").json()
    assert "x/y/z plot" in scripts["txt2img"] and "sd upscale" in scripts["img2img"]
    infos = client.get("/sdapi/v1/script-info").json()
    xyz = next(s for s in infos if s["name"] == "x/y/z plot" and not s["is_img2img"])
    assert len(xyz["args"]) == 16 and xyz["args"][0]["label"] == "X type" and "Seed" in xyz["args"][0]["choices"]
    margin = xyz["args"][13]
    assert (margin["label"], margin["minimum"], margin["maximum"], margin["step"]) == ("Grid margins (px)", 0, 500, 2)


def test_api_xyz_plot_in_the_old_11_argument_layout(client):
    # mix1009/sdwebuiapi (the webuiapi package), README.md "XYZ Plot" example: axis indexes into A1111's list
    # before 1.1 (Checkpoint name = 10), booleans as strings, no dropdown slots
    legacy = ["Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "Hires steps", "CFG Scale", "Prompt S/R",
              "Prompt order", "Sampler", "Checkpoint name"]  # fmt: skip
    body = {
        "prompt": "a cat",
        "steps": 1,
        "width": SIZE,
        "height": SIZE,
        "script_name": "X/Y/Z Plot",
        "script_args": [
            legacy.index("Steps"), "1,2", legacy.index("Checkpoint name"), "tiny-sd1", legacy.index("Nothing"), "",
            "True", "False", "False", "False", 0,
        ],
    }  # fmt: skip
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    head = parse_infotext(json.loads(data["info"])["infotexts"][0])
    assert len(data["images"]) == 1  # include_lone_images "False": the grid only
    assert head["X Type"] == "Steps" and head["Y Type"] == "Checkpoint name" and head["Model"] == "tiny-sd1"


def test_api_img2img_sd_upscale_by_upscaler_index(client):
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (10, 200, 30)).save(buf, "PNG")
    body = {
        "init_images": [base64.b64encode(buf.getvalue()).decode()],
        "prompt": "green",
        "steps": 2,
        "width": SIZE,
        "height": SIZE,
        "denoising_strength": 0.2,
        "script_name": "SD upscale",
        "script_args": [None, 32, 1, 2],  # info, overlap, upscaler_index (1 = Lanczos), scale_factor
    }
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert len(data["images"]) == 1 and _decode(data["images"][0]).size == (2 * SIZE, 2 * SIZE)
    assert "SD upscale upscaler: Lanczos" in json.loads(data["info"])["infotexts"][0]
    bad = client.post("/sdapi/v1/img2img", json={**body, "script_args": [None, 32, 99, 2]})
    assert bad.status_code == 422 and "Upscaler" in bad.text


def test_api_batch_returns_the_grid_first(client):
    body = {"prompt": "x", "steps": 1, "width": SIZE, "height": SIZE, "seed": 1, "batch_size": 2}
    data = client.post("/sdapi/v1/txt2img", json=body).json()
    info = json.loads(data["info"])
    assert len(data["images"]) == 3 and info["index_of_first_image"] == 1 and info["all_seeds"] == [1, 2]
    assert _decode(data["images"][0]).size == (2 * SIZE, SIZE)
    off = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"return_grid": False}}).json()
    assert len(off["images"]) == 2 and json.loads(off["info"])["index_of_first_image"] == 0
    # a client's string "false" is the option's False (checked like every override), not a truthy string
    off = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"return_grid": "false"}}).json()
    assert len(off["images"]) == 2
