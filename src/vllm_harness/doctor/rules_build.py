"""doctor's rules for a source build and the machine around it: toolkit, host compiler, cmake/ninja, memory for
the compile jobs, disk, and the source tree's owner and leftovers."""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any

from packaging.version import Version

from vllm_harness.doctor.model import _cite, _Ctx, rule
from vllm_harness.doctor.rules_versions import _venv_provides
from vllm_harness.facts import compat as compat_mod
from vllm_harness.facts.toolkit import PYPI_EXTRAS, install_fix
from vllm_harness.steps import build_memory as bmem

DISK_SOURCE_GIB = 30.0         # source build: venv + torch + build tree + .deps + caches


DISK_WHEEL_GIB = 15.0          # wheel install: venv + torch + vLLM + deps + caches
UV_CACHE_GIB = 10.0            # uv's cache on a disk of its own: a CUDA torch stack unpacks about 8 GiB there


def _check_build(ctx: _Ctx, vf: compat_mod.VllmFacts | None) -> None:
    v, m = ctx.variant, ctx.m
    cf = ctx.data.cuda(v.cuda)
    # --- CUDA toolkit
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
    if free < need:  # the registry skips this rule when the profile has no disk_free_gib
        ctx.add("disk-full", "error", "disk space", f"{free} GiB free where builds go; {what} needs about {need:g} GiB",
                "free space (`invoke clean --all`, pip/uv caches), or point the build directory at a larger disk")
    # uv unpacks every wheel into its cache first; on another disk than the env (~/.cache/uv on a small root
    # disk, the build on /data) that disk fills mid-install, and uv copies the files instead of hardlinking
    cache_free, same = ctx.m.get("uv_cache_free_gib"), ctx.m.get("uv_cache_same_disk")
    if ctx.variant.installer == "uv" and same is False and cache_free is not None and cache_free < UV_CACHE_GIB:
        ctx.add("disk-full", "error", "uv cache disk",
                f"uv's cache (`uv cache dir`) is on another disk than the build, with {cache_free} GiB free; uv "
                f"unpacks every wheel there first (about 8 GiB for a CUDA torch stack): the install would stop "
                f"with 'No space left on device'",
                "point UV_CACHE_DIR at a folder on the build's disk (uv then hardlinks instead of copying; "
                "VLLM_HARNESS_STATE and UV_CACHE_DIR can share one disk), or free space there (`uv cache prune`)")


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


# ------------------------------------------------------------------------------------- the registry

@rule("source build", ids=("cuda-home-missing", "cuda-torch-version-mismatch", "compiler-oom", "host-compiler-unsupported",
                           "ninja-missing", "cuda-runtime-lib-missing", "nvcc-not-found", "cmake-too-old"),
      when=lambda ctx: ctx.source, order=70)
def build(ctx: _Ctx) -> None:
    _check_build(ctx, ctx.vf)


@rule("disk space", ids=("disk-full",), needs=("machine.disk_free_gib",), order=80)
def disk(ctx: _Ctx) -> None:
    _check_disk(ctx)


@rule("source tree", ids=("stale-build-state", "git-dubious-ownership"), order=90)
def source_tree(ctx: _Ctx) -> None:
    _check_source_tree(ctx)
