"""The extension system end to end: a third-party extension in a local git repository installed through the
real install path (git clone from a file:// URL, pinned commit, no extension code run), loaded in isolation,
registering a conditioning type that changes the output through the engine and through the HTTP API;
broken / incompatible / under-provisioned extensions isolated with clear messages; the security policy;
enable/disable persistence; updates, removal, the "Available" index, the CLI."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_core.config import EngineConfig
from ldm_core.engine import Engine
from ldm_core.extension_api import API_VERSION, parse_units
from ldm_core.extensions import (
    ExtensionAccessError,
    ExtensionError,
    ExtensionManager,
    ExtensionPolicy,
    api_compatible,
    check_git_url,
    check_requirement,
    pip_arguments,
    split_source,
)
from ldm_core.extensions_cli import main as cli_main
from ldm_core.generation_requests import GenerationRequest, RequestError

torch.set_num_threads(1)
SIZE = 64

MANIFEST = """\
name = "midshift"
version = "{version}"
api_version = "{api}"
description = "Adds a constant to the UNet's middle block (a test conditioning type)."
homepage = "https://example.invalid/midshift"
families = ["sd1", "sdxl"]
requirements = ["numpy>=1.20"]
entry = "main.py"
"""

ENTRY = '''\
"""A third-party test extension: only ldm_core.extension_api (plus torch) is imported."""
from pathlib import Path

import torch
from pydantic import Field

from ldm_core.extension_api import (
    ConditioningType, PostProcessor, Preprocessor, SamplerInfo, UnitParams, format_number,
)

from .helpers import shifted

Path(__file__).with_name("imported.marker").write_text("imported")


class Shift(UnitParams):
    strength: float = Field(1.0, ge=-10, le=10)


class Gray(UnitParams):
    pass


def prepare(job, unit, index):
    cfg = job.unet_config
    ch, f = cfg["block_out_channels"][-1], 2 ** (len(cfg["block_out_channels"]) - 1)

    def provider(step):
        rows, _, h, w = step.x_in.shape
        return {{"mid_block_additional_residual": shifted((rows, ch, h // f, w // f), unit.strength, step.x_in)}}

    return provider


def read_infotext(params):
    if "Mid shift" not in params:
        return None
    return [{{"strength": float(s)}} for s in params["Mid shift"].split(";")]


def grayscale(images, job, params):
    return [i.convert("L").convert("RGB") for i in images]


def sampler_factory(base_config, schedule_type, options):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(dict(base_config))


def register(ctx):
    ctx.add_conditioning(ConditioningType(
        name="midshift", title="Mid shift", params=Shift, prepare=prepare, max_units=2,
        to_infotext=lambda units: {{"Mid shift": ";".join(str(format_number(u.strength)) for _, u in units)}},
        from_infotext=read_infotext,
    ))
    ctx.add_preprocessor(Preprocessor("posterize", lambda im, res, a, b: im.quantize(4).convert("RGB")))
    ctx.add_sampler(SamplerInfo("Test Euler {version}"), sampler_factory)
    ctx.add_upscaler("Test nearest x2", lambda im, s: im.resize((int(im.width * s), int(im.height * s))))
    ctx.add_postprocessor(PostProcessor("grayscale", Gray, grayscale))
'''

HELPERS = """\
import torch


def shifted(shape, value, like):
    return torch.full(shape, float(value), dtype=like.dtype, device=like.device)
