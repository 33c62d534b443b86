"""Batch mode (`python -m ldm_core batch`): JSONL and CSV inputs make the images and the manifest, -1 seeds are
drawn up front and recorded (the recorded request reproduces the pixels), a rerun skips what is done and redoes
what is missing, and a bad line is reported by its number while the others complete."""

from __future__ import annotations

import csv
import json
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from ldm_core.batch import MANIFEST_NAME, Manifest, count_images, make_item, read_items, request_from_values, run_batch
from ldm_core.cli import main
from ldm_core.config import EngineConfig
from ldm_core.engine import GenerationResult
from ldm_core.generation_requests import GenerationRequest, RequestError
from ldm_core.jobs import JobQueue
from ldm_core.outputs import read_image_info
from ldm_core.service import Service

SMALL = {"steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_models):
    data = tmp_path_factory.mktemp("batch-data")
    ckpt = data / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    shutil.copy(tiny_models["sd1"]["single_file"], ckpt / "tiny.safetensors")
    return data


@pytest.fixture(scope="module")
def service(data_dir):
    svc = Service(EngineConfig.from_data_dir(data_dir, device="cpu", builtin_model_dir=None))
    yield svc
    svc.shutdown()


class CountingService:
    """The in-process service, counting the jobs a batch submits and the most it had unfinished at once."""

    def __init__(self, inner: Service):
        self.inner = inner
        self.submitted: list[GenerationRequest] = []
        self.jobs: list = []
        self.most_in_flight = 0

    def submit(self, request):
        self.submitted.append(request)
        self.jobs.append(self.inner.submit(request))
        self.most_in_flight = max(self.most_in_flight, sum(not j.finished for j in self.jobs))
        return self.jobs[-1]


def _records(out):
    return Manifest(out).records()


def test_jsonl_bad_line_reported_and_rest_complete(tmp_path, data_dir, capsys):
    lines = [
        json.dumps({"prompt": "a red circle", "seed": -1, "sampler_name": "Euler a", **SMALL}),
        json.dumps({"prompt": "a blue square", "seed": 7, "sampler_index": "DPM++ 2M", "send_images": True, **SMALL}),
        json.dumps({"prompt": "too few steps", "steps": 0, "width": 64, "height": 64}),
        "{not json",
        "",
        json.dumps({"prompt": "two at once", "seed": 11, "batch_size": 2, "negative_prompt": None, **SMALL}),
    ]
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code = main(["batch", str(src), "--out", str(out), "--data-dir", str(data_dir), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1  # a bad line makes the run fail, after the others are done
    assert "line 3: steps:" in err and "line 4: not valid JSON" in err
    assert "3 item(s) done (4 image(s)" in err and "2 bad line(s)" in err
    assert "send_images" in err  # unknown keys are ignored, as the API does, and said once
    recs = _records(out)
    assert {n: r["status"] for n, r in recs.items()} == {1: "done", 2: "done", 3: "invalid", 4: "invalid", 6: "done"}
    assert "steps" in recs[3]["error"]
    # the random seed was drawn before the job ran and recorded, in the request and the image
    first = recs[1]
    assert 0 <= first["seeds"][0] < 2**32 and first["request"]["seed"] == first["seeds"][0]
    params, _, _ = read_image_info(Image.open(out / first["files"][0]))
    assert params.startswith("a red circle\n") and f"Seed: {first['seeds'][0]}" in params
    assert "Sampler: DPM++ 2M" in read_image_info(Image.open(out / recs[2]["files"][0]))[0]
    assert recs[6]["seeds"] == [11, 12] and recs[6]["files"] == ["00006-0.png", "00006-1.png"]
    assert all(isinstance(recs[n]["seconds"], float) for n in (1, 2, 6))
    # the recorded request reproduces the pixels
    svc = Service(EngineConfig.from_data_dir(data_dir, device="cpu", builtin_model_dir=None))
    try:
        again = svc.generate(GenerationRequest.build(**{**first["request"], "save_images": False}))
    finally:
        svc.shutdown()
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(Image.open(out / first["files"][0]).convert("RGB")))


def test_csv_input(tmp_path, data_dir, capsys):
    src = tmp_path / "prompts.csv"
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "seed", "steps", "width", "height", "cfg_scale", "styles", "comment"])
        w.writerow(["a red circle", "5", "2", "64", "64", "6.5", "", "x"])
        w.writerow(["a green, tall triangle", "", "2", "64", "64", "", "[]", "y"])
    out = tmp_path / "out"
    assert main(["batch", str(src), "--out", str(out), "--data-dir", str(data_dir), "--no-progress"]) == 0
    recs = _records(out)
    assert sorted(recs) == [2, 3]  # CSV line numbers (the header is line 1)
    assert recs[2]["seeds"] == [5] and recs[2]["request"]["cfg_scale"] == 6.5
    assert recs[3]["seeds"][0] >= 0 and recs[3]["request"]["prompt"] == "a green, tall triangle"
    assert sorted(p.name for p in out.glob("*.png")) == ["00002-0.png", "00003-0.png"]
    bad = tmp_path / "bad.csv"
    bad.write_text("text,seed\nhello,1\n")
    assert main(["batch", str(bad), "--out", str(out), "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert "input: " in err and "'prompt' column" in err


def test_rerun_skips_done_and_redoes_partial(tmp_path, service):
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"item {i}", "seed": -1, **SMALL}) + "\n" for i in range(4)))
    out = tmp_path / "out"
    first = CountingService(service)
    report = run_batch(first, read_items(src), out, window=2, progress=False)
    assert report.ok and report.done == 4 and len(first.submitted) == 4
    assert first.most_in_flight <= 2  # never more than the window
    seeds = {n: r["seeds"][0] for n, r in _records(out).items()}

    again = CountingService(service)
    report = run_batch(again, read_items(src), out, window=2, progress=False)
    assert report.skipped == 4 and again.submitted == []  # nothing is redone

    (out / "00002-0.png").unlink()  # a partly written item: its image is gone
    with open(out / MANIFEST_NAME, "a") as f:
        f.write('{"line": 3, "status": "do')  # a torn last record from a crash mid-write
    src.write_text(src.read_text().replace("item 3", "item three"))  # an edited line is a new item
    assert count_images(read_items(src), out) == 2  # what the progress bar expects
    third = CountingService(service)
    report = run_batch(third, read_items(src), out, window=2, progress=False)
    assert sorted(r.prompt for r in third.submitted) == ["item 1", "item three"]
    assert report.skipped == 2 and report.done == 2
    recs = _records(out)
    assert all(r["status"] == "done" for r in recs.values()) and (out / "00002-0.png").is_file()
    assert recs[1]["seeds"][0] == seeds[1]  # skipped items keep their record

    limited = CountingService(service)
    run_batch(limited, read_items(src), tmp_path / "out2", limit=1, progress=False)
    assert [r.prompt for r in limited.submitted] == ["item 0"]


