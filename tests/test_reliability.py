"""Interruptions and concurrent runs on a real build (the fixture): nothing left looking good, nothing lost.

Two interruptions (SIGINT while torch installs, SIGTERM while the extension compiles), a second run that
fails fast with --no-wait naming the holder, and two runs at once of one variant.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, fixture_variant, live_pids_with, needs_pypi

pytestmark = pytest.mark.slow


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def _start(state: Path, variant: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), VLLM_HARNESS_STATE=str(state),
               VLLM_HARNESS_ROOT=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "vllm_harness", "build-variant", "--variant", str(variant),
                             "--skip-doctor", *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            # as from a terminal: a background job's inherited "ignore SIGINT" is undone
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _status(state: Path) -> dict:
    try:
        return json.loads((state / "status" / "fixture-cpu.json").read_text())
    except (OSError, ValueError):
        return {"steps": {}}


def _wait_for_step(state: Path, step: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if (_status(state)["steps"].get(step) or {}).get("status") == "running":
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError(f"step {step} never started")


def _wait_for_compile(state: Path, proc: subprocess.Popen, timeout: float = 900) -> None:
    log = state / "logs" / "fixture-cpu" / "build.log"
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if "Building CXX object" in log.read_text(errors="replace"):
                time.sleep(1)
                return
        except OSError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"run ended before compiling: {proc.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError("the extension never started compiling")


def _leftovers(state: Path) -> list[str]:
    """Processes still running with the state folder in their command line (pip, cmake, ninja, cc1plus)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # the compiler cache's server (`sccache` with no arguments) is a daemon by design, shared by later
        # builds, and ends itself when idle; its compile clients (`sccache c++ ...`) are children and count
        if str(state) in cmd and not cmd.strip().endswith("/bin/sccache"):
            found.append(f"{d.name}: {cmd[:120]}")
    return found


def test_interrupted_runs_resume_and_concurrent_runs_serialise(tmp_path):
    needs_pypi()
    state = tmp_path / "state"
    variant = fixture_variant(tmp_path)
    # pip, not uv's cache (conftest): the torch install must last long enough to be interrupted
    variant.write_text(variant.read_text().replace('installer = "uv"', 'installer = "pip"'))
    fixture_before = _tree_digest(ROOT / "tests" / "fixtures" / "vllm-mini")
    sentinel = tmp_path / "outside.txt"
    sentinel.write_text("must survive")

    # 1. Ctrl-C while torch is being installed
    a = _start(state, variant)
    _wait_for_step(state, "torch", a)
    time.sleep(2)
    a.send_signal(signal.SIGINT)
    assert a.wait(timeout=120) == 130, a.stdout.read()
    st = _status(state)
    assert st["steps"]["torch"]["status"] == "failed" and st["steps"]["torch"]["reason"] == "interrupted"
    assert st["built"] is False and "deps" not in st["steps"]
    assert _leftovers(state) == []

    # 2. resume; SIGTERM while the extension compiles; a second run with --no-wait fails fast naming the holder
    a = _start(state, variant)
    _wait_for_step(state, "build", a)
    b = _start(state, variant, "--no-wait")
    out_b, _ = b.communicate(timeout=120)
    assert b.returncode == 1 and f"pid {a.pid}" in out_b and "--no-wait" in out_b
    _wait_for_compile(state, a)  # after the compile probe: the extension's own compile (cc1plus) runs
    a.send_signal(signal.SIGTERM)
    out_a, _ = a.communicate(timeout=120)
    assert a.returncode == 143, out_a
    assert "· env" in out_a and "reused" in out_a          # the steps before torch were not redone
    st = _status(state)
    assert st["steps"]["build"]["status"] == "failed" and st["built"] is False
    assert "post-install" not in st["steps"]
    assert "# interrupted" in (state / "logs" / "fixture-cpu" / "build.log").read_text()
    deadline = time.monotonic() + 15   # the ended group's last processes are reaped: wait for it, no fixed sleep
    while _leftovers(state) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _leftovers(state) == []

    # 3. two runs of the variant at once: one builds, the other waits for it, then reuses every step
    c = _start(state, variant)
    _wait_for_step(state, "build", c)
    d = _start(state, variant)
    out_c, _ = c.communicate(timeout=900)
    out_d, _ = d.communicate(timeout=900)
    assert c.returncode == 0 and d.returncode == 0, out_c + out_d
    assert "waiting for variant fixture-cpu: held by pid" in out_d
    assert "· build" in out_d and "reused" in out_d and "VERIFIED" in out_d
    assert _status(state)["built"] is True

    # nothing lost: the repo's fixture and a file outside the state folder are as they were
    assert _tree_digest(ROOT / "tests" / "fixtures" / "vllm-mini") == fixture_before
    assert sentinel.read_text() == "must survive"


KILLED_RUNNER = """
import sys
from pathlib import Path
from vllm_harness.core.runner import run_commands
marker = sys.argv[1]
# a build-like command whose own children (a compiler under ninja) must not outlive the harness
run_commands("build", [["sh", "-c", "sleep 300 & sleep 300; : " + marker]], Path(sys.argv[2]), {"PATH": "/usr/bin:/bin"},
             quiet=True)
"""


def test_sigkill_of_the_harness_still_ends_the_build_processes(tmp_path):
    """SIGKILL (or the OOM killer) gives the harness no chance to end its build: the watchdog does."""
    marker = f"harness-sigkill-{os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    runner = subprocess.Popen([sys.executable, "-c", KILLED_RUNNER, marker, str(tmp_path / "build.log")], env=env)
    try:
        deadline = time.monotonic() + 30
        while len(live_pids_with(marker)) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        assert live_pids_with(marker), "the command did not start"
        runner.send_signal(signal.SIGKILL)
        runner.wait(timeout=10)
        deadline = time.monotonic() + 15
        while live_pids_with(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert live_pids_with(marker) == []
    finally:
        for pid in live_pids_with(marker):
            os.kill(pid, signal.SIGKILL)


def test_finished_commands_leave_one_watchdog_per_harness(tmp_path):
    """One guardian per harness process, however many commands ran (not one per command); and it keeps
    nothing registered once they are done."""
    from vllm_harness.core import procs
    from vllm_harness.core import runner as runner_mod
    before = set(live_pids_with("_watchdog.py"))
    for n in range(3):
        runner_mod.run_commands("x", [["true"]], tmp_path / f"x{n}.log", {"PATH": "/usr/bin:/bin"}, quiet=True)
    new = set(live_pids_with("_watchdog.py")) - before
    assert len(new) <= 1
    guardian = procs.Guardian.get()
    assert guardian.proc is not None and guardian.proc.poll() is None
