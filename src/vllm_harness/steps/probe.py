"""The compile probe: before the hour-long build, compile vLLM's op registration against the venv's torch.

``csrc/torch_bindings.cpp`` (``csrc/cpu/torch_bindings.cpp`` for CPU builds) is where vLLM uses the most
of torch's C++ API (``at::Tag::needs_fixed_stride_order``, schemas, ``TORCH_LIBRARY``...), so a host-only
syntax check of it (``-fsyntax-only``) with the build's include directories and defines -- torch's
``include`` and ``include/torch/csrc/api/include``, the Python headers, ``csrc/``,
``-DTORCH_EXTENSION_NAME=_C``, the C++ standard of the tree's CMakeLists (17, or 20 in newer releases) --
finds a vLLM source that does not match the installed torch in well under a minute, on the CPU, without
CUDA.  With ``kernel=True`` (``invoke probe --kernel``; in the build step ``VLLM_HARNESS_PROBE_KERNEL=1``)
and an nvcc, one small kernel file (``csrc/activation_kernels.cu``) also goes through nvcc's front end
(``nvcc --cuda``: parsing and host/device splitting, no code generation) -- opt-in, because it has only
been checked for its command line here (this machine's toolkit lacks the headers a CUDA torch includes).

torch is located without importing it (``importlib.util.find_spec`` in the venv's Python, its version read
from ``torch/version.py``), so the probe needs no GPU, driver or CUDA libraries.  The compiler output goes
to the log and through ``diagnose``; a mismatch is reported as ``torch-api-mismatch`` with the fix naming
the torch this source pins (``TORCH_SUPPORTED_VERSION_CUDA`` in its CMakeLists).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from vllm_harness import diagnose
from vllm_harness.core import procs
from vllm_harness.core.errors import StepFailed, UsageError
from vllm_harness.core.runner import console, mask
from vllm_harness.steps.prepare import source_torch_pin

TORCH_INFO = r"""
import importlib.util, json, os, re, sysconfig
out = {"python_include": sysconfig.get_paths().get("include"), "torch_dir": None, "torch_version": None}
spec = importlib.util.find_spec("torch")
if spec is not None and spec.submodule_search_locations:
    d = list(spec.submodule_search_locations)[0]
    out["torch_dir"] = d
    try:
        m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", open(os.path.join(d, "version.py")).read())
        out["torch_version"] = m.group(1) if m else None
    except OSError:
        pass
