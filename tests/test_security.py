"""Exposure (issue 16): each protection of `ldm_core.exposure` through the real launcher (`webui.prepare` +
`webui.create_app`, the code both `python webui.py` and `python -m api.server` run) with Starlette's
TestClient: cross-site posts refused, DNS-rebinding Host refused, an exposed server without a login refuses
the API, logins accepted, extension enable/disable gated, folder settings locked (API and Settings tab), no
wildcard CORS, one login parser, one launcher. No model is loaded: every request here is refused or answered
before a job would run."""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import webui
from ldm_core.exposure import ExposurePolicy, parse_auth, parse_auth_file

REPO = Path(__file__).resolve().parent.parent
LOCAL = "http://127.0.0.1:7860"


@contextmanager
def server(tmp_path: Path, *flags: str, ui: bool = False):
    """(client, launch) for `webui.py --data-dir tmp --nowebui <flags>` built in-process; the client talks to
    it as http://127.0.0.1:7860 (its Host header) unless a test sets another Host."""
    argv = ["--data-dir", str(tmp_path), "--no-builtin-model", "--device", "cpu", "--disable-all-extensions"]
    argv += [] if ui else ["--nowebui"]
    args = webui.build_parser().parse_args([*argv, *flags])
    launch = webui.prepare(args)
    try:
        app = webui.create_app(launch)
        with TestClient(app, base_url=LOCAL) as client:
            yield client, launch
    finally:
        launch.service.shutdown()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# ---- logins: one parser ---------------------------------------------------------------------------------
def test_parse_auth_flag_and_file_keep_odd_passwords(tmp_path):
    assert parse_auth("ann:pa ss w:rd, bob:x:y:z\ncid:ünï cödé") == [
        ("ann", "pa ss w:rd"),
        ("bob", "x:y:z"),
        ("cid", "ünï cödé"),
    ]
    assert webui.parse_auth("a:b, c:d:e\nf:g") == [("a", "b"), ("c", "d:e"), ("f", "g")]
    for bad in ("nopassword", ":pw", "user:", "ok:1,broken"):
        with pytest.raises(ValueError) as err:
            parse_auth(bad, flag="--api-auth")
        assert "--api-auth" in str(err.value)
    with pytest.raises(ValueError) as err:
        parse_auth("secret-user-without-colon-secretpw")
    assert "secretpw" not in str(err.value)  # a typo'd login is not printed whole
    f = tmp_path / "logins.txt"
    f.write_text("# admins\nann:with, comma and: colon\n\n  bob : spaced pass \ncid:x,dan:y\n", encoding="utf-8")
    pairs, warnings = parse_auth_file(f)
    assert pairs == [("ann", "with, comma and: colon"), ("bob", "spaced pass"), ("cid", "x,dan:y")]
    assert len(warnings) == 1 and "line 5" in warnings[0] and "own line" in warnings[0]


def test_a_password_with_spaces_commas_and_colons_logs_in(tmp_path):
    f = tmp_path / "api-logins.txt"
    f.write_text("eve:s p a c e, comma:colon\n", encoding="utf-8")
    with server(tmp_path, "--api-auth-path", str(f), "--api-auth", "bob:b c:d") as (client, _):
        assert client.get("/sdapi/v1/samplers").status_code == 401
        assert client.get("/sdapi/v1/samplers", headers=basic("eve", "s p a c e, comma:colon")).status_code == 200
        assert client.get("/sdapi/v1/samplers", headers=basic("bob", "b c:d")).status_code == 200
        assert client.get("/sdapi/v1/samplers", headers=basic("eve", "s p a c e")).status_code == 401


# ---- exposed without a login: the API is refused ---------------------------------------------------------
@pytest.mark.parametrize("flags", [("--listen",), ("--share",), ("--server-name", "192.168.7.7")])
def test_exposed_without_login_refuses_the_api(tmp_path, flags):
    with server(tmp_path, *flags) as (client, launch):
        for path in ("/sdapi/v1/options", "/sdapi/v1/samplers", "/api/v1/extensions", "/docs", "/openapi.json"):
            r = client.get(path)
            assert r.status_code == 403, (path, r.text)
            assert r.json()["error"] == "LoginRequired" and "--api-auth" in r.json()["detail"], path
            assert "--insecure-expose" in r.json()["detail"]
        r = client.post("/sdapi/v1/options", json={"samples_format": "jpg"})
        assert r.status_code == 403 and launch.settings.get("samples_format") == "png"
        r = client.post("/api/v1/extensions/controlnet/disable")
        assert r.status_code == 403
        assert any("--api-auth" in m for m in launch.policy.messages(ui=False))


def test_insecure_expose_opts_out_and_local_stays_open(tmp_path):
    with server(tmp_path, "--listen", "--insecure-expose") as (client, launch):
        assert client.get("/sdapi/v1/options").status_code == 200
        assert client.get("/openapi.json").status_code == 200
        assert any("--insecure-expose" in m for m in launch.policy.messages(ui=False))
    with server(tmp_path, "--gradio-auth", "ui:pw") as (client, _):  # loopback: only --api-auth guards the API
        assert client.get("/sdapi/v1/options").status_code == 200


