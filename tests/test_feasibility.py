"""issue 28: one judge of what runs where (facts/feasibility.py), asked by doctor and plan alike.

The machines are tests/machines/*.toml (the issue's classes were written from public facts: Grace Hopper and
GB200 on aarch64, DGX Spark's GB10, a Jetson AGX Orin on JetPack 6, CentOS 7's glibc 2.17, a driver-470 machine
with no toolkit, the RTX 4090 on driver 550); the variants are envs/*.toml and every candidate plan proposes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.version import Version

from vllm_harness.core.errors import UsageError
from vllm_harness.doctor import report as doctor
from vllm_harness.facts import build_archs, compat, feasibility, machine, planner
from vllm_harness.facts.machine_profile import load_profile, parse_profile
from vllm_harness.facts.variants import load_variant, parse_variant
from vllm_harness.steps import bundle_files

ROOT = Path(__file__).resolve().parents[1]
MACHINES = sorted((ROOT / "tests" / "machines").glob("*.toml"))
VARIANTS = sorted((ROOT / "envs").glob("*.toml"))
#: ids only the judge emits in doctor (others, e.g. torch-wheel-not-found, also come from doctor's Python rule)
JUDGE_ONLY = {"driver-too-old", "no-driver", "cuda-forward-compat", "no-kernel-image", "torch-cpu-only",
              "bf16-unsupported", "flash-attn-unsupported-gpu", "cuda-home-missing", "nvcc-not-found",
              # the build around the GPU (facts/feasibility_build.py): Python, host compiler, cmake, disk
              "python-unsupported", "python-headers-missing", "host-compiler-unsupported", "cmake-too-old",
              "disk-full"}
TIER_TO_DOCTOR = {"runs": "ready", "runs with warnings": "ready with warnings", "runs after fixes": "will fail",
                  "cannot": "will fail"}


def _key(f) -> tuple:
    return (f.id, f.severity, f.subject, f.evidence, f.fix)


def _profile(name: str) -> dict:
    return load_profile(ROOT / "tests" / "machines" / f"{name}.toml")


def _plan(name: str) -> dict:
    return planner.plan(_profile(name), compat.load(), name)


def _agree(variant, profile) -> str:
    """doctor's findings for the variant hold exactly the judge's issues; returns the judge's tier."""
    verdict = feasibility.judge(compat.load(), profile, feasibility.candidate_of(variant))
    findings = doctor.check(variant, profile)
    judged = [_key(i.finding) for i in verdict.issues]
    have = [_key(f) for f in findings]
    assert all(k in have for k in judged), [k for k in judged if k not in have]
    assert {k for k in have if k[0] in JUDGE_ONLY} <= set(judged)
    # doctor's verdict over the judge's findings is the judge's tier
    mine = [f for f in findings if _key(f) in set(judged)]
    assert doctor.verdict(mine) == TIER_TO_DOCTOR[verdict.tier], (verdict.tier, [f.to_dict() for f in mine])
    return verdict.tier


# ------------------------------------------------------------------------------- one judge, two askers

@pytest.mark.parametrize("machine_path", MACHINES, ids=lambda p: p.stem)
def test_doctor_and_plan_agree_on_every_shipped_variant(machine_path):
    profile = load_profile(machine_path)
    for vpath in VARIANTS:
        _agree(load_variant(vpath.stem, [ROOT / "envs"]), profile)


