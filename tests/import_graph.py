"""The package's internal import graph, from the source with ``ast`` (nothing is imported).

Every ``import``/``from ... import`` counts, at module top or inside a function: a local import hides a
cycle from Python's loader, not from the design.  ``python tests/import_graph.py`` prints the modules by
layer, the cycles and the largest modules.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "vllm_harness"
NAME = "vllm_harness"
STANDALONE = {"data"}  # scripts run inside the target interpreter, never imported by the package


def modules(pkg: Path = PKG) -> dict[str, Path]:
    out = {}
    for p in sorted(pkg.rglob("*.py")):
        rel = p.relative_to(pkg).with_suffix("")
        if rel.parts[0] in STANDALONE:
            continue
        parts = [NAME, *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _resolve(mod: str, is_pkg: bool, level: int, target: str | None) -> str:
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def graph(pkg: Path = PKG) -> dict[str, set[str]]:
    mods = modules(pkg)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node.level, node.module) if node.level else (node.module or "")
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for n in names:
                # the longest known module that n names (a name imported from a module is that module)
                while n and n not in mods:
                    n = n.rpartition(".")[0]
                if n and n != mod and n.startswith(NAME):
                    edges[mod].add(n)
    # a package's __init__ is imported with any of its modules: that is not an edge the design chose
    for m in edges:
        edges[m] = {t for t in edges[m] if not (m.startswith(t + "."))}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def levels(edges: dict[str, set[str]]) -> dict[str, int]:
    memo: dict[str, int] = {}

    def lvl(m: str, seen: frozenset = frozenset()) -> int:
        if m in memo:
            return memo[m]
        if m in seen:
            return 0
        v = 1 + max((lvl(t, seen | {m}) for t in edges[m]), default=-1)
        memo[m] = v
        return v

    return {m: lvl(m) for m in edges}


if __name__ == "__main__":
    e = graph()
    mods = modules()
    print(f"{len(e)} modules, {sum(len(v) for v in e.values())} internal import edges")
    for c in cycles(e):
        print("cycle:", " <-> ".join(c))
    lv = levels(e)
    for m in sorted(e, key=lambda m: (lv[m], m)):
        print(f"  level {lv[m]}  {m}  ({sum(1 for _ in open(mods[m]))} lines)")