"""

INSTALL_PY = 'from pathlib import Path\nPath(__file__).with_name("install_ran.marker").write_text("ran")\n'


def git(*args: str, cwd: Path) -> str:
    cmd = [
        "git",
        "-c",
        "user.name=Test",
        "-c",
        "user.email=test@example.invalid",
        "-c",
        "init.defaultBranch=main",
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_repo(path: Path, version: str = "1.0.0", api: str = "1.0") -> str:
    """A git repository holding the midshift extension; returns the commit."""
    path.mkdir(parents=True, exist_ok=True)
    if not (path / ".git").exists():
        git("init", "-q", cwd=path)
    (path / "extension.toml").write_text(MANIFEST.format(version=version, api=api))
    (path / "main.py").write_text(ENTRY.format(version=version))
    (path / "helpers.py").write_text(HELPERS)
    (path / "install.py").write_text(INSTALL_PY)
    git("add", "-A", cwd=path)
    git("commit", "-q", "-m", f"version {version}", cwd=path)
    return git("rev-parse", "HEAD", cwd=path)


def write_ext(root: Path, folder: str, manifest: str, entry: str = "def register(ctx):\n    pass\n") -> Path:
    d = root / folder
    d.mkdir(parents=True)
    if manifest:
        (d / "extension.toml").write_text(textwrap.dedent(manifest))
    (d / "main.py").write_text(textwrap.dedent(entry))
    return d


def arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im).astype(np.int16)


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a red circle", steps=3, width=SIZE, height=SIZE, seed=5, model="tiny-sd1", save_images=False)
    base.update(kw)
    return GenerationRequest.build(**base)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models):
    """A data dir with the tiny SD1 model, a git repo holding the extension (tag v1.0 on the first commit,
    a second commit on main), and the extension installed from file:// pinned to v1.0, then loaded."""
    root = tmp_path_factory.mktemp("ext")
    repo = root / "src" / "midshift"
    first = make_repo(repo)
    git("tag", "v1.0", cwd=repo)
    second = make_repo(repo, version="1.1.0")
    data = root / "data"
    (data / "models" / "Stable-diffusion").mkdir(parents=True)
    (data / "models" / "Stable-diffusion" / "tiny-sd1").symlink_to(tiny_models["sd1"]["diffusers"])
    cfg = EngineConfig.from_data_dir(data, builtin_model_dir=None, save_images=False, preview_every=0)
    engine = Engine(cfg)
    manager = ExtensionManager(
        [data / "extensions"], install_dir=data / "extensions", state_file=data / "extensions.json", config=cfg
    )
    result = manager.install(f"file://{repo}@v1.0")
    folder = data / "extensions" / "midshift"
    installed = {
        "result": result,
        "head": git("rev-parse", "HEAD", cwd=folder),
        "markers_after_install": sorted(p.name for p in folder.glob("*.marker")),
    }
    manager.load(engine)
    return {
        "root": root,
        "repo": repo,
        "first": first,
        "second": second,
        "data": data,
        "cfg": cfg,
        "engine": engine,
        "manager": manager,
        "installed": installed,
        "folder": folder,
    }


# ------------------------------------------------------------------------------------------- install and use
def test_install_pins_the_commit_and_runs_no_extension_code(world):
    res, inst = world["installed"]["result"], world["installed"]
    assert res.name == "midshift" and res.ref == "v1.0" and res.version == "1.0.0"
    assert res.commit == world["first"] == inst["head"]
    assert res.url.startswith("file://")
    assert [r.spec for r in res.requirements] == ["numpy>=1.20"] and res.requirements[0].met and not res.pip_ran
    assert inst["markers_after_install"] == []  # neither install.py nor the module ran at install time
    state = json.loads((world["data"] / "extensions.json").read_text())
    assert state["installed"]["midshift"]["commit"] == world["first"]
    rec = world["manager"].get("midshift")
    assert rec.status == "loaded", rec.message
    assert (world["folder"] / "imported.marker").is_file()  # loading (not installing) imported it
    assert not (world["folder"] / "install_ran.marker").exists()
    info = {i["name"]: i for i in world["manager"].info()}["midshift"]
    assert info["commit"] == world["first"] and info["provides"]["conditioning"] == ["midshift"]


def test_conditioning_type_changes_the_output_through_the_engine(world):
    engine = world["engine"]
    base = engine.generate(req()).images[0]
    named = engine.generate(req(alwayson_scripts={"midshift": {"args": [{"strength": 2.0}]}})).images[0]
    assert np.abs(arr(named) - arr(base)).mean() > 2.0
    # the same parameters as positional args (field order: enabled, weight, start, end, strength), as a dict of
    # named args, and case-insensitively by name; weight multiplies the residuals
    positional = engine.generate(req(alwayson_scripts={"MidShift": {"args": [True, 1.0, 0.0, 1.0, 2.0]}})).images[0]
    as_dict = engine.generate(req(alwayson_scripts={"midshift": {"strength": 2.0}})).images[0]
    weighted = engine.generate(req(alwayson_scripts={"midshift": {"args": [{"strength": 4.0, "weight": 0.5}]}}))
    for other in (positional, as_dict, weighted.images[0]):
        assert np.array_equal(arr(other), arr(named))
    # a guidance window that never opens, and a disabled unit, leave the image alone
    never = engine.generate(req(alwayson_scripts={"midshift": {"args": [{"strength": 2.0, "guidance_start": 0.9}]}}))
    assert np.array_equal(arr(never.images[0]), arr(base))
    with pytest.raises(RequestError) as e:
        engine.generate(req(alwayson_scripts={"midshift": {"args": [{"strength": 50}]}}))
    assert e.value.field == "alwayson_scripts.midshift.args[0].strength"
    # unknown script names are ignored (A1111 clients send built-in scripts' args too)
    same = engine.generate(req(alwayson_scripts={"Refiner": {"args": [False]}})).images[0]
    assert np.array_equal(arr(same), arr(base))


