"""Runs INSIDE the env being verified (its own python).  Prints one JSON object on the last line of stdout.

Layers (each check: pass / fail / skip with the reason, and its numbers):
  environment  torch and its CUDA, the GPUs (name, compute capability, memory, driver), NumPy;
  imports      vllm, its extension modules (or, when vLLM's Python stack is absent, the extension
               libraries loaded directly with torch.ops.load_library), xformers;
  kernels      the registered ops, discovered and called as their schema allows, against torch references,
               per dtype, on odd sizes and strided inputs; xformers attention against SDPA;
  speed        effective memory bandwidth of the memory-bound ops against the GPU's peak; first-call latency.
(The binary layer runs in the harness, before this script: it needs no import.)

``--probe`` prints where things are without importing torch or vllm (site-packages, package dirs).
Kept free of the harness's imports: it needs only torch and the env's own packages (Python >= 3.8).
"""

import argparse
import importlib
import importlib.machinery
import importlib.util
import json
import math
import os
import platform
import re
import site
import sys
import sysconfig
import time
import traceback
import warnings

TOL = {"float32": (1e-4, 1e-5), "float16": (2e-2, 1e-2), "bfloat16": (6e-2, 3e-2)}
DTYPES = ("float32", "float16", "bfloat16")
PACKAGES = ("vllm", "xformers", "flash_attn", "vllm_flash_attn", "flash_attn_2_cuda", "flash_attn_3", "torch")
OP_NAMESPACES = ("_C", "_C_cache_ops", "_moe_C")
BAD_LAYOUT = re.compile(r"contiguous|stride", re.I)
BAD_DTYPE = re.compile(r"not implemented for|expected scalar type|unsupported (data ?|input ?|scalar ?)?type|"
                       r"dtype", re.I)
STICKY = re.compile(r"illegal memory access|device-side assert|unspecified launch failure|misaligned address",
                    re.I)
NO_KERNEL = re.compile(r"no kernel image is available", re.I)


def probe():
    """Where the env's packages are, without importing them."""
    out = {"python": sys.executable, "python_version": platform.python_version(), "packages": {},
           "site_packages": [], "ext_suffixes": list(importlib.machinery.EXTENSION_SUFFIXES)}
    try:
        out["site_packages"] = list(site.getsitepackages())
    except AttributeError:
        pass
    purelib = sysconfig.get_paths().get("purelib")
    if purelib and purelib not in out["site_packages"]:
        out["site_packages"].append(purelib)
    for name in PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        if spec.submodule_search_locations:
            out["packages"][name] = list(spec.submodule_search_locations)[0]
        elif spec.origin:
            out["packages"][name] = spec.origin
    print(json.dumps(out))


# --------------------------------------------------------------------------------------------- report

class Report:
    def __init__(self):
        self.checks = []
        self.layer_seconds = {}
        self.broken = None  # a sticky CUDA error: later GPU checks cannot run

    def check(self, layer, name, fn):
        t0 = time.perf_counter()
        id_ = None
        try:
            res = fn()
            status, reason, metrics = res[:3]
            id_ = res[3] if len(res) > 3 else None
        except Exception as e:  # a check never takes verify down
            text = f"{type(e).__name__}: {e}".splitlines()[0][:400]
            status, reason, metrics = "fail", text, {"traceback": traceback.format_exc(limit=3)[-800:]}
            id_ = classify(str(e))
            if STICKY.search(str(e)):
                self.broken = text
        metrics = dict(metrics or {})
        dt = time.perf_counter() - t0
        metrics["seconds"] = round(dt, 4)
        self.layer_seconds[layer] = self.layer_seconds.get(layer, 0.0) + dt
        c = {"name": name, "status": status, "reason": reason, "metrics": clean(metrics), "layer": layer}
        if id_:
            c["id"] = id_
        self.checks.append(c)
        return c


def clean(v):
    """JSON-safe numbers (no NaN/inf)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    return v


def classify(text):
    """A failure id of the contract for an error text (None when none fits)."""
    rules = [
        (NO_KERNEL, "no-kernel-image"),
        (r"libcuda\.so", "no-driver"),
        (r"undefined symbol", "torch-abi-undefined-symbol"),
        (r"GLIBCXX_", "glibcxx-too-old"),
        (
            r"lib(cudart|cublas|cusparse|nvrtc|nvJitLink)[^ ]*\.so[^ ]*: cannot open",
            "cuda-runtime-lib-missing",
        ),
        (r"compiled using NumPy 1\.x", "numpy-abi"),
        (r"No module named 'xformers'", "xformers-missing"),
        (r"xFormers can't load C\+\+/CUDA extensions|xFormers was built for", "xformers-torch-mismatch"),
        (r"forward compatibility", "cuda-forward-compat"),
        (
            r"driver version is insufficient|driver on your "
            r"system is too old",
            "driver-too-old",
        ),
        (r"Bfloat16 is only supported", "bf16-unsupported"),
    ]
    for pat, id_ in rules:
        if re.search(pat, text):
            return id_
    return None


# -------------------------------------------------------------------------------------- environment


def layer_environment(rep, out, torch, device, driver_hint):
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    rep.check(
        "environment",
        "torch",
        lambda: (
            "pass",
            f"torch {torch.__version__}, CUDA {torch.version.cuda}",
            {
                "version": torch.__version__,
                "cuda": torch.version.cuda,
                "cudnn": _cudnn(torch),
                "file": torch.__file__,
            },
        ),
    )
    try:
        import numpy

        out["numpy"] = numpy.__version__
    except Exception:  # NumPy is optional for torch
        out["numpy"] = None
    if out["numpy"]:

        def np_check():
            import numpy

            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                t = torch.from_numpy(numpy.arange(3.0))
                bad = [str(x.message) for x in w if "NumPy" in str(x.message)]
            if bad or float(t.sum()) != 3.0:
                return "fail", bad[0][:300] if bad else "torch.from_numpy gave wrong values", {}, "numpy-abi"
            return (
                "pass",
                f"numpy {numpy.__version__} (major {numpy.__version__.split('.')[0]}), works with torch",
                {"version": numpy.__version__, "major": int(numpy.__version__.split(".")[0])},
            )

        rep.check("environment", "numpy", np_check)
    cuda_ok = False
    try:
        cuda_ok = bool(torch.cuda.is_available())
        nv = _nvml()
        for i in range(torch.cuda.device_count() if cuda_ok else 0):
            p = torch.cuda.get_device_properties(i)
            g = {
                "index": i,
                "name": p.name,
                "compute_capability": f"{p.major}.{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1),
                "multiprocessors": getattr(p, "multi_processor_count", None),
            }
            g.update(nv.get(i, {}))
            g.setdefault("driver", driver_hint)
            out["gpus"].append(g)
    except Exception as e:  # reported in the cuda-available check
        out["cuda_error"] = str(e)[:300]
    if device == "cuda":
        reason = (
            "torch was built without CUDA"
            if not torch.version.cuda
            else out.get("cuda_error") or "torch.cuda.is_available() is False (no GPU or driver visible)"
        )
        rep.check(
            "environment",
            "cuda-available",
            lambda: (
                ("pass", f"{len(out['gpus'])} GPU(s)", {"gpus": len(out["gpus"])})
                if cuda_ok
                else ("skip", reason, {}, "torch-cpu-only" if not torch.version.cuda else "no-driver")
            ),
        )
        for g in out["gpus"]:
            rep.check(
                "environment",
                f"gpu {g['index']}",
                lambda g=g: (
                    "pass",
                    f"{g['name']}, sm {g['compute_capability']}, {g['memory_gib']} GiB, "
                    f"driver {g.get('driver')}",
                    dict(g),
                ),
            )
    return cuda_ok


def _cudnn(torch):
    try:
        return torch.backends.cudnn.version()
    except Exception:
        return None


def _nvml():
    """{index: {driver, peak_gbs, mem_clock_mhz, bus_width_bits}} from pynvml when the env has it."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no pynvml in this env, or no driver
        return {}
    out = {}
    try:
        drv = pynvml.nvmlSystemGetDriverVersion()
        drv = drv.decode() if isinstance(drv, bytes) else str(drv)
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            g = {"driver": drv}
            try:
                clk = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)
                bus = pynvml.nvmlDeviceGetMemoryBusWidth(h)
                g.update(
                    mem_clock_mhz=clk,
                    bus_width_bits=bus,
                    peak_gbs=round(clk * 1e6 * 2 * bus / 8 / 1e9, 1),
                    peak_source="nvml",
                )
            except Exception:  # older drivers lack the bus width
                pass
            out[i] = g
    except Exception:
        pass
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return out