@pytest.mark.parametrize("machine_path", MACHINES, ids=lambda p: p.stem)
def test_doctor_and_plan_agree_on_every_planned_candidate(machine_path, tmp_path):
    data = compat.load()
    profile = load_profile(machine_path)
    rep = planner.plan(profile, data, machine_path.stem)
    planned = [o for o in rep["_options"] if o.vllm is not None]
    assert planned or rep["recommendation"] is None
    for o in planned:
        text = planner.render_variant(rep, data, o)
        v = parse_variant(f"p-{o.cuda}", tmp_path / f"p{o.cuda}.toml", text)
        cand = feasibility.candidate_of(v)
        # the written variant is the candidate plan judged ...
        assert (cand.cuda, cand.torch, cand.vllm, cand.mode, cand.torch_index, cand.torch_preinstalled) == (
            o.extra["cand"].cuda, o.extra["cand"].torch, o.extra["cand"].vllm, o.extra["cand"].mode,
            o.extra["cand"].torch_index, o.extra["cand"].torch_preinstalled)
        # ... with the Python range and the [deps] (the venv's cmake) the build rules judged
        assert (cand.python, cand.deps) == (o.extra["cand"].python, o.extra["cand"].deps)
        # ... and doctor, asking the same judge, reaches plan's tier
        assert _agree(v, profile) == o.tier


# ------------------------------------------------------------------------------------ the issue's classes

def test_grace_hopper_a_variant_with_x86_64_only_wheels_will_fail():
    p = _profile("gh200-aarch64")
    fs = doctor.check(load_variant("cu124", [ROOT / "envs"]), p)      # vLLM 0.8.5: x86_64 wheels only
    assert doctor.verdict(fs) == "will fail"
    f = next(f for f in fs if f.id == "torch-wheel-not-found" and f.subject.startswith("vllm"))
    assert "x86_64 only" in f.evidence and "aarch64" in f.evidence
    assert "vLLM >= 0.10.2" in f.fix                                   # the first release with aarch64 wheels


def test_grace_hopper_pypi_torch_has_no_cuda_and_the_fix_is_the_pytorch_index():
    p = _profile("gh200-aarch64")
    v = load_variant("cu128", [ROOT / "envs"])                        # torch 2.10.0 from PyPI
    f = next(f for f in doctor.check(v, p) if f.id == "torch-cpu-only")
    assert f.severity == "error" and "CPU-only" in f.evidence and "[index-metadata]" in f.evidence   # read
    assert 'index_url = "https://download.pytorch.org/whl/cu128"' in f.fix
    verdict = feasibility.judge(compat.load(), p, feasibility.candidate_of(v))
    assert verdict.tier == "runs after fixes" and any("whl/cu128" in x for x in verdict.fixes)
    # plan writes the index in: the same release runs as is
    rep = _plan("gh200-aarch64")
    rec = rep["recommendation"]
    assert rec["mode"] == "wheel" and rec["tier"] == "runs" and rec["cuda"] == "12.8"
    text = planner.render_variant(rep, compat.load())
    assert 'index_url = "https://download.pytorch.org/whl/cu128"' in text


@pytest.mark.parametrize("name,cc", [("gb200-aarch64", "10.0"), ("dgx-spark-gb10", "12.1")])
def test_aarch64_blackwell_servers_and_desktops(name, cc):
    rep = _plan(name)
    rec = rep["recommendation"]
    assert rec["tier"] == "runs" and rec["cuda"] == "13.0" and rec["mode"] == "wheel"
    # PyPI's aarch64 torch is a CUDA 13.0 build from torch 2.11.0 (read from its metadata): no index needed
    text = planner.render_variant(rep, compat.load())
    assert Version(rec["torch"]) >= Version("2.11.0") and "\nindex_url" not in text
    cuda, fact = feasibility.pypi_torch_cuda(compat.load(), compat.load().torch(rec["torch"]), "aarch64")
    assert cuda == "13.0" and fact.source == "index-metadata"
    # lines with x86_64-only vLLM wheels or no aarch64 CUDA torch do not run there
    assert {o["cuda"] for o in rep["options"] if o["tier"] == "cannot"} >= {"11.8", "12.4"}
    assert _profile(name)["gpu"][0]["compute_capability"] == cc


