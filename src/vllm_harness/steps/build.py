"""The build step: the prebuilt wheel (downloaded, checked against the variant before install) or a
source build with ``--no-build-isolation`` (jobs from memory, archs from the GPUs, a compiler cache, the
wheelhouse reused), every variable in the child's environment only."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from vllm_harness.core import gitcmd, procs
from vllm_harness.core.errors import StepFailed, UsageError
from vllm_harness.core.runner import run_commands
from vllm_harness.facts import compat, feasibility_build, machine
from vllm_harness.facts.build_archs import check_archs, default_archs, given_archs
from vllm_harness.facts.build_policy import JobsChoice, load_records
from vllm_harness.facts.build_policy import jobs_for as policy_jobs_for
from vllm_harness.facts.compat import parse_arch_list
from vllm_harness.facts.machine import probe_gpus, uv_bin
from vllm_harness.facts.source_tree import git_env
from vllm_harness.steps import deps_cache, probe
from vllm_harness.steps.build_memory import mem_available_gib
from vllm_harness.steps.context import Ctx, source_dir, torch_kept
from vllm_harness.steps.source_build import SourceBuild, run_source_build
from vllm_harness.toolchain import build_farm
from vllm_harness.verify import checks as verify_mod


def arch_list(ctx: Ctx) -> tuple[str | None, str]:
    """TORCH_CUDA_ARCH_LIST and why: --arch, [build] arch_list (both checked against what the variant's nvcc
    builds), else this machine's GPUs (mapped onto the toolkit's archs), else unset: the source's own list."""
    if ctx.device != "cuda":
        return None, "CPU build: no CUDA archs"
    given = given_archs(ctx.variant.cuda, [(ctx.options.arch, "--arch"), (ctx.variant.build["arch_list"],
                                                                 "variant build.arch_list")])
    if given is not None:
        chk, where = given
        if chk.error:
            raise UsageError(f"{where}: {chk.error}.", chk.fix)
        return chk.archs, where
    gpus = (ctx.profile or {}).get("gpu")
    if gpus is None:
        gpus = probe_gpus(ctx.base_env)[0]
    caps = sorted({g["compute_capability"] for g in gpus if g.get("compute_capability")}, key=parse_arch_list)
    if caps:
        chk = check_archs(ctx.variant.cuda, caps, from_gpu=True)
        if chk.error:
            raise UsageError(f"TORCH_CUDA_ARCH_LIST from this machine's GPUs: {chk.error}.", chk.fix)
        return chk.archs, "the GPUs of this machine" + (f" ({'; '.join(chk.notes)})" if chk.notes else "")
    default = default_archs(ctx.variant.vllm["version"], ctx.variant.cuda)
    return None, (f"no GPU found: unset, so vLLM {ctx.variant.vllm['version']}'s CMake builds every arch it "
                  f"supports with CUDA {ctx.variant.cuda}: {default or 'its list (not in the compat data)'}; "
                  f"--arch '8.9' builds for one GPU only")


def host_compiler_env(ctx: Ctx) -> dict[str, str]:
    """CC/CXX/CUDAHOSTCXX = the newest installed gcc-N the variant's CUDA accepts, when the default gcc is
    too new for it (gcc 12 with CUDA 11.8) and the user named no compiler.  Prevents 'unsupported GNU
    version' instead of diagnosing it after the fact."""
    if ctx.profile is None:  # a single `invoke build`: no doctor ran before it
        ctx.profile = machine.probe(ctx.layout.state, env=ctx.base_env)
    m = ctx.profile.get("machine", {})
    if any(k in ctx.variant.build["env"] or k in ctx.base_env for k in ("CC", "CXX", "CUDAHOSTCXX")):
        return {}
    cf = compat.load().cuda(ctx.variant.cuda)
    alt = feasibility_build.build_gcc(cf, m) if cf is not None else None   # the judge's choice (doctor's too)
    if alt is None:
        return {}
    n = Version(alt).major
    return {"CC": f"gcc-{n}", "CXX": f"g++-{n}", "CUDAHOSTCXX": f"g++-{n}"}


