"""One judge of what runs where (issue 28): (machine, candidate) -> runs / runs with warnings / runs after
fixes / cannot, each with its reasons and fixes.

doctor asks it for a variant (``candidate_of(variant)``), ``plan`` for every candidate it considers, and the
steps that need it (``bundle --machine``, the build's arch list) can ask the same functions: the driver, GPU
arch, platform (CPU architecture, manylinux glibc floor, Jetson) and toolkit rules live here and nowhere
else; the Python, host-compiler, cmake and disk rules in facts/feasibility_build.py, which ``judge`` calls
too (the model, :class:`Candidate` / :class:`Issue` / :class:`Verdict`, is facts/feasibility_model.py).
A rule returns :class:`Issue` s: a :class:`Finding` with the failure id doctor reports, plus whether the
error is one a fix on the machine removes (``fixable``: install a toolkit, add the PyTorch index for this
platform, upgrade the driver) or one that rules the candidate out.

The machine is a profile (machine-profile.md); the facts are the compatibility data (``compat.load()``) and
its per-platform table (``[platform.aarch64]``: PyPI's torch there, the PyTorch index's CUDA builds).
"""

from __future__ import annotations

import re

from packaging.version import Version

from vllm_harness.facts.compat import (
    CompatData,
    CudaFacts,
    Fact,
    TorchFacts,
    VllmFacts,
    arch_list_runs_on,
    parse_arch_list,
    parse_cc,
)
from vllm_harness.facts.feasibility_build import build_issues, python_issues
from vllm_harness.facts.feasibility_model import IDS as IDS
from vllm_harness.facts.feasibility_model import TIERS as TIERS
from vllm_harness.facts.feasibility_model import (
    Candidate,
    Issue,
    Verdict,
    cc_str,
    cite,
    make_issue,
    skipped,
    tier_of,
    unknown,
)
from vllm_harness.facts.feasibility_model import candidate_of as candidate_of
from vllm_harness.facts.feasibility_model import version_or_none as version_or_none
from vllm_harness.facts.toolkit import PYPI_EXTRAS, install_fix

NVIDIA_DRIVER_DOCS = "https://www.nvidia.com/en-us/drivers/"
PYTORCH_WHL = "https://download.pytorch.org/whl"


# ------------------------------------------------------------------------------------- machine facts

def cpu_arch(profile: dict) -> str | None:
    """'x86_64' / 'aarch64' (arm64 is aarch64), None when the profile does not say."""
    a = ((profile.get("machine") or {}).get("arch") or "").strip().lower()
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(a, a) or None


def is_jetson(profile: dict) -> bool:
    """A Jetson / L4T machine, or any integrated GPU: CUDA comes with the board's JetPack, not a dGPU
    driver."""
    m = profile.get("machine") or {}
    return bool(m.get("l4t") or m.get("jetson")) or any(g.get("integrated") for g in profile.get("gpu") or [])


def gpu_ccs(profile: dict) -> list[tuple[dict, tuple[int, int]]]:
    return [(g, parse_cc(g["compute_capability"])) for g in profile.get("gpu") or []
            if g.get("compute_capability")]


def sass_covers(archs: list[tuple[int, int]], cc: tuple[int, int]) -> bool:
    """Binaries with SASS for ``archs`` run on ``cc``: one of the same major and a minor <= the GPU's."""
    return any(a[0] == cc[0] and a[1] <= cc[1] for a in archs)


# --------------------------------------------------------------------------------- platform facts

_MANYLINUX_ALIAS = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def uv_python_platform(arch: str, glibc: str) -> str:
    """uv's --python-platform for ``arch`` with ``glibc`` ('x86_64-manylinux_2_28')."""
    major, minor = glibc.split(".")[:2]
    return f"{arch}-manylinux_{major}_{minor}"


def wheel_platforms(tags: list[str]) -> dict[str, Version | None]:
    """Wheel tags -> {cpu arch: the lowest glibc any of its Linux wheels needs} ('any' wheels: every arch)."""
    out: dict[str, Version | None] = {}
    for t in tags:
        plat = t.split("-")[-1]
        if plat == "any":
            out.setdefault("*", None)
            continue
        m = re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014|manylinux_(\d+)_(\d+)|linux)_(\w+)", plat)
        if not m:
            continue
        if m.group(1) in _MANYLINUX_ALIAS:
            floor = Version(".".join(map(str, _MANYLINUX_ALIAS[m.group(1)])))
        elif m.group(2):
            floor = Version(f"{m.group(2)}.{m.group(3)}")
        else:
            floor = None
        arch = m.group(4)
        old = out.get(arch, "none")
        out[arch] = floor if old == "none" or (floor is not None and old is not None and floor < old) else old
    return out


