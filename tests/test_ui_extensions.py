"""The Extensions tab and the extension sections of the generation tabs, without a browser: the tab's handlers
run against a real ExtensionManager and a local git repository (installed through the real path from a file://
URL, pinned, listed, toggled, updated, removed, refused when the server is public), and the accordions built
from `UISection`s put the same `alwayson_scripts` into the request that an API client would send (the built-in
ControlNet extension's accordion included)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image
from ui_fixtures import fake_context

from ldm_core.extension_api import UIField, UISection
from ldm_core.extensions import REPO_EXTENSIONS_DIR, ExtensionManager, ExtensionPolicy, load_extensions
from ui import extension_sections as xs
from ui import extensions as tab

MANIFEST = """\
name = "uitest"
version = "{version}"
api_version = "1.0"
description = "A test extension for the Extensions tab."
requirements = ["packaging>=1"]
"""

ENTRY = """\
from typing import Literal

from pydantic import Field

from ldm_core.extension_api import ConditioningType, UnitParams


class Params(UnitParams):
    strength: float = Field(1.0, ge=0.0, le=2.0)
    flavour: Literal["plain", "spicy"] = "plain"


def register(ctx):
    ctx.add_conditioning(ConditioningType(name="uitest", title="UI test", params=Params,
                                          prepare=lambda job, unit, i: None, max_units=2))
"""


def git(*args: str, cwd: Path) -> str:
    cmd = ["git", "-c", "user.name=T", "-c", "user.email=t@example.invalid", "-c", "init.defaultBranch=main", *args]
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def commit_version(repo: Path, version: str) -> str:
    repo.mkdir(parents=True, exist_ok=True)
    if not (repo / ".git").exists():
        git("init", "-q", cwd=repo)
    (repo / "extension.toml").write_text(MANIFEST.format(version=version))
    (repo / "main.py").write_text(ENTRY)
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", version, cwd=repo)
    return git("rev-parse", "HEAD", cwd=repo)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git repository of the extension: v1.0.0 tagged v1.0, then v1.1.0 on main."""
    path = tmp_path_factory.mktemp("src") / "uitest"
    first = commit_version(path, "1.0.0")
    git("tag", "v1.0", cwd=path)
    second = commit_version(path, "1.1.0")
    return {"path": path, "url": f"file://{path}", "first": first, "second": second}


def manager_in(data: Path, policy: ExtensionPolicy | None = None) -> ExtensionManager:
    m = ExtensionManager(
        [data / "extensions"], install_dir=data / "extensions", state_file=data / "extensions.json", policy=policy
    )
    m.load(None)
    return m


LOCAL = ExtensionPolicy()
PUBLIC = ExtensionPolicy(listen=True)


# ---- the tab's handlers -----------------------------------------------------------------------------------
def test_install_from_url_pins_the_commit_and_the_table_lists_it(tmp_path, repo):
    m = manager_in(tmp_path)
    msg = tab.install_extension(m, LOCAL, repo["url"], "v1.0", install_requirements=False)
    assert f"Pinned commit: {repo['first']}" in msg, msg
    assert "packaging>=1 (installed)" in msg and "Restart" in msg
    folder = tmp_path / "extensions" / "uitest"
    assert git("rev-parse", "HEAD", cwd=folder) == repo["first"]
    state = json.loads((tmp_path / "extensions.json").read_text())
    assert state["installed"]["uitest"]["commit"] == repo["first"] and state["installed"]["uitest"]["ref"] == "v1.0"
    (row,) = tab.installed_rows(m)
    assert row["status"].startswith("restart-needed")  # installed now, loaded at the next start
    # "restart": a new manager loads it
    m2 = manager_in(tmp_path)
    (row,) = tab.installed_rows(m2)
    assert (row["name"], row["version"], row["commit"], row["enabled"]) == ("uitest", "1.0.0", repo["first"][:12], True)
    assert row["status"] == "loaded" and row["source"] == f"{repo['url']} @ v1.0"
    page = tab.installed_html(m2)
    assert "uitest" in page and repo["first"][:12] in page and "loaded" in page
    # installing it again is refused with a message, not an exception
    again = tab.install_extension(m2, LOCAL, f"{repo['url']}@v1.0")
    assert again.startswith("Error:") and "already installed" in again
    assert tab.install_extension(m2, LOCAL, "ext::sh -c 'touch /tmp/x'").startswith("Error: unsupported repository")
    assert tab.install_extension(m2, LOCAL, "  ").startswith("Enter a git URL")


