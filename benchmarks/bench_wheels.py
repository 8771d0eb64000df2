"""The wheel check against today's official vLLM wheels (issue 25): release x compute capability.

    python benchmarks/bench_wheels.py [--releases 0.8.5,0.19.1,...] [--count 11] [--ccs 7.5,8.0,...]
                                      [--cache DIR] [--json OUT] [--markdown]

Reads vLLM's releases from the package index (PyPI's simple API, through the harness's bounded fetcher),
downloads the Linux x86_64 wheel of each chosen release into --cache (default .harness/cache/release-wheels;
kept, checked against the index's sha256), unpacks its libraries and Python files once, then runs the wheel
check that ``nox -s build-<variant>`` runs before install (``verify.binaries.check_wheel``) for each compute
capability, against the wheel's own CUDA major and torch pin (so that only the GPU archs decide).

Each cell: ACCEPTED, ACCEPTED (PTX JIT: libraries), or REFUSED (the library and why); with the count of
libraries reported "not used" on that GPU (kernels for other GPUs only, or imported guarded).  A cell marked
``*`` is a GPU vLLM documents for that release: its CMakeLists' CUDA_SUPPORTED_ARCHS for the wheel's CUDA
(data/compat.toml, ``build_archs``; a release newer than the data takes the newest known one of the same
CUDA major, and says so).  Exit status 1 when a documented GPU is REFUSED.

Default releases: --count of them, spread evenly from 0.8.5 to the newest (the newest always in), with the
release of every variant in envs/.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vllm_harness.core.fetcher import Fetcher  # noqa: E402
from vllm_harness.facts import compat  # noqa: E402
from vllm_harness.facts.package_index import Http, group_releases, pick_wheel, read_project  # noqa: E402
from vllm_harness.verify import binaries  # noqa: E402

INDEX = "https://pypi.org/simple"
CCS = ["7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0"]
WHEEL_MAX = 2 << 30


def choose(releases: list[str], count: int, oldest: str = "0.8.5", keep: tuple[str, ...] = ()) -> list[str]:
    """``count`` releases spread evenly from ``oldest`` to the newest, plus those in ``keep`` (the variants')."""
    vs = [v for v in releases if Version(v) >= Version(oldest)]
    kept = {v for v in keep if v in vs}
    rest = max(count - len(kept), 2)
    step = (len(vs) - 1) / (rest - 1) if len(vs) > rest else 1
    picked = {vs[min(round(i * step), len(vs) - 1)] for i in range(min(rest, len(vs)))}
    return sorted(picked | kept, key=Version)


def variant_releases() -> tuple[str, ...]:
    """The vLLM release of every variant in envs/ (the ones `nox -s build-<variant>` checks)."""
    from vllm_harness.facts.variants import load_variant_file  # local: only for the default choice
    out = []
    for p in sorted((ROOT / "envs").glob("*.toml")):
        try:
            out.append(str(load_variant_file(p).vllm["version"]))
        except Exception:  # a broken variant file is reported by its own session
            continue
    return tuple(out)


def documented(data: compat.CompatData, version: str, cuda_major: int | None) -> tuple[list[str], str]:
    """The compute capabilities vLLM's build targets for this release's wheel (its CMake arch list for the
    wheel's CUDA), and where that came from."""
    f = data.vllm(version)
    how = f"compat.toml build_archs of {version}"
    if f is None or f.wheel_cuda is None:
        known = [v for v in data.vllm_releases()
                 if (g := data.vllm(v)) is not None and g.wheel_cuda is not None
                 and (cuda_major is None or g.wheel_cuda.value.split(".")[0] == str(cuda_major))]
        if not known:
            return [], "unknown (no release of that CUDA major in the data)"
        newest = max(known, key=Version)
        f, how = data.vllm(newest), f"inferred: {version} is not in the data; the arch list of {newest}"
    archs = f.build_archs(f.wheel_cuda.value)
    if archs is None:
        return [], "unknown (no build_archs for the release)"
    return [cc for cc in CCS if compat.arch_list_runs_on(archs.value, compat.parse_cc(cc))], \
        f"{how} (CUDA {f.wheel_cuda.value}: {archs.value})"


def cell(checks: list[dict]) -> dict:
    failed = [c for c in checks if c["status"] == "fail"]
    ptx = [c for c in checks if c["metrics"].get("warning") == "ptx-only"]
    unused = [c for c in checks if c["metrics"].get("not_used")]
    lib = lambda c: c["name"].split(": ")[0].rsplit("/", 1)[-1].split(".")[0]  # noqa: E731
    out = {"verdict": "REFUSED" if failed else "ACCEPTED", "not_used": sorted(lib(c) for c in unused),
           "ptx_only": sorted(lib(c) for c in ptx)}
    if failed:
        out["refused"] = [f"{lib(c)}: {c['reason']}" for c in failed]
    return out


def judge(wheel: Path, ccs: list[str]) -> tuple[dict, dict]:
    with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory(prefix="bench-wheels-") as tmp:
        meta = binaries.wheel_metadata(zf)
        members = [n for n in zf.namelist() if n.endswith(".so") or ".so." in n]
        for n in members:
            zf.extract(n, tmp)
        majors = set()
        for n in members:
            try:
                majors |= set(binaries.cuda_majors(binaries.read_elf(Path(tmp) / n).needed).values())
            except binaries.NotElf:
                pass
        cuda = f"{max(majors)}.0" if majors else "0.0"
        pin = binaries._torch_pin(meta["requires"]) or ""
        torch = pin.lstrip("=<>!~ ").split(",")[0].strip() or "0"
        out, secs = {}, {}
        for cc in ccs:
            t0 = time.perf_counter()
            checks = binaries.check_wheel(wheel, cuda, torch, [cc], reader="python", unpacked=Path(tmp))
            secs[cc] = round(time.perf_counter() - t0, 2)
            out[cc] = cell([c for c in checks if c["name"].endswith("GPU archs")])
        return {"cuda_major": max(majors) if majors else None, "torch": torch, "libraries": len(members),
                "cells": out}, secs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--releases", default="")
    ap.add_argument("--count", type=int, default=11)
    ap.add_argument("--ccs", default=",".join(CCS))
    ap.add_argument("--cache", type=Path, default=ROOT / ".harness" / "cache" / "release-wheels")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown (for the README)")
    a = ap.parse_args()
    ccs = [c.strip() for c in a.ccs.split(",") if c.strip()]
    http = Http(a.cache / "index", deadline_s=3600)
    rels = {str(r.version): r for r in group_releases(read_project(http, INDEX, "vllm"), "vllm")}
    names = [v.strip() for v in a.releases.split(",") if v.strip()] or \
        choose(sorted((v for v in rels if pick_wheel(rels[v])), key=Version), a.count, keep=variant_releases())
    data = compat.load()
    fetcher = Fetcher(deadline_s=3600, max_requests=200, request_deadline_s=1800)
    rows, bad = [], []
    for v in names:
        f = pick_wheel(rels[v])
        if f is None:
            print(f"{v}: no Linux x86_64 wheel on the index, skipped")
            continue
        dest = a.cache / f.filename
        t0 = time.perf_counter()
        if not dest.is_file():
            fetcher.download(f.url, dest, max_bytes=WHEEL_MAX, sha256=f.sha256)
        got = time.perf_counter() - t0
        res, secs = judge(dest, ccs)
        docs, how = documented(data, v, res["cuda_major"])
        res.update(release=v, wheel=f.filename, documented=docs, documented_from=how,
                   download_s=round(got, 1), check_s=secs)
        rows.append(res)
        for cc in docs:
            if res["cells"][cc]["verdict"] != "ACCEPTED":
                bad.append(f"{v} on sm_{cc.replace('.', '')}: {res['cells'][cc]['refused'][0]}")
        print(f"{v}: {f.filename} ({res['libraries']} libraries, CUDA {res['cuda_major']}, torch {res['torch']}), "
              f"checked in {sum(secs.values()):.1f}s", flush=True)
    print()
    print(render(rows, ccs, markdown=a.markdown))
    if a.json:
        a.json.write_text(json.dumps({"ccs": ccs, "rows": rows, "documented_refused": bad}, indent=1) + "\n")
    print(f"\n{len(rows)} releases x {len(ccs)} GPUs; documented GPUs refused: {len(bad)}")
    for b in bad:
        print(f"  {b}")
    return 1 if bad else 0


def render(rows: list[dict], ccs: list[str], markdown: bool) -> str:
    head = ["release", "CUDA", *[f"sm_{c.replace('.', '')}" for c in ccs]]
    lines = []
    for r in rows:
        cells = []
        for cc in ccs:
            c = r["cells"][cc]
            text = c["verdict"] + ("*" if cc in r["documented"] else "")
            if c["verdict"] == "REFUSED":
                text += " (" + ", ".join(x.split(":")[0] for x in c["refused"]) + ")"
            elif c["ptx_only"]:
                text += f" (PTX JIT: {', '.join(c['ptx_only'])})"
            if c["not_used"]:
                text += f"; {len(c['not_used'])} not used"
            cells.append(text)
        lines.append([r["release"], str(r["cuda_major"]), *cells])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(row) + " |" for row in lines]
        return "\n".join(out)
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=False)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths, strict=False)) for row in [head, *lines])


if __name__ == "__main__":
    sys.exit(main())
