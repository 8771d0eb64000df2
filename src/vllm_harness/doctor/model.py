"""doctor's findings model, its run context and the rule registry.

A rule is a function ``fn(ctx)`` registered with :func:`rule`: its name, the failure ids it can emit (each in
data/failures.toml; tests/test_architecture.py checks), the machine-profile keys it needs (a missing one
becomes one ``check-skipped`` finding naming the key, and the rule does not run), when it applies (source
builds only, ...) and its place in the order.  ``report.check()`` runs the registry.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from vllm_harness.core.findings import Finding
from vllm_harness.core.options import RunOptions
from vllm_harness.facts import feasibility
from vllm_harness.facts.compat import (
    CompatData,
)


@dataclass
class RuleCtx:
    variant: Any
    profile: dict
    data: CompatData
    env: dict[str, str]
    source_dir: Path | None
    findings: list[Finding] = field(default_factory=list)
    pins: dict[str, tuple[Any, str]] = field(default_factory=dict)
    probe: dict = field(default_factory=dict)
    records: list = field(default_factory=list)
    options: RunOptions = field(default_factory=RunOptions)  # the build's run options, judged as it uses them
    vf: Any = None  # the vLLM release's facts (None: not in the data)
    tf: Any = None  # the torch release's facts

    def probe_passed(self) -> bool:
        """The compile probe of this very source tree passed against the variant's torch."""
        p = self.probe
        if p.get("status") != "pass" or self.source_dir is None or not p.get("torch"):
            return False
        try:
            same_src = Path(p.get("source", "")).resolve() == self.source_dir.resolve()
            return same_src and Version(str(p["torch"])).public == self.torch_version
        except (InvalidVersion, OSError):
            return False

    @property
    def m(self) -> dict:
        return self.profile.get("machine") or {}

    @property
    def source(self) -> bool:
        return self.variant.vllm["mode"] == "source"

    @property
    def vllm_version(self) -> str:
        return self.variant.vllm["version"]

    @property
    def torch_version(self) -> str:
        return Version(self.variant.torch["version"]).public

    @property
    def candidate(self) -> feasibility.Candidate:
        """The variant as the feasibility judge sees it (facts/feasibility.py)."""
        return feasibility.candidate_of(self.variant)

    def add(self, id: str, severity: str, subject: str, evidence: str, fix: str, check: str = "") -> None:
        self.findings.append(Finding(id, severity, subject=subject, evidence=evidence, fix=fix, check=check))

    def judged(self, issues: Iterable[feasibility.Issue]) -> None:
        """The feasibility judge's issues, as doctor's findings (the judge owns their rules and texts)."""
        self.findings.extend(i.finding for i in issues)

    def skipped(self, check: str, subject: str, key: str) -> None:
        self.judged([feasibility.skipped(check, subject, key)])

    def unknown(self, check: str, subject: str, what: str) -> None:
        self.judged([feasibility.unknown(check, subject, what)])

    def not_found(self, tool: str) -> bool:
        return tool in (self.m.get("not_found") or [])


def _v(s: str) -> Version | None:
    try:
        return Version(s)
    except (InvalidVersion, TypeError):
        return None


def req_named(
    variant: Any, name: str, sections: Iterable[str] = ("torch", "deps", "post_install")
) -> list[Requirement]:
    out = []
    for sec in sections:
        for r in getattr(variant, sec).get("packages") or []:
            try:
                req = Requirement(r)
            except InvalidRequirement:
                continue
            if req.name.lower() == name:
                out.append(req)
    return out


@dataclass(frozen=True)
class Rule:
    name: str
    fn: Callable[[RuleCtx], None]
    ids: tuple[str, ...]
    needs: tuple[str, ...] = ()  # machine-profile keys ("machine.disk_free_gib")
    when: Callable[[RuleCtx], bool] | None = None
    order: int = 50

    def missing(self, ctx: RuleCtx) -> list[str]:
        out = []
        for key in self.needs:
            section, _, name = key.partition(".")
            if (ctx.profile.get(section) or {}).get(name) is None:
                out.append(key)
        return out


RULES: dict[str, Rule] = {}


def rule(
    name: str,
    ids: tuple[str, ...],
    needs: tuple[str, ...] = (),
    when: Callable[[RuleCtx], bool] | None = None,
    order: int = 50,
) -> Callable[[Callable[[RuleCtx], None]], Callable[[RuleCtx], None]]:
    """Register ``fn(ctx)`` as doctor's rule ``name``."""

    def register(fn: Callable[[RuleCtx], None]) -> Callable[[RuleCtx], None]:
        RULES[name] = Rule(name, fn, ids, needs, when, order)
        return fn

    return register


def run_rules(ctx: RuleCtx) -> None:
    """Every registered rule that applies, in order; a rule whose profile keys are missing is one
    check-skipped finding per key instead."""
    for r in sorted(RULES.values(), key=lambda r: (r.order, r.name)):
        if r.when is not None and not r.when(ctx):
            continue
        missing = r.missing(ctx)
        if missing:
            for key in missing:
                ctx.skipped(r.ids[0], r.name, key)
            continue
        r.fn(ctx)
