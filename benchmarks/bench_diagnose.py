"""Benchmark ``vllm_harness.diagnose.diagnose_path`` against ``grep -E -f`` on a 200 MB log.

The log is built (under /tmp) from the real lines of the test corpus (tests/logs/*.log):

* ``worst``: only corpus lines that match no pattern of the knowledge base and start no error
  block (many of them are near misses: they hold prefilter anchors), repeated in random order,
  with one known failure (cmake-too-old) at the very end.  Both tools must read everything;
  this is the case that the 2x target is about.
* ``mixed``: all corpus lines in random order.  grep still reads everything; diagnose stops as
  soon as every failure id has been found (one finding per id is all it reports).

grep gets the same patterns, translated from Python regex syntax to POSIX ERE.
diagnose runs with its default prefilter engine (Hyperscan where installed) in one process and
with the default process count, and once more in one process with the pure-``re`` engine (the
fallback where Hyperscan has no wheel).  One run each; prints a table and a JSON line.

    PYTHONPATH=src python benchmarks/bench_diagnose.py [--mb 200] [--keep]

``--accuracy`` measures instead how often diagnose names the right root cause on the corpus
(tests/logs/index.toml and every index-*.toml), per part of the split (``tune``: the rules were
written on it; ``eval``: held back, only measured) and per id, plus the same logs re-wrapped at
80 columns (mid-word, as a terminal does, and at spaces with indentation, as uv and pip do);
``--accuracy-out FILE`` also writes the tables as Markdown.

    PYTHONPATH=src python benchmarks/bench_diagnose.py --accuracy [--accuracy-out FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vllm_harness import diagnose as dg  # noqa: E402
from vllm_harness.diagnose import corpus as dgc  # noqa: E402
from vllm_harness.diagnose import stream as dgs  # noqa: E402
from vllm_harness.diagnose.normalize import (  # noqa: E402
    FIRST_ERROR_ANCHORS,
    FIRST_ERROR_RE,
    clean_segments,
    first_match,
    wrapped_messages,
)
from vllm_harness.diagnose.stream import MAX_WORKERS  # noqa: E402

CORPUS = ROOT / "tests" / "logs"


def to_ere(pattern: str) -> str:
    """Translate the Python regexes of the knowledge base to POSIX ERE (GNU grep)."""
    # the one lookahead, "(?!\{\})[^)]*" = a non-empty text not starting with "{"
    pattern = pattern.replace(r"(?!\{\})[^)]*", r"[^{)][^)]*")
    pattern = pattern.replace("(?:", "(")
    out: list[str] = []
    in_class = False
    i = 0
    outside = {"d": "[0-9]", "w": "[[:alnum:]_]", "s": "[[:space:]]", "S": "[^[:space:]]", "D": "[^0-9]"}
    inside = {"d": "0-9", "w": "[:alnum:]_", "s": "[:space:]"}
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            n = pattern[i + 1]
            if in_class and n in inside:
                out.append(inside[n])
            elif not in_class and n in outside:
                out.append(outside[n])
            else:
                out.append("\\" + n)
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class and out and out[-1] not in ("[", "[^"):
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


def corpus_logs() -> list[Path]:
    """The corpus's logs: those of tests/logs/index.toml and every tests/logs/index-*.toml."""
    return [CORPUS / e["file"] for e in dg.load_corpus(CORPUS) if (CORPUS / e["file"]).is_file()]


def corpus_lines(quiet_only: bool = False, rules: list[dg.Rule] | None = None) -> list[bytes]:
    """The lines of the corpus's logs; ``quiet_only``: only those that match no pattern, alone or
    as part of the message they were wrapped into in their log, and start no error block."""
    lines: list[bytes] = []
    for path in corpus_logs():
        data = path.read_bytes()
        starts = [0]
        for line in data.splitlines(keepends=True):
            starts.append(starts[-1] + len(line))
            if not quiet_only:
                lines.append(line.rstrip(b"\r\n") + b"\n")
                continue
            ls, n = starts[-2], len(starts) - 1
            le = ls + len(line.rstrip(b"\r\n"))
            if is_quiet(data[ls:le], rules or []) and not any(
                first_match(_patterns(r, text), text, at, n)[0]
                for text, at in wrapped_messages(data, ls, le, n)
                for r in rules or []
            ):
                lines.append(data[ls:le] + b"\n")
    return lines


