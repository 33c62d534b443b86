"""The model registry: scanning A1111-style folders, names/titles/hashes, lookups and errors, hashing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from ldm_core.models import (
    HashCache,
    ModelEntry,
    ModelRegistry,
    UnknownModelError,
    file_sha256,
    folder_sha256,
)


@pytest.fixture
def registry(models_dir):
    m = models_dir / "models"
    return ModelRegistry([m / "Stable-diffusion"], [m / "VAE"])


def test_scan_lists_files_and_folders(registry, models_dir):
    entries = registry.checkpoints()
    assert [e.filename for e in entries] == [
        "sub/tiny-sd1-copy.safetensors",
        "tiny-sd1-diffusers",
        "tiny-sd1-inpaint.safetensors",
        "tiny-sd1.safetensors",
        "tiny-sd2-v.safetensors",
        "tiny-sdxl.safetensors",
    ]
    by = {e.filename: e for e in entries}
    assert by["tiny-sd1.safetensors"].name == "tiny-sd1"  # infotext "Model": no extension
    assert by["sub/tiny-sd1-copy.safetensors"].name == "sub/tiny-sd1-copy"
    folder = by["tiny-sd1-diffusers"]
    assert folder.format == "diffusers" and folder.name == "tiny-sd1-diffusers"
    assert by["tiny-sdxl.safetensors"].format == "single_file" and not by["tiny-sdxl.safetensors"].builtin
    assert [v.name for v in registry.vaes()] == ["tiny-vae.safetensors"]  # VAEs keep the extension
    assert registry.default_checkpoint() == entries[0]


def test_ignores_sidecars_hidden_files_and_other_types(tmp_path):
    d = tmp_path / "ckpt"
    (d / ".hidden").mkdir(parents=True)
    (d / ".hidden" / "x.safetensors").write_bytes(b"x")
    for n in ("a.safetensors", "a.json", "a.yaml", "b.ckpt", "notes.txt", ".c.safetensors", "d.pt"):
        (d / n).write_bytes(b"x")
    assert [e.filename for e in ModelRegistry([d], []).checkpoints()] == ["a.safetensors", "b.ckpt"]


def test_missing_folders_and_builtin(tmp_path, tiny_models):
    builtin = tmp_path / "builtin"
    shutil.copytree(tiny_models["sd1"]["diffusers"], builtin)
    reg = ModelRegistry([tmp_path / "nope"], [tmp_path / "nope2"], builtin)
    (entry,) = reg.checkpoints()
    assert entry.builtin and entry.format == "diffusers" and reg.default_checkpoint() == entry
    user = tmp_path / "user"
    user.mkdir()
    shutil.copy(tiny_models["sdxl"]["single_file"], user / "mine.safetensors")
    reg = ModelRegistry(user, None, builtin)
    assert [e.builtin for e in reg.checkpoints()] == [False, True]  # built-in listed last
    assert reg.default_checkpoint().filename == "mine.safetensors"
    assert ModelRegistry([], [], None).default_checkpoint() is None
    shutil.copytree(builtin, tmp_path / "builtin-v2")  # a second shipped model: listed, not the default
    (tmp_path / "builtin-empty").mkdir()  # not a model folder: not listed
    reg = ModelRegistry([tmp_path / "nope"], None, builtin)
    assert [(e.name, e.builtin) for e in reg.checkpoints()] == [("builtin", True), ("builtin-v2", True)]
    assert reg.default_checkpoint().name == "builtin"


def test_refresh_sees_new_files(tmp_path, tiny_models):
    reg = ModelRegistry(tmp_path, [])
    assert reg.checkpoints() == []
    shutil.copy(tiny_models["sd1"]["single_file"], tmp_path / "new.safetensors")
    assert reg.checkpoints() == []
    reg.refresh()
    assert [e.name for e in reg.checkpoints()] == ["new"]


def test_find_by_every_name(registry):
    target = registry.find_checkpoint("tiny-sdxl.safetensors")
    sha = target.sha256
    assert target.title == f"tiny-sdxl.safetensors [{sha[:10]}]"  # hash known now
    for query in (
        "tiny-sdxl",
        "tiny-sdxl.safetensors",
        target.title,
        "TINY-SDXL",
        sha[:10],
        sha,
        f"tiny-sdxl.safetensors [{sha[:10]}]",
        f"tiny-sdxl [{sha[:10]}]",
        sha[:8].upper(),
    ):
        assert registry.find_checkpoint(query) == target, query
    assert registry.find_checkpoint("tiny-sd1-copy").filename == "sub/tiny-sd1-copy.safetensors"  # unique stem
    assert registry.find_checkpoint("sub\\tiny-sd1-copy.safetensors").filename == "sub/tiny-sd1-copy.safetensors"
    assert registry.find_checkpoint("tiny-sd1-diffusers").format == "diffusers"
    assert registry.find_vae("tiny-vae.safetensors") == registry.find_vae("tiny-vae")


def test_find_by_hash_before_any_hash_is_known(models_dir):
    sha = file_sha256(models_dir / "models" / "Stable-diffusion" / "tiny-sd2-v.safetensors")
    fresh = ModelRegistry(models_dir / "models" / "Stable-diffusion")
    assert fresh.find_checkpoint(sha[:10]).filename == "tiny-sd2-v.safetensors"


def test_unknown_model_lists_choices(registry):
    with pytest.raises(UnknownModelError) as err:
        registry.find_checkpoint("nonexistent")
    assert isinstance(err.value, KeyError)
    msg = str(err.value)
    assert msg.startswith("unknown model 'nonexistent'; choose one of:") and "tiny-sdxl.safetensors" in msg
    assert err.value.args[0] == msg  # what callers show (no KeyError quoting)
    assert "tiny-sd1.safetensors" in err.value.choices[3]
    with pytest.raises(UnknownModelError, match="unknown VAE 'x'; choose one of: tiny-vae.safetensors"):
        registry.find_vae("x")
    with pytest.raises(UnknownModelError, match="no models were found"):
        ModelRegistry([], []).find_checkpoint("x")


def test_diffusers_vae_folder_is_listed(tmp_path, tiny_models):
    shutil.copytree(tiny_models["sd1"]["diffusers"] / "vae", tmp_path / "my-vae")
    (entry,) = ModelRegistry([], tmp_path).vaes()
    assert entry.format == "diffusers" and entry.name == "my-vae"


# ---- hashing --------------------------------------------------------------------------------------------


def test_file_sha256_and_cache(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"hello" * 1000)
    expected = hashlib.sha256(b"hello" * 1000).hexdigest()
    assert file_sha256(p) == expected
    store = tmp_path / "cache" / "hashes.json"
    cache = HashCache(store)
    assert cache.cached(p) is None
    assert file_sha256(p, cache) == expected and cache.cached(p) == expected
    assert HashCache(store).cached(p) == expected  # persisted
    p.write_bytes(b"changed")  # size (and mtime) change invalidates
    assert cache.cached(p) is None
    assert file_sha256(p, cache) == hashlib.sha256(b"changed").hexdigest()
    os.utime(p, ns=(1, 1))  # same size, other mtime
    assert cache.cached(p) is None
    store.write_text("{broken")
    assert HashCache(store).cached(p) is None  # unreadable cache is ignored


def test_cache_avoids_rehashing(tmp_path, monkeypatch):
    import ldm_core.models.hashes as hashes

    p = tmp_path / "f.bin"
    p.write_bytes(b"x" * 10)
    cache = HashCache()
    calls = []
    real = hashes._sha256_of
    monkeypatch.setattr(hashes, "_sha256_of", lambda path: calls.append(path) or real(path))
    for _ in range(3):
        cache.sha256(p)
    # only this file's hashes count: an engine of another test may be hashing its models in the background
    assert [c for c in calls if c == p] == [p]


def test_folder_hash_covers_weights_only(tmp_path, tiny_models):
    a = shutil.copytree(tiny_models["sd1"]["diffusers"], tmp_path / "a")
    h = folder_sha256(a)
    (a / "README.md").write_text("docs")
    cfg = json.loads((a / "unet" / "config.json").read_text())
    (a / "unet" / "config.json").write_text(json.dumps(cfg, indent=4))
    assert folder_sha256(a) == h
    weights = a / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    assert folder_sha256(a) != h
    assert ModelEntry.from_path(a).sha256 == folder_sha256(a)


def test_entry_from_path(tiny_models):
    e = ModelEntry.from_path(tiny_models["sdxl"]["single_file"])
    assert (e.name, e.filename, e.format, e.role) == ("sdxl", "sdxl.safetensors", "single_file", "checkpoint")
    assert e.short_hash == file_sha256(e.path)[:10]
    assert e.title == "sdxl.safetensors"  # no hash cache: the title has no hash
    d = ModelEntry.from_path(tiny_models["sdxl"]["diffusers"])
    assert d.format == "diffusers" and {d, d} == {d}


def _imports(path) -> set[str]:
    """The modules a source file imports (relative imports as written, e.g. ".loading")."""
    import ast

    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            out.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_registry_and_loading_do_not_import_each_other():
    from pathlib import Path

    import ldm_core.models as models

    root = Path(models.__file__).parent
    assert ".loading" not in _imports(root / "registry.py")
    assert ".registry" not in _imports(root / "loading.py")
    assert ".entry" in _imports(root / "loading.py") and ".entry" in _imports(root / "registry.py")


def test_weight_file_suffixes_are_defined_once():
    """Only ldm_core/models/suffixes.py spells out the weight-file suffix lists; everything else imports them."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    listing = re.compile(r"""\(\s*["']\.(safetensors|ckpt|pth?|bin)["']\s*,""")
    found = []
    for folder in ("ldm_core", "api", "ui", "extensions"):
        for p in (repo / folder).rglob("*.py"):
            if p.name != "suffixes.py" and listing.search(p.read_text(encoding="utf-8")):
                found.append(str(p.relative_to(repo)))
    assert found == []
    from ldm_core.extension_api import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES
    from ldm_core.models.suffixes import WEIGHT_SUFFIXES

    assert (
        set(WEIGHT_SUFFIXES)
        == {*SAFETENSORS_SUFFIXES, *PICKLE_SUFFIXES}
        == {
            ".safetensors",
            ".ckpt",
            ".pt",
            ".pth",
            ".bin",
        }
    )
