"""The built-in model's optional sharper VAE, `models/VAE/builtin-sharp`, as users pick it (Settings > SD VAE, or
`override_settings: {"sd_vae": "builtin-sharp"}` in the API): it is the built-in VAE's encoder with a decoder that
reconstructs the shapes world more faithfully, it changes the pixels of a job and says so in the infotext, and a
VAE of another latent space is refused by name instead of decoding garbage."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ldm_core.config import BUILTIN_MODEL_DIR  # noqa: E402
from ldm_core.engine import scratch_engine  # noqa: E402
from ldm_core.generation_requests import GenerationRequest, RequestError  # noqa: E402

SHARP = Path(__file__).resolve().parents[1] / "models" / "VAE" / "builtin-sharp"


def _vae(folder: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32).eval()


def test_sharp_vae_is_the_builtin_encoder_with_a_decoder_that_reconstructs_better():
    from ldm_core.train.builtin import heldout_renders, vae_psnr

    own, sharp = _vae(BUILTIN_MODEL_DIR / "vae"), _vae(SHARP)
    assert (SHARP / "diffusion_pytorch_model.safetensors").stat().st_size <= 5e6
    assert sharp.config.scaling_factor == own.config.scaling_factor
    a, b = own.state_dict(), sharp.state_dict()
    assert a.keys() == b.keys()
    # the latent space is the built-in model's: the UNet and every add-on fit it unchanged
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("encoder.", "quant_conv.")))
    images = heldout_renders(32, 64)
    cpu = torch.device("cpu")
    assert vae_psnr(sharp, images, cpu) > vae_psnr(own, images, cpu) + 3.0


def test_picking_the_sharp_vae_changes_the_job_and_its_infotext():
    with scratch_engine(BUILTIN_MODEL_DIR, device="cpu", vae_dirs=(SHARP.parent,)) as (engine, _model):
        assert "builtin-sharp" in [e.name for e in engine.models.vaes()]

        def run(vae):
            req = GenerationRequest(prompt="a red star on a white background", steps=8, seed=3, vae=vae)
            return engine.generate(req)

        own, sharp = run("Automatic"), run("builtin-sharp")
    x = torch.tensor(list(own.images[0].getdata()), dtype=torch.float32)
    y = torch.tensor(list(sharp.images[0].getdata()), dtype=torch.float32)
    diff = float((x - y).abs().mean())
    assert 0 < diff < 20, diff  # the same latents, decoded differently
    assert "VAE: builtin-sharp" in sharp.infotexts[0] and "VAE: " not in own.infotexts[0]


def test_a_vae_of_another_latent_space_is_refused_by_name(tmp_path):
    from diffusers import AutoencoderKL

    f8 = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    )
    f8.save_pretrained(tmp_path / "VAE" / "sd-style-f8")
    with scratch_engine(BUILTIN_MODEL_DIR, device="cpu", vae_dirs=(tmp_path / "VAE",)) as (engine, _model):
        with pytest.raises(RequestError) as err:
            engine.generate(GenerationRequest(prompt="a red star", steps=2, seed=1, vae="sd-style-f8"))
        assert err.value.field == "vae"
        assert "sd-style-f8" in err.value.message and "factor 8" in err.value.message
        # the engine keeps working after the refusal
        assert engine.generate(GenerationRequest(prompt="a red star", steps=2, seed=1)).images


def test_controlnet_eval_runs_its_jobs_with_the_picked_vae(tmp_path):
    """`python -m ldm_core.train.controlnet eval --vae models/VAE/builtin-sharp` measures what users get when they
    pick that VAE: the same jobs, decoded by it."""
    from PIL import Image

    from ldm_core.train import controlnet as trainer

    seg = SHARP.parents[1] / "ControlNet" / "builtin-seg"
    sheets = {}
    for name, vae in (("own", None), ("sharp", SHARP)):
        sheets[name] = tmp_path / f"{name}.png"
        report = trainer.evaluate(
            BUILTIN_MODEL_DIR,
            seg,
            n=1,
            device="cpu",
            steps=4,
            log=lambda _m: None,
            condition="seg",
            kinds=("seg",),
            vae=vae,
            sheet=sheets[name],
        )
        assert report["vae"] == ("Automatic" if vae is None else "builtin-sharp")
    a, b = (torch.tensor(list(Image.open(sheets[k]).convert("RGB").getdata()), dtype=torch.float32) for k in sheets)
    assert 0 < float((a - b).abs().mean()) < 20  # the same map and latents; only the decoding differs
