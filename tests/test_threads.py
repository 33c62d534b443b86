"""The CPU thread policy (ldm_core.threads) and the --threads / --compile flags of the launchers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import webui
from ldm_core.threads import ThreadPolicy, prepare_process, thread_policy

REPO = Path(__file__).resolve().parent.parent


def test_default_leaves_one_cpu_free_with_sleeping_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    p = thread_policy(None, cpus=6)
    assert p == ThreadPolicy(threads=5, passive=True)
    assert thread_policy(None, cpus=2).threads == 1 and thread_policy(None, cpus=1).threads == 1
    assert p.environ() == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert thread_policy(3).threads == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert thread_policy(None, cpus=6).threads == 4 and thread_policy(2).threads == 2


def test_a_bad_count_names_the_flag():
    with pytest.raises(ValueError, match=r"--threads must be at least 1 \(got 0\)"):
        thread_policy(0)


def test_prepare_process_keeps_what_the_user_set(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    prepare_process(thread_policy(1))
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    prepare_process(thread_policy(1))
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_the_cli_sets_the_wait_policy_before_torch_loads_and_the_thread_count():
    """`python -m ldm_core` runs ldm_core/__main__.py, which sets OMP_WAIT_POLICY before torch is imported."""
    code = (
        "import runpy, sys, os\n"
        "sys.argv = ['ldm_core', 'samplers']\n"
        "try:\n"
        "    runpy.run_module('ldm_core', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('WAIT', os.environ.get('OMP_WAIT_POLICY'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert "WAIT PASSIVE" in out.stdout, out.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "ldm_core", "txt2img", "--prompt", "x", "--out", "o", "--threads", "0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "--threads must be at least 1" in bad.stderr


def test_webui_flags_reach_the_engine_config(tmp_path):
    for argv, expected in ((["--compile"], "on"), (["--no-compile"], "off"), ([], "auto")):
        args = webui.build_parser().parse_args(["--data-dir", str(tmp_path), *argv])
        config, _ = webui.engine_config(args, {})
        assert config.compile == expected
    assert webui.main(["--data-dir", str(tmp_path), "--threads", "0"]) == 2