def test_jetson_gets_a_source_build_on_jetpacks_torch_never_a_pypi_wheel():
    rep = _plan("jetson-agx-orin-jp6")
    assert not [o for o in rep["options"] if o["mode"] == "wheel"]
    rec = rep["recommendation"]
    assert rec["mode"] == "source" and rec["cuda"] == "12.6" and rec["python"] == "3.10"
    text = planner.render_variant(rep, compat.load())
    assert "preinstalled = true" in text and "index_url" not in text
    assert "NVIDIA's PyTorch" in rec["reason"] or "JetPack" in rec["reason"]
    fs = doctor.check(load_variant("cu128", [ROOT / "envs"]), _profile("jetson-agx-orin-jp6"))
    f = next(f for f in fs if f.id == "torch-wheel-not-found" and "PyPI's vllm" in f.subject)
    assert "SBSA" in f.evidence and 'mode = "source"' in f.fix and "preinstalled = true" in f.fix


def test_driver_470_without_a_toolkit_runs_after_installing_the_distributions_cuda_118():
    rep = _plan("driver470-no-toolkit")
    rec = rep["recommendation"]
    assert rec["tier"] == "runs after fixes" and rec["cuda"] == "11.8" and rec["mode"] == "source"
    assert any("apt install nvidia-cuda-toolkit" in f and "a real CUDA 11.8" in f for f in rec["fixes"])
    assert "no driver upgrade needed" in rec["reason"]
    f = next(f for f in doctor.check(load_variant("cu118", [ROOT / "envs"]), _profile("driver470-no-toolkit"))
             if f.id == "cuda-home-missing")
    assert f.severity == "error" and "apt install nvidia-cuda-toolkit" in f.fix


def test_rtx4090_on_driver_550_the_recommendation_names_the_trade_off():
    rec = _plan("rtx4090-driver550")["recommendation"]
    assert rec["tier"] == "runs" and rec["cuda"] == "12.4"
    assert "Trade-off: the newer vLLM 0.19.1" in rec["reason"] and "minor-version compatibility" in rec["reason"]
    tiers = _plan("rtx4090-driver550")["tiers"]
    assert tiers["runs_with_warnings"]["vllm"] == "0.19.1"
    # the newest that runs as is is a source build (CUDA 11.8); the prebuilt wheel is preferred, and said so
    assert tiers["runs"]["mode"] == "source" and Version(tiers["runs"]["vllm"]) > Version(rec["vllm"])
    assert f"vLLM {tiers['runs']['vllm']} built from source also runs as is" in rec["reason"]


def test_old_glibc_is_judged_by_the_wheels_manylinux_floor():
    p = _profile("centos7-glibc217")
    f = next(f for f in doctor.check(load_variant("cu128", [ROOT / "envs"]), p) if f.id == "torch-wheel-not-found"
             and f.subject == "torch 2.10.0 on glibc 2.17")
    assert "glibc >= 2.28" in f.evidence and "glibc 2.17" in f.evidence
    rep = planner.plan(p, compat.load(), "centos7")
    data = compat.load()
    for o in rep["_options"]:
        if o.ok and o.mode == "wheel":
            floor = feasibility.wheel_platforms(list(o.extra["vf"].wheels.value))["x86_64"]
            assert floor is None or floor <= Version("2.17"), (o.vllm, floor)
    why = " ".join(o["why"] for o in rep["options"])
    assert "glibc 2.17" in why
    assert data.vllm("0.19.1") is not None and rep["recommendation"]["vllm"] != "0.19.1"


# ------------------------------------------------------------------------------------ the parts

def test_wheel_platforms_reads_arch_and_glibc_floor():
    got = feasibility.wheel_platforms(["cp38-abi3-manylinux1_x86_64", "cp38-abi3-manylinux2014_aarch64",
                                       "cp38-abi3-manylinux_2_35_x86_64"])
    assert {k: str(v) for k, v in got.items()} == {"x86_64": "2.5", "aarch64": "2.17"}
    assert "*" in feasibility.wheel_platforms(["py3-none-any"])