def manylinux_platforms(arch: str, glibc: str) -> list[str]:
    """The platform tags of the wheels that install on ``arch`` with ``glibc`` (best first): manylinux_2_N
    down to 2_5, the legacy aliases (the same table :func:`wheel_platforms` reads floors from), then
    linux_ARCH."""
    major, minor = (int(x) for x in glibc.split(".")[:2])
    out = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 4, -1)]
    out += [f"{alias}_{arch}"
            for alias, floor in sorted(_MANYLINUX_ALIAS.items(), key=lambda kv: kv[1], reverse=True)
            if floor[0] == major and floor[1] <= minor]
    return out + [f"linux_{arch}"]


def pypi_torch_cuda(data: CompatData, tf: TorchFacts, arch: str | None) -> tuple[str | None, Fact | None]:
    """The CUDA of PyPI's torch wheel on ``arch`` (None: a CPU-only build there), with the fact that says
    so: the index's reading of that platform's wheel, else the hand-kept [platform.<arch>]
    (CompatData.torch_pypi_cuda)."""
    f = ((data.torch_pypi_cuda(tf.version, arch) if arch and arch != "x86_64" else None)
         or tf.pypi_default_cuda)
    return (None if f.value == "cpu" else str(f.value)), f


def index_has_torch(data: CompatData, tf: TorchFacts, cuda: str, arch: str | None) -> bool:
    """download.pytorch.org/whl/cuXYZ has a CUDA build of this torch for ``arch``."""
    if cuda not in tf.cuda_variants.value:
        return False
    plat = data.platform(arch) if arch and arch != "x86_64" else {}
    if not plat:
        return True
    lo, cmin = plat.get("torch_index_from"), plat.get("torch_index_cuda_min")
    return (lo is None or Version(tf.version) >= Version(lo.value)) and (
        cmin is None or Version(cuda) >= Version(cmin.value))


def torch_arch(data: CompatData, tf: TorchFacts, cuda: str, arch: str | None) -> Fact | None:
    """TORCH_CUDA_ARCH_LIST of torch's CUDA ``cuda`` build for ``arch`` (aarch64's SBSA builds differ)."""
    plat = data.platform(arch) if arch and arch != "x86_64" else {}
    return plat.get("torch_arch") or tf.arch.get(cuda)


def _floor_issue(what: str, tags: list[str], arch: str, glibc: str | None, fact: Fact | None,
                 fix: str, glibc_fix: str) -> Issue | None:
    plats = wheel_platforms(tags)
    if "*" in plats:
        return None
    if arch not in plats:
        have = ", ".join(sorted(plats)) or "none"
        return make_issue("torch-wheel-not-found", "error", f"{what} on {arch}",
                      f"{what} publishes Linux wheels for {have} only{cite(fact)}; this machine is {arch}",
                      fix, "wheel-platform")
    floor, g = plats[arch], version_or_none(glibc)
    if floor is not None and g is not None and g < floor:
        return make_issue("torch-wheel-not-found", "error", f"{what} on glibc {glibc}",
                      f"{what}'s {arch} wheel is manylinux for glibc >= {floor}{cite(fact)}; this machine "
                      f"has glibc {glibc}: pip finds no wheel for it", glibc_fix, "wheel-glibc")
    return None


