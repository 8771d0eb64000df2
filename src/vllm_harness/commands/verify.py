"""`invoke verify` / `nox -s verify`: prove an env runs on this GPU; `--wheel` checks a wheel before
install."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from vllm_harness.commands.common import context_of, layout_of, print_json, variant_of
from vllm_harness.core.errors import StepFailed, UsageError
from vllm_harness.core.layout import venv_python
from vllm_harness.facts import toolkit
from vllm_harness.steps import verify as verify_step
from vllm_harness.steps.verify import do_verify
from vllm_harness.verify import checks as verify_mod


def cmd_verify(a) -> int:
    ccs = [c.strip() for c in (a.cc or "").split(",") if c.strip()]
    for c in ccs:
        if not re.fullmatch(r"\d+\.\d+", c):
            raise UsageError(
                f"--cc {a.cc}: '{c}' is not a compute capability.", "Write it like --cc 8.0,9.0."
            )
    opts = {"libs": a.libs or None, "speed": not a.no_speed, "reader": a.fatbin_reader, "ccs": ccs or None}
    if a.wheel:
        return _verify_wheel(a, ccs)
    if a.python:
        py = Path(a.python)
        if not py.exists():
            raise UsageError(f"--python {py}: no such file.", "Give the python of an env that has vLLM.")
        env = toolkit.clean_env()
        result = verify_mod.run_verify(
            py,
            a.device or "cuda",
            ["vllm"],
            [],  # []: every extension vllm ships
            ["rms_norm", "fused_add_rms_norm", "silu_and_mul"],
            env,
            **opts,
        )
        text, code = verify_mod.verdict(result, a.device or "cuda", a.allow_no_gpu)
        return _show_verdict(a, result, text, code)
    layout = layout_of(a)
    ctx = context_of(a, layout, variant_of(layout, _built_file(layout, a.variant)))
    if not ctx.py.exists():
        raise UsageError(
            f"Variant {ctx.name} has no env yet ({ctx.venv}).", f"Run `nox -s build-{ctx.name}` first."
        )
    log = ctx.log("verify")
    proof = verify_step.proof_of(ctx, opts)
    ctx.verify_proof = proof
    done = verify_step.reusable(ctx, proof, a.allow_no_gpu)
    if done is not None:  # the recorded result proved these very inputs
        res = done["result"]
        text, code = verify_mod.verdict(res, ctx.variant.verify["device"], a.allow_no_gpu)
        if a.json:
            print_json(
                a, {**res, "reused": {"verified_at": done.get("finished"), "proof": done.get("proof")}}
            )
        else:
            verify_mod.render(res, text)
            print(verify_step.reused_line(done))
        return code
    try:
        out = do_verify(ctx, log, allow_no_gpu=a.allow_no_gpu, as_json=a.json, **opts)
        res = out["result"]
        code = 0
        verify_step.record(ctx, log, out)
    except StepFailed as e:
        res = json.loads(json.dumps(e.result or {}))
        code = 1
        if not a.json:
            print(str(e), file=sys.stderr)
        if not res:
            vv = ctx.variant.verify
            res = verify_mod.run_verify(
                ctx.py, vv["device"], vv["imports"], vv["extensions"], vv["ops"], ctx.env(), **opts
            )
    if a.json:
        print_json(a, res)
    return code


def _built_file(layout, given: str | None) -> str | None:
    """What to load for ``--variant``: a bare NAME that the last build loaded from a file outside envs/
    (``build-variant --variant path/NAME.toml``) is that file, as build-variant was given it."""
    last = layout.read_last_built()
    if (
        given
        and "/" not in given
        and not given.endswith(".toml")
        and last
        and "/" in last
        and Path(last).stem == given
        and not any((d / f"{given}.toml").is_file() for d in layout.envs_dirs)
    ):
        return last
    return given


def _verify_wheel(a, ccs: list[str]) -> int:
    """`verify --wheel FILE --variant NAME`: the binary checks on a wheel before it is installed."""
    wheel = Path(a.wheel)
    if not wheel.is_file():
        raise UsageError(
            f"--wheel {wheel}: no such file.", "Give a downloaded .whl file (pip download --no-deps)."
        )
    if not a.variant:
        raise UsageError(
            "--wheel needs --variant NAME: the CUDA and torch to check the wheel against.",
            "Pass --variant, e.g. --variant cu124.",
        )
    layout = layout_of(a)
    variant = variant_of(layout, a.variant)
    py = Path(a.python) if a.python else venv_python(layout.venv(variant.name))
    env = toolkit.clean_env()
    res = verify_mod.verify_wheel(
        wheel, variant, env, py if py and py.exists() else None, ccs or None, a.fatbin_reader
    )
    text, code = verify_mod.wheel_verdict(res, a.allow_no_gpu)
    return _show_verdict(a, res, text, code)


def _show_verdict(a, result: dict, text: str, code: int) -> int:
    result["verdict"] = text
    if a.json:
        print_json(a, result)
    else:
        verify_mod.render(result, text)
    return code
