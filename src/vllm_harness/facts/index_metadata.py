"""Facts the packages publish about themselves, read from the package index (issue 16).

``refresh()`` reads, for every final release of vLLM, torch and xformers, the core metadata of one Linux
wheel PER PLATFORM it has Linux wheels for (x86_64, aarch64; issue 28) -- the file's PEP 658/714 ``.metadata``
when the index offers it, else the wheel's ``*.dist-info/METADATA`` through HTTP range requests on the zip's
central directory (what uv and pip do when there is no ``.metadata``); a wheel is never downloaded whole.
Requires-Dist markers are evaluated with that platform's marker environment (``platform_machine``).  A
release's top-level facts are its x86_64 wheel's; ``platform.<arch>`` holds, per platform, the glibc floor and
platform tags of its wheels and, for aarch64, what that wheel's metadata says (torch's PyPI CUDA, ``"cpu"``
where no CUDA runtime requirement applies; pins only where they differ from x86_64).  From the metadata:

* vLLM: the ``==`` pins of torch / torchvision / torchaudio / xformers / flashinfer-python, Requires-Python,
  the tags of its wheels and whether an sdist exists;
* torch: the CUDA of PyPI's build (``cuda-toolkit==13.0.2`` / ``nvidia-cuda-runtime-cu12==12.8.90``),
  the Python range (Requires-Python and the CPython tags of its Linux wheels) and, when the PyTorch index is
  reachable, the CUDA variants it serves;
* xformers: its torch pin.

The result is written to ``data/compat.lock.toml`` (``source = "index-metadata"``) beside the hand-kept
``data/compat.toml``; ``compat.load()`` merges the two.  The write is idempotent: nothing new, no byte
changed.  Index pages are cached with their ETag, metadata by the file's sha256, under the state folder's
``cache/index/``.  An unreachable or broken index changes nothing and names the URL; a malformed metadata
file is skipped with its name.

Every read goes through ``core.fetcher`` (issue 26): a deadline per request and per refresh, a request budget,
size caps (decompressed too; METADATA in a zip by its stored and inflated size), http/https links only.  Every
value is checked before it can reach the lock: an index entry whose file name, version, URL or hash is not
well-formed, or a release whose facts are not, is skipped with a note (``skipped``) and never written.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import (
    InvalidWheelFilename,
    canonicalize_name,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from vllm_harness.core import writer
from vllm_harness.core.errors import UsageError
from vllm_harness.core.safeio import tomllib  # the one TOML shim (tomli on 3.10)
from vllm_harness.facts.package_index import (
    SIMPLE_JSON,
    FetchError,
    Http,
    IndexFile,
    Meta,
    MetadataError,
    Release,
    dist_name_version,
    fetch_metadata,
    file_problem,
    group_releases,
    linux_x86_64,
    parse_metadata,
    parse_simple_html,
    parse_simple_json,
    pick_wheel,
    platform_tags,
    python_tags,
    read_project,
)

DEFAULT_INDEX = "https://pypi.org/simple"
PYTORCH_INDEX = "https://download.pytorch.org/whl"
LOCK_PATH = Path(__file__).resolve().parent.parent / "data" / "compat.lock.toml"
PROJECTS = ("vllm", "torch", "xformers")
# A cold refresh (2026-12-07: 96 vLLM, 52 torch, 36 xformers releases; 260 metadata files, 76 of them aarch64
# wheels', a torch wheel's by 3 range requests) made 708 requests in 41 s: the limits leave room.
REFRESH_DEADLINE_S = 900.0
REFRESH_MAX_REQUESTS = 5000
VLLM_PINS = ("torch", "torchvision", "torchaudio", "xformers", "flashinfer-python")
# The Linux platforms a release's wheels are read for (x86_64 first: a release's top-level facts are its).
PLATFORMS = ("x86_64", "aarch64")
# Where the wheels run: Linux x86_64 (markers of Requires-Dist are evaluated so); marker_env(arch) for others.
MARKER_ENV = {"platform_system": "Linux", "platform_machine": "x86_64", "sys_platform": "linux",
              "os_name": "posix", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "python_version": "3.12",
              "python_full_version": "3.12.0", "extra": ""}


def marker_env(arch: str) -> dict[str, str]:
    """The marker environment of Linux ``arch`` (``platform_machine`` is what differs)."""
    return {**MARKER_ENV, "platform_machine": arch}


# ============================================================================ reading the metadata

def _applies(req: Requirement, env: dict[str, str] = MARKER_ENV) -> bool:
    if req.marker is None:
        return True
    try:
        return req.marker.evaluate(env)
    except Exception:  # an odd marker: keep the requirement
        return True


def _pin(req: Requirement) -> str | None:
    for s in req.specifier:
        if s.operator in ("==", "===") and "*" not in s.version:
            return s.version
    return None


def _spec_str(spec: str) -> str:
    """'<3.15,>=3.11' -> '>=3.11,<3.15' (lower bounds first, as the hand file writes them)."""
    items = [str(s) for s in SpecifierSet(spec)]
    return ",".join(sorted(items, key=lambda s: (0 if s.startswith(">") else 1 if s.startswith("=") else 2,
                                                 s)))


def torch_cuda(reqs: Iterable[Requirement], env: dict[str, str] = MARKER_ENV) -> tuple[str | None, str]:
    """The CUDA of a torch wheel from its runtime requirements that apply in ``env``: (major.minor or None,
    the requirement)."""
    for r in reqs:
        if not _applies(r, env):
            continue
        name = canonicalize_name(r.name)
        pin = _pin(r) or _lower(r)
        if pin is None:
            continue
        if name == "cuda-toolkit" or re.fullmatch(r"nvidia-cuda-runtime(-cu\d+)?", name):
            v = Version(pin)
            return f"{v.major}.{v.minor}", str(r).split(";")[0].strip()
    return None, ""


def _lower(req: Requirement) -> str | None:
    for s in req.specifier:
        if s.operator in (">=", "~="):
            return s.version
    return None


def vllm_facts(meta: Meta, rel: Release, f: IndexFile, env: dict[str, str] = MARKER_ENV) -> dict:
    out: dict = {}
    if meta.requires_python:
        out["python"] = _spec_str(meta.requires_python)
    for r in meta.requires:
        n = canonicalize_name(r.name)
        key = "flashinfer" if n == "flashinfer-python" else n
        if n in VLLM_PINS and key not in out and _applies(r, env):
            if p := _pin(r):
                out[key] = p
            elif n == "torch" and str(r.specifier):
                out["torch_requires"] = _spec_str(str(r.specifier))
    out["wheels"] = sorted({f"{t.interpreter}-{t.abi}-{t.platform}" for _f, (_n, _v, _b, tags) in rel.wheels
                            for t in tags})
    out["sdist"] = rel.has_sdist
    out["metadata_from"] = f.filename
    return out


def torch_facts(meta: Meta, rel: Release, f: IndexFile, env: dict[str, str] = MARKER_ENV) -> dict:
    out: dict = {}
    tags = python_tags(rel, env["platform_machine"])
    spec = meta.requires_python
    if tags:
        top = max(int(t[3:]) for t in tags)
        lo = min(int(t[3:]) for t in tags)
        spec = f">=3.{lo},<3.{top + 1}"   # the CPython wheels there are (inside Requires-Python)
    if spec:
        out["python"] = _spec_str(spec)
    cuda, why = torch_cuda(meta.requires, env)
    if cuda:
        out["pypi_cuda"] = cuda
        out["pypi_cuda_from"] = why
    out["wheels"] = tags
    out["metadata_from"] = f.filename
    return out


def xformers_facts(meta: Meta, rel: Release, f: IndexFile, env: dict[str, str] = MARKER_ENV) -> dict:
    out: dict = {}
    for r in meta.requires:
        if canonicalize_name(r.name) == "torch" and _applies(r, env):
            if p := _pin(r):
                out["torch"] = p
            elif str(r.specifier):
                out["torch_requires"] = _spec_str(str(r.specifier))
            break
    if meta.requires_python:
        out["python"] = _spec_str(meta.requires_python)
    out["metadata_from"] = f.filename
    return out


EXTRACT: dict[str, Callable[[Meta, Release, IndexFile, dict[str, str]], dict]] = {
    "vllm": vllm_facts, "torch": torch_facts, "xformers": xformers_facts}
_PIN_KEYS = ("torch", "torch_requires", "torchvision", "torchaudio", "xformers", "flashinfer")


def platform_record(p: str, arch: str, rel: Release, base: dict, read: dict | None) -> dict:
    """What the lock says of release ``rel`` of ``p`` on Linux ``arch``: the glibc floor and platform tags of
    its wheels there; with ``read`` (the facts of that platform's wheel, for a platform other than x86_64,
    whose facts ``base`` are the release's own) what differs from ``base`` -- torch's PyPI CUDA always
    (``"cpu"``: no CUDA runtime requirement applies there), a pin ``base`` has and this wheel lacks in
    ``unpinned`` -- and the file read."""
    glibc, tags = platform_tags(rel, arch)
    out: dict = {"glibc": glibc} if glibc else {}
    out["tags"] = tags
    if read is None:
        return out
    for k, v in read.items():
        if k not in ("wheels", "sdist", "pypi_cuda", "pypi_cuda_from") and base.get(k) != v:
            out[k] = v
    if p == "torch":
        out["pypi_cuda"] = read.get("pypi_cuda", "cpu")
        if "pypi_cuda_from" in read:
            out["pypi_cuda_from"] = read["pypi_cuda_from"]
    unpinned = [k for k in _PIN_KEYS if k in base and k not in read]
    if unpinned:
        out["unpinned"] = unpinned
    out["metadata_from"] = read["metadata_from"]
    return out


# ================================================================================ the PyTorch index

def pytorch_cuda_variants(http: Http, index: str) -> dict[str, list[str]]:
    """{torch public version: ['11.8', '12.4', ...]} from the PyTorch index's torch page (local tags
    +cuXYZ)."""
    url = f"{index.rstrip('/')}/torch/"
    body, ctype = http.page(url, f"{SIMPLE_JSON}, text/html;q=0.1")
    try:
        files = parse_simple_json(body, url) if "json" in ctype else parse_simple_html(body, url)
    except ValueError as e:
        raise FetchError(url, f"broken index page ({e})") from None
    out: dict[str, set[str]] = {}
    for f in files:
        if not f.filename.endswith(".whl") or dist_name_version(f.filename) is None:
            continue   # only the file name is read here: it must be one packaging parses, within the caps
        try:
            _n, v, _b, tags = parse_wheel_filename(f.filename)
        except (InvalidWheelFilename, InvalidVersion, ValueError):
            continue
        m = re.fullmatch(r"cu(\d+)(\d)", v.local or "")
        if m and linux_x86_64(tags) and not v.is_prerelease and not v.is_devrelease:
            out.setdefault(v.public, set()).add(f"{int(m.group(1))}.{m.group(2)}")
    if not out:
        raise FetchError(url, "broken index page (no torch-X+cuXYZ wheels listed)")
    return {k: sorted(s, key=Version) for k, s in out.items()}


# ========================================================================================= refresh

@dataclass
class RefreshResult:
    path: Path
    changed: bool
    counts: dict[str, int]
    skipped: list[str]                 # 'file: why' of metadata that could not be used
    notes: list[str]                   # e.g. the PyTorch index was unreachable
    seconds: float = 0.0
    requests: int = 0
    cache_hits: int = 0
    generated: str = ""

    def to_dict(self) -> dict:
        return {"path": str(self.path), "changed": self.changed, "counts": self.counts,
                "skipped": self.skipped, "notes": self.notes, "seconds": round(self.seconds, 2),
                "requests": self.requests, "cache_hits": self.cache_hits, "generated": self.generated}


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)


def refresh(out_path: Path = LOCK_PATH, index: str = DEFAULT_INDEX, pytorch_index: str | None = PYTORCH_INDEX,
            cache_dir: Path | None = None, workers: int = 16, progress: bool = False,
            today: str | None = None, timeout: float = 20.0, deadline_s: float | None = REFRESH_DEADLINE_S,
            max_requests: int | None = REFRESH_MAX_REQUESTS) -> RefreshResult:
    """Read the index and (re)write ``out_path``, within ``deadline_s`` seconds and ``max_requests`` requests
    in all.  Raises ``UsageError`` naming the URL when the index cannot be read (the file is left as it was).
    Every value is checked before it can reach the file: a file entry or a release with one that is not
    well-formed is skipped with a note in ``skipped``, never written."""
    t0 = time.monotonic()
    http = Http(cache_dir, timeout=timeout, deadline_s=deadline_s, max_requests=max_requests)
    notes: list[str] = []
    skipped: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pages = {p: pool.submit(read_project, http, index, p) for p in PROJECTS}
        pt = pool.submit(pytorch_cuda_variants, http, pytorch_index) if pytorch_index else None
        releases: dict[str, list[Release]] = {}
        for p, fut in pages.items():
            try:
                releases[p] = group_releases(_usable(fut.result(), skipped), p)
            except FetchError as e:
                raise UsageError(f"compat refresh: cannot read the package index at {e.url} ({e.reason}); "
                                 f"{out_path.name} was not changed.",
                                 _fix(e, "Check the network or proxy (HTTPS_PROXY), or pass --index-url with "
                                      "a reachable mirror")) from None
        variants: dict[str, list[str]] | None = None
        if pt is not None:
            try:
                variants = pt.result()
            except FetchError as e:
                notes.append(f"PyTorch index not read: {e.url} ({e.reason}); torch's CUDA variants keep the "
                             "hand-kept data and the last refresh's")
        readings = _read_metadata(pool, http, _jobs(releases), out_path, skipped, progress)
    results = _assemble(readings)
    _add_variants(results, variants, _read_lock(out_path))
    body = render_lock(results, index=index, pytorch_read=variants is not None)
    changed, stamp = _write_lock(out_path, body, today or date.today().isoformat())
    if cache_dir is not None:
        try:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            (Path(cache_dir) / "last-refresh").write_text(today or date.today().isoformat())
        except OSError:
            pass
    counts = {p: sum(1 for (q, _v) in results if q == p) for p in PROJECTS}
    return RefreshResult(out_path, changed, counts, sorted(skipped), notes, time.monotonic() - t0,
                         http.requests, http.cache_hits, stamp)


Job = tuple[str, Release, IndexFile, str]   # (project, release, the wheel read, its platform)


def _jobs(releases: dict[str, list[Release]]) -> list[Job]:
    """One wheel per release and Linux platform it has wheels for (a pure wheel stands for every platform)."""
    jobs: list[Job] = []
    for p, rels in releases.items():
        for rel in rels:
            f = pick_wheel(rel)
            if f is None:
                continue
            jobs.append((p, rel, f, PLATFORMS[0]))
            if not f.filename.endswith("-any.whl"):
                jobs += [(p, rel, g, arch) for arch in PLATFORMS[1:]
                         if (g := pick_wheel(rel, arch)) is not None]
    return jobs


def _read_metadata(pool: ThreadPoolExecutor, http: Http, jobs: list[Job], out_path: Path, skipped: list[str],
                   progress: bool) -> list[tuple[Job, dict]]:
    """The facts of every job's wheel (a malformed one noted in ``skipped``); a failed read stops it all."""
    def work(job: Job):
        p, rel, f, arch = job
        try:
            meta = parse_metadata(fetch_metadata(http, f), p, rel.version)
            facts = EXTRACT[p](meta, rel, f, marker_env(arch))
        except (MetadataError, ValueError) as e:   # ValueError: e.g. a pin that is not a version
            return job, None, f"{f.filename}: {_printable(str(e))}"
        why = facts_problem(facts)
        return job, (None if why else facts), (f"{f.filename}: {why}" if why else None)

    out: list[tuple[Job, dict]] = []
    with _progress(progress) as bar:
        task = bar.add_task("index metadata", total=len(jobs))
        for job, facts, err in pool.map(_guard(work), jobs):
            bar.advance(task)
            if isinstance(err, FetchError) and err.status in (404, 410):   # a listed file that is not there
                skipped.append(f"{job[2].filename}: {err.reason}")            # the index answers: skip it
                continue
            if isinstance(err, FetchError):
                raise UsageError(f"compat refresh: cannot read {err.url} ({err.reason}); {out_path.name} was "
                                 "not changed.",
                                 _fix(err, "Check the network or proxy, or pass --index-url with a reachable "
                                      "mirror"))
            if err:
                skipped.append(err)
            else:
                out.append((job, facts))
    return out


