"""The two A1111 1.10 samplers that decide more than a schedule: "DPM adaptive" (DPM-Solver-12/23 with an
adaptive step size, evaluations decided while sampling) and "DDIM CFG++" (re-noises with the unconditional
prediction).

On the analytic model of tests/test_schedulers.py (data x0 ~ N(MU, S^2), exact posterior mean, so the
probability-flow ODE's solution is known in closed form) DPM adaptive must land on the exact solution and
trade accuracy for model calls through rtol; DDIM CFG++ must be DDIM when the conditional and unconditional
predictions agree and move by exactly the CFG++ correction otherwise. Then both run by name through the
engine on the tiny SD1 model (infotext, progress, interrupt, prompt editing) and are listed by
/sdapi/v1/samplers.
"""

from __future__ import annotations

import math
import shutil
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from test_schedulers import MU, SD, SHAPE, S, make_model, sigma_of_t

from ldm_core.generation_requests import GenerationRequest, Img2ImgRequest
from ldm_core.pipeline.loop import LoopInputs, denoise
from ldm_core.progress import CancelToken, JobContext, Progress
from ldm_core.samplers.cfg_pp import CFG_SCALE_FACTOR
from ldm_core.samplers.dpm_adaptive import AdaptiveOptions, StepSizeController, dpm_adaptive
from ldm_core.samplers.open_ended import OpenEndedSigmaScheduler
from ldm_core.schedulers import default_sampler_registry

REGISTRY = default_sampler_registry()


def run_open_ended(scheduler, x, model, generator=None):
    """The loop for a scheduler whose `timesteps` grow while it runs; returns (result, model calls)."""
    calls = 0
    while calls < len(scheduler.timesteps):
        t = scheduler.timesteps[calls]
        out = model(scheduler.scale_model_input(x, t), t)
        calls += 1
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x, calls


def adaptive(eta: float = 0.0, **options) -> OpenEndedSigmaScheduler:
    algorithm = partial(dpm_adaptive, options=AdaptiveOptions(**options)) if options else dpm_adaptive
    return OpenEndedSigmaScheduler(SD, "Exponential", algorithm, name="DPM adaptive", eta=eta)


def exact_at(x_start: torch.Tensor, sigma_start: float, sigma_end: float) -> torch.Tensor:
    """The probability-flow ODE from sigma_start to sigma_end: (x - MU) / sqrt(S^2 + sigma^2) is constant."""
    return MU + (x_start - MU) * math.sqrt(S * S + sigma_end**2) / math.sqrt(S * S + sigma_start**2)


def _start(scheduler, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(20)
    return torch.randn(SHAPE, generator=g) * scheduler.init_noise_sigma, g


# ---------------------------------------------------------------------------------------------------------
# DPM adaptive on the analytic model
# ---------------------------------------------------------------------------------------------------------


def test_dpm_adaptive_reaches_the_exact_ode_solution_and_rtol_trades_calls_for_accuracy():
    model = make_model("epsilon")
    results = {}
    for label, options in (("loose", {"rtol": 0.2}), ("default", {}), ("tight", {"rtol": 1e-3, "atol": 1e-4})):
        scheduler = adaptive(**options)
        x, _ = _start(scheduler)
        sigma_max, sigma_min = scheduler.levels.sigma_max, scheduler.levels.sigma_min
        assert float(scheduler.sigmas[0]) == pytest.approx(sigma_max)
        assert len(scheduler.timesteps) == 1  # only the first evaluation is known up front
        out, calls = run_open_ended(scheduler, x, model)
        exact = exact_at(x.double(), sigma_max, sigma_min)  # it stops at the model's smallest noise level
        err = (out.double() - exact).abs()
        results[label] = (float(err.max()), float(err.mean()), calls)
        assert calls == len(scheduler.timesteps) == scheduler.estimated_evaluations
    assert results["default"][0] < 0.25 and results["default"][1] < 0.05, results  # A1111's tolerances
    assert results["tight"][0] < 0.01, results
    assert results["loose"][2] < results["default"][2] < results["tight"][2] < 100, results


def test_dpm_adaptive_ignores_the_step_count_and_orders_agree():
    model = make_model("epsilon")
    outs = []
    for steps in (5, 40):
        scheduler = adaptive()
        g = torch.Generator().manual_seed(4)
        scheduler.set_timesteps(steps)
        x = torch.randn(SHAPE, generator=g) * scheduler.init_noise_sigma
        outs.append(run_open_ended(scheduler, x, model))
    assert torch.equal(outs[0][0], outs[1][0]) and outs[0][1] == outs[1][1]
    second = adaptive(order=2)  # the DPM-Solver-12 pair: cheaper steps, more of them
    x, _ = _start(second, seed=4)
    out2, calls2 = run_open_ended(second, x, model)
    exact = exact_at(x.double(), second.levels.sigma_max, second.levels.sigma_min)
    assert float((out2.double() - exact).abs().mean()) < 0.06
    assert calls2 != outs[0][1]


def test_controller_accepts_small_errors_and_shrinks_the_step_on_large_ones():
    c = StepSizeController(AdaptiveOptions())
    assert c.propose(0.1) and c.h > 0.05  # error well under tolerance: accept, grow
    h = c.h
    assert not c.propose(20.0) and c.h < h  # far over tolerance: reject, shrink
    with pytest.raises(ValueError):
        AdaptiveOptions(order=4)


def test_dpm_adaptive_ancestral_reproduces_the_data_and_follows_the_seed():
    model = make_model("epsilon")
    runs = []
    for seed in (7, 7, 8):
        scheduler = REGISTRY.create("DPM adaptive", "Automatic", SD)  # A1111's default eta: 1
        x, g = _start(scheduler, seed)
        runs.append(run_open_ended(scheduler, x, model, g)[0].double())
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])
    assert abs(float(runs[0].mean()) - MU) < 0.07 and abs(float(runs[0].std()) / S - 1) < 0.15
    quiet = REGISTRY.create("DPM adaptive", "Automatic", SD, eta=0.0)
    x, g = _start(quiet, 7)
    assert not torch.allclose(runs[0], run_open_ended(quiet, x, model, g)[0].double())


