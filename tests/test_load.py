"""Load and faults (issue 16, item 5): many clients at once, a full queue, a full disk.

- 50 jobs posted at once to the native jobs API of a real server (tests/api_server.py, tiny SD1, 64x64,
  1 step) while a long "blocker" job holds the worker: each gets its own queue position, a full queue answers
  503 with `Retry-After` (native and A1111 routes), a queued job shows its own progress (none of the running
  blocker's), and after the blocker is cancelled all 50 run in the order they were queued (FIFO), each client
  sees only its own job's progress, and each saved image is there once, with its client's prompt and seed.
- The same with three browser pages of the web UI generating alongside (`-m slow`: 34-47 s on this 2-core
  machine, most of it starting webui.py and Chromium; the default run keeps the API-only variant).
- A full disk while saving (ldm_core.outputs' injectable writer, `EngineConfig.output_writer`): a clear
  `DiskFull` error (507 over the API), no partial or temp file, earlier images untouched, the server still
  serving.
"""

from __future__ import annotations

import errno
import hashlib
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from api_server import running_api_server
from PIL import Image

from ldm_core.outputs import DiskFull, disk_full_writer, read_image_info, save_image, write_durably

SIZE = 64
CLIENTS = 50
TIMEOUT = 120


def job_body(i: int, **kw) -> dict:
    return {"prompt": f"job {i}", "seed": 1000 + i, "steps": 1, "width": SIZE, "height": SIZE,
            "sampler_name": "Euler", "save_images": True, **kw}  # fmt: skip


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too: a leftover temp file counts) -> sha256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


# ---- 50 clients, a full queue -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    data = tmp_path_factory.mktemp("loaddata")
    (data / "models" / "Stable-diffusion").mkdir(parents=True)

    def prepare():
        tiny = request.getfixturevalue("tiny_models")["sd1"]["diffusers"]
        shutil.copytree(tiny, data / "models" / "Stable-diffusion" / "tiny")

    with running_api_server(data, ["--max-queued", str(CLIENTS)], prepare) as (url, proc, _log):
        yield url, data, proc


def wait_state(url: str, job_id: str, states: tuple[str, ...], timeout: float = TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{url}/api/v1/jobs/{job_id}", params={"images": "false"}, timeout=TIMEOUT).json()
        if job["state"] in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout}s")


def follow(url: str, job_id: str) -> tuple[dict, list[dict]]:
    """What one client sees: its job polled until it ends (every answer kept), then its result."""
    seen = []
    deadline = time.monotonic() + 4 * TIMEOUT
    while time.monotonic() < deadline:
        job = requests.get(f"{url}/api/v1/jobs/{job_id}", params={"images": "false"}, timeout=TIMEOUT).json()
        seen.append(job)
        if job["state"] not in ("queued", "running"):
            return job, seen
        time.sleep(0.5)  # 50 clients polling faster would take the server's CPU (and GIL) from the worker
    raise AssertionError(f"job {job_id} did not end")


