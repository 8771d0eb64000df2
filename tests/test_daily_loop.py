"""The daily loop's speed work (issue 17), as behaviour: one resolution of torch, the deps and the vLLM wheel
(the wheel downloaded once, checked, unpacked beside the torch step), pip seeded offline from the interpreter's
own wheel, and interpreter discovery that asks each candidate once and finds uv's interpreters without
`uv python list`.  The speed itself is shown by benchmarks/bench_install.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny_index import _Index, _tiny, _wheel, anchor

from vllm_harness.facts import pythons


def _state() -> Path:
    return Path(os.environ["VLLM_HARNESS_STATE"])


def _versions(py: Path, *names: str) -> list[str | None]:
    code = ("import importlib.metadata as m, sys\nfor n in sys.argv[1:]:\n    try: print(m.version(n))\n"
            "    except Exception: print(None)")
    out = subprocess.run([str(py), "-c", code, *names], capture_output=True, text=True).stdout.split()
    return [None if x == "None" else x for x in out]


def test_one_resolution_installs_everything_but_vllm_with_torch_then_the_checked_wheel(harness, tmp_path, index):
    v = _tiny(tmp_path, index)
    _Index.hits.clear()
    rc, out, err = harness("build-variant", "--variant", v, "--skip-doctor")
    state = _state()
    st = json.loads((state / "status" / "tiny.json").read_text())
    assert all(st["steps"][s]["status"] == "ok" for s in ("env", "torch", "deps", "build")), out + err
    logs = state / "logs" / "tiny"
    torch_log = (logs / "torch.log").read_text()
    # one resolution: uv compiled torch, the deps and the vLLM requirement together
    assert "pip compile" in torch_log
    resolved = (logs / "torch-resolution.txt").read_text().split()
    assert {"torch==2.6.0", "tinydep==0.3", "tinysub==1.0", "vllm==0.0.1"} <= set(resolved)
    assert "one resolution" in st["steps"]["torch"]["note"]
    # the torch step installed the deps of vLLM (tinydep's tinysub<1.2 kept), but not vLLM itself
    install_line = next(ln for ln in torch_log.splitlines() if ln.startswith("$") and " pip install " in ln)
    assert "tinydep==0.3" in install_line and "vllm" not in install_line
    py = state / "envs" / "tiny" / "bin" / "python"
    assert _versions(py, "torch", "tinydep", "tinysub", "vllm") == ["2.6.0", "0.3", "1.0", "0.0.1"]
    # vLLM's wheel came from the index once (the download beside torch), was checked and installed as that file
    assert [h for h in _Index.hits if h.startswith("/files/vllm-") and h.endswith(".whl")] == [
        "/files/vllm-0.0.1-py3-none-any.whl"]
    build_log = (logs / "build.log").read_text()
    assert "# wheel check: pass: wheel vllm 0.0.1: torch pin" in build_log
    assert "unpacked into uv's cache" in build_log and "downloaded in the background" in build_log
    assert st["steps"]["build"]["wheel"].endswith("vllm-0.0.1-py3-none-any.whl")


def test_a_wheel_that_does_not_resolve_with_the_variant_torch_is_still_refused_with_its_reason(harness, tmp_path,
                                                                                              index):
    """vLLM 0.0.2 pins another torch: the three do not resolve together, so the torch step installs torch alone
    (uv's reason in its log) and the build step's wheel check refuses the wheel before it is installed."""
    root = tmp_path / "index" / "simple"   # the index fixture's pages (same tmp_path)
    w = _wheel(root.parent / "files", "vllm", "0.0.2", ("torch==9.0",))
    page = root / "vllm" / "index.html"
    page.write_text(page.read_text().replace("</body>", anchor(w) + "</body>"))
    v = _tiny(tmp_path, index)
    v.write_text(v.read_text().replace('version = "0.0.1"', 'version = "0.0.2"'))
    rc, out, err = harness("build-variant", "--variant", v, "--skip-doctor")
    assert rc != 0
    logs = _state() / "logs" / "tiny"
    assert "do not resolve together" in (logs / "torch.log").read_text()
    build_log = (logs / "build.log").read_text()
    assert "REFUSED" in build_log and "torch pin" in build_log
    py = _state() / "envs" / "tiny" / "bin" / "python"
    assert _versions(py, "torch", "vllm") == ["2.6.0", None]


def test_pip_is_seeded_offline_from_the_interpreters_own_wheel(harness, tmp_path, index):
    v = _tiny(tmp_path, index)
    rc, out, err = harness("deps", "--variant", v)
    assert rc == 0, out + err
    env_log = (_state() / "logs" / "tiny" / "env.log").read_text()
    assert "--offline" in env_log and "ensurepip/_bundled/pip-" in env_log
    py = _state() / "envs" / "tiny" / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("pip ")


def test_discovery_finds_uv_managed_interpreters_in_uv_python_dir(tmp_path):
    managed = tmp_path / "uv-python"
    (managed / "cpython-3.99.0-linux-x86_64-gnu" / "bin").mkdir(parents=True)
    (managed / "cpython-3.99.0-linux-x86_64-gnu" / "bin" / "python3").symlink_to(sys.executable)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    uv = bindir / "uv"
    uv.write_text(f"#!/bin/sh\n[ \"$1 $2\" = 'python dir' ] && echo {managed} && exit 0\nexit 3\n")
    uv.chmod(0o755)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    cands = pythons._candidates(env)
    assert (str(managed / "cpython-3.99.0-linux-x86_64-gnu" / "bin" / "python3"), "uv") in cands


def test_each_candidate_is_probed_once_per_process_while_unchanged(tmp_path, monkeypatch):
    calls = []
    real = pythons._probe
    monkeypatch.setattr(pythons, "_probe", lambda p, o, timeout=15.0: calls.append(p) or real(p, o))
    monkeypatch.setattr(pythons, "_PROBED", {})
    exe = tmp_path / "python3"
    exe.symlink_to(sys.executable)
    assert pythons._probe_once(str(exe), "PATH").version.startswith(f"{sys.version_info[0]}.")
    pythons._probe_once(str(exe), "PATH")
    assert calls == [str(exe)]
    # a changed file is asked again
    exe.unlink()
    exe.write_text("#!/bin/sh\nexit 7\n")
    exe.chmod(0o755)
    assert "exit 7" in pythons._probe_once(str(exe), "PATH")
    assert calls == [str(exe), str(exe)]
