"""`nox -s build-<variant>`: the whole flow, doctor first."""
from __future__ import annotations

from vllm_harness.commands.common import context_of, print_json
from vllm_harness.commands.info import machine_banner
from vllm_harness.core.errors import EXIT_OK
from vllm_harness.core.layout import venv_python
from vllm_harness.pipeline.run import build_variant


def cmd_build_variant(a) -> int:
    ctx = context_of(a)
    if not a.json:
        print(f"harness: {machine_banner()}")
        print(f"variant {ctx.name}: {ctx.variant.description} [{ctx.variant.path}]")
    data = build_variant(ctx, allow_no_gpu=not a.strict_verify, skip_doctor=a.skip_doctor)
    if a.json:
        print_json(a, data)
    else:
        v = (data["steps"].get("verify") or {}).get("note", "")
        print(f"variant {ctx.name}: built; env {ctx.venv} (python: {venv_python(ctx.venv)}). {v}")
    return EXIT_OK