def _assemble(readings: list[tuple[Job, dict]]) -> dict[tuple[str, str], dict]:
    """{(project, version): the x86_64 wheel's facts, with ``platform`` = {arch: :func:`platform_record`}}; a
    release whose x86_64 wheel gave nothing usable is not written (as before platforms were read)."""
    results: dict[tuple[str, str], dict] = {}
    rels: dict[tuple[str, str], Release] = {}
    for (p, rel, _f, arch), facts in readings:
        if arch == PLATFORMS[0]:
            results[(p, str(rel.version))] = facts
            rels[(p, str(rel.version))] = rel
    for (p, rel, _f, arch), facts in readings:
        base = results.get((p, str(rel.version)))
        if arch != PLATFORMS[0] and base is not None:
            base.setdefault("platform", {})[arch] = platform_record(p, arch, rel, base, facts)
    for (p, v), facts in results.items():
        x86 = platform_record(p, PLATFORMS[0], rels[(p, v)], facts, None)
        plats = {PLATFORMS[0]: x86} if x86["tags"] else {}
        plats.update(facts.pop("platform", {}))
        if plats and facts_problem({"platform": plats}) is None:   # from checked facts and file names
            facts["platform"] = plats
    return results


def _add_variants(results: dict[tuple[str, str], dict], variants: dict[str, list[str]] | None,
                  old: dict) -> None:
    """torch's CUDA variants: the PyTorch index's when it was read, else the last refresh's (checked)."""
    for (p, v), facts in results.items():
        if p != "torch":
            continue
        if variants is not None:
            if v in variants:
                facts["cuda_variants"] = variants[v]
            continue
        prev = (old.get("torch") or {}).get(v) if isinstance(old.get("torch"), dict) else None
        kept = prev.get("cuda_variants") if isinstance(prev, dict) else None
        if isinstance(kept, list) and all(isinstance(c, str) and _CUDA.fullmatch(c) for c in kept):
            facts["cuda_variants"] = kept