def test_driver_status_is_one_rule_for_dgpus_and_jetsons():
    data = compat.load()
    assert feasibility.driver_status(data, "12.4", "550.54.15", "12.4")[0] == "ok"
    assert feasibility.driver_status(data, "12.8", "550.54.15", "12.4")[0] == "minor-compat"
    assert feasibility.driver_status(data, "13.0", "550.54.15", "12.4")[0] == "too-old"
    # a Jetson runs its JetPack's CUDA, whatever nvidia-smi calls the driver
    assert feasibility.driver_status(data, "12.6", "540.4.0", "12.6", integrated=True)[0] == "ok"
    assert feasibility.driver_status(data, "12.8", "540.4.0", "12.6", integrated=True)[0] == "too-old"
    assert feasibility.driver_status(data, "11.8", "540.4.0", "12.6", integrated=True)[0] == "other"
    # read as a dGPU driver, 540 would run CUDA 12.6 only under minor-version compatibility
    assert feasibility.driver_status(data, "12.6", "540.4.0", "12.6")[0] == "minor-compat"


def test_pypi_torch_cuda_per_platform():
    data = compat.load()
    tf = data.torch("2.10.0")
    assert feasibility.pypi_torch_cuda(data, tf, "x86_64")[0] == "12.8"
    cuda, fact = feasibility.pypi_torch_cuda(data, tf, "aarch64")
    assert cuda is None and not fact.inferred and fact.source == "index-metadata"   # read per platform
    assert feasibility.pypi_torch_cuda(data, data.torch("2.11.0"), "aarch64")[0] == "13.0"
    assert feasibility.index_has_torch(data, tf, "12.8", "aarch64")
    assert not feasibility.index_has_torch(data, tf, "12.6", "aarch64")
    assert not feasibility.index_has_torch(data, data.torch("2.6.0"), "12.4", "aarch64")


def test_profile_keys_for_jetson_and_their_probe(tmp_path):
    p = parse_profile('[machine]\narch = "aarch64"\nl4t = "36.4.3"\njetson = "NVIDIA Jetson AGX Orin"\n'
                      '[[gpu]]\nname = "Orin (nvgpu)"\ncompute_capability = "8.7"\nintegrated = true\n')
    assert feasibility.is_jetson(p) and feasibility.cpu_arch(p) == "aarch64"
    with pytest.raises(UsageError, match="machine.l4t"):
        parse_profile('[machine]\nl4t = "r36"\n')
    with pytest.raises(UsageError, match=r"gpu\[0\].integrated"):
        parse_profile('[[gpu]]\nintegrated = "yes"\n')
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_text("# R36 (release), REVISION: 4.3, GCID: 1, BOARD: generic\n")
    (tmp_path / "proc" / "device-tree").mkdir(parents=True)
    (tmp_path / "proc" / "device-tree" / "model").write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    assert machine._jetson(tmp_path) == ("36.4.3", "NVIDIA Jetson AGX Orin Developer Kit")
    assert machine._jetson(tmp_path / "none") == (None, None)


def test_the_driver_arch_and_glibc_rules_live_in_the_judge_only():
    """doctor's rules and plan ask facts/feasibility.py; no second copy of the comparisons (issue 28)."""
    src = ROOT / "src" / "vllm_harness"
    for path in [*sorted((src / "doctor").glob("rules_*.py")), src / "doctor" / "model.py",
                 src / "facts" / "planner.py", src / "facts" / "fleet.py",
                 *sorted((src / "steps").glob("bundle*.py")), src / "facts" / "build_archs.py"]:
        text = re.sub(r"feasibility\.\w+", "feasibility.X", path.read_text())   # asking the judge is the point
        for needle in ("driver_min", "sm_real(", "manylinux", "arch_list_runs_on", "is_datacenter",
                       # the build around the GPU (facts/feasibility_build.py)
                       "gcc_max", "gcc_alternatives", "python_without_headers", "uv_cache_free_gib"):
            assert needle not in text, f"{path.name} compares {needle} itself: ask facts/feasibility.py"


def test_a_plan_after_fixes_writes_its_fixes_into_the_variant(tmp_path):
    rep = _plan("driver470-no-toolkit")
    p = planner.write_variant(rep, compat.load(), tmp_path / "old470.toml")
    text = p.read_text()
    assert "# Before the build: install the CUDA 11.8 toolkit" in text and 'mode = "source"' in text
    assert feasibility.candidate_of(load_variant(str(p), [])).cuda == "11.8"


