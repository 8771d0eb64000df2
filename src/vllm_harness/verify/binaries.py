"""Compiled libraries, read without loading them (verify's binary layer).

* the ELF dynamic section (NEEDED, SONAME, RPATH/RUNPATH), read with ``struct`` (no pyelftools needed);
* each NEEDED library resolved the way ld.so would: RPATH (when there is no RUNPATH), LD_LIBRARY_PATH,
  RUNPATH (``$ORIGIN`` expanded), the ``ldconfig -p`` cache, the default dirs -- then what ``import torch``
  has already loaded (torch's ``lib/``, ``nvidia/*/lib`` in site-packages), since vLLM's extensions carry no
  RPATH and rely on that;
* the CUDA runtime major they link (``libcudart.so.N``) against torch's;
* the SASS/PTX archs in their fatbins (``cuobjdump --list-elf --list-ptx`` when present, else the
  ``.nv_fatbin`` section read here: header magic 0xBA55ED50, entries of kind 1 = PTX, 2 = ELF, the sm number),
  against each GPU's compute capability: a gap predicts "no kernel image" (``no-kernel-image``) before any
  kernel runs; PTX-only coverage is a warning (JIT at first use);
* the same on a wheel file before it is installed (``check_wheel``): CUDA major and torch pin vs the variant.

Stdlib only: the harness runs it in its own process, on any env's files.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from vllm_harness.core import procs
from vllm_harness.verify.elf import (
    ElfInfo,
    NotElf,
    arch_summary,
    coverage,
    elf_kind,
    fatbin_entries,
    find_cuobjdump,
    for_particular_gpus,
    is_elf,
    read_elf,
)
from vllm_harness.verify.roles import MAX_SOURCE_BYTES, PythonSide, Role

# the NVIDIA driver's own libraries: present only where a driver is installed (not in any env)
DRIVER_LIBS = re.compile(r"^lib(cuda|nvidia-ml|nvidia-ptxjitcompiler|nvcuvid|nvidia-encode)\.so(\.\d+)*$")
# CUDA libraries whose soname major is the CUDA major (cufft/curand/cusolver number themselves otherwise)
CUDA_MAJOR_LIBS = re.compile(r"^lib(cudart|cublas|cublasLt|nvrtc|nvJitLink|cusparse)\.so\.(\d+)(\.\d+)*$")
CUDA_LIB = re.compile(r"^lib(cudart|cublas|cublasLt|nvrtc|nvJitLink|cusparse|cufft|curand|cusolver|cudnn|"
                      r"nccl|"
                      r"nvToolsExt|cupti|cufile|cusparseLt|nvshmem)")
DEFAULT_DIRS = ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib",
                "/usr/lib"]


# ------------------------------------------------------------------------------------- loader path

def ldconfig_cache(env: dict[str, str] | None = None) -> dict[str, str]:
    """{soname: path} of the 64-bit x86-64 entries of `ldconfig -p` (empty when there is no ldconfig)."""
    env = dict(os.environ if env is None else env)
    exe = shutil.which("ldconfig", path=env.get("PATH", "") + ":/sbin:/usr/sbin")
    if not exe:
        return {}
    try:
        r = procs.run([exe, "-p"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out: dict[str, str] = {}
    for line in r.stdout.splitlines():
        m = re.match(r"\s*(\S+)\s+\(([^)]*)\)\s+=>\s+(\S+)", line)
        if m and "x86-64" in m.group(2):
            out.setdefault(m.group(1), m.group(3))
    return out


@dataclass
class LoaderPath:
    """Where a library of the env finds its NEEDED ones."""

    ld_library_path: list[str] = field(default_factory=list)
    ldcache: dict[str, str] = field(default_factory=dict)
    default_dirs: list[str] = field(default_factory=lambda: list(DEFAULT_DIRS))
    preloaded: list[tuple[str, str]] = field(default_factory=list)   # (dir, why)
    driver_present: bool = True

    @classmethod
    def for_env(cls, env: dict[str, str], site_packages: list[str], torch_dir: str | None,
                driver_present: bool = True, use_ldcache: bool = True) -> LoaderPath:
        pre: list[tuple[str, str]] = []
        sps = list(site_packages)
        if torch_dir:
            pre.append((str(Path(torch_dir) / "lib"), "torch's lib/ (loaded by `import torch`)"))
            if str(Path(torch_dir).parent) not in sps:  # torch from the base interpreter's site-packages
                sps.append(str(Path(torch_dir).parent))
        for sp in sps:
            nv = Path(sp) / "nvidia"
            if nv.is_dir():
                for d in sorted(nv.glob("*/lib")):
                    pre.append((str(d), "site-packages nvidia/*/lib (loaded by `import torch`)"))
        return cls(ld_library_path=[p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p],
                   ldcache=ldconfig_cache(env) if use_ldcache else {}, preloaded=pre,
                   driver_present=driver_present)


def _expand(p: str, origin: str) -> str:
    for tok in ("$ORIGIN", "${ORIGIN}"):
        p = p.replace(tok, origin)
    for tok in ("$LIB", "${LIB}"):
        p = p.replace(tok, "lib64")
    return p.replace("$PLATFORM", "x86_64").replace("${PLATFORM}", "x86_64")


def resolve(name: str, info: ElfInfo, lp: LoaderPath) -> tuple[str | None, str]:
    """(path, how) of one NEEDED entry, searched in ld.so's order; (None, 'not found') when it is nowhere."""
    want = (2 if info.bits == 64 else 1, info.machine)

    def ok(p: Path) -> bool:
        return p.is_file() and elf_kind(p) == want

    if "/" in name:
        p = Path(_expand(name, str(Path(info.path).parent)))
        return (str(p), "path") if ok(p) else (None, "not found")
    origin = str(Path(info.path).resolve().parent)
    order: list[tuple[list[str], str]] = []
    if not info.runpath:
        order.append(([_expand(d, origin) for d in info.rpath], "RPATH"))
    order.append((lp.ld_library_path, "LD_LIBRARY_PATH"))
    order.append(([_expand(d, origin) for d in info.runpath], "RUNPATH"))
    for dirs, how in order:
        for d in dirs:
            if ok(Path(d) / name):
                return str(Path(d) / name), how
    if name in lp.ldcache and ok(Path(lp.ldcache[name])):
        return lp.ldcache[name], "ldconfig cache"
    for d in lp.default_dirs:
        if ok(Path(d) / name):
            return str(Path(d) / name), "default dirs"
    for d, why in lp.preloaded:
        if ok(Path(d) / name):
            return str(Path(d) / name), why
    if DRIVER_LIBS.match(name) and lp.driver_present:
        found = _loaded_path(name)
        if found:
            return found, "the driver's (found by the dynamic loader)"
    return None, "not found"


