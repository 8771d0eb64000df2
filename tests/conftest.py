"""Shared test helpers: run the harness's CLI in-process against a private state folder."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tiny_index import index  # noqa: E402,F401  (the tiny local package index fixture, for every test module)

from vllm_harness.cli import main as harness_main  # noqa: E402


def _shared_dir(tmp_path_factory, name: str) -> Path:
    """A folder every test of this run shares, pytest-xdist's workers too (their base folders are siblings)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session", autouse=True)
def _one_compiler_cache_and_uv(tmp_path_factory):
    """The run's builds of the fixture share one compiler cache (VLLM_HARNESS_CACHE_DIR): the first build
    compiles, the later ones (other state folders, other tests) are cache hits through the same code path.  A
    test about cold builds names its own cache.  uv finds the local CPU torch wheel where pip does."""
    saved = {k: os.environ.get(k) for k in ("VLLM_HARNESS_CACHE_DIR", "UV_FIND_LINKS")}
    os.environ["VLLM_HARNESS_CACHE_DIR"] = str(_shared_dir(tmp_path_factory, "compiler-cache"))
    if os.environ.get("PIP_FIND_LINKS") and not os.environ.get("UV_FIND_LINKS"):
        os.environ["UV_FIND_LINKS"] = os.environ["PIP_FIND_LINKS"]
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def pytest_runtest_setup(item):
    """A slow test's name when it starts (the dots say nothing for minutes); to the terminal from xdist's
    workers too."""
    if item.get_closest_marker("slow") is None:
        return
    line = f"\n[{os.environ.get('PYTEST_XDIST_WORKER', 'run')}] {time.strftime('%H:%M:%S')} start: {item.nodeid}\n"
    tr = item.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None and not os.environ.get("PYTEST_XDIST_WORKER"):
        tr.write(line)
    else:
        os.write(2, line.encode())


@pytest.fixture
def state(tmp_path, monkeypatch):
    st = tmp_path / "state"
    monkeypatch.setenv("VLLM_HARNESS_STATE", str(st))
    monkeypatch.setenv("VLLM_HARNESS_ROOT", str(ROOT))
    return st


@pytest.fixture
def harness(state, capsys):
    """Run `python -m vllm_harness ARGS` in-process; returns (exit code, stdout, stderr)."""
    def run(*args):
        rc = harness_main([str(a) for a in args])
        out = capsys.readouterr()
        return rc, out.out, out.err
    return run


@functools.cache
def pypi_reachable() -> bool:
    try:
        with urllib.request.urlopen("https://pypi.org/simple/ninja/", timeout=10) as r:
            return r.status == 200
    except Exception:
        return False


def needs_pypi():
    if not pypi_reachable():
        pytest.skip("needs PyPI (https://pypi.org unreachable from this machine)")


@functools.cache
def local_cpu_torch() -> bool:
    """True when pip can install the CPU torch 2.13.0 wheel without an index (a find-links dir has it)."""
    if sys.version_info[:2] != (3, 11):
        return False
    # the base interpreter: a uv-made test venv (nox's) has no pip of its own
    python = getattr(sys, "_base_executable", None) or sys.executable
    import tempfile
    scratch = tempfile.mkdtemp(prefix=".harness-probe-")   # one per process: pytest-xdist's workers ask at once
    r = subprocess.run([python, "-m", "pip", "download", "--no-deps", "--no-index", "-d",
                        scratch, "torch==2.13.0", "--progress-bar", "off"],
                       capture_output=True, text=True, timeout=600)
    shutil.rmtree(scratch, ignore_errors=True)
    return r.returncode == 0 and "+cpu" in (r.stdout + r.stderr)


def fixture_variant(tmp_path: Path, name: str = "fixture-cpu", deps: str = '["cmake>=3.26", "ninja"]',
                    extra_build: str = "") -> Path:
    """A copy of tests/envs/fixture-cpu.toml that finds a CPU torch on this machine or on PyTorch's CPU index."""
    text = (ROOT / "tests" / "envs" / "fixture-cpu.toml").read_text()
    text = text.replace('path = "../fixtures/vllm-mini"', f'path = "{ROOT / "tests" / "fixtures" / "vllm-mini"}"')
    text = text.replace('packages = ["cmake>=3.26", "ninja"]', f"packages = {deps}")
    if extra_build:
        text = text.replace("[build]\n", "[build]\n" + extra_build + "\n")
    if local_cpu_torch() and os.environ.get("UV_FIND_LINKS"):
        text = text.replace('installer = "pip"', 'installer = "uv"')  # the local wheel through uv's cache
    if not local_cpu_torch():
        # a fresh machine: the CPU build of torch 2.13.0 from PyTorch's CPU index, any Python it has wheels for
        text = text.replace('packages = ["torch==2.13.0"]',
                            'packages = ["torch==2.13.0"]\nindex_url = "https://download.pytorch.org/whl/cpu"')
        text = text.replace('python = ">=3.11,<3.12"', 'python = ">=3.10,<3.14"')
    p = tmp_path / f"{name}.toml"
    p.write_text(text)
    return p


def status_of(state: Path, variant: str) -> dict:
    return json.loads((state / "status" / f"{variant}.json").read_text())


@pytest.fixture(scope="session")
def torch_python(tmp_path_factory) -> Path:
    """A venv with a CPU torch (this machine's local 2.13.0 wheel, else PyTorch's CPU index): made once per run,
    pytest-xdist's workers share it (the first makes it under a lock)."""
    needs_pypi()
    from filelock import FileLock
    shared = _shared_dir(tmp_path_factory, "torch-venv")
    venv = shared / "venv"
    py = venv / "bin" / "python"
    with FileLock(str(shared / ".lock")):
        if (shared / "done").is_file():
            return py
        shutil.rmtree(venv, ignore_errors=True)
        base = getattr(sys, "_base_executable", None) or sys.executable
        subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=300)
        cmd = [str(py), "-m", "pip", "install", "-q", "torch==2.13.0", "numpy"]
        if not local_cpu_torch():
            cmd += ["--index-url", "https://download.pytorch.org/whl/cpu", "--extra-index-url",
                    "https://pypi.org/simple"]
        subprocess.run(cmd, check=True, timeout=1800)
        (shared / "done").write_text("ok\n")
    return py


def live_pids_with(marker: str) -> list[int]:
    """The running processes (not zombies) whose command line holds ``marker``, this one excepted."""
    import os

    from vllm_harness.toolchain.compiler_cache import _alive

    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker.encode() in (d / "cmdline").read_bytes() and _alive(int(d.name)):
                    out.append(int(d.name))
            except OSError:
                continue
    return out
