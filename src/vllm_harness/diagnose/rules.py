"""diagnose's knowledge: data/failures.toml loaded and checked (ids, severities, patterns, the literals
(*anchors*) every pattern needs, ``implies``/``explains`` for the ranking), and the fix templates."""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_harness.core.findings import SEVERITIES
from vllm_harness.core.findings import Finding as CoreFinding
from vllm_harness.core.safeio import tomllib  # the one TOML shim (tomli on 3.10)

try:  # Python >= 3.11 keeps the regex parser here
    from re import _constants as _sre_c
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre_c  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

#: Wording used for a missing context key when the fix gives no fallback of its own.
GENERIC_WORDING = {
    "cuda": "<version>",
    "torch": "<version>",
    "torch_index": "<the variant's PyTorch index>",
    "variant": "<variant>",
    "python": "<version>",
    "xformers": "xformers==<the release built for this PyTorch>",
    "cmake_min": "3.26",
}
_CACHE: dict[tuple[str, int, int], list[Rule]] = {}

DEFAULT_KNOWLEDGE = Path(__file__).resolve().parents[1] / "data" / "failures.toml"


#: Keys a fix may use as ``{key}`` or ``{key|fallback wording}``.
CONTEXT_KEYS = ("cuda", "torch", "torch_index", "variant", "python", "xformers", "cmake_min")


#: Minimum length of a derived anchor.
MIN_ANCHOR = 4


#: Maximum length of a derived anchor (longer literals are cut; a prefix is still mandatory).
MAX_ANCHOR = 24


_ID_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")


_PLACEHOLDER_RE = re.compile(r"\{(\w+)(?:\|([^{}]*))?\}")


_RULE_KEYS = {
    "id", "severity", "patterns", "weak_patterns", "cause", "fix", "implies", "explains", "hides", "anchors",
    "wrap_anchors", "reported_by", "weak_alone", "fixes", "recovered_by",
}


#: Keys of one entry of a failure's ``fixes`` (a fix for the logs whose message, or the lines just before
#: it, match ``when``).
_FIX_KEYS = {"when", "fix"}


_REQUIRED_KEYS = ("id", "severity", "patterns", "cause", "fix")


_TOP_KEYS = {"version", "failure"}