def _loaded_path(name: str) -> str | None:
    """Where the dynamic loader finds a driver library (libcuda.so.1 lives in places no env names, e.g. a
    container's mounted driver dir): load it in this process and read the path from /proc/self/maps."""
    import ctypes
    try:
        ctypes.CDLL(name)
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split()[-1] if line.split() else ""
        if Path(path).name.startswith(name.split(".so")[0] + ".so"):
            return path
    return None


# ---------------------------------------------------------------------------------------- the checks

def _check(name: str, status: str, reason: str = "", metrics: dict | None = None, id_: str | None = None,
           subject: str | None = None) -> dict:
    c = {"name": name, "status": status, "reason": reason, "metrics": metrics or {}, "layer": "binaries"}
    if id_:
        c["id"] = id_
    if subject:
        c["subject"] = subject
    return c


def cuda_majors(needed: list[str]) -> dict[str, int]:
    """{soname: CUDA major} of the NEEDED CUDA libraries whose soname carries the CUDA major."""
    out = {}
    for n in needed:
        m = CUDA_MAJOR_LIBS.match(n)
        if m:
            out[n] = int(m.group(2))
    return out


def torch_facts(torch_dir: str | None) -> dict:
    """torch's version and CUDA from torch/version.py, without importing torch."""
    if not torch_dir:
        return {}
    try:
        text = (Path(torch_dir) / "version.py").read_text()
    except OSError:
        return {}
    facts = {}
    for key, pat in (("version", r"^__version__\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]"),
                     ("cuda", r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]")):
        m = re.search(pat, text, re.M)
        facts[key] = m.group(1) if m else None
    return facts


def _sm(cc: str) -> str:
    return f"sm_{cc.replace('.', '')}"


@dataclass(frozen=True)
class Target:
    """What a library is checked against: the GPUs' compute capabilities (none: its archs are only reported,
    with ``no_gpu_reason``), the CUDA it must link (``torch_cuda``, else ``expect_cuda``: a wheel checked
    before install), and how its device code is read (``reader``: auto, python or cuobjdump; ``cuobjdump``:
    that tool's path, None: not used)."""

    gpu_ccs: list[str] = field(default_factory=list)
    torch_cuda: str | None = None
    expect_cuda: str | None = None
    reader: str = "auto"
    cuobjdump: str | None = None
    no_gpu_reason: str = "no GPU visible"


def _arch_check(label: str, path: Path, entries: list, gpu_ccs: list[str], m: dict,
                role: Role | None) -> dict:
    """The GPU archs verdict of one library with device code (``m``: its arch summary): a GPU it holds no
    code for fails only where the library is one the package needs there (roles.py): a library built for
    particular GPUs only (sm_90a, sm_100f) or one its Python imports guarded is "not used" on the others."""
    archs = " ".join(m["sass"] + m["ptx"])
    covs = [coverage(entries, cc) for cc in gpu_ccs]
    m["gpus"] = covs
    none = [c for c in covs if c["level"] == "none"]
    ptx = [c for c in covs if c["level"] == "ptx"]
    if role is not None:
        m["role"] = role.kind
        if role.sites:
            m["imported_at"] = [str(x) for x in role.sites[:5]]
    if none:
        ccs = ", ".join(_sm(c["cc"]) for c in none)
        if for_particular_gpus(entries):
            m["not_used"] = [c["cc"] for c in none]
            why = f"not used on {ccs}: built for {archs} only"
            if role is not None and role.sites:
                why += f" (loaded where that code runs: {role.where})"
        elif role is not None and role.kind == "optional":
            m["not_used"] = [c["cc"] for c in none]
            why = (f"not used on {ccs}: no code for it (has {archs}); the package imports it guarded "
                   f"({role.where}) and picks another kernel where it has none")
        else:
            required = role is not None and role.kind == "required"
            how = f"; imported unconditionally at {role.where}" if required else ""
            return _check(f"{label}: GPU archs", "fail",
                          f"no SASS or PTX for {ccs} (has {archs}){how}: predicts "
                          f"'no kernel image is available for execution on the device'", m, "no-kernel-image",
                          str(path))
        covered = [c for c in covs if c["level"] != "none"]
        if covered:
            why += "; " + ", ".join(f"{_sm(c['cc'])}: {' '.join(c['sass'] or c['ptx'])}" for c in covered)
        return _check(f"{label}: GPU archs", "pass", why, m, subject=str(path))
    if ptx:
        ccs = ", ".join(_sm(c["cc"]) for c in ptx)
        m["warning"] = "ptx-only"
        return _check(f"{label}: GPU archs", "pass",
                      f"warning: PTX only for {ccs} ({', '.join(ptx[0]['ptx'])}): "
                      f"JIT-compiled at first use (slow first call)", m, subject=str(path))
    ccs = ", ".join(f"{_sm(c['cc'])}: {' '.join(c['sass'])}" for c in covs)
    return _check(f"{label}: GPU archs", "pass", f"SASS for {ccs} (of {archs})", m, subject=str(path))


def _needed_check(label: str, path: Path, info, lp: LoaderPath, target: Target) -> dict:
    """NEEDED: every library it links resolves under the env's loader path (the driver's may be absent)."""
    resolved, missing, driver_missing = {}, [], []
    for n in info.needed:
        p, how = resolve(n, info, lp)
        if p:
            resolved[n] = f"{p} ({how})"
        elif DRIVER_LIBS.match(n) and not lp.driver_present:
            driver_missing.append(n)
        else:
            missing.append(n)
    m = {"needed": len(info.needed), "resolved": resolved, "runpath": info.runpath, "rpath": info.rpath}
    if missing:
        cuda = [n for n in missing if CUDA_LIB.match(n)]
        drv = [n for n in missing if DRIVER_LIBS.match(n)]
        m["missing"] = missing
        why = (f"{', '.join(missing)} not found under the env's loader path (RPATH/RUNPATH, "
               f"LD_LIBRARY_PATH, "
               f"ldconfig cache, default dirs, torch's lib/, site-packages nvidia/*/lib)")
        torch_cuda_libs = [n for n in missing if re.match(r"^lib(torch_cuda|c10_cuda)", n)]
        id_ = ("cuda-runtime-lib-missing" if cuda else "no-driver" if drv else
               "torch-cpu-only" if torch_cuda_libs and not target.torch_cuda else None)
        if id_ == "torch-cpu-only":
            why += ": the env's torch is a CPU build"
        return _check(f"{label}: NEEDED libraries", "fail", why, m, id_, str(path))
    if driver_missing:
        m["driver_missing"] = driver_missing
        return _check(f"{label}: NEEDED libraries", "skip",
                      f"{len(resolved)} of {len(info.needed)} resolve; "
                      f"{', '.join(driver_missing)} "
                      f"come with the NVIDIA driver, absent here ({target.no_gpu_reason})", m,
                      subject=str(path))
    return _check(f"{label}: NEEDED libraries", "pass",
                  f"all {len(info.needed)} resolve", m, subject=str(path))


def _runtime_check(label: str, path: Path, majors: dict[str, int], target: Target) -> dict:
    """CUDA runtime: the CUDA major it links is torch's (else the variant's)."""
    torch_cuda = target.torch_cuda
    want = torch_cuda or target.expect_cuda
    want_major = int(want.split(".")[0]) if want else None
    bad = {n: v for n, v in majors.items() if want_major is not None and v != want_major}
    m = {"links": majors, "torch_cuda": torch_cuda, "expected_cuda": want}
    if want_major is None:
        return _check(f"{label}: CUDA runtime", "skip",
                      "torch has no CUDA (CPU build): nothing to "
                      "compare the linked CUDA major with", m, subject=str(path))
    if bad:
        who = "torch's CUDA" if torch_cuda else "the variant's CUDA"
        return _check(f"{label}: CUDA runtime", "fail",
                      f"links {', '.join(bad)} (CUDA {sorted(set(bad.values()))[0]}) but {who} is "
                      f"{want}: a binary for another CUDA major", m, "cuda-runtime-lib-missing",
                      str(path))
    return _check(f"{label}: CUDA runtime", "pass",
                  f"CUDA {want_major} ({', '.join(sorted(majors))}) = "
                  f"{'torch' if torch_cuda else 'variant'}"
                  f" CUDA {want}", m, subject=str(path))


def check_library(path: Path, label: str, lp: LoaderPath | None, target: Target,
                  role: Role | None = None) -> list[dict]:
    """The binary checks of one library: NEEDED resolved (when lp is given), CUDA runtime major, fatbin archs
    (see :class:`Target`).

    role: how the package's Python imports it (roles.py), for a GPU it has no code for."""
    t0 = time.perf_counter()
    try:
        info = read_elf(path)
    except NotElf as e:
        return [_check(f"{label}: ELF", "fail", str(e), subject=str(path))]
    checks = []
    # 1. NEEDED
    if lp is not None:
        checks.append(_needed_check(label, path, info, lp, target))
    # 2. CUDA runtime major
    majors = cuda_majors(info.needed)
    if majors:
        checks.append(_runtime_check(label, path, majors, target))
    # 3. device code
    entries, used = fatbin_entries(path, info, target.cuobjdump, target.reader)
    if entries:
        summ = arch_summary(entries)
        m = {**summ, "reader": used, "containers": len({e.container for e in entries})}
        archs = " ".join(summ["sass"] + summ["ptx"])
        if not target.gpu_ccs:
            checks.append(_check(f"{label}: GPU archs", "skip",
                                 f"{target.no_gpu_reason}: nothing to compare {archs} with",
                                 m, subject=str(path)))
        else:
            checks.append(_arch_check(label, path, entries, target.gpu_ccs, m, role))
    for c in checks:
        c["metrics"].setdefault("seconds", round((time.perf_counter() - t0) / len(checks), 4))
    return checks


def dir_sources(package_dirs: dict[str, str]):
    """(path, text) of the Python files under installed package dirs, paths relative to site-packages."""
    for d in package_dirs.values():
        root = Path(d)
        if not root.is_dir():
            continue
        for f in root.rglob("*.py"):
            try:
                if f.stat().st_size <= MAX_SOURCE_BYTES:
                    yield f.relative_to(root.parent).as_posix(), f.read_text("utf-8", "replace")
            except OSError:
                continue


def find_libraries(package_dirs: dict[str, str], extra: list[str] | None = None) -> list[tuple[Path, str]]:
    """(file, label) for every compiled library under the package dirs (and extra files/dirs)."""
    out: list[tuple[Path, str]] = []
    seen: set[Path] = set()

    def add(p: Path, label: str) -> None:
        rp = p.resolve()
        if rp not in seen and p.is_file() and is_elf(p):
            seen.add(rp)
            out.append((p, label))

    for pkg, d in package_dirs.items():
        root = Path(d)
        if root.is_file():  # a top-level extension module (flash_attn_2_cuda.cpython-...so)
            add(root, root.name)
            continue
        for p in sorted(root.rglob("*.so*")):
            if "__pycache__" not in p.parts and re.search(r"\.so(\.\d+)*$", p.name):
                add(p, f"{pkg}/{p.relative_to(root)}")
    for x in extra or []:
        p = Path(x)
        if p.is_dir():
            for q in sorted(p.rglob("*.so*")):
                if re.search(r"\.so(\.\d+)*$", q.name):
                    add(q, str(q.relative_to(p)))
        else:
            add(p, p.name)
    return out


def check_libraries(libs: list[tuple[Path, str]], lp: LoaderPath | None, target: Target,
                    env: dict[str, str] | None = None, python_side: PythonSide | None = None) -> list[dict]:
    """check_library over libs ((file, label) with label the path inside site-packages); python_side gives
    each extension module's role where a GPU lacks its code.  cuobjdump is looked up in ``env`` (the
    target's own is not used)."""
    # cuobjdump is the second opinion where a verdict rests on the archs: with no GPU to compare them with
    # ('auto'), the built-in reader's summary is only reported, and cuobjdump's seconds per library are saved
    gpu_ccs, reader = target.gpu_ccs, target.reader
    wanted = reader == "cuobjdump" or (reader == "auto" and bool(gpu_ccs))
    target = replace(target, cuobjdump=find_cuobjdump(env) if wanted else None)
    checks: list[dict] = []
    for path, label in libs:
        role = python_side.role(label) if python_side is not None and gpu_ccs else None
        checks += check_library(path, label, lp, target, role)
    return checks


# ------------------------------------------------------------------------------------------- wheels

def wheel_metadata(zf: zipfile.ZipFile) -> dict:
    """Name, version and Requires-Dist of a wheel, from its .dist-info/METADATA."""
    name = next((n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)), None)
    meta: dict = {"requires": []}
    if not name:
        return meta
    for line in zf.read(name).decode("utf-8", "replace").splitlines():
        if not line.strip():
            break  # the body (description) starts
        k, _, v = line.partition(":")
        if k == "Name":
            meta["name"] = v.strip()
        elif k == "Version":
            meta["version"] = v.strip()
        elif k == "Requires-Dist":
            meta["requires"].append(v.strip())
    return meta