def test_failed_extension_shows_its_message(tmp_path):
    bad = tmp_path / "extensions" / "broken"
    bad.mkdir(parents=True)
    (bad / "extension.toml").write_text('name = "broken"\nversion = "1.0.0"\napi_version = "1.0"\n')
    (bad / "main.py").write_text("raise RuntimeError('boom at import')\n")
    (row,) = tab.installed_rows(manager_in(tmp_path))
    assert row["status"] == "failed: RuntimeError: boom at import"


def test_enable_disable_persists(tmp_path, repo):
    m = manager_in(tmp_path)
    tab.install_extension(m, LOCAL, repo["url"])
    m = manager_in(tmp_path)
    assert tab.toggle_names(m) == ["uitest"] and tab.enabled_names(m) == ["uitest"]
    assert [s.name for s in m.ui_sections("txt2img")] == ["uitest"]
    msg = tab.apply_enabled(m, [])
    assert "Disabled uitest" in msg and "stop now" in msg
    assert json.loads((tmp_path / "extensions.json").read_text())["disabled"] == ["uitest"]
    assert m.ui_sections("txt2img") == [] and tab.enabled_names(m) == []
    assert tab.apply_enabled(m, []) == "Nothing changed."
    m2 = manager_in(tmp_path)
    (row,) = tab.installed_rows(m2)
    assert row["enabled"] is False and row["status"].startswith("disabled")
    msg = tab.apply_enabled(m2, ["uitest"])
    assert "Enabled uitest" in msg and "restart" in msg
    assert json.loads((tmp_path / "extensions.json").read_text())["disabled"] == []
    assert manager_in(tmp_path).get("uitest").status == "loaded"


def test_check_update_and_remove(tmp_path, repo):
    m = manager_in(tmp_path)
    tab.install_extension(m, LOCAL, repo["url"], "v1.0")
    m = manager_in(tmp_path)
    assert tab.check_updates(m, "uitest") == f"uitest: up to date at {repo['first'][:12]} (v1.0)"
    msg = tab.update_extension(m, LOCAL, "uitest", "main")
    assert msg.startswith("Updated uitest") and repo["second"] in msg
    assert git("rev-parse", "HEAD", cwd=tmp_path / "extensions" / "uitest") == repo["second"]
    assert "already at the newest commit" in tab.update_extension(m, LOCAL, "uitest", "")
    assert tab.update_extension(m, LOCAL, "nope").startswith("Error: no extension named 'nope'")
    assert tab.update_extension(m, LOCAL, "uitest", "no-such-ref").startswith("Error:")
    assert tab.remove_extension(m, LOCAL, "").startswith("Choose")
    msg = tab.remove_extension(m, LOCAL, "uitest")
    assert msg.startswith("Removed uitest") and not (tmp_path / "extensions" / "uitest").exists()
    assert (
        tab.installed_rows(m) == []
        and "uitest" not in json.loads((tmp_path / "extensions.json").read_text())["installed"]
    )
    assert tab.check_updates(m).startswith("No extension was installed from git")