def _write_lock(out_path: Path, body: str, stamp: str) -> tuple[bool, str]:
    """(changed, the lock's date): written only when a byte other than the date changes."""
    old_text = out_path.read_text(encoding="utf-8") if out_path.is_file() else ""
    if _strip_generated(old_text) != _strip_generated(_with_header(body, stamp)):
        # core.writer: atomic, never through a link, only over a lock it wrote (its GENERATED line) or --force
        writer.write_file(out_path, _with_header(body, stamp), what="compat data",
                          marker=LOCK_HEADER.splitlines()[0].encode(),
                          fix="Give a new --out FILE, or pass --force to replace it.")
        return True, stamp
    m = re.search(r'^generated = "([^"]*)"', old_text, re.M)
    return False, (m.group(1) if m else stamp)


def _fix(e: FetchError, network_fix: str) -> str:
    """The fix of a refresh that stopped at ``e``: the fetcher's own for a deadline, a budget, a size or a
    refused URL; the network's otherwise."""
    fix = e.fix if e.kind in ("deadline", "budget", "too-large", "scheme", "url") else network_fix
    return fix.rstrip(".") + "; until then the last data stays in use."


def _printable(text: str, limit: int = 200) -> str:
    """``text`` for a note: control characters escaped, at most ``limit`` characters."""
    out = text if text.isprintable() else ascii(text)[1:-1]
    return out if len(out) <= limit else out[:limit] + "..."


