"""Recognise known build/install/run failures in a log and explain them.

The knowledge base (``data/failures.toml``) maps each failure id of the contract to regexes,
a cause and a fix.  :func:`diagnose_path` / :func:`diagnose_stream` scan a log of any size in
one streaming pass over binary chunks (never reading it whole):

* every pattern has mandatory literals (*anchors*, derived from the regex or given in the
  knowledge file).  The anchors of the failures not found yet are searched over whole chunks in
  C: with Hyperscan (the ``hyperscan`` package, a multi-literal matcher as fast as grep) where
  it is installed, else as one trie-shaped bytes regex, anchors starting with a frequent byte
  (``error:``...) in a literal-prefix regex of their own (:data:`ENGINES`).  Lines holding no
  anchor cost no Python work at all;
* a line holding an anchor is decoded (``errors="replace"``), cleaned (ANSI codes, ``\r``
  redraw segments, pip/uv box prefixes, docker build, CI and logger timestamps such as
  ``[  136.92]``) and checked with the full regexes of the failures whose anchors it holds, on at
  most :data:`MAX_LINE_CHARS` bytes around each anchor (very long lines);
* when the line alone does not match, the message it belongs to is tried: logs posted in issues
  are wrapped at the terminal's width (mid-word, mid-path, mid-symbol) and uv, pip and rich wrap
  their own messages (indented continuations).  A wide line (:data:`WRAP_MIN_CHARS`) is joined with
  the lines it goes on in (:data:`WRAP_BEFORE`, :data:`WRAP_AFTER`; never into a line that starts a
  message of its own), with nothing or a space at each break, and the finding keeps the original
  number of the line where the match begins.  Blocks are scanned with the lines around them as
  context (also the parts of a parallel scan), so chunk boundaries change nothing.  Rules name a
  second literal (``wrap_anchors``) for messages a break could cut through their first one;
* a failure id is reported once, at its first occurrence; once an id is found its anchors leave
  the prefilter, and the scan stops as soon as nothing is left to look for;
* when nothing is recognised, the report carries the first error block (``error:``, ``Error``,
  ``FAILED``, ``Traceback``... and the lines after it) so that the user starts at the right line;
* files of :data:`PARALLEL_MIN_BYTES` or more are split at line boundaries and scanned by
  several processes (``diagnose_path(..., workers=1)`` forces one pass).

Findings are ranked root cause first (:func:`_rank`): *specificity* first (a failure that
``implies`` another, e.g. ``compiler-oom`` implies ``stale-build-state``, or ``explains`` it, e.g.
a missing ``torch==2.6.0+cu118`` wheel is what pip's resolver conflict means, comes before it),
then *evidence strength* (``weak_patterns``: generic wording that other causes print too), then
*position* (the earliest line).  Each finding's ``rank`` (JSON) says why it stands where it does.

The corpus of real logs (``tests/logs/index*.toml``), its tune/eval split and the accuracy
measure are here too (:func:`load_corpus`, :func:`corpus_split`, :func:`accuracy`), for the tests
and ``benchmarks/bench_diagnose.py --accuracy``.

``rich`` is imported only inside :func:`render_table`.
"""

from __future__ import annotations

import heapq
import io
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

try:  # Python >= 3.11
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as _toml  # type: ignore[no-redef]

try:  # Python >= 3.11 keeps the regex parser here
    from re import _constants as _sre_c
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre_c  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = [
    "CONTEXT_KEYS",
    "DEFAULT_KNOWLEDGE",
    "Finding",
    "Report",
    "Rule",
    "accuracy",
    "corpus_split",
    "corpus_thread",
    "diagnose_path",
    "diagnose_stream",
    "load_corpus",
    "load_knowledge",
    "render_fix",
    "render_table",
]

DEFAULT_KNOWLEDGE = Path(__file__).resolve().parent / "data" / "failures.toml"

try:  # optional accelerator (x86_64 wheels on PyPI); the pure-``re`` prefilter is the fallback
    import hyperscan as _hyperscan
except Exception:  # noqa: BLE001 - ImportError, or a CPU/library it cannot use
    _hyperscan = None

#: Prefilter engines: ``hyperscan`` (when importable) and ``re``.  ``VLLM_HARNESS_DIAGNOSE_ENGINE``
#: picks one; the default is the first available.
ENGINES = tuple(e for e in ("hyperscan", "re") if e != "hyperscan" or _hyperscan is not None)


def default_engine() -> str:
    wanted = os.environ.get("VLLM_HARNESS_DIAGNOSE_ENGINE", "").strip()
    return wanted if wanted in ENGINES else ENGINES[0]


SEVERITIES = ("error", "warning", "info")

#: Keys a fix may use as ``{key}`` or ``{key|fallback wording}``.
CONTEXT_KEYS = ("cuda", "torch", "torch_index", "variant", "python", "xformers", "cmake_min")

#: Wording used for a missing context key when the fix gives no fallback of its own.
GENERIC_WORDING = {
    "cuda": "the variant's CUDA version",
    "torch": "the variant's PyTorch version",
    "torch_index": "the variant's PyTorch index URL",
    "variant": "<variant>",
    "python": "the environment's Python",
    "xformers": "the xformers release built for the variant's PyTorch",
    "cmake_min": "3.26",
}

#: Characters of one line (around each anchor) that the full regexes look at.
MAX_LINE_CHARS = 4000
#: Characters of evidence kept in a finding.
EVIDENCE_CHARS = 300
#: Lines of the first error block reported when nothing is recognised.
FIRST_ERROR_BLOCK = 15
#: Bytes read per chunk.
CHUNK_SIZE = 8 * 1024 * 1024
#: A line without newline is buffered up to this size before it is scanned in pieces.
LONG_LINE_BYTES = 64 * 1024 * 1024
#: Files of this size or more are scanned by several processes (see diagnose_path).
PARALLEL_MIN_BYTES = 64 * 1024 * 1024
#: At most this many processes.
MAX_WORKERS = 8
#: Anchor hits collected per Hyperscan pass (the rest of a block is scanned when needed).
HS_BATCH = 512
#: Lines before and after an anchor's line that may belong to its message (wrapped lines).
WRAP_BEFORE = 1
WRAP_AFTER = 2
#: Characters a wrapped match reaches from its anchor (at most) into the line before or after.
JOIN_REACH = 160
#: A line at least this wide (as shown, prefix included) may go on in the next line.
WRAP_MIN_CHARS = 45
#: Bytes of context kept around a block at most (the lines before it, the lines after it).
CONTEXT_BYTES = 64 * 1024
#: Lines remembered per scan as matching nothing on their own (logs repeat near-miss lines).
SEEN_LINES = 4096
#: Minimum length of a derived anchor.
MIN_ANCHOR = 4
#: Maximum length of a derived anchor (longer literals are cut; a prefix is still mandatory).
MAX_ANCHOR = 24

