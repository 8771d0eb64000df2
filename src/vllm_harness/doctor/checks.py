"""Preflight verdict for a variant on a machine, before any download or compile (issue 4).

``check(variant, profile, source_dir=None, env=None)`` judges a variant (``variants.Variant``) against a
machine profile (``machine.probe`` / ``machine.load_profile``) with the compatibility data
(``compat.load()``) and returns findings that use the ids of shared/contract/failure-ids.md.  It runs no
subprocess; with ``source_dir`` it reads the pins of that vLLM tree (requirements files, pyproject.toml,
CMakeLists.txt) instead of the table, and looks at the tree's owner and leftovers.

Two ids of its own, for checks it could not make:
* ``check-skipped`` (info): the profile lacks the key the check needs (``check`` names the check);
* ``compat-unknown`` (warning): a version the compatibility data does not hold -- never a guess;
* ``compat-stale`` (warning): the variant names a release newer than the data (one finding naming
  ``invoke compat --refresh`` instead of the unknowns); info when the generated data is old.

``verdict(findings)``: 'will fail' with any error, 'ready with warnings' with any warning, else 'ready'.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from vllm_harness.facts import compat as compat_mod
from vllm_harness.facts.compat import (
    CompatData,
    Fact,
    arch_list_runs_on,
    major_minor,
    parse_arch_list,
    parse_cc,
)

SEVERITIES = ("error", "warning", "info")
DISK_SOURCE_GIB = 30.0         # source build: venv + torch + build tree + .deps + caches
DISK_WHEEL_GIB = 15.0          # wheel install: venv + torch + vLLM + deps + caches
NVIDIA_DRIVER_DOCS = "https://www.nvidia.com/en-us/drivers/"


@dataclass
class Finding:
    id: str
    severity: str              # 'error' | 'warning' | 'info'
    subject: str
    evidence: str
    fix: str
    check: str = ""            # the check a check-skipped / compat-unknown finding stands for

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity {self.severity!r} is not one of {SEVERITIES}")
        if not self.check:
            self.check = self.id

    def to_dict(self) -> dict:
        return asdict(self)


# ====================================================================================== source tree

def _req_lines(path: Path) -> list[Requirement]:
    out = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is not None:
            try:
                if not req.marker.evaluate({"platform_system": "Linux", "platform_machine": "x86_64",
                                            "sys_platform": "linux"}):
                    continue
            except (ValueError, KeyError, TypeError):  # an odd marker: keep the requirement
                pass
        out.append(req)
    return out


def _pin(req: Requirement) -> str | None:
    for s in req.specifier:
        if s.operator in ("==", "==="):
            try:
                return Version(s.version).public
            except InvalidVersion:
                return None
    return None


def _lower_bound(spec: SpecifierSet) -> Version | None:
    best = None
    for s in spec:
        if s.operator in (">=", "==", "~=", "===", ">"):
            try:
                v = Version(s.version.rstrip(".*"))
            except InvalidVersion:
                continue
            best = v if best is None or v > best else best
    return best


def read_source_pins(source_dir: Path) -> dict[str, tuple[Any, str]]:
    """What a vLLM source tree says about itself: {key: (value, 'file: line')}.

    Keys: torch, xformers, cmake_min, python (specifier), numpy (specifier), cuda_archs
    ({'X.Y' threshold or 'default': arch list}).  Files: requirements/{cuda,build,common}.txt (and the
    old requirements-*.txt), requirements/build/cuda.txt, pyproject.toml, setup.py, CMakeLists.txt."""
    src = Path(source_dir)
    pins: dict[str, tuple[Any, str]] = {}

    def first(key: str, value: Any, where: str) -> None:
        if value is not None and key not in pins:
            pins[key] = (value, where)

    runtime = ["requirements/cuda.txt", "requirements-cuda.txt", "requirements/common.txt",
               "requirements-common.txt", "requirements.txt"]
    build = ["requirements/build/cuda.txt", "requirements/build.txt", "requirements-build.txt"]
    for rel in runtime + build:
        for req in _req_lines(src / rel):
            name = req.name.lower()
            where = f"{rel}: {req}"
            if name in ("torch", "xformers"):
                first(name, _pin(req), where)
            elif name == "cmake":
                lb = _lower_bound(req.specifier)
                first("cmake_min", str(lb) if lb else None, where)
            elif name == "numpy" and str(req.specifier):
                first("numpy", str(req.specifier), where)
    pyproject = src / "pyproject.toml"
    if pyproject.is_file():
        try:
            data = compat_mod.tomllib.loads(pyproject.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        for line in data.get("build-system", {}).get("requires", []) or []:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.name.lower() == "torch":
                first("torch", _pin(req), f"pyproject.toml [build-system] requires: {line}")
            elif req.name.lower() == "cmake":
                lb = _lower_bound(req.specifier)
                first("cmake_min", str(lb) if lb else None, f"pyproject.toml [build-system] requires: {line}")
        rp = data.get("project", {}).get("requires-python")
        if isinstance(rp, str):
            first("python", rp, f"pyproject.toml requires-python = {rp!r}")
    setup = src / "setup.py"
    if setup.is_file():
        try:
            m = re.search(r"python_requires\s*=\s*['\"]([^'\"]+)['\"]", setup.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            m = None
        if m:
            first("python", m.group(1), f"setup.py python_requires={m.group(1)!r}")
    cml = src / "CMakeLists.txt"
    if cml.is_file():
        try:
            text = cml.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        m = re.search(r"TORCH_SUPPORTED_VERSION_CUDA\s+\"([^\"]+)\"", text)
        if m:
            first("torch", m.group(1), f"CMakeLists.txt: set(TORCH_SUPPORTED_VERSION_CUDA \"{m.group(1)}\")")
        m = re.search(r"cmake_minimum_required\s*\(\s*VERSION\s+([\d.]+)", text, re.IGNORECASE)
        if m:
            old = pins.get("cmake_min")
            if old is None or Version(m.group(1)) > Version(old[0]):
                pins["cmake_min"] = (m.group(1), f"CMakeLists.txt: cmake_minimum_required(VERSION {m.group(1)})")
        m = re.search(r"PYTHON_SUPPORTED_VERSIONS((?:\s+\"\d+\.\d+\")+)", text)
        if m:
            vs = sorted(Version(v) for v in re.findall(r"\"(\d+\.\d+)\"", m.group(1)))
            if vs:
                hi = vs[-1]
                spec = f">={vs[0]},<{hi.major}.{hi.minor + 1}"
                pins["python_cmake"] = (spec, f"CMakeLists.txt: PYTHON_SUPPORTED_VERSIONS {m.group(1).strip()}")
        archs = _cmake_cuda_archs(text)
        if archs:
            pins["cuda_archs"] = (archs, "CMakeLists.txt: set(CUDA_SUPPORTED_ARCHS ...)")
    return pins


def _cmake_cuda_archs(text: str) -> dict[str, str]:
    """{'13.0': list, '12.8': list, 'default': list} from the if/elseif/else around CUDA_SUPPORTED_ARCHS."""
    out: dict[str, str] = {}
    cond: str | None = "default"
    for line in text.splitlines():
        s = line.strip()
        m = re.match(r"(?i)(else)?if\s*\((.*)\)", s)
        if m:
            v = re.search(r"VERSION_GREATER_EQUAL\s+([\d.]+)", m.group(2))
            cond = major_minor(v.group(1)) if v and "CUDA" in m.group(2).upper() else None
            continue
        if re.match(r"(?i)else\s*\(\s*\)", s):
            cond = "default"
            continue
        if re.match(r"(?i)endif\s*\(", s):
            cond = "default"
            continue
        m = re.match(r"(?i)set\s*\(\s*CUDA_SUPPORTED_ARCHS\s+\"([^\"]*)\"", s)
        if m and cond is not None and cond not in out:
            out[cond] = m.group(1)
    return out


def _archs_for(table: dict[str, str], cuda: str) -> str | None:
    cv = Version(major_minor(cuda))
    for key in sorted((k for k in table if k != "default"), key=Version, reverse=True):
        if cv >= Version(key):
            return table[key]
    return table.get("default")


# ===================================================================================== the checks

@dataclass
class _Ctx:
    variant: Any
    profile: dict
    data: CompatData
    env: dict[str, str]
    source_dir: Path | None
    findings: list[Finding] = field(default_factory=list)
    pins: dict[str, tuple[Any, str]] = field(default_factory=dict)
    probe: dict = field(default_factory=dict)
    records: list = field(default_factory=list)

    def probe_passed(self) -> bool:
        """The compile probe of this very source tree passed against the variant's torch."""
        p = self.probe
        if p.get("status") != "pass" or self.source_dir is None or not p.get("torch"):
            return False
        try:
            same_src = Path(p.get("source", "")).resolve() == self.source_dir.resolve()
            return same_src and Version(str(p["torch"])).public == self.torch_version
        except (InvalidVersion, OSError):
            return False

    @property
    def m(self) -> dict:
        return self.profile.get("machine") or {}

    @property
    def source(self) -> bool:
        return self.variant.vllm["mode"] == "source"

    @property
    def vllm_version(self) -> str:
        return self.variant.vllm["version"]

    @property
    def torch_version(self) -> str:
        return Version(self.variant.torch["version"]).public

    def add(self, id: str, severity: str, subject: str, evidence: str, fix: str, check: str = "") -> None:
        self.findings.append(Finding(id, severity, subject, evidence, fix, check))

    def skipped(self, check: str, subject: str, key: str) -> None:
        self.add("check-skipped", "info", subject, f"the machine profile has no {key}, so this was not checked",
                 f"probe the machine itself (`invoke doctor`) or add {key} to the profile", check)

    def unknown(self, check: str, subject: str, what: str) -> None:
        self.add("compat-unknown", "warning", subject,
                 f"{what} is not in the compatibility data (src/vllm_harness/data/compat.toml); not checked",
                 "add the facts with their source to data/compat.toml, or choose versions the data knows", check)

    def not_found(self, tool: str) -> bool:
        return tool in (self.m.get("not_found") or [])


