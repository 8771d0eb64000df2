"""The CUDA toolkits of a machine: every candidate root (CUDA_HOME, /usr/local/cuda*, each nvcc on PATH,
conda, pip's nvidia wheels), its version from its own nvcc, and what a root lacks to compile."""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from packaging.version import Version

from vllm_harness.core import procs


def _has_headers(root: Path) -> bool:
    return (root / "include" / "cuda_runtime.h").is_file() or bool(
        glob.glob(str(root / "targets" / "*" / "include" / "cuda_runtime.h")))


def _include_dirs(root: Path) -> list[Path]:
    return [root / "include", *sorted(Path(p) for p in glob.glob(str(root / "targets" / "*" / "include")))]


def _tool_dirs(root: Path) -> list[Path]:
    """Where nvcc finds cudafe++, ptxas, fatbinary (bin/ next to it; Debian:
    /usr/lib/nvidia-cuda-toolkit/bin)."""
    return [root / "bin", root / "lib" / "nvidia-cuda-toolkit" / "bin"]


def toolkit_missing(root: Path, version: str | None = None) -> list[str]:
    """The parts of the toolkit at ``root`` that a CUDA build needs and that are absent ([] = complete): nvcc
    and
    the tools it runs (cudafe++, cicc, ptxas, fatbinary), the runtime and compiler headers (cuda_runtime.h,
    crt/host_config.h; CUDA 13's CCCL nv/target), and the static runtime nvcc links by default (nvcc looks in
    lib64/ or targets/<arch>/lib/).  PyPI's CUDA 13 wheels (nvidia/cu13/) lack lib64/ until it is linked
    (``toolkit.link_pypi_toolkit``); their -cu12/-cu11 nvcc wheels hold ptxas alone."""
    missing = []
    for tool in ("nvcc", "cudafe++", "ptxas", "fatbinary"):
        if not any(os.access(d / tool, os.X_OK) and (d / tool).is_file() for d in _tool_dirs(root)):
            missing.append(f"bin/{tool}")
    cicc = [
        root / "nvvm" / "bin" / "cicc",
        root / "lib" / "nvidia-cuda-toolkit" / "bin" / "cicc",
        root / "lib" / "nvidia-cuda-toolkit" / "nvvm" / "bin" / "cicc",
    ]
    if not any(c.is_file() for c in cicc):
        missing.append("nvvm/bin/cicc")
    inc = _include_dirs(root)
    for header in ("cuda_runtime.h", "crt/host_config.h"):
        if not any((d / header).is_file() for d in inc):
            missing.append(f"include/{header}")
    mm = _mm(version or "")
    if (
        mm
        and int(mm.split(".")[0]) >= 13
        and not any((d / sub / "nv" / "target").is_file() for d in inc for sub in ("cccl", "."))
    ):
        missing.append("include/cccl/nv/target")
    libs = [root / "lib64", *(Path(p) for p in glob.glob(str(root / "targets" / "*" / "lib")))]
    if str(root) == "/usr" or root.name == "usr":  # Debian: the multiarch dir, on the linker's own path
        libs += [Path(p) for p in glob.glob(str(root / "lib" / "*-linux-gnu"))]
    if not any((d / "libcudart_static.a").is_file() for d in libs):
        missing.append("lib64/libcudart_static.a")
    return missing


def _version_file(root: Path) -> str | None:
    try:
        data = json.loads((root / "version.json").read_text())
        v = data.get("cuda", {}).get("version") or data.get("cuda_nvcc", {}).get("version")
        if v:
            return _mm(v)
    except (OSError, ValueError, AttributeError):
        pass
    try:
        return _mm(first_version((root / "version.txt").read_text()) or "")
    except OSError:
        return None


def _mm(v: str) -> str | None:
    m = re.match(r"^(\d+)\.(\d+)", v or "")
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _nvcc_version(nvcc: Path, env: dict[str, str]) -> str | None:
    r = run_quiet([str(nvcc), "--version"], env=env)
    if r is None or r[0] != 0:
        return None
    m = re.search(r"release (\d+\.\d+)", r[1])
    return m.group(1) if m else None


def _nvcc_top(nvcc: str, env: dict[str, str]) -> Path | None:
    """The toolkit root of an nvcc that is a wrapper script (nvcc --dryrun prints TOP=...)."""
    r = run_quiet([nvcc, "--dryrun", "-c", "probe.cu", "-o", os.devnull], env=env)
    if r is None:
        return None
    m = re.search(r"^#\$ TOP=(.+)$", r[1], re.MULTILINE)
    if not m:
        return None
    top = Path(os.path.normpath(m.group(1).strip()))
    return top if (top / "bin" / "nvcc").exists() else None


def _interp_prefixes(interpreters: list) -> list[Path]:
    out = []
    for i in interpreters:
        p = Path(i.executable).parent.parent
        if p not in out:
            out.append(p)
    return out


