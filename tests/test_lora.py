"""LoRA networks on tiny random models: files built by the tests in the kohya and diffusers/PEFT key formats
(and LoCon, LoHa, LoKr) change the UNet and text-encoder outputs, merge by the documented formula, add up
when several are applied, and are undone bit for bit; wrong-family and unknown networks give clear errors;
the trainer writes a file that loads back and changes the output."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm_core.generation_requests import RequestError
from ldm_core.prompts.encode import PromptEncoder
from ldm_core.prompts.networks import NetworkLibrary, addnet_hash, guess_family
from ldm_core.prompts.parser import extract_extra_networks


def calls(prompt: str):
    return extract_extra_networks(prompt)[1]


def snapshot(model) -> dict[str, torch.Tensor]:
    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        m = getattr(model, comp)
        if m is not None:
            out.update({f"{comp}.{k}": v.clone() for k, v in m.state_dict().items()})
    return out


def assert_identical(model, snap) -> None:
    now = snapshot(model)
    assert now.keys() == snap.keys()
    assert all(torch.equal(now[k], snap[k]) for k in snap)


def unet_out(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    cross = model.unet.config.cross_attention_dim
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, cross, generator=g)
    added = None
    if model.kind.family == "sdxl":
        added = {
            "text_embeds": torch.randn(1, model.text_encoder_2.config.projection_dim, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
        }
    with torch.no_grad():
        return model.unet(x, 10, encoder_hidden_states=ctx, added_cond_kwargs=added).sample


def text_name(encoder, name: str) -> str:
    """A text-encoder layer under its state-dict name ("text_model.encoder...")."""
    return name if hasattr(encoder, "text_model") else "text_model." + name


def factors(model, seed: int, rank: int = 2, conv: bool = False) -> dict[tuple[str, str], tuple]:
    """Random (up, down) for the UNet's attention projections (and a resnet conv with `conv`) and the text
    encoders' q/v projections: {(component, state-dict module name): (up, down)}."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, m in model.unet.named_modules():
        if isinstance(m, torch.nn.Linear) and n.endswith(("attn1.to_q", "attn2.to_k", "attn2.to_v", "to_out.0")):
            out[("unet", n)] = (
                torch.randn(m.out_features, rank, generator=g) * 0.3,
                torch.randn(rank, m.in_features, generator=g) * 0.3,
            )
        if conv and isinstance(m, torch.nn.Conv2d) and n.endswith("resnets.0.conv1"):
            o, i, kh, kw = m.weight.shape
            out[("unet", n)] = (
                torch.randn(o, rank, 1, 1, generator=g) * 0.3,
                torch.randn(rank, i, kh, kw, generator=g) * 0.3,
            )
    for comp in ("text_encoder", "text_encoder_2"):
        enc = getattr(model, comp)
        if enc is None:
            continue
        for n, m in enc.named_modules():
            if isinstance(m, torch.nn.Linear) and n.endswith(("q_proj", "v_proj")):
                out[(comp, text_name(enc, n))] = (
                    torch.randn(m.out_features, rank, generator=g) * 0.3,
                    torch.randn(rank, m.in_features, generator=g) * 0.3,
                )
    return out


def kohya_file(fac, path: Path, family: str, alpha: float | None = None, ldm_names: dict | None = None) -> Path:
    te = {"text_encoder": "lora_te1_" if family == "sdxl" else "lora_te_", "text_encoder_2": "lora_te2_"}
    sd = {}
    for (comp, name), (up, down) in fac.items():
        if comp == "unet":
            key = "lora_unet_" + (ldm_names or {}).get(name, name.replace(".", "_"))
        else:
            key = te[comp] + name.replace(".", "_")
        sd[key + ".lora_up.weight"] = up
        sd[key + ".lora_down.weight"] = down
        sd[key + ".alpha"] = torch.tensor(float(alpha if alpha is not None else down.shape[0]))
    save_file(sd, path)
    return path


def peft_file(fac, path: Path) -> Path:
    sd = {}
    for (comp, name), (up, down) in fac.items():
        sd[f"{comp}.{name}.lora_A.weight"] = down
        sd[f"{comp}.{name}.lora_B.weight"] = up
    save_file(sd, path)
    return path


def module(model, comp: str, name: str) -> torch.nn.Module:
    root = getattr(model, comp)
    if name.startswith("text_model.") and not hasattr(root, "text_model"):
        name = name[len("text_model.") :]
    return root.get_submodule(name)