_DOWNLOADS: dict[str, tuple[threading.Thread, dict]] = {}


def _wheel_download_cmd(ctx: Ctx, dest: Path) -> list[str]:
    v = ctx.variant
    dl = [str(ctx.py), "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off",
          "-d", str(dest), v.vllm_requirement]
    if v.vllm["index_url"]:
        dl += ["--index-url", v.vllm["index_url"]]
    return dl


def start_wheel_download(ctx: Ctx) -> None:
    """Wheel mode: download the vLLM wheel into the harness cache in the background, while the torch step
    downloads torch (one wheel of 300+ MB less on the critical path); the build step waits for it, checks the
    file there and installs that very file."""
    if ctx.variant.vllm["mode"] != "wheel" or ctx.name in _DOWNLOADS or not ctx.py.exists():
        return
    dest = ctx.layout.cache / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    cmd, env, out = _wheel_download_cmd(ctx, dest), ctx.env(), {"before": set(dest.glob("*.whl"))}

    def work() -> None:
        t0 = time.monotonic()
        try:
            r = procs.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
            out.update(rc=r.returncode, text=f"$ {' '.join(cmd)}\n{r.stdout}\n{r.stderr}\n")
        except BaseException as e:  # the build step downloads again in the foreground
            out.update(rc=None, text=f"$ {' '.join(cmd)}\n# background download failed: {e}\n")
        out["seconds"] = round(time.monotonic() - t0, 1)
        if out.get("rc") == 0:
            # while torch still installs: uv unpacks the wheel into its cache (the build step's install then
            # only links), and the wheel's own checks (torch pin, CUDA major, device code) read its libraries
            # there, one decompression, not two; the build step only reads this result (NEEDED resolution is
            # verify's binary layer)
            try:
                wheel = _newest_wheel(ctx, dest, out["before"])
                if wheel is not None:
                    with _unpacked_by_uv(ctx, wheel, env) as (site, text):
                        out["text"] += text
                        out["precheck"] = (wheel, verify_mod.verify_wheel(wheel, ctx.variant, env, None,
                                                                          unpacked=site))
            except Exception as e:  # the build step checks again in the foreground
                out["text"] += f"# wheel check beside the torch step failed ({e}): checked again\n"

    t = threading.Thread(target=work, name=f"wheel-download-{ctx.name}", daemon=True)
    t.start()
    _DOWNLOADS[ctx.name] = (t, out)


@contextlib.contextmanager
def _unpacked_by_uv(ctx: Ctx, wheel: Path, env: dict[str, str]) -> Iterator[tuple[Path | None, str]]:
    """uv unpacks a wheel into its cache before it links the files into a venv (1 GB for vLLM's: seconds).
    Done here, into a scratch venv of the harness cache while torch still installs, the build step's install
    of the same file only links.  Yields the scratch venv's site-packages (None when uv could not) and what
    to log; the scratch venv is removed afterwards.  A failure costs nothing but the time it saves."""
    uv = uv_bin()
    if ctx.variant.installer != "uv" or not uv:
        yield None, ""
        return
    scratch = Path(tempfile.mkdtemp(prefix=".unpack-", dir=ctx.layout.cache))
    try:
        argv = [uv, "pip", "install", "--python", str(scratch / "bin" / "python"), "--no-deps", "--offline",
                "--quiet", str(wheel)]
        try:
            r1 = procs.run([uv, "venv", "--quiet", "--python", str(ctx.py), str(scratch)],
                           capture_output=True, text=True, env=env, timeout=600)
            r2 = (procs.run(argv, capture_output=True, text=True, env=env, timeout=1800)
                  if r1.returncode == 0 else r1)
            text = (f"$ {' '.join(argv)}\n{r2.stderr}# exit status {r2.returncode} (unpacked into uv's "
                    "cache)\n")
            sites = sorted(scratch.glob("lib/python*/site-packages")) if r2.returncode == 0 else []
        except (OSError, subprocess.SubprocessError) as e:
            text = f"# unpacking {wheel.name} into uv's cache failed ({e}): the install unpacks it\n"
            sites = []
        yield (sites[0] if sites else None), text
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _newest_wheel(ctx: Ctx, dest: Path, before: set[Path]) -> Path | None:
    """The wheel for the variant's vLLM requirement in ``dest``: the newest one that was not there ``before``
    (the one just downloaded), else the newest there."""
    req = Requirement(ctx.variant.vllm_requirement)
    name = req.name.replace("-", "_").lower()
    wheels = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(name + "-")
                    and req.specifier.contains(p.name.split("-")[1], prereleases=True))
    new = [p for p in wheels if p not in before] or wheels
    return max(new, key=lambda p: p.stat().st_mtime) if new else None