def test_fifty_clients_fifo_own_progress_and_full_queue(server):
    url, data, proc = server
    outputs = data / "outputs"
    before = snapshot(outputs) if outputs.exists() else {}
    # a long job holds the one worker, so the 50 below queue up behind it
    blocker = requests.post(f"{url}/api/v1/jobs", json=job_body(-1, steps=1000, save_images=False), timeout=TIMEOUT)
    assert blocker.status_code == 202, blocker.text
    blocker_id = blocker.json()["id"]
    wait_state(url, blocker_id, ("running",))
    while requests.get(f"{url}/api/v1/jobs/{blocker_id}", timeout=TIMEOUT).json()["progress"]["step"] < 1:
        time.sleep(0.05)  # the model is loaded and the blocker is denoising
    start = threading.Barrier(CLIENTS)

    def post(i: int) -> dict:
        start.wait()  # all at once
        r = requests.post(f"{url}/api/v1/jobs", json=job_body(i), timeout=TIMEOUT)
        assert r.status_code == 202, (i, r.status_code, r.text)
        return {"i": i, **r.json()}

    with ThreadPoolExecutor(CLIENTS) as pool:
        created = list(pool.map(post, range(CLIENTS)))
    assert requests.get(f"{url}/api/v1/jobs/{blocker_id}", timeout=TIMEOUT).json()["state"] == "running"
    # every client got its own place in the queue
    assert sorted(c["position"] for c in created) == list(range(1, CLIENTS + 1))

    # the queue is full: 503 with Retry-After, on the native and the A1111 route, and nothing is queued
    for path, body in (("/api/v1/jobs", job_body(99)), ("/sdapi/v1/txt2img", job_body(99))):
        full = requests.post(url + path, json=body, timeout=TIMEOUT)
        assert full.status_code == 503, (path, full.status_code, full.text)
        assert full.headers.get("Retry-After", "").isdigit() and int(full.headers["Retry-After"]) > 0, full.headers
        assert full.json()["error"] == "QueueFull"
    queue = requests.get(f"{url}/api/v1/queue", timeout=TIMEOUT).json()
    assert len(queue["queued"]) == CLIENTS and queue["running"]["id"] == blocker_id

    # a queued job shows its own state, not the running blocker's steps
    running = requests.get(f"{url}/api/v1/jobs/{blocker_id}", params={"images": "false"}, timeout=TIMEOUT).json()
    assert running["progress"]["steps"] == 1000
    for c in (created[0], created[-1]):
        mine = requests.get(f"{url}/api/v1/jobs/{c['id']}", params={"images": "false"}, timeout=TIMEOUT).json()
        assert mine["id"] == c["id"] and mine["state"] == "queued" and mine["position"] == c["position"]
        assert mine["progress"]["fraction"] == 0 and mine["progress"]["step"] == 0, mine["progress"]

    assert requests.delete(f"{url}/api/v1/jobs/{blocker_id}", timeout=TIMEOUT).json()["cancelled"]
    with ThreadPoolExecutor(CLIENTS) as pool:
        followed = list(pool.map(lambda c: follow(url, c["id"]), created))

    for c, (final, seen) in zip(created, followed, strict=True):
        assert all(s["id"] == c["id"] for s in seen)  # each client reads its own job only
        # its own progress: one step of one image, never the blocker's 1000 steps
        assert all(s["progress"]["steps"] in (0, 1) and s["progress"]["step"] <= 1 for s in seen), seen
        assert final["state"] == "done", final
        full = requests.get(f"{url}/api/v1/jobs/{c['id']}", params={"images": "false"}, timeout=TIMEOUT).json()
        result = full["result"]
        assert result["seeds"] == [1000 + c["i"]] and result["infotexts"][0].startswith(f"job {c['i']}\n")
    # first in, first out: started (and finished) in the order they were queued
    by_position = sorted(zip(created, (f for f, _ in followed), strict=True), key=lambda cf: cf[0]["position"])
    started = [f["started_at"] for _, f in by_position]
    finished = [f["finished_at"] for _, f in by_position]
    assert started == sorted(started) and finished == sorted(finished)
    # none lost: one saved image per client, each with that client's prompt and seed; nothing overwritten
    after = snapshot(outputs)
    assert all(after.get(k) == v for k, v in before.items())
    new = [outputs / k for k in after if k not in before]
    assert len(new) == CLIENTS and all(p.suffix == ".png" for p in new), sorted(map(str, new))[:5]
    prompts = set()
    for path in new:
        with Image.open(path) as im:
            prompts.add(read_image_info(im)[0].split("\n", 1)[0])
    assert prompts == {f"job {i}" for i in range(CLIENTS)}
    assert proc.poll() is None


# ---- a full disk ---------------------------------------------------------------------------------------------
def test_disk_full_while_saving_leaves_no_partial_file(tmp_path):
    folder = tmp_path / "out"
    first = [save_image(Image.new("RGB", (SIZE, SIZE), c), folder, infotext="x", manifest=None, seed=i)
             for i, c in enumerate(("red", "blue"))]  # fmt: skip
    before = snapshot(folder)
    for after_bytes in (0, 100, 10**6):  # nothing written, part of the file, all of it (the fsync fails)
        with pytest.raises(DiskFull) as err:
            save_image(
                Image.new("RGB", (SIZE, SIZE), "green"), folder, infotext="x", manifest=None, seed=9,
                writer=disk_full_writer(after_bytes),
            )  # fmt: skip
        assert err.value.errno == errno.ENOSPC and "disk full" in str(err.value) and str(folder) in str(err.value)
        assert snapshot(folder) == before  # no partial file, no temp or reservation file, earlier files intact
    assert all(p.exists() for p in first)
    again = save_image(Image.new("RGB", (SIZE, SIZE), "green"), folder, infotext="x", manifest=None, seed=9)
    assert again.name.startswith("00002-")  # the failed saves took no number


