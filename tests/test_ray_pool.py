"""The Ray pool (ldm_core.cluster) through the real API: `python -m api.server --ray-local 2` starts a local Ray
cluster of 2 single-thread CPU replicas inside the test (no external service) with two tiny SD1 checkpoints.

A batch of 20 jobs completes with every result once; killing a replica mid-batch loses and duplicates nothing;
a job for a checkpoint loaded on one replica goes to that replica (the worker id in the job's state); interrupt
reaches the replica; the same seed gives the same pixels on either replica. Without Ray flags nothing imports
Ray (this test runs without Ray installed too; the others are skipped then, as in CI, where Ray is optional).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from api_server import REPO, decode_b64, running_api_server

HAVE_RAY = importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.serve") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="ray[serve] is optional (pip install -r requirements-ray.txt)")
pytestmark = pytest.mark.ray

TIMEOUT = 180
SIZE = 64


def test_default_path_does_not_import_ray():
    """Without Ray flags both launchers and make_service run without importing Ray."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import api.server, webui\n"
        "from ldm_core.config import EngineConfig\n"
        "from ldm_core.scaleout import ray_service_args\n"
        "from ldm_core.service import Service, make_service\n"
        "args = api.server.build_parser().parse_args([])\n"
        "assert ray_service_args(args)['ray_local'] == 0 and webui.build_parser().parse_args([]).ray_address is None\n"
        "cfg = EngineConfig.from_data_dir(sys.argv[1], device='cpu', builtin_model_dir=None)\n"
        "svc = make_service(cfg, max_queued=3, **ray_service_args(args))\n"
        "assert type(svc) is Service and svc.queue.max_queued == 3 and svc.queue.workers == 1\n"
        "svc.shutdown()\n"
        "loaded = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "tests")], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_bad_pool_flags_are_refused_naming_them(tmp_path):
    from ldm_core.config import EngineConfig
    from ldm_core.service import make_service

    cfg = EngineConfig.from_data_dir(tmp_path, device="cpu", builtin_model_dir=None)
    for kwargs, name in (
        ({"ray_address": "auto", "ray_local": 2}, "ray_address"),
        ({"ray_local": -1}, "ray_local"),
        ({"ray_local": 2, "ray_threads": 0}, "ray_threads"),
        ({"ray_local": 2, "min_replicas": -1}, "min_replicas"),
        ({"ray_local": 2, "min_replicas": 3, "max_replicas": 2}, "max_replicas"),
    ):
        with pytest.raises(ValueError, match=name):
            make_service(cfg, **kwargs)