def test_everything_else_an_extension_registers(world):
    engine, manager = world["engine"], world["manager"]
    assert "Test Euler 1.0.0" in engine.samplers.names()
    out = engine.generate(req(sampler_name="Test Euler 1.0.0", steps=2)).images[0]
    assert out.size == (SIZE, SIZE)
    assert manager.preprocessors["posterize"](Image.new("RGB", (8, 8), (10, 200, 30))).size == (8, 8)
    # the engine has an upscaler registry: load_extensions registers extension upscalers in it at once
    assert "Test nearest x2" in [u["name"] for u in engine.upscalers.infos()]
    assert manager.pending_upscalers == []
    from ldm_core.upscalers import UpscalerRegistry

    ups = UpscalerRegistry([], builtin=None)
    manager.attach_upscalers(ups)
    assert "Test nearest x2" in [u["name"] for u in ups.infos()]
    r = req(alwayson_scripts={"grayscale": {"args": [{}]}, "midshift": {"args": [{"strength": 1.5}, {"strength": -1}]}})
    colour = Image.new("RGB", (4, 4), (200, 20, 20))
    (gray,) = manager.postprocess(r, [colour], engine=engine, model=engine.load_checkpoint("tiny-sd1"))
    assert gray.getpixel((0, 0))[0] == gray.getpixel((0, 0))[1] == gray.getpixel((0, 0))[2]
    params = manager.infotext_params(r)
    assert params == {"Mid shift": "1.5;-1"}
    # the engine asks the extensions for their infotext parameters and writes them into every image's infotext
    text = engine.generate(req(alwayson_scripts={"midshift": {"args": [{"strength": 2}]}})).infotexts[0]
    assert "Mid shift: 2" in text
    # and runs their post-processors on every image it returns
    gray_out = np.asarray(engine.generate(req(alwayson_scripts={"grayscale": {"args": [{}]}})).images[0])
    plain = np.asarray(engine.generate(req()).images[0])
    assert (gray_out[..., 0] == gray_out[..., 1]).all() and (gray_out[..., 1] == gray_out[..., 2]).all()
    assert not (plain[..., 0] == plain[..., 1]).all()
    assert manager.args_from_infotext({"Steps": "3", **params}) == {
        "midshift": {"args": [{"strength": 1.5}, {"strength": -1.0}]}
    }
    (sec,) = [s for s in manager.ui_sections("txt2img") if s.name == "midshift"]
    assert [f.name for f in sec.fields] == ["enabled", "weight", "guidance_start", "guidance_end", "strength"]
    assert [f.kind for f in sec.fields] == ["checkbox", "slider", "slider", "slider", "slider"]
    assert sec.args_from_values([True, 1.0, 0.0, 1.0, 3.0, False, 1.0, 0.0, 1.0, 0.0]) == {
        "args": [
            {"enabled": True, "weight": 1.0, "guidance_start": 0.0, "guidance_end": 1.0, "strength": 3.0},
            {"enabled": False, "weight": 1.0, "guidance_start": 0.0, "guidance_end": 1.0, "strength": 0.0},
        ]
    }


def test_conditioning_type_through_the_http_api(world):
    import fastapi
    from fastapi.testclient import TestClient

    from api import install
    from api.extensions_api import install_extension_routes
    from ldm_core.service import Service

    service = Service(world["cfg"], engine=world["engine"])
    app = fastapi.FastAPI()
    install(app, service)
    install_extension_routes(app, service, world["manager"])
    body = {
        "prompt": "a red circle",
        "steps": 3,
        "width": SIZE,
        "height": SIZE,
        "seed": 5,
        "sampler_name": "Euler a",
        "override_settings": {"sd_model_checkpoint": "tiny-sd1"},
    }
    try:
        with TestClient(app) as client:
            plain = client.post("/sdapi/v1/txt2img", json=body)
            shifted = client.post(
                "/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"midshift": {"args": [{"strength": 2.0}]}}}
            )
            bad = client.post(
                "/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"midshift": {"args": [{"strength": "lots"}]}}}
            )
            listed = client.get("/sdapi/v1/extensions").json()
            native = client.get("/api/v1/extensions").json()
    finally:
        service.shutdown()
    assert plain.status_code == 200 and shifted.status_code == 200, (plain.text[:300], shifted.text[:300])

    def image(r):
        return Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")

    assert np.abs(arr(image(plain)) - arr(image(shifted))).mean() > 2.0
    direct = world["engine"].generate(req(alwayson_scripts={"midshift": {"args": [{"strength": 2.0}]}})).images[0]
    assert np.array_equal(arr(image(shifted)), arr(direct))
    assert bad.status_code == 422 and "strength" in json.dumps(bad.json())
    item = next(x for x in listed if x["name"] == "midshift")
    assert item["commit_hash"] == world["first"] and item["enabled"] is True and item["version"] == "1.0.0"
    assert native["changes_allowed"] is True


