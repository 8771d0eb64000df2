"""Compatibility data (``data/compat.toml``) with typed accessors for ``doctor``.

Every value is a :class:`Fact` that knows its source and whether it was inferred.  A lookup of a version
that the data does not hold returns ``None``: callers report "could not check", they never guess.

    >>> from vllm_harness import compat
    >>> c = compat.load()
    >>> c.cuda("11.8").gcc_max.value
    11
    >>> c.vllm("0.8.5").torch.value
    '2.6.0'
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from .errors import UsageError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - 3.10
    import tomli as tomllib  # type: ignore[no-redef]

DATA_PATH = Path(__file__).parent / "data" / "compat.toml"
_FACT_KEYS = {"value", "source", "inferred", "note"}


@dataclass(frozen=True)
class Fact:
    value: Any
    source: str          # key of [sources]
    url: str             # what that key stands for (URL or file@commit, with a short quote)
    inferred: bool = False
    note: str = ""

    def cite(self) -> str:
        """Short citation for a finding's evidence: the source key, '(inferred)' where it applies."""
        return f"{self.source}{', inferred' if self.inferred else ''}"


@dataclass(frozen=True)
class CudaFacts:
    version: str
    driver_min: Fact
    compat_driver_min: Fact
    sm: Fact             # list of 'X.Y' / 'X.Ya' / 'X.Yf'
    gcc_max: Fact

    def sm_real(self) -> list[tuple[int, int]]:
        """The plain (non a/f) architectures nvcc can build SASS for."""
        return [parse_cc(s) for s in self.sm.value if re.fullmatch(r"\d+\.\d+", s)]


@dataclass(frozen=True)
class TorchFacts:
    version: str
    python: Fact
    pypi_default_cuda: Fact
    cuda_variants: Fact
    arch: dict[str, Fact]    # CUDA 'X.Y' -> TORCH_CUDA_ARCH_LIST of its wheels


@dataclass(frozen=True)
class VllmFacts:
    match: str
    torch: Fact | None
    xformers: Fact | None
    python: Fact | None
    cmake_min: Fact | None
    numpy: Fact | None
    wheel_cuda: Fact | None
    build_archs_set: Fact | None
    _archs: dict[str, dict[str, Fact]] = field(repr=False, default_factory=dict)

    def build_archs(self, cuda: str) -> Fact | None:
        """CUDA_SUPPORTED_ARCHS of this release's CMakeLists for nvcc ``cuda`` (None if unknown)."""
        if self.build_archs_set is None:
            return None
        table = self._archs.get(self.build_archs_set.value)
        if not table:
            return None
        cv = Version(major_minor(cuda))
        for key in sorted((k for k in table if k != "default"), key=Version, reverse=True):
            if cv >= Version(key):
                return _merge_inferred(table[key], self.build_archs_set)
        if "default" in table:
            return _merge_inferred(table["default"], self.build_archs_set)
        return None


@dataclass(frozen=True)
class XformersFacts:
    version: str
    torch: Fact


def _merge_inferred(f: Fact, via: Fact) -> Fact:
    """A value reached through an inferred mapping (release -> arch set) is itself inferred."""
    if via.inferred and not f.inferred:
        return Fact(f.value, f.source, f.url, True, (f.note + "; " if f.note else "") +
                    f"release group -> CMakeLists version: {via.note or 'inferred'}")
    return f


def parse_cc(s: str) -> tuple[int, int]:
    """'8.9' / '9.0a' / '9.0+PTX' -> (8, 9)."""
    m = re.match(r"^\s*(\d+)\.(\d+)", s)
    if not m:
        raise ValueError(f"not a compute capability: {s!r}")
    return int(m.group(1)), int(m.group(2))


def parse_arch_list(s: str) -> list[tuple[tuple[int, int], bool]]:
    """'7.5;8.0;9.0+PTX' (also space-separated) -> [((7,5), False), ((8,0), False), ((9,0), True)]."""
    out = []
    for item in re.split(r"[;\s,]+", s.strip()):
        if item:
            out.append((parse_cc(item), item.upper().endswith("+PTX")))
    return out


def arch_list_runs_on(arch_list: str, cc: tuple[int, int]) -> bool:
    """Whether binaries built for ``arch_list`` hold code that a GPU of compute capability ``cc`` runs:
    SASS of the same major and a minor <= the GPU's, or PTX of an arch <= the GPU's (JIT)."""
    for arch, ptx in parse_arch_list(arch_list):
        if arch[0] == cc[0] and arch[1] <= cc[1]:
            return True
        if ptx and arch <= cc:
            return True
    return False