# ------------------------------------------------------------------------------------ bundle --machine

PLATFORM_CHECKS = {"wheel-platform", "wheel-glibc", "torch-platform"}   # doctor's platform rule (feasibility)


@pytest.mark.parametrize("name", ["gh200-aarch64", "centos7-glibc217"])
def test_bundle_for_a_machine_refuses_and_warns_where_doctor_does(name):
    """`bundle --machine` asks doctor's platform judge before anything is fetched: it refuses (exit 2) exactly
    where doctor's platform findings hold an error, with doctor's ids, evidence and fixes, and says its warnings."""
    profile, path = _profile(name), f"tests/machines/{name}.toml"
    refused = 0
    for vpath in VARIANTS:
        v = load_variant(vpath.stem, [ROOT / "envs"])
        mine = [f for f in doctor.check(v, profile) if f.check in PLATFORM_CHECKS]
        errors = [f for f in mine if f.severity == "error"]
        said: list[str] = []
        try:
            target = bundle_files.target_for(v, profile, path, say=said.append)
        except UsageError as e:
            if not errors:   # the only other refusal: no Python of the profile fits the variant
                assert "no Python in [machine] python" in e.message, (v.name, e.message)
                continue
            refused += 1
            assert e.exit_code == 2
            for f in errors:
                assert f"{f.id}: {f.evidence}" in e.message and f.fix in e.fix, (v.name, f.to_dict())
            continue
        assert not errors, (v.name, [f.to_dict() for f in errors])     # doctor says 'will fail': so must bundle
        assert said == [f"  ! {f.id}: {f.evidence}; {f.fix}" for f in mine if f.severity == "warning"]
        assert target.arch == feasibility.cpu_arch(profile) and target.glibc == profile["machine"]["glibc"]
    assert refused, f"no shipped variant fails on {name}'s platform: the test proves nothing"


def test_bundle_platform_tags_are_the_judges_manylinux_table():
    t = bundle_files.Target(python="3.12", arch="aarch64", glibc="2.17", where="x")
    assert t.platforms() == feasibility.manylinux_platforms("aarch64", "2.17")
    assert t.platforms()[:2] == ["manylinux_2_17_aarch64", "manylinux_2_16_aarch64"]
    assert t.platforms()[-4:] == ["manylinux2014_aarch64", "manylinux2010_aarch64", "manylinux1_aarch64",
                                  "linux_aarch64"]
    # every tag the target accepts has a floor the judge reads as <= its glibc
    floors = feasibility.wheel_platforms([f"cp312-cp312-{p}" for p in t.platforms()])
    assert floors == {"aarch64": Version("2.5")}   # the lowest floor: manylinux1
    for p in t.platforms()[:-1]:
        assert feasibility.wheel_platforms([f"x-y-{p}"])["aarch64"] <= Version("2.17")


# ------------------------------------------------------------------------------------ the build's arch list

def test_the_builds_arch_list_maps_gpus_with_the_judges_nvcc_rule():
    """facts/build_archs.check_archs (the build's TORCH_CUDA_ARCH_LIST from the GPUs) asks nvcc_arch_for, the
    rule doctor's arch-unsupported-by-nvcc uses: a GPU the judge finds SASS for is built as SASS, a newer one as
    PTX, an older one refused, for every CUDA line in the data."""
    data = compat.load()
    ccs = [(m, n) for m in (3, 5, 6, 7, 8, 9, 10, 11, 12, 13) for n in (0, 1, 2, 5, 6, 7, 9)]
    seen = set()
    for cuda in data.cuda_versions():
        cf = data.cuda(cuda)
        for cc in ccs:
            arch, how = feasibility.nvcc_arch_for(cf, cc)
            seen.add(how)
            chk = build_archs.check_archs(cuda, [f"{cc[0]}.{cc[1]}"], from_gpu=True)
            covered = cuda in feasibility.nvcc_targets(data, cc)      # what doctor and plan judge by
            assert covered == (how in ("sass", "same-major")), (cuda, cc, how)
            if how == "none":
                assert chk.error and f"its oldest arch is {arch}" in chk.error, (cuda, cc)
            else:
                assert chk.error is None and chk.archs == arch, (cuda, cc, chk)
                assert arch.endswith("+PTX") == (how == "ptx")
    assert seen == {"sass", "same-major", "ptx", "none"}
    cf = data.cuda("11.8")
    assert feasibility.nvcc_arch_for(cf, (8, 9)) == ("8.9", "sass")
    assert feasibility.nvcc_arch_for(cf, (12, 0)) == ("9.0+PTX", "ptx")