def test_job_queue_with_workers_runs_that_many_jobs_at_once():
    """The queue a pool uses (no Ray needed): N workers run N jobs at once, each at position 0; interrupt
    reaches every running job; the rest wait in order."""
    import threading

    from ldm_core.jobs import JobQueue

    queue = JobQueue(workers=2)
    gate = threading.Event()

    def run(ctx):
        while not ctx.cancel.interrupted and not gate.is_set():
            time.sleep(0.01)
        return ctx.cancel.interrupted

    try:
        jobs = [queue.submit(run) for _ in range(3)]
        deadline = time.monotonic() + 10
        while len(queue.running()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert [queue.position(j) for j in jobs] == [0, 0, 1] and queue.current is jobs[0]
        assert queue.pending_count() == 3
        assert queue.interrupt_current()
        assert jobs[0].wait(5) and jobs[1].wait(5) and jobs[0].result is True and jobs[1].result is True
        gate.set()
        assert jobs[2].wait(5) and jobs[2].result is False
    finally:
        gate.set()
        queue.shutdown()
    with pytest.raises(ValueError, match="workers"):
        JobQueue(workers=0)


class Pool:
    def __init__(self, url: str, data: Path):
        self.url, self.data = url, data
        self.s = requests.Session()

    def post(self, path: str, body: dict | None = None) -> requests.Response:
        return self.s.post(self.url + path, json=body, timeout=TIMEOUT)

    def get(self, path: str) -> requests.Response:
        return self.s.get(self.url + path, timeout=TIMEOUT)

    def submit(self, **kw) -> str:
        body = {"prompt": "a red circle", "steps": 3, "width": SIZE, "height": SIZE, "sampler_name": "Euler", **kw}
        r = self.post("/api/v1/jobs", body)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def job(self, job_id: str, images: bool = False) -> dict:
        return self.get(f"/api/v1/jobs/{job_id}?images={str(images).lower()}").json()

    def wait(self, job_ids: list[str], images: bool = False) -> list[dict]:
        deadline = time.monotonic() + TIMEOUT
        out = {}
        while len(out) < len(job_ids):
            for job_id in job_ids:
                if job_id not in out:
                    job = self.job(job_id)
                    if job["state"] in ("done", "failed", "cancelled"):
                        out[job_id] = self.job(job_id, images) if images else job
            assert time.monotonic() < deadline, f"jobs still running: {set(job_ids) - set(out)}"
            time.sleep(0.1)
        return [out[j] for j in job_ids]

    def running_on(self, job_id: str, min_step: int = 1) -> dict:
        """Wait until the job runs on a replica and has made `min_step` steps; its summary."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            job = self.job(job_id)
            assert job["state"] in ("queued", "running"), job
            if job["state"] == "running" and job["worker"] and job["progress"]["step"] >= min_step:
                return job
            assert time.monotonic() < deadline, job
            time.sleep(0.05)

    def saved(self) -> list[Path]:
        return sorted((self.data / "outputs").rglob("*.png"))


@pytest.fixture(scope="module")
def pool(tmp_path_factory, request):
    if not HAVE_RAY:
        pytest.skip("ray[serve] is optional (pip install -r requirements-ray.txt)")
    data = tmp_path_factory.mktemp("raydata")
    ckpt = data / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)

    def prepare():  # the models are copied while the server starts; a refresh then finds them
        tiny = request.getfixturevalue("tiny_models")["sd1"]["single_file"]
        shutil.copy(tiny, ckpt / "tiny-a.safetensors")
        shutil.copy(tiny, ckpt / "tiny-b.safetensors")

    args = ["--ray-local", "2", "--ray-threads", "1", "--max-queued", "64"]
    with running_api_server(data, args, prepare) as (url, _proc, _log):
        yield Pool(url, data)


@needs_ray
def test_two_workers_complete_a_batch_of_20(pool):
    before = len(pool.saved())
    seeds = list(range(100, 120))
    ids = [pool.submit(seed=s, prompt=f"prompt {s}") for s in seeds]
    assert len(set(ids)) == 20
    jobs = pool.wait(ids, images=True)
    assert [j["state"] for j in jobs] == ["done"] * 20, [j["error"] for j in jobs]
    assert [j["result"]["seeds"] for j in jobs] == [[s] for s in seeds]  # every job its own result, once
    assert all(len(j["result"]["images"]) == 1 for j in jobs)
    workers = {j["worker"] for j in jobs}
    assert len(workers) == 2, workers  # both replicas took jobs
    assert len(pool.saved()) == before + 20  # each image made (and saved) exactly once
    queue = pool.get("/api/v1/queue").json()
    assert queue["running"] is None and queue["queued"] == [] and queue["running_all"] == []


@needs_ray
def test_same_seed_same_pixels_on_either_worker(pool):
    ids = [pool.submit(seed=4242, steps=12) for _ in range(2)]  # two at once: one per replica
    jobs = pool.wait(ids, images=True)
    assert jobs[0]["worker"] != jobs[1]["worker"], "both jobs ran on one replica"
    a, b = (np.asarray(decode_b64(j["result"]["images"][0]).convert("RGB")) for j in jobs)
    assert np.array_equal(a, b)


@needs_ray
def test_a_checkpoint_goes_to_the_replica_that_has_it(pool):
    # two jobs at once, one per checkpoint: each replica loads one (the engine keeps one model per replica)
    first = pool.wait([pool.submit(model="tiny-a", steps=12), pool.submit(model="tiny-b", steps=12)])
    on = {"tiny-a": first[0]["worker"], "tiny-b": first[1]["worker"]}
    assert on["tiny-a"] != on["tiny-b"], on
    time.sleep(1.5)  # replicas report their loaded models to Serve's routers
    for name in ["tiny-b", "tiny-a", "tiny-a", "tiny-b", "tiny-a", "tiny-b"]:
        (job,) = pool.wait([pool.submit(model=name, seed=1)])
        assert job["state"] == "done" and job["worker"] == on[name], (name, job, on)


@needs_ray
def test_progress_preview_and_interrupt_through_the_pool(pool):
    job_id = pool.submit(steps=150, seed=5)
    running = pool.running_on(job_id)
    progress = pool.get("/sdapi/v1/progress?skip_current_image=true").json()
    assert progress["current_task"] == job_id and progress["state"]["worker"] == running["worker"]
    deadline = time.monotonic() + 20
    while (preview := pool.get(f"/api/v1/jobs/{job_id}?images=false&preview=true").json()["preview"]) is None:
        assert time.monotonic() < deadline, "no live preview came back from the replica"
        time.sleep(0.05)
    assert min(decode_b64(preview).size) > 0  # the replica's live preview, streamed to the head
    t0 = time.monotonic()
    assert pool.post("/sdapi/v1/interrupt").status_code == 200
    (job,) = pool.wait([job_id], images=True)
    assert job["state"] == "done" and job["result"]["interrupted"] is True, job
    assert job["progress"]["step"] < 150 and time.monotonic() - t0 < 30
    assert len(job["result"]["images"]) == 1  # the partial result, decoded


@needs_ray
def test_skip_reaches_the_worker(pool):
    job_id = pool.submit(steps=60, n_iter=2, seed=70)
    pool.running_on(job_id)
    assert pool.post("/sdapi/v1/skip").status_code == 200
    full = pool.submit(steps=60, n_iter=2, seed=70)
    skipped, unskipped = pool.wait([job_id, full], images=True)
    assert skipped["state"] == "done" and not skipped["result"]["interrupted"]
    assert skipped["result"]["seeds"] == [70, 71]
    first, second = (
        np.asarray(decode_b64(j["result"]["images"][i]).convert("RGB")) for j, i in ((skipped, 0), (skipped, 1))
    )
    ref_first, ref_second = (np.asarray(decode_b64(unskipped["result"]["images"][i]).convert("RGB")) for i in (0, 1))
    assert not np.array_equal(first, ref_first)  # the first batch was cut short on its replica
    assert np.array_equal(second, ref_second)  # the next batch ran in full


@needs_ray
def test_killing_a_worker_mid_batch_loses_and_duplicates_nothing(pool):
    before = len(pool.saved())
    seeds = list(range(300, 310))
    with ThreadPoolExecutor(4) as ex:
        ids = list(ex.map(lambda s: pool.submit(seed=s, steps=25), seeds))
    victim = pool.running_on(ids[0], min_step=2)
    pid = int(victim["worker"].rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    jobs = pool.wait(ids)
    assert [j["state"] for j in jobs] == ["done"] * 10, [j["error"] for j in jobs]
    assert [pool.job(i, images=True)["result"]["seeds"] for i in ids] == [[s] for s in seeds]
    assert jobs[0]["worker"] != victim["worker"]  # retried elsewhere
    assert len(pool.saved()) == before + 10  # nothing lost, nothing made twice
