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
  their own messages (indented continuations, at spaces: a long word leaves a short line before it,
  :data:`WRAP_WIDTH`; anchors never end in a space).  A wide line (:data:`WRAP_MIN_CHARS`) is joined with
  the lines it goes on in (:data:`WRAP_BEFORE`, :data:`WRAP_AFTER`; never into a line that starts a
  message of its own), with nothing or a space at each break, and the finding keeps the original
  number of the line where the match begins.  Blocks are scanned with the lines around them as
  context (also the parts of a parallel scan), so chunk boundaries change nothing.  Rules name a
  second literal (``wrap_anchors``) for messages a break could cut through their first one;
* a line without capital letters (a message pasted in lower case) is matched with the patterns made
  case-insensitive; the prefilter finds it through the anchors' lower-cased forms, literals like the others;
* a failure id is reported once, at its first occurrence; once an id is found its anchors leave
  the prefilter, and the scan stops as soon as nothing is left to look for; a finding whose rule has
  ``recovered_by`` patterns is withdrawn by a later line matching one (the retry got through, the install
  went on: their anchors join the prefilter while it stands; once per id; within one part of a parallel
  scan);
* the fix of a rule with ``fixes`` is chosen by the message and the lines just before it (the import line
  of a traceback names the package);
* when nothing is recognised, the report carries the first error block (``error:``, ``Error``,
  ``FAILED``, ``Traceback``... and the lines after it) so that the user starts at the right line;
* files of :data:`PARALLEL_MIN_BYTES` or more are split at line boundaries and scanned by
  several processes (``diagnose_path(..., workers=1)`` forces one pass).

