"""verify: the binary layer on real ELF files (system libraries, libraries built here with gcc, fatbins built
with this machine's nvcc), NEEDED resolution (with a missing library), the wheel refusal, the verdict and
exit codes without a GPU, and the kernel layer against fake ops with vLLM's schemas (when torch is around)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import types
import zipfile
from pathlib import Path

import pytest
from conftest import needs_pypi

from vllm_harness.verify import binaries as b
from vllm_harness.verify import checks as verify_mod
from vllm_harness.verify import elf
from vllm_harness.verify.elf import FATBIN_MAGIC, parse_fatbin

GCC = shutil.which("gcc") or shutil.which("cc")
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
READELF = shutil.which("readelf")
needs_gcc = pytest.mark.skipif(not GCC, reason="needs a C compiler (gcc) to build test libraries")
needs_nvcc = pytest.mark.skipif(not NVCC, reason="needs nvcc to build a fatbin")

KERNEL = r"""
__global__ void add(float* a, const float* b, int n) { int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) a[i] += b[i]; }
extern "C" void launch(float* a, const float* b, int n) { add<<<(n + 255) / 256, 256>>>(a, b, n); }
"""


def _gcc(*args: str | Path) -> None:
    r = subprocess.run([GCC, *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _readelf_needed(path: Path) -> list[str]:
    out = subprocess.run([READELF, "-d", str(path)], capture_output=True, text=True).stdout
    return [ln.split("[", 1)[1].rstrip("]") for ln in out.splitlines() if "(NEEDED)" in ln]


# ----------------------------------------------------------------------------------------- ELF files

def _system_libs() -> list[Path]:
    import sysconfig
    cands = [Path(p) for p in ("/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6",
                               "/lib64/libc.so.6", "/usr/lib64/libc.so.6")]
    dyn = Path(sysconfig.get_paths()["stdlib"]) / "lib-dynload"
    cands += sorted(dyn.glob("_ssl*.so"))[:1] + sorted(dyn.glob("_ctypes*.so"))[:1]
    return [p for p in cands if p.is_file()]


@pytest.mark.skipif(not READELF, reason="needs readelf to compare with")
def test_needed_of_real_system_libraries_matches_readelf():
    libs = _system_libs()
    if not libs:
        pytest.skip("no system shared library found")
    for p in libs:
        info = b.read_elf(p)
        assert info.bits == 64 and info.needed == _readelf_needed(p), p
    libc = next((p for p in libs if p.name == "libc.so.6"), None)
    if libc:
        assert b.read_elf(libc).soname == "libc.so.6"


def test_not_elf_is_refused(tmp_path):
    f = tmp_path / "x.so"
    f.write_text("not an ELF file at all")
    with pytest.raises(b.NotElf):
        b.read_elf(f)
    checks = b.check_library(f, "x.so", None, b.Target())
    assert checks[0]["status"] == "fail" and "not an ELF" in checks[0]["reason"]


# ------------------------------------------------------------------------------------------ fatbins

def _fatbin_blob(entries: list[tuple[int, int, int]]) -> bytes:
    """A fatbin container as nvcc writes it: 16-byte header, then 64-byte entry headers + payloads."""
    body = b""
    for kind, arch, flags in entries:
        payload = b"\0" * 24
        hdr = struct.pack("<HHIQIIHHIIIQQQ", kind, 0x101, 64, len(payload), 0, 0, 8, 1, arch, 0, 0, flags, 0, 0)
        body += hdr + payload
    return struct.pack("<IHHQ", FATBIN_MAGIC, 1, 16, len(body)) + body


def test_parse_synthetic_fatbin_containers_and_coverage():
    blob = (b"\0" * 8 + _fatbin_blob([(2, 80, 0x11), (1, 90, 0x8011)])
            + _fatbin_blob([(2, 90, 0x108011), (2, 100, 0x1208011)]))
    es = parse_fatbin(blob)
    assert [e.label for e in es] == ["sm_80", "compute_90", "sm_90a", "sm_100f"]
    assert [e.container for e in es] == [0, 0, 1, 1]
    assert b.coverage(es, "9.0")["level"] == "sass"           # sm_90a on exactly 9.0
    assert b.coverage(es, "8.6")["level"] == "sass"           # sm_80 SASS runs on 8.6
    assert b.coverage(es, "8.6")["containers_without_code"] == 1
    assert b.coverage(es, "10.3")["level"] == "sass"          # sm_100f: the 10.x family
    assert b.coverage(es, "12.0")["level"] == "ptx"           # compute_90 JIT
    assert b.coverage(es, "7.5")["level"] == "none"           # nothing older than sm_80
    assert b.coverage([e for e in es if e.label != "compute_90"], "9.1")["level"] == "none"  # sm_90a: 9.0 only


def _nvcc_fatbin(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """KERNEL compiled by nvcc into a fatbin with ``args``: (the run, the fatbin, the source)."""
    src = tmp_path / "k.cu"
    src.write_text(KERNEL)
    fat = tmp_path / "k.fatbin"
    r = subprocess.run([NVCC, "-fatbin", *args, str(src), "-o", str(fat)], capture_output=True, text=True)
    return r, fat, src


@needs_nvcc
def test_fatbin_made_by_nvcc_lists_its_archs(tmp_path):
    r, fat, src = _nvcc_fatbin(tmp_path, "-gencode", "arch=compute_80,code=sm_80", "-gencode",
                               "arch=compute_90,code=compute_90")
    if r.returncode != 0:
        pytest.skip(f"nvcc cannot build here: {r.stderr[-300:]}")
    es = parse_fatbin(fat.read_bytes())
    assert {(e.kind, e.arch) for e in es} == {(elf.KIND_ELF, 80), (elf.KIND_PTX, 90)}
    assert b.arch_summary(es) == {"sass": ["sm_80"], "ptx": ["compute_90"]}
    # the same inside a shared library: found through the ELF's .nv_fatbin section
    so = tmp_path / "libk.so"
    r = subprocess.run([NVCC, "-shared", "-Xcompiler", "-fPIC", "-cudart", "shared", "-gencode",
                        "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=compute_90", str(src),
                        "-o", str(so)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = b.read_elf(so)
    assert ".nv_fatbin" in info.sections
    assert re_any(r"libcudart\.so\.\d+", info.needed)
    es2, reader = b.fatbin_entries(so, info, cuobjdump=None, reader="python")
    assert reader == "python" and b.arch_summary(es2) == {"sass": ["sm_80"], "ptx": ["compute_90"]}
    # on an H100 (9.0): PTX only -> a warning; on a V100 (7.0): nothing -> no-kernel-image predicted
    h100 = b.check_library(so, "libk.so", None, b.Target(["9.0"], reader="python"))
    arch = next(c for c in h100 if c["name"].endswith("GPU archs"))
    assert arch["status"] == "pass" and arch["metrics"]["warning"] == "ptx-only"
    v100 = b.check_library(so, "libk.so", None, b.Target(["7.0"], reader="python"))
    arch = next(c for c in v100 if c["name"].endswith("GPU archs"))
    assert arch["status"] == "fail" and arch["id"] == "no-kernel-image"
    # the CUDA major it links, against torch's
    nv_major = int(next(n for n in info.needed if n.startswith("libcudart.so.")).split(".")[2])
    cr = next(c for c in b.check_library(so, "libk.so", None, b.Target(torch_cuda=f"{nv_major}.0")) if c["name"].endswith("runtime"))
    assert cr["status"] == "pass"
    cr = next(c for c in b.check_library(so, "libk.so", None, b.Target(torch_cuda=f"{nv_major - 1}.8"))
              if c["name"].endswith("runtime"))
    assert cr["status"] == "fail" and cr["id"] == "cuda-runtime-lib-missing"


@needs_nvcc
def test_arch_specific_family_and_compressed_entries(tmp_path):
    r, fat, _src = _nvcc_fatbin(tmp_path, "-gencode", "arch=compute_90a,code=sm_90a", "-gencode",
                                "arch=compute_100f,code=sm_100f", "-Xfatbin", "-compress-all")
    if r.returncode != 0:
        pytest.skip(f"this nvcc does not know sm_90a/sm_100f: {r.stderr[-200:]}")
    es = parse_fatbin(fat.read_bytes())
    assert sorted(e.label for e in es) == ["sm_100f", "sm_90a"]


def re_any(pat: str, items: list[str]) -> bool:
    import re
    return any(re.fullmatch(pat, x) for x in items)


# ---------------------------------------------------------------------------------- NEEDED resolution

def _libs_with_runpath(tmp_path: Path, dep_soname: str = "libdep.so.7") -> tuple[Path, Path]:
    """deps/<dep_soname> and pkg/libuser.so, which NEEDs it through RUNPATH $ORIGIN/../deps."""
    (tmp_path / "deps").mkdir()
    (tmp_path / "pkg").mkdir()
    (tmp_path / "dep.c").write_text("int dep(void) { return 7; }\n")
    (tmp_path / "user.c").write_text("int dep(void);\nint user(void) { return dep(); }\n")
    dep = tmp_path / "deps" / dep_soname
    _gcc("-shared", "-fPIC", f"-Wl,-soname,{dep_soname}", "-o", dep, tmp_path / "dep.c")
    user = tmp_path / "pkg" / "libuser.so"
    _gcc("-shared", "-fPIC", "-o", user, tmp_path / "user.c", dep, "-Wl,--enable-new-dtags",
         "-Wl,-rpath,$ORIGIN/../deps")
    return dep, user


@needs_gcc
def test_needed_resolves_through_runpath_origin_and_a_missing_one_fails(tmp_path):
    dep, user = _libs_with_runpath(tmp_path)
    info = b.read_elf(user)
    assert "libdep.so.7" in info.needed and info.runpath == ["$ORIGIN/../deps"]
    lp = b.LoaderPath(ldcache=b.ldconfig_cache())
    path, how = b.resolve("libdep.so.7", info, lp)
    assert how == "RUNPATH" and Path(path).resolve() == dep.resolve()
    ok = next(c for c in b.check_library(user, "libuser.so", lp, b.Target()) if c["name"].endswith("NEEDED libraries"))
    assert ok["status"] == "pass", ok
    # the dependency gone: a failure naming it
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    dep.rename(moved / dep.name)
    bad = next(c for c in b.check_library(user, "libuser.so", lp, b.Target()) if c["name"].endswith("NEEDED libraries"))
    assert bad["status"] == "fail" and bad["metrics"]["missing"] == ["libdep.so.7"]
    # ... found again through LD_LIBRARY_PATH, or through what `import torch` loads (torch's lib/)
    lp2 = b.LoaderPath(ld_library_path=[str(moved)], ldcache=lp.ldcache)
    assert b.resolve("libdep.so.7", info, lp2)[1] == "LD_LIBRARY_PATH"
    torch_dir = tmp_path / "site" / "torch"
    (torch_dir / "lib").mkdir(parents=True)
    shutil.copy(moved / dep.name, torch_dir / "lib" / dep.name)
    lp3 = b.LoaderPath.for_env({}, [str(tmp_path / "site")], str(torch_dir), use_ldcache=False)
    path, how = b.resolve("libdep.so.7", info, lp3)
    assert "torch's lib/" in how


@needs_gcc
def test_missing_cuda_library_gets_its_id_and_driver_library_is_a_skip_without_driver(tmp_path):
    (tmp_path / "stub").mkdir()
    (tmp_path / "s.c").write_text("int s(void) { return 0; }\n")
    for soname in ("libcudart.so.10", "libcuda.so.1"):
        _gcc("-shared", "-fPIC", f"-Wl,-soname,{soname}", "-o", tmp_path / "stub" / soname, tmp_path / "s.c")
    (tmp_path / "u.c").write_text("int s(void);\nint u(void) { return s(); }\n")
    user = tmp_path / "libu.so"
    _gcc("-shared", "-fPIC", "-o", user, tmp_path / "u.c", "-Wl,--no-as-needed",
         tmp_path / "stub" / "libcudart.so.10", tmp_path / "stub" / "libcuda.so.1")
    info = b.read_elf(user)
    assert {"libcudart.so.10", "libcuda.so.1"} <= set(info.needed)
    lp = b.LoaderPath(ldcache={}, driver_present=False)
    checks = b.check_library(user, "libu.so", lp, b.Target(torch_cuda="13.0"))
    needed = next(c for c in checks if c["name"].endswith("NEEDED libraries"))
    assert needed["status"] == "fail" and needed["id"] == "cuda-runtime-lib-missing"
    assert needed["metrics"]["missing"] == ["libcudart.so.10"]   # libcuda.so.1: the driver's, absent here
    runtime = next(c for c in checks if c["name"].endswith("CUDA runtime"))
    assert runtime["status"] == "fail" and "libcudart.so.10" in runtime["reason"]
    lp_ok = b.LoaderPath(ld_library_path=[str(tmp_path / "stub")], ldcache={}, driver_present=False)
    needed = next(c for c in b.check_library(user, "libu.so", lp_ok, b.Target(torch_cuda="10.2"))
                  if c["name"].endswith("NEEDED libraries"))
    assert needed["status"] == "pass"


# ----------------------------------------------------------------------------------------- wheels

def _wheel(tmp_path: Path, torch_pin: str, so: Path | None, name: str = "vllm", modules: tuple[str, ...] = ("_C",)) -> Path:
    w = tmp_path / f"{name}-9.9.9-cp38-abi3-linux_x86_64.whl"
    with zipfile.ZipFile(w, "w") as z:
        z.writestr(f"{name}-9.9.9.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: {name}\nVersion: 9.9.9\nRequires-Dist: {torch_pin}\n"
                   f"Requires-Dist: zentorch; extra == \"zen\"\n\nA description. Requires-Dist: torch==0.0\n")
        z.writestr(f"{name}/__init__.py", "")
        for mod in modules if so is not None else ():
            z.write(so, f"{name}/{mod}.abi3.so")
    return w


def _links(tmp_path: Path, soname: str, out: Path | None = None) -> Path:
    """A shared library (tmp_path/_C.so, or ``out``) whose NEEDED names ``soname`` (a stub built in tmp_path/stub)."""
    (tmp_path / "stub").mkdir(exist_ok=True)
    (tmp_path / "s.c").write_text("int s(void) { return 0; }\n")
    _gcc("-shared", "-fPIC", f"-Wl,-soname,{soname}", "-o", tmp_path / "stub" / soname, tmp_path / "s.c")
    (tmp_path / "u.c").write_text("int s(void);\nint u(void) { return s(); }\n")
    so = out or tmp_path / "_C.so"
    _gcc("-shared", "-fPIC", "-o", so, tmp_path / "u.c", "-Wl,--no-as-needed", tmp_path / "stub" / soname)
    return so


@needs_gcc
def test_wheel_with_wrong_cuda_major_and_torch_pin_is_refused(tmp_path, harness):
    so = _links(tmp_path, "libcudart.so.12")
    bad = _wheel(tmp_path, "torch==2.6.0", so)
    checks = b.check_wheel(bad, "13.0", "2.11.0", ["9.0"])
    by = {c["name"].split(": ", 1)[-1]: c for c in checks}
    assert by["torch pin"]["status"] == "fail" and "torch==2.6.0" in by["torch pin"]["reason"]
    assert by["CUDA runtime"]["status"] == "fail" and "libcudart.so.12" in by["CUDA runtime"]["reason"]
    assert by["CUDA runtime"]["subject"].endswith("!vllm/_C.abi3.so")
    # through the command line: exit 1, the reason in the verdict
    rc, out, err = harness("verify", "--wheel", bad, "--variant", "cu130", "--cc", "9.0", "--json")
    data = json.loads(out)
    assert rc == 1 and data["verdict"].startswith("REFUSED") and "torch" in data["verdict"]
    # the right pin and CUDA 12 against a CUDA 12.4 variant with torch 2.6.0: accepted
    (tmp_path / "g").mkdir()
    good = _wheel(tmp_path / "g", "torch==2.6.0", so, modules=("_C", "_moe_C"))  # what cu124 verifies
    rc, out, err = harness("verify", "--wheel", good, "--variant", "cu124", "--cc", "9.0", "--json")
    data = json.loads(out)
    assert rc == 0 and data["verdict"].startswith("ACCEPTED"), data["verdict"]
    # no GPU and no --cc: the archs are not verified -> exit 1 unless --allow-no-gpu (when no GPU is visible)
    from vllm_harness.facts.machine import probe_gpus
    if not probe_gpus()[0]:
        rc, out, _ = harness("verify", "--wheel", good, "--variant", "cu124", "--json")
        assert rc == 1 and "NOT VERIFIED" in json.loads(out)["verdict"]
        rc, out, _ = harness("verify", "--wheel", good, "--variant", "cu124", "--json", "--allow-no-gpu")
        assert rc == 0


@needs_gcc
def test_wheel_check_reads_an_unpacked_copy_only_when_it_holds_this_wheels_files(tmp_path, monkeypatch):
    """The background check reads the libraries where uv unpacked the wheel (no second extraction); a file
    there that is not the wheel's member (another size or CRC) is not trusted: that member is extracted."""
    so = _links(tmp_path, "libcudart.so.12")
    whl = _wheel(tmp_path, "torch==2.6.0", so)
    site = tmp_path / "site"
    with zipfile.ZipFile(whl) as z:
        z.extractall(site)
    extracted: list[str] = []
    real = zipfile.ZipFile.extract
    monkeypatch.setattr(zipfile.ZipFile, "extract",
                        lambda self, n, *a, **k: (extracted.append(n), real(self, n, *a, **k))[1])
    checks = b.check_wheel(whl, "13.0", "2.6.0", [], unpacked=site)
    runtime = next(c for c in checks if c["name"].endswith("CUDA runtime"))
    assert extracted == [] and runtime["status"] == "fail" and "libcudart.so.12" in runtime["reason"]
    assert runtime["subject"] == f"{whl.name}!vllm/_C.abi3.so"
    # the unpacked copy replaced by another library (CUDA 11 here): the wheel's own member is read instead
    _links(tmp_path, "libcudart.so.11.0", out=site / "vllm" / "_C.abi3.so")
    checks = b.check_wheel(whl, "13.0", "2.6.0", [], unpacked=site)
    runtime = next(c for c in checks if c["name"].endswith("CUDA runtime"))
    assert extracted == ["vllm/_C.abi3.so"] and "libcudart.so.12" in runtime["reason"]
    assert runtime["subject"] == f"{whl.name}!vllm/_C.abi3.so"


