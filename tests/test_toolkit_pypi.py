"""Toolkits without root: `[build] toolkit = "pypi"` (NVIDIA's CUDA 13 wheels in the variant's venv), the
completeness check of a toolkit, and doctor's distribution-aware fix for a missing one.

The slow test builds the fixture's CUDA flavour with CUDA 13 from PyPI and no system toolkit on PATH (it needs
PyPI: torch 2.11.0 and its CUDA wheels, ~3 GB; no GPU, only nvcc)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, needs_pypi, status_of

from vllm_harness.core.errors import UsageError
from vllm_harness.doctor import report as doctor
from vllm_harness.facts import machine, toolkit
from vllm_harness.facts.cuda_toolkits import toolkit_missing
from vllm_harness.facts.machine_profile import dump_profile, parse_profile, validate_profile
from vllm_harness.facts.variants import load_variant_file, parse_variant

# torch 2.11.0's own Requires-Dist lines (its manylinux x86_64 wheel's metadata on PyPI)
TORCH_211_REQUIRES = [
    'cuda-toolkit[cublas,cudart,cufft,cufile,cupti,curand,cusolver,cusparse,nvjitlink,nvrtc,nvtx]==13.0.2; '
    'platform_system == "Linux"',
    'cuda-bindings<14,>=13.0.3; platform_system == "Linux"',
    'nvidia-cudnn-cu13==9.19.0.56; platform_system == "Linux"',
    'nvidia-nccl-cu13==2.28.9; platform_system == "Linux"',
    "filelock",
    'opt-einsum>=3.3; extra == "opt-einsum"',
]
FIXTURE = ROOT / "tests" / "fixtures" / "vllm-mini"


def _variant_text(cuda: str = "13.0", toolkit_line: str = 'toolkit = "pypi"', torch: str = "2.11.0") -> str:
    return f"""description = "fixture, CUDA {cuda} flavour, toolkit from PyPI"
cuda = "{cuda}"
python = ">=3.11,<3.12"
installer = "pip"

[torch]
version = "{torch}"
packages = ["torch=={torch}"]

[vllm]
version = "0.0.1"
mode = "source"
source = "path"
path = "{FIXTURE}"

[deps]
packages = ["cmake>=3.26", "ninja"]

[build]
jobs = 2
arch_list = "9.0"
{toolkit_line}
env = {{ VLLM_TARGET_DEVICE = "cuda" }}

