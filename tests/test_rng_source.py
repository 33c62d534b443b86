"""Two A1111 request settings this server used to take and silently drop, each with a check that fails when
it is ignored again:

- `randn_source` (A1111's "Random number generator source", EngineConfig `cpu_noise`): "CPU" (our default)
  draws the initial and step noise on the CPU and moves it, so a seed gives the same image on every device;
  "GPU" draws it on the job's device. Reachable from the Settings tab and /sdapi/v1/options; the
  reproducibility manifest says which source drew the noise.
- `image_cfg_scale`: only instruct-pix2pix models use it (A1111 too) and this server runs none, so it is
  accepted (A1111 clients send it on every img2img call) and the job's `info` says it was not applied.

The GPU half of the noise source (noise and generators really on CUDA) is `-m gpu`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_engine import make_engine

import ldm_core.engine as engine_module
from ldm_core.generation_requests import GenerationRequest, Img2ImgRequest
from ldm_core.options import OPTIONS_BY_KEY, OptionError, OptionsStore, bind_engine, coerce, effective_applies
from ldm_core.rng import batch_noise

SIZE = 64


def req(cls=GenerationRequest, **kw):
    base = dict(prompt="a red circle", steps=2, width=SIZE, height=SIZE, seed=11, save_images=False, model="main")
    base.update(kw)
    return cls.build(**base)


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_models):
    return make_engine(tmp_path_factory.mktemp("rng"), {"main": tiny_models["sd1"]["single_file"]})


def test_randn_source_option_reaches_the_engine_and_the_noise(engine, tmp_path, monkeypatch):
    option = OPTIONS_BY_KEY["randn_source"]
    assert option.default == "CPU" and set(option.choices) == {"CPU", "GPU"}
    assert effective_applies(option) == "live"
    with pytest.raises(OptionError) as e:
        coerce(option, "NV")  # A1111's third source (a CPU imitation of NVIDIA's generator) is not offered
    assert e.value.key == "randn_source" and "GPU" in e.value.message

    seen: list[object] = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device"))
        return batch_noise(*args, **kwargs)

    monkeypatch.setattr(engine_module, "batch_noise", spy)
    store = OptionsStore(tmp_path / "config.json")
    unbind = bind_engine(store, engine)
    try:
        assert engine.config.cpu_noise is True
        cpu = engine.generate(req())
        assert seen == ["cpu"] and cpu.manifests[0]["noise"] == "cpu"
        store.update({"randn_source": "GPU"})  # the Settings tab or POST /sdapi/v1/options
        assert engine.config.cpu_noise is False
        dev = engine.generate(req())
        assert seen[1] == engine.policy.device and not isinstance(seen[1], str)
        assert dev.manifests[0]["noise"] == "device"
        # on a CPU engine the job's device is the CPU: the same seed draws the same noise either way
        assert np.array_equal(np.asarray(cpu.images[0]), np.asarray(dev.images[0]))
    finally:
        store.update({"randn_source": "CPU"})
        unbind()
    assert engine.config.cpu_noise is True


def test_batch_noise_draws_on_the_device_it_is_given():
    noise, gens = batch_noise((4, 8, 8), [3, 4], noise_seed_delta=5, device="cpu")
    assert noise.device.type == "cpu" and all(g.device.type == "cpu" for g in gens)
    default, _ = batch_noise((4, 8, 8), [3, 4])
    assert torch.equal(noise, default)


def test_image_cfg_scale_is_accepted_and_reported_as_not_applied(engine):
    init = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))
    given = engine.generate(req(Img2ImgRequest, init_images=[init], image_cfg_scale=1.5))
    plain = engine.generate(req(Img2ImgRequest, init_images=[init]))
    note = "image_cfg_scale 1.5: not applied (it is the image guidance of instruct-pix2pix models"
    assert any(n.startswith(note) for n in given.notes)
    assert note in given.info(req(Img2ImgRequest, init_images=[init], image_cfg_scale=1.5))["comments"]
    assert not any("image_cfg_scale" in n for n in plain.notes)
    assert np.array_equal(np.asarray(given.images[0]), np.asarray(plain.images[0]))  # it changes nothing


@pytest.mark.gpu
def test_gpu_randn_source_draws_on_cuda(tmp_path, tiny_models):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (run -m gpu on a machine with one)")
    noise, gens = batch_noise((4, 8, 8), [3], device="cuda")
    cpu_noise, _ = batch_noise((4, 8, 8), [3])
    assert noise.device.type == "cuda" and gens[0].device.type == "cuda"
    assert not torch.equal(noise.cpu(), cpu_noise)  # a different generator: another picture for the seed
    eng = make_engine(tmp_path, {"main": tiny_models["sd1"]["single_file"]}, device="cuda", cpu_noise=False)
    res = eng.generate(req(sampler_name="Euler a", steps=4))
    assert res.manifests[0]["noise"] == "device" and np.asarray(res.images[0]).std() > 1
