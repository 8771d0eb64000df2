"""Status bookkeeping, prepare's torch stripping, clean's safety, and the CLI's exit codes."""

import json
import os
from pathlib import Path

import pytest
from conftest import ROOT

from vllm_harness.commands.clean import clean
from vllm_harness.core.errors import UsageError
from vllm_harness.core.layout import Layout
from vllm_harness.core.status import Status, dependents
from vllm_harness.pipeline.steps import GRAPH
from vllm_harness.steps import prepare


def test_rerunning_a_step_invalidates_exactly_what_depends_on_it(tmp_path):
    st = Status(tmp_path / "s.json", "v", GRAPH)
    for step in ["fetch", "prepare", "env", "torch", "deps", "build", "post-install"]:
        st.start(step)
        st.finish(step, "k", None, 1.0)
    st.set_built(True)
    st.start("prepare")   # re-running prepare keeps env and torch, drops deps and after
    assert set(st.data["steps"]) == {"fetch", "prepare", "env", "torch"}
    assert st.built is False
    st.fail("prepare", None, "boom")
    again = Status(tmp_path / "s.json", "v")
    assert again.step("prepare")["status"] == "failed" and not again.built
    assert dependents(GRAPH, "env") == ["env", "torch", "deps", "build", "post-install", "verify"]
    st.start("verify")    # re-running verify alone does not unmake the build
    st.finish("verify", "k", None, 1.0)
    st.set_built(True)
    st.start("verify")
    assert st.built is True


def test_a_status_read_without_the_graph_cannot_clear_steps(tmp_path):
    st = Status(tmp_path / "s.json", "v")
    with pytest.raises(RuntimeError, match="without the step graph"):
        st.start("env")


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b"[]", b'{"steps": []}',
                                     b'{"steps": {"env": "ok"}}', b'{"steps": {}, "built": "yes"}',
                                     b'{"steps": {"env": {"status": 1}}}', b"[" * 100000])
def test_corrupt_status_file_is_reported_with_its_reset(tmp_path, content):
    """A status file with wrong bytes or types: one message naming the file and the clean command."""
    p = tmp_path / "s.json"
    p.write_bytes(content)
    with pytest.raises(UsageError) as e:
        Status(p, "v")
    assert str(p) in e.value.message and "corrupt" in e.value.message
    assert "invoke clean --variant v" in e.value.fix


def _tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "requirements").mkdir(parents=True)
    (src / "requirements" / "build.txt").write_text("cmake>=3.26\ntorch==2.5.1\nninja\n")
    (src / "requirements" / "cuda.txt").write_text("-r common.txt\ntorch == 2.5.1\ntorchvision==0.20.1 ; "
                                                   "platform_machine == 'x86_64'\n")
    (src / "requirements" / "common.txt").write_text("open_clip_torch==2.32.0\n# via torch\nnumpy\n")
    (src / "pyproject.toml").write_text('[build-system]\nrequires = [\n  "cmake>=3.26",\n  "torch == 2.5.1",\n]\n'
                                        '[project.optional-dependencies]\nx = ["torch"]\n')
    return src


def test_prepare_equivalent_strips_only_torch_pins_and_is_idempotent(tmp_path):
    src = _tree(tmp_path)
    log = tmp_path / "prepare.log"
    res = prepare.prepare(src, Path("/nonexistent-python"), log, dict(os.environ))  # no script: equivalent
    assert res["how"] == "harness-equivalent"
    assert {c["file"] for c in res["changed"]} == {"requirements/build.txt", "requirements/cuda.txt",
                                                  "pyproject.toml"}
    assert "open_clip_torch==2.32.0" in (src / "requirements" / "common.txt").read_text()
    assert "torch" not in (src / "requirements" / "build.txt").read_text()
    assert 'x = ["torch"]' in (src / "pyproject.toml").read_text()  # not a build-system pin
    assert prepare.torch_pins(src) == []
    again = prepare.prepare(src, Path("/nonexistent-python"), log, dict(os.environ))
    assert again["changed"] == []


def test_prepare_runs_the_trees_own_script(tmp_path):
    import shutil
    import sys
    src = tmp_path / "fx"
    shutil.copytree(ROOT / "tests" / "fixtures" / "vllm-mini", src)
    assert prepare.torch_pins(src)
    res = prepare.prepare(src, Path(sys.executable), tmp_path / "p.log", dict(os.environ))
    assert res["how"] == "use_existing_torch.py" and res["changed"]
    assert prepare.torch_pins(src) == []
    assert prepare.prepare(src, Path(sys.executable), tmp_path / "p.log", dict(os.environ))["changed"] == []


