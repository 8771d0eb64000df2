"""The single steps as invoke tasks (`fetch`, `prepare`, `deps`, `build`, `post-install`, `probe`,
`patches`)."""

from __future__ import annotations

from pathlib import Path

from vllm_harness.commands.common import context_of, layout_of, print_json
from vllm_harness.commands.fetch import task_fetch
from vllm_harness.commands.patches import task_patches
from vllm_harness.commands.probe import task_probe
from vllm_harness.core.errors import EXIT_OK, StepFailed, UsageError
from vllm_harness.core.runner import summary
from vllm_harness.pipeline.run import run_single
from vllm_harness.steps.prepare import do_prepare


def cmd_step(a) -> int:
    if a.command == "patches":  # needs no variant
        return task_patches(layout_of(a), a)
    if a.command == "probe" and a.source and a.python and not a.variant:
        return task_probe(None, a, layout_of(a))
    ctx = context_of(a)
    step = a.command
    if step == "probe":
        return task_probe(ctx, a, ctx.layout)
    if step == "fetch" and (a.source or a.deps):
        return task_fetch(ctx, a)
    if step == "prepare" and a.source:
        src = Path(a.source)
        if not src.is_dir():
            raise UsageError(f"--source {src}: not a directory.", "Give a vLLM source tree.")
        log = ctx.log("prepare")
        try:
            res = do_prepare(ctx, log, src=src.resolve())
        except StepFailed as e:  # --json still prints the contract's object (with the failed patch)
            if a.json and e.result:
                print_json(a, e.result)
            raise
        if a.json:
            print_json(a, res)
        else:
            summary("prepare", True, 0.0, log, res["note"])
        return EXIT_OK
    res = run_single(ctx, step)
    if getattr(a, "json", False):
        print_json(a, res)
    return EXIT_OK
