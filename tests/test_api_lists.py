"""The A1111 list routes against a fresh in-process server (real Engine + Service + FastAPI app): checkpoint
hashes from startup (`/sdapi/v1/sd-models`), LoRA metadata (`/loras`), embedding shapes (`/embeddings`),
and `/refresh-loras` / `/refresh-embeddings` really rescanning; plus the Upscale tab's label."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

TAGS = {"imgs": {"red circle": 3, "blue": 1}}
KOHYA_META = {
    "ss_output_name": "Detail Tweaker",
    "ss_network_dim": "4",
    "ss_network_alpha": "2.0",
    "ss_base_model_version": "sd_v1",
    "ss_tag_frequency": json.dumps(TAGS),
    "sshs_model_hash": "ab" * 32,
}


def _lora(path: Path, metadata: dict[str, str] | None = None) -> Path:
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(1, 32),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 1),
        },
        str(path),
        metadata=metadata,
    )
    return path


def _embedding(path: Path, vectors: int, width: int) -> Path:
    save_file({"emb_params": torch.randn(vectors, width)}, str(path))
    return path


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_models):
    """(TestClient, service, data dir) of a server started over a data dir that already holds two
    checkpoints, a kohya LoRA with `ss_*` metadata and an embedding; nothing is generated or loaded."""
    import fastapi
    from fastapi.testclient import TestClient

    from api import install
    from ldm_core.config import EngineConfig
    from ldm_core.service import Service

    data = tmp_path_factory.mktemp("lists")
    ckpt = data / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    shutil.copy(tiny_models["sd1"]["single_file"], ckpt / "tiny-sd1.safetensors")
    shutil.copy(tiny_models["sd2_v"]["single_file"], ckpt / "tiny-sd2.safetensors")
    (data / "models" / "Lora").mkdir(parents=True)
    _lora(data / "models" / "Lora" / "detail.safetensors", KOHYA_META)
    (data / "embeddings").mkdir()
    _embedding(data / "embeddings" / "tiny-emb.safetensors", 2, 32)  # fits the tiny text encoder
    _embedding(data / "embeddings" / "sd1-emb.safetensors", 3, 768)  # a real SD 1.x width
    service = Service(EngineConfig.from_data_dir(data, builtin_model_dir=None, device="cpu"))
    app = fastapi.FastAPI()
    install(app, service)
    with TestClient(app) as client:
        yield client, service, data
    service.shutdown()


def test_fresh_server_lists_checkpoint_hashes(api):
    client, service, data = api
    deadline = time.monotonic() + 30
    while True:
        models = client.get("/sdapi/v1/sd-models").json()
        if all(m["sha256"] for m in models) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert service.engine.current_model is None  # hashed in the background, not by loading a model
    assert {m["model_name"] for m in models} == {"tiny-sd1", "tiny-sd2"}
    for m in models:
        digest = hashlib.sha256(Path(m["filename"]).read_bytes()).hexdigest()
        assert m["sha256"] == digest and m["hash"] == digest[:10]
        assert m["title"] == f"{Path(m['filename']).name} [{digest[:10]}]"
    assert (data / "cache" / "hashes.json").is_file()  # cached for the next start


def test_loras_show_kohya_metadata_and_refresh_finds_new_files(api):
    client, _service, data = api
    (entry,) = client.get("/sdapi/v1/loras").json()
    assert entry["name"] == "detail" and entry["alias"] == "Detail Tweaker"
    assert entry["path"] == str(data / "models" / "Lora" / "detail.safetensors")
    meta = entry["metadata"]
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_tag_frequency"] == TAGS  # JSON-looking values are decoded, as A1111 does
    _lora(data / "models" / "Lora" / "later.safetensors")
    assert [x["name"] for x in client.get("/sdapi/v1/loras").json()] == ["detail"]  # not rescanned yet
    assert client.post("/sdapi/v1/refresh-loras").status_code == 200
    listed = {x["name"]: x for x in client.get("/sdapi/v1/loras").json()}
    assert set(listed) == {"detail", "later"} and listed["later"]["metadata"] == {}


def test_embeddings_show_shapes_and_refresh_finds_new_files(api):
    client, _service, data = api
    loaded = client.get("/sdapi/v1/embeddings").json()["loaded"]
    assert loaded["tiny-emb"]["shape"] == 32 and loaded["tiny-emb"]["vectors"] == 2
    assert loaded["sd1-emb"]["shape"] == 768 and loaded["sd1-emb"]["vectors"] == 3
    _embedding(data / "embeddings" / "later-emb.safetensors", 4, 32)
    assert "later-emb" not in client.get("/sdapi/v1/embeddings").json()["loaded"]
    assert client.post("/sdapi/v1/refresh-embeddings").status_code == 200
    assert client.get("/sdapi/v1/embeddings").json()["loaded"]["later-emb"]["vectors"] == 4


def test_embeddings_for_another_model_are_skipped_once_a_model_is_loaded(api):
    client, service, _data = api
    assert client.post("/sdapi/v1/reload-checkpoint").status_code == 200
    assert service.engine.current_model is not None
    listed = client.get("/sdapi/v1/embeddings").json()
    assert "tiny-emb" in listed["loaded"]
    assert "sd1-emb" in listed["skipped"] and listed["skipped"]["sd1-emb"]["shape"] == 768


def test_upscale_tab_is_labelled_upscale_with_a1111_ids(tmp_path):
    import gradio as gr
    from ui_fixtures import fake_context

    from ui.app import create_ui

    ctx = fake_context(tmp_path)
    try:
        web = create_ui(ctx)
        tabs = {b.elem_id: b.label for b in web.blocks.blocks.values() if isinstance(b, gr.Tab)}
    finally:
        ctx.service.shutdown()
    assert tabs["tab_extras"] == "Upscale"
    assert "Extras" not in tabs.values()