def _usable(files: list[IndexFile], skipped: list[str]) -> list[IndexFile]:
    """The file entries whose every value may be used; the others noted in ``skipped`` (never written)."""
    out = []
    for f in files:
        why = file_problem(f)
        if why is None:
            out.append(f)
        else:
            skipped.append(f"{_printable(f.filename, 120)}: index entry not used, {why}")
    return out


_CUDA = re.compile(r"\d{1,2}\.\d{1,2}")
_VERSION_KEYS = ("torch", "torchvision", "torchaudio", "xformers", "flashinfer")


def facts_problem(facts: dict, arch: str | None = None) -> str | None:
    """Why a release's facts may not be written (None: they may): every string printable and at most 300
    characters, the pins versions packaging parses (at most 64 characters), the CUDA a major.minor (or "cpu"
    for a platform's), the glibc a major.minor, ``platform`` a table of the platforms read."""
    for k, v in facts.items():
        if k == "platform" and arch is None and isinstance(v, dict):
            for a, sub in v.items():
                ok = a in PLATFORMS and isinstance(sub, dict)
                why = facts_problem(sub, a) if ok else "not a platform the refresh reads"
                if why:
                    return f"platform.{_printable(str(a), 40)}: {why}"
            continue
        for item in v if isinstance(v, list) else [v]:
            if isinstance(item, bool):
                continue
            if not isinstance(item, str) or len(item) > 300 or not item.isprintable():
                return f"{k} = {_printable(repr(item), 80)} is not a value the lock may hold"
        if k in _VERSION_KEYS:
            try:
                if len(v) > 64:
                    raise InvalidVersion(v)
                Version(v)
            except (InvalidVersion, ValueError):
                return f"{k} = {_printable(repr(v), 80)} is not a version"
        if k in ("pypi_cuda", "glibc") and not _CUDA.fullmatch(v) and (k, v) != ("pypi_cuda", arch and "cpu"):
            return f"{k} = {_printable(repr(v), 80)} is not a major.minor"
    return None


