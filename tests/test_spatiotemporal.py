"""Spatio-temporal attention in motion modules (ldm_core.video.spatiotemporal): a temporal block's attention that
attends over every cell of every frame, named in a module's config.json, patched in only where and while it runs."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import save_motion_module, tiny_components, tiny_motion_adapter

from ldm_core.config import EngineConfig
from ldm_core.engine import Engine
from ldm_core.generation_requests import GenerationRequest
from ldm_core.video.motion_modules import MotionModule, MotionModuleError, load_motion_module, motion_patch
from ldm_core.video.spatiotemporal import SpatioTemporalAttention, cell_encoding


def test_cell_encoding_tells_every_cell_apart_and_reads_a_place_alike_at_any_grid():
    enc = cell_encoding(4, 4, 32)
    assert enc.shape == (16, 32)
    assert torch.cdist(enc, enc).add(torch.eye(16) * 1e3).min() > 0.1  # no two cells alike
    # the centre of a 1x1 grid and the centre cell of a 3x3 grid are the same place of the image
    assert torch.allclose(cell_encoding(1, 1, 32)[0], cell_encoding(3, 3, 32)[4], atol=1e-6)


def _temporal_transformer():
    return tiny_motion_adapter("sd1").down_blocks[0].motion_modules[0]


def _attend(attention, tokens, grid, spatiotemporal: bool):
    """`attention` over the temporal transformer's tokens (clips * cells, frames, channels)."""
    old = attention.processor
    if spatiotemporal:
        proc = SpatioTemporalAttention()
        proc.grid = grid
        attention.set_processor(proc)
    try:
        with torch.no_grad():
            return attention(tokens)
    finally:
        attention.set_processor(old)


def test_a_frame_reads_other_frames_at_other_cells_only_with_spatiotemporal_attention():
    tf = _temporal_transformer()
    attention = tf.transformer_blocks[0].attn2
    frames, grid, c = 4, (4, 4), attention.to_q.in_features
    torch.manual_seed(0)
    tokens = torch.randn(2 * 16, frames, c)  # two clips of a 4x4 grid of cells, rows first, four frames each
    poked = tokens.clone()
    poked[0, 2] += 3.0  # clip 0, top-left cell, frame 2
    for st in (False, True):
        a, b = _attend(attention, tokens, grid, st), _attend(attention, poked, grid, st)
        far = (a[15, 0] - b[15, 0]).abs().max()  # clip 0, bottom-right cell, frame 0
        same_cell = (a[0, 0] - b[0, 0]).abs().max()  # the poked cell, frame 0
        other_clip = (a[16:] - b[16:]).abs().max()
        assert same_cell > 1e-3  # along time, both read the poked frame
        assert other_clip == 0  # clips never read each other
        if st:
            assert far > 1e-3
        else:
            assert far == 0  # AnimateDiff's attention never leaves its cell


def test_without_its_grid_the_processor_refuses():
    tf = _temporal_transformer()
    tf.transformer_blocks[0].attn2.set_processor(SpatioTemporalAttention())
    with pytest.raises(RuntimeError, match="grid"):
        tf(torch.randn(4, tf.in_channels, 2, 2), num_frames=4)


def _module_folder(tmp: Path, name: str, **keys) -> Path:
    path = save_motion_module(tiny_motion_adapter("sd1"), tmp / name, "diffusers")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **keys}))
    return path


def _processors(adapter):
    return {
        name: type(b.attn2.processor).__name__
        for name, m in adapter.named_modules()
        if hasattr(m, "transformer_blocks")
        for b in m.transformer_blocks
    }


