"""Shared test helpers: run the harness's CLI in-process against a private state folder."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vllm_harness.cli import main as harness_main  # noqa: E402


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
    r = subprocess.run([python, "-m", "pip", "download", "--no-deps", "--no-index", "-d",
                        "/tmp/.harness-probe", "torch==2.13.0", "--progress-bar", "off"],
                       capture_output=True, text=True, timeout=600)
    shutil.rmtree("/tmp/.harness-probe", ignore_errors=True)
    return r.returncode == 0 and "+cpu" in (r.stdout + r.stderr)


def fixture_variant(tmp_path: Path, name: str = "fixture-cpu", deps: str = '["cmake>=3.26", "ninja"]',
                    extra_build: str = "") -> Path:
    """A copy of tests/envs/fixture-cpu.toml that finds a CPU torch on this machine or on PyTorch's CPU index."""
    text = (ROOT / "tests" / "envs" / "fixture-cpu.toml").read_text()
    text = text.replace('path = "../fixtures/vllm-mini"', f'path = "{ROOT / "tests" / "fixtures" / "vllm-mini"}"')
    text = text.replace('packages = ["cmake>=3.26", "ninja"]', f"packages = {deps}")
    if extra_build:
        text = text.replace("[build]\n", "[build]\n" + extra_build + "\n")
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
    """A venv with a CPU torch (this machine's local 2.13.0 wheel, else PyTorch's CPU index)."""
    needs_pypi()
    venv = tmp_path_factory.mktemp("torch-venv") / "venv"
    base = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    cmd = [str(py), "-m", "pip", "install", "-q", "torch==2.13.0", "numpy"]
    if not local_cpu_torch():
        cmd += ["--index-url", "https://download.pytorch.org/whl/cpu", "--extra-index-url", "https://pypi.org/simple"]
    subprocess.run(cmd, check=True, timeout=1800)
    return py


def live_pids_with(marker: str) -> list[int]:
    """The running processes (not zombies) whose command line holds ``marker``, this one excepted."""
    import os

    from vllm_harness.steps.build_cache import _alive

    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker.encode() in (d / "cmdline").read_bytes() and _alive(int(d.name)):
                    out.append(int(d.name))
            except OSError:
                continue
    return out
