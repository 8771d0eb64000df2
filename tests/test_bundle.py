"""Offline bundles (issue 18): `invoke bundle`, `--from-bundle`, find-links trusted by the index check, and
every failure (also one before a step has a log) reaching `invoke diagnose`.

The fast tests use a tiny variant whose packages are small wheels made here and served by a local PEP 503
index; the build from the bundle then runs with every index URL pointed at a closed port, every proxy
variable pointed at it too, and UV_OFFLINE=1.  The network-closed fixture build is marked slow."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, fixture_variant, needs_pypi
from tiny_index import PACKAGES, _Index, _tiny, _wheel

CLOSED = "http://127.0.0.1:9/simple"   # the discard port: nothing listens, every connection is refused


def _manifest(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


# ------------------------------------------------------------------------------------------ making one

def test_bundle_resolves_downloads_and_reruns_add_nothing(harness, tmp_path, index):
    v = _tiny(tmp_path, index)
    b = tmp_path / "bundle"
    rc, out, err = harness("bundle", "--variant", v, "--out", b)
    assert rc == 0, out + err
    man = _manifest(b)
    names = sorted(Path(r).name for r in man["files"])
    # the torch step pins tinysub 1.2; tinydep (deps step) needs <1.2: as the install does, tinysub 1.0 then
    assert man["pins"]["torch"] == ["tinysub==1.2", "torch==2.6.0"] and "tinysub==1.0" in man["pins"]["deps"]
    assert "torch-2.6.0-py3-none-any.whl" in names and "vllm-0.0.1-py3-none-any.whl" in names
    assert "xtra-1.0-py3-none-any.whl" in names and "tinydep-0.3-py3-none-any.whl" in names
    for rel, info in man["files"].items():
        data = (b / rel).read_bytes()
        assert info["sha256"] == hashlib.sha256(data).hexdigest() and info["size"] == len(data)
        assert info["url"].startswith(index.rsplit("/simple", 1)[0] + "/files/")
    assert man["variant"]["sha256"] == hashlib.sha256(v.read_bytes()).hexdigest()
    assert man["target"]["python"] == "3.11" and man["missing"] == []
    assert man["pins"]["torch"] and "vllm==0.0.1" in man["pins"]["build"]
    assert "GiB" in out and "complete" in out
    # a second run: same resolution reused, every file already there, nothing asked of the index
    _Index.hits.clear()
    t0 = time.monotonic()
    rc, out, err = harness("bundle", "--variant", v, "--out", b)
    assert rc == 0 and time.monotonic() - t0 < 10
    assert [h for h in _Index.hits if h.startswith("/files/")] == []
    assert "downloaded" not in out
    # --check
    rc, out, err = harness("bundle", "--check", b)
    assert rc == 0 and "every sha256 matches" in out


def test_rerun_adds_only_what_is_missing(harness, tmp_path, index):
    v = _tiny(tmp_path, index)
    b = tmp_path / "bundle"
    assert harness("bundle", "--variant", v, "--out", b)[0] == 0
    gone = b / "wheels" / "xtra-1.0-py3-none-any.whl"
    gone.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (b / "wheels").iterdir()}
    rc, out, err = harness("bundle", "--check", b)
    assert rc == 2 and "xtra-1.0-py3-none-any.whl" in err and "invoke bundle --variant tiny" in err
    rc, out, err = harness("bundle", "--variant", v, "--out", b)
    assert rc == 0 and gone.is_file()
    after = {p.name: p.stat().st_mtime_ns for p in (b / "wheels").iterdir() if p.name in before}
    assert after == before   # the others untouched


def test_unreachable_index_lists_what_is_missing_and_how_to_fill_it(harness, tmp_path, index):
    v = _tiny(tmp_path, index)
    text = v.read_text().replace(f'index_url = "{index}"\n[deps]', f'index_url = "{index}"\n[deps]')
    # the post-install index unreachable (as the PyTorch cu118 index is from here)
    text = text.replace(f'packages = ["xtra==1.0"]\nindex_url = "{index}"', f'packages = ["xtra==1.0"]\nindex_url = "{CLOSED}"')
    v.write_text(text)
    b = tmp_path / "bundle"
    rc, out, err = harness("bundle", "--variant", v, "--out", b, "--json")
    assert rc == 1, out + err
    res = json.loads(out)
    assert [m["step"] for m in res["missing"]] == ["post-install"]
    m = res["missing"][0]
    assert m["requirements"] == ["xtra==1.0"] and m["source"] == CLOSED
    assert f"invoke bundle --variant tiny --out {b}" in m["fill"] and "pip download" in m["fill"]
    assert "--python-version 3.11" in m["fill"]
    # the rest is there; a build from it is refused, naming what is missing and the command
    assert any("torch-2.6.0" in r for r in _manifest(b)["files"])
    rc, out, err = harness("deps", "--variant", v, "--from-bundle", b)
    assert rc == 2 and "xtra==1.0" in err and "invoke bundle --variant tiny" in err, out + err


# ------------------------------------------------------------------------------------------ using one

def test_build_from_bundle_with_the_network_closed(harness, tmp_path, index, monkeypatch):
    v = _tiny(tmp_path, index)
    b = tmp_path / "bundle"
    assert harness("bundle", "--variant", v, "--out", b)[0] == 0
    # now closed: every index and proxy at a closed port, UV_OFFLINE, no pip config, no find-links here
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("UV_FIND_LINKS", raising=False)
    for k in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(k, "http://127.0.0.1:9")
    for k in ("PIP_INDEX_URL", "UV_INDEX_URL", "UV_DEFAULT_INDEX", "PIP_EXTRA_INDEX_URL", "UV_EXTRA_INDEX_URL"):
        monkeypatch.setenv(k, CLOSED)
    monkeypatch.setenv("UV_OFFLINE", "1")
    _Index.hits.clear()
    rc, out, err = harness("deps", "--variant", v, "--from-bundle", b)
    assert rc == 0, out + err
    assert _Index.hits == []   # the variant's own index was never asked
    state = Path(os.environ["VLLM_HARNESS_STATE"])
    py = state / "envs" / "tiny" / "bin" / "python"
    got = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('torch'), "
                          "m.version('tinydep'), m.version('tinysub'))"], capture_output=True, text=True)
    assert got.stdout.split() == ["2.6.0", "0.3", "1.0"]   # tinydep's tinysub<1.2 kept by the bundle's pins
    torch_log = (state / "logs" / "tiny" / "torch.log").read_text()
    assert "--offline" in torch_log and "--no-index" in torch_log and str(b / "wheels") in torch_log


def test_bad_bundles_are_refused_before_anything_is_installed(harness, tmp_path, index):
    v = _tiny(tmp_path, index)
    b = tmp_path / "bundle"
    assert harness("bundle", "--variant", v, "--out", b)[0] == 0
    state = Path(os.environ["VLLM_HARNESS_STATE"])
    venv = state / "envs" / "tiny"
    # a corrupted file (same size, other bytes)
    w = b / "wheels" / "tinydep-0.3-py3-none-any.whl"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    rc, out, err = harness("deps", "--variant", v, "--from-bundle", b)
    assert rc == 2 and "tinydep-0.3-py3-none-any.whl" in err and "sha256" in err and not venv.exists()
    rc, out, err = harness("bundle", "--check", b)
    assert rc == 2 and "tinydep-0.3" in err
    # another Python: the bundle's target is 3.11; a bundle for 3.12 is refused for this machine's 3.11
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    man = _manifest(b)
    man["target"]["python"] = "3.12"
    (b / "manifest.json").write_text(json.dumps(man))
    rc, out, err = harness("deps", "--variant", v, "--from-bundle", b)
    assert rc == 2 and "Python 3.12" in err and "--machine" in err and not venv.exists()
    # the variant file changed since the bundle was made
    man["target"]["python"] = "3.11"
    (b / "manifest.json").write_text(json.dumps(man))
    v.write_text(v.read_text().replace('packages = ["tinydep"]', 'packages = ["tinydep", "xtra"]'))
    rc, out, err = harness("deps", "--variant", v, "--from-bundle", b)
    assert rc == 2 and "another version of" in err and "invoke bundle --variant tiny" in err and not venv.exists()
    # not a bundle at all
    rc, out, err = harness("deps", "--variant", v, "--from-bundle", tmp_path)
    assert rc == 2 and "not a bundle" in err
    # diagnose names the bundle's problem (recorded although no step had a log)
    rc, out, err = harness("diagnose", "--json")
    rep = json.loads(out)
    assert "not a bundle" in json.dumps(rep)


def test_bundle_for_another_machine_profile(harness, tmp_path, index):
    v = _tiny(tmp_path, index)
    prof = tmp_path / "m.toml"
    prof.write_text('[machine]\narch = "x86_64"\npython = ["3.10.13"]\n')
    rc, out, err = harness("bundle", "--variant", v, "--out", tmp_path / "b", "--machine", prof)
    assert rc == 2 and "3.10.13" in err and "python = '>=3.11,<3.12'" in err
    prof.write_text('[machine]\narch = "x86_64"\npython = ["3.10.13", "3.11.9"]\n')
    rc, out, err = harness("bundle", "--variant", v, "--out", tmp_path / "b", "--machine", prof, "--json")
    assert rc == 0, err
    assert json.loads(out)["target"] == {"python": "3.11", "arch": "x86_64", "glibc": "2.28", "where": str(prof)}
    # a profile saved by doctor names its glibc: the bundle resolves for that manylinux
    prof.write_text('[machine]\narch = "x86_64"\nglibc = "2.17"\npython = ["3.11.9"]\n')
    rc, out, err = harness("bundle", "--variant", v, "--out", tmp_path / "b2", "--machine", prof, "--json")
    assert rc == 0, err
    assert json.loads(out)["target"]["glibc"] == "2.17"
    from vllm_harness.steps.bundle_files import Target
    assert Target(**json.loads(out)["target"]).uv_platform == "x86_64-manylinux_2_17"   # what uv resolves for


def test_archive(harness, tmp_path, index):
    import tarfile
    v = _tiny(tmp_path, index)
    rc, out, err = harness("bundle", "--variant", v, "--out", tmp_path / "b", "--archive", "--json")
    assert rc == 0
    tar = Path(json.loads(out)["archive"])
    with tarfile.open(tar) as t:
        names = t.getnames()
    assert "b/manifest.json" in names and "b/wheels/torch-2.6.0-py3-none-any.whl" in names


# ------------------------------------------------------------------------------------------ find-links

def test_index_check_trusts_find_links_that_hold_the_wheels(tmp_path, monkeypatch):
    from vllm_harness.core.errors import UsageError
    from vllm_harness.steps.context import held_locally, index_or_local
    links = tmp_path / "links"
    links.mkdir()
    env = {"UV_FIND_LINKS": str(links)}
    with pytest.raises(UsageError) as e:
        index_or_local(CLOSED, "x.toml [torch]", ["torch==2.6.0"], env)
    assert "Cannot reach the index" in e.value.message and "invoke bundle" in e.value.fix
    assert e.value.evidence.startswith("Could not fetch URL http://127.0.0.1:9/simple/: connection error")
    _wheel(links, "torch", "2.6.0")
    assert held_locally(["torch==2.6.0"], env) and not held_locally(["torch==2.7.0"], env)
    assert index_or_local(CLOSED, "x.toml [torch]", ["torch==2.6.0"], env) is True
    assert index_or_local(CLOSED, "x", ["torch==2.6.0"], {"PIP_FIND_LINKS": str(links)}) is True
    assert index_or_local(CLOSED, "x", ["torch==9"], {"UV_OFFLINE": "1"}) is True


def test_find_links_install_without_an_index(harness, tmp_path, index, monkeypatch):
    """The issue's first case: the index unreachable, UV_FIND_LINKS holding the wheels: the torch step installs
    from them (offline) instead of stopping at the index check."""
    links = tmp_path / "links"
    links.mkdir()
    for name, ver, req in PACKAGES:
        _wheel(links, name, ver, req)
    v = _tiny(tmp_path, CLOSED)
    monkeypatch.setenv("UV_FIND_LINKS", str(links))
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    rc, out, err = harness("deps", "--variant", v)
    state = Path(os.environ["VLLM_HARNESS_STATE"])
    torch_log = (state / "logs" / "tiny" / "torch.log").read_text()
    assert "--offline" in torch_log and str(links) in torch_log
    st = json.loads((state / "status" / "tiny.json").read_text())
    assert st["steps"]["torch"]["status"] == "ok"


# ------------------------------------------------------------------------------------------ diagnose

def test_failure_before_a_log_reaches_diagnose(harness, tmp_path, monkeypatch):
    """An unreachable index stops the torch step before it runs anything: last-failed still names a log with
    the message, and `invoke diagnose` (no arguments) says index-unreachable with the offline fix."""
    v = _tiny(tmp_path, CLOSED)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("UV_FIND_LINKS", raising=False)
    rc, out, err = harness("deps", "--variant", v)
    assert rc == 2 and "Cannot reach the index" in err
    state = Path(os.environ["VLLM_HARNESS_STATE"])
    last = json.loads((state / "last-failed.json").read_text())
    assert last["step"] == "torch" and "Cannot reach the index" in last["message"]
    st = json.loads((state / "status" / "tiny.json").read_text())
    assert st["steps"]["torch"]["status"] == "failed" and st["steps"]["torch"]["log"] == last["log"]
    rc, out, err = harness("diagnose", "--json")
    rep = json.loads(out)
    assert rc == 1 and rep["findings"][0]["id"] == "index-unreachable"
    assert "FIND_LINKS" in rep["findings"][0]["fix"]


def test_lock_refusal_reaches_diagnose(harness, tmp_path):
    """Another run holds the variant and --no-wait fails at once: recorded (step 'lock'), and diagnose with no
    arguments shows that message and its fix."""
    import sys
    v = _tiny(tmp_path, CLOSED)
    state = Path(os.environ["VLLM_HARNESS_STATE"])
    assert harness("bundle", "--check", tmp_path)[0] == 2   # makes the state folder (with its marker)
    lock = state / "locks" / "tiny.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               "lk = FileLock(sys.argv[1]); lk.acquire(); print('held', flush=True); time.sleep(60)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, out, err = harness("deps", "--variant", v, "--no-wait")
    finally:
        holder.kill()
        holder.wait()
    assert rc != 0 and "in use" in err
    last = json.loads((state / "last-failed.json").read_text())
    assert last["step"] == "lock" and "in use" in last["message"]
    log = Path(last["log"]).read_text()
    assert "ERROR: " in log and "in use" in log
    rc, out, err = harness("diagnose")
    assert "in use" in " ".join(out.split())


# ------------------------------------------------------------------------------------------ slow proof

@pytest.mark.slow
def test_fixture_build_from_bundle_network_closed(harness, tmp_path, monkeypatch):
    """The fixture (source mode, CPU) bundled with PyPI reachable, then built from the bundle with every index
    and proxy at a closed port and UV_OFFLINE=1: the build finishes and vllm._C loads."""
    needs_pypi()
    v = fixture_variant(tmp_path)
    b = tmp_path / "bundle"
    rc, out, err = harness("bundle", "--variant", v, "--out", b)
    assert rc == 0, out + err
    monkeypatch.setenv("VLLM_HARNESS_STATE", str(tmp_path / "state-offline"))
    for k in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(k, "http://127.0.0.1:9")
    for k in ("PIP_INDEX_URL", "UV_INDEX_URL", "UV_DEFAULT_INDEX", "PIP_EXTRA_INDEX_URL", "UV_EXTRA_INDEX_URL"):
        monkeypatch.setenv(k, CLOSED)
    monkeypatch.setenv("UV_OFFLINE", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("UV_FIND_LINKS", raising=False)
    rc, out, err = harness("build-variant", "--variant", v, "--from-bundle", b, "--skip-doctor")
    assert rc == 0, out + err
    st = json.loads((tmp_path / "state-offline" / "status" / f"{v.stem}.json").read_text())
    assert st["built"] is True
    assert ROOT  # the fixture tree is the checkout's
