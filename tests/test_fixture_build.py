"""The vLLM-shaped fixture built end to end through the same code path as a real source variant.

CPU flavour here (the CUDA flavour runs on a GPU machine: see README).  Needs PyPI for cmake/ninja/setuptools.
"""

import json

import pytest
from conftest import ROOT, fixture_variant, needs_pypi, status_of

pytestmark = pytest.mark.slow


def test_fixture_builds_verifies_and_reuses_its_steps(harness, state, tmp_path):
    needs_pypi()
    variant = fixture_variant(tmp_path)
    rc, out, err = harness("build-variant", "--variant", variant, "--skip-doctor")
    assert rc == 0, out + err
    assert "VERIFIED (" in out and "checks passed)" in out
    st = status_of(state, "fixture-cpu")
    assert st["built"] is True and st["steps"]["verify"]["status"] == "ok"
    assert [s for s in ["fetch", "prepare", "env", "torch", "deps", "build", "post-install", "verify"]
            if st["steps"][s]["status"] != "ok"] == []
    # torch stayed the variant's CPU torch 2.13.0 (the fixture's own pins name torch 2.5.1)
    assert st["steps"]["torch"]["versions"]["torch"].startswith("2.13.0")
    assert "torch" not in (state / "src" / "fixture-cpu" / "vllm-mini" / "requirements" / "build.txt").read_text()
    # the venv's cmake (>= 3.26), not the system one, configured the build
    build_log = (state / "logs" / "fixture-cpu" / "build.log").read_text()
    assert "MAX_JOBS" in build_log or "max_jobs" in build_log.lower()
    # the repo's fixture tree was not touched (the harness works on a copy)
    assert "torch==2.5.1" in (ROOT / "tests/fixtures/vllm-mini/requirements/build.txt").read_text()

    # a second run reuses every step, verify too (its inputs are unchanged); with nothing to build, doctor (the
    # guard before slow work) is skipped and says so
    rc, out, err = harness("build-variant", "--variant", variant)
    assert rc == 0, out + err
    assert "· doctor" in out and "skipped: every step is done" in out
    assert not (state / "logs" / "fixture-cpu" / "doctor.log").exists()
    # doctor on this tree: the fixture's deliberate torch 2.5.1 pin is outweighed by the compile probe that passed
    rc, dout, err = harness("doctor", "--variant", variant, "--json")
    pin = [f for f in json.loads(dout)["findings"] if f["id"] == "torch-api-mismatch"]
    assert pin and pin[0]["severity"] == "warning" and "compile probe" in pin[0]["evidence"], pin
    for step in ["fetch", "prepare", "env", "torch", "deps", "build", "post-install"]:
        assert f"· {step}" in out and "reused" in out
    assert "VERIFIED" in out and "verified earlier (" in out and "inputs unchanged" in out
    verified_at = status_of(state, "fixture-cpu")["steps"]["verify"]["finished"]

    # the JSON of verify, as the contract gives it
    rc, out, err = harness("verify", "--variant", variant, "--json")
    data = json.loads(out)
    assert rc == 0 and data["gpus"] == [] and {c["status"] for c in data["checks"]} == {"pass"}
    layers = [c["layer"] for c in data["checks"]]
    assert layers == sorted(layers, key=["environment", "binaries", "imports", "kernels", "speed",
                                         "multi-gpu"].index)
    assert data["binaries"]["libraries"] == 1 and "binaries" in data["layer_seconds"]
    names = {c["name"] for c in data["checks"]}
    assert {"rms_norm bfloat16 (cpu)", "fused_add_rms_norm float16 (cpu)", "silu_and_mul float32 (cpu)",
            "rotary_embedding float32 (cpu)"} <= names
    assert data["reused"]["verified_at"] == verified_at   # the build's result, its inputs unchanged

    # --reverify runs the checks again and records the new result; a changed env does the same by itself
    rc, out, err = harness("verify", "--variant", variant, "--reverify", "--json")
    assert rc == 0 and "reused" not in json.loads(out), out + err
    again = status_of(state, "fixture-cpu")["steps"]["verify"]
    assert again["finished"] > verified_at and again["status"] == "ok"
    site = next((state / "envs" / "fixture-cpu").glob("lib/python*/site-packages"))
    (site / "extra_dist-1.0.dist-info").mkdir()
    (site / "extra_dist-1.0.dist-info" / "RECORD").write_text("extra_dist.py,,\n")
    rc, out, err = harness("build-variant", "--variant", variant, "--skip-doctor")
    assert rc == 0 and "verified earlier" not in out and "VERIFIED (" in out, out + err


def test_old_cmake_fails_the_build_and_leaves_the_env_marked_not_built(harness, state, tmp_path):
    """Without cmake>=3.26 in the venv, the system cmake (3.25 here) is used: the source document's failure 3."""
    needs_pypi()
    import shutil
    import subprocess
    cmake = shutil.which("cmake")
    if not cmake:
        pytest.skip("no system cmake on PATH")
    ver = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout.split()[2]
    if tuple(int(x) for x in ver.split(".")[:2]) >= (3, 26):
        pytest.skip(f"system cmake {ver} is new enough: this failure cannot be reproduced here")
    # a source tree whose build requirements do not bring cmake (the fixture's own list names cmake>=3.26)
    src = tmp_path / "vllm-mini"
    shutil.copytree(ROOT / "tests" / "fixtures" / "vllm-mini", src)
    reqs = src / "requirements" / "build.txt"
    reqs.write_text("".join(ln for ln in reqs.read_text().splitlines(True) if not ln.startswith("cmake")))
    variant = fixture_variant(tmp_path, name="fixture-oldcmake", deps='["ninja"]')
    variant.write_text(variant.read_text().replace(str(ROOT / "tests" / "fixtures" / "vllm-mini"), str(src)))
    rc, out, err = harness("build-variant", "--variant", variant, "--skip-doctor")
    assert rc == 1
    st = status_of(state, "fixture-oldcmake")
    assert st["built"] is False and st["steps"]["build"]["status"] == "failed"
    assert "post-install" not in st["steps"] and "verify" not in st["steps"]
    log = (state / "logs" / "fixture-oldcmake" / "build.log").read_text()
    assert "CMake 3.26 or higher is required" in log
    assert "cmake-too-old" in out  # diagnose named the cause under the summary
    last = json.loads((state / "last-failed.json").read_text())
    assert last["step"] == "build" and last["variant"] == "fixture-oldcmake"
    rc, out, err = harness("diagnose", "--json")
    assert json.loads(out)["findings"][0]["id"] == "cmake-too-old"