def test_changes_refused_when_public(tmp_path, repo):
    m = manager_in(tmp_path)  # the manager itself would allow it: the handlers must refuse on their own
    for msg in (
        tab.install_extension(m, PUBLIC, repo["url"], "v1.0", True),
        tab.install_available(m, PUBLIC, [{"name": "uitest", "url": repo["url"], "source": repo["url"]}], "uitest"),
    ):
        assert msg.startswith("Refused:") and "--enable-insecure-extension-access" in msg, msg
    assert not (tmp_path / "extensions" / "uitest").exists()
    tab.install_extension(m, LOCAL, repo["url"], "v1.0")
    for msg in (
        tab.update_extension(m, PUBLIC, "uitest", "main"),
        tab.remove_extension(m, PUBLIC, "uitest"),
        tab.install_requirements(m, PUBLIC, "uitest", True),
    ):
        assert msg.startswith("Refused:") and "--listen" in msg, msg
    assert git("rev-parse", "HEAD", cwd=tmp_path / "extensions" / "uitest") == repo["first"]
    # the policy the tab uses: the stricter of the manager's and the launch flags'
    assert not tab.effective_policy(m, {"listen": True}).changes_allowed
    assert not tab.effective_policy(manager_in(tmp_path, PUBLIC), {}).changes_allowed
    insecure = manager_in(tmp_path, ExtensionPolicy(share=True, allow_insecure=True))
    assert tab.effective_policy(insecure, {}).changes_allowed
    assert tab.effective_policy(m, {}).changes_allowed and tab.locked_note(LOCAL) == ""
    assert "--share" in tab.locked_note(tab.effective_policy(m, {"share": True}))


def test_built_tab_disables_buttons_and_its_handlers_refuse_when_public(tmp_path, repo):
    ctx = fake_context(tmp_path)
    try:
        ctx.service.extensions = manager_in(tmp_path, PUBLIC)
        with gr.Blocks() as blocks:
            parts = tab.build(ctx)
        for key in ("install", "update", "remove", "available_install", "requirements"):
            assert parts[key].interactive is False, key
        assert parts["apply"].interactive is not False and parts["check"].interactive is not False
        note = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "extensions_note")
        assert "--enable-insecure-extension-access" in note.value
        # a crafted request to the install event still goes through the handler, which refuses
        fn = next(f for f in blocks.fns.values() if any(t[0] == parts["install"]._id for t in f.targets))
        out = fn.fn(repo["url"], "", False)
        assert out[0].startswith("Refused:") and not (tmp_path / "extensions" / "uitest").exists()
    finally:
        ctx.service.shutdown()


def test_available_index_lists_and_installs(tmp_path, repo):
    m = manager_in(tmp_path)
    index = tmp_path / "index.json"
    entry = {"name": "uitest", "url": repo["url"], "ref": "v1.0", "description": "for <tests>"}
    index.write_text(json.dumps({"format": 1, "extensions": [entry]}))
    page, entries = tab.load_available(m, str(index))
    assert [e["name"] for e in entries] == ["uitest"] and entries[0]["installed"] is False
    assert "for &lt;tests&gt;" in page and f"{repo['url']}@v1.0" in page and "<td>no</td>" in page
    msg = tab.install_available(m, LOCAL, entries, "uitest", False)
    assert f"Pinned commit: {repo['first']}" in msg, msg
    page, entries = tab.load_available(m, str(index))
    assert entries[0]["installed"] is True and f"yes ({repo['first'][:12]})" in page
    assert "already installed" in tab.install_available(m, LOCAL, entries, "uitest")
    assert tab.install_available(m, LOCAL, entries, "other").startswith("Load an index")
    page, entries = tab.load_available(m, str(tmp_path / "missing.json"))
    assert entries == [] and "Error:" in page
    assert tab.load_available(m, "")[1] == []


def test_tab_without_a_manager_says_so(tmp_path):
    ctx = fake_context(tmp_path)
    try:
        with gr.Blocks() as blocks:
            parts = tab.build(ctx)
        assert parts["manager"] is None
        texts = [getattr(b, "value", "") for b in blocks.blocks.values() if isinstance(b, gr.HTML)]
        assert any("extension manager is not running" in str(t) for t in texts)
        assert tab.apply_enabled(None, []).startswith("Extensions are not available")
    finally:
        ctx.service.shutdown()


