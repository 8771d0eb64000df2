"""The one network reader of the harness (issue 26): every HTTP(S) read of src/ goes through :class:`Fetcher`.

Bounded in every direction a server can push:

* time: a wall-clock deadline per request *and* one per Fetcher (a refresh, a bundle), checked between
  chunks and set as the socket timeout before each read, so a server that trickles one byte every few
  seconds fails at the deadline instead of never;
* size: ``Content-Length`` is checked before the body is read, the cap is enforced while reading, and a
  gzip/deflate ``Content-Encoding`` is decompressed with the same cap (a decompression bomb stops at it);
* scheme: http and https only, checked with :mod:`urllib.parse` for the URL asked *and* every redirect (the
  opener has no file://, ftp:// or data: handler at all);
* count: a request budget per Fetcher (redirects count).

Every failure is one :class:`FetchError` naming the URL (credentials masked) and the fix.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vllm_harness.core import writer
from vllm_harness.core.masking import mask, strip_credentials

SCHEMES = ("http", "https")
USER_AGENT = "vllm-harness"
CHUNK = 1 << 16
MAX_URL = 8192
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes (\d{1,15})-(\d{1,15})/(\d{1,15})")

_FIX = {
    "scheme": "Use an http:// or https:// URL; a file://, ftp:// or other link or redirect is never "
              "followed.",
    "url": "Check the URL (scheme://host/path, no spaces or control characters).",
    "deadline": "The server is too slow or stalled: retry later, or use a faster mirror or proxy.",
    "too-large": "The answer is far larger than one this harness expects: check that the URL points at a "
    "package index (or the mirror in between).",
    "budget": "Too many requests for one run: retry (what was read is cached), or check that the index does "
    "not redirect in circles.",
    "http": "Check the URL, the credentials and that the index serves it.",
    "unreachable": "Check the network or proxy (HTTPS_PROXY), or use a reachable mirror.",
    "broken": "Retry; if it persists, check the server or the proxy in between.",
    "sha256": "Retry; if it persists, the download is being altered (proxy/mirror).",
}


class FetchError(Exception):
    """A network read that failed or was refused: ``url`` (masked), ``reason``, ``fix``; ``kind`` is one of
    _FIX's keys, ``status`` the HTTP status when there was one, ``transient`` whether a retry may help."""

    def __init__(
        self,
        url: str,
        reason: str,
        fix: str | None = None,
        *,
        kind: str = "broken",
        status: int | None = None,
        transient: bool = False,
    ):
        self.url, self.reason = mask(str(url)), mask(str(reason))
        self.kind, self.status, self.transient = kind, status, transient
        self.digest: str | None = None  # kind "sha256": the digest the file had
        self.fix = fix or _FIX.get(kind, _FIX["broken"])
        super().__init__(f"{self.url}: {self.reason}")

    def __str__(self) -> str:
        return f"{self.url}: {self.reason}. Fix: {self.fix}"


def url_problem(url: object) -> str | None:
    """Why ``url`` may not be fetched (not http/https, no host, control characters, too long); None if
    fine."""
    if not isinstance(url, str) or not url:
        return "not a URL"
    if len(url) > MAX_URL:
        return f"a URL of {len(url)} characters"
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        return "the URL holds a space or a control character"
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as e:
        return f"not a URL ({e})"
    if parts.scheme.lower() not in SCHEMES:
        return f"a {parts.scheme or 'relative'}: URL (only http and https are read)"
    if not parts.hostname:
        return "the URL has no host"
    return None


@dataclass
class Response:
    url: str  # the final URL (after redirects)
    status: int
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""