def _torch_pin(requires: list[str]) -> str | None:
    for r in requires:
        if ";" in r and "extra" in r.split(";", 1)[1]:
            continue
        m = re.match(r"^torch\s*(\(?\s*[=<>!~].*)?$", r.split(";")[0].strip())
        if m:
            return (m.group(1) or "").strip().strip("()").strip() or None
    return None


def pin_admits(pin: str, version: str) -> bool:
    """Whether a torch requirement's specifier admits the variant's torch version (local label ignored)."""
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
        v = Version(version)
        return SpecifierSet(pin).contains(Version(v.base_version), prereleases=True) or \
            SpecifierSet(pin).contains(v, prereleases=True)
    except Exception:  # an unreadable pin: compare as text
        return version.split("+")[0] in pin


def _same_member(info: zipfile.ZipInfo, path: Path) -> bool:
    """Whether ``path`` holds the wheel member ``info`` (same size and CRC-32; a folder of unpacked files
    cannot pass a member of another wheel off as this one's)."""
    try:
        if not path.is_file() or path.stat().st_size != info.file_size:
            return False
        crc = 0
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                crc = zlib.crc32(chunk, crc)
        return crc == info.CRC
    except OSError:
        return False


def wheel_sources(zf: zipfile.ZipFile):
    """(path, text) of a wheel's Python files (each under roles.MAX_SOURCE_BYTES; decompressed one at a
    time)."""
    for info in zf.infolist():
        if info.filename.endswith(".py") and info.file_size <= MAX_SOURCE_BYTES:
            with zf.open(info) as fh:
                yield info.filename, fh.read(MAX_SOURCE_BYTES + 1).decode("utf-8", "replace")