print(json.dumps(out))
"""


def torch_info(python: Path, env: dict[str, str]) -> dict:
    try:
        r = procs.run([str(python), "-c", TORCH_INFO], capture_output=True, text=True, env=env, timeout=60)
    except OSError as e:
        raise UsageError(
            f"probe: cannot run {python} ({e}).", "Make the env first: `invoke deps --variant ...`."
        ) from None
    if r.returncode != 0:
        raise UsageError(f"probe: {python} failed: {r.stderr.strip()[-300:]}", "Check the env's Python.")
    info = json.loads(r.stdout.strip().splitlines()[-1])
    if not info["torch_dir"]:
        raise UsageError(
            f"probe: no torch in {python}'s environment.",
            "Install the variant's torch first (`invoke deps --variant ...`).",
        )
    return info


def cxx_standard(src: Path) -> int:
    try:
        text = (src / "CMakeLists.txt").read_text(errors="replace")
    except OSError:
        return 17
    m = re.search(r"set\s*\(\s*CMAKE_CXX_STANDARD\s+(\d+)", text)
    return int(m.group(1)) if m else 17  # unset: torch's CMake config asks for C++17


def compiler(env: dict[str, str]) -> str | None:
    for cand in (env.get("CXX"), "g++", "c++", "clang++"):
        if cand and shutil.which(cand, path=env.get("PATH")):
            return shutil.which(cand, path=env.get("PATH"))
    return None


def nvcc(env: dict[str, str]) -> str | None:
    home = env.get("CUDA_HOME")
    if home and Path(home, "bin", "nvcc").is_file():
        return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc", path=env.get("PATH"))


def bindings_file(src: Path, device: str) -> Path:
    cands = (["csrc/cpu/torch_bindings.cpp"] if device == "cpu" else []) + ["csrc/torch_bindings.cpp"]
    for rel in cands:
        if (src / rel).is_file():
            return src / rel
    raise UsageError(f"probe: {src} has no csrc/torch_bindings.cpp.", "Give a vLLM source tree (--source).")


def commands(
    src: Path, info: dict, env: dict[str, str], device: str = "cuda", kernel: bool = False
) -> list[tuple[str, list[str]]]:
    tdir = Path(info["torch_dir"])
    std = cxx_standard(src)
    incs = ["-I", str(src / "csrc"), "-I", str(src)]
    for d in (tdir / "include", tdir / "include" / "torch" / "csrc" / "api" / "include"):
        incs += ["-isystem", str(d)]
    if info.get("python_include"):
        incs += ["-isystem", info["python_include"]]
    defines = ["-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    if device == "cpu":
        defines.append("-DVLLM_CPU_EXTENSION")
    cxx = compiler(env)
    if not cxx:
        raise UsageError(
            "probe: no C++ compiler (g++, c++, clang++) on PATH.", "Install one (apt-get install g++)."
        )
    out = [
        (
            str(bindings_file(src, device).relative_to(src)),
            [
                cxx,
                "-fsyntax-only",
                f"-std=c++{std}",
                "-x",
                "c++",
                *defines,
                *incs,
                str(bindings_file(src, device)),
            ],
        )
    ]
    if kernel and device == "cuda":
        nv = nvcc(env)
        k = src / "csrc" / "activation_kernels.cu"
        if nv and k.is_file():
            host = ["-ccbin", env["CUDAHOSTCXX"]] if env.get("CUDAHOSTCXX") else []  # as CMake passes it
            # torch's COMMON_NVCC_FLAGS (CUDA >= 12: without the __CUDA_NO_HALF* defines) + vLLM's
            # -DENABLE_FP8
            nv_flags = ["--expt-relaxed-constexpr", "-DENABLE_FP8"]
            out.append(
                (
                    str(k.relative_to(src)),
                    [
                        nv,
                        "--cuda",
                        *host,
                        f"-std=c++{std}",
                        "-x",
                        "cu",
                        *nv_flags,
                        *defines,
                        *incs,
                        str(k),
                        "-o",
                        os.devnull,
                    ],
                )
            )
    return out


def run_probe(
    src: Path,
    python: Path,
    env: dict[str, str],
    log: Path,
    device: str = "cuda",
    kernel: bool = False,
    timeout: int = 300,
    context: dict | None = None,
) -> dict:
    """Compile the probe files; return {"status": pass|fail, "files", "torch", "source_pins_torch",
    "seconds", "findings", "log"} (findings from diagnose, root cause first)."""
    src = src.resolve()
    info = torch_info(python, env)
    pin, pin_from = source_torch_pin(src)
    cmds = commands(src, info, env, device, kernel)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    results = []
    with open(log, "w") as fh:
        fh.write(
            f"# compile probe: vLLM tree {src}\n# torch {info['torch_version']} at {info['torch_dir']}; "
            f"this source pins torch {pin} ({pin_from})\n"
        )
        started = []
        try:
            for name, argv in cmds:  # side by side, each in its own process group (g++ and its cc1plus)
                fh.write(f"$ {' '.join(argv)}\n")
                fh.flush()
                started.append(
                    (
                        name,
                        procs.popen(
                            argv,
                            cwd=src,
                            env=env,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL,
                        ),
                    )
                )
            for name, p in started:
                try:
                    out, _ = p.communicate(timeout=max(1, timeout - (time.monotonic() - t0)))
                    rc = p.returncode
                except subprocess.TimeoutExpired:
                    procs.end_group(p, grace=2)
                    out, _ = p.communicate()
                    rc = 124
                    out = (out or b"") + f"\nprobe: {name} did not finish in {timeout}s\n".encode()
                procs.release(p)
                text = (out or b"").decode(errors="replace")
                fh.write(f"== {name}: exit {rc}\n{text}\n")
                results.append({"file": name, "rc": rc})
        except BaseException:  # Ctrl-C, SIGTERM, SIGHUP: no compiler outlives the probe
            for _name, p in started:
                procs.end_group(p, grace=2)
            fh.write("# interrupted: the probe's compilers were ended\n")
            raise
    secs = round(time.monotonic() - t0, 1)
    ctx = {"torch": pin, **(context or {})} if pin else dict(context or {})
    report = diagnose.diagnose_path(str(log), context=ctx).to_dict()
    ok = all(r["rc"] == 0 for r in results)
    res = {
        "status": "pass" if ok else "fail",
        "source": str(src),
        "files": results,
        "torch": info["torch_version"],
        "torch_dir": info["torch_dir"],
        "source_pins_torch": pin,
        "source_pins_from": pin_from,
        "cxx_standard": cxx_standard(src),
        "seconds": secs,
        "findings": report.get("findings", []) if not ok else [],
        "log": str(log),
    }
    if not ok and not res["findings"]:
        res["first_error_lines"] = report.get("first_error_lines", [])[:8]
    try:  # doctor (the pin check) and diagnose (the fix for this log) read it
        record_path(log).write_text(json.dumps({k: v for k, v in res.items() if k != "findings"}, indent=1))
    except OSError:
        pass
    return res


def record_path(log: Path) -> Path:
    """The JSON record of the compile probe whose log is ``log``."""
    return Path(log).with_suffix(".json")


def load_record(log: Path) -> dict | None:
    try:
        rec = json.loads(record_path(log).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def fail(res: dict) -> StepFailed:
    """The StepFailed for a failed probe: the top finding, and the fix naming the torch this source pins."""
    top = (res.get("findings") or [None])[0]
    what = f"{top['id']}: {top['evidence']}" if top else "the compiler failed (see the log)"
    fix = top["fix"] if top else None
    if top and top["id"] == "torch-api-mismatch" and res.get("source_pins_torch"):
        fix = (
            f"This vLLM source pins torch {res['source_pins_torch']} ({res['source_pins_from']}); the "
            f"env has "
            f"torch {res['torch']}. Install torch {res['source_pins_torch']} in the env (set the variant's "
            f"[torch] to it), or build the vLLM release that pins torch {str(res['torch']).split('+')[0]}; "
            f"then rebuild from a clean tree."
        )
    err = StepFailed(
        f"probe: {Path(res['source']).name} does not compile against torch {res['torch']} "
        f"({res['seconds']}s): {what}",
        fix,
        result=res,
    )
    return err


# ------------------------------------------------------------------------------------- entry points


def before_build(ctx, src: Path, env: dict[str, str]) -> dict | None:
    """Run the probe in the build step, before the long compile (VLLM_HARNESS_SKIP_PROBE=1 skips it).
    Raises StepFailed (with the fix naming the torch this source pins) when the source does not compile."""
    if ctx.base_env.get("VLLM_HARNESS_SKIP_PROBE", "") not in ("", "0"):
        ctx.say("  compile probe: skipped (VLLM_HARNESS_SKIP_PROBE)")
        return None
    try:
        bindings_file(src, ctx.device)
    except UsageError:
        ctx.say(f"  compile probe: skipped ({src} has no csrc/torch_bindings.cpp)")
        return None
    log = ctx.log("probe")
    kernel = ctx.device == "cuda" and ctx.base_env.get("VLLM_HARNESS_PROBE_KERNEL", "") not in ("", "0")
    res = run_probe(src, ctx.py, env, log, device=ctx.device, kernel=kernel)
    if res["status"] == "pass":
        ctx.say(
            f"  compile probe: {', '.join(f['file'] for f in res['files'])} compile against torch "
            f"{res['torch']} ({res['seconds']}s)"
        )
        return res
    show_probe(res, quiet=ctx.options.quiet)
    raise fail(res)


def show_probe(res: dict, quiet: bool = False) -> None:
    if quiet:
        return
    con = console()
    top = (res.get("findings") or [None])[0]
    if top:
        con.print(f"  [red bold]{top['id']}[/] (probe log line {top['line']}): {mask(top['evidence'])}")
        con.print(f"  cause: {top['cause']}")
    else:
        for n, line in res.get("first_error_lines") or []:
            con.print(f"  {n:>6}: {mask(line)[:160]}", markup=False)
    con.print(f"  log: {res['log']}")