@pytest.fixture()
def lora_dir(tmp_path, sd1, sdxl) -> Path:
    d = tmp_path / "Lora"
    d.mkdir()
    kohya_file(factors(sd1, 1, conv=True), d / "k1.safetensors", "sd1")
    peft_file(factors(sd1, 1, conv=True), d / "p1.safetensors")
    kohya_file(factors(sd1, 2), d / "k2.safetensors", "sd1", alpha=1.0)
    kohya_file(factors(sdxl, 3), d / "xl.safetensors", "sdxl")
    return d


# -------------------------------------------------------------------------------------------- applying
@pytest.mark.parametrize("name", ["k1", "p1"])
def test_lora_changes_output_and_is_undone_exactly(sd1, lora_dir, name):
    lib = NetworkLibrary([lora_dir])
    snap = snapshot(sd1)
    base_out = unet_out(sd1)
    base_cond = PromptEncoder(sd1).encode("a red circle").embeds
    with lib.applied(sd1, calls(f"a <lora:{name}:1>")) as params:
        assert not torch.allclose(unet_out(sd1), base_out)
        assert not torch.allclose(PromptEncoder(sd1).encode("a red circle").embeds, base_cond)
        assert params["Lora hashes"] == f"{name}: {lib.short_hash(name)}"
    assert_identical(sd1, snap)
    assert torch.equal(unet_out(sd1), base_out)


def test_both_formats_merge_the_same_formula(sd1, lora_dir):
    lib = NetworkLibrary([lora_dir])
    fac = factors(sd1, 1, conv=True)
    results = {}
    for name in ("k1", "p1"):
        with lib.applied(sd1, calls(f"<lora:{name}:0.7>")):
            results[name] = snapshot(sd1)
    assert all(torch.allclose(results["k1"][k], results["p1"][k], atol=1e-6) for k in results["k1"])
    (comp, name), (up, down) = next(iter(fac.items()))
    w0 = module(sd1, comp, name).weight.detach().clone()
    with lib.applied(sd1, calls("<lora:k1:0.7>")):
        merged = module(sd1, comp, name).weight.detach().clone()
    assert torch.allclose(merged, w0 + 0.7 * (up @ down), atol=1e-5)
    conv_name = next(n for c, n in fac if n.endswith("conv1"))
    up, down = fac[("unet", conv_name)]
    c0 = module(sd1, "unet", conv_name).weight.detach().clone()
    with lib.applied(sd1, calls("<lora:k1:1>")):
        got = module(sd1, "unet", conv_name).weight.detach().clone()
    want = c0 + (up.flatten(1) @ down.flatten(1)).reshape(c0.shape)
    assert torch.allclose(got, want, atol=1e-5)


def test_alpha_scales_the_update(sd1, lora_dir):
    lib = NetworkLibrary([lora_dir])
    fac = factors(sd1, 2)
    (comp, name), (up, down) = next(iter(fac.items()))
    w0 = module(sd1, comp, name).weight.detach().clone()
    with lib.applied(sd1, calls("<lora:k2:1>")):  # alpha 1, rank 2: scale 0.5
        got = module(sd1, comp, name).weight.detach().clone()
    assert torch.allclose(got, w0 + 0.5 * (up @ down), atol=1e-5)


def test_separate_text_encoder_and_unet_weights(sd1, lora_dir):
    lib = NetworkLibrary([lora_dir])
    base_out, base_cond = unet_out(sd1), PromptEncoder(sd1).encode("x").embeds
    with lib.applied(sd1, calls("<lora:k1:0:1>")):
        assert torch.equal(PromptEncoder(sd1).encode("x").embeds, base_cond)
        assert not torch.allclose(unet_out(sd1), base_out)
    with lib.applied(sd1, calls("<lora:k1:1:0>")):
        assert not torch.allclose(PromptEncoder(sd1).encode("x").embeds, base_cond)
        assert torch.equal(unet_out(sd1), base_out)


def test_several_loras_add_up(sd1, lora_dir):
    lib = NetworkLibrary([lora_dir])
    snap = snapshot(sd1)
    deltas = {}
    for name in ("k1", "k2"):
        with lib.applied(sd1, calls(f"<lora:{name}:1>")):
            now = snapshot(sd1)
            deltas[name] = {k: now[k] - snap[k] for k in snap}
    with lib.applied(sd1, calls("a <lora:k1:1> b <lora:k2:1>")) as params:
        both = snapshot(sd1)
        assert params["Lora hashes"] == f"k1: {lib.short_hash('k1')}, k2: {lib.short_hash('k2')}"
    for k in snap:
        assert torch.allclose(both[k], snap[k] + deltas["k1"][k] + deltas["k2"][k], atol=1e-5), k
    assert_identical(sd1, snap)


