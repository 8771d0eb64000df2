"""`invoke diagnose`: the cause and fix of a failed log (default: the last failed step's)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from vllm_harness import diagnose
from vllm_harness.commands.common import layout_of, print_json, variant_of
from vllm_harness.core import safeio
from vllm_harness.core.errors import HarnessError, UsageError
from vllm_harness.steps.probe import load_record

FIX = "Give the path of a build or install log, or - for stdin (`cat FILE | invoke diagnose --log -`)."


def _check_log(log: str, what: str) -> None:
    """A log is a regular file: anything else is named for what it is (a FIFO would block the read, /dev/zero
    would never end) and not read."""
    try:
        regular = stat.S_ISREG(os.stat(log).st_mode)
    except FileNotFoundError:
        raise UsageError(f"{what} {log}: no such file.", FIX) from None
    if not regular:  # safeio's bounded reader opens it without blocking and says what it is, reading nothing
        safeio.read_bytes(log, what, 0, FIX)


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
    if log != "-":
        _check_log(log, "--log" if a.log else "The last failed step's log")
    if a.variant:
        context = variant_of(layout, a.variant).fix_context()
    if log != "-" and Path(log).name == "probe.log":
        # a compile probe's log: its fix names the torch the *source* pins (the probe's record), not the
        # variant's
        pin = (load_record(Path(log)) or {}).get("source_pins_torch")
        if pin:
            context = {**context, "torch": pin}
    report = diagnose.diagnose_path(log, context=context)
    if a.json:
        print_json(a, report.to_dict())
    else:
        diagnose.render_table(report)
    return 1 if report.findings else 0