Findings are ranked root cause first (:func:`rank_findings`): *specificity* first (a failure that
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

import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

from vllm_harness.diagnose.normalize import (
    FIRST_ERROR_ANCHORS,
    FIRST_ERROR_RE,
    JOIN_REACH,
    MAX_LINE_CHARS,
    clean_segments,
    evidence_of,
    first_match,
    wrapped_messages,
)
from vllm_harness.diagnose.rank import standing
from vllm_harness.diagnose.rules import (
    BYTE_FREQ,
    MAX_ANCHOR,
    OWN_SEARCH_PERMILLE,
    Rule,
)

try:  # optional accelerator (x86_64 wheels on PyPI); the pure-``re`` prefilter is the fallback
    import hyperscan as _hyperscan
except Exception:  # ImportError, or a CPU/library it cannot use
    _hyperscan = None

#: Prefilter engines: ``hyperscan`` (when importable) and ``re``.  ``VLLM_HARNESS_DIAGNOSE_ENGINE``
#: picks one; the default is the first available.
ENGINES = tuple(e for e in ("hyperscan", "re") if e != "hyperscan" or _hyperscan is not None)


def default_engine() -> str:
    wanted = os.environ.get("VLLM_HARNESS_DIAGNOSE_ENGINE", "").strip()
    return wanted if wanted in ENGINES else ENGINES[0]


#: Lines of the first error block reported when nothing is recognised.
FIRST_ERROR_BLOCK = 15
#: Anchor hits collected per Hyperscan pass (the rest of a block is scanned when needed).
HS_BATCH = 512
#: Lines remembered per scan as matching nothing on their own (logs repeat near-miss lines).
SEEN_LINES = 4096
#: Lines before a message that a rule's ``fixes`` look at (the import line of a traceback).
FIX_CONTEXT_LINES = 4


# --------------------------------------------------------------------------------------------
# data model


# --------------------------------------------------------------------------------------------
# knowledge base


# --------------------------------------------------------------------------------------------
# scanning


_TRIE_CACHE: dict[tuple[tuple[bytes, ...], bool], re.Pattern[bytes] | None] = {}


def _trie_cached(words: Iterable[bytes], overlapping: bool = False) -> re.Pattern[bytes] | None:
    """:func:`_trie_regex`, compiled once per word list and process (a scan rebuilds its prefilter after
    every finding, and the same lists recur from log to log)."""
    key = (tuple(words), overlapping)
    if key not in _TRIE_CACHE:
        if len(_TRIE_CACHE) > 256:
            _TRIE_CACHE.clear()
        _TRIE_CACHE[key] = _trie_regex(key[0], overlapping)
    return _TRIE_CACHE[key]


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


class Scanner:
    """State of one scan: what is found, what is still looked for, the first error block."""

    def __init__(self, rules: Sequence[Rule], engine: str | None = None) -> None:
        self.engine = engine or default_engine()
        if self.engine not in ENGINES:
            raise ValueError(
                f"diagnose engine {self.engine!r} is not available here (have: {', '.join(ENGINES)})"
            )
        self.rules = list(rules)
        self.order = {r.id: i for i, r in enumerate(self.rules)}
        # id: line, evidence, pattern, fix (-1: the rule's own, else the index of its ``fixes``)
        self.found: dict[str, tuple[int, str, int, int]] = {}
        self.first_error: list[tuple[int, str]] = []
        self.track_first_error = True
        self.pending_error_lines = 0
        self.error_started = False  # the first error line was just seen: copy the lines after it
        self.anchor_rules: dict[bytes, list[Rule]] = {}
        self.recovery_rules: dict[bytes, list[Rule]] = {}
        #: ids whose finding a later line withdrew once: found again, their finding stands (a scan never
        #: goes back and forth on one failure)
        self.recovered: set[str] = set()
        for rule in self.rules:
            for anchor in rule.anchors + rule.lower_anchors:
                self.anchor_rules.setdefault(anchor, []).append(rule)
            for anchor in rule.recovery_anchors:
                self.recovery_rules.setdefault(anchor, []).append(rule)
        # for a line that holds anchors: which ones (also overlapping ones and prefixes), of every rule: built
        # once (the anchors of the failures already found are ignored where the line is read)
        self.all_words = tuple(
            dict.fromkeys([*self.anchor_rules, *self.recovery_rules, *FIRST_ERROR_ANCHORS])
        )
        self.overlapping = _trie_cached(self.all_words, overlapping=True)
        self.prefixes: dict[bytes, list[bytes]] = {}
        self._rebuild()

    # -- prefilter -------------------------------------------------------------------------
    def _rebuild(self) -> None:
        """The anchors still needed, and their search: one Hyperscan database, else the trie regex
        and the regexes of the anchors that start with a frequent byte."""
        self.active_anchors = [
            a for a, rs in self.anchor_rules.items() if any(self._open(r) for r in rs)
        ]
        # a finding that a later line can withdraw (the step went on): that line's anchors
        active = set(self.active_anchors)
        words = list(self.active_anchors) + [
            a for a, rs in self.recovery_rules.items()
            if a not in active and any(r.id in self.found and r.id not in self.recovered for r in rs)
        ]
        if self.track_first_error:
            words += FIRST_ERROR_ANCHORS
        self.scan_words = words
        self.hs_lengths = [len(w) for w in words]
        self.hs_db = None
        self.searches: list[re.Pattern[bytes]] = []
        if self.engine == "hyperscan" and words:
            try:
                self.hs_db = _hyperscan_db(tuple(words))
            except Exception:  # e.g. a CPU without the instructions it needs: fall back to re
                self.engine = "re"
        if self.hs_db is None:
            by_first: dict[int, list[bytes]] = {}
            for word in words:
                by_first.setdefault(word[0], []).append(word)
            trie_words: list[bytes] = []
            searches: list[re.Pattern[bytes]] = []
            for first, group in sorted(by_first.items()):
                if BYTE_FREQ.get(chr(first), 2) <= OWN_SEARCH_PERMILLE:
                    trie_words += group
                else:
                    searches.append(_trie_cached(group))  # type: ignore[arg-type]
            main = _trie_cached(trie_words)
            self.searches = ([main] if main is not None else []) + searches
        self.seen: dict[bytes, tuple[tuple[Rule, ...], dict[bytes, tuple[int, int]]]] = {}

    def _open(self, rule: Rule) -> bool:
        """Is ``rule`` still looked for: not found yet, or found by weak evidence only (strong
        evidence found later takes its place)?"""
        found = self.found.get(rule.id)
        return found is None or rule.strength(found[2]) == "weak"

    def _takes(self, rule: Rule, pattern: int) -> bool:
        """Does a match of ``rule``'s pattern ``pattern`` make (or better) its finding?"""
        return rule.takes(self.found.get(rule.id), pattern)

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
            changed, missed, present, segments, want_error = self._check_line(region, line_no, where)
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
            for text, starts in wrapped_messages(*where, line_no, before, after):
                for rule in missed:
                    if not self._open(rule):
                        continue
                    hit, n = first_match(self._patterns(rule, text), text, starts, line_no)
                    if hit and self._takes(rule, n):
                        at = max(k for k, (off, _) in enumerate(starts) if off <= hit.start())
                        fix = self._fix_choice(rule, text, where)
                        self.found[rule.id] = (starts[at][1], evidence_of(text, hit), n, fix)
                        changed = True
        if changed and self.track_first_error and standing(self.rules, self.found):
            # the first error block is only reported when nothing is recognised
            self.track_first_error = False
            self.first_error = []
            self.pending_error_lines = 0
            return True
        if want_error and not self.first_error:
            if any(FIRST_ERROR_RE.search(seg) for seg in segments):
                self.first_error = [(line_no, evidence_of(" ".join(segments), None))]
                self.track_first_error = False
                self.pending_error_lines = FIRST_ERROR_BLOCK - 1
                self.error_started = True
                return True
        return changed

    @staticmethod
    def _patterns(rule: Rule, text: str) -> tuple[re.Pattern[str], ...]:
        """The rule's patterns; case-insensitive on a text without a capital letter (a message pasted in lower
        case: it holds the rule's anchors lower-cased, which the prefilter looks for as literals too)."""
        return rule.folded if text == text.lower() else rule.patterns

    def _fix_choice(self, rule: Rule, text: str, where: tuple[bytes, int, int] | None) -> int:
        """Which of the rule's fixes fits: ``when`` is matched on the message and the lines just before it
        (a traceback's import line names the package that failed)."""
        if not rule.fixes:
            return -1
        if where is not None:
            block, ls, _le = where
            start = ls
            for _ in range(FIX_CONTEXT_LINES):
                if start <= 0:
                    break
                start = block.rfind(b"\n", 0, start - 1) + 1
            text = " ".join(clean_segments(block[start:ls][-MAX_LINE_CHARS:])) + " " + text
        return rule.fix_for(text)

    def _recover(self, region: bytes, present: dict[bytes, tuple[int, int]], line_no: int) -> bool:
        """Withdraw the findings that this line says were recovered from (a retry that succeeded, the step
        going on); their rules are looked for again, and a failure found again after that stands."""
        changed = False
        for anchor in present:
            for rule in self.recovery_rules.get(anchor, ()):
                found = self.found.get(rule.id)
                if found is None or found[0] >= line_no or rule.id in self.recovered:
                    continue
                if any(p.search(seg) for seg in clean_segments(region) for p in rule.recovered):
                    del self.found[rule.id]
                    self.recovered.add(rule.id)
                    changed = True
        return changed

    def _check_line(
        self, region: bytes, line_no: int, where: tuple[bytes, int, int] | None = None
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
                    prefixes = self.prefixes[word] = [p for p in self.all_words if word.startswith(p)]
                at = m.start()
                for p in prefixes:
                    present[p] = (present[p][0] if p in present else at, at + len(p))
        changed = bool(self.recovery_rules) and self._recover(region, present, line_no)
        rules: list[Rule] = []
        for anchor in present:
            for rule in self.anchor_rules.get(anchor, ()):
                if rule not in rules and self._open(rule):
                    rules.append(rule)
        want_error = self.track_first_error and not present.keys().isdisjoint(FIRST_ERROR_ANCHORS)
        if not rules and not want_error:
            return changed, (), {}, [], False
        segments = clean_segments(region)
        rules.sort(key=lambda r: self.order[r.id])
        missed: list[Rule] = []
        for rule in rules:
            for seg in segments:
                hit, n = first_match(self._patterns(rule, seg), seg)
                if hit:
                    if self._takes(rule, n):
                        fix = self._fix_choice(rule, seg, where)
                        self.found[rule.id] = (line_no, evidence_of(seg, hit), n, fix)
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
            segments = clean_segments(block[pos : min(stop, pos + MAX_LINE_CHARS)])
            self.first_error.append((line_no, evidence_of(" ".join(segments), None)))
            self.pending_error_lines -= 1
            line_no += 1
            pos = stop + 1
        return pos


# --------------------------------------------------------------------------------------------
# presentation


# --------------------------------------------------------------------------------------------
# the corpus of real logs (tests/logs) and the accuracy measure (tests and the benchmark)
