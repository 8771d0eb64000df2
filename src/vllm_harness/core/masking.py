"""One masking rule for every output: credentials in URLs never reach a terminal, a log, a JSON report or a
state file.

A URL's user information (``user:token@``) is found by parsing the URL with :mod:`urllib.parse`, not by a
pattern that stops at the first ``@``: a password may itself hold ``@``, ``:`` or ``%40``, and ``urlsplit``
takes the *last* ``@`` of the authority as the end of the credentials, as HTTP clients do.
:class:`MaskingStream` wraps ``sys.stdout``/``sys.stderr`` so that tables, progress lines and messages all
pass through :func:`mask`.
"""

from __future__ import annotations

import io
import re
from typing import TextIO
from urllib.parse import urlsplit, urlunsplit

# a URL candidate: scheme://authority... up to whitespace, quotes or brackets
_URL_RE = re.compile(r"""(?i)\b[a-z][a-z0-9+.-]{0,15}://[^\s"'<>`|\\\]\[(){}]+""")
MASK = "***"


# an '@' that ends user information: the host after it looks like one (a dotted name, an IP, localhost)
_HOST = r"(?:\[[0-9A-Fa-f:.]+\]|localhost|[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}|\d{1,3}(?:\.\d{1,3}){3})"
_CRED_RE = re.compile(r"^[^\s/?#]*?@(?=" + _HOST + r"(?::\d+)?(?:[/?#]|$))")
_CRED_ANY_RE = re.compile(r"^[^\s/@:]*:[^\s]*?@(?=" + _HOST + r"(?::\d+)?(?:[/?#]|$))")


def _mask_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    # the first '@' followed by a host: a password may hold '@', ':' or even an unencoded '/'
    # (https://bob:s3cr@t:pa/ss@pypi.example/...), which urlsplit alone would cut at the '/'
    for pattern in (_CRED_RE, _CRED_ANY_RE):
        m = pattern.match(rest)
        if m and (pattern is _CRED_RE or "/" in m.group(0)[:-1]):
            return f"{scheme}{sep}{MASK}@{rest[m.end():]}"
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" in parts.netloc:  # any other host (a single-label intranet name): urlsplit's authority, last '@'
        return urlunsplit(parts._replace(netloc=f"{MASK}@{parts.netloc.rpartition('@')[2]}"))
    return url


def mask(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``
    (``https://user:p@ss@host/simple`` -> ``https://***@host/simple``)."""
    if "://" not in text or "@" not in text:
        return text
    return _URL_RE.sub(lambda m: _mask_url(m.group(0)), text)


def strip_credentials(url: str) -> tuple[str, str | None, str | None]:
    """(the URL without user information, user, password), for a client that sends them as a header."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    from urllib.parse import unquote
    return urlunsplit(parts._replace(netloc=host)), unquote(user), unquote(password) if password else None


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
