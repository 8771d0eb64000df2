"""Build memory policy: jobs from memory and the peak-RSS records.

* **Jobs from memory.**  vLLM's ``setup.py`` runs ``MAX_JOBS // NVCC_THREADS`` ninja jobs of ``NVCC_THREADS``
  threads each, so ``MAX_JOBS`` is the number of compile processes alive at once.  The harness picks it as
  ``min(cores, (MemAvailable - reserve) / (GiB per compile thread x margin))``.  The per-thread figure is the
  largest peak RSS of one compile job measured in earlier builds (``.harness/buildspeed/memory.json``),
  else a stated prior (3.5 GiB for nvcc/cicc: vLLM's plain kernels peak at 2.5-2.8 GB; 1 GiB for g++ on
  torch headers).  A build killed for memory records its figure x1.5, so the next run takes fewer jobs.
* **Peak RSS.**  :class:`RssSampler` reads ``/proc`` every 0.2 s: the whole tree under the harness (pip,
  cmake, ninja, compilers) and the sccache server's compilers; a *job* is a child of ninja/make (or of the
  sccache server) with everything under it.  ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` (the biggest
  single child process that was waited for) is kept beside it as a cross-check.
"""
from __future__ import annotations

import json
import math
import os
import re
import resource
import threading
from dataclasses import dataclass
from pathlib import Path

PRIOR_GIB_PER_THREAD = {"cuda": 3.5, "cpu": 1.0}


PRIOR_WHY = {
    "cuda": "prior for nvcc/cicc on vLLM's kernels (2.5-2.8 GB measured per file; not yet measured here)",
    "cpu": "prior for g++ on torch's headers (not yet measured here)",
}


RESERVE_GIB = 2.0  # the OS, pip, cmake, the linker


MARGIN = 1.25  # on top of the per-thread figure


OOM_FACTOR = 1.5  # a build killed for memory: its figure is raised by this much


MAX_RECORDS = 50


JOB_PARENTS = {"ninja", "make", "gmake"}


OOM_RE = re.compile(
    r"Killed signal terminated program|fatal error: Killed|virtual memory exhausted|"
    r"out of memory allocating|std::bad_alloc|cannot allocate memory|nvcc error\s*:.*Killed",
    re.IGNORECASE,
)


PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


GIB = 2**30


def mem_available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 4.0


def _read_procs() -> dict[int, tuple[int, str, int]]:
    """pid -> (ppid, comm, rss bytes) for every process we can read."""
    out: dict[int, tuple[int, str, int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                raw = fh.read().decode("utf-8", "replace")
        except OSError:
            continue
        lp, rp = raw.find("("), raw.rfind(")")
        if lp < 0 or rp < 0:
            continue
        rest = raw[rp + 2 :].split()
        try:
            out[int(name)] = (int(rest[1]), raw[lp + 1 : rp], int(rest[21]) * PAGE)
        except (IndexError, ValueError):
            continue
    return out


@dataclass
class Peak:
    tree_bytes: int = 0  # everything under the roots at one moment
    job_bytes: int = 0  # the biggest compile job (a child of ninja/make/sccache server + its tree)
    job_name: str = ""
    proc_bytes: int = 0  # the biggest single process
    proc_name: str = ""
    max_jobs_seen: int = 0  # compile jobs alive at once
    samples: int = 0

    def to_dict(self) -> dict:
        g = lambda b: round(b / GIB, 3)  # noqa: E731
        return {
            "peak_tree_gib": g(self.tree_bytes),
            "peak_job_gib": g(self.job_bytes),
            "peak_job": self.job_name,
            "peak_proc_gib": g(self.proc_bytes),
            "peak_proc": self.proc_name,
            "max_jobs_seen": self.max_jobs_seen,
            "samples": self.samples,
        }


def sample_once(
    roots: list[int],
    extra_job_parents: set[int] | None = None,
    procs: dict[int, tuple[int, str, int]] | None = None,
) -> tuple[int, list[tuple[str, int]], tuple[str, int]]:
    """(tree bytes, [(job name, job bytes)], (biggest process, its bytes)) for the processes under
    ``roots``."""
    procs = _read_procs() if procs is None else procs
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _c, _r) in procs.items():
        kids.setdefault(ppid, []).append(pid)

    def subtree(pid: int) -> list[int]:
        out, todo = [], list(kids.get(pid, []))
        while todo:
            p = todo.pop()
            out.append(p)
            todo += kids.get(p, [])
        return out

    members: set[int] = set()
    for r in roots:
        if r in procs:
            members.update(subtree(r))
    tree = sum(procs[p][2] for p in members)
    parents = set(extra_job_parents or ())
    jobs = []
    for p in members | {q for r in parents for q in subtree(r)}:
        ppid, comm, rss = procs[p]
        if comm == "sccache":  # the client under ninja: its compile runs under the server, counted there
            continue
        if ppid in parents or procs.get(ppid, (0, "", 0))[1] in JOB_PARENTS:
            jobs.append((comm, rss + sum(procs[q][2] for q in subtree(p))))
    extra = ({q for r in parents for q in subtree(r)} | (parents & procs.keys())) - members - set(roots)
    tree += sum(procs[p][2] for p in extra)
    biggest = max(((procs[p][1], procs[p][2]) for p in members | extra), key=lambda x: x[1], default=("", 0))
    return tree, jobs, biggest


class RssSampler:
    """Samples the RSS of everything under this process (and of extra job parents) until stopped."""

    def __init__(self, interval: float = 0.2, roots: list[int] | None = None):
        self.interval = interval
        self.roots = roots or [os.getpid()]
        self.job_parents: set[int] = set()
        self.peak = Peak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._ru0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.take()
            except Exception:  # sampling must never break a build
                pass
            self._stop.wait(self.interval)

    def take(self) -> None:
        tree, jobs, (pname, pbytes) = sample_once(self.roots, self.job_parents)
        pk = self.peak
        pk.samples += 1
        pk.tree_bytes = max(pk.tree_bytes, tree)
        pk.max_jobs_seen = max(pk.max_jobs_seen, len(jobs))
        for name, b in jobs:
            if b > pk.job_bytes:
                pk.job_bytes, pk.job_name = b, name
        if pbytes > pk.proc_bytes:
            pk.proc_bytes, pk.proc_name = pbytes, pname

    def result(self) -> dict:
        d = self.peak.to_dict()
        ru = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        # ru_maxrss (KiB on Linux): the biggest child ever waited for; only meaningful when it grew in this
        # build
        d["ru_maxrss_children_gib"] = round(ru / 2**20, 3) if ru > self._ru0 else None
        return d


def records_path(state: Path) -> Path:
    return state / "buildspeed" / "memory.json"


def load_records(state: Path) -> list[dict]:
    try:
        data = json.loads(records_path(state).read_text())
        return [r for r in data.get("records", []) if isinstance(r, dict)]
    except (OSError, ValueError, AttributeError):
        return []


def save_record(state: Path, rec: dict) -> None:
    recs = (load_records(state) + [rec])[-MAX_RECORDS:]
    p = records_path(state)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"records": recs}, indent=1))
    os.replace(tmp, p)


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


def looks_oom(log: Path) -> bool:
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, os.path.getsize(log) - 4 * 2**20))
            return bool(OOM_RE.search(fh.read().decode("utf-8", "replace")))
    except OSError:
        return False
