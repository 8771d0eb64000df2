"""invoke tasks: the single steps of a variant build, for daily work.  Each one calls vllm_harness.cli."""

from __future__ import annotations

import sys
from pathlib import Path

from invoke import Exit, task

sys.path.insert(0, str(Path(__file__).parent / "src"))
from vllm_harness.cli import main as harness


def _call(*argv: str | None, **flags) -> None:
    args = [a for a in argv if a is not None]
    for name, value in flags.items():
        flag = "--" + name.rstrip("_").replace("_", "-")
        if value is True:
            args.append(flag)
        elif value not in (None, False):
            args += [flag, str(value)]
    rc = harness(args)
    if rc:
        raise Exit(code=rc)


V = {"variant": "variant name (envs/NAME.toml) or path to a variant file"}


@task(help={**V, "all_": "every variant, and the download cache", "dry_run": "show, remove nothing",
            "pip_cache": "also purge pip's own cache (opt-in)", "wheelhouse": "also remove the built wheels",
            "no_wait": "fail at once if a run holds the variant (default: wait for it)", "json": "JSON output"})
def clean(c, variant=None, all_=False, dry_run=False, pip_cache=False, wheelhouse=False, no_wait=False, json=False):
    """Remove what the harness made for a variant: stale build/, .deps, egg-info, its venv and logs."""
    _call("clean", variant=variant, all_=all_, dry_run=dry_run, pip_cache=pip_cache, wheelhouse=wheelhouse,
          no_wait=no_wait, json=json)


@task(help={**V, "machine": "judge this machine profile (TOML) instead of probing",
            "save_machine": "write this machine's profile to FILE", "source": "a vLLM tree to read pins from",
            "json": "JSON output"})
def doctor(c, variant=None, machine=None, save_machine=None, source=None, json=False):
    """Preflight verdict for a variant on this machine, with a fix for each finding."""
    _call("doctor", variant=variant, machine=machine, save_machine=save_machine, source=source, json=json)


@task(help={**V, "force": "fetch again", "source": "this run's source: a folder, a vllm-X.tar.gz, a git URL@ref, "
            "or sdist / sdist:VERSION", "deps": "also cache vLLM's CMake dependencies (CUTLASS, flash-attention...) "
            "for offline builds", "every_arch": "with --deps: every arch's variant", "json": "JSON output"})
def fetch(c, variant=None, force=False, source=None, deps=False, every_arch=False, json=False):
    """Get the variant's vLLM source (PyPI sdist, git ref or local path) into .harness/src/; --deps: its CMake deps."""
    _call("fetch", variant=variant, force=force, source=source, deps=deps, every_arch=every_arch, json=json)


@task(help={**V, "source": "prepare this tree instead of the variant's", "json": "JSON output",
            "force": "run again"})
def prepare(c, variant=None, source=None, json=False, force=False):
    """Run the tree's use_existing_torch.py (or the equivalent) and check no torch pin is left."""
    _call("prepare", variant=variant, source=source, json=json, force=force)


@task(help={**V, "source": "a vLLM tree (default: the variant's fetched one)", "python": "a Python whose torch to "
            "use (default: the variant's env)", "device": "cuda or cpu bindings", "kernel": "also run one kernel "
            "file through nvcc --cuda", "timeout": "seconds (default 300)", "json": "JSON output"})
def probe(c, variant=None, source=None, python=None, device=None, kernel=False, timeout=None, json=False):
    """Compile vLLM's torch_bindings.cpp against the env's torch (syntax only, ~20 s) before the long build."""
    _call("probe", variant=variant, source=source, python=python, device=device, kernel=kernel, timeout=timeout,
          json=json)


@task(help={"source": "dry-run the patches on this tree instead", "version": "only this vLLM release",
            "json": "JSON output"})
def patches(c, source=None, version=None, json=False):
    """Check patches/: every patch against every vLLM release (PyPI sdist) its versions claim."""
    _call("patches", source=source, version=version, json=json)


@task(help={**V, "python": "interpreter for the venv (default: discovered)", "force": "run again"})
def deps(c, variant=None, python=None, force=False):
    """Make the variant's venv, install its torch, then the build requirements (torch kept)."""
    _call("deps", variant=variant, python=python, force=force)


@task(help={**V, "jobs": "MAX_JOBS (default: from RAM and cores)", "nvcc_threads": "NVCC_THREADS",
            "arch": "TORCH_CUDA_ARCH_LIST, e.g. '7.5;8.9' (default: this machine's GPUs)", "force": "run again",
            "rebuild": "compile even when the wheelhouse has this build's wheel",
            "cache": "compiler cache: auto, sccache, ccache, none, or a path"})
def build(c, variant=None, jobs=None, nvcc_threads=None, arch=None, force=False, rebuild=False, cache=None):
    """Build vLLM with --no-build-isolation under CUDA_HOME/LD_LIBRARY_PATH (or install its wheel)."""
    _call("build", variant=variant, jobs=jobs, nvcc_threads=nvcc_threads, arch=arch, force=force, rebuild=rebuild,
          cache=cache)


@task(name="post-install", help={**V, "force": "run again"})
def post_install(c, variant=None, force=False):
    """Install what vLLM needs at run time after the build (xformers from the variant's index)."""
    _call("post-install", variant=variant, force=force)


@task(help={**V, "python": "verify any env with vLLM instead", "json": "JSON output",
            "allow_no_gpu": "exit 0 when the GPU checks could not run",
            "wheel": "check a wheel FILE against --variant before installing it (CUDA major, torch pin, archs)",
            "libs": "extension libraries (a file or folder) to check and load directly",
            "cc": "compare the binaries with these compute capabilities, e.g. 8.0,9.0",
            "no_speed": "skip the bandwidth measurements"})
def verify(c, variant=None, python=None, json=False, allow_no_gpu=False, wheel=None, libs=None, cc=None,
           no_speed=False):
    """Prove an env runs on this GPU: environment, binaries, imports, kernels vs torch, speed."""
    _call("verify", variant=variant, python=python, json=json, allow_no_gpu=allow_no_gpu, wheel=wheel, libs=libs,
          cc=cc, no_speed=no_speed)


@task(help={"refresh": "read the facts from the package index's metadata (PyPI; the PyTorch index when reachable)",
            "index_url": "another simple index (PEP 691 JSON or PEP 503 HTML)", "pytorch_index": "another PyTorch "
            "wheel index", "json": "JSON output"})
def compat(c, refresh=False, index_url=None, pytorch_index=None, json=False):
    """The compatibility data's age; --refresh regenerates data/compat.lock.toml from the package index."""
    _call("compat", refresh=refresh, index_url=index_url, pytorch_index=pytorch_index, json=json)


@task(help={"machine": "plan for this machine profile (TOML) instead of this machine",
            "write": "write the recommendation as a variant, e.g. envs/mine.toml", "json": "JSON output"})
def plan(c, machine=None, write=None, json=False):
    """What can run here: per CUDA line the newest vLLM, its torch and Python, wheel or source; one recommendation."""
    _call("plan", machine=machine, write=write, json=json)


@task(help={"log": "log file, or - for stdin (default: the last failed step's log)",
            "variant": "fill the fixes with this variant's values", "json": "JSON output"})
def diagnose(c, log=None, variant=None, json=False):
    """Name the cause and the fix of a failed build or install log."""
    _call("diagnose", log=log, variant=variant, json=json)


@task(name="list", help={"json": "JSON output"})
def list_(c, json=False):
    """The variants in envs/ (CUDA, Python, torch, vLLM, mode)."""
    _call("list", json=json)
