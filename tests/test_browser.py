"""End to end in a real browser: Debian's Chromium driven by Playwright against `webui.py` started as a
subprocess over a tiny random SD 1.x model (64x64 images, 2 steps). The tests share one server and one page
and run in file order: txt2img, PNG Info -> txt2img, send to img2img and img2img, upscale x2, a bad value,
interrupt while a second request queues, inpaint with a painted mask (last: the editor's WebGL canvas keeps
Chromium's software renderer busy from then on), and a screenshot of every tab.

Skipped (with the reason) when chromium or playwright is missing. Set LDM_UI_SCREENSHOTS=DIR to keep the
screenshots of every tab (they go to a temporary folder otherwise).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from browser_helpers import (
    SIZE,
    chromium_path,
    close_toasts,
    js_click,
    mark_progress_stale,
    open_tab,
    opened_page,
    set_number,
    toasts,
    wait_job,
)
from PIL import Image

pytestmark = pytest.mark.browser

if chromium_path() is None:
    pytest.skip("chromium is not installed (apt-get install chromium); browser tests skipped", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

SOURCE_RGB = (30, 120, 200)


@pytest.fixture(scope="module")
def page(webui):
    with opened_page(webui) as pg:
        yield pg


@pytest.fixture(scope="module")
def source_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "source.png"
    Image.new("RGB", (SIZE, SIZE), SOURCE_RGB).save(path)
    return path


def generate(page, mode: str, states=("done",), timeout: float = 120.0) -> str:
    mark_progress_stale(page, mode)
    page.click(f"#{mode}_generate")
    return wait_job(page, mode, states, timeout)


def test_txt2img_shows_image_and_infotext(page, webui):
    page.fill("#txt2img_prompt textarea", "a red circle")
    page.fill("#txt2img_seed input", "7")
    # the tiny model recommends no CFG rescale: the slider starts at 0; set it as a user would
    assert page.input_value("#txt2img_rescale_cfg input[type=number]") == "0"
    set_number(page, "#txt2img_rescale_cfg", 0.5)
    generate(page, "txt2img")
    assert page.locator("#txt2img_gallery img").count() >= 1
    info = page.input_value("#txt2img_infotext textarea")
    assert info.startswith("a red circle\n") and "Seed: 7" in info and f"Size: {SIZE}x{SIZE}" in info
    assert "Rescale CFG: 0.5" in info
    saved = webui.newest_output("txt2img")
    with Image.open(saved) as im:
        assert im.size == (SIZE, SIZE) and im.text["parameters"] == info
    assert page.locator("#txt2img_token_counter").inner_text() == "3/75"


def test_pnginfo_reads_file_and_sends_to_txt2img(page, webui):
    saved = webui.newest_output("txt2img")
    page.fill("#txt2img_prompt textarea", "something else")
    page.fill("#txt2img_seed input", "-1")
    set_number(page, "#txt2img_rescale_cfg", 0)
    open_tab(page, "pnginfo")
    page.set_input_files("#pnginfo_image input[type=file]", str(saved))
    page.wait_for_function("() => document.querySelector('#pnginfo_text textarea').value.includes('Seed: 7')")
    table = page.inner_text("#pnginfo_html")
    assert "Sampler\tEuler a" in table and "Seed\t7" in table
    page.click("#pnginfo_send_txt2img")
    page.wait_for_selector("#tab_txt2img", state="visible")
    page.wait_for_function("() => document.querySelector('#txt2img_prompt textarea').value === 'a red circle'")
    assert page.input_value("#txt2img_seed input") == "7"
    assert page.input_value("#txt2img_sampler input") == "Euler a"
    assert page.input_value("#txt2img_steps input[type=number]") == "2"
    assert page.input_value("#txt2img_rescale_cfg input[type=number]") == "0.5"


def test_send_to_img2img_then_img2img_from_uploaded_image(page, source_png):
    page.click("#txt2img_send_img2img")  # the txt2img result and its parameters
    page.wait_for_selector("#tab_img2img", state="visible")
    page.wait_for_selector("#img2img_image img")
    page.wait_for_function("() => document.querySelector('#img2img_prompt textarea').value === 'a red circle'")
    assert page.input_value("#img2img_seed input") == "7"
    page.set_input_files("#img2img_image input[type=file]", str(source_png))
    page.wait_for_selector("#img2img_image img")
    page.fill("#img2img_prompt textarea", "a blue square")
    generate(page, "img2img")
    info = page.input_value("#img2img_infotext textarea")
    assert info.startswith("a blue square") and "Denoising strength: 0.75" in info
    assert page.locator("#img2img_gallery img").count() >= 1


def test_upscale_x2_doubles_the_size(page, webui, tmp_path):
    src = tmp_path / "wide.png"
    Image.new("RGB", (SIZE, SIZE // 2), (200, 40, 40)).save(src)
    open_tab(page, "extras")
    page.set_input_files("#extras_image input[type=file]", str(src))
    page.wait_for_selector("#extras_image img")
    page.click("#extras_generate")
    page.wait_for_function("() => document.querySelector('#extras_size').innerText.includes('Result:')", timeout=60000)
    assert f"{2 * SIZE}x{SIZE}" in page.inner_text("#extras_size")
    with Image.open(webui.newest_output("extras")) as im:
        assert im.size == (2 * SIZE, SIZE)


def test_upscale_with_ldsr_chosen_in_the_extras_tab(page, webui, tmp_path):
    """A diffusion upscaler is reachable where users pick upscalers: LDSR (a tiny one in models/LDSR) is in
    the Extras dropdown and upscales 4x from there."""
    src = tmp_path / "small.png"
    Image.new("RGB", (SIZE // 2, SIZE // 4), (40, 160, 40)).save(src)
    open_tab(page, "extras")
    page.set_input_files("#extras_image input[type=file]", str(src))
    page.wait_for_selector("#extras_image img")
    page.locator("#extras_upscaler_1 input").first.click()
    page.locator('#extras_upscaler_1 li[role=option][aria-label="LDSR"]').click()
    set_number(page, "#extras_factor", 4)
    page.click("#extras_generate")
    page.wait_for_function(
        "() => document.querySelector('#extras_size').innerText.includes('Result:')", timeout=120000
    )
    assert f"{2 * SIZE}x{SIZE}" in page.inner_text("#extras_size")
    with Image.open(webui.newest_output("extras")) as im:
        assert im.size == (2 * SIZE, SIZE)


def test_bad_value_shows_an_error_and_the_next_job_works(page):
    open_tab(page, "txt2img")
    set_number(page, "#txt2img_width", 4000)  # the slider refuses it: clamped to the largest allowed
    assert page.input_value("#txt2img_width input[type=number]") == "2048"
    set_number(page, "#txt2img_width", SIZE)
    page.fill("#txt2img_seed input", "99999999999999999999")  # past 2**64 - 1: only the server can refuse it
    page.click("#txt2img_generate")
    page.wait_for_selector(".toast-body", timeout=30000)
    message = " ".join(toasts(page))
    assert "seed" in message and "18446744073709551615" in message and "Traceback" not in message
    close_toasts(page)
    page.fill("#txt2img_seed input", "3")
    page.click("#txt2img_styles input")  # and a style from styles.csv, applied once by the engine
    page.keyboard.type("moody")
    page.keyboard.press("Enter")
    generate(page, "txt2img")
    info = page.input_value("#txt2img_infotext textarea")
    assert info.startswith("a red circle, dark\nNegative prompt: bright\n") and "Seed: 3" in info


def test_interrupt_keeps_partial_image_while_a_second_request_queues(page, webui):
    open_tab(page, "txt2img")
    set_number(page, "#txt2img_steps", 150)
    set_number(page, "#txt2img_batch_count", 20)  # far longer than this test waits
    mark_progress_stale(page, "txt2img")
    page.click("#txt2img_generate")
    page.wait_for_function(
        "() => /Step [1-9]/.test(document.querySelector('#txt2img_progress').innerText)", timeout=120000
    )
    page.wait_for_selector("#txt2img_preview img", timeout=60000)  # the live preview
    open_tab(page, "img2img")  # its image is still there from the img2img test
    mark_progress_stale(page, "img2img")
    page.click("#img2img_generate")
    page.wait_for_selector("#img2img_progress [data-state=queued][data-position='1']", timeout=30000)
    open_tab(page, "txt2img")
    js_click(page, "#txt2img_interrupt")
    # "interrupted" only when the loop stopped before its last step; the partial image is still shown
    assert wait_job(page, "txt2img", ("interrupted",), timeout=180) == "interrupted"
    assert "Steps: 150" in page.input_value("#txt2img_infotext textarea")
    shown = page.locator("#txt2img_gallery img").count()
    saved = len(list((webui.data / "outputs" / "txt2img").rglob("*.png")))
    assert shown >= 1 and saved < 3 + 20  # 3 earlier images, then far fewer than 20 batches
    open_tab(page, "img2img")
    assert wait_job(page, "img2img", ("done",)) == "done"
    open_tab(page, "txt2img")
    set_number(page, "#txt2img_steps", 2)
    set_number(page, "#txt2img_batch_count", 1)


def test_video_tab_makes_a_clip_and_plays_it(page, webui):
    open_tab(page, "video")
    page.wait_for_function(
        "() => document.querySelector('#video_motion_module input').value == 'mm_sd1_tiny.safetensors'"
    )
    page.fill("#video_prompt textarea", "0: a red circle, 4: a blue circle")
    set_number(page, "#video_length", 6)
    set_number(page, "#video_width", SIZE)
    set_number(page, "#video_height", SIZE)
    set_number(page, "#video_motion_end_percent", 0.5)  # the module's timeline: it stops halfway
    generate(page, "video")
    assert page.locator("#video_gallery img").count() >= 1
    info = page.input_value("#video_infotext textarea")
    assert "AnimateDiff: " in info and "video_length: 6" in info and "motion_end_percent: 0.5" in info
    clips = sorted((webui.data / "outputs" / "video").rglob("*.*"))
    assert {p.suffix for p in clips} >= {".gif", ".mp4"}
    # the player has the MP4 and plays it
    page.wait_for_selector("#video_player video")
    page.wait_for_function(
        "() => { const v = document.querySelector('#video_player video'); return v && v.readyState >= 2 }"
    )
    page.evaluate("() => { const v = document.querySelector('#video_player video'); v.muted = true; v.play(); }")
    page.wait_for_function("() => document.querySelector('#video_player video').currentTime > 0")
    duration = page.evaluate("() => document.querySelector('#video_player video').duration")
    assert duration == pytest.approx(6 / 8, abs=0.2)  # 6 frames at 8 fps
    with Image.open(next(p for p in clips if p.suffix == ".gif")) as gif:
        assert gif.n_frames == 6


def test_inpaint_with_painted_mask_keeps_the_rest(page, webui, source_png):
    open_tab(page, "inpaint")
    page.wait_for_selector("#inpaint_editor canvas")
    # the editor's canvas starts up when its tab is first shown; an upload before that is lost, so retry
    for attempt in range(6):
        page.set_input_files("#inpaint_editor input[type=file]", str(source_png))
        try:
            page.wait_for_function(
                "() => !document.querySelector('#inpaint_editor').innerText.includes('Upload an image')",
                timeout=6000,
            )
            break
        except sync_api.TimeoutError:
            assert attempt < 5, "the inpaint editor never showed the uploaded image"
    page.wait_for_timeout(500)
    canvas = page.locator("#inpaint_editor canvas").first
    box = canvas.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 20, cy)
    page.mouse.down()
    for i in range(9):
        page.mouse.move(cx - 20 + 5 * i, cy + (i % 2) * 3)
    page.mouse.up()
    set_number(page, "#inpaint_mask_blur", 0)
    page.fill("#inpaint_prompt textarea", "a hole")
    generate(page, "inpaint")
    assert "Mask blur: 0" in page.input_value("#inpaint_infotext textarea")
    with Image.open(webui.newest_output("inpaint")) as im:
        rgb = im.convert("RGB")
        assert rgb.getpixel((1, 1)) == SOURCE_RGB  # outside the painted stroke: unchanged
        assert rgb.getpixel((SIZE // 2, SIZE // 2)) != SOURCE_RGB  # inside it: repainted


def test_browser_may_fetch_outputs_only(webui):
    import urllib.error
    import urllib.request

    def status(path: Path | str) -> int:
        try:
            with urllib.request.urlopen(f"{webui.url}gradio_api/file={path}", timeout=30) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    out = webui.newest_output("txt2img")
    hidden = out.parent / ".hidden.png"
    shutil.copy(out, hidden)
    assert status(out) == 200
    assert status(hidden) == 403  # a dot-file inside the outputs folder
    assert status(webui.data / "config.json") == 403  # beside the outputs folder
    assert status(f"{webui.data}/outputs/../styles.csv") == 403
    assert status("/etc/passwd") == 403


def test_screenshots_of_every_tab(page, tmp_path):
    out = Path(os.environ.get("LDM_UI_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    for tab, key in (
        ("txt2img", "#txt2img_gallery"),
        ("img2img", "#img2img_image"),
        ("inpaint", "#inpaint_editor"),
        ("video", "#video_motion_module"),
        ("extras", "#extras_generate"),
        ("pnginfo", "#pnginfo_html"),
        ("settings", "#settings_apply"),
        ("extensions", "#extensions_table"),
    ):
        open_tab(page, tab)
        page.wait_for_selector(key, state="visible")
        page.wait_for_timeout(300)
        page.screenshot(path=str(out / f"{tab}.png"), full_page=True, timeout=120000)
        assert (out / f"{tab}.png").stat().st_size > 10_000
    if not os.environ.get("LDM_UI_SCREENSHOTS"):
        shutil.rmtree(out, ignore_errors=True)
