"""`invoke diagnose`: the cause and fix of a failed log (default: the last failed step's)."""
from __future__ import annotations

from pathlib import Path

from vllm_harness import diagnose
from vllm_harness.commands.common import layout_of, print_json, variant_of
from vllm_harness.core.errors import HarnessError, UsageError
from vllm_harness.steps.probe import load_record


def cmd_diagnose(a) -> int:
    layout = layout_of(a)
    log = a.log
    context = {}
    if not log:
        last = layout.read_last_failed()
        if last is None:
            raise UsageError("No failed step recorded yet.", "Pass --log FILE (or - for stdin).")
        log = last["log"]
        try:
            context = variant_of(layout, last.get("variant")).fix_context()
        except HarnessError:
            context = {}
    elif log != "-" and not Path(log).is_file():
        raise UsageError(f"--log {log}: no such file.", "Give the path of a build or install log, or - for stdin.")
    if a.variant:
        context = variant_of(layout, a.variant).fix_context()
    if log != "-" and Path(log).name == "probe.log":
        # a compile probe's log: its fix names the torch the *source* pins (the probe's record), not the variant's
        pin = (load_record(Path(log)) or {}).get("source_pins_torch")
        if pin:
            context = {**context, "torch": pin}
    report = diagnose.diagnose_path(log, context=context)
    if a.json:
        print_json(a, report.to_dict())
    else:
        diagnose.render_table(report)
    return 1 if report.findings else 0