# ------------------------------------------------------------ the build around the GPU: Python, gcc, cmake, disk

BUILD_IDS = ("python-unsupported", "python-headers-missing", "host-compiler-unsupported", "cmake-too-old",
             "disk-full")


def _planned(name: str, cuda: str, vllm: str, mode: str, tmp_path):
    """The candidate plan builds for (vLLM, CUDA line, mode) on a machine, plan's verdict of it, and the variant
    plan would write for it (what doctor then checks)."""
    data, profile = compat.load(), _profile(name)
    cand, why, det = planner._candidate(data, vllm, cuda, mode, profile, planner.machine_pythons(profile))
    assert cand is not None, why
    verdict = feasibility.judge(data, profile, cand, det["vf"], det["tf"])
    o = planner.Option(cuda, cand.torch, vllm, det["python"], mode, verdict.tier in ("runs", "runs with warnings"),
                       "", tier=verdict.tier, fixes=verdict.fixes,
                       extra={"vf": det["vf"], "tf": det["tf"], "cand": cand, "verdict": verdict})
    rep = planner.plan(profile, data, name)
    v = parse_variant(f"p-{name}", tmp_path / f"p-{name}.toml", planner.render_variant(rep, data, o))
    return verdict, v


def _one(issues, fid: str):
    got = [i for i in issues if i.finding.id == fid]
    assert len(got) == 1, (fid, [i.finding.to_dict() for i in issues])
    return got[0]


# (machine, shipped variant, failure id, severity, tier of the judge's issue alone, words of its fix)
BUILD_CASES = [
    # Grace Hopper: cmake 3.22 on PATH, but the variant's [deps] install cmake>=3.26 first on PATH: no fix
    ("gh200-aarch64", "cu118", "cmake-too-old", "info", "runs", "nothing to do: the venv's cmake"),
    # GB200 / DGX Spark: Python 3.12 only (the variant wants 3.10), gcc 13 (CUDA 11.8's nvcc takes <= 11)
    ("gb200-aarch64", "cu118", "python-unsupported", "error", "runs after fixes", "`uv python install 3.10`"),
    ("gb200-aarch64", "cu118", "host-compiler-unsupported", "error", "runs after fixes", "apt install gcc-11 g++-11"),
    ("dgx-spark-gb10", "cu118", "python-unsupported", "error", "runs after fixes", "`uv python install 3.10`"),
    ("dgx-spark-gb10", "cu118", "host-compiler-unsupported", "error", "runs after fixes", "CC=gcc-11 CXX=g++-11"),
    # Jetson: Python 3.10 only (a Python 3.12 variant: install it); cmake 3.22 with the venv's cmake
    ("jetson-agx-orin-jp6", "cu124", "python-unsupported", "error", "runs after fixes", "`uv python install 3.12`"),
    ("jetson-agx-orin-jp6", "cu118", "cmake-too-old", "info", "runs", "nothing to do: the venv's cmake"),
    # CentOS 7: gcc 4.8.5 is older than torch's headers need (old gcc): a devtoolset beside it is the fix
    ("centos7-glibc217", "cu118", "host-compiler-unsupported", "error", "runs after fixes",
     "yum install devtoolset-11-gcc devtoolset-11-gcc-c++"),
    ("centos7-glibc217", "cu118", "cmake-too-old", "info", "runs", "nothing to do: the venv's cmake"),
    ("centos7-glibc217", "cu124", "python-unsupported", "error", "runs after fixes", "`uv python install 3.12`"),
    # driver 470, no toolkit: Python 3.11 only; gcc 12 with gcc-11 beside it, which the build picks itself
    ("driver470-no-toolkit", "cu118", "python-unsupported", "error", "runs after fixes", "`uv python install 3.10`"),
    ("driver470-no-toolkit", "cu118", "host-compiler-unsupported", "info", "runs", "the build sets CC=gcc-11"),
    # Ubuntu 24.10 (new gcc): gcc 14, no gcc-11 beside it
    ("ubuntu2410-gcc14", "cu118", "host-compiler-unsupported", "error", "runs after fixes", "apt install gcc-11"),
    # a 12 GiB disk: neither a wheel install (15 GiB) nor a source build (30 GiB) fits; no cmake on PATH, the
    # venv's is used
    ("a10-small-disk", "cu124", "disk-full", "error", "runs after fixes", "free space (`invoke clean --all`"),
    ("a10-small-disk", "cu118", "disk-full", "error", "runs after fixes", "point the build directory at a larger"),
    ("a10-small-disk", "cu118", "cmake-too-old", "info", "runs", "nothing to do: the venv's cmake"),
]