# ---- extension sections in the generation tabs -----------------------------------------------------------
SECTION = UISection(
    "allkinds",
    "All kinds",
    (
        UIField("enabled", "checkbox", default=False),
        UIField("weight", "slider", default=1.0, minimum=0.0, maximum=2.0, step=0.05),
        UIField("count", "number", default=3),
        UIField("note", "text", default="hi"),
        UIField("long", "textarea", default=""),
        UIField("choice", "dropdown", default="b", choices=("a", "b")),
        UIField("live", "dropdown", default="None", choices=lambda: ["None", "m1"]),
        UIField("mode", "radio", default="x", choices=("x", "y")),
        UIField("image", "image"),
    ),
    units=2,
    open=True,
)


def test_section_builds_components_and_sends_args_from_values():
    with gr.Blocks() as blocks:
        bound = xs.build_section(SECTION, "txt2img")
    kinds = [type(c).__name__ for c in bound.components]
    assert kinds == ["Checkbox", "Slider", "Number", "Textbox", "Textbox", "Dropdown", "Dropdown", "Radio", "Image"] * 2
    acc = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "txt2img_ext_allkinds")
    assert isinstance(acc, gr.Accordion) and acc.label == "All kinds" and acc.open is True
    tabs = [b.label for b in blocks.blocks.values() if isinstance(b, gr.Tab)]
    assert tabs == ["Unit 0", "Unit 1"]
    assert bound.components[5].value == "b" and bound.components[6].choices == [("None", "None"), ("m1", "m1")]
    assert bound.refresh is not None
    pixels = np.zeros((8, 6, 3), dtype=np.uint8)
    pixels[2, 3] = (255, 0, 0)
    unit0 = [True, 0.5, 4, "t", "long text", "a", "m1", "y", pixels]
    unit1 = [False, 1.0, 3, "hi", "", "b", "None", "x", None]
    data = dict(zip(bound.components, unit0 + unit1, strict=True))
    data["unrelated"] = 1
    scripts = xs.alwayson_scripts([bound], data)
    expected = SECTION.args_from_values([*unit0[:-1], Image.fromarray(pixels), *unit1])
    assert scripts == {"allkinds": expected}
    image = scripts["allkinds"]["args"][0]["image"]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.getpixel((3, 2)) == (255, 0, 0)
    assert scripts["allkinds"]["args"][1] == {**dict(zip([f.name for f in SECTION.fields], unit1, strict=True))}
    # nothing enabled: nothing sent; an extension disabled since the page was built: nothing sent
    data[bound.components[0]] = False
    assert xs.alwayson_scripts([bound], data) == {}
    data[bound.components[0]] = True
    assert xs.alwayson_scripts([bound], data, active={"other"}) == {}
    assert "allkinds" in xs.alwayson_scripts([bound], data, active={"allkinds"})
    # infotext read back (names match case-insensitively): unit 0 as read, fields it does not name and unit 1
    # back to defaults (off); images keep what they show; a section not named is left alone
    comps = bound.components
    ups = xs.section_updates([bound], {"AllKinds": {"args": [{"enabled": True, "weight": 0.25, "choice": "a"}]}})
    assert (ups[comps[0]], ups[comps[1]], ups[comps[5]], ups[comps[3]]) == (True, 0.25, "a", "hi")
    assert ups[comps[9]] is False and comps[8] not in ups and comps[17] not in ups
    assert xs.section_updates([bound], {"other": {"args": []}}) == {}
    assert xs.restorable_components([bound]) == [c for c in comps if c not in (comps[8], comps[17])]
    # gradio's other image values
    assert xs.image_value({"background": Image.new("RGBA", (4, 4)), "composite": None}).mode == "RGB"
    assert xs.image_value(np.ones((2, 2, 3), dtype=np.float32)).getpixel((0, 0)) == (255, 255, 255)
    assert xs.image_value(None) is None


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory):
    data = tmp_path_factory.mktemp("cn")
    m = load_extensions(None, [REPO_EXTENSIONS_DIR, data / "extensions"], state_file=data / "extensions.json")
    assert m.get("controlnet").status == "loaded", m.get("controlnet").message
    return m