# ------------------------------------------------------------------------------------------ imports


class Imports:
    """The imports layer: the modules, the extension modules (imported, else loaded directly) and the
    --libs files; ``state`` says what loaded and what needs a driver absent here."""

    def __init__(self, a, torch, cuda_ok):
        self.torch, self.cuda_ok = torch, cuda_ok
        self.direct_libs = [p for p in a.libs.split(",") if p]
        self.ext_files = dict(x.split("=", 1) for x in a.ext_files.split(",") if "=" in x)
        self.state = {"no_driver": [], "loaded": {}, "vllm_stack": True}

    def imp(self, mod):
        try:
            m = importlib.import_module(mod)
        except Exception as e:
            text = f"{type(e).__name__}: {e}".splitlines()[0][:400]
            if mod == "vllm":
                self.state["vllm_stack"] = False
            if mod == "vllm" and self.direct_libs:
                return (
                    "skip",
                    f"{text}: vLLM's Python stack is not installed here; its extension libraries "
                    f"are loaded directly below (--libs)",
                    {},
                )
            if "libcuda.so" in text and not self.cuda_ok:
                return "skip", "needs the NVIDIA driver (libcuda.so.1), absent here", {}, "no-driver"
            return "fail", text, {}, classify(text) or ("xformers-missing" if mod == "xformers" else None)
        info = {"version": str(getattr(m, "__version__", "")), "file": getattr(m, "__file__", "")}
        if mod == "xformers":
            # xformers imports even when its C++/CUDA library does not load (built for another torch):
            # it only logs a warning, and every attention call then fails
            broken = xformers_load_error(m)
            if broken:
                return "fail", broken, info, "xformers-torch-mismatch"
        return "pass", info["version"], info

    def load_library(self, path, name):
        """torch.ops.load_library; None when loaded, else the check's (status, reason, metrics, id)."""
        try:
            self.torch.ops.load_library(path)
        except Exception as e:  # reported as the check's result
            text = _why(e)
            if "libcuda.so" in text and not self.cuda_ok:
                self.state["no_driver"].append(name)
                return "skip", "needs the NVIDIA driver (libcuda.so.1), absent here", {}, "no-driver"
            return "fail", text, {"file": path}, classify(text)
        return None

    def load(self, ext):
        before = _op_names(self.torch)
        how = "import"
        try:
            if not self.state["vllm_stack"] and ext.startswith("vllm.") and ext in self.ext_files:
                raise ImportError("vllm does not import")
            m = importlib.import_module(ext)
            f = getattr(m, "__file__", "")
        except Exception as err:
            if ext not in self.ext_files:
                text = f"{type(err).__name__}: {err}".splitlines()[0][:400]
                if "libcuda.so" in text and not self.cuda_ok:
                    self.state["no_driver"].append(ext)
                    return (
                        "skip",
                        "needs the NVIDIA driver (libcuda.so.1), absent here: load it on a GPU machine",
                        {},
                        "no-driver",
                    )
                raise
            f, how = self.ext_files[ext], "torch.ops.load_library (vllm's Python package not importable)"
            refused = self.load_library(f, ext)
            if refused:
                return refused
        added = sorted(_op_names(self.torch) - before)
        self.state["loaded"][ext] = f
        return (
            "pass",
            f"{how}: {len(added)} ops registered",
            {"file": f, "how": how, "ops_added": len(added), "namespaces": _namespaces(added)},
        )

    def direct(self, path):
        before = _op_names(self.torch)
        refused = self.load_library(path, path)
        if refused:
            return refused
        added = sorted(_op_names(self.torch) - before)
        self.state["loaded"][path] = path
        return (
            "pass",
            f"torch.ops.load_library: {len(added)} ops registered",
            {"file": path, "ops_added": len(added), "namespaces": _namespaces(added)},
        )


def layer_imports(rep, a, torch, cuda_ok):
    im = Imports(a, torch, cuda_ok)
    for mod in [m for m in a.imports.split(",") if m]:
        rep.check("imports", f"import {mod}", lambda mod=mod: im.imp(mod))
    exts = [m for m in a.extensions.split(",") if m]
    for ext in exts + [e for e in im.ext_files if e not in exts]:
        rep.check("imports", f"load {ext}", lambda ext=ext: im.load(ext))
    for path in im.direct_libs:
        rep.check("imports", f"load {os.path.basename(path)}", lambda path=path: im.direct(path))
    return im.state


