"""issue 16: `invoke plan` -- what runs on a machine, from its profile and the compatibility data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_harness.cli import main as cli
from vllm_harness.doctor import report as doctor
from vllm_harness.facts import compat, feasibility, planner
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
    # a release without wheels for 3.13 runs after installing its Python (the judge's fix, as doctor says it)
    short = [o for o in rep["options"] if o["python"] != "3.13" and o["vllm"]]
    assert short and all(o["tier"] in ("runs after fixes", "cannot") for o in short)
    assert all("no interpreter for it" in o["why"] for o in short)
    assert all(any(f"`uv python install {o['python']}`" in f for f in o["fixes"]) for o in short)
    assert rep["recommendation"]["python"] == "3.13"


def test_json_shape_and_write_builds_a_variant(tmp_path, capsys):
    out = tmp_path / "envs" / "mine.toml"
    rc = cli(["plan", "--machine", str(MACHINES / "rtx4090-driver550.toml"), "--write", str(out), "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 0 and set(rep) >= {"machine", "options", "recommendation"}
    # cli.md's keys, extended by the feasibility judge's tier and fixes (issue 28)
    assert set(rep["options"][0]) == {"cuda", "torch", "vllm", "python", "mode", "ok", "why", "tier", "fixes"}
    assert set(rep["recommendation"]) == {"variant", "cuda", "torch", "vllm", "python", "mode", "tier", "fixes",
                                          "reason"}
    assert set(rep["tiers"]) == {"runs", "runs_with_warnings", "runs_after_fixes"}
    assert all(o["ok"] == (o["tier"] in ("runs", "runs with warnings")) for o in rep["options"])
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


# ------------------------------------------------------------------------- issue 28: tiers and fleets

def test_plan_shows_the_tiers_and_the_platform(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    rc = cli(["plan", "--machine", str(MACHINES / "gh200-aarch64.toml")])
    text = " ".join(capsys.readouterr().out.split())
    assert rc == 0 and "aarch64 glibc 2.35" in text and "recommendation: cu128-vllm0191" in text
    assert "runs after fixes: vLLM" in text and "runs as is here" in text


def test_a_fleet_of_three_gets_the_fewest_variants_that_serve_them_all(capsys):
    names = ["gh200-aarch64", "rtx4090-driver550", "titanrtx-driver520"]
    rc = cli(["plan", "--json"] + [x for n in names for x in ("--machine", str(MACHINES / f"{n}.toml"))])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 0 and rep["machines"] == names and rep["unserved"] == []
    served = [m for v in rep["variants"] for m in v["machines"]]
    assert sorted(served) == sorted(names) and len(rep["variants"]) == 2     # each machine once, two variants
    data = compat.load()
    for v in rep["variants"]:
        # the variant's [deps] (a source build's cmake from PyPI) are part of what the judge weighs
        cand = feasibility.Candidate(v["cuda"], v["torch"], v["vllm"], v["mode"], torch_index=v["torch_index"],
                                     deps=tuple(planner._deps(data.vllm(v["vllm"]), v["mode"])))
        for m in v["machines"]:
            verdict = feasibility.judge(data, load_profile(MACHINES / f"{m}.toml"), cand)
            assert verdict.tier == v["machines"][m] and verdict.tier in ("runs", "runs with warnings")
    # the GH200 and the 4090 share one wheel variant (torch from the PyTorch index serves both platforms);
    # the TITAN RTX (sm 7.5, driver 520) gets a CUDA 11.8 source build for its arch only
    shared = next(v for v in rep["variants"] if "gh200-aarch64" in v["machines"])
    assert shared["mode"] == "wheel" and shared["torch_index"].endswith("/cu128") and "rtx4090-driver550" in shared["machines"]
    titan = next(v for v in rep["variants"] if "titanrtx-driver520" in v["machines"])
    assert titan["cuda"] == "11.8" and titan["mode"] == "source" and titan["arch_list"] == "7.5"


def test_a_fleet_names_the_machines_nothing_serves_and_refuses_write(tmp_path, capsys):
    rc = cli(["plan", "--json", "--machine", str(MACHINES / "rtx4090-driver550.toml"),
              "--machine", str(MACHINES / "gtx1080-driver550.toml")])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 1 and [u["machine"] for u in rep["unserved"]] == ["gtx1080-driver550"]
    assert "arch dropped" in rep["unserved"][0]["why"]
    rc = cli(["plan", "--machine", str(MACHINES / "rtx4090-driver550.toml"), "--machine",
              str(MACHINES / "gh200-aarch64.toml"), "--write", str(tmp_path / "x.toml")])
    assert rc == 2 and "several --machine" in capsys.readouterr().err and not (tmp_path / "x.toml").exists()
