"""machine: probing this machine, the profile's TOML form (save/load round trip), validation errors."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from vllm_harness.core.errors import UsageError
from vllm_harness.facts import machine
from vllm_harness.facts.cuda_toolkits import probe_toolkits, toolkit_candidates
from vllm_harness.facts.machine_profile import (
    dump_profile,
    load_profile,
    parse_profile,
    save_profile,
    validate_profile,
)

ROOT = Path(__file__).resolve().parents[1]
MACHINES = ROOT / "tests" / "machines"


def _has_nvidia_gpu() -> bool:
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# ------------------------------------------------------------------------------------ probing

def test_probe_this_machine(tmp_path):
    p = machine.probe(tmp_path / "build")
    # (how fast the probe is belongs to a benchmark, not to a timed test on a busy machine)
    assert set(p) == {"machine", "gpu"}
    m = p["machine"]
    assert m["cpu_cores"] >= 1 and m["ram_gib"] > 0 and m["disk_free_gib"] >= 0
    assert m["ram_available_gib"] <= m["ram_gib"] + 0.1
    assert isinstance(m["python"], list) and isinstance(m["in_container"], bool)
    assert isinstance(m["cuda_toolkits"], dict)
    import platform
    libc, ver = platform.libc_ver()
    if libc == "glibc":  # the C library's version, major.minor: which manylinux wheels run here
        assert m["glibc"] == ".".join(ver.split(".")[:2])
    validate_profile(p)  # the probe's own output is a valid profile
    if not _has_nvidia_gpu():
        assert p["gpu"] == [] and "driver" not in m and "driver_cuda" not in m
    if shutil.which("nvcc"):
        assert m["cuda_toolkits"], "nvcc is on PATH but no toolkit was found"
        for version, root in m["cuda_toolkits"].items():
            assert Path(root, "bin", "nvcc").exists(), (version, root)


def test_probe_without_tools_does_not_crash(tmp_path):
    env = {"PATH": str(tmp_path / "empty"), "HOME": str(tmp_path)}
    p = machine.probe(tmp_path / "build", env=env)
    m = p["machine"]
    for tool in ("gcc", "cmake", "ninja", "git"):
        assert tool not in m
    assert m["not_found"] == ["cmake", "gcc", "git", "ninja"]
    validate_profile(p)


def test_toolkits_from_cuda_home_runtime_only_and_pip(tmp_path):
    tk = tmp_path / "cuda-11.8"
    _script(tk / "bin" / "nvcc", 'echo "Cuda compilation tools, release 11.8, V11.8.89"\n')
    (tk / "include").mkdir()
    (tk / "include" / "cuda_runtime.h").write_text("")
    rt = tmp_path / "cuda-12.1-runtime"
    rt.mkdir()
    (rt / "version.json").write_text('{"cuda": {"name": "CUDA SDK", "version": "12.1.1"}}')
    venv = tmp_path / "venv"
    _script(venv / "bin" / "python", "exit 0\n")
    _script(venv / "lib" / "python3.12" / "site-packages" / "nvidia" / "cuda_nvcc" / "bin" / "nvcc",
            'echo "Cuda compilation tools, release 12.4, V12.4.131"\n')

    class Interp:
        executable = str(venv / "bin" / "python")

    env = {"PATH": str(tmp_path / "empty"), "CUDA_HOME": str(tk), "CUDA_PATH": str(rt), "HOME": str(tmp_path)}
    toolkits, no_nvcc = probe_toolkits(env, [Interp()])
    assert toolkits["11.8"] == str(tk)
    assert toolkits["12.4"] == str(venv / "lib" / "python3.12" / "site-packages" / "nvidia" / "cuda_nvcc")
    assert str(rt) in no_nvcc
    assert list(toolkits) == sorted(toolkits, key=lambda v: tuple(map(int, v.split("."))))


def test_nvcc_wrapper_on_path_resolves_to_its_toolkit(tmp_path):
    real = tmp_path / "opt" / "cuda-12.6"
    _script(real / "bin" / "nvcc", 'echo "Cuda compilation tools, release 12.6, V12.6.85"\n')
    (real / "include").mkdir()
    (real / "include" / "cuda_runtime.h").write_text("")
    wrapper_dir = tmp_path / "wrap" / "bin"
    _script(wrapper_dir / "nvcc",
            f'case "$*" in *--dryrun*) echo "#$ TOP={real}/bin/.." ;; *) exec {real}/bin/nvcc "$@" ;; esac\n')
    env = {"PATH": str(wrapper_dir), "HOME": str(tmp_path)}
    roots = [r for r, origin in toolkit_candidates(env) if origin == "PATH"]
    assert roots == [real]


def test_debian_layout_nvcc_in_usr_bin(tmp_path):
    usr = tmp_path / "usr"
    real = usr / "lib" / "nvidia-cuda-toolkit" / "bin" / "nvcc"
    _script(real, 'echo "Cuda compilation tools, release 12.4, V12.4.131"\n')
    (usr / "bin").mkdir(parents=True)
    (usr / "bin" / "nvcc").symlink_to(real)
    (usr / "include").mkdir()
    (usr / "include" / "cuda_runtime.h").write_text("")
    env = {"PATH": str(usr / "bin"), "HOME": str(tmp_path)}
    assert [r for r, o in toolkit_candidates(env) if o == "PATH"] == [usr]
    toolkits, _ = probe_toolkits(env)
    assert toolkits.get("12.4") == str(usr)


def test_gpus_from_nvidia_smi_when_nvml_is_absent(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "_gpus_nvml", lambda: None)
    bindir = tmp_path / "bin"
    _script(bindir / "nvidia-smi",
            'case "$*" in\n'
            '  *--query-gpu*) echo "NVIDIA TITAN RTX, 7.5, 24576, 520.61.05"; '
            'echo "NVIDIA GeForce RTX 4090, 8.9, 24564, 520.61.05" ;;\n'
            '  *) echo "| NVIDIA-SMI 520.61.05    Driver Version: 520.61.05    CUDA Version: 11.8     |" ;;\n'
            'esac\n')
    gpus, driver, driver_cuda = machine.probe_gpus({"PATH": str(bindir)})
    assert gpus == [{"name": "NVIDIA TITAN RTX", "compute_capability": "7.5", "memory_gib": 24.0},
                    {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9", "memory_gib": 24.0}]
    assert (driver, driver_cuda) == ("520.61.05", "11.8")


def test_no_nvml_no_smi_is_no_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "_gpus_nvml", lambda: None)
    assert machine.probe_gpus({"PATH": str(tmp_path)}) == ([], None, None)


def test_env_facts_keeps_only_what_doctor_reads():
    facts = machine.env_facts({"VLLM_USE_PRECOMPILED": "1", "MAX_JOBS": "2", "SECRET_TOKEN": "x", "PATH": "/bin"})
    assert facts == {"VLLM_USE_PRECOMPILED": "1", "MAX_JOBS": "2"}


# ------------------------------------------------------------------------------ save / load

def test_round_trip_of_a_probe(tmp_path):
    p = machine.probe(tmp_path / "build")
    path = save_profile(p, tmp_path / "out" / "this.toml")
    assert load_profile(path) == p


@pytest.mark.parametrize("path", sorted(MACHINES.glob("*.toml")), ids=lambda p: p.stem)
def test_round_trip_of_the_test_machines(path, tmp_path):
    p = load_profile(path)
    out = save_profile(p, tmp_path / path.name)
    again = load_profile(out)
    assert again == p
    assert dump_profile(again) == out.read_text()


def test_round_trip_of_awkward_strings(tmp_path):
    p = {"machine": {"os": 'we"ird\\os\tname', "python": [], "cuda_toolkits": {"12.4": "/opt/cuda 12.4/\u00e9"},
                     "cpu_cores": 3, "ram_gib": 0.1, "in_container": False},
         "gpu": [{"name": "GPU \"x\"\n", "compute_capability": "10.0", "memory_gib": 94.5}]}
    out = save_profile(p, tmp_path / "p.toml")
    assert load_profile(out) == p


def test_the_contract_example_loads():
    text = ROOT / "docs" / "contract" / "machine-profile.md"
    body = text.read_text().split("```toml", 1)[1].split("```", 1)[0]
    p = parse_profile(body, "machine-profile.md")
    assert p["machine"]["cuda_toolkits"] == {"11.8": "/usr/local/cuda-11.8"}
    assert p["gpu"][0]["compute_capability"] == "7.5"


def test_ints_for_float_keys_are_accepted_and_normalised(tmp_path):
    f = tmp_path / "m.toml"
    f.write_text("[machine]\nram_gib = 64\n")
    assert load_profile(f) == {"machine": {"ram_gib": 64.0}}


# ---------------------------------------------------------------------------------- malformed

@pytest.mark.parametrize("text,key", [
    ('[machine]\ncpu_cores = "many"\n', "machine.cpu_cores"),
    ("[machine]\ncpu_cores = 0\n", "machine.cpu_cores"),
    ("[machine]\nram_gib = \"lots\"\n", "machine.ram_gib"),
    ("[machine]\nin_container = \"yes\"\n", "machine.in_container"),
    ("[machine]\npython = \"3.10\"\n", "machine.python"),
    ("[machine]\npython = [\"three\"]\n", "machine.python"),
    ("[machine]\ngcc = \"eleven\"\n", "machine.gcc"),
    ("[machine]\ndriver_cuda = \"12\"\n", "machine.driver_cuda"),
    ("[machine]\nglibc = \"glibc 2.36\"\n", "machine.glibc"),
    ("[machine]\nfavourite_colour = \"blue\"\n", "machine.favourite_colour"),
    ("[machine]\nnot_found = [\"nvcc\"]\n", "machine.not_found"),
    ("[machine.cuda_toolkits]\n\"cuda11\" = \"/usr/local/cuda\"\n", "machine.cuda_toolkits.cuda11"),
    ("[machine.cuda_toolkits]\n\"11.8\" = 3\n", "machine.cuda_toolkits.11.8"),
    ("[machine]\ncuda_toolkits = \"/usr/local/cuda\"\n", "machine.cuda_toolkits"),
    ("[[gpu]]\nname = \"x\"\ncompute_capability = \"abc\"\n", "gpu[0].compute_capability"),
    ("[[gpu]]\nname = \"x\"\ncompute_capability = 7.5\n", "gpu[0].compute_capability"),
    ("[[gpu]]\nname = \"x\"\nclock = 1\n", "gpu[0].clock"),
    ("gpu = \"none\"\n", "gpu"),
    ("machine = 3\n", "machine"),
    ("[extra]\nx = 1\n", "extra"),
])
def test_malformed_profile_names_file_and_key(tmp_path, text, key):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(UsageError) as e:
        load_profile(f)
    assert str(f) in e.value.message and f"'{key}'" in e.value.message
    assert e.value.fix and e.value.exit_code == 2


def test_bad_toml_and_missing_file(tmp_path):
    f = tmp_path / "broken.toml"
    f.write_text("[machine\ncpu_cores = 4\n")
    with pytest.raises(UsageError) as e:
        load_profile(f)
    assert str(f) in e.value.message and "TOML" in e.value.message and e.value.fix
    with pytest.raises(UsageError) as e:
        load_profile(tmp_path / "nope.toml")
    assert "nope.toml" in e.value.message and "--save-machine" in e.value.fix
    f.write_bytes(b"\xff\xfe[machine]")
    with pytest.raises(UsageError):
        load_profile(f)


def test_save_refuses_an_invalid_profile(tmp_path):
    with pytest.raises(UsageError) as e:
        save_profile({"machine": {"cpu_cores": "many"}}, tmp_path / "x.toml")
    assert "machine.cpu_cores" in e.value.message
    assert not (tmp_path / "x.toml").exists()


# ---- property test: any profile-shaped data is either accepted (and round-trips) or one UsageError
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=30), st.lists(st.text(max_size=8), max_size=4),
                    st.dictionaries(st.text(max_size=6), st.text(max_size=12), max_size=3))
_MACHINE_KEYS = st.sampled_from(["os", "arch", "cpu_cores", "ram_gib", "disk_free_gib", "python", "gcc", "cmake",
                                 "driver", "driver_cuda", "in_container", "cuda_toolkits", "../../etc", "x"])
_GPU = st.dictionaries(st.sampled_from(["name", "compute_capability", "memory_gib", "bogus"]), _VALUES, max_size=4)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_MACHINE_KEYS, _VALUES, max_size=8), st.lists(_GPU, max_size=3),
       st.sampled_from(["machine", "gpu", "extra"]))
def test_any_profile_is_valid_or_one_usage_error(mach, gpus, extra_key):
    data = {"machine": {k: v for k, v in mach.items() if v is not None}, "gpu": gpus}
    if extra_key == "extra":
        data["extra"] = {"a": 1}
    try:
        prof = validate_profile(data, where="fuzz.toml")
    except UsageError as e:
        assert "fuzz.toml" in str(e) and "Fix:" in str(e)
        return
    assert parse_profile(dump_profile(prof), where="again") == prof
