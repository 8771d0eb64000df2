"""doctor's version rules: Python, torch and vLLM's pins against the compatibility data (and the source tree's
own pins), and the data's own age."""
from __future__ import annotations

import re

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from vllm_harness.doctor.model import RuleCtx, req_named, rule
from vllm_harness.doctor.pins import exact_pin
from vllm_harness.facts import compat as compat_mod
from vllm_harness.facts import feasibility_build
from vllm_harness.facts.compat import (
    CompatData,
    parse_cc,
)
from vllm_harness.facts.feasibility_model import cite


def _check_python(ctx: RuleCtx, vf: compat_mod.VllmFacts | None, tf: compat_mod.TorchFacts | None) -> None:
    """The feasibility judge's Python rule (facts/feasibility_build.py, plan asks it too), with this source
    tree's pins (its Python range, its CMake's)."""
    ctx.judged(feasibility_build.python_issues(ctx.data, ctx.profile, ctx.candidate, vf, tf, ctx.pins))


def _check_torch(ctx: RuleCtx, tf: compat_mod.TorchFacts | None) -> None:
    v = ctx.variant
    if v.torch.get("preinstalled"):
        return
    if tf is None:
        ctx.unknown("torch-wheel-not-found", f"torch {ctx.torch_version}", f"torch {ctx.torch_version}")
        return
    # local tags in the pins (torch==2.6.0+cu118)
    for req in req_named(v, "torch", ("torch",)):
        for s in req.specifier:
            m = re.search(r"\+(cu\d+)$", s.version)
            if m and m.group(1) != v.cuda_tag:
                ctx.add(
                    "cuda-torch-version-mismatch",
                    "error",
                    f"torch pin {req}",
                    f"the pin names the {m.group(1)} build; the variant is {v.cuda_tag}",
                    f"pin torch=={ctx.torch_version}+{v.cuda_tag} or change the variant's cuda",
                )
    index = v.torch.get("index_url")
    if index:
        m = re.search(r"/whl/(?:[a-z]+/)?(cu\d+)\b", index)
        if m and m.group(1) != v.cuda_tag:
            ctx.add(
                "cuda-torch-version-mismatch",
                "error",
                "torch index URL",
                f"index_url {index} serves {m.group(1)} builds; the variant is {v.cuda_tag}",
                f"use https://download.pytorch.org/whl/{v.cuda_tag}",
            )
        if v.cuda not in tf.cuda_variants.value:
            ctx.add(
                "torch-wheel-not-found",
                "error",
                f"torch {ctx.torch_version}+{v.cuda_tag}",
                f"torch {ctx.torch_version} is published for CUDA {', '.join(tf.cuda_variants.value)}"
                f"{cite(tf.cuda_variants)}, not {v.cuda}",
                f"pick a torch release built for CUDA {v.cuda}: " + _torch_for_cuda(ctx.data, v.cuda),
            )
    else:
        default = tf.pypi_default_cuda.value
        if default != v.cuda:
            has = v.cuda in tf.cuda_variants.value
            ctx.add(
                "cuda-torch-version-mismatch",
                "error",
                f"torch {ctx.torch_version} from PyPI",
                f"without index_url, PyPI's Linux wheel of torch {ctx.torch_version} is the CUDA "
                f"{default} build"
                f"{cite(tf.pypi_default_cuda)}; the variant says CUDA {v.cuda}",
                (
                    f'add index_url = "https://download.pytorch.org/whl/{v.cuda_tag}" to [torch]'
                    if has
                    else f'set cuda = "{default}" or pick a torch built for CUDA {v.cuda}: '
                         f'{_torch_for_cuda(ctx.data, v.cuda)}'
                ),
            )


def _torch_for_cuda(data: CompatData, cuda: str) -> str:
    vs = [tv for tv in data.torch_versions() if cuda in data.torch(tv).cuda_variants.value]
    return ", ".join(vs) if vs else f"none in the data for CUDA {cuda}"


