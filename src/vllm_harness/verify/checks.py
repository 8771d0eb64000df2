"""verify: prove an env runs on this GPU, in layers -- each check pass / fail / skip with the reason and
numbers.

1. environment  torch and its CUDA, the GPUs (name, compute capability, memory, driver), NumPy;
2. binaries     every compiled library of vLLM (xformers, flash-attn when present), read without loading it
                (``binaries.py``): NEEDED resolved under the env's loader path, the CUDA runtime major vs
                torch's, the fatbin archs vs each GPU (a gap predicts ``no-kernel-image``; PTX only =
warning);
3. imports      vllm, its extension modules (loaded directly when vLLM's Python stack is absent), xformers;
4. kernels      the registered ops, discovered and called as their schema allows, against torch references;
5. speed        effective memory bandwidth against the GPU's peak, first-call latency.

Layers 1, 3-5 run inside the env's own interpreter (``data/verify_env.py``); layer 2 runs here, before them,
and needs no GPU.  Without a GPU the verdict is NOT VERIFIED (exit 1) unless ``--allow-no-gpu``.
``check_wheel`` runs layer 2 on a wheel file before it is installed, against a variant's CUDA and torch.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from vllm_harness.core import procs
from vllm_harness.core.errors import StepFailed
from vllm_harness.core.runner import console
from vllm_harness.core.safeio import tomllib  # the one TOML shim (tomli on 3.10)
from vllm_harness.facts.machine import probe_gpus
from vllm_harness.verify import binaries

SCRIPT = Path(__file__).resolve().parents[1] / "data" / "verify_env.py"
DIST_SCRIPT = SCRIPT.with_name("verify_dist.py")
DIST_TABLE = SCRIPT.with_name("custom_ar_ops.toml")
DIST_LIB = re.compile(r"^_C(_stable_libtorch)?(\.abi3|\.cpython-[^.]+)?\.so$")
LAYERS = ("environment", "binaries", "imports", "kernels", "speed", "multi-gpu")
EXT_SUFFIX = re.compile(r"(\.abi3|\.cpython-[^.]+)?\.so$")
CPYTHON_TAG = re.compile(r"\.cpython-[^./]+\.so$")


def _probe(python: Path, env: dict[str, str], timeout: float = 60) -> dict:
    """Where the env's packages are (no import of torch or vllm)."""
    try:
        r = procs.run(
            [str(python), str(SCRIPT), "--probe"], capture_output=True, text=True, env=env, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise StepFailed(
            f"verify: {python} did not answer in {timeout:.0f}s.", "Check the env's interpreter."
        ) from None
    except OSError as e:
        raise StepFailed(f"verify: cannot run {python} ({e.strerror}).", "Build the env first.") from None
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise StepFailed(
            f"verify: {python} crashed before reporting (exit {r.returncode}): "
            f"{(r.stderr.strip().splitlines() or [''])[-1][:300]}",
            "Check the env's interpreter.",
        )
    return json.loads(lines[-1])


def _module_name(pkg_dir: Path, pkg: str, f: Path) -> str | None:
    rel = f.relative_to(pkg_dir)
    if not EXT_SUFFIX.search(rel.name) or ".so." in rel.name:
        return None
    stem = EXT_SUFFIX.sub("", rel.name)
    return ".".join([pkg, *rel.parts[:-1], stem])


def other_interpreter(path: str, suffixes: list[str] | None) -> bool:
    """A CPython extension module built for another interpreter than the env's (vLLM ships deep_gemm's ``_C``
    once per CPython version): that python never loads it, so verify does not either."""
    return (
        bool(suffixes)
        and bool(CPYTHON_TAG.search(path))
        and not any(path.endswith(x) for x in suffixes if CPYTHON_TAG.search(x))
    )


def _other_interpreter_check(path: str, suffixes: list[str]) -> dict:
    tag = CPYTHON_TAG.search(path).group(0)
    return {
        "name": f"load {Path(path).name}",
        "status": "skip",
        "layer": "imports",
        "metrics": {"file": path},
        "reason": f"built for another interpreter ({tag}); this python loads "
        f"{next((x for x in suffixes if x.startswith('.cpython-')), suffixes[0])} files",
    }


def expand_libs(libs: list[str] | None) -> list[str]:
    out = []
    for x in libs or []:
        p = Path(x)
        if p.is_dir():
            out += [str(q.resolve()) for q in sorted(p.rglob("*.so")) if binaries.is_elf(q)]
        elif p.is_file():
            out.append(str(p.resolve()))
    return out


def binary_layer(
    probe: dict,
    env: dict[str, str],
    target: binaries.Target,
    driver_present: bool,
    libs: list[str],
) -> tuple[list[dict], dict]:
    """The env's compiled libraries judged against ``target`` (its ``torch_cuda`` is the env's torch's)."""
    t0 = time.perf_counter()
    reader = target.reader
    torch_dir = probe["packages"].get("torch")
    tf = binaries.torch_facts(torch_dir)
    lp = binaries.LoaderPath.for_env(
        env, probe.get("site_packages", []), torch_dir, driver_present=driver_present
    )
    pkg_dirs = {k: v for k, v in probe["packages"].items() if k != "torch"}
    files = binaries.find_libraries(pkg_dirs, extra=libs)
    side = binaries.PythonSide(lambda: binaries.dir_sources(pkg_dirs), [label for _f, label in files])
    checks = binaries.check_libraries(
        files, lp, replace(target, torch_cuda=tf.get("cuda")), env, python_side=side
    )
    if not files:
        checks.append(
            {
                "name": "compiled libraries",
                "status": "fail" if not libs else "skip",
                "layer": "binaries",
                "reason": f"no compiled library found in {', '.join(pkg_dirs) or 'no vLLM package'}",
                "metrics": {"packages": pkg_dirs},
            }
        )
    cuobjdump = binaries.find_cuobjdump(env) if reader != "python" else None
    info = {
        "libraries": len(files),
        "torch": tf,
        "cuobjdump": cuobjdump,
        "readers": sorted({c["metrics"].get("reader") for c in checks if c["metrics"].get("reader")}),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return checks, info


@dataclass(frozen=True)
class VerifyOptions:
    """How :func:`run_verify` runs: ``log``: where the script's output goes; ``timeout``: seconds for the
    script; ``libs``: library files or folders to check besides the env's; ``speed``: run the speed layer;
    ``reader``: the fatbin reader (auto, python, cuobjdump); ``ccs``: compute capabilities to compare the
    binaries with (instead of the visible GPUs')."""

    log: Path | None = None
    timeout: float = 600
    libs: list[str] | None = None
    speed: bool = True
    reader: str = "auto"
    ccs: list[str] | None = None


def _extension_files(probe: dict, sfx) -> dict[str, str]:
    """{module: file} of every extension module found in the vllm package (and flash_attn_2_cuda's), of
    this interpreter."""
    ext_files: dict[str, str] = {}
    for pkg in ("vllm", "flash_attn_2_cuda"):
        d = probe["packages"].get(pkg)
        if not d:
            continue
        if Path(d).is_file():
            ext_files[pkg] = d
            continue
        for f, _label in binaries.find_libraries({pkg: d}):
            name = _module_name(Path(d), pkg, f)
            if name and not other_interpreter(str(f), sfx):
                ext_files[name] = str(f)
    return ext_files


def _run_script(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return procs.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise StepFailed(
            f"verify: the checks did not finish in {timeout:.0f}s.",
            "Look at the GPU's state (nvidia-smi) and rerun.",
        ) from None
    except OSError as e:
        raise StepFailed(f"verify: cannot run {argv[0]} ({e.strerror}).", "Build the env first.") from None


def run_verify(
    python: Path,
    device: str,
    imports: list[str],
    extensions: list[str],
    ops: list[str],
    env: dict[str, str],
    **options: object,
) -> dict:
    """The verify layers on the env of ``python``; ``options``: the fields of :class:`VerifyOptions` as
    keywords."""
    opts = VerifyOptions(**options)
    log, timeout, ccs = opts.log, opts.timeout, opts.ccs
    probe = _probe(python, env)
    gpus, driver, driver_cuda = probe_gpus(env) if device == "cuda" else ([], None, None)
    gpu_ccs = ccs or [g["compute_capability"] for g in gpus if g.get("compute_capability")]
    direct = expand_libs(opts.libs)
    sfx = probe.get("ext_suffixes")
    elsewhere = [_other_interpreter_check(f, sfx) for f in direct if other_interpreter(f, sfx)]
    direct = [f for f in direct if not other_interpreter(f, sfx)]
    why = "device = cpu" if device != "cuda" else "no GPU visible (pass --cc to compare with a GPU elsewhere)"
    ccs_here = gpu_ccs if device == "cuda" else []

    def binaries_layer() -> tuple[list[dict], dict]:
        target = binaries.Target(ccs_here, reader=opts.reader, no_gpu_reason=why)
        return binary_layer(probe, env, target, driver_present=bool(gpus) or driver is not None, libs=direct)

    # with no compute capability to compare, the binary layer predicts nothing the script needs (no
    # no-kernel-image, no PTX-only library): it reads the ELF files here while the script imports there
    beside = not ccs_here
    pool = ThreadPoolExecutor(max_workers=1)
    later = pool.submit(binaries_layer)
    bchecks, binfo = ([], {}) if beside else later.result()
    predicted = [c.get("subject", c["name"]) for c in bchecks if c.get("id") == "no-kernel-image"]
    ptx_only = [c.get("subject", c["name"]) for c in bchecks if c["metrics"].get("warning") == "ptx-only"]
    # extension modules: the variant's, and every one found in the vllm package (loaded directly if need be)
    ext_files = _extension_files(probe, sfx)
    exts = [e for e in extensions if e.split(".")[0] in probe["packages"] or not direct]
    stale = missing_extensions(exts, probe["packages"], ext_files)
    exts = [e for e in exts if e not in {c["metrics"]["module"] for c in stale}]
    argv = [
        str(python), str(SCRIPT), "--device", device, "--imports", ",".join(imports),
        "--extensions", ",".join(exts), "--ops", ",".join(ops),
        "--ext-files", ",".join(f"{k}={v}" for k, v in ext_files.items()), "--libs", ",".join(direct),
        "--predicted-no-kernel", ",".join(predicted), "--ptx-only", ",".join(ptx_only),
    ]
    if driver:
        argv += ["--driver", driver]
    if not opts.speed:
        argv.append("--no-speed")
    t0 = time.perf_counter()
    # the PTX JIT cache off for this run: a PTX-only build shows its real first-call cost every time
    env = {**env, "CUDA_CACHE_DISABLE": "1"}
    try:
        r = _run_script(argv, env, timeout)
    finally:
        pool.shutdown(wait=True)
    wall = time.perf_counter() - t0
    bchecks, binfo = later.result()
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(
            f"$ {' '.join(argv)}\n{r.stdout}\n{r.stderr}\n# exit status {r.returncode}\n"
            f"# binary layer\n{json.dumps(bchecks, indent=1)}\n"
        )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (r.stderr.strip().splitlines() or [""])[-1][:300]
        raise StepFailed(
            f"verify: {python} crashed before reporting (exit {r.returncode}): {tail}",
            None,
            log=str(log) if log else None,
        )
    result = json.loads(lines[-1])
    checks = result["checks"] + stale + elsewhere + bchecks
    if device == "cuda" and len(result.get("gpus") or []) >= 2:
        dist_libs = dist_libraries(direct) + [
            f for name, f in ext_files.items() if name in ("vllm._C", "vllm._C_stable_libtorch")
        ]
        checks += multi_gpu_layer(python, env, result, timeout, libs=dist_libs)
    order = {name: i for i, name in enumerate(LAYERS)}
    result["checks"] = sorted(checks, key=lambda c: order.get(c.get("layer", ""), len(LAYERS)))
    secs = result.get("layer_seconds", {})
    secs["binaries"] = binfo.pop("seconds")
    # the binary layer read beside the script (no GPU to compare with) adds nothing to the total
    secs["total"] = round(wall + (0.0 if beside else secs["binaries"]) + secs.get("multi-gpu", 0), 3)
    result["layer_seconds"] = {k: secs[k] for k in [*LAYERS, "total"] if k in secs}
    result["binaries"] = binfo
    result["driver"] = driver
    result["driver_cuda"] = driver_cuda
    if ccs:
        result["compared_ccs"] = ccs
    if not result.get("gpus") and gpus and device == "cuda":
        result["gpus_nvml"] = gpus  # NVML sees GPUs that torch does not
    result["layers"] = layer_summary(result)
    return result


def missing_extensions(
    declared: list[str], packages: dict[str, str], ext_files: dict[str, str]
) -> list[dict]:
    """A declared extension module of an installed package that the package does not ship (a release renamed
    it): one failing check naming what it ships, instead of the script's bare ModuleNotFoundError."""
    out = []
    for e in declared:
        pkg = e.split(".", 1)[0]
        if pkg in packages and Path(packages[pkg]).is_dir() and e not in ext_files:
            ships = sorted(n for n in ext_files if n.split(".", 1)[0] == pkg)
            out.append(
                {
                    "name": f"load {e}",
                    "status": "fail",
                    "layer": "imports",
                    "metrics": {"module": e, "ships": ships},
                    "reason": f"{pkg} has no extension module {e} (it ships "
                              f"{', '.join(ships) or 'none'}). Fix: "
                    f"remove {e} from the variant's [verify] extensions (verify loads every extension "
                    f"module {pkg} ships by default)",
                }
            )
    return out


def dist_libraries(libs: list[str]) -> list[str]:
    """Of the ``--libs`` files, vLLM's own ``_C`` libraries (where ``_C_custom_ar`` is registered): the
    flash-attn
    and MoE libraries beside them are not loaded again in every rank.  All of them when none is named so."""
    own = [f for f in libs if DIST_LIB.match(Path(f).name) and "third_party" not in Path(f).parts]
    return own or list(libs)


def custom_ar_table() -> dict:
    """data/custom_ar_ops.toml: where each vLLM release registers its custom all-reduce ops."""
    return tomllib.loads(DIST_TABLE.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class DistOptions:
    """How :func:`multi_gpu_layer` runs data/verify_dist.py: ``libs``: vLLM's compiled libraries (None: the
    env's installed vllm); ``backend``: torch.distributed's; ``extra``: more arguments for the script."""

    libs: list[str] | None = None
    backend: str = "nccl"
    extra: list[str] | None = None


def multi_gpu_layer(
    python: Path,
    env: dict[str, str],
    result: dict,
    timeout: float,
    **options: object,
) -> list[dict]:
    """Two or more GPUs (data/verify_dist.py, in the env's python): P2P and its bandwidth for every pair, an
    NCCL
    all-reduce from 8 KB to 1 GB (sum checked, bus GB/s against the link's peak), and vLLM's own custom
    all-reduce from its compiled library (``libs``, else the env's installed vllm) against NCCL."""
    t0 = time.perf_counter()
    opts = DistOptions(**options)
    libs = opts.libs
    argv = [
        str(python),
        str(DIST_SCRIPT),
        "--backend",
        opts.backend,
        "--custom-ar-table",
        json.dumps(custom_ar_table()),
        *(opts.extra or []),
    ]
    if libs:
        argv += ["--libs", ",".join(libs)]
    try:
        r = procs.run(argv, capture_output=True, text=True, env=env, timeout=timeout)  # its ranks end with it
        out = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])
        checks = out["checks"]
        result["multi_gpu"] = {k: out.get(k) for k in ("world", "backend", "link", "libraries", "seconds")}
    except (subprocess.TimeoutExpired, OSError, ValueError, IndexError) as e:
        tail = ""
        if isinstance(e, (ValueError, IndexError)):
            tail = " " + (r.stderr.strip().splitlines() or [""])[-1][:200]
        checks = [
            {
                "name": "multi-GPU checks",
                "status": "fail",
                "reason": f"{type(e).__name__}: {e}"[:300] + tail,
                "metrics": {},
            }
        ]
    for c in checks:
        c["layer"] = "multi-gpu"
    result.setdefault("layer_seconds", {})["multi-gpu"] = round(time.perf_counter() - t0, 3)
    return checks


def layer_summary(result: dict) -> dict:
    out = {}
    for layer in LAYERS:
        cs = [c for c in result["checks"] if c.get("layer") == layer]
        if not cs and layer not in result.get("layer_seconds", {}):
            continue
        out[layer] = {s: sum(c["status"] == s for c in cs) for s in ("pass", "fail", "skip")}
        out[layer]["warn"] = sum(bool(c.get("metrics", {}).get("warning")) for c in cs)
        out[layer]["seconds"] = result.get("layer_seconds", {}).get(layer)
    return out


def verdict(result: dict, device: str, allow_no_gpu: bool) -> tuple[str, int]:
    checks = result["checks"]
    failed = [c for c in checks if c["status"] == "fail"]
    warned = [c for c in checks if c["status"] == "pass" and c.get("metrics", {}).get("warning")]
    skipped_gpu = device == "cuda" and not result.get("gpus")
    if failed:
        ids = sorted({c["id"] for c in failed if c.get("id")})
        return f"FAILED ({len(failed)} of {len(checks)} checks{'; ' + ', '.join(ids) if ids else ''})", 1
    if skipped_gpu:
        label = (
            "NOT VERIFIED on a GPU: no GPU visible; the GPU checks were skipped (the binary checks ran: "
            f"{sum(c['status'] == 'pass' for c in checks)} passed)"
        )
        return label, 0 if allow_no_gpu else 1
    warn = f", {len(warned)} warning{'s' if len(warned) != 1 else ''}" if warned else ""
    return f"VERIFIED ({sum(c['status'] == 'pass' for c in checks)} checks passed{warn})", 0


def _detail(c: dict) -> str:
    m = c.get("metrics", {})
    if c["status"] == "pass" and "max_abs_err" in m:
        d = f"max abs err {m['max_abs_err']:.2e} over {m.get('cases')} cases"
        if m.get("first_call_ms") is not None:
            d += f"; first call {m['first_call_ms']:.1f} ms"
        if m.get("refused_strided"):
            d += f"; strided input refused ({len(m['refused_strided'])})"
        if m.get("strided_unsupported"):
            d += "; strided input unsupported (contiguous rows assumed)"
        return d
    return c.get("reason") or m.get("version") or ""


def _size(n: int) -> str:
    for unit, m in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= m and n % m == 0:
            return f"{n // m} {unit}"
    return f"{n} B"


def multi_gpu_tables(result: dict) -> list:
    """The multi-GPU layer's figures: P2P copy bandwidth per pair and direction; per all-reduce size, NCCL's
    latency and bus bandwidth, vLLM's custom all-reduce latency next to NCCL's on the same fp16/bf16 input."""
    from rich.table import Table

    by = {c["name"]: c for c in result.get("checks", []) if c.get("layer") == "multi-gpu"}
    out = []
    pairs = (by.get("p2p") or {}).get("metrics", {}).get("pairs") or {}
    if pairs:
        t = Table(title="P2P copy bandwidth (per direction)", show_lines=False)
        for col in ("pair", "link", "peer access", "GB/s"):
            t.add_column(col)
        for name, p in pairs.items():
            t.add_row(
                name,
                str(p.get("link")),
                "yes" if p.get("access") else "[red]no[/]",
                f"{p['gbps']:.0f}" if p.get("gbps") else p.get("error", "")[:40],
            )
        out.append(t)
    sweep = next((c for n, c in by.items() if n.startswith("all-reduce")), {}).get("metrics", {})
    backend = (result.get("multi_gpu") or {}).get("backend") or "nccl"
    bname = "NCCL" if backend == "nccl" else backend
    peak = sweep.get("peak_gbps")
    if sweep.get("sizes"):
        title = f"{bname} all-reduce, fp32" + (
            f" (link peak {peak:.0f} GB/s per GPU and direction)" if peak else ""
        )
        t = Table(title=title, show_lines=False)
        for col in ["size", "µs", "algbw GB/s", "bus GB/s"] + (["of peak"] if peak else []):
            t.add_column(col, justify="right")
        for r in sweep["sizes"]:
            t.add_row(
                _size(r["bytes"]),
                f"{r['us']:.1f}",
                f"{r['algbw_gbps']:.3g}",
                f"{r['bus_gbps']:.3g}",
                *([f"{r['bus_gbps'] / peak:.0%}"] if peak else []),
            )
        out.append(t)
    custom = (by.get("vllm custom all-reduce") or {}).get("metrics", {})
    if custom.get("sizes"):
        graphs = any(r.get("graph_custom_us") for r in custom["sizes"])
        t = Table(
            title=f"vLLM custom all-reduce vs {bname}, same input (µs per all-reduce)", show_lines=False
        )
        cols = ["size", "dtype"]
        if graphs:
            cols += ["custom (graph)", f"{bname} (graph)", "speedup (graph)"]
        cols += ["custom (eager)", f"{bname} (eager)", "speedup (eager)", "result"]
        for col in cols:
            t.add_column(col, justify="right")

        def sp(x):
            return f"[{'green' if x > 1 else 'yellow'}]{x:.2f}x[/]" if x else ""

        for r in custom["sizes"]:
            cells = [_size(r["bytes"]), {"float16": "fp16", "bfloat16": "bf16"}.get(r["dtype"], r["dtype"])]
            if graphs:
                g = r.get("graph_custom_us")
                cells += [
                    f"{g:.1f}" if g else "",
                    f"{r['graph_nccl_us']:.1f}" if g else "",
                    sp(r.get("graph_speedup")),
                ]
            ok = r["ok"] and r.get("graph_ok") is not False
            cells += [
                f"{r['custom_us']:.1f}",
                f"{r['nccl_us']:.1f}",
                sp(r.get("speedup")),
                ("exact" if r.get("exact") else f"err {r['max_abs_err']:.2g}") if ok else "[red]differs[/]",
            ]
            t.add_row(*cells)
        out.append(t)
    return out


def render(result: dict, verdict_text: str) -> None:
    from rich.table import Table

    con = console()
    gpus = (
        ", ".join(
            f"{g['name']} (sm {g['compute_capability']}, {g.get('memory_gib')} GiB, driver "
            f"{g.get('driver') or result.get('driver')})"
            for g in result.get("gpus", [])
        )
        or "none"
    )
    if result.get("wheel"):
        ccs = ", ".join(
            result.get("compared_ccs") or [g.get("compute_capability", "?") for g in result["gpus"]]
        )
        con.print(
            f"wheel {result['wheel']} against variant {result.get('variant')}; GPUs: {gpus}"
            + (f"; compared with sm {ccs}" if ccs else "")
        )
    else:
        con.print(
            f"python {result.get('python_version')} at {result.get('python')}; torch {result.get('torch')} "
            f"(CUDA {result.get('torch_cuda')}); numpy {result.get('numpy')}; GPUs: {gpus}"
        )
    t = Table(show_lines=False)
    for col in ("layer", "check", "status", "detail"):
        t.add_column(col, overflow="fold")
    colour = {"pass": "green", "fail": "red", "skip": "yellow"}
    for c in result["checks"]:
        st = c["status"]
        label = f"[{colour[st]}]{st}[/]"
        if st == "pass" and c.get("metrics", {}).get("warning"):
            label = "[yellow]warn[/]"
        detail = _detail(c) + (f" [{c['id']}]" if c.get("id") else "")
        t.add_row(c.get("layer", ""), c["name"], label, detail)
    con.print(t)
    parts = []
    for layer, s in result.get("layers", {}).items():
        secs = s.get("seconds")
        parts.append(
            f"{layer} {secs:.1f}s ({s['pass']}✓ {s['fail']}✗ {s['skip']} skipped)"
            if secs is not None
            else f"{layer} ({s['pass']}✓ {s['fail']}✗ {s['skip']} skipped)"
        )
    for tbl in multi_gpu_tables(result):
        con.print(tbl)
    total = result.get("layer_seconds", {}).get("total")
    con.print("time: " + "; ".join(parts) + (f"; total {total:.1f}s" if total is not None else ""))
    con.print(f"[bold]{verdict_text}[/]")


# -------------------------------------------------------------------------------------------- wheels


def verify_wheel(
    wheel: Path,
    variant,
    env: dict[str, str],
    python: Path | None,
    ccs: list[str] | None = None,
    reader: str = "auto",
    **options: object,
) -> dict:
    """The binary layer on a wheel file, before install: refused (a failed check) when its CUDA major or its
    torch pin does not fit the variant, or when its device code does not cover this machine's GPUs.
    ``options``: ``unpacked=``: where this wheel's files already lie (read there, not extracted again)."""
    t0 = time.perf_counter()
    gpus, driver, _dc = probe_gpus(env)
    gpu_ccs = ccs or [g["compute_capability"] for g in gpus if g.get("compute_capability")]
    lp = None
    probe = None
    if python is not None and python.exists():
        probe = _probe(python, env)
        lp = binaries.LoaderPath.for_env(
            env,
            probe.get("site_packages", []),
            probe["packages"].get("torch"),
            driver_present=bool(gpus) or driver is not None,
        )
    checks = binaries.check_wheel(
        wheel,
        variant.cuda,
        str(variant.torch["version"]),
        gpu_ccs,
        lp=lp,
        env=env,
        reader=reader,
        no_gpu_reason="no GPU visible (pass --cc to compare with a GPU elsewhere)",
        extensions=list(variant.verify.get("extensions") or []),
        **options,
    )
    if lp is None:
        checks.append(
            {
                "name": f"wheel {wheel.name}: NEEDED libraries",
                "status": "skip",
                "layer": "binaries",
                "reason": f"variant {variant.name} has no env yet: NEEDED resolution is checked by "
                f"`invoke verify --variant {variant.name}` after install",
                "metrics": {},
            }
        )
    res = {
        "wheel": str(wheel),
        "variant": variant.name,
        "python": str(python) if lp else None,
        "gpus": gpus,
        "checks": checks,
        "layer_seconds": {"binaries": round(time.perf_counter() - t0, 3)},
    }
    if ccs:
        res["compared_ccs"] = ccs
    res["layers"] = layer_summary(res)
    return res


def wheel_verdict(result: dict, allow_no_gpu: bool) -> tuple[str, int]:
    failed = [c for c in result["checks"] if c["status"] == "fail"]
    if failed:
        return f"REFUSED: {failed[0]['name']}: {failed[0]['reason']}", 1
    if not result.get("gpus") and not result.get("compared_ccs"):
        return (
            "ACCEPTED for the variant's CUDA and torch; GPU archs NOT VERIFIED (no GPU visible; pass --cc)",
            0 if allow_no_gpu else 1,
        )
    return "ACCEPTED: CUDA major, torch pin and GPU archs fit the variant", 0