# Frequency (per mille) of bytes in build logs (measured on the test corpus).  An anchor starting
# with a rare byte costs the prefilter little; anchors starting with a frequent byte are searched
# with bytes.find instead (see Scanner).
BYTE_FREQ = {
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
OWN_SEARCH_PERMILLE = 7.5


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
    #: False: found only by its weak patterns, the failure is reported only next to another finding
    #: (the weak wording is an after-effect that alone names no cause)
    weak_alone: bool = True
    #: the same patterns, case-insensitive: tried on a line that holds an anchor only lower-cased (a message
    #: pasted in lower case)
    folded: tuple[re.Pattern[str], ...] = ()
    #: the anchors lower-cased (those that differ from every anchor): literal, so still a prefilter
    lower_anchors: tuple[bytes, ...] = ()
    #: (when, fix): the fix for a finding whose message or the lines just before it match ``when``
    fixes: tuple[tuple[re.Pattern[str], str], ...] = ()
    #: a later line matching one of these says the step went on (a retry succeeded): the finding is withdrawn
    recovered: tuple[re.Pattern[str], ...] = ()
    recovery_anchors: tuple[bytes, ...] = ()

    def strength(self, pattern: int) -> str:
        return "weak" if 0 <= self.strong <= pattern else "strong"

    def takes(self, found: tuple[int, str, int, int] | None, pattern: int) -> bool:
        """Does a match of pattern ``pattern`` make this rule's finding, given the one ``found`` so far
        (None: nothing yet)?  Strong evidence takes the place of weak evidence, never the reverse."""
        return found is None or (self.strength(found[2]) == "weak" and self.strength(pattern) == "strong")

    def needs_company(self, pattern: int) -> bool:
        """Does a finding by pattern ``pattern`` stand only next to another finding?"""
        return not self.weak_alone and 0 <= self.strong <= pattern

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(p.pattern for p in self.patterns)

    def fix_for(self, text: str) -> int:
        """Index of the first of ``fixes`` whose ``when`` matches ``text`` (-1: the rule's own fix)."""
        return next((n for n, (when, _fix) in enumerate(self.fixes) if when.search(text)), -1)

    def params(self, evidence: str, pattern: int) -> dict[str, str]:
        """The values a pattern's named groups (``(?P<cmake_min>...)``) take in the finding's evidence."""
        for pats in (self.patterns, self.folded):
            if 0 <= pattern < len(pats):
                m = pats[pattern].search(evidence)
                if m:
                    return {k: v for k, v in m.groupdict().items() if v}
        return {}


@dataclass
class Finding(CoreFinding):
    """A failure found in a log: the one findings model (core/findings) with the line it was found on and
    its place in the ranking."""

    line: int = 0
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
    return sum(BYTE_FREQ.get(chr(c.encode("utf-8")[0]) if c else c, 2) for c in chars)


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
            while tail and tail[-1].isspace():  # a line break at that space would cut it off
                tail.pop()
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


def _trimmed(anchor: str) -> str:
    """``anchor`` without spaces at its ends, unless that leaves it shorter than MIN_ANCHOR."""
    core = anchor.strip(" ")
    return core if len(core) >= MIN_ANCHOR else anchor


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


def _entry_id(path: Path | str, index: int, entry: Any, seen: set[str]) -> tuple[str, str]:
    """The entry's id, checked (a kebab-case string, not seen before, only known keys), and its 'where'."""
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
    return rid, where


def _anchors_of(path: Path | str, where: str, entry: Mapping[str, Any], compiled: list[re.Pattern[str]]
                ) -> tuple[tuple[bytes, ...], dict[bytes, tuple[bool, bool]]]:
    """The prefilter's anchors: the entry's own, else derived from its patterns (with their edges)."""
    explicit = _check_str_list(path, where, entry, "anchors", empty_ok=True)
    # anchor -> (may the match begin on an earlier line, may it end on a later one)
    edges: dict[bytes, tuple[bool, bool]] = {}
    if explicit:
        # a line break at a space at either end would cut it off (uv and pip wrap at spaces)
        anchors = tuple(dict.fromkeys(_trimmed(a).encode("utf-8") for a in explicit))
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
                edges[a.encode("utf-8")] = (
                    before or not head.startswith(a),
                    after or not tail.endswith(a),
                )
        anchors = tuple(dict.fromkeys(derived))
    return anchors, edges


def _recovered_of(path: Path | str, where: str, entry: Mapping[str, Any]
                  ) -> tuple[tuple[re.Pattern[str], ...], list[bytes]]:
    """The entry's recovered_by patterns and the anchors that find them."""
    recovered = tuple(
        _compile(path, where, "recovered_by", n, src)
        for n, src in enumerate(_check_str_list(path, where, entry, "recovered_by", empty_ok=True), 1)
    )
    recovery_anchors: list[bytes] = []
    for n, pat in enumerate(recovered, 1):
        found_anchors = _derive_anchors(pat)
        if found_anchors is None:
            raise _bad(
                path,
                where,
                "recovered_by",
                f"pattern #{n} {pat.pattern!r} has no literal of "
                f"{MIN_ANCHOR}+ characters to anchor the prefilter",
            )
        recovery_anchors.extend(a.encode("utf-8") for a in found_anchors)
    return recovered, recovery_anchors


def _patterns_of(path: Path | str, where: str, entry: Mapping[str, Any]
                 ) -> tuple[list[re.Pattern[str]], int, bool]:
    """The patterns then the weak ones, compiled; how many are strong (-1: no weak ones); weak_alone."""
    sources = _check_str_list(path, where, entry, "patterns", empty_ok=False)
    weak = _check_str_list(path, where, entry, "weak_patterns", empty_ok=True)
    strong = len(sources) if weak else -1
    weak_alone = entry.get("weak_alone", True)
    if not isinstance(weak_alone, bool):
        raise _bad(path, where, "weak_alone", "must be true or false")
    if not weak_alone and not weak:
        raise _bad(path, where, "weak_alone",
                   "false needs 'weak_patterns' (the evidence that cannot stand alone)")
    sources = sources + weak
    compiled: list[re.Pattern[str]] = []
    for n, src in enumerate(sources, 1):
        try:
            compiled.append(re.compile(src))
        except re.error as exc:
            raise _bad(
                path, where, "patterns", f"pattern #{n} {src!r} is not a valid regex: {exc}"
            ) from None
    return compiled, strong, weak_alone


def _entries_of(path: Path | str, doc: Mapping[str, Any]) -> list:
    """The document's [[failure]] tables (nothing else at the top level)."""
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
    return entries


def _parse_rules(path: Path | str, doc: Mapping[str, Any]) -> list[Rule]:
    entries = _entries_of(path, doc)
    rules: list[Rule] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries, 1):
        rid, where = _entry_id(path, index, entry, seen)
        for key in _REQUIRED_KEYS:
            if key not in entry:
                raise _bad(path, where, key, "missing")

        severity = _check_str(path, where, entry, "severity")
        if severity not in SEVERITIES:
            raise _bad(path, where, "severity", f"{severity!r} is not one of {SEVERITIES}")
        cause = _check_str(path, where, entry, "cause")
        fix = _check_fix(path, where, "fix", _check_str(path, where, entry, "fix"))

        compiled, strong, weak_alone = _patterns_of(path, where, entry)

        anchors, edges = _anchors_of(path, where, entry, compiled)
        wrap = _check_str_list(path, where, entry, "wrap_anchors", empty_ok=True)
        anchors = tuple(dict.fromkeys(anchors + tuple(a.encode("utf-8") for a in wrap)))

        lower = tuple(dict.fromkeys(a.lower() for a in anchors if a.lower() not in anchors))
        fixes = _parse_fixes(path, where, entry.get("fixes", []))
        recovered, recovery_anchors = _recovered_of(path, where, entry)

        implies = _check_str_list(path, where, entry, "implies", empty_ok=True)
        implies += [
            h for h in _check_str_list(path, where, entry, "hides", empty_ok=True) if h not in implies
        ]
        explains = _check_str_list(path, where, entry, "explains", empty_ok=True)
        edges = {a: edges.get(a, (True, True)) for a in anchors}
        edges.update({a.lower(): edges[a] for a in anchors if a.lower() in lower})
        folded = tuple(re.compile(p.pattern, re.IGNORECASE) for p in compiled)
        rules.append(
            Rule(
                rid,
                severity,
                tuple(compiled),
                cause,
                fix,
                tuple(implies),
                anchors,
                tuple(explains),
                strong,
                edges,
                weak_alone,
                folded,
                lower,
                fixes,
                recovered,
                tuple(dict.fromkeys(recovery_anchors)),
            )
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
    reach = reachability(rules)
    for rule in rules:
        if rule.id in reach[rule.id]:
            raise _bad(path, f"failure '{rule.id}'", "implies", "cycle in implies/explains/hides")
    return rules


def _compile(path: Path | str, where: str, key: str, n: int, src: str) -> re.Pattern[str]:
    try:
        return re.compile(src)
    except re.error as exc:
        raise _bad(path, where, key, f"pattern #{n} {src!r} is not a valid regex: {exc}") from None


def _check_fix(path: Path | str, where: str, key: str, fix: Any) -> str:
    if not isinstance(fix, str) or not fix.strip():
        raise _bad(path, where, key, "must be a non-empty string")
    for m in _PLACEHOLDER_RE.finditer(fix):
        if m.group(1) not in CONTEXT_KEYS:
            raise _bad(path, where, key, f"unknown placeholder {{{m.group(1)}}} (known: {CONTEXT_KEYS})")
    leftover = _PLACEHOLDER_RE.sub("", fix)
    if "{" in leftover or "}" in leftover:
        raise _bad(path, where, key, "unbalanced '{' or '}' (placeholders are {key} or {key|fallback})")
    return fix


def _parse_fixes(path: Path | str, where: str, value: Any) -> tuple[tuple[re.Pattern[str], str], ...]:
    """``fixes = [{when = "regex", fix = "..."}, ...]``: the fix for the logs whose message matches
    ``when``."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise _bad(path, where, "fixes", 'must be a list of tables {when = "regex", fix = "..."}')
    out = []
    for n, item in enumerate(value, 1):
        if set(item) != _FIX_KEYS:
            raise _bad(path, where, "fixes", f"entry #{n} must have exactly the keys {sorted(_FIX_KEYS)}")
        if not isinstance(item["when"], str) or not item["when"]:
            raise _bad(path, where, "fixes", f"entry #{n}: 'when' must be a non-empty regex")
        out.append(
            (_compile(path, where, "fixes", n, item["when"]), _check_fix(path, where, "fixes", item["fix"]))
        )
    return tuple(out)


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
            doc = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{p}: not valid TOML: {exc}") from None
    rules = _parse_rules(p, doc)
    _CACHE[key] = rules
    return list(rules)


def reachability(rules: Sequence[Rule]) -> dict[str, set[str]]:
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
