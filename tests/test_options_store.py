"""The one options store (`ldm_core.options`): the Settings tab and `/sdapi/v1/options` read and write the same
settings, a change reaches the next job without a restart, and `override_settings` lasts for one request
(restored afterwards unless `override_settings_restore_afterwards` is false; an unknown checkpoint falls back to
the current one with a warning in `info`)."""

from __future__ import annotations

import json
import shutil
import threading
from types import SimpleNamespace

import pytest

from ldm_core.config import EngineConfig
from ldm_core.options import (
    OPTIONS_BY_KEY,
    OptionError,
    OptionsStore,
    bind_engine,
    config_from_options,
    effective_applies,
    request_values,
)


# ---- the store ------------------------------------------------------------------------------------------
def test_store_types_ranges_and_a1111_keys(tmp_path):
    store = OptionsStore(tmp_path / "config.json")
    assert not (tmp_path / "config.json").exists()  # defaults until something is saved
    for key, kind in {
        "send_seed": bool,
        "samples_save": bool,
        "samples_format": str,
        "CLIP_stop_at_last_layers": int,
        "eta_noise_seed_delta": int,
        "eta_ancestral": float,
        "s_min_uncond": float,
        "initial_noise_multiplier": float,
        "show_progress_every_n_steps": int,
        "sd_vae": str,
    }.items():
        assert type(store[key]) is kind, key
    # A1111 clients send numbers and booleans as text too
    assert store.update({"CLIP_stop_at_last_layers": "2", "send_seed": "false", "eta_ddim": 0}) == [
        "CLIP_stop_at_last_layers",
        "send_seed",
    ]
    assert store["CLIP_stop_at_last_layers"] == 2 and store["send_seed"] is False
    with pytest.raises(OptionError) as e:
        store.update({"eta_ddim": 0.5, "CLIP_stop_at_last_layers": 13})
    assert e.value.key == "CLIP_stop_at_last_layers" and "from 1 to 12" in e.value.message
    assert store["eta_ddim"] == 0.0  # nothing of a bad update is saved
    with pytest.raises(OptionError, match="choose one of"):
        store.update({"samples_format": "gif"})
    # a choice in another case is that choice, as A1111 clients write it ("PNG", "wavelet")
    store.update({"samples_format": "PNG", "diffusion_upscale_colour_fix": "wavelet"})
    assert store["samples_format"] == "png" and store["diffusion_upscale_colour_fix"] == "Wavelet"
    store.update({"samples_format": "png"})
    with pytest.raises(OptionError, match="unknown setting"):
        store.update({"some_extension_option": 1})
    with pytest.raises(OptionError, match="cannot be set"):
        store.update({"sd_checkpoint_hash": "abc"})
    assert store.update({"some_extension_option": [1, 2]}, allow_unknown=True) == ["some_extension_option"]
    reread = OptionsStore(tmp_path / "config.json")
    assert reread["some_extension_option"] == [1, 2] and reread["CLIP_stop_at_last_layers"] == 2
    assert "some_extension_option" in reread.snapshot() and "some_extension_option" not in reread.all()
    # a broken value in the file reads as the default; other tools' keys survive our writes
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.update(CLIP_stop_at_last_layers="lots", other_tool=True)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    reread.load()
    assert reread["CLIP_stop_at_last_layers"] == 1
    reread.update({"send_seed": True})
    assert json.loads((tmp_path / "config.json").read_text())["other_tool"] is True


def test_store_listeners_and_threads(tmp_path):
    store = OptionsStore(tmp_path / "config.json")
    seen: list[list[str]] = []
    unsubscribe = store.subscribe(seen.append)
    store.update({"jpeg_quality": 90})
    store.update({"jpeg_quality": 90})  # no change: no call
    assert seen == [["jpeg_quality"]]

    def writer(i: int) -> None:
        for n in range(20):
            store.update({f"client_{i}": n}, allow_unknown=True)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = json.loads((tmp_path / "config.json").read_text())
    assert all(final[f"client_{i}"] == 19 for i in range(4)) and len(seen) == 81
    unsubscribe()
    store.update({"jpeg_quality": 70})
    assert len(seen) == 81


