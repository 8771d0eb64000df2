"""The wheel check judges each library by what it is (issue 25): its device code (kernels for particular GPUs
only: sm_90a, sm_100f) and how the package's Python imports it (unconditionally, or guarded), never by its name.

* the AST read of import sites (roles.py) on the forms vLLM uses;
* wheels built here with nvcc and the fixture's Python (tests/fixtures/vllm-mini/vllm): a ``_C`` built for
  sm_80 only is REFUSED on an H100 (9.0), while kernels for other GPUs and guarded imports are "not used";
* today's official vLLM 0.33.0 wheel (PyPI, cached): what ``nox -s build-cu130`` checks before install is
  ACCEPTED for sm_90, and a variant naming vLLM's old module names is refused before install."""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, needs_pypi

from vllm_harness.facts.variants import load_variant_file
from vllm_harness.verify import binaries as b
from vllm_harness.verify import checks as verify_mod
from vllm_harness.verify.roles import module_name, roles

NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
needs_nvcc = pytest.mark.skipif(not NVCC, reason="needs nvcc to build a fatbin")
FIXTURE_PY = ROOT / "tests" / "fixtures" / "vllm-mini" / "vllm"
KERNEL = "__global__ void k(float* a) { a[threadIdx.x] += 1.0f; }\n"


# ------------------------------------------------------------------------------------------ import sites

def test_module_names_of_extension_files():
    assert module_name("vllm/_C.abi3.so") == "vllm._C"
    assert module_name("vllm/third_party/deep_gemm/_C.cpython-312-x86_64-linux-gnu.so") == \
        "vllm.third_party.deep_gemm._C"
    assert module_name("vllm/libs/libfoo.so.1") is None
    assert module_name("nvidia/cu13/lib/libcudart.so.13") is None


def test_roles_from_the_forms_vllm_imports_with():
    src = {
        "pkg/platforms/cuda.py": "import contextlib\nimport pkg._C\nwith contextlib.suppress(ImportError):\n"
                                 "    import pkg._qutlass_C\n",
        "pkg/attn/interface.py": "try:\n    from . import _fa2_C\nexcept ImportError as e:\n    X = e\n",
        "pkg/ops/mla.py": "def load():\n    import pkg._mla_C\n",
        "pkg/models/kda.py": "if HAS:\n    import pkg._kda_C\n",
        "pkg/other.py": "import importlib\nimportlib.import_module('pkg._dyn_C')\n",
        "pkg/bad.py": "def (:\n",  # a file this interpreter cannot parse says nothing
        "pkg/tried.py": "try:\n    import pkg._wrong_C\nexcept KeyError:\n    pass\n",  # not an import guard
    }
    mods = {"pkg._C", "pkg._qutlass_C", "pkg.attn._fa2_C", "pkg._mla_C", "pkg._kda_C", "pkg._dyn_C",
            "pkg._wrong_C", "pkg._loaded_by_path_C"}
    r = roles(src.items(), mods)
    assert r["pkg._C"].kind == "required" and r["pkg._C"].where == "pkg/platforms/cuda.py:2"
    assert r["pkg._qutlass_C"].kind == "optional"
    assert r["pkg.attn._fa2_C"].kind == "optional"                    # relative import, try/except ImportError
    assert r["pkg._mla_C"].kind == "optional" and "inside a function" in r["pkg._mla_C"].where
    assert r["pkg._kda_C"].kind == "optional" and "under an if" in r["pkg._kda_C"].where
    assert r["pkg._dyn_C"].kind == "required"                         # importlib.import_module at module level
    assert r["pkg._wrong_C"].kind == "required"                       # except KeyError guards nothing
    assert r["pkg._loaded_by_path_C"].kind == "unknown"


# ------------------------------------------------------------------------------- wheels built with nvcc