def test_weights_restored_when_the_job_fails(sd1, lora_dir):
    lib = NetworkLibrary([lora_dir])
    snap = snapshot(sd1)
    with pytest.raises(RuntimeError, match="boom"), lib.applied(sd1, calls("<lora:k1:1>")):
        raise RuntimeError("boom")
    assert_identical(sd1, snap)


def test_no_lora_calls_change_nothing(sd1, lora_dir):
    lib = NetworkLibrary([lora_dir])
    with lib.applied(sd1, calls("a plain prompt <hypernet:x:1>")) as params:
        assert params == {}


# ------------------------------------------------------------------------------------------------- SDXL
def test_sdxl_kohya_with_original_block_names(sdxl, tmp_path):
    """sd-scripts writes SDXL UNet keys in the original (SGM) layout: input_blocks_4_1_..."""
    from ldm_core.models.single_file import convert_unet

    fac = factors(sdxl, 5)
    sd = sdxl.unet.state_dict()
    orig = convert_unet(sd, sdxl.unet.config, to_diffusers=False)
    by_ptr = {v.data_ptr(): k for k, v in orig.items()}
    ldm = {n: by_ptr[sd[n + ".weight"].data_ptr()][: -len(".weight")].replace(".", "_") for c, n in fac if c == "unet"}
    assert any(v.startswith(("input_blocks", "output_blocks", "middle_block")) for v in ldm.values())
    d = tmp_path / "Lora"
    d.mkdir()
    kohya_file(fac, d / "sgm.safetensors", "sdxl", ldm_names=ldm)
    kohya_file(fac, d / "dif.safetensors", "sdxl")
    lib = NetworkLibrary([d])
    snap = snapshot(sdxl)
    base_cond = PromptEncoder(sdxl).encode("x")
    with lib.applied(sdxl, calls("<lora:sgm:1>")):
        a = snapshot(sdxl)
        cond = PromptEncoder(sdxl).encode("x")
        assert not torch.allclose(cond.embeds, base_cond.embeds)
        assert not torch.allclose(cond.pooled, base_cond.pooled)  # the second encoder changed too
    with lib.applied(sdxl, calls("<lora:dif:1>")):
        b = snapshot(sdxl)
    changed = [k for k in snap if not torch.equal(a[k], snap[k])]
    assert len(changed) == len(fac)
    assert all(torch.equal(a[k], b[k]) for k in snap)
    assert_identical(sdxl, snap)


# ------------------------------------------------------------------------------------------------ errors
def test_unknown_lora_names_the_available_ones(sd1, lora_dir):
    lib = NetworkLibrary([lora_dir])
    with pytest.raises(RequestError) as err, lib.applied(sd1, calls("<lora:nope:1>")):
        pass
    assert err.value.field == "prompt"
    assert "unknown LoRA 'nope'" in str(err.value) and "k1" in str(err.value)


def test_wrong_family_lora_gives_a_clear_error(sd1, sdxl, lora_dir, tmp_path):
    lib = NetworkLibrary([lora_dir])
    snap = snapshot(sd1)
    with (
        pytest.raises(RequestError, match="made for SDXL models, but the current model is SD 1.x"),
        lib.applied(sd1, calls("<lora:xl:1>")),
    ):
        pass
    assert_identical(sd1, snap)
    # an SD1 LoRA on SDXL: its layers do not fit the model
    with (
        pytest.raises(RequestError, match="does not fit the current SDXL model"),
        lib.applied(sdxl, calls("<lora:k1:1>")),
    ):
        pass
    # a real-size SD1 LoRA (768-wide cross-attention) is recognised by its widths
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    real = {f"{key}.lora_down.weight": torch.zeros(4, 768), f"{key}.lora_up.weight": torch.zeros(320, 4)}
    save_file(real, lora_dir / "real15.safetensors")
    lib.refresh()
    with (
        pytest.raises(RequestError, match="made for SD 1.x models, but the current model is SDXL"),
        lib.applied(sdxl, calls("<lora:real15:1>")),
    ):
        pass


def test_guess_family_from_widths():
    k = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    assert guess_family({k: (4, 768)}) == "sd1"
    assert guess_family({k: (4, 1024)}) == "sd2"
    assert guess_family({k: (4, 2048)}) == "sdxl"
    assert guess_family({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 1024)}) == "sd2"
    assert guess_family({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 32)}) == "sdxl"
    assert guess_family({k: (4, 32)}) is None


def test_bad_weight_is_a_request_error(sd1, lora_dir):
    lib = NetworkLibrary([lora_dir])
    with pytest.raises(RequestError, match="not a number"), lib.applied(sd1, calls("<lora:k1:lots>")):
        pass