def _why(e):
    """The error text of a failed load, with the loader's own message (torch wraps it in 'Could not load')."""
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause) not in text:
        text += f" ({str(cause).splitlines()[0]})"
    return text[:500]


def _op_names(torch):
    fn = getattr(torch._C, "_dispatch_get_all_op_names", None)
    if fn is not None:
        return set(fn())
    return {str(s.name) for s in torch._C._jit_get_all_schemas()}


def _namespaces(names):
    out = {}
    for n in names:
        ns = n.split("::")[0]
        out[ns] = out.get(ns, 0) + 1
    return out


# ------------------------------------------------------------------------------------------ kernels


class Ctx:
    def __init__(self, torch, device, dtype_name):
        self.torch = torch
        self.device = device
        self.dt = dtype_name
        self.dtype = getattr(torch, dtype_name)
        self.g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(self, *shape, dtype=None, scale=1.0):
        t = self.torch.randn(*shape, generator=self.g) * scale
        return t.to(device=self.device, dtype=dtype or self.dtype)

    def empty(self, *shape, dtype=None):
        return self.torch.empty(*shape, device=self.device, dtype=dtype or self.dtype)

    def zeros(self, *shape, dtype=None):
        return self.torch.zeros(*shape, device=self.device, dtype=dtype or self.dtype)


def ref_rms_norm(x, w, eps):
    xf = x.float()
    var = xf.pow(2).mean(-1, keepdim=True)
    return (xf * (var + eps).rsqrt()).to(x.dtype) * w


def _strided(c, rows, cols):
    """A (rows, cols) view whose rows are not contiguous (stride(0) = 2 * cols): as from a fused
    projection."""
    return c.rnd(rows, 2 * cols)[:, :cols]


# Each op: a generator of cases.  A case = (description, provided args by name (aliases welcome), compare(),
# flags)
# where compare() -> list of (got, ref, tolerance kind) after the op ran.  flags: "strided" (a layout case).


def cases_rms_norm(c):
    for rows, hidden, strided in [(1, 8, False), (7, 4097, False), (33, 1024, False), (5, 1000, True)]:
        x = _strided(c, rows, hidden) if strided else c.rnd(rows, hidden)
        w = c.rnd(hidden)
        out = c.empty(rows, hidden)
        ref = ref_rms_norm(x, w, 1e-6)
        yield (
            f"{rows}x{hidden}{' strided' if strided else ''}",
            {"result": out, "out": out, "input": x, "weight": w, "epsilon": 1e-6, "eps": 1e-6},
            lambda out=out, ref=ref: [(out, ref, "dtype")],
            strided,
        )


def cases_fused_add_rms_norm(c):
    torch = c.torch
    for rows, hidden, strided in [(1, 8, False), (7, 4097, False), (33, 1024, False), (5, 1000, True)]:
        x = _strided(c, rows, hidden) if strided else c.rnd(rows, hidden)
        r, w = c.rnd(rows, hidden), c.rnd(hidden)
        ref_r = (x.float() + r.float()).to(c.dtype)
        ref = ref_rms_norm(ref_r, w, 1e-6)
        yield (
            f"{rows}x{hidden}{' strided' if strided else ''}",
            {"input": x, "residual": r, "weight": w, "epsilon": 1e-6, "eps": 1e-6},
            lambda x=x, r=r, ref=ref, ref_r=ref_r: [(torch.cat([x, r]), torch.cat([ref, ref_r]), "dtype")],
            strided,
        )


def _act_cases(c, fn):
    torch = c.torch
    for shape, strided in [
        ((1, 8), False),
        ((7, 4097), False),
        ((33, 1024), False),
        ((2, 5, 96), False),
        ((6, 1000), True),
    ]:
        *lead, d = shape
        x = _strided(c, lead[0], 2 * d) if strided else c.rnd(*lead, 2 * d)
        out = c.empty(*lead, d)
        ref = fn(x[..., :d].float(), x[..., d:].float()).to(c.dtype)
        yield (
            f"{'x'.join(map(str, shape))}{' strided' if strided else ''}",
            {"result": out, "out": out, "input": x},
            lambda out=out, ref=ref: [(out, ref, "dtype")],
            strided,
        )
    del torch


def cases_silu_and_mul(c):
    F = c.torch.nn.functional
    return _act_cases(c, lambda a, b: F.silu(a) * b)


def cases_gelu_and_mul(c):
    F = c.torch.nn.functional
    return _act_cases(c, lambda a, b: F.gelu(a) * b)


def cases_gelu_tanh_and_mul(c):
    F = c.torch.nn.functional
    return _act_cases(c, lambda a, b: F.gelu(a, approximate="tanh") * b)


def _rope_ref(torch, positions, x, head_size, cache, is_neox):
    """vLLM's RotaryEmbedding.forward_native on x: [T, heads * head_size] (or [T, heads, head_size])."""
    T = positions.shape[0]
    rot = cache.shape[-1]
    xv = x.float().reshape(T, -1, head_size)
    cos, sin = cache.float()[positions].chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    xr, xp = xv[..., :rot], xv[..., rot:]
    if is_neox:
        x1, x2 = xr.chunk(2, dim=-1)
    else:
        x1, x2 = xr[..., ::2], xr[..., 1::2]
    o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    o = torch.cat((o1, o2), -1) if is_neox else torch.stack((o1, o2), -1).flatten(-2)
    return torch.cat((o, xp), -1).reshape(x.shape).to(x.dtype)


