"""The REST API against a real server (`python -m api.server` in a subprocess, real HTTP on loopback) with a
tiny random SD1 model: every A1111 endpoint's shape, reproducible seeds, inpainting, png-info round trip,
live preview and interrupt, 20 concurrent requests, the native jobs API with SSE, auth, limits and errors."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from api_server import decode_b64, png_b64, running_api_server
from PIL import Image
from tiny_models import build_tiny_vae

AUTH = ("alice", "s3cret")
SIZE = 64
MAX_QUEUED = 24
MAX_BODY_MB = 1
TIMEOUT = 60
FRONTEND = "http://localhost:3000"  # an origin the server is told to allow (--cors-allow-origins)


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path, data: Path):
        self.url, self.proc, self.log, self.data = url, proc, log, data
        self.s = requests.Session()
        self.s.auth = AUTH

    def get(self, path, **kw):
        return self.s.get(self.url + path, timeout=kw.pop("timeout", TIMEOUT), **kw)

    def post(self, path, json_body=None, **kw):
        return self.s.post(self.url + path, json=json_body, timeout=kw.pop("timeout", TIMEOUT), **kw)

    def delete(self, path, **kw):
        return self.s.delete(self.url + path, timeout=kw.pop("timeout", TIMEOUT), **kw)


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    data = tmp_path_factory.mktemp("apidata")
    ckpt = data / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    (data / "models" / "Lora").mkdir(parents=True)
    (data / "models" / "Lora" / "detail.safetensors").write_bytes(b"not read by the list")
    (data / "styles.csv").write_text("name,prompt,negative_prompt\nsunny,{prompt} in the sun,rain\n")

    def prepare():  # the tiny model is built while the server imports torch; a refresh then finds it
        tiny = request.getfixturevalue("tiny_models")["sd1"]["diffusers"]
        shutil.copytree(tiny, ckpt / "tiny-a")
        shutil.copytree(tiny, ckpt / "tiny-b")
        (ckpt / "tiny-b.json").write_text('{"sampler_name": "DPM++ 2M", "scheduler": "Exponential"}')
        build_tiny_vae(data / "models" / "VAE" / "tiny-vae.safetensors")

    args = ["--api-auth", f"{AUTH[0]}:{AUTH[1]}", "--max-queued", str(MAX_QUEUED)]
    args += ["--max-body-mb", str(MAX_BODY_MB), "--cors-allow-origins", FRONTEND]
    with running_api_server(data, args, prepare, auth=AUTH) as (url, proc, log):
        yield Server(url, proc, log, data)


b64_png = png_b64
decode = decode_b64


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode(b64).convert("RGB")).astype(np.int16)


def t2i(**kw) -> dict:
    body = {
        "prompt": "a red circle",
        "negative_prompt": "blue",
        "steps": 3,
        "width": SIZE,
        "height": SIZE,
        "seed": 1234,
        "sampler_name": "Euler a",
        "cfg_scale": 5,
    }
    body.update(kw)
    return body


def wait_idle(server: Server, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q = server.get("/api/v1/queue").json()
        if q["running"] is None and not q["queued"]:
            return
        time.sleep(0.05)
    raise AssertionError("queue did not drain")


# ---- shapes --------------------------------------------------------------------------------------------
def test_every_endpoint_answers_with_the_a1111_shape(server):
    samplers = server.get("/sdapi/v1/samplers").json()
    assert {"name", "aliases", "options"} <= set(samplers[0]) and "Euler a" in [s["name"] for s in samplers]
    schedulers = server.get("/sdapi/v1/schedulers").json()
    assert {"name", "label", "aliases", "default_rho", "need_inner_model"} <= set(schedulers[0])
    karras = next(s for s in schedulers if s["label"] == "Karras")
    assert karras["name"] == "karras" and karras["default_rho"] == 7.0  # A1111's id; clients send it back
    assert "sgm_uniform" in [s["name"] for s in schedulers]
    # no interrogator weights are shipped: a clear 501, not a bare 404
    r = server.post("/sdapi/v1/interrogate", {"image": b64_png(Image.new("RGB", (8, 8))), "model": "clip"})
    assert r.status_code == 501 and "interrogator" in r.json()["detail"]
    assert {"None", "Lanczos", "Nearest"} <= {u["name"] for u in server.get("/sdapi/v1/upscalers").json()}
    assert {"name": "Latent"} in server.get("/sdapi/v1/latent-upscale-modes").json()
    models = server.get("/sdapi/v1/sd-models").json()
    assert {"title", "model_name", "hash", "sha256", "filename", "config"} <= set(models[0])
    assert {m["model_name"] for m in models} == {"tiny-a", "tiny-b"}
    assert server.get("/sdapi/v1/sd-vae").json() == [
        {
            "model_name": "tiny-vae.safetensors",
            "filename": str(server.data / "models" / "VAE" / "tiny-vae.safetensors"),
        }
    ]
    loras = server.get("/sdapi/v1/loras").json()
    assert [x["name"] for x in loras] == ["detail"] and {"alias", "path", "metadata"} <= set(loras[0])
    assert set(server.get("/sdapi/v1/embeddings").json()) == {"loaded", "skipped"}
    assert server.get("/sdapi/v1/prompt-styles").json() == [
        {"name": "sunny", "prompt": "{prompt} in the sun", "negative_prompt": "rain"}
    ]
    for empty in ("hypernetworks", "face-restorers", "realesrgan-models"):
        assert server.get(f"/sdapi/v1/{empty}").json() == []
    scripts = server.get("/sdapi/v1/scripts").json()
    assert set(scripts) == {"txt2img", "img2img"} and "x/y/z plot" in scripts["txt2img"]
    assert {"name", "is_alwayson", "is_img2img", "args"} <= set(server.get("/sdapi/v1/script-info").json()[0])
    assert isinstance(server.get("/sdapi/v1/extensions").json(), list)
    assert server.get("/sdapi/v1/memory").json()["ram"]["total"] > 0
    flags = server.get("/sdapi/v1/cmd-flags").json()
    assert flags["data_dir"] == str(server.data) and "api_auth" not in flags
    opts = server.get("/sdapi/v1/options").json()
    assert "sd_model_checkpoint" in opts and opts["CLIP_stop_at_last_layers"] == 1
    prog = server.get("/sdapi/v1/progress").json()
    assert {"progress", "eta_relative", "state", "current_image", "textinfo"} <= set(prog)
    for path in (
        "refresh-checkpoints",
        "refresh-loras",
        "refresh-vae",
        "interrupt",
        "skip",
        "unload-checkpoint",
        "reload-checkpoint",
    ):
        assert server.post(f"/sdapi/v1/{path}").status_code == 200, path
    doc = requests.get(server.url + "/openapi.json", timeout=TIMEOUT).json()
    a1111 = doc["components"]["schemas"]["StableDiffusionTxt2ImgProcessingAPI"]["properties"]
    # A1111's declared defaults; no upper range A1111 does not impose (the server's limits are settings)
    assert a1111["steps"]["minimum"] == 1 and "maximum" not in a1111["steps"] and a1111["steps"]["default"] == 50
    assert a1111["seed_resize_from_h"]["default"] == -1 and a1111["sampler_index"]["default"] == "Euler"
    native = doc["components"]["schemas"]["JobRequest"]["properties"]
    assert (native["clip_skip"]["minimum"], native["clip_skip"]["maximum"]) == (1, 12)
    assert native["steps"]["default"] == 20
    assert "/api/v1/jobs/{job_id}/events" in doc["paths"]


# ---- generation ----------------------------------------------------------------------------------------
def test_txt2img_seed_is_reproducible_and_images_carry_infotext(server):
    # an A1111 client's habits: sampler_index, nulls, s_tmax 0, unknown keys
    body = t2i(
        sampler_name=None,
        sampler_index="Euler",
        s_tmax=0,
        eta=None,
        some_future_key={"x": 1},
        styles=None,
        override_settings={"CLIP_stop_at_last_layers": 2},
    )
    a = server.post("/sdapi/v1/txt2img", body)
    assert a.status_code == 200, a.text
    a = a.json()
    b = server.post("/sdapi/v1/txt2img", body).json()
    c = server.post("/sdapi/v1/txt2img", {**body, "seed": 1235}).json()
    assert set(a) == {"images", "parameters", "info"}
    assert np.array_equal(pixels(a["images"][0]), pixels(b["images"][0]))
    assert not np.array_equal(pixels(a["images"][0]), pixels(c["images"][0]))
    info = json.loads(a["info"])
    assert info["seed"] == 1234 and info["all_seeds"] == [1234] and info["sampler_name"] == "Euler"
    assert info["width"] == SIZE and info["steps"] == 3 and info["clip_skip"] == 2
    assert decode(a["images"][0]).text["parameters"] == info["infotexts"][0]
    assert "Clip skip: 2" in info["infotexts"][0]
    assert a["parameters"]["prompt"] == "a red circle" and a["parameters"]["sampler_index"] == "Euler"
    rnd = server.post("/sdapi/v1/txt2img", t2i(seed=-1, steps=1, send_images=False)).json()
    assert rnd["images"] == [] and json.loads(rnd["info"])["seed"] >= 0


def test_a_request_naming_no_sampler_runs_the_models_recommended_one(server):
    """tiny-b's sidecar recommends DPM++ 2M with the Exponential schedule: a body that names no sampler runs
    it, through both APIs; a named sampler (sampler_index too) wins; a model with no recommendation keeps
    A1111's API default, Euler."""

    def sampling(path, **kw):
        body = {k: v for k, v in t2i(steps=1, **kw).items() if k != "sampler_name" or v is not None}
        r = server.post(path, body)
        assert r.status_code in (200, 202), r.text
        if path == "/api/v1/jobs":
            text = dict(_events(server, r.json()["id"]))["result"]["infotexts"][0]
        else:
            text = json.loads(r.json()["info"])["infotexts"][0]
        return text.split("Sampler: ")[1].split(",")[0], text.split("Schedule type: ")[1].split(",")[0]

    b = {"sd_model_checkpoint": "tiny-b"}
    assert sampling("/sdapi/v1/txt2img", sampler_name=None, override_settings=b) == ("DPM++ 2M", "Exponential")
    assert sampling("/sdapi/v1/txt2img", sampler_name=None, sampler_index="Euler", override_settings=b)[0] == "Euler"
    assert sampling("/sdapi/v1/txt2img", sampler_name="Euler a", override_settings=b) == ("Euler a", "Uniform")
    got = sampling("/sdapi/v1/txt2img", sampler_name=None, scheduler="Karras", override_settings=b)
    assert got == ("DPM++ 2M", "Karras")
    a = {"sd_model_checkpoint": "tiny-a"}
    assert sampling("/sdapi/v1/txt2img", sampler_name=None, override_settings=a) == ("Euler", "Uniform")
    assert sampling("/api/v1/jobs", sampler_name=None, model="tiny-b") == ("DPM++ 2M", "Exponential")