def platform_issues(data: CompatData, profile: dict, cand: Candidate, vf: VllmFacts | None,
                    tf: TorchFacts | None) -> list[Issue]:
    """The candidate's wheels against the machine's CPU architecture, glibc and board (Jetson)."""
    arch, m = cpu_arch(profile), profile.get("machine") or {}
    if arch is None:
        return []
    out: list[Issue] = []
    plat = data.platform(arch)
    if is_jetson(profile):
        jf = plat.get("jetson")
        board = m.get("jetson") or "this Jetson" + (f" (L4T r{m['l4t']})" if m.get("l4t") else "")
        jfix = (f"build vLLM from source (mode = \"source\") against NVIDIA's PyTorch for JetPack "
                f"(https://docs.nvidia.com/deeplearning/frameworks/install-pytorch-jetson-platform/) "
                f"installed in the interpreter, with [torch] preinstalled = true, and the JetPack CUDA "
                f"{m.get('driver_cuda') or cand.cuda} toolkit")
        if not cand.source and not cand.vllm_index:
            out.append(make_issue("torch-wheel-not-found", "error", f"PyPI's vllm {cand.vllm} on {board}",
                f"PyPI's aarch64 wheels are SBSA (server) builds; the integrated GPU of {board} runs "
                f"only JetPack's CUDA builds{cite(jf)}", jfix, "wheel-platform"))
        if not cand.torch_preinstalled:
            out.append(make_issue("torch-wheel-not-found", "error", f"torch {cand.torch} on {board}",
                f"torch from {cand.torch_index or 'PyPI'} is an SBSA (server) or CPU build{cite(jf)}; "
                f"{board} needs JetPack's build of torch", jfix, "wheel-platform", fixable=cand.source))
        else:
            out.append(make_issue("torch-wheel-not-found", "warning", f"JetPack's torch on {board}",
                f"the variant uses the interpreter's own torch (preinstalled = true); on {board} it "
                f"must be NVIDIA's build for this JetPack{cite(jf)}, which the profile does not record",
                f"install NVIDIA's PyTorch {cand.torch} for this JetPack (https://docs.nvidia.com/"
                "deeplearning/frameworks/install-pytorch-jetson-platform/) into the interpreter if it is "
                f"not there (vLLM {cand.vllm} pins torch {cand.torch}; another torch needs `invoke probe`)",
                "wheel-platform"))
        return out
    if not cand.source and not cand.vllm_index and vf is not None and vf.wheels is not None:
        newer = "build vLLM from source (mode = \"source\")"
        if arch != "x86_64":
            first = [r for r in data.vllm_releases()
                     if arch in wheel_platforms(list(data.vllm(r).wheels.value or []))]
            if first:
                newer += f", or use vLLM >= {first[0]} (the first with {arch} wheels)"
        i = _floor_issue(f"vllm {cand.vllm}", list(vf.wheels.value), arch, m.get("glibc"), vf.wheels, newer,
                         "use an older vLLM release whose wheels' manylinux floor this glibc meets, build "
                         "from source (mode = \"source\"), or run in a container with a newer glibc")
        if i is not None:
            out.append(i)
    if cand.torch_preinstalled or tf is None:
        return out
    if cand.torch_index is None:
        cuda, f = pypi_torch_cuda(data, tf, arch)
        if cuda is None:
            has = index_has_torch(data, tf, cand.cuda, arch)
            out.append(make_issue("torch-cpu-only", "error", f"torch {cand.torch} from PyPI on {arch}",
                f"PyPI's {arch} wheel of torch {cand.torch} is a CPU-only build{cite(f)}: vLLM would "
                "fail with 'Torch not compiled with CUDA enabled'",
                (f"add index_url = \"{PYTORCH_WHL}/{cand.cuda_tag}\" to [torch] (the PyTorch index for "
                 f"{arch}: its wheels are CUDA {cand.cuda} builds)") if has else
                (f"no CUDA {cand.cuda} build of torch {cand.torch} for {arch} is known: pick a torch "
                 f">= {plat['torch_index_from'].value if 'torch_index_from' in plat else '?'} on CUDA "
                 f">= {plat['torch_index_cuda_min'].value if 'torch_index_cuda_min' in plat else '?'}"),
                "torch-platform", fixable=has))
    elif arch != "x86_64" and not index_has_torch(data, tf, cand.cuda, arch):
        lo, cmin = plat.get("torch_index_from"), plat.get("torch_index_cuda_min")
        out.append(make_issue(
            "torch-wheel-not-found", "error", f"torch {cand.torch}+{cand.cuda_tag} on {arch}",
            f"the PyTorch index has {arch} CUDA wheels from torch {lo.value if lo else '?'} on, for CUDA "
            f">= {cmin.value if cmin else '?'}{cite(lo)}; torch {cand.torch}+{cand.cuda_tag} is not one",
            f"use torch >= {lo.value if lo else '?'} on CUDA >= {cmin.value if cmin else '?'}",
            "torch-platform"))
    if arch == "x86_64" and tf.wheels is not None:   # PyPI's tag; the index's builds of a release share it
        i = _floor_issue(f"torch {cand.torch}", list(tf.wheels.value), arch, m.get("glibc"), tf.wheels,
                         f"torch {cand.torch} has no {arch} wheel: use another torch",
                         "use an older torch (and the vLLM release that pins it), or run in a container with "
                         "a newer glibc (a newer OS)")
        if i is not None:
            out.append(i)
    return out


# -------------------------------------------------------------------------------------------- driver

def runtime_cuda(cand: Candidate, vf: VllmFacts | None) -> tuple[str, str]:
    """The CUDA the installed binaries need from the driver, and why."""
    cuda, why = cand.cuda, f"variant {cand.name} is CUDA {cand.cuda}"
    if not cand.source and vf is not None and vf.wheel_cuda is not None and not cand.vllm_index:
        w = str(vf.wheel_cuda.value)
        if Version(w) > Version(cuda):
            cuda, why = w, f"PyPI's vllm {cand.vllm} wheel is built for CUDA {w}{cite(vf.wheel_cuda)}"
    return cuda, why