def test_exposed_api_accepts_api_and_gradio_logins(tmp_path):
    with server(tmp_path, "--share", "--gradio-auth", "ui:pw one", "--api-auth", "api:pw:two") as (client, _):
        for path in ("/sdapi/v1/options", "/openapi.json", "/api/v1/extensions"):
            r = client.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"].lower().startswith("basic"), path
            assert client.get(path, headers=basic("ui", "pw one")).status_code == 200, path
            assert client.get(path, headers=basic("api", "pw:two")).status_code == 200, path
            assert client.get(path, headers=basic("ui", "pw:two")).status_code == 401, path


# ---- Origin (CSRF) and Host (DNS rebinding) --------------------------------------------------------------
def test_cross_site_post_and_dns_rebinding_are_refused(tmp_path):
    body = json.dumps({"samples_format": "jpg"})
    with server(tmp_path, "--allowed-hosts", "sd.example.org,.lan.example") as (client, launch):
        # a page of another site posts text/plain JSON (no preflight): its Origin gets it refused
        r = client.post("/sdapi/v1/options", content=body, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and r.json()["error"] == "ForeignOrigin"
        # DNS rebinding: evil.example now resolves to 127.0.0.1, so Origin and Host agree; the Host is refused
        rebound = {"Origin": "http://evil.example:7860", "Host": "evil.example:7860"}
        r = client.post("/sdapi/v1/options", content=body, headers=rebound)
        assert r.status_code == 403 and r.json()["error"] == "ForeignHost" and "--allowed-hosts" in r.json()["detail"]
        assert client.get("/sdapi/v1/options", headers={"Host": "evil.example:7860"}).status_code == 403
        assert client.get("/openapi.json", headers={"Host": "evil.example"}).status_code == 403
        assert launch.settings.get("samples_format") == "png"
        for host in ("127.0.0.1:7860", "localhost:7860", "[::1]:7860", "sd.example.org", "box.lan.example:443"):
            assert client.get("/sdapi/v1/options", headers={"Host": host}).status_code == 200, host
        # no Origin (Python clients) and the server's own page may post
        assert client.post("/sdapi/v1/options", content=body).status_code == 200
        r = client.post("/sdapi/v1/options", json={"samples_format": "png"}, headers={"Origin": LOCAL})
        assert r.status_code == 200


def test_listening_host_check_lets_the_lan_in_by_address_and_name(tmp_path):
    with server(tmp_path, "--listen", "--api-auth", "a:b") as (client, _):
        login = basic("a", "b")
        me = socket.gethostname().lower()
        for host in ("192.168.1.20:7860", "[fe80::1]:7860", f"{me}:7860", f"{me.split('.')[0]}.local"):
            assert client.get("/sdapi/v1/samplers", headers={**login, "Host": host}).status_code == 200, host
        r = client.get("/sdapi/v1/samplers", headers={**login, "Host": "attacker.example"})
        assert r.status_code == 403 and r.json()["error"] == "ForeignHost"
    policy = ExposurePolicy(share=True, allowed_hosts=("*",))
    assert policy.host_allowed("anything.example") and ExposurePolicy(share=True).host_allowed("x1.gradio.live")
    assert not ExposurePolicy().host_allowed("x1.gradio.live")  # only a share link's own domain


def test_no_wildcard_cors_anywhere(tmp_path):
    pattern = re.compile(r"access-control-allow-origin['\"]?\s*[:,=]\s*['\"]\*|allow_origins\s*=\s*\[\s*['\"]\*", re.I)
    sources = [REPO / "webui.py", *(REPO / d for d in ("api", "ui", "ldm_core", "extensions"))]
    files = [p for s in sources for p in ([s] if s.is_file() else s.rglob("*.py")) if ".venv" not in p.parts]
    assert len(files) > 20
    offenders = [str(p) for p in files if pattern.search(p.read_text(encoding="utf-8", errors="replace"))]
    assert offenders == []
    with server(tmp_path) as (client, _):
        for method in ("get", "options"):
            r = getattr(client, method)(
                "/sdapi/v1/options",
                headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
            )
            assert "access-control-allow-origin" not in {k.lower() for k in r.headers}, (method, r.headers)


# ---- extensions and folder settings ---------------------------------------------------------------------
def test_extension_enable_disable_is_gated_like_install(tmp_path):
    state = tmp_path / "extensions.json"
    with server(tmp_path, "--listen", "--api-auth", "a:b") as (client, launch):
        r = client.post("/api/v1/extensions/controlnet/disable", headers=basic("a", "b"))
        assert r.status_code == 403 and "--enable-insecure-extension-access" in r.json()["detail"]
        r = client.post("/api/v1/extensions/controlnet/enable", headers=basic("a", "b"))
        assert r.status_code == 403
        assert not state.exists() or "controlnet" not in state.read_text()
        from ui.extensions import apply_enabled  # the Extensions tab goes through the same manager gate

        assert "Refused" in apply_enabled(launch.service.extensions, [])
        assert not state.exists() or "controlnet" not in state.read_text()
    with server(tmp_path, "--listen", "--api-auth", "a:b", "--enable-insecure-extension-access") as (client, _):
        r = client.post("/api/v1/extensions/controlnet/disable", headers=basic("a", "b"))
        assert r.status_code == 200 and r.json()["enabled"] is False
    with server(tmp_path) as (client, _):  # loopback: allowed without the flag
        assert client.post("/api/v1/extensions/controlnet/enable").json()["enabled"] is True


def test_folder_settings_are_locked_while_exposed(tmp_path):
    elsewhere = str(tmp_path / "elsewhere")
    with server(tmp_path, "--listen", "--api-auth", "a:b") as (client, launch):
        login = basic("a", "b")
        outputs = launch.service.engine.config.outputs_dir
        for key in ("outdir_samples", "ckpt_dir", "vae_dir", "lora_dir", "embeddings_dir"):
            r = client.post("/sdapi/v1/options", json={key: elsewhere}, headers=login)
            assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == key, r.text
            assert "--insecure-expose" in r.json()["detail"][0]["msg"]
        assert launch.service.engine.config.outputs_dir == outputs
        assert not (tmp_path / "config.json").exists() or elsewhere not in (tmp_path / "config.json").read_text()
        # what GET returns may be posted back (clients do), and other settings still change
        current = client.get("/sdapi/v1/options", headers=login).json()
        assert client.post("/sdapi/v1/options", json=current, headers=login).status_code == 200
        assert client.post("/sdapi/v1/options", json={"samples_format": "jpg"}, headers=login).status_code == 200
        # the Settings tab shows them read-only and its save is refused by the same store
        import gradio as gr

        from ui.common import UiContext
        from ui.settings import apply_settings, build

        ctx = UiContext(service=launch.service, settings=launch.settings, data_dir=tmp_path)
        with gr.Blocks():
            comps = build(ctx)
        assert comps["outdir_samples"].interactive is False and comps["ckpt_dir"].interactive is False
        assert comps["samples_format"].interactive is not False
        with pytest.raises(ValueError, match="outdir_samples"):
            apply_settings(ctx, {"outdir_samples": elsewhere})
    with server(tmp_path, "--listen", "--api-auth", "a:b", "--insecure-expose") as (client, launch):
        r = client.post("/sdapi/v1/options", json={"outdir_samples": elsewhere}, headers=basic("a", "b"))
        assert r.status_code == 200 and launch.service.engine.config.outputs_dir == Path(elsewhere)


# ---- one launcher, messages in the UI -------------------------------------------------------------------
def test_api_server_is_the_webui_launcher(tmp_path):
    import api.server

    api_args = vars(api.server.build_parser().parse_args([]))
    ui_args = vars(webui.build_parser().parse_args([]))
    assert set(api_args) == set(ui_args)  # the same flags, so the same code path and options store
    assert api_args["nowebui"] is True and api_args["port"] == 7861 and ui_args["nowebui"] is False
    with server(tmp_path, "--api-auth", "a:b") as (client, launch):
        assert client.app.state.api_context.options is launch.settings  # the one store: UI tab and API
        flags = client.get("/sdapi/v1/cmd-flags", headers=basic("a", "b")).json()
        assert "api_auth" not in flags and flags["insecure_expose"] is False
    out = subprocess.run(
        [sys.executable, "-m", "api.server", "--api-auth", "nocolon", "--data-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "--api-auth" in out.stderr and "USER:PASSWORD" in out.stderr


def test_exposure_message_is_shown_in_the_ui():
    from ui.app import exposure_banner
    from ui.common import UiContext

    messages = ExposurePolicy(server_name="0.0.0.0").messages()
    assert any("--gradio-auth" in m for m in messages) and any("locked" in m for m in messages)
    import gradio as gr

    with gr.Blocks():
        banner = exposure_banner(UiContext(service=None, settings=None, flags={"exposure_messages": messages}))
        assert exposure_banner(UiContext(service=None, settings=None, flags={})) is None
    assert "--gradio-auth" in banner.value and "--insecure-expose" in banner.value


def test_web_ui_checks_host_logs_in_odd_passwords_and_shows_the_lock(tmp_path):
    with server(tmp_path, "--listen", "--api", "--gradio-auth", "ann:p w:x", ui=True) as (client, _):
        for path in ("/", "/config", "/gradio_api/info"):  # Gradio's own routes are behind the Host guard too
            assert client.get(path, headers={"Host": "evil.example:7860"}).status_code == 403, path
        assert client.post("/login", data={"username": "ann", "password": "p w"}).status_code == 400
        assert client.post("/login", data={"username": "ann", "password": "p w:x"}).json() == {"success": True}
        config = client.get("/config").json()
        banner = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "exposure_banner"]
        assert banner and "--insecure-expose" in banner[0]["props"]["value"]
        outdir = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "setting_outdir_samples"]
        assert outdir and outdir[0]["props"]["interactive"] is False
        # --api beside the UI while listening: the API asks for the --gradio-auth login
        assert client.get("/sdapi/v1/options").status_code == 401
        assert client.get("/sdapi/v1/options", headers=basic("ann", "p w:x")).status_code == 200
