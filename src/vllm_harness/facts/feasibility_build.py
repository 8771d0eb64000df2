"""The feasibility judge's rules for what a build needs around the GPU (issue 28): the Python interpreter, the
host compiler nvcc accepts, cmake and disk space.  ``feasibility.judge`` calls them for every candidate plan
tries, and doctor's rules (doctor/rules_versions.py, doctor/rules_build.py) turn the same issues into its
findings, so plan never recommends what doctor then refuses.

A source tree's own pins (``tree``: doctor's ``read_source_pins``: ``python``, ``python_cmake``,
``cmake_min``) and the shell's environment (``env``: a CC/CXX/CUDAHOSTCXX there) are judged when given.
"""

from __future__ import annotations

import re

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from vllm_harness.facts.compat import CompatData, CudaFacts, TorchFacts, VllmFacts
from vllm_harness.facts.feasibility_model import (
    COMPILER_KEYS,
    Candidate,
    Issue,
    cite,
    make_issue,
    skipped,
    unknown,
    version_or_none,
)

DISK_SOURCE_GIB = 30.0  # source build: venv + torch + build tree + .deps + caches
DISK_WHEEL_GIB = 15.0  # wheel install: venv + torch + vLLM + deps + caches
UV_CACHE_GIB = 10.0  # uv's cache on a disk of its own: a CUDA torch stack unpacks about 8 GiB there

#: the oldest gcc that builds C++ against torch's headers (C++17); nvcc itself has no lower bound on Linux
GCC_MIN = 9
GCC_MIN_WHY = "PyTorch's README: 'gcc 9.4.0 or newer is required, on Linux'"
Pins = dict  # {key: (value, 'file: line')} of a source tree (doctor/pins.read_source_pins)


def _machine(profile: dict) -> dict:
    return profile.get("machine") or {}


def _not_found(profile: dict, tool: str) -> bool:
    return tool in (_machine(profile).get("not_found") or [])


# ------------------------------------------------------------------------------------------- Python


def minor_hint(spec: SpecifierSet) -> str:
    """The newest Python minor a range admits ('3.12'), for `uv python install`."""
    for m in range(15, 7, -1):
        if spec.contains(f"3.{m}.0", prereleases=True) or spec.contains(f"3.{m}.99", prereleases=True):
            return f"3.{m}"
    return "3"


def python_issues(
    data: CompatData,
    profile: dict,
    cand: Candidate,
    vf: VllmFacts | None,
    tf: TorchFacts | None,
    tree: Pins | None = None,
) -> list[Issue]:
    """The interpreter the variant would use (the newest of the machine's in its range) against vLLM's range
    (the source tree's, else the data's), torch's wheels and the headers a build needs."""
    if cand.python is None:
        return []
    found = _machine(profile).get("python")
    if found is None:
        return [skipped("python-unsupported", "Python interpreter", "machine.python")]
    spec = SpecifierSet(cand.python)
    inside = sorted((p for p in found if spec.contains(p, prereleases=True)), key=Version)
    if not inside:
        return [
            make_issue(
                "python-unsupported",
                "error",
                f"Python {cand.python}",
                f"no interpreter in the variant's range '{cand.python}' "
                f"(found: {', '.join(found) or 'none'})",
                f"install one (e.g. `uv python install {minor_hint(spec)}`, or pyenv/conda) or pass "
                f"--python PATH",
                # the interpreter's own torch (JetPack's) is not in a newly installed Python
                fixable=not cand.torch_preinstalled,
            )
        ]
    chosen = inside[-1]  # pythons.find takes the newest in range
    out = _python_ranges(cand, vf, tree or {}, spec, inside, chosen)
    if (
        not cand.torch_preinstalled
        and tf is not None
        and not SpecifierSet(tf.python.value).contains(chosen, prereleases=True)
    ):
        out.append(
            make_issue(
                "torch-wheel-not-found",
                "error",
                f"torch {cand.torch} for Python {chosen}",
                f"torch {cand.torch} publishes wheels for Python '{tf.python.value}'{cite(tf.python)}; "
                f"the variant would use {chosen}",
                f"use a Python in '{tf.python.value}' for this variant",
                fixable=True,
            )
        )
    if chosen in (_machine(profile).get("python_without_headers") or []):
        mm = ".".join(chosen.split(".")[:2])
        need = (
            "building vLLM's extensions needs it"
            if cand.source
            else "Triton and torch.compile build small C modules at run time and need it"
        )
        out.append(
            make_issue(
                "python-headers-missing",
                "error" if cand.source else "warning",
                f"Python.h for {chosen}",
                f"the interpreter {chosen} has no Python.h; {need}",
                f"install the headers (Debian/Ubuntu: apt install python{mm}-dev) or use a uv/pyenv/conda "
                "interpreter, which ship them",
                fixable=True,
            )
        )
    return out


