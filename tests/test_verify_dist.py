"""The several-GPU checks (issues 10, 20), run here on CPU processes through gloo: the same code path as NCCL.

vLLM's custom all-reduce runs here through tests/custom_ar_model.py, a CPU model of its ops with vLLM 0.21's
schemas (shared buffers whose handles are exchanged and opened, a signal barrier, dispose and free): the
harness's set-up, comparison, timing and teardown are the ones it runs on GPUs with vLLM's own library.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from packaging.specifiers import SpecifierSet
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

DATA = ROOT / "src" / "vllm_harness" / "data"
SCRIPT = DATA / "verify_dist.py"
MODEL = ROOT / "tests" / "custom_ar_model.py"
TABLE = tomllib.loads((DATA / "custom_ar_ops.toml").read_text())
sys.path.insert(0, str(DATA))
import verify_dist as vd  # noqa: E402  (standard library only at import time)


def _run(py, *args, env=None):
    r = subprocess.run([str(py), str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                       env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _by(out):
    return {c["name"].split(" (")[0]: c for c in out["checks"]}


# ------------------------------------------------------------------------------------------ the op table

def test_op_table_covers_060_to_latest_with_disjoint_ranges():
    gens = TABLE["generation"]
    assert [g["name"] for g in gens] == ["ipc-in-extension", "ipc-through-cudart", "tensor-ipc"]
    every = [Version(v) for g in gens for v in g["checked"]]
    assert len(every) == len(set(every))
    for g in gens:
        spec = SpecifierSet(g["releases"])
        assert all(Version(v) in spec for v in g["checked"]), g["name"]
        others = [o for o in gens if o is not g]
        assert not any(Version(v) in SpecifierSet(o["releases"]) for o in others for v in g["checked"])
        names = {s.split("(")[0] for s in g["schemas"]}
        assert set(g["needs"]) <= names, g["name"]
        init = next(s for s in g["schemas"] if s.startswith("init_custom_ar("))
        assert vd.first_arg_type(init) == g["init_first_arg"]
        assert g["source"] and g["setup"]
    assert Version("0.6.0") in SpecifierSet(gens[2]["releases"])
    assert {"0.6.0", "0.6.4", "0.8.3", "0.21.0"} <= {v for g in gens for v in g["checked"]}


def test_discovery_tells_the_generations_apart_from_their_schemas():
    for g in TABLE["generation"]:
        schemas = {s.split("(")[0]: s for s in g["schemas"]}
        assert vd.discover(schemas, TABLE)["name"] == g["name"]
        # one op the set-up needs missing: the next (older) generation only if its own needs are all there
        for op in g["needs"]:
            found = vd.discover({k: v for k, v in schemas.items() if k != op}, TABLE)
            assert found is None or found["name"] != g["name"]
    assert vd.discover({}, TABLE) is None
    # 0.21's ops but an init_custom_ar taking tensors: no generation has that
    gen0 = {s.split("(")[0]: s for s in TABLE["generation"][0]["schemas"]}
    gen0["init_custom_ar"] = TABLE["generation"][2]["schemas"][0]
    assert vd.discover(gen0, TABLE) is None


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1, 2])
def test_discovery_reads_the_ops_registered_in_torch(torch_python, index):
    """Each generation's schemas registered under _C_custom_ar (as vLLM's _C.abi3.so does): found by name."""
    g = TABLE["generation"][index]
    code = (f"import json, sys, torch; sys.path.insert(0, {str(DATA)!r}); import verify_dist as vd\n"
            "lib = torch.library.Library('_C_custom_ar', 'DEF')\n"
            f"for s in {g['schemas']!r}: lib.define(s)\n"
            "sch = vd.registered_schemas(torch, '_C_custom_ar')\n"
            f"print(json.dumps([sorted(sch), vd.discover(sch, vd.load_table())['name']]))")
    r = subprocess.run([str(torch_python), "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    names, found = json.loads(r.stdout.strip().splitlines()[-1])
    assert names == sorted(s.split("(")[0] for s in g["schemas"])
    assert found == g["name"]


# ------------------------------------------------------------------------------------------ parsing, judging

def test_topology_and_nvlink_rates_are_read_from_nvidia_smi():
    topo = ("\x1b[4m\tGPU0\tGPU1\tGPU2\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\n"
            "GPU0\t X \tNV18\tPHB\tSYS\t0-31\t0\t\tN/A\nGPU1\tNV18\t X \tPHB\tSYS\t0-31\t0\t\tN/A\n"
            "GPU2\tPHB\tPHB\t X \tSYS\t0-31\t0\t\tN/A\nNIC0\tSYS\tSYS\tSYS\t X\n\nLegend:\n  X    = Self\n")
    assert vd.parse_topo(topo) == {(0, 1): "NV18", (1, 0): "NV18", (0, 2): "PHB", (2, 0): "PHB", (1, 2): "PHB",
                                   (2, 1): "PHB"}
    rates = "GPU 0: NVIDIA H200 (UUID: GPU-a)\n\t Link 0: 26.562 GB/s\n\t Link 1: <inactive>\n" \
            "GPU 1: NVIDIA H200 (UUID: GPU-b)\n\t Link 0: 26.562 GB/s\n\t Link 1: 26.562 GB/s\n"
    assert vd.parse_nvlink_rates(rates) == {0: [26.562], 1: [26.562, 26.562]}
    assert vd.parse_topo("") == {} and vd.parse_nvlink_rates(None) == {}
    assert [vd.parse_size(x) for x in ("8K", "1M", "1G", "4096", "64KB")] == [8192, 1 << 20, 1 << 30, 4096, 65536]


def test_p2p_missing_over_nvlink_fails_and_over_pcie_passes_with_the_reason():
    nv = {"0->1": {"access": False, "link": "NV18", "gbps": 20.0}, "1->0": {"access": True, "link": "NV18"}}
    c = vd.judge_p2p(nv)
    assert c["status"] == "fail" and "0->1 (NV18)" in c["reason"] and c["id"] == "p2p-unavailable"
    pcie = {"0->1": {"access": False, "link": "PHB", "gbps": 11.2}, "1->0": {"access": False, "link": "PHB",
                                                                              "gbps": 11.9}}
    c = vd.judge_p2p(pcie)
    assert c["status"] == "pass" and "PCIe without P2P" in c["reason"] and "min 11 GB/s" in c["reason"]
    c = vd.judge_p2p({"0->1": {"access": False, "link": "unknown"}})
    assert c["status"] == "skip" and "no topology" in c["reason"]
    c = vd.judge_p2p({"0->1": {"access": True, "link": "NV4", "gbps": 90.0}})
    assert c["status"] == "pass" and "90 GB/s" in c["reason"]


# ------------------------------------------------------------------------------------------ on CPU processes

@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_all_reduce_across_processes_sums_right(torch_python, world):
    out = _run(torch_python, "--backend", "gloo", "--world", str(world), "--sizes", "28,4K,256K")
    ar = _by(out)["all-reduce"]
    assert ar["status"] == "pass", ar
    assert [s["bytes"] for s in ar["metrics"]["sizes"]] == [28, 4096, 262144]
    assert all(s["ok"] and s["bus_gbps"] > 0 and s["us"] > 0 for s in ar["metrics"]["sizes"])
    # bus bandwidth as NCCL's tests compute it
    s = ar["metrics"]["sizes"][-1]
    assert s["bus_gbps"] == pytest.approx(s["algbw_gbps"] * 2 * (world - 1) / world, rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_vllms_custom_all_reduce_set_up_runs_and_tears_down(torch_python, tmp_path, world):
    out = _run(torch_python, "--backend", "gloo", "--world", str(world), "--sizes", "8K", "--custom-sizes", "8K,64K",
               "--libs", str(MODEL), env={"CUSTOM_AR_MODEL_LOG": str(tmp_path)})
    c = _by(out)["vllm custom all-reduce"]
    assert c["status"] == "pass", c
    m = c["metrics"]
    assert m["generation"] == "ipc-in-extension" and m["releases"] == ">=0.8.3"
    assert [(r["dtype"], r["bytes"]) for r in m["sizes"]] == [("float16", 8192), ("float16", 65536),
                                                             ("bfloat16", 8192), ("bfloat16", 65536)]
    assert all(r["ok"] and r["custom_us"] > 0 and r["nccl_us"] > 0 for r in m["sizes"])
    if world == 2:
        assert all(r["exact"] for r in m["sizes"])
    assert m["teardown"] == {f"rank {r}": "dispose, 2 buffers freed" for r in range(world)}
    events = [[json.loads(ln) for ln in f.read_text().splitlines()] for f in tmp_path.glob("*.jsonl")]
    events = [e for e in events if any(x["event"] == "init" for x in e)]  # the ranks (the parent only discovers)
    assert len(events) == world
    for ev in events:
        kinds = [e["event"] for e in ev]
        # vLLM's order: meta and data buffers allocated, every peer's handle opened, init, register, ..., dispose,
        # then this rank's two buffers freed
        assert kinds == ["allocate"] + ["open"] * (world - 1) + ["allocate"] + ["open"] * (world - 1) + \
            ["init", "register_buffer", "dispose", "free", "free"]
        assert ev[0]["size"] == 64 + TABLE["max_size"] and ev[world]["size"] == TABLE["max_size"]
    names = {e["name"] for ev in events for e in ev if e["event"] == "allocate"}
    assert len(names) == 2 * world and not [n for n in names if os.path.exists(f"/dev/shm/{n}")]


@pytest.mark.slow
def test_a_wrong_custom_result_fails_the_check_and_still_tears_down(torch_python, tmp_path):
    out = _run(torch_python, "--backend", "gloo", "--world", "2", "--sizes", "8K", "--custom-sizes", "8K",
               "--libs", str(MODEL), env={"CUSTOM_AR_MODEL_LOG": str(tmp_path), "CUSTOM_AR_MODEL_WRONG_RANK": "1"})
    c = _by(out)["vllm custom all-reduce"]
    assert c["status"] == "fail" and c["id"] == "custom-all-reduce-wrong", c
    assert "differs from gloo's sum: float16 8 KB" in c["reason"]
    assert c["metrics"]["teardown"] == {"rank 0": "dispose, 2 buffers freed", "rank 1": "dispose, 2 buffers freed"}
    frees = [ln for f in tmp_path.glob("*.jsonl") for ln in f.read_text().splitlines() if '"free"' in ln]
    assert len(frees) == 4


@pytest.mark.slow
def test_custom_all_reduce_is_skipped_where_vllm_would_not_use_it(torch_python):
    out = _run(torch_python, "--backend", "gloo", "--world", "3", "--sizes", "8K", "--libs", str(MODEL))
    c = _by(out)["vllm custom all-reduce"]
    assert c["status"] == "skip" and "world size 3" in c["reason"] and "[2, 4, 6, 8]" in c["reason"]
    out = _run(torch_python, "--backend", "gloo", "--world", "2", "--sizes", "8K")
    c = _by(out)["vllm custom all-reduce"]
    assert c["status"] == "skip" and "no vLLM extension loaded" in c["reason"]


@pytest.mark.slow
def test_without_gpus_nccl_checks_are_skips_with_reasons(torch_python):
    out = _run(torch_python, "--backend", "nccl")
    by = _by(out)
    assert out["gpus"] == 0
    assert by["p2p"]["status"] == "skip" and "needs 2 or more" in by["p2p"]["reason"]
    assert by["all-reduce"]["status"] == "skip" and "needs 2 or more GPUs" in by["all-reduce"]["reason"]
    assert by["vllm custom all-reduce"]["status"] == "skip"


@pytest.mark.slow
def test_verify_runs_the_multi_gpu_layer_in_the_envs_python(torch_python):
    """The plumbing `verify` uses when it sees 2+ GPUs: the op table goes as JSON, the libraries as --libs;
    here on gloo, with the CPU model standing in for vLLM's library, and the figures rendered as tables."""
    from rich.console import Console

    from vllm_harness.verify.checks import multi_gpu_layer, multi_gpu_tables
    result = {"layer_seconds": {}}
    checks = multi_gpu_layer(torch_python, dict(os.environ), result, timeout=300, libs=[str(MODEL)], backend="gloo",
                             extra=["--world", "2", "--sizes", "8K,64K", "--custom-sizes", "8K"])
    assert {c["layer"] for c in checks} == {"multi-gpu"}
    assert [c["status"] for c in checks] == ["pass", "pass"], checks
    assert result["layer_seconds"]["multi-gpu"] > 0 and result["multi_gpu"]["world"] == 2
    result["checks"] = checks
    con = Console(width=200, record=True)
    for t in multi_gpu_tables(result):
        con.print(t)
    text = con.export_text()
    assert "gloo all-reduce, fp32" in text and "64 KB" in text
    assert "vLLM custom all-reduce vs gloo" in text and "bf16" in text and "exact" in text


@pytest.mark.slow
def test_an_installed_vllm_is_found_without_importing_it(torch_python, tmp_path):
    """No --libs: the _C libraries of the vllm package on the path are loaded (never `import vllm`, whose
    Python stack may be absent or broken); a library that does not load is named with its error."""
    pkg = tmp_path / "site" / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('vllm must not be imported by verify_dist')\n")
    (pkg / "_C.abi3.so").write_bytes(b"not an ELF file")
    (pkg / "_moe_C.abi3.so").write_bytes(b"")
    out = _run(torch_python, "--backend", "gloo", "--world", "2", "--sizes", "8K",
               env={"PYTHONPATH": str(tmp_path / "site")})
    assert list(out["libraries"]) == [str(pkg / "_C.abi3.so")]
    assert out["libraries"][str(pkg / "_C.abi3.so")]  # the loader's error
    c = _by(out)["vllm custom all-reduce"]
    assert c["status"] == "skip" and c["metrics"]["libraries"] == out["libraries"]
    assert c["reason"].startswith("vLLM's library did not load (_C.abi3.so: ")
