"""Find the CUDA toolkit for a variant and build the child environment of a build step.

``CUDA_HOME``/``PATH``/``LD_LIBRARY_PATH`` are set for the variant's toolkit in the child's environment
only; the user's shell is never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

NVCC_RE = re.compile(r"release (\d+\.\d+)")

# Variables that must not leak from the caller (nox's own venv, a precompiled-wheel request) into a
# variant's children.
DROP = ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH", "CONDA_PREFIX_1", "PIP_REQUIRE_VIRTUALENV",
        "__PYVENV_LAUNCHER__", "UV_PYTHON", "UV_PROJECT_ENVIRONMENT")


def nvcc_version(nvcc: Path) -> str | None:
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = NVCC_RE.search(out.stdout)
    return m.group(1) if m else None


def toolkit_candidates(env: dict[str, str]) -> list[Path]:
    roots: list[Path] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            roots.append(Path(env[var]))
    roots += sorted(Path("/usr/local").glob("cuda-*"), reverse=True)
    roots.append(Path("/usr/local/cuda"))
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc:
        roots.append(Path(os.path.realpath(nvcc)).parent.parent)
    if env.get("CONDA_PREFIX"):
        roots.append(Path(env["CONDA_PREFIX"]))
    roots.append(Path("/usr"))  # Debian/Ubuntu's nvidia-cuda-toolkit: /usr/bin/nvcc
    out, seen = [], set()
    for r in roots:
        key = os.path.realpath(r)
        if key not in seen and (r / "bin" / "nvcc").is_file():
            seen.add(key)
            out.append(r)
    return out


def find_toolkits(env: dict[str, str] | None = None) -> dict[str, str]:
    """{'11.8': '/usr/local/cuda-11.8', ...}: each toolkit found, by the version its nvcc reports."""
    env = dict(os.environ if env is None else env)
    found: dict[str, str] = {}
    for root in toolkit_candidates(env):
        v = nvcc_version(root / "bin" / "nvcc")
        if v and v not in found:
            found[v] = str(root)
    return found


def lib_dirs(root: Path) -> list[str]:
    dirs = [root / "lib64", root / "lib", root / "targets" / "x86_64-linux" / "lib"]
    if str(root) == "/usr":  # Debian layout: libraries live in the multiarch dir, already on the loader path
        return []
    return [str(d) for d in dirs if d.is_dir()]


def child_env(base: dict[str, str], venv: Path, cuda_home: Path | None, extra: dict[str, str],
              drop_precompiled: bool, more_path: list[str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in DROP}
    if drop_precompiled:
        for k in ("VLLM_USE_PRECOMPILED", "VLLM_PRECOMPILED_WHEEL_LOCATION"):
            env.pop(k, None)
    path = [str(venv / "bin"), *(more_path or [])]
    if cuda_home is not None:
        env["CUDA_HOME"] = str(cuda_home)
        env["CUDA_PATH"] = str(cuda_home)
        path.append(str(cuda_home / "bin"))
        libs = lib_dirs(cuda_home)
        old = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
        if libs or old:
            env["LD_LIBRARY_PATH"] = ":".join(dict.fromkeys(libs + old))
    rest = [p for p in base.get("PATH", "").split(":") if p and p not in path]
    # the caller's venv (nox's session venv) must not shadow the variant's tools
    if base.get("VIRTUAL_ENV"):
        rest = [p for p in rest if not p.startswith(base["VIRTUAL_ENV"])]
    env["PATH"] = ":".join(path + rest)
    env["VIRTUAL_ENV"] = str(venv)
    env.update(extra)
    return env
