"""The inpainting-model trainer (ldm_core.train.inpaint): masks, captions, the 9-channel UNet it starts from,
and a short run on a tiny base whose folder the engine then runs as an inpainting model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_core.train import shapes
from ldm_core.train.inpaint import (
    MASK_KINDS,
    InpaintTrainOptions,
    inpainting_unet,
    masked_objects,
    random_mask,
    train_inpaint,
    training_batch,
    training_caption,
)


def _scene_and_covers(n_objects: int, seed: int = 0, res: int = 64):
    scene = shapes.sample_scene(random.Random(seed), n_objects)
    covers = shapes.object_coverages(shapes.pack_scenes([scene]), res)[0].numpy()
    return scene, covers


def test_mask_kinds_are_binary_and_object_masks_cover_their_object():
    assert abs(sum(MASK_KINDS.values()) - 1) < 1e-9
    scene, covers = _scene_and_covers(2)
    rng = random.Random(1)
    masks = [random_mask(rng, 64, covers, invert=0.0) for _ in range(300)]
    for m in masks:
        assert m.shape == (64, 64) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
    shares = np.array([m.mean() for m in masks])
    assert (shares == 1).any() and (shares < 0.5).mean() > 0.5  # "all" drawn sometimes; most masks are parts
    # an object mask (kind "object") covers its whole object: some masks do, for each object
    for c in covers:
        assert any(((c > 0.3) <= (m > 0)).all() and m.mean() < 0.6 for m in masks)


def test_caption_names_only_the_masked_object_or_the_scene():
    scene, covers = _scene_and_covers(2, seed=3)
    one = (covers[0] > 0.1).astype(np.uint8)  # exactly the first object
    one[covers[1] > 0.1] = 0
    assert masked_objects(one, covers) == [0]
    opts = InpaintTrainOptions(base=Path("."), out=Path("."), caption_dropout=0.0, object_caption=1.0)
    o = scene.objects[0]
    for seed in range(20):
        cap = training_caption(scene, one, covers, random.Random(seed), opts)
        assert any(w in cap for w in shapes.SHAPE_WORDS[o.shape]) and " and " not in cap
        assert "background" not in cap and "backdrop" not in cap
    nothing = np.zeros_like(one)  # no object under the mask: the scene's caption
    opts = InpaintTrainOptions(base=Path("."), out=Path("."), caption_dropout=0.0, object_caption=1.0)
    caps = {training_caption(scene, nothing, covers, random.Random(s), opts) for s in range(20)}
    assert len(caps) > 1 and all(caps)


def test_training_batch_is_a_function_of_seed_and_step():
    opts = InpaintTrainOptions(base=Path("."), out=Path("."))
    a = training_batch(0, 5, 8, 64, opts)
    b = training_batch(0, 5, 8, 64, opts)
    c = training_batch(0, 6, 8, 64, opts)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert not torch.equal(a[1], c[1])
    assert a[0].shape == (8, 3, 64, 64) and a[1].shape == (8, 1, 64, 64)


def test_inpainting_unet_starts_as_the_base(tiny_models):
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(str(tiny_models["sd1"]["diffusers"] / "unet")).eval()
    unet = inpainting_unet(base).eval()
    assert unet.config.in_channels == 2 * base.config.in_channels + 1
    c = base.config.in_channels
    s = base.config.sample_size
    x = torch.randn(2, c, s, s)
    extra = torch.randn(2, c + 1, s, s)  # anything: the new channels start at zero weight
    cond = torch.randn(2, 77, base.config.cross_attention_dim)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        want = base(x, t, cond).sample
        got = unet(torch.cat([x, extra], 1), t, cond).sample
    assert torch.allclose(got, want, atol=1e-5)


def test_short_run_resumes_and_exports_a_folder_the_engine_runs_as_inpainting_model(tmp_path):
    from tiny_models import build_tiny_f4

    # the built-in model's geometry (64 px, factor-4 VAE), which is what this trainer is used on; the tiny
    # SD1's native 512 px made this one test take half a minute
    base = build_tiny_f4(tmp_path / "base")
    out, work = tmp_path / "sd1-inpainting", tmp_path / "work"
    opts = InpaintTrainOptions(base=base, out=out, work_dir=work, steps=2, batch=2, warmup_steps=1, log_every=0)
    rec = train_inpaint(opts, log=lambda _: None)
    assert rec["steps"] == 2 and np.isfinite(rec["final_loss"])
    opts.steps = 3  # a second sitting goes on from the work folder's checkpoint
    assert train_inpaint(opts, log=lambda _: None)["steps"] == 3
    assert json.loads((out / "TRAINING.json").read_text())["steps"] == 3
    from ldm_core.models.detect import detect_diffusers

    unet_cfg = json.loads((out / "unet" / "config.json").read_text())
    assert unet_cfg["in_channels"] == 9
    assert detect_diffusers(unet_cfg, json.loads((out / "scheduler" / "scheduler_config.json").read_text())).inpaint
    # the engine runs it (a 9-channel UNet given 4 channels would fail): what is not masked stays
    from ldm_core.config import EngineConfig
    from ldm_core.engine import Engine
    from ldm_core.generation_requests import InpaintRequest

    ckpt = tmp_path / "data" / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    (ckpt / "sd1-inpainting").symlink_to(out, target_is_directory=True)
    engine = Engine(EngineConfig.from_data_dir(tmp_path / "data", builtin_model_dir=None))
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 32, 64, 64))
    r = InpaintRequest.build(
        prompt="a blue star",
        steps=2,
        width=64,
        height=64,
        seed=1,
        init_images=[init],
        mask=mask,
        mask_blur=0,
        denoising_strength=1.0,
        save_images=False,
    )
    res = engine.generate(r)
    a = np.asarray(res.images[0]).astype(int)
    assert (a[:24, :24] == (200, 30, 30)).all()
