"""Preflight verdict for a variant on a machine, before any download or compile (issue 4).

``check(variant, profile, source_dir=None, env=None)`` judges a variant (``variants.Variant``) against a
machine profile (``machine.probe`` / ``machine.load_profile``) with the compatibility data
(``compat.load()``) and returns findings that use the ids of docs/contract/failure-ids.md.  It runs no
subprocess; with ``source_dir`` it reads the pins of that vLLM tree (requirements files, pyproject.toml,
CMakeLists.txt) instead of the table, and looks at the tree's owner and leftovers.

Two ids of its own, for checks it could not make:
* ``check-skipped`` (info): the profile lacks the key the check needs (``check`` names the check);
* ``compat-unknown`` (warning): a version the compatibility data does not hold -- never a guess;
* ``compat-stale`` (warning): the variant names a release newer than the data (one finding naming
  ``invoke compat --refresh`` instead of the unknowns); info when the generated data is old.

``verdict(findings)``: 'will fail' with any error, 'ready with warnings' with any warning, else 'ready'.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vllm_harness.core.findings import SEVERITIES, Finding
from vllm_harness.core.options import RunOptions
from vllm_harness.core.runner import emit
from vllm_harness.doctor import rules_build, rules_gpu, rules_versions  # noqa: F401  (importing them registers the rules)
from vllm_harness.doctor.model import RuleCtx, run_rules
from vllm_harness.doctor.pins import read_source_pins
from vllm_harness.facts import compat as compat_mod
from vllm_harness.facts.compat import (
    CompatData,
)

# ====================================================================================== source tree


# ===================================================================================== the checks


# ======================================================================================= public API

def check(variant: Any, profile: dict, source_dir: Path | None = None, env: dict | None = None,
          data: CompatData | None = None, probe: dict | None = None, records: list | None = None,
          options: RunOptions | None = None) -> list[Finding]:
    """Findings for ``variant`` on the machine ``profile``: errors first, then warnings, then info.
    ``probe``: the record of the last compile probe of this variant (its outcome outweighs the pin rule).
    ``records``: the build-speed records (peak memory per compile job) of earlier builds on this machine.
    ``options``: the build's run options (--jobs, --nvcc-threads, --arch, --cache, --farm), judged as the
    build will use them."""
    ctx = RuleCtx(variant=variant, profile=profile or {}, data=data or compat_mod.load(), env=dict(env or {}),
               source_dir=Path(source_dir) if source_dir is not None else None, probe=probe or {},
               records=list(records or []), options=options or RunOptions())
    if ctx.source_dir is not None and ctx.source_dir.is_dir():
        ctx.pins = read_source_pins(ctx.source_dir)
    vf = ctx.data.vllm(ctx.vllm_version)
    tf = ctx.data.torch(ctx.torch_version)
    if vf is None and not ctx.pins:
        ctx.unknown("torch-api-mismatch", f"vLLM {ctx.vllm_version}",
                    f"vLLM {ctx.vllm_version} (its torch pin, Python range, CMake minimum, build archs)")
        vf = None
    ctx.vf, ctx.tf = vf, tf
    run_rules(ctx)
    order = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(ctx.findings, key=lambda f: order[f.severity])


def verdict(findings: Iterable[Finding]) -> str:
    sev = {f.severity for f in findings}
    if "error" in sev:
        return "will fail"
    if "warning" in sev:
        return "ready with warnings"
    return "ready"


def rank_variants(
    variants: Iterable[Any], profile: dict, env: dict | None = None
) -> list[tuple[str, bool, str]]:
    """(name, ok, reason) for each variant, best first: the ones that will not fail, with fewer warnings,
    newer CUDA, wheels before source builds."""
    rows = []
    for v in variants:
        fs = check(v, profile, env=env)
        errors = [f for f in fs if f.severity == "error"]
        warnings = [f for f in fs if f.severity == "warning"]
        ok = not errors
        if errors:
            reason = "; ".join(f"{f.id}: {f.subject}" for f in errors[:3]) + (
                f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
            )
        elif warnings:
            reason = "ready with warnings: " + ", ".join(sorted({f.id for f in warnings}))
        else:
            reason = "ready"
        key = (not ok, len(errors), len(warnings), -_cuda_key(v.cuda), v.vllm.get("mode") != "wheel", v.name)
        rows.append((key, (v.name, ok, reason)))
    rows.sort(key=lambda r: r[0])
    return [r[1] for r in rows]


def _cuda_key(cuda: str) -> float:
    try:
        ma, mi = cuda.split(".")
        return int(ma) * 100 + int(mi)
    except ValueError:
        return 0


def report_dict(variant: Any, profile: dict, findings: list[Finding]) -> dict:
    """cli.md's doctor JSON: {"variant", "machine", "findings"} plus "verdict"."""
    return {
        "variant": variant.name,
        "verdict": verdict(findings),
        "machine": profile,
        "findings": [f.to_dict() for f in findings],
    }


def render_table(report: dict, console: Any = None, show: bool = True) -> str:
    """Print the report as a rich table (to ``console``, default stdout; nothing when ``show`` is False)
    and return the rendered text."""

    from rich.markup import escape
    from rich.table import Table

    colours = {"error": "bold red", "warning": "yellow", "info": "dim"}
    table = Table(
        title=f"doctor: {escape(str(report.get('variant')))} -> {escape(str(report.get('verdict')))}",
        show_lines=True,
        expand=False,
    )
    for col in ("severity", "id", "subject", "evidence", "fix"):
        table.add_column(col, overflow="fold")
    for f in report.get("findings", []):
        table.add_row(
            f"[{colours.get(f['severity'], 'default')}]{escape(f['severity'])}[/]",
            escape(f["id"]),
            escape(f["subject"]),
            escape(f["evidence"]),
            escape(f["fix"]),
        )
    m = (report.get("machine") or {}).get("machine") or {}
    gpus = (report.get("machine") or {}).get("gpu") or []
    gpu_list = ", ".join(g.get("name", "?") + " (" + g.get("compute_capability", "?") + ")" for g in gpus)
    summary = escape(
        f"GPU: "
        f"{gpu_list or 'none'}"
        f" | driver: {m.get('driver', 'none')} | toolkits: {', '.join(m.get('cuda_toolkits', {})) or 'none'}"
        f" | gcc {m.get('gcc', '?')} | cmake {m.get('cmake', '?')} | Python "
        f"{', '.join(m.get('python', [])) or '?'}"
    )
    parts = [table, summary] + (["no findings"] if not report.get("findings") else [])
    return emit(parts, console, show)
