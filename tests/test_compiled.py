"""The compiled path (EngineConfig.compile="on", ldm_core.compiled): the same pixels as eager within 2/255 for
every sampler family on a tiny model, no recompilation across jobs of the same shape, changed weights (a
LoRA) used at once - on the CPU's frozen graphs by exactly one recompile, with weights as graph inputs
(CUDA's way, `-m slow`: another minute of compiling) by none - and a compiler failure that falls back to
eager instead of failing the job."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_engine import make_engine

from ldm_core.compiled import Compiler, compile_enabled
from ldm_core.generation_requests import GenerationRequest

# one sampler of each family the registry has: ancestral, first-order ODE, multistep, second-order (two
# evaluations a step), SDE with its own noise, DDIM-style (integer timesteps), predictor-corrector, LCM
FAMILIES = ["Euler a", "Euler", "DPM++ 2M", "Heun", "DPM++ SDE", "DDIM", "UniPC", "LCM"]


def _req(sampler: str, seed: int = 5, **kw) -> GenerationRequest:
    base = dict(
        prompt="a red circle",
        negative_prompt="blue",
        steps=4,
        width=64,
        height=64,
        seed=seed,
        sampler_name=sampler,
        save_images=False,
    )
    base.update(kw)
    return GenerationRequest.build(**base)


@pytest.fixture(scope="module")
def engines(tmp_path_factory, tiny_models, sd1):
    from test_lora import factors, kohya_file

    lora = tmp_path_factory.mktemp("Lora")
    kohya_file(factors(sd1, 1, conv=True), lora / "lora_a.safetensors", "sd1")
    models = {"tiny-sd1": tiny_models["sd1"]["diffusers"]}
    eager = make_engine(tmp_path_factory.mktemp("eager"), models, device="cpu", compile="off", lora_dirs=(lora,))
    compiled = make_engine(tmp_path_factory.mktemp("compiled"), models, device="cpu", compile="on", lora_dirs=(lora,))
    return eager, compiled


def _pixels(engine, req) -> np.ndarray:
    return np.asarray(engine.generate(req).images[0]).astype(np.int16)


def test_auto_compiles_on_cuda_only_and_names_bad_modes():
    assert compile_enabled("auto", torch.device("cuda")) and not compile_enabled("auto", torch.device("cpu"))
    assert compile_enabled("on", torch.device("cpu")) and not compile_enabled("off", torch.device("cuda"))
    with pytest.raises(ValueError, match="compile must be one of"):
        compile_enabled("yes", torch.device("cpu"))


@pytest.mark.parametrize("sampler", FAMILIES)
def test_compiled_matches_eager_for_every_sampler_family(engines, sampler):
    eager, compiled = engines
    assert compiled.compiler.enabled and not eager.compiler.enabled
    a, b = _pixels(eager, _req(sampler)), _pixels(compiled, _req(sampler))
    assert a.std() > 0, sampler  # a real image, not a constant
    assert np.abs(a - b).max() <= 2, f"{sampler}: compiled differs from eager by {np.abs(a - b).max()}/255"
    assert compiled.compiler.count >= 1 and not compiled.compiler.failures


def test_no_recompile_across_jobs_of_one_shape(engines):
    _, compiled = engines
    compiled.generate(_req("Euler a", seed=1))
    before = compiled.compiler.count
    for seed in range(2, 7):  # 5 more jobs: other seeds and prompts, same shape
        compiled.generate(_req("Euler a", seed=seed, prompt=f"a blue square {seed}"))
    assert compiled.compiler.count == before


def test_a_lora_recompiles_a_frozen_graph_once_and_matches_eager(engines):
    """On a CPU the weights are frozen into the graph: a LoRA merged in place must show in the very next image
    (eager's within 2/255) by one recompile, and the same set again compiles nothing. (Dropping it again is the
    same stamp change once more; `-m slow` below checks that it gives the plain image back.)"""
    eager, compiled = engines
    assert compiled.compiler.freeze
    plain, lora = _req("Euler", seed=3), _req("Euler", seed=3, prompt="a red circle <lora:lora_a:1>")
    base = _pixels(compiled, plain)
    count = compiled.compiler.count
    with_lora = _pixels(compiled, lora)
    assert compiled.compiler.count == count + 1
    assert np.abs(with_lora - base).max() > 10
    assert np.abs(with_lora - _pixels(eager, lora)).max() <= 2
    assert np.array_equal(_pixels(compiled, lora), with_lora) and compiled.compiler.count == count + 1


@pytest.mark.slow
def test_dropping_the_lora_recompiles_and_gives_the_plain_image_back(engines):
    eager, compiled = engines
    plain, lora = _req("Euler", seed=4), _req("Euler", seed=4, prompt="a red circle <lora:lora_a:1>")
    base = _pixels(eager, plain)
    _pixels(compiled, lora)
    count = compiled.compiler.count
    assert np.abs(_pixels(compiled, plain) - base).max() <= 2
    assert compiled.compiler.count == count + 1


@pytest.mark.slow
def test_weights_as_graph_inputs_change_without_recompiling(engines):
    """CUDA's way (freeze=False): the weights are inputs of the graph, read at every call."""
    eager, _ = engines
    compiler = Compiler(True, freeze=False)
    unet = eager.current_model.unet
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor(10.0), torch.randn(1, 77, unet.config.cross_attention_dim)
    weight = unet.conv_out.weight
    saved = weight.detach().clone()
    with torch.inference_mode():
        before = compiler.unet(unet)(x, t, encoder_hidden_states=ctx).sample
        count = compiler.count
        try:
            with torch.no_grad():
                weight.mul_(3.0)
            after = compiler.unet(unet)(x, t, encoder_hidden_states=ctx).sample
            ref = unet(x, t, encoder_hidden_states=ctx).sample
        finally:
            with torch.no_grad():
                weight.copy_(saved)
    assert compiler.count == count == 1
    assert (after - before).abs().max() > 1e-3 and torch.allclose(after, ref, atol=1e-4)


def test_a_compiler_failure_runs_eagerly_and_says_why(engines):
    eager, _ = engines

    class Broken(Compiler):
        def _new_backend(self):
            def backend(gm, example_inputs):
                raise RuntimeError("no C++ compiler")

            return backend

    compiler = Broken(True)
    unet = eager.current_model.unet
    fn = compiler.unet(unet)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor(10), torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.inference_mode():
        out = fn(x, t, encoder_hidden_states=ctx).sample
        ref = unet(x, t, encoder_hidden_states=ctx).sample
    assert torch.allclose(out, ref)
    assert compiler.failures and "no C++ compiler" in compiler.failures[0]
    assert compiler.unet(unet) is unet  # eager from now on
