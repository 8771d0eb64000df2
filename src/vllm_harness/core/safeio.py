"""Bounded reading of the files a user hands the harness (variant files, machine profiles, state files).

Every such file is checked for its type before a byte is read (a FIFO, ``/dev/zero`` or a directory is
refused, never read forever) and for its size (the limit is checked on the open file, and the read stops one
byte past it, so a file that grows while it is read cannot exhaust memory).  TOML is scanned before it is
parsed: the standard parser recurses on deep nesting and takes quadratic time and memory on long dotted
keys (``a.a.a...=1``: 40 kB costs 13 s and 1.5 GB), so nesting depth, key length and key count are capped
first.  Every problem is one :class:`UsageError` naming the file and the fix (exit 2).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from vllm_harness.core.errors import UsageError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - 3.10
    import tomli as tomllib  # type: ignore[no-redef]

MiB = 1 << 20
TOML_MAX_BYTES = MiB
TOML_MAX_DEPTH = 16        # [..] / {..} nesting, table header parts, dotted key parts
TOML_MAX_KEYS = 20_000     # keys and array items in the whole document
JSON_MAX_BYTES = 16 * MiB


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, in words (for a refusal naming it)."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def read_bytes(path: str | Path, what: str, limit: int, fix: str = "") -> bytes:
    """The bytes of the regular file ``path`` (at most ``limit``), or a UsageError naming ``what``."""
    p = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO without a writer returns at once instead of waiting for one
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise UsageError(f"{what} {p}: no such file.", fix or "Check the path.") from None
    except IsADirectoryError:
        raise UsageError(
            f"{what} {p}: is a directory, not a file.", fix or "Give the path of a file."
        ) from None
    except OSError as e:
        raise UsageError(
            f"{what} {p}: cannot be read ({e.strerror}).", fix or "Check the path and its permissions."
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(
                f"{what} {p}: is {file_kind(st.st_mode)}, not a regular file; nothing was read.",
                fix or "Give the path of a regular file.",
            )
        if st.st_size > limit:
            raise UsageError(
                f"{what} {p}: is {st.st_size} bytes, too large (more than the {limit} bytes such a "
                "file may have); nothing was read.",
                fix or f"Give a file under {limit} bytes.",
            )
        chunks, got = [], 0
        while got <= limit:
            b = os.read(fd, min(1 << 16, limit + 1 - got))
            if not b:
                break
            chunks.append(b)
            got += len(b)
        if got > limit:
            raise UsageError(
                f"{what} {p}: grew past {limit} bytes while it was read.",
                fix or f"Give a file under {limit} bytes.",
            )
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(path: str | Path, what: str, limit: int, fix: str = "") -> str:
    raw = read_bytes(path, what, limit, fix)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{what} {path}: is not UTF-8 text (byte {e.start}).", fix or "Save it as UTF-8."
        ) from None


# ------------------------------------------------------------------------------------------------ TOML


class TomlLimit(ValueError):
    """The document goes past one of the limits (message says which, and on which line)."""


def _scan_string(text: str, i: int) -> int:
    """Index just past the string starting at ``text[i]`` (basic, literal, or their multi-line forms)."""
    q = text[i]
    n = len(text)
    if text.startswith(q * 3, i):
        j = i + 3
        while True:
            k = text.find(q * 3, j) if q == "'" else _find_unescaped(text, q * 3, j)
            if k < 0:
                return n
            k += 3
            for _ in range(2):  # a closing delimiter may be preceded by up to two quotes: """""
                if k < n and text[k] == q:
                    k += 1
            return k
    j = i + 1
    while j < n:
        c = text[j]
        if c == "\\" and q == '"':
            j += 2
            continue
        if c == q or c == "\n":
            return j + 1
        j += 1
    return n


def _find_unescaped(text: str, needle: str, j: int) -> int:
    while True:
        k = text.find(needle, j)
        if k < 0:
            return -1
        back = 0
        while k - back - 1 >= j and text[k - back - 1] == "\\":
            back += 1
        if back % 2 == 0:
            return k
        j = k + 1