def driver_status(data: CompatData, cuda: str, driver: str | None, driver_cuda: str | None,
                  integrated: bool = False) -> tuple[str, str]:
    """('ok' | 'minor-compat' | 'too-old' | 'none' | 'unknown', how): the one driver rule.  The driver's own
    minimum, else minor-version compatibility within the major; a Jetson's CUDA is its JetPack's."""
    cf = data.cuda(cuda)
    if cf is None:
        return "unknown", f"CUDA {cuda} is not in the data"
    dv, dc = version_or_none(driver), version_or_none(driver_cuda)
    if integrated and dc is not None:
        if (dc.major, dc.minor) == (Version(cuda).major, Version(cuda).minor):
            return "ok", f"JetPack's CUDA is {driver_cuda}"
        if dc < Version(cuda):
            return "too-old", f"JetPack's CUDA is {driver_cuda} (< {cuda})"
        return "other", (f"JetPack's CUDA is {driver_cuda}: a Jetson runs the CUDA of its L4T release, "
                         f"not {cuda}")
    if dv is not None:
        if dv >= Version(cf.driver_min.value):
            return "ok", f"driver {driver} >= {cf.driver_min.value}"
        cmin = version_or_none(cf.compat_driver_min.value)
        if cmin is not None and dv >= cmin and (dc is None or dc.major == Version(cuda).major):
            return "minor-compat", (f"driver {driver} runs CUDA {cuda} only under minor-version "
                                    f"compatibility (>= {cf.compat_driver_min.value}; no JIT of newer PTX)")
        return "too-old", f"driver {driver} too old (CUDA {cuda} needs >= {cf.driver_min.value})"
    if driver is not None:
        return "unknown", f"driver version {driver!r} is not readable"
    if dc is not None:
        if dc >= Version(cuda):
            return "ok", f"driver's CUDA {driver_cuda} >= {cuda}"
        if dc.major == Version(cuda).major:
            return "minor-compat", (f"the driver supports CUDA {driver_cuda}: same major, so only "
                                    "minor-version compatibility")
        return "too-old", f"driver too old (its CUDA {driver_cuda} < {cuda})"
    return "none", "no NVIDIA driver in the profile: not checked"


def newest_cuda_for(data: CompatData, driver: str | None, driver_cuda: str | None,
                    integrated: bool = False) -> str | None:
    """The newest CUDA line of the data that the driver runs natively."""
    best = None
    for v in data.cuda_versions():
        if driver_status(data, v, driver, driver_cuda, integrated)[0] == "ok" and (driver or driver_cuda):
            best = v
    return best


def platform_verdict(data: CompatData, profile: dict, cand: Candidate) -> Verdict:
    """The platform part of the judgment alone (CPU arch, glibc, Jetson): what ``bundle --machine`` asks, with
    the release facts doctor uses (``data.vllm``/``data.torch`` of the candidate's pins)."""
    issues = platform_issues(data, profile, cand, data.vllm(cand.vllm), data.torch(cand.torch))
    return Verdict(tier_of(issues), issues)


