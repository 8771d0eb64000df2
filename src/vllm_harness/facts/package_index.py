"""The one reader of a package index (PEP 691 JSON or PEP 503 HTML simple pages): an HTTP client with a
cache and retries, project listings grouped into releases, and a wheel's METADATA read without downloading
the wheel (PEP 658/714 ``.metadata`` files, else HTTP range requests into the zip)."""
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

SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
USER_AGENT = "vllm-harness-compat-refresh"



class FetchError(Exception):
    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason


class MetadataError(Exception):
    """A metadata file that cannot be used (not parseable, wrong project or version)."""


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
    """(canonical name, version) of a wheel or sdist file name; None for anything else."""
    try:
        if filename.endswith(".whl"):
            name, v, _b, _t = parse_wheel_filename(filename)
        elif filename.endswith((".tar.gz", ".zip")):
            name, v = parse_sdist_filename(filename)
        else:
            return None
    except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):
        return None
    return name, v


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




