"""The feasibility judge's model (issue 28): what would be installed (:class:`Candidate`), what a rule
finds (:class:`Issue`: a doctor :class:`Finding` plus whether a fix on the machine or the variant removes it)
and the verdict over them (:class:`Verdict`, its tier).  ``facts/feasibility.py`` (driver, GPUs, platform,
toolkit; it re-exports this model) and ``facts/feasibility_build.py`` (Python, host compiler, cmake, disk)
judge with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from vllm_harness.core.findings import Finding
from vllm_harness.facts.compat import Fact

TIERS = ("runs", "runs with warnings", "runs after fixes", "cannot")
#: the failure ids only the judge emits in doctor (the consistency test of doctor and plan uses them)
IDS = (
    "driver-too-old",
    "no-driver",
    "cuda-forward-compat",
    "no-kernel-image",
    "bf16-unsupported",
    "flash-attn-unsupported-gpu",
    "arch-unsupported-by-nvcc",
    "torch-cpu-only",
    "torch-wheel-not-found",
    "cuda-home-missing",
    "nvcc-not-found",
    "cuda-torch-version-mismatch",
    "python-unsupported",
    "python-headers-missing",
    "host-compiler-unsupported",
    "cmake-too-old",
    "disk-full",
)
#: the build env keys that name the host compiler (the build's own override order)
COMPILER_KEYS = ("CUDAHOSTCXX", "CXX", "CC")


@dataclass(frozen=True)
class Candidate:
    """What would be installed: a CUDA line, torch, vLLM, how, and where from (a variant, or one plan
    tries), with what the build around it needs judged (Python range, [deps], [build] compilers/cmake_min)."""

    cuda: str
    torch: str
    vllm: str
    mode: str  # 'wheel' | 'source'
    name: str = "candidate"
    torch_index: str | None = None  # None: PyPI
    torch_preinstalled: bool = False
    vllm_index: str | None = None
    toolkit: str = "system"  # 'system' | 'pypi' ([build] toolkit)
    python: str | None = None  # the variant's Python range; None: not judged (a fleet picks per machine)
    deps: tuple[str, ...] = ()  # [deps] packages (a cmake there is the venv's)
    compilers: tuple[tuple[str, str], ...] = ()  # [build] env's CUDAHOSTCXX / CXX / CC
    cmake_min: str | None = None  # [build] cmake_min (None: the variant default, 3.26)
    installer: str = "uv"

    @property
    def cuda_tag(self) -> str:
        return "cu" + self.cuda.replace(".", "")

    @property
    def source(self) -> bool:
        return self.mode == "source"

    def venv_provides(self, name: str, need: Version | None = None) -> Requirement | None:
        """The [deps] requirement that installs ``name`` into the venv (at least ``need``), else None."""
        for r in self.deps:
            try:
                req = Requirement(r)
            except InvalidRequirement:
                continue
            if req.name.lower() != name:
                continue
            lb = lower_bound(req)
            if need is None or (lb is not None and lb >= need):
                return req
        return None


def lower_bound(req: Requirement) -> Version | None:
    """The highest lower bound of a requirement's specifier (>=, ==, ~=, >), or None."""
    best = None
    for s in req.specifier:
        if s.operator in (">=", "==", "~=", "===", ">"):
            v = version_or_none(s.version.rstrip(".*"))
            if v is not None and (best is None or v > best):
                best = v
    return best


def candidate_of(variant: Any) -> Candidate:
    """The candidate a variant (``variants.Variant``) stands for."""
    build = variant.build
    env = build.get("env") or {}
    return Candidate(
        cuda=variant.cuda,
        torch=_public(variant.torch["version"]),
        vllm=variant.vllm["version"],
        mode=variant.vllm["mode"],
        name=variant.name,
        torch_index=variant.torch.get("index_url"),
        torch_preinstalled=bool(variant.torch.get("preinstalled")),
        vllm_index=variant.vllm.get("index_url"),
        toolkit=build.get("toolkit") or "system",
        python=getattr(variant, "python", None),
        deps=tuple(variant.deps.get("packages") or ()),
        compilers=tuple((k, str(env[k])) for k in COMPILER_KEYS if env.get(k)),
        cmake_min=build.get("cmake_min"),
        installer=getattr(variant, "installer", "uv") or "uv",
    )


@dataclass(frozen=True)
class Issue:
    finding: Finding
    fixable: bool = False  # an error a change on the machine (or the variant's index) removes


@dataclass
class Verdict:
    tier: str
    issues: list[Issue] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        return [f"{i.finding.id}: {i.finding.evidence}" for i in self.issues if i.finding.severity != "info"]

    @property
    def fixes(self) -> list[str]:
        return [i.finding.fix for i in self.issues if i.finding.severity == "error" and i.fixable]

    @property
    def warnings(self) -> list[str]:
        return [i.finding.evidence for i in self.issues if i.finding.severity == "warning"]


def tier_of(issues: list[Issue]) -> str:
    errors = [i for i in issues if i.finding.severity == "error"]
    if any(not i.fixable for i in errors):
        return "cannot"
    if errors:
        return "runs after fixes"
    if any(i.finding.severity == "warning" for i in issues):
        return "runs with warnings"
    return "runs"


def make_issue(
    id: str, severity: str, subject: str, evidence: str, fix: str, check: str = "", fixable: bool = False
) -> Issue:
    return Issue(Finding(id, severity, subject=subject, evidence=evidence, fix=fix, check=check), fixable)


def skipped(check: str, subject: str, key: str) -> Issue:
    return make_issue(
        "check-skipped",
        "info",
        subject,
        f"the machine profile has no {key}, so this was not checked",
        f"probe the machine itself (`invoke doctor`) or add {key} to the profile",
        check,
    )


def unknown(check: str, subject: str, what: str) -> Issue:
    return make_issue(
        "compat-unknown",
        "warning",
        subject,
        f"{what} is not in the compatibility data (src/vllm_harness/data/compat.toml); not checked",
        "add the facts with their source to data/compat.toml, or choose versions the data knows",
        check,
    )


def cite(f: Fact | None) -> str:
    return f" [{f.cite()}]" if f is not None else ""


def version_or_none(s: Any) -> Version | None:
    """A version, or None where the text is not one (an unknown pin in the data)."""
    try:
        return Version(str(s))
    except (InvalidVersion, TypeError):
        return None


def _public(v: str) -> str:
    try:
        return Version(v).public
    except InvalidVersion:
        return v


def cc_str(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"
