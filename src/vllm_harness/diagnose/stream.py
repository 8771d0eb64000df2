"""A log of any size in one streaming pass over binary chunks (never read whole): the scan around the engine,
the report, and big files split at line boundaries into parts scanned by several processes."""
from __future__ import annotations

import io
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from vllm_harness.diagnose.engine import Scanner
from vllm_harness.diagnose.normalize import (
    FIRST_ERROR_ANCHORS,
    MAX_LINE_CHARS,
    WRAP_AFTER,
    WRAP_BEFORE,
    clean_segments,
    evidence_of,
)
from vllm_harness.diagnose.rank import rank_findings, standing
from vllm_harness.diagnose.rules import (
    Finding,
    Report,
    Rule,
    load_knowledge,
    render_fix,
)

#: Bytes read per chunk.
CHUNK_SIZE = 8 * 1024 * 1024
#: A line without newline is buffered up to this size before it is scanned in pieces.
LONG_LINE_BYTES = 64 * 1024 * 1024
#: Files of this size or more are scanned by several processes (see diagnose_path).
PARALLEL_MIN_BYTES = 64 * 1024 * 1024
#: At most this many processes.
MAX_WORKERS = 8
#: Bytes of context kept around a block at most (the lines before it, the lines after it).
CONTEXT_BYTES = 64 * 1024


class _Limited:
    """A binary reader that stops after ``limit`` bytes."""

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        self.raw = raw
        self.left = limit

    def read(self, size: int) -> bytes:
        if self.left <= 0:
            return b""
        data = self.raw.read(min(size, self.left))
        self.left -= len(data)
        return data


def _tail_lines(buf: bytes, count: int) -> bytes:
    """The last ``count`` lines of ``buf`` (which ends with a newline), at most CONTEXT_BYTES."""
    base = max(0, len(buf) - CONTEXT_BYTES)
    pos = len(buf) - 1
    for _ in range(count):
        pos = buf.rfind(b"\n", base, pos)
        if pos == -1:
            return buf[base:] if base == 0 else buf[buf.find(b"\n", base) + 1 :]
    return buf[pos + 1 :]


def _lookahead_cut(block: bytes, lo: int, long: bool) -> int:
    """Where the lines of ``block[lo:]`` that still lack their WRAP_AFTER following lines start
    (they are scanned with the next block); -1: wait for more data.  When the look-ahead would be
    over CONTEXT_BYTES, or ``long`` (a line too long to wait for), every complete line is taken."""
    pos = len(block)
    for _ in range(WRAP_AFTER + 1):
        pos = block.rfind(b"\n", lo, pos)
        if pos == -1:
            break
    if pos != -1 and len(block) - pos <= CONTEXT_BYTES:
        return pos + 1
    last = block.rfind(b"\n", lo)
    if last == -1 or (pos == -1 and not long):
        return -1
    return last + 1