def driver_issues(data: CompatData, profile: dict, cand: Candidate, vf: VllmFacts | None) -> list[Issue]:
    m, gpus = profile.get("machine") or {}, profile.get("gpu") or []
    driver, driver_cuda = m.get("driver"), m.get("driver_cuda")
    if not driver and not driver_cuda:
        if gpus:
            return [skipped("driver-too-old", "NVIDIA driver vs CUDA", "machine.driver")]
        if cand.source:
            can = "building is still possible (set [build] arch_list, e.g. '7.5;8.9', to the GPUs it will " \
                  "run on; empty builds every arch the toolkit supports, which is slower)"
        else:
            can = "installing is still possible"
        return [make_issue("no-driver", "warning", "NVIDIA GPU / driver",
                "no NVIDIA GPU or driver found (NVML and nvidia-smi; profile has no [[gpu]] and no "
                "machine.driver)",
                can + "; verifying needs a GPU: run verify on the GPU machine, or pass --allow-no-gpu. In a "
                "container, start it with --gpus all (NVIDIA Container Toolkit)")]
    need, why = runtime_cuda(cand, vf)
    cf = data.cuda(need)
    if cf is None:
        return [unknown("driver-too-old", "NVIDIA driver vs CUDA", f"CUDA {need} (its minimum driver)")]
    integrated = is_jetson(profile)
    state, how = driver_status(data, need, driver, driver_cuda, integrated)
    ok_newest = newest_cuda_for(data, driver, driver_cuda, integrated)
    other = (f"or use a variant for CUDA {ok_newest} or older, which this driver runs" if ok_newest
             else "no CUDA version in the data runs on this driver")
    if state == "ok":
        return []
    if state in ("unknown",):
        return [make_issue("check-skipped", "info", "NVIDIA driver vs CUDA", how, "check `nvidia-smi`",
                           "driver-too-old")]
    if integrated:
        return [make_issue("driver-too-old", "error", f"JetPack (CUDA {driver_cuda}) vs CUDA {need}",
                f"{why}; {how}: a Jetson's CUDA comes with its L4T/JetPack release",
                f"use a variant for CUDA {driver_cuda} (the toolkit JetPack ships)"
                + (", or upgrade JetPack to one that ships CUDA " + need if state == "too-old" else ""),
                fixable=state == "too-old")]
    if state == "minor-compat":
        if driver:
            ev = (f"{why}; its toolkit wants driver >= {cf.driver_min.value}{cite(cf.driver_min)}; driver "
                  f"{driver} runs it only under minor-version compatibility (>= {cf.compat_driver_min.value}"
                  f"{cite(cf.compat_driver_min)}): PTX newer than the driver cannot be JIT-compiled")
            return [make_issue("driver-too-old", "warning", f"driver {driver} vs CUDA {need}", ev,
                           f"upgrade the driver to >= {cf.driver_min.value} ({NVIDIA_DRIVER_DOCS}), {other}")]
        return [make_issue("driver-too-old", "warning", f"driver (CUDA {driver_cuda}) vs CUDA {need}",
                       f"{why}; the driver supports CUDA {driver_cuda}: same major, so only minor-version "
                       f"compatibility (no JIT of newer PTX){cite(cf.compat_driver_min)}",
                       f"upgrade the driver to >= {cf.driver_min.value}, {other}")]
    if driver:
        evidence = (f"{why}; it needs driver >= {cf.driver_min.value}{cite(cf.driver_min)} (>= "
                    f"{cf.compat_driver_min.value} with minor-version compatibility); this machine has "
                    f"driver {driver}" + (f" (CUDA {driver_cuda})" if driver_cuda else ""))
    else:
        evidence = (f"{why}; the driver supports CUDA {driver_cuda} only (needs >= {cf.driver_min.value}"
                    f"{cite(cf.driver_min)})")
    out = [make_issue("driver-too-old", "error", f"driver {driver or ''} vs CUDA {need}".replace("  ", " "),
                  evidence, f"upgrade the NVIDIA driver to >= {cf.driver_min.value} ({NVIDIA_DRIVER_DOCS}), "
                  f"{other}", fixable=True)]
    # Forward compatibility could bridge a major gap, but only on data-center GPUs: elsewhere error 804.
    fwd = data.datacenter_fact()
    for g in gpus:
        dc = data.is_datacenter(g.get("name", ""))
        if dc is True:
            continue
        out.append(make_issue(
            "cuda-forward-compat", "warning" if not m.get("in_container") else "error",
            f"forward compatibility on {g.get('name', 'this GPU')}",
            f"the CUDA {need} runtime on driver {driver or driver_cuda} needs NVIDIA's forward-compatibility "
            f"package (cuda-compat, shipped in CUDA container images), which works only on data-center GPUs"
            f"{cite(fwd)}; {g.get('name', 'this GPU')} is "
            + ("not one" if dc is False else "not known as one") + ": with cuda-compat on the library path "
            "CUDA fails with error 804 ('forward compatibility was attempted on non supported HW')"
            + ("; this is a container, where images often put cuda-compat on LD_LIBRARY_PATH"
               if m.get("in_container") else ""),
            f"do not use cuda-compat on this GPU: upgrade the host driver to >= {cf.driver_min.value}, "
            f"{other}", fixable=True))
        break
    return out


# ---------------------------------------------------------------------------------------- GPU archs

def gpu_issues(data: CompatData, profile: dict, cand: Candidate, vf: VllmFacts | None, tf: TorchFacts | None,
               build_archs: tuple[str, str] | None = None, needs_xformers: bool = False) -> list[Issue]:
    """The GPUs' compute capabilities against torch's kernels, vLLM's kernels and nvcc's targets.
    ``build_archs``: (CUDA_SUPPORTED_ARCHS, where) read from a source tree, over the data's."""
    out: list[Issue] = []
    gpus = []
    for g in profile.get("gpu") or []:
        if not g.get("compute_capability"):
            out.append(skipped("no-kernel-image", f"GPU {g.get('name', '?')}", "gpu.compute_capability"))
            continue
        gpus.append((g, parse_cc(g["compute_capability"])))
    if not gpus:
        return out
    out += _torch_kernel_issues(data, profile, cand, tf, gpus)
    out += _vllm_kernel_issues(data, cand, vf, gpus, build_archs)
    if cand.source:
        out += _nvcc_issues(data, profile, cand, gpus)
    return out + _pre_ampere_issues(gpus, needs_xformers)


