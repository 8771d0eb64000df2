"""clean and the locks (issue 26, class 7): clean takes every lock it needs before deleting anything; a variant
that starts while `clean --all` waits is never deleted under it; `--no-wait` with a bundle running deletes
nothing (bundle holds a lock for its source and the caches)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bundle_gate_index import gated_index, harness_process  # noqa: F401
from conftest import ROOT
from tiny_index import _tiny

from vllm_harness.core.layout import Layout

# a harness run inside a variant's lock (as run.py takes it): it writes a file in its env, waits for the test's
# word (a file), and says whether its file is still there
HOLDER = """
import sys, time
from pathlib import Path
from vllm_harness.core import locks
lock, env, stop = map(Path, sys.argv[1:4])
with locks.held(lock, "variant " + lock.stem, say=lambda t: print(t, file=sys.stderr, flush=True)):
    env.mkdir(parents=True, exist_ok=True)
    (env / "mine").write_text("x")
    print("in", flush=True)
    while not stop.exists():
        time.sleep(0.05)
    print("intact" if (env / "mine").exists() else "deleted under me", flush=True)
"""


def _holder(lock: Path, env: Path, stop: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), str(env), str(stop)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


def _tree(st: Path) -> set[str]:
    return {str(p.relative_to(st)) for p in st.rglob("*") if p.relative_to(st).parts[0] != "locks"}


def test_clean_all_never_deletes_a_variant_that_started_while_it_waited(state, tmp_path):
    layout = Layout.default()
    layout.ensure()
    stop_a, stop_b = tmp_path / "stop-a", tmp_path / "stop-b"
    a = _holder(layout.lock("a"), layout.venv("a"), stop_a)
    procs = [a]
    try:
        assert a.stdout.readline().strip() == "in"
        clean = harness_process("clean", "--all")
        procs.append(clean)
        assert "waiting for" in clean.stderr.readline()
        # variant b starts while clean waits for a (its lock file did not exist when clean looked)
        b = _holder(layout.lock("b"), layout.venv("b"), stop_b)
        procs.append(b)
        time.sleep(1.5)
        stop_a.write_text("")
        assert a.wait(30) == 0
        try:
            clean.wait(3)
        except subprocess.TimeoutExpired:
            pass   # still waiting: for b
        stop_b.write_text("")
        out_b, err_b = b.communicate(timeout=30)
        out, err = clean.communicate(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert "deleted under me" not in out_b and "intact" in out_b, out_b + err_b
    assert clean.returncode == 0, out + err
    assert "removed" in out


def test_no_wait_with_a_bundle_running_deletes_nothing(harness, state, tmp_path, gated_index, monkeypatch):  # noqa: F811 - the fixture
    url, gate = gated_index
    monkeypatch.setenv("UV_NO_CACHE", "1")   # uv asks the index (not its own cache of the pages)
    v = _tiny(tmp_path, url)
    assert harness("bundle", "--variant", v, "--out", tmp_path / "b1")[0] == 0   # the caches filled
    layout = Layout.default()
    (layout.cache / "bundle" / "tiny" / "resolved.json").unlink()   # the next run resolves (uv asks the index)
    layout.venv("tiny").mkdir(parents=True)
    (layout.src("tiny") / "tree").mkdir(parents=True)
    gate.close("/simple/", "uv/")
    p = harness_process("bundle", "--variant", v, "--out", tmp_path / "b2")
    try:
        assert gate.reached.wait(120), p.communicate(timeout=5)
        before = _tree(state)
        assert any(x.startswith("cache/wheels/") for x in before) and "src/tiny/tree" in before
        rc, out, err = harness("clean", "--all", "--no-wait")
        assert rc == 1 and "in use" in err and "bundle@tiny" in err, out + err
        assert _tree(state) == before
        rc, out, err = harness("clean", "--variant", v, "--no-wait")
        assert rc == 1 and "bundle of variant tiny" in err and "in use" in err, out + err
        assert _tree(state) == before
    finally:
        gate.open()
        out, err = p.communicate(timeout=120)
    assert p.returncode == 0, out + err
    # the bundle done, nothing holds a lock: the same clean goes through
    rc, out, err = harness("clean", "--all", "--no-wait")
    assert rc == 0 and not layout.cache.exists() and not layout.src("tiny").exists(), out + err
