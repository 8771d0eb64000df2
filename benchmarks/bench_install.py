"""Install speed of the daily loop (issue 17): the README's main job against bare uv, and the no-op rerun.

    python benchmarks/bench_install.py [--variant cu124] [--pairs 2] [--noop 3] [--json] [--out r.json]

Cold pairs, alternated (harness first in even pairs, bare uv first in odd ones), each with empty caches of its
own under --work (default: a new folder in /tmp, deleted at the end unless --keep):

* harness   ``nox -s build-<variant>`` with a new nox envdir (the tool venv and the harness installed into
            it), a new state folder (VLLM_HARNESS_STATE), an empty UV_CACHE_DIR and PIP_CACHE_DIR: doctor, env,
            torch, deps, the wheel (downloaded, checked, installed), post-install, verify;
* bare uv   ``uv venv`` with the same interpreter, then one ``uv pip install`` of the same pins (the variant's
            torch packages, [deps] and the vLLM requirement), with an empty UV_CACHE_DIR.

No-op, after the last pair, nothing changed: ``nox -s build-<variant>`` again (--noop times), ``invoke build
--variant <variant>`` (the single step), and the bare ``uv pip install`` of the same pins.

Prints a table (each harness step's share of the cold run from the variant's status file; "rest" is the nox
venv, the harness install, doctor and the process starts) and, with --json, one JSON object whose top level
has ``cold_ratio`` (median harness / median bare) and ``noop_s`` (median no-op ``nox -s build-<variant>``).
Targets: cold_ratio <= 1.2, noop_s <= 3, invoke build no-op <= 1 s.  Also in the JSON: ``install_ratio`` (the
harness's install steps alone against bare uv), ``verify_s`` (verify's share: vLLM's import and the checks) and
``cold_ratio_vs_bare_import``: the harness against bare uv followed by ``python -c "import vllm, xformers"`` (the
variant's verify imports) in the bare venv, the same proof by hand.  Each cold run starts after ``sync``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vllm_harness.core.layout import Layout  # noqa: E402
from vllm_harness.facts import pythons  # noqa: E402
from vllm_harness.facts.machine import uv_bin  # noqa: E402
from vllm_harness.facts.variants import load_variant  # noqa: E402

BIN = Path(sys.executable).parent


def _timed(argv: list[str], env: dict[str, str], log: Path) -> tuple[float, int]:
    t0 = time.monotonic()
    with open(log, "ab") as fh:
        fh.write(f"$ {' '.join(argv)}\n".encode())
        fh.flush()
        rc = subprocess.run(argv, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=ROOT).returncode
    return time.monotonic() - t0, rc


def _env(base: Path, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_HARNESS_", "UV_", "NOX_"))}
    env.update(UV_CACHE_DIR=str(base / "uv-cache"), PIP_CACHE_DIR=str(base / "pip-cache"), **more)
    return env


def harness_cold(variant: str, base: Path, log: Path) -> dict:
    base.mkdir(parents=True)
    env = _env(base, VLLM_HARNESS_STATE=str(base / "state"))
    secs, rc = _timed([str(BIN / "nox"), "-f", str(ROOT / "noxfile.py"), "--envdir", str(base / "nox"), "-s",
                       f"build-{variant}"], env, log)
    status = json.loads((base / "state" / "status" / f"{variant}.json").read_text())
    steps = {k: v.get("seconds", 0.0) for k, v in status["steps"].items()}
    return {"seconds": round(secs, 2), "rc": rc, "steps": steps, "rest": round(secs - sum(steps.values()), 2)}


def bare_cold(pins: list[str], interp: str, base: Path, log: Path, imports: list[str]) -> dict:
    """uv venv + uv pip install (the issue's baseline, ``seconds``); then, timed apart and not in ``seconds``,
    the proof verify gives on a GPU-less machine done by hand: ``python -c "import <the variant's imports>"``."""
    base.mkdir(parents=True)
    env = _env(base)
    uv = uv_bin()
    t0 = time.monotonic()
    s1, rc1 = _timed([uv, "venv", "--python", interp, str(base / "venv")], env, log)
    s2, rc2 = _timed([uv, "pip", "install", "--python", str(base / "venv" / "bin" / "python"), *pins], env, log)
    secs = round(time.monotonic() - t0, 2)
    s3, rc3 = _timed([str(base / "venv" / "bin" / "python"), "-c", f"import {', '.join(imports)}"], env, log)
    return {"seconds": secs, "rc": rc1 or rc2, "steps": {"venv": round(s1, 2), "install": round(s2, 2)},
            "import_s": round(s3, 2), "import_rc": rc3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="cu124")
    ap.add_argument("--pairs", type=int, default=1, help="cold pairs (each downloads torch twice: ~3 GB each)")
    ap.add_argument("--noop", type=int, default=3, help="no-op runs of each kind")
    ap.add_argument("--work", help="where the caches and envs go (default: a new folder in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep --work afterwards")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", help="also write the JSON here")
    a = ap.parse_args()

    layout = Layout.default(ROOT)
    v = load_variant(a.variant, layout.envs_dirs)
    interp = pythons.find(v.python, None, dict(os.environ), what=f"variant {v.name}").executable
    pins = [*v.torch["packages"], *v.deps["packages"], v.vllm_requirement]
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-install-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    out: dict = {"variant": v.name, "pins": pins, "interpreter": interp, "pairs": [], "log": str(log)}
    keep_h = keep_b = None
    try:
        for i in range(a.pairs):
            order = ["harness", "bare"] if i % 2 == 0 else ["bare", "harness"]
            pair = {}
            for keep in (keep_h, keep_b):
                if keep is not None:
                    shutil.rmtree(keep, ignore_errors=True)  # only the last pair is kept (no-op runs): disk
            for kind in order:
                base = work / f"{kind}-{i}"
                print(f"pair {i + 1}/{a.pairs}: {kind} cold ...", file=sys.stderr, flush=True)
                os.sync()  # the previous run's gigabytes are on disk before this one starts: runs independent
                pair[kind] = (harness_cold(v.name, base, log) if kind == "harness"
                              else bare_cold(pins, interp, base, log, v.verify["imports"]))
                print(f"  {pair[kind]['seconds']:.1f}s (exit {pair[kind]['rc']})", file=sys.stderr, flush=True)
            out["pairs"].append(pair)
            keep_h, keep_b = work / f"harness-{i}", work / f"bare-{i}"
        h = [p["harness"]["seconds"] for p in out["pairs"]]
        b = [p["bare"]["seconds"] for p in out["pairs"]]
        out["cold_harness_s"] = statistics.median(h) if h else None
        out["cold_bare_s"] = statistics.median(b) if b else None
        out["cold_ratio"] = round(out["cold_harness_s"] / out["cold_bare_s"], 2) if h and b else None
        # where the rest of the ratio goes: the installs alone (env, torch, deps, build, post-install) against
        # bare uv, and verify (the import of vLLM and its checks: work bare uv does not do)
        inst = [sum(s for k, s in p["harness"]["steps"].items() if k != "verify") for p in out["pairs"]]
        out["install_steps_s"] = statistics.median(inst) if inst else None
        out["install_ratio"] = round(out["install_steps_s"] / out["cold_bare_s"], 2) if inst and b else None
        ver = [p["harness"]["steps"].get("verify", 0.0) for p in out["pairs"]]
        out["verify_s"] = statistics.median(ver) if ver else None
        # the same proof by hand: bare uv, then importing what verify imports (on a GPU-less machine the
        # import is verify's main work); the ratio the team can weigh against the target
        bi = [p["bare"]["seconds"] + p["bare"]["import_s"] for p in out["pairs"] if p["bare"].get("import_rc") == 0]
        out["cold_bare_import_s"] = statistics.median(bi) if bi else None
        out["cold_ratio_vs_bare_import"] = round(out["cold_harness_s"] / out["cold_bare_import_s"], 2) if h and bi \
            else None

        noop: dict[str, list[float]] = {"nox": [], "invoke_build": [], "bare_uv": []}
        if keep_h is not None:
            env_h = _env(keep_h, VLLM_HARNESS_STATE=str(keep_h / "state"))
            env_b = _env(keep_b)
            for _ in range(a.noop):
                secs, rc = _timed([str(BIN / "nox"), "-f", str(ROOT / "noxfile.py"), "--envdir", str(keep_h / "nox"),
                                   "-s", f"build-{v.name}"], env_h, log)
                noop["nox"].append(round(secs, 2) if rc == 0 else float("nan"))
                secs, rc = _timed([str(BIN / "invoke"), "-r", str(ROOT), "build", "--variant", v.name], env_h, log)
                noop["invoke_build"].append(round(secs, 2) if rc == 0 else float("nan"))
                secs, rc = _timed([uv_bin(), "pip", "install", "--python", str(keep_b / "venv" / "bin" / "python"),
                                   *pins], env_b, log)
                noop["bare_uv"].append(round(secs, 2) if rc == 0 else float("nan"))
        out["noop"] = noop
        out["noop_s"] = statistics.median(noop["nox"]) if noop["nox"] else None
        out["invoke_build_noop_s"] = statistics.median(noop["invoke_build"]) if noop["invoke_build"] else None
    finally:
        if not a.keep:
            shutil.rmtree(work / "harness-0", ignore_errors=True)
            for p in work.glob("*-*"):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
    _table(out)
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))
    if a.json:
        print(json.dumps(out))
    return 0


def _table(out: dict) -> None:
    print(f"variant {out['variant']}: {' '.join(out['pins'])} (Python {out['interpreter']})")
    print(f"{'run':<24}{'harness s':>10}{'bare uv s':>10}{'ratio':>8}")
    for i, p in enumerate(out["pairs"]):
        hs, bs = p["harness"]["seconds"], p["bare"]["seconds"]
        print(f"{'cold pair ' + str(i + 1):<24}{hs:>10.1f}{bs:>10.1f}{hs / bs:>8.2f}   (order: "
              f"{' then '.join(p)}; bare's import {p['bare'].get('import_s', float('nan')):.1f}s)")
        shares = {**p["harness"]["steps"], "rest": p["harness"]["rest"]}
        print("  harness steps: " + ", ".join(f"{k} {s:.1f}s ({100 * s / hs:.0f}%)" for k, s in shares.items()))
    if out.get("cold_ratio") is not None:
        print(f"{'cold (median)':<24}{out['cold_harness_s']:>10.1f}{out['cold_bare_s']:>10.1f}"
              f"{out['cold_ratio']:>8.2f}   target <= 1.2")
        if out.get("cold_ratio_vs_bare_import") is not None:
            print(f"{'  vs bare uv + import':<24}{out['cold_harness_s']:>10.1f}{out['cold_bare_import_s']:>10.1f}"
                  f"{out['cold_ratio_vs_bare_import']:>8.2f}   (bare uv, then python -c 'import ...' of verify's "
                  f"imports)")
        print(f"{'  its install steps':<24}{out['install_steps_s']:>10.1f}{out['cold_bare_s']:>10.1f}"
              f"{out['install_ratio']:>8.2f}   (env, torch, deps, build, post-install; verify {out['verify_s']:.1f}s)")
    n = out.get("noop") or {}
    for k, label in (("nox", f"no-op nox -s build-{out['variant']}"), ("invoke_build", "no-op invoke build"),
                     ("bare_uv", "no-op bare uv pip install")):
        if n.get(k):
            print(f"{label:<40} {', '.join(f'{s:.2f}s' for s in n[k])}")
    print(f"noop_s {out.get('noop_s')} (target <= 3); invoke build {out.get('invoke_build_noop_s')} (target <= 1)")


if __name__ == "__main__":
    sys.exit(main())
