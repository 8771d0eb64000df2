"""ELF files and their CUDA fatbins, read with ``struct`` without loading them: the dynamic section (NEEDED,
SONAME, RPATH/RUNPATH) and the SASS/PTX archs of ``.nv_fatbin`` (or ``cuobjdump``), and which compute
capabilities those archs run on.  Stdlib only."""
from __future__ import annotations

import mmap
import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from vllm_harness.core import procs

ELF_MAGIC = b"\x7fELF"
FATBIN_MAGIC = 0xBA55ED50
FATBIN_MAGIC_BYTES = struct.pack("<I", FATBIN_MAGIC)
FATBIN_SECTIONS = (".nv_fatbin", "__nv_relfatbin")
KIND_PTX, KIND_ELF = 1, 2
FLAG_ARCH_SPECIFIC = 0x100000   # sm_90a / compute_90a: runs on that exact compute capability only
FLAG_FAMILY = 0x200000          # sm_100f: the family (same major, minor >= this one)

SHT_DYNAMIC = 6
PT_LOAD, PT_DYNAMIC = 1, 2
DT_NULL, DT_NEEDED, DT_STRTAB, DT_SONAME, DT_RPATH, DT_RUNPATH = 0, 1, 5, 14, 15, 29
_CUOBJ_LINE = re.compile(r"^(ELF|PTX) file\s+\d+:\s*(\S+)")
_CUOBJ_NAME = re.compile(r"\.(\d+)\.(sm|compute)_(\d+)([af]?)\.(cubin|ptx)$")


class NotElf(ValueError):
    pass


@dataclass
class Section:
    name: str
    type: int
    offset: int
    size: int
    addr: int
    link: int


@dataclass
class ElfInfo:
    path: str
    bits: int
    little: bool
    machine: int
    etype: int
    needed: list[str] = field(default_factory=list)
    soname: str | None = None
    rpath: list[str] = field(default_factory=list)
    runpath: list[str] = field(default_factory=list)
    sections: dict[str, Section] = field(default_factory=dict)


def _open_map(path: Path) -> tuple[object, mmap.mmap | bytes]:
    f = open(path, "rb")  # closed by the caller through _close
    size = os.fstat(f.fileno()).st_size
    if size < 16:
        f.close()
        raise NotElf(f"{path}: {size} bytes, not an ELF file")
    return f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


@dataclass(frozen=True)
class _Layout:
    """How to read one ELF file: its bytes, byte order (``e``: a struct prefix) and word size."""

    buf: object
    e: str
    bits: int

    def unpack(self, fmt64: str, fmt32: str, off: int) -> tuple:
        return struct.unpack_from(self.e + (fmt64 if self.bits == 64 else fmt32), self.buf, off)

    def size(self, fmt64: str, fmt32: str) -> int:
        return struct.calcsize(self.e + (fmt64 if self.bits == 64 else fmt32))


_SH = ("IIQQQQIIQQ", "IIIIIIIIII")   # a section header
_PH = ("IIQQQQQQ", "IIIIIIII")       # a program header
_DYN = ("qQ", "iI")                  # a dynamic entry


def _section_headers(
    lay: _Layout, shoff: int, shentsize: int, shnum: int, shstrndx: int
) -> tuple[list, int]:
    """The raw section headers (none when the table is missing or past the end) and the name table's
    index."""
    n = len(lay.buf)
    if not (shoff and shentsize >= lay.size(*_SH) and shoff < n):
        return [], shstrndx
    if shnum == 0:               # more than 0xff00 sections: the count is in section 0
        shnum = lay.unpack(*_SH, shoff)[5]
    if shstrndx == 0xFFFF:       # SHN_XINDEX
        shstrndx = lay.unpack(*_SH, shoff)[6]
    if shoff + shnum * shentsize > n:
        return [], shstrndx
    return [lay.unpack(*_SH, shoff + i * shentsize) for i in range(shnum)], shstrndx


def _add_sections(info: ElfInfo, buf, raw: list, shstrndx: int) -> None:
    stro = raw[shstrndx][4] if shstrndx < len(raw) else 0
    for sh in raw:
        nm, typ, _fl, addr, off, size, link = sh[:7]
        end = buf.find(b"\0", stro + nm) if stro else -1
        name = bytes(buf[stro + nm:end]).decode("latin-1") if end >= 0 else ""
        info.sections.setdefault(name, Section(name, typ, off, size, addr, link))