def test_unsupported_lycoris_type_is_named(sd1, tmp_path):
    d = tmp_path / "Lora"
    d.mkdir()
    key = "lora_unet_down_blocks_0_resnets_0_conv1"
    save_file(
        {
            key + ".lora_up.weight": torch.zeros(32, 2, 1, 1),
            key + ".lora_down.weight": torch.zeros(2, 2, 1, 1),
            key + ".lora_mid.weight": torch.zeros(2, 2, 3, 3),
        },
        d / "tucker.safetensors",
    )
    lib = NetworkLibrary([d])
    with pytest.raises(RequestError, match="Tucker"), lib.applied(sd1, calls("<lora:tucker:1>")):
        pass


# -------------------------------------------------------------------------------------- LyCORIS types
def test_loha_and_lokr_merge(sd1, tmp_path):
    d = tmp_path / "Lora"
    d.mkdir()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w0 = sd1.unet.get_submodule(name).weight.detach().clone()
    out_f, in_f = w0.shape
    g = torch.Generator().manual_seed(9)
    r = 2
    h = {
        k: torch.randn(*s, generator=g)
        for k, s in {
            "hada_w1_a": (out_f, r),
            "hada_w1_b": (r, in_f),
            "hada_w2_a": (out_f, r),
            "hada_w2_b": (r, in_f),
        }.items()
    }
    key = "lora_unet_" + name.replace(".", "_")
    save_file({f"{key}.{k}": v for k, v in h.items()} | {f"{key}.alpha": torch.tensor(1.0)}, d / "loha.safetensors")
    k1, k2 = torch.randn(2, 4, generator=g), torch.randn(out_f // 2, in_f // 4, generator=g)
    save_file({f"{key}.lokr_w1": k1, f"{key}.lokr_w2": k2}, d / "lokr.safetensors")
    lib = NetworkLibrary([d])
    with lib.applied(sd1, calls("<lora:loha:1>")):
        got = sd1.unet.get_submodule(name).weight.detach().clone()
    want = w0 + (h["hada_w1_a"] @ h["hada_w1_b"]) * (h["hada_w2_a"] @ h["hada_w2_b"]) * (1.0 / r)
    assert torch.allclose(got, want, atol=1e-4)
    with lib.applied(sd1, calls("<lora:lokr:0.5>")):
        got = sd1.unet.get_submodule(name).weight.detach().clone()
    assert torch.allclose(got, w0 + 0.5 * torch.kron(k1, k2), atol=1e-5)
    assert torch.equal(sd1.unet.get_submodule(name).weight, w0)


def test_key_styles_resolve_to_the_same_layers(sd1):
    from ldm_core.prompts.networks import ModelTargets, parse_network

    t = ModelTargets.of(sd1)
    n = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    q = "text_model.encoder.layers.0.self_attn.q_proj"
    assert t.resolve(f"lora_unet_{n.replace('.', '_')}_to_k") == ("unet", f"{n}.to_k")
    assert t.resolve("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_k") == ("unet", f"{n}.to_k")
    assert t.resolve("lora_unet_input_blocks_1_0_in_layers_2") == ("unet", "down_blocks.0.resnets.0.conv1")
    assert t.resolve(f"unet.{n}.to_v") == ("unet", f"{n}.to_v")
    assert t.resolve(f"unet.{n}.processor.to_q_lora") == ("unet", f"{n}.to_q")
    assert t.resolve(f"unet.{n}.processor.to_out_lora") == ("unet", f"{n}.to_out.0")
    assert t.resolve(f"text_encoder.{q}") == ("te", q)
    assert t.resolve("text_encoder.encoder.layers.0.self_attn.q_proj") == ("te", q)
    assert t.resolve("lora_te_text_model_encoder_layers_1_mlp_fc1") == (
        "te",
        "text_model.encoder.layers.1.mlp.fc1",
    )
    assert t.resolve("lora_unet_nonexistent_layer") is None
    assert t.resolve("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj") is None  # SD1: no 2nd
    z = torch.zeros(2, 2)
    parsed = parse_network(
        {
            f"unet.{n}.processor.to_q_lora.down.weight": z,
            f"unet.{n}.processor.to_q_lora.up.weight": z,
            f"text_encoder.{q}.lora_linear_layer.down.weight": z,
            f"text_encoder.{q}.lora_linear_layer.up.weight": z,
            f"unet.{n}.to_k.lora.down.weight": z,
            f"unet.{n}.to_k.lora.up.weight": z,
        }
    )
    assert sorted(layer.prefix for layer in parsed.layers) == [
        f"text_encoder.{q}",
        f"unet.{n}.processor.to_q_lora",
        f"unet.{n}.to_k",
    ]
    assert all(layer.kind == "lora" for layer in parsed.layers) and not parsed.unsupported


# -------------------------------------------------------------------------------------- library details
def test_hashes_entries_and_cache(sd1, lora_dir):
    lib = NetworkLibrary([lora_dir])
    assert lib.names() == ["k1", "k2", "p1", "xl"]
    path = lora_dir / "k1.safetensors"
    assert lib.short_hash("k1") == addnet_hash(path)[:12]
    entries = {e.name: e for e in lib.entries()}
    assert entries["xl"].family == "sdxl" and entries["k1"].family is None  # tiny widths say nothing
    first = lib.load("k1")
    assert lib.load("k1") is first  # cached
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    assert lib.load("k1") is not first  # reloaded after the file changed
    save_file(
        {"lora_unet_x.lora_down.weight": torch.zeros(1, 1)},
        lora_dir / "meta.safetensors",
        metadata={"sshs_model_hash": "ab" * 32, "ss_output_name": "Meta Name"},
    )
    lib.refresh()
    assert lib.short_hash("meta") == "ab" * 6
    assert {e.name: e for e in lib.entries()}["meta"].alias == "Meta Name"
    with pytest.raises(RequestError):
        lib.find("K3")
    assert lib.find("K1") == path  # case-insensitive fallback


# -------------------------------------------------------------------------------------------- trainer
def test_trainer_writes_a_kohya_lora_that_loads_and_changes_the_output(tmp_path, capsys):
    from safetensors import safe_open
    from tiny_models import build_tiny_f4

    from ldm_core.models import load_model
    from ldm_core.train.__main__ import main

    data = tmp_path / "hearts"
    out = tmp_path / "Lora" / "heart.safetensors"
    # the built-in model's geometry (64 px, factor-4 VAE), what the heart LoRA is trained on; the evaluation
    # generates at the base's native size, 512 px on the tiny SD1
    base = build_tiny_f4(tmp_path / "base")
    args = ["lora", "--render-hearts", "4", "--data", str(data), "--base", str(base), "--out", str(out)]
    args += ["--rank", "2", "--steps", "3", "--lr", "1e-2", "--batch", "2", "--resolution", "64"]
    assert main([*args, "--train-text-encoder", "--device", "cpu", "--log-every", "0"]) == 0
    assert '"steps": 3' in capsys.readouterr().out
    assert len(list(data.glob("*.png"))) == 5 and (data / "00000.txt").read_text().strip()
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    assert any("attn2_to_k.lora_down.weight" in k for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert meta["ss_network_dim"] == "2" and meta["ss_base_model_version"] == "sd_v1"
    model = load_model(base)
    lib = NetworkLibrary([out.parent])
    assert lib.short_hash("heart") == meta["sshs_model_hash"][:12] == addnet_hash(out)[:12]
    snap = snapshot(model)
    base_out = unet_out(model)
    base_cond = PromptEncoder(model).encode("a red heart").embeds
    with lib.applied(model, calls("<lora:heart:1>")):
        assert not torch.allclose(unet_out(model), base_out)
        assert not torch.allclose(PromptEncoder(model).encode("a red heart").embeds, base_cond)
    assert_identical(model, snap)
    # the evaluation goes through the engine's <lora:...> path with and without the tag
    from ldm_core.train.lora import evaluate_heart_lora

    rep = evaluate_heart_lora(base, out, n=2, steps=2)
    assert rep["n"] == 2 and set(rep["with"]) == set(rep["without"]) == {"heart", "heart_right_colour"}


@pytest.mark.parametrize("name", ["sd2_v", "sdxl"])
def test_trainer_runs_on_sd2_and_sdxl(tiny_models, tmp_path, name):
    from ldm_core.models import load_model
    from ldm_core.train.lora import LoraTrainOptions, train_lora, write_heart_dataset

    write_heart_dataset(tmp_path / "d", n=2, size=64, regular_fraction=0)
    out = tmp_path / "Lora" / "x.safetensors"
    opts = LoraTrainOptions(
        data=tmp_path / "d",
        base=tiny_models[name]["single_file"],
        out=out,
        rank=2,
        steps=2,
        lr=1e-2,
        batch=2,
        resolution=64,
        device="cpu",
        log_every=0,
    )
    assert train_lora(opts, log=lambda s: None)["steps"] == 2
    model = load_model(tiny_models[name]["single_file"])
    base_out = unet_out(model)
    with NetworkLibrary([out.parent]).applied(model, calls("<lora:x:1>")):
        assert not torch.allclose(unet_out(model), base_out)