def _torch_kernel_issues(data: CompatData, profile: dict, cand: Candidate, tf: TorchFacts | None,
                         gpus: list) -> list[Issue]:
    """torch's kernels (its wheels' TORCH_CUDA_ARCH_LIST for this platform) against the GPUs."""
    out: list[Issue] = []
    arch = cpu_arch(profile)
    if cand.torch_preinstalled:
        out.append(make_issue("check-skipped", "info", "torch kernels vs GPU",
                "torch is the interpreter's own (preinstalled = true): its arch list is not in the data",
                "run `invoke verify` after the build", "no-kernel-image"))
    elif tf is None:
        out.append(unknown("no-kernel-image", "torch kernels vs GPU", f"torch {cand.torch}"))
    else:
        ta = torch_arch(data, tf, cand.cuda, arch)
        if ta is None:
            out.append(unknown("no-kernel-image", "torch kernels vs GPU",
                               f"the arch list of torch {cand.torch}+{cand.cuda_tag}"))
        else:
            for g, cc in gpus:
                if not arch_list_runs_on(ta.value, cc):
                    out.append(make_issue(
                        "no-kernel-image", "error", f"torch {cand.torch}+{cand.cuda_tag} on {g.get('name')}",
                        f"its wheels hold kernels for TORCH_CUDA_ARCH_LIST {ta.value}{cite(ta)}; "
                        f"{g.get('name')} is compute capability {cc_str(cc)} (no SASS of its major with a "
                        "lower minor, no PTX below it)", _arch_fix(data, cc)))
    return out


def _vllm_kernel_issues(data: CompatData, cand: Candidate, vf: VllmFacts | None, gpus: list,
                        build_archs: tuple[str, str] | None) -> list[Issue]:
    """vLLM's kernels (its CMake's arch list: the source tree's, else the data's) against the GPUs, with the
    PTX the build compiles for a GPU newer than the toolkit."""
    out: list[Issue] = []
    cuda_for_vllm = cand.cuda
    if not cand.source and vf is not None and vf.wheel_cuda is not None:
        cuda_for_vllm = str(vf.wheel_cuda.value)
    if build_archs is not None and cand.source:
        supported, cited = build_archs[0], f" [{build_archs[1]}]"
    elif vf is not None and vf.build_archs(cuda_for_vllm) is not None:
        f = vf.build_archs(cuda_for_vllm)
        supported, cited = f.value, cite(f)
    else:
        supported, cited = None, ""
        out.append(unknown("no-kernel-image", "vLLM kernels vs GPU",
                           f"the CUDA archs vLLM {cand.vllm} builds"))
    if supported is not None:
        built = [a for a, _ in parse_arch_list(supported)]
        cf_src = data.cuda(cand.cuda) if cand.source else None
        for g, cc in gpus:
            # a GPU newer than the toolkit: the build's PTX (nvcc_arch_for), if vLLM's CMake keeps its arch
            ptx = cf_src is not None and nvcc_arch_for(cf_src, cc)[1] == "ptx"
            if not (_ptx_built(cf_src, built, cc) if ptx else sass_covers(built, cc)):
                how = ("its CMake builds" if cand.source
                       else "its wheel holds (the CMake list, assumed for the wheel)")
                newer = ptx or all(cc > a for a in built)
                out.append(make_issue(
                    "no-kernel-image", "error", f"vLLM {cand.vllm} kernels on {g.get('name')}",
                    f"{how} kernels for {supported} with CUDA {cuda_for_vllm}{cited}; {g.get('name')} is "
                    f"compute capability {cc_str(cc)}" + (
                        f" (nvcc {cand.cuda} builds it PTX of {nvcc_arch_for(cf_src, cc)[0]}, an arch "
                        "that list does not keep)" if ptx else ""),
                    (f"this GPU is newer than this vLLM release builds for with CUDA {cuda_for_vllm}: "
                     "use a newer vLLM release or CUDA line (see `invoke plan`)") if newer else
                    "this GPU is below what this vLLM release supports: use an older vLLM release whose "
                    "CMake lists it (vLLM 0.6-0.16 build 7.0+), or another GPU"))
    return out


def _pre_ampere_issues(gpus: list, needs_xformers: bool) -> list[Issue]:
    """bfloat16 and FlashAttention-2 need compute capability >= 8.0."""
    out: list[Issue] = []
    old = [(g, cc) for g, cc in gpus if cc < (8, 0)]
    if old:
        names = ", ".join(f"{g.get('name')} ({cc_str(cc)})" for g, cc in old)
        out.append(make_issue("bf16-unsupported", "warning", "bfloat16 on pre-Ampere GPUs",
                f"{names}: bfloat16 needs compute capability >= 8.0",
                "serve with --dtype half (float16); verify's smoke tests use float16 on these GPUs"))
        xf = "; keep xformers installed, vLLM uses its attention backend here" if needs_xformers else ""
        out.append(make_issue("flash-attn-unsupported-gpu", "warning", "FlashAttention on pre-Ampere GPUs",
                f"{names}: FlashAttention-2 needs compute capability >= 8.0",
                f"let vLLM pick another attention backend (do not force FLASH_ATTN){xf}"))
    return out