def _cite(f: Fact | None) -> str:
    return f" [{f.cite()}]" if f is not None else ""


def _v(s: str) -> Version | None:
    try:
        return Version(s)
    except (InvalidVersion, TypeError):
        return None


def _reqs(variant: Any) -> list[Requirement]:
    out = []
    for section in (variant.torch, variant.deps, variant.post_install):
        for r in section.get("packages") or []:
            try:
                out.append(Requirement(r))
            except InvalidRequirement:
                pass
    return out


def _req_named(variant: Any, name: str, sections: Iterable[str] = ("torch", "deps", "post_install")) -> list[Requirement]:
    out = []
    for sec in sections:
        for r in getattr(variant, sec).get("packages") or []:
            try:
                req = Requirement(r)
            except InvalidRequirement:
                continue
            if req.name.lower() == name:
                out.append(req)
    return out


def _runtime_cuda(ctx: _Ctx, vf: compat_mod.VllmFacts | None) -> tuple[str, str]:
    """The CUDA the installed binaries need from the driver, and why."""
    cuda, why = ctx.variant.cuda, f"variant {ctx.variant.name} is CUDA {ctx.variant.cuda}"
    if not ctx.source and vf is not None and vf.wheel_cuda is not None and not ctx.variant.vllm.get("index_url"):
        w = str(vf.wheel_cuda.value)
        if Version(w) > Version(cuda):
            cuda, why = w, f"PyPI's vllm {ctx.vllm_version} wheel is built for CUDA {w}{_cite(vf.wheel_cuda)}"
    return cuda, why


def _check_driver(ctx: _Ctx, vf: compat_mod.VllmFacts | None) -> None:
    m, gpus = ctx.m, ctx.profile.get("gpu") or []
    driver, driver_cuda = m.get("driver"), m.get("driver_cuda")
    if not driver and not driver_cuda:
        if gpus:
            ctx.skipped("driver-too-old", "NVIDIA driver vs CUDA", "machine.driver")
            return
        arch_hint = ctx.variant.build.get("arch_list") or ""
        if ctx.source:
            can = "building is still possible" + (
                f" (arch_list = '{arch_hint}')" if arch_hint else
                " (set [build] arch_list, e.g. '7.5;8.9', to the GPUs it will run on; empty builds every arch "
                "the toolkit supports, which is slower)")
        else:
            can = "installing is still possible"
        ctx.add("no-driver", "warning", "NVIDIA GPU / driver",
                "no NVIDIA GPU or driver found (NVML and nvidia-smi; profile has no [[gpu]] and no machine.driver)",
                can + "; verifying needs a GPU: run verify on the GPU machine, or pass --allow-no-gpu. In a "
                "container, start it with --gpus all (NVIDIA Container Toolkit)")
        return
    need, why = _runtime_cuda(ctx, vf)
    cf = ctx.data.cuda(need)
    if cf is None:
        ctx.unknown("driver-too-old", "NVIDIA driver vs CUDA", f"CUDA {need} (its minimum driver)")
        return
    ok_newest = _newest_cuda_for(ctx.data, driver, driver_cuda)
    other = (f"or use a variant for CUDA {ok_newest} or older, which this driver runs" if ok_newest
             else "no CUDA version in the data runs on this driver")
    if driver:
        drv = _v(driver)
        dmin, cmin = Version(cf.driver_min.value), Version(cf.compat_driver_min.value)
        if drv is None:
            ctx.add("check-skipped", "info", "NVIDIA driver vs CUDA", f"driver version {driver!r} is not readable",
                    "check `nvidia-smi`", "driver-too-old")
            return
        if drv >= dmin:
            return
        if drv >= cmin and (driver_cuda is None or _v(driver_cuda).major == Version(need).major):
            ctx.add("driver-too-old", "warning", f"driver {driver} vs CUDA {need}",
                    f"{why}; its toolkit wants driver >= {cf.driver_min.value}{_cite(cf.driver_min)}; driver {driver} "
                    f"runs it only under minor-version compatibility (>= {cf.compat_driver_min.value}"
                    f"{_cite(cf.compat_driver_min)}): PTX newer than the driver cannot be JIT-compiled",
                    f"upgrade the driver to >= {cf.driver_min.value} ({NVIDIA_DRIVER_DOCS}), {other}")
            return
        evidence = (f"{why}; it needs driver >= {cf.driver_min.value}{_cite(cf.driver_min)} (>= "
                    f"{cf.compat_driver_min.value} with minor-version compatibility); this machine has driver {driver}"
                    + (f" (CUDA {driver_cuda})" if driver_cuda else ""))
    else:
        dc = _v(driver_cuda)
        if dc is None or dc >= Version(need):
            return
        if dc.major == Version(need).major:
            ctx.add("driver-too-old", "warning", f"driver (CUDA {driver_cuda}) vs CUDA {need}",
                    f"{why}; the driver supports CUDA {driver_cuda}: same major, so only minor-version "
                    f"compatibility (no JIT of newer PTX){_cite(cf.compat_driver_min)}",
                    f"upgrade the driver to >= {cf.driver_min.value}, {other}")
            return
        evidence = f"{why}; the driver supports CUDA {driver_cuda} only (needs >= {cf.driver_min.value}{_cite(cf.driver_min)})"
    ctx.add("driver-too-old", "error", f"driver {driver or ''} vs CUDA {need}".replace("  ", " "), evidence,
            f"upgrade the NVIDIA driver to >= {cf.driver_min.value} ({NVIDIA_DRIVER_DOCS}), {other}")
    # Forward compatibility could bridge a major gap, but only on data-center GPUs: elsewhere error 804.
    fwd = ctx.data.datacenter_fact()
    for g in gpus:
        dc = ctx.data.is_datacenter(g.get("name", ""))
        if dc is True:
            continue
        ctx.add("cuda-forward-compat", "warning" if not m.get("in_container") else "error",
                f"forward compatibility on {g.get('name', 'this GPU')}",
                f"the CUDA {need} runtime on driver {driver or driver_cuda} needs NVIDIA's forward-compatibility "
                f"package (cuda-compat, shipped in CUDA container images), which works only on data-center GPUs"
                f"{_cite(fwd)}; {g.get('name', 'this GPU')} is " + ("not one" if dc is False else "not known as one") +
                ": with cuda-compat on the library path CUDA fails with error 804 "
                "('forward compatibility was attempted on non supported HW')" +
                ("; this is a container, where images often put cuda-compat on LD_LIBRARY_PATH" if m.get("in_container") else ""),
                f"do not use cuda-compat on this GPU: upgrade the host driver to >= {cf.driver_min.value}, {other}")
        break


