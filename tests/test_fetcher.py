"""issue 26: the one bounded network reader (core/fetcher.py) and the refresh that goes through it, against a
local server that misbehaves on purpose: a trickle, an endless body, a huge Content-Length, a gzip bomb, a
redirect to file://, an index page with poisoned entries, a METADATA deflate bomb, a request budget."""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import json
import struct
import threading
import time
import zipfile
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import ROOT
from test_compat_refresh import DATA, Index  # the recorded index of issue 16, served on 127.0.0.1

from vllm_harness.core.errors import UsageError
from vllm_harness.core.fetcher import Fetcher, FetchError
from vllm_harness.facts import compat
from vllm_harness.facts import index_metadata as im
from vllm_harness.facts.package_index import Http, IndexFile, fetch_metadata

SRC = ROOT / "src" / "vllm_harness"
SMALL = b"<html>a small page</html>" * 40


def _gzip(chunks, n: int) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    return b"".join(c.compress(chunks) for _ in range(n)) + c.flush()


@functools.cache
def _bomb() -> bytes:
    return _gzip(b"\0" * (1 << 20), 128)      # 128 MiB of zeros in ~130 kB (over the page cap of 64 MiB)


class _BadHandler(BaseHTTPRequestHandler):
    """One misbehaviour per path (``self.server.bad``: the :class:`Bad` that owns the server)."""

    protocol_version = "HTTP/1.0"   # a body without Content-Length ends when the connection does

    def log_message(self, *a):
        pass

    def _head(self, code=200, **headers):
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), str(v))
        self.end_headers()

    def _trickle(self, bad):            # 1 byte every 2 s, for a minute at most
        self._head(Content_Length=1000, Content_Type="text/html")
        for _ in range(30):
            self.wfile.write(b"x")
            self.wfile.flush()
            if bad.stop.wait(2):
                return

    def _slow_headers(self, bad):       # the status line, then a header byte every 2 s
        self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
        for _ in range(30):
            self.wfile.write(b"z")
            self.wfile.flush()
            if bad.stop.wait(2):
                return

    def _endless(self, bad):            # no Content-Length, never ends (stops at 512 MiB)
        self._head(Content_Type="text/html")
        block = b"y" * (1 << 16)
        for _ in range(8192):
            if bad.stop.is_set():
                return
            self.wfile.write(block)

    def _huge(self, bad):               # announces 600 MB, sends 4 bytes, then waits
        self._head(Content_Length=600_000_000)
        self.wfile.write(b"Meta")
        self.wfile.flush()
        bad.stop.wait(30)

    def _gzip_bomb(self, bad):
        self._head(Content_Length=len(_bomb()), Content_Encoding="gzip")
        self.wfile.write(_bomb())

    def _small_gz(self, bad):
        body = _gzip(SMALL, 1)
        self._head(Content_Length=len(body), Content_Encoding="gzip")
        self.wfile.write(body)

    def _small(self, bad):
        self._head(Content_Length=len(SMALL), ETag='"1"')
        self.wfile.write(SMALL)

    def _redirect(self, location):
        return lambda bad: self._head(302, Location=location.format(port=bad.port))

    def _route(self, p):
        for prefix, fn in (("/trickle", self._trickle), ("/slow-headers", self._slow_headers),
                           ("/huge", self._huge)):
            if p.startswith(prefix):
                return fn
        exact = {"/endless": self._endless, "/bomb": self._gzip_bomb, "/small.gz": self._small_gz,
                 "/small": self._small, "/to-file": self._redirect("file:///etc/passwd"),
                 "/to-ftp": self._redirect("ftp://127.0.0.1:{port}/x"), "/loop": self._redirect("/loop2"),
                 "/loop2": self._redirect("/loop")}
        return exact.get(p, lambda bad: self._head(404, Content_Length=0))

    def do_GET(self):
        bad = self.server.bad
        bad.hits.append(self.path)
        try:
            self._route(self.path)(bad)
        except OSError:
            return   # the client gave up (what it should do)


class Bad:
    """127.0.0.1 server of misbehaviours; ``stop`` ends the slow ones when the test is over."""

    def __init__(self):
        self.stop = threading.Event()
        self.hits: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _BadHandler)
        self.server.bad = self
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def bad():
    with Bad() as b:
        yield b


@pytest.fixture
def index():
    with Index() as ix:
        yield ix


# ------------------------------------------------------------------------------------- the fetcher itself

