"""Lines as a person reads them: ANSI colours, CR redraws, timestamps, CI and docker prefixes, uv/pip box
prefixes stripped; messages that a terminal or a paste wrapped joined again, keeping the original line
numbers."""

from __future__ import annotations

import re
from collections.abc import Sequence

#: Characters of one line (around each anchor) that the full regexes look at.
MAX_LINE_CHARS = 4000
#: Characters of evidence kept in a finding.
EVIDENCE_CHARS = 300


#: Lines before and after an anchor's line that may belong to its message (wrapped lines).
WRAP_BEFORE = 1


WRAP_AFTER = 2


#: Characters a wrapped match reaches from its anchor (at most) into the line before or after.
JOIN_REACH = 160


#: A line at least this wide (as shown, prefix included) may go on in the next line.
WRAP_MIN_CHARS = 45


#: The narrowest width at which tools wrap their messages (a terminal that reports no size: 80).  A
#: narrower line goes on in the next one too when the next line's first word would not have fit on
#: it: uv and pip break only at spaces, so a long word (a URL, a path, a repr) leaves a short line.
WRAP_WIDTH = 80


# ANSI CSI / OSC / two-character escape sequences.
_ANSI_RE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")


# Line prefixes: timestamps of docker buildkit, CI and loggers; indentation and box drawing.
_STAMP = (
    r"#\d+ \d+(?:\.\d+)? |\d+\.\d+ {2,}|"  # docker buildkit (``#12 3.456 ``, ``6884.2   ``)
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z? |"  # CI (GitHub Actions, ...)
    r"\[\s*\d+(?:\.\d+)?\] |"  # ``[  136.92] `` (seconds since start)
    r"\[?\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)?\]? |"  # logging
    r"\[\d\d:\d\d:\d\d(?:\.\d+)?\] "  # ``[12:00:01] ``
)


_INDENT = r"[ \t]+|[│║┃|╎┆┊>]+|[╰╭├└┌─━╴]+(?:▶|─>|>)?"


# Timestamps added to every line by CI, docker or a logger: never part of a message.
_STAMP_RE = re.compile(r"^(?:" + _STAMP + r")+")


# Decorations before the real text of a line: the stamps, indentation, pip's/uv's box drawing,
# ``> `` quotes.
_PREFIX_RE = re.compile(r"^(?:" + _STAMP + r"|" + _INDENT + r")+")


# A line that starts a message of its own (never the continuation of a wrapped one).
_NEW_RECORD_RE = re.compile(
    r"(?:\[\d+/\d+\]|(?:ERROR|WARNING|INFO|DEBUG|CRITICAL|FATAL)\b|(?:error|warning|note|hint|help|fatal)(?:\[[\w-]+\])?:"
    r"|Caused by:|CMake (?:Error|Warning)|Traceback \(|File \"|\$ |[×✗✓⚠]|-- "
    r"|\w+(?:Error|Exception|Warning):)"
)


# The first line of an error block (when no known failure is recognised).
FIRST_ERROR_RE = re.compile(
    r"(?<![\w-])error(?:\[[\w-]+\])?\s*:"  # gcc/clang/pip "error:", nvcc "error   :"
    r"|\bERROR\b"  # pip "ERROR:", vLLM "ERROR 05-07 ..."
    r"|\bError(?::| at\b| -)|\] Error \d"  # "Error: ...", "CMake Error at", make "] Error 1"
    r"|\w(?:Error|Exception):(?: |$)"  # RuntimeError: ..., subprocess.CalledProcessError: ...
    r"|\bFAILED\b"
    r"|Traceback \(most recent call last\)"
    r"|\bfatal(?: error)?\s*:"
    r"|#error\b"
    r"|ninja: build stopped"
)


#: Literals one of which every line matching FIRST_ERROR_RE holds.
FIRST_ERROR_ANCHORS = (
    b"error:",
    b"error :",
    b"error  ",
    b"error[",
    b"ERROR",
    b"Error:",
    b"Error at",
    b"Error -",
    b"] Error ",
    b"Exception:",
    b"FAILED",
    b"Traceback (most",
    b"fatal:",
    b"fatal error",
    b"#error",
    b": build stopped",
)


def clean_segments(raw: bytes) -> list[str]:
    """Decode one (part of a) line and return its cleaned ``\\r`` segments."""
    text = raw.decode("utf-8", "replace")
    if "\x1b" in text:
        text = _ANSI_RE.sub("", text)
    out = []
    for seg in text.split("\r"):
        seg = _PREFIX_RE.sub("", seg).rstrip()
        if seg:
            out.append(seg)
    return out


def _shown(raw: bytes) -> tuple[str, str]:
    """One physical line as a terminal shows it (ANSI codes removed, the last ``\\r`` redraw) and
    the same without its decoration prefix (:data:`_PREFIX_RE`), both without trailing space;
    timestamps (:data:`_STAMP_RE`) are not part of what is shown."""
    text = raw.decode("utf-8", "replace")
    if "\x1b" in text:
        text = _ANSI_RE.sub("", text)
    segs = [seg for seg in text.split("\r") if seg.strip()]
    shown = segs[-1].rstrip() if segs else ""
    shown = _STAMP_RE.sub("", shown)
    return shown, _PREFIX_RE.sub("", shown)


