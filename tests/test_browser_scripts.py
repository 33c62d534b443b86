"""The X/Y/Z plot script through the web UI in a real browser (Debian's Chromium driven by Playwright against
`webui.py` over a tiny random SD 1.x model, 64x64, 1 step): pick "X/Y/Z plot" in txt2img's Script menu, set
X = Seed "1,2" and Y = Steps "1,2" with sub images included, generate, and check the gallery shows the grid
and the four images, each with its own infotext.

Skipped (with the reason) when chromium or playwright is missing.
"""

from __future__ import annotations

import pytest
from browser_helpers import SIZE, chromium_path, mark_progress_stale, opened_page, wait_job
from PIL import Image

pytestmark = pytest.mark.browser

if chromium_path() is None:
    pytest.skip("chromium is not installed (apt-get install chromium); browser tests skipped", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

XYZ = "#txt2img_script_x_y_z_plot"  # + _<argument index in A1111's script_args order>


@pytest.fixture(scope="module")
def page(webui):
    with opened_page(webui, height=1400) as pg:
        yield pg


def choose(page, selector: str, option: str) -> None:
    """Pick `option` in a Gradio dropdown."""
    page.locator(f"{selector} input").first.click()
    page.locator(f'{selector} li[role=option][aria-label="{option}"]').click()
    page.wait_for_function(
        "([sel, opt]) => document.querySelector(sel + ' input').value === opt", arg=[selector, option]
    )


def fill_text(page, selector: str, text: str) -> None:
    box = page.locator(f"{selector} textarea, {selector} input").first
    box.fill(text)
    box.press("Tab")


def _grids(page) -> set:
    return set((page.server.data / "outputs" / "txt2img-grids").rglob("*.png"))


def test_xyz_plot_from_the_ui_shows_the_grid_and_every_cell(page):
    before = _grids(page)  # the UI is shared with the other browser tests, which may have saved grids
    page.fill("#txt2img_prompt textarea", "a red circle")
    choose(page, "#txt2img_script", "X/Y/Z plot")
    page.wait_for_selector(f"{XYZ}_0", state="visible")
    choose(page, f"{XYZ}_0", "Seed")
    fill_text(page, f"{XYZ}_1", "1,2")
    choose(page, f"{XYZ}_3", "Steps")
    fill_text(page, f"{XYZ}_4", "1,2")
    page.check(f"{XYZ}_10 input[type=checkbox]")  # Include Sub Images
    mark_progress_stale(page, "txt2img")
    page.click("#txt2img_generate")
    wait_job(page, "txt2img", timeout=180)
    thumbs = page.locator("#txt2img_gallery .thumbnails .thumbnail-item")
    page.wait_for_function(
        "() => document.querySelectorAll('#txt2img_gallery .thumbnails .thumbnail-item').length === 5"
    )
    assert thumbs.count() == 5  # the grid and the four cells
    info = page.input_value("#txt2img_infotext textarea")
    assert "Script: X/Y/Z plot" in info and "X Type: Seed" in info and "Y Type: Steps" in info
    # each cell's infotext: select the last thumbnail (seed 2, steps 2)
    thumbs.nth(4).click()
    page.wait_for_function("() => document.querySelector('#txt2img_infotext textarea').value.includes('Seed: 2')")
    cell = page.input_value("#txt2img_infotext textarea")
    assert "Seed: 2" in cell and "Steps: 2" in cell and "Script:" not in cell
    thumbs.nth(1).click()
    page.wait_for_function("() => document.querySelector('#txt2img_infotext textarea').value.includes('Seed: 1,')")
    assert "Steps: 1," in page.input_value("#txt2img_infotext textarea")
    # pasting the grid's parameters chooses the script again and fills its axes (as A1111 does)
    thumbs.nth(0).click()
    page.wait_for_function(
        "() => document.querySelector('#txt2img_infotext textarea').value.includes('Script: X/Y/Z plot')"
    )
    fill_text(page, f"{XYZ}_4", "")
    choose(page, "#txt2img_script", "None")
    page.click("#txt2img_paste")
    page.wait_for_function("() => document.querySelector('#txt2img_script input').value === 'X/Y/Z plot'")
    page.wait_for_selector(f"{XYZ}_0", state="visible")
    assert page.input_value(f"{XYZ}_4 textarea, {XYZ}_4 input") == "1,2"
    assert page.input_value(f"{XYZ}_3 input") == "Steps"
    # the grid was saved (with its infotext) beside the four images
    grids = sorted(_grids(page) - before)
    assert len(grids) == 1
    grid = Image.open(grids[0])
    assert grid.width > 2 * SIZE and grid.height > 2 * SIZE
    assert "Script: X/Y/Z plot" in grid.info["parameters"]
