"""The compile probe: vLLM's torch_bindings.cpp against the env's torch, reported through diagnose.

Offline: a stand-in torch (a few headers) and a stand-in vLLM tree reproduce the source document's
``'needs_fixed_stride_order' is not a member of 'at::Tag'`` in about a second.  Network: the real vLLM 0.8.5
sdist (pins torch 2.6.0) against torch 2.2.2's headers (no such tag: fails), torch 2.6.0's (passes) --
both read out of PyPI's wheels with HTTP range requests (~20 MB each instead of ~750 MB) -- and against
the local CPU torch 2.13.0 installed in a venv (passes: 2.13 still has the tag).
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import types
import urllib.request
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, local_cpu_torch, needs_pypi

from vllm_harness.core.errors import StepFailed
from vllm_harness.core.options import RunOptions
from vllm_harness.steps import probe

needs_cxx = pytest.mark.skipif(not shutil.which("g++") and not shutil.which("c++"), reason="needs a C++ compiler")


def fake_torch(root: Path, version: str, tags: list[str]) -> Path:
    """A torch package with just what torch_bindings.cpp below includes: torch/version.py and a Tag enum."""
    t = root / "torch"
    (t / "include" / "ATen" / "core").mkdir(parents=True)
    (t / "include" / "torch" / "csrc" / "api" / "include").mkdir(parents=True)
    (t / "__init__.py").write_text("raise ImportError('the probe must not import torch')\n")
    (t / "version.py").write_text(f"__version__ = '{version}'\n")
    (t / "include" / "ATen" / "core" / "enum_tag.h").write_text(
        "#pragma once\nnamespace at { enum class Tag { " + ", ".join(tags) + " }; }\n")
    return root


def fake_vllm(root: Path, pin: str = "2.6.0") -> Path:
    src = root / "vllm"
    (src / "csrc" / "core").mkdir(parents=True)
    (src / "CMakeLists.txt").write_text(f'set(CMAKE_CXX_STANDARD 17)\nset(TORCH_SUPPORTED_VERSION_CUDA "{pin}")\n')
    (src / "csrc" / "core" / "registration.h").write_text("#pragma once\n#define STR(x) #x\n")
    (src / "csrc" / "torch_bindings.cpp").write_text(
        '#include "core/registration.h"\n#include <ATen/core/enum_tag.h>\n'
        "#ifndef TORCH_EXTENSION_NAME\n#error no TORCH_EXTENSION_NAME\n#endif\n"
        "static at::Tag stride_tag = at::Tag::needs_fixed_stride_order;\n")
    return src


@needs_cxx
def test_probe_catches_a_torch_older_than_the_source_and_names_the_pin(tmp_path):
    src = fake_vllm(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(fake_torch(tmp_path / "old", "2.3.0+cu121", ["core", "pointwise"]))}
    res = probe.run_probe(src, Path(sys.executable), env, tmp_path / "probe.log")
    assert res["status"] == "fail" and res["torch"] == "2.3.0+cu121" and res["source_pins_torch"] == "2.6.0"
    top = res["findings"][0]
    assert top["id"] == "torch-api-mismatch"
    assert "needs_fixed_stride_order" in top["evidence"] and "at::Tag" in top["evidence"]
    assert "torch 2.6.0" in top["fix"]
    err = probe.fail(res)
    assert isinstance(err, StepFailed) and "torch 2.6.0" in err.fix and "2.3.0" in err.fix
    # the same source against a torch that has the tag
    env["PYTHONPATH"] = str(fake_torch(tmp_path / "new", "2.6.0", ["core", "needs_fixed_stride_order"]))
    ok = probe.run_probe(src, Path(sys.executable), env, tmp_path / "probe2.log")
    assert ok["status"] == "pass" and ok["findings"] == [] and ok["cxx_standard"] == 17


@needs_cxx
def test_probe_cli_json_without_a_variant(harness, tmp_path):
    """`invoke probe --source DIR --python PY`: a venv whose site-packages hold the stand-in torch."""
    src = fake_vllm(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([getattr(sys, "_base_executable", None) or sys.executable, "-m", "venv", "--without-pip",
                    str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    shutil.copytree(fake_torch(tmp_path / "old", "2.3.0", ["core"]) / "torch", site / "torch")
    py = venv / "bin" / "python"
    rc, out, err = harness("probe", "--source", src, "--python", py, "--json")
    assert rc == 1, err
    res = json.loads(out)
    assert res["findings"][0]["id"] == "torch-api-mismatch" and res["source_pins_torch"] == "2.6.0"
    rc, out, err = harness("probe", "--source", src, "--python", py)
    assert rc == 1 and "does NOT compile" in out and "fix: This vLLM source pins torch 2.6.0" in out


@needs_cxx
def test_diagnose_of_a_probe_log_names_the_source_pin_not_the_variant_torch(harness, tmp_path):
    src = fake_vllm(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(fake_torch(tmp_path / "old", "2.3.0+cu121", ["core", "pointwise"]))}
    log = tmp_path / "logs" / "probe.log"
    res = probe.run_probe(src, Path(sys.executable), env, log)
    assert res["status"] == "fail" and probe.load_record(log)["source_pins_torch"] == "2.6.0"
    # the variant's fix context names torch 2.11.0 (cu130); the probe's record names the source's pin
    rc, out, err = harness("diagnose", "--log", log, "--variant", ROOT / "envs" / "cu130.toml", "--json")
    assert rc == 1, err
    top = json.loads(out)["findings"][0]
    assert top["id"] == "torch-api-mismatch" and "2.6.0" in top["fix"] and "2.11" not in top["fix"]


@needs_cxx
def test_build_step_stops_before_the_long_build(tmp_path):
    src = fake_vllm(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(fake_torch(tmp_path / "old", "2.3.0", ["core"]))}
    said = []
    ctx = types.SimpleNamespace(base_env={}, device="cuda", py=Path(sys.executable), options=RunOptions(quiet=True),
                                log=lambda step: tmp_path / f"{step}.log", say=said.append)
    with pytest.raises(StepFailed) as e:
        probe.before_build(ctx, src, env)
    assert "torch-api-mismatch" in e.value.message and "torch 2.6.0" in e.value.fix
    ctx.base_env = {"VLLM_HARNESS_SKIP_PROBE": "1"}
    assert probe.before_build(ctx, src, env) is None and "skipped" in said[-1]


def test_cxx_standard_and_bindings_file(tmp_path):
    src = fake_vllm(tmp_path)
    (src / "CMakeLists.txt").write_text("set(CMAKE_CXX_STANDARD 20)\n")
    assert probe.cxx_standard(src) == 20
    (src / "CMakeLists.txt").write_text("project(x)\n")
    assert probe.cxx_standard(src) == 17
    (src / "csrc" / "cpu").mkdir()
    (src / "csrc" / "cpu" / "torch_bindings.cpp").write_text("")
    assert probe.bindings_file(src, "cpu").name == "torch_bindings.cpp" and "cpu" in str(probe.bindings_file(src, "cpu"))


# ------------------------------------------------------------------------------ real sources (network)

class _RangeFile(io.RawIOBase):
    """A seekable view of a remote file through HTTP range requests (8 MiB blocks)."""

    BLOCK = 8 << 20

    def __init__(self, url: str):
        self.url, self.pos, self.blocks = url, 0, {}
        r = urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=0-0"}), timeout=60)
        self.size = int(r.headers["Content-Range"].split("/")[1])

    def seekable(self):
        return True

    def readable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, off, whence=0):
        self.pos = off if whence == 0 else self.pos + off if whence == 1 else self.size + off
        return self.pos

    def _block(self, i):
        if i not in self.blocks:
            lo, hi = i * self.BLOCK, min(self.size, (i + 1) * self.BLOCK) - 1
            req = urllib.request.Request(self.url, headers={"Range": f"bytes={lo}-{hi}"})
            self.blocks[i] = urllib.request.urlopen(req, timeout=300).read()
        return self.blocks[i]

    def readinto(self, b):
        n, out = len(b), bytearray()
        while n > 0 and self.pos < self.size:
            blk = self._block(self.pos // self.BLOCK)
            chunk = blk[self.pos % self.BLOCK:self.pos % self.BLOCK + n]
            out += chunk
            self.pos += len(chunk)
            n -= len(chunk)
        b[:len(out)] = out
        return len(out)


CACHE = Path(os.environ.get("VLLM_HARNESS_TEST_PROBE_CACHE", "/tmp/vllm-harness-test-probe"))


def pypi_file(project: str, filename: str) -> str:
    req = urllib.request.Request(f"https://pypi.org/simple/{project}/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        files = json.load(r)["files"]
    return next(f["url"] for f in files if f["filename"] == filename)


def torch_headers(version: str) -> Path:
    """torch/include + torch/version.py of PyPI's cp311 Linux wheel of ``version``, and nothing else."""
    dest = CACHE / f"torch-{version}-headers"
    from filelock import FileLock
    CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):  # pytest-xdist's workers: one extracts, the others wait
        if (dest / "torch" / "version.py").is_file():
            return dest
        url = pypi_file("torch", f"torch-{version}-cp311-cp311-manylinux1_x86_64.whl")
        with zipfile.ZipFile(_RangeFile(url)) as z:
            names = [n for n in z.namelist() if (n.startswith("torch/include/") or n in (
                "torch/__init__.py",)) and not n.endswith("/")]
            for n in names + ["torch/version.py"]:   # version.py last: it marks a complete extraction
                z.extract(n, dest)
    return dest