def test_torch_pins_are_read_from_requires_dist():
    assert b._torch_pin(["numpy", "torch==2.11.0", "xformers"]) == "==2.11.0"
    assert b._torch_pin(["torch (>=2.5,<2.7)"]) == ">=2.5,<2.7"
    assert b._torch_pin(["torch==2.0; extra == 'x'", "numpy"]) is None
    assert b.pin_admits("==2.6.0", "2.6.0+cu118") and not b.pin_admits("==2.6.0", "2.11.0")


def test_usage_errors(harness, tmp_path):
    rc, out, err = harness("verify", "--wheel", tmp_path / "none.whl", "--variant", "cu130")
    assert rc == 2 and "no such file" in err
    w = tmp_path / "x.whl"
    w.write_bytes(b"PK")
    rc, out, err = harness("verify", "--wheel", w)
    assert rc == 2 and "--variant" in err
    rc, out, err = harness("verify", "--wheel", w, "--variant", "cu130", "--cc", "sm90")
    assert rc == 2 and "compute capability" in err


# ------------------------------------------------------------------------------ verdict, exit codes

def _result(checks, gpus=()):
    return {"python": "/x/python", "gpus": list(gpus), "checks": checks}


def test_verdict_without_gpu_is_not_verified_and_exits_1_unless_allowed():
    checks = [{"name": "vllm/_C.so: NEEDED libraries", "status": "pass", "reason": "", "metrics": {}},
              {"name": "rms_norm float16 (cuda)", "status": "skip", "reason": "no GPU", "metrics": {}}]
    text, code = verify_mod.verdict(_result(checks), "cuda", allow_no_gpu=False)
    assert code == 1 and text.startswith("NOT VERIFIED") and "binary checks ran: 1 passed" in text
    assert verify_mod.verdict(_result(checks), "cuda", allow_no_gpu=True)[1] == 0
    failed = checks + [{"name": "x: GPU archs", "status": "fail", "reason": "", "metrics": {}, "id": "no-kernel-image"}]
    text, code = verify_mod.verdict(_result(failed), "cuda", allow_no_gpu=True)
    assert code == 1 and "no-kernel-image" in text
    gpu = [{"name": "H100", "compute_capability": "9.0"}]
    warn = [{"name": "a", "status": "pass", "reason": "", "metrics": {"warning": "ptx-only"}}]
    assert verify_mod.verdict(_result(warn, gpu), "cuda", False) == ("VERIFIED (1 checks passed, 1 warning)", 0)


