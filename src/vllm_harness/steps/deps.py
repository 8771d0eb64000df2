"""The deps step: the source tree's build and runtime requirements and the variant's ``[deps]``, with the
installed torch pinned; a CUDA toolkit from PyPI when the variant asks for it."""
from __future__ import annotations

from pathlib import Path

from vllm_harness.core.errors import StepFailed
from vllm_harness.core.runner import run_commands
from vllm_harness.facts import toolkit
from vllm_harness.facts.cuda_toolkits import toolkit_missing
from vllm_harness.steps import prepare as prepare_mod
from vllm_harness.steps.context import Ctx, source_dir, torch_kept


def do_deps(ctx: Ctx, log: Path) -> dict:
    v = ctx.variant
    cmds = []
    reqs = list(v.deps["packages"])
    if v.vllm["mode"] == "source":
        src = source_dir(ctx)
        files = prepare_mod.build_requirement_files(src)
        build_args = [a for f in files for a in ("-r", str(f))]
        if not files:
            reqs += prepare_mod.build_system_requires(src)
        runtime = prepare_mod.runtime_requirement_files(src, ctx.device)
        build_args += [a for f in runtime for a in ("-r", str(f))]
        cmds.append(ctx.install_cmd(reqs, v.deps["index_url"], extra=build_args))
    elif reqs:
        cmds.append(ctx.install_cmd(reqs, v.deps["index_url"]))
    tk_reqs, tk_why = [], ""
    if v.vllm["mode"] == "source" and v.build["toolkit"] == "pypi":
        # NVIDIA's toolkit wheels at the CUDA release the venv's torch pins (toolkit.pypi_requirements)
        torch_version, requires = toolkit.torch_requires(ctx.py, ctx.env())
        tk_reqs, tk_why = toolkit.pypi_requirements(v.cuda, requires, torch_version)
        cmds.append(ctx.install_cmd(tk_reqs, v.deps["index_url"]))
    if cmds:
        run_commands("deps", cmds, log, ctx.env(), quiet=ctx.options.quiet)
    tk = _pypi_toolkit(ctx, log, tk_reqs, tk_why) if tk_reqs else {}
    torch_kept(ctx, log)
    return {"note": f"{len(reqs)} extra requirement(s)" + tk.pop("note", ""), **tk}


def _pypi_toolkit(ctx: Ctx, log: Path, reqs: list[str], why: str) -> dict:
    """[build] toolkit = "pypi", after its wheels are installed: where they landed (the build's CUDA_HOME),
    the
    links a build needs there (inside the venv only), and a check that nothing a build needs is missing."""
    root = toolkit.pypi_root(ctx.py, ctx.env(), ctx.variant.cuda)
    if root is None:
        raise StepFailed(
            f"deps: {' '.join(reqs)} installed no nvidia/cu{ctx.variant.cuda.split('.')[0]}/bin/nvcc "
            f"in {ctx.venv}.",
            'Read the log; set toolkit = "system" to use an installed toolkit.',
            log=str(log),
        )
    links = toolkit.link_pypi_toolkit(root, ctx.venv)
    missing = toolkit_missing(root, ctx.variant.cuda)
    with open(log, "a") as fh:
        fh.write(
            f"# CUDA toolkit from PyPI: {' '.join(reqs)} ({why}) at {root}; links made: "
            f"{', '.join(links) or 'none'}; "
            f"missing: {', '.join(missing) or 'nothing'}\n"
        )
    if missing:
        raise StepFailed(
            f"deps: the CUDA toolkit from PyPI at {root} lacks {', '.join(missing)}.",
            'Set toolkit = "system" and install the CUDA toolkit (`invoke doctor` names how).',
            log=str(log),
        )
    return {
        "toolkit": str(root),
        "toolkit_requirements": reqs,
        "note": f"; CUDA toolkit from PyPI: {reqs[0]}",
    }