def _check_torch_pin(ctx: RuleCtx, vf: compat_mod.VllmFacts | None) -> None:
    """vLLM's torch pin (the source tree's, else the data's) against the variant's torch."""
    v = ctx.variant
    if "torch" in ctx.pins:
        pin, cited = ctx.pins["torch"][0], f" [{ctx.pins['torch'][1]}]"
    elif vf is not None and vf.torch is not None:
        pin, cited = vf.torch.value, cite(vf.torch)
    else:
        pin, cited = None, ""
        if v.torch.get("preinstalled") is not True or ctx.source:
            ctx.unknown(
                "torch-api-mismatch",
                f"vLLM {ctx.vllm_version}'s torch",
                f"the torch pin of vLLM {ctx.vllm_version}",
            )
    if pin is not None and Version(pin).public != ctx.torch_version:
        tv, pv = Version(ctx.torch_version), Version(pin)
        same_minor = (tv.major, tv.minor) == (pv.major, pv.minor)
        others = _vllm_for_torch(ctx.data, ctx.torch_version)
        alt = f", or use a vLLM release that pins torch {ctx.torch_version} ({others})" if others else ""
        if ctx.source and ctx.probe_passed():
            ctx.add(
                "torch-api-mismatch",
                "warning",
                f"vLLM {ctx.vllm_version} source vs torch {ctx.torch_version}",
                f"the vLLM source expects torch {pin}{cited}; the variant installs {ctx.torch_version}, "
                f"but the "
                f"compile probe of this tree against torch {ctx.probe['torch']} passed "
                f"({ctx.probe.get('log')})",
                f'nothing to do unless the build fails; set [torch] version = "{pin}" to match the source',
            )
        elif ctx.source:
            ctx.add(
                "torch-api-mismatch",
                "warning" if same_minor else "error",
                f"vLLM {ctx.vllm_version} source vs torch {ctx.torch_version}",
                f"the vLLM source expects torch {pin}{cited}; the variant installs {ctx.torch_version}"
                + (
                    "; the C++ API is the same minor release (CMake only warns)"
                    if same_minor
                    else "; its C++ code uses the torch API of that release (e.g. "
                         "at::Tag::needs_fixed_stride_order)"
                ),
                f'set [torch] version = "{pin}" and its packages{alt}',
            )
        else:
            ctx.add(
                "dependency-conflict",
                "error",
                f"vllm=={ctx.vllm_version} vs torch {ctx.torch_version}",
                f"the vllm {ctx.vllm_version} wheel requires torch=={pin}{cited}; the variant installs "
                f"{ctx.torch_version}: pip fails (ResolutionImpossible) or replaces torch",
                f'set [torch] version = "{pin}" and its packages{alt}',
            )


def _check_xformers(ctx: RuleCtx, vf: compat_mod.VllmFacts | None) -> None:
    """xformers: built for the variant's torch, the one vLLM pins, there after a source build."""
    v = ctx.variant
    want = ctx.pins.get("xformers", (None, ""))[0] or (
        vf.xformers.value if vf is not None and vf.xformers else None
    )
    have = req_named(v, "xformers", ("post_install", "deps"))
    for req in have:
        xv = exact_pin(req)
        if xv is None:
            continue
        xf = ctx.data.xformers(xv)
        if xf is None:
            ctx.unknown("xformers-torch-mismatch", f"xformers {xv}", f"xformers {xv}")
        elif Version(xf.torch.value) != Version(ctx.torch_version):
            ctx.add(
                "xformers-torch-mismatch",
                "error",
                f"{req} vs torch {ctx.torch_version}",
                f"xformers {xv} is built for torch {xf.torch.value}{cite(xf.torch)}; the variant has "
                f"{ctx.torch_version}: "
                "pip would replace torch, or xformers fails to load",
                "use the xformers release built for torch "
                + ctx.torch_version
                + ": "
                + _xformers_for(ctx.data, ctx.torch_version),
            )
        if want and Version(want) != Version(xv):
            ctx.add(
                "dependency-conflict",
                "warning",
                f"{req} vs vLLM {ctx.vllm_version}",
                f"vLLM {ctx.vllm_version} pins xformers=={want}; the variant installs {xv}",
                f"install xformers=={want}",
            )
    if want and not have and ctx.source:
        gpus = [
            parse_cc(g["compute_capability"])
            for g in ctx.profile.get("gpu") or []
            if g.get("compute_capability")
        ]
        ctx.add(
            "xformers-missing",
            "warning",
            "xformers after a source build",
            f"vLLM {ctx.vllm_version} needs xformers=={want} at run time"
            + (" (its attention backend on pre-Ampere GPUs)" if any(cc < (8, 0) for cc in gpus) else "")
            + "; a --no-build-isolation source build does not always install it and the variant's "
            "[post_install] does not name it",
            f'add "xformers=={want}" to [post_install] packages with index_url = '
            f'"https://download.pytorch.org/whl/{v.cuda_tag}"',
        )


def _check_numpy(ctx: RuleCtx, vf: compat_mod.VllmFacts | None) -> None:
    """NumPy 1 vs 2 for the stack vLLM's modules were built against."""
    v = ctx.variant
    npf = vf.numpy if vf is not None else None
    np_tree = ctx.pins.get("numpy")
    np_reqs = req_named(v, "numpy", ("torch", "deps", "post_install"))
    pinned_lt2 = any(
        not r.specifier.contains("2.0.0", prereleases=True) and str(r.specifier) for r in np_reqs
    )
    needs1 = (np_tree is not None and not SpecifierSet(np_tree[0]).contains("2.0.0")) or (
        np_tree is None and npf is not None and npf.value in ("<2", "1-runtime")
    )
    if needs1 and not pinned_lt2:
        why = (
            f"{np_tree[1]}"
            if np_tree is not None and not SpecifierSet(np_tree[0]).contains("2.0.0")
            else (
                "vLLM pins numpy<2"
                if npf.value == "<2"
                else "modules of this stack are built against NumPy 1 (the source document hit it with "
                     "vLLM 0.8.5)"
            )
            + cite(npf)
        )
        ctx.add(
            "numpy-abi",
            "warning",
            f"NumPy for vLLM {ctx.vllm_version}",
            f"{why}; the variant does not pin numpy<2, so NumPy 2 may be installed ('A module that was "
            f"compiled "
            "using NumPy 1.x cannot be run in NumPy 2.x')",
            'add "numpy<2" to [deps] packages',
        )
    if npf is not None and npf.value == ">=2" and pinned_lt2:
        ctx.add(
            "dependency-conflict",
            "error",
            f"numpy<2 vs vLLM {ctx.vllm_version}",
            f"vLLM {ctx.vllm_version} needs NumPy 2{cite(npf)}; the variant pins numpy<2",
            "remove the numpy<2 pin from the variant",
        )


