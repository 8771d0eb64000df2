"""Build memory at run time: the peak-RSS sampler and the records it leaves (the policy that reads them,
jobs from memory, is ``facts/build_policy``, which doctor asks too).

* **Peak RSS.**  :class:`RssSampler` reads ``/proc`` every 0.2 s: the whole tree under the harness (pip,
  cmake, ninja, compilers) and the sccache server's compilers; a *job* is a child of ninja/make (or of the
  sccache server) with everything under it.  ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` (the biggest
  single child process that was waited for) is kept beside it as a cross-check.
"""
from __future__ import annotations

import json
import os
import re
import resource
import threading
from dataclasses import dataclass
from pathlib import Path

from vllm_harness.core.procs import rss_table
from vllm_harness.facts.build_policy import MAX_RECORDS, load_records, records_path

JOB_PARENTS = {"ninja", "make", "gmake"}


OOM_RE = re.compile(
    r"Killed signal terminated program|fatal error: Killed|virtual memory exhausted|"
    r"out of memory allocating|std::bad_alloc|cannot allocate memory|nvcc error\s*:.*Killed",
    re.IGNORECASE,
)


GIB = 2**30


def mem_available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 4.0


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
    procs = rss_table() if procs is None else procs
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


def save_record(state: Path, rec: dict) -> None:
    recs = (load_records(state) + [rec])[-MAX_RECORDS:]
    p = records_path(state)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"records": recs}, indent=1))
    os.replace(tmp, p)


def looks_oom(log: Path) -> bool:
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, os.path.getsize(log) - 4 * 2**20))
            return bool(OOM_RE.search(fh.read().decode("utf-8", "replace")))
    except OSError:
        return False
