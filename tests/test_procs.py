"""Every child through the one runner, and nothing it starts outlives the harness (issue 26, class 6).

A source tree's script may detach a daemon (``setsid`` and a double fork: it leaves the command's process
group, so ending the group misses it).  The harness is a child subreaper and tags its children's
environment, so such a daemon is ended when the command is ended, when the harness exits, and (by the
watchdog) when the harness is SIGKILLed.  And the source holds no other way to start a process.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from conftest import ROOT

SRC = ROOT / "src" / "vllm_harness"

# a command that detaches a daemon: fork, setsid, fork again; the grandchild writes its pid and sleeps
DAEMON = textwrap.dedent("""
    import os, sys, time
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):  # as a daemon does: the harness's pipes are not held open
                os.dup2(null, fd)
            with open(sys.argv[1] + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(sys.argv[1] + ".tmp", sys.argv[1])
            time.sleep(600)
            os._exit(0)
        os._exit(0)
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.01)
""")

HARNESS = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {src!r})
    from vllm_harness.core import procs
    mode, daemon, pidfile = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "run":         # the command returns, its daemon detached; the harness then exits normally
        procs.run([sys.executable, daemon, pidfile], timeout=60)
    elif mode == "end_group":  # the command is ended early (Ctrl-C, a timeout) while its daemon runs
        p = procs.popen([sys.executable, "-c", "import subprocess, sys, time; "
                         "subprocess.run([sys.executable] + sys.argv[1:]); time.sleep(600)", daemon, pidfile])
        while not os.path.exists(pidfile):
            time.sleep(0.01)
        procs.end_group(p, grace=2)
        pid = int(open(pidfile).read())
        print("gone" if not os.path.exists(f"/proc/{{pid}}") else "left", flush=True)
    elif mode == "sigkill":    # the harness is killed while the daemon runs
        procs.run([sys.executable, daemon, pidfile], timeout=60)
        print("ready", flush=True)
        time.sleep(600)
""")


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _running(pid)


def _setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    daemon, script = tmp_path / "daemon.py", tmp_path / "harness.py"
    daemon.write_text(DAEMON)
    script.write_text(HARNESS.format(src=str(ROOT / "src")))
    return daemon, script, tmp_path / "daemon.pid"


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def test_a_detached_daemon_ends_when_the_harness_exits(tmp_path):
    daemon, script, pidfile = _setup(tmp_path)
    r = subprocess.run([sys.executable, str(script), "run", str(daemon), str(pidfile)], timeout=120,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    pid = int(pidfile.read_text())
    try:
        assert _wait_gone(pid, 15), f"the setsid daemon {pid} outlived the harness"
    finally:
        _kill(pid)


def test_ending_a_command_ends_the_daemon_it_detached(tmp_path):
    daemon, script, pidfile = _setup(tmp_path)
    r = subprocess.run([sys.executable, str(script), "end_group", str(daemon), str(pidfile)], timeout=120,
                       capture_output=True, text=True)
    pid = int(pidfile.read_text())
    try:
        assert r.returncode == 0, r.stderr
        # gone while the harness still ran, and reaped (not left a zombie of the subreaper)
        assert r.stdout.split() == ["gone"], r.stdout
    finally:
        _kill(pid)


def test_a_sigkilled_harness_leaves_no_detached_daemon(tmp_path):
    daemon, script, pidfile = _setup(tmp_path)
    proc = subprocess.Popen([sys.executable, str(script), "sigkill", str(daemon), str(pidfile)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    pid = None
    try:
        assert proc.stdout.readline().strip() == "ready"
        pid = int(pidfile.read_text())
        assert _running(pid)
        proc.kill()
        proc.wait(timeout=30)
        assert _wait_gone(pid, 20), f"the setsid daemon {pid} outlived the SIGKILLed harness"
    finally:
        proc.kill()
        if pid:
            _kill(pid)


# ------------------------------------------------------------------------------ the one runner (AST)

RUNNERS = {("subprocess", n) for n in ("run", "Popen", "call", "check_call", "check_output", "getoutput",
                                       "getstatusoutput")}
OS_RUNNERS = ("system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp")
# data/ scripts run inside the target interpreter, standalone (no harness to import there)
ALLOWED = ("core/procs.py", "data/")


def _offences(path: Path, rel: str) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "subprocess":
            bad = [a.name for a in node.names if ("subprocess", a.name) in RUNNERS]
            if bad:
                out.append(f"{rel}:{node.lineno} from subprocess import {', '.join(bad)}")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            mod, name = node.value.id, node.attr
            if (mod, name) in RUNNERS or (mod == "os" and (name in OS_RUNNERS or name.startswith(("exec",
                                                                                                   "spawn")))):
                out.append(f"{rel}:{node.lineno} {mod}.{name}")
        # ["git", "describe", ...], ["git", *args]: not a pair like ("git", version_future)
        if isinstance(node, (ast.List, ast.Tuple)) and len(node.elts) > 1 and isinstance(node.elts[0], ast.Constant) \
                and node.elts[0].value == "git" and rel != "core/gitcmd.py" \
                and (isinstance(node.elts[1], ast.Starred) or isinstance(node.elts[1], ast.Constant)
                     and isinstance(node.elts[1].value, str)):
            out.append(f"{rel}:{node.lineno} an argv beginning with 'git' (use core.gitcmd)")
    return out


def test_every_child_goes_through_procs_and_every_git_through_gitcmd(tmp_path):
    # the check finds each form it forbids (it cannot pass by finding nothing)
    sample = tmp_path / "sample.py"
    sample.write_text("import os, subprocess\nfrom subprocess import check_output\nsubprocess.run(['x'])\n"
                      "os.execvp('x', ['x'])\nos.system('x')\nargv = ['git', 'status']\npair = ('git', v)\n")
    assert len(_offences(sample, "steps/sample.py")) == 5
    offences = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith(ALLOWED):
            continue
        offences += _offences(path, rel)
    assert not offences, "\n".join(offences)
