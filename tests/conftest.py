"""Shared pytest fixtures: offline switches, tiny random-weight models in both file layouts, and an
A1111-style data folder holding them.

- `tiny_models`: name -> {"diffusers": folder, "single_file": .safetensors in the original key layout} for
  "sd1", "sd1_inpaint", "sd2_v" (v-prediction) and "sdxl" (see tests/tiny_models.py). Session-scoped and
  shared: treat the files as read-only (copy them to change them).
- `models_dir`: a data dir with `models/Stable-diffusion/` (the four single files, `tiny-sd1-diffusers/`
  and `sub/tiny-sd1-copy.safetensors`), `models/VAE/tiny-vae.safetensors` (a differently seeded SD1 VAE in
  the original layout) and an empty `models/Lora/`. Read-only too.
- `webui`: one `webui.py` started on a data dir with the tiny SD1, a tiny motion module and a tiny LDSR
  (tests/browser_helpers.py), shared by the browser tests of every module (starting it costs ~20 s).
"""

from __future__ import annotations

import os

# before anything imports huggingface_hub / transformers / diffusers: never reach the network
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DIFFUSERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The tests run tiny models, where extra threads only add contention (servers they start inherit this too).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
from tiny_models import build_all, build_tiny_vae, tiny_loaded_model  # noqa: E402

#: File names of the tiny single files inside `models_dir`'s models/Stable-diffusion.
MODELS_DIR_FILES = {
    "sd1": "tiny-sd1.safetensors",
    "sd1_inpaint": "tiny-sd1-inpaint.safetensors",
    "sd2_v": "tiny-sd2-v.safetensors",
    "sdxl": "tiny-sdxl.safetensors",
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Tiny SD1, SD1-inpaint, SD2 (v) and SDXL models, each as a diffusers folder and as a single file."""
    return build_all(tmp_path_factory.mktemp("tiny_models"))


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, tiny_models) -> Path:
    """A data dir in the A1111 layout holding the tiny models (see the module docstring)."""
    root = tmp_path_factory.mktemp("data")
    ckpt = root / "models" / "Stable-diffusion"
    for name, filename in MODELS_DIR_FILES.items():
        _link_or_copy(tiny_models[name]["single_file"], ckpt / filename)
    _link_or_copy(tiny_models["sd1"]["diffusers"], ckpt / "tiny-sd1-diffusers")
    _link_or_copy(tiny_models["sd1"]["single_file"], ckpt / "sub" / "tiny-sd1-copy.safetensors")
    build_tiny_vae(root / "models" / "VAE" / "tiny-vae.safetensors")
    (root / "models" / "Lora").mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="module")
def sd1():
    """Tiny SD1 components as a LoadedModel-like object (prompt encoding, LoRA and embedding tests)."""
    return tiny_loaded_model("sd1")


@pytest.fixture(scope="module")
def sd2():
    return tiny_loaded_model("sd2_v")


@pytest.fixture(scope="module")
def sdxl():
    return tiny_loaded_model("sdxl")


@pytest.fixture(scope="session")
def webui(tmp_path_factory):
    """The running UI the browser tests drive (see the module docstring); stopped at the end of the session."""
    from browser_helpers import WebUI, make_data_dir
    from tiny_models import build_tiny_model, save_motion_module, save_tiny_ldsr, tiny_motion_adapter

    sd1 = build_tiny_model("sd1", tmp_path_factory.mktemp("ui_model"))["single_file"]
    data = make_data_dir(tmp_path_factory.mktemp("ui_data"), sd1)
    mm = data / "models" / "AnimateDiff" / "mm_sd1_tiny.safetensors"
    save_motion_module(tiny_motion_adapter("sd1"), mm, "original")  # for the Video tab
    save_tiny_ldsr(data / "models" / "LDSR" / "model.safetensors")  # a diffusion upscaler for the Extras tab
    server = WebUI.start(data)
    yield server
    server.stop()