def test_cli_without_gpu_says_not_verified_and_exit_codes(harness, monkeypatch, tmp_path):
    fake = {"python": "/x/python", "python_version": "3.12", "gpus": [], "torch": "2.11.0", "torch_cuda": "13.0",
            "checks": [{"name": "vllm/_C.abi3.so: NEEDED libraries", "status": "pass", "reason": "all 9 resolve",
                        "metrics": {}, "layer": "binaries"},
                       {"name": "cuda-available", "status": "skip", "reason": "no GPU", "metrics": {},
                        "layer": "environment"}],
            "layer_seconds": {"environment": 0.5, "binaries": 0.1, "total": 0.6}}
    fake["layers"] = verify_mod.layer_summary(fake)
    monkeypatch.setattr(verify_mod, "run_verify", lambda *a, **k: json.loads(json.dumps(fake)))
    py = tmp_path / "python"
    py.write_text("")
    rc, out, err = harness("verify", "--python", py)
    assert rc == 1 and "NOT VERIFIED" in out and "binaries" in out
    rc, out, err = harness("verify", "--python", py, "--allow-no-gpu", "--json")
    data = json.loads(out)
    assert rc == 0 and data["verdict"].startswith("NOT VERIFIED") and data["checks"][0]["layer"] == "binaries"


