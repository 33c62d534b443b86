"""The built-in model's training recipe: tokenizer fast path, schedule, a reduced end-to-end run that
writes a loadable diffusers folder, and resuming from a checkpoint."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_models import tiny_train_options as _tiny_opts  # noqa: E402

from ldm_core.train import builtin, shapes  # noqa: E402
from ldm_core.train.builtin import PhaseClock, lr_at, train_builtin  # noqa: E402


def test_caption_tokenizer_matches_the_clip_tokenizer():
    fast = builtin.CaptionTokenizer()
    captions = [s.caption for s in shapes.sample_scenes("tok", 150)]
    captions += [
        "",
        "A Red Circle!",
        "café au lait",
        "red " * 90,
        "small green star in the top-left corner, 3 dots",
    ]
    want = fast.tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(fast(captions), want)


def test_lr_schedule_warms_up_then_anneals():
    assert lr_at(1.0, 0, 0.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(1.0, 50, 0.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_at(1.0, 50, 0.5, 10, 0.1) == pytest.approx(0.55)
    assert lr_at(1.0, 50, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(1.0, 0, 0.03, 10**6, 0.1) > 0.99  # a time-boxed run warms up within 3 % of its time


def test_phase_clock_ends_on_steps_or_time():
    c = PhaseClock(total_steps=100, step0=0, progress0=0.0, seconds=None)
    assert c.progress(50) == pytest.approx(0.5) and c.progress(100) == 1.0
    c = PhaseClock(total_steps=10**9, step0=0, progress0=0.2, seconds=0.05)
    time.sleep(0.06)
    assert c.progress(1) == 1.0  # the time budget ran out: the schedule is annealed anyway


def test_training_target_matches_the_shipped_scheduler():
    """The optimum of the training objective, run through the shipped scheduler config (Euler a, 20 steps,
    as the pipeline does: scaled model input, float timesteps), lands exactly on the training latent."""
    from diffusers import EulerAncestralDiscreteScheduler

    spec = builtin.PRESETS["builtin"]
    sched = EulerAncestralDiscreteScheduler.from_config(builtin.scheduler_config(spec))
    ab = sched.alphas_cumprod.double()
    x0 = torch.randn(1, 4, 8, 8, dtype=torch.float64) * 0.8 + 0.3

    def oracle(x_t, t):  # the exact minimiser of the training loss when the data is the single point x0
        a = ab[int(t)]
        noise = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return builtin.diffusion_target(x0, noise, a.view(1), spec.prediction_type)[1]

    sched.set_timesteps(20)
    assert int(sched.timesteps[0]) == spec.num_train_timesteps - 1  # trailing: starts from pure noise
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x0.shape, generator=g, dtype=torch.float64) * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(oracle(sched.scale_model_input(x, t), t), t, x, generator=g).prev_sample
    assert torch.allclose(x, x0, atol=1e-4)
    # little signal left at the first step (SD's 0.00085-0.012 schedule leaves 0.068), SD-like mid-way
    assert float(ab[-1].sqrt()) < 0.02
    assert 0.8 < float(ab[300] / (1 - ab[300])) < 1.5


def test_model_spec_sizes_fit_the_budget():
    spec = builtin.PRESETS["builtin"]
    vae, te, unet = builtin.build_vae(spec), builtin.build_text_encoder(spec), builtin.build_unet(spec)
    n_vae, n_te, n_unet = (builtin.param_count(m) for m in (vae, te, unet))
    assert 1e6 <= n_vae <= 4e6 and 7e6 <= n_unet <= 10.5e6 and te.config.hidden_size == 128
    assert 2 * (n_vae + n_te + n_unet) <= 40e6  # fp16 bytes
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8 and vae.config.latent_channels == 4
    assert unet.config.sample_size * 8 == spec.resolution == 64


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """One uninterrupted reduced run (tiny model, 2 VAE + 3 UNet steps): (options, record)."""
    opts = _tiny_opts(tmp_path_factory.mktemp("runs"), "whole")
    return opts, train_builtin(opts)


def test_reduced_training_run_writes_a_loadable_diffusers_folder(whole_run):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    opts, rec = whole_run
    out = opts.out
    assert rec["complete"] and rec["vae_steps_done"] == 2 and rec["unet_steps_done"] == 3
    for sub in ("vae", "text_encoder", "tokenizer", "unet", "scheduler"):
        assert (out / sub).is_dir()
    info = json.loads((out / "TRAINING.json").read_text())
    assert info["seed"] == 0 and info["command"] == "pytest" and info["final_unet_loss"] > 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"][1] == "UNet2DConditionModel"
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    for name in ("vocab.json", "merges.txt"):
        assert (out / "tokenizer" / name).read_bytes() == (builtin.TOKENIZER_DIR / name).read_bytes()
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction" and sched["timestep_spacing"] == "trailing"
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (64, 64)
    assert pipe.vae.config.scaling_factor == pytest.approx(rec["scaling_factor"])


def test_resume_from_checkpoint_matches_an_uninterrupted_run(whole_run, tmp_path):
    from safetensors.torch import load_file

    whole, _ = whole_run
    first = train_builtin(_tiny_opts(tmp_path, "split", sitting_steps=3))  # 2 VAE steps + 1 UNet step
    assert not first["complete"] and first["unet_steps_done"] == 1
    assert (tmp_path / "split" / "work" / builtin.CHECKPOINT_NAME).exists()
    assert (tmp_path / "split" / "out" / "unet").is_dir()  # a usable folder even when stopped early
    second = train_builtin(_tiny_opts(tmp_path, "split"))
    assert second["complete"] and second["unet_steps_done"] == 3 and len(second["sittings"]) == 2
    for sub, name in (
        ("unet", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
        ("vae", "diffusion_pytorch_model"),
    ):
        a = load_file(str(whole.out / sub / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "split" / "out" / sub / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), sub


def test_max_seconds_bounds_the_run_and_still_writes_a_folder(tmp_path):
    # far more steps planned than fit in 3 s: both phases end on the clock, annealed, and report it
    opts = _tiny_opts(tmp_path, "timed", vae_steps=10**6, unet_steps=10**6, max_seconds=3.0, reserve_seconds=0.0)
    t = time.monotonic()
    rec = train_builtin(opts)
    assert time.monotonic() - t < 30
    assert 0 < rec["vae_steps_done"] < 10**6 and rec["vae_ended_by"] == "time budget"
    assert rec["unet_steps_done"] < 10**6
    assert (opts.out / "model_index.json").exists() and (opts.work_dir / builtin.CHECKPOINT_NAME).exists()


def test_cuda_code_path_runs_on_cpu_with_bf16_autocast_and_data_workers(tmp_path):
    opts = _tiny_opts(tmp_path, "bf16", vae_steps=1, unet_steps=1, autocast="bf16", num_workers=2)
    rec = train_builtin(opts)
    assert rec["complete"] and rec["final_unet_loss"] == rec["final_unet_loss"]  # finite, not NaN


def test_data_workers_yield_the_same_batches_in_order():
    ds = builtin.ShapesBatches(seed=5, phase="unet", batch=3, start_step=7, tokenizer=builtin.CaptionTokenizer())
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    it = iter(loader)
    got = [next(it) for _ in range(4)]
    for k, (packed, ids, caps) in enumerate(got):
        want = ds.make(7 + k)
        assert torch.equal(packed, want[0]) and torch.equal(ids, want[1]) and list(caps) == want[2]
    del it


def test_fine_tune_on_a_folder_of_captioned_images(whole_run, tmp_path):
    base, _ = whole_run
    data = tmp_path / "data"
    shapes.dump_samples(data, n=6, seed=3)
    rec = train_builtin(_tiny_opts(tmp_path, "ft", data=data, init=base.out, unet_steps=2))
    assert rec["complete"] and rec["vae_steps_done"] == 0 and rec["unet_steps_done"] == 2
    assert (tmp_path / "ft" / "out" / "unet").is_dir()


def test_shipped_model_loads_and_draws_a_red_circle():
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    from ldm_core.train.analyser import analyse

    pipe = StableDiffusionPipeline.from_pretrained(
        str(builtin.DEFAULT_OUT),
        local_files_only=True,
        dtype=torch.float32,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    sizes = [f.stat().st_size for f in builtin.DEFAULT_OUT.rglob("*.safetensors")]
    assert len(sizes) == 3 and sum(sizes) <= 40e6
    images = pipe(
        ["a red circle"] * 4,
        num_inference_steps=20,
        guidance_scale=7.0,
        generator=[torch.Generator().manual_seed(s) for s in range(4)],
    ).images
    found = [analyse(im).find(shape="circle", colour="red") is not None for im in images]
    assert sum(found) >= 3, found
