"""The one reader of a package index (PEP 691 JSON or PEP 503 HTML simple pages): an HTTP client with a
cache and retries, project listings grouped into releases, and a wheel's METADATA read without downloading
the wheel (PEP 658/714 ``.metadata`` files, else HTTP range requests into the zip)."""
from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
import time
import urllib.parse
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
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

from vllm_harness.core.fetcher import Fetcher, FetchError, url_problem

SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
USER_AGENT = "vllm-harness-compat-refresh"
# the caps of what one answer may hold (torch's PyPI page is ~2 MB, the PyTorch index's ~5 MB; a METADATA
# file some 50 kB; a wheel's central directory ~2 MB for torch's ~15000 members)
PAGE_MAX = 64 << 20
METADATA_MAX = 8 << 20
ZIP_TAIL = 65536
CENTRAL_DIR_MAX = 32 << 20
FILENAME_MAX = 255
VERSION_MAX = 64
_FILENAME = re.compile(r"[A-Za-z0-9._+!-]+")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


class MetadataError(Exception):
    """A metadata file that cannot be used (not parseable, wrong project or version)."""


def _bounded_read(p: Path, limit: int) -> bytes | None:
    """A cache file's bytes, None when it is missing or over ``limit`` (a cache is never read unbounded)."""
    try:
        with open(p, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError:
        return None
    return data if len(data) <= limit else None


class Http:
    """The index reader: core.fetcher's bounded GETs (deadline per request and per refresh, size caps, http(s)
    only, a request budget) with retries of transient failures and an on-disk cache: pages by URL
    (revalidated with ETag / Last-Modified), metadata by the file's sha256 (immutable)."""

    def __init__(self, cache_dir: Path | None, timeout: float = 20.0, *, deadline_s: float | None = 600.0,
                 max_requests: int | None = 5000, fetcher: Fetcher | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.timeout = timeout
        self.fetcher = fetcher or Fetcher(deadline_s, max_requests, timeout_s=timeout,
                                          request_deadline_s=max(60.0, 6 * timeout), user_agent=USER_AGENT)
        self.cache_hits = 0

    @property
    def requests(self) -> int:
        return self.fetcher.requests

    @staticmethod
    def _retry(call, tries: int):
        for attempt in range(tries):
            try:
                return call()
            except FetchError as e:
                if attempt + 1 == tries or not e.transient:
                    raise
            time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    def get(self, url: str, headers: dict[str, str] | None = None, tries: int = 3, *,
            max_bytes: int = PAGE_MAX) -> tuple[int, dict[str, str], bytes]:
        """One GET (a 2xx or 304); a transient failure (DNS, reset, 5xx) is tried again: ``tries`` in all."""
        r = self._retry(lambda: self.fetcher.fetch(url, max_bytes=max_bytes, headers=headers, accept=(304,)),
                        tries)
        return r.status, r.headers, r.body

    def range(self, url: str, start: int, end: int | None = None, *, max_bytes: int | None = None,
              tries: int = 3) -> tuple[bytes, int]:
        return self._retry(lambda: self.fetcher.get_range(url, start, end, max_bytes=max_bytes), tries)

    def _path(self, kind: str, key: str) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / kind / hashlib.sha256(key.encode()).hexdigest()[:32]

    def page(self, url: str, accept: str) -> tuple[bytes, str]:
        """A project page: (body, content type), revalidated against the cached copy."""
        p = self._path("pages", url)
        cached = None
        raw = _bounded_read(p, 8 * PAGE_MAX) if p is not None else None
        if raw is not None:
            try:
                cached = json.loads(raw.decode("utf-8"))
            except ValueError:
                cached = None
            if not isinstance(cached, dict) or not isinstance(cached.get("body"), str):
                cached = None
        headers = {"Accept": accept, "Accept-Encoding": "gzip, deflate"}
        if cached:
            if isinstance(cached.get("etag"), str):
                headers["If-None-Match"] = cached["etag"]
            if isinstance(cached.get("last_modified"), str):
                headers["If-Modified-Since"] = cached["last_modified"]
        status, h, body = self.get(url, headers)
        if status == 304 and cached:
            self.cache_hits += 1
            return cached["body"].encode("utf-8"), str(cached.get("content_type", ""))
        if status == 304:
            raise FetchError(url, "HTTP 304 without a cached copy asked for", kind="broken")
        ctype = h.get("content-type", "")
        if p is not None and (h.get("etag") or h.get("last-modified")):
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(p.name + f".{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps({"etag": h.get("etag"), "last_modified": h.get("last-modified"),
                                       "content_type": ctype, "body": body.decode("utf-8", "replace")}),
                           encoding="utf-8")
            tmp.replace(p)
        return body, ctype

    def cached_metadata(self, key: str) -> str | None:
        p = self._path("metadata", key)
        raw = _bounded_read(p, METADATA_MAX) if p is not None else None
        if raw is not None:
            self.cache_hits += 1
            return raw.decode("utf-8", "replace")
        return None

    def store_metadata(self, key: str, text: str) -> None:
        p = self._path("metadata", key)
        if p is not None:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(p.name + f".{id(text)}.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(p)


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
    if not isinstance(files, list):
        raise ValueError("not a PEP 691 JSON project page ('files' is not a list)")
    out = []
    for f in files:
        if not isinstance(f, dict) or not all(isinstance(f.get(k), str) for k in ("filename", "url")):
            continue
        cm = f.get("core-metadata", f.get("dist-info-metadata", False))
        hashes = f.get("hashes") if isinstance(f.get("hashes"), dict) else {}
        sha = hashes.get("sha256") if isinstance(hashes.get("sha256"), str) else None
        rp = f.get("requires-python") if isinstance(f.get("requires-python"), str) else None
        try:
            url = urllib.parse.urljoin(page_url, f["url"])
        except ValueError:
            url = f["url"]   # file_problem() names it
        out.append(IndexFile(filename=f["filename"], url=url, sha256=sha, requires_python=rp,
                             core_metadata=bool(cm), yanked=bool(f.get("yanked"))))
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
        try:
            url = urllib.parse.urljoin(page_url, url)
        except ValueError:
            pass   # file_problem() names it
        out.append(IndexFile(filename=name, url=url, sha256=sha,
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


def dist_name_version(filename: str) -> tuple[str, Version] | None:
    """(canonical name, version) of a wheel or sdist file name; None for anything else (a name over 255
    characters or with characters no file name of a dist has, a version over 64 characters)."""
    if not isinstance(filename, str) or len(filename) > FILENAME_MAX or not _FILENAME.fullmatch(filename):
        return None
    try:
        if filename.endswith(".whl"):
            name, v, _b, _t = parse_wheel_filename(filename)
        elif filename.endswith((".tar.gz", ".zip")):
            name, v = parse_sdist_filename(filename)
        else:
            return None
    except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion, ValueError):
        return None   # ValueError: also a version whose digits exceed int()'s limit
    if len(str(v)) > VERSION_MAX:
        return None
    return name, v


def file_problem(f: IndexFile) -> str | None:
    """Why an index page's file entry may not be used (None: it may): every value that could reach the lock
    or a request is checked here -- the file name (no control characters, one a wheel or an sdist has,
    parseable by packaging, a version of at most 64 characters), its URL (http/https) and its sha256 (hex)."""
    fn = f.filename
    if len(fn) > FILENAME_MAX:
        return f"a file name of {len(fn)} characters"
    if not _FILENAME.fullmatch(fn):
        return "the file name holds a control character, a space or a character no dist file name has"
    if fn.endswith((".whl", ".tar.gz", ".zip")):
        if dist_name_version(fn) is None:
            return "not a wheel or sdist file name packaging can parse (or its version is over " \
                   f"{VERSION_MAX} characters)"
    why = url_problem(f.url)
    if why:
        return f"its URL is refused: {why}"
    if f.sha256 is not None and not _SHA256.fullmatch(f.sha256):
        return "its sha256 is not 64 hex digits"
    return None


def group_releases(files: Iterable[IndexFile], project: str) -> list[Release]:
    """Final releases (no pre/dev) with at least one file that is not yanked, oldest first."""
    by: dict[Version, Release] = {}
    want = canonicalize_name(project)
    for f in files:
        parsed = dist_name_version(f.filename)
        if parsed is None:
            continue
        name, v = parsed
        if name != want or v.is_prerelease or v.is_devrelease or v.local:
            continue
        by.setdefault(v, Release(v)).files.append(f)
    return [r for v, r in sorted(by.items()) if any(not f.yanked for f in r.files)]


def _linux_arch(tags, arch: str) -> bool:
    """A Linux wheel for ``arch`` ('x86_64', 'aarch64'): one of its tags is a linux/manylinux tag of it."""
    return any(t.platform.endswith(f"_{arch}") and "linux" in t.platform for t in tags)


def linux_x86_64(tags) -> bool:
    return any(t.platform == "any" for t in tags) or _linux_arch(tags, "x86_64")


def pick_wheel(rel: Release, arch: str = "x86_64") -> IndexFile | None:
    """The wheel whose metadata stands for the release on Linux ``arch``: a linux wheel of that arch
    (abi3/py3, else cp312, else the newest CPython without free-threading), the highest build tag; for x86_64
    else py3-none-any (a pure wheel is every platform's: no other platform reads one)."""
    best, best_key = None, None
    for f, (_n, _v, build, tags) in rel.wheels:
        if not (linux_x86_64(tags) if arch == "x86_64" else _linux_arch(tags, arch)):
            continue
        interp = max((_interp_rank(t.interpreter, t.abi) for t in tags), default=(0, 0))
        plat = 1 if any(t.platform != "any" for t in tags) else 0
        key = (plat, interp, build or (0, ""), f.filename)
        if best_key is None or key > best_key:
            best, best_key = f, key
    return best


_MANYLINUX_ALIAS = {"manylinux1": "2.5", "manylinux2010": "2.12", "manylinux2014": "2.17"}


def platform_tags(rel: Release, arch: str) -> tuple[str | None, list[str]]:
    """(the lowest glibc the release's Linux ``arch`` wheels need, e.g. '2.28', or None; their platform
    tags)."""
    plats = sorted({t.platform for _f, (_n, _v, _b, tags) in rel.wheels for t in tags
                    if t.platform.endswith(f"_{arch}") and "linux" in t.platform})
    floors = []
    for pl in plats:
        m = re.fullmatch(rf"(manylinux1|manylinux2010|manylinux2014|manylinux_(\d{{1,2}})_(\d{{1,2}}))"
                         rf"_{arch}", pl)
        if m:
            floors.append(Version(_MANYLINUX_ALIAS.get(m.group(1)) or f"{m.group(2)}.{m.group(3)}"))
    return (f"{min(floors).major}.{min(floors).minor}" if floors else None), plats


def _interp_rank(interp: str, abi: str) -> tuple[int, int]:
    if abi == "abi3" or interp.startswith("py"):
        return (3, 0)
    m = re.fullmatch(r"cp(\d)(\d+)", interp)
    if not m or abi.endswith("t"):
        return (0, 0)
    minor = int(m.group(2))
    return (2, 0) if minor == 12 else (1, minor)


def python_tags(rel: Release, arch: str = "x86_64") -> list[str]:
    out = set()
    for _f, (_n, _v, _b, tags) in rel.wheels:
        if linux_x86_64(tags) if arch == "x86_64" else _linux_arch(tags, arch):
            out.update(t.interpreter for t in tags if re.fullmatch(r"cp3\d+", t.interpreter))
    return sorted(out, key=lambda s: int(s[3:]))


def metadata_from_zip(http: Http, url: str) -> str:
    """``*.dist-info/METADATA`` of a remote wheel through range requests: the end of central directory,
    the central directory, then that one member -- each read capped, the member's stored and inflated size
    too (METADATA_MAX)."""
    tail, total = http.range(url, -ZIP_TAIL)
    i = tail.rfind(b"PK\x05\x06")
    if i < 0 or len(tail) < i + 22:
        raise MetadataError("no zip end-of-central-directory record")
    cd_size, cd_off = struct.unpack("<II", tail[i + 12:i + 20])
    if cd_off == 0xFFFFFFFF or cd_size == 0xFFFFFFFF:
        raise MetadataError("zip64 archive (not read)")
    if cd_size > CENTRAL_DIR_MAX or cd_off + cd_size > total:
        raise MetadataError(f"zip central directory of {cd_size} bytes at {cd_off} (over {CENTRAL_DIR_MAX} "
                            "bytes or past the end)")
    base = total - len(tail)
    if cd_size == 0:
        raise MetadataError("the wheel has no *.dist-info/METADATA")
    if cd_off >= base:
        cd = tail[cd_off - base:cd_off - base + cd_size]
    else:
        cd, _ = http.range(url, cd_off, cd_off + cd_size - 1, max_bytes=CENTRAL_DIR_MAX)
    p = 0
    while p + 46 <= len(cd):
        if cd[p:p + 4] != b"PK\x01\x02":
            raise MetadataError("corrupt zip central directory")
        method, = struct.unpack("<H", cd[p + 10:p + 12])
        csize, usize = struct.unpack("<II", cd[p + 20:p + 28])
        n, e, c = struct.unpack("<HHH", cd[p + 28:p + 34])
        off, = struct.unpack("<I", cd[p + 42:p + 46])
        name = cd[p + 46:p + 46 + n].decode("utf-8", "replace")
        p += 46 + n + e + c
        if re.fullmatch(r"[^/]+\.dist-info/METADATA", name):
            if method not in (0, 8):
                raise MetadataError(f"METADATA is stored with zip method {method} (not stored or deflated)")
            if csize > METADATA_MAX or usize > METADATA_MAX:
                raise MetadataError(f"METADATA of {max(csize, usize)} bytes (over {METADATA_MAX})")
            last = min(total - 1, off + 30 + csize + 65535)
            data, _ = http.range(url, off, last, max_bytes=last - off + 1)
            if data[:4] != b"PK\x03\x04" or len(data) < 30:
                raise MetadataError("corrupt zip local header")
            n2, e2 = struct.unpack("<HH", data[26:30])
            raw = data[30 + n2 + e2:30 + n2 + e2 + csize]
            try:
                out = zlib.decompressobj(-15).decompress(raw, METADATA_MAX + 1) if method == 8 else raw
            except zlib.error as exc:
                raise MetadataError(f"METADATA does not inflate ({exc})") from None
            if len(out) > METADATA_MAX:
                raise MetadataError(f"METADATA inflates past {METADATA_MAX} bytes")
            return out.decode("utf-8", "replace")
    raise MetadataError("the wheel has no *.dist-info/METADATA")


def fetch_metadata(http: Http, f: IndexFile) -> str:
    """The core metadata text of one wheel (cached by the file's sha256)."""
    key = f.sha256 or f.url
    text = http.cached_metadata(key)
    if text is not None:
        return text
    if f.core_metadata:
        _s, _h, body = http.get(f.url + ".metadata", max_bytes=METADATA_MAX)
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