def _program_headers(lay: _Layout, phoff: int, phentsize: int, phnum: int) -> tuple[list, tuple | None]:
    """The PT_LOAD segments as (vaddr, offset, filesz), and PT_DYNAMIC's (offset, size) if any."""
    loads, dynamic = [], None
    if not (phoff and phentsize >= lay.size(*_PH) and phoff + phnum * phentsize <= len(lay.buf)):
        return loads, dynamic
    for i in range(phnum):
        p = lay.unpack(*_PH, phoff + i * phentsize)
        ptype, poff, pvaddr, pfilesz = (p[0], *p[2:4], p[5]) if lay.bits == 64 else (p[0], *p[1:3], p[4])
        if ptype == PT_LOAD:
            loads.append((pvaddr, poff, pfilesz))
        elif ptype == PT_DYNAMIC and dynamic is None:
            dynamic = (poff, pfilesz)
    return loads, dynamic


def _dynamic_entries(lay: _Layout, dyn_off: int, dyn_size: int) -> list[tuple[int, int]]:
    d_size = lay.size(*_DYN)
    entries = []
    for i in range(min(dyn_size, len(lay.buf) - dyn_off) // d_size):
        tag, val = lay.unpack(*_DYN, dyn_off + i * d_size)
        if tag == DT_NULL:
            break
        entries.append((tag, val))
    return entries


def _strtab_from_loads(entries: list[tuple[int, int]], loads: list) -> int | None:
    """DT_STRTAB is an address: its file offset through the PT_LOAD segments."""
    addr = next((v for t, v in entries if t == DT_STRTAB), None)
    str_off = None
    for vaddr, off, filesz in loads:
        if addr is not None and vaddr <= addr < vaddr + filesz:
            str_off = addr - vaddr + off
    return str_off


def _add_dynamic(info: ElfInfo, buf, entries: list[tuple[int, int]], str_off: int) -> None:
    n = len(buf)

    def s(off: int) -> str:
        end = buf.find(b"\0", str_off + off)
        return bytes(buf[str_off + off:end if end >= 0 else n]).decode("utf-8", "replace")

    for tag, val in entries:
        if tag == DT_NEEDED:
            info.needed.append(s(val))
        elif tag == DT_SONAME:
            info.soname = s(val)
        elif tag == DT_RPATH:
            info.rpath += [p for p in s(val).split(":") if p]
        elif tag == DT_RUNPATH:
            info.runpath += [p for p in s(val).split(":") if p]


def _parse(path: Path, buf) -> ElfInfo:
    if bytes(buf[:4]) != ELF_MAGIC:
        raise NotElf(f"{path}: not an ELF file")
    cls, data = buf[4], buf[5]
    if cls not in (1, 2) or data not in (1, 2):
        raise NotElf(f"{path}: unknown ELF class/data ({cls}, {data})")
    lay = _Layout(buf, "<" if data == 1 else ">", 64 if cls == 2 else 32)
    (etype, machine, _v, _entry, phoff, shoff, _flags, _ehsize, phentsize, phnum, shentsize, shnum,
     shstrndx) = lay.unpack("HHIQQQIHHHHHH", "HHIIIIIHHHHHH", 16)
    info = ElfInfo(str(path), lay.bits, data == 1, machine, etype)
    raw, shstrndx = _section_headers(lay, shoff, shentsize, shnum, shstrndx)
    if raw:
        _add_sections(info, buf, raw, shstrndx)
    # the dynamic section: through the section headers, else through the program headers
    dyn_off = dyn_size = str_off = None
    dyn = next((sh for sh in raw if sh[1] == SHT_DYNAMIC), None)
    if dyn is not None:
        dyn_off, dyn_size = dyn[4], dyn[5]
        if dyn[6] < len(raw):
            str_off = raw[dyn[6]][4]
    loads, pt_dynamic = _program_headers(lay, phoff, phentsize, phnum)
    if dyn_off is None and pt_dynamic is not None:
        dyn_off, dyn_size = pt_dynamic
    if dyn_off is None:
        return info  # a static binary or an object file: no NEEDED
    entries = _dynamic_entries(lay, dyn_off, dyn_size)
    if str_off is None:
        str_off = _strtab_from_loads(entries, loads)
    if str_off is not None:
        _add_dynamic(info, buf, entries, str_off)
    return info


def read_elf(path: str | Path) -> ElfInfo:
    """The ELF header, section table and dynamic section of a file; NotElf if it is none."""
    path = Path(path)
    f, buf = _open_map(path)
    try:
        return _parse(path, buf)
    except struct.error as e:
        raise NotElf(f"{path}: truncated or damaged ELF ({e})") from None
    finally:
        buf.close()
        f.close()


def is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == ELF_MAGIC
    except OSError:
        return False


def elf_kind(path: Path) -> tuple[int, int] | None:
    """(class, machine) of an ELF file, from its first 20 bytes; None if it is not one."""
    try:
        with open(path, "rb") as f:
            h = f.read(20)
    except OSError:
        return None
    if len(h) < 20 or h[:4] != ELF_MAGIC:
        return None
    return h[4], struct.unpack_from("<H" if h[5] == 1 else ">H", h, 18)[0]


@dataclass(frozen=True)
class FatEntry:
    kind: int        # KIND_PTX or KIND_ELF
    arch: int        # 80 for sm_80 / compute_80
    flags: int = 0
    container: int = 0

    @property
    def suffix(self) -> str:
        return "a" if self.flags & FLAG_ARCH_SPECIFIC else "f" if self.flags & FLAG_FAMILY else ""

    @property
    def label(self) -> str:
        return f"{'sm' if self.kind == KIND_ELF else 'compute'}_{self.arch}{self.suffix}"


def parse_fatbin(buf, start: int = 0, end: int | None = None) -> list[FatEntry]:
    """The entries of every fatbin container in buf[start:end] (a .nv_fatbin section holds one per
    translation unit).  Only the entry headers are read: compressed payloads need no decompression."""
    end = len(buf) if end is None else end
    out: list[FatEntry] = []
    pos, container = start, 0
    while pos + 16 <= end:
        magic, _version, hsize, fsize = struct.unpack_from("<IHHQ", buf, pos)
        if magic != FATBIN_MAGIC:
            nxt = buf.find(FATBIN_MAGIC_BYTES, pos + 1, end)
            if nxt < 0:
                break
            pos = nxt
            continue
        stop = min(pos + hsize + fsize, end)
        e = pos + hsize
        while e + 32 <= stop:
            kind, _ver, ehsize, payload = struct.unpack_from("<HHIQ", buf, e)
            if kind not in (KIND_PTX, KIND_ELF) or ehsize < 32:
                break
            arch = struct.unpack_from("<I", buf, e + 28)[0]
            flags = struct.unpack_from("<Q", buf, e + 40)[0] if ehsize >= 48 else 0
            out.append(FatEntry(kind, arch, flags, container))
            e += ehsize + payload
        container += 1
        pos = max(stop, pos + 16)
        pos += (-pos) % 8
    return out


def fatbin_entries_python(path: Path, info: ElfInfo | None = None) -> list[FatEntry]:
    info = info or read_elf(path)
    secs = [info.sections[n] for n in FATBIN_SECTIONS if n in info.sections]
    if not secs:
        return []
    f, buf = _open_map(path)
    try:
        out: list[FatEntry] = []
        for s in secs:
            if s.type == 8:  # SHT_NOBITS
                continue
            base = len({e.container for e in out})
            out += [FatEntry(x.kind, x.arch, x.flags, x.container + base)
                    for x in parse_fatbin(buf, s.offset, min(s.offset + s.size, len(buf)))]
        return out
    finally:
        buf.close()
        f.close()


def find_cuobjdump(env: dict[str, str] | None = None) -> str | None:
    env = dict(os.environ if env is None else env)
    found = shutil.which("cuobjdump", path=env.get("PATH"))
    if found:
        return found
    for home in [env.get("CUDA_HOME"), env.get("CUDA_PATH"), "/usr/local/cuda"]:
        if home and (Path(home) / "bin" / "cuobjdump").is_file():
            return str(Path(home) / "bin" / "cuobjdump")
    return None


def fatbin_entries_cuobjdump(path: Path, cuobjdump: str, timeout: float = 120) -> list[FatEntry] | None:
    """The entries as cuobjdump lists them; None when cuobjdump cannot read the file."""
    try:
        r = procs.run([cuobjdump, "--list-elf", "--list-ptx", str(path)], capture_output=True, text=True,
                      timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = []
    for line in r.stdout.splitlines():
        m = _CUOBJ_LINE.match(line.strip())
        if not m:
            continue
        n = _CUOBJ_NAME.search(m.group(2))
        if not n:
            continue
        flags = FLAG_ARCH_SPECIFIC if n.group(4) == "a" else FLAG_FAMILY if n.group(4) == "f" else 0
        out.append(FatEntry(KIND_ELF if m.group(1) == "ELF" else KIND_PTX, int(n.group(3)), flags,
                            int(n.group(1))))
    if r.returncode != 0 and not out:
        # "does not contain device code" is a normal answer for a host-only library
        return [] if "does not contain" in (r.stderr + r.stdout) else None
    return out


def fatbin_entries(
    path: Path, info: ElfInfo | None = None, cuobjdump: str | None = None, reader: str = "auto"
) -> tuple[list[FatEntry], str]:
    """(entries, reader): cuobjdump when there is one (reader 'auto' or 'cuobjdump'), else this module's.

    The built-in reader runs too (it takes milliseconds): when cuobjdump cannot read the file (an older
    toolkit's cuobjdump fails on newer fatbins) or lists nothing where there is device code, its answer
    counts;
    when both list entries and differ, cuobjdump's counts and the reader says so."""
    py = fatbin_entries_python(path, info)
    if reader in ("auto", "cuobjdump") and cuobjdump:
        got = fatbin_entries_cuobjdump(path, cuobjdump)
        if got is None or (not got and py):
            return py, f"python ({cuobjdump} could not read it)"
        if arch_summary(got) == arch_summary(py):
            return got, "cuobjdump (= built-in reader)"
        if _plain(got) == _plain(py) and len(got) == len(py):
            # cuobjdump's file names drop the family suffix (sm_100f listed as sm_100): the built-in reader
            # reads it from the entry's flags
            return py, "built-in reader (= cuobjdump, which names sm_XXXf as sm_XXX)"
        return got, "cuobjdump (the built-in reader differs)"
    return py, "python"


def _plain(entries: list[FatEntry]) -> dict:
    return {k: sorted({re.sub(r"f$", "", x) for x in v}) for k, v in arch_summary(entries).items()}


def _cc(cc: str) -> tuple[int, int]:
    major, minor = cc.split(".")[:2]
    return int(major), int(minor)


def _runs_on(e: FatEntry, cc: tuple[int, int]) -> bool:
    major, minor = divmod(e.arch, 10)
    if e.flags & FLAG_ARCH_SPECIFIC:
        return (major, minor) == cc
    if e.kind == KIND_ELF or e.flags & FLAG_FAMILY:  # SASS: same major, minor up to the GPU's
        return major == cc[0] and minor <= cc[1]
    return (major, minor) <= cc  # PTX: JIT-compiled for any newer GPU


def coverage(entries: list[FatEntry], cc: str) -> dict:
    """How one library's device code covers compute capability cc: 'sass', 'ptx' (JIT only) or 'none',
    plus how many of its containers (translation units) hold nothing for it."""
    c = _cc(cc)
    sass = sorted({e.label for e in entries if e.kind == KIND_ELF and _runs_on(e, c)})
    ptx = sorted({e.label for e in entries if e.kind == KIND_PTX and _runs_on(e, c)})
    by_container: dict[int, list[FatEntry]] = {}
    for e in entries:
        by_container.setdefault(e.container, []).append(e)
    uncovered = sum(1 for es in by_container.values() if not any(_runs_on(e, c) for e in es))
    return {
        "cc": cc,
        "level": "sass" if sass else "ptx" if ptx else "none",
        "sass": sass,
        "ptx": ptx,
        "containers": len(by_container),
        "containers_without_code": uncovered,
    }


def for_particular_gpus(entries: list[FatEntry]) -> bool:
    """Whether a library's device code is for particular GPUs only: SASS with architecture-specific (sm_90a)
    or
    family-specific (sm_100f) targets and no PTX -- code that by construction runs nowhere else."""
    return bool(entries) and all(
        e.kind == KIND_ELF and e.flags & (FLAG_ARCH_SPECIFIC | FLAG_FAMILY) for e in entries
    )


def arch_summary(entries: list[FatEntry]) -> dict:
    return {
        "sass": sorted({e.label for e in entries if e.kind == KIND_ELF}, key=_arch_key),
        "ptx": sorted({e.label for e in entries if e.kind == KIND_PTX}, key=_arch_key),
    }


def _arch_key(label: str) -> tuple[int, str]:
    m = re.search(r"_(\d+)([af]?)$", label)
    return (int(m.group(1)), m.group(2)) if m else (0, label)