def _continues(shown: str, next_line: tuple[str, str]) -> bool:
    """May a line shown as ``shown`` go on in the next one (shown, cleaned: wrapped at the terminal's
    width or by the tool: pip, uv, rich)?  Only a wide line does (or one that the next line's first
    word would have made too wide, when that line is indented as a tool's continuation), and not
    into the start of a new message."""
    next_shown, next_clean = next_line
    if not next_clean or _NEW_RECORD_RE.match(next_clean):
        return False
    if len(shown) >= WRAP_MIN_CHARS:
        return True
    return next_shown != next_clean and len(shown) + 1 + len(next_clean.split(None, 1)[0]) > WRAP_WIDTH


def _word_after(block: bytes, pos: int) -> int:
    """Bytes of the first word of the line starting at ``pos`` (after its indentation; counted up
    to a line's width or so: only whether it is long matters)."""
    stop = min(len(block), pos + 2 * WRAP_WIDTH)
    end = block.find(b"\n", pos, stop)
    line = block[pos : end if end != -1 else stop].lstrip()
    cut = line.find(b" ")
    return len(line) if cut == -1 else cut


def _may_go_on(block: bytes, start: int, end: int) -> bool:
    """Can the line ``block[start:end]`` go on in the next one (bytes >= characters shown: a
    cheap bound of :func:`_continues`)?"""
    width = end - start
    return width >= WRAP_MIN_CHARS or (
        end < len(block) and width + 1 + _word_after(block, end + 1) > WRAP_WIDTH
    )


def wrapped_messages(
    block: bytes, ls: int, le: int, line_no: int, before: bool = True, after: bool = True
) -> list[tuple[str, list[tuple[int, int]]]]:
    """The message that the line ``block[ls:le]`` (number ``line_no``) belongs to when it was
    wrapped: the line joined with the wide lines before it and the lines it goes on in (at most
    :data:`WRAP_BEFORE` and :data:`WRAP_AFTER`).  Where a break could be mid-word (no space or
    indentation at it) there are two readings, joined with nothing and with a space.  Returns
    ``[(text, [(offset in text, line number), ...]), ...]``; nothing when the line stands alone.
    ``before``/``after``: look at the lines before / after it at all."""
    # bytes >= characters shown: a short line neither goes on nor follows a short line
    prev_start = block.rfind(b"\n", 0, ls - 1) + 1 if ls > 0 else ls
    long_prev = before and _may_go_on(block, prev_start, ls - 1)
    if not long_prev and (not after or not _may_go_on(block, ls, le)):
        return []
    line = _shown(block[ls:le])
    run = [line]
    first = line_no
    # backwards: wide lines that go on in this one
    pos, prev_ok = ls, long_prev
    while prev_ok and len(run) <= WRAP_BEFORE and pos > 0:
        start = block.rfind(b"\n", 0, pos - 1) + 1
        if pos - 1 - start > MAX_LINE_CHARS:
            break
        prev = _shown(block[start : pos - 1])
        if not _continues(prev[0], run[0]):
            break
        run.insert(0, prev)
        first -= 1
        pos = start
        prev_ok = start > 0 and _may_go_on(block, block.rfind(b"\n", 0, start - 1) + 1, start - 1)
    # forwards: the lines this one goes on in
    pos, count = le, 0
    while after and count < WRAP_AFTER and pos < len(block):
        end = block.find(b"\n", pos + 1)
        if end == -1:
            end = len(block)
        if end - pos - 1 > MAX_LINE_CHARS:
            break
        nxt = _shown(block[pos + 1 : end])
        if not _continues(run[-1][0], nxt):
            break
        run.append(nxt)
        pos, count = end, count + 1
    if len(run) == 1:
        return []
    out = []
    ambiguous = False
    for glue in ("", " "):
        parts: list[str] = []
        starts: list[tuple[int, int]] = []
        size = 0
        for k, (shown, clean) in enumerate(run):
            if k:
                # a break at a space, or a continuation indented by the tool: a word boundary
                if shown != clean or run[k - 1][0].endswith((" ", "\t")):
                    sep = " "
                else:
                    sep, ambiguous = glue, True
                parts.append(sep)
                size += len(sep)
            starts.append((size, first + k))
            parts.append(clean)
            size += len(clean)
        out.append(("".join(parts), starts))
        if not ambiguous:
            break
    return out


def first_match(
    patterns: Sequence[re.Pattern[str]],
    text: str,
    starts: list[tuple[int, int]] | None = None,
    line_no: int = 0,
) -> tuple[re.Match[str] | None, int]:
    """The first pattern's match in ``text`` and its index (for a joined message: only a match
    that covers part of line ``line_no``)."""
    for n, pat in enumerate(patterns):
        hit = pat.search(text)
        if hit and (starts is None or _touches(hit, starts, line_no)):
            return hit, n
    return None, -1


def _touches(hit: re.Match[str], starts: list[tuple[int, int]], line_no: int) -> bool:
    """Does the match cover part of line ``line_no`` of a joined message?"""
    for k, (off, n) in enumerate(starts):
        if n == line_no:
            end = starts[k + 1][0] if k + 1 < len(starts) else 1 << 62
            return hit.start() < end and hit.end() > off
    return False


def evidence_of(text: str, match: re.Match[str] | None) -> str:
    if len(text) <= EVIDENCE_CHARS:
        return text
    start = 0 if match is None else max(0, min(match.start() - 60, len(text) - EVIDENCE_CHARS))
    piece = text[start : start + EVIDENCE_CHARS]
    return ("…" if start else "") + piece + ("…" if start + EVIDENCE_CHARS < len(text) else "")
