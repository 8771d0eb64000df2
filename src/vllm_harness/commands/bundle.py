"""`invoke bundle`: everything a variant's build needs, for an air-gapped machine (steps/bundle);
`--check`."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from vllm_harness.commands.common import context_of, layout_of, print_json, variant_of
from vllm_harness.core import locks
from vllm_harness.core.errors import EXIT_OK, EXIT_PROBLEM, HarnessError, UsageError
from vllm_harness.pipeline.preflight import machine_profile
from vllm_harness.pipeline.run import run_single
from vllm_harness.steps import bundle


def cmd_bundle(a) -> int:
    layout = layout_of(a)
    say = (lambda s: None) if a.json else (lambda s: print(s, flush=True))
    if a.check:
        variant = variant_of(layout, a.variant) if a.variant else None
        res = bundle.check(Path(a.check), None, variant)  # every file's content hashed: no cached verdict
        if a.json:
            print_json(a, res)
        else:
            print(
                f"bundle {a.check}: {res['files']} files, {res['bytes'] / 2**30:.2f} GiB, every sha256 "
                f"matches "
                f"its manifest (variant {res['variant']['name']}, Python {res['target']['python']} on "
                f"{res['target']['arch']})"
                + (
                    f"; INCOMPLETE: {len(res['missing'])} missing: "
                    + "; ".join(m["what"] for m in res["missing"])
                    if res["missing"]
                    else ""
                )
            )
        return EXIT_PROBLEM if res["missing"] else EXIT_OK
    if not a.variant or not a.out:
        raise UsageError(
            "bundle needs --variant NAME and --out DIR (or --check DIR).",
            "e.g. `invoke bundle --variant cu118 --out /tmp/cu118-bundle`.",
        )
    ctx = context_of(a, layout)
    profile = None
    if a.machine:
        profile = machine_profile(layout, a.machine)
    version = a.python if a.python and re.fullmatch(r"\d+\.\d+(\.\d+)?", a.python) else None
    target = bundle.target_for(
        ctx.variant, profile, a.machine, python=version, given=None if version else a.python
    )
    # the variant's bundle lock for the whole run (its source tree, the caches): `clean` waits for it or, with
    # --no-wait, refuses; taken before the fetch step's variant lock, as clean takes them
    with locks.held(
        locks.bundle_lock(layout.state / "locks", ctx.name),
        f"bundle of variant {ctx.name}",
        wait=True,
        say=lambda t: print(t, file=sys.stderr, flush=True),
    ):
        if (
            ctx.variant.vllm["mode"] == "source"
        ):  # the tree the build will use: its requirement files, CMake pins
            try:
                run_single(ctx, "fetch")
                run_single(ctx, "prepare")
            except HarnessError as e:
                say(f"  ! vLLM source: {e}")
        res = bundle.make(ctx, Path(a.out), target, say=say, archive=a.archive, machine=a.machine)
    print_json(a, res)
    return EXIT_PROBLEM if res["missing"] else EXIT_OK