def test_options_to_engine_config_and_request_values(tmp_path):
    base = EngineConfig.from_data_dir(tmp_path, builtin_model_dir=None)
    cfg = config_from_options(
        base,
        {
            "outdir_samples": "out",
            "show_progress_every_n_steps": 5,
            "live_previews_enable": False,
            "sd_checkpoints_limit": 2,
        },
        locked={"model_cache_size"},
    )
    assert cfg.outputs_dir == tmp_path / "out" and cfg.preview_every == 0 and cfg.model_cache_size == 1
    store = OptionsStore(None)
    engine = SimpleNamespace(config=base)
    bind_engine(store, engine)
    store.update({"samples_save": False, "show_progress_every_n_steps": 3})
    assert engine.config.save_images is False and engine.config.preview_every == 3

    saved = {**OptionsStore(None).all(), "CLIP_stop_at_last_layers": 2, "s_churn": 0.5, "eta_ancestral": 0.3}
    values, skipped = request_values(saved, {}, explicit=set(), sampler_name="Euler a")
    assert values["clip_skip"] == 2 and values["s_churn"] == 0.5 and values["eta"] == 0.3
    assert "model" not in values  # the saved checkpoint is the engine's current model, not a per-job name
    # the request's own value wins over a saved option; an override wins over the saved option
    values, _ = request_values(saved, {"CLIP_stop_at_last_layers": 4}, explicit={"s_churn", "eta"}, sampler_name="DDIM")
    assert values["clip_skip"] == 4 and "s_churn" not in values and "eta" not in values
    values, _ = request_values(saved, {"eta_ddim": 0.7}, explicit=set(), sampler_name="DDIM")
    assert values["eta"] == 0.7
    override = {"sd_model_checkpoint": "b.safetensors", "sd_vae": "None", "samples_save": False, "foo": 1}
    values, skipped = request_values(saved, override, explicit={"vae"}, sampler_name="Euler")
    assert values["model"] == "b.safetensors" and values["vae"] is None and values["save_images"] is False
    assert skipped == ["foo"]
    # an option whose request field the engine lacks is only stored
    assert effective_applies(OPTIONS_BY_KEY["CLIP_stop_at_last_layers"], fields=set()) == "stored"
    assert effective_applies(OPTIONS_BY_KEY["CLIP_stop_at_last_layers"]) == "live"


# ---- through the API and the Settings tab ------------------------------------------------------------------
@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_models):
    """(TestClient, service, store, data dir): two copies of the tiny SD1 model, one store shared by the API
    and a UI context, as webui.py wires them."""
    import fastapi
    from fastapi.testclient import TestClient

    from api import install
    from ldm_core.service import Service

    data = tmp_path_factory.mktemp("options")
    ckpt = data / "models" / "Stable-diffusion"
    for name in ("tiny-a", "tiny-b"):
        shutil.copytree(tiny_models["sd1"]["diffusers"], ckpt / name)
    service = Service(EngineConfig.from_data_dir(data, builtin_model_dir=None, device="cpu"))
    store = OptionsStore(data / "config.json")
    bind_engine(store, service.engine)
    # titles carry the hash from the start: the registry hashes in the background, and reading titles before
    # it finished made this module racy
    assert all(entry.sha256 for entry in service.engine.models.checkpoints())
    app = fastapi.FastAPI()
    install(app, service, options=store)
    with TestClient(app) as client:
        yield client, service, store, data
    service.shutdown()


def _t2i(**kw):
    return {"prompt": "a cat", "steps": 1, "width": 64, "height": 64, "seed": 1, "sampler_name": "Euler", **kw}


def _run(client, **kw) -> dict:
    r = client.post("/sdapi/v1/txt2img", json=_t2i(**kw))
    assert r.status_code == 200, r.text
    return json.loads(r.json()["info"])


def _titles(client) -> dict[str, str]:
    return {m["model_name"]: m["title"] for m in client.get("/sdapi/v1/sd-models").json()}