def test_trickle_fails_at_the_deadline_not_never(bad):
    """1 byte every 2 s keeps every per-read timeout happy: only a wall-clock deadline ends it."""
    t0 = time.monotonic()
    with pytest.raises(FetchError) as e:
        Fetcher(timeout_s=20).get(f"{bad.url}/trickle", max_bytes=1 << 20, deadline_s=3)
    assert time.monotonic() - t0 < 5 and e.value.kind == "deadline"
    assert f"{bad.url}/trickle" in str(e.value) and "Fix:" in str(e.value)
    t0 = time.monotonic()   # the index reader (Http) too: its refresh-wide deadline
    with pytest.raises(FetchError):
        Http(None, timeout=20, deadline_s=3).get(f"{bad.url}/trickle2")
    assert time.monotonic() - t0 < 5


def test_trickled_headers_fail_at_the_deadline(bad):
    """Headers trickled byte by byte are read by http.client before any body read: the deadline still holds."""
    t0 = time.monotonic()
    with pytest.raises(FetchError) as e:
        Http(None, timeout=20, deadline_s=3).get(f"{bad.url}/slow-headers")
    assert time.monotonic() - t0 < 5 and e.value.kind == "deadline"


def test_endless_body_stops_at_the_cap(bad):
    t0 = time.monotonic()
    with pytest.raises(FetchError) as e:
        Fetcher().get(f"{bad.url}/endless", max_bytes=1 << 20)
    assert e.value.kind == "too-large" and "1048576" in e.value.reason and time.monotonic() - t0 < 5
    with pytest.raises(FetchError) as e:        # the index reader: its page cap
        Http(None, timeout=5).get(f"{bad.url}/endless")
    assert e.value.kind == "too-large"


def test_huge_content_length_is_refused_before_reading(bad, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(FetchError) as e:
        Http(None, timeout=10).get(f"{bad.url}/huge.metadata", max_bytes=8 << 20)
    assert "Content-Length 600000000" in e.value.reason and time.monotonic() - t0 < 2
    f = IndexFile("vllm-1.0-py3-none-any.whl", f"{bad.url}/huge", None, None, True, False)
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="Content-Length 600000000"):
        fetch_metadata(Http(tmp_path, timeout=10), f)
    assert time.monotonic() - t0 < 2 and not list(tmp_path.rglob("*"))   # nothing went to the cache


def test_gzip_is_decoded_and_a_gzip_bomb_stops_at_the_cap(bad):
    f = Fetcher()
    assert f.get(f"{bad.url}/small.gz", max_bytes=1 << 20) == SMALL
    with pytest.raises(FetchError) as e:
        f.get(f"{bad.url}/bomb", max_bytes=1 << 20)
    assert e.value.kind == "too-large" and "decompressed" in e.value.reason
    with pytest.raises(FetchError) as e:        # the index reader: its page cap, decompressed
        Http(None, timeout=5).get(f"{bad.url}/bomb")
    assert e.value.kind == "too-large" and "decompressed" in e.value.reason


@pytest.mark.parametrize("path,target", [("/to-file", "file:///etc/passwd"), ("/to-ftp", "ftp://")])
def test_redirect_to_another_scheme_is_refused(bad, path, target):
    with pytest.raises(FetchError) as e:
        Http(None, timeout=5).get(bad.url + path)
    assert target in e.value.reason and "only http and https" in e.value.reason and e.value.kind == "scheme"
    assert bad.hits == [path]        # nothing followed


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x", "data:text/plain,hi", "/relative",
                                 "http://exa mple.com/", "http://127.0.0.1:99999/"])
def test_only_http_and_https_urls_are_read(url):
    with pytest.raises(FetchError) as e:
        Http(None, timeout=5).get(url)
    assert e.value.kind in ("scheme", "url") and "Fix:" in str(e.value)


def test_request_budget_and_redirect_loops(bad):
    f = Fetcher(max_requests=2)
    f.get(f"{bad.url}/small", max_bytes=1 << 20)
    f.get(f"{bad.url}/small", max_bytes=1 << 20)
    with pytest.raises(FetchError) as e:
        f.get(f"{bad.url}/small", max_bytes=1 << 20)
    assert e.value.kind == "budget" and f.requests == 2 and len(bad.hits) == 2
    with pytest.raises(FetchError) as e:       # redirects count: a loop spends the budget, then stops
        Fetcher(max_requests=4).get(f"{bad.url}/loop", max_bytes=1 << 20)
    assert e.value.kind == "budget" and len(bad.hits) == 6


