"""The one findings model: what doctor, diagnose and verify report about a failure.

A :class:`Finding` names its failure id (``data/failures.toml`` is the only list of ids), a severity, the
subject it is about, the evidence (a log line, a version, a measurement), the cause and the fix.  ``cause``
defaults to the id's own cause from failures.toml when the reporter has nothing more specific.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vllm_harness.core.safeio import tomllib

SEVERITIES = ("error", "warning", "info")
FAILURES = Path(__file__).resolve().parents[1] / "data" / "failures.toml"


@functools.cache
def known() -> dict[str, dict]:
    """id -> its failures.toml entry (cause, fix, severity...)."""
    return {f["id"]: f for f in tomllib.loads(FAILURES.read_text(encoding="utf-8"))["failure"]}


@dataclass
class Finding:
    id: str
    severity: str              # 'error' | 'warning' | 'info'
    subject: str = ""
    evidence: str = ""
    fix: str = ""
    cause: str = ""
    check: str = ""            # doctor: the check a check-skipped / compat-unknown finding stands for
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity {self.severity!r} is not one of {SEVERITIES}")
        if not self.check:
            self.check = self.id
        if not self.cause:
            self.cause = known().get(self.id, {}).get("cause", "")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d
