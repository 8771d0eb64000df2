"""The several-GPU checks (issue 10), run here on CPU processes through gloo: same code path as NCCL."""

import json
import subprocess

import pytest
from conftest import ROOT

SCRIPT = ROOT / "src" / "vllm_harness" / "data" / "verify_dist.py"
pytestmark = pytest.mark.slow


def _run(py, *args):
    r = subprocess.run([str(py), str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("world", [2, 3])
def test_all_reduce_across_processes_sums_right(torch_python, world):
    out = _run(torch_python, "--backend", "gloo", "--world", str(world), "--sizes", "7,4096,262144", "--iters", "2")
    ar = next(c for c in out["checks"] if c["name"].startswith("all-reduce"))
    assert ar["status"] == "pass", ar
    assert [s["elements"] for s in ar["metrics"]["sizes"]] == [7, 4096, 262144]
    assert all(s["ok"] and s["bus_gbps"] > 0 for s in ar["metrics"]["sizes"])


def test_without_gpus_nccl_checks_are_skips_with_reasons(torch_python):
    out = _run(torch_python, "--backend", "nccl")
    by = {c["name"]: c for c in out["checks"]}
    assert out["gpus"] == 0
    assert by["p2p"]["status"] == "skip" and "needs 2 or more" in by["p2p"]["reason"]
    ar = next(c for n, c in by.items() if n.startswith("all-reduce"))
    assert ar["status"] == "skip" and "needs 2 or more GPUs" in ar["reason"]
    assert by["vllm custom all-reduce"]["status"] == "skip"


def test_verify_runs_the_multi_gpu_layer_in_the_envs_python(torch_python):
    """The plumbing `verify` uses when it sees 2+ GPUs; here (no GPU) every multi-GPU check is a skip."""
    import os

    from vllm_harness.verify import multi_gpu_layer
    result = {"layer_seconds": {}}
    checks = multi_gpu_layer(torch_python, dict(os.environ), result, timeout=300)
    assert {c["layer"] for c in checks} == {"multi-gpu"}
    assert {c["name"] for c in checks} >= {"p2p", "vllm custom all-reduce"}
    assert all(c["status"] == "skip" and c["reason"] for c in checks)
    assert result["layer_seconds"]["multi-gpu"] > 0
