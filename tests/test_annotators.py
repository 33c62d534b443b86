"""Model-backed ControlNet preprocessors (extensions/controlnet/annotators.py): tiny random depth (DPT, Depth
Anything) and segmentation (SegFormer) models in the folder layout transformers saves produce maps through the
/controlnet/detect route, the UI's module choices and a ControlNet unit of a job; a missing folder and a
pickle-only folder give messages that name what to do, not tracebacks."""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_controlnet import SIZE, tiny_controlnet

from ldm_core.config import EngineConfig
from ldm_core.engine import Engine
from ldm_core.extensions import REPO_EXTENSIONS_DIR, ExtensionManager
from ldm_core.generation_requests import GenerationRequest, RequestError


def _positive_head(model) -> None:
    """Random heads end in a ReLU that zeroes most outputs: lift the last convolution so depth varies."""
    last = [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.mul_(1000.0)
        last.bias.fill_(1.0)


def tiny_dpt(folder) -> None:
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(0)
    cfg = DPTConfig(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=16,
        reassemble_factors=[4, 2, 1, 0.5],
    )
    model = DPTForDepthEstimation(cfg)
    _positive_head(model)
    model.save_pretrained(folder)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(folder)


def tiny_depth_anything(folder) -> None:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    torch.manual_seed(1)
    backbone = Dinov2Config(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=28,
        patch_size=14,
        out_indices=[1, 2, 3, 4],
        reshape_hidden_states=False,
    )
    cfg = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=16,
        patch_size=14,
        neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=16,
        head_hidden_size=8,
    )
    model = DepthAnythingForDepthEstimation(cfg)
    _positive_head(model)
    model.save_pretrained(folder)
    DPTImageProcessor(size={"height": 28, "width": 28}, keep_aspect_ratio=False).save_pretrained(folder)


def tiny_segformer(folder) -> None:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    torch.manual_seed(2)
    cfg = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=150,
    )
    SegformerForSemanticSegmentation(cfg).save_pretrained(folder)
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)


def photo(seed: int = 0) -> Image.Image:
    """A smooth, photo-like test image (not from the shapes world): gradients and a disc."""
    y, x = np.mgrid[0:48, 0:64].astype(np.float32)
    rgb = np.stack([x / 64, y / 48, ((x - 40) ** 2 + (y - 20) ** 2 < 150).astype(np.float32)], -1)
    rng = np.random.default_rng(seed)
    return Image.fromarray(((rgb * 0.8 + rng.random(rgb.shape) * 0.2) * 255).astype(np.uint8))


def b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("annotators")
    ckpt, cnd, ann = (root / "models" / d for d in ("Stable-diffusion", "ControlNet", "annotators"))
    for d in (ckpt, cnd, ann):
        d.mkdir(parents=True)
    (ckpt / "tiny-sd1").symlink_to(tiny_models["sd1"]["diffusers"], target_is_directory=True)
    cn = tiny_controlnet(tiny_models["sd1"]["diffusers"] / "unet")
    with torch.no_grad():  # the hint encoder's last convolution starts at zero: make the map matter
        cn.controlnet_cond_embedding.conv_out.weight.normal_(0, 0.3)
    save_file({k: v.contiguous() for k, v in cn.state_dict().items()}, str(cnd / "cn-depth.safetensors"))
    tiny_dpt(ann / "depth_midas")
    tiny_depth_anything(ann / "depth_anything")
    tiny_segformer(ann / "seg_ufade20k")
    cfg = EngineConfig.from_data_dir(root, builtin_model_dir=None, save_images=False, preview_every=0)
    engine = Engine(cfg)
    manager = ExtensionManager([REPO_EXTENSIONS_DIR], config=cfg, state_file=root / "extensions.json")
    manager.load(engine)
    assert manager.get("controlnet").status == "loaded", manager.get("controlnet").message
    routes = {r.path: r for _, r in manager.api_routes()}
    return {"engine": engine, "manager": manager, "root": root, "routes": routes}


def detect(setup, module: str, image: Image.Image | None = None, **kw) -> np.ndarray:
    body = {"controlnet_module": module, "controlnet_input_images": [b64(image or photo())], **kw}
    out = setup["routes"]["/controlnet/detect"].handler(body)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(out["images"][0]))).convert("RGB"))


@pytest.mark.parametrize("module", ["depth_midas", "depth_anything"])
def test_depth_maps_from_local_models(setup, module):
    m = detect(setup, module, controlnet_processor_res=48)
    assert m.shape == (48, 64, 3)  # short side at the processing resolution, aspect kept
    assert np.array_equal(m[..., 0], m[..., 1]) and np.array_equal(m[..., 1], m[..., 2])  # grey
    assert m.min() == 0 and m.max() == 255  # scaled to the full range per image


def test_normal_map_from_depth(setup):
    m = detect(setup, "normal_midas", controlnet_processor_res=48, controlnet_threshold_a=0.0)
    assert m.shape == (48, 64, 3)
    n = m.astype(np.float32) / 127.5 - 1
    assert np.allclose(np.linalg.norm(n, axis=-1), 1.0, atol=0.03)  # unit normals
    assert (n[..., 2] > 0).all() and n[..., :2].std() > 0.01  # towards the viewer, not flat
    flat = detect(setup, "normal_midas", controlnet_processor_res=48, controlnet_threshold_a=1.01)
    assert (flat == [128, 128, 255]).all()  # all background: the normal faces the viewer


