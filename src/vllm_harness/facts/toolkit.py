"""Find the CUDA toolkit for a variant and build the child environment of a build step.

``CUDA_HOME``/``PATH``/``LD_LIBRARY_PATH`` are set for the variant's toolkit in the child's environment
only; the user's shell is never touched.

A variant with ``[build] toolkit = "pypi"`` needs no system toolkit: its deps step installs NVIDIA's CUDA
toolkit wheels into the variant's venv (``pypi_requirements``: ``cuda-toolkit[nvcc,crt,nvvm,cccl,cudart]`` at
the version the venv's torch pins), and the build's ``CUDA_HOME`` is ``<venv site-packages>/nvidia/cu13``.
Only CUDA 13 and later: the ``nvidia-cuda-nvcc-cu12``/``-cu11`` wheels hold ptxas, no nvcc, cudafe++ or
fatbinary.  Wheels lay out ``lib/`` with versioned names only, while nvcc links from ``lib64/`` and CMake
looks for ``libcudart.so``: ``link_pypi_toolkit`` adds those links, inside the venv only.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from vllm_harness.core import procs
from vllm_harness.core.errors import UsageError
from vllm_harness.core.safeio import tomllib  # the one TOML shim (tomli on 3.10)
from vllm_harness.facts.cuda_toolkits import probe_toolkits

PYPI_MIN_CUDA = 13
# cuda-toolkit's extras for a working nvcc: nvcc (nvcc, cudafe++, ptxas, fatbinary, nvlink), crt (crt/*.h,
# host_config.h), nvvm (cicc, libdevice), cccl (nv/target, cub, thrust: CUDA 13's headers include them),
# cudart (cuda_runtime.h, libcudart).  Each extra pins its wheel to the meta-package's release: in 13.0.2 the
# 'nvcc' extra names nvidia-cuda-nvcc alone, whose own unpinned crt/nvvm requirements resolve to 13.5.x.
PYPI_EXTRAS = ("nvcc", "crt", "nvvm", "cccl", "cudart")

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


# ------------------------------------------------------------------------------ toolkit from PyPI (CUDA 13+)

def pypi_supported(cuda: str) -> bool:
    return int(cuda.split(".")[0]) >= PYPI_MIN_CUDA


def pypi_requirements(cuda: str, torch_requires: list[str], torch_version: str = "") -> tuple[list[str], str]:
    """(the requirements that install a complete nvcc for CUDA ``cuda``, why that version).  The version is
    the
    ``cuda-toolkit==X`` that torch's own metadata pins (torch 2.11.0: 13.0.2), so the toolkit's runtime is the
    one torch runs on; without such a pin, the newest ``cuda``.x release."""
    extras = ",".join(PYPI_EXTRAS)
    for line in torch_requires:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if canonicalize_name(req.name) != "cuda-toolkit" or (
            req.marker and not req.marker.evaluate({"extra": ""})
        ):
            continue
        pins = [sp.version for sp in req.specifier if sp.operator in ("==", "===") and "*" not in sp.version]
        if not pins:
            continue
        pin = pins[0]
        if ".".join(pin.split(".")[:2]) != cuda:
            raise UsageError(
                f"torch {torch_version} pins cuda-toolkit=={pin}, but the variant's cuda is {cuda}.",
                f'Set cuda = "{".".join(pin.split(".")[:2])}" in the variant, or choose the torch '
                f"build for CUDA {cuda}.",
            )
        return [f"cuda-toolkit[{extras}]=={pin}"], f"torch {torch_version} pins cuda-toolkit=={pin}"
    return [f"cuda-toolkit[{extras}]=={cuda}.*"], f"torch names no cuda-toolkit pin: the newest CUDA {cuda}.x"


def torch_requires(py: Path, env: dict[str, str]) -> tuple[str, list[str]]:
    """(torch's version, its Requires-Dist lines) as the venv's interpreter sees them."""
    code = (
        "import json, importlib.metadata as m\ntry:\n    d = m.distribution('torch')\n"
        "    print(json.dumps([d.version, d.requires or []]))\nexcept m.PackageNotFoundError:\n"
        "    print(json.dumps(['', []]))"
    )
    r = procs.run([str(py), "-c", code], capture_output=True, text=True, env=env, timeout=120)
    if r.returncode != 0:
        return "", []
    version, reqs = json.loads(r.stdout.strip().splitlines()[-1])
    return version, reqs


def pypi_root(py: Path, env: dict[str, str], cuda: str) -> Path | None:
    """``nvidia/cuXX`` holding bin/nvcc, wherever the venv's interpreter imports the ``nvidia`` namespace
    from."""
    code = (
        "import json\ntry:\n    import nvidia; print(json.dumps(list(nvidia.__path__)))\nexcept "
        "ImportError:\n"
        "    print('[]')"
    )
    r = procs.run([str(py), "-c", code], capture_output=True, text=True, env=env, timeout=120)
    if r.returncode != 0:
        return None
    for d in json.loads(r.stdout.strip().splitlines()[-1]):
        root = Path(d) / f"cu{cuda.split('.')[0]}"
        if (root / "bin" / "nvcc").is_file():
            return root
    return None


_SONAME = re.compile(r"^(lib.+?\.so)\.\d[\d.]*$")


def link_pypi_toolkit(root: Path, venv: Path) -> list[str]:
    """Give a wheel-installed toolkit the layout a build expects: ``lib64 -> lib`` (nvcc links
    ``-lcudart_static``
    from lib64/) and ``libX.so -> libX.so.N`` for each library with a versioned name only (CMake's
    FindCUDAToolkit looks for the unversioned name).  Only inside ``venv``: a toolkit elsewhere is left as it
    is.  Returns the links made."""
    try:
        root.resolve().relative_to(venv.resolve())
    except ValueError:
        return []
    made = []
    lib, lib64 = root / "lib", root / "lib64"
    if lib.is_dir() and not lib64.exists() and not lib64.is_symlink():
        lib64.symlink_to("lib")
        made.append("lib64 -> lib")
    if lib.is_dir():
        names = {p.name for p in lib.iterdir()}
        for name in sorted(names):
            m = _SONAME.match(name)
            if m and m.group(1) not in names:
                (lib / m.group(1)).symlink_to(name)
                names.add(m.group(1))
                made.append(f"lib/{m.group(1)} -> {name}")
    return made


# ------------------------------------------------------------------------------ where to get a toolkit


def _sources() -> dict:
    return tomllib.loads((Path(__file__).resolve().parents[1] / "data" / "toolkit_sources.toml").read_text())


def _ver(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v))


def install_fix(os_name: str | None, cuda: str, arch: str | None = None) -> str:
    """What installs nvcc for CUDA ``cuda`` on a machine whose profile ``os`` is ``os_name`` (``debian-12``,
    ``ubuntu-22.04``...), best first: the distribution's own package when its CUDA is this one (Debian 12's
    non-free nvidia-cuda-toolkit is a real 11.8), NVIDIA's repository for that distribution or its runfile,
    conda, and PyPI's wheels (``[build] toolkit = "pypi"``) from CUDA 13 on (data/toolkit_sources.toml)."""
    data = _sources()
    arch = {"aarch64": "sbsa", "arm64": "sbsa"}.get(arch or "x86_64", arch or "x86_64")
    dash = cuda.replace(".", "-")
    ways: list[str] = []
    note = ""
    distro = data["distro"].get(os_name or "")
    if distro and distro["cuda"] == cuda:
        ways.append(f"{distro['install']} from {distro['where']} (a real CUDA {cuda})")
    elif distro:
        note = f" ({os_name}'s own {distro['install'].split()[-1]} is CUDA {distro['cuda']}, not {cuda})"
    repo = data["nvidia_repo"]
    osid, _, osver = (
        (os_name or "").rpartition("-") if os_name and "-" in os_name else (os_name or "", "", "")
    )
    how = repo["ids"].get(osid)
    if how and osver:
        prefix, tool, rule = how
        name = prefix + (osver.replace(".", "") if rule == "nodot" else osver.split(".")[0])
        url = repo["url"].format(repo=name, arch=arch)
        ways.append(
            f"NVIDIA's {tool} repository for {name} ({url}, if it carries CUDA {cuda}): {tool} install "
            f"cuda-toolkit-{dash}"
        )
    ways.append(
        f"NVIDIA's runfile for CUDA {cuda} ({repo['archive']}) with --toolkit --silent "
        f"--installpath=/usr/local/cuda-{cuda}"
    )
    conda = data["conda"]
    ways.append(
        conda["forge"].format(cuda=cuda)
        if _ver(cuda) >= _ver(conda["from_cuda"])
        else conda["nvidia_label"].format(cuda=cuda)
    )
    if _ver(cuda) >= _ver(data["pypi"]["from_cuda"]):
        ways.append(
            'no system toolkit at all: [build] toolkit = "pypi" in the variant (NVIDIA\'s CUDA '
            f"{cuda} wheels in its venv)"
        )
    where = f"on {os_name}" if os_name else "here"
    return f"install the CUDA {cuda} toolkit; {where}: " + "; or ".join(ways) + note