class CompatData:
    """The loaded, validated data file."""

    def __init__(self, raw: dict, path: Path):
        self.path = path
        self.sources: dict[str, str] = raw.get("sources", {})
        self._raw = raw
        self._facts: list[tuple[str, Fact]] = []
        self._cuda = {v: self._cuda_facts(v, t) for v, t in raw.get("cuda", {}).items()}
        self._torch = {v: self._torch_facts(v, t) for v, t in raw.get("torch", {}).items()}
        self._xformers = {v: XformersFacts(v, self._fact(f"xformers.{v}.torch", t["torch"]))
                          for v, t in raw.get("xformers", {}).items()}
        self._archs = {name: {k: self._fact(f"vllm_build_archs.{name}.{k}", f) for k, f in table.items()}
                       for name, table in raw.get("vllm_build_archs", {}).items()}
        self._vllm: list[tuple[SpecifierSet, VllmFacts]] = []
        for i, entry in enumerate(raw.get("vllm", [])):
            where = f"vllm[{entry.get('match', i)}]"
            try:
                spec = SpecifierSet(entry["match"])
            except (KeyError, InvalidSpecifier):
                raise self._bad(f"{where}.match", "is missing or not a version specifier") from None
            facts = {k: (self._fact(f"{where}.{k}", entry[k]) if k in entry else None)
                     for k in ("torch", "xformers", "python", "cmake_min", "numpy", "wheel_cuda", "build_archs")}
            if facts["build_archs"] is not None and facts["build_archs"].value not in self._archs:
                raise self._bad(f"{where}.build_archs", f"names unknown set {facts['build_archs'].value!r}")
            self._vllm.append((spec, VllmFacts(
                match=entry["match"], torch=facts["torch"], xformers=facts["xformers"], python=facts["python"],
                cmake_min=facts["cmake_min"], numpy=facts["numpy"], wheel_cuda=facts["wheel_cuda"],
                build_archs_set=facts["build_archs"], _archs=self._archs)))
        g = raw.get("gpus", {})
        self._dc = self._fact("gpus.datacenter_name_patterns", g["datacenter_name_patterns"]) \
            if "datacenter_name_patterns" in g else None
        self._consumer = self._fact("gpus.consumer_name_patterns", g["consumer_name_patterns"]) \
            if "consumer_name_patterns" in g else None

    # ------------------------------------------------------------------ building
    def _bad(self, key: str, reason: str) -> UsageError:
        return UsageError(f"{self.path}: key '{key}' {reason}.",
                          "Correct the compatibility data file (every fact is { value = ..., source = \"<key of "
                          "[sources]>\" }, inferred = true where derived).")

    def _fact(self, key: str, raw: Any) -> Fact:
        if not isinstance(raw, dict) or "value" not in raw or "source" not in raw:
            raise self._bad(key, "is not a fact table { value = ..., source = ... }")
        extra = set(raw) - _FACT_KEYS
        if extra:
            raise self._bad(key, f"has unknown field(s) {', '.join(sorted(extra))}")
        src = raw["source"]
        if src not in self.sources:
            raise self._bad(key, f"cites source {src!r}, which [sources] does not define")
        inferred = raw.get("inferred", False)
        if not isinstance(inferred, bool):
            raise self._bad(key, "has a non-boolean 'inferred'")
        f = Fact(raw["value"], src, self.sources[src], inferred, raw.get("note", ""))
        self._facts.append((key, f))
        return f

    def _cuda_facts(self, v: str, t: dict) -> CudaFacts:
        need = ("driver_min", "compat_driver_min", "sm", "gcc_max")
        for k in need:
            if k not in t:
                raise self._bad(f"cuda.{v}.{k}", "is missing")
        return CudaFacts(v, *(self._fact(f"cuda.{v}.{k}", t[k]) for k in need))

    def _torch_facts(self, v: str, t: dict) -> TorchFacts:
        for k in ("python", "pypi_default_cuda", "cuda_variants"):
            if k not in t:
                raise self._bad(f"torch.{v}.{k}", "is missing")
        arch = {c: self._fact(f"torch.{v}.arch.{c}", f) for c, f in t.get("arch", {}).items()}
        return TorchFacts(v, self._fact(f"torch.{v}.python", t["python"]),
                          self._fact(f"torch.{v}.pypi_default_cuda", t["pypi_default_cuda"]),
                          self._fact(f"torch.{v}.cuda_variants", t["cuda_variants"]), arch)

    # ------------------------------------------------------------------ lookups
    def cuda(self, version: str) -> CudaFacts | None:
        """Facts for toolkit ``major.minor`` (a longer version is cut to major.minor)."""
        return self._cuda.get(major_minor(version))

    def cuda_versions(self) -> list[str]:
        return sorted(self._cuda, key=Version)

    def torch(self, version: str) -> TorchFacts | None:
        return self._torch.get(_norm(version))

    def torch_versions(self) -> list[str]:
        return sorted(self._torch, key=Version)

    def xformers(self, version: str) -> XformersFacts | None:
        return self._xformers.get(_norm(version))

    def vllm(self, version: str) -> VllmFacts | None:
        try:
            v = Version(version)
        except InvalidVersion:
            return None
        public = Version(v.public)
        for spec, facts in self._vllm:
            if spec.contains(public, prereleases=True):
                return facts
        return None

    def is_datacenter(self, gpu_name: str) -> bool | None:
        """True / False from the name patterns; None when the name matches neither list."""
        name = f" {gpu_name} "
        if self._consumer and any(p in name for p in self._consumer.value):
            return False
        if self._dc and any(p in name for p in self._dc.value):
            return True
        return None

    def datacenter_fact(self) -> Fact | None:
        return self._dc

    def facts(self) -> list[tuple[str, Fact]]:
        """Every fact with its dotted key (for listing what is inferred)."""
        return list(self._facts)

    def inferred(self) -> list[str]:
        return [f"{k} = {f.value!r}" + (f" ({f.note})" if f.note else "") for k, f in self._facts if f.inferred]


def _norm(version: str) -> str:
    """'2.6.0+cu118' -> '2.6.0'."""
    try:
        return Version(version).public
    except InvalidVersion:
        return version


def major_minor(version: str) -> str:
    m = re.match(r"^\s*(\d+)\.(\d+)", str(version))
    return f"{int(m.group(1))}.{int(m.group(2))}" if m else str(version)


def load_file(path: Path) -> CompatData:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"Compatibility data {path} cannot be read ({e.strerror}).",
                         "Reinstall the harness or restore the file.") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"Compatibility data {path} is not valid TOML ({e}).",
                         "Correct the TOML syntax at that line.") from None
    return CompatData(raw, path)


@lru_cache(maxsize=1)
def load() -> CompatData:
    """The packaged data file, parsed once per process."""
    return load_file(DATA_PATH)