def test_get_and_post_options(api):
    client, service, store, data = api
    opts = client.get("/sdapi/v1/options").json()
    for key in (
        "send_seed",
        "sd_model_checkpoint",
        "sd_checkpoint_hash",
        "CLIP_stop_at_last_layers",
        "samples_save",
        "samples_format",
        "outdir_samples",
        "outdir_txt2img_samples",
        "outdir_img2img_samples",
        "outdir_extras_samples",
        "outdir_grids",
        "eta_noise_seed_delta",
        "sd_vae",
        "return_grid",
        "grid_save",
        "jpeg_quality",
        "live_previews_enable",
        "show_progress_every_n_steps",
        "s_min_uncond",
        "initial_noise_multiplier",
        "eta_ancestral",
        "eta_ddim",
        "emphasis",
        "token_merging_ratio",
        "img2img_fix_steps",
        "upscaler_for_img2img",
    ):
        assert key in opts, key
    assert opts["outdir_txt2img_samples"] == str(data / "outputs" / "txt2img")
    r = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 13})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"][-1] == "CLIP_stop_at_last_layers" and "1 to 12" in r.json()["detail"][0]["msg"]
    r = client.post("/sdapi/v1/options", json={"outdir_txt2img_samples": "/elsewhere"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "outdir_txt2img_samples"
    # a client posting GET's answer back (with an unknown key of its own) is fine
    r = client.post("/sdapi/v1/options", json={**opts, "my_extension_key": "x", "CLIP_stop_at_last_layers": "2"})
    assert r.status_code == 200, r.text
    again = client.get("/sdapi/v1/options").json()
    assert again["CLIP_stop_at_last_layers"] == 2 and again["my_extension_key"] == "x"
    assert json.loads((data / "config.json").read_text())["CLIP_stop_at_last_layers"] == 2
    # the next job uses it, without a restart (the native jobs API too)
    assert "Clip skip: 2" in _run(client)["infotexts"][0]
    r = client.post("/api/v1/jobs", json={"prompt": "x", "steps": 1, "width": 64, "height": 64})
    job = service.queue.get(r.json()["id"])
    assert job.request.clip_skip == 2
    job.wait(60)
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1}).status_code == 200
    assert "Clip skip" not in _run(client)["infotexts"][0]
    # a server-wide option reaches the running engine at once
    assert client.post("/sdapi/v1/options", json={"samples_save": False}).status_code == 200
    assert service.engine.config.save_images is False
    assert client.post("/sdapi/v1/options", json={"samples_save": True, "samples_format": "jpg"}).status_code == 200
    before = set((data / "outputs").rglob("*.*"))
    r = client.post("/sdapi/v1/txt2img", json=_t2i(save_images=True))
    assert r.status_code == 200, r.text
    assert [p.suffix for p in set((data / "outputs").rglob("*.*")) - before] == [".jpg"]
    assert client.post("/sdapi/v1/options", json={"samples_format": "png"}).status_code == 200


def test_settings_tab_and_api_share_the_store(api):
    from ui.common import UiContext
    from ui.settings import apply_settings

    client, service, store, data = api
    ctx = UiContext(service=service, settings=store, data_dir=data)
    msg = apply_settings(ctx, {"eta_noise_seed_delta": 31337, "show_progress_every_n_steps": 4, "send_seed": False})
    assert "applies" in msg
    opts = client.get("/sdapi/v1/options").json()
    assert opts["eta_noise_seed_delta"] == 31337 and opts["show_progress_every_n_steps"] == 4
    assert opts["send_seed"] is False and service.engine.config.preview_every == 4
    # and the other way: what the API saves is what the Settings tab shows on its next load
    assert client.post("/sdapi/v1/options", json={"jpeg_quality": "55"}).status_code == 200
    assert ctx.settings.get("jpeg_quality") == 55
    apply_settings(ctx, {"eta_noise_seed_delta": 0, "show_progress_every_n_steps": 1, "send_seed": True})