def _nvcc_lib(tmp: Path, name: str, *gencode: str) -> Path:
    src = tmp / "k.cu"
    src.write_text(KERNEL)
    out = tmp / name
    args = [a for g in gencode for a in ("-gencode", g)]
    r = subprocess.run([NVCC, "-shared", "-Xcompiler", "-fPIC", "-cudart", "shared", *args, str(src), "-o",
                        str(out)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"this nvcc cannot build {gencode}: {r.stderr[-300:]}")
    return out


@pytest.fixture(scope="module")
def libs(tmp_path_factory) -> dict[str, Path]:
    if not NVCC:
        pytest.skip("needs nvcc to build a fatbin")
    tmp = tmp_path_factory.mktemp("nvcc")
    return {"sm80": _nvcc_lib(tmp, "sm80.so", "arch=compute_80,code=sm_80"),
            "sm80_90": _nvcc_lib(tmp, "sm80_90.so", "arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90"),
            "sm90a": _nvcc_lib(tmp, "sm90a.so", "arch=compute_90a,code=sm_90a")}


def _fixture_wheel(tmp: Path, files: dict[str, Path | str]) -> Path:
    """A vLLM-like wheel: the fixture's Python package (vllm/_custom_ops.py imports vllm._C unconditionally),
    libraries built with nvcc, and METADATA pinning torch 2.14.0."""
    w = tmp / "vllm-0.0.1-cp38-abi3-linux_x86_64.whl"
    with zipfile.ZipFile(w, "w") as z:
        z.writestr("vllm-0.0.1.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: vllm\nVersion: 0.0.1\nRequires-Dist: torch==2.14.0\n\n")
        for f in sorted(FIXTURE_PY.glob("*.py")):
            z.write(f, f"vllm/{f.name}")
        for member, what in files.items():
            z.write(what, member) if isinstance(what, Path) else z.writestr(member, what)
    return w


def _variant(tmp: Path, lib: Path, extensions: list[str] | None = None):
    """A wheel-mode variant whose CUDA is the one nvcc linked (libcudart.so.N) and whose torch is the pin."""
    major = next(v for v in b.cuda_majors(b.read_elf(lib).needed).values())
    ext = f"\n[verify]\nextensions = {extensions!r}\n".replace("'", '"') if extensions is not None else ""
    p = tmp / "v.toml"
    p.write_text(f'description = "t"\ncuda = "{major}.0"\npython = ">=3.10"\n[torch]\nversion = "2.14.0"\n'
                 f'packages = ["torch==2.14.0"]\n[vllm]\nversion = "0.0.1"\nmode = "wheel"\n{ext}')
    return load_variant_file(p)


def _judge(wheel: Path, variant, cc: str) -> tuple[str, dict[str, dict]]:
    res = verify_mod.verify_wheel(wheel, variant, dict(os.environ), None, [cc], reader="python")
    text, _ = verify_mod.wheel_verdict(res, allow_no_gpu=False)
    arch = {c["name"].split(": ")[0].split("/", 1)[-1]: c for c in res["checks"] if c["name"].endswith("GPU archs")}
    return text, arch


def test_a_core_library_built_for_sm80_only_is_refused_on_an_h100(tmp_path, libs):
    w = _fixture_wheel(tmp_path, {"vllm/_C.abi3.so": libs["sm80"]})
    text, arch = _judge(w, _variant(tmp_path, libs["sm80"]), "9.0")
    assert text.startswith("REFUSED"), text
    c = arch["_C.abi3.so"]
    assert c["status"] == "fail" and c["id"] == "no-kernel-image"
    assert "imported unconditionally at vllm/_custom_ops.py:4" in c["reason"], c["reason"]
    # the same library with sm_90 SASS: accepted; on an A100 (8.0) the sm_80-only one is accepted too
    w2 = _fixture_wheel(tmp_path / "..", {"vllm/_C.abi3.so": libs["sm80_90"]})
    assert _judge(w2, _variant(tmp_path, libs["sm80_90"]), "9.0")[0].startswith("ACCEPTED")
    assert _judge(w, _variant(tmp_path, libs["sm80"]), "8.0")[0].startswith("ACCEPTED")


def test_kernels_for_other_gpus_and_guarded_imports_are_not_used_never_refused(tmp_path, libs):
    guarded = "try:\n    from . import _fa2_C\nexcept ImportError:\n    _fa2_C = None\n"
    w = _fixture_wheel(tmp_path, {
        "vllm/_C.abi3.so": libs["sm80_90"],
        "vllm/_mla_C.abi3.so": libs["sm90a"],                 # no Python import at all: judged by its code
        "vllm/attn/__init__.py": "", "vllm/attn/iface.py": guarded,
        "vllm/attn/_fa2_C.abi3.so": libs["sm80"],             # generic sm_80, imported guarded
    })
    v = _variant(tmp_path, libs["sm80"])
    text, arch = _judge(w, v, "8.0")
    assert text.startswith("ACCEPTED"), text
    mla = arch["_mla_C.abi3.so"]
    assert mla["status"] == "pass" and mla["reason"].startswith("not used on sm_80: built for sm_90a only")
    assert mla["metrics"]["not_used"] == ["8.0"]
    text, arch = _judge(w, v, "7.5")                         # a T4: the core library has nothing for it
    assert text.startswith("REFUSED") and arch["_C.abi3.so"]["status"] == "fail"
    fa2 = arch["attn/_fa2_C.abi3.so"]
    assert fa2["status"] == "pass" and fa2["reason"].startswith("not used on sm_75"), fa2["reason"]
    assert "vllm/attn/iface.py:2 (try/except ImportError)" in fa2["reason"]
    # the same library imported unconditionally: the package needs it on every GPU, so it is refused there
    w2 = _fixture_wheel(tmp_path / "..", {"vllm/_C.abi3.so": libs["sm80_90"], "vllm/attn/__init__.py": "",
                                          "vllm/attn/iface.py": "from . import _fa2_C\n",
                                          "vllm/attn/_fa2_C.abi3.so": libs["sm80"]})
    _text, arch = _judge(w2, v, "9.0")
    assert arch["attn/_fa2_C.abi3.so"]["status"] == "fail"


def test_a_declared_extension_the_wheel_does_not_ship_is_refused_before_install(tmp_path, libs):
    w = _fixture_wheel(tmp_path, {"vllm/_C_stable_libtorch.abi3.so": libs["sm80_90"]})
    text, _ = _judge(w, _variant(tmp_path, libs["sm80_90"], ["vllm._C"]), "9.0")
    assert text.startswith("REFUSED: wheel vllm 0.0.1: extension modules"), text
    assert "it ships vllm._C_stable_libtorch" in text and "Fix: remove vllm._C" in text
    ok, _ = _judge(w, _variant(tmp_path, libs["sm80_90"], ["vllm._C_stable_libtorch", "xformers._C"]), "9.0")
    assert ok.startswith("ACCEPTED"), ok                      # xformers._C belongs to another wheel


# ------------------------------------------------------------------------------ today's official wheel

def _official_wheel(version: str) -> Path:
    """vLLM's Linux x86_64 wheel of ``version`` from PyPI, through the harness's fetcher, cached under
    .harness/cache/release-wheels (as benchmarks/bench_wheels.py keeps them)."""
    from vllm_harness.core.fetcher import Fetcher
    from vllm_harness.facts.package_index import Http, group_releases, pick_wheel, read_project
    cache = ROOT / ".harness" / "cache" / "release-wheels"
    http = Http(cache / "index")
    rel = next(r for r in group_releases(read_project(http, "https://pypi.org/simple", "vllm"), "vllm")
               if str(r.version) == version)
    f = pick_wheel(rel)
    dest = cache / f.filename
    if not dest.is_file():
        Fetcher(deadline_s=1200, request_deadline_s=1200).download(f.url, dest, max_bytes=2 << 30, sha256=f.sha256)
    return dest


@pytest.mark.network
def test_build_cu130_accepts_the_official_vllm_0_33_wheel_for_sm_90(tmp_path):
    needs_pypi()
    wheel = _official_wheel("0.33.0")
    variant = load_variant_file(ROOT / "envs" / "cu130.toml")
    assert variant.vllm["version"] == "0.33.0" and variant.vllm["mode"] == "wheel"
    text, arch = _judge(wheel, variant, "9.0")            # what install_checked_wheel asks before install
    assert text.startswith("ACCEPTED"), text
    core = arch["_C_stable_libtorch.abi3.so"]
    assert core["status"] == "pass" and "sm_90" in core["reason"] and core["metrics"]["role"] == "required"
    assert arch["_deepselect_C.abi3.so"]["reason"].startswith("not used on sm_90: built for sm_100f only")
    # the names the variant used to list are refused before install, with the names the release has
    (tmp_path / "old.toml").write_text((ROOT / "envs" / "cu130.toml").read_text()
                                       + '\n[verify]\nextensions = ["vllm._C", "vllm._moe_C"]\n')
    text, _ = _judge(wheel, load_variant_file(tmp_path / "old.toml"), "9.0")
    assert text.startswith("REFUSED") and "vllm._C_stable_libtorch" in text, text


# ------------------------------------------------------------------------------- the installed env's side

def test_an_extension_built_for_another_cpython_is_not_loaded():
    """vLLM ships deep_gemm's _C once per CPython (cpython-310 ... cpython-314): the env's python loads one."""
    sfx = [".cpython-312-x86_64-linux-gnu.so", ".abi3.so", ".so"]
    assert verify_mod.other_interpreter("v/deep_gemm/_C.cpython-310-x86_64-linux-gnu.so", sfx)
    assert not verify_mod.other_interpreter("v/deep_gemm/_C.cpython-312-x86_64-linux-gnu.so", sfx)
    assert not verify_mod.other_interpreter("v/_C_stable_libtorch.abi3.so", sfx)
    assert not verify_mod.other_interpreter("v/deep_gemm/_C.cpython-310-x86_64-linux-gnu.so", None)  # unknown


def test_a_declared_extension_an_installed_package_lacks_names_what_it_ships(tmp_path):
    pkg = tmp_path / "vllm"
    pkg.mkdir()
    files = {"vllm._C_stable_libtorch": str(pkg / "_C_stable_libtorch.abi3.so"),
             "vllm._moe_C_stable_libtorch": str(pkg / "_moe_C_stable_libtorch.abi3.so")}
    out = verify_mod.missing_extensions(["vllm._C", "vllm._C_stable_libtorch", "xformers._C"],
                                        {"vllm": str(pkg)}, files)
    assert [c["metrics"]["module"] for c in out] == ["vllm._C"]
    assert out[0]["status"] == "fail" and "it ships vllm._C_stable_libtorch, vllm._moe_C_stable_libtorch" in \
        out[0]["reason"]