# ------------------------------------------------------------------------------------------- updates, removal
def test_check_update_and_remove(world, tmp_path):
    manager = world["manager"]
    (info,) = manager.check_updates("midshift")
    assert not info.has_update and info.latest == world["first"]  # pinned to the tag v1.0
    up = manager.update("midshift", ref="main")  # follow the branch from now on
    assert (up.current, up.latest) == (world["first"], world["second"])
    assert git("rev-parse", "HEAD", cwd=world["folder"]) == world["second"]
    third = make_repo(world["repo"], version="1.2.0")
    (info,) = manager.check_updates("midshift")
    assert info.has_update and info.latest == third and info.behind == 1
    with pytest.raises(ExtensionError, match="already installed"):
        manager.install(f"file://{world['repo']}")
    # a new version this build cannot run is refused, the pinned commit is kept
    make_repo(world["repo"], version="2.0.0", api="9.0")
    with pytest.raises(ExtensionError, match="needs extension API 9.0"):
        manager.update("midshift")
    assert git("rev-parse", "HEAD", cwd=world["folder"]) == world["second"]
    state = json.loads((world["data"] / "extensions.json").read_text())
    assert state["installed"]["midshift"]["commit"] == world["second"]
    assert state["installed"]["midshift"]["ref"] == "main"
    removed = manager.remove("midshift")
    assert (
        not removed.exists()
        and "midshift" not in json.loads((world["data"] / "extensions.json").read_text())["installed"]
    )


# ------------------------------------------------------------------------------------------- isolation
def test_broken_and_incompatible_extensions_are_isolated(tmp_path, tiny_models):
    root = tmp_path / "extensions"
    good = 'name = "good"\nversion = "1.0.0"\napi_version = "1.0"\n'
    write_ext(
        root,
        "good",
        good,
        """\
        from ldm_core.extension_api import ConditioningType, UnitParams
        def register(ctx):
            ctx.add_conditioning(ConditioningType("goodcond", UnitParams, lambda job, unit, i: None))
        """,
    )
    write_ext(root, "broken", good.replace("good", "broken"), "raise RuntimeError('boom at import')\n")
    write_ext(root, "syntax", good.replace("good", "syntax"), "def register(ctx) pass\n")
    write_ext(root, "noreg", good.replace("good", "noreg"), "X = 1\n")
    write_ext(root, "exits", good.replace("good", "exits"), "import sys\nsys.exit(3)\n")
    write_ext(root, "future", good.replace("good", "future").replace('api_version = "1.0"', 'api_version = "2.0"'))
    write_ext(root, "needy", good.replace("good", "needy") + 'requirements = ["surely-not-installed-pkg-xyz>=1"]\n')
    write_ext(root, "a1111-style", "", "print('patch the unet')\n")
    write_ext(root, "zy-dupe", good)  # a second extension named "good" (found after the first)
    write_ext(
        root,
        "raises-in-register",
        good.replace("good", "regfail"),
        "def register(ctx):\n    raise ValueError('bad model folder')\n",
    )
    write_ext(
        root,
        "zz-clash",
        good.replace("good", "clash"),
        """\
        from ldm_core.extension_api import ConditioningType, UnitParams
        def register(ctx):
            ctx.add_conditioning(ConditioningType("GoodCond", UnitParams, lambda job, unit, i: None))
        """,
    )
    m = ExtensionManager([root], state_file=tmp_path / "extensions.json")
    m.load(None)
    status = {k: (r.status, r.message) for k, r in m.records.items()}
    assert status["good"][0] == "loaded"
    assert status["broken"] == ("failed", "RuntimeError: boom at import")
    assert status["syntax"][0] == "failed" and "SyntaxError" in status["syntax"][1]
    assert status["noreg"][0] == "failed" and "register(ctx)" in status["noreg"][1]
    assert status["exits"][0] == "failed" and "SystemExit" in status["exits"][1]
    assert status["future"][0] == "incompatible"
    assert "needs extension API 2.0" in status["future"][1] and API_VERSION in status["future"][1]
    assert status["needy"][0] == "missing-requirements" and "surely-not-installed-pkg-xyz" in status["needy"][1]
    assert status["regfail"] == ("failed", "ValueError: bad model folder")
    assert status["clash"][0] == "failed" and "already registered" in status["clash"][1]
    a1111 = next(v for k, v in status.items() if k.startswith("a1111-style"))
    assert a1111[0] == "failed" and "no extension.toml" in a1111[1]
    dupe = next(v for k, v in status.items() if k.startswith("good ("))
    assert dupe[0] == "failed" and "another extension named 'good'" in dupe[1]
    import sys

    assert not any(k.startswith("ldm_ext_broken") for k in sys.modules)
    assert "goodcond" in m.conditioning_types()
    # the broken one's arguments are refused with its status, not silently ignored
    r = GenerationRequest.build(prompt="x", alwayson_scripts={"broken": {"args": []}})
    with pytest.raises(RequestError, match="broken is failed"):
        m.validate_request(r)


