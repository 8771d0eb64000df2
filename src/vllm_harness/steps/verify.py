"""The verify step: vLLM's own checks in the built env (imports, compiled extensions, kernels against
torch), recorded like the other steps."""
from __future__ import annotations

from pathlib import Path

from vllm_harness.core.errors import StepFailed
from vllm_harness.steps.context import Ctx
from vllm_harness.verify import checks as verify_mod


def do_verify(ctx: Ctx, log: Path, allow_no_gpu: bool = True, as_json: bool = False, **opts) -> dict:
    vv = ctx.variant.verify
    result = verify_mod.run_verify(ctx.py, vv["device"], vv["imports"], vv["extensions"], vv["ops"],
                                   ctx.env(), log=log, **opts)
    text, code = verify_mod.verdict(result, vv["device"], allow_no_gpu)
    result["variant"] = ctx.name
    result["verdict"] = text
    if not ctx.quiet and not as_json:
        verify_mod.render(result, text)
    if code:
        failed = [c for c in result["checks"] if c["status"] == "fail"]
        fix = ("Read the table above; `invoke diagnose` reads the log." if failed else
               f"Run `nox -s verify -- --variant {ctx.name}` on a machine with the GPU, or pass --allow-no-gpu.")
        err = StepFailed(f"verify: {text}" + (f": {failed[0]['name']}: {failed[0]['reason']}" if failed else ""),
                         fix, log=str(log) if failed else None)
        err.result = result
        raise err
    return {"note": text, "result": result}
