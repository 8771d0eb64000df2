"""Build archs:

* **Archs.**  :func:`check_archs` keeps what the toolkit can build (``compat`` data: ``nvcc --list-gpu-code``
  of each CUDA), maps a GPU newer than the toolkit to the toolkit's newest arch of the same major (or PTX),
  and refuses a GPU that the toolkit cannot target at all: the mapping is the feasibility judge's
  (``facts/feasibility.nvcc_arch_for``), the one doctor and plan use.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vllm_harness.facts import compat, feasibility


@dataclass
class ArchCheck:
    archs: str | None
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    fix: str | None = None


def split_archs(value: str) -> list[str]:
    """'7.5;8.9', '7.5 8.9' or '7.5,8.9' -> ['7.5', '8.9']: the one reading of a given arch list."""
    return [a for a in value.replace(",", ";").replace(" ", ";").split(";") if a]


def given_archs(cuda: str, choices: list[tuple[str | None, str]]) -> tuple[ArchCheck, str] | None:
    """The first arch list given, in the build's precedence (--arch, then [build] arch_list), checked against
    what nvcc ``cuda`` builds, and where it came from; None when none is given.  doctor asks this too."""
    for value, where in choices:
        if value and value.strip():
            return check_archs(cuda, split_archs(value), from_gpu=False), where
    return None


def check_archs(cuda: str, wanted: list[str], from_gpu: bool) -> ArchCheck:
    """Keep the archs the toolkit ``cuda`` builds.  ``from_gpu``: the list is the GPUs' compute capabilities,
    so a GPU newer than the toolkit gets the toolkit's newest arch of its major (SASS runs on later minors)
    or PTX of the newest arch (JIT), and a GPU older than the toolkit is an error.  A list the user gave is
    only checked: a name the toolkit does not build is an error."""
    cf = compat.load().cuda(cuda)
    if cf is None:
        return ArchCheck(";".join(wanted) or None,
                         [f"CUDA {cuda} is not in the compat data: archs not checked"])
    names = set(cf.sm.value)
    out, notes = [], []
    for item in wanted:
        base = item.replace("+PTX", "").replace("+ptx", "")
        if not from_gpu:
            if base not in names:
                return ArchCheck(None, error=f"arch {item} cannot be built by nvcc {cuda} (it builds "
                                 f"{', '.join(cf.sm.value)}; {cf.sm.source})",
                                 fix=f"drop {item} from --arch / [build] arch_list, or use a CUDA toolkit "
                                     "that has it")
            out.append(item)
            continue
        cc = compat.parse_cc(base)
        arch, how = feasibility.nvcc_arch_for(cf, cc)   # the judge's mapping of a GPU onto nvcc's archs
        if how in ("sass", "same-major"):
            out.append(arch)
            if how == "same-major":
                notes.append(f"GPU {base}: nvcc {cuda} has no sm_{cc[0]}{cc[1]}; {arch} code runs on it")
        elif how == "ptx":
            out.append(arch)
            notes.append(f"GPU {base} is newer than nvcc {cuda} knows: PTX of {arch.replace('+PTX', '')} "
                         "(JIT at first load)")
        else:
            return ArchCheck(None, error=f"the GPU (compute capability {base}) cannot be targeted by nvcc "
                             f"{cuda} "
                             f"(its oldest arch is {arch}; {cf.sm.source})",
                             fix="use a variant with an older CUDA toolkit (e.g. cu118 for 3.5-9.0), or pass "
                                 "--arch for other GPUs")
    return ArchCheck(";".join(dict.fromkeys(out)) or None, notes)


def default_archs(vllm_version: str, cuda: str) -> str | None:
    """The arch list vLLM's CMake builds by itself for this CUDA (compat data), None when unknown."""
    vf = compat.load().vllm(vllm_version)
    f = vf.build_archs(cuda) if vf is not None else None
    return str(f.value) if f is not None else None