def test_enable_disable_persist_and_disable_all(world, tmp_path):
    root = tmp_path / "extensions"
    write_ext(
        root,
        "toggle",
        'name = "toggle"\nversion = "0.1.0"\napi_version = "1"\n',
        """\
        from ldm_core.extension_api import ConditioningType, UnitParams
        def register(ctx):
            ctx.add_conditioning(ConditioningType("toggle", UnitParams, lambda job, unit, i: None))
        """,
    )
    state = tmp_path / "extensions.json"
    m = ExtensionManager([root], state_file=state)
    m.load(None)
    r = GenerationRequest.build(prompt="x", alwayson_scripts={"toggle": {"args": [{}]}})
    m.validate_request(r)
    m.set_enabled("toggle", False)  # takes effect at once for conditioning types
    with pytest.raises(RequestError, match="toggle is disabled"):
        m.validate_request(r)
    assert json.loads(state.read_text())["disabled"] == ["toggle"]
    m2 = ExtensionManager([root], state_file=state)
    m2.load(None)
    assert m2.get("toggle").status == "disabled"
    with pytest.raises(RequestError, match="toggle is disabled"):
        m2.validate_request(r)
    m2.set_enabled("toggle", True)
    assert m2.get("toggle").status == "restart-needed"
    m3 = ExtensionManager([root], state_file=state, disable_all=True)
    m3.load(None)
    assert m3.get("toggle").status == "all-disabled" and "--disable-all-extensions" in m3.get("toggle").message


# ------------------------------------------------------------------------------------------- policy, CLI
@pytest.mark.parametrize(
    "policy", [ExtensionPolicy(listen=True), ExtensionPolicy(share=True), ExtensionPolicy(server_name="0.0.0.0")]
)
def test_install_refused_when_listening_publicly(world, tmp_path, policy):
    m = ExtensionManager([tmp_path / "extensions"], state_file=tmp_path / "s.json", policy=policy)
    with pytest.raises(ExtensionAccessError, match="--enable-insecure-extension-access"):
        m.install(f"file://{world['repo']}")
    assert not (tmp_path / "extensions").exists()
    with pytest.raises(ExtensionAccessError):
        m.remove("anything")
    assert not ExtensionPolicy(server_name="127.0.0.1").exposure()


def test_cli_install_list_and_refusal(world, tmp_path, capsys):
    data = tmp_path / "d"
    url = f"file://{world['repo']}@{world['first']}"
    assert cli_main(["--data-dir", str(data), "--listen", "install", url]) == 1
    assert "refused" in capsys.readouterr().err and not (data / "extensions" / "midshift").exists()
    assert cli_main(["--data-dir", str(data), "--listen", "--enable-insecure-extension-access", "install", url]) == 0
    out = capsys.readouterr().out
    assert f"pinned commit: {world['first']}" in out and "numpy>=1.20" in out
    assert not list((data / "extensions" / "midshift").glob("*.marker"))
    assert cli_main(["--data-dir", str(data), "list"]) == 0
    out = capsys.readouterr().out
    assert "midshift" in out and world["first"][:12] in out
    assert cli_main(["--data-dir", str(data), "disable", "midshift"]) == 0
    assert json.loads((data / "extensions.json").read_text())["disabled"] == ["midshift"]
    assert cli_main(["--data-dir", str(data), "install", "ext::sh -c evil"]) == 1
    assert "unsupported repository URL" in capsys.readouterr().err


