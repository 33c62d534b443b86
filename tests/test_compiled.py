"""The compiled path (EngineConfig.compile="on", ldm_core.compiled): the same pixels as eager within 2/255 for
every sampler family on a tiny model, no recompilation across jobs of the same shape, LoRA weights changed
without a recompile, and a compiler failure that falls back to eager instead of failing the job."""

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
def engines(tmp_path_factory, tiny_models):
    models = {"tiny-sd1": tiny_models["sd1"]["diffusers"]}
    eager = make_engine(tmp_path_factory.mktemp("eager"), models, device="cpu", compile="off")
    compiled = make_engine(tmp_path_factory.mktemp("compiled"), models, device="cpu", compile="on")
    return eager, compiled


def _pixels(engine, req) -> np.ndarray:
    return np.asarray(engine.generate(req).images[0]).astype(np.int16)


def test_auto_compiles_on_cuda_only_and_names_bad_modes():
    assert compile_enabled("auto", torch.device("cuda")) and not compile_enabled("auto", torch.device("cpu"))
    assert compile_enabled("on", torch.device("cpu")) and not compile_enabled("off", torch.device("cuda"))
    with pytest.raises(ValueError, match="compile must be one of"):
        compile_enabled("yes", torch.device("cpu"))


def test_compiled_matches_eager_for_every_sampler_family(engines):
    eager, compiled = engines
    assert compiled.compiler.enabled and not eager.compiler.enabled
    for sampler in FAMILIES:
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


def test_changed_weights_are_used_without_recompiling(engines):
    """Weights are graph inputs, not constants: an in-place change (what a LoRA merge does) shows in the very
    next image, and nothing is compiled again."""
    eager, compiled = engines
    req = _req("Euler", seed=3)
    base = _pixels(compiled, req)
    count = compiled.compiler.count
    unet = compiled.current_model.unet
    weight = unet.conv_out.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(3.0)
        changed = _pixels(compiled, req)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert np.abs(changed - base).max() > 10
    assert compiled.compiler.count == count
    assert np.abs(_pixels(compiled, req) - base).max() <= 2


def test_a_compiler_failure_runs_eagerly_and_says_why(engines):
    eager, _ = engines

    class Broken(Compiler):
        def _backend(self, gm, example_inputs):
            raise RuntimeError("no C++ compiler")

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
