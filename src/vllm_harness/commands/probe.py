"""`invoke probe`: compile vLLM's bindings against the env's torch (syntax only) before the long build."""
from __future__ import annotations

from pathlib import Path

from vllm_harness.commands.common import print_json
from vllm_harness.core.errors import UsageError
from vllm_harness.facts.toolkit import clean_env
from vllm_harness.steps.context import source_dir
from vllm_harness.steps.probe import fail, run_probe, show_probe


def task_probe(ctx, a, layout) -> int:
    """`invoke probe [--variant NAME] [--source DIR] [--python PY] [--kernel] [--json]`."""
    if ctx is not None:
        src = Path(a.source) if a.source else None
        if src is None:
            src = source_dir(ctx)
        py = Path(a.python) if a.python else ctx.py
        env = ctx.env(cuda=bool(a.kernel) and ctx.device == "cuda") if py == ctx.py else \
            clean_env(ctx.base_env)
        device = ctx.device
        log = ctx.log("probe")
    else:
        src, py = Path(a.source), Path(a.python)
        env = clean_env()
        device = a.device or "cuda"
        log = layout.state / "logs" / "probe.log"
    if not src.is_dir():
        raise UsageError(f"--source {src}: not a directory.", "Give a vLLM source tree.")
    if not py.exists():
        what = f"--python {py}: no such file." if a.python else f"Variant {ctx.name} has no env yet ({py})."
        raise UsageError(what, "Make the env first (`invoke deps --variant ...`) or pass --python of an env "
                         "with torch.")
    res = run_probe(src, py, env, log, device=a.device or device, kernel=bool(a.kernel), timeout=a.timeout)
    if a.json:
        print_json(a, res)
    else:
        verdict = "compiles" if res["status"] == "pass" else "does NOT compile"
        print(
            f"probe: {Path(res['source']).name} {verdict} against torch {res['torch']} (this source "
            f"pins torch "
            f"{res['source_pins_torch']}; {res['seconds']}s; C++{res['cxx_standard']})"
        )
        if res["status"] != "pass":
            show_probe(res)
            err = fail(res)
            print(f"  fix: {err.fix}")
    return 0 if res["status"] == "pass" else 1