def test_override_is_restored_and_can_persist(api):
    client, service, store, data = api
    titles = _titles(client)
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": titles["tiny-a"]}).status_code == 200
    info = _run(client, override_settings={"sd_model_checkpoint": "tiny-b", "CLIP_stop_at_last_layers": 3})
    assert info["sd_model_name"] == "tiny-b" and "Clip skip: 3" in info["infotexts"][0]
    assert "warnings" not in info
    # the next request runs on the model and settings it would have had anyway
    info = _run(client)
    assert info["sd_model_name"] == "tiny-a" and "Clip skip" not in info["infotexts"][0]
    assert service.engine.current_model.entry.title == titles["tiny-a"]
    opts = client.get("/sdapi/v1/options").json()
    assert opts["sd_model_checkpoint"] == titles["tiny-a"] and opts["CLIP_stop_at_last_layers"] == 1
    # override_settings_restore_afterwards: false keeps them, as a POST /options would
    info = _run(
        client,
        override_settings={"sd_model_checkpoint": "tiny-b", "CLIP_stop_at_last_layers": 3},
        override_settings_restore_afterwards=False,
    )
    assert info["sd_model_name"] == "tiny-b"
    info = _run(client)
    assert info["sd_model_name"] == "tiny-b" and "Clip skip: 3" in info["infotexts"][0]
    opts = client.get("/sdapi/v1/options").json()
    assert opts["sd_model_checkpoint"] == titles["tiny-b"] and opts["CLIP_stop_at_last_layers"] == 3
    assert (
        client.post(
            "/sdapi/v1/options", json={"sd_model_checkpoint": titles["tiny-a"], "CLIP_stop_at_last_layers": 1}
        ).status_code
        == 200
    )


def test_unknown_checkpoint_override_falls_back_with_a_warning(api):
    client, service, store, data = api
    titles = _titles(client)
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": titles["tiny-a"]}).status_code == 200
    override = {"sd_model_checkpoint": "not-here.safetensors", "token_merging_ratio": 0.5, "return_grid": False}
    info = _run(client, override_settings=override)
    assert info["sd_model_name"] == "tiny-a"
    assert any("not-here.safetensors" in w and "tiny-a" in w for w in info["warnings"])
    assert any(w.startswith("override_settings.token_merging_ratio") for w in info["warnings"])
    assert len(info["warnings"]) == 2  # return_grid applies to this request's grid: no warning
    r = client.post("/sdapi/v1/txt2img", json=_t2i(override_settings={"CLIP_stop_at_last_layers": 40}))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "override_settings.CLIP_stop_at_last_layers"


def test_ui_jobs_and_settings_tab_follow_the_store(tmp_path):
    from ui_fixtures import fake_context

    from ui.app import create_ui

    ctx = fake_context(tmp_path)
    try:
        web = create_ui(ctx)
        # the Settings tab reads the store again on every page load (a change made through the API shows)
        clip = web.tabs["settings"]["CLIP_stop_at_last_layers"]
        ctx.settings.update({"CLIP_stop_at_last_layers": 2, "s_churn": 0.25}, allow_unknown=True)
        assert callable(clip.value) or clip.load_event_to_attach is not None
        refresh = clip.value if callable(clip.value) else clip.load_event_to_attach[0]
        assert refresh() == 2
        # a UI job gets the saved options its form has no control for
        t2i = web.tabs["txt2img"]
        fn = next(f for f in web.blocks.fns.values() if f.api_name == "txt2img_generate")
        form = {"prompt": "a fox", "sampler_name": "Euler", "steps": 2, "width": 64, "height": 64, "seed": 3}
        data = {comp: form[name] for name, comp in t2i.fields.items() if name in form}
        data[web.tabs["top"].checkpoint] = "tiny-a.safetensors"
        data[web.tabs["top"].vae] = "Automatic"
        list(fn.fn(data))
        request = ctx.engine.requests[-1]
        assert request.clip_skip == 2 and request.s_churn == 0.25 and request.steps == 2
        # the VAE menu at the top is the sd_vae option: saved when picked, shown on the next page load
        vae_title = ctx.engine.models.vaes()[0].title
        save_vae = next(f for f in web.blocks.fns.values() if f.name == "save_vae")
        save_vae.fn(vae_title)
        assert ctx.settings["sd_vae"] == vae_title
        load = next(f for f in web.blocks.fns.values() if any(t[1] == "load" for t in f.targets))
        assert load.fn()[web.tabs["top"].vae].value == vae_title
    finally:
        ctx.service.shutdown()