# ------------------------------------------------------------------ the whole thing, where torch exists

FAKES = r'''
import torch
import torch.nn.functional as F

lib = torch.library.Library("_C", "DEF")
cache = torch.library.Library("_C_cache_ops", "DEF")
moe = torch.library.Library("_moe_C", "DEF")
# vLLM 0.20.2's schemas (read from its _C.abi3.so / _moe_C.abi3.so)
lib.define("rms_norm(Tensor! result, Tensor input, Tensor weight, float epsilon) -> ()")
lib.define("silu_and_mul(Tensor! result, Tensor input) -> ()")
lib.define("gelu_and_mul(Tensor! out, Tensor input) -> ()")
lib.define("rotary_embedding(Tensor positions, Tensor! query, Tensor!? key, int head_size, Tensor cos_sin_cache, "
           "bool is_neox, int rope_dim_offset=0, bool inverse=False) -> ()")
lib.define("static_scaled_fp8_quant(Tensor! result, Tensor input, Tensor scale, (int, int)? group_shape=None) -> ()")
lib.define("gelu_tanh_and_mul(Tensor! out, Tensor input, int mystery) -> ()")
cache.define("reshape_and_cache(Tensor key, Tensor value, Tensor! key_cache, Tensor! value_cache, "
             "Tensor slot_mapping, str kv_cache_dtype, Tensor k_scale, Tensor v_scale) -> ()")
cache.define("reshape_and_cache_flash(Tensor key, Tensor value, Tensor! key_cache, Tensor! value_cache, "
             "Tensor slot_mapping, str kv_cache_dtype, Tensor k_scale, Tensor v_scale) -> ()")
moe.define("topk_softmax(Tensor! topk_weights, Tensor! topk_indices, Tensor! token_expert_indices, "
           "Tensor gating_output, bool renormalize, Tensor? bias) -> ()")

def rms_norm(out, x, w, eps):
    xf = x.float()
    out.copy_((xf / torch.sqrt((xf * xf).mean(-1, keepdim=True) + eps)).to(x.dtype) * w)

def act(fn):
    def impl(out, x):
        d = x.shape[-1] // 2
        out.copy_(fn(x[..., :d].float()) * x[..., d:].float())
    return impl

def rope(positions, query, key, head_size, cache, is_neox):
    rot = cache.shape[-1]
    for t in range(positions.shape[0]):
        c, s = cache[positions[t]].float().chunk(2)
        for x in (query, key):
            v = x[t].view(-1, head_size)
            r = v[:, :rot].float()
            if is_neox:
                a, b = r[:, :rot // 2], r[:, rot // 2:]
                v[:, :rot] = torch.cat([a * c - b * s, b * c + a * s], -1).to(x.dtype)
            else:
                a, b = r[:, 0::2], r[:, 1::2]
                v[:, :rot] = torch.stack([a * c - b * s, b * c + a * s], -1).flatten(-2).to(x.dtype)

def reshape_and_cache(key, value, kc, vc, slots, kv_dtype, ks, vs):
    bs, x = kc.shape[3], kc.shape[4]
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        blk, off = divmod(slot, bs)
        kc[blk, :, :, off, :] = key[t].reshape(key.shape[1], -1, x)
        vc[blk, :, :, off] = value[t]

def reshape_and_cache_flash(key, value, kc, vc, slots, kv_dtype, ks, vs):
    bs = kc.shape[1]
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            kc[slot // bs, slot % bs] = key[t]
            vc[slot // bs, slot % bs] = value[t]

def topk_softmax(w, idx, tei, gating, renormalize, bias):
    p = torch.softmax(gating.float(), -1)
    v, i = p.topk(w.shape[1], -1)
    if renormalize:
        v = v / v.sum(-1, keepdim=True)
    w.copy_(v)
    idx.copy_(i)
    tei.copy_(torch.arange(i.numel()).view(i.shape))

lib.impl("rms_norm", rms_norm, "CPU")
lib.impl("silu_and_mul", act(F.silu), "CPU")
lib.impl("gelu_and_mul", act(lambda a: F.gelu(a) * 1.01), "CPU")   # a wrong kernel: 1% off
lib.impl("rotary_embedding", rope, "CPU")
lib.impl("gelu_tanh_and_mul", lambda out, x, m: None, "CPU")
cache.impl("reshape_and_cache", reshape_and_cache, "CPU")
cache.impl("reshape_and_cache_flash", reshape_and_cache_flash, "CPU")
moe.impl("topk_softmax", topk_softmax, "CPU")
'''


