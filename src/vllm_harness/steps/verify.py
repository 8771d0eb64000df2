"""The verify step: vLLM's own checks in the built env (imports, compiled extensions, kernels against
torch), recorded like the other steps.

A verify result is kept with the inputs it proved (``proof``): the env's installed distributions and their
RECORD hashes (an editable install's compiled libraries by size and mtime), the GPUs and the driver, the
checks asked for and the harness's own check scripts.  When those are unchanged the recorded result is
reused ("verified earlier (date), inputs unchanged"); ``--reverify`` runs the checks again."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from vllm_harness.core import locks, procs
from vllm_harness.core.errors import StepFailed
from vllm_harness.core.runner import Progress
from vllm_harness.core.status import Status, key_of
from vllm_harness.facts.machine import probe_gpus
from vllm_harness.steps.context import Ctx
from vllm_harness.verify import checks as verify_mod

CHECK_DEFAULTS = {"libs": None, "speed": True, "reader": "auto", "ccs": None}


def do_verify(ctx: Ctx, log: Path, allow_no_gpu: bool = True, as_json: bool = False, **opts) -> dict:
    vv = ctx.variant.verify
    proof = ctx.verify_proof or proof_of(ctx, opts)
    # a live line, or a heartbeat every 15 s
    prog = Progress("verify", quiet=ctx.options.quiet or as_json, ticker=True)
    prog.feed(b"binaries, then imports, kernels and speed in the env's interpreter")
    try:
        result = verify_mod.run_verify(ctx.py, vv["device"], vv["imports"], vv["extensions"], vv["ops"],
                                       ctx.env(), log=log, **opts)
    finally:
        prog.close()
    text, code = verify_mod.verdict(result, vv["device"], allow_no_gpu)
    result["variant"] = ctx.name
    result["verdict"] = text
    if not ctx.options.quiet and not as_json:
        verify_mod.render(result, text)
    if code:
        failed = [c for c in result["checks"] if c["status"] == "fail"]
        fix = (
            "Read the table above; `invoke diagnose` reads the log."
            if failed
            else f"Run `nox -s verify -- --variant {ctx.name}` on a machine with the GPU, or pass "
                 f"--allow-no-gpu."
        )
        err = StepFailed(
            f"verify: {text}" + (f": {failed[0]['name']}: {failed[0]['reason']}" if failed else ""),
            fix,
            log=str(log) if failed else None,
            result=result,
        )
        raise err
    return {"note": text, "result": result, "proof": proof["summary"], "proof_key": proof["key"]}


# ------------------------------------------------------------------------------- what a result proved


def _site_dirs(py: Path, env: dict[str, str]) -> list[str]:
    """The env's import path (its site-packages, and the base interpreter's with system site packages)."""
    try:
        r = procs.run(
            [str(py), "-I", "-c", "import sys, json; print(json.dumps(sys.path))"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        return [p for p in json.loads(r.stdout.strip().splitlines()[-1]) if p and os.path.isdir(p)]
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return []


def _editable_stamp(dist: Path) -> list:
    """An editable install's compiled libraries (its RECORD does not list them): path, size, mtime."""
    try:
        info = json.loads((dist / "direct_url.json").read_text())
    except (OSError, ValueError):
        return []
    if not (info.get("dir_info") or {}).get("editable"):
        return []
    root = unquote(urlsplit(info.get("url", "")).path)
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("build", ".deps", ".git", "__pycache__", "node_modules")]
        for f in files:
            if f.endswith(".so"):
                try:
                    st = os.stat(os.path.join(dirpath, f))
                except OSError:
                    continue
                out.append((os.path.relpath(os.path.join(dirpath, f), root), st.st_size, st.st_mtime_ns))
    return sorted(out)