@pytest.mark.parametrize("name,variant,fid,severity,tier,fix", BUILD_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in BUILD_CASES])
def test_doctor_and_plan_judge_python_gcc_cmake_and_disk_alike(name, variant, fid, severity, tier, fix):
    """doctor's finding for a shipped variant is the judge's issue (what plan asks for every candidate), with
    its severity, its fix and the tier it alone gives (a fix on the machine: 'runs after fixes')."""
    v, profile = load_variant(variant, [ROOT / "envs"]), _profile(name)
    issue = _one(feasibility.judge(compat.load(), profile, feasibility.candidate_of(v)).issues, fid)
    assert issue.finding.severity == severity and fix in issue.finding.fix, issue.finding.to_dict()
    assert feasibility.tier_of([issue]) == tier
    f = next(f for f in doctor.check(v, profile) if f.id == fid)
    assert _key(f) == _key(issue.finding)
    _agree(v, profile)


def test_plan_gives_the_python_fix_doctor_gives_and_recommends_what_runs_as_is(tmp_path):
    """debian12-gcc12-python313 has Python 3.13 only: plan no longer drops a release whose wheels stop at
    3.12 (vLLM 0.8.5); it is 'runs after fixes' with `uv python install 3.12`, the written variant names that
    Python and doctor says the same; the recommendation still prefers what runs with the Python there is."""
    name = "debian12-gcc12-python313"
    assert _plan(name)["recommendation"]["python"] == "3.13"
    verdict, v = _planned(name, "12.4", "0.8.5", "wheel", tmp_path)
    i = _one(verdict.issues, "python-unsupported")
    assert v.python == ">=3.12,<3.13" and "`uv python install 3.12`" in i.finding.fix and i.fixable
    assert verdict.tier == "runs after fixes" and i.finding.fix in verdict.fixes
    assert _key(next(f for f in doctor.check(v, _profile(name)) if f.id == i.finding.id)) == _key(i.finding)
    assert _agree(v, _profile(name)) == "runs after fixes"


def test_a_gcc_newer_than_the_toolkit_takes_is_a_fix_in_plan_and_in_doctor(tmp_path):
    """Ubuntu 24.10's gcc 14 with the CUDA 12.6 toolkit (nvcc 12.6 takes gcc <= 13): a CUDA 12.6 source build
    runs after installing gcc-13, in plan's verdict and in doctor's check of the variant plan writes."""
    verdict, v = _planned("ubuntu2410-gcc14", "12.6", "0.10.1.1", "source", tmp_path)
    assert verdict.tier == "runs after fixes"
    i = _one(verdict.issues, "host-compiler-unsupported")
    assert "gcc 14.2.0" in i.finding.evidence and "<= 13" in i.finding.evidence
    assert "apt install gcc-13 g++-13" in i.finding.fix and i.finding.fix in verdict.fixes
    assert _agree(v, _profile("ubuntu2410-gcc14")) == "runs after fixes"
    # gcc-13 named in [build] env: nothing to fix, for both askers
    fixed = parse_variant(v.name, v.path, v.raw_text.replace('[vllm]', '[build]\nenv = { CC = "gcc-13", CXX = '
                                                              '"g++-13", CUDAHOSTCXX = "g++-13" }\n\n[vllm]'))
    i = _one(feasibility.judge(compat.load(), _profile("ubuntu2410-gcc14"), feasibility.candidate_of(fixed)).issues,
             "host-compiler-unsupported")
    assert i.finding.severity == "info" and _agree(fixed, _profile("ubuntu2410-gcc14")) == "runs"