@functools.cache
def vllm_sdist(version: str) -> Path:
    dest = CACHE / f"vllm-{version}"
    if not (dest / "CMakeLists.txt").is_file():
        url = pypi_file("vllm", f"vllm-{version}.tar.gz")
        with urllib.request.urlopen(url, timeout=300) as r, tarfile.open(fileobj=r, mode="r|gz") as tar:
            for m in tar:
                rel = m.name.split("/", 1)[1] if "/" in m.name else ""
                if m.isfile() and (rel.startswith("csrc/") or rel == "CMakeLists.txt"):
                    m.name = rel
                    tar.extract(m, dest, filter="data")
    return dest


@pytest.mark.network
@needs_cxx
@pytest.mark.parametrize("torch_version,status", [("2.2.2", "fail"), ("2.6.0", "pass")])
def test_real_vllm_085_against_real_torch_headers(torch_version, status, tmp_path):
    needs_pypi()
    src = vllm_sdist("0.8.5")
    env = {**os.environ, "PYTHONPATH": str(torch_headers(torch_version))}
    res = probe.run_probe(src, Path(sys.executable), env, tmp_path / "probe.log")
    assert res["status"] == status, (res.get("findings"), res.get("first_error_lines"))
    assert res["torch"].startswith(torch_version) and res["source_pins_torch"] == "2.6.0"
    assert res["seconds"] < 120
    if status == "fail":
        top = res["findings"][0]
        assert top["id"] == "torch-api-mismatch"
        assert "'needs_fixed_stride_order' is not a member of 'at::Tag'" in top["evidence"].replace("‘", "'").replace(
            "’", "'")
        assert "torch 2.6.0" in probe.fail(res).fix