def _declared_extensions(label: str, wheel: Path, zf: zipfile.ZipFile, side: PythonSide,
                         declared: list[str]) -> list[dict]:
    """The variant's [verify] extensions that belong to this wheel's packages must be modules it ships: a
    release renames them (vLLM 0.25: ``_C`` -> ``_C_stable_libtorch``), and verify would fail after
    install."""
    tops = {n.split("/", 1)[0] for n in zf.namelist() if "/" in n and ".dist-info/" not in n + "/"}
    mine = [e for e in declared if e.split(".", 1)[0] in tops]
    if not mine:
        return []
    missing = [e for e in mine if e not in side.modules]
    m = {"declared": mine, "ships": sorted(side.modules)}
    if not missing:
        return [_check(f"wheel {label}: extension modules", "pass", f"ships {', '.join(mine)}", m,
                       subject=str(wheel))]
    m["missing"] = missing
    return [_check(f"wheel {label}: extension modules", "fail",
                   f"the variant's [verify] extensions names {', '.join(missing)}, which this wheel does "
                   f"not ship "
                   f"(it ships {', '.join(sorted(side.modules)) or 'none'}). Fix: remove "
                   f"{', '.join(missing)} from "
                   f"[verify] extensions (verify loads every extension module the release ships by default)",
                   m, subject=str(wheel))]