def test_img2img_with_mask_inpaints(server):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    body = t2i(
        init_images=["data:image/png;base64," + b64_png(init)],
        mask=b64_png(mask),
        mask_blur=0,
        denoising_strength=1.0,
        inpainting_fill=1,
        resize_mode=0,
        inpaint_full_res=False,
    )
    r = server.post("/sdapi/v1/img2img", body)
    assert r.status_code == 200, r.text
    out, ref = pixels(r.json()["images"][0]), np.asarray(init).astype(np.int16)
    assert np.array_equal(out[:8], ref[:8])  # away from the mask: kept
    assert np.abs(out[20:44, 20:44] - ref[20:44, 20:44]).mean() > 5  # inside: repainted
    info = json.loads(r.json()["info"])
    assert "Mask blur: 0" in info["infotexts"][0] and "Masked content: original" in info["infotexts"][0]
    assert r.json()["parameters"]["init_images"] is None  # not echoed unless include_init_images
    plain = server.post("/sdapi/v1/img2img", {**body, "mask": None, "denoising_strength": 0.5})
    assert plain.status_code == 200 and "Denoising strength: 0.5" in json.loads(plain.json()["info"])["infotexts"][0]


def test_png_info_round_trips_our_infotext(server):
    res = server.post("/sdapi/v1/txt2img", t2i(prompt="a cat, (red:1.2)", negative_prompt="dog")).json()
    text = json.loads(res["info"])["infotexts"][0]
    r = server.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + res["images"][0]})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["info"] == text
    p = got["parameters"]
    assert p["Prompt"] == "a cat, (red:1.2)" and p["Negative prompt"] == "dog"
    assert p["Seed"] == "1234" and p["Steps"] == "3" and p["Size-1"] == str(SIZE) and p["Size-2"] == str(SIZE)
    assert "ldm_manifest" in got["items"]