def _python_ranges(
    cand: Candidate, vf: VllmFacts | None, tree: Pins, spec: SpecifierSet, inside: list[str], chosen: str
) -> list[Issue]:
    out: list[Issue] = []
    if "python" in tree and cand.source:
        vspec, cited = tree["python"][0], f" [{tree['python'][1]}]"
    elif vf is not None and vf.python is not None:
        vspec, cited = vf.python.value, cite(vf.python)
    else:
        vspec, cited = None, ""
        out.append(unknown("python-unsupported", "Python vs vLLM", f"vLLM {cand.vllm}'s Python range"))
    ranges = [(f"vLLM {cand.vllm}", vspec, cited)]
    if cand.source and "python_cmake" in tree:
        ranges.append((f"vLLM {cand.vllm}'s CMake", tree["python_cmake"][0], f" [{tree['python_cmake'][1]}]"))
    for what, rng, c in ranges:
        try:
            if rng is None or SpecifierSet(rng).contains(chosen, prereleases=True):
                continue
        except InvalidSpecifier:
            continue
        fits = [p for p in inside if SpecifierSet(rng).contains(p, prereleases=True)]
        out.append(
            make_issue(
                "python-unsupported",
                "error",
                f"Python {chosen} vs {what}",
                f"the variant would use Python {chosen} (newest in '{cand.python}'); {what} requires "
                f"'{rng}'{c}" + (f"; {', '.join(fits)} would fit" if fits else ""),
                f"narrow the variant's python range into '{rng}' and have an interpreter there "
                f"(e.g. `uv python install {minor_hint(SpecifierSet(rng) & spec)}`)",
                fixable=True,
            )
        )
    return out


# ------------------------------------------------------------------------------------ host compiler


def host_compiler_issues(
    cf: CudaFacts | None, profile: dict, cand: Candidate, env: dict[str, str] | None = None
) -> list[Issue]:
    """The default gcc against the newest nvcc of ``cand.cuda`` accepts; a gcc-N installed beside it (the
    build points nvcc at it) or a compiler named in [build] env / the shell is judged too."""
    m = _machine(profile)
    gcc = m.get("gcc")
    subject = "host compiler (gcc)"
    if gcc is None:
        if _not_found(profile, "gcc"):
            fix = (
                f"install gcc/g++ (<= {cf.gcc_max.value} for CUDA {cand.cuda})"
                if cf
                else "install gcc and g++"
            )
            return [
                make_issue("host-compiler-unsupported", "error", subject, "no gcc on PATH", fix, fixable=True)
            ]
        return [skipped("host-compiler-unsupported", subject, "machine.gcc")]
    if cf is None:
        return [unknown("host-compiler-unsupported", subject, f"CUDA {cand.cuda}'s supported gcc")]
    hm = int(cf.gcc_max.value)
    major = Version(gcc).major
    if GCC_MIN <= major <= hm:
        return []
    benv = {**dict(cand.compilers), **(env or {})}
    override = [k for k in COMPILER_KEYS if benv.get(k)]
    if major < GCC_MIN:
        return [_old_gcc(gcc, cf, m, cand, benv, override)]
    subject = f"gcc {gcc} vs CUDA {cand.cuda}"
    ev = (
        f"gcc {gcc} is the default host compiler; nvcc {cand.cuda} accepts gcc <= {hm}{cite(cf.gcc_max)} "
        f"('unsupported GNU version! gcc versions later than {hm} are not supported')"
    )
    fix = (
        f"install gcc-{hm} and g++-{hm} (e.g. apt install gcc-{hm} g++-{hm}) and build with "
        f"CC=gcc-{hm} CXX=g++-{hm} CUDAHOSTCXX=g++-{hm} (set them in [build] env); "
        "-allow-unsupported-compiler is at your own risk"
    )
    usable = build_gcc(cf, m)
    named = [int(x) for k in override for x in re.findall(r"(?:gcc|g\+\+)-(\d+)$", benv[k])]
    said = ", ".join(f"{k}={benv[k]}" for k in override)
    if usable and not override:
        best = Version(usable).major
        return [
            make_issue(
                "host-compiler-unsupported",
                "info",
                subject,
                ev + f"; gcc-{best} ({usable}) is installed",
                f"nothing to do: the build sets CC=gcc-{best} CXX=g++-{best} CUDAHOSTCXX=g++-{best} "
                "for this toolkit",
            )
        ]
    if override and named and max(named) <= hm:
        return [
            make_issue("host-compiler-unsupported", "info", subject, ev + f"; {said} is set", "nothing to do")
        ]
    if override:
        return [
            make_issue(
                "host-compiler-unsupported",
                "warning",
                subject,
                ev + f"; {said} is set, whose version was not checked",
                f"make sure those name gcc/g++ <= {hm}; otherwise {fix}",
            )
        ]
    return [make_issue("host-compiler-unsupported", "error", subject, ev, fix, fixable=True)]