@pytest.fixture(scope="session")
def venv_torch_213(tmp_path_factory):
    if not local_cpu_torch():
        pytest.skip("needs the local CPU torch 2.13.0 wheel (Python 3.11, pip find-links)")
    venv = tmp_path_factory.mktemp("venv213")
    base = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                        "torch==2.13.0"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot install the local torch 2.13.0 wheel: {r.stderr[-300:]}")
    return venv / "bin" / "python"


@pytest.mark.network
@needs_cxx
def test_real_vllm_085_against_the_venvs_torch_213(venv_torch_213, tmp_path):
    needs_pypi()
    res = probe.run_probe(vllm_sdist("0.8.5"), venv_torch_213, dict(os.environ), tmp_path / "probe.log")
    assert res["status"] == "pass" and res["torch"].startswith("2.13.0")  # 2.13 still has the tag


def test_kernel_file_goes_through_nvccs_front_end_with_the_builds_host_compiler(tmp_path):
    src = fake_vllm(tmp_path)
    (src / "csrc" / "activation_kernels.cu").write_text("")
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (home / "bin" / "nvcc").chmod(0o755)
    info = {"torch_dir": str(tmp_path / "torch"), "python_include": "/usr/include/python3"}
    env = {**os.environ, "CUDA_HOME": str(home), "CUDAHOSTCXX": "g++-11"}
    cmds = dict(probe.commands(src, info, env, device="cuda", kernel=True))
    nv = cmds["csrc/activation_kernels.cu"]
    assert nv[0] == str(home / "bin" / "nvcc") and "--cuda" in nv and nv[nv.index("-ccbin") + 1] == "g++-11"
    cxx = cmds["csrc/torch_bindings.cpp"]
    assert "-fsyntax-only" in cxx and "-std=c++17" in cxx and "-DTORCH_EXTENSION_NAME=_C" in cxx
    assert str(tmp_path / "torch" / "include" / "torch" / "csrc" / "api" / "include") in cxx
    assert "csrc/activation_kernels.cu" not in dict(probe.commands(src, info, env, device="cuda", kernel=False))
