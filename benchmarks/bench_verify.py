"""verify's measurements, outside the tests.

    python benchmarks/bench_verify.py LIB.so [LIB.so ...]
        The binary layer's two fatbin readers side by side (the built-in ELF/fatbin parser and cuobjdump): for
        each library the archs each reader lists (they must agree), and the seconds each took.

    python benchmarks/bench_verify.py dist [--libs vllm/_C.abi3.so] [--python PY] [--out results/X.json]
        The multi-GPU layer on every visible GPU (data/verify_dist.py through verify.multi_gpu_layer): P2P copy
        bandwidth per pair and direction, NCCL all-reduce 8 KB - 1 GB (latency, bus bandwidth against the
        link's peak), vLLM's custom all-reduce against NCCL per size in fp16/bf16; printed as verify's tables,
        the whole result written as JSON with the machine's facts.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vllm_harness.verify import binaries as b
from vllm_harness.verify.elf import _plain, fatbin_entries_cuobjdump, fatbin_entries_python


def dist(argv: list[str]) -> int:
    import argparse
    import json
    import os
    import platform
    import subprocess

    from vllm_harness.verify import checks as v
    ap = argparse.ArgumentParser(prog="bench_verify.py dist")
    ap.add_argument("--libs", action="append", default=[], help="vLLM extension libraries (vllm/_C.abi3.so)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter with torch (default: this one)")
    ap.add_argument("--out", help="write the result JSON here")
    ap.add_argument("--timeout", type=float, default=900)
    a = ap.parse_args(argv)
    result: dict = {}
    t0 = time.perf_counter()
    checks = v.multi_gpu_layer(Path(a.python), dict(os.environ), result, a.timeout,
                               libs=v.dist_libraries(a.libs) or None)
    result["checks"] = checks
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip().splitlines()
    except OSError:
        smi = []
    torch_v = subprocess.run([a.python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                             text=True).stdout.strip()
    result["machine"] = {"gpus": smi, "torch": torch_v, "host": platform.node(), "cpus": os.cpu_count(),
                         "libs": a.libs, "seconds": round(time.perf_counter() - t0, 1)}
    from rich.console import Console
    con = Console(width=160)
    for c in checks:
        con.print(f"{c['name']}: {c['status']}: {c.get('reason', '')}")
    for tbl in v.multi_gpu_tables(result):
        con.print(tbl)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {a.out}")
    return 1 if any(c["status"] == "fail" for c in checks) else 0


def main(paths: list[str]) -> int:
    cuobjdump = b.find_cuobjdump()
    print(f"cuobjdump: {cuobjdump or 'not found'}")
    bad = 0
    for p in map(Path, paths):
        t0 = time.perf_counter()
        info = b.read_elf(p)
        py = fatbin_entries_python(p, info)
        t_py = time.perf_counter() - t0
        line = (f"{p.name}: {p.stat().st_size / 2**20:.1f} MiB, NEEDED {len(info.needed)}; python reader "
                f"{t_py:.3f}s: {len(py)} entries in {len({e.container for e in py})} containers {b.arch_summary(py)}")
        if cuobjdump:
            t0 = time.perf_counter()
            cu = fatbin_entries_cuobjdump(p, cuobjdump) or []
            t_cu = time.perf_counter() - t0
            # cuobjdump names family entries (sm_100f) like plain ones (sm_100): compare without the suffix
            same = _plain(cu) == _plain(py) and len(cu) == len(py)
            bad += not same
            line += f"; cuobjdump {t_cu:.3f}s: {len(cu)} entries, {'SAME' if same else 'DIFFERENT: ' + str(b.arch_summary(cu))}"
        print(line)
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["dist"]:
        sys.exit(dist(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