@pytest.mark.slow
def test_kernel_layer_against_fake_ops_with_vllm_schemas(tmp_path, torch_python):
    py = str(torch_python)
    (tmp_path / "fakes.py").write_text(FAKES)
    script = Path(verify_mod.SCRIPT)
    driver = (f"import sys, runpy; sys.path.insert(0, {str(tmp_path)!r}); import fakes; "
              f"sys.argv = [{str(script)!r}, '--device', 'cpu', '--ops', 'rms_norm,silu_and_mul,fused_add_rms_norm']; "
              f"runpy.run_path({str(script)!r}, run_name='__main__')")
    r = subprocess.run([py, "-c", driver], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])
    by = {c["name"]: c for c in data["checks"]}
    for op in ("rms_norm", "silu_and_mul", "rotary_embedding", "reshape_and_cache", "reshape_and_cache_flash",
               "topk_softmax"):
        for dt in ("float32", "float16", "bfloat16"):
            c = by[f"{op} {dt} (cpu)"]
            assert c["status"] == "pass", c
    assert by["topk_softmax float32 (cpu)"]["metrics"]["optional_args_none"] == ["bias"]
    # the 1%-off gelu is caught in float32 (tolerance 1e-4) ...
    assert by["gelu_and_mul float32 (cpu)"]["status"] == "fail"
    # ... an argument the checker does not know is a skip with the schema, not a guess
    g = by["gelu_tanh_and_mul float32 (cpu)"]
    assert g["status"] == "skip" and "mystery" in g["reason"]
    # fp8 is a GPU check; the required op missing from the build fails
    assert by["static_scaled_fp8_quant float16 (cpu)"]["status"] == "skip"
    assert by["fused_add_rms_norm"]["status"] == "fail"
    assert by["ops discovered"]["metrics"]["namespaces"] == {"_C": 6, "_C_cache_ops": 2, "_moe_C": 1}
    assert set(data["layer_seconds"]) >= {"environment", "imports", "kernels"}


