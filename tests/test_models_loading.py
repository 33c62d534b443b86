"""Loading: the choke point's refusals and errors, both layouts giving identical models, the single-file round
trip (also checked against diffusers' own converters), separate VAEs, tokenizers, and no network."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_core.models import (
    ModelFileError,
    load_model,
    load_shipped_tokenizer,
    load_state_dict,
    load_vae,
    save_single_file,
    to_original_state_dict,
)
from ldm_core.models.single_file import convert_vae

NAMES = ["sd1", "sd1_inpaint", "sd2_v", "sdxl"]
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def unet_output(loaded, seed=0):
    unet = loaded.unet
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(2, c.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 5, c.cross_attention_dim, generator=g)
    kw = {}
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        }
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx, **kw).sample


@pytest.fixture(scope="module")
def loaded(tiny_models):
    """loaded(name, layout): each tiny model loaded once per module (tests must not modify it)."""
    cache = {}

    def get(name, layout):
        if (name, layout) not in cache:
            cache[name, layout] = load_model(tiny_models[name][layout])
        return cache[name, layout]

    return get


# ---- both layouts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_both_layouts_load_identical_models(loaded, name):
    a = loaded(name, "diffusers")
    b = loaded(name, "single_file")
    assert a.kind == b.kind
    for comp in COMPONENTS:
        ma, mb = getattr(a, comp), getattr(b, comp)
        assert (ma is None) == (mb is None), comp
        if ma is not None:
            assert type(ma) is type(mb), comp
            assert_same_weights(ma, mb)
    for comp in ("unet", "vae"):
        ca, cb = dict(getattr(a, comp).config), dict(getattr(b, comp).config)
        assert {k: v for k, v in ca.items() if not k.startswith("_")} == {
            k: v for k, v in cb.items() if not k.startswith("_")
        }, comp
    assert a.scheduler_config["prediction_type"] == b.scheduler_config["prediction_type"] == a.kind.prediction_type
    assert a.native_size == b.native_size and a.vae_scale_factor == b.vae_scale_factor == 8
    assert torch.equal(unet_output(a), unet_output(b))
    ids = a.tokenizer("a red circle").input_ids
    assert ids == b.tokenizer("a red circle").input_ids and ids[0] == 49406
    if name == "sdxl":
        assert b.tokenizer_2.pad_token_id == 0 and b.tokenizer.pad_token_id == 49407


def test_native_sizes(loaded):
    sizes = {n: loaded(n, "single_file").native_size for n in ("sd1", "sd2_v", "sdxl")}
    assert sizes == {"sd1": 512, "sd2_v": 768, "sdxl": 1024}


def test_single_file_round_trip(loaded, tmp_path):
    """diffusers folder -> original layout -> our loader: identical tensors and UNet output; and the export
    of the loaded single file is byte-identical in tensors to the first export."""
    for name in ("sd2_v", "sdxl"):
        src = loaded(name, "diffusers")
        path = save_single_file(src, tmp_path / f"{name}.safetensors")
        back = load_model(path)
        for comp in COMPONENTS:
            if getattr(src, comp) is None:  # e.g. SD2 has no second text encoder: the round trip must not add one
                assert getattr(back, comp) is None, comp
            else:
                assert_same_weights(getattr(src, comp), getattr(back, comp))
        assert torch.equal(unet_output(src), unet_output(back))
        first, second = load_file(path), to_original_state_dict(back)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first)


def test_half_precision_export_and_load(loaded, tmp_path):
    src = loaded("sd1", "single_file")
    path = save_single_file(src, tmp_path / "half.safetensors", dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in load_file(path).values())
    m = load_model(path, dtype=torch.float16)
    assert m.unet.dtype == torch.float16 and m.text_encoder.dtype == torch.float16
    m32 = load_model(path)
    assert m32.unet.dtype == torch.float32


def test_export_writes_sidecar_for_sd2_epsilon(loaded, tmp_path):
    v = loaded("sd2_v", "diffusers")
    src = dataclasses.replace(v, kind=v.kind.with_overrides(prediction_type="epsilon"))
    path = save_single_file(src, tmp_path / "eps.safetensors")
    assert json.loads((tmp_path / "eps.json").read_text()) == {"prediction_type": "epsilon"}
    back = load_model(path)
    assert back.kind.prediction_type == "epsilon" and back.scheduler_config["prediction_type"] == "epsilon"
    assert back.native_size == 512  # sd2-base config


def test_v_prediction_marker_for_sdxl(loaded, tmp_path):
    eps = loaded("sdxl", "diffusers")
    src = dataclasses.replace(eps, kind=eps.kind.with_overrides(prediction_type="v_prediction"))
    path = save_single_file(src, tmp_path / "v.safetensors")
    assert "v_pred" in load_file(path) and not (tmp_path / "v.json").exists()
    assert load_model(path).scheduler_config["prediction_type"] == "v_prediction"


def test_layout_matches_diffusers_own_converters(tiny_models, loaded):
    """Our original-layout files, read back by diffusers' converters, give the diffusers weights."""
    from diffusers.loaders import single_file_utils as sfu

    src = loaded("sd1", "diffusers")
    ckpt = load_file(tiny_models["sd1"]["single_file"])
    unet = sfu.convert_ldm_unet_checkpoint(ckpt, dict(src.unet.config))
    vae = sfu.convert_ldm_vae_checkpoint(ckpt, dict(src.vae.config))
    for ours, theirs in ((src.unet.state_dict(), unet), (src.vae.state_dict(), vae)):
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k].reshape(ours[k].shape)) for k in ours)
    clip = sfu.convert_ldm_clip_checkpoint(ckpt)
    te = src.text_encoder.state_dict()
    assert all(torch.equal(te[k.removeprefix("text_model.")], v) for k, v in clip.items() if "position_ids" not in k)

    sd2 = loaded("sd2_v", "diffusers")
    ckpt2 = load_file(tiny_models["sd2_v"]["single_file"])
    theirs = sfu.convert_open_clip_checkpoint(sd2.text_encoder, ckpt2, prefix="cond_stage_model.model.")
    ours = sd2.text_encoder.state_dict()
    common = [k for k in theirs if k.removeprefix("text_model.") in ours]
    assert len(common) == len(ours)
    assert all(torch.equal(ours[k.removeprefix("text_model.")], theirs[k]) for k in common)