def _ptx_built(cf: CudaFacts | None, built: list[tuple[int, int]], cc: tuple[int, int]) -> bool:
    """A source build for ``cc`` (a GPU newer than the toolkit) compiles PTX of the toolkit's newest arch,
    and vLLM's CMake keeps it (its list has that arch's major at or below it): the kernels JIT-compile on
    ``cc``."""
    if cf is None:
        return False
    arch, how = nvcc_arch_for(cf, cc)
    return how == "ptx" and arch is not None and sass_covers(built, parse_cc(arch.removesuffix("+PTX")))


def _nvcc_issues(data: CompatData, profile: dict, cand: Candidate, gpus: list) -> list[Issue]:
    """nvcc of the candidate's CUDA against each GPU, by the build's own mapping (``nvcc_arch_for``): SASS
    runs; a GPU newer than the toolkit gets PTX (JIT at first load: a warning, an error where the driver runs
    this CUDA only under minor-version compatibility, which cannot JIT newer PTX); an older one cannot be
    built for."""
    cf = data.cuda(cand.cuda)
    if cf is None:
        return [unknown("arch-unsupported-by-nvcc", "nvcc targets vs GPU", f"CUDA {cand.cuda}")]
    out, m = [], profile.get("machine") or {}
    for g, cc in gpus:
        arch, how = nvcc_arch_for(cf, cc)
        if how in ("sass", "same-major"):
            continue
        subject = f"nvcc {cand.cuda} vs {g.get('name')}"
        ev = (f"nvcc {cand.cuda} builds SASS for {', '.join(cf.sm.value)}{cite(cf.sm)}; none runs on compute "
              f"capability {cc_str(cc)}")
        fix = _nvcc_fix(data, cc, m)
        if how != "ptx":
            out.append(make_issue("arch-unsupported-by-nvcc", "error", subject, ev, fix))
            continue
        ev += (f"; the build compiles {arch} (PTX of compute_{arch.split('+')[0].replace('.', '')}), which "
               "the driver JIT-compiles for it. PTX JIT: first load compiles kernels, slower; some kernels "
               "(e.g. FP8/FP4 for that arch) are missing")
        state = driver_status(data, cand.cuda, m.get("driver"), m.get("driver_cuda"), is_jetson(profile))[0]
        if state == "minor-compat":
            out.append(make_issue("arch-unsupported-by-nvcc", "error", subject, ev + f"; the driver runs "
                f"CUDA {cand.cuda} only under minor-version compatibility, which cannot JIT-compile its PTX",
                f"upgrade the NVIDIA driver ({NVIDIA_DRIVER_DOCS}), or {fix}", fixable=True))
        else:
            out.append(make_issue("arch-unsupported-by-nvcc", "warning", subject, ev, fix))
    return out


def _arch_fix(data: CompatData, cc: tuple[int, int]) -> str:
    ok = []
    for tv in data.torch_versions():
        tf = data.torch(tv)
        for cuda, f in tf.arch.items():
            if arch_list_runs_on(f.value, cc):
                ok.append(f"{tv}+cu{cuda.replace('.', '')}")
    if not ok:
        return f"no torch release in the data has kernels for compute capability {cc_str(cc)}"
    return f"choose a torch build with kernels for compute capability {cc_str(cc)}, e.g. {', '.join(ok[-3:])}"


def nvcc_targets(data: CompatData, cc: tuple[int, int]) -> list[str]:
    """The CUDA lines whose nvcc builds SASS that runs on ``cc``."""
    return [v for v in data.cuda_versions() if sass_covers(data.cuda(v).sm_real(), cc)]


def nvcc_arch_for(cf: CudaFacts, cc: tuple[int, int]) -> tuple[str | None, str]:
    """What nvcc of the CUDA ``cf`` builds for a GPU of compute capability ``cc``, and how: 'sass' (the GPU's
    own arch), 'same-major' (the toolkit's newest arch of its major below it: SASS runs on later minors),
    'ptx' (a GPU newer than the toolkit: PTX of its newest arch, JIT at first load) or 'none' (below the
    toolkit's oldest arch, which is returned).  The build's arch list (facts/build_archs) maps GPUs with
    this."""
    real = sorted(cf.sm_real())
    if cc_str(cc) in cf.sm.value:
        return cc_str(cc), "sass"
    covering = [a for a in real if sass_covers([a], cc)]
    if covering:
        return cc_str(covering[-1]), "same-major"
    if real and cc > real[-1]:
        return cc_str(real[-1]) + "+PTX", "ptx"
    return (cc_str(real[0]) if real else None), "none"


