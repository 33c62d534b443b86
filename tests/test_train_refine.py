"""The CPU refinement recipe (`python -m ldm_core.train refine`): caption read-outs for the text encoder's
pre-training, and a reduced end-to-end run over all four phases on a tiny model."""

from __future__ import annotations

import contextlib
import json
import os
import types

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_models import tiny_train_options  # noqa: E402

from ldm_core.train import builtin, shapes, text_pretrain  # noqa: E402
from ldm_core.train.builtin import CaptionTokenizer, train_builtin  # noqa: E402


def _scene(bg: str, *objs: tuple[str, str, str, str]) -> shapes.Scene:
    return shapes.Scene(bg, tuple(shapes.make_object(s, c, z, p) for s, c, z, p in objs))


def test_caption_mentions_only_what_the_caption_says():
    sc = _scene("blue", ("circle", "red", "small", "top left"))
    bg, (m,) = text_pretrain.caption_mentions(sc, "a red circle on a blue background")
    assert bg == "blue" and (m.shape, m.colour, m.position, m.size) == ("circle", "red", "unspecified", "unspecified")
    bg, (m,) = text_pretrain.caption_mentions(sc, "tiny round dot, upper left")
    assert bg == "unspecified" and (m.shape, m.colour, m.position, m.size) == (
        "circle",
        "unspecified",
        "top left",
        "small",
    )
    two = _scene("white", ("star", "green", "medium", "left"), ("square", "black", "small", "right"))
    bg, ms = text_pretrain.caption_mentions(two, "a green five-pointed star and a black box")
    assert bg == "unspecified" and [(m.shape, m.colour) for m in ms] == [("star", "green"), ("square", "black")]


def test_targets_bind_colour_to_shape():
    a = _scene("white", ("circle", "red", "small", "left"), ("square", "blue", "small", "right"))
    b = _scene("white", ("circle", "blue", "small", "left"), ("square", "red", "small", "right"))
    ta = text_pretrain.caption_targets(a, "a red circle and a blue square")
    tb = text_pretrain.caption_targets(b, "a blue circle and a red square")
    assert int(ta["count"]) == 1 and int(ta["shape_colour"].sum()) == 2
    assert not torch.equal(ta["shape_colour"], tb["shape_colour"])  # same words, different binding
    # the colour words alone would give the same multi-hot over colours: binding is what differs
    assert torch.equal(ta["colour_position"].sum(0), tb["colour_position"].sum(0))


def test_trimmed_ids_give_the_same_pooled_state_as_77_tokens():
    tok = CaptionTokenizer()
    te = builtin.build_text_encoder(builtin.PRESETS["tiny"]).eval()
    ids = tok(["a red circle", "small green star in the top left corner, white background"])
    short = text_pretrain.trim_padding(ids, tok.eos)
    assert short.shape[1] < 30
    with torch.no_grad():
        full, cut = te(ids), te(short)
    assert torch.allclose(full.pooler_output, cut.pooler_output, atol=1e-5)
    assert torch.allclose(full.last_hidden_state[:, : short.shape[1]], cut.last_hidden_state, atol=1e-5)


def test_text_pretraining_learns_to_read_captions():
    tok = CaptionTokenizer()
    torch.manual_seed(0)
    te = builtin.build_text_encoder(builtin.PRESETS["tiny"])
    start = {k: v.clone() for k, v in te.state_dict().items()}
    heads, step = text_pretrain.pretrain_text_encoder(te, tok, steps=40, batch=64, lr=3e-3, log=lambda m: None)
    assert step == 40
    ids, tg = text_pretrain._batch("heldout-test", 0, 256, tok)
    with torch.no_grad():
        losses = text_pretrain.head_losses(heads(te(ids).pooler_output), tg)
    fresh = text_pretrain.AttributeHeads(te.config.hidden_size)
    te2 = builtin.build_text_encoder(builtin.PRESETS["tiny"])
    with torch.no_grad():
        before = text_pretrain.head_losses(fresh(te2(ids).pooler_output), tg)
    assert sum(losses.values()) < 0.7 * sum(before.values())
    moved = [k for k, v in te.state_dict().items() if "layers" in k and not torch.equal(v, start[k])]
    assert moved  # the encoder itself learns, not only the heads
    acc = text_pretrain.evaluate(te, heads, tok, n=64)
    assert set(acc) == set(text_pretrain.HEADS) and all(0.0 <= v <= 1.0 for v in acc.values())


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("refine")
    train_builtin(tiny_train_options(root, "base", unet_steps=2, warmup_steps=1))
    return root


