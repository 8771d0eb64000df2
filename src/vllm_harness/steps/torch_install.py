"""The torch step: the variant's torch from its index (checked reachable first), then the constraints file
that every later install keeps."""
from __future__ import annotations

from pathlib import Path

from packaging.requirements import Requirement

from vllm_harness.core.errors import StepFailed
from vllm_harness.core.runner import run_commands
from vllm_harness.steps.context import Ctx, index_or_local, installed_versions


def do_torch(ctx: Ctx, log: Path) -> dict:
    v = ctx.variant
    env = ctx.env()
    names = [Requirement(r).name for r in v.torch["packages"]]
    if not v.torch["preinstalled"]:
        local = index_or_local(v.torch["index_url"], f"{ctx.variant.path.name} [torch]", v.torch["packages"], env)
        cmd = ctx.install_cmd(v.torch["packages"], v.torch["index_url"], constraints=False, local=local)
        run_commands("torch", [cmd], log, env, quiet=ctx.quiet)
    have = installed_versions(ctx.py, names, env)
    if not have.get("torch"):
        raise StepFailed(f"torch: no torch in {ctx.venv} after this step.",
                         "The interpreter has no torch; set preinstalled = false." if v.torch["preinstalled"]
                         else None, log=str(log) if log.exists() else None)
    base = have["torch"].split("+")[0]
    if base != v.torch["version"]:
        raise StepFailed(f"torch: {have['torch']} is installed, the variant names torch {v.torch['version']}.",
                         "Give the interpreter the variant's torch or fix [torch].version.")
    pins = [f"{n}=={ver}" for n, ver in have.items() if ver]
    pins += [r for r in v.deps["packages"] if Requirement(r).name.lower() == "numpy"]
    cfile = ctx.layout.constraints(ctx.name)
    cfile.write_text("# written by the harness: every later install in this env keeps these\n" + "\n".join(pins) + "\n")
    return {"versions": have, "note": ", ".join(pins)}