def _nvcc_fix(data: CompatData, cc: tuple[int, int], machine: dict | None = None) -> str:
    ok = nvcc_targets(data, cc)
    if not ok:
        return f"no CUDA toolkit in the data targets compute capability {cc_str(cc)}"
    fix = f"use a CUDA toolkit that targets compute capability {cc_str(cc)}: {', '.join(ok)}"
    if machine is None:
        return fix
    return f"{fix} (a variant for it; then {install_fix(machine.get('os'), ok[-1], machine.get('arch'))})"


# ------------------------------------------------------------------------------------------ toolkit

def toolkit_issues(profile: dict, cand: Candidate) -> list[Issue]:
    """A source build's CUDA toolkit: present, complete, the variant's version (else: how to install it)."""
    m = profile.get("machine") or {}
    tk = m.get("cuda_toolkits")
    install = (f"{install_fix(m.get('os'), cand.cuda, m.get('arch'))}; the build sets CUDA_HOME, PATH and "
               "LD_LIBRARY_PATH to it")
    if cand.toolkit == "pypi":
        return [make_issue("cuda-home-missing", "info", f"CUDA {cand.cuda} toolkit from PyPI",
                f"[build] toolkit = \"pypi\": the deps step installs cuda-toolkit[{','.join(PYPI_EXTRAS)}] "
                f"at the release torch {cand.torch} pins into the variant's venv, and the build's CUDA_HOME "
                f"is its nvidia/cu{cand.cuda.split('.')[0]}; no system toolkit is used"
                + (f" (found here, unused: {', '.join(tk)})" if tk else ""), "nothing to do")]
    if tk is None:
        return [skipped("cuda-home-missing", f"CUDA {cand.cuda} toolkit", "machine.cuda_toolkits")]
    if cand.cuda in tk:
        broken = [e for e in m.get("cuda_incomplete") or [] if e.startswith(f"{tk[cand.cuda]} (")]
        if broken:
            return [make_issue("nvcc-not-found", "warning", f"CUDA {cand.cuda} toolkit",
                f"the toolkit at {broken[0]}: its nvcc runs, but a build stops at the first missing part",
                install)]
        return []
    same_major = [t for t in tk if t.split(".")[0] == cand.cuda.split(".")[0]]
    if not tk:
        no_nvcc = m.get("cuda_without_nvcc") or []
        if no_nvcc:
            return [make_issue("nvcc-not-found", "error", f"CUDA {cand.cuda} toolkit",
                f"CUDA installs without bin/nvcc (runtime only): {', '.join(no_nvcc)}; no toolkit with nvcc "
                "found", install, fixable=True)]
        return [make_issue("cuda-home-missing", "error", f"CUDA {cand.cuda} toolkit",
                "no CUDA toolkit found (CUDA_HOME/CUDA_PATH, /usr/local/cuda*, nvcc on PATH, $CONDA_PREFIX, "
                "pip's nvidia-cuda-nvcc)", install, fixable=True)]
    if same_major:
        return [make_issue("cuda-torch-version-mismatch", "error", f"CUDA {cand.cuda} toolkit",
                f"found {', '.join(f'{k} at {tk[k]}' for k in same_major)}, not {cand.cuda}; the build uses "
                f"the toolkit of the variant's CUDA (torch {cand.torch}+{cand.cuda_tag} itself would accept "
                "another minor of the same major with a warning)",
                f"{install}; or make a variant for CUDA {same_major[-1]}", fixable=True)]
    return [make_issue("cuda-torch-version-mismatch", "error", f"CUDA {cand.cuda} toolkit",
                f"found only {', '.join(f'{k} at {tk[k]}' for k in tk)}; torch {cand.torch}+{cand.cuda_tag} "
                f"is CUDA {cand.cuda}: building against CUDA {', '.join(tk)} fails ('The detected CUDA "
                "version ... mismatches the version that was used to compile PyTorch')",
                install, fixable=True)]


# ---------------------------------------------------------------------------------------- the judge

def judge(data: CompatData, profile: dict, cand: Candidate, vf: VllmFacts | None = None,
          tf: TorchFacts | None = None) -> Verdict:
    """Whether ``cand`` runs on the machine ``profile``: its tier with every issue (reasons and fixes)."""
    vf = vf if vf is not None else data.vllm(cand.vllm)
    tf = tf if tf is not None else data.torch(cand.torch)
    issues = (platform_issues(data, profile, cand, vf, tf) + driver_issues(data, profile, cand, vf)
              + gpu_issues(data, profile, cand, vf, tf,
                           needs_xformers=vf is not None and vf.xformers is not None))
    if cand.source:
        issues += toolkit_issues(profile, cand)
    issues += python_issues(data, profile, cand, vf, tf) + build_issues(data, profile, cand, vf)
    return Verdict(tier_of(issues), issues)