def build_gcc(cf: CudaFacts, machine: dict) -> str | None:
    """The gcc-N the build points nvcc at (CC/CXX/CUDAHOSTCXX, unless the user named a compiler): the newest
    installed beside a default gcc too new for this CUDA (``machine.gcc_alternatives``), else None."""
    hm = int(cf.gcc_max.value)
    gcc = version_or_none(machine.get("gcc"))
    if gcc is None or gcc.major <= hm:
        return None
    usable = [a for a in machine.get("gcc_alternatives", []) if Version(a).major <= hm]
    return usable[-1] if usable else None


def _old_gcc(gcc: str, cf: CudaFacts, m: dict, cand: Candidate, benv: dict, override: list[str]) -> Issue:
    """A default gcc older than torch's headers need (CentOS 7's 4.8.5): the build does not switch compilers
    for this case, so a usable gcc-N installed beside it still has to be named in [build] env."""
    hm = int(cf.gcc_max.value)
    n = min(hm, 11)
    subject = f"gcc {gcc} vs CUDA {cand.cuda}"
    ev = (f"gcc {gcc} is the default host compiler; vLLM's C++17 extensions, built against torch's headers, "
          f"need gcc >= {GCC_MIN} ({GCC_MIN_WHY}); nvcc {cand.cuda} accepts gcc <= {hm}{cite(cf.gcc_max)}")
    usable = [a for a in m.get("gcc_alternatives", []) if GCC_MIN <= Version(a).major <= hm]
    named = [int(x) for k in override for x in re.findall(r"(?:gcc|g\+\+)-(\d+)$", benv[k])]
    said = ", ".join(f"{k}={benv[k]}" for k in override)
    if override and named and all(GCC_MIN <= x <= hm for x in named):
        return make_issue("host-compiler-unsupported", "info", subject, ev + f"; {said} is set",
                          "nothing to do")
    if override:
        return make_issue("host-compiler-unsupported", "warning", subject,
                      ev + f"; {said} is set, whose version was not checked",
                      f"make sure those name gcc/g++ >= {GCC_MIN} and <= {hm}")
    if usable:
        b = Version(usable[-1]).major
        ev += f"; gcc-{b} ({usable[-1]}) is installed"
        fix = f"set CC=gcc-{b} CXX=g++-{b} CUDAHOSTCXX=g++-{b} in [build] env"
    elif str(m.get("os") or "").startswith(("centos", "rhel", "rocky", "almalinux", "ol")):
        tool = f"/opt/rh/devtoolset-{n}/root/usr/bin"
        fix = (f"install a newer gcc beside the system's (CentOS 7: yum install devtoolset-{n}-gcc "
               f"devtoolset-{n}-gcc-c++; RHEL 8+: gcc-toolset-{n}) and set CC={tool}/gcc CXX={tool}/g++ "
               f"CUDAHOSTCXX={tool}/g++ in [build] env")
    else:
        fix = (f"install gcc-{n} and g++-{n} (e.g. apt install gcc-{n} g++-{n}) and set CC=gcc-{n} "
               f"CXX=g++-{n} CUDAHOSTCXX=g++-{n} in [build] env")
    return make_issue("host-compiler-unsupported", "error", subject, ev, fix, fixable=True)


# -------------------------------------------------------------------------------------------- cmake


def cmake_need(cand: Candidate, vf: VllmFacts | None, tree: Pins | None = None) -> tuple[str, str]:
    """The CMake vLLM asks for, with where that is said: the most of the variant's [build] cmake_min, the
    source tree's cmake_minimum_required (else the data's); on a tie the data is cited."""
    candidates = [(cand.cmake_min or "3.26", " [variant [build] cmake_min]")]
    if tree and "cmake_min" in tree:
        candidates.append((tree["cmake_min"][0], f" [{tree['cmake_min'][1]}]"))
    elif vf is not None and vf.cmake_min is not None:
        candidates.append((vf.cmake_min.value, cite(vf.cmake_min)))
    return max(reversed(candidates), key=lambda c: Version(c[0]))