def test_clean_never_follows_a_symlink_out_of_a_managed_tree(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    outside_dir = tmp_path / "precious-dir"
    outside_dir.mkdir()
    (outside_dir / "f").write_text("keep")
    lay = Layout(root=ROOT, state=tmp_path / "state")
    lay.ensure()
    tree = lay.src("v") / "vllm"
    (tree / "build").mkdir(parents=True)
    (tree / "build" / "link").symlink_to(outside)
    (tree / ".deps").symlink_to(outside_dir)
    (tree / "vllm.egg-info").mkdir()
    lay.venv("v").mkdir(parents=True)
    (lay.venv("v") / "escape").symlink_to(outside_dir)
    dry = clean(lay, "v", dry_run=True)
    assert dry["removed"] and tree.exists()
    res = clean(lay, "v")
    assert not lay.src("v").exists() and not lay.venv("v").exists()
    assert outside.read_text() == "keep me" and (outside_dir / "f").read_text() == "keep"
    assert all(str(lay.state) in p for p in res["removed"])


def test_cli_exit_codes_and_messages(harness, tmp_path):
    rc, out, err = harness("doctor", "--variant", "cu999")
    assert rc == 2 and "Unknown variant 'cu999'" in err and "Fix:" in err
    rc, out, err = harness("build", "--variant", "cu118")
    assert rc == 2 and "needs step" in err and "invoke" in err
    rc, out, err = harness("verify", "--variant", "cu124")
    assert rc == 2 and "nox -s build-cu124" in err
    rc, out, err = harness("diagnose", "--log", str(tmp_path / "missing.log"))
    assert rc == 2 and "missing.log" in err
    rc, out, err = harness("clean")
    assert rc == 2 and "--variant" in err
    rc, out, err = harness("list", "--json")
    assert rc == 0 and {r["variant"] for r in json.loads(out)["variants"]} >= {"cu118", "cu124", "cu130"}
    bad = tmp_path / "broken.toml"
    bad.write_text('description = "x"\ncuda = "11.8"\npython = ">=3.10"\n[torch]\nversion = 2\n')
    rc, out, err = harness("doctor", "--variant", str(bad))
    assert rc == 2 and "torch.version" in err and "Traceback" not in err


def test_nox_and_invoke_list_the_sessions_and_tasks():
    import subprocess
    import sys
    nox = subprocess.run([sys.executable, "-m", "nox", "-l", "-f", str(ROOT / "noxfile.py")], capture_output=True,
                         text=True, cwd=ROOT)
    assert nox.returncode == 0, nox.stderr
    for s in ["build-cu118", "build-cu124", "build-cu130", "verify", "doctor", "tests", "lint"]:
        assert f"{s} -> " in nox.stdout
    inv = subprocess.run([sys.executable, "-m", "invoke", "--list"], capture_output=True, text=True, cwd=ROOT)
    assert inv.returncode == 0, inv.stderr
    for t in ["clean", "doctor", "fetch", "prepare", "deps", "build", "post-install", "verify", "diagnose"]:
        assert f"  {t} " in inv.stdout


def test_clean_refuses_a_state_folder_the_harness_did_not_make(harness, tmp_path, monkeypatch):
    """VLLM_HARNESS_STATE pointed at a user's folder by mistake: clean --all deletes nothing there."""
    mine = tmp_path / "my-project"
    for sub in ("envs", "src", "logs", "cache"):
        (mine / sub).mkdir(parents=True)
        (mine / sub / "important.txt").write_text("user data")
    monkeypatch.setenv("VLLM_HARNESS_STATE", str(mine))
    rc, out, err = harness("clean", "--all")
    assert rc == 2 and "not a harness state folder" in err
    assert sorted(p.name for p in mine.rglob("important.txt")) == ["important.txt"] * 4


def test_credentials_in_index_urls_are_masked():
    from vllm_harness.core.runner import mask
    line = "Looking in indexes: https://alice:s3cr3t@pypi.corp.example/simple, https://token@h.example/x"
    masked = mask(line)
    assert "s3cr3t" not in masked and "alice" not in masked and "token@" not in masked
    assert "https://***@pypi.corp.example/simple" in masked


def test_unreachable_index_is_one_message_before_any_install(harness, state, tmp_path):
    text = (ROOT / "envs" / "cu124.toml").read_text().replace(
        "# no index_url: PyPI's Linux wheels of torch 2.6.0 are the cu124 build",
        'index_url = "http://127.0.0.1:9/simple"')
    v = tmp_path / "offline.toml"
    v.write_text(text)
    rc, out, err = harness("deps", "--variant", v)
    assert rc == 2, out + err
    assert "Cannot reach the index http://127.0.0.1:9/simple for offline.toml [torch]" in err and "Fix:" in err
    st = json.loads((state / "status" / "offline.json").read_text())
    assert st["built"] is False and st["steps"]["torch"]["status"] == "failed" and "deps" not in st["steps"]