# ---- the choke point ------------------------------------------------------------------------------------


def test_pickles_refused_unless_allowed(tiny_models, loaded, tmp_path):
    sd = load_file(tiny_models["sd1"]["single_file"])
    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": sd, "global_step": 10}, ckpt)
    with pytest.raises(ModelFileError, match="--allow-pickle") as err:
        load_state_dict(ckpt)
    assert str(ckpt) in str(err.value)
    with pytest.raises(ModelFileError, match="--allow-pickle"):
        load_model(ckpt)
    back = load_state_dict(ckpt, allow_pickle=True)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    m = load_model(ckpt, allow_pickle=True)
    assert_same_weights(m.unet, loaded("sd1", "single_file").unet)


def test_pickle_nesting_is_unwrapped_and_flattened(tmp_path):
    w = torch.arange(4.0)
    torch.save({"params_ema": {"conv.weight": w}, "params": {"conv.weight": w * 0}}, tmp_path / "esrgan.pth")
    assert torch.equal(load_state_dict(tmp_path / "esrgan.pth", allow_pickle=True)["conv.weight"], w)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": w}, "step": 5}, tmp_path / "emb.pt")
    assert list(load_state_dict(tmp_path / "emb.pt", allow_pickle=True)) == ["string_to_param.*"]


class Evil:  # a pickled object that weights_only loading must refuse
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Evil()}, path)
    with pytest.raises(ModelFileError, match="weights_only") as err:
        load_state_dict(path, allow_pickle=True)
    assert "evil.pt" in str(err.value)


