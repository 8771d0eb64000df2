"""The pins a vLLM source tree states itself (requirements files, pyproject.toml, CMakeLists.txt): torch, the
CMake minimum, the build archs per CUDA; doctor judges a tree by them instead of the table."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from vllm_harness.facts import compat as compat_mod
from vllm_harness.facts.compat import (
    major_minor,
)


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
            m = re.search(
                r"python_requires\s*=\s*['\"]([^'\"]+)['\"]",
                setup.read_text(encoding="utf-8", errors="replace"),
            )
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
            first("torch", m.group(1), f'CMakeLists.txt: set(TORCH_SUPPORTED_VERSION_CUDA "{m.group(1)}")')
        m = re.search(r"cmake_minimum_required\s*\(\s*VERSION\s+([\d.]+)", text, re.IGNORECASE)
        if m:
            old = pins.get("cmake_min")
            if old is None or Version(m.group(1)) > Version(old[0]):
                pins["cmake_min"] = (
                    m.group(1),
                    f"CMakeLists.txt: cmake_minimum_required(VERSION {m.group(1)})",
                )
        m = re.search(r"PYTHON_SUPPORTED_VERSIONS((?:\s+\"\d+\.\d+\")+)", text)
        if m:
            vs = sorted(Version(v) for v in re.findall(r"\"(\d+\.\d+)\"", m.group(1)))
            if vs:
                hi = vs[-1]
                spec = f">={vs[0]},<{hi.major}.{hi.minor + 1}"
                pins["python_cmake"] = (
                    spec,
                    f"CMakeLists.txt: PYTHON_SUPPORTED_VERSIONS {m.group(1).strip()}",
                )
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