def _scan(
    binary_stream: Any,
    rules: Sequence[Rule],
    engine: str | None = None,
    head: bytes = b"",
    stop: int | None = None,
) -> tuple[Scanner, int, int]:
    """Scan a stream; returns the scanner, the number of lines it went through and their bytes.

    ``head``: the bytes before the stream (context for its first lines); ``stop``: scan only the
    lines that start before this offset (the stream goes on a little, as context)."""
    scanner = Scanner(rules, engine)
    overlap = max((len(a) for a in scanner.anchor_rules), default=1) + max(
        len(a) for a in FIRST_ERROR_ANCHORS
    )
    ctx = _tail_lines(head, WRAP_BEFORE) if head else b""
    todo: list[bytes] = []  # bytes not scanned yet (the last lines wait for their look-ahead)
    todo_len = 0
    base = 0  # stream offset of todo's first byte
    line = 1
    while not scanner.done and (stop is None or base < stop):
        data = binary_stream.read(CHUNK_SIZE)
        eof = not data
        if not eof:
            todo.append(data)
            todo_len += len(data)
            if b"\n" not in data and todo_len < LONG_LINE_BYTES:
                continue
        block = ctx + b"".join(todo)
        lo = len(ctx)
        hi = len(block) if eof else _lookahead_cut(block, lo, todo_len >= LONG_LINE_BYTES)
        if hi == -1:
            if todo_len < LONG_LINE_BYTES:
                continue
            # a line longer than LONG_LINE_BYTES (progress bars, minified output): scan what we have
            cut = block.rfind(b"\r", lo) + 1
            # \r ends a redraw segment: no anchor spans it; else keep an overlap for an anchor cut in two
            hi, keep = (cut, cut) if cut else (len(block), len(block) - overlap)
            if stop is not None:
                hi = min(hi, lo + stop - base)
            scanner.scan_block(block, lo, hi, line)
            base += keep - lo
            ctx, todo = b"", [block[keep:]]
            todo_len = len(block) - keep
            continue
        if stop is not None:
            hi = min(hi, lo + stop - base)
        if hi > lo:
            line += scanner.scan_block(block, lo, hi, line)
        base += hi - lo
        if eof:
            break
        ctx = _tail_lines(block[:hi], WRAP_BEFORE) if hi > 0 else b""
        todo = [block[hi:]] if hi < len(block) else []
        todo_len = len(block) - hi
    return scanner, line - 1, base


def _report(
    rules: Sequence[Rule],
    found: Mapping[str, tuple[int, str, int, int]],
    first_error: list[tuple[int, str]],
    context: Mapping[str, Any] | None,
    name: str,
) -> Report:
    found = standing(rules, found)
    ids, explained, why = rank_findings(rules, found)
    by_id = {r.id: r for r in rules}
    findings = []
    for rid in ids:
        rule = by_id[rid]
        line_no, evidence, pattern, fix = found[rid]
        # values the log itself names (the cmake version it asks for) win over the variant's
        values = {**(context or {}), **rule.params(evidence, pattern)}
        findings.append(
            Finding(
                id=rid,
                severity=rule.severity,
                line=line_no,
                evidence=evidence,
                cause=rule.cause,
                fix=render_fix(rule.fixes[fix][1] if fix >= 0 else rule.fix, values),
                explained_by=explained[rid],
                rank=why[rid],
            )
        )
    first_error = [] if findings else first_error
    return Report(log=name, findings=findings, first_error_lines=first_error)


def diagnose_stream(
    binary_stream: BinaryIO,
    context: Mapping[str, Any] | None = None,
    *,
    rules: Sequence[Rule] | None = None,
    name: str = "<stream>",
    engine: str | None = None,
) -> Report:
    """Scan a binary stream (read in chunks, never whole) and return the report."""
    rules = load_knowledge() if rules is None else list(rules)
    scanner, _, _ = _scan(binary_stream, rules, engine)
    return _report(rules, scanner.found, scanner.first_error, context, name)


def _scan_range(
    path: str, start: int, end: int, rules: Sequence[Rule], engine: str | None = None
) -> tuple[dict, list, int, int]:
    """Worker: scan the lines of bytes [start, end) of a file (the lines around it are context).
    Returns the findings and first error block (line numbers relative to ``start``), the lines
    still missing from that block, and the number of newlines in the range."""
    with open(path, "rb") as fh:
        head = b""
        if start:
            fh.seek(max(0, start - CONTEXT_BYTES))
            head = fh.read(start - max(0, start - CONTEXT_BYTES))
        fh.seek(start)
        reader = _Limited(fh, end - start + CONTEXT_BYTES)
        scanner, lines, done = _scan(reader, rules, engine, head=head, stop=end - start)
        if done < end - start:  # stopped early: count the rest of the range for the line numbers
            fh.seek(start + done)
            rest = _Limited(fh, end - start - done)
            while True:
                data = rest.read(CHUNK_SIZE)
                if not data:
                    break
                lines += data.count(b"\n")
    return scanner.found, scanner.first_error, scanner.pending_error_lines, lines