def test_progress_shows_a_preview_and_interrupt_stops_the_job(server):
    wait_idle(server)
    result = {}

    def run():
        result["r"] = server.post("/sdapi/v1/txt2img", t2i(steps=150, n_iter=20), timeout=120)

    t = threading.Thread(target=run)
    t0 = time.monotonic()
    t.start()
    prog = None
    while time.monotonic() - t0 < 60:
        prog = server.get("/sdapi/v1/progress").json()
        if prog["current_image"] and prog["state"]["sampling_step"] >= 2:
            break
        time.sleep(0.05)
    assert prog and prog["current_image"], prog
    assert decode(prog["current_image"]).size[0] > 0
    assert 0 < prog["progress"] < 1 and prog["state"]["sampling_steps"] == 150 and prog["state"]["job_count"] == 20
    assert server.get("/sdapi/v1/progress", params={"skip_current_image": "true"}).json()["current_image"] is None
    assert server.post("/sdapi/v1/interrupt").status_code == 200
    t.join(60)
    assert not t.is_alive()
    r = result["r"]
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["interrupted"] is True and len(r.json()["images"]) == 1  # the partial first image
    assert server.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_twenty_concurrent_txt2img_all_complete_distinct(server):
    wait_idle(server)

    def one(i):
        r = requests.post(server.url + "/sdapi/v1/txt2img", json=t2i(seed=100 + i, steps=1), auth=AUTH, timeout=120)
        return i, r

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    seen = set()
    for i, r in results:
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["info"])["seed"] == 100 + i
        seen.add(pixels(r.json()["images"][0]).tobytes())
    assert len(seen) == 20


