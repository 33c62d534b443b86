"""Helpers for the browser tests: start `webui.py` as a subprocess on a free loopback port over a data dir
with a tiny model, launch Debian's Chromium through Playwright (never `playwright install`), and small
page utilities (wait for a job, read a toast, upload a file)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SIZE = 64  # every image in the browser tests is this small


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_data_dir(root: Path, model_file: Path) -> Path:
    """An A1111-layout data dir holding `model_file`, settings for tiny, quick jobs and one style."""
    ckpt = root / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True, exist_ok=True)
    shutil.copy2(model_file, ckpt / "tiny-sd1.safetensors")
    (root / "config.json").write_text(
        json.dumps(
            {
                "default_width": SIZE,
                "default_height": SIZE,
                "default_steps": 2,
                "show_progress_every_n_steps": 1,
            }
        )
    )
    (root / "styles.csv").write_text('name,prompt,negative_prompt\nmoody,"{prompt}, dark",bright\n')
    return root


class WebUI:
    """A running `webui.py`; `stop()` ends it (only this process, by its pid)."""

    def __init__(self, data: Path, port: int, log: Path, proc: subprocess.Popen):
        self.data, self.port, self.log, self.proc = data, port, log, proc
        self.url = f"http://127.0.0.1:{port}/"

    @classmethod
    def start(cls, data: Path, *extra: str, timeout: float = 240.0) -> WebUI:
        port = free_port()
        log = data / "webui.log"
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "GRADIO_ANALYTICS_ENABLED": "False",
            "GRADIO_TEMP_DIR": str(data / "gradio-tmp"),
            "PYTHONUNBUFFERED": "1",
            # leave a core to the browser: torch would otherwise take every core of a 2-core machine
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        }
        cmd = [
            sys.executable,
            str(REPO / "webui.py"),
            "--data-dir",
            str(data),
            "--port",
            str(port),
            "--no-builtin-model",
            "--ckpt",
            "tiny-sd1.safetensors",
            *extra,
        ]
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
        ui = cls(data, port, log, proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"webui.py exited ({proc.returncode}):\n{ui.log_tail()}")
            if "Running on local URL" in log.read_text(errors="replace"):
                return ui
            time.sleep(0.25)
        ui.stop()
        raise RuntimeError(f"webui.py did not start within {timeout:.0f}s:\n{ui.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def newest_output(self, mode: str) -> Path:
        files = sorted((self.data / "outputs" / mode).rglob("*.png"), key=lambda p: p.stat().st_mtime_ns)
        assert files, f"no image saved under outputs/{mode}"
        return files[-1]


# ---- page utilities -----------------------------------------------------------------------------------
@contextmanager
def opened_page(ui: WebUI, height: int = 1000) -> Iterator:
    """A Chromium page (1400 px wide, `height` tall) on `ui`, loaded, with the page-load event's defaults from
    config.json set; `page.server` is `ui`."""
    from playwright import sync_api

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": height})
        page.set_default_timeout(60000)
        page.goto(ui.url)
        page.wait_for_selector("#txt2img_generate")
        page.wait_for_function(f"() => document.querySelector('#txt2img_width input[type=number]').value == '{SIZE}'")
        page.server = ui
        try:
            yield page
        finally:
            browser.close()


def mark_progress_stale(page, mode: str) -> None:
    """Mark a tab's progress box so `wait_job` only accepts the state of the next job."""
    page.evaluate(f"document.querySelector('#{mode}_progress .ldm-progress').dataset.state = 'stale'")


def progress_state(page, mode: str) -> str:
    return page.get_attribute(f"#{mode}_progress .ldm-progress", "data-state") or ""


def wait_job(page, mode: str, states: tuple[str, ...] = ("done",), timeout: float = 120.0) -> str:
    """Wait until the tab's progress box shows one of `states` (after `mark_progress_stale`); fail fast
    with the toast text when an error toast appears."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = progress_state(page, mode)
        if state in states:
            return state
        toast = toasts(page)
        if toast:
            raise AssertionError(f"{mode}: error toast instead of a result: {toast}")
        time.sleep(0.2)
    raise AssertionError(
        f"{mode}: still {progress_state(page, mode)!r} after {timeout:.0f}s: {page.inner_text(f'#{mode}_progress')!r}"
    )


def toasts(page) -> list[str]:
    return [t.inner_text() for t in page.query_selector_all(".toast-body")]


def close_toasts(page) -> None:
    for btn in page.query_selector_all(".toast-body .toast-close, .toast-body button"):
        try:
            btn.click(timeout=1000)
        except Exception:
            pass
    page.wait_for_function("() => document.querySelectorAll('.toast-body').length === 0", timeout=10000)


def set_number(page, selector: str, value: float | int) -> None:
    """Type a value into a slider's or a number box's input and commit it (blur)."""
    box = page.locator(f"{selector} input[type=number]").first
    box.fill(str(value))
    box.press("Tab")


def js_click(page, selector: str) -> None:
    """Click through the DOM (no waiting for the element to be "stable"): for buttons that must act while
    the page is busy redrawing live progress on a loaded machine."""
    page.wait_for_selector(selector, state="visible")
    page.evaluate(f"document.querySelector('{selector}').click()")


def open_tab(page, tab: str) -> None:
    page.click(f"#tab_{tab}-button")
    page.wait_for_selector(f"#tab_{tab}", state="visible")
