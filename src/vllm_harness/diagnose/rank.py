"""Root cause first: specificity (a rule names the rules it explains or implies), evidence strength, then the
position in the log; each finding says why it won."""
from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from typing import Any

from vllm_harness.diagnose.rules import Rule, reachability


def standing(
    rules: Sequence[Rule], found: Mapping[str, tuple[int, str, int, int]]
) -> dict[str, tuple[int, str, int, int]]:
    """The findings that stand: a failure found only by weak evidence that cannot stand alone
    (``weak_alone = false``) is dropped when no other finding stands next to it."""
    by_id = {r.id: r for r in rules}
    lone = {i for i, f in found.items() if i in by_id and by_id[i].needs_company(f[2])}
    if lone and len(lone) == len(found):
        return {}
    return dict(found)


def rank_findings(
    rules: Sequence[Rule], found: Mapping[str, tuple[int, str, int, int]]
) -> tuple[list[str], dict[str, list[str]], dict[str, dict[str, Any]]]:
    """Order the findings root cause first.

    1. *specificity*: a failure that implies or explains another found one (directly or through
       others) comes before it; the other lists it in ``explained_by``;
    2. among the failures nothing found explains: *evidence strength* (a strong pattern before a
       weak one: generic wording that other causes print too);
    3. then *position*: the earliest line first (the first error in causal order, not the last
       traceback), then the knowledge file's order.

    Returns the ids in order, ``explained_by`` per id, and per id the facts that ranked it."""
    reach = reachability(rules)
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
