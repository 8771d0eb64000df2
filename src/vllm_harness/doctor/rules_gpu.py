"""doctor's GPU rules: the driver against the variant's CUDA, the GPUs' compute capabilities against the
binaries
and the toolkit's archs, the wheels against the machine's platform (CPU arch, glibc, Jetson), the arch list
the
build is given.  The rules themselves are the feasibility judge's (facts/feasibility.py), which plan asks
too."""

from __future__ import annotations

from vllm_harness.doctor.model import RuleCtx, rule
from vllm_harness.doctor.pins import archs_for
from vllm_harness.facts import feasibility
from vllm_harness.facts.build_archs import given_archs


def _check_arch_list(ctx: RuleCtx) -> None:
    """The arch list the build will use (--arch, then [build] arch_list; TORCH_CUDA_ARCH_LIST in the shell
    when
    neither is given), checked by the build's own function (facts/build_archs.given_archs)."""
    if not ctx.source:
        return
    got = given_archs(
        ctx.variant.cuda,
        [
            (ctx.options.arch, "--arch"),
            (ctx.variant.build.get("arch_list"), "[build] arch_list"),
            (ctx.env.get("TORCH_CUDA_ARCH_LIST"), "TORCH_CUDA_ARCH_LIST"),
        ],
    )
    if got is None or not got[0].error:
        return
    chk, where = got
    ctx.add(
        "arch-unsupported-by-nvcc",
        "error",
        f"{where} vs nvcc {ctx.variant.cuda}",
        f"{where}: {chk.error}",
        chk.fix or f"change {where}",
    )


# ------------------------------------------------------------------------------------- the registry


@rule("platform: CPU arch, glibc, Jetson", ids=("torch-wheel-not-found", "torch-cpu-only"), order=5)
def platform(ctx: RuleCtx) -> None:
    ctx.judged(feasibility.platform_issues(ctx.data, ctx.profile, ctx.candidate, ctx.vf, ctx.tf))


@rule("NVIDIA driver vs CUDA", ids=("driver-too-old", "no-driver", "cuda-forward-compat"), order=10)
def driver(ctx: RuleCtx) -> None:
    ctx.judged(feasibility.driver_issues(ctx.data, ctx.profile, ctx.candidate, ctx.vf))


@rule(
    "GPUs vs the variant's binaries",
    ids=("no-kernel-image", "bf16-unsupported", "flash-attn-unsupported-gpu", "arch-unsupported-by-nvcc"),
    order=20,
)
def gpus(ctx: RuleCtx) -> None:
    tree = None
    if "cuda_archs" in ctx.pins and ctx.source:
        table, where = ctx.pins["cuda_archs"]
        cuda = ctx.variant.cuda
        tree = (archs_for(table, cuda), where)
    needs_xf = "xformers" in ctx.pins or (ctx.vf is not None and ctx.vf.xformers is not None)
    ctx.judged(feasibility.gpu_issues(ctx.data, ctx.profile, ctx.candidate, ctx.vf, ctx.tf, tree, needs_xf))


@rule("TORCH_CUDA_ARCH_LIST", ids=("arch-unsupported-by-nvcc",), order=30)
def arch_list(ctx: RuleCtx) -> None:
    _check_arch_list(ctx)