def test_credentials_are_masked_in_every_message():
    with pytest.raises(FetchError) as e:
        Fetcher(timeout_s=2).get("http://alice:s3cret@127.0.0.1:9/simple/", max_bytes=10)
    assert "s3cret" not in str(e.value) and "127.0.0.1:9/simple/" in str(e.value)


def test_download_streams_to_a_temp_file_and_checks_sha256(bad, tmp_path):
    dest = tmp_path / "w" / "page.html"
    f = Fetcher()
    digest = f.download(f"{bad.url}/small", dest, max_bytes=1 << 20, sha256=hashlib.sha256(SMALL).hexdigest())
    assert dest.read_bytes() == SMALL and digest == hashlib.sha256(SMALL).hexdigest()
    dest.unlink()
    with pytest.raises(FetchError) as e:
        f.download(f"{bad.url}/small", dest, max_bytes=1 << 20, sha256="0" * 64)
    assert e.value.kind == "sha256"
    with pytest.raises(FetchError):
        f.download(f"{bad.url}/endless", dest, max_bytes=1 << 20)
    assert list((tmp_path / "w").iterdir()) == []    # neither a partial nor a wrong file is left


# ------------------------------------------------------------------------------------------- the refresh

def _refresh(ix: Index, out: Path, **kw) -> im.RefreshResult:
    return im.refresh(out_path=out, index=f"{ix.url}/simple", pytorch_index=f"{ix.url}/pytorch", cache_dir=None,
                      today="2026-12-01", timeout=5, **kw)


def _meta(version: str, extra: str = "") -> bytes:
    return (f"Metadata-Version: 2.4\nName: vllm\nVersion: {version}\nRequires-Dist: torch==2.13.0\n{extra}"
            ).encode()


def test_refresh_skips_poisoned_entries_and_writes_a_parseable_lock(index, tmp_path):
    """A file:// link (a local file that would be read), a control character in a file name, a 5000-digit
    version, a hash that is not hex, a pin with a control character: each skipped with a note, none written."""
    local = tmp_path / "vllm-0.40.0-cp38-abi3-manylinux_2_28_x86_64.whl"
    Path(str(local) + ".metadata").write_bytes(_meta("0.40.0"))
    page = json.loads((DATA / "vllm.json").read_text())
    entry = {"hashes": {"sha256": "a" * 64}, "core-metadata": True, "requires-python": ">=3.9"}
    ctrl = "vllm-0.41.0-cp38-abi3-manylinux\x7f_2_28_x86_64.whl"
    long = "vllm-" + "1" * 5000 + "-cp38-abi3-manylinux_2_28_x86_64.whl"
    page["files"] += [
        {**entry, "filename": local.name, "url": local.as_uri()},
        {**entry, "filename": ctrl, "url": "../../files/v41.whl"},
        {**entry, "filename": long, "url": "../../files/vlong.whl"},
        {**entry, "filename": "vllm-0.42.0-cp38-abi3-manylinux_2_28_x86_64.whl", "url": "../../files/v42.whl",
         "hashes": {"sha256": "not-hex"}},
        {**entry, "filename": "vllm-0.43.0-cp38-abi3-manylinux_2_28_x86_64.whl", "url": "../../files/v43.whl",
         "hashes": {"sha256": "b" * 64}},
    ]
    index.routes["/simple/vllm/"] = (json.dumps(page).encode(), im.SIMPLE_JSON)
    for name, version, extra in (("v41", "0.41.0", ""), ("vlong", "1" * 5000, ""), ("v42", "0.42.0", ""),
                                 ("v43", "0.43.0", "Requires-Dist: xformers===0.1\x7f\n")):
        index.routes[f"/files/{name}.whl.metadata"] = (_meta(version, extra), "text/plain")
    out = tmp_path / "compat.lock.toml"
    res = _refresh(index, out)
    lock = compat.tomllib.loads(out.read_text(encoding="utf-8"))     # parseable
    assert {"0.33.0", "0.32.0"} <= set(lock["vllm"])
    assert not {"0.40.0", "0.41.0", "0.42.0", "0.43.0"} & set(lock["vllm"])
    poisoned = [s for s in res.skipped if "_aarch64.whl: HTTP 404" not in s]   # the fixture serves x86_64 files only
    assert len(poisoned) == 5 and all(s.isprintable() for s in res.skipped), res.skipped
    why = " ".join(res.skipped)
    assert "only http and https" in why and "control character" in why and "sha256" in why and "xformers" in why
    assert "/files/v41.whl.metadata" not in index.hits                # a skipped entry is never fetched
    data = compat.load_file(compat.DATA_PATH, out)                    # what doctor, plan and compat read
    assert data.newest("vllm") == "0.33.0"