class SwitchableDisk:
    """A writer whose disk can be made full (`full = True`): the test's fault injection, passed explicitly
    through EngineConfig.output_writer."""

    def __init__(self) -> None:
        self.full = False

    def __call__(self, f, data: bytes) -> None:
        (disk_full_writer(len(data) // 2) if self.full else write_durably)(f, data)


def test_disk_full_through_the_api(tmp_path, tiny_models):
    import fastapi
    from fastapi.testclient import TestClient

    from api import install
    from ldm_core.config import EngineConfig
    from ldm_core.service import Service

    (tmp_path / "models" / "Stable-diffusion").mkdir(parents=True)
    shutil.copytree(tiny_models["sd1"]["diffusers"], tmp_path / "models" / "Stable-diffusion" / "tiny")
    disk = SwitchableDisk()
    config = EngineConfig.from_data_dir(
        tmp_path, builtin_model_dir=None, device="cpu", preview_every=0, output_writer=disk
    )
    service = Service(config)
    app = fastapi.FastAPI()
    install(app, service)
    outputs = tmp_path / "outputs"
    body = {"prompt": "a cat", "steps": 1, "width": SIZE, "height": SIZE, "save_images": True}
    try:
        with TestClient(app) as client:
            assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
            before = snapshot(outputs)
            assert len(before) == 1
            disk.full = True
            r = client.post("/sdapi/v1/txt2img", json=body)
            assert r.status_code == 507, r.text
            assert "disk full" in r.json()["detail"] and "no partial file" in r.json()["detail"]
            assert snapshot(outputs) == before
            # still serving: a request that saves nothing works, and saving works again once there is space
            assert client.post("/sdapi/v1/txt2img", json={**body, "save_images": False}).status_code == 200
            disk.full = False
            assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
            assert len(snapshot(outputs)) == 2 and all(snapshot(outputs)[k] == v for k, v in before.items())
    finally:
        service.shutdown()


# ---- and three browser pages ----------------------------------------------------------------------------------
@pytest.mark.slow  # 34-47 s here (webui.py + Chromium start); the API-only variant above runs by default
@pytest.mark.browser
def test_fifty_api_clients_and_three_browser_pages(tmp_path_factory):
    import re

    from browser_helpers import CHROMIUM_ARGS, WebUI, chromium_path, make_data_dir, mark_progress_stale, progress_state

    if chromium_path() is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    from tiny_models import build_tiny_model

    sd1 = build_tiny_model("sd1", tmp_path_factory.mktemp("load_model"))["single_file"]
    data = make_data_dir(tmp_path_factory.mktemp("load_ui"), sd1)  # pages: 64x64, 2 steps
    ui = WebUI.start(data, "--api", "--max-queued", str(CLIENTS + 10))
    url = ui.url.rstrip("/")
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            pages = []
            for k in range(3):  # three separate clients (own browser contexts: own sessions)
                page = browser.new_context(viewport={"width": 1200, "height": 900}).new_page()
                page.set_default_timeout(120000)
                page.goto(ui.url)
                page.wait_for_selector("#txt2img_generate")
                page.wait_for_function(
                    "() => document.querySelector('#txt2img_width input[type=number]').value == '64'"
                )
                page.fill("#txt2img_prompt textarea", f"page {k}")
                page.fill("#txt2img_seed input", str(500 + k))
                pages.append(page)
            blocker = requests.post(f"{url}/api/v1/jobs", json=job_body(-1, steps=1000, save_images=False), timeout=60)
            blocker_id = blocker.json()["id"]
            wait_state(url, blocker_id, ("running",))
            for k, page in enumerate(pages):  # queued in page order, each sees its own place
                mark_progress_stale(page, "txt2img")
                page.click("#txt2img_generate")
                page.wait_for_function(
                    "() => document.querySelector('#txt2img_progress .ldm-progress').dataset.state === 'queued'"
                )
                assert page.get_attribute("#txt2img_progress .ldm-progress", "data-position") == str(k + 1)
            with ThreadPoolExecutor(CLIENTS) as pool:
                created = list(
                    pool.map(
                        lambda i: requests.post(f"{url}/api/v1/jobs", json=job_body(i), timeout=60).json(),
                        range(CLIENTS),
                    )
                )  # noqa: E501
            assert sorted(c["position"] for c in created) == list(range(4, CLIENTS + 4))
            requests.delete(f"{url}/api/v1/jobs/{blocker_id}", timeout=60)
            with ThreadPoolExecutor(CLIENTS) as pool:
                futures = [pool.submit(follow, url, c["id"]) for c in created]
                shown: list[set[str]] = [set() for _ in pages]
                while any(progress_state(pg, "txt2img") not in ("done", "error") for pg in pages):
                    for k, pg in enumerate(pages):
                        shown[k].update(re.findall(r"Step \d+/\d+", pg.inner_text("#txt2img_progress")))
                    time.sleep(0.1)
                followed = [f.result() for f in futures]
            for k, page in enumerate(pages):
                assert progress_state(page, "txt2img") == "done"
                # its own job's steps (2) only: never the blocker's 1000 or an API job's 1
                assert all(s.endswith("/2") for s in shown[k]), shown[k]
                info = page.input_value("#txt2img_infotext textarea")
                assert info.startswith(f"page {k}\n") and f"Seed: {500 + k}" in info, info
            browser.close()
        for c, (final, seen) in zip(created, followed, strict=True):
            assert final["state"] == "done" and all(s["id"] == c["id"] for s in seen)
            assert all(s["progress"]["steps"] in (0, 1) for s in seen)
        # FIFO and none lost: the saved files' numbers follow the queue: pages 0-2, then the API jobs by position
        files = sorted((data / "outputs" / "txt2img").rglob("*.png"))
        prompts = []
        for path in files:
            with Image.open(path) as im:
                prompts.append(read_image_info(im)[0].split("\n", 1)[0])
        by_position = [f"job {i}" for _, i in sorted((c["position"], i) for i, c in enumerate(created))]
        assert prompts == ["page 0", "page 1", "page 2", *by_position]
    finally:
        ui.stop()