def toolkit_candidates(env: dict[str, str], interpreters: list = ()) -> list[tuple[Path, str]]:
    """Possible CUDA roots, most trusted first: CUDA_HOME/CUDA_PATH, /usr/local/cuda-X.Y, /usr/local/cuda,
    /opt/cuda, the nvcc on PATH (Debian: /usr), conda's $CONDA_PREFIX, pip's nvidia-cuda-nvcc wheels in the
    interpreters' site-packages (nvidia/cu13/ from CUDA 13 on; the older nvidia/cuda_nvcc/ holds ptxas
    alone)."""
    seen: list[tuple[Path, str]] = []
    for key in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(key):
            seen.append((Path(env[key]), key))
    versioned = sorted(
        glob.glob("/usr/local/cuda-*"), key=lambda p: [int(x) for x in re.findall(r"\d+", p)], reverse=True
    )
    seen += [(Path(p), "/usr/local") for p in versioned]
    seen += [(Path("/usr/local/cuda"), "/usr/local"), (Path("/opt/cuda"), "/opt")]
    # every nvcc on PATH, not only the first (Debian's /usr/bin/nvcc 11.8 behind /usr/local/bin/nvcc 13.0)
    nvccs = [
        str(Path(d) / "nvcc")
        for d in env.get("PATH", "").split(os.pathsep)
        if d and (Path(d) / "nvcc").is_file() and os.access(Path(d) / "nvcc", os.X_OK)
    ]
    for nvcc in dict.fromkeys(nvccs):
        # as torch finds it (dirname of dirname, unresolved: Debian's /usr/bin/nvcc -> /usr), else through
        # symlinks, else where a wrapper script says the toolkit is (nvcc --dryrun: TOP=...)
        plain, real = Path(nvcc).parent.parent, Path(os.path.realpath(nvcc)).parent.parent
        root = next((r for r in (plain, real) if _has_headers(r) or (r / "version.json").is_file()), None)
        seen.append((root or _nvcc_top(nvcc, env) or plain, "PATH"))
    if env.get("CONDA_PREFIX"):
        seen.append((Path(env["CONDA_PREFIX"]), "conda"))
    for prefix in _interp_prefixes(list(interpreters)):
        for d in sorted(
            glob.glob(str(prefix / "lib" / "python3*" / "site-packages" / "nvidia" / "*" / "bin" / "nvcc"))
        ):
            seen.append((Path(d).parent.parent, "pip"))
    out, keys = [], set()
    for root, origin in seen:
        key = os.path.realpath(root)
        if key not in keys and root.is_dir():
            keys.add(key)
            out.append((root, origin))
    return out


def probe_toolkits(env: dict[str, str], interpreters: list = ()) -> tuple[dict[str, str], list[str]]:
    """({major.minor: root}, [roots with a CUDA version file but no bin/nvcc]).  Each version comes from
    ``nvcc --version`` (the nvcc runs run side by side); the first root found for a version wins."""
    return probe_toolkits_full(env, interpreters)[:2]


def incomplete_toolkits(toolkits: dict[str, str]) -> list[str]:
    """'ROOT (CUDA X.Y): no PART, PART' for each toolkit that ``toolkit_missing`` finds parts missing in."""
    out = []
    for version, root in toolkits.items():
        if missing := toolkit_missing(Path(root), version):
            out.append(f"{root} (CUDA {version}): no {', '.join(missing)}")
    return out


def probe_toolkits_full(
    env: dict[str, str], interpreters: list = ()
) -> tuple[dict[str, str], list[str], list[str]]:
    cands = toolkit_candidates(env, interpreters)
    with ThreadPoolExecutor(max_workers=8) as pool:
        runs = [
            (
                root,
                pool.submit(_nvcc_version, root / "bin" / "nvcc", env)
                if (root / "bin" / "nvcc").exists()
                else None,
            )
            for root, _origin in cands
        ]
        toolkits: dict[str, str] = {}
        no_nvcc: list[str] = []
        for root, fut in runs:
            if fut is None:
                if _version_file(root):
                    no_nvcc.append(str(root))
                continue
            version = fut.result()
            if version and version not in toolkits:
                toolkits[version] = str(root)
    toolkits = dict(sorted(toolkits.items(), key=lambda kv: Version(kv[0])))
    # an install without nvcc whose version a real toolkit covers is noise
    no_nvcc = [r for r in no_nvcc if _version_file(Path(r)) not in toolkits]
    return toolkits, no_nvcc, incomplete_toolkits(toolkits)


TIMEOUT = 10.0


def run_quiet(
    argv: list[str], env: dict[str, str] | None = None, timeout: float = TIMEOUT
) -> tuple[int, str] | None:
    """(returncode, stdout+stderr) of ``argv``; None when it cannot be run or times out."""
    try:
        p = procs.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    return p.returncode, (p.stdout or "") + (p.stderr or "")


_VERSION_RE = re.compile(r"(\d+(?:\.\d+)+)")


def first_version(text: str, pattern: re.Pattern | None = None) -> str | None:
    m = (pattern or _VERSION_RE).search(text)
    return m.group(1) if m else None