def test_a_small_disk_is_a_fix_for_every_option_plan_has(tmp_path):
    rep = _plan("a10-small-disk")
    assert rep["recommendation"]["tier"] == "runs after fixes"
    for o in rep["_options"]:
        if o.vllm:
            i = _one(o.extra["verdict"].issues, "disk-full")
            need = "30 GiB" if o.mode == "source" else "15 GiB"
            assert need in i.finding.evidence and i.finding.fix in o.fixes
    # uv's cache on a small disk of its own: the judge's second disk issue, as doctor says it
    p = _profile("a10-small-disk")
    p["machine"].update(disk_free_gib=500.0, uv_cache_free_gib=4.0, uv_cache_same_disk=False)
    v = load_variant("cu124", [ROOT / "envs"])
    i = _one(feasibility.judge(compat.load(), p, feasibility.candidate_of(v)).issues, "disk-full")
    assert i.finding.subject == "uv cache disk" and "UV_CACHE_DIR" in i.finding.fix
    assert _agree(v, p) == "runs after fixes"


def test_a_gpu_newer_than_the_toolkit_builds_ptx_and_runs_with_a_warning():
    """sm 12.0 with CUDA 12.4: the build's arch mapping (nvcc_arch_for) gives 9.0+PTX; vLLM's CMake keeps 9.0,
    so its kernels JIT at first load: a warning in doctor and plan alike (torch's own kernels are judged apart:
    with the interpreter's torch, preinstalled, they are not in the data)."""
    data = compat.load()
    p = _profile("rtx4090-gcc13-ubuntu24")
    p["gpu"] = [{"name": "NVIDIA GeForce RTX 5090", "compute_capability": "12.0", "memory_gib": 31.8}]
    p["machine"].update(cuda_toolkits={"12.4": "/usr/local/cuda-12.4"}, disk_free_gib=400.0)
    assert feasibility.nvcc_arch_for(data.cuda("12.4"), (12, 0)) == ("9.0+PTX", "ptx")
    assert build_archs.check_archs("12.4", ["12.0"], from_gpu=True).archs == "9.0+PTX"
    cand = feasibility.Candidate("12.4", "2.6.0", "0.8.5", "source", torch_preinstalled=True, python=">=3.12,<3.13",
                                 deps=("cmake>=3.26", "ninja"))
    verdict = feasibility.judge(data, p, cand)
    i = _one(verdict.issues, "arch-unsupported-by-nvcc")
    assert i.finding.severity == "warning" and "PTX JIT: first load compiles kernels, slower" in i.finding.evidence
    assert "FP8/FP4" in i.finding.evidence and "9.0+PTX" in i.finding.evidence
    assert not [x for x in verdict.issues if x.finding.id == "no-kernel-image"]
    assert verdict.tier == "runs with warnings", verdict.reasons
    # where vLLM's CMake does not keep the PTX arch (a tree that builds 10.0+ only), its kernels need the arch
    cannot = feasibility.gpu_issues(data, p, cand, data.vllm("0.8.5"), None, ("10.0;12.0", "CMakeLists.txt:1"))
    nk = _one(cannot, "no-kernel-image")
    assert nk.finding.severity == "error" and not nk.fixable and "newer vLLM release or CUDA line" in nk.finding.fix