def test_reduced_refine_run_writes_a_folder_with_its_history(tiny_folder):
    from diffusers import StableDiffusionPipeline

    from ldm_core.train.__main__ import main

    out, work = tiny_folder / "refined", tiny_folder / "refine-work"
    args = ["refine", "--init", str(tiny_folder / "base" / "out"), "--out", str(out), "--work-dir", str(work)]
    args += ["--text-steps", "2", "--text-batch", "8", "--cache-scenes", "24", "--cache-batch", "16"]
    args += ["--unet-steps", "3", "--unet-batch", "4", "--decoder-steps", "2", "--decoder-batch", "2"]
    assert main(args) == 0
    info = json.loads((out / "TRAINING.json").read_text())
    p = info["progress"]
    assert p["phase"] == "done" and p["text_step"] == 2 and p["cache_done"] == 24 and p["unet_step"] == 3
    assert p["decoder_step"] == 2 and p["vae_psnr_before"] is not None
    if not p["decoder_kept"]:  # a worse decoder is never shipped
        assert p["vae_psnr_after"] < p["vae_psnr_before"]
    assert info["history"][-1]["command"] == "pytest" and info["spec"]["text_hidden"] == 32
    cache = torch.load(work / "latent-cache.pt", weights_only=True)
    assert cache["mean"].shape == (24, 4, 8, 8) and cache["mean"].abs().sum() > 0
    assert float(cache["cover"].max()) > 0.5  # objects fill whole latent cells somewhere
    base_unet = (tiny_folder / "base" / "out" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() != base_unet
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_inference_steps=2).images[0].size == (64, 64)
    # the same command again resumes a finished run: nothing is trained twice
    assert main(args) == 0
    assert json.loads((out / "TRAINING.json").read_text())["progress"]["unet_step"] == 3
    # a later sitting gives the finished run a new UNet cycle (here in bf16 autocast); that command again
    # trains nothing more
    cycle = args + ["--unet-cycle", "1", "--unet-steps", "2", "--autocast", "bf16"]
    for _ in range(2):
        assert main(cycle) == 0
        p = json.loads((out / "TRAINING.json").read_text())["progress"]
        assert p["phase"] == "done" and p["unet_step"] == 5 and p["unet_cycle"] == 1
        assert p["unet_cycle_start"]["1"][0] == 3 and p["decoder_step"] == 2 and p["text_step"] == 2


def test_decoder_only_polish_leaves_text_encoder_unet_and_encoder_alone(tiny_folder):
    from safetensors.torch import load_file

    from ldm_core.train.__main__ import main

    base = tiny_folder / "base" / "out"
    out, work = tiny_folder / "polished", tiny_folder / "polish-work"
    args = ["refine", "--init", str(base), "--out", str(out), "--work-dir", str(work), "--phases", "decoder"]
    args += ["--decoder-steps", "3", "--decoder-batch", "2", "--decoder-lr", "1e-3", "--decoder-warmup", "1"]
    args += ["--decoder-edge-weight", "4", "--decoder-grad-weight", "0.5"]  # the weighted loss (default run: plain)
    assert main(args) == 0
    p = json.loads((out / "TRAINING.json").read_text())["progress"]
    assert p["phase"] == "done" and p["decoder_step"] == 3 and p["text_step"] == 0 and p["unet_step"] == 0
    assert not (work / "latent-cache.pt").exists()

    def tensors(folder, part):
        (f,) = (folder / part).glob("*.safetensors")
        return load_file(str(f))

    for part in ("unet", "text_encoder"):
        a, b = tensors(base, part), tensors(out, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    a, b = tensors(base, "vae"), tensors(out, "vae")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("encoder.", "quant_conv.")))
    if p["decoder_kept"]:
        assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))
    with pytest.raises(ValueError, match="include cache"):
        main(["refine", "--init", str(base), "--out", str(out), "--work-dir", str(work), "--phases", "unet,decoder"])


