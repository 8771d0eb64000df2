"""The machine profile: what doctor judges a variant against (docs/contract/machine-profile.md).

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

import math
import os
import platform
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from packaging.version import Version

from vllm_harness.core import procs
from vllm_harness.facts import pythons
from vllm_harness.facts.cuda_toolkits import first_version, probe_toolkits_full, run_quiet

TOOLS = ("gcc", "cmake", "ninja", "git")
ENV_KEYS = ("VLLM_USE_PRECOMPILED", "VLLM_PRECOMPILED_WHEEL_LOCATION", "VLLM_TARGET_DEVICE", "CUDA_HOME",
            "CUDA_PATH", "MAX_JOBS", "NVCC_THREADS", "TORCH_CUDA_ARCH_LIST", "CC", "CXX", "CUDAHOSTCXX",
            "LD_LIBRARY_PATH", "HOME")


# ============================================================================================ probing


def _tool_version(name: str, argv_tail: list[str], env: dict[str, str],
                  pattern: re.Pattern | None = None) -> str | None:
    exe = shutil.which(name, path=env.get("PATH"))
    if not exe:
        return None
    r = run_quiet([exe, *argv_tail], env=env)
    if r is None or r[0] != 0:
        return None
    return first_version(r[1], pattern)


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
    r = run_quiet([smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"], env=env)
    if r is not None and r[0] != 0:  # old drivers do not know compute_cap
        fields = ["name", "memory.total", "driver_version"]
        r = run_quiet([smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"], env=env)
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
    head = run_quiet([smi], env=env)
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


def _existing(path: Path) -> Path:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _disk_free(build_dir: Path) -> float | None:
    try:
        return _gib(shutil.disk_usage(_existing(build_dir)).free)
    except OSError:
        return None


def uv_bin() -> str | None:
    """The uv the harness installs with: the ``uv`` package's binary in this interpreter, else uv on PATH."""
    try:
        from uv import find_uv_bin
        return find_uv_bin()
    except Exception:  # no uv package (or a broken one): PATH's
        return shutil.which("uv")


def _uv_cache(build_dir: Path, env: dict[str, str]) -> tuple[float, bool] | None:
    """(free GiB where uv's cache is, whether it is on the build folder's disk) as ``uv cache dir`` names it
    (UV_CACHE_DIR, uv.toml's cache-dir, XDG_CACHE_HOME): a wheel install unpacks its wheels there (8 GiB for
    a CUDA torch stack), and uv hardlinks them into the env only on the same disk (else it copies them)."""
    uv = uv_bin()
    if not uv:
        return None
    try:
        r = procs.run([uv, "cache", "dir"], capture_output=True, text=True, timeout=20, env=env)
        if r.returncode != 0 or not r.stdout.strip():
            return None
        cache, build = _existing(Path(r.stdout.strip().splitlines()[-1])), _existing(build_dir)
        return _gib(shutil.disk_usage(cache).free), cache.stat().st_dev == build.stat().st_dev
    except (OSError, subprocess.SubprocessError):
        return None


def _os_name() -> str | None:
    try:
        kv = dict(re.findall(r'^([A-Z_]+)="?([^"\n]*)"?$', Path("/etc/os-release").read_text(), re.MULTILINE))
    except OSError:
        return platform.system().lower() or None
    name = kv.get("ID", "")
    ver = kv.get("VERSION_ID", "")
    return f"{name}-{ver}" if name and ver else (name or None)


def _glibc() -> str | None:
    """The C library's version when it is glibc ("2.36"): which manylinux wheels run here (a bundle made for
    this machine's profile picks its wheels by it)."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        text = ""
    m = re.fullmatch(r"glibc (\d+)\.(\d+)(?:\.\d+)?", text.strip())
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _jetson(root: Path = Path("/")) -> tuple[str | None, str | None]:
    """(L4T release, board) on a Jetson: /etc/nv_tegra_release ('# R36 (release), REVISION: 4.3, ...') and the
    device tree's model; (None, None) elsewhere."""
    try:
        head = (root / "etc/nv_tegra_release").read_text(errors="replace")[:400]
    except OSError:
        return None, None
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)(?:\.(\d+))?", head)
    l4t = f"{m.group(1)}.{m.group(2)}" + (f".{m.group(3)}" if m.group(3) else "") if m else None
    try:
        model = (root / "proc/device-tree/model").read_bytes()[:200].decode("utf-8",
                                                                            "replace").strip("\x00 \n")
    except OSError:
        model = ""
    return l4t, (model or None)


