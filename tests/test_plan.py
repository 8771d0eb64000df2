"""issue 16: `invoke plan` -- what runs on a machine, from its profile and the compatibility data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_harness.cli import main as cli
from vllm_harness.doctor import report as doctor
from vllm_harness.facts import compat, planner
from vllm_harness.facts.machine_profile import load_profile
from vllm_harness.facts.variants import load_variant_file

MACHINES = Path(__file__).parent / "machines"


def _plan(name: str) -> dict:
    return planner.plan(load_profile(MACHINES / f"{name}.toml"), compat.load(), name)


@pytest.mark.parametrize("name", ["rtx4090-driver550", "titanrtx-driver520", "titanrtx-driver470", "h100-driver535",
                                  "rtx4090-gcc13-ubuntu24"])
def test_recommends_a_cuda_line_the_driver_runs(name):
    rep = _plan(name)
    rec = rep["recommendation"]
    prof = load_profile(MACHINES / f"{name}.toml")
    runs, how = planner.driver_supports(compat.load(), rec["cuda"], prof["machine"]["driver"], prof["machine"]["driver_cuda"])
    assert runs, how
    assert {o["cuda"] for o in rep["options"]} == set(compat.load().cuda_versions())
    chosen = next(o for o in rep["options"] if o["cuda"] == rec["cuda"])
    assert chosen["ok"] and (chosen["vllm"], chosen["torch"], chosen["mode"]) == (rec["vllm"], rec["torch"], rec["mode"])


def test_source_document_machines():
    # the RTX 4090 on driver 550: the CUDA 12.4 wheel path; CUDA 13.0 is excluded for the driver
    rep = _plan("rtx4090-driver550")
    assert rep["recommendation"]["cuda"] == "12.4" and rep["recommendation"]["mode"] == "wheel"
    cu130 = next(o for o in rep["options"] if o["cuda"] == "13.0")
    assert not cu130["ok"] and "driver 550.54.15 too old" in cu130["why"]
    # the TITAN RTX (sm 7.5) on a CUDA 11.8-era driver: only 11.8, built from source with its toolkit
    rep = _plan("titanrtx-driver520")
    assert rep["recommendation"]["cuda"] == "11.8" and rep["recommendation"]["mode"] == "source"
    assert all(not o["ok"] for o in rep["options"] if o["cuda"] != "11.8")


def test_exclusion_reasons_name_arch_and_python():
    rep = _plan("gtx1080-driver550")     # Pascal sm 6.1: every vLLM in the data has dropped it
    assert rep["recommendation"] is None
    assert any("arch dropped" in o["why"] and "6.1" in o["why"] for o in rep["options"])
    rep = _plan("debian12-gcc12-python313")   # only Python 3.13 here
    assert any("no wheel for this Python" in o["why"] for o in rep["options"])
    assert rep["recommendation"]["python"] == "3.13"


def test_json_shape_and_write_builds_a_variant(tmp_path, capsys):
    out = tmp_path / "envs" / "mine.toml"
    rc = cli(["plan", "--machine", str(MACHINES / "rtx4090-driver550.toml"), "--write", str(out), "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 0 and set(rep) >= {"machine", "options", "recommendation"}
    assert set(rep["options"][0]) == {"cuda", "torch", "vllm", "python", "mode", "ok", "why"}
    assert set(rep["recommendation"]) == {"variant", "cuda", "torch", "vllm", "python", "mode"}
    v = load_variant_file(out)
    rec = rep["recommendation"]
    assert (v.cuda, v.torch["version"], v.vllm["version"], v.vllm["mode"]) == (rec["cuda"], rec["torch"], rec["vllm"], rec["mode"])
    # the written variant passes doctor on the machine it was planned for
    fs = doctor.check(v, load_profile(MACHINES / "rtx4090-driver550.toml"))
    assert doctor.verdict(fs) != "will fail", [f for f in fs if f.severity == "error"]


def test_source_variant_written_for_the_titan(tmp_path):
    rep = _plan("titanrtx-driver520")
    p = planner.write_variant(rep, compat.load(), tmp_path / "titan.toml")
    v = load_variant_file(p)
    assert v.vllm["mode"] == "source" and v.torch["index_url"].endswith("/cu118")
    assert all(r.endswith("+cu118") for r in v.torch["packages"])


def test_nothing_to_write_is_a_usage_error(tmp_path, capsys):
    rc = cli(["plan", "--machine", str(MACHINES / "gtx1080-driver550.toml"), "--write", str(tmp_path / "x.toml")])
    assert rc == 2 and "nothing runs" in capsys.readouterr().err and not (tmp_path / "x.toml").exists()
