"""The torch step: the variant's torch from its index (checked reachable first), then the constraints file
that every later install keeps.

Wheel mode with uv and one index for torch, [deps] and vLLM (PyPI's cu124 torch, a mirror): one resolution.
``uv pip compile`` resolves torch, the deps and the vLLM requirement together (metadata only, as uv reads it),
and this step installs every resolved package but vLLM itself in one ``uv pip install``, while the vLLM wheel
downloads beside it (``build.start_wheel_download``).  The build step then checks that wheel and installs that
very file, whose requirements are all in place.  When they do not resolve together, or the indexes differ, the
step installs torch alone as before and the build step's wheel check says why the wheel does not fit."""
from __future__ import annotations

from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from vllm_harness.core.errors import StepFailed
from vllm_harness.core.runner import run_commands
from vllm_harness.facts.machine import uv_bin
from vllm_harness.steps.context import Ctx, index_or_local, installed_versions


def do_torch(ctx: Ctx, log: Path) -> dict:
    v = ctx.variant
    env = ctx.env()
    names = [Requirement(r).name for r in v.torch["packages"]]
    note = ""
    if not v.torch["preinstalled"]:
        local = index_or_local(
            v.torch["index_url"], f"{ctx.variant.path.name} [torch]", v.torch["packages"], env
        )
        together = not local and one_resolution(ctx)
        resolved = resolve_with_vllm(ctx, log, env) if together else None
        if resolved:
            cmd = ctx.install_cmd(resolved, v.torch["index_url"], constraints=False)
            note = f"; one resolution with the deps and {v.vllm_requirement}: {len(resolved)} packages"
        else:
            cmd = ctx.install_cmd(v.torch["packages"], v.torch["index_url"], constraints=False, local=local)
        run_commands("torch", [cmd], log, env, quiet=ctx.options.quiet, append=together)
    have = installed_versions(ctx.py, names, env)
    if not have.get("torch"):
        raise StepFailed(
            f"torch: no torch in {ctx.venv} after this step.",
            "The interpreter has no torch; set preinstalled = false." if v.torch["preinstalled"] else None,
            log=str(log) if log.exists() else None,
        )
    base = have["torch"].split("+")[0]
    if base != v.torch["version"]:
        raise StepFailed(
            f"torch: {have['torch']} is installed, the variant names torch {v.torch['version']}.",
            "Give the interpreter the variant's torch or fix [torch].version.",
        )
    pins = [f"{n}=={ver}" for n, ver in have.items() if ver]
    pins += [r for r in v.deps["packages"] if Requirement(r).name.lower() == "numpy"]
    cfile = ctx.layout.constraints(ctx.name)
    cfile.write_text(
        "# written by the harness: every later install in this env keeps these\n" + "\n".join(pins) + "\n"
    )
    return {"versions": have, "note": ", ".join(pins) + note}


def one_resolution(ctx: Ctx) -> bool:
    """Whether torch, [deps] and the vLLM wheel are resolved together: wheel mode, uv as the installer, no
    bundle, and one index for the three (uv's first-index rule would otherwise take a package from whichever
    index lists it first: a PyTorch index also serves numpy)."""
    v = ctx.variant
    return (
        v.vllm["mode"] == "wheel"
        and v.installer == "uv"
        and bool(uv_bin())
        and ctx.options.bundle is None
        and not v.torch["preinstalled"]
        and v.torch["index_url"] == v.deps["index_url"] == v.vllm["index_url"]
    )


def resolve_with_vllm(ctx: Ctx, log: Path, env: dict[str, str]) -> list[str] | None:
    """``uv pip compile`` of torch, [deps] and the vLLM requirement for this env's interpreter (when
    ``one_resolution``): the exact pins of everything but vLLM, or None (no resolution: the log keeps uv's
    reason)."""
    v = ctx.variant
    folder = ctx.log("torch").parent
    folder.mkdir(parents=True, exist_ok=True)
    wanted = folder / "torch-resolution.in"
    out = folder / "torch-resolution.txt"
    wanted.write_text(
        "".join(r + "\n" for r in (*v.torch["packages"], *v.deps["packages"], v.vllm_requirement))
    )
    out.unlink(missing_ok=True)
    argv = [
        uv_bin(),
        "pip",
        "compile",
        "--python",
        str(ctx.py),
        "--no-header",
        "--no-annotate",
        "--quiet",
        *(["--index-url", v.torch["index_url"]] if v.torch["index_url"] else []),
        "--output-file",
        str(out),
        str(wanted),
    ]
    try:
        run_commands("torch", [argv], log, env, quiet=ctx.options.quiet)
    except StepFailed:
        with open(log, "a") as fh:
            fh.write(
                f"# torch, [deps] and {v.vllm_requirement} do not resolve together (above): torch alone now;"
                " the build step's wheel check says why the wheel does not fit\n"
            )
        return None
    vllm = canonicalize_name(Requirement(v.vllm_requirement).name)
    pins = []
    for line in out.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        if canonicalize_name(Requirement(line).name) != vllm:
            pins.append(line)
    return pins or None