def test_dpm_adaptive_img2img_starts_at_the_tail():
    scheduler = REGISTRY.create("DPM adaptive", "Karras", SD, eta=0.0)
    scheduler.set_timesteps(10)
    ts = scheduler.set_begin_step(6)
    start = float(scheduler.schedule[6])
    assert len(ts) == 1 and sigma_of_t(ts[0]) == pytest.approx(start, rel=1e-4)
    g = torch.Generator().manual_seed(9)
    init = MU + S * torch.randn(SHAPE, generator=g)
    x = scheduler.add_noise(init, torch.randn(SHAPE, generator=g), ts[:1])
    out, calls = run_open_ended(scheduler, x, make_model("epsilon"))
    assert 1 < calls < 60
    exact = exact_at(x.double(), start, scheduler.levels.sigma_min)
    assert float((out.double() - exact).abs().mean()) < 0.05


# ---------------------------------------------------------------------------------------------------------
# DDIM CFG++ on the analytic model
# ---------------------------------------------------------------------------------------------------------


def ddim_step(eps, x):
    ddim = REGISTRY.create("DDIM", "Automatic", SD)
    ddim.set_timesteps(10)
    return ddim.step(eps, ddim.timesteps[0], x).prev_sample


def _cfgpp_step(scheduler, x, guided, uncond):
    t = scheduler.timesteps[0]
    return scheduler.step(guided, t, x, model_output_uncond=uncond).prev_sample


def test_ddim_cfgpp_is_ddim_when_cond_equals_uncond():
    model = make_model("epsilon")
    ddim = REGISTRY.create("DDIM", "Automatic", SD)
    cfgpp = REGISTRY.create("DDIM CFG++", "Automatic", SD)
    assert cfgpp.uses_uncond and not ddim.uses_uncond
    ddim.set_timesteps(12)
    cfgpp.set_timesteps(12)
    g = torch.Generator().manual_seed(1)
    x = y = torch.randn(SHAPE, generator=g) * ddim.init_noise_sigma
    for t in ddim.timesteps:
        out = model(ddim.scale_model_input(x, t), t)
        x = ddim.step(out, t, x).prev_sample
        out = model(cfgpp.scale_model_input(y, t), t)
        y = cfgpp.step(out, t, y, model_output_uncond=out.clone()).prev_sample
    assert torch.allclose(x, y, atol=1e-6)


