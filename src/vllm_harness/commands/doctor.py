"""`invoke doctor`: the preflight verdict for a variant on this machine (or a saved profile)."""
from __future__ import annotations

from pathlib import Path

from vllm_harness.commands.common import context_of, print_json
from vllm_harness.core.runner import console
from vllm_harness.doctor import report as doctor
from vllm_harness.pipeline import preflight as doctor_run


def cmd_doctor(a) -> int:
    ctx = context_of(a)
    report, secs = doctor_run.run_doctor(ctx, a.machine, a.save_machine, Path(a.source) if a.source else None)
    report["seconds"] = round(secs, 2)
    if a.json:
        print_json(a, report)
    else:
        doctor.render_table(report, console=console())
        print(f"doctor: {report['verdict']} ({secs:.1f}s)")
    return 1 if any(f["severity"] == "error" for f in report["findings"]) else 0
