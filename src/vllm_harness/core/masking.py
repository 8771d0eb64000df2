"""One masking rule for every output: credentials in URLs never reach a terminal, a log, a JSON report or a
state file.

The user information of a URL (``user:token@``) is found from the URL's structure, whatever characters it
holds, not by a character class that a password can step outside of:

* ``scheme://user:password@host``: the password is everything after the user name's ``:`` up to the last
  ``@`` on the line that is followed by a host (a password may hold ``@``, ``/``, ``#``, ``?``, quotes,
  brackets and spaces as the user typed them, and git and pip print it back as typed); when another URL
  follows on the line, the last such ``@`` before it;
* ``scheme://token@host``: a token holds no ``/``, ``?``, ``#`` or space, so it ends at the last ``@`` of the
  authority (``git+https://host/org/repo@v1.0``'s ``@`` is a revision in the path, not a credential);
* ``user:password@host:path``, git's scp-like form (no spaces in it, as on a command line).

Where a line is ambiguous the rule masks too much rather than too little
(``https://host:8080/x, see a@b.example`` loses ``host:8080/x, see a``).  :class:`MaskingStream` wraps
``sys.stdout``/``sys.stderr`` so that tables, progress lines and messages all pass through :func:`mask`.
"""

from __future__ import annotations

import io
import re
import string
from typing import TextIO
from urllib.parse import unquote, urlsplit

from vllm_harness.core.errors import UsageError

MASK = "***"

# where a URL starts: a scheme (git+https, HTTPS, file) and '://'
_SCHEME_RE = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{0,30}://")
# a user name: up to the first ':' (a password follows) or '@' (a token), or the end of the authority
_USER_RE = re.compile(r"[^:@/?#\s]*")
_AUTH_END_RE = re.compile(r"[/?#\s]")
_LINE_END_RE = re.compile(r"[\r\n]")
_AT_RE = re.compile("@")
# git's scp-like form user:password@host:path, a word of its own (not the 'https:' of a URL)
_SCP_RE = re.compile(r"""(?:^|(?<=[\s'"(<\[=,;`]))[A-Za-z0-9._~+-]+:(?!//)\S*@(?=[^\W_][\w.-]*:)""", re.M)
# what RFC 3986 lets user information hold as it is (anything else must be percent-encoded)
_USERINFO_OK = frozenset(string.ascii_letters + string.digits + "-._~" + "!$&'()*+,;=" + ":%")


def _host_follows(text: str, i: int, end: int) -> bool:
    """The '@' at ``i`` is followed by something a host starts with (a letter or digit, or an IPv6 '[')."""
    return i + 1 < end and (text[i + 1] == "[" or (text[i + 1].isalnum()))


def _userinfo_end(text: str, start: int) -> int | None:
    """The index of the '@' that ends the user information of the authority starting at ``start`` (just
    after ``scheme://``), or None when the URL has none."""
    le = _LINE_END_RE.search(text, start)
    line_end = le.start() if le else len(text)
    j = _USER_RE.match(text, start, line_end).end()  # type: ignore[union-attr]
    if j >= line_end:
        return None
    # a token (or a user alone): the last '@' of the authority, which ends at / ? # or space
    if text[j] == "@":
        ae = _AUTH_END_RE.search(text, j, line_end)
        return text.rfind("@", j, ae.start() if ae else line_end)
    if text[j] != ":":
        return None
    # user:password@ - the password may hold anything as typed: the last '@' before a host on this line
    ats = [m.start() for m in _AT_RE.finditer(text, j + 1, line_end)]
    cands = [i for i in ats if _host_follows(text, i, line_end)] or ats  # no host at all: any '@' ends it
    if not cands:
        return None
    for nxt in _SCHEME_RE.finditer(text, j + 1, line_end):  # another URL on the line: the last '@' before it
        before = [i for i in cands if i < nxt.start()]
        if before:
            return before[-1]
    return cands[-1]


def mask(text: str) -> str:
    """``text`` with the user information of every URL in it replaced by ``***``
    (``https://user:p@ss w/rd@host/simple`` -> ``https://***@host/simple``)."""
    if "@" not in text:
        return text
    out: list[str] = []
    pos = 0
    m = _SCHEME_RE.search(text)
    while m:
        end = _userinfo_end(text, m.end())
        if end is None:
            m = _SCHEME_RE.search(text, m.end())
            continue
        out += [text[pos : m.end()], MASK]
        pos = end
        m = _SCHEME_RE.search(text, end + 1)
    out.append(text[pos:])
    return _SCP_RE.sub(lambda s: s.group(0).split(":", 1)[0] + ":" + MASK + "@", "".join(out))


def split_userinfo(url: str) -> tuple[str | None, str]:
    """(the URL's user information as written, or None; the URL without it), by :func:`mask`'s rule."""
    m = _SCHEME_RE.match(url)
    end = _userinfo_end(url, m.end()) if m else None
    if m is None or end is None:
        return None, url
    return url[m.end() : end], url[: m.end()] + url[end + 1 :]


def strip_credentials(url: str) -> tuple[str, str | None, str | None]:
    """(the URL without user information, user, password), for a client that sends them as a header."""
    userinfo, bare = split_userinfo(url)
    if userinfo is None:
        return url, None, None
    user, _, password = userinfo.partition(":")
    return bare, unquote(user), unquote(password) if password else None


def check_url(url: str, flag: str) -> str:
    """``url`` when it is an http(s) or file URL whose user information is written as a URL must carry it
    (RFC 3986: letters, digits, ``-._~!$&'()*+,;=:`` and %-escapes); a UsageError naming ``flag`` otherwise,
    that never shows the password.  A password typed with ``#``, ``/``, ``@`` or a space is cut by every HTTP
    client (the part after ``#`` read as a fragment, after ``/`` as the path, the rest sent as a host
    name)."""
    userinfo, bare = split_userinfo(url)
    fix = ("Give the index URL, e.g. https://pypi.org/simple (credentials percent-encoded in it, or in "
           "~/.netrc).")
    if userinfo is not None and not set(userinfo) <= _USERINFO_OK:
        raise UsageError(
            f"{flag} {mask(url)}: the user name or password in the URL holds characters a URL cannot "
            'carry as they are (such as # ? / @ [ ] " \\ or a space).',
            "Percent-encode them (python3 -c 'import sys, urllib.parse; print(urllib.parse.quote("
            "sys.argv[1], safe=\"\"))' 'PASSWORD'), or leave the credentials out of the URL and "
            "put them in ~/.netrc.",
        )
    try:
        parts = urlsplit(bare)  # without the user information: nothing of the password in its errors
        parts.port  # noqa: B018 - a port that is not a number raises here
    except ValueError as e:
        raise UsageError(f"{flag} {mask(url)}: is not a URL ({e}).", fix) from None
    if parts.scheme.lower() not in ("http", "https", "file") or (
        parts.scheme.lower() != "file" and not parts.hostname
    ):
        raise UsageError(f"{flag} {mask(url)}: is not an http(s):// or file:// URL with a host.", fix)
    return url


class MaskingStream(io.TextIOBase):
    """A text stream that masks what is written to it and passes it on (line buffering is the target's)."""

    def __init__(self, target: TextIO) -> None:
        self._target = target

    def write(self, s: str) -> int:
        self._target.write(mask(s))
        return len(s)

    def flush(self) -> None:
        self._target.flush()

    def isatty(self) -> bool:
        return self._target.isatty()

    def fileno(self) -> int:
        return self._target.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._target, "encoding", "utf-8")

    def writable(self) -> bool:
        return True
