"""Single-file diffusion upscalers (ldm_core.models.sr_files): LDSR (CompVis latent-diffusion 4x: openaimodel
UNet with fused-qkv attention blocks on a VQ-f4 autoencoder) and the SD x4 upscaler's original single file
(SD 2.x layout, 7-channel UNet with a noise-level `label_emb`, OpenCLIP text encoder). Tiny random models are
written in those key layouts; they load, run through the upscaler registry (Extras, hires fix), the API and
refuse pickles unless allowed. The LDSR attention split is checked against the original block's arithmetic
written out here (legacy per-head q/k/v order), so a wrong head order fails."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tiny_models import save_tiny_ldsr, tiny_ldsr_pipeline, tiny_x4_pipeline

from ldm_core.config import DiffusionUpscaleOptions
from ldm_core.models import sr_files
from ldm_core.upscalers import UpscalerRegistry

FAST = DiffusionUpscaleOptions(steps=2, ldsr_steps=2)


def _save(sd: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in sd.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def ldsr_file(tmp_path_factory) -> Path:
    return save_tiny_ldsr(tmp_path_factory.mktemp("ldsr") / "LDSR" / "model.safetensors")


def smooth(w: int = 24, h: int = 20) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([x / w, y / h, 0.5 + 0.5 * np.sin(x / 3)], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def legacy_attention_block(x: torch.Tensor, sd: dict, prefix: str, head_channels: int) -> torch.Tensor:
    """openaimodel's AttentionBlock with QKVAttentionLegacy, from its original tensors: GroupNorm(32), a
    1-D conv to fused qkv laid out per head as [q, k, v], softmax(q k / sqrt(ch)) v, a 1-D conv out, residual."""
    b, c, h, w = x.shape
    t = x.reshape(b, c, h * w)
    n = torch.nn.functional.group_norm(t, 32, sd[prefix + "norm.weight"], sd[prefix + "norm.bias"], eps=1e-5)
    qkv = torch.nn.functional.conv1d(n, sd[prefix + "qkv.weight"], sd[prefix + "qkv.bias"])
    heads = c // head_channels
    q, k, v = qkv.reshape(b * heads, 3 * head_channels, h * w).split(head_channels, dim=1)
    scale = 1 / math.sqrt(math.sqrt(head_channels))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, h * w)
    out = torch.nn.functional.conv1d(a, sd[prefix + "proj_out.weight"], sd[prefix + "proj_out.bias"])
    return (t + out).reshape(b, c, h, w)


def test_ldsr_file_is_recognised_and_its_attention_matches_the_original_block(ldsr_file):
    from safetensors.torch import load_file

    from ldm_core.models.loading import read_tensor_shapes

    assert sr_files.sr_kind(read_tensor_shapes(ldsr_file)) == sr_files.LDSR
    original = load_file(str(ldsr_file))
    prefix = "model.diffusion_model.middle_block.1."
    assert tuple(original[prefix + "qkv.weight"].shape) == (192, 64, 1)  # fused, as CompVis stores it
    pipe = sr_files.load_sr_file(
        ldsr_file, device=torch.device("cpu"), dtype=torch.float32, allow_pickle=False, field="upscaler"
    )
    x = torch.randn(1, 64, 4, 4)
    ours = pipe.unet.mid_block.attentions[0](x)
    ref = legacy_attention_block(x, original, prefix, head_channels=32)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    # a wrong head order (e.g. q|k|v each spanning all heads) would give another result
    wrong = original[prefix + "qkv.weight"].reshape(3, 2, 32, 64, 1).transpose(0, 1).reshape(192, 64, 1)
    bad = legacy_attention_block(x, {**original, prefix + "qkv.weight": wrong}, prefix, 32)
    assert not torch.allclose(ours, bad, atol=1e-3)


def test_ldsr_round_trip_is_exact(ldsr_file):
    pipe = tiny_ldsr_pipeline()
    loaded = sr_files.load_sr_file(
        ldsr_file, device=torch.device("cpu"), dtype=torch.float32, allow_pickle=False, field="upscaler"
    )
    for name in ("unet", "vqvae"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert loaded.scheduler.config.steps_offset == 1  # CompVis' DDIM steps: 1, 1 + 1000/n, ...
    assert loaded.scheduler.config.beta_start == 0.0015 and loaded.scheduler.config.beta_end == 0.0155


def test_ldsr_in_the_registry_as_a1111_names_it(ldsr_file):
    reg = UpscalerRegistry([ldsr_file.parent], builtin=None, diffusion=FAST)
    assert "LDSR" in reg.names()
    info = next(i for i in reg.infos() if i["name"] == "LDSR")
    assert info["scale"] == 4
    out = reg.upscale(smooth(), "LDSR", scale=4)  # 24x20 is not a multiple of 8: padded, then cropped
    assert out.size == (96, 80)
    assert np.asarray(out).std() > 1
    again = reg.upscale(smooth(), "LDSR", scale=4)
    assert np.array_equal(np.asarray(out), np.asarray(again))  # seeded


def test_ldsr_pickle_needs_allow_pickle(tmp_path, ldsr_file):
    from safetensors.torch import load_file

    from ldm_core.generation_requests import RequestError

    ckpt = tmp_path / "LDSR" / "model.ckpt"  # A1111's file name
    ckpt.parent.mkdir()
    torch.save({"state_dict": load_file(str(ldsr_file)), "global_step": 0}, ckpt)
    reg = UpscalerRegistry([ckpt.parent], builtin=None, diffusion=FAST)
    assert "LDSR" in reg.names()
    with pytest.raises(RequestError, match="allow-pickle"):
        reg.upscale(smooth(), "LDSR", scale=4)
    allowed = UpscalerRegistry([ckpt.parent], builtin=None, diffusion=FAST, allow_pickle=True)
    assert allowed.upscale(smooth(), "LDSR", scale=4).size == (96, 80)


def test_a_checkpoint_folder_names_where_upscalers_go(ldsr_file, tmp_path):
    from ldm_core.models.detect import UnsupportedCheckpointError, detect_checkpoint
    from ldm_core.models.loading import read_tensor_shapes

    with pytest.raises(UnsupportedCheckpointError, match="models/LDSR"):
        detect_checkpoint(read_tensor_shapes(ldsr_file))


# ----------------------------------------------------------------------------------------------------------
# SD x4 upscaler as one file


@pytest.fixture(scope="module")
def x4_file(tmp_path_factory) -> Path:
    sd = sr_files.x4_to_original(tiny_x4_pipeline())
    sd["low_scale_model.betas"] = torch.linspace(1e-4, 0.02, 1000)  # ignored
    return _save(sd, tmp_path_factory.mktemp("x4") / "SD-Upscale" / "x4-upscaler-ema.safetensors")


def test_x4_single_file_loads_and_upscales_like_its_pipeline(x4_file):
    from ldm_core.models.loading import read_tensor_shapes

    shapes = read_tensor_shapes(x4_file)
    assert sr_files.sr_kind(shapes) == sr_files.X4
    assert "model.diffusion_model.label_emb.weight" in shapes
    assert "cond_stage_model.model.token_embedding.weight" in shapes  # OpenCLIP layout, as Stability's file
    pipe = tiny_x4_pipeline()
    loaded = sr_files.load_sr_file(
        x4_file, device=torch.device("cpu"), dtype=torch.float32, allow_pickle=False, field="upscaler"
    )
    assert loaded.unet.config.only_cross_attention[1] is True  # read from the shapes (level 0 has no attention)
    assert loaded.unet.config.num_class_embeds == 1000
    kw = dict(prompt="a red circle", image=smooth(16, 16), num_inference_steps=2, noise_level=20, output_type="pt")
    want = pipe(generator=torch.Generator().manual_seed(3), **kw).images
    got = loaded(generator=torch.Generator().manual_seed(3), **kw).images
    assert got.shape == (1, 3, 64, 64)
    assert torch.allclose(want, got, atol=1e-4), (want - got).abs().max()


def test_x4_single_file_in_the_registry_and_the_api(tmp_path, x4_file, ldsr_file):
    import shutil

    import fastapi
    from fastapi.testclient import TestClient

    from api import install
    from ldm_core.config import EngineConfig
    from ldm_core.models.detect import UnsupportedCheckpointError, detect_checkpoint
    from ldm_core.models.loading import read_tensor_shapes
    from ldm_core.service import Service

    with pytest.raises(UnsupportedCheckpointError, match="models/SD-Upscale"):
        detect_checkpoint(read_tensor_shapes(x4_file))
    shutil.copytree(x4_file.parent, tmp_path / "models" / "SD-Upscale")
    shutil.copytree(ldsr_file.parent, tmp_path / "models" / "LDSR")
    cfg = EngineConfig.from_data_dir(tmp_path, builtin_model_dir=None, device="cpu", save_images=False)
    service = Service(cfg)
    app = fastapi.FastAPI()
    install(app, service)
    try:
        with TestClient(app) as client:
            infos = {u["name"]: u for u in client.get("/sdapi/v1/upscalers").json()}
            assert infos["x4-upscaler-ema"]["scale"] == 4 and infos["LDSR"]["scale"] == 4
            buf = io.BytesIO()
            smooth().save(buf, format="PNG")
            for name in ("x4-upscaler-ema", "LDSR"):
                body = {"image": base64.b64encode(buf.getvalue()).decode(), "upscaler_1": name, "upscaling_resize": 2}
                r = client.post("/sdapi/v1/extra-single-image", json=body)
                assert r.status_code == 200, r.text
                out = Image.open(io.BytesIO(base64.b64decode(r.json()["image"])))
                assert out.size == (48, 40)
    finally:
        service.shutdown()


def test_ldsr_as_the_hires_fix_upscaler(tmp_path, ldsr_file, tiny_models):
    import shutil

    from test_engine import make_engine

    from ldm_core.generation_requests import GenerationRequest

    shutil.copytree(ldsr_file.parent, tmp_path / "models" / "LDSR")
    engine = make_engine(tmp_path, {"tiny-sd1": tiny_models["sd1"]["diffusers"]}, device="cpu", save_images=False)
    engine.upscalers.diffusion = FAST
    req = GenerationRequest.build(
        prompt="a red circle",
        steps=2,
        width=64,
        height=64,
        seed=3,
        enable_hr=True,
        hr_scale=2,
        hr_upscaler="LDSR",
        hr_second_pass_steps=2,
        denoising_strength=0.3,
        save_images=False,
    )
    res = engine.generate(req)
    assert res.images[0].size == (128, 128)
    assert "Hires upscaler: LDSR" in res.infotexts[0]


def test_a1111_ldsr_steps_setting_is_honoured(tmp_path, ldsr_file):
    import shutil

    from ldm_core.config import EngineConfig
    from ldm_core.engine import Engine
    from ldm_core.options import OptionsStore, bind_engine

    shutil.copytree(ldsr_file.parent, tmp_path / "models" / "LDSR")
    engine = Engine(EngineConfig.from_data_dir(tmp_path, builtin_model_dir=None, device="cpu", save_images=False))
    store = OptionsStore(tmp_path / "config.json")
    bind_engine(store, engine)
    assert engine.upscalers.diffusion.ldsr_steps == 100  # A1111's default
    calls = []
    unet = engine.upscalers.load("LDSR").pipeline().unet
    unet.register_forward_hook(lambda *_: calls.append(1))
    store.update({"ldsr_steps": 3})  # as a client sets it through /sdapi/v1/options
    engine.upscalers.upscale(smooth(), "LDSR", scale=4)
    assert len(calls) == 3


@pytest.mark.parametrize("kind", ["LDSR", "x4-upscaler-ema"])
def test_interrupt_reaches_every_denoising_step(tmp_path, ldsr_file, x4_file, kind):
    class Stop(Exception):
        pass

    calls = []

    def cancel():
        calls.append(1)
        if len(calls) == 3:  # tile start, step 1, step 2: stop inside the first tile
            raise Stop

    folder = (ldsr_file if kind == "LDSR" else x4_file).parent
    reg = UpscalerRegistry([folder], builtin=None, diffusion=DiffusionUpscaleOptions(steps=5, ldsr_steps=5))
    with pytest.raises(Stop):
        reg.upscale(smooth(), kind, scale=4, cancel=cancel)
    assert len(calls) == 3


def test_ldsr_from_the_command_line(tmp_path, ldsr_file, capsys):
    import shutil

    from ldm_core.cli import _upscale_config, build_parser, main
    from ldm_core.outputs import read_image_info

    shutil.copytree(ldsr_file.parent, tmp_path / "models" / "LDSR")
    assert main(["upscalers", "--data-dir", str(tmp_path)]) == 0
    assert "LDSR" in capsys.readouterr().out.split("\n")
    src = tmp_path / "small.png"
    smooth().save(src)
    argv = ["upscale", str(src), "--upscaler", "LDSR", "--ldsr-steps", "2", "--data-dir", str(tmp_path)]
    config = _upscale_config(build_parser().parse_args([*argv, "--out", "o", "--steps", "3", "--noise-level", "5"]))
    assert (config.diffusion_upscale.ldsr_steps, config.diffusion_upscale.steps) == (2, 3)
    assert config.diffusion_upscale.noise_level == 5
    assert main([*argv, "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    path = Path(capsys.readouterr().out.split()[0])
    out = Image.open(path)
    assert out.size == (96, 80)
    assert read_image_info(out)[1]["postprocessing"] == "Postprocess upscale by: 4, Postprocess upscaler: LDSR"
