"""The command line: txt2img/img2img/inpaint write PNGs with their infotext; bad input exits 2 naming the field."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_core.cli import main
from ldm_core.outputs import read_image_info


def _data_dir(tmp_path, tiny_models):
    ckpt = tmp_path / "data" / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    shutil.copy(tiny_models["sd1"]["single_file"], ckpt / "tiny.safetensors")
    return tmp_path / "data"


def test_txt2img_img2img_inpaint(tmp_path, tiny_models, capsys):
    data = _data_dir(tmp_path, tiny_models)
    out = tmp_path / "out"
    common = [
        "--data-dir",
        str(data),
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "3",
        "--out",
        str(out),
    ]
    assert main(["txt2img", "--prompt", "a red circle", "--sampler", "DPM++ 2M", *common]) == 0
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 1 and pngs[0].name.endswith("-3.png")
    params, manifest, _ = read_image_info(Image.open(pngs[0]))
    assert params.startswith("a red circle\n") and "Sampler: DPM++ 2M" in params and "Seed: 3" in params
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (0, 0, 255)).save(init)
    mask = tmp_path / "mask.png"
    Image.new("L", (64, 64), 255).save(mask)
    assert main(["img2img", "--init-image", str(init), "--denoising-strength", "0.5", *common]) == 0
    assert main(["inpaint", "--init-image", str(init), "--mask", str(mask), *common]) == 0
    assert {p.parent.parent.name for p in out.rglob("*.png")} == {"txt2img", "img2img", "inpaint"}


def test_bad_input_names_the_field(tmp_path, tiny_models, capsys):
    data = _data_dir(tmp_path, tiny_models)
    assert main(["txt2img", "--data-dir", str(data), "--width", "32", "--out", str(tmp_path / "o")]) == 2
    assert "width" in capsys.readouterr().err
    assert (
        main(
            [
                "txt2img",
                "--data-dir",
                str(data),
                "--sampler",
                "Nope",
                "--width",
                "64",
                "--height",
                "64",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "sampler_name" in capsys.readouterr().err
    missing = tmp_path / "missing.png"
    assert main(["img2img", "--data-dir", str(data), "--init-image", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert "init_image" in capsys.readouterr().err


def test_video_writes_the_clip(tmp_path, tiny_models, capsys):
    from tiny_models import save_motion_module, tiny_motion_adapter

    data = _data_dir(tmp_path, tiny_models)
    save_motion_module(tiny_motion_adapter("sd1"), data / "models" / "AnimateDiff" / "mm.safetensors", "original")
    out = tmp_path / "out"
    args = [
        "video",
        "--data-dir",
        str(data),
        "--prompt",
        "0: a red circle, 3: a blue circle",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--frames",
        "4",
        "--format",
        "GIF,PNG",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out.split()
    gifs = [p for p in printed if p.endswith(".gif")]
    assert len(gifs) == 1 and Image.open(gifs[0]).n_frames == 4
    assert len([p for p in printed if p.endswith(".png")]) == 4
    assert "AnimateDiff: " in read_image_info(Image.open(gifs[0]))[0]
    assert main([*args[:-2], "--motion-module", "nope", "--out", str(out)]) == 2  # named, no traceback
    assert main([*args[:-2], "--freeinit-iters", "2", "--out", str(tmp_path / "fi")]) == 0
    gif = next(p for p in capsys.readouterr().out.split() if p.endswith(".gif"))
    assert "freeinit_iters: 2, freeinit_filter: butterworth" in read_image_info(Image.open(gif))[0]
    assert main([*args[:-2], "--motion-timeline", "0", "0.5", "0.8", "--out", str(tmp_path / "tl")]) == 0
    gif = next(p for p in capsys.readouterr().out.split() if p.endswith(".gif"))
    assert "motion_end_percent: 0.5, motion_effect: 0.8" in read_image_info(Image.open(gif))[0]
    assert main([*args[:-2], "--motion-timeline", "0.6", "0.2", "1", "--out", str(tmp_path / "bad")]) == 2


def test_upscale_files_and_folders_keep_the_infotext(tmp_path, capsys):
    from PIL.PngImagePlugin import PngInfo

    src = tmp_path / "in"
    src.mkdir()
    info = PngInfo()
    info.add_text("parameters", "a red circle\nSteps: 20, Sampler: Euler a, Seed: 1")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(src / "a.png", pnginfo=info)
    Image.new("RGB", (20, 20), (0, 0, 255)).save(src / "b.jpg")
    out = tmp_path / "out"
    flags = ["--data-dir", str(tmp_path), "--out", str(out)]
    assert main(["upscale", str(src / "a.png"), "--scale", "2", *flags]) == 0
    first = Path(capsys.readouterr().out.split()[0])
    assert first == out / "a.png" and Image.open(first).size == (80, 60)
    params, manifest, _ = read_image_info(Image.open(first))
    assert params.startswith("a red circle\n")
    assert manifest["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    # a folder, to an exact size, with a client's name for a model upscaler this machine lacks: Lanczos instead
    assert main(["upscale", str(src), "--width", "64", "--height", "32", "--upscaler", "R-ESRGAN 4x+", *flags]) == 0
    written = [Path(p) for p in capsys.readouterr().out.split()]
    assert [p.name for p in written] == ["a-1.png", "b.png"]  # nothing overwritten
    assert all(Image.open(p).size == (64, 32) for p in written)
    assert "Postprocess upscaler: Lanczos" in read_image_info(Image.open(written[1]))[1]["postprocessing"]


def test_upscale_bad_input_names_the_field(tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.new("RGB", (16, 16)).save(img)
    flags = ["--data-dir", str(tmp_path), "--out", str(tmp_path / "out")]
    cases = [
        (["upscale", str(img), "--scale", "9", *flags], "upscaling_resize"),
        (["upscale", str(tmp_path / "missing.png"), *flags], "inputs"),
        (["upscale", str(img), "--width", "64", *flags], "height"),
        (["upscale", str(img), "--upscaler", "Bicubic", *flags], "upscaler_1"),
        (["upscale", str(img), "--data-dir", str(tmp_path), "--out", str(tmp_path)], "out"),
    ]
    for argv, field in cases:
        assert main(argv) == 2, argv
        assert f"error: {field}:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_upscalers_lists_the_model_files(tmp_path, capsys):
    assert main(["upscalers", "--data-dir", str(tmp_path)]) == 0
    names = capsys.readouterr().out.split("\n")
    assert names[:3] == ["None", "Lanczos", "Nearest"]


def test_txt2img_and_batch_with_a_controlnet_unit_from_flags_and_from_alwayson_scripts(tmp_path, capsys):
    """The shipped canny ControlNet from the command line (txt2img flags, --alwayson-scripts, a batch line),
    on a circle outline drawn here (not by the trainer's renderer) in the bottom right with the prompt "a red
    square": the image has a circle there, the infotext names the unit; without the unit no circle lands
    there. A bad unit names its field and exits 2."""
    from PIL import ImageDraw

    from ldm_core.train.analyser import analyse

    data = tmp_path / "data"
    (data / "models" / "ControlNet").mkdir(parents=True)
    (data / "models" / "ControlNet" / "builtin-canny").symlink_to(
        Path(__file__).resolve().parents[1] / "models" / "ControlNet" / "builtin-canny"
    )
    sketch = tmp_path / "circle.png"
    img = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(img).ellipse((36, 36, 58, 58), outline="white", width=2)
    img.save(sketch)
    out = tmp_path / "out"
    common = ["txt2img", "--data-dir", str(data), "--prompt", "a red square", "--steps", "20", "--seed", "5"]

    def run(*extra: str):
        assert main([*common, *extra, "--out", str(out)]) == 0
        path = capsys.readouterr().out.split()[-1]
        return Image.open(path)

    plain = analyse(run()).objects[0]
    assert (plain.shape, plain.position) != ("circle", "bottom right")
    made = run("--controlnet", "builtin-canny", "--control-image", str(sketch), "--control-module", "none")
    top = analyse(made).objects[0]
    assert (top.shape, top.position) == ("circle", "bottom right"), top
    assert "ControlNet 0: " in read_image_info(made)[0] and "builtin-canny" in read_image_info(made)[0]
    import base64
    import json

    unit = {"model": "builtin-canny", "module": "none", "image": base64.b64encode(sketch.read_bytes()).decode()}
    (tmp_path / "scripts.json").write_text(json.dumps({"controlnet": {"args": [unit]}}))
    same = run("--alwayson-scripts", f"@{tmp_path / 'scripts.json'}")
    assert np.array_equal(np.asarray(same), np.asarray(made))
    line = {"prompt": "a red square", "steps": 20, "seed": 5, "width": 64, "height": 64}
    line["alwayson_scripts"] = {"controlnet": {"args": [unit]}}
    (tmp_path / "jobs.jsonl").write_text(json.dumps(line) + "\n")
    batch = ["batch", str(tmp_path / "jobs.jsonl"), "--data-dir", str(data), "--no-progress", "--out"]
    assert main([*batch, str(tmp_path / "batch")]) == 0
    (png,) = (tmp_path / "batch").rglob("*.png")
    top = analyse(Image.open(png)).objects[0]
    assert (top.shape, top.position) == ("circle", "bottom right"), top
    assert "ControlNet 0: " in read_image_info(Image.open(png))[0]
    assert main([*common, "--controlnet", "builtin-canny", "--out", str(out)]) == 2
    assert "control_image" in capsys.readouterr().err
    assert main([*common, "--controlnet", "nope", "--control-image", str(sketch), "--out", str(out)]) == 2
    assert "nope" in capsys.readouterr().err
    assert main([*common, "--alwayson-scripts", "{not json", "--out", str(out)]) == 2
    assert "alwayson_scripts" in capsys.readouterr().err


def test_upscale_diffusion_flags_reach_the_upscalers_options(tmp_path):
    from ldm_core.cli import _upscale_config, build_parser

    base = ["upscale", "x.png", "--out", str(tmp_path), "--data-dir", str(tmp_path)]
    cfg = _upscale_config(build_parser().parse_args([*base, "--colour-fix", "AdaIN", "--noise-level", "40"]))
    assert (cfg.diffusion_upscale.colour_fix, cfg.diffusion_upscale.noise_level) == ("AdaIN", 40)
    assert _upscale_config(build_parser().parse_args(base)).diffusion_upscale.colour_fix == "Wavelet"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--colour-fix", "sepia"])
    cfg = _upscale_config(build_parser().parse_args([*base, "--image-guidance", "2.5"]))
    assert cfg.diffusion_upscale.image_guidance == 2.5
    from ldm_core.generation_requests import RequestError

    with pytest.raises(RequestError, match="from 0 to 10") as err:
        _upscale_config(build_parser().parse_args([*base, "--image-guidance", "11"]))
    assert err.value.field == "image_guidance"
