"""Saving images: numbered names, chunks readable by PIL and others, atomic writes that never overwrite."""

import io
import threading
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin
from PIL.ExifTags import IFD, Base

from ldm_core import outputs
from ldm_core.outputs import encode_png_bytes, output_folder, read_image_info, save_image

INFO = "a cat, (fluffy:1.2)\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, Seed: 42, Size: 8x8"
MANIFEST = {"seed": 42, "torch": "x", "scheduler": {"beta_start": 0.00085}}


def _img(color=(200, 30, 30)):
    return Image.new("RGB", (8, 8), color)


def test_output_folder_layout():
    when = datetime(2024, 3, 9, 12, 0)
    assert output_folder(Path("out"), "txt2img", when) == Path("out/txt2img/2024-03-09")
    for bad in ("", "..", "a/b"):
        with pytest.raises(ValueError):
            output_folder(Path("out"), bad, when)


def test_png_name_chunks_and_manifest(tmp_path):
    path = save_image(_img(), tmp_path / "day", infotext=INFO, manifest=MANIFEST, seed=42)
    assert path == tmp_path / "day" / "00000-42.png"
    with Image.open(path) as im:
        im.load()
        assert im.text["parameters"] == INFO  # what A1111 readers look at
        assert im.getpixel((0, 0)) == (200, 30, 30)
        infotext, manifest, others = read_image_info(im)
    assert infotext == INFO and manifest == MANIFEST and others == {}
    assert sorted(p.name for p in (tmp_path / "day").iterdir()) == ["00000-42.png"]  # no temp files left


def test_same_seed_twice_gives_two_files_and_numbers_continue(tmp_path):
    a = save_image(_img((1, 1, 1)), tmp_path, infotext="a", manifest=None, seed=5)
    b = save_image(_img((2, 2, 2)), tmp_path, infotext="b", manifest=None, seed=5)
    assert (a.name, b.name) == ("00000-5.png", "00001-5.png")
    (tmp_path / "00041-9.png").write_bytes(b"not ours")
    c = save_image(_img(), tmp_path, infotext="c", manifest=None, seed=5)
    assert c.name == "00042-5.png"
    with Image.open(a) as im:
        assert im.text["parameters"] == "a"
    assert (tmp_path / "00041-9.png").read_bytes() == b"not ours"


def test_a_taken_name_is_never_overwritten(tmp_path, monkeypatch):
    taken = tmp_path / "00000-7.png"
    taken.write_bytes(b"precious")
    monkeypatch.setattr(outputs, "_next_number", lambda folder: 0)  # as if another saver raced us
    path = save_image(_img(), tmp_path, infotext="x", manifest=None, seed=7)
    assert path.name == "00001-7.png"
    assert taken.read_bytes() == b"precious"
    # a pattern without [number] gets a suffix instead
    first = save_image(_img(), tmp_path, infotext="x", manifest=None, seed=7, pattern="[seed]")
    second = save_image(_img(), tmp_path, infotext="y", manifest=None, seed=7, pattern="[seed]")
    assert (first.name, second.name) == ("7.png", "7-1.png")


def test_concurrent_saves_into_one_folder(tmp_path):
    paths: list[Path] = []
    lock = threading.Lock()

    def work(i):
        p = save_image(_img((i, i, i)), tmp_path, infotext=f"img {i}", manifest=None, seed=3)
        with lock:
            paths.append(p)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    names = sorted(p.name for p in paths)
    assert names == [f"{n:05d}-3.png" for n in range(8)]
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # no temp or reservation files left
    texts = set()
    for p in paths:
        with Image.open(p) as im:
            texts.add(im.text["parameters"])
    assert texts == {f"img {i}" for i in range(8)}


def test_pattern_tokens_are_sanitised(tmp_path):
    when = datetime(2025, 1, 2)
    path = save_image(
        _img(),
        tmp_path,
        infotext="x",
        manifest=None,
        seed=9,
        pattern="[date]-[model_name]-[prompt_words]-[number]",
        model_name="sub/dir:model?",
        prompt="(masterpiece:1.2), a cat <lora:x:1> on/a mat\\" + " word" * 40,
        when=when,
    )
    name = path.name
    assert path.parent == tmp_path
    assert name.startswith("2025-01-02-sub_dir_model_-masterpiece a cat on a mat word")
    assert name.endswith("-00000.png")
    assert "/" not in name and "\\" not in name and ":" not in name
    assert len(path.stem) <= 150


@pytest.mark.parametrize("ext", ["jpg", "webp"])
def test_jpeg_and_webp_carry_infotext_in_exif(tmp_path, ext):
    text = INFO + ", caf\u00e9 \u732b"
    path = save_image(_img(), tmp_path, infotext=text, manifest=MANIFEST, seed=1, extension=ext)
    assert path.suffix == f".{ext}"
    with Image.open(path) as im:
        raw = im.getexif().get_ifd(IFD.Exif)[Base.UserComment]
        assert raw.startswith(b"UNICODE\x00")
        infotext, manifest, _ = read_image_info(im)
    assert infotext == text and manifest == MANIFEST


def test_reads_a1111_png_and_little_endian_user_comment():
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "from a1111\nSteps: 20, Sampler: Euler, Seed: 1")
    info.add_text("workflow", '{"nodes": []}')
    buf = io.BytesIO()
    _img().save(buf, "PNG", pnginfo=info)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        infotext, manifest, others = read_image_info(im)
    assert infotext.startswith("from a1111") and manifest is None
    assert others == {"workflow": '{"nodes": []}'}

    exif = Image.Exif()
    exif.get_ifd(IFD.Exif)[Base.UserComment] = b"UNICODE\x00" + "little endian: ok".encode("utf-16-le")
    buf = io.BytesIO()
    _img().save(buf, "JPEG", exif=exif.tobytes())
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert read_image_info(im)[0] == "little endian: ok"


def test_encode_png_bytes_in_memory():
    data = encode_png_bytes(_img(), INFO, MANIFEST)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as im:
        assert read_image_info(im)[:2] == (INFO, MANIFEST)


def test_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match="not supported"):
        save_image(_img(), tmp_path, infotext="x", manifest=None, seed=1, extension="gif")