def _guard(work):
    def run(job):
        try:
            return work(job)
        except FetchError as e:
            return job, None, e
    return run


def _read_lock(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# ======================================================================================== writing

def _q(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)   # a TOML basic string for the values we write


def _val(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_val(x) for x in v) + "]"
    return _q(str(v))


_KEY_ORDER = ("python", "torch", "torch_requires", "torchvision", "torchaudio", "xformers", "flashinfer",
              "unpinned", "pypi_cuda", "pypi_cuda_from", "cuda_variants", "sdist", "glibc", "tags", "wheels",
              "metadata_from")


def _keys(facts: dict) -> list[str]:
    return sorted(facts, key=lambda k: (_KEY_ORDER.index(k) if k in _KEY_ORDER else 99, k))


def render_lock(results: dict[tuple[str, str], dict], index: str, pytorch_read: bool) -> str:
    lines = [f"index = {_q(index)}", f"pytorch_index_read = {_val(pytorch_read)}", ""]
    for p in PROJECTS:
        rows = sorted(((v, f) for (q, v), f in results.items() if q == p), key=lambda r: Version(r[0]))
        for v, facts in rows:
            lines.append(f"[{p}.{_q(v)}]")
            lines += [f"{k} = {_val(facts[k])}" for k in _keys(facts) if k != "platform"]
            plats = facts.get("platform") or {}
            for arch in sorted(plats, key=PLATFORMS.index):   # dotted keys: [<p>."<v>".platform.<arch>]
                lines += [f"platform.{arch}.{k} = {_val(plats[arch][k])}" for k in _keys(plats[arch])]
            lines.append("")
    return "\n".join(lines)


LOCK_HEADER = (
    "# GENERATED by `invoke compat --refresh` (nox -s compat) from the package index's metadata: do not\n"
    "# edit.  Every value here has source \"index-metadata\"; the hand-kept facts (drivers, nvcc archs,\n"
    "# gcc limits, build archs) live in compat.toml beside it.  compat.load() merges the two.\n"
    "# A release's keys are read from its Linux x86_64 wheel; platform.<arch>.* per Linux platform it has\n"
    "# wheels for: glibc (the manylinux floor) and tags; for aarch64 also that wheel's own reading\n"
    "# (Requires-Dist markers evaluated for aarch64): torch's pypi_cuda (\"cpu\": no CUDA runtime\n"
    "# requirement applies), pins only where they differ from x86_64 (unpinned: x86_64's pins that wheel\n"
    "# does not require).\n"
    "schema = 2\n"
    "source = \"index-metadata\"\n")


def _with_header(body: str, stamp: str) -> str:
    return LOCK_HEADER + f"generated = {_q(stamp)}\n" + body


def _strip_generated(text: str) -> str:
    return re.sub(r'^generated = "[^"]*"\n', "", text, count=1, flags=re.M)


def last_refresh(cache_dir: Path | None) -> str | None:
    """The date of the last refresh that reached the index (the lock's date changes only with its data)."""
    if cache_dir is None:
        return None
    try:
        return (Path(cache_dir) / "last-refresh").read_text().strip() or None
    except OSError:
        return None