@pytest.mark.parametrize("damage", ["truncated", "random", "lfs", "empty", "html", "truncated_header"])
def test_broken_files_name_the_file(tiny_models, tmp_path, damage):
    good = tiny_models["sd1"]["single_file"].read_bytes()
    path = tmp_path / f"broken-{damage}.safetensors"
    path.write_bytes(
        {
            "truncated": good[: len(good) // 2],
            "random": torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
            .numpy()
            .tobytes(),
            "lfs": b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 2132625894\n",
            "empty": b"",
            "html": b"<!DOCTYPE html><html><body>Too many requests</body></html>",
            "truncated_header": good[:100],
        }[damage]
    )
    words = {
        "truncated": "truncated",
        "random": "not a safetensors",
        "lfs": "git-LFS",
        "empty": "empty",
        "html": "HTML",
        "truncated_header": "truncated",
    }[damage]
    for fn in (load_state_dict, load_model):
        with pytest.raises(ModelFileError, match=words) as err:
            fn(path)
        assert path.name in str(err.value) and err.value.path == path


def test_broken_pickle_names_the_file(tiny_models, tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": load_file(tiny_models["sd1"]["single_file"])}, path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="cut.ckpt"):
        load_state_dict(path, allow_pickle=True)


def test_unsupported_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelFileError, match="LoRA") as err:
        load_model(path)
    assert "lora.safetensors" in str(err.value)


def test_missing_component_is_reported(tiny_models, tmp_path):
    sd = {
        k: v for k, v in load_file(tiny_models["sd1"]["single_file"]).items() if not k.startswith("first_stage_model.")
    }
    path = tmp_path / "novae.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ModelFileError, match="no VAE weights"):
        load_model(path)


# ---- diffusers folders ----------------------------------------------------------------------------------


def test_folder_without_tokenizer_uses_shipped_one(tiny_models, tmp_path):
    folder = shutil.copytree(tiny_models["sd2_v"]["diffusers"], tmp_path / "m")
    shutil.rmtree(folder / "tokenizer")
    m = load_model(folder)
    assert m.tokenizer.pad_token == "!"  # OpenCLIP padding for SD2


def test_folder_with_only_pickles_needs_the_flag(tiny_models, tmp_path):
    folder = shutil.copytree(tiny_models["sd1"]["diffusers"], tmp_path / "m")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelFileError, match="--allow-pickle"):
        load_model(folder)
    assert load_model(folder, allow_pickle=True).unet is not None


def test_folder_with_lfs_pointer_names_the_file(tiny_models, tmp_path):
    folder = shutil.copytree(tiny_models["sd1"]["diffusers"], tmp_path / "m")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n")
    with pytest.raises(ModelFileError, match="git-LFS") as err:
        load_model(folder)
    assert err.value.path == weights


# ---- separate VAEs, tokenizers, network -----------------------------------------------------------------


def test_load_vae_from_every_layout(tiny_models, loaded, models_dir, tmp_path):
    ref = loaded("sd1", "diffusers").vae
    from_ckpt = load_vae(tiny_models["sd1"]["single_file"])  # first_stage_model.* prefix
    from_folder = load_vae(tiny_models["sd1"]["diffusers"] / "vae")
    diffusers_named = tmp_path / "vae-diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(diffusers_named))
    for vae in (from_ckpt, from_folder, load_vae(diffusers_named)):
        assert_same_weights(ref, vae)
    other = load_vae(models_dir / "models" / "VAE" / "tiny-vae.safetensors", scaling_factor=0.13025)
    assert other.config.scaling_factor == 0.13025
    assert not torch.equal(other.decoder.conv_out.weight, ref.decoder.conv_out.weight)
    assert load_vae(diffusers_named).config.scaling_factor == 0.18215
    ldm = convert_vae(other.state_dict(), other.config, to_diffusers=False)
    assert torch.equal(
        ldm["encoder.mid.attn_1.q.weight"][:, :, 0, 0], other.encoder.mid_block.attentions[0].to_q.weight
    )


def test_shipped_tokenizers():
    clip, clip_g = load_shipped_tokenizer("clip"), load_shipped_tokenizer("clip_g")
    a = clip("a photo of a cat", padding="max_length", max_length=10).input_ids
    b = clip_g("a photo of a cat", padding="max_length", max_length=10).input_ids
    assert a == [49406, 320, 1125, 539, 320, 2368, 49407, 49407, 49407, 49407]
    assert b == [49406, 320, 1125, 539, 320, 2368, 49407, 0, 0, 0]
    assert clip.model_max_length == clip_g.model_max_length == 77


def test_no_network_while_loading_every_model(tiny_models, models_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in NAMES:
        for layout in ("diffusers", "single_file"):
            m = load_model(tiny_models[name][layout])
            assert m.unet is not None and m.tokenizer is not None
    load_vae(models_dir / "models" / "VAE" / "tiny-vae.safetensors")
