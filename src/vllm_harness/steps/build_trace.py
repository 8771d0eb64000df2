"""Where a source build's time goes: ``logs/<variant>/build.trace.json`` from ninja's ``.ninja_log``.

* **The jobs.**  ninja appends one line per finished edge to ``<build dir>/.ninja_log`` (``# ninja log
v5``/``v6``:
  start ms, end ms, mtime, output, command hash; times from the start of that ninja run).  A rerun of ninja in
the
  same folder appends again from 0, so only the last run of each log is read; the edges of a command with
several
  outputs are one job.  Every ``.ninja_log`` of this build is read: under the source tree (vLLM's ``setup.py``
  builds in ``build/temp.*``) and, kept while the build runs (:class:`NinjaLogKeeper`), an editable install's
  temporary ``/tmp/tmpXXXX.build-temp`` that setuptools removes at its end; each is placed on the wall clock
by
  its file's mtime (= the end of its last job).
* **Their origin.**  The build's sccache server logs every compile to ``logs/<variant>/sccache.log`` (module
  ``sccache::compiler::compiler`` at debug level, set by build_farm.trace_log_env): ``[<output's file name>]:
  Cache hit``,
  ``Attempting distributed compilation`` and ``falling back to local``.  A job is ``cache``, ``remote``,
  ``local`` (compiled here; ``local-fallback`` when the farm failed it) or ``other`` (a link, a custom
command).
* **The trace.**  Chrome's trace event format (``{"traceEvents": [...]}``, ``ph: "X"`` complete events, times
in
  microseconds), which Perfetto and ``chrome://tracing`` open: one process per ninja log, one lane (tid) per
job
  slot, each event's ``cat`` its origin.
* **The critical path.**  ``ninja -t graph`` gives each output's inputs; from the job that ended last, step to
  the input job that ended last, until a job with no built input: the chain that set the build's length.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from vllm_harness.core import procs, writer

MAX_LOG_BYTES = 64 * 2**20  # a ninja log or sccache log read at most this much (its tail)


ORIGINS = ("remote", "local", "local-fallback", "cache", "other")


@dataclass
class Job:
    start_ms: int
    end_ms: int
    outputs: list[str]
    cmdhash: str = ""
    origin: str = "other"
    run: int = 0  # which ninja log (process in the trace)

    @property
    def name(self) -> str:
        return self.outputs[0]

    @property
    def seconds(self) -> float:
        return (self.end_ms - self.start_ms) / 1000


def _tail(path: Path, limit: int = MAX_LOG_BYTES) -> str:
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(0, size - limit))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def parse_ninja_log(text: str) -> list[Job]:
    """The jobs of the last ninja run in a ``.ninja_log``: one per command (outputs of one edge merged)."""
    rows: list[tuple[int, int, str, str]] = []
    last_end = -1
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) < 5:
            continue
        try:
            start, end = int(parts[0]), int(parts[1])
        except ValueError:
            continue
        if end < last_end:
            rows = []  # lines come in the order jobs end: an earlier end is a new ninja run (its clock at 0)
        rows.append((start, end, parts[3], parts[4]))
        last_end = end
    latest: dict[str, tuple[int, int, str, str]] = {}
    for r in rows:
        latest[r[2]] = r  # an output built twice: the later line wins
    jobs: dict[tuple[int, int, str], Job] = {}
    for start, end, out, h in latest.values():
        key = (start, end, h)
        if key in jobs:
            jobs[key].outputs.append(out)
        else:
            jobs[key] = Job(start, end, [out], h)
    return sorted(jobs.values(), key=lambda j: (j.start_ms, j.end_ms))


_LINE = re.compile(
    r"\[([^\]\n]+)\]: (get_cached_or_compile|Cache hit|Attempting distributed compilation|Could not "
    r"perform distributed compile, falling back to local|Compiled in)"
)


def origins_from_sccache_log(text: str) -> dict[str, list[str]]:
    """output file name (sccache names a compile by its ``-o``'s) -> the origin of each of its compiles, in
    the
    order they ended: ``cache``, ``remote``, ``local-fallback`` (the farm failed it), ``local``.  A request
    opens
    with ``get_cached_or_compile``; one inside another of the same name (nvcc's host phase inside the nvcc
    driver, which itself runs here) is the outer one's: ``remote`` when the inner one ran remote."""
    stacks: dict[str, list[dict]] = {}
    out: dict[str, list[str]] = {}

    def close(name: str, origin: str) -> None:
        stack = stacks.setdefault(name, [])
        frame = stack.pop() if stack else {"kids": []}
        kids = frame.get("kids") or []
        if kids:
            origin = "remote" if "remote" in kids else kids[-1]
        if stack:
            stack[-1].setdefault("kids", []).append(origin)
        else:
            out.setdefault(name, []).append(origin)

    for m in _LINE.finditer(text):
        name, what = m.group(1), m.group(2)
        stack = stacks.setdefault(name, [])
        if what == "get_cached_or_compile":
            stack.append({"kids": []})
            continue
        if not stack:
            stack.append({"kids": []})
        top = stack[-1]
        if what == "Attempting distributed compilation":
            top["tried"] = True
        elif what.startswith("Could not perform"):
            top["fallback"] = True
        elif what == "Cache hit":
            close(name, "cache")
        else:
            close(
                name, "local-fallback" if top.get("fallback") else "remote" if top.get("tried") else "local"
            )
    return out


def _assign_origins(runs: list[list[Job]], origins: dict[str, list[str]]) -> None:
    """Each job (all runs in time order, each run's jobs in the order they ended) takes the next origin of its
    output's file name: a name compiled in two passes (an editable build, then the wheel) gets each its
    own."""
    used: dict[str, int] = {}
    for jobs in runs:
        for j in sorted(jobs, key=lambda j: j.end_ms):
            for out in j.outputs:
                name = next((n for n in (out, os.path.basename(out)) if n in origins), None)
                if name is None:
                    continue
                i = used.get(name, 0)
                seq = origins[name]
                j.origin = seq[min(i, len(seq) - 1)]
                used[name] = i + 1
                break


_NODE = re.compile(r'^"(0x[0-9a-f]+)" \[label="((?:[^"\\]|\\.)*)"(, shape=ellipse)?\]')
_EDGE = re.compile(r'^"(0x[0-9a-f]+)" -> "(0x[0-9a-f]+)"')


def parse_graph(dot: str) -> dict[str, set[str]]:
    """``ninja -t graph`` (Graphviz dot) -> file -> the files it is made from (through the build edges)."""
    label: dict[str, str] = {}
    edge_nodes: set[str] = set()
    into: dict[str, set[str]] = {}
    for line in dot.splitlines():
        if m := _NODE.match(line):
            label[m.group(1)] = m.group(2)
            if m.group(3):
                edge_nodes.add(m.group(1))
        elif m := _EDGE.match(line):
            into.setdefault(m.group(2), set()).add(m.group(1))
    preds: dict[str, set[str]] = {}
    for node, srcs in into.items():
        if node in edge_nodes:
            continue
        files: set[str] = set()
        for s in srcs:
            files.update(into.get(s, set()) if s in edge_nodes else {s})
        preds[label.get(node, node)] = {label.get(f, f) for f in files if f not in edge_nodes}
    return preds


def critical_path(jobs: list[Job], preds: dict[str, set[str]]) -> list[Job]:
    """From the job that ended last, back through the input job that ended last (outputs not in the log, such
    as phony targets and sources, are looked through), to a job with no built input."""
    if not jobs:
        return []
    by_out = {o: j for j in jobs for o in j.outputs}

    def built_inputs(j: Job) -> set[int]:
        found: set[int] = set()
        todo = [p for o in j.outputs for p in preds.get(o, ())]
        seen: set[str] = set()
        while todo:
            f = todo.pop()
            if f in seen:
                continue
            seen.add(f)
            if f in by_out and by_out[f] is not j:
                found.add(id(by_out[f]))
            else:
                todo.extend(preds.get(f, ()))
        return found

    ids = {id(j): j for j in jobs}
    cur = max(jobs, key=lambda j: j.end_ms)
    path = [cur]
    while True:
        before = [
            ids[i] for i in built_inputs(cur) if ids[i].end_ms <= cur.start_ms + 1 and ids[i] not in path
        ]
        if not before:
            break
        cur = max(before, key=lambda j: j.end_ms)
        path.append(cur)
    return list(reversed(path))


def _lanes(jobs: list[Job]) -> list[int]:
    """A lane (tid) per job: the first lane free at its start, as a job slot of ninja."""
    free_at: list[int] = []
    out = []
    for j in jobs:
        for i, t in enumerate(free_at):
            if t <= j.start_ms:
                free_at[i] = j.end_ms
                out.append(i + 1)
                break
        else:
            free_at.append(j.end_ms)
            out.append(len(free_at))
    return out


def chrome_trace(runs: list[tuple[str, float, list[Job]]]) -> dict:
    """``runs``: (name, wall-clock start in s, jobs) per ninja log -> the trace event document."""
    t0 = min((start for _n, start, _j in runs), default=0.0)
    events: list[dict] = []
    for pid, (name, start, jobs) in enumerate(runs, 1):
        events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}})
        base = (start - t0) * 1e6
        for j, tid in zip(jobs, _lanes(jobs), strict=True):
            events.append(
                {
                    "name": j.name,
                    "cat": j.origin,
                    "ph": "X",
                    "pid": pid,
                    "tid": tid,
                    "ts": round(base + j.start_ms * 1000),
                    "dur": max(1, (j.end_ms - j.start_ms) * 1000),
                    "args": {"origin": j.origin, "outputs": j.outputs},
                }
            )
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"source": ".ninja_log", "origins": list(ORIGINS)},
    }


