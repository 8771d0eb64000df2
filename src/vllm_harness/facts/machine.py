"""The machine profile: what doctor judges a variant against (shared/contract/machine-profile.md).

``probe(build_dir)`` looks at this machine (GPUs and driver through NVML, else ``nvidia-smi``; CUDA
toolkits; host tools; interpreters; cores, RAM, disk; container) in a few seconds, running the
independent subprocesses side by side.  It never raises for a missing GPU, driver or tool: what is not
there is left out of the profile (tools looked for and not found are listed in ``machine.not_found``).

``save_profile`` writes the contract's TOML form (written here, no TOML writer dependency);
``load_profile`` reads one back and validates it: any malformed or unknown key is a ``UsageError`` that
names the file, the key and the fix.  A probe survives ``save_profile`` + ``load_profile`` unchanged.

Keys beyond the contract's example (all optional, like every key): ``ram_available_gib`` (MemAvailable),
``python_without_headers`` (interpreters without Python.h), ``not_found`` (tools looked for and absent:
gcc, cmake, ninja, git), ``cuda_without_nvcc`` (CUDA installs with a version but no ``bin/nvcc``),
``cuda_incomplete`` (toolkits whose nvcc runs but which lack a part a build needs: ``toolkit_missing``).

Environment facts that matter to doctor (``VLLM_USE_PRECOMPILED`` ...) are not machine facts: they come
from ``env_facts()`` and go to ``doctor.check(..., env=...)``.
"""

from __future__ import annotations

import glob
import json
import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from vllm_harness.core import safeio
from vllm_harness.core.errors import UsageError
from vllm_harness.facts.variants import Bad as _Bad
from vllm_harness.facts.variants import check_bool as _bool
from vllm_harness.facts.variants import list_of

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - 3.10
    import tomli as tomllib  # type: ignore[no-redef]

TIMEOUT = 10.0
TOOLS = ("gcc", "cmake", "ninja", "git")
ENV_KEYS = ("VLLM_USE_PRECOMPILED", "VLLM_PRECOMPILED_WHEEL_LOCATION", "VLLM_TARGET_DEVICE", "CUDA_HOME",
            "CUDA_PATH", "MAX_JOBS", "NVCC_THREADS", "TORCH_CUDA_ARCH_LIST", "CC", "CXX", "CUDAHOSTCXX",
            "LD_LIBRARY_PATH", "HOME")
_VERSION_RE = re.compile(r"(\d+(?:\.\d+)+)")


# ============================================================================================ probing