def test_ddim_cfgpp_renoises_with_the_unconditional_prediction():
    """One step from sigma to sigma': DDIM CFG++ lands at D_lambda + sigma' eps_u with lambda = CFG / 12.5,
    i.e. DDIM at guidance lambda moved by (sigma' / sigma) (D_lambda - D_u), along the guidance."""
    cfg = 7.0
    scheduler = REGISTRY.create("DDIM CFG++", "Automatic", SD)
    scheduler.set_timesteps(10)
    sigma, sigma_next = float(scheduler.sigmas[0]), float(scheduler.sigmas[1])
    g = torch.Generator().manual_seed(2)
    x = torch.randn(SHAPE, generator=g) * sigma
    eps_c, eps_u = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    guided = eps_u + cfg * (eps_c - eps_u)  # what the loop hands over (epsilon prediction)
    got = _cfgpp_step(scheduler, x, guided, eps_u)
    lam = cfg * CFG_SCALE_FACTOR
    eps_lam = eps_u + lam * (eps_c - eps_u)
    d_lam, d_u = x - sigma * eps_lam, x - sigma * eps_u
    assert torch.allclose(got, d_lam + sigma_next * eps_u, atol=1e-5)
    plain = ddim_step(eps_lam, x)  # DDIM at the same guidance lambda
    assert torch.allclose(got - plain, (sigma_next / sigma) * (d_lam - d_u), atol=1e-5)
    assert float((got - plain).abs().max()) > 0.1
    # no unconditional pass (CFG scale 1, or skipped by s_min_uncond): the guided prediction stands in
    scheduler.set_timesteps(10)
    assert torch.allclose(_cfgpp_step(scheduler, x, guided, None), ddim_step(guided, x), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Registry, denoising loop, engine and API
# ---------------------------------------------------------------------------------------------------------


def test_registry_labels_aliases_and_options_as_a1111():
    names = REGISTRY.names()
    assert names.index("DPM fast") + 1 == names.index("DPM adaptive") < names.index("Restart")
    assert names.index("DDIM") + 1 == names.index("DDIM CFG++") < names.index("PLMS")
    assert REGISTRY.resolve("k_dpm_ad")[0].name == "DPM adaptive"
    assert REGISTRY.resolve("ddim_cfgpp")[0].name == "DDIM CFG++"
    assert REGISTRY.resolve("DPM adaptive")[0].options == {"uses_ensd": "True"}
    assert REGISTRY.resolve("DPM adaptive", "Karras")[1] == "Karras"  # any schedule type is accepted
    assert isinstance(REGISTRY.create("DPM adaptive", "Automatic", SD), OpenEndedSigmaScheduler)


class _Cond:
    def __init__(self, value: float):
        self.embeds = torch.full((1, 2, 4), value)
        self.pooled = None


class _CountingUNet(torch.nn.Module):
    """A "UNet" for the loop: the analytic model, the conditioning shifting its data mean."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.calls = 0

    def forward(self, x_in, t, encoder_hidden_states=None, added_cond_kwargs=None):
        self.calls += 1
        out = make_model("epsilon")(x_in, t) + encoder_hidden_states[:, :1, :1, None] * 0.01

        class _Out:
            sample = out

        return _Out()


def test_loop_runs_an_open_ended_scheduler_and_checks_cancel_at_every_call():
    scheduler = REGISTRY.create("DPM adaptive", "Automatic", SD, eta=0.0)
    scheduler.set_timesteps(10)
    seen_conditioning, reports = [], []

    def conditioning(i):
        seen_conditioning.append(i)
        return _Cond(0.0), [(_Cond(1.0), 1.0)]

    class StopAfter(CancelToken):
        def __init__(self, n):
            super().__init__()
            self.n, self.checks = n, 0

        def check(self):
            self.checks += 1
            if self.checks > self.n:
                self.interrupt()
            super().check()

    unet = _CountingUNet()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    planned = scheduler.estimated_evaluations
    assert planned == 30  # before the run: 3 evaluations per step of the 10-step schedule
    inputs = LoopInputs(x, scheduler.timesteps, scheduler, conditioning, 5.0, sigmas=[float(scheduler.sigmas[0])])
    res = denoise(unet, inputs, on_step=lambda done, total, _: reports.append((done, total)))
    assert res.stopped is None and res.steps_done == unet.calls == len(scheduler.timesteps) > 5
    assert [d for d, _ in reports] == list(range(1, unet.calls + 1))
    assert reports[-1] == (unet.calls, unet.calls) and all(t > d for d, t in reports[:-1])
    assert seen_conditioning == sorted(seen_conditioning) and seen_conditioning[-1] == planned - 1
    # interrupted after 4 model calls: the cancel token is checked before every one
    scheduler.set_timesteps(10)
    unet.calls = 0
    stop = StopAfter(4)
    inputs = LoopInputs(x, scheduler.timesteps, scheduler, conditioning, 5.0)
    res = denoise(unet, inputs, cancel=stop)
    assert res.stopped is not None and unet.calls == 4 and res.steps_done == 4


# ---- engine ----------------------------------------------------------------------------------------------

SIZE = 64


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_models):
    from ldm_core.config import EngineConfig
    from ldm_core.engine import Engine

    tmp = tmp_path_factory.mktemp("extra_samplers")
    ckpt = tmp / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    shutil.copytree(tiny_models["sd1"]["diffusers"], ckpt / "tiny-sd1")
    return Engine(EngineConfig.from_data_dir(tmp, builtin_model_dir=None))


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a red circle", negative_prompt="blue", steps=6, width=SIZE, height=SIZE, seed=11)
    return GenerationRequest.build(**{**base, "save_images": False, **kw})


class _Recorder(Progress):
    def __init__(self):
        super().__init__()
        self.steps: list[tuple[int, int]] = []

    def update(self, **changes):
        if "step" in changes and "steps" in changes:
            self.steps.append((changes["step"], changes["steps"]))
        super().update(**changes)


def test_engine_runs_dpm_adaptive_by_name_with_progress(engine):
    ctx = JobContext(progress=_Recorder())
    res = engine.generate(req(sampler_name="DPM adaptive"), ctx)
    assert "Sampler: DPM adaptive" in res.infotexts[0] and "Steps: 6" in res.infotexts[0]
    a = np.asarray(res.images[0])
    assert a.shape == (SIZE, SIZE, 3) and a.std() > 0
    steps = [s for s in ctx.progress.steps if s[0] > 0]
    assert len(steps) > 6  # its own step count, not the request's
    assert [d for d, _ in steps] == list(range(1, len(steps) + 1)) and steps[-1] == (len(steps), len(steps))
    again = engine.generate(req(sampler_name="k_dpm_ad"))
    assert np.array_equal(np.asarray(again.images[0]), a)  # the alias; same seed, same image
    other = engine.generate(req(sampler_name="DPM adaptive", seed=12)).images[0]
    assert not np.array_equal(np.asarray(other), a)
    edited = engine.generate(req(sampler_name="DPM adaptive", prompt="a [red:green:0.5] circle")).images[0]
    assert not np.array_equal(np.asarray(edited), a)  # prompt editing reaches the second half of the run
    green = engine.generate(req(sampler_name="DPM adaptive", prompt="a green circle")).images[0]
    assert not np.array_equal(np.asarray(edited), np.asarray(green))  # ... and only that
    init = Image.fromarray(a)
    i2i = engine.generate(
        Img2ImgRequest.build(**req(sampler_name="DPM adaptive").model_dump(exclude={"mode"}), init_images=[init])
    )
    assert "Sampler: DPM adaptive" in i2i.infotexts[0]


def test_engine_interrupts_dpm_adaptive_mid_run(engine):
    ctx = JobContext(progress=_Recorder())

    class InterruptAt(_Recorder):
        def update(self, **changes):
            super().update(**changes)
            if changes.get("step") == 3:
                ctx.cancel.interrupt()

    ctx.progress = InterruptAt()
    res = engine.generate(req(sampler_name="DPM adaptive"), ctx)
    assert res.interrupted
    assert max(d for d, _ in ctx.progress.steps) == 3


def test_engine_runs_ddim_cfgpp_by_name(engine):
    res = engine.generate(req(sampler_name="DDIM CFG++"))
    assert "Sampler: DDIM CFG++" in res.infotexts[0] and "CFG scale: 7" in res.infotexts[0]
    ddim = engine.generate(req(sampler_name="DDIM")).images[0]
    cfgpp = np.asarray(res.images[0])
    assert not np.array_equal(cfgpp, np.asarray(ddim))
    assert np.array_equal(np.asarray(engine.generate(req(sampler_name="ddim_cfgpp")).images[0]), cfgpp)


def test_samplers_route_lists_both(tiny_models, tmp_path):
    import fastapi
    from fastapi.testclient import TestClient

    from api import install
    from ldm_core.config import EngineConfig
    from ldm_core.service import Service

    ckpt = tmp_path / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True)
    shutil.copy(tiny_models["sd1"]["single_file"], ckpt / "tiny-sd1.safetensors")
    service = Service(EngineConfig.from_data_dir(tmp_path, builtin_model_dir=None, device="cpu"))
    app = fastapi.FastAPI()
    install(app, service)
    try:
        with TestClient(app) as client:
            listed = {s["name"]: s for s in client.get("/sdapi/v1/samplers").json()}
            assert listed["DPM adaptive"]["aliases"] == ["k_dpm_ad"]
            assert listed["DPM adaptive"]["options"] == {"uses_ensd": "True"}
            assert listed["DDIM CFG++"]["aliases"] == ["ddim_cfgpp"]
            for name in ("DPM adaptive", "DDIM CFG++"):
                payload = {"prompt": "a red circle", "steps": 3, "width": 64, "height": 64, "sampler_name": name}
                r = client.post("/sdapi/v1/txt2img", json=payload)
                assert r.status_code == 200, r.text
                assert f"Sampler: {name}" in r.json()["info"]
    finally:
        service.shutdown()
