"""T2I-Adapters in ControlNet units (extensions/controlnet/adapters.py): tiny random adapters for the tiny SD1
and SDXL models, as a diffusers folder, a single file with diffusers keys and (SD1) a single file in
TencentARC's original key layout, all load, change the output, follow the unit's weight and guidance window,
and are recorded in infotext; a mismatched adapter is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_controlnet import SIZE, square_outline

from ldm_core.config import EngineConfig
from ldm_core.engine import Engine
from ldm_core.extensions import REPO_EXTENSIONS_DIR, ExtensionManager
from ldm_core.generation_requests import GenerationRequest, RequestError


def tiny_adapter(unet_config: dict, xl: bool, seed: int):
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    a = T2IAdapter(
        in_channels=3,
        channels=list(unet_config["block_out_channels"]),
        num_res_blocks=2,
        downscale_factor=16 if xl else 8,
        adapter_type="full_adapter_xl" if xl else "full_adapter",
    )
    with torch.no_grad():  # random weights act at a size a test can see
        for p in a.parameters():
            p.mul_(3.0)
    return a.eval()


def to_original(a) -> dict[str, torch.Tensor]:
    """diffusers keys -> TencentARC's (body K = level * blocks + block)."""
    per = a.config.num_res_blocks
    out = {}
    for k, v in a.state_dict().items():
        parts = k.split(".")
        if parts[1] == "conv_in":
            out[".".join(parts[1:])] = v
        elif parts[3] == "in_conv":
            out[f"body.{int(parts[2]) * per}.in_conv.{parts[4]}"] = v
        else:
            level, block = int(parts[2]), int(parts[4])
            out[f"body.{level * per + block}.{parts[5]}.{parts[6]}"] = v
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models):
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("t2i")
    ckpt, cnd = root / "models" / "Stable-diffusion", root / "models" / "ControlNet"
    ckpt.mkdir(parents=True)
    cnd.mkdir(parents=True)
    for fam in ("sd1", "sdxl"):
        (ckpt / f"tiny-{fam}").symlink_to(tiny_models[fam]["diffusers"], target_is_directory=True)
        cfg = UNet2DConditionModel.load_config(tiny_models[fam]["diffusers"] / "unet")
        a = tiny_adapter(cfg, fam == "sdxl", seed=3)
        a.save_pretrained(str(cnd / f"t2i-{fam}-folder"))
        save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(cnd / f"t2i-{fam}-keys.safetensors"))
        if fam == "sd1":
            save_file(to_original(a), str(cnd / "t2iadapter_sd1-orig.safetensors"))
    cfg = EngineConfig.from_data_dir(root, builtin_model_dir=None, save_images=False, preview_every=0)
    engine = Engine(cfg)
    manager = ExtensionManager([REPO_EXTENSIONS_DIR], config=cfg, state_file=root / "extensions.json")
    manager.load(engine)
    assert manager.get("controlnet").status == "loaded", manager.get("controlnet").message
    return engine


def run(engine, fam: str, model: str | None, **unit):
    kw = {}
    if model is not None:
        u = {"enabled": True, "module": "none", "model": model, "image": square_outline(), **unit}
        kw["alwayson_scripts"] = {"controlnet": {"args": [u]}}
    req = GenerationRequest.build(
        prompt="a red circle", steps=3, width=SIZE, height=SIZE, seed=7, model=f"tiny-{fam}", save_images=False, **kw
    )
    res = engine.generate(req)
    return np.asarray(res.images[0]).astype(np.int16), res.infotexts[0]


@pytest.mark.parametrize(
    "fam,layouts",
    [
        ("sd1", ["t2i-sd1-folder", "t2i-sd1-keys", "t2iadapter_sd1-orig"]),
        ("sdxl", ["t2i-sdxl-folder", "t2i-sdxl-keys"]),
    ],
)
def test_every_layout_changes_the_output_alike(setup, fam, layouts):
    plain, _ = run(setup, fam, None)
    outs = []
    for name in layouts:
        img, info = run(setup, fam, name)
        assert np.abs(img - plain).max() > 10, name
        assert f"Model: {name} [" in info and "Module: none" in info
        outs.append(img)
    for img in outs[1:]:  # the same weights in every layout: the same image
        assert np.abs(img - outs[0]).max() <= 1
    half, _ = run(setup, fam, layouts[0], weight=0.5)
    off, _ = run(setup, fam, layouts[0], guidance_start=1.0, guidance_end=1.0)
    assert 0 < np.abs(half - plain).mean() < np.abs(outs[0] - plain).mean()
    assert np.abs(off - plain).max() <= 1  # outside its guidance window it does nothing


def test_an_sdxl_adapter_on_an_sd1_model_is_refused_by_name(setup):
    with pytest.raises(RequestError, match="t2i-sdxl-folder"):
        run(setup, "sd1", "t2i-sdxl-folder")
