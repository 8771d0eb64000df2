"""doctor's GPU rules: the driver against the variant's CUDA, the GPUs' compute capabilities against the binaries
and the toolkit's archs, the arch list the build is given."""
from __future__ import annotations

import re

from packaging.version import Version

from vllm_harness.doctor.model import _cite, _Ctx, _v, rule
from vllm_harness.doctor.pins import _archs_for
from vllm_harness.facts import compat as compat_mod
from vllm_harness.facts.compat import (
    CompatData,
    arch_list_runs_on,
    parse_arch_list,
    parse_cc,
)
from vllm_harness.facts.toolkit import (
    install_fix,  # how to get the newest of them on this machine's distribution
)

NVIDIA_DRIVER_DOCS = "https://www.nvidia.com/en-us/drivers/"


def _runtime_cuda(ctx: _Ctx, vf: compat_mod.VllmFacts | None) -> tuple[str, str]:
    """The CUDA the installed binaries need from the driver, and why."""
    cuda, why = ctx.variant.cuda, f"variant {ctx.variant.name} is CUDA {ctx.variant.cuda}"
    if not ctx.source and vf is not None and vf.wheel_cuda is not None and not ctx.variant.vllm.get("index_url"):
        w = str(vf.wheel_cuda.value)
        if Version(w) > Version(cuda):
            cuda, why = w, f"PyPI's vllm {ctx.vllm_version} wheel is built for CUDA {w}{_cite(vf.wheel_cuda)}"
    return cuda, why


