"""The env step: the variant's isolated venv from the discovered interpreter (uv, else virtualenv, else
venv; pip seeded from the interpreter's own ensurepip so that it works offline)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from vllm_harness.core import procs
from vllm_harness.core.errors import StepFailed
from vllm_harness.core.runner import run_commands
from vllm_harness.facts import pythons, toolkit
from vllm_harness.facts.machine import uv_bin
from vllm_harness.steps.context import Ctx


def do_env(ctx: Ctx, interp: pythons.Interpreter, log: Path) -> dict:
    v = ctx.variant
    if ctx.venv.exists():
        shutil.rmtree(ctx.venv)
    ctx.venv.parent.mkdir(parents=True, exist_ok=True)
    uv = uv_bin()
    cmds = []
    if uv:
        # pip is the interpreter's own bundled wheel (ensurepip's), installed by uv: offline, as GPU servers
        # often are, and in a fraction of ensurepip's time
        cmds = [[uv, "venv", "--python", interp.executable, str(ctx.venv)]]
    else:
        try:
            import virtualenv  # noqa: F401
            cmds = [[sys.executable, "-m", "virtualenv", "--python", interp.executable, str(ctx.venv)]]
        except ImportError:
            cmds = [[interp.executable, "-m", "venv", str(ctx.venv)]]
    env = toolkit.clean_env(ctx.base_env)
    try:
        try:
            run_commands("env", cmds, log, env, quiet=ctx.options.quiet)
            if uv:
                run_commands("env", [_seed_pip(ctx, uv, env)], log, env, quiet=ctx.options.quiet)
        except StepFailed:
            if not (uv and ctx.py.exists()):
                raise
            # no ensurepip (Debian's python3 without python3-venv): let uv seed pip from the index
            run_commands("env", [[uv, "pip", "install", "--python", str(ctx.py), "pip"]], log, env,
                         quiet=ctx.options.quiet)
        scripts = _see_interpreter_packages(ctx, interp, env) if v.torch["preinstalled"] else None
    except BaseException:
        shutil.rmtree(ctx.venv, ignore_errors=True)
        raise
    return {"python": interp.executable, "python_version": interp.version, "interpreter_scripts": scripts,
            "note": f"Python {interp.version} ({interp.origin}: {interp.executable})"}


def _see_interpreter_packages(ctx: Ctx, interp: pythons.Interpreter, env: dict[str, str]) -> None:
    """preinstalled torch: the venv sees the interpreter's own site-packages (also when that interpreter is
    itself a venv or a conda env, where --system-site-packages would show the wrong ones), after its own."""
    code = "import json, sysconfig; p = sysconfig.get_paths(); print(json.dumps([p['scripts'], " \
           "sorted({p['purelib'], p['platlib']})]))"
    r = procs.run([interp.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    if r.returncode != 0:
        raise StepFailed(
            f"env: cannot read the site-packages of {interp.executable}.", "Pass another --python."
        )
    scripts, dirs = json.loads(r.stdout.strip().splitlines()[-1])
    site = procs.run(
        [str(ctx.py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    ).stdout.strip()
    Path(site, "_harness_interpreter_packages.pth").write_text("".join(d + "\n" for d in dirs))
    return scripts  # its tools (cmake, ninja from pip) go on the build's PATH after the venv's own


def _seed_pip(ctx: Ctx, uv: str, env: dict[str, str]) -> list[str]:
    """The command that gives the new venv pip: uv installing the pip wheel that the interpreter's ensurepip
    bundles (no index asked), else ensurepip itself."""
    code = "import ensurepip, os; print(os.path.dirname(ensurepip.__file__))"
    try:
        r = procs.run([str(ctx.py), "-c", code], capture_output=True, text=True, env=env, timeout=60)
        wheels = sorted(Path(r.stdout.strip(), "_bundled").glob("pip-*.whl")) if r.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        wheels = []
    if wheels:
        return [uv, "pip", "install", "--python", str(ctx.py), "--offline", "--no-deps", str(wheels[-1])]
    return [str(ctx.py), "-m", "ensurepip", "--default-pip"]