def cmake_issues(
    profile: dict, cand: Candidate, vf: VllmFacts | None, tree: Pins | None = None
) -> list[Issue]:
    """cmake on PATH against what vLLM needs; a cmake the deps step installs from PyPI into the venv (a
    ``cmake>=N`` in [deps]) comes first on PATH, so then there is nothing to fix."""
    need_s, need_cite = cmake_need(cand, vf, tree)
    need = Version(need_s)
    cm = _machine(profile).get("cmake")
    venv = cand.venv_provides("cmake", need)
    missing = _not_found(profile, "cmake")
    if (cm is not None and Version(cm) >= need) or (venv is not None and cm is None and not missing):
        return []  # new enough, or the venv's cmake is used whatever the system has
    add = f'add "cmake>={need_s}" to [deps] packages'
    if venv is not None:
        what = f"cmake {cm} on PATH is older than {need_s}" if cm else "no cmake on PATH"
        return [
            make_issue(
                "cmake-too-old",
                "info",
                "cmake",
                f"{what}{need_cite}",
                f"nothing to do: the venv's cmake ({venv} from [deps]) will be used",
            )
        ]
    if cm is not None:
        return [
            make_issue(
                "cmake-too-old",
                "error",
                f"cmake {cm}",
                f"vLLM needs CMake >= {need_s}{need_cite}; cmake on PATH is {cm}",
                f"{add} (the venv's cmake comes first on PATH) or upgrade cmake",
                fixable=True,
            )
        ]
    if missing:
        return [
            make_issue(
                "cmake-too-old",
                "error",
                "cmake",
                f"no cmake on PATH; vLLM needs CMake >= {need_s}{need_cite}",
                add,
                fixable=True,
            )
        ]
    return [skipped("cmake-too-old", "cmake", "machine.cmake")]


# --------------------------------------------------------------------------------------------- disk


def disk_issues(profile: dict, cand: Candidate) -> list[Issue]:
    """Free space where builds go against what the install needs; uv's cache on a small disk of its own."""
    m = _machine(profile)
    free = m.get("disk_free_gib")
    if free is None:
        return [skipped("disk-full", "disk space", "machine.disk_free_gib")]
    out = []
    need = DISK_SOURCE_GIB if cand.source else DISK_WHEEL_GIB
    what = "a source build" if cand.source else "a wheel install"
    if free < need:
        out.append(
            make_issue(
                "disk-full",
                "error",
                "disk space",
                f"{free} GiB free where builds go; {what} needs about {need:g} GiB",
                "free space (`invoke clean --all`, pip/uv caches), or point the build "
                "directory at a larger disk",
                fixable=True,
            )
        )
    # uv unpacks every wheel into its cache first; on another disk than the env (~/.cache/uv on a small root
    # disk, the build on /data) that disk fills mid-install, and uv copies the files instead of hardlinking
    cache_free, same = m.get("uv_cache_free_gib"), m.get("uv_cache_same_disk")
    if cand.installer == "uv" and same is False and cache_free is not None and cache_free < UV_CACHE_GIB:
        out.append(
            make_issue(
                "disk-full",
                "error",
                "uv cache disk",
                f"uv's cache (`uv cache dir`) is on another disk than the build, with {cache_free} GiB "
                f"free; uv unpacks every wheel there first (about 8 GiB for a CUDA torch stack): the "
                f"install would stop with 'No space left on device'",
                "point UV_CACHE_DIR at a folder on the build's disk (uv then hardlinks instead of "
                "copying; VLLM_HARNESS_STATE and UV_CACHE_DIR can share one disk), or free space there "
                "(`uv cache prune`)",
                fixable=True,
            )
        )
    return out


# ---------------------------------------------------------------------------------------- the judge


def build_issues(
    data: CompatData,
    profile: dict,
    cand: Candidate,
    vf: VllmFacts | None,
    tree: Pins | None = None,
    env: dict[str, str] | None = None,
) -> list[Issue]:
    """Host compiler and cmake (source builds) and disk (every install) for ``cand`` on ``profile``."""
    out: list[Issue] = []
    if cand.source:
        out += host_compiler_issues(data.cuda(cand.cuda), profile, cand, env)
        out += cmake_issues(profile, cand, vf, tree)
    return out + disk_issues(profile, cand)
