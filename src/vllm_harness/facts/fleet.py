"""``plan --machine a.toml --machine b.toml ...``: plan a fleet (issue 28).

Every machine is planned on its own (facts/planner.py); every candidate one of them can run (as is or with
warnings) is then judged on every other machine by the same judge (facts/feasibility.py), with the Python the
variant would pin.  A greedy cover picks the fewest variants that serve every machine it can -- the one that
serves the most machines still unserved first, a prebuilt wheel and a newer vLLM on ties -- each with the
machines it serves and, for a source build, the arch list of their GPUs (so one build covers them all).  A
machine nothing serves as is keeps its own recommendation (its fixes) or its reasons.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from vllm_harness.facts import feasibility, planner
from vllm_harness.facts.compat import CompatData

_GOOD = ("runs", "runs with warnings")


def _key(c: feasibility.Candidate) -> tuple:
    return (c.cuda, c.torch, c.vllm, c.mode, c.torch_index, c.torch_preinstalled)


def _minors(profile: dict, spec: SpecifierSet, tags: list[str] | None) -> set[str]:
    return {f"{p.major}.{p.minor}" for p in planner.machine_pythons(profile)
            if spec.contains(p, prereleases=True) and planner.tag_covers(tags, p)}


def _serves(machines: list[tuple[str, dict]], data: CompatData,
            pool: dict[tuple, planner.Option]) -> dict[tuple, dict[str, tuple[str, set[str]]]]:
    """candidate -> {machine: (its tier there, the Python minors it can use)}, judged by the one judge."""
    serves: dict[tuple, dict[str, tuple[str, set[str]]]] = {}
    for key, o in pool.items():
        # the Python is chosen per machine below (the minors each has): the judge sees no range of one machine
        cand, vf, tf = replace(o.extra["cand"], python=None), o.extra["vf"], o.extra["tf"]
        spec = SpecifierSet(str(vf.python.value) if vf.python is not None else "") & SpecifierSet(
            str(tf.python.value)
        )
        for name, prof in machines:
            verdict = feasibility.judge(data, prof, cand, vf, tf)
            if verdict.tier not in _GOOD or any(i.finding.id == "compat-unknown" for i in verdict.issues):
                continue
            tags = None
            if cand.mode == "wheel" and vf.wheels is not None:
                tags = planner.for_arch(list(vf.wheels.value), feasibility.cpu_arch(prof)) or None
            minors = _minors(prof, spec, tags)
            if minors:
                serves.setdefault(key, {})[name] = (verdict.tier, minors)
    return serves


def _best(serves: dict, pool: dict, unserved: list[str]) -> tuple | None:
    """The (score, candidate, Python, machines) that serves the most machines still unserved (a wheel, then a
    newer vLLM and CUDA on ties)."""
    best = None
    for key, by in serves.items():
        for py in set().union(*(m for _t, m in by.values())):
            cov = [n for n in unserved if n in by and py in by[n][1]]
            if not cov:
                continue
            o = pool[key]
            score = (len(cov), o.mode == "wheel", Version(o.vllm), Version(o.cuda), Version(py))
            if best is None or score > best[0]:
                best = (score, key, py, cov)
    return best


def _variant(o: planner.Option, py: str, cov: list[str], by: dict, profiles: dict[str, dict]) -> dict:
    ccs = sorted({g["compute_capability"] for n in cov for g in profiles[n].get("gpu") or []
                  if g.get("compute_capability")}, key=Version)
    return {
        "variant": f"{planner.cuda_tag(o.cuda)}-vllm{o.vllm.replace('.', '')}",
        "cuda": o.cuda, "torch": o.torch, "vllm": o.vllm, "mode": o.mode, "python": py,
        "torch_index": o.extra["cand"].torch_index,
        "arch_list": ";".join(ccs) if o.mode == "source" else None,
        "machines": {n: by[n][0] for n in cov},
    }


def plan_fleet(machines: list[tuple[str, dict]], data: CompatData) -> dict:
    """``{machines, variants: [{variant, cuda, torch, vllm, mode, python, arch_list, machines: {name: tier}}],
    unserved: [{machine, recommendation, why}]}``."""
    reports = {name: planner.plan(p, data, name) for name, p in machines}
    pool: dict[tuple, planner.Option] = {}
    for rep in reports.values():
        for o in rep["_options"]:
            if o.tier in _GOOD:
                pool.setdefault(_key(o.extra["cand"]), o)
    serves = _serves(machines, data, pool)
    unserved = [name for name, _ in machines]
    chosen: list[dict[str, Any]] = []
    while unserved and (best := _best(serves, pool, unserved)) is not None:
        _score, key, py, cov = best
        chosen.append(_variant(pool[key], py, cov, serves[key], dict(machines)))
        unserved = [n for n in unserved if n not in cov]
    left = []
    for name in unserved:
        rec = reports[name]["recommendation"]
        why = rec["reason"] if rec else "; ".join(o["why"] for o in reports[name]["options"][:2])
        left.append({"machine": name, "recommendation": rec, "why": why})
    return {"machines": [n for n, _ in machines], "variants": chosen, "unserved": left}


def render_fleet(report: dict, console: Any = None) -> None:
    # rich is imported here: only the table output needs it
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(
        title=escape(f"plan for a fleet of {len(report['machines'])}: {', '.join(report['machines'])}"),
        show_lines=True,
    )
    for c in ("variant", "vllm", "torch", "cuda", "mode", "python", "arch_list", "machines"):
        t.add_column(c, overflow="fold")
    for v in report["variants"]:
        t.add_row(
            *(
                escape(str(v[c] if v[c] is not None else "-"))
                for c in ("variant", "vllm", "torch", "cuda", "mode", "python", "arch_list")
            ),
            escape(", ".join(f"{n} ({tier})" for n, tier in v["machines"].items())),
        )
    console = console or Console()
    console.print(t)
    for u in report["unserved"]:
        console.print(escape(f"not served as is: {u['machine']}: {u['why']}"))
