"""The GPU test set (`pytest -m gpu`): skipped with the reason where no NVIDIA GPU is visible.

On a GPU machine (no network needed; the interpreter's own torch is used):

    VLLM_HARNESS_GPU_LIBS=/path/to/vllm/_C.abi3.so python3 -m pytest -m gpu tests/test_gpu.py

* the fixture's CUDA flavour built through `build-variant` (tests/envs/fixture-cuda.toml) and verified;
* `verify --libs` on a real vLLM wheel's compiled libraries, when VLLM_HARNESS_GPU_LIBS names them;
* the multi-GPU layer (P2P, NCCL 8 KB - 1 GB, vLLM's custom all-reduce with those libraries) on every visible GPU.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.gpu


def _gpu_count() -> tuple[int, str]:
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return n, f"torch {torch.__version__} sees {n} CUDA GPU(s)"
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0, "no nvidia-smi and no torch in this interpreter"
    r = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    n = sum(ln.startswith("GPU ") for ln in r.stdout.splitlines()) if r.returncode == 0 else 0
    return n, f"nvidia-smi -L lists {n} GPU(s)"


GPUS, WHY = _gpu_count()
if GPUS == 0:
    pytestmark = [pytest.mark.gpu, pytest.mark.skip(reason=f"needs an NVIDIA GPU: {WHY}")]


def _libs() -> list[str]:
    libs = [p for p in os.environ.get("VLLM_HARNESS_GPU_LIBS", "").split(os.pathsep) if p]
    if not libs:
        pytest.skip("set VLLM_HARNESS_GPU_LIBS to a vLLM wheel's vllm/_C.abi3.so (or its vllm/ folder)")
    missing = [p for p in libs if not os.path.exists(p)]
    assert not missing, f"VLLM_HARNESS_GPU_LIBS names missing paths: {missing}"
    return libs


def _torch_python() -> str:
    pytest.importorskip("torch", reason="the GPU tests run in an interpreter that has a CUDA torch")
    return sys.executable


def _multi(checks):
    return {c["name"].split(" (")[0]: c for c in checks if c.get("layer") == "multi-gpu"}


def test_fixture_cuda_flavour_builds_and_verifies_on_the_gpu(harness, state):
    py = _torch_python()
    rc, out, err = harness("build-variant", "--variant", ROOT / "tests" / "envs" / "fixture-cuda.toml",
                           "--python", py, "--skip-doctor")
    assert rc == 0, out[-3000:] + err[-3000:]
    assert "VERIFIED (" in out, out[-3000:]
    rc, out, err = harness("verify", "--variant", ROOT / "tests" / "envs" / "fixture-cuda.toml", "--json")
    data = json.loads(out)
    assert rc == 0, [c for c in data["checks"] if c["status"] == "fail"]
    assert len(data["gpus"]) == GPUS
    cuda_kernels = [c for c in data["checks"] if c.get("layer") == "kernels" and "(cuda" in c["name"]]
    assert cuda_kernels and all(c["status"] == "pass" for c in cuda_kernels), cuda_kernels
    if GPUS >= 2:
        m = _multi(data["checks"])
        assert m["all-reduce"]["status"] == "pass", m["all-reduce"]
        # the fixture registers no custom all-reduce: a skip that says why, not a pass
        assert m["vllm custom all-reduce"]["status"] == "skip"
        assert "not registered" in m["vllm custom all-reduce"]["reason"]


def test_verify_with_a_real_vllm_wheels_libraries(harness, state):
    py = _torch_python()
    libs = _libs()
    args = ["verify", "--python", py, "--json", "--no-speed"]
    for p in libs:
        args += ["--libs", p]
    rc, out, err = harness(*args)
    data = json.loads(out)
    loads = [c for c in data["checks"] if c.get("layer") == "imports" and c["name"].startswith("load ")]
    # deep_gemm's _C ships once per CPython (vLLM >= 0.21): only this interpreter's build is loaded
    other = [c for c in loads if c["status"] == "skip" and c["reason"].startswith("built for another interpreter")]
    mine = f".cpython-{sys.version_info.major}{sys.version_info.minor}-"
    assert all(".cpython-" in c["name"] and mine not in c["name"] for c in other), other
    assert loads and all(c["status"] == "pass" for c in loads if c not in other), loads
    ops = [c for c in data["checks"] if c.get("layer") == "kernels" and c["status"] != "skip"]
    assert ops and all(c["status"] == "pass" for c in ops), [c for c in ops if c["status"] != "pass"]
    if GPUS >= 2:
        m = _multi(data["checks"])
        custom = m["vllm custom all-reduce"]
        assert custom["status"] == "pass", custom
        assert custom["metrics"]["generation"] == "ipc-in-extension"


@pytest.mark.skipif(GPUS < 2, reason=f"needs 2 or more GPUs: {WHY}")
def test_multi_gpu_layer_on_every_visible_gpu():
    py = _torch_python()
    from vllm_harness.verify.checks import multi_gpu_layer
    libs = [p for p in os.environ.get("VLLM_HARNESS_GPU_LIBS", "").split(os.pathsep) if p]
    result: dict = {}
    checks = multi_gpu_layer(py, dict(os.environ), result, timeout=900, libs=libs or None)
    m = _multi(checks)
    assert result["multi_gpu"]["world"] == GPUS
    p2p = m["p2p"]
    assert p2p["status"] == "pass", p2p
    assert len(p2p["metrics"]["pairs"]) == GPUS * (GPUS - 1)
    assert all(p["gbps"] > 0 for p in p2p["metrics"]["pairs"].values())
    ar = m["all-reduce"]
    assert ar["status"] == "pass", ar
    sizes = [s["bytes"] for s in ar["metrics"]["sizes"]]
    assert sizes[0] == 8 << 10 and sizes[-1] == 1 << 30
    assert all(s["ok"] and s["bus_gbps"] > 0 for s in ar["metrics"]["sizes"])
    custom = m["vllm custom all-reduce"]
    if libs:
        assert custom["status"] == "pass", custom
        rows = custom["metrics"]["sizes"]
        assert {r["dtype"] for r in rows} == {"float16", "bfloat16"}
        assert all(r["ok"] and r["custom_us"] > 0 and r["nccl_us"] > 0 for r in rows)
        # in CUDA graphs too (registered inputs, as vLLM's decode runs it), with the same sum
        assert custom["metrics"]["graph_error"] is None
        assert all(r["graph_ok"] and r["graph_custom_us"] > 0 and r["graph_nccl_us"] > 0 for r in rows)
        peers = 2 * (GPUS - 1)
        assert custom["metrics"]["teardown"] == {
            f"rank {r}": f"dispose, {peers} peer mappings closed, 2 buffers freed" for r in range(GPUS)}
    else:
        assert custom["status"] == "skip" and custom["reason"]