def is_quiet(line: bytes, rules: list[dg.Rule]) -> bool:
    segs = clean_segments(line)
    if any(FIRST_ERROR_RE.search(s) for s in segs):
        return False
    return not any(p.search(s) for r in rules for s in segs for p in _patterns(r, s))


def _patterns(rule: dg.Rule, text: str) -> tuple:
    """The patterns diagnose tries on ``text``: case-insensitive ones on a line without capitals."""
    return rule.folded if text == text.lower() else rule.patterns


def build(path: Path, lines: list[bytes], size: int, tail: bytes = b"", seed: int = 7) -> None:
    rng = random.Random(seed)
    written = 0
    with path.open("wb") as fh:
        batch: list[bytes] = []
        while written < size:
            line = rng.choice(lines)
            batch.append(line)
            written += len(line)
            if len(batch) >= 10000:
                fh.write(b"".join(batch))
                batch.clear()
        fh.write(b"".join(batch))
        fh.write(tail)


def time_grep(patterns: Path, log: Path, mode: str = "-E") -> tuple[float, str]:
    grep = shutil.which("grep")
    if grep is None:
        return float("nan"), "grep not found"
    t0 = time.perf_counter()
    proc = subprocess.run([grep, mode, "-c", "-f", str(patterns), str(log)], capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        return float("nan"), proc.stderr.strip()
    return elapsed, proc.stdout.strip() + " matching lines"


def time_diagnose(log: Path, workers: int | None, engine: str | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    report = dg.diagnose_path(log, workers=workers, engine=engine)
    elapsed = time.perf_counter() - t0
    ids = report.ids
    return elapsed, f"{len(ids)} ids: {', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''}"


def rewrap(data: bytes, width: int, hard: bool) -> bytes:
    """The log as a terminal (``hard``: cut at ``width``, mid-word) or a tool such as uv or pip
    (at spaces, continuation lines indented) would wrap it."""
    out: list[str] = []
    for line in data.decode("utf-8", "replace").split("\n"):
        if len(line) <= width:
            out.append(line)
        elif hard:
            out.extend(line[i : i + width] for i in range(0, len(line), width))
        else:
            indent = " " * (len(line) - len(line.lstrip()) + 2)
            out.extend(textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False))
    return "\n".join(out).encode()


def _pct(num: int, den: int) -> str:
    return f"{100 * num / den:.1f} %" if den else "-"


def accuracy_tables(entries: list[dict]) -> tuple[str, dict]:
    """Markdown tables of :func:`vllm_harness.diagnose.accuracy` on the corpus, and the numbers."""
    measure = dg.accuracy(entries, CORPUS)
    rules = dg.load_knowledge()
    files = sorted({e["index"] for e in entries})
    lines = [
        f"Corpus: {len(entries)} logs ({', '.join(f'`{f}`' for f in files)}); split once by source thread: "
        f"the logs the rules were written on before issue 19 (`index.toml`) are `tune`, every other thread "
        f"goes to `eval` when the SHA-256 of its normalised URL is 0 modulo {dgc.EVAL_SHARE} "
        f"(`vllm_harness.diagnose.corpus_split`). Rules are tuned on `tune` only; `eval` is only measured.",
        "",
        "| part | logs | failing logs | root first | controls | false alarms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for part in ("tune", "eval", "all"):
        m = measure[part]
        lines.append(
            f"| {part} | {m['logs']} | {m['failing']} | {m['root_first']} ({_pct(m['root_first'], m['failing'])}) "
            f"| {m['controls']} | {m['false_alarms']} |"
        )
    lines += [
        "",
        "Root first = the expected root id is the first finding; false alarm = any finding on a control "
        "(a clean log, or a failure outside the list). Per id (the root, i.e. the first finding): "
        "precision = right / reported first, recall = right / expected.",
        "",
        "| id | tune logs | tune precision | tune recall | eval logs | eval precision | eval recall |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for rule in rules:
        cells = []
        for part in ("tune", "eval"):
            c = measure[part]["per_id"].get(rule.id, {"tp": 0, "fp": 0, "fn": 0})
            n = c["tp"] + c["fn"]
            cells += [str(n), _pct(c["tp"], c["tp"] + c["fp"]), _pct(c["tp"], n)]
        if cells[0] != "0" or cells[3] != "0" or "-" not in (cells[1], cells[4]):
            lines.append(f"| `{rule.id}` | " + " | ".join(cells) + " |")
    lines += ["", "Misses and false alarms:", ""]
    for part in ("tune", "eval"):
        for r in measure[part]["misses"]:
            lines.append(f"- {part}: `{r['file']}`: expected `{r['expected']}`, got {r['ids'] or 'nothing'}")
        for r in measure[part]["alarms"]:
            lines.append(f"- {part}: control `{r['file']}`: false alarm {r['ids']}")
    lines += [
        "",
        "The same logs re-wrapped at 80 columns (every longer line): mid-word as a terminal does, and at "
        "spaces with indented continuations as uv and pip do (root first on the failing logs):",
        "",
        "| part | as posted | terminal-wrapped at 80 | tool-wrapped at 80 |",
        "|---|---:|---:|---:|",
    ]
    wraps = {}
    for part in ("tune", "eval"):
        failing = [e for e in entries if e["split"] == part and e["expected"]]
        row = [f"{measure[part]['root_first']}/{len(failing)}"]
        for hard in (True, False):
            ok = 0
            for e in failing:
                data = rewrap((CORPUS / e["file"]).read_bytes(), 80, hard)
                ids = dg.diagnose_stream(io.BytesIO(data), rules=rules).ids
                ok += ids[:1] == e["expected"][:1]
            row.append(f"{ok}/{len(failing)} ({_pct(ok, len(failing))})")
            wraps[f"{part}_{'hard' if hard else 'tool'}80"] = ok
        lines.append(f"| {part} | " + " | ".join(row) + " |")
    numbers = {
        part: {k: v for k, v in measure[part].items() if k not in ("misses", "alarms")} for part in ("tune", "eval", "all")
    }
    numbers["rewrapped_root_first"] = wraps
    return "\n".join(lines) + "\n", numbers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200, help="size of each synthetic log in MB (default 200)")
    ap.add_argument("--keep", action="store_true", help="keep the generated logs in /tmp")
    ap.add_argument("--accuracy", action="store_true", help="measure root-cause accuracy on the corpus instead")
    ap.add_argument("--accuracy-out", metavar="FILE", help="with --accuracy: also write the tables (Markdown)")
    args = ap.parse_args(argv)
    if args.accuracy:
        text, numbers = accuracy_tables(dg.load_corpus(CORPUS))
        print(text)
        print(json.dumps({"benchmark": "diagnose_accuracy", "results": numbers}))
        if args.accuracy_out:
            Path(args.accuracy_out).write_text(
                "# diagnose: accuracy on the corpus of real logs\n\n"
                "`PYTHONPATH=src python benchmarks/bench_diagnose.py --accuracy` (one run).\n\n" + text,
                encoding="utf-8",
            )
        return 0

    rules = dg.load_knowledge()
    lines = corpus_lines()
    quiet = corpus_lines(quiet_only=True, rules=rules)
    size = args.mb * 1024 * 1024
    tmp = Path(tempfile.mkdtemp(prefix="bench-diagnose-", dir="/tmp"))
    patterns = tmp / "patterns.ere"
    patterns.write_text(
        "".join(to_ere(p.pattern) + "\n" for r in rules for p in r.patterns), encoding="utf-8"
    )
    # the prefilter's literals alone: what any scanner must at least look for (a reference that
    # does not grow with the regexes: grep -E's automaton gets slower as patterns are added)
    literals = tmp / "anchors.txt"
    # every literal the prefilter looks for from the start: the anchors, their lower-cased forms (a message
    # pasted in lower case) and the first-error anchors; and, for comparison, without the lower-cased ones
    words = sorted({a for r in rules for a in r.anchors + r.lower_anchors} | set(FIRST_ERROR_ANCHORS))
    literals.write_bytes(b"\n".join(words) + b"\n")
    cased = tmp / "anchors-cased.txt"
    cased_words = sorted({a for r in rules for a in r.anchors} | set(FIRST_ERROR_ANCHORS))
    cased.write_bytes(b"\n".join(cased_words) + b"\n")
    tail = (
        b"CMake Error at CMakeLists.txt:1 (cmake_minimum_required):\n"
        b"  CMake 3.26 or higher is required.  You are running version 3.22.1\n"
    )
    cases = {
        "worst": (tmp / "worst.log", quiet, tail),
        "mixed": (tmp / "mixed.log", lines, b""),
    }
    results = []
    try:
        for name, (path, src, end) in cases.items():
            build(path, src, size, end)
            mb = path.stat().st_size / 1e6
            # warm the page cache equally for both tools
            with path.open("rb") as fh:
                while fh.read(1 << 24):
                    pass
            g_time, g_note = time_grep(patterns, path)
            f_time, _ = time_grep(literals, path, "-F")
            fc_time, _ = time_grep(cased, path, "-F")
            row = {
                "case": name,
                "mb": round(mb, 1),
                "grep_s": round(g_time, 3),
                "grep_mb_s": round(mb / g_time, 1) if g_time == g_time else None,
                "grep": g_note,
                "grep_F_anchors_s": round(f_time, 3),
                "grep_F_cased_anchors_s": round(fc_time, 3),
            }
            for label, workers, engine in (
                ("diagnose_1proc", 1, None),
                ("diagnose_auto", None, None),
                ("diagnose_1proc_re", 1, "re"),
            ):
                d_time, d_note = time_diagnose(path, workers, engine)
                row[f"{label}_s"] = round(d_time, 3)
                row[f"{label}_mb_s"] = round(mb / d_time, 1)
                row[f"{label}_ratio_to_grep"] = round(d_time / g_time, 2) if g_time == g_time else None
                row[f"{label}_ratio_to_grep_F"] = round(d_time / f_time, 2) if f_time == f_time else None
                row[f"{label}_ratio_to_grep_F_cased"] = round(d_time / fc_time, 2) if fc_time == fc_time else None
                row[label] = d_note
            results.append(row)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"corpus: {len(lines)} lines, {len(quiet)} quiet lines; {sum(len(r.patterns) for r in rules)} patterns; "
        f"python {sys.version.split()[0]}; {os.cpu_count()} CPUs; engine {dg.default_engine()} "
        f"(available: {', '.join(dg.ENGINES)})"
    )
    workers = min(os.cpu_count() or 1, MAX_WORKERS)
    header = (
        f"{'case':<6} {'MB':>6} {'grep s':>7} {'MB/s':>6} | {'diag 1 proc s':>13} {'MB/s':>6} {'ratio':>5} | "
        f"{'diag auto s':>11} {'MB/s':>6} {'ratio':>5} | {'re 1 proc s':>11} {'ratio':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['case']:<6} {r['mb']:>6} {r['grep_s']:>7} {r['grep_mb_s']!s:>6} | {r['diagnose_1proc_s']:>13} "
            f"{r['diagnose_1proc_mb_s']:>6} {r['diagnose_1proc_ratio_to_grep']!s:>5} | {r['diagnose_auto_s']:>11} "
            f"{r['diagnose_auto_mb_s']:>6} {r['diagnose_auto_ratio_to_grep']!s:>5} | "
            f"{r['diagnose_1proc_re_s']:>11} {r['diagnose_1proc_re_ratio_to_grep']!s:>5}"
        )
    print(
        f"(ratio = diagnose time / grep time; 'auto' = diagnose_path default: up to {workers} processes "
        f"for files >= {dgs.PARALLEL_MIN_BYTES >> 20} MiB)"
    )
    for r in results:
        print(
            f"  {r['case']}: grep -> {r['grep']}; diagnose -> {r['diagnose_1proc']}; grep -F with the "
            f"{len(words)} prefilter literals: {r['grep_F_anchors_s']} s "
            f"(diagnose 1 proc / grep -F = {r['diagnose_1proc_ratio_to_grep_F']}); with the {len(cased_words)} "
            f"without the lower-cased forms: {r['grep_F_cased_anchors_s']} s "
            f"(diagnose 1 proc / grep -F = {r['diagnose_1proc_ratio_to_grep_F_cased']})"
        )
    print(
        json.dumps(
            {
                "benchmark": "diagnose_vs_grep",
                "engine": dg.default_engine(),
                "engines": list(dg.ENGINES),
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