def test_segmentation_in_the_ade20k_palette(setup):
    from ldm_ext_controlnet.annotators import ADE20K_PALETTE

    m = detect(setup, "seg_ufade20k", controlnet_processor_res=48)
    colours = {tuple(c) for c in m.reshape(-1, 3)}
    assert colours <= {tuple(c) for c in ADE20K_PALETTE}
    assert ADE20K_PALETTE.shape == (150, 3) and len({tuple(c) for c in ADE20K_PALETTE}) == 149  # one repeat


def test_missing_and_pickled_annotators_say_what_to_do(setup, tmp_path):
    with pytest.raises(RequestError, match=r"annotators/seg_ofade20k/.*nothing is downloaded"):
        detect(setup, "seg_ofade20k")
    pickled = setup["root"] / "models" / "annotators" / "depth_anything_v2"
    shutil.copytree(setup["root"] / "models" / "annotators" / "depth_midas", pickled)
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")  # the old pickled layout
    (pickled / "model.safetensors").unlink()
    with pytest.raises(RequestError, match="--allow-pickle"):
        detect(setup, "depth_anything_v2")


def test_listed_in_module_list_and_ui_choices(setup):
    listing = setup["routes"]["/controlnet/module_list"].handler(None)
    for name in ("depth_midas", "depth_anything", "depth_anything_v2", "normal_midas", "seg_ofade20k", "seg_ufade20k"):
        assert name in listing["module_list"] and listing["module_detail"][name]["model_free"] is False
    assert listing["module_detail"]["canny"]["model_free"] is True
    assert listing["module_detail"]["normal_midas"]["sliders"][0]["value"] == 0.4
    (sec,) = [s for s in setup["manager"].ui_sections("txt2img") if s.name == "controlnet"]
    module = next(f for f in sec.fields if f.name == "module")
    assert {"depth_midas", "seg_ufade20k", "normal_midas"} <= set(module.current_choices())


def test_a_unit_with_a_depth_preprocessor_conditions_the_job(setup):
    engine = setup["engine"]

    def run(module: str | None) -> np.ndarray:
        kw = {}
        if module is not None:
            unit = {"enabled": True, "module": module, "model": "cn-depth", "image": photo(3), "weight": 2.0}
            kw["alwayson_scripts"] = {"controlnet": {"args": [unit]}}
        req = GenerationRequest.build(
            prompt="a house", steps=3, width=SIZE, height=SIZE, seed=7, model="tiny-sd1", save_images=False, **kw
        )
        res = engine.generate(req)
        return np.asarray(res.images[0]).astype(np.int16), res.infotexts[0]

    plain, _ = run(None)
    depth, info = run("depth_midas")
    seg, _ = run("seg_ufade20k")
    assert np.abs(depth - plain).max() > 0 and np.abs(seg - depth).max() > 0
    assert "Module: depth_midas" in info


def test_cli_detect_writes_the_map_and_names_a_missing_folder(setup, tmp_path, capsys):
    from ldm_core.cli import main

    src = tmp_path / "photo.png"
    photo().save(src)
    data = ["--data-dir", str(setup["root"]), "--device", "cpu"]
    out = tmp_path / "depth.png"
    assert (
        main(["detect", "--module", "depth_midas", "--image", str(src), "--out", str(out), "--resolution", "48", *data])
        == 0
    )
    m = np.asarray(Image.open(out).convert("RGB"))
    assert m.shape == (48, 64, 3) and m.max() == 255
    missing = ["detect", "--module", "seg_ofade20k", "--image", str(src), "--out", str(tmp_path / "x.png"), *data]
    assert main(missing) == 2
    assert "annotators/seg_ofade20k/" in capsys.readouterr().err


def test_built_in_world_seg_and_depth_read_back_from_a_render(setup):
    """shapes_seg / shapes_depth: the maps the built-in seg and depth ControlNets learn from, read back from an
    image of that world through /controlnet/detect; on 200 renders of two overlapping objects the front one is
    found in front in most cases (the hidden one's shape is often misread: its visible part has a bite)."""
    import random

    from ldm_core.train import condition_maps as cm
    from ldm_core.train import shapes

    rng = random.Random(3)
    scenes = [cm.overlapping_scene(rng) for _ in range(200)]
    packed = shapes.pack_scenes(scenes)
    renders = shapes.render_packed(packed, 64)
    cover = shapes.object_coverages(packed, 64)
    right = 0
    for i in range(len(scenes)):
        depth = cm.read_depth_map(shapes.to_pil(renders[i]))
        d = np.asarray(depth)[..., 0]
        front, back = (cover[i, 1] > 0.5).numpy(), ((cover[i, 0] > 0.5) & ~(cover[i, 1] > 0.5)).numpy()
        right += int(np.median(d[front]) > np.median(d[back]))
    assert right >= 150, right  # 166 of 200 when written; a reader that guessed would find about 100
    seg = detect(setup, "shapes_seg", shapes.to_pil(renders[0]))
    want = cm.seg_maps(packed[:1], 64)[0].permute(1, 2, 0).numpy() * 255
    assert (np.abs(seg.astype(int) - want.round().astype(int)).sum(-1) == 0).mean() > 0.85
    assert {tuple(c) for c in seg.reshape(-1, 3)} <= {tuple(c) for c in cm.SEG_PALETTE.values()}
    depth = detect(setup, "shapes_depth", shapes.to_pil(renders[0]))
    assert set(np.unique(depth[..., 0])) <= {0, round(cm.DEPTH[0] * 255), round(cm.DEPTH[1] * 255)}
    listing = setup["routes"]["/controlnet/module_list"].handler(None)
    assert listing["module_detail"]["shapes_seg"]["model_free"] is True