@pytest.mark.parametrize("lie", [False, True])
def test_metadata_deflate_bomb_in_a_wheel_is_skipped(index, tmp_path, lie):
    """No .metadata file: METADATA is read from the zip through ranges; a member that inflates past the cap
    is skipped, whether its central directory says so (lie=False) or claims 100 bytes (lie=True)."""
    page = json.loads((DATA / "xformers.json").read_text())
    text = (DATA / "files" / "xformers-0.0.34-cp39-abi3-manylinux_2_28_x86_64.whl.metadata").read_text()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("xformers-0.0.34.dist-info/METADATA", text + "\n" + " " * (20 << 20))
    raw = bytearray(buf.getvalue())
    if lie:
        p = raw.rfind(b"PK\x01\x02")
        raw[p + 24:p + 28] = struct.pack("<I", 100)
    for f in page["files"]:
        if f["filename"] == "xformers-0.0.34-cp39-abi3-manylinux_2_28_x86_64.whl":
            f.pop("core-metadata")
            index.routes["/files/" + f["filename"]] = (bytes(raw), "application/zip")
    index.routes["/simple/xformers/"] = (json.dumps(page).encode(), im.SIMPLE_JSON)
    out = tmp_path / "compat.lock.toml"
    res = _refresh(index, out)
    assert "0.0.34" not in compat.tomllib.loads(out.read_text())["xformers"]
    assert any(s.startswith("xformers-0.0.34") and "METADATA" in s for s in res.skipped), res.skipped


def test_refresh_has_a_deadline_and_a_request_budget(index, bad, tmp_path):
    out = tmp_path / "compat.lock.toml"
    out.write_text("keep me\n")
    t0 = time.monotonic()
    with pytest.raises(UsageError) as e:          # an index that trickles: the refresh's deadline ends it
        im.refresh(out_path=out, index=f"{bad.url}/trickle", pytorch_index=None, timeout=20, deadline_s=3)
    assert time.monotonic() - t0 < 6 and "deadline" in str(e.value) and out.read_text() == "keep me\n"
    with pytest.raises(UsageError) as e:
        _refresh(index, out, max_requests=5)
    assert "budget of 5 requests" in str(e.value) and out.read_text() == "keep me\n"
    assert len(index.hits) <= 5


# ------------------------------------------------------------------------------------ one reader only

NET_MODULES = ("urllib.request", "urllib.error", "http.client", "socket", "requests", "httpx", "urllib3", "ftplib")


def _net_uses(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n in NET_MODULES or n.startswith(tuple(m + "." for m in NET_MODULES)) or n == "urllib.urlopen":
                out.append(f"line {node.lineno}: import {n}")
        if isinstance(node, ast.Attribute) and node.attr in ("urlopen", "create_connection", "HTTPConnection",
                                                             "HTTPSConnection"):
            out.append(f"line {node.lineno}: .{node.attr}")
        if isinstance(node, ast.Name) and node.id == "urlopen":
            out.append(f"line {node.lineno}: urlopen")
    return out


def _allowed(path: Path, uses: list[str], tree: ast.AST) -> list[str]:
    """socket only for the host's name (core/locks.py: socket.gethostname), nothing else of it."""
    sock_attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                  and isinstance(n.value, ast.Name) and n.value.id == "socket"}
    if sock_attrs <= {"gethostname"}:
        uses = [u for u in uses if u.split(": ", 1)[1] != "import socket"]
    return uses


def test_no_network_use_outside_the_fetcher():
    """Every network read of the harness goes through core/fetcher.py.  data/ holds the scripts run inside the
    target interpreter (standard library only; verify_dist binds a local port for torch.distributed)."""
    bad = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "core/fetcher.py" or rel.startswith("data/"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        uses = _allowed(path, _net_uses(tree), tree)
        if uses:
            bad[rel] = uses
    assert not bad, bad


def test_the_ast_check_finds_what_it_looks_for():
    for src in ("import urllib.request", "from urllib.request import urlopen", "import http.client as h",
                "import socket\nsocket.create_connection(('h', 1))", "x.urlopen('u')"):
        tree = ast.parse(src)
        assert _allowed(Path("x.py"), _net_uses(tree), tree), src
    tree = ast.parse("import socket\nsocket.gethostname()")
    assert not _allowed(Path("x.py"), _net_uses(tree), tree)