def _in_container(env: dict[str, str]) -> bool:
    if Path("/.dockerenv").exists() or Path("/run/.containerenv").exists() or env.get("container"):
        return True
    try:
        cg = Path("/proc/1/cgroup").read_text()
    except OSError:
        return False
    return bool(re.search(r"docker|kubepods|containerd|libpod|lxc", cg))


def _host_facts(build_dir: Path) -> dict[str, Any]:
    """OS, CPU architecture, C library, cores, memory and free disk (each only where known)."""
    mem = _meminfo()
    machine: dict[str, Any] = {}
    if o := _os_name():
        machine["os"] = o
    if a := platform.machine():
        machine["arch"] = a
    if g := _glibc():
        machine["glibc"] = g
    if c := _cores():
        machine["cpu_cores"] = c
    if "MemTotal" in mem:
        machine["ram_gib"] = mem["MemTotal"]
    if "MemAvailable" in mem:
        machine["ram_available_gib"] = mem["MemAvailable"]
    if (d := _disk_free(build_dir)) is not None:
        machine["disk_free_gib"] = d
    return machine


def _add_pythons(machine: dict[str, Any], interpreters: list) -> None:
    machine["python"] = sorted({i.version for i in interpreters}, key=Version)
    no_headers = sorted({i.version for i in interpreters if not i.has_headers}, key=Version)
    if no_headers:
        machine["python_without_headers"] = no_headers


def _add_platform(
    machine: dict[str, Any], gpus: list[dict], driver: tuple[str | None, str | None], env: dict[str, str]
) -> None:
    """The driver (and the CUDA it supports), whether this is a container, and a Jetson's L4T and board
    (whose GPU is the SoC's own: marked integrated)."""
    version, driver_cuda = driver
    if version:
        machine["driver"] = version
        if driver_cuda:
            machine["driver_cuda"] = driver_cuda
    machine["in_container"] = _in_container(env)
    l4t, board = _jetson()
    if l4t:
        machine["l4t"] = l4t
        for g in gpus:  # a Jetson's GPU is the SoC's own
            g["integrated"] = True
    if board and "jetson" in board.lower():
        machine["jetson"] = board


def probe(build_dir: Path, env: dict[str, str] | None = None) -> dict:
    """This machine's profile, shaped like machine-profile.md (``{"machine": {...}, "gpu": [...]}``)."""

    env = dict(os.environ if env is None else env)
    with ThreadPoolExecutor(max_workers=10) as pool:
        f_gpu = pool.submit(probe_gpus, env)
        f_py = pool.submit(pythons.discover, env)
        f_gcc = pool.submit(_gcc_version, env)
        f_gcc_alt = pool.submit(_gcc_alternatives, env)
        f_cmake = pool.submit(_tool_version, "cmake", ["--version"], env)
        f_ninja = pool.submit(_tool_version, "ninja", ["--version"], env)
        f_git = pool.submit(_tool_version, "git", ["--version"], env)
        f_uv = pool.submit(_uv_cache, build_dir, env)
        try:
            interpreters, _failed = f_py.result()
        except (OSError, ValueError, subprocess.SubprocessError):  # discovery must not take the probe down
            interpreters = []
        f_tk = pool.submit(probe_toolkits_full, env, interpreters)
        machine = _host_facts(build_dir)
        _add_pythons(machine, interpreters)
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
        _add_platform(machine, gpus, (driver, driver_cuda), env)
        if (uvc := f_uv.result()) is not None:
            machine["uv_cache_free_gib"], machine["uv_cache_same_disk"] = uvc
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