class _Redirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, each checked (http/https, a valid URL) and counted against the budget."""

    max_redirections = 5

    def __init__(self, fetcher: Fetcher):
        self.fetcher = fetcher

    def http_error_302(self, req, fp, code, msg, headers):
        loc = headers.get("location") or headers.get("uri")
        if loc:
            new = urllib.parse.urljoin(req.full_url, loc)
            why = url_problem(new)
            if why:
                fp.close()
                raise FetchError(
                    req.full_url,
                    f"redirected to {mask(new)!r}: {why}",
                    kind="scheme" if "only http" in why else "url",
                )
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.fetcher._count(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Decoder:
    """Content-Encoding gzip/deflate (zlib or raw) with an output cap; identity passes through."""

    def __init__(self, encoding: str, url: str):
        enc = (encoding or "identity").strip().lower()
        if enc in ("", "identity"):
            self._d = None
        elif enc in ("gzip", "x-gzip"):
            self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif enc == "deflate":
            self._d, self._raw_tried = zlib.decompressobj(zlib.MAX_WBITS), False
        else:
            raise FetchError(url, f"Content-Encoding {encoding[:40]!r} is not gzip or deflate", kind="broken")
        self.enc, self.url = enc, url

    def feed(self, chunk: bytes, room: int) -> bytes:
        """At most ``room + 1`` bytes out (one more than fits tells the caller it is over the cap)."""
        if self._d is None:
            return chunk
        try:
            return self._d.decompress(chunk, room + 1)
        except zlib.error as e:
            if self.enc == "deflate" and not self._raw_tried and not self._d.unused_data:
                self._d, self._raw_tried = zlib.decompressobj(-zlib.MAX_WBITS), True  # raw deflate
                return self.feed(chunk, room)
            raise FetchError(
                self.url, f"the {self.enc} body does not decompress ({e})", kind="broken"
            ) from None

    def tail(self, room: int) -> bytes:
        if self._d is None:
            return b""
        try:
            return self._d.flush() if not self._d.unconsumed_tail else self._d.decompress(b"", room + 1)
        except zlib.error as e:
            raise FetchError(
                self.url, f"the {self.enc} body does not decompress ({e})", kind="broken"
            ) from None


_tls = threading.local()  # the guard of the request this thread is opening (its sockets are handed to it)


class _Guard:
    """Shuts the request's sockets down when its deadline passes: the bound on what per-read timeouts cannot
    bound (a server trickling its status line or headers, a proxy's CONNECT answer)."""

    def __init__(self, seconds: float):
        self.socks: list = []
        self.fired = False
        self._timer = threading.Timer(max(seconds, 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        for s in list(self.socks):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self) -> None:
        self._timer.cancel()


def _watch(sock) -> None:
    guard = getattr(_tls, "guard", None)
    if guard is not None and sock is not None:
        guard.socks.append(sock)
        if guard.fired:
            guard._fire()


class _HTTPConnection(http.client.HTTPConnection):
    def connect(self):
        super().connect()
        _watch(self.sock)


class _HTTPSConnection(http.client.HTTPSConnection):
    def connect(self):
        super().connect()
        _watch(self.sock)


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_HTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        kw = {"context": self._context}
        if getattr(self, "_check_hostname", None) is not None:
            kw["check_hostname"] = self._check_hostname
        return self.do_open(_HTTPSConnection, req, **kw)


def _check_content_length(resp, url: str, max_bytes: int) -> None:
    """A declared Content-Length must be a number within ``max_bytes``."""
    cl = resp.headers.get("Content-Length")
    if cl is None:
        return
    try:
        n = int(cl.strip())
    except ValueError:
        raise FetchError(url, f"bad Content-Length {cl[:40]!r}", kind="broken") from None
    if n > max_bytes:
        raise FetchError(url, f"Content-Length {n} is over the limit of {max_bytes} bytes", kind="too-large")


def _sock_of(resp):
    """The socket under an http.client response (to shorten its timeout as the deadline nears), or None."""
    raw = getattr(getattr(resp, "fp", None), "raw", None)
    return getattr(raw, "_sock", None)


class Fetcher:
    """``deadline_s``: wall-clock seconds for everything this Fetcher reads (None: no overall deadline);
    ``max_requests``: the request budget (redirects count; None: none); ``timeout_s``: the longest silence of
    one read; ``request_deadline_s``: the default wall-clock limit of one request."""

    def __init__(
        self,
        deadline_s: float | None = 600.0,
        max_requests: int | None = 5000,
        *,
        timeout_s: float = 20.0,
        request_deadline_s: float = 120.0,
        user_agent: str = USER_AGENT,
    ):
        self.deadline_s, self.max_requests = deadline_s, max_requests
        self.timeout_s, self.request_deadline_s, self.user_agent = timeout_s, request_deadline_s, user_agent
        self._end = None if deadline_s is None else time.monotonic() + deadline_s
        self.requests = 0
        self._lock = threading.Lock()
        self._opener = urllib.request.OpenerDirector()
        for h in (
            urllib.request.ProxyHandler(),
            urllib.request.UnknownHandler(),
            _HTTPHandler(),
            _HTTPSHandler(),
            urllib.request.HTTPDefaultErrorHandler(),
            _Redirects(self),
            urllib.request.HTTPErrorProcessor(),
        ):
            self._opener.add_handler(h)  # no FileHandler, FTPHandler or DataHandler: http(s) only

    # ------------------------------------------------------------------ budget and deadlines
    def _count(self, url: str) -> None:
        with self._lock:
            if self.max_requests is not None and self.requests >= self.max_requests:
                raise FetchError(
                    url, f"the request budget of {self.max_requests} requests is spent", kind="budget"
                )
            self.requests += 1
        if self._end is not None and time.monotonic() >= self._end:
            raise FetchError(url, f"the overall deadline of {self.deadline_s:g}s has passed", kind="deadline")

    def _request_end(self, deadline_s: float | None) -> float:
        end = time.monotonic() + (self.request_deadline_s if deadline_s is None else deadline_s)
        return end if self._end is None else min(end, self._end)

    def _left(self, url: str, end: float) -> float:
        left = end - time.monotonic()
        if left <= 0:
            raise FetchError(url, "no complete answer within the deadline", kind="deadline")
        return left

    # ------------------------------------------------------------------ opening
    def _open_raw(self, url: str, headers: dict[str, str] | None, end: float):
        why = url_problem(url)
        if why:
            raise FetchError(url, why, kind="scheme" if "only http" in why else "url")
        hdrs = {"User-Agent": self.user_agent, **(headers or {})}
        bare, user, password = strip_credentials(url)
        if user is not None and not any(k.lower() == "authorization" for k in hdrs):
            token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
            hdrs["Authorization"] = f"Basic {token}"  # as pip and uv send a URL's credentials
        self._count(url)
        left = self._left(url, end)
        req = urllib.request.Request(bare, headers=hdrs)
        guard = _tls.guard = _Guard(left)
        try:
            return self._opener.open(req, timeout=min(self.timeout_s, left)), guard
        except BaseException:
            guard.cancel()
            raise
        finally:
            _tls.guard = None

    def _open(self, url: str, headers: dict[str, str] | None, end: float, accept: tuple[int, ...] = ()):
        """(the response, its deadline guard): the caller cancels the guard and closes the response."""
        try:
            return self._open_raw(url, headers, end)
        except urllib.error.HTTPError as e:
            if e.code in accept:
                return e, None
            e.close()
            raise FetchError(
                url,
                f"HTTP {e.code} {e.reason}",
                kind="http",
                status=e.code,
                transient=e.code >= 500 or e.code == 429,
            ) from None
        except FetchError:
            raise
        except TimeoutError:
            kind = "deadline" if time.monotonic() >= end else "unreachable"
            raise FetchError(
                url, f"no answer within {self.timeout_s:g}s", kind=kind, transient=kind == "unreachable"
            ) from None
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
            if time.monotonic() >= end:
                raise FetchError(url, "no complete answer within the deadline", kind="deadline") from None
            reason = getattr(e, "reason", None) or e
            raise FetchError(url, f"unreachable ({reason})", kind="unreachable", transient=True) from None

    def _read_chunk(self, read, sock, url: str, end: float) -> bytes:
        """One read of at most CHUNK bytes, within the idle timeout and the deadline."""
        left = self._left(url, end)
        if sock is not None:
            sock.settimeout(min(self.timeout_s, left))
        try:
            return read(CHUNK)
        except TimeoutError:
            if time.monotonic() >= end:
                raise FetchError(url, "no complete answer within the deadline", kind="deadline") from None
            raise FetchError(
                url,
                f"the server sent nothing for {self.timeout_s:g}s",
                kind="unreachable",
                transient=True,
            ) from None
        except (OSError, ValueError, http.client.HTTPException) as e:
            if time.monotonic() >= end:
                raise FetchError(url, "no complete answer within the deadline", kind="deadline") from None
            raise FetchError(url, f"connection broken ({e})", kind="broken", transient=True) from None

    def _chunks(self, resp, url: str, max_bytes: int, end: float) -> Iterator[bytes]:
        """The decoded body in chunks, within ``max_bytes`` (raw and decoded) and the deadline."""
        _check_content_length(resp, url, max_bytes)
        dec = _Decoder(resp.headers.get("Content-Encoding", ""), url)
        raw = out = 0
        read = getattr(resp, "read1", None) or resp.read
        sock = _sock_of(resp)
        while True:
            chunk = self._read_chunk(read, sock, url, end)
            if not chunk:
                if time.monotonic() >= end:  # the guard shut the socket: not the end of the body
                    raise FetchError(url, "no complete answer within the deadline", kind="deadline")
                break
            raw += len(chunk)
            if raw > max_bytes:
                raise FetchError(url, f"the body is over the limit of {max_bytes} bytes", kind="too-large")
            data = dec.feed(chunk, max_bytes - out)
            out += len(data)
            if out > max_bytes:
                raise FetchError(
                    url, f"the decompressed body is over the limit of {max_bytes} bytes", kind="too-large"
                )
            if data:
                yield data
        data = dec.tail(max_bytes - out)
        if out + len(data) > max_bytes:
            raise FetchError(
                url, f"the decompressed body is over the limit of {max_bytes} bytes", kind="too-large"
            )
        if data:
            yield data

    # ------------------------------------------------------------------ the reads
    def fetch(
        self,
        url: str,
        *,
        max_bytes: int,
        deadline_s: float | None = None,
        headers: dict[str, str] | None = None,
        accept: tuple[int, ...] = (),
    ) -> Response:
        """One GET: a 2xx answer (or a status in ``accept``, e.g. 304, whose body is not read)."""
        end = self._request_end(deadline_s)
        resp, guard = self._open(url, headers, end, accept)
        try:
            status = getattr(resp, "status", None) or resp.getcode() or 200
            hdrs = {k.lower(): v for k, v in resp.headers.items()}
            if status in accept and not 200 <= status < 300:
                return Response(resp.geturl() or url, status, hdrs, b"")
            body = b"".join(self._chunks(resp, url, max_bytes, end))
            return Response(resp.geturl() or url, status, hdrs, body)
        finally:
            _done(resp, guard)

    def get(
        self,
        url: str,
        *,
        max_bytes: int,
        deadline_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> bytes:
        return self.fetch(url, max_bytes=max_bytes, deadline_s=deadline_s, headers=headers).body

    def get_range(
        self,
        url: str,
        start: int,
        end: int | None = None,
        *,
        max_bytes: int | None = None,
        deadline_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[bytes, int]:
        """Bytes ``start..end`` (inclusive) of ``url``, or its last ``-start`` bytes when ``start < 0`` and
        ``end`` is None: (the bytes, the file's total size).  A server that answers with the whole file is
        refused before its body is read."""
        rng = f"{start}" if start < 0 and end is None else f"{start}-{'' if end is None else end}"
        want = -start if start < 0 else (None if end is None else end - start + 1)
        cap = max_bytes if max_bytes is not None else want
        if cap is None or cap <= 0:
            raise FetchError(url, f"range {rng} has no bound", kind="url")
        t_end = self._request_end(deadline_s)
        resp, guard = self._open(
            url, {**(headers or {}), "Range": f"bytes={rng}", "Accept-Encoding": "identity"}, t_end
        )
        try:
            status = getattr(resp, "status", None) or resp.getcode() or 200
            cr = resp.headers.get("Content-Range", "")
            m = _CONTENT_RANGE.fullmatch(cr.strip())
            if status != 206 or not m:
                raise FetchError(
                    url,
                    "the server does not answer range requests (and offers no .metadata "
                    "file); reading the metadata would download the whole file",
                    kind="broken",
                )
            a, b, total = (int(x) for x in m.groups())
            if b < a or b >= total or (want is not None and b - a + 1 > want):
                raise FetchError(url, f"bad Content-Range {cr[:60]!r} for bytes={rng}", kind="broken")
            body = b"".join(self._chunks(resp, url, min(cap, b - a + 1), t_end))
            if len(body) != b - a + 1:
                raise FetchError(
                    url, f"{len(body)} bytes for Content-Range {cr[:60]!r}", kind="broken", transient=True
                )
            return body, total
        finally:
            _done(resp, guard)

    @contextmanager
    def stream(
        self,
        url: str,
        *,
        max_bytes: int,
        deadline_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> Iterator[_Reader]:
        """The body as a file-like object with ``read(n)`` (for tarfile's stream mode), bounded as above."""
        end = self._request_end(deadline_s)
        resp, guard = self._open(url, headers, end)
        try:
            yield _Reader(self._chunks(resp, url, max_bytes, end))
        finally:
            _done(resp, guard)

    def download(
        self,
        url: str,
        dest: Path,
        *,
        max_bytes: int,
        sha256: str | None = None,
        deadline_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        """Stream ``url`` into a temporary file in ``dest``'s folder (core.writer), check ``sha256`` (when
        given),
        rename it to ``dest``; returns the file's sha256.  Nothing is left behind on failure."""
        dest = Path(dest)
        want = sha256.lower() if sha256 else None
        if want is not None and not _SHA256.fullmatch(want):
            raise FetchError(
                url,
                f"the expected sha256 {sha256[:80]!r} is not 64 hex digits",
                kind="url",
                fix="Check the hash the index or the manifest gives for this file.",
            )
        h = hashlib.sha256()
        # through the one writer: never through a link planted at dest, nothing left behind on a failure (an
        # exception inside the block discards the temporary file)
        with (
            writer.atomic_output(dest, what="Download", force=True) as fh,
            self.stream(url, max_bytes=max_bytes, deadline_s=deadline_s, headers=headers) as r,
        ):
            for chunk in r.chunks:
                fh.write(chunk)
                h.update(chunk)
            digest = h.hexdigest()
            if want is not None and digest != want:
                err = FetchError(url, f"the file has sha256 {digest}, expected {want}", kind="sha256")
                err.digest = digest
                raise err
        return digest


def _done(resp, guard: _Guard | None) -> None:
    if guard is not None:
        guard.cancel()
    resp.close()


class _Reader:
    """A read-only file over a chunk iterator (what tarfile's ``r|gz`` mode reads)."""

    def __init__(self, chunks: Iterator[bytes]):
        self.chunks = chunks
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            out = self._buf + b"".join(self.chunks)
            self._buf = b""
            return out
        while len(self._buf) < n:
            nxt = next(self.chunks, b"")
            if not nxt:
                break
            self._buf += nxt
        out, self._buf = self._buf[:n], self._buf[n:]
        return out