def env_fingerprint(py: Path, env: dict[str, str]) -> tuple[str, int]:
    """(a hash of every installed distribution's RECORD, how many distributions): any install, upgrade,
    removal or changed file of a distribution changes it."""
    h = hashlib.sha256()
    n = 0
    for site in _site_dirs(py, env):
        for dist in sorted(Path(site).glob("*.dist-info")) + sorted(Path(site).glob("*.egg-info")):
            n += 1
            h.update(str(dist).encode() + b"\0")
            for part in ("RECORD", "PKG-INFO", "METADATA"):
                f = dist / part
                if f.is_file():
                    h.update(hashlib.sha256(f.read_bytes()).digest())
                    break
            h.update(json.dumps(_editable_stamp(dist)).encode())
        for pth in sorted(Path(site).glob("*.pth")):
            h.update(pth.name.encode() + hashlib.sha256(pth.read_bytes()).digest())
    return h.hexdigest()[:16], n


def _scripts_hash() -> str:
    h = hashlib.sha256()
    here = Path(verify_mod.__file__).resolve()
    # every module of the verify package (checks, binaries, elf, roles, ...): an edit to any of them changes
    # what a recorded result proved
    for f in (
        verify_mod.SCRIPT,
        verify_mod.DIST_SCRIPT,
        verify_mod.DIST_TABLE,
        *sorted(here.parent.glob("*.py")),
    ):
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def proof_of(ctx: Ctx, opts: dict) -> dict:
    """The inputs a verify result proves: the env's distributions, the GPUs and driver, the checks asked for,
    the harness's check scripts, and the build steps it follows (their chained key)."""
    vv = ctx.variant.verify
    env = ctx.env()
    dists_key, n = env_fingerprint(ctx.py, env)
    gpus, driver, driver_cuda = probe_gpus(env) if vv["device"] == "cuda" else ([], None, None)
    gpu_ids = [{k: g.get(k) for k in ("name", "compute_capability", "uuid", "memory_gib")} for g in gpus]
    asked = {**CHECK_DEFAULTS, **{k: v for k, v in opts.items() if k in CHECK_DEFAULTS}}
    if asked["libs"]:
        asked["libs"] = [
            (p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in verify_mod.expand_libs(asked["libs"])
        ]
    before = (ctx.status.step("post-install") or {}).get("key")
    summary = {
        "distributions": n,
        "distributions_key": dists_key,
        "gpus": [g["name"] for g in gpu_ids],
        "driver": driver,
        "driver_cuda": driver_cuda,
    }
    key = key_of(
        "verify-proof-1",
        before,
        vv,
        str(ctx.py),
        dists_key,
        gpu_ids,
        driver,
        driver_cuda,
        asked,
        _scripts_hash(),
    )
    return {"key": key, "summary": summary}


def reusable(ctx: Ctx, proof: dict, allow_no_gpu: bool = True) -> dict | None:
    """The recorded verify step when it proved these very inputs and still passes with this run's
    ``allow_no_gpu``; None when the checks must run."""
    s = ctx.status.step("verify") or {}
    if ctx.options.force or ctx.options.reverify:
        return None
    if s.get("status") != "ok" or s.get("proof_key") != proof["key"] or not isinstance(s.get("result"), dict):
        return None
    _text, code = verify_mod.verdict(s["result"], ctx.variant.verify["device"], allow_no_gpu)
    return None if code else s


def reused_line(s: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(s.get("finished") or 0))
    return (
        f"verified earlier ({when}), inputs unchanged: {s.get('note', '')} (--reverify runs the checks again)"
    )


def record(ctx: Ctx, log: Path, out: dict) -> None:
    """Keep a passing ``invoke verify`` result as the variant's verify step (under the variant's lock), when
    the
    steps it follows are recorded as done: a later run with the same inputs reuses it."""
    if not (ctx.status.step("post-install") or {}).get("status") == "ok":
        return
    with locks.held(ctx.layout.lock(ctx.name), f"variant {ctx.name}", wait=True, say=ctx.say):
        st = Status(ctx.layout.status(ctx.name), ctx.name)
        if (st.step("post-install") or {}).get("key") != (ctx.status.step("post-install") or {}).get("key"):
            return  # a build changed the env meanwhile
        secs = (out["result"].get("layer_seconds") or {}).get("total", 0.0)
        st.finish("verify", out["proof_key"], str(log) if log.exists() else None, secs, **out)
        ctx.status = st