# ---- native jobs API -----------------------------------------------------------------------------------
def _events(server, job_id):
    events = []
    with server.s.get(f"{server.url}/api/v1/jobs/{job_id}/events", stream=True, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if name == "end":
                    break
    return events


def test_jobs_api_streams_events_to_the_end(server):
    r = server.post("/api/v1/jobs", t2i(steps=4, seed=7))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    events = _events(server, job_id)
    names = [n for n, _ in events]
    assert names[0] == "state" and names[-2:] == ["result", "end"]
    assert "progress" in names and "preview" in names
    assert events[-1][1] == {"id": job_id, "state": "done"}
    result = dict(events)["result"]
    assert result["seeds"] == [7] and decode(result["images"][0]).text["parameters"] == result["infotexts"][0]
    job = server.get(f"/api/v1/jobs/{job_id}").json()
    assert job["state"] == "done" and job["progress"]["fraction"] == 1.0 and job["result"]["seeds"] == [7]
    # the same seed through both APIs gives the same image
    a1111 = server.post("/sdapi/v1/txt2img", t2i(steps=4, seed=7)).json()
    assert np.array_equal(pixels(a1111["images"][0]), pixels(result["images"][0]))
    assert server.delete(f"/api/v1/jobs/{job_id}").json()["cancelled"] is False
    assert server.get("/api/v1/jobs/nope").status_code == 404
    q = server.get("/api/v1/queue").json()
    assert {"running", "queued", "max_queued"} <= set(q) and q["max_queued"] == MAX_QUEUED


def test_failed_job_is_reported_and_server_keeps_serving(server):
    broken = server.data / "models" / "Stable-diffusion" / "zz-broken.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    try:
        server.post("/sdapi/v1/refresh-checkpoints")
        titles = [m["title"] for m in server.get("/sdapi/v1/sd-models").json()]
        name = next((t for t in titles if "broken" in t), None)
        assert name is not None, f"the registry must list an unreadable checkpoint (to fail its jobs): {titles}"
        job_id = server.post("/api/v1/jobs", t2i(model=name, steps=1)).json()["id"]
        end = _events(server, job_id)
        assert end[-1][1]["state"] == "failed" and end[-2][0] == "error"
        job = server.get(f"/api/v1/jobs/{job_id}").json()
        assert job["state"] == "failed" and job["error"]["message"]
        r = server.post("/sdapi/v1/txt2img", t2i(steps=1, override_settings={"sd_model_checkpoint": name}))
        # a broken checkpoint the request chose is the request's problem: 422 naming the field and the file
        assert r.status_code == 422, r.text
        assert "override_settings.sd_model_checkpoint" in r.text and "zz-broken" in r.text
        r = server.post("/sdapi/v1/txt2img", t2i(steps=1, override_settings={"sd_model_checkpoint": "tiny-a"}))
        assert r.status_code == 200, r.text
    finally:
        broken.unlink()
        server.post("/sdapi/v1/refresh-checkpoints")


def test_queue_full_answers_503_and_delete_cancels(server):
    wait_idle(server)
    long = server.post("/api/v1/jobs", t2i(steps=150, n_iter=100)).json()["id"]
    deadline = time.monotonic() + 30
    while server.get(f"/api/v1/jobs/{long}", params={"images": "false"}).json()["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ids, full = [], None
    for _ in range(MAX_QUEUED + 5):
        r = server.post("/api/v1/jobs", t2i(steps=1))
        if r.status_code == 503:
            full = r
            break
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    assert full is not None and "queue is full" in full.json()["detail"]
    assert server.post("/sdapi/v1/txt2img", t2i(steps=1)).status_code == 503
    q = server.get("/api/v1/queue").json()
    assert [j["id"] for j in q["queued"]] == ids and q["queued"][0]["position"] == 1
    for job_id in ids:
        d = server.delete(f"/api/v1/jobs/{job_id}").json()
        assert d["cancelled"] is True and d["state"] == "cancelled"
    d = server.delete(f"/api/v1/jobs/{long}").json()
    assert d["cancelled"] is True
    wait_idle(server)
    assert server.get(f"/api/v1/jobs/{long}").json()["result"]["interrupted"] is True


# ---- models, extras ------------------------------------------------------------------------------------
def test_options_switch_the_model(server):
    titles = {m["model_name"]: m["title"] for m in server.get("/sdapi/v1/sd-models").json()}
    try:
        r = server.post("/sdapi/v1/options", {"sd_model_checkpoint": titles["tiny-b"], "samples_format": "png"})
        assert r.status_code == 200, r.text
        # a title gains " [hash]" once the background hashing reaches its files: compare the file part
        current = server.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
        assert current.split(" [")[0] == titles["tiny-b"].split(" [")[0]
        info = json.loads(server.post("/sdapi/v1/txt2img", t2i(steps=1)).json()["info"])
        assert info["sd_model_name"] == "tiny-b"
        over = t2i(steps=1, override_settings={"sd_model_checkpoint": "tiny-a"})
        assert json.loads(server.post("/sdapi/v1/txt2img", over).json()["info"])["sd_model_name"] == "tiny-a"
    finally:
        server.post("/sdapi/v1/options", {"sd_model_checkpoint": titles["tiny-a"]})


def test_extras_resize(server):
    img = Image.new("RGB", (40, 30), (10, 200, 30))
    r = server.post(
        "/sdapi/v1/extra-single-image",
        {"image": b64_png(img), "upscaling_resize": 2, "upscaler_1": "Lanczos"},
    )
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"html_info", "image"} and decode(r.json()["image"]).size == (80, 60)
    r = server.post(
        "/sdapi/v1/extra-batch-images",
        {
            "imageList": [
                {"data": b64_png(img), "name": "a.png"},
                {"data": "data:image/png;base64," + b64_png(img)},
            ],
            "resize_mode": 1,
            "upscaling_resize_w": 64,
            "upscaling_resize_h": 64,
            "upscaling_crop": True,
            "upscaler_1": "Nearest",
            "upscaler_2": "Lanczos",
            "extras_upscaler_2_visibility": 0.5,
        },
    )
    assert r.status_code == 200, r.text
    assert [decode(b).size for b in r.json()["images"]] == [(64, 64), (64, 64)]


# ---- auth, limits, errors ------------------------------------------------------------------------------
def test_auth_refuses_a_wrong_password(server):
    for path in ("/sdapi/v1/samplers", "/api/v1/queue"):
        assert requests.get(server.url + path, auth=(AUTH[0], "wrong"), timeout=TIMEOUT).status_code == 401
        assert requests.get(server.url + path, timeout=TIMEOUT).status_code == 401
    r = requests.post(server.url + "/sdapi/v1/txt2img", json=t2i(), auth=("bob", AUTH[1]), timeout=TIMEOUT)
    assert r.status_code == 401 and r.headers["www-authenticate"].lower().startswith("basic")


def test_pages_of_other_sites_cannot_post(server):
    """A page on another site may POST text/plain JSON without a preflight, and the API reads such bodies as
    JSON (real clients send no content type): its browser's Origin header gets it refused instead."""
    before = server.get("/sdapi/v1/options").json()["samples_format"]
    body = json.dumps({"samples_format": "webp" if before != "webp" else "jpg"})
    for origin in ("http://evil.example", "null", server.url.replace("127.0.0.1", "localhost")):
        r = server.post("/sdapi/v1/options", data=body, headers={"Origin": origin, "Content-Type": "text/plain"})
        assert r.status_code == 403 and "--cors-allow-origins" in r.json()["detail"], (origin, r.text)
        r = server.post("/sdapi/v1/txt2img", data=json.dumps(t2i()), headers={"Origin": origin})
        assert r.status_code == 403, origin
    assert server.get("/sdapi/v1/options").json()["samples_format"] == before
    # reading is not refused (the browser keeps a foreign page from seeing the answer)
    assert server.get("/sdapi/v1/samplers", headers={"Origin": "http://evil.example"}).status_code == 200
    # the server's own pages, an allowed front-end, and clients that send no Origin may post
    for headers in ({"Origin": server.url}, {"Origin": FRONTEND + "/"}, {}):
        r = server.post("/sdapi/v1/txt2img", data=json.dumps(t2i(steps=1)), headers=headers)
        assert r.status_code == 200, (headers, r.text)


def _field_of(resp) -> str:
    assert resp.status_code == 422, (resp.status_code, resp.text)
    return ".".join(str(p) for p in resp.json()["detail"][0]["loc"][1:])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"steps": "many"}, "steps"),
        ({"steps": 0}, "steps"),
        ({"width": 32}, "width"),
        ({"cfg_scale": "high"}, "cfg_scale"),
        ({"prompt": {"not": "text"}}, "prompt"),
        ({"seed": 2**70}, "seed"),
        ({"batch_size": 17}, "batch_size"),  # the server's max_batch_size (16 by default)
        ({"width": 4096, "height": 4096}, "width"),  # the server's max_pixels
        ({"enable_hr": True, "hr_scale": 64}, "hr_scale"),  # the hires target counts too
        ({"enable_hr": True, "hr_scale": 0}, "hr_scale"),
        ({"enable_hr": True, "denoising_strength": -0.5}, "denoising_strength"),  # above 1 means 1 (A1111)
        ({"sampler_name": "No Such Sampler"}, "sampler_name"),
        ({"override_settings": {"CLIP_stop_at_last_layers": 99}}, "override_settings.CLIP_stop_at_last_layers"),
        ({"script_name": "no such script"}, "script_name"),
        ({"script_name": "x/y/z plot", "script_args": [1, ""]}, "script_args"),
    ],
)
def test_bad_txt2img_values_get_422_naming_the_field(server, body, field):
    assert _field_of(server.post("/sdapi/v1/txt2img", t2i(**body))) == field