@pytest.mark.parametrize("mode", ["off", "bf16"])
def test_decoder_phase_runs_in_the_autocast_the_run_asks_for(tiny_folder, monkeypatch, mode):
    from ldm_core.train import refine
    from ldm_core.train.__main__ import main

    seen = []
    real_step = refine.decoder_step

    def recording_step(*args, amp=None, **kw):
        with amp if amp is not None else contextlib.nullcontext():
            seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real_step(*args, amp=amp, **kw)

    monkeypatch.setattr(refine, "decoder_step", recording_step)
    base = tiny_folder / "base" / "out"
    out, work = tiny_folder / f"polished-{mode}", tiny_folder / f"polish-work-{mode}"
    args = ["refine", "--init", str(base), "--out", str(out), "--work-dir", str(work), "--phases", "decoder"]
    args += ["--decoder-steps", "2", "--decoder-batch", "2", "--autocast", mode]
    assert main(args) == 0
    assert seen == [mode == "bf16"] * 2


def test_decoder_unet_share_decodes_the_unets_own_estimates_of_the_latents(tiny_folder):
    from ldm_core.train.__main__ import main
    from ldm_core.train.builtin import build_scheduler
    from ldm_core.train.refine import RefineOptions, Refiner

    base = tiny_folder / "base" / "out"

    def estimates(share, max_t, oracle=False):
        r = Refiner(
            RefineOptions(
                init=base,
                out=tiny_folder / "unet-share",
                work_dir=tiny_folder / f"unet-share-{share}-{max_t}",
                decoder_unet_share=share,
                decoder_unet_max_t=max_t,
            )
        )
        scenes = shapes.sample_scenes("unet-share", 6)
        with torch.no_grad():
            raw = r.vae.encode(shapes.render(scenes, r.spec.resolution) * 2 - 1).latent_dist.mean
            ab = build_scheduler(r.spec).alphas_cumprod.float()
            if oracle:  # a UNet that knows the answer: its v gives back exactly the latents it was noised from
                clean, prediction = raw * r.sf, r.spec.prediction_type

                def unet(x_t, t, cond):
                    a = ab[t].view(-1, 1, 1, 1)
                    if prediction == "v_prediction":
                        return types.SimpleNamespace(sample=(a.sqrt() * x_t - clean) / (1 - a).sqrt())
                    return types.SimpleNamespace(sample=(x_t - a.sqrt() * clean) / (1 - a).sqrt())

                r.unet = unet
            return raw, r._unet_estimates(raw, scenes, 0, ab)

    raw, none = estimates(0.0, 400)
    assert torch.equal(raw, none)
    raw, low = estimates(1.0, 1)  # t = 0: the x0 estimate is the latent itself, up to a little noise
    _, high = estimates(1.0, 1000)  # any noise level: the UNet's guess
    scale = float(raw.abs().mean())
    assert float((low - raw).abs().mean()) < 0.1 * scale
    assert float((high - raw).abs().mean()) > 3 * float((low - raw).abs().mean())
    _, exact = estimates(1.0, 1000, oracle=True)  # the x0 formula and the latent scaling are right
    assert torch.allclose(exact, raw, atol=1e-3 * scale)
    # the option reaches the command line and the run's record
    out, work = tiny_folder / "unet-share-run", tiny_folder / "unet-share-run-work"
    args = ["refine", "--init", str(base), "--out", str(out), "--work-dir", str(work), "--phases", "decoder"]
    args += ["--decoder-steps", "2", "--decoder-batch", "2"]
    args += ["--decoder-unet-share", "0.5", "--decoder-unet-max-t", "300"]
    assert main(args) == 0
    info = json.loads((out / "TRAINING.json").read_text())
    assert info["progress"]["decoder_step"] == 2
    assert info["options"]["decoder_unet_share"] == 0.5 and info["options"]["decoder_unet_max_t"] == 300


def test_edge_weight_marks_object_rims_only():
    from ldm_core.train.builtin import edge_weight

    scene = shapes.Scene("white", (shapes.make_object("square", "red", "large", "centre"),))
    _, cover = shapes.render_packed(shapes.pack_scenes([scene]), 64, with_coverage=True)
    w = edge_weight(cover, 4.0)
    assert w.shape == cover.shape and float(w.max()) > 4.0
    assert float(w[0, 0, 0, 0]) == 1.0 and float(w[0, 0, 32, 32]) == 1.0  # background corner, square's middle
    rim = (cover > 0.05) & (cover < 0.95)
    assert bool((w[rim] > 1.0).all())