def _newest_cuda_for(data: CompatData, driver: str | None, driver_cuda: str | None) -> str | None:
    best = None
    for v in data.cuda_versions():
        cf = data.cuda(v)
        if driver and _v(driver) is not None:
            ok = _v(driver) >= Version(cf.driver_min.value)
        elif driver_cuda and _v(driver_cuda) is not None:
            ok = _v(driver_cuda) >= Version(v)
        else:
            ok = False
        if ok:
            best = v
    return best


def _gpu_ccs(ctx: _Ctx) -> list[tuple[dict, tuple[int, int]]]:
    out = []
    for g in ctx.profile.get("gpu") or []:
        cc = g.get("compute_capability")
        if not cc:
            ctx.skipped("no-kernel-image", f"GPU {g.get('name', '?')}", "gpu.compute_capability")
            continue
        out.append((g, parse_cc(cc)))
    return out


def _cc_str(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def _check_gpus(ctx: _Ctx, vf: compat_mod.VllmFacts | None, tf: compat_mod.TorchFacts | None) -> None:
    gpus = _gpu_ccs(ctx)
    if not gpus:
        return
    v = ctx.variant
    # torch wheels
    if v.torch.get("preinstalled"):
        ctx.add("check-skipped", "info", "torch kernels vs GPU",
                "torch is the interpreter's own (preinstalled = true): its arch list is not in the data",
                "run `invoke verify` after the build", "no-kernel-image")
    elif tf is None:
        ctx.unknown("no-kernel-image", "torch kernels vs GPU", f"torch {ctx.torch_version}")
    else:
        arch = tf.arch.get(v.cuda)
        if arch is None:
            ctx.unknown("no-kernel-image", "torch kernels vs GPU", f"the arch list of torch {ctx.torch_version}+{v.cuda_tag}")
        else:
            for g, cc in gpus:
                if not arch_list_runs_on(arch.value, cc):
                    ctx.add("no-kernel-image", "error", f"torch {ctx.torch_version}+{v.cuda_tag} on {g.get('name')}",
                            f"its wheels hold kernels for TORCH_CUDA_ARCH_LIST {arch.value}{_cite(arch)}; {g.get('name')} is "
                            f"compute capability {_cc_str(cc)} (no SASS of its major with a lower minor, no PTX below it)",
                            _arch_fix(ctx.data, cc, ctx.torch_version))
    # vLLM's own kernels
    cuda_for_vllm = v.cuda
    if not ctx.source and vf is not None and vf.wheel_cuda is not None:
        cuda_for_vllm = str(vf.wheel_cuda.value)
    if "cuda_archs" in ctx.pins and ctx.source:
        table, where = ctx.pins["cuda_archs"]
        supported, cite = _archs_for(table, cuda_for_vllm), f" [{where}]"
    elif vf is not None and vf.build_archs(cuda_for_vllm) is not None:
        f = vf.build_archs(cuda_for_vllm)
        supported, cite = f.value, _cite(f)
    else:
        supported, cite = None, ""
        ctx.unknown("no-kernel-image", "vLLM kernels vs GPU", f"the CUDA archs vLLM {ctx.vllm_version} builds")
    if supported is not None:
        built = [a for a, _ in parse_arch_list(supported)]
        for g, cc in gpus:
            if not any(a[0] == cc[0] and a[1] <= cc[1] for a in built):
                how = "its CMake builds" if ctx.source else "its wheel holds (the CMake list, assumed for the wheel)"
                ctx.add("no-kernel-image", "error", f"vLLM {ctx.vllm_version} kernels on {g.get('name')}",
                        f"{how} kernels for {supported} with CUDA {cuda_for_vllm}{cite}; {g.get('name')} is compute "
                        f"capability {_cc_str(cc)}",
                        "this GPU is below what this vLLM release supports: use an older vLLM release whose CMake "
                        "lists it (vLLM 0.6-0.16 build 7.0+), or another GPU")
    # nvcc targets (source builds)
    if ctx.source:
        cf = ctx.data.cuda(v.cuda)
        if cf is None:
            ctx.unknown("arch-unsupported-by-nvcc", "nvcc targets vs GPU", f"CUDA {v.cuda}")
        else:
            real = cf.sm_real()
            for g, cc in gpus:
                if not any(a[0] == cc[0] and a[1] <= cc[1] for a in real):
                    ctx.add("arch-unsupported-by-nvcc", "error", f"nvcc {v.cuda} vs {g.get('name')}",
                            f"nvcc {v.cuda} builds SASS for {', '.join(cf.sm.value)}{_cite(cf.sm)}; none runs on compute "
                            f"capability {_cc_str(cc)}",
                            _nvcc_fix(ctx.data, cc, ctx.m))
    # pre-Ampere: bf16 and FlashAttention
    old = [(g, cc) for g, cc in gpus if cc < (8, 0)]
    if old:
        names = ", ".join(f"{g.get('name')} ({_cc_str(cc)})" for g, cc in old)
        ctx.add("bf16-unsupported", "warning", "bfloat16 on pre-Ampere GPUs",
                f"{names}: bfloat16 needs compute capability >= 8.0",
                "serve with --dtype half (float16); verify's smoke tests use float16 on these GPUs")
        xf = "; keep xformers installed, vLLM uses its attention backend here" if _needs_xformers(ctx, vf) else ""
        ctx.add("flash-attn-unsupported-gpu", "warning", "FlashAttention on pre-Ampere GPUs",
                f"{names}: FlashAttention-2 needs compute capability >= 8.0",
                f"let vLLM pick another attention backend (do not force FLASH_ATTN){xf}")


def _needs_xformers(ctx: _Ctx, vf: compat_mod.VllmFacts | None) -> bool:
    return "xformers" in ctx.pins or (vf is not None and vf.xformers is not None)


def _arch_fix(data: CompatData, cc: tuple[int, int], torch_version: str) -> str:
    ok = []
    for tv in data.torch_versions():
        tf = data.torch(tv)
        for cuda, f in tf.arch.items():
            if arch_list_runs_on(f.value, cc):
                ok.append(f"{tv}+cu{cuda.replace('.', '')}")
    if not ok:
        return f"no torch release in the data has kernels for compute capability {_cc_str(cc)}"
    return f"choose a torch build with kernels for compute capability {_cc_str(cc)}, e.g. {', '.join(ok[-3:])}"


def _nvcc_fix(data: CompatData, cc: tuple[int, int], machine: dict | None = None) -> str:
    ok = [v for v in data.cuda_versions() if any(a[0] == cc[0] and a[1] <= cc[1] for a in data.cuda(v).sm_real())]
    if not ok:
        return f"no CUDA toolkit in the data targets compute capability {_cc_str(cc)}"
    fix = f"use a CUDA toolkit that targets compute capability {_cc_str(cc)}: {', '.join(ok)}"
    if machine is None:
        return fix
    from vllm_harness.facts.toolkit import (
        install_fix,  # how to get the newest of them on this machine's distribution
    )
    return f"{fix} (a variant for it; then {install_fix(machine.get('os'), ok[-1], machine.get('arch'))})"


def _check_arch_list(ctx: _Ctx) -> None:
    if not ctx.source:
        return
    given = ctx.env.get("TORCH_CUDA_ARCH_LIST") or ctx.variant.build.get("arch_list") or ""
    where = "TORCH_CUDA_ARCH_LIST" if ctx.env.get("TORCH_CUDA_ARCH_LIST") else "[build] arch_list"
    if not given.strip():
        return
    cf = ctx.data.cuda(ctx.variant.cuda)
    if cf is None:
        return  # reported by _check_gpus / _check_toolkit
    allowed = set(cf.sm.value)
    bad = []
    for item in re.split(r"[;\s,]+", given.strip()):
        if not item:
            continue
        base = item.upper().replace("+PTX", "").lower()
        if base not in allowed:
            bad.append(item)
    if bad:
        ctx.add("arch-unsupported-by-nvcc", "error", f"{where} vs nvcc {ctx.variant.cuda}",
                f"{where} = '{given}' names {', '.join(bad)}, which nvcc {ctx.variant.cuda} cannot build "
                f"(it builds {', '.join(cf.sm.value)}){_cite(cf.sm)}",
                f"remove {', '.join(bad)} from {where}")


def _check_python(ctx: _Ctx, vf: compat_mod.VllmFacts | None, tf: compat_mod.TorchFacts | None) -> None:
    found = ctx.m.get("python")
    if found is None:
        ctx.skipped("python-unsupported", "Python interpreter", "machine.python")
        return
    spec = SpecifierSet(ctx.variant.python)
    inside = sorted((p for p in found if spec.contains(p, prereleases=True)), key=Version)
    if not inside:
        ctx.add("python-unsupported", "error", f"Python {ctx.variant.python}",
                f"no interpreter in the variant's range '{ctx.variant.python}' (found: {', '.join(found) or 'none'})",
                f"install one (e.g. `uv python install {_minor_hint(spec)}`, or pyenv/conda) or pass --python PATH")
        return
    chosen = inside[-1]  # pythons.find takes the newest in range
    # vLLM's range: the tree's, else the data's
    if "python" in ctx.pins and ctx.source:
        vspec, cite = ctx.pins["python"][0], f" [{ctx.pins['python'][1]}]"
    elif vf is not None and vf.python is not None:
        vspec, cite = vf.python.value, _cite(vf.python)
    else:
        vspec, cite = None, ""
        ctx.unknown("python-unsupported", "Python vs vLLM", f"vLLM {ctx.vllm_version}'s Python range")
    ranges = [(f"vLLM {ctx.vllm_version}", vspec, cite)]
    if ctx.source and "python_cmake" in ctx.pins:
        ranges.append((f"vLLM {ctx.vllm_version}'s CMake", ctx.pins["python_cmake"][0], f" [{ctx.pins['python_cmake'][1]}]"))
    for what, rng, c in ranges:
        if rng is None:
            continue
        try:
            ok = SpecifierSet(rng).contains(chosen, prereleases=True)
        except InvalidSpecifier:
            continue
        if not ok:
            fits = [p for p in inside if SpecifierSet(rng).contains(p, prereleases=True)]
            ctx.add("python-unsupported", "error", f"Python {chosen} vs {what}",
                    f"the variant would use Python {chosen} (newest in '{ctx.variant.python}'); {what} requires "
                    f"'{rng}'{c}" + (f"; {', '.join(fits)} would fit" if fits else ""),
                    f"narrow the variant's python range into '{rng}' and have an interpreter there "
                    f"(e.g. `uv python install {_minor_hint(SpecifierSet(rng) & spec)}`)")
    if (not ctx.variant.torch.get("preinstalled") and tf is not None
            and not SpecifierSet(tf.python.value).contains(chosen, prereleases=True)):
        ctx.add("torch-wheel-not-found", "error", f"torch {ctx.torch_version} for Python {chosen}",
                f"torch {ctx.torch_version} publishes wheels for Python '{tf.python.value}'{_cite(tf.python)}; "
                f"the variant would use {chosen}",
                f"use a Python in '{tf.python.value}' for this variant")
    no_headers = ctx.m.get("python_without_headers") or []
    if chosen in no_headers:
        sev = "error" if ctx.source else "warning"
        mm = ".".join(chosen.split(".")[:2])
        ctx.add("python-headers-missing", sev, f"Python.h for {chosen}",
                f"the interpreter {chosen} has no Python.h; " + (
                    "building vLLM's extensions needs it" if ctx.source
                    else "Triton and torch.compile build small C modules at run time and need it"),
                f"install the headers (Debian/Ubuntu: apt install python{mm}-dev) or use a uv/pyenv/conda "
                "interpreter, which ship them")


def _minor_hint(spec: SpecifierSet) -> str:
    for m in range(15, 7, -1):
        if spec.contains(f"3.{m}.0", prereleases=True) or spec.contains(f"3.{m}.99", prereleases=True):
            return f"3.{m}"
    return "3"


def _check_torch(ctx: _Ctx, tf: compat_mod.TorchFacts | None) -> None:
    v = ctx.variant
    if v.torch.get("preinstalled"):
        return
    if tf is None:
        ctx.unknown("torch-wheel-not-found", f"torch {ctx.torch_version}", f"torch {ctx.torch_version}")
        return
    # local tags in the pins (torch==2.6.0+cu118)
    for req in _req_named(v, "torch", ("torch",)):
        for s in req.specifier:
            m = re.search(r"\+(cu\d+)$", s.version)
            if m and m.group(1) != v.cuda_tag:
                ctx.add("cuda-torch-version-mismatch", "error", f"torch pin {req}",
                        f"the pin names the {m.group(1)} build; the variant is {v.cuda_tag}",
                        f"pin torch=={ctx.torch_version}+{v.cuda_tag} or change the variant's cuda")
    index = v.torch.get("index_url")
    if index:
        m = re.search(r"/whl/(?:[a-z]+/)?(cu\d+)\b", index)
        if m and m.group(1) != v.cuda_tag:
            ctx.add("cuda-torch-version-mismatch", "error", "torch index URL",
                    f"index_url {index} serves {m.group(1)} builds; the variant is {v.cuda_tag}",
                    f"use https://download.pytorch.org/whl/{v.cuda_tag}")
        if v.cuda not in tf.cuda_variants.value:
            ctx.add("torch-wheel-not-found", "error", f"torch {ctx.torch_version}+{v.cuda_tag}",
                    f"torch {ctx.torch_version} is published for CUDA {', '.join(tf.cuda_variants.value)}"
                    f"{_cite(tf.cuda_variants)}, not {v.cuda}",
                    f"pick a torch release built for CUDA {v.cuda}: " + _torch_for_cuda(ctx.data, v.cuda))
    else:
        default = tf.pypi_default_cuda.value
        if default != v.cuda:
            has = v.cuda in tf.cuda_variants.value
            ctx.add("cuda-torch-version-mismatch", "error", f"torch {ctx.torch_version} from PyPI",
                    f"without index_url, PyPI's Linux wheel of torch {ctx.torch_version} is the CUDA {default} build"
                    f"{_cite(tf.pypi_default_cuda)}; the variant says CUDA {v.cuda}",
                    (f"add index_url = \"https://download.pytorch.org/whl/{v.cuda_tag}\" to [torch]" if has else
                     f"set cuda = \"{default}\" or pick a torch built for CUDA {v.cuda}: {_torch_for_cuda(ctx.data, v.cuda)}"))


def _torch_for_cuda(data: CompatData, cuda: str) -> str:
    vs = [tv for tv in data.torch_versions() if cuda in data.torch(tv).cuda_variants.value]
    return ", ".join(vs) if vs else f"none in the data for CUDA {cuda}"


def _check_vllm_pins(ctx: _Ctx, vf: compat_mod.VllmFacts | None) -> None:
    v = ctx.variant
    # torch pin
    if "torch" in ctx.pins:
        pin, cite = ctx.pins["torch"][0], f" [{ctx.pins['torch'][1]}]"
    elif vf is not None and vf.torch is not None:
        pin, cite = vf.torch.value, _cite(vf.torch)
    else:
        pin, cite = None, ""
        if v.torch.get("preinstalled") is not True or ctx.source:
            ctx.unknown("torch-api-mismatch", f"vLLM {ctx.vllm_version}'s torch", f"the torch pin of vLLM {ctx.vllm_version}")
    if pin is not None and Version(pin).public != ctx.torch_version:
        tv, pv = Version(ctx.torch_version), Version(pin)
        same_minor = (tv.major, tv.minor) == (pv.major, pv.minor)
        others = _vllm_for_torch(ctx.data, ctx.torch_version)
        alt = f", or use a vLLM release that pins torch {ctx.torch_version} ({others})" if others else ""
        if ctx.source and ctx.probe_passed():
            ctx.add("torch-api-mismatch", "warning", f"vLLM {ctx.vllm_version} source vs torch {ctx.torch_version}",
                    f"the vLLM source expects torch {pin}{cite}; the variant installs {ctx.torch_version}, but the "
                    f"compile probe of this tree against torch {ctx.probe['torch']} passed ({ctx.probe.get('log')})",
                    f"nothing to do unless the build fails; set [torch] version = \"{pin}\" to match the source")
        elif ctx.source:
            ctx.add("torch-api-mismatch", "warning" if same_minor else "error",
                    f"vLLM {ctx.vllm_version} source vs torch {ctx.torch_version}",
                    f"the vLLM source expects torch {pin}{cite}; the variant installs {ctx.torch_version}" +
                    ("; the C++ API is the same minor release (CMake only warns)" if same_minor else
                     "; its C++ code uses the torch API of that release (e.g. at::Tag::needs_fixed_stride_order)"),
                    f"set [torch] version = \"{pin}\" and its packages{alt}")
        else:
            ctx.add("dependency-conflict", "error", f"vllm=={ctx.vllm_version} vs torch {ctx.torch_version}",
                    f"the vllm {ctx.vllm_version} wheel requires torch=={pin}{cite}; the variant installs "
                    f"{ctx.torch_version}: pip fails (ResolutionImpossible) or replaces torch",
                    f"set [torch] version = \"{pin}\" and its packages{alt}")
    # xformers
    want = ctx.pins.get("xformers", (None, ""))[0] or (vf.xformers.value if vf is not None and vf.xformers else None)
    have = _req_named(v, "xformers", ("post_install", "deps"))
    for req in have:
        xv = _pin(req)
        if xv is None:
            continue
        xf = ctx.data.xformers(xv)
        if xf is None:
            ctx.unknown("xformers-torch-mismatch", f"xformers {xv}", f"xformers {xv}")
        elif Version(xf.torch.value) != Version(ctx.torch_version):
            ctx.add("xformers-torch-mismatch", "error", f"{req} vs torch {ctx.torch_version}",
                    f"xformers {xv} is built for torch {xf.torch.value}{_cite(xf.torch)}; the variant has {ctx.torch_version}: "
                    "pip would replace torch, or xformers fails to load",
                    "use the xformers release built for torch " + ctx.torch_version + ": " + _xformers_for(ctx.data, ctx.torch_version))
        if want and Version(want) != Version(xv):
            ctx.add("dependency-conflict", "warning", f"{req} vs vLLM {ctx.vllm_version}",
                    f"vLLM {ctx.vllm_version} pins xformers=={want}; the variant installs {xv}",
                    f"install xformers=={want}")
    if want and not have and ctx.source:
        gpus = [parse_cc(g["compute_capability"]) for g in ctx.profile.get("gpu") or [] if g.get("compute_capability")]
        ctx.add("xformers-missing", "warning", "xformers after a source build",
                f"vLLM {ctx.vllm_version} needs xformers=={want} at run time"
                + (" (its attention backend on pre-Ampere GPUs)" if any(cc < (8, 0) for cc in gpus) else "")
                + "; a --no-build-isolation source build does not always install it and the variant's "
                "[post_install] does not name it",
                f"add \"xformers=={want}\" to [post_install] packages with index_url = "
                f"\"https://download.pytorch.org/whl/{v.cuda_tag}\"")
    # numpy
    npf = vf.numpy if vf is not None else None
    np_tree = ctx.pins.get("numpy")
    np_reqs = _req_named(v, "numpy", ("torch", "deps", "post_install"))
    pinned_lt2 = any(not r.specifier.contains("2.0.0", prereleases=True) and str(r.specifier) for r in np_reqs)
    needs1 = (np_tree is not None and not SpecifierSet(np_tree[0]).contains("2.0.0")) or \
             (np_tree is None and npf is not None and npf.value in ("<2", "1-runtime"))
    if needs1 and not pinned_lt2:
        why = (f"{np_tree[1]}" if np_tree is not None and not SpecifierSet(np_tree[0]).contains("2.0.0") else
               ("vLLM pins numpy<2" if npf.value == "<2" else
                "modules of this stack are built against NumPy 1 (the source document hit it with vLLM 0.8.5)")
               + _cite(npf))
        ctx.add("numpy-abi", "warning", f"NumPy for vLLM {ctx.vllm_version}",
                f"{why}; the variant does not pin numpy<2, so NumPy 2 may be installed ('A module that was compiled "
                "using NumPy 1.x cannot be run in NumPy 2.x')",
                "add \"numpy<2\" to [deps] packages")
    if npf is not None and npf.value == ">=2" and pinned_lt2:
        ctx.add("dependency-conflict", "error", f"numpy<2 vs vLLM {ctx.vllm_version}",
                f"vLLM {ctx.vllm_version} needs NumPy 2{_cite(npf)}; the variant pins numpy<2",
                "remove the numpy<2 pin from the variant")
    # the vLLM wheel's CUDA vs the variant's
    if not ctx.source and vf is not None and vf.wheel_cuda is not None and not v.vllm.get("index_url"):
        w = str(vf.wheel_cuda.value)
        if Version(w).major != Version(v.cuda).major:
            ctx.add("cuda-runtime-lib-missing", "error", f"vllm {ctx.vllm_version} wheel (CUDA {w}) on CUDA {v.cuda}",
                    f"PyPI's vllm {ctx.vllm_version} is built for CUDA {w}{_cite(vf.wheel_cuda)} and loads "
                    f"libcudart.so.{Version(w).major}; the variant's stack is CUDA {v.cuda}",
                    f"build vLLM from source for CUDA {v.cuda} (mode = \"source\") or use a vLLM release built for it")


def _vllm_for_torch(data: CompatData, torch_version: str) -> str:
    out = [vf.match for _spec, vf in data._vllm if vf.torch is not None and Version(vf.torch.value) == Version(torch_version)]
    return "; ".join(out)


def _xformers_for(data: CompatData, torch_version: str) -> str:
    out = [x for x, f in data._xformers.items() if Version(f.torch.value) == Version(torch_version)]
    return ", ".join(out) or "none in the data"


def _venv_provides(variant: Any, name: str, need: Version | None = None) -> Requirement | None:
    for req in _req_named(variant, name, ("deps",)):
        if need is None:
            return req
        lb = _lower_bound(req.specifier)
        if lb is not None and lb >= need:
            return req
    return None


def _check_build(ctx: _Ctx, vf: compat_mod.VllmFacts | None) -> None:
    v, m = ctx.variant, ctx.m
    cf = ctx.data.cuda(v.cuda)
    # --- CUDA toolkit
    from vllm_harness.facts.toolkit import PYPI_EXTRAS, install_fix
    tk = m.get("cuda_toolkits")
    pypi = v.build.get("toolkit") == "pypi"
    # what installs this CUDA on this machine's distribution (profile key `os`), best first
    install = f"{install_fix(m.get('os'), v.cuda, m.get('arch'))}; the build sets CUDA_HOME, PATH and LD_LIBRARY_PATH to it"
    if pypi:
        ctx.add("cuda-home-missing", "info", f"CUDA {v.cuda} toolkit from PyPI",
                f"[build] toolkit = \"pypi\": the deps step installs cuda-toolkit[{','.join(PYPI_EXTRAS)}] at the "
                f"release torch {ctx.torch_version} pins into the variant's venv, and the build's CUDA_HOME is its "
                f"nvidia/cu{v.cuda.split('.')[0]}; no system toolkit is used"
                + (f" (found here, unused: {', '.join(tk)})" if tk else ""), "nothing to do")
    elif tk is None:
        ctx.skipped("cuda-home-missing", f"CUDA {v.cuda} toolkit", "machine.cuda_toolkits")
    elif v.cuda in tk and (broken := [e for e in m.get("cuda_incomplete") or [] if e.startswith(f"{tk[v.cuda]} (")]):
        ctx.add("nvcc-not-found", "warning", f"CUDA {v.cuda} toolkit",
                f"the toolkit at {broken[0]}: its nvcc runs, but a build stops at the first missing part", install)
    elif v.cuda not in tk:
        same_major = [t for t in tk if t.split(".")[0] == v.cuda.split(".")[0]]
        if not tk:
            no_nvcc = m.get("cuda_without_nvcc") or []
            if no_nvcc:
                ctx.add("nvcc-not-found", "error", f"CUDA {v.cuda} toolkit",
                        f"CUDA installs without bin/nvcc (runtime only): {', '.join(no_nvcc)}; no toolkit with nvcc found",
                        install)
            else:
                ctx.add("cuda-home-missing", "error", f"CUDA {v.cuda} toolkit",
                        "no CUDA toolkit found (CUDA_HOME/CUDA_PATH, /usr/local/cuda*, nvcc on PATH, $CONDA_PREFIX, "
                        "pip's nvidia-cuda-nvcc)", install)
        elif same_major:
            ctx.add("cuda-torch-version-mismatch", "error", f"CUDA {v.cuda} toolkit",
                    f"found {', '.join(f'{k} at {tk[k]}' for k in same_major)}, not {v.cuda}; the build uses the "
                    f"toolkit of the variant's CUDA (torch {ctx.torch_version}+{v.cuda_tag} itself would accept "
                    "another minor of the same major with a warning)",
                    f"{install}; or make a variant for CUDA {same_major[-1]}")
        else:
            ctx.add("cuda-torch-version-mismatch", "error", f"CUDA {v.cuda} toolkit",
                    f"found only {', '.join(f'{k} at {tk[k]}' for k in tk)}; torch {ctx.torch_version}+{v.cuda_tag} "
                    f"is CUDA {v.cuda}: building against CUDA {', '.join(tk)} fails ('The detected CUDA version ... "
                    "mismatches the version that was used to compile PyTorch')", install)
    if not pypi and ctx.env.get("CUDA_HOME") and tk and tk.get(v.cuda) and os.path.normpath(ctx.env["CUDA_HOME"]) != os.path.normpath(tk[v.cuda]):
        ctx.add("cuda-torch-version-mismatch", "info", "CUDA_HOME in the environment",
                f"CUDA_HOME={ctx.env['CUDA_HOME']} is set; the CUDA {v.cuda} toolkit is {tk[v.cuda]}",
                f"the build sets CUDA_HOME={tk[v.cuda]} for this variant")
    # --- host compiler
    gcc = m.get("gcc")
    if gcc is None:
        if ctx.not_found("gcc"):
            ctx.add("host-compiler-unsupported", "error", "host compiler (gcc)", "no gcc on PATH",
                    f"install gcc/g++ (<= {cf.gcc_max.value} for CUDA {v.cuda})" if cf else "install gcc and g++")
        else:
            ctx.skipped("host-compiler-unsupported", "host compiler (gcc)", "machine.gcc")
    elif cf is None:
        ctx.unknown("host-compiler-unsupported", "host compiler (gcc)", f"CUDA {v.cuda}'s supported gcc")
    else:
        major = Version(gcc).major
        if major > int(cf.gcc_max.value):
            hm = int(cf.gcc_max.value)
            benv = {**(v.build.get("env") or {}), **ctx.env}
            override = [k for k in ("CUDAHOSTCXX", "CXX", "CC") if benv.get(k)]
            ev = (f"gcc {gcc} is the default host compiler; nvcc {v.cuda} accepts gcc <= {hm}{_cite(cf.gcc_max)} "
                  f"('unsupported GNU version! gcc versions later than {hm} are not supported')")
            fix = (f"install gcc-{hm} and g++-{hm} (e.g. apt install gcc-{hm} g++-{hm}) and build with "
                   f"CC=gcc-{hm} CXX=g++-{hm} CUDAHOSTCXX=g++-{hm} (set them in [build] env); "
                   "-allow-unsupported-compiler is at your own risk")
            usable = [a for a in m.get("gcc_alternatives", []) if Version(a).major <= hm]
            named = [int(x) for k in override for x in re.findall(r"(?:gcc|g\+\+)-(\d+)$", benv[k])]
            if usable and not override:
                best = Version(usable[-1]).major
                ctx.add("host-compiler-unsupported", "info", f"gcc {gcc} vs CUDA {v.cuda}",
                        ev + f"; gcc-{best} ({usable[-1]}) is installed",
                        f"nothing to do: the build sets CC=gcc-{best} CXX=g++-{best} CUDAHOSTCXX=g++-{best} "
                        "for this toolkit")
            elif override and named and max(named) <= hm:
                ctx.add("host-compiler-unsupported", "info", f"gcc {gcc} vs CUDA {v.cuda}",
                        ev + f"; {', '.join(f'{k}={benv[k]}' for k in override)} is set", "nothing to do")
            elif override:
                ctx.add("host-compiler-unsupported", "warning", f"gcc {gcc} vs CUDA {v.cuda}",
                        ev + f"; {', '.join(f'{k}={benv[k]}' for k in override)} is set, whose version was not checked",
                        f"make sure those name gcc/g++ <= {hm}; otherwise {fix}")
            else:
                ctx.add("host-compiler-unsupported", "error", f"gcc {gcc} vs CUDA {v.cuda}", ev, fix)
    # --- cmake
    need_s, need_cite = v.build.get("cmake_min") or "3.26", " [variant [build] cmake_min]"
    candidates = [(need_s, need_cite)]
    if "cmake_min" in ctx.pins:
        candidates.append((ctx.pins["cmake_min"][0], f" [{ctx.pins['cmake_min'][1]}]"))
    elif vf is not None and vf.cmake_min is not None:
        candidates.append((vf.cmake_min.value, _cite(vf.cmake_min)))
    need_s, need_cite = max(reversed(candidates), key=lambda c: Version(c[0]))  # ties: cite the data
    need = Version(need_s)
    cm = m.get("cmake")
    venv = _venv_provides(v, "cmake", need)
    if cm is not None and Version(cm) >= need:
        pass
    elif venv is not None and cm is None and not ctx.not_found("cmake"):
        pass  # the venv's cmake is used whatever the system has
    elif venv is not None:
        what = f"cmake {cm} on PATH is older than {need_s}" if cm else "no cmake on PATH"
        ctx.add("cmake-too-old", "info", "cmake", f"{what}{need_cite}",
                f"nothing to do: the venv's cmake ({venv} from [deps]) will be used")
    elif cm is not None:
        ctx.add("cmake-too-old", "error", f"cmake {cm}", f"vLLM needs CMake >= {need_s}{need_cite}; cmake on PATH is {cm}",
                f"add \"cmake>={need_s}\" to [deps] packages (the venv's cmake comes first on PATH) or upgrade cmake")
    elif ctx.not_found("cmake"):
        ctx.add("cmake-too-old", "error", "cmake", f"no cmake on PATH; vLLM needs CMake >= {need_s}{need_cite}",
                f"add \"cmake>={need_s}\" to [deps] packages")
    else:
        ctx.skipped("cmake-too-old", "cmake", "machine.cmake")
    # --- ninja
    if m.get("ninja") is None and _venv_provides(v, "ninja") is None:
        if ctx.not_found("ninja"):
            ctx.add("ninja-missing", "warning", "ninja", "no ninja on PATH and [deps] does not install it",
                    "add \"ninja\" to [deps] packages (vLLM's build uses it; without it CMake falls back to make)")
        else:
            ctx.skipped("ninja-missing", "ninja", "machine.ninja")
    # --- RAM vs parallel jobs
    ram_key = "ram_available_gib" if "ram_available_gib" in m else "ram_gib"
    ram = m.get(ram_key)
    if ram is None:
        ctx.skipped("compiler-oom", "parallel compile jobs", "machine.ram_gib")
    else:
        threads = v.build.get("nvcc_threads") or 1
        try:
            threads = int(ctx.env.get("NVCC_THREADS") or threads)
        except ValueError:
            pass
        # the build's own rule (buildspeed): the measured per-job peak of earlier builds, else the prior; a
        # reserve for the OS, pip and the linker; a margin on each job
        from vllm_harness.steps import build_memory as bmem
        device = v.build.get("env", {}).get("VLLM_TARGET_DEVICE", "cuda")
        per_thread, per_why = bmem.per_thread_gib(ctx.records, getattr(v, "name", ""), device)
        per_job = per_thread * max(1, threads)
        fit = bmem.jobs_that_fit(ram, per_job)
        cores = m.get("cpu_cores")
        jobs: Any = v.build.get("jobs", "auto")
        src = "[build] jobs"
        if ctx.env.get("MAX_JOBS", "").strip().isdigit():
            jobs, src = int(ctx.env["MAX_JOBS"]), "MAX_JOBS"
        basis = (f"{ram} GiB {'available' if ram_key == 'ram_available_gib' else 'RAM'} - {bmem.RESERVE_GIB:g} "
                 f"reserve, {per_job:.2f} GiB per compile job x {bmem.MARGIN:g} ({per_why})")
        if fit < 1:
            ctx.add("compiler-oom", "error", "RAM for compiling", f"{basis}: not even one job fits",
                    "build on a machine with more memory, or add swap")
        elif jobs == "auto":
            n = min(cores, fit) if cores else fit
            ctx.add("compiler-oom", "info", "parallel compile jobs",
                    f"jobs = 'auto' gives {n} job(s): {basis}" + (f", {cores} cores" if cores else ""),
                    "nothing to do; lower [build] jobs if the build is killed (signal 9)")
        elif int(jobs) > fit:
            total = m.get("ram_gib")
            certain = total is not None and int(jobs) * per_job > total
            ctx.add("compiler-oom", "error" if certain else "warning", "parallel compile jobs",
                    f"{src} = {jobs} x {per_job:.2f} GiB > {ram} GiB less the reserve and margin ({per_why})",
                    f"set [build] jobs = {fit} (or 'auto'){' and unset MAX_JOBS' if src == 'MAX_JOBS' else ''}")
    # --- VLLM_USE_PRECOMPILED
    for key in ("VLLM_USE_PRECOMPILED", "VLLM_PRECOMPILED_WHEEL_LOCATION"):
        val = ctx.env.get(key, v.build.get("env", {}).get(key))
        if val is None or val == "":
            continue
        wheel = str(vf.wheel_cuda.value) if vf is not None and vf.wheel_cuda is not None else None
        note = " (vLLM's envs.py of these releases treats any non-empty value, even \"0\", as on)" if key == "VLLM_USE_PRECOMPILED" else ""
        if Version(v.cuda).major < 12 or (wheel and Version(wheel).major != Version(v.cuda).major):
            ctx.add("cuda-runtime-lib-missing", "error", f"{key} on a CUDA {v.cuda} source build",
                    f"{key}={val} is set{note}: the compiled parts come from a prebuilt wheel built for CUDA "
                    f"{wheel or '12.x'}, which needs libcudart.so.{Version(wheel).major if wheel else 12}; this stack is CUDA {v.cuda}",
                    f"unset {key} and let the harness build from source with CUDA_HOME at the CUDA {v.cuda} toolkit")
        else:
            ctx.add("cuda-runtime-lib-missing", "warning", f"{key} on a source build",
                    f"{key}={val} is set{note}: the kernels come from a prebuilt wheel, not from this build",
                    f"unset {key} unless you want prebuilt kernels")


def _check_disk(ctx: _Ctx) -> None:
    free = ctx.m.get("disk_free_gib")
    need = DISK_SOURCE_GIB if ctx.source else DISK_WHEEL_GIB
    what = "a source build" if ctx.source else "a wheel install"
    if free is None:
        ctx.skipped("disk-full", "disk space", "machine.disk_free_gib")
    elif free < need:
        ctx.add("disk-full", "error", "disk space", f"{free} GiB free where builds go; {what} needs about {need:g} GiB",
                "free space (`invoke clean --all`, pip/uv caches), or point the build directory at a larger disk")


def _safe_directories(env: dict[str, str]) -> list[str]:
    out = []
    home = env.get("HOME") or os.path.expanduser("~")
    for cfg in (Path(home) / ".gitconfig", Path(home) / ".config" / "git" / "config", Path("/etc/gitconfig")):
        try:
            text = cfg.read_text(errors="replace")
        except OSError:
            continue
        section = ""
        for line in text.splitlines():
            s = line.strip()
            if s.startswith("["):
                section = s.strip("[]").strip().lower()
            elif section == "safe" and "=" in s:
                k, _, val = s.partition("=")
                if k.strip().lower() == "directory":
                    out.append(val.strip().strip('"'))
    return out


def _check_source_tree(ctx: _Ctx) -> None:
    src = ctx.source_dir
    if src is None or not src.is_dir():
        return
    me = os.geteuid() if hasattr(os, "geteuid") else None
    safe = _safe_directories(ctx.env)
    trees = [src] + [Path(p) for p in sorted(glob.glob(str(src / ".deps" / "*-src")))]
    for t in trees:
        if not (t / ".git").exists() or me is None:
            continue
        try:
            owner = t.stat().st_uid
        except OSError:
            continue
        if owner != me and "*" not in safe and str(t) not in safe and os.path.realpath(t) not in safe:
            ctx.add("git-dubious-ownership", "error", f"git tree {t}",
                    f"{t} is owned by uid {owner}, this user is uid {me}: git refuses it ('detected dubious ownership')",
                    f"git config --global --add safe.directory {t}  (name each tree; avoid safe.directory '*'), "
                    "or chown the tree to this user")
    leftovers = [p for p in ("build", "dist", ".deps") if (src / p).is_dir()]
    leftovers += [Path(p).name for p in sorted(glob.glob(str(src / "*.egg-info")))]
    if leftovers:
        ctx.add("stale-build-state", "info", f"leftovers in {src}",
                f"found {', '.join(leftovers)} from an earlier build",
                "if this build's settings (CUDA, torch, archs) differ from the earlier one, remove them first "
                f"(`invoke clean --variant {ctx.variant.name}`)")


# ======================================================================================= public API

def check(variant: Any, profile: dict, source_dir: Path | None = None, env: dict | None = None,
          data: CompatData | None = None, probe: dict | None = None, records: list | None = None) -> list[Finding]:
    """Findings for ``variant`` on the machine ``profile``: errors first, then warnings, then info.
    ``probe``: the record of the last compile probe of this variant (its outcome outweighs the pin rule).
    ``records``: the build-speed records (peak memory per compile job) of earlier builds on this machine."""
    ctx = _Ctx(variant=variant, profile=profile or {}, data=data or compat_mod.load(), env=dict(env or {}),
               source_dir=Path(source_dir) if source_dir is not None else None, probe=probe or {},
               records=list(records or []))
    if ctx.source_dir is not None and ctx.source_dir.is_dir():
        ctx.pins = read_source_pins(ctx.source_dir)
    vf = ctx.data.vllm(ctx.vllm_version)
    tf = ctx.data.torch(ctx.torch_version)
    if vf is None and not ctx.pins:
        ctx.unknown("torch-api-mismatch", f"vLLM {ctx.vllm_version}",
                    f"vLLM {ctx.vllm_version} (its torch pin, Python range, CMake minimum, build archs)")
        vf_for_checks = None
    else:
        vf_for_checks = vf
    _check_driver(ctx, vf_for_checks)
    _check_gpus(ctx, vf_for_checks, tf)
    _check_arch_list(ctx)
    _check_python(ctx, vf_for_checks, tf)
    _check_torch(ctx, tf)
    _check_vllm_pins(ctx, vf_for_checks)
    if ctx.source:
        _check_build(ctx, vf_for_checks)
    _check_disk(ctx)
    _check_source_tree(ctx)
    _check_compat_staleness(ctx)
    order = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(ctx.findings, key=lambda f: order[f.severity])


COMPAT_OLD_DAYS = 60   # generated index data older than this gets an info finding


def _check_compat_staleness(ctx: _Ctx) -> None:
    """A variant newer than the data: one ``compat-stale`` finding naming the refresh, instead of the
    ``compat-unknown`` warnings its gaps caused.  Old generated data: an info finding with its age."""
    data = ctx.data
    age = data.age_days() if hasattr(data, "age_days") else None
    when = (f"the index data was generated on {data.generated} ({age} day{'s' if age != 1 else ''} ago)"
            if age is not None else "no index data was generated yet (hand-kept data only)")
    newer = []
    if hasattr(data, "newer_than_data"):
        if data.newer_than_data("vllm", ctx.vllm_version):
            newer.append(f"vLLM {ctx.vllm_version} (newest known {data.newest('vllm')})")
        if not ctx.variant.torch.get("preinstalled") and data.newer_than_data("torch", ctx.torch_version):
            newer.append(f"torch {ctx.torch_version} (newest known {data.newest('torch')})")
    if newer:
        ctx.findings = [f for f in ctx.findings if f.id != "compat-unknown"]
        ctx.add("compat-stale", "warning", "compatibility data older than the variant",
                f"{' and '.join(newer)} is newer than the compatibility data; {when}: its torch pin, Python range "
                "and wheels were not checked",
                f"run `{compat_mod.REFRESH_COMMAND}` (nox -s compat) to read them from the package index, then "
                "doctor again")
    elif age is not None and age > COMPAT_OLD_DAYS:
        ctx.add("compat-stale", "info", "age of the compatibility data",
                f"{when}; releases published since are unknown to doctor",
                f"run `{compat_mod.REFRESH_COMMAND}` (nox -s compat) when the package index is reachable")


def verdict(findings: Iterable[Finding]) -> str:
    sev = {f.severity for f in findings}
    if "error" in sev:
        return "will fail"
    if "warning" in sev:
        return "ready with warnings"
    return "ready"


def exit_code(findings: Iterable[Finding]) -> int:
    """cli.md: 1 when doctor found a problem (an error), else 0."""
    return 1 if any(f.severity == "error" for f in findings) else 0


def rank_variants(variants: Iterable[Any], profile: dict, env: dict | None = None) -> list[tuple[str, bool, str]]:
    """(name, ok, reason) for each variant, best first: the ones that will not fail, with fewer warnings,
    newer CUDA, wheels before source builds."""
    rows = []
    for v in variants:
        fs = check(v, profile, env=env)
        errors = [f for f in fs if f.severity == "error"]
        warnings = [f for f in fs if f.severity == "warning"]
        ok = not errors
        if errors:
            reason = "; ".join(f"{f.id}: {f.subject}" for f in errors[:3]) + (f" (+{len(errors) - 3} more)" if len(errors) > 3 else "")
        elif warnings:
            reason = "ready with warnings: " + ", ".join(sorted({f.id for f in warnings}))
        else:
            reason = "ready"
        key = (not ok, len(errors), len(warnings), -_cuda_key(v.cuda), v.vllm.get("mode") != "wheel", v.name)
        rows.append((key, (v.name, ok, reason)))
    rows.sort(key=lambda r: r[0])
    return [r[1] for r in rows]


def _cuda_key(cuda: str) -> float:
    try:
        ma, mi = cuda.split(".")
        return int(ma) * 100 + int(mi)
    except ValueError:
        return 0


def report_dict(variant: Any, profile: dict, findings: list[Finding]) -> dict:
    """cli.md's doctor JSON: {"variant", "machine", "findings"} plus "verdict"."""
    return {"variant": variant.name, "verdict": verdict(findings), "machine": profile,
            "findings": [f.to_dict() for f in findings]}


def render_table(report: dict, console: Any = None, show: bool = True) -> str:
    """Print the report as a rich table (to ``console``, default stdout; nothing when ``show`` is False)
    and return the rendered text."""

    from rich.markup import escape
    from rich.table import Table

    colours = {"error": "bold red", "warning": "yellow", "info": "dim"}
    table = Table(title=f"doctor: {escape(str(report.get('variant')))} -> {escape(str(report.get('verdict')))}",
                  show_lines=True, expand=False)
    for col in ("severity", "id", "subject", "evidence", "fix"):
        table.add_column(col, overflow="fold")
    for f in report.get("findings", []):
        table.add_row(f"[{colours.get(f['severity'], 'default')}]{escape(f['severity'])}[/]", escape(f["id"]),
                      escape(f["subject"]), escape(f["evidence"]), escape(f["fix"]))
    m = (report.get("machine") or {}).get("machine") or {}
    gpus = (report.get("machine") or {}).get("gpu") or []
    summary = escape(
        f"GPU: {', '.join(g.get('name', '?') + ' (' + g.get('compute_capability', '?') + ')' for g in gpus) or 'none'}"
        f" | driver: {m.get('driver', 'none')} | toolkits: {', '.join(m.get('cuda_toolkits', {})) or 'none'}"
        f" | gcc {m.get('gcc', '?')} | cmake {m.get('cmake', '?')} | Python {', '.join(m.get('python', [])) or '?'}")
    parts = [table, summary] + (["no findings"] if not report.get("findings") else [])
    from vllm_harness.core.runner import emit
    return emit(parts, console, show)


def run(variant: Any, build_dir: Path, machine_file: Path | None = None, save_machine: Path | None = None,
        source_dir: Path | None = None, env: dict | None = None) -> tuple[dict, int]:
    """What ``invoke doctor`` does: probe (or load ``machine_file``), optionally save the profile, check.
    Returns (report dict, exit code).  ``env`` defaults to this process's environment facts."""
    from vllm_harness.facts import machine

    profile = machine.load_profile(machine_file) if machine_file else machine.probe(build_dir)
    if save_machine:
        machine.save_profile(profile, save_machine)
    facts = machine.env_facts() if env is None else env
    if source_dir is None and variant.vllm.get("source") == "path":
        source_dir = variant.source_path()
    findings = check(variant, profile, source_dir=source_dir, env=facts)
    return report_dict(variant, profile, findings), exit_code(findings)