class RefusingService(CountingService):
    """Refuses a request before queueing it, as a service may (RequestError at submit)."""

    def submit(self, request):
        if request.prompt == "refused":
            raise RequestError("model", "refused at submit")
        return super().submit(request)


def test_failed_job_is_reported_and_others_complete(tmp_path, service):
    items = [
        make_item(5, {"prompt": "refused", **SMALL}),
        make_item(1, {"prompt": "ok", "seed": 1, **SMALL}),
        make_item(2, {"prompt": "bad", "sampler_name": "No Such Sampler", **SMALL}),
        make_item(3, {"prompt": "ok too", "override_settings": {"sd_model_checkpoint": "missing-model"}, **SMALL}),
        make_item(4, {"prompt": "ok", "seed": 2, **SMALL}),
    ]
    messages: list[str] = []
    report = run_batch(RefusingService(service), items, tmp_path, window=3, progress=False, log=messages.append)
    assert report.done == 2 and [n for n, _ in report.failed] == [5, 2, 3] and not report.ok
    assert "sampler_name" in report.failed[1][1] and "model" in report.failed[2][1]
    assert any(m.startswith("line 2: failed: sampler_name") for m in messages)
    assert _records(tmp_path)[3]["status"] == "failed"


class SlowService:
    """A service of 2 workers whose jobs take 50 ms each (no engine): shows how the batch feeds a pool."""

    def __init__(self):
        self.queue = JobQueue(workers=2)
        self.jobs: list = []
        self.most_in_flight = 0

    def submit(self, request):
        def run(ctx):
            time.sleep(0.05)
            image = Image.new("RGB", (8, 8), (request.seed % 256, 0, 0))
            return GenerationResult(images=[image], infotexts=["x"], seeds=[request.seed], subseeds=[-1])

        self.jobs.append(self.queue.submit(run, request=request))
        self.most_in_flight = max(self.most_in_flight, sum(not j.finished for j in self.jobs))
        return self.jobs[-1]


def test_window_keeps_the_pool_fed(tmp_path):
    svc = SlowService()
    try:
        items = [make_item(i + 1, {"prompt": f"p{i}", "seed": i}) for i in range(12)]
        t = time.perf_counter()
        report = run_batch(svc, items, tmp_path, window=4, progress=False)
        elapsed = time.perf_counter() - t
    finally:
        svc.queue.shutdown()
    assert report.done == 12 and svc.most_in_flight == 4
    assert elapsed < 12 * 0.05  # both workers were busy: well under the serial time


def test_override_settings_map_like_the_api():
    request, ignored = request_from_values(
        {
            "prompt": "x",
            "override_settings": {"CLIP_stop_at_last_layers": "2", "eta_noise_seed_delta": 31337, "no_such": 1},
        }
    )
    assert request.clip_skip == 2 and request.eta_noise_seed_delta == 31337
    assert ignored == ["override_settings.no_such"]
    with pytest.raises(RequestError) as e:
        request_from_values({"prompt": "x", "override_settings": {"CLIP_stop_at_last_layers": "many"}})
    assert e.value.field == "override_settings.CLIP_stop_at_last_layers"