def _download_wheel(ctx: Ctx, log: Path, dest: Path) -> tuple[set[Path], tuple | None]:
    """The wheel in the cache: the background download's (started with the torch step), else downloaded now.
    Returns the wheels that were there before, and the background check's (wheel, result) if it ran."""
    pending = _DOWNLOADS.pop(ctx.name, None)
    if pending is not None:
        thread, out = pending
        if thread.is_alive():
            ctx.say("  waiting for the vLLM wheel's download (started with the torch step)")
            while thread.is_alive():
                thread.join(timeout=15)
                if thread.is_alive() and not ctx.options.quiet:
                    ctx.say(f"  ... still downloading {ctx.variant.vllm_requirement}")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as fh:
            fh.write(out.get("text", "") + f"# exit status {out.get('rc')} (downloaded in the background, "
                     f"{out.get('seconds')}s, beside the torch step)\n")
        if out.get("rc") == 0:
            return out["before"], out.get("precheck")
    before = set(dest.glob("*.whl"))
    run_commands("build", [_wheel_download_cmd(ctx, dest)], log, ctx.env(), quiet=ctx.options.quiet)
    return before, None


def install_checked_wheel(ctx: Ctx, log: Path) -> dict:
    """Wheel mode: download the prebuilt vLLM wheel, refuse it before install when its CUDA major, torch pin
    or device code does not fit the variant (the source document's libcudart.so.12-in-an-11.8-env case),
    then install that very file with the env's pins kept."""
    v = ctx.variant
    dest = ctx.layout.cache / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    before, precheck = _download_wheel(ctx, log, dest)
    wheel = _newest_wheel(ctx, dest, before)
    if wheel is None:
        raise StepFailed(f"build: pip downloaded no wheel for {v.vllm_requirement}.", None, log=str(log))
    if precheck is not None and precheck[0] == wheel:
        res = precheck[1]  # checked beside the torch step, the same file
    else:
        res = verify_mod.verify_wheel(wheel, v, ctx.env(), ctx.py)
    text, _code = verify_mod.wheel_verdict(res, allow_no_gpu=True)
    with open(log, "a") as fh:
        for c in res["checks"]:
            fh.write(f"# wheel check: {c['status']}: {c['name']}: {c.get('reason', '')}\n")
        fh.write(f"# {text}\n")
    if text.startswith("REFUSED"):
        raise StepFailed(f"build: {wheel.name} {text}.", "Use a variant whose CUDA and torch fit this wheel, "
                         "or "
                         "build from source (mode = 'source').", log=str(log))
    with open(log, "ab") as fh:
        fh.write(b"\n")
    cmd = ctx.install_cmd([str(wheel)], v.vllm["index_url"])
    run_commands("build", [cmd], log.with_name("build-install.log"), ctx.env(), quiet=ctx.options.quiet)
    torch_kept(ctx, log)
    return {"note": f"installed {wheel.name} (prebuilt wheel; {text.split(':')[0]})", "wheel": str(wheel)}