def _verify_env_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("verify_env_under_test", verify_mod.SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_xformers_load_error_reads_xformers_own_exception():
    ve = _verify_env_module()
    ok = types.SimpleNamespace(_cpp_lib=types.SimpleNamespace(_cpp_library_load_exception=None))
    assert ve.xformers_load_error(ok) is None
    exc = RuntimeError("xFormers can't load C++/CUDA extensions. xFormers was built for:\n"
                       "    PyTorch 2.10.0+cu128 with CUDA 1208 (you have 2.11.0+cu130)\n"
                       "    Python  3.10.19 (you have 3.12.3)\n  Please reinstall xformers (see ...)\n")
    exc.__cause__ = OSError("Could not load this library: /x/xformers/_C.so")
    text = ve.xformers_load_error(types.SimpleNamespace(_cpp_lib=types.SimpleNamespace(_cpp_library_load_exception=exc)))
    assert "PyTorch 2.10.0+cu128" in text and "you have 2.11.0+cu130" in text and "_C.so" in text
    assert "Please reinstall" not in text
    assert ve.classify(text) == "xformers-torch-mismatch"


@pytest.mark.slow
@pytest.mark.network
def test_an_xformers_built_for_another_torch_fails_verify_though_it_imports(tmp_path, torch_python):
    """The real xformers 0.0.35 wheel (built for torch 2.10.0+cu128) imports on this torch 2.13 but its library does
    not load; verify fails the import with xformers-torch-mismatch (on the H100 with torch 2.11.0+cu130 the same
    wheel gave 'No operator found for memory_efficient_attention_forward')."""
    needs_pypi()
    import urllib.request

    from vllm_harness.steps.fetch import PYPI_SIMPLE, get_json

    # PyPI's simple index as PEP 691 JSON (the test env may have no pip: nox's uv backend)
    index = get_json(PYPI_SIMPLE.format(name="xformers"), accept="application/vnd.pypi.simple.v1+json")
    url = next(f["url"] for f in index["files"]
               if f["filename"] == "xformers-0.0.35-py39-none-manylinux_2_28_x86_64.whl")
    wheel = tmp_path / "xformers-0.0.35-py39-none-manylinux_2_28_x86_64.whl"
    with urllib.request.urlopen(url, timeout=300) as r:
        wheel.write_bytes(r.read())
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([str(torch_python), str(verify_mod.SCRIPT), "--device", "cpu", "--imports", "xformers"],
                       capture_output=True, text=True, timeout=300, env=env)
    data = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])
    by = {c["name"]: c for c in data["checks"]}
    imp = by["import xformers"]
    assert imp["status"] == "fail" and imp["id"] == "xformers-torch-mismatch", imp
    assert "PyTorch 2.10.0" in imp["reason"] and "you have 2.13.0" in imp["reason"]
    att = by["xformers memory_efficient_attention float16 (cpu)"]
    assert att["status"] == "fail" and att["id"] == "xformers-torch-mismatch"
