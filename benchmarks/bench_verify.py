"""The binary layer's two fatbin readers side by side: the built-in ELF/fatbin parser and cuobjdump.

    python benchmarks/bench_verify.py LIB.so [LIB.so ...]

For each library: the archs each reader lists (they must agree), and the seconds each took.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vllm_harness import binaries as b  # noqa: E402


def main(paths: list[str]) -> int:
    cuobjdump = b.find_cuobjdump()
    print(f"cuobjdump: {cuobjdump or 'not found'}")
    bad = 0
    for p in map(Path, paths):
        t0 = time.perf_counter()
        info = b.read_elf(p)
        py = b.fatbin_entries_python(p, info)
        t_py = time.perf_counter() - t0
        line = (f"{p.name}: {p.stat().st_size / 2**20:.1f} MiB, NEEDED {len(info.needed)}; python reader "
                f"{t_py:.3f}s: {len(py)} entries in {len({e.container for e in py})} containers {b.arch_summary(py)}")
        if cuobjdump:
            t0 = time.perf_counter()
            cu = b.fatbin_entries_cuobjdump(p, cuobjdump) or []
            t_cu = time.perf_counter() - t0
            # cuobjdump names family entries (sm_100f) like plain ones (sm_100): compare without the suffix
            same = b._plain(cu) == b._plain(py) and len(cu) == len(py)
            bad += not same
            line += f"; cuobjdump {t_cu:.3f}s: {len(cu)} entries, {'SAME' if same else 'DIFFERENT: ' + str(b.arch_summary(cu))}"
        print(line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