def _split_points(path: str, size: int, parts: int) -> list[int]:
    points = [0]
    with open(path, "rb") as fh:
        for i in range(1, parts):
            fh.seek(max(points[-1], size * i // parts))
            while True:
                piece = fh.read(65536)
                if not piece:
                    break
                nl = piece.find(b"\n")
                if nl >= 0:
                    points.append(fh.tell() - len(piece) + nl + 1)
                    break
    points.append(size)
    return sorted(set(points))


def _diagnose_parallel(
    path: str, rules: Sequence[Rule], workers: int, engine: str | None = None
) -> tuple[dict, list]:
    import concurrent.futures
    import multiprocessing

    size = os.path.getsize(path)
    points = _split_points(path, size, workers)
    ctx_name = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with concurrent.futures.ProcessPoolExecutor(
        len(points) - 1, mp_context=multiprocessing.get_context(ctx_name)
    ) as pool:
        futures = [
            pool.submit(_scan_range, path, points[i], points[i + 1], rules, engine)
            for i in range(len(points) - 1)
        ]
        results = [f.result() for f in futures]
    found: dict[str, tuple[int, str, int, int]] = {}
    first_error: list[tuple[int, str]] = []
    offset = 0
    by_id = {r.id: r for r in rules}
    for index, (part_found, part_error, missing, lines) in enumerate(results):
        for rid, (line_no, evidence, pattern, fix) in part_found.items():
            # the first part's finding, unless it is weak and a later part has strong evidence
            if by_id[rid].takes(found.get(rid), pattern):
                found[rid] = (line_no + offset, evidence, pattern, fix)
        if not first_error and part_error:
            first_error = [(n + offset, text) for n, text in part_error]
            if missing:  # the block goes on in the next part(s)
                next_start = points[index + 1]
                with open(path, "rb") as fh:
                    fh.seek(next_start)
                    n = offset + lines + 1
                    for raw in fh:
                        first_error.append(
                            (n, evidence_of(" ".join(clean_segments(raw[:MAX_LINE_CHARS])), None))
                        )
                        n += 1
                        missing -= 1
                        if not missing:
                            break
        offset += lines
    return found, first_error


def diagnose_path(
    path: str | Path,
    context: Mapping[str, Any] | None = None,
    *,
    rules: Sequence[Rule] | None = None,
    workers: int | None = None,
    engine: str | None = None,
) -> Report:
    """Diagnose a log file; ``"-"`` reads standard input.

    ``workers``: processes scanning parts of a large file in parallel; ``None`` = one per CPU
    (at most :data:`MAX_WORKERS`) for regular files of :data:`PARALLEL_MIN_BYTES` or more,
    ``1`` = always a single streaming pass.  ``engine``: the prefilter (:data:`ENGINES`)."""
    rules = load_knowledge() if rules is None else list(rules)
    if str(path) == "-":
        stream = getattr(sys.stdin, "buffer", None)
        if stream is None:  # pragma: no cover - stdin replaced by a text stream
            stream = io.BytesIO(sys.stdin.read().encode("utf-8", "replace"))
        return diagnose_stream(stream, context, rules=rules, name="-", engine=engine)
    name = str(path)
    if workers is None:
        workers = min(os.cpu_count() or 1, MAX_WORKERS)
        try:
            if not Path(path).is_file() or os.path.getsize(path) < PARALLEL_MIN_BYTES:
                workers = 1
        except OSError:
            workers = 1
    if workers > 1:
        found, first_error = _diagnose_parallel(name, rules, workers, engine)
        return _report(rules, found, first_error, context, name)
    with open(path, "rb") as fh:
        return diagnose_stream(fh, context, rules=rules, name=name, engine=engine)