def _check_driver(ctx: _Ctx, vf: compat_mod.VllmFacts | None) -> None:
    m, gpus = ctx.m, ctx.profile.get("gpu") or []
    driver, driver_cuda = m.get("driver"), m.get("driver_cuda")
    if not driver and not driver_cuda:
        if gpus:
            ctx.skipped("driver-too-old", "NVIDIA driver vs CUDA", "machine.driver")
            return
        arch_hint = ctx.variant.build.get("arch_list") or ""
        if ctx.source:
            can = "building is still possible" + (
                f" (arch_list = '{arch_hint}')" if arch_hint else
                " (set [build] arch_list, e.g. '7.5;8.9', to the GPUs it will run on; empty builds every arch "
                "the toolkit supports, which is slower)")
        else:
            can = "installing is still possible"
        ctx.add("no-driver", "warning", "NVIDIA GPU / driver",
                "no NVIDIA GPU or driver found (NVML and nvidia-smi; profile has no [[gpu]] and no machine.driver)",
                can + "; verifying needs a GPU: run verify on the GPU machine, or pass --allow-no-gpu. In a "
                "container, start it with --gpus all (NVIDIA Container Toolkit)")
        return
    need, why = _runtime_cuda(ctx, vf)
    cf = ctx.data.cuda(need)
    if cf is None:
        ctx.unknown("driver-too-old", "NVIDIA driver vs CUDA", f"CUDA {need} (its minimum driver)")
        return
    ok_newest = _newest_cuda_for(ctx.data, driver, driver_cuda)
    other = (f"or use a variant for CUDA {ok_newest} or older, which this driver runs" if ok_newest
             else "no CUDA version in the data runs on this driver")
    if driver:
        drv = _v(driver)
        dmin, cmin = Version(cf.driver_min.value), Version(cf.compat_driver_min.value)
        if drv is None:
            ctx.add("check-skipped", "info", "NVIDIA driver vs CUDA", f"driver version {driver!r} is not readable",
                    "check `nvidia-smi`", "driver-too-old")
            return
        if drv >= dmin:
            return
        if drv >= cmin and (driver_cuda is None or _v(driver_cuda).major == Version(need).major):
            ctx.add("driver-too-old", "warning", f"driver {driver} vs CUDA {need}",
                    f"{why}; its toolkit wants driver >= {cf.driver_min.value}{_cite(cf.driver_min)}; driver {driver} "
                    f"runs it only under minor-version compatibility (>= {cf.compat_driver_min.value}"
                    f"{_cite(cf.compat_driver_min)}): PTX newer than the driver cannot be JIT-compiled",
                    f"upgrade the driver to >= {cf.driver_min.value} ({NVIDIA_DRIVER_DOCS}), {other}")
            return
        evidence = (f"{why}; it needs driver >= {cf.driver_min.value}{_cite(cf.driver_min)} (>= "
                    f"{cf.compat_driver_min.value} with minor-version compatibility); this machine has driver {driver}"
                    + (f" (CUDA {driver_cuda})" if driver_cuda else ""))
    else:
        dc = _v(driver_cuda)
        if dc is None or dc >= Version(need):
            return
        if dc.major == Version(need).major:
            ctx.add("driver-too-old", "warning", f"driver (CUDA {driver_cuda}) vs CUDA {need}",
                    f"{why}; the driver supports CUDA {driver_cuda}: same major, so only minor-version "
                    f"compatibility (no JIT of newer PTX){_cite(cf.compat_driver_min)}",
                    f"upgrade the driver to >= {cf.driver_min.value}, {other}")
            return
        evidence = f"{why}; the driver supports CUDA {driver_cuda} only (needs >= {cf.driver_min.value}{_cite(cf.driver_min)})"
    ctx.add("driver-too-old", "error", f"driver {driver or ''} vs CUDA {need}".replace("  ", " "), evidence,
            f"upgrade the NVIDIA driver to >= {cf.driver_min.value} ({NVIDIA_DRIVER_DOCS}), {other}")
    # Forward compatibility could bridge a major gap, but only on data-center GPUs: elsewhere error 804.
    fwd = ctx.data.datacenter_fact()
    for g in gpus:
        dc = ctx.data.is_datacenter(g.get("name", ""))
        if dc is True:
            continue
        ctx.add("cuda-forward-compat", "warning" if not m.get("in_container") else "error",
                f"forward compatibility on {g.get('name', 'this GPU')}",
                f"the CUDA {need} runtime on driver {driver or driver_cuda} needs NVIDIA's forward-compatibility "
                f"package (cuda-compat, shipped in CUDA container images), which works only on data-center GPUs"
                f"{_cite(fwd)}; {g.get('name', 'this GPU')} is " + ("not one" if dc is False else "not known as one") +
                ": with cuda-compat on the library path CUDA fails with error 804 "
                "('forward compatibility was attempted on non supported HW')" +
                ("; this is a container, where images often put cuda-compat on LD_LIBRARY_PATH" if m.get("in_container") else ""),
                f"do not use cuda-compat on this GPU: upgrade the host driver to >= {cf.driver_min.value}, {other}")
        break


def _newest_cuda_for(data: CompatData, driver: str | None, driver_cuda: str | None) -> str | None:
    best = None
    for v in data.cuda_versions():
        cf = data.cuda(v)
        if driver and _v(driver) is not None:
            ok = _v(driver) >= Version(cf.driver_min.value)
        elif driver_cuda and _v(driver_cuda) is not None:
            ok = _v(driver_cuda) >= Version(v)
        else:
            ok = False
        if ok:
            best = v
    return best


def _gpu_ccs(ctx: _Ctx) -> list[tuple[dict, tuple[int, int]]]:
    out = []
    for g in ctx.profile.get("gpu") or []:
        cc = g.get("compute_capability")
        if not cc:
            ctx.skipped("no-kernel-image", f"GPU {g.get('name', '?')}", "gpu.compute_capability")
            continue
        out.append((g, parse_cc(cc)))
    return out