def _run(argv: list[str], env: dict[str, str] | None = None, timeout: float = TIMEOUT) -> tuple[int, str] | None:
    """(returncode, stdout+stderr) of ``argv``; None when it cannot be run or times out."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                           stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    return p.returncode, (p.stdout or "") + (p.stderr or "")


def _first_version(text: str, pattern: re.Pattern | None = None) -> str | None:
    m = (pattern or _VERSION_RE).search(text)
    return m.group(1) if m else None


def _tool_version(name: str, argv_tail: list[str], env: dict[str, str],
                  pattern: re.Pattern | None = None) -> str | None:
    exe = shutil.which(name, path=env.get("PATH"))
    if not exe:
        return None
    r = _run([exe, *argv_tail], env=env)
    if r is None or r[0] != 0:
        return None
    return _first_version(r[1], pattern)


def _gcc_alternatives(env: dict[str, str]) -> list[str]:
    """Versions of the versioned compilers on PATH (gcc-11, gcc-12, ...), each with its g++-N: the host
    compilers an older CUDA can be pointed at when the default gcc is too new."""
    out = []
    for n in range(4, 21):
        if shutil.which(f"g++-{n}", path=env.get("PATH")):
            v = _tool_version(f"gcc-{n}", ["-dumpfullversion"], env)
            if v:
                out.append(v)
    return sorted(set(out), key=Version)


def _gcc_version(env: dict[str, str]) -> str | None:
    v = _tool_version("gcc", ["-dumpfullversion"], env)
    return v or _tool_version("gcc", ["-dumpversion"], env)  # gcc < 7 has no -dumpfullversion


def _gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 1)


def _gpus_nvml() -> tuple[list[dict], str | None, str | None] | None:
    """(gpus, driver, driver_cuda) from NVML; None when NVML or the driver is not usable."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    nvml_errors = (pynvml.NVMLError, OSError, AttributeError, TypeError, ValueError)
    try:
        pynvml.nvmlInit()
    except nvml_errors:  # NVMLError_LibraryNotFound, DriverNotLoaded, ... : no usable driver
        return None

    def s(x: Any) -> str:
        return x.decode() if isinstance(x, bytes) else str(x)

    def opt(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except nvml_errors:
            return None

    try:
        driver = s(pynvml.nvmlSystemGetDriverVersion())
        cv = opt(pynvml.nvmlSystemGetCudaDriverVersion_v2) or opt(pynvml.nvmlSystemGetCudaDriverVersion)
        driver_cuda = f"{cv // 1000}.{(cv % 1000) // 10}" if cv else None
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            g: dict[str, Any] = {"name": s(pynvml.nvmlDeviceGetName(h))}
            cc = opt(pynvml.nvmlDeviceGetCudaComputeCapability, h)
            if cc:
                g["compute_capability"] = f"{cc[0]}.{cc[1]}"
            mem = opt(pynvml.nvmlDeviceGetMemoryInfo, h)
            if mem is not None:
                g["memory_gib"] = _gib(mem.total)
            gpus.append(g)
        return gpus, driver, driver_cuda
    except nvml_errors:
        return None
    finally:
        opt(pynvml.nvmlShutdown)


def _gpus_smi(env: dict[str, str]) -> tuple[list[dict], str | None, str | None] | None:
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if not smi:
        return None
    fields = ["name", "compute_cap", "memory.total", "driver_version"]
    r = _run([smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"], env=env)
    if r is not None and r[0] != 0:  # old drivers do not know compute_cap
        fields = ["name", "memory.total", "driver_version"]
        r = _run([smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"], env=env)
    if r is None or r[0] != 0:
        return None
    gpus, driver = [], None
    for line in r[1].splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != len(fields):
            continue
        row = dict(zip(fields, parts, strict=True))
        g: dict[str, Any] = {"name": row["name"]}
        if re.fullmatch(r"\d+\.\d+", row.get("compute_cap", "")):
            g["compute_capability"] = row["compute_cap"]
        try:
            g["memory_gib"] = round(float(row["memory.total"]) / 1024, 1)
        except ValueError:
            pass
        driver = row["driver_version"] or driver
        gpus.append(g)
    head = _run([smi], env=env)
    driver_cuda = None
    if head is not None:
        m = re.search(r"CUDA Version:\s*(\d+\.\d+)", head[1])
        driver_cuda = m.group(1) if m else None
    return gpus, driver, driver_cuda


def probe_gpus(env: dict[str, str] | None = None) -> tuple[list[dict], str | None, str | None]:
    """(gpus, driver, driver_cuda): NVML first, then nvidia-smi; ([], None, None) when neither works."""
    env = dict(os.environ if env is None else env)
    r = _gpus_nvml()
    if r is None or (not r[0] and r[1] is None):
        r = _gpus_smi(env) or r
    return r or ([], None, None)


def _has_headers(root: Path) -> bool:
    return (root / "include" / "cuda_runtime.h").is_file() or bool(
        glob.glob(str(root / "targets" / "*" / "include" / "cuda_runtime.h")))


def _include_dirs(root: Path) -> list[Path]:
    return [root / "include", *sorted(Path(p) for p in glob.glob(str(root / "targets" / "*" / "include")))]


def _tool_dirs(root: Path) -> list[Path]:
    """Where nvcc finds cudafe++, ptxas, fatbinary (bin/ next to it; Debian: /usr/lib/nvidia-cuda-toolkit/bin)."""
    return [root / "bin", root / "lib" / "nvidia-cuda-toolkit" / "bin"]


def toolkit_missing(root: Path, version: str | None = None) -> list[str]:
    """The parts of the toolkit at ``root`` that a CUDA build needs and that are absent ([] = complete): nvcc and
    the tools it runs (cudafe++, cicc, ptxas, fatbinary), the runtime and compiler headers (cuda_runtime.h,
    crt/host_config.h; CUDA 13's CCCL nv/target), and the static runtime nvcc links by default (nvcc looks in
    lib64/ or targets/<arch>/lib/).  PyPI's CUDA 13 wheels (nvidia/cu13/) lack lib64/ until it is linked
    (``toolkit.link_pypi_toolkit``); their -cu12/-cu11 nvcc wheels hold ptxas alone."""
    missing = []
    for tool in ("nvcc", "cudafe++", "ptxas", "fatbinary"):
        if not any(os.access(d / tool, os.X_OK) and (d / tool).is_file() for d in _tool_dirs(root)):
            missing.append(f"bin/{tool}")
    cicc = [root / "nvvm" / "bin" / "cicc", root / "lib" / "nvidia-cuda-toolkit" / "bin" / "cicc",
            root / "lib" / "nvidia-cuda-toolkit" / "nvvm" / "bin" / "cicc"]
    if not any(c.is_file() for c in cicc):
        missing.append("nvvm/bin/cicc")
    inc = _include_dirs(root)
    for header in ("cuda_runtime.h", "crt/host_config.h"):
        if not any((d / header).is_file() for d in inc):
            missing.append(f"include/{header}")
    mm = _mm(version or "")
    if mm and int(mm.split(".")[0]) >= 13 and not any((d / sub / "nv" / "target").is_file()
                                                      for d in inc for sub in ("cccl", ".")):
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
        return _mm(_first_version((root / "version.txt").read_text()) or "")
    except OSError:
        return None


def _mm(v: str) -> str | None:
    m = re.match(r"^(\d+)\.(\d+)", v or "")
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _nvcc_version(nvcc: Path, env: dict[str, str]) -> str | None:
    r = _run([str(nvcc), "--version"], env=env)
    if r is None or r[0] != 0:
        return None
    m = re.search(r"release (\d+\.\d+)", r[1])
    return m.group(1) if m else None


def _nvcc_top(nvcc: str, env: dict[str, str]) -> Path | None:
    """The toolkit root of an nvcc that is a wrapper script (nvcc --dryrun prints TOP=...)."""
    r = _run([nvcc, "--dryrun", "-c", "probe.cu", "-o", os.devnull], env=env)
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
    interpreters' site-packages (nvidia/cu13/ from CUDA 13 on; the older nvidia/cuda_nvcc/ holds ptxas alone)."""
    seen: list[tuple[Path, str]] = []
    for key in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(key):
            seen.append((Path(env[key]), key))
    versioned = sorted(glob.glob("/usr/local/cuda-*"), key=lambda p: [int(x) for x in re.findall(r"\d+", p)],
                       reverse=True)
    seen += [(Path(p), "/usr/local") for p in versioned]
    seen += [(Path("/usr/local/cuda"), "/usr/local"), (Path("/opt/cuda"), "/opt")]
    # every nvcc on PATH, not only the first (Debian's /usr/bin/nvcc 11.8 behind /usr/local/bin/nvcc 13.0)
    nvccs = [str(Path(d) / "nvcc") for d in env.get("PATH", "").split(os.pathsep)
             if d and (Path(d) / "nvcc").is_file() and os.access(Path(d) / "nvcc", os.X_OK)]
    for nvcc in dict.fromkeys(nvccs):
        # as torch finds it (dirname of dirname, unresolved: Debian's /usr/bin/nvcc -> /usr), else through
        # symlinks, else where a wrapper script says the toolkit is (nvcc --dryrun: TOP=...)
        plain, real = Path(nvcc).parent.parent, Path(os.path.realpath(nvcc)).parent.parent
        root = next((r for r in (plain, real) if _has_headers(r) or (r / "version.json").is_file()), None)
        seen.append((root or _nvcc_top(nvcc, env) or plain, "PATH"))
    if env.get("CONDA_PREFIX"):
        seen.append((Path(env["CONDA_PREFIX"]), "conda"))
    for prefix in _interp_prefixes(list(interpreters)):
        for d in sorted(glob.glob(str(prefix / "lib" / "python3*" / "site-packages" / "nvidia" / "*" / "bin" / "nvcc"))):
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
    return _probe_toolkits(env, interpreters)[:2]


def incomplete_toolkits(toolkits: dict[str, str]) -> list[str]:
    """'ROOT (CUDA X.Y): no PART, PART' for each toolkit that ``toolkit_missing`` finds parts missing in."""
    out = []
    for version, root in toolkits.items():
        if missing := toolkit_missing(Path(root), version):
            out.append(f"{root} (CUDA {version}): no {', '.join(missing)}")
    return out


def _probe_toolkits(env: dict[str, str], interpreters: list = ()) -> tuple[dict[str, str], list[str], list[str]]:
    cands = toolkit_candidates(env, interpreters)
    with ThreadPoolExecutor(max_workers=8) as pool:
        runs = [(root, pool.submit(_nvcc_version, root / "bin" / "nvcc", env) if (root / "bin" / "nvcc").exists()
                 else None) for root, _origin in cands]
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


def _meminfo() -> dict[str, float]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, _, rest = line.partition(":")
            if k in ("MemTotal", "MemAvailable"):
                out[k] = round(int(rest.split()[0]) * 1024 / 2**30, 1)
    except (OSError, ValueError, IndexError):
        pass
    return out


def _cores() -> int | None:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 0
    # cgroup v2 CPU quota (containers): "max 100000" or "200000 100000"
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n or None


def _disk_free(build_dir: Path) -> float | None:
    p = Path(build_dir).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return _gib(shutil.disk_usage(p).free)
    except OSError:
        return None


def _os_name() -> str | None:
    try:
        kv = dict(re.findall(r'^([A-Z_]+)="?([^"\n]*)"?$', Path("/etc/os-release").read_text(), re.MULTILINE))
    except OSError:
        return platform.system().lower() or None
    name = kv.get("ID", "")
    ver = kv.get("VERSION_ID", "")
    return f"{name}-{ver}" if name and ver else (name or None)


def _in_container(env: dict[str, str]) -> bool:
    if Path("/.dockerenv").exists() or Path("/run/.containerenv").exists() or env.get("container"):
        return True
    try:
        cg = Path("/proc/1/cgroup").read_text()
    except OSError:
        return False
    return bool(re.search(r"docker|kubepods|containerd|libpod|lxc", cg))


def probe(build_dir: Path, env: dict[str, str] | None = None) -> dict:
    """This machine's profile, shaped like machine-profile.md (``{"machine": {...}, "gpu": [...]}``)."""
    from vllm_harness.facts import pythons

    env = dict(os.environ if env is None else env)
    with ThreadPoolExecutor(max_workers=10) as pool:
        f_gpu = pool.submit(probe_gpus, env)
        f_py = pool.submit(pythons.discover, env)
        f_gcc = pool.submit(_gcc_version, env)
        f_gcc_alt = pool.submit(_gcc_alternatives, env)
        f_cmake = pool.submit(_tool_version, "cmake", ["--version"], env)
        f_ninja = pool.submit(_tool_version, "ninja", ["--version"], env)
        f_git = pool.submit(_tool_version, "git", ["--version"], env)
        try:
            interpreters, _failed = f_py.result()
        except (OSError, ValueError, subprocess.SubprocessError):  # discovery must not take the probe down
            interpreters = []
        f_tk = pool.submit(_probe_toolkits, env, interpreters)
        mem = _meminfo()
        machine: dict[str, Any] = {}
        if (o := _os_name()):
            machine["os"] = o
        if (a := platform.machine()):
            machine["arch"] = a
        if (c := _cores()):
            machine["cpu_cores"] = c
        if "MemTotal" in mem:
            machine["ram_gib"] = mem["MemTotal"]
        if "MemAvailable" in mem:
            machine["ram_available_gib"] = mem["MemAvailable"]
        if (d := _disk_free(build_dir)) is not None:
            machine["disk_free_gib"] = d
        versions = sorted({i.version for i in interpreters}, key=Version)
        machine["python"] = versions
        no_headers = sorted({i.version for i in interpreters if not i.has_headers}, key=Version)
        if no_headers:
            machine["python_without_headers"] = no_headers
        not_found = []
        for name, fut in (("gcc", f_gcc), ("cmake", f_cmake), ("git", f_git), ("ninja", f_ninja)):
            v = fut.result()
            if v:
                machine[name] = v
            else:
                not_found.append(name)
        if alternatives := f_gcc_alt.result():
            machine["gcc_alternatives"] = alternatives
        gpus, driver, driver_cuda = f_gpu.result()
        if driver:
            machine["driver"] = driver
            if driver_cuda:
                machine["driver_cuda"] = driver_cuda
        machine["in_container"] = _in_container(env)
        if not_found:
            machine["not_found"] = sorted(not_found)
        toolkits, no_nvcc, incomplete = f_tk.result()
        if no_nvcc:
            machine["cuda_without_nvcc"] = no_nvcc
        if incomplete:
            machine["cuda_incomplete"] = incomplete
        machine["cuda_toolkits"] = toolkits
    return {"machine": machine, "gpu": gpus}


def env_facts(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment variables doctor looks at (the ``env`` argument of ``doctor.check``)."""
    env = os.environ if env is None else env
    return {k: env[k] for k in ENV_KEYS if k in env}


# ========================================================================================= validation

def _s(v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad(f"expected a string, got {type(v).__name__} {v!r:.60}", "quote the value")
    if len(v) > 4096:
        raise _Bad("string is too long", "keep it under 4096 characters")
    return v


def _ver(v: Any) -> str:
    s = _s(v).strip()
    if not re.fullmatch(r"\d+(\.\d+){0,3}", s):
        raise _Bad(f"{s!r} is not a version", "write a dotted version such as \"3.22.1\"")
    try:
        Version(s)
    except InvalidVersion:  # pragma: no cover - the regex already rules this out
        raise _Bad(f"{s!r} is not a version", "write a dotted version such as \"3.22.1\"") from None
    return s


def _mm_str(what: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        s = _s(v).strip()
        if not re.fullmatch(r"\d{1,2}\.\d{1,2}", s):
            raise _Bad(f"{s!r} is not a {what}", f"write major.minor in quotes, e.g. \"{'8.9' if 'capab' in what else '12.4'}\"")
        return s
    return check


def _int_pos(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Bad(f"expected a whole number, got {v!r:.60}", "write a number without quotes, e.g. 16")
    if not 1 <= v <= 100000:
        raise _Bad(f"{v} is out of range", "write a number from 1 to 100000")
    return v


def _num(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Bad(f"expected a number, got {v!r:.60}", "write a number without quotes, e.g. 64.0")
    f = float(v)
    if not math.isfinite(f) or f < 0:
        raise _Bad(f"{v} is not a finite non-negative number", "write a number such as 64.0")
    return f


def _list(check: Callable[[Any], Any]) -> Callable[[Any], list]:
    return list_of(check, limit=256, example='["3.10.13"]')


def _tool_name(v: Any) -> str:
    s = _s(v)
    if s not in TOOLS:
        raise _Bad(f"{s!r} is not a tool the probe looks for", f"use some of: {', '.join(TOOLS)}")
    return s


def _driver(v: Any) -> str:
    s = _s(v).strip()
    if not re.fullmatch(r"\d+(\.\d+){0,3}", s):
        raise _Bad(f"{s!r} is not a driver version", "write it as nvidia-smi shows it, e.g. \"550.54.15\"")
    return s


def _nonempty(v: Any) -> str:
    s = _s(v)
    if not s.strip():
        raise _Bad("is empty", "give a value or remove the key")
    return s


MACHINE_KEYS: dict[str, Callable[[Any], Any]] = {
    "os": _nonempty,
    "arch": _nonempty,
    "cpu_cores": _int_pos,
    "ram_gib": _num,
    "ram_available_gib": _num,
    "disk_free_gib": _num,
    "python": _list(_ver),
    "python_without_headers": _list(_ver),
    "gcc": _ver,
    "gcc_alternatives": _list(_ver),
    "cmake": _ver,
    "git": _ver,
    "ninja": _ver,
    "driver": _driver,
    "driver_cuda": _mm_str("CUDA version"),
    "in_container": _bool,
    "not_found": _list(_tool_name),
    "cuda_without_nvcc": _list(_nonempty),
    "cuda_incomplete": _list(_nonempty),
    "cuda_toolkits": None,  # table, checked below
}
GPU_KEYS: dict[str, Callable[[Any], Any]] = {
    "name": _nonempty,
    "compute_capability": _mm_str("compute capability"),
    "memory_gib": _num,
}


def validate_profile(data: Any, where: str = "machine profile") -> dict:
    """The profile, normalised (numbers for *_gib are floats); ``UsageError`` naming ``where`` + key + fix."""
    def fail(key: str, reason: str, fix: str) -> UsageError:
        return UsageError(f"{where}: key '{key}': {reason}.", fix[0].upper() + fix[1:] + ".")

    if not isinstance(data, dict):
        raise UsageError(f"{where}: is not a table of [machine] and [[gpu]].", "Write it as machine-profile.md shows.")
    for key in data:
        if key not in ("machine", "gpu"):
            raise fail(key, "is not a known key", "use [machine] and [[gpu]] only (or remove it)")
    out: dict[str, Any] = {}
    if "machine" in data:
        m = data["machine"]
        if not isinstance(m, dict):
            raise fail("machine", "must be a table", "write it as [machine]")
        mo: dict[str, Any] = {}
        for key, value in m.items():
            if key not in MACHINE_KEYS:
                raise fail(f"machine.{key}", "is not a known key",
                           f"use one of: {', '.join(MACHINE_KEYS)} (or remove it)")
            if key == "cuda_toolkits":
                if not isinstance(value, dict):
                    raise fail("machine.cuda_toolkits", f"expected a table, got {type(value).__name__}",
                               "write [machine.cuda_toolkits] with lines like \"11.8\" = \"/usr/local/cuda-11.8\"")
                tk = {}
                for ver, root in value.items():
                    if not re.fullmatch(r"\d{1,2}\.\d{1,2}", ver):
                        raise fail(f"machine.cuda_toolkits.{ver}", "is not a CUDA major.minor",
                                   "use the toolkit version as the key, e.g. \"12.4\"")
                    try:
                        tk[ver] = _nonempty(root)
                    except _Bad as e:
                        raise fail(f"machine.cuda_toolkits.{ver}", e.reason, "give the toolkit root (CUDA_HOME) as a string") from None
                mo[key] = tk
                continue
            try:
                mo[key] = MACHINE_KEYS[key](value)
            except _Bad as e:
                raise fail(f"machine.{key}", e.reason, e.fix) from None
        out["machine"] = mo
    if "gpu" in data:
        gl = data["gpu"]
        if not isinstance(gl, list):
            raise fail("gpu", "must be an array of tables", "write each GPU as a [[gpu]] table")
        go = []
        for i, g in enumerate(gl):
            if not isinstance(g, dict):
                raise fail(f"gpu[{i}]", "must be a table", "write each GPU as a [[gpu]] table")
            gd = {}
            for key, value in g.items():
                if key not in GPU_KEYS:
                    raise fail(f"gpu[{i}].{key}", "is not a known key", f"use one of: {', '.join(GPU_KEYS)} (or remove it)")
                try:
                    gd[key] = GPU_KEYS[key](value)
                except _Bad as e:
                    raise fail(f"gpu[{i}].{key}", e.reason, e.fix) from None
            go.append(gd)
        out["gpu"] = go
    return out


def parse_profile(text: str, where: str = "machine profile") -> dict:
    try:
        safeio.prescan_toml(text)
        data = tomllib.loads(text)
    except safeio.TomlLimit as e:
        raise UsageError(f"{where}: {e}, past what a machine profile may hold.",
                         "Give a file written by `invoke doctor --save-machine FILE`.") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{where}: is not valid TOML ({e}).", "Correct the TOML syntax at that line.") from None
    return validate_profile(data, where)


def load_profile(path: Path) -> dict:
    """A saved profile, validated.  A FIFO, a device, a huge file, bad TOML, a wrong type or an unknown key:
    ``UsageError`` (checked on the open file before anything is read)."""
    path = Path(path)
    text = safeio.read_text(path, "Machine profile", safeio.TOML_MAX_BYTES,
                            "Give the path of a file written by `invoke doctor --save-machine FILE`.")
    return parse_profile(text, str(path))


# =========================================================================================== writing

def _tstr(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _tkey(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) and not re.fullmatch(r"\d+(\.\d+)*", k) else _tstr(k)


def _tval(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        r = repr(v)
        return r if any(c in r for c in ".en") else r + ".0"
    if isinstance(v, str):
        return _tstr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_tval(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")  # pragma: no cover - validated before


def dump_profile(profile: dict) -> str:
    """The TOML text of ``profile`` (validated first)."""
    p = validate_profile(profile, "profile to save")
    lines = ["# Machine profile written by vllm-harness (shared/contract/machine-profile.md).",
             "# `invoke doctor --machine FILE` judges a variant against it."]
    if "gpu" in p and not p["gpu"]:
        lines.append("gpu = []   # no NVIDIA GPU found")
    if "machine" in p:
        m = p["machine"]
        lines += ["", "[machine]"]
        lines += [f"{_tkey(k)} = {_tval(v)}" for k, v in m.items() if k != "cuda_toolkits"]
        if "cuda_toolkits" in m:
            lines += ["", "[machine.cuda_toolkits]      # toolkit version -> its root (CUDA_HOME)"]
            lines += [f"{_tstr(k)} = {_tval(v)}" for k, v in m["cuda_toolkits"].items()]
    for g in p.get("gpu", []):
        lines += ["", "[[gpu]]"] + [f"{_tkey(k)} = {_tval(v)}" for k, v in g.items()]
    return "\n".join(lines) + "\n"


def save_profile(profile: dict, path: Path) -> Path:
    """Write ``profile`` as TOML to ``path`` (atomically); returns the path."""
    path = Path(path)
    text = dump_profile(profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".profile-", suffix=".toml", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
