"""The diffusion upscaler's VAE trainer (ldm_core.train.sr_vae): a few steps on a tiny factor-4 VAE write a VAE
folder with its latents' scaling factor and before/after PSNR, resume from the work dir, learn the photographs
(PSNR up) and refuse a VAE of another factor."""

from __future__ import annotations

import json

import pytest
import torch

from ldm_core.train.sr_vae import SRVAEOptions, train_sr_vae


def _tiny_vae(folder, blocks=3):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16)[:blocks] + (16,) * (blocks - 3),
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        mid_block_add_attention=False,
    )
    vae.save_pretrained(str(folder / "vae"))
    return vae


def test_sr_vae_learns_photos_exports_its_scaling_and_resumes(tmp_path):
    from diffusers import AutoencoderKL

    _tiny_vae(tmp_path / "f4")
    logs: list[str] = []
    o = SRVAEOptions(
        init=str(tmp_path / "f4"),
        out=str(tmp_path / "out"),
        work_dir=str(tmp_path / "work"),
        crop=32,
        batch=4,
        lr=2e-3,
        warmup_steps=1,
        steps=40,
        ema_decay=0.0,
        grad_weight=0.0,
    )
    record = train_sr_vae(o, log=logs.append)
    assert record["steps"] == 40
    before, after = record["reconstruction_before"], record["reconstruction_after"]
    assert len(after["photos_db_each"]) == 3  # the three held-out photographs
    assert after["photos_db"] > before["photos_db"] + 1.0, (before, after)
    vae = AutoencoderKL.from_pretrained(str(tmp_path / "out" / "vae"))
    assert vae.config.scaling_factor == pytest.approx(1.0 / record["latents"]["std"], rel=1e-3)
    assert json.loads((tmp_path / "out" / "TRAINING.json").read_text())["steps"] == 40
    # a rerun with a larger budget continues from the checkpoint, clock and steps included
    o.steps = 43
    logs.clear()
    assert train_sr_vae(o, log=logs.append)["steps"] == 43
    assert any("resuming at step 40" in m for m in logs)


def test_sr_vae_refuses_a_vae_of_another_factor(tmp_path):
    _tiny_vae(tmp_path / "f8", blocks=4)
    o = SRVAEOptions(init=str(tmp_path / "f8"), out=str(tmp_path / "out"), steps=1)
    with pytest.raises(SystemExit, match="factor 4"):
        train_sr_vae(o, log=lambda m: None)
