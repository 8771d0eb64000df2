"""The pins a vLLM source tree states itself (requirements files, pyproject.toml, CMakeLists.txt): torch, the
CMake minimum, the build archs per CUDA; doctor judges a tree by them instead of the table."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from vllm_harness.facts import compat as compat_mod
from vllm_harness.facts.compat import (
    major_minor,
)
from vllm_harness.facts.feasibility_model import lower_bound


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


def exact_pin(req: Requirement) -> str | None:
    for s in req.specifier:
        if s.operator in ("==", "==="):
            try:
                return Version(s.version).public
            except InvalidVersion:
                return None
    return None


class _Pins(dict):
    """{key: (value, 'file: line')}; :meth:`first` keeps the first file's word on a key."""

    def first(self, key: str, value: Any, where: str) -> None:
        if value is not None and key not in self:
            self[key] = (value, where)


_RUNTIME_REQS = ["requirements/cuda.txt", "requirements-cuda.txt", "requirements/common.txt",
                 "requirements-common.txt", "requirements.txt"]
_BUILD_REQS = ["requirements/build/cuda.txt", "requirements/build.txt", "requirements-build.txt"]


def _cmake_min(req: Requirement) -> str | None:
    lb = lower_bound(req)
    return str(lb) if lb else None


def _from_requirements(src: Path, pins: _Pins) -> None:
    for rel in _RUNTIME_REQS + _BUILD_REQS:
        for req in _req_lines(src / rel):
            name = req.name.lower()
            where = f"{rel}: {req}"
            if name in ("torch", "xformers"):
                pins.first(name, exact_pin(req), where)
            elif name == "cmake":
                pins.first("cmake_min", _cmake_min(req), where)
            elif name == "numpy" and str(req.specifier):
                pins.first("numpy", str(req.specifier), where)


def _from_pyproject(src: Path, pins: _Pins) -> None:
    pyproject = src / "pyproject.toml"
    if not pyproject.is_file():
        return
    try:
        data = compat_mod.tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    for line in data.get("build-system", {}).get("requires", []) or []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        where = f"pyproject.toml [build-system] requires: {line}"
        if req.name.lower() == "torch":
            pins.first("torch", exact_pin(req), where)
        elif req.name.lower() == "cmake":
            pins.first("cmake_min", _cmake_min(req), where)
    rp = data.get("project", {}).get("requires-python")
    if isinstance(rp, str):
        pins.first("python", rp, f"pyproject.toml requires-python = {rp!r}")


def _from_setup_py(src: Path, pins: _Pins) -> None:
    setup = src / "setup.py"
    if not setup.is_file():
        return
    try:
        m = re.search(
            r"python_requires\s*=\s*['\"]([^'\"]+)['\"]",
            setup.read_text(encoding="utf-8", errors="replace"),
        )
    except OSError:
        m = None
    if m:
        pins.first("python", m.group(1), f"setup.py python_requires={m.group(1)!r}")


def _from_cmakelists(src: Path, pins: _Pins) -> None:
    cml = src / "CMakeLists.txt"
    if not cml.is_file():
        return
    try:
        text = cml.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    m = re.search(r"TORCH_SUPPORTED_VERSION_CUDA\s+\"([^\"]+)\"", text)
    if m:
        pins.first("torch", m.group(1), f'CMakeLists.txt: set(TORCH_SUPPORTED_VERSION_CUDA "{m.group(1)}")')
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


def read_source_pins(source_dir: Path) -> dict[str, tuple[Any, str]]:
    """What a vLLM source tree says about itself: {key: (value, 'file: line')}.

    Keys: torch, xformers, cmake_min, python (specifier), numpy (specifier), cuda_archs
    ({'X.Y' threshold or 'default': arch list}).  Files: requirements/{cuda,build,common}.txt (and the
    old requirements-*.txt), requirements/build/cuda.txt, pyproject.toml, setup.py, CMakeLists.txt."""
    src = Path(source_dir)
    pins = _Pins()
    for read in (_from_requirements, _from_pyproject, _from_setup_py, _from_cmakelists):
        read(src, pins)
    return dict(pins)


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


def archs_for(table: dict[str, str], cuda: str) -> str | None:
    cv = Version(major_minor(cuda))
    for key in sorted((k for k in table if k != "default"), key=Version, reverse=True):
        if cv >= Version(key):
            return table[key]
    return table.get("default")