@dataclass(frozen=True)
class WheelOptions:
    """How :func:`check_wheel` reads a wheel: ``lp``: the env's loader path (None: NEEDED is not checked);
    ``env``: where cuobjdump is looked up; ``reader``, ``no_gpu_reason``: see :class:`Target`; ``unpacked``: a
    folder where this very wheel was unpacked (a scratch venv's site-packages): its libraries are read there
    instead of being extracted again (1 GB of writes for vLLM's); ``extensions``: the variant's
    ``[verify] extensions``."""

    lp: LoaderPath | None = None
    env: dict[str, str] | None = None
    reader: str = "auto"
    no_gpu_reason: str = "no GPU visible"
    unpacked: Path | None = None
    extensions: list[str] | None = None


def check_wheel(wheel: Path, variant_cuda: str, variant_torch: str, gpu_ccs: list[str],
                **options: object) -> list[dict]:
    """The binary layer on a wheel file before it is installed: torch pin and CUDA major vs the variant,
    NEEDED (the wheel's own libraries and the loader path given), device archs vs the GPUs (each library
    judged by what it is: roles.py), and the variant's ``[verify] extensions`` against what the wheel ships.

    ``options``: the fields of :class:`WheelOptions` as keywords."""
    opts = WheelOptions(**options)
    unpacked = opts.unpacked
    checks: list[dict] = []
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        return [_check(f"wheel {wheel.name}", "fail", f"not a readable wheel: {e}", subject=str(wheel))]
    with zf, tempfile.TemporaryDirectory(prefix="verify-wheel-") as tmp:
        meta = wheel_metadata(zf)
        pin = _torch_pin(meta["requires"])
        label = f"{meta.get('name', wheel.name)} {meta.get('version', '')}".strip()
        m = {"wheel": str(wheel), "torch_pin": pin, "variant_torch": variant_torch,
             "variant_cuda": variant_cuda}
        if pin is None:
            checks.append(_check(f"wheel {label}: torch pin", "pass", "no torch requirement", m,
                                 subject=str(wheel)))
        elif pin_admits(pin, variant_torch):
            checks.append(_check(f"wheel {label}: torch pin", "pass",
                                 f"torch{pin} admits the variant's torch "
                                 f"{variant_torch}", m, subject=str(wheel)))
        else:
            checks.append(_check(f"wheel {label}: torch pin", "fail",
                                 f"the wheel requires torch{pin}, the variant has torch {variant_torch}: "
                                 f"installing it would replace torch or fail to import", m,
                                 "torch-replaced", str(wheel)))
        members = [n for n in zf.namelist() if re.search(r"\.so(\.\d+)*$", n)]
        libs = []
        for n in members:
            there = unpacked / n if unpacked is not None else None
            if there is None or not _same_member(zf.getinfo(n), there):
                there = Path(zf.extract(n, tmp))
            libs.append((there, n))
        majors: dict[str, int] = {}
        for p, _ in libs:
            try:
                majors.update(cuda_majors(read_elf(p).needed))
            except NotElf:
                pass
        side = PythonSide(lambda: wheel_sources(zf), members)
        checks += _declared_extensions(label, wheel, zf, side, opts.extensions or [])
        target = Target(gpu_ccs, expect_cuda=variant_cuda, reader=opts.reader,
                        no_gpu_reason=opts.no_gpu_reason)
        checks += check_libraries(libs, opts.lp, target, opts.env, python_side=side)
        roots = [tmp, *([str(unpacked)] if unpacked is not None else [])]
        for c in checks:
            for root in roots:
                if c.get("subject", "").startswith(root + "/"):
                    c["subject"] = f"{wheel.name}!{c['subject'][len(root) + 1:]}"
        summ = {"libraries": len(libs), "cuda_majors": sorted(set(majors.values()))}
        checks.insert(1, _check(f"wheel {label}: contents", "pass" if libs else "skip",
                                f"{len(libs)} compiled libraries" if libs else "no compiled "
                                                                               "libraries: a pure "
                                "Python wheel", summ, subject=str(wheel)))
    return checks