def cases_rotary_embedding(c):
    torch = c.torch
    for T, nh, nkv, hs, rot, neox, strided in [
        (7, 4, 2, 64, 64, True, False),
        (7, 4, 2, 64, 64, False, False),
        (33, 8, 1, 128, 64, True, False),
        (5, 4, 2, 96, 96, True, True),
        (5, 4, 2, 64, 64, False, True),
    ]:
        max_pos = 64
        inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
        cache = torch.cat((freqs.cos(), freqs.sin()), -1).to(device=c.device, dtype=c.dtype)
        pos = torch.randint(0, max_pos, (T,), generator=c.g).to(c.device)
        if strided:  # q and k as views of one fused qkv projection
            qkv = c.rnd(T, (nh + 2 * nkv) * hs)
            q, k = qkv[:, : nh * hs], qkv[:, nh * hs : (nh + nkv) * hs]
        else:
            q, k = c.rnd(T, nh * hs), c.rnd(T, nkv * hs)
        rq, rk = _rope_ref(torch, pos, q, hs, cache, neox), _rope_ref(torch, pos, k, hs, cache, neox)
        yield (
            f"T{T} h{nh}/{nkv} d{hs} rot{rot} {'neox' if neox else 'gptj'}{' qkv-views' if strided else ''}",
            {
                "positions": pos,
                "query": q,
                "key": k,
                "head_size": hs,
                "cos_sin_cache": cache,
                "is_neox": neox,
            },
            lambda q=q, k=k, rq=rq, rk=rk: [(q, rq, "dtype"), (k, rk, "dtype")],
            False,
        )