def _check_wheel_cuda(ctx: RuleCtx, vf: compat_mod.VllmFacts | None) -> None:
    """the vLLM wheel's CUDA against the variant's."""
    v = ctx.variant
    if not ctx.source and vf is not None and vf.wheel_cuda is not None and not v.vllm.get("index_url"):
        w = str(vf.wheel_cuda.value)
        if Version(w).major != Version(v.cuda).major:
            ctx.add(
                "cuda-runtime-lib-missing",
                "error",
                f"vllm {ctx.vllm_version} wheel (CUDA {w}) on CUDA {v.cuda}",
                f"PyPI's vllm {ctx.vllm_version} is built for CUDA {w}{cite(vf.wheel_cuda)} and loads "
                f"libcudart.so.{Version(w).major}; the variant's stack is CUDA {v.cuda}",
                f'build vLLM from source for CUDA {v.cuda} (mode = "source") or use a vLLM release '
                f'built for it',
            )


def _check_vllm_pins(ctx: RuleCtx, vf: compat_mod.VllmFacts | None) -> None:
    for check in (_check_torch_pin, _check_xformers, _check_numpy, _check_wheel_cuda):
        check(ctx, vf)


def _vllm_for_torch(data: CompatData, torch_version: str) -> str:
    return "; ".join(data.vllm_for_torch(torch_version))


def _xformers_for(data: CompatData, torch_version: str) -> str:
    return ", ".join(data.xformers_for_torch(torch_version)) or "none in the data"


COMPAT_OLD_DAYS = 60  # generated index data older than this gets an info finding


def _check_compat_staleness(ctx: RuleCtx) -> None:
    """A variant newer than the data: one ``compat-stale`` finding naming the refresh, instead of the
    ``compat-unknown`` warnings its gaps caused.  Old generated data: an info finding with its age."""
    data = ctx.data
    age = data.age_days() if hasattr(data, "age_days") else None
    when = (
        f"the index data was generated on {data.generated} ({age} day{'s' if age != 1 else ''} ago)"
        if age is not None
        else "no index data was generated yet (hand-kept data only)"
    )
    newer = []
    if hasattr(data, "newer_than_data"):
        if data.newer_than_data("vllm", ctx.vllm_version):
            newer.append(f"vLLM {ctx.vllm_version} (newest known {data.newest('vllm')})")
        if not ctx.variant.torch.get("preinstalled") and data.newer_than_data("torch", ctx.torch_version):
            newer.append(f"torch {ctx.torch_version} (newest known {data.newest('torch')})")
    if newer:
        ctx.findings = [f for f in ctx.findings if f.id != "compat-unknown"]
        ctx.add(
            "compat-stale",
            "warning",
            "compatibility data older than the variant",
            f"{' and '.join(newer)} is newer than the compatibility data; {when}: its torch pin, "
            f"Python range "
            "and wheels were not checked",
            f"run `{compat_mod.REFRESH_COMMAND}` (nox -s compat) to read them from the package index, then "
            "doctor again",
        )
    elif age is not None and age > COMPAT_OLD_DAYS:
        ctx.add(
            "compat-stale",
            "info",
            "age of the compatibility data",
            f"{when}; releases published since are unknown to doctor",
            f"run `{compat_mod.REFRESH_COMMAND}` (nox -s compat) when the package index is reachable",
        )


# ------------------------------------------------------------------------------------- the registry


@rule(
    "Python interpreter",
    ids=("python-unsupported", "torch-wheel-not-found", "python-headers-missing"),
    order=40,
)
def python(ctx: RuleCtx) -> None:
    _check_python(ctx, ctx.vf, ctx.tf)


@rule("torch release", ids=("torch-wheel-not-found", "cuda-torch-version-mismatch"), order=50)
def torch(ctx: RuleCtx) -> None:
    _check_torch(ctx, ctx.tf)


@rule(
    "vLLM's pins",
    ids=(
        "xformers-missing",
        "numpy-abi",
        "dependency-conflict",
        "torch-api-mismatch",
        "xformers-torch-mismatch",
        "cuda-runtime-lib-missing",
    ),
    order=60,
)
def vllm_pins(ctx: RuleCtx) -> None:
    _check_vllm_pins(ctx, ctx.vf)


@rule("compatibility data", ids=("compat-stale",), order=1000)  # last: it replaces the unknowns it explains
def compat_staleness(ctx: RuleCtx) -> None:
    _check_compat_staleness(ctx)
