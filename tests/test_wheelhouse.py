"""Wheel artifacts (issue 7): the key holds everything that changes the binary and nothing that does not;
the store is atomic; clean keeps the wheelhouse unless asked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import ROOT

from vllm_harness.commands.clean import clean, plan
from vllm_harness.core.layout import Layout
from vllm_harness.steps import wheelhouse as wh

FIXTURE = ROOT / "tests" / "fixtures" / "vllm-mini"


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "vllm-mini"
    shutil.copytree(FIXTURE, d, ignore=shutil.ignore_patterns("build", "*.so", "__pycache__"))
    return d


def _key(src, **kw):
    args = {"device": "cuda", "torch": "2.6.0+cu118", "python": "3.10.14", "archs": "7.5",
            "env": {"PATH": "/usr/bin:/bin", "CMAKE_BUILD_TYPE": "Release"}, "variant_env": {}}
    args.update(kw)
    return wh.binary_key(src, **args)


def test_tree_hash_ignores_build_outputs_and_sees_edits(src):
    h0, n = wh.tree_hash(src)
    assert n >= 10
    # what a build leaves in the tree does not change the key
    (src / "build" / "temp").mkdir(parents=True)
    (src / "build" / "temp" / "x.o").write_bytes(b"obj")
    (src / "vllm" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"ELF")
    (src / "vllm" / "_version.py").write_text("__version__ = '1'\n")
    (src / "vllm.egg-info").mkdir()
    (src / "vllm" / "__pycache__").mkdir()
    (src / "vllm" / "__pycache__" / "a.pyc").write_bytes(b"pyc")
    # nor what the tree's own .gitignore names (vLLM ignores its copied flash-attn files this way)
    (src / ".gitignore").write_text("# build products\nvllm/vllm_flash_attn/*\n*.log\n!keep.log\n")
    h_ign, _ = wh.tree_hash(src)
    (src / "vllm" / "vllm_flash_attn").mkdir()
    (src / "vllm" / "vllm_flash_attn" / "flash_attn_interface.py").write_text("x = 1\n")
    (src / "build.log").write_text("log")
    assert wh.tree_hash(src)[0] == h_ign
    # a source edit (a patch, use_existing_torch.py's edits) does
    k = src / "csrc" / "ops.h"
    k.write_text(k.read_text() + "\n// patched\n")
    assert wh.tree_hash(src)[0] != h_ign
    assert h0 != h_ign  # the .gitignore file itself is source


def test_key_changes_with_what_changes_the_binary(src, tmp_path):
    base, parts = _key(src)
    assert parts["torch"] == "2.6.0+cu118" and parts["archs"] == "7.5" and parts["python"] == "3.10.14"
    assert parts["source"]["files"] >= 10 and parts["compiler"]  # c++ --version of this machine
    changed = {
        "torch": _key(src, torch="2.6.0+cu124")[0],
        "archs": _key(src, archs="7.5;8.9")[0],
        "python": _key(src, python="3.12.3")[0],
        "device": _key(src, device="cpu")[0],
        "build type": _key(src, env={"PATH": "/usr/bin:/bin", "CMAKE_BUILD_TYPE": "Debug"})[0],
        "cmake args": _key(src, env={"PATH": "/usr/bin:/bin", "CMAKE_BUILD_TYPE": "Release",
                                     "CMAKE_ARGS": "-DVLLM_FA_CMAKE_GPU_ARCHES=80-real"})[0],
        "variant env": _key(src, variant_env={"VLLM_TARGET_DEVICE": "cuda", "FOO": "1"})[0],
        "provenance": _key(src, provenance={"from": "git", "commit": "abc"})[0],
    }
    fake = tmp_path / "bin" / "c++"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'g++ (Fake) 11.4.0'\n")
    fake.chmod(0o755)
    changed["compiler"] = _key(src, env={"PATH": f"{fake.parent}:/usr/bin:/bin", "CMAKE_BUILD_TYPE": "Release"})[0]
    assert _key(src, env={"PATH": f"{fake.parent}:/usr/bin:/bin", "CMAKE_BUILD_TYPE": "Release"})[1]["compiler"] \
        == "g++ (Fake) 11.4.0"
    for what, k in changed.items():
        assert k != base, what
    assert len(set(changed.values())) == len(changed)


def test_key_ignores_what_only_changes_the_time(src):
    base, _ = _key(src)
    env = {"PATH": "/usr/bin:/bin", "CMAKE_BUILD_TYPE": "Release", "MAX_JOBS": "16", "NVCC_THREADS": "8",
           "CMAKE_ARGS": "-DCMAKE_CXX_COMPILER_LAUNCHER=/x/sccache -DCMAKE_CUDA_COMPILER_LAUNCHER=/x/sccache",
           "SCCACHE_DIR": "/elsewhere", "NINJA_STATUS": "[%f/%t] "}
    assert _key(src, env=env, variant_env={"MAX_JOBS": "3"})[0] == base
    # CPU builds: archs and nvcc do not matter
    assert _key(src, device="cpu", archs="7.5")[0] == _key(src, device="cpu", archs=None)[0]


def test_cuda_key_holds_nvcc_version(src):
    _, parts = _key(src, env={"PATH": "/usr/bin:/bin", "CUDA_HOME": "/nonexistent"})
    assert "cuda" in parts and parts["cuda"] is None   # no nvcc there: recorded as unknown, not guessed
    _, parts = _key(src, archs=None)
    assert parts["archs"] == "source default"


def _wheel(tmp_path, name="vllm-0.0.1-cp311-cp311-linux_x86_64.whl", data=b"PK wheel") -> Path:
    p = tmp_path / "out" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def test_store_lookup_and_replace(tmp_path):
    state = tmp_path / "state"
    assert wh.lookup(state, "k1", {}) is None
    stored = wh.store(state, "k1", _wheel(tmp_path), wh.WheelRecord({"torch": "2.6.0"}, "cu118", 12.3), {})
    assert stored == state / "wheelhouse" / "k1" / "vllm-0.0.1-cp311-cp311-linux_x86_64.whl"
    assert wh.lookup(state, "k1", {}) == stored
    meta = json.loads((stored.parent / "meta.json").read_text())
    assert meta["variant"] == "cu118" and meta["build_seconds"] == 12.3 and meta["parts"] == {"torch": "2.6.0"}
    again = wh.store(state, "k1", _wheel(tmp_path, data=b"PK newer"), wh.WheelRecord({}, "cu118", None), {})
    assert again.read_bytes() == b"PK newer" and len(list(again.parent.glob("*.whl"))) == 1
    assert [p.name for p in (state / "wheelhouse").iterdir()] == ["k1"]  # no temp folders left
    # a folder without meta.json (a copy that was cut off) is not a hit
    (state / "wheelhouse" / "k2").mkdir()
    _wheel(tmp_path).rename(state / "wheelhouse" / "k2" / "x.whl")
    assert wh.lookup(state, "k2", {}) is None
    assert [e["key"] for e in wh.entries(state, {})] == ["k1"]


def test_shared_wheelhouse_from_the_environment(tmp_path):
    team = tmp_path / "team-wheels"
    env = {"VLLM_HARNESS_WHEELHOUSE": str(team)}
    wh.store(tmp_path / "state", "k", _wheel(tmp_path), wh.WheelRecord({}, "v", 1.0), env)
    assert wh.lookup(tmp_path / "other-state", "k", env).parent == team / "k"


def test_install_command_needs_no_index(tmp_path):
    w = tmp_path / "x.whl"
    py = tmp_path / "venv" / "bin" / "python"
    assert wh.install_cmd(py, w, "/u/uv") == ["/u/uv", "pip", "install", "--python", str(py), "--no-deps",
                                                 "--reinstall", "--offline", str(w)]
    pip = wh.install_cmd(py, w, None)
    assert pip[:3] == [str(py), "-m", "pip"] and "--no-index" in pip and "--no-deps" in pip


def test_clean_keeps_the_wheelhouse_unless_asked(tmp_path):
    layout = Layout(root=ROOT, state=tmp_path / "state")
    layout.ensure()
    (layout.venv("cu118") / "bin").mkdir(parents=True)
    (layout.venv("cu124") / "bin").mkdir(parents=True)
    w118 = wh.store(layout.state, "a" * 16, _wheel(tmp_path), wh.WheelRecord({}, "cu118", 1.0), {})
    w124 = wh.store(layout.state, "b" * 16, _wheel(tmp_path), wh.WheelRecord({}, "cu124", 1.0), {})
    (layout.state / "cache" / "sccache").mkdir(parents=True)
    (layout.state / "buildspeed").mkdir()
    (layout.state / "buildspeed" / "memory.json").write_text('{"records": []}')

    assert not any("wheelhouse" in str(p) for p in plan(layout, "cu118", False))
    clean(layout, "cu118")
    assert not layout.venv("cu118").exists() and w118.is_file() and (layout.state / "cache" / "sccache").is_dir()
    assert (layout.state / "buildspeed" / "memory.json").is_file()
    # --wheelhouse: this variant's wheels only
    assert plan(layout, "cu118", False, wheelhouse=True) == [w118.parent]
    clean(layout, "cu118", wheelhouse=True)
    assert not w118.exists() and w124.is_file()
    # --wheelhouse alone: every wheel, nothing else
    assert plan(layout, None, False, wheelhouse=True) == [layout.state / "wheelhouse"]
    res = clean(layout, None, wheelhouse=True, dry_run=True)
    assert res["removed"] == [str(layout.state / "wheelhouse")] and w124.is_file()
    # --all: everything the harness made, the wheelhouse and the records too
    everything = plan(layout, None, True)
    assert layout.state / "wheelhouse" in everything and layout.state / "buildspeed" in everything
    clean(layout, everything=True)
    assert not (layout.state / "wheelhouse").exists() and not (layout.state / "cache").exists()


def test_clean_cli_flag(harness, state):
    Layout.default().ensure()
    wh.store(state, "c" * 16, _wheel(state.parent), wh.WheelRecord({}, "cu118", 1.0), {})
    rc, out, err = harness("clean", "--variant", "cu118", "--dry-run", "--json")
    assert rc == 0 and not any("wheelhouse" in p for p in json.loads(out)["removed"])
    rc, out, err = harness("clean", "--variant", "cu118", "--wheelhouse", "--dry-run", "--json")
    assert rc == 0 and any("wheelhouse" in p for p in json.loads(out)["removed"])