def test_decoder_step_with_uniform_weight_is_the_plain_loss():
    from ldm_core.train.builtin import decoder_step

    class Dec(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 3, 1)

        def decode(self, z):
            return types.SimpleNamespace(sample=self.conv(F.interpolate(z, scale_factor=8)))

    torch.manual_seed(0)
    raw, ims = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 64, 64)
    losses = []
    for kw in ({}, {"weight": torch.full((2, 1, 64, 64), 3.0)}, {"grad_weight": 0.5}):
        torch.manual_seed(1)
        dec = Dec()
        opt = torch.optim.SGD(dec.parameters(), lr=0.0)
        losses.append(float(decoder_step(dec, list(dec.parameters()), opt, raw, ims, 0.0, **kw)))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert losses[2] > losses[0]  # the gradient term adds to it


def test_fresh_unet_trains_a_new_layout_on_the_folders_vae(tiny_folder):
    """`--fresh-unet v2-f4`: the folder's VAE and text encoder under that preset's UNet layout (attention at
    the two coarser levels only), started from random weights; the folder written says so and loads."""
    from diffusers import UNet2DConditionModel

    from ldm_core.train.__main__ import main

    base = tiny_folder / "base" / "out"
    out, work = tiny_folder / "fresh", tiny_folder / "fresh-work"
    args = ["refine", "--init", str(base), "--out", str(out), "--work-dir", str(work), "--fresh-unet", "v2-f4"]
    args += ["--phases", "cache,unet", "--cache-scenes", "8", "--cache-batch", "8", "--unet-steps", "2"]
    args += ["--unet-batch", "2", "--autocast", "bf16"]
    assert main(args) == 0
    unet = UNet2DConditionModel.from_pretrained(out / "unet", local_files_only=True)
    v2 = builtin.PRESETS["v2-f4"]
    assert tuple(unet.config.block_out_channels) == v2.unet_channels
    assert tuple(unet.config.down_block_types) == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert unet.config.cross_attention_dim == 32  # the tiny folder's text encoder
    spec = json.loads((out / "TRAINING.json").read_text())["spec"]
    assert spec["unet_attention"] == [False, True, True] and spec["vae_channels"] == [8, 16, 16, 16]
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        base / "vae" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()


def test_export_every_records_learning_curve_points_and_curve_draws_them(tiny_folder, tmp_path):
    from PIL import Image

    from ldm_core.train.__main__ import main

    out, work = tiny_folder / "curve", tiny_folder / "curve-work"
    args = ["refine", "--init", str(tiny_folder / "base" / "out"), "--out", str(out), "--work-dir", str(work)]
    args += ["--phases", "cache,unet", "--cache-scenes", "8", "--cache-batch", "8", "--unet-steps", "3"]
    args += ["--unet-batch", "2", "--export-every", "0.000001", "--eval-n", "4"]
    assert main(args) == 0
    curve = json.loads((out / "TRAINING.json").read_text())["progress"]["curve"]
    assert [pt["unet_step"] for pt in curve] == [1, 2, 3]
    assert curve[-1]["samples_seen"] == 6 and curve[-1]["eval"]["n"] == 4
    assert 0 <= curve[-1]["eval"]["shape_colour"] <= 1 and "two_objects_both_right" in curve[-1]["eval"]
    png = tmp_path / "curve.png"
    assert main(["curve", "--model", str(out), "--out", str(png)]) == 0
    assert Image.open(png).size == (720, 420)
    assert main(["curve", "--model", str(tiny_folder / "base" / "out"), "--out", str(tmp_path / "none.png")]) == 1