def test_protective_limits_name_their_server_setting(server):
    msg = server.post("/sdapi/v1/txt2img", t2i(width=4096, height=4096)).json()["detail"][0]["msg"]
    assert "max_pixels = 4194304" in msg and "--max-pixels" in msg
    msg = server.post("/sdapi/v1/txt2img", t2i(batch_size=17)).json()["detail"][0]["msg"]
    assert "max_batch_size = 16" in msg and "--max-batch-size" in msg
    r = server.post("/api/v1/jobs", t2i(enable_hr=True, hr_resize_x=8192, hr_resize_y=8192))
    assert _field_of(r) == "hr_resize_x" and "max_pixels" in r.json()["detail"][0]["msg"]


def test_bad_input_never_500(server):
    r = server.post("/sdapi/v1/txt2img", data=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"
    r = server.post("/sdapi/v1/txt2img", t2i(sampler_name="No Such Sampler"))
    assert "Euler a" in r.json()["detail"][0]["msg"]  # the valid choices are listed
    r = server.post("/sdapi/v1/txt2img", t2i(override_settings={"sd_model_checkpoint": "nope"}))
    assert r.status_code == 200 and "'nope' not found" in json.loads(r.json()["info"])["warnings"][0]  # A1111
    assert _field_of(server.post("/sdapi/v1/img2img", t2i(init_images=["%%%not base64"]))) == "init_images[0]"
    assert (
        _field_of(server.post("/sdapi/v1/img2img", t2i(init_images=[base64.b64encode(b"text").decode()])))
        == "init_images[0]"
    )
    assert _field_of(server.post("/sdapi/v1/img2img", t2i(init_images=[]))) == "init_images"
    small = b64_png(Image.new("L", (32, 32)))
    init = b64_png(Image.new("RGB", (SIZE, SIZE)))
    # A1111 resizes the mask with the image: a mask of another size is no error
    assert server.post("/sdapi/v1/img2img", t2i(init_images=[init], mask=small, steps=1)).status_code == 200
    assert _field_of(server.post("/sdapi/v1/img2img", t2i(init_images=[init], resize_mode=9))) == "resize_mode"
    assert _field_of(server.post("/api/v1/jobs", t2i(stepz=3))) == "stepz"  # the native API is strict
    assert _field_of(server.post("/api/v1/jobs", t2i(mode="inpaint"))) == "init_images"
    assert _field_of(server.post("/sdapi/v1/options", {"sd_model_checkpoint": "nope"})) == "sd_model_checkpoint"
    assert _field_of(server.post("/sdapi/v1/options", {"CLIP_stop_at_last_layers": 99})) == "CLIP_stop_at_last_layers"
    r = server.post("/sdapi/v1/options", {"sd_vae": "nope"})
    assert _field_of(r) == "sd_vae" and "tiny-vae" in r.json()["detail"][0]["msg"]
    # a model upscaler this server lacks ("ESRGAN_4x") falls back (tests/test_a1111_options.py); garbage is refused
    r = server.post("/sdapi/v1/extra-single-image", {"image": init, "upscaler_1": "nope"})
    assert _field_of(r) == "upscaler_1" and "Lanczos" in r.json()["detail"][0]["msg"]
    assert _field_of(server.post("/sdapi/v1/png-info", {"image": "bm90IGFuIGltYWdl"})) == "image"


def test_request_size_limit(server):
    big = "A" * (MAX_BODY_MB * 2**20 + 10)
    r = server.post("/sdapi/v1/png-info", {"image": big})
    assert r.status_code == 413

    def chunks():  # no Content-Length: the streamed body is counted
        for _ in range(MAX_BODY_MB * 4 + 2):
            yield b" " * 2**18

    r = server.s.post(
        server.url + "/sdapi/v1/png-info",
        data=chunks(),
        timeout=TIMEOUT,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413
