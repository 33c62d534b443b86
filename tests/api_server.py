"""A real API server for tests: `python -m api.server` in a subprocess on a free loopback port, started the
same way for every API test module (offline, one torch thread, logs in the data folder), and base64 helpers
for the images such tests send and read."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_api_server(
    data: Path,
    args: list[str],
    prepare: Callable[[], None] = lambda: None,
    auth: tuple[str, str] | None = None,
) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """Start the API server on `data` with extra flags `args`, run `prepare()` while it imports torch (e.g.
    copy tiny models into its folders), wait until it answers, refresh its checkpoint list, and yield
    (base URL, process, log path). The server is stopped on exit and its log tail printed."""
    log = data / "server.log"
    port = free_port()
    # one torch thread: on a shared, busy CPU several OpenMP threads spin-wait and run 20x slower
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "api.server", "--port", str(port), "--data-dir", str(data)]
    cmd += ["--no-builtin-model", "--device", "cpu", "--log-level", "warning", *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        prepare()
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited early:\n{log.read_text()}")
            try:
                if requests.get(url + "/sdapi/v1/memory", auth=auth, timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not start:\n{log.read_text()}")
            time.sleep(0.3)
        refreshed = requests.post(url + "/sdapi/v1/refresh-checkpoints", auth=auth, timeout=120)
        assert refreshed.status_code == 200, refreshed.text
        yield url, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        print(log.read_text()[-3000:])


def png_b64(image: Image.Image) -> str:
    """A bare base64 PNG of `image`."""
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode_b64(text: str) -> Image.Image:
    """The image in a bare base64 string."""
    return Image.open(io.BytesIO(base64.b64decode(text)))