class _TomlScan:
    """The lexical state of :func:`prescan_toml`: one handler per character that matters."""

    def __init__(self, text: str, max_depth: int, max_keys: int) -> None:
        self.text, self.n = text, len(text)
        self.max_depth, self.max_keys = max_depth, max_keys
        self.dots = 0  # dots in the key being read
        self.items = 0
        self.line = 1
        self.in_key = True  # at the start of a line (depth 0) or after '{' / ',' inside an inline table
        self.stack: list[str] = []  # open [ / { outside strings, and "header" for a table header

    def run(self) -> None:
        handlers = {
            "\n": self._newline, "#": self._comment, '"': self._string, "'": self._string,
            "[": self._open, "{": self._open, "]": self._close, "}": self._close,
            ".": self._dot, "=": self._equals, ",": self._comma,
        }
        i, n, text = 0, self.n, self.text
        while i < n:
            handler = handlers.get(text[i])
            i = handler(i) if handler else i + 1

    def _count_item(self, what: str) -> None:
        self.items += 1
        if self.items > self.max_keys:
            raise TomlLimit(f"line {self.line}: more than {self.max_keys} {what}")

    def _newline(self, i: int) -> int:
        self.line += 1
        if not self.stack:
            self.in_key, self.dots = True, 0
        return i + 1

    def _comment(self, i: int) -> int:
        k = self.text.find("\n", i)
        return self.n if k < 0 else k

    def _string(self, i: int) -> int:
        j = _scan_string(self.text, i)
        self.line += self.text.count("\n", i, j)
        return j

    def _open(self, i: int) -> int:
        c = self.text[i]
        # a table header [a.b] / [[a.b]] counts its parts like a dotted key
        if c == "[" and not self.stack and self.in_key:
            self.in_key, self.dots = True, 0
            while i < self.n and self.text[i] == "[":
                i += 1
            self.stack.append("header")
            return i
        self.stack.append(c)
        depth = sum(1 for s in self.stack if s != "header")
        if depth > self.max_depth:
            raise TomlLimit(f"line {self.line}: nesting deeper than {self.max_depth} levels")
        self.in_key = c == "{"
        self.dots = 0
        return i + 1

    def _close(self, i: int) -> int:
        if self.stack and self.stack.pop() == "header":
            while i < self.n and self.text[i] == "]":
                i += 1
            self.in_key = False
            return i
        return i + 1

    def _dot(self, i: int) -> int:
        if self.in_key or (self.stack and self.stack[-1] == "header"):
            self.dots += 1
            if self.dots >= self.max_depth:
                raise TomlLimit(f"line {self.line}: a key of more than {self.max_depth} dotted parts")
        return i + 1

    def _equals(self, i: int) -> int:
        if self.in_key:
            self._count_item("keys")
        self.in_key, self.dots = False, 0
        return i + 1

    def _comma(self, i: int) -> int:
        self._count_item("keys and items")
        if self.stack and self.stack[-1] == "{":
            self.in_key, self.dots = True, 0
        return i + 1


def prescan_toml(text: str, max_depth: int = TOML_MAX_DEPTH, max_keys: int = TOML_MAX_KEYS) -> None:
    """Raise :class:`TomlLimit` when ``text`` nests deeper than ``max_depth`` (brackets, braces, dotted key
    or table-header parts) or holds more than ``max_keys`` keys and items.  A lexical pass: strings and
    comments are skipped, so values may hold any text."""
    _TomlScan(text, max_depth, max_keys).run()


def parse_toml(
    text: str, what: str, path: str | Path, fix: str = "Correct the TOML syntax at that line."
) -> dict:
    """tomllib.loads with the limits above; every failure is one UsageError naming the file."""
    try:
        prescan_toml(text)
    except TomlLimit as e:
        raise UsageError(
            f"{what} {path}: {e}, past what the harness reads; nothing was used.",
            "Flatten the file (this is not a variant, profile or patch the harness writes).",
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{what} {path}: is not valid TOML ({e}).", fix) from None
    except (RecursionError, MemoryError):  # pragma: no cover - the prescan bounds both
        raise UsageError(f"{what} {path}: is nested too deeply to parse.", "Flatten the file.") from None


def load_toml(
    path: str | Path,
    what: str,
    limit: int = TOML_MAX_BYTES,
    fix: str = "Correct the TOML syntax at that line.",
) -> dict:
    return parse_toml(read_text(path, what, limit), what, path, fix)


def load_json(path: str | Path, what: str, reset: str, limit: int = JSON_MAX_BYTES) -> Any:
    """A state file the harness wrote itself; a broken one is reported with ``reset`` (the command that
    resets it)."""
    raw = read_bytes(path, what, limit, reset)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise UsageError(f"{what} {path} is corrupt (not the JSON the harness writes).", reset) from None


def sha256_file(path: str | Path) -> str:
    """The sha256 of a (possibly large) file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