def test_low_noise_lies_swap_only_low_noise_undropped_captions(tiny_folder):
    from ldm_core.train.__main__ import main
    from ldm_core.train.refine import low_noise_lies

    own = torch.arange(6, dtype=torch.float32).view(6, 1, 1).expand(6, 3, 2).clone()
    empty = torch.full((1, 3, 2), -1.0)
    dropped = torch.tensor([False, False, True, False, False, False])
    cond = torch.where(dropped.view(-1, 1, 1), empty.expand_as(own), own)
    t = torch.tensor([10, 399, 50, 400, 999, 0])
    out, lie = low_noise_lies(cond, own, t, dropped, 1.0, 400, torch.Generator().manual_seed(0))
    assert lie.tolist() == [True, True, False, False, False, True]
    assert out[:, 0, 0].tolist() == [5.0, 0.0, -1.0, 3.0, 4.0, 4.0]  # the previous row's own caption
    same, none = low_noise_lies(cond, own, t, dropped, 0.0, 400, torch.Generator().manual_seed(0))
    assert not none.any() and torch.equal(same, cond)
    _, half = low_noise_lies(
        own.repeat(200, 1, 1),
        own.repeat(200, 1, 1),
        torch.zeros(1200, dtype=torch.long),
        torch.zeros(1200, dtype=torch.bool),
        0.3,
        400,
        torch.Generator().manual_seed(1),
    )
    assert 0.25 < float(half.float().mean()) < 0.35
    # the option reaches the command line, trains, and is recorded
    out_dir, work = tiny_folder / "lies", tiny_folder / "lies-work"
    args = ["refine", "--init", str(tiny_folder / "base" / "out"), "--out", str(out_dir), "--work-dir", str(work)]
    args += ["--phases", "cache,unet", "--cache-scenes", "16", "--cache-batch", "16", "--unet-steps", "2"]
    args += ["--unet-batch", "4", "--low-noise-lies", "0.5", "--low-noise-max-t", "300"]
    assert main(args) == 0
    info = json.loads((out_dir / "TRAINING.json").read_text())
    assert info["progress"]["unet_step"] == 2
    assert info["options"]["low_noise_lies"] == 0.5 and info["options"]["low_noise_max_t"] == 300


def test_shape_weight_reaches_the_unet_loss(tiny_folder):
    """--shape-weight changes what the UNet learns (same seed, batches and noise; only the corner cells weigh
    more) and is recorded; at 1 it is off."""
    from ldm_core.train.__main__ import main

    base = tiny_folder / "base" / "out"
    unets = {}
    for w in ("1", "4"):
        out_dir, work = tiny_folder / f"shape-{w}", tiny_folder / f"shape-{w}-work"
        args = ["refine", "--init", str(base), "--out", str(out_dir), "--work-dir", str(work), "--phases"]
        args += ["cache,unet", "--cache-scenes", "16", "--cache-batch", "16", "--unet-steps", "2", "--unet-batch"]
        args += ["4", "--shape-weight", w]
        assert main(args) == 0
        info = json.loads((out_dir / "TRAINING.json").read_text())
        assert info["options"]["shape_weight"] == float(w) and info["progress"]["unet_step"] == 2
        unets[w] = (out_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert unets["1"] != unets["4"]


def test_position_jitter_reaches_the_cached_scenes(tiny_folder):
    """--position-jitter is the scenes the UNet trains on (lone objects off the nine places), and is recorded."""
    from ldm_core.train import shapes
    from ldm_core.train.__main__ import main
    from ldm_core.train.refine import RefineOptions, Refiner

    base = tiny_folder / "base" / "out"
    opts = RefineOptions(init=base, out=tiny_folder / "jit", work_dir=tiny_folder / "jit-work", cache_scenes=400)
    wide = Refiner(RefineOptions(**{**opts.__dict__, "position_jitter": shapes.MAX_POSITION_JITTER})).cache_scenes()
    narrow = Refiner(opts).cache_scenes()

    def off_place(scenes):
        return sum(
            max(min(abs(o.cx - v) for v in (0.25, 0.5, 0.75)), min(abs(o.cy - v) for v in (0.25, 0.5, 0.75))) > 0.06
            for s in scenes
            for o in s.objects
        )

    assert off_place(narrow) == 0 and off_place(wide) > 100
    out_dir, work = tiny_folder / "jit-out", tiny_folder / "jit-run"
    args = ["refine", "--init", str(base), "--out", str(out_dir), "--work-dir", str(work), "--phases", "cache,unet"]
    args += ["--cache-scenes", "16", "--cache-batch", "16", "--unet-steps", "1", "--unet-batch", "4"]
    assert main([*args, "--position-jitter", "0.12"]) == 0
    assert json.loads((out_dir / "TRAINING.json").read_text())["options"]["position_jitter"] == 0.12