def _cc_str(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def _check_gpus(ctx: _Ctx, vf: compat_mod.VllmFacts | None, tf: compat_mod.TorchFacts | None) -> None:
    gpus = _gpu_ccs(ctx)
    if not gpus:
        return
    v = ctx.variant
    # torch wheels
    if v.torch.get("preinstalled"):
        ctx.add("check-skipped", "info", "torch kernels vs GPU",
                "torch is the interpreter's own (preinstalled = true): its arch list is not in the data",
                "run `invoke verify` after the build", "no-kernel-image")
    elif tf is None:
        ctx.unknown("no-kernel-image", "torch kernels vs GPU", f"torch {ctx.torch_version}")
    else:
        arch = tf.arch.get(v.cuda)
        if arch is None:
            ctx.unknown("no-kernel-image", "torch kernels vs GPU", f"the arch list of torch {ctx.torch_version}+{v.cuda_tag}")
        else:
            for g, cc in gpus:
                if not arch_list_runs_on(arch.value, cc):
                    ctx.add("no-kernel-image", "error", f"torch {ctx.torch_version}+{v.cuda_tag} on {g.get('name')}",
                            f"its wheels hold kernels for TORCH_CUDA_ARCH_LIST {arch.value}{_cite(arch)}; {g.get('name')} is "
                            f"compute capability {_cc_str(cc)} (no SASS of its major with a lower minor, no PTX below it)",
                            _arch_fix(ctx.data, cc, ctx.torch_version))
    # vLLM's own kernels
    cuda_for_vllm = v.cuda
    if not ctx.source and vf is not None and vf.wheel_cuda is not None:
        cuda_for_vllm = str(vf.wheel_cuda.value)
    if "cuda_archs" in ctx.pins and ctx.source:
        table, where = ctx.pins["cuda_archs"]
        supported, cite = _archs_for(table, cuda_for_vllm), f" [{where}]"
    elif vf is not None and vf.build_archs(cuda_for_vllm) is not None:
        f = vf.build_archs(cuda_for_vllm)
        supported, cite = f.value, _cite(f)
    else:
        supported, cite = None, ""
        ctx.unknown("no-kernel-image", "vLLM kernels vs GPU", f"the CUDA archs vLLM {ctx.vllm_version} builds")
    if supported is not None:
        built = [a for a, _ in parse_arch_list(supported)]
        for g, cc in gpus:
            if not any(a[0] == cc[0] and a[1] <= cc[1] for a in built):
                how = "its CMake builds" if ctx.source else "its wheel holds (the CMake list, assumed for the wheel)"
                ctx.add("no-kernel-image", "error", f"vLLM {ctx.vllm_version} kernels on {g.get('name')}",
                        f"{how} kernels for {supported} with CUDA {cuda_for_vllm}{cite}; {g.get('name')} is compute "
                        f"capability {_cc_str(cc)}",
                        "this GPU is below what this vLLM release supports: use an older vLLM release whose CMake "
                        "lists it (vLLM 0.6-0.16 build 7.0+), or another GPU")
    # nvcc targets (source builds)
    if ctx.source:
        cf = ctx.data.cuda(v.cuda)
        if cf is None:
            ctx.unknown("arch-unsupported-by-nvcc", "nvcc targets vs GPU", f"CUDA {v.cuda}")
        else:
            real = cf.sm_real()
            for g, cc in gpus:
                if not any(a[0] == cc[0] and a[1] <= cc[1] for a in real):
                    ctx.add("arch-unsupported-by-nvcc", "error", f"nvcc {v.cuda} vs {g.get('name')}",
                            f"nvcc {v.cuda} builds SASS for {', '.join(cf.sm.value)}{_cite(cf.sm)}; none runs on compute "
                            f"capability {_cc_str(cc)}",
                            _nvcc_fix(ctx.data, cc, ctx.m))
    # pre-Ampere: bf16 and FlashAttention
    old = [(g, cc) for g, cc in gpus if cc < (8, 0)]
    if old:
        names = ", ".join(f"{g.get('name')} ({_cc_str(cc)})" for g, cc in old)
        ctx.add("bf16-unsupported", "warning", "bfloat16 on pre-Ampere GPUs",
                f"{names}: bfloat16 needs compute capability >= 8.0",
                "serve with --dtype half (float16); verify's smoke tests use float16 on these GPUs")
        xf = "; keep xformers installed, vLLM uses its attention backend here" if _needs_xformers(ctx, vf) else ""
        ctx.add("flash-attn-unsupported-gpu", "warning", "FlashAttention on pre-Ampere GPUs",
                f"{names}: FlashAttention-2 needs compute capability >= 8.0",
                f"let vLLM pick another attention backend (do not force FLASH_ATTN){xf}")


def _needs_xformers(ctx: _Ctx, vf: compat_mod.VllmFacts | None) -> bool:
    return "xformers" in ctx.pins or (vf is not None and vf.xformers is not None)


def _arch_fix(data: CompatData, cc: tuple[int, int], torch_version: str) -> str:
    ok = []
    for tv in data.torch_versions():
        tf = data.torch(tv)
        for cuda, f in tf.arch.items():
            if arch_list_runs_on(f.value, cc):
                ok.append(f"{tv}+cu{cuda.replace('.', '')}")
    if not ok:
        return f"no torch release in the data has kernels for compute capability {_cc_str(cc)}"
    return f"choose a torch build with kernels for compute capability {_cc_str(cc)}, e.g. {', '.join(ok[-3:])}"


def _nvcc_fix(data: CompatData, cc: tuple[int, int], machine: dict | None = None) -> str:
    ok = [v for v in data.cuda_versions() if any(a[0] == cc[0] and a[1] <= cc[1] for a in data.cuda(v).sm_real())]
    if not ok:
        return f"no CUDA toolkit in the data targets compute capability {_cc_str(cc)}"
    fix = f"use a CUDA toolkit that targets compute capability {_cc_str(cc)}: {', '.join(ok)}"
    if machine is None:
        return fix
    return f"{fix} (a variant for it; then {install_fix(machine.get('os'), ok[-1], machine.get('arch'))})"


def _check_arch_list(ctx: _Ctx) -> None:
    if not ctx.source:
        return
    given = ctx.env.get("TORCH_CUDA_ARCH_LIST") or ctx.variant.build.get("arch_list") or ""
    where = "TORCH_CUDA_ARCH_LIST" if ctx.env.get("TORCH_CUDA_ARCH_LIST") else "[build] arch_list"
    if not given.strip():
        return
    cf = ctx.data.cuda(ctx.variant.cuda)
    if cf is None:
        return  # reported by _check_gpus / _check_toolkit
    allowed = set(cf.sm.value)
    bad = []
    for item in re.split(r"[;\s,]+", given.strip()):
        if not item:
            continue
        base = item.upper().replace("+PTX", "").lower()
        if base not in allowed:
            bad.append(item)
    if bad:
        ctx.add("arch-unsupported-by-nvcc", "error", f"{where} vs nvcc {ctx.variant.cuda}",
                f"{where} = '{given}' names {', '.join(bad)}, which nvcc {ctx.variant.cuda} cannot build "
                f"(it builds {', '.join(cf.sm.value)}){_cite(cf.sm)}",
                f"remove {', '.join(bad)} from {where}")


# ------------------------------------------------------------------------------------- the registry

@rule("NVIDIA driver vs CUDA", ids=("driver-too-old", "no-driver", "cuda-forward-compat"), order=10)
def driver(ctx: _Ctx) -> None:
    _check_driver(ctx, ctx.vf)


@rule("GPUs vs the variant's binaries", ids=("no-kernel-image", "bf16-unsupported", "flash-attn-unsupported-gpu",
                                             "arch-unsupported-by-nvcc"), order=20)
def gpus(ctx: _Ctx) -> None:
    _check_gpus(ctx, ctx.vf, ctx.tf)


@rule("TORCH_CUDA_ARCH_LIST", ids=("arch-unsupported-by-nvcc",), order=30)
def arch_list(ctx: _Ctx) -> None:
    _check_arch_list(ctx)