_ID_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_PLACEHOLDER_RE = re.compile(r"\{(\w+)(?:\|([^{}]*))?\}")
_RULE_KEYS = {
    "id", "severity", "patterns", "weak_patterns", "cause", "fix", "implies", "explains", "hides", "anchors",
    "wrap_anchors", "reported_by",
}
_REQUIRED_KEYS = ("id", "severity", "patterns", "cause", "fix")
_TOP_KEYS = {"version", "failure"}

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
    r"|Caused by:|CMake (?:Error|Warning)|Traceback \(|File \"|\$ |[×✗✓⚠]|-- |\w+(?:Error|Exception|Warning):)"
)
# The first line of an error block (when no known failure is recognised).
_FIRST_ERROR_RE = re.compile(
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
#: Literals one of which every line matching _FIRST_ERROR_RE holds.
_FIRST_ERROR_ANCHORS = (
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

# Frequency (per mille) of bytes in build logs (measured on the test corpus).  An anchor starting
# with a rare byte costs the prefilter little; anchors starting with a frequent byte are searched
# with bytes.find instead (see _Scanner).
_BYTE_FREQ = {
    " ": 124,
    "e": 65,
    "i": 52,
    "n": 46,
    "t": 45,
    "o": 42,
    "a": 38,
    "l": 37,
    "s": 36,
    "r": 32,
    "c": 30,
    "/": 27,
    "p": 25,
    ".": 23,
    "d": 22,
    "u": 21,
    "m": 19,
    "-": 17,
    "\n": 15,
    "h": 15,
    "g": 14,
    "_": 14,
    "f": 13,
    "y": 12,
    "1": 12,
    "0": 12,
    "b": 11,
    "v": 9,
    "2": 9,
    "3": 8,
    "k": 8,
    "^": 7,
    ",": 7,
    ":": 7,
    "x": 6,
    "\xe2": 6,
    "w": 5,
    "C": 5,
    '"': 4,
    "(": 4,
    ")": 4,
    "8": 4,
    "R": 4,
    "4": 4,
    "F": 4,
    "9": 4,
    "=": 4,
    "6": 3,
    "5": 3,
    "D": 3,
    "E": 2,
    "U": 2,
    "A": 2,
    "\\": 2,
    "'": 2,
    ">": 2,
    "~": 2,
}
#: Per mille of byte density above which the anchors starting with that byte are searched with a
#: regex of their own (a literal prefix: fast) instead of being a branch of the main trie (whose
#: cost grows with the density of all the first bytes it has to stop at).
_OWN_SEARCH_PERMILLE = 7.5


# --------------------------------------------------------------------------------------------
# data model


@dataclass(frozen=True)
class Rule:
    """One known failure of the knowledge base."""

    id: str
    severity: str
    patterns: tuple[re.Pattern[str], ...]
    cause: str
    fix: str
    implies: tuple[str, ...] = ()
    anchors: tuple[bytes, ...] = ()
    #: ids this failure is a more specific reading of (the same lines trigger both)
    explains: tuple[str, ...] = ()
    #: patterns[strong:] are weak evidence (generic wording that other causes print too)
    strong: int = -1
    #: anchor -> (can a match holding it begin on an earlier line, end on a later one)
    edges: Mapping[bytes, tuple[bool, bool]] = field(default_factory=dict)

    def strength(self, pattern: int) -> str:
        return "weak" if 0 <= self.strong <= pattern else "strong"

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(p.pattern for p in self.patterns)


@dataclass
class Finding:
    id: str
    severity: str
    line: int
    evidence: str
    cause: str
    fix: str
    explained_by: list[str] = field(default_factory=list)
    #: why it is ranked where it is: root or not, strength of its evidence, what it explains
    rank: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "severity": self.severity,
            "line": self.line,
            "evidence": self.evidence,
            "cause": self.cause,
            "fix": self.fix,
            "explained_by": list(self.explained_by),
            "rank": dict(self.rank),
        }


@dataclass
class Report:
    log: str
    findings: list[Finding] = field(default_factory=list)
    first_error_lines: list[tuple[int, str]] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return [f.id for f in self.findings]

    def to_dict(self) -> dict[str, Any]:
        return {
            "log": self.log,
            "findings": [f.to_dict() for f in self.findings],
            "first_error_lines": [[n, text] for n, text in self.first_error_lines],
        }


# --------------------------------------------------------------------------------------------
# knowledge base


def _bad(path: Path | str, where: str, key: str, problem: str) -> ValueError:
    return ValueError(f"{path}: {where}: key '{key}': {problem}")


def _literal_runs(
    parsed: Any, runs: list[list[tuple[str, ...]]], current: list[tuple[str, ...]], ignorecase: bool
) -> None:
    """Collect the runs of characters every match of ``parsed`` must contain.

    A run is a list of positions; each position is a tuple of the characters allowed there
    (one for a literal, up to four for a small class such as ``['‘`]``)."""

    def flush() -> None:
        if current:
            runs.append(list(current))
            current.clear()

    for op, av in parsed:
        if op is _sre_c.LITERAL and not ignorecase:
            current.append((chr(av),))
        elif (
            op is _sre_c.IN
            and not ignorecase
            and 0 < len(av) <= 4
            and all(o is _sre_c.LITERAL for o, _ in av)
        ):
            current.append(tuple(chr(c) for _, c in av))
        elif op is _sre_c.SUBPATTERN:
            add_flags = av[1] if len(av) >= 4 else 0
            flush()
            _literal_runs(av[-1], runs, current, ignorecase or bool(add_flags & _sre_c.SRE_FLAG_IGNORECASE))
            flush()
        elif op in (_sre_c.MAX_REPEAT, _sre_c.MIN_REPEAT) and av[0] >= 1:
            flush()
            _literal_runs(av[2], runs, current, ignorecase)
            flush()
        elif op is _sre_c.AT or op is _sre_c.ASSERT_NOT or op is _sre_c.ASSERT:
            continue  # zero-width: does not break a run
        else:
            flush()
    flush()


def _density(chars: Iterable[str]) -> int:
    return sum(_BYTE_FREQ.get(chr(c.encode("utf-8")[0]) if c else c, 2) for c in chars)


def _anchor_candidates(pattern: re.Pattern[str]) -> list[tuple[int, int, int, int, list[str]]]:
    """Every literal a match of the regex must contain: (score, run, start, end, variants); the
    lower the score, the better an anchor (see :func:`_derive_anchors`)."""
    if pattern.flags & re.IGNORECASE:
        return []
    runs: list[list[tuple[str, ...]]] = []
    _literal_runs(_sre_parse.parse(pattern.pattern, pattern.flags), runs, [], False)
    out = []
    for r, run in enumerate(runs):
        for i in range(len(run)):
            head = run[i]
            tail = []
            for item in run[i + 1 : i + MAX_ANCHOR]:
                if len(item) != 1:
                    break
                tail.append(item[0])
            length = 1 + len(tail)
            if length < MIN_ANCHOR or any(c.isspace() for c in head):
                continue
            score = _density(head) * 20 + (
                240 if length < 6 else 120 if length < 8 else 40 if length < 10 else 0
            )
            out.append((score, r, i, i + length, [c + "".join(tail) for c in head]))
    return out


def _literal_ends(pattern: re.Pattern[str]) -> tuple[str, str]:
    """The literal text every match of the regex begins with, and the one it ends with."""
    if pattern.flags & re.IGNORECASE:
        return "", ""
    ops = list(_sre_parse.parse(pattern.pattern, pattern.flags))

    def literals(seq: Iterable[Any]) -> list[str]:
        out = []
        for op, av in seq:
            if op is _sre_c.AT:  # ^, $, \b: zero-width
                continue
            if op is not _sre_c.LITERAL:
                break
            out.append(chr(av))
        return out

    return "".join(literals(ops)), "".join(reversed(literals(reversed(ops))))


def _derive_anchors(pattern: re.Pattern[str]) -> list[str] | None:
    """Literals of which every match of the regex contains at least one (None if none found).

    The prefilter skips fastest over bytes that no anchor starts with, so a literal starting
    with a rare character (upper case, quotes, punctuation) is preferred over a longer one."""
    cands = _anchor_candidates(pattern)
    return min(cands, key=lambda c: c[0])[4] if cands else None


def _check_str(path: Path | str, where: str, entry: Mapping[str, Any], key: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _bad(path, where, key, "must be a non-empty string")
    return value


def _check_str_list(
    path: Path | str, where: str, entry: Mapping[str, Any], key: str, *, empty_ok: bool
) -> list[str]:
    value = entry.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _bad(path, where, key, "must be a list of non-empty strings")
    if not value and not empty_ok:
        raise _bad(path, where, key, "must not be empty")
    return value


def _parse_rules(path: Path | str, doc: Mapping[str, Any]) -> list[Rule]:
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise ValueError(
            f"{path}: top level: key '{sorted(unknown)[0]}': unknown key (allowed: {sorted(_TOP_KEYS)})"
        )
    entries = doc.get("failure")
    if not isinstance(entries, list) or not entries:
        raise ValueError(
            f"{path}: top level: key 'failure': must be a non-empty array of tables ([[failure]])"
        )

    rules: list[Rule] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries, 1):
        where = f"failure #{index}"
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: {where}: must be a table")
        if "id" not in entry:
            raise _bad(path, where, "id", "missing")
        rid = entry["id"]
        if not isinstance(rid, str) or not _ID_RE.match(rid):
            raise _bad(path, where, "id", f"{rid!r} is not a kebab-case id")
        where = f"failure '{rid}'"
        if rid in seen:
            raise _bad(path, where, "id", "duplicate id")
        seen.add(rid)
        for key in entry:
            if key not in _RULE_KEYS:
                raise _bad(path, where, key, f"unknown key (allowed: {sorted(_RULE_KEYS)})")
        for key in _REQUIRED_KEYS:
            if key not in entry:
                raise _bad(path, where, key, "missing")

        severity = _check_str(path, where, entry, "severity")
        if severity not in SEVERITIES:
            raise _bad(path, where, "severity", f"{severity!r} is not one of {SEVERITIES}")
        cause = _check_str(path, where, entry, "cause")
        fix = _check_str(path, where, entry, "fix")
        for m in _PLACEHOLDER_RE.finditer(fix):
            if m.group(1) not in CONTEXT_KEYS:
                raise _bad(
                    path, where, "fix", f"unknown placeholder {{{m.group(1)}}} (known: {CONTEXT_KEYS})"
                )
        leftover = _PLACEHOLDER_RE.sub("", fix)
        if "{" in leftover or "}" in leftover:
            raise _bad(path, where, "fix", "unbalanced '{' or '}' (placeholders are {key} or {key|fallback})")

        sources = _check_str_list(path, where, entry, "patterns", empty_ok=False)
        weak = _check_str_list(path, where, entry, "weak_patterns", empty_ok=True)
        strong = len(sources) if weak else -1
        sources = sources + weak
        compiled: list[re.Pattern[str]] = []
        for n, src in enumerate(sources, 1):
            try:
                compiled.append(re.compile(src))
            except re.error as exc:
                raise _bad(
                    path, where, "patterns", f"pattern #{n} {src!r} is not a valid regex: {exc}"
                ) from None

        explicit = _check_str_list(path, where, entry, "anchors", empty_ok=True)
        # anchor -> (may the match begin on an earlier line, may it end on a later one)
        edges: dict[bytes, tuple[bool, bool]] = {}
        if explicit:
            anchors = tuple(dict.fromkeys(a.encode("utf-8") for a in explicit))
        else:
            derived: list[bytes] = []
            for n, pat in enumerate(compiled, 1):
                found_anchors = _derive_anchors(pat)
                if found_anchors is None:
                    raise _bad(
                        path,
                        where,
                        "patterns",
                        f"pattern #{n} {pat.pattern!r} has no case-sensitive literal of {MIN_ANCHOR}+ "
                        "characters to anchor the prefilter; give 'anchors' explicitly",
                    )
                derived.extend(a.encode("utf-8") for a in found_anchors)
                head, tail = _literal_ends(pat)
                for a in found_anchors:
                    before, after = edges.get(a.encode("utf-8"), (False, False))
                    edges[a.encode("utf-8")] = (before or not head.startswith(a), after or not tail.endswith(a))
            anchors = tuple(dict.fromkeys(derived))
        wrap = _check_str_list(path, where, entry, "wrap_anchors", empty_ok=True)
        anchors = tuple(dict.fromkeys(anchors + tuple(a.encode("utf-8") for a in wrap)))

        implies = _check_str_list(path, where, entry, "implies", empty_ok=True)
        implies += [
            h for h in _check_str_list(path, where, entry, "hides", empty_ok=True) if h not in implies
        ]
        explains = _check_str_list(path, where, entry, "explains", empty_ok=True)
        edges = {a: edges.get(a, (True, True)) for a in anchors}
        rules.append(
            Rule(rid, severity, tuple(compiled), cause, fix, tuple(implies), anchors, tuple(explains), strong, edges)
        )

    ids = {r.id for r in rules}
    for rule in rules:
        for target in rule.explains:
            if target not in ids:
                raise _bad(path, f"failure '{rule.id}'", "explains", f"unknown id {target!r}")
            if target == rule.id:
                raise _bad(path, f"failure '{rule.id}'", "explains", "a failure cannot explain itself")
        for target in rule.implies:
            if target not in ids:
                raise _bad(path, f"failure '{rule.id}'", "implies", f"unknown id {target!r}")
            if target == rule.id:
                raise _bad(path, f"failure '{rule.id}'", "implies", "a failure cannot imply itself")
    reach = _reachability(rules)
    for rule in rules:
        if rule.id in reach[rule.id]:
            raise _bad(path, f"failure '{rule.id}'", "implies", "cycle in implies/explains/hides")
    return rules


_CACHE: dict[tuple[str, int, int], list[Rule]] = {}


def load_knowledge(path: str | Path | None = None) -> list[Rule]:
    """Load and validate a knowledge file (default: the packaged ``data/failures.toml``).

    Raises ``ValueError`` naming the file, the entry and the key on any problem (unknown key,
    missing field, bad regex, unknown placeholder or id, cycle); ``OSError`` if unreadable.
    """
    p = Path(path) if path is not None else DEFAULT_KNOWLEDGE
    stat = p.stat()
    key = (str(p.resolve()), stat.st_mtime_ns, stat.st_size)
    cached = _CACHE.get(key)
    if cached is not None:
        return list(cached)
    try:
        with p.open("rb") as fh:
            doc = _toml.load(fh)
    except _toml.TOMLDecodeError as exc:
        raise ValueError(f"{p}: not valid TOML: {exc}") from None
    rules = _parse_rules(p, doc)
    _CACHE[key] = rules
    return list(rules)


def _reachability(rules: Sequence[Rule]) -> dict[str, set[str]]:
    graph = {r.id: set(r.implies) | set(r.explains) for r in rules}
    reach: dict[str, set[str]] = {}
    for start in graph:
        seen: set[str] = set()
        stack = list(graph[start])
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            stack.extend(graph.get(node, ()))
        reach[start] = seen
    return reach


def render_fix(template: str, context: Mapping[str, Any] | None = None) -> str:
    """Fill ``{key}`` / ``{key|fallback}`` placeholders from ``context``."""
    ctx = context or {}

    def sub(m: re.Match[str]) -> str:
        value = ctx.get(m.group(1))
        if value is not None and str(value) != "":
            return str(value)
        if m.group(2) is not None:
            return m.group(2)
        return GENERIC_WORDING.get(m.group(1), m.group(1))

    return _PLACEHOLDER_RE.sub(sub, template)


# --------------------------------------------------------------------------------------------
# scanning


def _trie_regex(words: Iterable[bytes], overlapping: bool = False) -> re.Pattern[bytes] | None:
    trie: dict[Any, Any] = {}
    for word in words:
        node = trie
        for byte in word:
            node = node.setdefault(byte, {})
        node[None] = True

    def render(node: dict[Any, Any]) -> bytes:
        end = None in node
        alts = [
            re.escape(bytes([b])) + render(child)
            for b, child in sorted((k, v) for k, v in node.items() if k is not None)
        ]
        if not alts:
            return b""
        if len(alts) == 1 and not end:
            return alts[0]
        body = b"(?:" + b"|".join(alts) + b")"
        return body + b"?" if end else body

    if not trie:
        return None
    body = render(trie)
    return re.compile(b"(?=(" + body + b"))" if overlapping else body)


_HS_CACHE: dict[tuple[bytes, ...], Any] = {}


def _hyperscan_db(words: tuple[bytes, ...]) -> Any:
    """A Hyperscan block-mode database of ``words`` as literals (pattern id = index)."""
    db = _HS_CACHE.get(words)
    if db is None:
        db = _hyperscan.Database(mode=_hyperscan.HS_MODE_BLOCK)
        db.compile(
            expressions=list(words),
            ids=list(range(len(words))),
            elements=len(words),
            flags=[0] * len(words),
            literal=True,
        )
        if len(_HS_CACHE) > 64:
            _HS_CACHE.clear()
        _HS_CACHE[words] = db
    return db


def _clean_segments(raw: bytes) -> list[str]:
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


def _continues(shown: str, next_clean: str) -> bool:
    """May a line shown as ``shown`` go on in the next one (wrapped at the terminal's width or by
    the tool: pip, uv, rich)?  Only a wide line does, and not into the start of a new message."""
    return len(shown) >= WRAP_MIN_CHARS and bool(next_clean) and not _NEW_RECORD_RE.match(next_clean)


def _wrapped_messages(
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
    long_prev = before and ls - 1 - prev_start >= WRAP_MIN_CHARS
    if not long_prev and (not after or le - ls < WRAP_MIN_CHARS):
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
        if not _continues(prev[0], run[0][1]):
            break
        run.insert(0, prev)
        first -= 1
        pos = start
        prev_ok = start > 0 and start - 1 - (block.rfind(b"\n", 0, start - 1) + 1) >= WRAP_MIN_CHARS
    # forwards: the lines this one goes on in
    pos, count = le, 0
    while after and count < WRAP_AFTER and pos < len(block) and len(run[-1][0]) >= WRAP_MIN_CHARS:
        end = block.find(b"\n", pos + 1)
        if end == -1:
            end = len(block)
        if end - pos - 1 > MAX_LINE_CHARS:
            break
        nxt = _shown(block[pos + 1 : end])
        if not _continues(run[-1][0], nxt[1]):
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


def _first_match(
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


def _evidence(text: str, match: re.Match[str] | None) -> str:
    if len(text) <= EVIDENCE_CHARS:
        return text
    start = 0 if match is None else max(0, min(match.start() - 60, len(text) - EVIDENCE_CHARS))
    piece = text[start : start + EVIDENCE_CHARS]
    return ("…" if start else "") + piece + ("…" if start + EVIDENCE_CHARS < len(text) else "")


class _Scanner:
    """State of one scan: what is found, what is still looked for, the first error block."""

    def __init__(self, rules: Sequence[Rule], engine: str | None = None) -> None:
        self.engine = engine or default_engine()
        if self.engine not in ENGINES:
            raise ValueError(
                f"diagnose engine {self.engine!r} is not available here (have: {', '.join(ENGINES)})"
            )
        self.rules = list(rules)
        self.order = {r.id: i for i, r in enumerate(self.rules)}
        self.found: dict[str, tuple[int, str, int]] = {}  # id: line, evidence, pattern
        self.first_error: list[tuple[int, str]] = []
        self.track_first_error = True
        self.pending_error_lines = 0
        self.error_started = False  # the first error line was just seen: copy the lines after it
        self.anchor_rules: dict[bytes, list[Rule]] = {}
        for rule in self.rules:
            for anchor in rule.anchors:
                self.anchor_rules.setdefault(anchor, []).append(rule)
        self._rebuild()

    # -- prefilter -------------------------------------------------------------------------
    def _rebuild(self) -> None:
        """The anchors still needed, and their search: one Hyperscan database, else the trie regex
        and the regexes of the anchors that start with a frequent byte."""
        self.active_anchors = [
            a for a, rs in self.anchor_rules.items() if any(r.id not in self.found for r in rs)
        ]
        words = list(self.active_anchors)
        if self.track_first_error:
            words += _FIRST_ERROR_ANCHORS
        self.scan_words = words
        self.hs_lengths = [len(w) for w in words]
        self.hs_db = None
        self.searches: list[re.Pattern[bytes]] = []
        if self.engine == "hyperscan" and words:
            try:
                self.hs_db = _hyperscan_db(tuple(words))
            except Exception:  # noqa: BLE001 - e.g. a CPU without the instructions it needs: fall back to re
                self.engine = "re"
        if self.hs_db is None:
            by_first: dict[int, list[bytes]] = {}
            for word in words:
                by_first.setdefault(word[0], []).append(word)
            trie_words: list[bytes] = []
            searches: list[re.Pattern[bytes]] = []
            for first, group in sorted(by_first.items()):
                if _BYTE_FREQ.get(chr(first), 2) <= _OWN_SEARCH_PERMILLE:
                    trie_words += group
                else:
                    searches.append(_trie_regex(group))  # type: ignore[arg-type]
            main = _trie_regex(trie_words)
            self.searches = ([main] if main is not None else []) + searches
        self.seen: dict[bytes, tuple[tuple[Rule, ...], dict[bytes, tuple[int, int]]]] = {}
        # for a line that holds anchors: which ones (also overlapping ones and prefixes)
        self.overlapping = _trie_regex(words, overlapping=True)
        self.prefixes: dict[bytes, list[bytes]] = {}

    def _new_cache(self) -> list[int]:
        return [2, 0] if self.hs_db is not None else [-2] * len(self.searches)

    def _hs_fill(self, block: bytes, start: int, cache: list[int]) -> None:
        """Fill ``cache`` with the next anchor starts from ``start``: at most about HS_BATCH of
        them, since after a finding the anchors change and the rest would be scanned again."""
        found = self._hs_scan(block, start, HS_BATCH)
        lengths = self.hs_lengths
        resume = -1
        if len(found) >= 2 * HS_BATCH:  # stopped early
            # every anchor starting before (last end - longest anchor) has been reported
            resume = start + found[-1] - max(lengths)
            if resume <= start:  # a batch too small for the anchors at one position
                found, resume = self._hs_scan(block, start, 0), -1
        starts = sorted({start + end - lengths[i] for i, end in zip(found[::2], found[1::2], strict=True)})
        if resume != -1:
            starts = [x for x in starts if x < resume]
        cache[:] = [2, resume, *starts]

    def _hs_scan(self, block: bytes, start: int, limit: int) -> list[int]:
        """[pattern id, end, ...] of the anchors in ``block[start:]`` (``limit``: stop after as
        many; 0: no limit)."""
        found: list[int] = []
        cap = 2 * limit

        def collect(pattern_id: int, _start: int, end: int, _flags: int, _context: Any) -> bool:
            found.append(pattern_id)
            found.append(end)
            return bool(cap) and len(found) >= cap  # True stops the scan

        try:
            self.hs_db.scan(memoryview(block)[start:], match_event_handler=collect)
        except _hyperscan.ScanTerminated:  # collect stopped it after ``limit`` hits
            pass
        return found

    @property
    def done(self) -> bool:
        return not self.scan_words and self.pending_error_lines == 0

    def _next_hit(self, block: bytes, pos: int, cache: list[int]) -> int:
        """Position of the next anchor at or after ``pos`` (-1: none).  ``cache`` keeps the
        next match of every search (``re``), or every anchor position of the block after the
        position where it was built (``hyperscan``), so that no stretch is searched twice."""
        if self.hs_db is not None:
            # cache: [index of the next candidate, position to scan on from (-1: block done),
            #         anchor starts in order...]
            i, n = cache[0], len(cache)
            while i < n and cache[i] < pos:
                i += 1
            while i == n and cache[1] != -1:
                self._hs_fill(block, max(pos, cache[1]), cache)
                i, n = 2, len(cache)
                while i < n and cache[i] < pos:
                    i += 1
            cache[0] = i
            return cache[i] if i < n else -1
        best = -1
        for i, rx in enumerate(self.searches):
            at = cache[i]
            if at != -1 and at < pos:
                m = rx.search(block, pos)
                at = m.start() if m is not None else -1
                cache[i] = at
            if at != -1 and (best == -1 or at < best):
                best = at
        return best

    # -- one block of whole lines (or of one endless line) -----------------------------------
    def scan_block(self, block: bytes, lo: int, hi: int, first_line: int) -> int:
        """Scan the lines of ``block[lo:hi]`` (``lo`` starts line ``first_line``); the bytes before
        ``lo`` and after ``hi`` are context (wrapped messages), scanned in the blocks before and
        after.  Returns the newline count of ``block[lo:hi]``."""
        pos = lo
        counted_pos = lo
        line_no = first_line
        if self.pending_error_lines:
            self._continue_error_block(block, first_line, lo, hi)
        cache = self._new_cache()
        while self.scan_words:
            hit = self._next_hit(block, pos, cache)
            if hit < 0 or hit >= hi:
                break
            ls = block.rfind(b"\n", lo, hit) + 1 or lo
            le = block.find(b"\n", hit)
            if le == -1:
                le = len(block)
            line_no += block.count(b"\n", counted_pos, ls)
            counted_pos = ls
            if le - ls > MAX_LINE_CHARS:
                r_lo = max(ls, hit - MAX_LINE_CHARS // 2)
                r_hi = min(le, r_lo + MAX_LINE_CHARS)
                changed = self._check(block[r_lo:r_hi], line_no, None)
                next_pos = max(r_hi - MAX_ANCHOR, hit + 1)
            else:
                changed = self._check(block[ls:le], line_no, (block, ls, le))
                next_pos = le + 1
            if self.error_started:
                # copy the lines after the first error line; they are still scanned for anchors
                self.error_started = False
                self._continue_error_block(block, line_no + 1, le + 1, hi)
            if changed:
                self._rebuild()
                cache = self._new_cache()
            pos = next_pos
        return line_no - first_line + block.count(b"\n", counted_pos, hi)

    def _check(self, region: bytes, line_no: int, where: tuple[bytes, int, int] | None) -> bool:
        """Match the full regexes of the failures whose anchors ``region`` holds: on the line
        itself, then on the message it belongs to when the line was wrapped (``where``: the block
        and the line's bounds in it, for the lines around it)."""
        seen = self.seen.get(region)
        if seen is None:
            changed, missed, present, segments, want_error = self._check_line(region, line_no)
            if not changed and not (want_error and not self.first_error):
                if len(self.seen) >= SEEN_LINES:
                    self.seen.clear()
                self.seen[region] = (missed, present)
        else:  # the same line again: it matched nothing on its own then, nor does it now
            (missed, present), changed, segments, want_error = seen, False, [], False
        if missed and where is not None:
            # a match can only go on in the line before (after) if the pattern does not begin
            # (end) with the anchor seen, and that anchor is near the line's start (end)
            before = after = False
            for rule in missed:
                for anchor, (first, last) in present.items():
                    edge = rule.edges.get(anchor)
                    if edge:
                        before = before or (edge[0] and first <= JOIN_REACH)
                        after = after or (edge[1] and len(region) - last <= JOIN_REACH)
            for text, starts in _wrapped_messages(*where, line_no, before, after):
                for rule in missed:
                    if rule.id in self.found:
                        continue
                    hit, n = _first_match(rule.patterns, text, starts, line_no)
                    if hit:
                        at = max(k for k, (off, _) in enumerate(starts) if off <= hit.start())
                        self.found[rule.id] = (starts[at][1], _evidence(text, hit), n)
                        changed = True
        if changed and self.track_first_error:
            # the first error block is only reported when nothing is recognised
            self.track_first_error = False
            self.first_error = []
            self.pending_error_lines = 0
            return True
        if want_error and not self.first_error:
            if any(_FIRST_ERROR_RE.search(seg) for seg in segments):
                self.first_error = [(line_no, _evidence(" ".join(segments), None))]
                self.track_first_error = False
                self.pending_error_lines = FIRST_ERROR_BLOCK - 1
                self.error_started = True
                return True
        return changed

    def _check_line(
        self, region: bytes, line_no: int
    ) -> tuple[bool, tuple[Rule, ...], dict[bytes, tuple[int, int]], list[str], bool]:
        """Match the failures whose anchors ``region`` holds on the line alone.  Returns whether
        one was found, the failures not found and the anchors seen (for the wrapped reading),
        the line's cleaned segments and whether it holds a first-error anchor."""
        present: dict[bytes, tuple[int, int]] = {}  # anchor: (first start, last end)
        if self.overlapping is not None:
            for m in self.overlapping.finditer(region):
                word = m.group(1)
                prefixes = self.prefixes.get(word)
                if prefixes is None:  # the trie matched the longest word; shorter ones count too
                    prefixes = self.prefixes[word] = [p for p in self.scan_words if word.startswith(p)]
                at = m.start()
                for p in prefixes:
                    present[p] = (present[p][0] if p in present else at, at + len(p))
        rules: list[Rule] = []
        for anchor in present:
            for rule in self.anchor_rules.get(anchor, ()):
                if rule.id not in self.found and rule not in rules:
                    rules.append(rule)
        want_error = self.track_first_error and not present.keys().isdisjoint(_FIRST_ERROR_ANCHORS)
        if not rules and not want_error:
            return False, (), {}, [], False
        changed = False
        segments = _clean_segments(region)
        rules.sort(key=lambda r: self.order[r.id])
        missed: list[Rule] = []
        for rule in rules:
            for seg in segments:
                hit, n = _first_match(rule.patterns, seg)
                if hit:
                    self.found[rule.id] = (line_no, _evidence(seg, hit), n)
                    changed = True
                    break
            else:
                missed.append(rule)
        return changed, tuple(missed), present, segments, want_error

    def _continue_error_block(self, block: bytes, line_no: int, start: int, end: int) -> int:
        """Copy the lines of ``block[start:end]`` after the first error line; returns the position
        after them."""
        pos = start
        while self.pending_error_lines and pos < end:
            stop = block.find(b"\n", pos, end)
            if stop == -1:
                stop = end
            segments = _clean_segments(block[pos : min(stop, pos + MAX_LINE_CHARS)])
            self.first_error.append((line_no, _evidence(" ".join(segments), None)))
            self.pending_error_lines -= 1
            line_no += 1
            pos = stop + 1
        return pos


def _rank(
    rules: Sequence[Rule], found: Mapping[str, tuple[int, str, int]]
) -> tuple[list[str], dict[str, list[str]], dict[str, dict[str, Any]]]:
    """Order the findings root cause first.

    1. *specificity*: a failure that implies or explains another found one (directly or through
       others) comes before it; the other lists it in ``explained_by``;
    2. among the failures nothing found explains: *evidence strength* (a strong pattern before a
       weak one: generic wording that other causes print too);
    3. then *position*: the earliest line first (the first error in causal order, not the last
       traceback), then the knowledge file's order.

    Returns the ids in order, ``explained_by`` per id, and per id the facts that ranked it."""
    reach = _reachability(rules)
    by_id = {r.id: r for r in rules}
    order_index = {r.id: i for i, r in enumerate(rules)}
    ids = list(found)
    explained: dict[str, list[str]] = {i: [] for i in ids}
    indegree = {i: 0 for i in ids}
    for a in ids:
        for b in ids:
            if a != b and b in reach[a]:
                explained[b].append(a)
                indegree[b] += 1

    def strength(i: str) -> str:
        return by_id[i].strength(found[i][2])

    def key(i: str) -> tuple[int, int, int, str]:
        return (strength(i) == "weak", found[i][0], order_index[i], i)

    heap = [key(i) for i in ids if indegree[i] == 0]
    heapq.heapify(heap)
    out: list[str] = []
    while heap:
        node = heapq.heappop(heap)[-1]
        out.append(node)
        for b in ids:
            if b != node and b in reach[node]:
                indegree[b] -= 1
                if indegree[b] == 0:
                    heapq.heappush(heap, key(b))
    for b in explained:
        explained[b].sort(key=lambda a: (found[a][0], order_index[a]))
    roots = [i for i in out if not explained[i]]
    why: dict[str, dict[str, Any]] = {}
    for pos, i in enumerate(out):
        explains = [b for b in out if b != i and b in reach[i]]
        if explained[i]:
            reason = f"follows from {', '.join(explained[i])}"
        else:
            parts = []
            if explains:
                parts.append(f"explains {', '.join(explains)}")
            others = [r for r in roots if r != i]
            if others:
                parts.append(
                    f"{strength(i)} evidence at line {found[i][0]}"
                    + (", before the other root causes" if pos == 0 else f", after {out[0]}")
                )
            else:
                parts.append(f"{strength(i)} evidence at line {found[i][0]}")
            reason = "; ".join(parts)
        why[i] = {
            "position": pos + 1,
            "root": not explained[i],
            "strength": strength(i),
            "pattern": found[i][2] + 1,
            "explains": explains,
            "reason": reason,
        }
    return out, explained, why


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
) -> tuple[_Scanner, int, int]:
    """Scan a stream; returns the scanner, the number of lines it went through and their bytes.

    ``head``: the bytes before the stream (context for its first lines); ``stop``: scan only the
    lines that start before this offset (the stream goes on a little, as context)."""
    scanner = _Scanner(rules, engine)
    overlap = max((len(a) for a in scanner.anchor_rules), default=1) + max(
        len(a) for a in _FIRST_ERROR_ANCHORS
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
    found: Mapping[str, tuple[int, str, int]],
    first_error: list[tuple[int, str]],
    context: Mapping[str, Any] | None,
    name: str,
) -> Report:
    ids, explained, why = _rank(rules, found)
    by_id = {r.id: r for r in rules}
    findings = []
    for rid in ids:
        rule = by_id[rid]
        line_no, evidence, _pattern = found[rid]
        findings.append(
            Finding(
                id=rid,
                severity=rule.severity,
                line=line_no,
                evidence=evidence,
                cause=rule.cause,
                fix=render_fix(rule.fix, context),
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
    found: dict[str, tuple[int, str, int]] = {}
    first_error: list[tuple[int, str]] = []
    offset = 0
    for index, (part_found, part_error, missing, lines) in enumerate(results):
        for rid, (line_no, evidence, pattern) in part_found.items():
            if rid not in found:
                found[rid] = (line_no + offset, evidence, pattern)
        if not first_error and part_error:
            first_error = [(n + offset, text) for n, text in part_error]
            if missing:  # the block goes on in the next part(s)
                next_start = points[index + 1]
                with open(path, "rb") as fh:
                    fh.seek(next_start)
                    n = offset + lines + 1
                    for raw in fh:
                        first_error.append(
                            (n, _evidence(" ".join(_clean_segments(raw[:MAX_LINE_CHARS])), None))
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
        return _report(rules, found, [] if found else first_error, context, name)
    with open(path, "rb") as fh:
        return diagnose_stream(fh, context, rules=rules, name=name, engine=engine)


# --------------------------------------------------------------------------------------------
# presentation


def render_table(report: Report, console: Any = None, show: bool = True) -> str:
    """Print the report as a rich table (id, line, evidence, fix) to ``console`` (default: a new
    stdout Console; nothing when ``show`` is False) and return the rendered plain text.  When
    nothing is recognised, the first error block is printed under the table."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"diagnose: {report.log}", show_lines=True, expand=False)
    table.add_column("id", no_wrap=True)
    table.add_column("line", justify="right", no_wrap=True)
    table.add_column("evidence", overflow="fold", max_width=70)
    table.add_column("fix", overflow="fold", max_width=70)
    for f in report.findings:
        ident = Text(f.id, style="bold red" if f.severity == "error" else "yellow")
        if f.explained_by:
            ident.append(f"\n(follows from\n{', '.join(f.explained_by)})", style="dim")
        table.add_row(ident, str(f.line), Text(f.evidence), Text(f.fix))
    parts: list[Any] = [table]
    if not report.findings:
        table.caption = "No known failure recognised."
        if report.first_error_lines:
            block = Text("First error block:\n", style="bold")
            for n, text in report.first_error_lines:
                block.append(f"{n:>7}  ", style="dim")
                block.append(text + "\n")
            parts.append(block)
    from vllm_harness.core.runner import emit

    return emit(parts, console, show)


# --------------------------------------------------------------------------------------------
# the corpus of real logs (tests/logs) and the accuracy measure (tests and the benchmark)

#: The corpus's index files: ``index.toml`` (the logs the rules were written on before the
#: held-back split existed) and every ``index-*.toml`` (logs gathered later).
CORPUS_INDEX = "index.toml"
CORPUS_EXTRA_GLOB = "index-*.toml"
#: Keys a corpus entry may have.
CORPUS_KEYS = {"file", "expected", "source", "synthetic", "reason", "note", "why"}
#: One source thread in EVAL_SHARE goes to the held-back ``eval`` part (by a hash of its URL).
EVAL_SHARE = 3


def corpus_thread(source: str) -> str:
    """The thread a log comes from, normalised: scheme, ``www.``, query, fragment (``#issuecomment-``)
    and a trailing ``/`` dropped; a GitHub pull request and an issue of one number are one thread."""
    from urllib.parse import urlsplit

    text = source.strip()
    parts = urlsplit(text)
    if not parts.netloc:
        return text.lower()
    host = parts.netloc.lower().removeprefix("www.")
    segs = [s for s in parts.path.split("/") if s]
    if host == "github.com" and len(segs) >= 4 and segs[2] in ("issues", "pull", "pulls", "discussions"):
        kind = "discussions" if segs[2] == "discussions" else "issues"
        segs = [segs[0].lower(), segs[1].lower(), kind, segs[3]]
    return host + "/" + "/".join(segs)


def corpus_split(source: str, tuned_threads: Iterable[str] = ()) -> str:
    """``tune`` or ``eval`` for a log of this source, decided once: the threads of the logs the
    rules were written on (``tuned_threads``) are ``tune``; any other thread is ``eval`` when the
    first 8 bytes of the SHA-256 of :func:`corpus_thread` are 0 modulo :data:`EVAL_SHARE`."""
    import hashlib

    thread = corpus_thread(source)
    if thread in set(tuned_threads):
        return "tune"
    digest = hashlib.sha256(thread.encode("utf-8")).digest()
    return "eval" if int.from_bytes(digest[:8], "big") % EVAL_SHARE == 0 else "tune"


def load_corpus(logs_dir: str | Path) -> list[dict[str, Any]]:
    """The entries of ``index.toml`` and every ``index-*.toml`` in ``logs_dir``, each with
    ``index`` (its index file) and ``split`` (``tune``/``eval``, :func:`corpus_split`) added."""
    root = Path(logs_dir)
    files = [root / CORPUS_INDEX] + sorted(p for p in root.glob(CORPUS_EXTRA_GLOB) if p.is_file())
    entries: list[dict[str, Any]] = []
    for path in files:
        try:
            doc = _toml.loads(path.read_text(encoding="utf-8"))
        except _toml.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML: {exc}") from None
        for entry in doc.get("log", []):
            entries.append({**entry, "index": path.name})
    tuned = {corpus_thread(e["source"]) for e in entries if e["index"] == CORPUS_INDEX}
    for entry in entries:
        entry["split"] = "tune" if entry["index"] == CORPUS_INDEX else corpus_split(entry["source"], tuned)
    return entries


def accuracy(
    entries: Sequence[Mapping[str, Any]], logs_dir: str | Path, engine: str | None = None
) -> dict[str, Any]:
    """Diagnose every corpus log and measure, per split (``tune``, ``eval``, ``all``): how often the
    expected root id comes first, false alarms on the controls (``expected = []``: any finding), and
    per id precision and recall of the root (the first finding)."""
    root = Path(logs_dir)
    rows = []
    rules = load_knowledge()
    for entry in entries:
        report = diagnose_path(root / entry["file"], rules=rules, workers=1, engine=engine)
        want = entry["expected"][0] if entry["expected"] else None
        got = report.ids[0] if report.ids else None
        rows.append({"file": entry["file"], "split": entry["split"], "expected": want, "got": got,
                     "ids": report.ids})
    out: dict[str, Any] = {"logs": rows}
    for split in ("tune", "eval", "all"):
        part = [r for r in rows if split == "all" or r["split"] == split]
        failing = [r for r in part if r["expected"]]
        controls = [r for r in part if not r["expected"]]
        per_id: dict[str, dict[str, int]] = {}
        for r in part:
            for rid in {r["expected"], r["got"]} - {None}:
                per_id.setdefault(rid, {"tp": 0, "fp": 0, "fn": 0})
            if r["expected"] and r["got"] == r["expected"]:
                per_id[r["expected"]]["tp"] += 1
                continue
            if r["expected"]:
                per_id[r["expected"]]["fn"] += 1
            if r["got"]:
                per_id[r["got"]]["fp"] += 1
        out[split] = {
            "logs": len(part),
            "failing": len(failing),
            "root_first": sum(r["got"] == r["expected"] for r in failing),
            "controls": len(controls),
            "false_alarms": sum(bool(r["ids"]) for r in controls),
            "misses": [r for r in failing if r["got"] != r["expected"]],
            "alarms": [r for r in controls if r["ids"]],
            "per_id": dict(sorted(per_id.items())),
        }
    return out
