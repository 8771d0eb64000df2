"""Issue 17: verify's result is kept with the inputs it proved and reused while they are unchanged."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from vllm_harness.core.layout import Layout
from vllm_harness.core.options import RunOptions
from vllm_harness.core.status import Status
from vllm_harness.facts.variants import load_variant
from vllm_harness.pipeline.steps import GRAPH
from vllm_harness.steps import verify as verify_step
from vllm_harness.steps.context import Ctx


@pytest.fixture
def ctx(state, tmp_path):
    layout = Layout.default(ROOT)
    c = Ctx(layout=layout, variant=load_variant(str(ROOT / "tests" / "envs" / "fixture-cpu.toml"), layout.envs_dirs),
            options=RunOptions(quiet=True))
    c.status = Status(layout.status(c.name), c.name, GRAPH)   # as the pipeline opens it
    base = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base, "-m", "venv", "--without-pip", str(c.venv)], check=True, timeout=120)
    site = next(c.venv.glob("lib/python*/site-packages"))
    dist = site / "demo-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n")
    (dist / "RECORD").write_text("demo/__init__.py,sha256=aaaa,10\n")
    c.site = site
    return c


def _recorded(c: Ctx, proof: dict, verdict: str = "VERIFIED (3 checks passed)") -> None:
    c.status.finish("post-install", "pk", None, 1.0)
    result = {"checks": [{"name": "x", "status": "pass", "layer": "imports", "metrics": {}}], "gpus": []}
    c.status.finish("verify", proof["key"], None, 7.0, note=verdict, result=result, proof=proof["summary"],
                    proof_key=proof["key"])


def test_same_inputs_reuse_the_result_and_every_input_change_runs_it_again(ctx):
    ctx.status.finish("post-install", "pk", None, 1.0)
    first = verify_step.proof_of(ctx, {})
    assert first["summary"]["distributions"] >= 1
    _recorded(ctx, first)
    again = verify_step.proof_of(ctx, {})
    assert again["key"] == first["key"]
    s = verify_step.reusable(ctx, again)
    assert s is not None and "inputs unchanged" in verify_step.reused_line(s)

    # a distribution's files changed (RECORD's hashes): run again
    (ctx.site / "demo-1.0.dist-info" / "RECORD").write_text("demo/__init__.py,sha256=bbbb,10\n")
    changed = verify_step.proof_of(ctx, {})
    assert changed["key"] != first["key"] and verify_step.reusable(ctx, changed) is None
    # a new distribution
    _recorded(ctx, changed)
    (ctx.site / "other-2.0.dist-info").mkdir()
    (ctx.site / "other-2.0.dist-info" / "RECORD").write_text("other.py,,\n")
    added = verify_step.proof_of(ctx, {})
    assert added["key"] != changed["key"] and added["summary"]["distributions"] == changed["summary"]["distributions"] + 1
    # other checks asked for, or the build steps before it redone
    _recorded(ctx, added)
    assert verify_step.proof_of(ctx, {"speed": False})["key"] != added["key"]
    ctx.status.finish("post-install", "pk2", None, 1.0)
    assert verify_step.proof_of(ctx, {})["key"] != added["key"]


def test_an_editable_install_is_proved_by_its_compiled_libraries(ctx, tmp_path):
    tree = tmp_path / "tree"
    (tree / "pkg").mkdir(parents=True)
    so = tree / "pkg" / "_C.so"
    so.write_bytes(b"\x7fELF one")
    dist = ctx.site / "pkg-0.1.dist-info"
    dist.mkdir()
    (dist / "RECORD").write_text("pkg.pth,,\n")
    (dist / "direct_url.json").write_text(json.dumps({"url": tree.as_uri(), "dir_info": {"editable": True}}))
    before, _ = verify_step.env_fingerprint(ctx.py, ctx.env())
    so.write_bytes(b"\x7fELF rebuilt, longer")
    after, _ = verify_step.env_fingerprint(ctx.py, ctx.env())
    assert before != after


def test_reverify_force_and_a_verdict_this_run_refuses_are_not_reused(ctx):
    proof = verify_step.proof_of(ctx, {})
    _recorded(ctx, proof, "NOT VERIFIED on a GPU")
    ctx.variant.verify["device"] = "cuda"   # the recorded result saw no GPU
    assert verify_step.reusable(ctx, proof, allow_no_gpu=True) is not None
    assert verify_step.reusable(ctx, proof, allow_no_gpu=False) is None   # --strict-verify runs it
    ctx.options = ctx.options.replace(reverify=True)
    assert verify_step.reusable(ctx, proof) is None
    ctx.options = ctx.options.replace(reverify=False, force=True)
    assert verify_step.reusable(ctx, proof) is None
    ctx.options = ctx.options.replace(force=False)
    ctx.status.fail("verify", None, "boom")
    assert verify_step.reusable(ctx, proof) is None


def test_reverify_is_a_flag_of_verify_and_build_variant():
    from vllm_harness.commands.table import BY_NAME
    for name in ("verify", "build-variant"):
        assert "--reverify" in {a.flag for a in BY_NAME[name].args}


def test_clean_uv_cache_is_opt_in_and_clears_uv_cache_dir(harness, state, tmp_path, monkeypatch):
    """`invoke clean --uv-cache` clears uv's own cache (here UV_CACHE_DIR), reported with its path; without the
    flag it is left alone; --dry-run only reports."""
    cache = tmp_path / "uv-cache"
    monkeypatch.setenv("UV_CACHE_DIR", str(cache))
    from vllm_harness.facts.machine import uv_bin
    subprocess.run([uv_bin(), "cache", "dir"], check=True, capture_output=True)   # uv answers for it
    (cache / "wheels-v5").mkdir(parents=True)
    (cache / "wheels-v5" / "blob").write_bytes(b"x" * 4096)
    rc, out, err = harness("clean", "--all", "--json")
    assert rc == 0 and (cache / "wheels-v5" / "blob").exists() and "uv cache" not in out
    rc, out, err = harness("clean", "--all", "--uv-cache", "--dry-run", "--json")
    data = json.loads(out)
    assert rc == 0 and any(str(cache) in r for r in data["removed"]) and data["bytes"] >= 4096
    assert (cache / "wheels-v5" / "blob").exists()
    rc, out, err = harness("clean", "--all", "--uv-cache")
    assert rc == 0 and "uv cache" in out and not (cache / "wheels-v5" / "blob").exists(), out + err


def test_a_silent_child_still_gets_a_heartbeat_every_15_s(tmp_path, capsys):
    """Off a terminal, a command that prints nothing (a download, an import) gets a line every 15 s."""
    from vllm_harness.core.runner import Progress
    now = [0.0]
    p = Progress("torch", quiet=False, clock=lambda: now[0])
    p.feed(b"Resolved 24 packages in 1.2s")
    for t in (5.0, 14.0):
        now[0] = t
        p.tick()
    assert capsys.readouterr().out == ""
    now[0] = 15.0
    p.tick()
    now[0] = 30.5
    p.tick()
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["  ... torch 15s Resolved 24 packages in 1.2s", "  ... torch 30s Resolved 24 packages in 1.2s"]
    p.close()


def test_run_commands_heartbeat_while_the_child_is_silent(tmp_path, capsys, monkeypatch):
    from vllm_harness.core import runner
    monkeypatch.setattr(runner.Progress.__init__, "__defaults__", (False, time.monotonic, 1.0, False))
    runner.run_commands("torch", [[sys.executable, "-c", "import time; print('start', flush=True); time.sleep(3.5)"]],
                        tmp_path / "t.log", {"PATH": "/usr/bin:/bin"})
    out = capsys.readouterr().out
    assert out.count("... torch ") >= 2, out


def test_the_proof_covers_every_module_of_the_verify_package(monkeypatch, tmp_path):
    """An edit to any verify module (elf.py's fatbin reader, roles.py's judgement) changes what a recorded result
    proved, so the result is not reused: the proof hashes every .py file beside verify/checks.py."""
    import shutil

    from vllm_harness.steps import verify as step
    from vllm_harness.verify import checks
    pkg = Path(checks.__file__).resolve().parent
    copy = tmp_path / "verify"
    shutil.copytree(pkg, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(checks, "__file__", str(copy / "checks.py"))
    before = step._scripts_hash()
    for name in ("elf.py", "roles.py", "binaries.py"):
        (copy / name).write_text((copy / name).read_text() + "\n# edited\n")
        after = step._scripts_hash()
        assert after != before, name
        before = after
