"""The build's memory policy, which doctor judges with the build's own functions: how many compile jobs fit
this machine (``MAX_JOBS``, ``NVCC_THREADS``) from its memory, its cores and the peak RSS of one compile job
measured in earlier builds (``.harness/buildspeed/memory.json``, written by ``steps/build_memory``).

vLLM's ``setup.py`` runs ``MAX_JOBS // NVCC_THREADS`` ninja jobs of ``NVCC_THREADS`` threads each, so
``MAX_JOBS`` is the number of compile processes alive at once.  The harness picks it as
``min(cores, (MemAvailable - reserve) / (GiB per compile thread x margin))``.  The per-thread figure is the
largest peak RSS of one compile job measured in earlier builds, else a stated prior (3.5 GiB for nvcc/cicc:
vLLM's plain kernels peak at 2.5-2.8 GB; 1 GiB for g++ on torch's headers).  A build killed for memory
records its figure x1.5, so the next run takes fewer jobs.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_harness.core.options import RunOptions

PRIOR_GIB_PER_THREAD = {"cuda": 3.5, "cpu": 1.0}

PRIOR_WHY = {
    "cuda": "prior for nvcc/cicc on vLLM's kernels (2.5-2.8 GB measured per file; not yet measured here)",
    "cpu": "prior for g++ on torch's headers (not yet measured here)",
}

RESERVE_GIB = 2.0  # the OS, pip, cmake, the linker

MARGIN = 1.25  # on top of the per-thread figure

OOM_FACTOR = 1.5  # a build killed for memory: its figure is raised by this much

MAX_RECORDS = 50


def records_path(state: Path) -> Path:
    return state / "buildspeed" / "memory.json"


def load_records(state: Path) -> list[dict]:
    try:
        data = json.loads(records_path(state).read_text())
        return [r for r in data.get("records", []) if isinstance(r, dict)]
    except (OSError, ValueError, AttributeError):
        return []


def per_thread_gib(records: list[dict], variant: str, device: str) -> tuple[float, str]:
    """GiB one compile thread needs: the biggest measured job of this variant (else of this device), per
    nvcc thread, raised for builds that died of memory; else the prior."""

    def usable(r: dict) -> bool:
        return r.get("device") == device and r.get("compiled") and (r.get("peak_job_gib") or 0) > 0

    for scope, recs in (
        ("variant " + variant, [r for r in records if usable(r) and r.get("variant") == variant]),
        (f"{device} builds", [r for r in records if usable(r)]),
    ):
        if not recs:
            continue
        best, why = 0.0, ""
        for r in recs:
            g = r["peak_job_gib"] / max(1, int(r.get("nvcc_threads") or 1))
            if r.get("oom"):
                g *= OOM_FACTOR
            if g > best:
                best = g
                why = (
                    f"measured: peak {r['peak_job_gib']:.2f} GiB for one {r.get('peak_job') or 'compile'} job"
                    + (
                        f" with NVCC_THREADS={r.get('nvcc_threads')}"
                        if (r.get("nvcc_threads") or 1) > 1
                        else ""
                    )
                    + (f", killed for memory (x{OOM_FACTOR})" if r.get("oom") else "")
                    + f" in a build of {r.get('variant')} ({scope})"
                )
        return max(best, 0.25), why
    return PRIOR_GIB_PER_THREAD[device], PRIOR_WHY[device]


@dataclass
class JobsChoice:
    jobs: int  # MAX_JOBS: compile threads alive at once
    nvcc_threads: int
    per_thread_gib: float
    why: str

    @property
    def ninja_jobs(self) -> int:
        return max(1, self.jobs // max(1, self.nvcc_threads))


def jobs_that_fit(avail_gib: float, gib_each: float) -> int:
    """How many compile jobs of ``gib_each`` fit in ``avail_gib`` after the reserve, each with the margin (0
    if
    none): the one memory rule of the build and of doctor."""
    return math.floor(max(0.0, avail_gib - RESERVE_GIB) / (gib_each * MARGIN))


def choose_jobs(
    cores: int,
    avail_gib: float,
    per_thread: float,
    per_why: str,
    device: str = "cuda",
    n_archs: int = 1,
    nvcc_threads: int | None = None,
) -> JobsChoice:
    """MAX_JOBS and NVCC_THREADS for this machine.  ``nvcc_threads`` given: kept (it is the user's)."""
    by_ram = max(1, jobs_that_fit(avail_gib, per_thread))
    jobs = max(1, min(cores, by_ram))
    bound = "cores" if cores <= by_ram else "memory"
    if nvcc_threads:
        threads, twhy = nvcc_threads, "given"
    elif device == "cuda" and n_archs > 1:
        # threads help the last files of a build (several archs of one file in parallel); they share MAX_JOBS
        threads, twhy = max(1, min(n_archs, jobs // 4)), f"{n_archs} archs, up to MAX_JOBS/4"
    else:
        threads, twhy = 1, "one arch" if device == "cuda" else "no nvcc"
    why = (
        f"min({cores} cores, ({avail_gib:.1f} GiB available - {RESERVE_GIB:g} reserve) / "
        f"({per_thread:.2f} GiB a compile thread x {MARGIN:g}) = {by_ram}) = {jobs}, bound by {bound}; "
        f"{per_why}; NVCC_THREADS={threads} ({twhy})"
    )
    return JobsChoice(jobs, threads, per_thread, why)


@dataclass(frozen=True)
class JobsPlan:
    """What the build will run and what the machine's memory takes: the same in doctor and in the build."""
    choice: JobsChoice
    source: str          # "--jobs", "[build] jobs" (the variant file's), or "auto" (memory and cores)
    fit: int | None      # compile threads that fit the memory (None: the memory is not known)
    per_thread: float    # GiB one compile thread takes (measured here, else the prior)
    basis: str           # how ``fit`` was found, for a message


def jobs_for(options: RunOptions, variant: Any, machine: tuple[int | None, float | None], records: list[dict],
             n_archs: int = 1) -> JobsPlan:
    """MAX_JOBS / NVCC_THREADS of ``variant``'s build (its ``name`` and ``[build]`` table), with the
    precedence of ``core.options``: --jobs, else ``[build] jobs``, else from memory and cores.  ``machine``:
    (cores, GiB available)."""
    cores, avail = machine
    jobs, build, variant_name = options.jobs, variant.build, variant.name
    device = "cpu" if build.get("env", {}).get("VLLM_TARGET_DEVICE", "cuda") == "cpu" else "cuda"
    given_threads = int(options.nvcc_threads or build.get("nvcc_threads") or 1)
    nvcc = given_threads if given_threads > 1 else None
    per, why = per_thread_gib(records, variant_name, device)
    fit = jobs_that_fit(avail, per) if avail is not None else None
    basis = (f"{avail:g} GiB available - {RESERVE_GIB:g} reserve, {per:.2f} GiB per compile thread x "
             f"{MARGIN:g} ({why})") if avail is not None else "memory not known"
    if jobs:
        return JobsPlan(JobsChoice(jobs, nvcc or 1, 0.0, "--jobs"), "--jobs", fit, per, basis)
    if build.get("jobs", "auto") != "auto":
        n = int(build["jobs"])
        return JobsPlan(JobsChoice(n, nvcc or 1, 0.0, f"{variant_name}.toml build.jobs"), "[build] jobs", fit,
                        per, basis)
    choice = choose_jobs(cores or 1, float(avail if avail is not None else 4.0), per, why, device, n_archs,
                         nvcc)
    return JobsPlan(choice, "auto", fit, per, basis)