def build_env(ctx: Ctx, src: Path, choice: JobsChoice, archs: str | None) -> dict[str, str]:
    """The source build's child environment, every contributor in order (later ones win):

    1. the caller's environment without what must not leak into a variant (facts/toolkit.clean_env);
    2. the variant's venv and CUDA toolkit: PATH, VIRTUAL_ENV, CUDA_HOME/CUDA_PATH, LD_LIBRARY_PATH (Ctx.env);
    3. the build's choices: MAX_JOBS, NVCC_THREADS, NINJA_STATUS, TORCH_CUDA_ARCH_LIST, the version for a tree
       without git metadata, CC/CXX/CUDAHOSTCXX for an old toolkit (host_compiler_env);
    4. the variant's own ``[build] env`` table;
    5. git: safe.directory for exactly this tree and its FetchContent checkouts when the harness made it
       (never for an ``in_place`` tree), transports limited (facts/source_tree.git_env);
    6. the cached FetchContent sources for offline builds (steps/deps_cache.apply);
    and, in steps/source_build, 7. the compiler cache's launcher variables (CompilerCache.launcher_env).
    """
    v = ctx.variant
    extra = {"MAX_JOBS": str(choice.jobs), "NVCC_THREADS": str(choice.nvcc_threads),
             "NINJA_STATUS": "[%f/%t] "}
    if archs:
        extra["TORCH_CUDA_ARCH_LIST"] = archs
    # an in_place tree is the user's: no safe.directory for it (another user's stays refused by git, so
    # setuptools-scm gets the version from the harness, as for a tree without git metadata)
    users = bool(v.vllm.get("in_place"))
    if (not (src / ".git").exists() or (users and gitcmd.foreign_owner(src) is not None)) \
            and not (src / "PKG-INFO").exists():
        extra["SETUPTOOLS_SCM_PRETEND_VERSION"] = (ctx.status.step("prepare") or {}).get("vllm_version") \
            or v.vllm["version"]
    if ctx.device == "cuda":
        extra.update(host_compiler_env(ctx))
    extra.update(v.build["env"])
    env = git_env(ctx.env(cuda=ctx.device == "cuda", extra=extra), [] if users else [src])
    return deps_cache.apply(ctx, src, env)


def do_build(ctx: Ctx, log: Path) -> dict:
    v = ctx.variant
    if v.vllm["mode"] == "wheel":
        return install_checked_wheel(ctx, log)
    src = source_dir(ctx)
    archs, why_arch = arch_list(ctx)
    n_archs = len(parse_arch_list(archs or default_archs(v.vllm["version"], v.cuda) or "")) or 1
    choice = jobs_for(ctx, n_archs)
    farm, choice = farm_for(ctx, choice)
    env = build_env(ctx, src, choice, archs)
    # wheelhouse reuse, compiler cache, peak-RSS record, the wheel: run_source_build below.  The probe
    # (~20 s syntax check against the env's torch) runs before a compile, unless a wheel with this build's key
    # exists (that source already compiled against this torch)
    plan = SourceBuild(src, env, choice, archs, why_arch, farm)
    return run_source_build(ctx, plan, log, before_compile=lambda: probe.before_build(ctx, src, env))


def _available_gib(ctx) -> float:
    """Memory available for the compile jobs: the profile's (doctor probed it for this run), else /proc's."""
    return (ctx.profile or {}).get("machine", {}).get("ram_available_gib") or mem_available_gib()


def farm_for(ctx, choice: JobsChoice) -> tuple[build_farm.FarmPlan, JobsChoice]:
    """The build farm (--farm, [build] farm, SCCACHE_CONF's [dist]) and MAX_JOBS from its free slots; a farm
    that does not answer is a warning and a local build (toolchain/build_farm)."""
    avail = _available_gib(ctx)
    given = bool(ctx.options.jobs) or ctx.variant.build["jobs"] != "auto"
    plan, choice = build_farm.plan(ctx.options.farm, ctx.variant.build.get("farm"), ctx.base_env,
                                   choice, float(avail), given)
    if plan.warning:
        ctx.say(f"  warning: {plan.warning}")
    return plan, choice


def jobs_for(ctx, n_archs: int = 1) -> JobsChoice:
    """MAX_JOBS / NVCC_THREADS for a variant's build: facts/build_policy.jobs_for (doctor asks it too) with
    this machine's cores and available memory."""
    avail = _available_gib(ctx)
    machine = (len(os.sched_getaffinity(0)), float(avail))
    return policy_jobs_for(ctx.options, ctx.variant, machine, load_records(ctx.layout.state), n_archs).choice