def test_api_install_is_refused_when_public(world):
    import fastapi
    from fastapi.testclient import TestClient

    from api.extensions_api import install_extension_routes

    m = ExtensionManager(
        [world["root"] / "none"], state_file=world["root"] / "none.json", policy=ExtensionPolicy(listen=True)
    )
    app = fastapi.FastAPI()
    install_extension_routes(app, None, m)
    with TestClient(app) as client:
        r = client.post("/api/v1/extensions/install", json={"url": f"file://{world['repo']}"})
        listed = client.get("/api/v1/extensions").json()
    assert r.status_code == 403 and "--enable-insecure-extension-access" in r.json()["detail"]
    assert listed["changes_allowed"] is False and "--listen" in listed["exposure"]


# ------------------------------------------------------------------------------------------- small parts
def test_sources_urls_versions_requirements():
    assert split_source("https://github.com/u/r@v1.2") == ("https://github.com/u/r", "v1.2")
    assert split_source("https://github.com/u/r") == ("https://github.com/u/r", None)
    assert split_source("git@github.com:u/r.git") == ("git@github.com:u/r.git", None)
    assert split_source("git@github.com:u/r.git@main") == ("git@github.com:u/r.git", "main")
    assert split_source("https://user@host/repo") == ("https://user@host/repo", None)
    assert split_source("file:///tmp/repo@0123abc") == ("file:///tmp/repo", "0123abc")
    for bad in ("ext::sh -c touch /tmp/x", "-uhelp", "fd::17", "", "C:relative"):
        with pytest.raises(ValueError):
            check_git_url(bad)
    check_git_url("https://github.com/u/r")
    check_git_url("git@github.com:u/r.git")
    assert api_compatible("1.0") and api_compatible("^1.0.0") and api_compatible(">=1,<3")
    assert not api_compatible("2.0") and not api_compatible("1.1") and not api_compatible("0.9")
    assert check_requirement("packaging>=1").met
    assert not check_requirement("surely-not-installed-pkg-xyz").met
    assert check_requirement("surely-not-installed-pkg-xyz | packaging").met
    assert not check_requirement("packaging>=999").met
    assert pip_arguments(["numpy>=1", "a | b"]) == ["numpy>=1", "a"]
    for bad in ("pkg @ https://evil.invalid/x.whl", "-e .", "--index-url=https://x"):
        with pytest.raises(ValueError):
            pip_arguments([bad])


def test_available_index(world, tmp_path):
    index = tmp_path / "index.json"
    index.write_text(
        json.dumps(
            {
                "format": 1,
                "extensions": [
                    {
                        "name": "midshift",
                        "url": "https://example.invalid/midshift",
                        "description": "mid",
                        "api_version": "1.0",
                    },
                    {
                        "name": "other",
                        "url": "https://example.invalid/other",
                        "ref": "v2",
                        "api_version": "3.0",
                        "tags": ["x"],
                    },
                ],
            }
        )
    )
    items = {e["name"]: e for e in world["manager"].available(index)}
    assert items["other"]["installed"] is False and items["other"]["compatible"] is False
    assert items["other"]["ref"] == "v2" and items["midshift"]["compatible"] is True
    assert items["other"]["source"] == "https://example.invalid/other@v2"
    index.write_text(json.dumps({"format": 1, "extensions": [{"name": "Bad Name!", "url": "x"}]}))
    with pytest.raises(ValueError, match="invalid name"):
        world["manager"].available(index)
    index.write_text("[]")
    with pytest.raises(ValueError, match="format"):
        world["manager"].available(index)


def test_parse_units_shapes():
    from ldm_core.extension_api import UnitParams

    assert parse_units(UnitParams, None, name="x") == []
    assert parse_units(UnitParams, {"args": []}, name="x") == []
    (u,) = parse_units(UnitParams, {"args": [False, 0.5]}, name="x")
    assert (u.enabled, u.weight) == (False, 0.5)
    with pytest.raises(RequestError, match="guidance_end must not be smaller"):
        parse_units(UnitParams, {"guidance_start": 0.8, "guidance_end": 0.2}, name="x")
    with pytest.raises(RequestError, match="positional values"):
        parse_units(UnitParams, {"args": [True, 1, 0, 1, 5, 6]}, name="x")
