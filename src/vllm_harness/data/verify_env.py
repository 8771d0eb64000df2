"""Runs INSIDE the env being verified (its own python): environment facts, imports, compiled extensions,
and vLLM's kernels against torch references.  Prints one JSON object on the last line of stdout.

Kept free of the harness's imports: it needs only torch and the env's own packages.
Usage: python verify_env.py --device cuda|cpu --imports vllm,xformers --extensions vllm._C --ops rms_norm,...
"""

import argparse
import importlib
import json
import platform
import sys
import time
import traceback

TOL = {"float32": (1e-4, 1e-5), "float16": (2e-2, 1e-2), "bfloat16": (6e-2, 3e-2)}


def check(name, fn, checks):
    t0 = time.perf_counter()
    try:
        status, reason, metrics = fn()
    except Exception as e:  # a check never takes verify down
        status, reason, metrics = "fail", f"{type(e).__name__}: {e}".splitlines()[0][:400], {}
        metrics["traceback"] = traceback.format_exc(limit=3)[-800:]
    metrics["seconds"] = round(time.perf_counter() - t0, 4)
    checks.append({"name": name, "status": status, "reason": reason, "metrics": metrics})
    return status


def ref_rms_norm(x, w, eps):
    xf = x.float()
    var = xf.pow(2).mean(-1, keepdim=True)
    return (xf * (var + eps).rsqrt()).to(x.dtype) * w


def op_cases(torch, op, device, dtype):
    """Yield (description, run_and_compare) for one op; shapes include odd sizes and a strided input."""
    import torch.nn.functional as F
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    shapes = [(1, 8), (7, 4097), (33, 1024)]
    for rows, hidden in shapes:
        if op == "rms_norm":
            def run(rows=rows, hidden=hidden):
                x, w = rnd(rows, hidden), rnd(hidden)
                out = torch.empty_like(x)
                torch.ops._C.rms_norm(out, x, w, 1e-6)
                return out, ref_rms_norm(x, w, 1e-6)
        elif op == "fused_add_rms_norm":
            def run(rows=rows, hidden=hidden):
                x, r, w = rnd(rows, hidden), rnd(rows, hidden), rnd(hidden)
                ref_r = (x.float() + r.float()).to(dtype)
                ref = ref_rms_norm(ref_r, w, 1e-6)
                torch.ops._C.fused_add_rms_norm(x, r, w, 1e-6)
                return torch.cat([x, r]), torch.cat([ref, ref_r])
        elif op == "silu_and_mul":
            def run(rows=rows, hidden=hidden):
                x = rnd(rows, 2 * hidden)
                out = torch.empty(rows, hidden, device=device, dtype=dtype)
                torch.ops._C.silu_and_mul(out, x)
                d = hidden
                return out, (F.silu(x[:, :d].float()) * x[:, d:].float()).to(dtype)
        else:
            return
        yield f"{rows}x{hidden}", run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--imports", default="")
    ap.add_argument("--extensions", default="")
    ap.add_argument("--ops", default="")
    a = ap.parse_args()
    checks = []
    out = {"python": sys.executable, "python_version": platform.python_version(), "gpus": [], "checks": checks}
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - reported as a failed check
        why = f"torch does not import: {e}"
        check("torch", lambda: ("fail", why, {}), checks)
        print(json.dumps(out))
        return
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    try:
        import numpy
        out["numpy"] = numpy.__version__
    except Exception:
        out["numpy"] = None
    cuda_ok = False
    try:
        cuda_ok = torch.cuda.is_available()
        for i in range(torch.cuda.device_count() if cuda_ok else 0):
            p = torch.cuda.get_device_properties(i)
            out["gpus"].append({"index": i, "name": p.name, "compute_capability": f"{p.major}.{p.minor}",
                                "memory_gib": round(p.total_memory / 2**30, 1)})
    except Exception as e:
        out["cuda_error"] = str(e)[:300]

    if a.device == "cuda":
        reason = ("torch was built without CUDA" if not torch.version.cuda else
                  out.get("cuda_error") or "torch.cuda.is_available() is False (no GPU or driver visible)")
        check("cuda-available", lambda: ("pass", "", {"gpus": len(out["gpus"])}) if cuda_ok
              else ("skip", reason, {}), checks)
    for mod in [m for m in a.imports.split(",") if m]:
        def imp(mod=mod):
            m = importlib.import_module(mod)
            return "pass", "", {"version": str(getattr(m, "__version__", ""))}
        check(f"import {mod}", imp, checks)
    no_driver = []  # extensions that could not load only because this machine has no NVIDIA driver
    for ext in [m for m in a.extensions.split(",") if m]:
        def load(ext=ext):
            try:
                m = importlib.import_module(ext)
            except ImportError as e:
                if "libcuda.so" in str(e) and not cuda_ok:
                    no_driver.append(ext)
                    return "skip", "needs the NVIDIA driver (libcuda.so.1), absent here: load it on a GPU machine", {}
                raise
            return "pass", "", {"file": getattr(m, "__file__", "")}
        check(f"load {ext}", load, checks)

    device = "cuda" if a.device == "cuda" else "cpu"
    run_kernels = device == "cpu" or cuda_ok
    dtypes = ["float32", "float16", "bfloat16"]
    for op in [o for o in a.ops.split(",") if o]:
        has = hasattr(torch.ops, "_C") and hasattr(torch.ops._C, op)
        for dt in dtypes:
            name = f"{op} {dt} ({device})"
            if not has and no_driver:
                check(name, lambda: ("skip", f"{', '.join(no_driver)} not loadable without a driver", {}), checks)
                continue
            if not has:
                check(name, lambda op=op: ("fail", f"torch.ops._C.{op} is not registered", {}), checks)
                continue
            if not run_kernels:
                check(name, lambda: ("skip", "no GPU: kernel not run", {}), checks)
                continue
            if device == "cuda" and dt == "bfloat16" and torch.cuda.get_device_capability()[0] < 8:
                check(name, lambda: ("skip", "bf16 needs compute capability >= 8.0", {}), checks)
                continue
            dtype = getattr(torch, dt)

            def kernel(op=op, dtype=dtype, dt=dt):
                rtol, atol = TOL[dt]
                worst = 0.0
                cases = list(op_cases(torch, op, device, dtype))
                for desc, run in cases:
                    got, ref = run()
                    err = (got.float() - ref.float()).abs()
                    bound = atol + rtol * ref.float().abs()
                    worst = max(worst, float(err.max()))
                    if not bool((err <= bound).all()):
                        return "fail", f"{desc}: max abs error {float(err.max()):.3g} over tolerance", \
                            {"max_abs_err": float(err.max())}
                return "pass", "", {"max_abs_err": worst, "cases": len(cases), "rtol": rtol, "atol": atol}
            check(name, kernel, checks)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
