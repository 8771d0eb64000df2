"""doctor as a command and as the preflight of every build: probe (or load) the machine, judge the variant."""

from __future__ import annotations

import json
import time
from pathlib import Path

from vllm_harness.core import writer
from vllm_harness.core.errors import StepFailed
from vllm_harness.core.runner import console
from vllm_harness.doctor import report as doctor
from vllm_harness.facts.build_policy import load_records
from vllm_harness.steps.probe import load_record


def machine_profile(layout, given: str | None = None, save: str | None = None, force: bool = False) -> dict:
    from vllm_harness.facts import machine, machine_profile
    profile = machine_profile.load_profile(Path(given)) if given else machine.probe(layout.state)
    if save:
        machine_profile.save_profile(profile, Path(save), force=force)   # --force: replace a file not ours
    return profile


def run_doctor(ctx, machine_file: str | None = None, save_machine: str | None = None,
               source: Path | None = None) -> tuple[dict, float]:
    t0 = time.monotonic()
    ctx.profile = machine_profile(ctx.layout, machine_file, save_machine, ctx.options.force)
    if source is None:
        fetched = ctx.status.step("fetch") or {}
        if fetched.get("status") == "ok" and Path(fetched.get("source", "")).is_dir():
            source = Path(fetched["source"])
    env = {} if machine_file else ctx.base_env  # a what-if profile is judged without this shell's env
    probe = load_record(ctx.log("probe")) if source is not None else None
    records = [] if machine_file else load_records(ctx.layout.state)  # a what-if profile is another machine
    findings = doctor.check(ctx.variant, ctx.profile, source_dir=source, env=env, probe=probe,
                            records=records, options=ctx.options)   # what the build will use
    report = doctor.report_dict(ctx.variant, ctx.profile, findings)
    return report, time.monotonic() - t0


def preflight(ctx) -> dict:
    """Doctor before anything slow; an error finding stops the build unless --force."""
    report, secs = run_doctor(ctx)
    if not ctx.options.quiet:
        shown = dict(report, findings=[f for f in report["findings"] if f["severity"] != "info"])
        doctor.render_table(shown, console=console())
        print(f"doctor: {report['verdict']} ({secs:.1f}s)")
    log = ctx.log("doctor")
    writer.write_file(log, json.dumps(report, indent=2), what="Log file", force=True)  # never through a link
    errors = [f for f in report["findings"] if f["severity"] == "error"]
    if errors and not ctx.options.force:
        e = errors[0]
        raise StepFailed(
            f"doctor: {len(errors)} error finding(s) before the build; first: {e['id']}: {e['evidence']}",
            f"{e['fix']} (or pass --force to build anyway)",
        )
    return report
