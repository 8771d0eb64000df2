"""Bundle benchmark (issue 18): the time of `invoke bundle` (first run and re-run), of a variant's build online
and from the bundle with the network closed, and whether both envs hold the same distributions and versions.

    PYTHONPATH=src python3 benchmarks/bench_bundle.py --variant cu124 --bundle /tmp/b124 --work /tmp/bench124

Every build goes into a fresh state folder under --work (the uv cache stays warm between them: pass
--rounds 2 and read the second round for "from a warm cache").  The offline build runs with every index and
proxy variable at a closed port, UV_OFFLINE=1, no pip config and no find-links but the bundle's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CLOSED = "http://127.0.0.1:9"


def closed_env(env: dict[str, str]) -> dict[str, str]:
    env = dict(env)
    for k in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        env[k] = CLOSED
    for k in ("PIP_INDEX_URL", "UV_INDEX_URL", "UV_DEFAULT_INDEX", "PIP_EXTRA_INDEX_URL", "UV_EXTRA_INDEX_URL"):
        env[k] = CLOSED + "/simple"
    env.update({"UV_OFFLINE": "1", "PIP_CONFIG_FILE": os.devnull})
    for k in ("PIP_FIND_LINKS", "UV_FIND_LINKS", "NO_PROXY", "no_proxy"):
        env.pop(k, None)
    return env


def harness(args: list[str], env: dict[str, str], log: Path) -> tuple[int, float]:
    t0 = time.monotonic()
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, "-m", "vllm_harness", *args], stdout=fh, stderr=subprocess.STDOUT,
                            env=env).returncode
    return rc, time.monotonic() - t0


def freeze(state: Path, variant: str) -> dict[str, str]:
    py = state / "envs" / variant / "bin" / "python"
    code = ("import json, importlib.metadata as m\n"
            "print(json.dumps({d.metadata['Name'].lower().replace('_', '-'): d.version for d in m.distributions()}))")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def steps(state: Path, variant: str) -> dict[str, float]:
    st = json.loads((state / "status" / f"{variant}.json").read_text())
    return {k: v.get("seconds", 0.0) for k, v in st["steps"].items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="cu124")
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-bundle", action="store_true", help="the bundle is made already")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    base = dict(os.environ)
    base["VLLM_HARNESS_STATE"] = str(work / "bundle-state")
    out: dict = {"variant": a.variant, "bundle": a.bundle, "rounds": []}
    if not a.skip_bundle:
        for i in (1, 2):
            rc, secs = harness(["bundle", "--variant", a.variant, "--out", a.bundle], base, work / f"bundle{i}.log")
            out[f"bundle_run{i}_s"] = round(secs, 1)
            print(f"bundle run {i}: {secs:.1f}s (exit {rc})", flush=True)
    for r in range(1, a.rounds + 1):
        row = {}
        for mode in ("online", "offline"):
            state = work / f"{mode}{r}"
            env = dict(base, VLLM_HARNESS_STATE=str(state))
            args = ["build-variant", "--variant", a.variant, "--skip-doctor"]
            if mode == "offline":
                env = closed_env(env)
                args += ["--from-bundle", a.bundle]
            rc, secs = harness(args, env, work / f"{mode}{r}.log")
            row[mode] = {"exit": rc, "seconds": round(secs, 1), "steps": steps(state, a.variant) if rc == 0 else {}}
            print(f"round {r} {mode}: {secs:.1f}s (exit {rc}) steps {row[mode]['steps']}", flush=True)
        if row["online"]["exit"] == 0 and row["offline"]["exit"] == 0:
            on, off = freeze(work / f"online{r}", a.variant), freeze(work / f"offline{r}", a.variant)
            diff = {k: (on.get(k), off.get(k)) for k in sorted(set(on) | set(off)) if on.get(k) != off.get(k)}
            row["distributions"] = len(on)
            row["identical"] = not diff
            row["differences"] = diff
            print(f"round {r}: {len(on)} distributions online, {len(off)} offline; identical: {not diff}"
                  + (f"; differences: {diff}" if diff else ""), flush=True)
        out["rounds"].append(row)
    (work / "result.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