[verify]
extensions = ["vllm._C"]
"""


# ------------------------------------------------------------------------------------------ the variant key

def test_toolkit_key_defaults_to_system_and_takes_pypi():
    v = parse_variant("x", Path("envs/x.toml"), _variant_text(toolkit_line=""))
    assert v.build["toolkit"] == "system"
    v = parse_variant("x", Path("envs/x.toml"), _variant_text())
    assert v.build["toolkit"] == "pypi"


def test_pypi_toolkit_for_cuda_12_is_refused_with_the_reason():
    with pytest.raises(UsageError) as e:
        parse_variant("x", Path("envs/x.toml"), _variant_text(cuda="12.4", torch="2.6.0"))
    msg = str(e.value.message) + " " + str(e.value.fix)
    assert "envs/x.toml: key 'build.toolkit'" in msg and "ptxas alone" in msg
    assert 'toolkit = "system"' in msg


def test_unknown_toolkit_value_names_the_choices():
    with pytest.raises(UsageError) as e:
        parse_variant("x", Path("envs/x.toml"), _variant_text(toolkit_line='toolkit = "conda"'))
    assert "build.toolkit" in e.value.message and "system, pypi" in e.value.fix


# ------------------------------------------------------------------------------------ which wheels to install

def test_requirements_follow_torchs_own_cuda_toolkit_pin():
    reqs, why = toolkit.pypi_requirements("13.0", TORCH_211_REQUIRES, "2.11.0")
    # crt and nvvm by name: cuda-toolkit 13.0.2's 'nvcc' extra names nvidia-cuda-nvcc alone, whose unpinned
    # crt/nvvm requirements resolve to 13.5.x
    assert reqs == ["cuda-toolkit[nvcc,crt,nvvm,cccl,cudart]==13.0.2"]
    assert "torch 2.11.0 pins cuda-toolkit==13.0.2" == why


def test_requirements_without_a_pin_take_the_variants_cuda_series():
    reqs, why = toolkit.pypi_requirements("13.0", ["filelock", "nvidia-nccl-cu13==2.28.9"], "2.12.0")
    assert reqs == ["cuda-toolkit[nvcc,crt,nvvm,cccl,cudart]==13.0.*"] and "no cuda-toolkit pin" in why


def test_torch_for_another_cuda_than_the_variant_is_a_usage_error():
    with pytest.raises(UsageError) as e:
        toolkit.pypi_requirements("13.1", TORCH_211_REQUIRES, "2.11.0")
    assert "cuda-toolkit==13.0.2" in e.value.message and 'cuda = "13.0"' in e.value.fix


# ------------------------------------------------------------------------------ completeness and the links

def _exe(p: Path) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("#!/bin/sh\n")
    p.chmod(0o755)


def _wheel_layout(root: Path) -> None:
    """nvidia/cu13/ as cuda-toolkit[nvcc,crt,nvvm,cccl,cudart] 13.0.x lays it out (lib/ only, versioned names)."""
    for tool in ("nvcc", "cudafe++", "ptxas", "fatbinary", "nvlink"):
        _exe(root / "bin" / tool)
    _exe(root / "nvvm" / "bin" / "cicc")
    for header in ("cuda_runtime.h", "crt/host_config.h", "cccl/nv/target"):
        (root / "include" / header).parent.mkdir(parents=True, exist_ok=True)
        (root / "include" / header).write_text("")
    (root / "lib").mkdir()
    for lib in ("libcudart.so.13", "libcudart_static.a", "libcudadevrt.a", "libnvrtc-builtins.so.13.0",
                "libnvperf_host.so"):
        (root / "lib" / lib).write_text("")


def test_a_cu12_nvcc_wheel_is_incomplete(tmp_path):
    # nvidia-cuda-nvcc-cu12 12.4.131 / 12.9 and -cu11 11.8.89: bin/ptxas, crt headers, nvvm/libdevice; no nvcc
    root = tmp_path / "nvidia" / "cuda_nvcc"
    _exe(root / "bin" / "ptxas")
    (root / "include" / "crt").mkdir(parents=True)
    (root / "include" / "crt" / "host_config.h").write_text("")
    missing = toolkit_missing(root, "12.4")
    assert missing[:3] == ["bin/nvcc", "bin/cudafe++", "bin/fatbinary"]
    assert "bin/ptxas" not in missing and "include/cuda_runtime.h" in missing and "nvvm/bin/cicc" in missing


def test_wheel_layout_needs_lib64_and_the_links_make_it_complete(tmp_path):
    venv = tmp_path / "venv"
    root = venv / "lib" / "python3.11" / "site-packages" / "nvidia" / "cu13"
    _wheel_layout(root)
    assert toolkit_missing(root, "13.0") == ["lib64/libcudart_static.a"]
    made = toolkit.link_pypi_toolkit(root, venv)
    assert made == ["lib64 -> lib", "lib/libcudart.so -> libcudart.so.13",
                    "lib/libnvrtc-builtins.so -> libnvrtc-builtins.so.13.0"]
    assert os.readlink(root / "lib64") == "lib" and (root / "lib" / "libcudart.so").resolve().name == "libcudart.so.13"
    assert toolkit_missing(root, "13.0") == []
    assert toolkit.link_pypi_toolkit(root, venv) == []  # done once
    # CUDA 13's headers include CCCL's nv/target
    (root / "include" / "cccl" / "nv" / "target").unlink()
    assert toolkit_missing(root, "13.0") == ["include/cccl/nv/target"]


def test_links_are_never_made_outside_the_venv(tmp_path):
    root = tmp_path / "elsewhere" / "nvidia" / "cu13"
    _wheel_layout(root)
    assert toolkit.link_pypi_toolkit(root, tmp_path / "venv") == []
    assert not (root / "lib64").exists() and not (root / "lib" / "libcudart.so").exists()


def test_probe_reports_an_incomplete_toolkit(tmp_path):
    tk = tmp_path / "cuda-13.0"
    _exe(tk / "bin" / "nvcc")
    (tk / "bin" / "nvcc").write_text('#!/bin/sh\necho "Cuda compilation tools, release 13.0, V13.0.88"\n')
    (tk / "include").mkdir()
    (tk / "include" / "cuda_runtime.h").write_text("")
    env = {"PATH": str(tmp_path / "empty"), "CUDA_HOME": str(tk), "HOME": str(tmp_path)}
    toolkits, _no_nvcc, incomplete = machine.probe_toolkits_full(env)
    assert toolkits["13.0"] == str(tk)
    assert incomplete == [f"{tk} (CUDA 13.0): no bin/cudafe++, bin/ptxas, bin/fatbinary, nvvm/bin/cicc, "
                          "include/crt/host_config.h, include/cccl/nv/target, lib64/libcudart_static.a"]
    prof = validate_profile({"machine": {"cuda_toolkits": toolkits, "cuda_incomplete": incomplete}})
    assert parse_profile(dump_profile(prof)) == prof


# ------------------------------------------------------------------------------------- doctor's fix

def test_install_fix_names_what_works_on_the_distribution():
    f = toolkit.install_fix("debian-12", "11.8")
    assert f.startswith("install the CUDA 11.8 toolkit; on debian-12: apt install nvidia-cuda-toolkit from Debian's "
                        "non-free")
    assert "conda install -c nvidia/label/cuda-11.8.0 cuda-nvcc" in f and 'toolkit = "pypi"' not in f
    f = toolkit.install_fix("debian-12", "12.4")
    assert "nvidia-cuda-toolkit from" not in f and "(debian-12's own nvidia-cuda-toolkit is CUDA 11.8, not 12.4)" in f
    assert "repos/debian12/x86_64/" in f and "apt install cuda-toolkit-12-4" in f
    assert "conda install -c conda-forge cuda-nvcc=12.4" in f
    f = toolkit.install_fix("ubuntu-22.04", "13.0", "aarch64")
    assert "repos/ubuntu2204/sbsa/" in f and '[build] toolkit = "pypi"' in f
    f = toolkit.install_fix("rocky-9.3", "12.4")
    assert "NVIDIA's dnf repository for rhel9" in f and "dnf install cuda-toolkit-12-4" in f
    assert toolkit.install_fix(None, "12.4").startswith("install the CUDA 12.4 toolkit; here: NVIDIA's runfile")


def _cu118(tmp_path, extra: str = ""):
    text = (ROOT / "envs" / "cu118.toml").read_text()
    p = tmp_path / "cu118.toml"
    p.write_text(text.replace("[build]\n", "[build]\n" + extra) if extra else text)
    return load_variant_file(p)


def _by_check(findings, fid):
    return [f for f in findings if f.id == fid]


def test_doctor_on_debian_12_without_a_toolkit_names_debians_cuda_118(tmp_path):
    prof = {"machine": {"os": "debian-12", "arch": "x86_64", "cuda_toolkits": {"13.0": "/usr/local/cuda-13.0"},
                        "gcc": "12.2.0", "gcc_alternatives": ["11.3.0", "12.2.0"]}, "gpu": []}
    fs = doctor.check(_cu118(tmp_path), prof, env={})
    tk = [f for f in fs if f.subject == "CUDA 11.8 toolkit"]
    assert [f.id for f in tk] == ["cuda-torch-version-mismatch"] and tk[0].severity == "error"
    assert "apt install nvidia-cuda-toolkit from Debian's non-free" in tk[0].fix
    # with Debian's toolkit installed: found at /usr, and gcc-11 is taken for it
    prof["machine"]["cuda_toolkits"]["11.8"] = "/usr"
    fs = doctor.check(_cu118(tmp_path), prof, env={})
    assert not [f for f in fs if f.subject == "CUDA 11.8 toolkit"]
    gcc = _by_check(fs, "host-compiler-unsupported")
    assert gcc and gcc[0].severity == "info" and "CC=gcc-11" in gcc[0].fix


def test_doctor_warns_about_an_incomplete_toolkit(tmp_path):
    prof = {"machine": {"os": "debian-12", "cuda_toolkits": {"11.8": "/opt/cu118"},
                        "cuda_incomplete": ["/opt/cu118 (CUDA 11.8): no bin/cudafe++"]}, "gpu": []}
    f = [f for f in doctor.check(_cu118(tmp_path), prof, env={}) if f.subject == "CUDA 11.8 toolkit"]
    assert [(x.id, x.severity) for x in f] == [("nvcc-not-found", "warning")]
    assert "no bin/cudafe++" in f[0].evidence and "nvidia-cuda-toolkit" in f[0].fix


def test_doctor_with_the_toolkit_from_pypi_needs_no_system_toolkit(tmp_path):
    p = tmp_path / "cu13.toml"
    p.write_text(_variant_text())
    prof = {"machine": {"os": "debian-12", "cuda_toolkits": {}}, "gpu": []}
    fs = doctor.check(load_variant_file(p), prof, env={"CUDA_HOME": "/usr/local/cuda-12.4"})
    tk = [f for f in fs if "toolkit" in f.subject]
    assert [(f.id, f.severity) for f in tk] == [("cuda-home-missing", "info")]
    assert "cuda-toolkit[nvcc,crt,nvvm,cccl,cudart]" in tk[0].evidence and "nvidia/cu13" in tk[0].evidence


def test_a_gpu_the_toolkit_cannot_target_gets_a_toolkit_that_can_and_how_to_install_it(tmp_path):
    p = tmp_path / "cu13.toml"
    p.write_text(_variant_text())
    prof = {"machine": {"os": "debian-12", "arch": "x86_64", "cuda_toolkits": {}, "driver": "550.54.15",
                        "driver_cuda": "12.4"},
            "gpu": [{"name": "Tesla V100-SXM2-32GB", "compute_capability": "7.0", "memory_gib": 32.0}]}
    f = [f for f in doctor.check(load_variant_file(p), prof, env={}) if f.id == "arch-unsupported-by-nvcc"]
    assert f and f[0].fix.startswith("use a CUDA toolkit that targets compute capability 7.0: ")
    newest = f[0].fix.split(": ", 1)[1].split(" (")[0].split(", ")[-1]
    assert newest.startswith("12.") and f"then install the CUDA {newest} toolkit; on debian-12: " in f[0].fix
    assert f"apt install cuda-toolkit-{newest.replace('.', '-')}" in f[0].fix


# ------------------------------------------------------------ the proof: CUDA 13 from PyPI, no system toolkit

@pytest.mark.slow
def test_cuda13_fixture_builds_with_the_pypi_toolkit_and_no_system_toolkit(harness, state, tmp_path, monkeypatch):
    needs_pypi()
    from vllm_harness.verify import elf as binaries  # ELF and fatbin reading
    # no CUDA tool anywhere on PATH (this machine: /usr/local/bin/nvcc runs CUDA 13.0's, /usr/bin/nvcc is Debian's
    # 11.8): a folder on PATH that holds one is replaced by links to its other programs (git, gcc, ...)
    cuda_tools = {"nvcc", "cudafe++", "ptxas", "fatbinary", "nvlink", "bin2c", "cuobjdump", "nvdisasm", "nvprune",
                  "cu++filt", "__nvcc_device_query"}
    path, stand_in = [], tmp_path / "path-without-cuda"
    for d in os.environ["PATH"].split(os.pathsep):
        if not d or d.startswith("/usr/local/cuda") or not Path(d).is_dir():
            continue
        if not any((Path(d) / t).exists() for t in cuda_tools):
            path.append(d)
            continue
        sub = stand_in / str(len(path))
        sub.mkdir(parents=True)
        for f in Path(d).iterdir():
            if f.name not in cuda_tools:
                (sub / f.name).symlink_to(f)
        path.append(str(sub))
    monkeypatch.setenv("PATH", os.pathsep.join(path))
    for k in ("CUDA_HOME", "CUDA_PATH", "CUDACXX"):
        monkeypatch.delenv(k, raising=False)
    assert [t for t in cuda_tools if shutil.which(t)] == [] and shutil.which("git") and shutil.which("gcc")
    name = "fixture-cu13-pypi"
    v = tmp_path / f"{name}.toml"
    v.write_text(_variant_text())
    for step in ("fetch", "prepare", "deps", "build"):
        rc, out, err = harness(step, "--variant", v, "--cache", "none") if step == "build" else \
            harness(step, "--variant", v)
        assert rc == 0, (step, out[-3000:], err[-3000:])
    st = status_of(state, name)
    deps = st["steps"]["deps"]
    root = Path(deps["toolkit"])
    assert root.name == "cu13" and root.is_relative_to(state / "envs" / name)
    assert deps["toolkit_requirements"] == ["cuda-toolkit[nvcc,crt,nvvm,cccl,cudart]==13.0.2"]
    assert toolkit_missing(root, "13.0") == []
    # CMake and torch's CMake config took the venv's nvcc and headers; no system toolkit's path reached the build
    log = (state / "logs" / name / "build.log").read_text()
    assert f"-- Check for working CUDA compiler: {root}/bin/nvcc" in log
    assert f"-- Found CUDAToolkit: {root}/include" in log and f"-- PyTorch: CUDA nvcc is: {root}/bin/nvcc" in log
    assert "/usr/local/cuda" not in log and "/usr/bin/nvcc" not in log and "/usr/local/bin/nvcc" not in log
    # the extension holds sm_90 SASS (the variant's arch_list) and links CUDA 13's runtime through torch
    so = next(p for p in (state / "src" / name).rglob("_C*.so") if p.parent.name == "vllm")
    assert binaries.arch_summary(binaries.fatbin_entries_python(so))["sass"] == ["sm_90"]
    assert "libcudart.so.13" in binaries.read_elf(so).needed
