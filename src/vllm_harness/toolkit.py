"""Find the CUDA toolkit for a variant and build the child environment of a build step.

``CUDA_HOME``/``PATH``/``LD_LIBRARY_PATH`` are set for the variant's toolkit in the child's environment
only; the user's shell is never touched.
"""

from __future__ import annotations

import os
from pathlib import Path

# Variables that must not leak from the caller (nox's own venv, a precompiled-wheel request) into a
# variant's children.
DROP = ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH", "CONDA_PREFIX_1", "PIP_REQUIRE_VIRTUALENV",
        "__PYVENV_LAUNCHER__", "UV_PYTHON", "UV_PROJECT_ENVIRONMENT")


def clean_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) without the variables in DROP."""
    return {k: v for k, v in (os.environ if base is None else base).items() if k not in DROP}


def find_toolkits(env: dict[str, str] | None = None) -> dict[str, str]:
    """{'11.8': '/usr/local/cuda-11.8', ...}: each toolkit found, by the version its nvcc reports
    (the same search as doctor's machine probe)."""
    from .machine import probe_toolkits
    return probe_toolkits(dict(os.environ if env is None else env))[0]


def lib_dirs(root: Path) -> list[str]:
    dirs = [root / "lib64", root / "lib", root / "targets" / "x86_64-linux" / "lib"]
    if str(root) == "/usr":  # Debian layout: libraries live in the multiarch dir, already on the loader path
        return []
    return [str(d) for d in dirs if d.is_dir()]


def child_env(base: dict[str, str], venv: Path, cuda_home: Path | None, extra: dict[str, str],
              drop_precompiled: bool, more_path: list[str] | None = None) -> dict[str, str]:
    env = clean_env(base)
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
