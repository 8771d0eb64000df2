"""Benchmark ``invoke compat --refresh`` (``facts.index_metadata.refresh``) against the live package index.

* ``cold``: an empty cache folder: every project page and every release's core metadata is fetched
  (range requests on the wheel's zip where the index offers no PEP 658 ``.metadata`` file).
* ``warm``: the same cache again: the pages are revalidated (ETag), the metadata comes from the cache.

The lock is written to a temporary file (the packaged data is not touched).  Targets (issue 16): cold under
60 s, warm under 5 s on the 2-core development machine.  Prints a table and a JSON line.

    PYTHONPATH=src python benchmarks/bench_compat.py [--workers 16] [--repeat 1] [--index URL]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from vllm_harness.facts import index_metadata as im


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1, help="cold/warm pairs")
    ap.add_argument("--index", default=im.DEFAULT_INDEX)
    a = ap.parse_args()
    rows = []
    for i in range(a.repeat):
        with tempfile.TemporaryDirectory(prefix="bench-compat-") as tmp:
            out, cache = Path(tmp) / "compat.lock.toml", Path(tmp) / "cache"
            for kind in ("cold", "warm"):
                t0 = time.perf_counter()
                r = im.refresh(out_path=out, index=a.index, cache_dir=cache, workers=a.workers)
                secs = time.perf_counter() - t0
                rows.append({"run": i + 1, "kind": kind, "seconds": round(secs, 2), "requests": r.requests,
                             "cache_hits": r.cache_hits, "releases": r.counts, "changed": r.changed,
                             "skipped": len(r.skipped), "notes": len(r.notes), "lock_bytes": out.stat().st_size})
    print(f"{'run':>3} {'kind':<5} {'seconds':>8} {'requests':>8} {'cached':>6}  releases (vllm/torch/xformers)")
    for r in rows:
        c = r["releases"]
        print(f"{r['run']:>3} {r['kind']:<5} {r['seconds']:>8.2f} {r['requests']:>8} {r['cache_hits']:>6}  "
              f"{c['vllm']}/{c['torch']}/{c['xformers']}")
    print(json.dumps({"bench": "compat-refresh", "machine": f"{platform.machine()} {os.cpu_count()} cores",
                      "workers": a.workers, "index": a.index, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