def _kv_inputs(c, T, nkv, hs, nb, bs):
    torch = c.torch
    kv = c.rnd(T, 2 * nkv * hs)  # key and value as views of one projection (strided rows)
    key, value = kv[:, : nkv * hs].view(T, nkv, hs), kv[:, nkv * hs :].view(T, nkv, hs)
    slots = torch.randperm(nb * bs, generator=c.g)[:T]
    slots[T // 2] = -1  # a padding token: must be skipped
    return key, value, slots.to(device=c.device, dtype=torch.int64)


def _kv_ref(c, key, slots, nslots):
    ref = c.torch.zeros(nslots, *key.shape[1:], device=c.device, dtype=key.dtype)
    ok = slots >= 0
    ref[slots[ok]] = key[ok]
    return ref


def cases_reshape_and_cache(c):
    torch = c.torch
    for T, nkv, hs, nb, bs in [(37, 4, 64, 8, 16), (5, 2, 128, 4, 16)]:
        key, value, slots = _kv_inputs(c, T, nkv, hs, nb, bs)
        x = 16 // key.element_size()
        kc, vc = c.zeros(nb, nkv, hs // x, bs, x), c.zeros(nb, nkv, hs, bs)
        one = torch.ones(1, device=c.device, dtype=torch.float32)

        def cmp(bound=(kc, vc, key, value, slots, nb, bs, nkv, hs)):
            kc, vc, key, value, slots, nb, bs, nkv, hs = bound
            gk = kc.permute(0, 3, 1, 2, 4).reshape(nb * bs, nkv, hs)
            gv = vc.permute(0, 3, 1, 2).reshape(nb * bs, nkv, hs)
            return [
                (gk, _kv_ref(c, key, slots, nb * bs), "exact"),
                (gv, _kv_ref(c, value, slots, nb * bs), "exact"),
            ]

        yield (
            f"T{T} kv-heads {nkv} d{hs} blocks {nb}x{bs} (strided k/v, one padding slot)",
            {
                "key": key,
                "value": value,
                "key_cache": kc,
                "value_cache": vc,
                "slot_mapping": slots,
                "kv_cache_dtype": "auto",
                "k_scale": one,
                "v_scale": one,
            },
            cmp,
            False,
        )


def cases_reshape_and_cache_flash(c):
    torch = c.torch
    for T, nkv, hs, nb, bs in [(37, 4, 64, 8, 16), (5, 2, 128, 4, 16)]:
        key, value, slots = _kv_inputs(c, T, nkv, hs, nb, bs)
        kc, vc = c.zeros(nb, bs, nkv, hs), c.zeros(nb, bs, nkv, hs)
        one = torch.ones(1, device=c.device, dtype=torch.float32)
        yield (
            f"T{T} kv-heads {nkv} d{hs} blocks {nb}x{bs} (strided k/v, one padding slot)",
            {
                "key": key,
                "value": value,
                "key_cache": kc,
                "value_cache": vc,
                "slot_mapping": slots,
                "kv_cache_dtype": "auto",
                "k_scale": one,
                "v_scale": one,
            },
            lambda kc=kc, vc=vc, key=key, value=value, slots=slots, n=nb * bs, nkv=nkv, hs=hs: [
                (kc.reshape(n, nkv, hs), _kv_ref(c, key, slots, n), "exact"),
                (vc.reshape(n, nkv, hs), _kv_ref(c, value, slots, n), "exact"),
            ],
            False,
        )


def cases_topk_softmax(c):
    torch = c.torch
    for M, E, k, renorm, strided in [
        (37, 8, 2, False, False),
        (37, 64, 6, True, False),
        (5, 60, 4, False, False),
        (9, 16, 2, True, True),
    ]:
        gating = _strided(c, M, E) if strided else c.rnd(M, E)
        w = torch.empty(M, k, device=c.device, dtype=torch.float32)
        idx = torch.empty(M, k, device=c.device, dtype=torch.int32)
        tei = torch.empty(M, k, device=c.device, dtype=torch.int32)
        probs = torch.softmax(gating.float(), dim=-1)

        def cmp(bound=(w, idx, probs, k, renorm, E), used=None):
            w, idx, probs, k, renorm, E = bound
            ref_w = probs.topk(k, dim=-1).values
            if renorm and (used is None or used.get("renormalize")):
                ref_w = ref_w / ref_w.sum(-1, keepdim=True)
            ii = idx.long()
            if bool(((ii < 0) | (ii >= E)).any()):
                raise AssertionError(f"topk indices out of range [0, {E})")
            if bool((ii.sort(-1).values.diff(dim=-1) == 0).any()):
                raise AssertionError("repeated expert index in a row")
            picked = probs.gather(1, ii)
            if renorm and (used is None or used.get("renormalize")):
                picked = picked / picked.sum(-1, keepdim=True)
            return [(w.sort(-1, descending=True).values, ref_w, "softmax"), (w, picked, "softmax")]

        yield (
            f"{M}x{E} top{k}{' renormalize' if renorm else ''}{' strided' if strided else ''}",
            {
                "topk_weights": w,
                "topk_indices": idx,
                "topk_ids": idx,
                "token_expert_indices": tei,
                "gating_output": gating,
                "renormalize": renorm,
            },
            cmp,
            strided,
        )


FP8_MAX = 448.0
FIRST_CALL_MS = 100.0  # a first launch above this: PTX JIT (or a very cold module load)


def _fp8_ref(torch, x, scale):
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def cases_static_scaled_fp8_quant(c):
    torch = c.torch
    for M, N, strided in [(1, 16, False), (37, 1001, False), (64, 4096, False), (6, 512, True)]:
        x = _strided(c, M, N) if strided else c.rnd(M, N, scale=4.0)
        scale = torch.tensor([0.02], device=c.device, dtype=torch.float32)
        out = torch.empty(M, N, device=c.device, dtype=torch.float8_e4m3fn)
        ref = _fp8_ref(torch, x, scale)
        yield (
            f"{M}x{N}{' strided' if strided else ''}",
            {"result": out, "out": out, "input": x, "scale": scale},
            lambda out=out, ref=ref: [(out, ref, "fp8")],
            strided,
        )


def cases_dynamic_scaled_fp8_quant(c):
    torch = c.torch
    for M, N, strided in [(1, 16, False), (37, 1001, False), (64, 4096, False), (6, 512, True)]:
        x = _strided(c, M, N) if strided else c.rnd(M, N, scale=4.0)
        scale = torch.zeros(1, device=c.device, dtype=torch.float32)
        out = torch.empty(M, N, device=c.device, dtype=torch.float8_e4m3fn)
        ref_scale = (x.float().abs().max() / FP8_MAX).reshape(1)
        ref = _fp8_ref(torch, x, ref_scale)
        yield (
            f"{M}x{N}{' strided' if strided else ''}",
            {"result": out, "out": out, "input": x, "scale": scale},
            lambda out=out, ref=ref, scale=scale, ref_scale=ref_scale: [
                (scale, ref_scale, "scale"),
                (out, ref, "fp8"),
            ],
            strided,
        )


# name -> (namespaces to look in, cases, needs fp8, dtypes)
OPS = {
    "rms_norm": (("_C",), cases_rms_norm, False),
    "fused_add_rms_norm": (("_C",), cases_fused_add_rms_norm, False),
    "silu_and_mul": (("_C",), cases_silu_and_mul, False),
    "gelu_and_mul": (("_C",), cases_gelu_and_mul, False),
    "gelu_tanh_and_mul": (("_C",), cases_gelu_tanh_and_mul, False),
    "rotary_embedding": (("_C",), cases_rotary_embedding, False),
    "reshape_and_cache": (("_C_cache_ops", "_C"), cases_reshape_and_cache, False),
    "reshape_and_cache_flash": (("_C_cache_ops", "_C"), cases_reshape_and_cache_flash, False),
    "topk_softmax": (("_moe_C", "_C"), cases_topk_softmax, False),
    "static_scaled_fp8_quant": (("_C",), cases_static_scaled_fp8_quant, True),
    "dynamic_scaled_fp8_quant": (("_C",), cases_dynamic_scaled_fp8_quant, True),
}
MEMORY_BOUND = ("rms_norm", "fused_add_rms_norm", "silu_and_mul", "gelu_and_mul", "static_scaled_fp8_quant")


def op_schema(torch, qual):
    ns, name = qual.split("::")
    try:
        return getattr(getattr(torch.ops, ns), name).default._schema
    except Exception:  # an op with overloads only: ask the JIT registry
        schemas = torch._C._jit_get_schemas_for_operator(qual)
        return schemas[0] if schemas else None


def fit_schema(schema, provided):
    """(kwargs, unknown required args, optional args passed as None) for calling the op by name."""
    kwargs, unknown, nones = {}, [], []
    for a in schema.arguments:
        t = str(a.type)
        if a.name in provided:
            v = provided[a.name]
            if t == "float" and hasattr(v, "item"):
                v = float(v.item())
            kwargs[a.name] = v
        elif a.has_default_value():
            continue
        elif t.startswith("Optional[") or t.endswith("?"):
            kwargs[a.name] = None
            nones.append(a.name)
        else:
            unknown.append(f"{a.name}: {t}")
    return kwargs, unknown, nones


def compare(torch, got, ref, kind, dt):
    """(ok, max abs error, worst error / tolerance, detail) of one output against its reference."""
    if got.shape != ref.shape:
        return False, float("inf"), float("inf"), f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
    g, r = got.float(), ref.float()
    err = (g - r).abs()
    if kind == "exact":
        bound = torch.zeros_like(r)
    elif kind == "softmax":
        bound = 1e-5 + 1e-3 * r.abs()
    elif kind == "scale":
        bound = 1e-7 + 1e-5 * r.abs()
    elif kind == "fp8":  # one e4m3 step (3 mantissa bits) for values on a rounding boundary
        bound = 2.0**-9 + 0.125 * r.abs()
    else:
        rtol, atol = TOL[dt]
        bound = atol + rtol * r.abs()
    bad = ~(err <= bound)
    worst = float(err.max()) if err.numel() else 0.0
    ratio = float((err / bound.clamp_min(1e-30)).max()) if err.numel() else 0.0
    detail = ""
    if kind == "fp8":
        mism = int((g != r).sum())
        detail = f"{mism} of {g.numel()} differ by one fp8 step"
        if mism > max(2, g.numel() // 100):
            return False, worst, ratio, detail
    return not bool(bad.any()), worst, ratio, detail


def sync(torch, device):
    if device == "cuda":
        torch.cuda.synchronize()


def _registered_ops(torch, required):
    """(the ops of the vLLM namespaces registered, {op: its qualified name} for the ops checkable here)."""
    names = _op_names(torch)
    registered = {}
    for op, (nss, _cases, _fp8) in OPS.items():
        for ns in nss:
            if f"{ns}::{op}" in names:
                registered[op] = f"{ns}::{op}"
                break
    for op in required:
        if op not in registered and op not in OPS:
            for ns in OP_NAMESPACES:
                if f"{ns}::{op}" in names:
                    registered[op] = f"{ns}::{op}"
    return sorted(n for n in names if n.split("::")[0] in OP_NAMESPACES), registered


def _discovered(ours, registered, state):
    if not ours and state["no_driver"]:
        return (
            "skip",
            f"{', '.join(state['no_driver'])} not loadable without a driver: no ops to list",
            {},
        )
    status = "pass" if ours else "fail"
    return (
        status,
        f"{len(ours)} ops in {', '.join(f'{k} ({v})' for k, v in _namespaces(ours).items()) or 'none'}"
        f"; checkable here: {', '.join(sorted(registered)) or 'none'}",
        {
            "registered": len(ours),
            "namespaces": _namespaces(ours),
            "checkable": sorted(registered),
            "not_in_this_build": sorted(set(OPS) - set(registered)),
        },
    )


def _unregistered(op, state):
    """The check of a required op that is not registered."""
    why = (
        f"{', '.join(state['no_driver'])} not loadable without a driver"
        if state["no_driver"]
        else f"torch.ops.{'/'.join(OPS.get(op, (OP_NAMESPACES,))[0])}.{op} is not registered"
    )
    return lambda: ("skip" if state["no_driver"] else "fail", why, {})


class Kernels:
    """The kernels layer's state: where ops run, the GPU's compute capability and each op's first call."""

    def __init__(self, rep, a, torch, device, run_kernels, out):
        self.rep, self.a, self.torch, self.device = rep, a, torch, device
        self.run_kernels, self.out = run_kernels, out
        self.cc = torch.cuda.get_device_capability() if (device == "cuda" and run_kernels) else None
        self.first_calls = {}

    def skip(self, dt, needs_fp8):
        """Why this dtype's kernel is not run here (a check's result), or None: it runs."""
        torch, device, cc = self.torch, self.device, self.cc
        if self.rep.broken and device == "cuda":
            return "skip", f"the CUDA context is broken by an earlier failure ({self.rep.broken})", {}
        if not self.run_kernels:
            return "skip", "no GPU: kernel not run", {}
        if needs_fp8 and (device != "cuda" or cc < (8, 9)):
            why = (
                "fp8 kernels run on a GPU"
                if device != "cuda"
                else f"fp8 needs compute capability >= 8.9 (this GPU: {cc[0]}.{cc[1]})"
            )
            return "skip", why, {}
        if needs_fp8 and not hasattr(torch, "float8_e4m3fn"):
            return "skip", "this torch has no float8_e4m3fn", {}
        if device == "cuda" and dt == "bfloat16" and cc[0] < 8:
            return "skip", "bf16 needs compute capability >= 8.0", {}, "bf16-unsupported"
        return None

    def check_op(self, op, qual):
        _nss, gen, needs_fp8 = OPS[op]
        schema = op_schema(self.torch, qual)
        for dt in DTYPES:
            name = f"{op} {dt} ({self.device})"
            skipped = self.skip(dt, needs_fp8)
            if skipped is not None:
                self.rep.check("kernels", name, lambda skipped=skipped: skipped)
                continue
            run = OpRun(self, op, qual, dt, schema, first=op not in self.first_calls)
            self.rep.check("kernels", name, lambda run=run, gen=gen: run.run(gen))


_REFUSED = object()  # a case the kernel refused (a strided layout): the next one is tried


class OpRun:
    """One op in one dtype against its reference, case by case."""

    def __init__(self, k, op, qual, dt, schema, first):
        self.k, self.op, self.qual, self.dt, self.schema, self.first = k, op, qual, dt, schema, first
        self.worst, self.ratio, self.ncase = 0.0, 0.0, 0
        self.refused, self.notes, self.nones, self.strided_wrong = [], [], set(), []

    def run(self, gen):
        torch = self.k.torch
        c = Ctx(torch, self.k.device, self.dt)
        fn = getattr(getattr(torch.ops, self.qual.split("::")[0]), self.op)
        for desc, provided, cmp, strided in gen(c):
            res = self.case(fn, desc, provided, cmp, strided)
            if res is not None:
                return res
        return self.result()

    def case(self, fn, desc, provided, cmp, strided):
        """One case: None when it passed (or its strided layout was refused), else the check's result."""
        schema, dt = self.schema, self.dt
        kwargs, unknown, none = fit_schema(schema, provided)
        if unknown:
            return (
                "skip",
                f"schema {schema} has arguments the checker does not know: {', '.join(unknown)}",
                {"schema": str(schema)},
            )
        self.nones.update(none)
        called = self.call(fn, kwargs, desc, strided)
        if called is _REFUSED:
            return None
        if called is not None:
            return called
        try:
            pairs = cmp(used=kwargs) if "used" in cmp.__code__.co_varnames else cmp()
            results = [(compare(self.k.torch, got, ref, kind, dt), kind) for got, ref, kind in pairs]
        except AssertionError as e:
            if strided:
                self.strided_wrong.append(f"{desc}: {e}")
                return None
            return "fail", f"{desc}: {e}", {}
        bad = [(res, kind) for res, kind in results if not res[0]]
        if bad and strided:
            # a layout vLLM does not pass to this op: the kernel assumes contiguous rows (a note)
            self.strided_wrong.append(f"{desc}: max abs err {bad[0][0][1]:.3g}")
            return None
        if bad:
            (_ok, err, r, detail), kind = bad[0]
            return (
                "fail",
                f"{desc}: max abs error {err:.3g} over tolerance ({kind}) {detail}",
                {"max_abs_err": err, "tol_ratio": r, "schema": str(schema)},
            )
        self.ncase += 1
        for (_ok, err, r, detail), _kind in results:
            self.worst, self.ratio = max(self.worst, err), max(self.ratio, r)
            if detail and not detail.startswith("0 of"):
                self.notes.append(f"{desc}: {detail}")
        return None

    def call(self, fn, kwargs, desc, strided):
        """The kernel called: None when it ran, _REFUSED, or a check's result (it cannot run here)."""
        k = self.k
        torch, device = k.torch, k.device
        sync(torch, device)
        t0 = time.perf_counter()
        try:
            fn(**kwargs)
            sync(torch, device)
        except Exception as e:
            text = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            if NO_KERNEL.search(str(e)):
                pred = " (predicted by the binary layer)" if k.a.predicted_no_kernel else ""
                return "fail", f"{desc}: {text}{pred}", {}, "no-kernel-image"
            if STICKY.search(str(e)):
                k.rep.broken = text
                raise
            if strided and BAD_LAYOUT.search(str(e)):
                self.refused.append(desc)
                return _REFUSED
            if BAD_DTYPE.search(str(e)) and not self.ncase:
                return "skip", f"this build's kernel does not take {self.dt}: {text}", {}
            raise
        if self.first and self.ncase == 0 and device == "cuda":
            k.first_calls[self.op] = round((time.perf_counter() - t0) * 1000, 2)
        return None

    def result(self):
        op, dt, ncase, refused, strided_wrong = self.op, self.dt, self.ncase, self.refused, self.strided_wrong
        m = {
            "max_abs_err": self.worst,
            "tol_ratio": round(self.ratio, 4),
            "cases": ncase,
            "schema": str(self.schema),
        }
        if dt in TOL:
            m["rtol"], m["atol"] = TOL[dt]
        for key, value in (("refused_strided", refused), ("optional_args_none", sorted(self.nones)),
                           ("notes", self.notes[:6]), ("strided_unsupported", strided_wrong)):
            if value:
                m[key] = value
        if op in self.k.first_calls and self.first:
            m["first_call_ms"] = self.k.first_calls[op]
        if not ncase:
            return "skip", f"every case refused: {refused or strided_wrong}", m
        checked = self.k.out["ops"]["checked"]
        if op not in checked:
            checked.append(op)
        extra = f"; strided input refused ({len(refused)})" if refused else ""
        if strided_wrong:
            extra += ("; strided input not supported (the kernel assumes contiguous rows, as vLLM "
                      "passes them)")
        return "pass", f"max abs err {self.worst:.2e} over {ncase} cases{extra}", m


def layer_kernels(k, state):
    """Every checkable op against its reference (``k``: where and how they run); each op's first call."""
    rep, a, torch, out = k.rep, k.a, k.torch, k.out
    required = [o for o in a.ops.split(",") if o]
    ours, registered = _registered_ops(torch, required)
    out["ops"] = {
        "registered": len(ours),
        "namespaces": _namespaces(ours),
        "known": sorted(registered),
        "checked": [],
    }
    rep.check("kernels", "ops discovered", lambda: _discovered(ours, registered, state))
    for op in list(OPS) + [o for o in required if o not in OPS]:
        if op not in registered:
            if op in required:
                rep.check("kernels", f"{op}", _unregistered(op, state))
            continue
        if op not in OPS:
            rep.check("kernels", f"{op}", lambda: ("skip", "no reference for this op in the checker", {}))
            continue
        k.check_op(op, registered[op])
    if "xformers" in sys.modules or _importable("xformers"):
        layer_xformers(rep, torch, k.device, k.run_kernels, k.cc)
    return k.first_calls


def _importable(mod):
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def xformers_load_error(module):
    """Why xformers' compiled library did not load (None when it did): its own exception, first lines."""
    exc = getattr(getattr(module, "_cpp_lib", None), "_cpp_library_load_exception", None)
    if exc is None:
        return None
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = " ".join(
        ln for ln in lines if not ln.startswith(("Please reinstall", "Memory-efficient", "Set XFORMERS"))
    )
    cause = exc.__cause__
    if cause is not None:
        text += f" ({type(cause).__name__}: {str(cause).splitlines()[0][:200] if str(cause) else ''})"
    return text[:500]


def layer_xformers(rep, torch, device, run_kernels, cc):
    F = torch.nn.functional
    broken = None
    try:
        import xformers

        broken = xformers_load_error(xformers)
    except Exception:  # the import check reports it
        pass
    if broken:
        for dt in ("float16", "bfloat16"):
            rep.check(
                "kernels",
                f"xformers memory_efficient_attention {dt} ({device})",
                lambda: (
                    "fail",
                    f"xformers' C++/CUDA library did not load: {broken}",
                    {},
                    "xformers-torch-mismatch",
                ),
            )
        return
    for dt in ("float16", "bfloat16"):
        name = f"xformers memory_efficient_attention {dt} ({device})"
        if not run_kernels or device != "cuda":
            rep.check("kernels", name, lambda: ("skip", "xformers attention is checked on a GPU", {}))
            continue
        if dt == "bfloat16" and cc[0] < 8:
            rep.check("kernels", name, lambda: ("skip", "bf16 needs compute capability >= 8.0", {}))
            continue

        def att(dt=dt):
            import xformers.ops as xops

            c = Ctx(torch, device, dt)
            worst = 0.0
            n = 0
            for B, M, H, K, causal in [(1, 7, 2, 64, False), (2, 33, 4, 128, True), (1, 100, 8, 80, False)]:
                q, k, v = c.rnd(B, M, H, K), c.rnd(B, M, H, K), c.rnd(B, M, H, K)
                bias = xops.LowerTriangularMask() if causal else None
                got = xops.memory_efficient_attention(q, k, v, attn_bias=bias)
                ref = F.scaled_dot_product_attention(
                    q.transpose(1, 2).float(),
                    k.transpose(1, 2).float(),
                    v.transpose(1, 2).float(),
                    is_causal=causal,
                ).transpose(1, 2)
                ok, err, _r, _d = compare(torch, got, ref.to(got.dtype), "dtype", dt)
                worst = max(worst, err)
                n += 1
                if not ok:
                    return (
                        "fail",
                        f"B{B} M{M} H{H} K{K}: max abs error {err:.3g} vs SDPA",
                        {"max_abs_err": err},
                    )
            return (
                "pass",
                f"max abs err {worst:.2e} vs SDPA over {n} cases",
                {"max_abs_err": worst, "cases": n},
            )

        rep.check("kernels", name, att)


# -------------------------------------------------------------------------------------------- speed


def _timed(torch, fn, iters=20):
    """Seconds per call of ``fn`` on the GPU (3 warm-up calls, then ``iters`` timed by CUDA events)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters / 1e3


def _bandwidth(torch, fn, nb, peak, copy_gbs):
    """One op's effective bandwidth against the GPU's peak and a torch copy's (``copy_gbs["v"]``)."""
    sec = _timed(torch, fn)
    gbs = nb / sec / 1e9
    m = {
        "gbs": round(gbs, 1),
        "us": round(sec * 1e6, 1),
        "bytes": int(nb),
        "peak_gbs": peak,
        "copy_gbs": round(copy_gbs.get("v", 0), 1),
    }
    pct = 100 * gbs / peak if peak else None
    vs_copy = gbs / copy_gbs["v"] if copy_gbs.get("v") else None
    if pct is not None:
        m["pct_of_peak"] = round(pct, 1)
    if vs_copy is not None:
        m["vs_copy"] = round(vs_copy, 3)
    text = (
        f"{gbs:.0f} GB/s"
        + (f" = {pct:.0f}% of peak" if pct is not None else "")
        + (f", {vs_copy:.2f}x torch copy" if vs_copy else "")
    )
    if vs_copy is not None and vs_copy < 0.1:
        return "fail", f"ten times slower than a copy: {text}", m
    if vs_copy is not None and vs_copy < 0.3:
        m["warning"] = "slow"
        return "pass", f"warning: slow, {text}", m
    return "pass", text, m


def _first_call(first_calls, ptx_only):
    if not first_calls:
        return "skip", "no kernel ran", {}
    op, ms = max(first_calls.items(), key=lambda kv: kv[1])
    m = {
        "first_call_ms": first_calls,
        "slowest": op,
        "threshold_ms": FIRST_CALL_MS,
        "jit_cache_disabled": os.environ.get("CUDA_CACHE_DISABLE") == "1",
    }
    if ms > FIRST_CALL_MS:
        m["warning"] = "slow-first-call"
        why = (
            "the binary layer found PTX only for this GPU: JIT compilation"
            if ptx_only
            else "JIT compilation (no SASS for this GPU) or a cold module load"
        )
        return "pass", f"warning: {op} took {ms:.0f} ms on its first call: {why}", m
    return "pass", f"slowest first call: {op} {ms:.1f} ms (no JIT)", m


def layer_speed(rep, a, torch, out, first_calls):
    g = out["gpus"][0]
    p = torch.cuda.get_device_properties(0)
    peak, src = g.get("peak_gbs"), g.get("peak_source")
    if not peak and getattr(p, "memory_clock_rate", 0) and getattr(p, "memory_bus_width", 0):
        peak, src = round(p.memory_clock_rate * 1e3 * 2 * p.memory_bus_width / 8 / 1e9, 1), "torch properties"
    if not peak and a.peak_gbs:
        peak, src = a.peak_gbs, "harness (NVML)"
    dt = torch.bfloat16 if p.major >= 8 else torch.float16
    free = torch.cuda.mem_get_info()[0]
    rows, hidden = (8192, 8192) if free > 8 * 2**30 else (2048, 4096)
    nbytes = rows * hidden * 2
    names = _op_names(torch)
    x = torch.randn(rows, hidden, device="cuda", dtype=dt)
    y = torch.empty_like(x)
    copy_gbs = {}

    def copy():
        sec = _timed(torch, lambda: y.copy_(x))
        copy_gbs["v"] = 2 * nbytes / sec / 1e9
        m = {
            "gbs": round(copy_gbs["v"], 1),
            "peak_gbs": peak,
            "peak_source": src,
            "bytes": 2 * nbytes,
            "shape": [rows, hidden],
            "dtype": str(dt).replace("torch.", ""),
        }
        if peak:
            m["pct_of_peak"] = round(100 * copy_gbs["v"] / peak, 1)
        return (
            "pass",
            (
                f"torch copy {copy_gbs['v']:.0f} GB/s"
                + (
                    f" = {m['pct_of_peak']}% of peak {peak:.0f} GB/s ({src})"
                    if peak
                    else " (peak unknown: no NVML bus width, no torch properties)"
                )
            ),
            m,
        )

    rep.check("speed", "memory bandwidth: torch copy (reference)", copy)
    w = torch.randn(hidden, device="cuda", dtype=dt)
    half = torch.empty(rows, hidden // 2, device="cuda", dtype=dt)
    benches = {
        "rms_norm": (lambda: torch.ops._C.rms_norm(y, x, w, 1e-6), 2 * nbytes),
        "fused_add_rms_norm": (lambda: torch.ops._C.fused_add_rms_norm(y, x, w, 1e-6), 4 * nbytes),
        "silu_and_mul": (lambda: torch.ops._C.silu_and_mul(half, x), 1.5 * nbytes),
        "gelu_and_mul": (lambda: torch.ops._C.gelu_and_mul(half, x), 1.5 * nbytes),
    }
    if hasattr(torch, "float8_e4m3fn") and p.major * 10 + p.minor >= 89:
        q8 = torch.empty(rows, hidden, device="cuda", dtype=torch.float8_e4m3fn)
        sc = torch.tensor([0.02], device="cuda")
        benches["static_scaled_fp8_quant"] = (
            lambda: torch.ops._C.static_scaled_fp8_quant(q8, x, sc),
            1.5 * nbytes,
        )
    for op, (fn, nb) in benches.items():
        if f"_C::{op}" not in names or op not in out["ops"]["checked"]:
            continue

        rep.check("speed", f"bandwidth {op} ({str(dt).replace('torch.', '')}, {rows}x{hidden})",
                  lambda fn=fn, nb=nb: _bandwidth(torch, fn, nb, peak, copy_gbs))

    rep.check("speed", "first-call latency", lambda: _first_call(first_calls, a.ptx_only))


# --------------------------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--probe", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--imports", default="")
    ap.add_argument("--extensions", default="")
    ap.add_argument("--ops", default="")
    ap.add_argument("--libs", default="", help="extension libraries to load with torch.ops.load_library")
    ap.add_argument(
        "--ext-files",
        dest="ext_files",
        default="",
        help="module=file pairs: loaded directly when the module does not import",
    )
    ap.add_argument("--predicted-no-kernel", dest="predicted_no_kernel", default="")
    ap.add_argument("--ptx-only", dest="ptx_only", default="", help="libraries with PTX only for this GPU")
    ap.add_argument("--no-speed", dest="speed", action="store_false")
    ap.add_argument("--peak-gbs", dest="peak_gbs", type=float, default=None)
    ap.add_argument("--driver", default=None)
    a = ap.parse_args()
    if a.probe:
        probe()
        return
    rep = Report()
    out = {
        "python": sys.executable,
        "python_version": platform.python_version(),
        "gpus": [],
        "checks": rep.checks,
        "layer_seconds": rep.layer_seconds,
    }
    t0 = time.perf_counter()
    try:
        import torch
    except Exception as e:  # reported as a failed check
        why = f"torch does not import: {e}"
        rep.check("environment", "torch", lambda: ("fail", why, {}, classify(why)))
        print(json.dumps(out))
        return
    rep.layer_seconds["environment"] = time.perf_counter() - t0  # the import of torch counts here
    device = "cuda" if a.device == "cuda" else "cpu"
    cuda_ok = layer_environment(rep, out, torch, device, a.driver)
    state = layer_imports(rep, a, torch, cuda_ok)
    rep.layer_seconds.setdefault("imports", 0.0)
    run_kernels = device == "cpu" or cuda_ok
    first_calls = layer_kernels(Kernels(rep, a, torch, device, run_kernels, out), state)
    if device == "cuda" and cuda_ok and a.speed and not rep.broken:
        layer_speed(rep, a, torch, out, first_calls)
    out["layer_seconds"] = {k: round(v, 3) for k, v in rep.layer_seconds.items()}
    print(json.dumps(clean(out)))


if __name__ == "__main__":
    main()