def test_full_app_shows_the_controlnet_accordion_and_sends_its_args(tmp_path, controlnet):
    from ui.app import create_ui

    ctx = fake_context(tmp_path)
    ctx.service.extensions = controlnet
    try:
        web = create_ui(ctx)
        ids = {getattr(b, "elem_id", None): b for b in web.blocks.blocks.values()}
        for mode in ("txt2img", "img2img", "inpaint"):
            acc = ids.get(f"{mode}_ext_controlnet")
            assert isinstance(acc, gr.Accordion) and acc.label == "ControlNet", mode
        assert {"txt2img_ext_controlnet_0_model", "txt2img_ext_controlnet_2_control_mode"} <= set(ids)
        t2i = web.tabs["txt2img"]
        (bound,) = t2i.extensions
        assert bound.section.name == "controlnet" and bound.section.units == 3
        assert len(bound.components) == 3 * len(bound.section.fields)
        fn = next(f for f in web.blocks.fns.values() if f.api_name == "txt2img_generate")
        assert set(bound.components) <= set(fn.inputs)
        data = {c: c.value for c in fn.inputs if hasattr(c, "value")}
        data.update({t2i.fields["prompt"]: "a fox", t2i.fields["steps"]: 2, t2i.fields["width"]: 64})
        data.update({t2i.fields["height"]: 64, t2i.fields["seed"]: 3, web.tabs["top"].checkpoint: "tiny-a.safetensors"})
        edges = Image.new("RGB", (64, 64))
        names = [f.name for f in bound.fields]
        data[bound.components[names.index("enabled")]] = True
        data[bound.components[names.index("image")]] = edges
        data[bound.components[names.index("module")]] = "canny"
        outs = list(fn.fn(data))
        assert 'data-state="done"' in outs[-1][t2i.results.progress]
        sent = ctx.engine.requests[-1].alwayson_scripts
        values = [xs.ui_value(f, data[c]) for f, c in zip(bound.fields, bound.components, strict=True)]
        assert sent == {"controlnet": bound.section.args_from_values(values)}
        assert sent["controlnet"]["args"][0]["module"] == "canny" and sent["controlnet"]["args"][1]["enabled"] is False
        # a value the extension refuses is a readable error before anything is queued
        data[bound.components[names.index("weight")]] = 5.0
        n = len(ctx.engine.requests)
        with pytest.raises(gr.Error, match="alwayson_scripts.controlnet"):
            list(fn.fn(data))
        assert len(ctx.engine.requests) == n
        # pasting infotext with a ControlNet unit fills that unit's fields back in (and the form's fields)
        cn1 = (
            "Module: canny, Model: None, Weight: 0.5, Resize Mode: Just Resize, Processor Res: 512, Threshold A: 100, "
            "Threshold B: 200, Guidance Start: 0, Guidance End: 0.8, Pixel Perfect: False, Control Mode: Balanced"
        )
        text = f'a fox\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 3, Size: 64x64, ControlNet 1: "{cn1}"'
        paste = next(f for f in web.blocks.fns.values() if any(t[0] == t2i.fields["_paste"]._id for t in f.targets))
        out = paste.fn(text, None, None)
        assert set(out) <= set(paste.outputs) and out[t2i.fields["steps"]] == 2
        k = len(bound.section.fields)
        u1 = {f.name: out[bound.components[k + i]] for i, f in enumerate(bound.section.fields) if f.kind != "image"}
        assert (u1["enabled"], u1["weight"], u1["guidance_end"], u1["processor_res"]) == (True, 0.5, 0.8, 512)
        assert (u1["module"], u1["resize_mode"]) == ("canny", "Just Resize")
        assert out[bound.components[names.index("enabled")]] is False  # unit 0 is not in the text
        assert bound.components[names.index("image")] not in out
        # PNG Info's "Send to txt2img" sets the same components
        button = ids["pnginfo_send_txt2img"]
        send = next(f for f in web.blocks.fns.values() if any(t[0] == button._id for t in f.targets))
        assert set(xs.restorable_components([bound])) <= set(send.outputs)
    finally:
        ctx.service.shutdown()