def find_ninja_logs(roots: list[Path], since: float) -> list[Path]:
    """``.ninja_log`` files under ``roots`` written at or after ``since`` (epoch seconds), oldest first."""
    found = []
    for root in roots:
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d not in (".git", "node_modules", "__pycache__", ".deps")]
            if ".ninja_log" in files:
                p = Path(dirpath) / ".ninja_log"
                try:
                    if p.stat().st_mtime >= since - 1:
                        found.append(p)
                except OSError:
                    continue
    return sorted(set(found), key=lambda p: p.stat().st_mtime)


def ninja_graph(build_dir: Path, env: dict[str, str] | None = None) -> dict[str, set[str]]:
    """The dependency graph of a ninja build folder (empty when ninja or its build.ninja is not there)."""
    if not (build_dir / "build.ninja").is_file():
        return {}
    try:
        r = procs.run(
            ["ninja", "-C", str(build_dir), "-t", "graph"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    return parse_graph(r.stdout) if r.returncode == 0 else {}


def _cmake_home(build_dir: Path) -> str:
    try:
        with open(build_dir / "CMakeCache.txt", errors="replace") as fh:
            for line in fh:
                if line.startswith("CMAKE_HOME_DIRECTORY:"):
                    return line.split("=", 1)[1].strip()
    except OSError:
        pass
    return ""


class NinjaLogKeeper:
    """Keeps the ``.ninja_log`` (and ``ninja -t graph``) of this build's CMake folders while the build runs:
    an
    editable install builds in a temporary ``/tmp/tmpXXXX.build-temp`` that setuptools removes when it is
    done,
    and that is the pass that compiles.  Every ``interval`` seconds: ``<src>/build/**`` (two levels) and the
    temporary folder's ``*.build-temp``, each taken only when its ``CMakeCache.txt`` names ``src`` as the
    source (another build's folder in /tmp is not ours) and its log was written since the build began.  Each
    log found is also hard-linked into ``keep_dir`` (ninja appends to the same file, so the link sees every
    line
    up to the last, even after setuptools removed the folder); on another file system it is copied each
    poll."""

    def __init__(
        self,
        src: Path,
        since: float,
        env: dict[str, str] | None = None,
        interval: float = 0.5,
        keep_dir: Path | None = None,
    ):
        self.src, self.since, self.env, self.interval = src, since, env, interval
        self.kept: dict[str, tuple[str, float]] = {}  # folder -> (log text, mtime)
        self.links: dict[str, Path] = {}  # folder -> its hard link in keep_dir
        self.keep_dir = keep_dir
        if keep_dir is not None:
            shutil.rmtree(keep_dir, ignore_errors=True)  # the links of an earlier build
        self.graphs: dict[str, dict[str, set[str]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ninja-log-keeper", daemon=True)
        tmp = (env or {}).get("TMPDIR") or tempfile.gettempdir()
        self._patterns = [
            str(src / "build" / ".ninja_log"),
            str(src / "build" / "*" / ".ninja_log"),
            str(src / "build" / "*" / "*" / ".ninja_log"),
            str(Path(tmp) / "*.build-temp" / ".ninja_log"),
        ]

    def __enter__(self) -> NinjaLogKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.poll()
        for d, link in self.links.items():  # the whole log, its folder gone or not
            try:
                text = _tail(link)
                if text:
                    self.kept[d] = (text, link.stat().st_mtime)
            except OSError:
                continue

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # keeping the trace must never break a build
                pass

    def _link(self, d: str, log: str) -> None:
        if self.keep_dir is None:
            return
        try:
            self.keep_dir.mkdir(parents=True, exist_ok=True)
            link = self.keep_dir / f"{len(self.links) + 1}.ninja_log"
            os.link(log, link)
            self.links[d] = link
        except OSError:  # another file system: the copies of each poll are what there is
            pass

    def poll(self) -> None:
        src = os.path.realpath(self.src)
        for pattern in self._patterns:
            for log in glob.glob(pattern):
                d = os.path.dirname(log)
                try:
                    mtime = os.stat(log).st_mtime
                except OSError:
                    continue
                if mtime < self.since - 1 or (d in self.kept and self.kept[d][1] == mtime):
                    continue
                if d not in self.links:
                    home = _cmake_home(Path(d))
                    if not home or os.path.realpath(home) != src:
                        continue
                    self._link(d, log)
                text = _tail(Path(log))
                if text:
                    self.kept[d] = (text, mtime)
                if d not in self.graphs:
                    self.graphs[d] = ninja_graph(Path(d), self.env)


@dataclass
class TraceSummary:
    path: Path | None = None
    jobs: int = 0
    origins: dict[str, int] = field(default_factory=dict)
    slowest: list[dict] = field(default_factory=list)
    critical: list[dict] = field(default_factory=list)
    critical_seconds: float = 0.0
    note: str = ""

    def to_dict(self) -> dict:
        return {
            "trace": str(self.path) if self.path else None,
            "jobs": self.jobs,
            "origins": self.origins,
            "slowest": self.slowest,
            "critical_path": {"seconds": self.critical_seconds, "jobs": self.critical},
            "note": self.note,
        }


def _short(name: str) -> str:
    return re.sub(r"^CMakeFiles/[^/]+\.dir/", "", name)


def write_trace(
    out: Path,
    roots: list[Path],
    since: float,
    sccache_log: Path | None = None,
    env: dict[str, str] | None = None,
    top: int = 5,
    keeper: NinjaLogKeeper | None = None,
) -> TraceSummary:
    """Write ``out`` (the Chrome trace) from the ninja logs under ``roots`` since ``since`` and those
    ``keeper``
    kept; the summary names the slowest compiles and the critical path.  No ninja log: no file, and the
    summary says why."""
    found: dict[str, tuple[str, float]] = dict(keeper.kept) if keeper else {}
    for log in find_ninja_logs(roots, since):
        try:
            found[str(log.parent)] = (_tail(log), log.stat().st_mtime)
        except OSError:
            continue
    if not found:
        return TraceSummary(
            note="no .ninja_log written by this build (not a ninja build, or its folder is gone)"
        )
    origins = origins_from_sccache_log(_tail(sccache_log)) if sccache_log else {}
    runs: list[tuple[str, float, list[Job]]] = []
    crit: list[Job] = []
    for i, (folder, (text, mtime)) in enumerate(sorted(found.items(), key=lambda kv: kv[1][1]), 1):
        jobs = parse_ninja_log(text)
        if not jobs:
            continue
        for j in jobs:
            j.run = i
        start = mtime - max(j.end_ms for j in jobs) / 1000
        runs.append((folder, start, jobs))
    _assign_origins([jobs for _f, _s, jobs in sorted(runs, key=lambda r: r[1])], origins)
    for folder, _start, jobs in runs:
        graph = keeper.graphs.get(folder) if keeper and folder in keeper.graphs else None
        path = critical_path(jobs, graph if graph is not None else ninja_graph(Path(folder), env))
        if sum(j.seconds for j in path) > sum(j.seconds for j in crit):
            crit = path
    every = [j for _n, _s, jobs in runs for j in jobs]
    s = TraceSummary(jobs=len(every))
    for j in every:
        s.origins[j.origin] = s.origins.get(j.origin, 0) + 1
    if not every:
        s.note = "the ninja logs of this build hold no job"
        return s
    writer.write_file(out, json.dumps(chrome_trace(runs)), what="The build's trace", force=True)
    s.path = out
    s.slowest = [
        {"output": j.name, "seconds": round(j.seconds, 2), "origin": j.origin}
        for j in sorted(every, key=lambda j: -j.seconds)[:top]
    ]
    s.critical = [{"output": j.name, "seconds": round(j.seconds, 2), "origin": j.origin} for j in crit]
    s.critical_seconds = round(sum(j.seconds for j in crit), 2)
    slow = ", ".join(f"{_short(d['output'])} {d['seconds']:.1f}s ({d['origin']})" for d in s.slowest[:3])
    chain = " -> ".join(_short(d["output"]) for d in s.critical)
    s.note = (
        f"trace {out.name}: {s.jobs} jobs ({', '.join(f'{v} {k}' for k, v in sorted(s.origins.items()))}); "
        f"slowest: {slow}; critical path {s.critical_seconds:.1f}s: {chain}"
    )
    return s