def test_a_module_folder_names_its_spatiotemporal_attentions_and_the_patch_uses_them_where_it_says(tmp_path):
    plain = load_motion_module(_module_folder(tmp_path, "plain"))
    st = load_motion_module(
        _module_folder(tmp_path, "st", spatiotemporal_attention=["attn2"], spatiotemporal_from_level=1)
    )
    assert plain.spatiotemporal == () and st.spatiotemporal == ("attn2",) and st.spatiotemporal_from_level == 1
    unet = tiny_components("sd1")["unet"]  # two levels: 0 (32 channels, finest) and 1 (64 channels)
    torch.manual_seed(0)
    x, ehs = torch.randn(8, 4, 8, 8), torch.randn(8, 77, 32)
    before = _processors(st.adapter)
    outs = {}
    for module in (plain, st):
        with torch.no_grad(), motion_patch(unet, module) as patch:
            patch.set_frames(4)
            if module is st:
                during = _processors(st.adapter)
            outs[module.name] = unet(x, 500, ehs).sample
    changed = {k for k in during if during[k] != before[k]}
    assert changed and all(("down_blocks.1." in k or "up_blocks.0." in k or "mid_block" in k) for k in changed)
    assert all(during[k] == "SpatioTemporalAttention" for k in changed)
    assert _processors(st.adapter) == before  # put back when the job ends
    assert (outs["plain"] - outs["st"]).abs().max() > 1e-4  # same weights, another attention


@pytest.mark.parametrize(
    "keys, says",
    [
        ({"spatiotemporal_attention": ["attn3"]}, "attn3 is not one of attn1, attn2"),
        ({"spatiotemporal_attention": "attn2"}, "not a list"),
        ({"spatiotemporal_attention": ["attn2"], "spatiotemporal_from_level": -1}, "spatiotemporal_from_level"),
    ],
)
def test_a_bad_spatiotemporal_config_is_a_clear_error(tmp_path, keys, says):
    with pytest.raises(MotionModuleError, match=says):
        load_motion_module(_module_folder(tmp_path, "bad", **keys))


def test_a_spatiotemporal_module_makes_a_clip_through_the_engine(tmp_path, tiny_models):
    data = tmp_path / "data"
    ckpt = data / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    model = tiny_models["sd1"]["single_file"]
    shutil.copy(model, ckpt / model.name)
    mm = data / "models" / "AnimateDiff"
    mm.mkdir(parents=True)
    _module_folder(mm, "plain-mm")
    _module_folder(mm, "st-mm", spatiotemporal_attention=["attn2"])
    engine = Engine(EngineConfig.from_data_dir(data, builtin_model_dir=None))
    clips = {}
    for name in ("plain-mm", "st-mm"):
        req = GenerationRequest.build(
            prompt="a red circle",
            steps=2,
            width=64,
            height=64,
            seed=3,
            sampler_name="Euler a",
            save_images=False,
            animatediff={"model": name, "video_length": 4, "batch_size": 4, "format": []},
        )
        clips[name] = [np.asarray(im, np.float32) for im in engine.generate(req).images]
    assert len(clips["st-mm"]) == 4
    assert max(np.abs(a - b).mean() for a, b in zip(clips["plain-mm"], clips["st-mm"], strict=True)) > 0.1


def test_motion_training_writes_and_reads_back_a_spatiotemporal_module(tmp_path, tiny_models):
    from ldm_core.train.motion import MotionTrainOptions, add_arguments, train_motion

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    a = parser.parse_args(["--spatiotemporal", "attn2", "--spatiotemporal-from-level", "1"])
    assert tuple(a.spatiotemporal) == ("attn2",) and a.spatiotemporal_from_level == 1
    base = dict(base=str(tiny_models["sd1"]["diffusers"]), frames=4, clips=1, steps=1, log_every=0, resolution=64)
    train_motion(MotionTrainOptions(**base, out=str(tmp_path / "plain")), log=lambda m: None)
    said = []
    opts = MotionTrainOptions(
        **base,
        out=str(tmp_path / "st"),
        init=str(tmp_path / "plain"),  # a plain module continues as a spatio-temporal one: same weights' shapes
        spatiotemporal=("attn2",),
        spatiotemporal_from_level=1,
    )
    rec = train_motion(opts, log=said.append)
    assert any("starting from the weights" in m for m in said)
    assert rec["spatiotemporal_attention"] == ["attn2"] and rec["from_level"] == 1
    cfg = json.loads((tmp_path / "st" / "config.json").read_text())
    assert cfg["spatiotemporal_attention"] == ["attn2"] and cfg["spatiotemporal_from_level"] == 1
    module = load_motion_module(tmp_path / "st")
    assert isinstance(module, MotionModule) and module.spatiotemporal == ("attn2",)
    assert module.spatiotemporal_from_level == 1
