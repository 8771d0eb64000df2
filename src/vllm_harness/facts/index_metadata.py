"""Facts the packages publish about themselves, read from the package index (issue 16).

``refresh()`` reads, for every final release of vLLM, torch and xformers, the core metadata of one Linux
x86_64 wheel -- the file's PEP 658/714 ``.metadata`` when the index offers it, else the wheel's
``*.dist-info/METADATA`` through HTTP range requests on the zip's central directory (what uv and pip do when
there is no ``.metadata``); a wheel is never downloaded whole.  From it:

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
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from email.parser import HeaderParser
from html.parser import HTMLParser
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from vllm_harness.core.errors import UsageError

DEFAULT_INDEX = "https://pypi.org/simple"
PYTORCH_INDEX = "https://download.pytorch.org/whl"
LOCK_PATH = Path(__file__).resolve().parent.parent / "data" / "compat.lock.toml"
PROJECTS = ("vllm", "torch", "xformers")
VLLM_PINS = ("torch", "torchvision", "torchaudio", "xformers", "flashinfer-python")
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
USER_AGENT = "vllm-harness-compat-refresh"
# Where the wheels run: the harness builds for Linux x86_64 (markers of Requires-Dist are evaluated so).
MARKER_ENV = {"platform_system": "Linux", "platform_machine": "x86_64", "sys_platform": "linux",
              "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython",
              "python_version": "3.12", "python_full_version": "3.12.0", "extra": ""}


class FetchError(Exception):
    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason


class MetadataError(Exception):
    """A metadata file that cannot be used (not parseable, wrong project or version)."""


# =========================================================================================== HTTP

class Http:
    """urllib with a timeout and an on-disk cache: pages by URL (revalidated with ETag / Last-Modified),
    metadata by the file's sha256 (immutable)."""

    def __init__(self, cache_dir: Path | None, timeout: float = 20.0):
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.timeout = timeout
        self.requests = 0
        self.cache_hits = 0

    def _open(self, url: str, headers: dict[str, str]):
        req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **headers})
        self.requests += 1
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)  # noqa: S310 (http(s) and file URLs only)
        except urllib.error.HTTPError as e:
            if e.code == 304:
                return e
            raise FetchError(url, f"HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise FetchError(url, f"unreachable ({reason})") from None

    def get(self, url: str, headers: dict[str, str] | None = None, tries: int = 3) -> tuple[int, dict[str, str], bytes]:
        """One GET; a transient failure (DNS, reset, 5xx) is tried again ``tries`` times in all."""
        for attempt in range(tries):
            try:
                r = self._open(url, dict(headers or {}))
                body = r.read()
                break
            except FetchError as e:
                if attempt + 1 == tries or re.match(r"HTTP 4\d\d", e.reason):
                    raise
            except OSError as e:
                if attempt + 1 == tries:
                    raise FetchError(url, f"connection broken ({e})") from None
            time.sleep(0.2 * (attempt + 1))
        status = getattr(r, "status", None) or r.getcode() or 200
        return status, {k.lower(): v for k, v in r.headers.items()}, body

    def _path(self, kind: str, key: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / kind / hashlib.sha256(key.encode()).hexdigest()[:32]

    def page(self, url: str, accept: str) -> tuple[bytes, str]:
        """A project page: (body, content type), revalidated against the cached copy."""
        p = self._path("pages", url)
        cached = None
        if p is not None and p.is_file():
            try:
                cached = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                cached = None
        headers = {"Accept": accept}
        if cached:
            if cached.get("etag"):
                headers["If-None-Match"] = cached["etag"]
            if cached.get("last_modified"):
                headers["If-Modified-Since"] = cached["last_modified"]
        status, h, body = self.get(url, headers)
        if status == 304 and cached:
            self.cache_hits += 1
            return cached["body"].encode("utf-8"), cached.get("content_type", "")
        ctype = h.get("content-type", "")
        if p is not None and (h.get("etag") or h.get("last-modified")):
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(".tmp")
            tmp.write_text(json.dumps({"etag": h.get("etag"), "last_modified": h.get("last-modified"),
                                       "content_type": ctype, "body": body.decode("utf-8", "replace")}),
                           encoding="utf-8")
            tmp.replace(p)
        return body, ctype

    def cached_metadata(self, key: str) -> str | None:
        p = self._path("metadata", key)
        if p is not None and p.is_file():
            self.cache_hits += 1
            return p.read_text(encoding="utf-8")
        return None

    def store_metadata(self, key: str, text: str) -> None:
        p = self._path("metadata", key)
        if p is not None:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(p.name + f".{id(text)}.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(p)


# ==================================================================================== index pages

@dataclass(frozen=True)
class IndexFile:
    filename: str
    url: str
    sha256: str | None
    requires_python: str | None
    core_metadata: bool
    yanked: bool


def parse_simple_json(body: bytes, page_url: str) -> list[IndexFile]:
    """PEP 691 project page -> its files (URLs made absolute against the page's URL)."""
    try:
        data = json.loads(body)
        files = data["files"]
    except (ValueError, KeyError, TypeError):
        raise ValueError("not a PEP 691 JSON project page (no 'files' list)") from None
    out = []
    for f in files:
        if not isinstance(f, dict) or "filename" not in f or "url" not in f:
            continue
        cm = f.get("core-metadata", f.get("dist-info-metadata", False))
        out.append(IndexFile(filename=f["filename"], url=urllib.parse.urljoin(page_url, f["url"]),
                             sha256=(f.get("hashes") or {}).get("sha256"),
                             requires_python=f.get("requires-python"), core_metadata=bool(cm),
                             yanked=bool(f.get("yanked"))))
    return out


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[tuple[dict, str]] = []
        self._a: dict | None = None
        self._text = ""

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._a, self._text = dict(attrs), ""

    def handle_data(self, data):
        if self._a is not None:
            self._text += data

    def handle_endtag(self, tag):
        if tag == "a" and self._a is not None:
            self.links.append((self._a, self._text.strip()))
            self._a = None


def parse_simple_html(body: bytes, page_url: str) -> list[IndexFile]:
    """PEP 503 project page (an index that does not serve JSON, e.g. the PyTorch index)."""
    p = _Links()
    p.feed(body.decode("utf-8", "replace"))
    out = []
    for attrs, text in p.links:
        href = attrs.get("href") or ""
        url, _, frag = href.partition("#")
        name = text or urllib.parse.unquote(url.rsplit("/", 1)[-1])
        sha = frag.split("=", 1)[1] if frag.startswith("sha256=") else None
        cm = attrs.get("data-core-metadata") or attrs.get("data-dist-info-metadata")
        out.append(IndexFile(filename=name, url=urllib.parse.urljoin(page_url, url), sha256=sha,
                             requires_python=attrs.get("data-requires-python"), core_metadata=bool(cm),
                             yanked="data-yanked" in attrs))
    return out


def read_project(http: Http, index: str, project: str) -> list[IndexFile]:
    url = f"{index.rstrip('/')}/{canonicalize_name(project)}/"
    body, ctype = http.page(url, f"{SIMPLE_JSON}, text/html;q=0.1")
    try:
        if "json" in ctype or body.lstrip().startswith(b"{"):
            return parse_simple_json(body, url)
        return parse_simple_html(body, url)
    except ValueError as e:
        raise FetchError(url, f"broken index page ({e})") from None


# ================================================================================= choosing files

@dataclass
class Release:
    version: Version
    files: list[IndexFile] = field(default_factory=list)

    @property
    def wheels(self) -> list[tuple[IndexFile, tuple]]:
        out = []
        for f in self.files:
            if f.filename.endswith(".whl") and not f.yanked:
                try:
                    out.append((f, parse_wheel_filename(f.filename)))
                except InvalidWheelFilename:
                    continue
        return out

    @property
    def has_sdist(self) -> bool:
        return any(f.filename.endswith((".tar.gz", ".zip")) and not f.yanked for f in self.files)


def group_releases(files: Iterable[IndexFile], project: str) -> list[Release]:
    """Final releases (no pre/dev) with at least one file that is not yanked, oldest first."""
    by: dict[Version, Release] = {}
    want = canonicalize_name(project)
    for f in files:
        try:
            if f.filename.endswith(".whl"):
                name, v, _b, _t = parse_wheel_filename(f.filename)
            elif f.filename.endswith((".tar.gz", ".zip")):
                name, v = parse_sdist_filename(f.filename)
            else:
                continue
        except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):
            continue
        if name != want or v.is_prerelease or v.is_devrelease or v.local:
            continue
        by.setdefault(v, Release(v)).files.append(f)
    return [r for v, r in sorted(by.items()) if any(not f.yanked for f in r.files)]


def _linux_x86_64(tags) -> bool:
    return any(t.platform == "any" or (t.platform.endswith("x86_64") and "linux" in t.platform) for t in tags)


def pick_wheel(rel: Release) -> IndexFile | None:
    """The wheel whose metadata stands for the release on Linux x86_64: a linux x86_64 wheel (abi3/py3,
    else cp312, else the newest CPython without free-threading), the highest build tag; else py3-none-any."""
    best, best_key = None, None
    for f, (_n, _v, build, tags) in rel.wheels:
        if not _linux_x86_64(tags):
            continue
        interp = max((_interp_rank(t.interpreter, t.abi) for t in tags), default=(0, 0))
        plat = 1 if any(t.platform != "any" for t in tags) else 0
        key = (plat, interp, build or (0, ""), f.filename)
        if best_key is None or key > best_key:
            best, best_key = f, key
    return best


def _interp_rank(interp: str, abi: str) -> tuple[int, int]:
    if abi == "abi3" or interp.startswith("py"):
        return (3, 0)
    m = re.fullmatch(r"cp(\d)(\d+)", interp)
    if not m or abi.endswith("t"):
        return (0, 0)
    minor = int(m.group(2))
    return (2, 0) if minor == 12 else (1, minor)


def _python_tags(rel: Release) -> list[str]:
    out = set()
    for _f, (_n, _v, _b, tags) in rel.wheels:
        if _linux_x86_64(tags):
            out.update(t.interpreter for t in tags if re.fullmatch(r"cp3\d+", t.interpreter))
    return sorted(out, key=lambda s: int(s[3:]))


# ============================================================================ reading the metadata

def _ranged(http: Http, url: str, rng: str) -> tuple[bytes, int]:
    status, h, body = http.get(url, {"Range": f"bytes={rng}"})
    cr = h.get("content-range", "")
    if status != 206 or "/" not in cr:
        raise FetchError(url, "the server does not answer range requests (and offers no .metadata file); "
                         "reading the metadata would download the whole wheel")
    try:
        total = int(cr.rsplit("/", 1)[1])
    except ValueError:
        raise FetchError(url, f"bad Content-Range {cr!r}") from None
    return body, total


def metadata_from_zip(http: Http, url: str) -> str:
    """``*.dist-info/METADATA`` of a remote wheel through range requests: the end of central directory,
    the central directory, then that one member."""
    tail, total = _ranged(http, url, "-65536")
    i = tail.rfind(b"PK\x05\x06")
    if i < 0 or len(tail) < i + 22:
        raise MetadataError("no zip end-of-central-directory record")
    cd_size, cd_off = struct.unpack("<II", tail[i + 12:i + 20])
    if cd_off == 0xFFFFFFFF or cd_size == 0xFFFFFFFF:
        raise MetadataError("zip64 archive (not read)")
    base = total - len(tail)
    if cd_off >= base:
        cd = tail[cd_off - base:cd_off - base + cd_size]
    else:
        cd, _ = _ranged(http, url, f"{cd_off}-{cd_off + cd_size - 1}")
    p = 0
    while p + 46 <= len(cd):
        if cd[p:p + 4] != b"PK\x01\x02":
            raise MetadataError("corrupt zip central directory")
        method, = struct.unpack("<H", cd[p + 10:p + 12])
        csize, = struct.unpack("<I", cd[p + 20:p + 24])
        n, e, c = struct.unpack("<HHH", cd[p + 28:p + 34])
        off, = struct.unpack("<I", cd[p + 42:p + 46])
        name = cd[p + 46:p + 46 + n].decode("utf-8", "replace")
        p += 46 + n + e + c
        if re.fullmatch(r"[^/]+\.dist-info/METADATA", name):
            data, _ = _ranged(http, url, f"{off}-{min(total - 1, off + 30 + csize + 65535)}")
            if data[:4] != b"PK\x03\x04":
                raise MetadataError("corrupt zip local header")
            n2, e2 = struct.unpack("<HH", data[26:30])
            raw = data[30 + n2 + e2:30 + n2 + e2 + csize]
            try:
                out = zlib.decompress(raw, -15) if method == 8 else raw
            except zlib.error as exc:
                raise MetadataError(f"METADATA does not inflate ({exc})") from None
            return out.decode("utf-8", "replace")
    raise MetadataError("the wheel has no *.dist-info/METADATA")


def fetch_metadata(http: Http, f: IndexFile) -> str:
    """The core metadata text of one wheel (cached by the file's sha256)."""
    key = f.sha256 or f.url
    text = http.cached_metadata(key)
    if text is not None:
        return text
    if f.core_metadata:
        _s, _h, body = http.get(f.url + ".metadata")
        text = body.decode("utf-8", "replace")
    else:
        text = metadata_from_zip(http, f.url)
    http.store_metadata(key, text)
    return text


@dataclass(frozen=True)
class Meta:
    name: str
    version: Version
    requires_python: str | None
    requires: list[Requirement]


def parse_metadata(text: str, project: str, version: Version) -> Meta:
    msg = HeaderParser().parsestr(text)
    name, ver = msg.get("Name"), msg.get("Version")
    if not name or not ver:
        raise MetadataError("no Name/Version header")
    if canonicalize_name(name) != canonicalize_name(project):
        raise MetadataError(f"Name is {name!r}, not {project!r}")
    try:
        if Version(ver) != version:
            raise MetadataError(f"Version is {ver!r}, the file says {version}")
    except InvalidVersion:
        raise MetadataError(f"Version {ver!r} is not a version") from None
    rp = msg.get("Requires-Python")
    if rp is not None:
        try:
            SpecifierSet(rp)
        except InvalidSpecifier:
            raise MetadataError(f"Requires-Python {rp!r} is not a specifier") from None
    reqs = []
    for line in msg.get_all("Requires-Dist") or []:
        try:
            reqs.append(Requirement(line))
        except InvalidRequirement:
            raise MetadataError(f"Requires-Dist {line!r} is not a requirement") from None
    return Meta(name, version, rp.strip() if rp else None, reqs)


def _applies(req: Requirement) -> bool:
    if req.marker is None:
        return True
    try:
        return req.marker.evaluate(MARKER_ENV)
    except Exception:  # noqa: BLE001 - an odd marker: keep the requirement
        return True


def _pin(req: Requirement) -> str | None:
    for s in req.specifier:
        if s.operator in ("==", "===") and "*" not in s.version:
            return s.version
    return None


def _spec_str(spec: str) -> str:
    """'<3.15,>=3.11' -> '>=3.11,<3.15' (lower bounds first, as the hand file writes them)."""
    items = [str(s) for s in SpecifierSet(spec)]
    return ",".join(sorted(items, key=lambda s: (0 if s.startswith(">") else 1 if s.startswith("=") else 2, s)))


def torch_cuda(reqs: Iterable[Requirement]) -> tuple[str | None, str]:
    """The CUDA of a torch wheel from its runtime requirements: (major.minor or None, the requirement)."""
    for r in reqs:
        if not _applies(r):
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


def vllm_facts(meta: Meta, rel: Release, f: IndexFile) -> dict:
    out: dict = {}
    if meta.requires_python:
        out["python"] = _spec_str(meta.requires_python)
    for r in meta.requires:
        n = canonicalize_name(r.name)
        key = "flashinfer" if n == "flashinfer-python" else n
        if n in VLLM_PINS and key not in out and _applies(r):
            if p := _pin(r):
                out[key] = p
            elif n == "torch" and str(r.specifier):
                out["torch_requires"] = _spec_str(str(r.specifier))
    out["wheels"] = sorted({f"{t.interpreter}-{t.abi}-{t.platform}" for _f, (_n, _v, _b, tags) in rel.wheels
                            for t in tags})
    out["sdist"] = rel.has_sdist
    out["metadata_from"] = f.filename
    return out


def torch_facts(meta: Meta, rel: Release, f: IndexFile) -> dict:
    out: dict = {}
    tags = _python_tags(rel)
    spec = meta.requires_python
    if tags:
        top = max(int(t[3:]) for t in tags)
        lo = min(int(t[3:]) for t in tags)
        spec = f">=3.{lo},<3.{top + 1}"   # the CPython wheels there are (inside Requires-Python)
    if spec:
        out["python"] = _spec_str(spec)
    cuda, why = torch_cuda(meta.requires)
    if cuda:
        out["pypi_cuda"] = cuda
        out["pypi_cuda_from"] = why
    out["wheels"] = tags
    out["metadata_from"] = f.filename
    return out


def xformers_facts(meta: Meta, rel: Release, f: IndexFile) -> dict:
    out: dict = {}
    for r in meta.requires:
        if canonicalize_name(r.name) == "torch" and _applies(r):
            if p := _pin(r):
                out["torch"] = p
            elif str(r.specifier):
                out["torch_requires"] = _spec_str(str(r.specifier))
            break
    if meta.requires_python:
        out["python"] = _spec_str(meta.requires_python)
    out["metadata_from"] = f.filename
    return out


EXTRACT: dict[str, Callable[[Meta, Release, IndexFile], dict]] = {
    "vllm": vllm_facts, "torch": torch_facts, "xformers": xformers_facts}


# ================================================================================ the PyTorch index

def pytorch_cuda_variants(http: Http, index: str) -> dict[str, list[str]]:
    """{torch public version: ['11.8', '12.4', ...]} from the PyTorch index's torch page (local tags +cuXYZ)."""
    url = f"{index.rstrip('/')}/torch/"
    body, ctype = http.page(url, f"{SIMPLE_JSON}, text/html;q=0.1")
    files = parse_simple_json(body, url) if "json" in ctype else parse_simple_html(body, url)
    out: dict[str, set[str]] = {}
    for f in files:
        if not f.filename.endswith(".whl"):
            continue
        try:
            _n, v, _b, tags = parse_wheel_filename(f.filename)
        except (InvalidWheelFilename, InvalidVersion):
            continue
        m = re.fullmatch(r"cu(\d+)(\d)", v.local or "")
        if m and _linux_x86_64(tags) and not v.is_prerelease and not v.is_devrelease:
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
        return {"path": str(self.path), "changed": self.changed, "counts": self.counts, "skipped": self.skipped,
                "notes": self.notes, "seconds": round(self.seconds, 2), "requests": self.requests,
                "cache_hits": self.cache_hits, "generated": self.generated}


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)


def refresh(out_path: Path = LOCK_PATH, index: str = DEFAULT_INDEX, pytorch_index: str | None = PYTORCH_INDEX,
            cache_dir: Path | None = None, workers: int = 16, progress: bool = False, today: str | None = None,
            timeout: float = 20.0) -> RefreshResult:
    """Read the index and (re)write ``out_path``.  Raises ``UsageError`` naming the URL when the index cannot
    be read (the file is left as it was)."""
    t0 = time.monotonic()
    http = Http(cache_dir, timeout=timeout)
    notes: list[str] = []
    skipped: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pages = {p: pool.submit(read_project, http, index, p) for p in PROJECTS}
        pt = pool.submit(pytorch_cuda_variants, http, pytorch_index) if pytorch_index else None
        releases: dict[str, list[Release]] = {}
        for p, fut in pages.items():
            try:
                releases[p] = group_releases(fut.result(), p)
            except FetchError as e:
                raise UsageError(f"compat refresh: cannot read the package index at {e.url} ({e.reason}); "
                                 f"{out_path.name} was not changed.",
                                 "Check the network or proxy (HTTPS_PROXY), or pass --index-url with a reachable "
                                 "mirror; until then the last data stays in use.") from None
        variants: dict[str, list[str]] | None = None
        if pt is not None:
            try:
                variants = pt.result()
            except FetchError as e:
                notes.append(f"PyTorch index not read: {e.url} ({e.reason}); torch's CUDA variants keep the "
                             "hand-kept data and the last refresh's")
        jobs = []
        for p, rels in releases.items():
            for rel in rels:
                f = pick_wheel(rel)
                if f is None:
                    continue
                jobs.append((p, rel, f))
        results: dict[tuple[str, str], dict] = {}

        def work(job):
            p, rel, f = job
            try:
                meta = parse_metadata(fetch_metadata(http, f), p, rel.version)
                return job, EXTRACT[p](meta, rel, f), None
            except MetadataError as e:
                return job, None, f"{f.filename}: {e}"

        with _progress(progress) as bar:
            task = bar.add_task("index metadata", total=len(jobs))
            for job, facts, err in pool.map(_guard(work), jobs):
                bar.advance(task)
                p, rel, f = job
                if isinstance(err, FetchError):
                    raise UsageError(f"compat refresh: cannot read {err.url} ({err.reason}); {out_path.name} was "
                                     "not changed.",
                                     "Check the network or proxy, or pass --index-url with a reachable mirror; "
                                     "until then the last data stays in use.")
                if err:
                    skipped.append(err)
                    continue
                results[(p, str(rel.version))] = facts
    old = _read_lock(out_path)
    if variants is not None:
        for (p, v), facts in results.items():
            if p == "torch" and v in variants:
                facts["cuda_variants"] = variants[v]
    else:
        for (p, v), facts in results.items():
            prev = (old.get("torch") or {}).get(v) or {}
            if p == "torch" and "cuda_variants" in prev:
                facts["cuda_variants"] = prev["cuda_variants"]
    body = render_lock(results, index=index, pytorch_read=variants is not None)
    stamp = today or date.today().isoformat()
    changed = False
    old_text = out_path.read_text(encoding="utf-8") if out_path.is_file() else ""
    if _strip_generated(old_text) != _strip_generated(_with_header(body, stamp)):
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(_with_header(body, stamp), encoding="utf-8")
        tmp.replace(out_path)
        changed = True
    else:
        m = re.search(r'^generated = "([^"]*)"', old_text, re.M)
        stamp = m.group(1) if m else stamp
    if cache_dir is not None:
        try:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            (Path(cache_dir) / "last-refresh").write_text(date.today().isoformat() if today is None else today)
        except OSError:
            pass
    counts = {p: sum(1 for (q, _v) in results if q == p) for p in PROJECTS}
    return RefreshResult(out_path, changed, counts, sorted(skipped), notes, time.monotonic() - t0,
                         http.requests, http.cache_hits, stamp)


def _guard(work):
    def run(job):
        try:
            return work(job)
        except FetchError as e:
            return job, None, e
    return run


def _read_lock(path: Path) -> dict:
    import tomllib
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


_KEY_ORDER = ("python", "torch", "torch_requires", "torchvision", "torchaudio", "xformers", "flashinfer", "pypi_cuda",
              "pypi_cuda_from", "cuda_variants", "sdist", "wheels", "metadata_from")


def render_lock(results: dict[tuple[str, str], dict], index: str, pytorch_read: bool) -> str:
    lines = [f"index = {_q(index)}", f"pytorch_index_read = {_val(pytorch_read)}", ""]
    for p in PROJECTS:
        rows = sorted(((v, f) for (q, v), f in results.items() if q == p), key=lambda r: Version(r[0]))
        for v, facts in rows:
            lines.append(f"[{p}.{_q(v)}]")
            for k in sorted(facts, key=lambda k: (_KEY_ORDER.index(k) if k in _KEY_ORDER else 99, k)):
                lines.append(f"{k} = {_val(facts[k])}")
            lines.append("")
    return "\n".join(lines)


_HEADER = ("# GENERATED by `invoke compat --refresh` (nox -s compat) from the package index's metadata: do not\n"
           "# edit.  Every value here has source \"index-metadata\"; the hand-kept facts (drivers, nvcc archs,\n"
           "# gcc limits, build archs) live in compat.toml beside it.  compat.load() merges the two.\n"
           "schema = 1\n"
           "source = \"index-metadata\"\n")


def _with_header(body: str, stamp: str) -> str:
    return _HEADER + f"generated = {_q(stamp)}\n" + body


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
