"""The harness attacked as a careless or hostile user would (issue 14): every case here broke on an
earlier main.  Each test names the attack; together with the cases that already held (test_steps_state,
test_reliability, test_variants), they are what "safe by construction" means in the README."""

from __future__ import annotations

import base64
import dataclasses
import http.server
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_harness.core.errors import UsageError
from vllm_harness.core.layout import Layout
from vllm_harness.core.options import RunOptions
from vllm_harness.core.status import Status
from vllm_harness.facts.variants import parse_variant
from vllm_harness.pipeline import run as steps
from vllm_harness.pipeline.steps import BY_NAME, GRAPH
from vllm_harness.steps.context import check_index
from vllm_harness.toolchain import compiler_cache as bcache

VARIANT = ROOT / "envs" / "cu124.toml"
NO_GPU = ROOT / "tests" / "machines" / "no-gpu.toml"


def _user_folder(tmp_path: Path) -> Path:
    mine = tmp_path / "my-project"
    for sub in ("envs", "src", "logs", "cache", "status"):
        (mine / sub).mkdir(parents=True)
        (mine / sub / "important.txt").write_text("user data")
    (mine / "README.md").write_text("my project")
    return mine


def _snapshot(folder: Path) -> list[tuple[str, bytes]]:
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else b"")
                  for p in folder.rglob("*"))


# ---------------------------------------------------------------------------------------- 1. the marker

@pytest.mark.parametrize("argv", [
    ["doctor", "--variant", "cu124", "--machine", str(NO_GPU)],
    ["fetch", "--variant", "cu118"],
    ["deps", "--variant", "cu124"],
    ["build", "--variant", "cu124"],
    ["verify", "--variant", "cu124"],
    ["list"],
    ["diagnose", "--log", str(ROOT / "tests" / "logs" / "cmake-too-old_arion-1.log")],
    ["clean", "--all"],
    ["clean", "--variant", "cu124"],
])
def test_a_user_folder_as_state_is_refused_by_every_command(harness, tmp_path, monkeypatch, argv):
    """VLLM_HARNESS_STATE=~/myproject then any command: exit 2, no marker written, nothing deleted."""
    mine = _user_folder(tmp_path)
    before = _snapshot(mine)
    monkeypatch.setenv("VLLM_HARNESS_STATE", str(mine))
    rc, out, err = harness(*argv)
    assert rc == 2, out + err
    assert "is not a harness state folder" in err and str(mine) in err and err.count("error:") == 1
    assert not (mine / Layout.MARKER).exists()
    rc, out, err = harness("clean", "--all")
    assert rc == 2
    assert _snapshot(mine) == before


def test_a_harness_link_to_a_user_folder_is_refused(harness, tmp_path, monkeypatch):
    """`.harness` a symlink to the user's folder: the same refusal; clean --all deletes nothing there."""
    root = tmp_path / "checkout"
    (root / "envs").mkdir(parents=True)
    (root / "noxfile.py").write_text("")
    (root / "envs" / "cu124.toml").write_text(VARIANT.read_text())
    mine = _user_folder(tmp_path)
    (root / ".harness").symlink_to(mine)
    monkeypatch.delenv("VLLM_HARNESS_STATE")
    monkeypatch.delenv("VLLM_HARNESS_ROOT")
    before = _snapshot(mine)
    for argv in (["doctor", "--variant", "cu124", "--machine", str(NO_GPU)], ["clean", "--all"]):
        rc, out, err = harness("--root", root, *argv)
        assert rc == 2 and "is not a harness state folder" in err, out + err
    assert _snapshot(mine) == before


def test_a_new_or_empty_folder_becomes_the_state_folder(harness, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("VLLM_HARNESS_STATE", str(empty))
    rc, out, err = harness("doctor", "--variant", "cu124", "--machine", NO_GPU, "--json")
    assert rc in (0, 1), err
    rec = json.loads((empty / Layout.MARKER).read_text())
    assert rec["tool"] == "vllm-harness" and rec["how"] == "adopted an empty folder"
    fresh = tmp_path / "a" / "new" / "state"
    monkeypatch.setenv("VLLM_HARNESS_STATE", str(fresh))
    rc, out, err = harness("list")
    assert rc == 0 and json.loads((fresh / Layout.MARKER).read_text())["how"] == "created"


def test_an_old_text_marker_in_a_folder_with_foreign_files_is_not_trusted(harness, tmp_path, monkeypatch):
    """The marker that earlier versions wrote into any folder: trusted only where nothing else lives."""
    mine = _user_folder(tmp_path)
    (mine / Layout.MARKER).write_text("vllm-harness state folder: everything here was made by the harness\n")
    before = _snapshot(mine)
    monkeypatch.setenv("VLLM_HARNESS_STATE", str(mine))
    rc, out, err = harness("clean", "--all")
    assert rc == 2 and "README.md" in err
    assert _snapshot(mine) == before
    (mine / "README.md").unlink()  # only harness names left: an old state folder, upgraded in place
    rc, out, err = harness("list")
    assert rc == 0 and json.loads((mine / Layout.MARKER).read_text())["how"] == "upgraded"


def test_a_linked_marker_is_not_a_marker(harness, tmp_path, monkeypatch):
    st_dir = tmp_path / "st"
    st_dir.mkdir()
    (st_dir / "envs").mkdir()
    real = tmp_path / "elsewhere.json"
    real.write_text(json.dumps({"tool": "vllm-harness"}))
    (st_dir / Layout.MARKER).symlink_to(real)
    monkeypatch.setenv("VLLM_HARNESS_STATE", str(st_dir))
    rc, out, err = harness("clean", "--all")
    assert rc == 2 and (st_dir / "envs").is_dir()


# ------------------------------------------------------------------------------------- 2. git injection

INJECT = "--upload-pack=touch {0}; git-upload-pack"


def test_a_ref_that_is_a_git_option_is_refused_before_git_runs(harness, tmp_path):
    pwned = tmp_path / "pwned"
    v = tmp_path / "inj.toml"
    v.write_text(VARIANT.read_text().replace('[vllm]\n', '[vllm]\nsource = "git"\n'
                                             'git = "https://github.com/vllm-project/vllm.git"\n'
                                             f'ref = "{INJECT.format(pwned)}"\n', 1)
                 .replace('mode = "wheel"', 'mode = "source"'))
    rc, out, err = harness("fetch", "--variant", v)
    assert rc == 2 and "key 'vllm.ref'" in err and "not a git ref" in err, out + err
    assert not pwned.exists()


@pytest.mark.parametrize("source", [
    "https://github.com/vllm-project/vllm.git@" + INJECT,
    "file:///tmp/repo@" + INJECT,
    "ext::sh -c touch% {0}@v1",
])
def test_a_source_that_smuggles_an_option_or_transport_is_refused(harness, tmp_path, source):
    pwned = tmp_path / "pwned"
    rc, out, err = harness("fetch", "--variant", "cu118", "--source", source.format(pwned))
    assert rc == 2, out + err
    assert not pwned.exists()


@pytest.mark.parametrize("url", ["-oProxyCommand=touch /tmp/x", "--upload-pack=x", "ext::sh -c x", "fd::3",
                                 "http://h/x.git", "https://-bad/x.git", "ssh://-oProxyCommand=x/y"])
def test_git_urls_outside_the_allowed_transports_are_refused(url):
    from vllm_harness.core import gitcmd
    with pytest.raises(UsageError):
        gitcmd.check_url(url, "test")


@pytest.mark.parametrize("url", ["https://github.com/vllm-project/vllm.git", "git@github.com:vllm-project/vllm.git",
                                 "ssh://git@example.com/x.git", "file:///srv/git/vllm.git", "git://host/x.git"])
def test_ordinary_git_urls_pass(url):
    from vllm_harness.core import gitcmd
    assert gitcmd.check_url(url, "test") == url


def test_git_itself_refuses_other_transports(tmp_path):
    """Even a URL that got past the checks cannot run a command: git's own protocol allow-list is set."""
    from vllm_harness.core import gitcmd
    pwned = tmp_path / "pwned"
    r = gitcmd.run(["ls-remote", "--", f"ext::sh -c touch% {pwned}"], dict(os.environ), cwd=tmp_path, timeout=60)
    assert r.returncode != 0 and "transport 'ext' not allowed" in r.stderr
    assert not pwned.exists()


# ------------------------------------------------------------------------------------------- 3. orphans

DRIVER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {src!r})
    from vllm_harness.steps import probe
    from vllm_harness.cli import main
    pids = {pids!r}
    # a compiler driver and the compiler it starts (g++ -> cc1plus): a parent and a grandchild
    tree = ["sh", "-c", "sleep 600 & echo $! >> " + pids + "; echo $$ >> " + pids + "; wait"]
    probe.torch_info = lambda python, env: {{"torch_version": "2.6.0", "torch_dir": "/nonexistent",
                                            "include": [], "cxx11_abi": 1, "python_include": ""}}
    probe.commands = lambda *a, **k: [("csrc/torch_bindings.cpp", tree), ("csrc/cpu/x.cpp", tree)]
    sys.exit(main(["probe", "--source", {src_tree!r}, "--python", sys.executable]))
""")


_alive = bcache._alive  # the harness's own reading of /proc (a zombie counts as gone)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_no_compiler_outlives_the_probe_whatever_ends_the_harness(tmp_path, sig):
    """The compile probe's g++ and cc1plus (here: a process and its child) end when the harness's pid gets
    SIGINT, SIGTERM, SIGHUP or SIGKILL."""
    pids = tmp_path / "pids"
    src_tree = tmp_path / "tree"
    (src_tree / "csrc").mkdir(parents=True)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(src=str(ROOT / "src"), pids=str(pids), src_tree=str(src_tree)))
    env = dict(os.environ, VLLM_HARNESS_STATE=str(tmp_path / "state"), VLLM_HARNESS_ROOT=str(ROOT),
               PYTHONFAULTHANDLER="1")  # a harness that does not end says where it is (SIGABRT below)
    # as from a terminal: a shell's background job (`pytest ... &`) inherits "ignore SIGINT", which the
    # harness respects (as it respects nohup's SIGHUP); the test wants the terminal's Ctrl-C
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.monotonic()
    while (not pids.exists() or len(pids.read_text().split()) < 4) and time.monotonic() - t0 < 60:
        time.sleep(0.05)
    children = [int(x) for x in pids.read_text().split()]
    assert len(children) == 4 and all(_alive(p) for p in children)
    os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGABRT)  # faulthandler prints every thread's stack, then it dies
        out = proc.communicate(timeout=30)[0].decode(errors="replace")
        for p in children:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        pytest.fail(f"the harness did not end within 60 s of {sig.name}; what it printed:\n{out[-6000:]}")
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in children if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"left running after {sig.name}: {left}"


GUARDED = textwrap.dedent("""
    import os, subprocess, sys, time
    sys.path.insert(0, {src!r})
    from vllm_harness.core import procs
    # a compile job (its own group) and a daemonised cache server with a compile under it, and its socket
    job = procs.popen(["sh", "-c", "sleep 600 & echo $! > {d}/job_child; exec sleep 600"])
    server = subprocess.Popen(["setsid", "sh", "-c", "sleep 600 & echo $! > {d}/srv_child; exec sleep 600"])
    g = procs.Guardian.get()
    g.track_tree(server.pid)
    open({sock!r}, "w").close()
    g.track_file({sock!r})
    with open("{d}/pids", "w") as f:
        f.write(f"{{job.pid}} {{server.pid}}")
    time.sleep(600)
""")


def test_a_sigkilled_harness_leaves_no_job_no_cache_server_and_no_socket(tmp_path):
    """SIGKILL of the harness mid-build: the watchdog ends the build's group, the compiler-cache server with
    the compiles it runs, and removes its socket."""
    sock = tmp_path / "sccache.sock"
    script = tmp_path / "guarded.py"
    script.write_text(GUARDED.format(src=str(ROOT / "src"), d=str(tmp_path), sock=str(sock)))
    proc = subprocess.Popen([sys.executable, str(script)], start_new_session=True)
    t0 = time.monotonic()
    files = ["pids", "job_child", "srv_child"]
    while not all((tmp_path / f).exists() and (tmp_path / f).read_text().strip() for f in files):
        assert time.monotonic() - t0 < 60 and proc.poll() is None
        time.sleep(0.05)
    watched = [int(x) for f in files for x in (tmp_path / f).read_text().split()]
    assert all(_alive(p) for p in watched) and sock.exists()
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 20
    while (any(_alive(p) for p in watched) or sock.exists()) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in watched if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left and not sock.exists()


def test_a_child_dies_with_its_parent_by_pdeathsig(tmp_path):
    """PR_SET_PDEATHSIG: the direct child gets SIGKILL when the harness dies, watchdog or not."""
    script = tmp_path / "p.py"
    script.write_text(f"import sys, time\nsys.path.insert(0, {str(ROOT / 'src')!r})\n"
                      "from vllm_harness.core import procs\n"
                      "p = procs.popen(['sleep', '600'])\nprint(p.pid, flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    procs_guard = subprocess.run(["pgrep", "-f", "_watchdog.py"], capture_output=True, text=True).stdout.split()
    for w in procs_guard:  # take the watchdog out of the picture: PDEATHSIG alone must end the child
        try:
            os.kill(int(w), signal.SIGSTOP)
        except OSError:
            pass
    try:
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        for w in procs_guard:
            try:
                os.kill(int(w), signal.SIGCONT)
            except OSError:
                pass


def test_the_cache_server_stops_soon_by_itself_and_its_socket_lives_with_the_cache(tmp_path):
    assert bcache.SCCACHE_IDLE_TIMEOUT < 900  # was 900 s with no watchdog behind it
    cdir = Path(tempfile.mkdtemp(prefix="h-")) / "cache" / "sccache"
    assert bcache._sock_path("k", cdir).startswith(str(cdir))
    deep = tmp_path / ("d" * 120)
    assert bcache._sock_path("k", deep).startswith("/tmp/")  # too long for a socket address


# --------------------------------------------------------------------------------- 4. clean and the lock

def _hold_lock(lock: Path, seconds: float) -> subprocess.Popen:
    code = (f"import sys, time\nfrom filelock import FileLock\nl = FileLock({str(lock)!r})\nl.acquire()\n"
            f"print('held', flush=True)\ntime.sleep({seconds})\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_clean_waits_for_a_running_build_and_no_wait_fails_at_once(harness, state):
    layout = Layout.default()
    layout.ensure()
    venv = layout.venv("cu124")
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    holder = _hold_lock(layout.lock("cu124"), 3)
    try:
        rc, out, err = harness("clean", "--variant", "cu124", "--no-wait")
        assert rc == 1 and "in use" in err and venv.is_dir()
        t0 = time.monotonic()
        rc, out, err = harness("clean", "--variant", "cu124")
        assert rc == 0 and "waiting for variant cu124" in err
        assert time.monotonic() - t0 > 1 and not venv.exists()
    finally:
        holder.kill()


def test_clean_accepts_a_variant_path_as_every_command_does(harness, state):
    layout = Layout.default()
    layout.ensure()
    venv = layout.venv("fixture-cpu")
    venv.mkdir(parents=True)
    rc, out, err = harness("clean", "--variant", "tests/envs/fixture-cpu.toml")
    assert rc == 0 and str(venv) in out and not venv.exists()


def test_a_step_whose_env_vanished_is_never_recorded_ok(state):
    from vllm_harness.facts.variants import load_variant
    layout = Layout.default()
    ctx = steps.Ctx(layout=layout, variant=load_variant("cu124", layout.envs_dirs), options=RunOptions(quiet=True))
    ctx.status = Status(layout.status(ctx.name), ctx.name, GRAPH)   # as the pipeline opens it
    ctx.py.parent.mkdir(parents=True)
    ctx.py.write_text("")

    def vanishing(log):
        import shutil
        shutil.rmtree(ctx.venv)  # what an unlocked `clean` did mid-build
        return {}

    with pytest.raises(Exception) as e:
        steps._run(ctx, dataclasses.replace(BY_NAME["deps"], run=lambda c, log, interp: vanishing(log)), "k", None)
    assert "disappeared" in str(e.value)
    assert ctx.status.step("deps")["status"] == "failed" and not ctx.status.built


# ----------------------------------------------------------------------------------- 5. unbounded input

@pytest.mark.parametrize("text", [
    "a" + ".a" * 60000 + " = 1\n",                       # quadratic in tomllib: 13 s and 1.5 GB at 40 kB
    "[" + ".".join(["t"] * 200000) + "]\n",
    "a = " + "[" * 5000 + "]" * 5000 + "\n",              # RecursionError in tomllib
    "a = " + "{b = " * 3000 + "1" + "}" * 3000 + "\n",
    "".join(f"k{i} = {i}\n" for i in range(30000)),
])
def test_hostile_toml_is_one_message_fast(harness, tmp_path, text):
    v = tmp_path / "hostile.toml"
    v.write_text(text)
    t0 = time.monotonic()
    rc, out, err = harness("doctor", "--variant", v, "--machine", NO_GPU)
    assert rc == 2 and str(v) in err and err.count("error:") == 1, err[-500:]
    assert time.monotonic() - t0 < 10


def test_a_huge_variant_file_is_refused_before_it_is_read(harness, tmp_path):
    v = tmp_path / "big.toml"
    with open(v, "wb") as f:
        f.truncate(5 << 30)  # 5 GB, sparse: reading it whole would take minutes and all the memory
    t0 = time.monotonic()
    rc, out, err = harness("doctor", "--variant", v, "--machine", NO_GPU)
    assert rc == 2 and "5368709120 bytes" in err and time.monotonic() - t0 < 10


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_a_machine_profile_that_is_not_a_file_is_refused_without_reading(tmp_path, kind):
    target = {"fifo": tmp_path / "m.toml", "dev-zero": Path("/dev/zero"), "directory": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(target)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), VLLM_HARNESS_STATE=str(tmp_path / "state"),
               VLLM_HARNESS_ROOT=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "vllm_harness", "doctor", "--variant", "cu124", "--machine",
                        str(target)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(target) in r.stderr, r.stderr


@pytest.mark.parametrize("name,content", [
    ("last-failed.json", b"{broken"), ("last-failed.json", b'{"log": 5}'), ("last-failed.json", b"\xff\xfe\x00"),
    ("last-failed.json", b'["a"]'), ("last-built", b"../../etc/passwd"), ("last-built", b"\x00\x01"),
])
def test_corrupt_state_files_are_reported_with_their_reset(harness, state, name, content):
    Layout.default().ensure()
    (state / name).write_bytes(content)
    argv = ["diagnose"] if name == "last-failed.json" else ["verify"]
    rc, out, err = harness(*argv)
    assert rc == 2 and "corrupt" in err and str(state / name) in err and "Traceback" not in err
    assert "invoke clean --all" in err


@pytest.mark.parametrize("path", ["/", "{state}", "{state_parent}"])
def test_a_path_source_that_contains_the_state_folder_is_refused(harness, state, tmp_path, path):
    Layout.default().ensure()
    where = path.format(state=state, state_parent=state.parent)
    v = tmp_path / "enclosing.toml"
    v.write_text(VARIANT.read_text().replace('mode = "wheel"', f'mode = "source"\nsource = "path"\npath = "{where}"'))
    rc, out, err = harness("fetch", "--variant", v)
    assert rc == 2 and "contains the harness's state folder" in err or "is / or contains" in err, out + err
    assert "Traceback" not in err


_keys = st.text(alphabet="abcxyz_-.\"'[]{}= \n#,0123456789", max_size=400)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_keys, st.integers(min_value=0, max_value=3000))
def test_any_variant_text_is_a_variant_or_one_usage_error(text, depth):
    """Random shapes and hostile sizes: parse_variant ends quickly with a Variant or a UsageError."""
    doc = text + "\n" + "x = " + "[" * depth + "]" * depth + "\n" + "k" + ".k" * depth + " = 1\n"
    t0 = time.monotonic()
    try:
        parse_variant("v", Path("v.toml"), doc)
    except UsageError:
        pass
    assert time.monotonic() - t0 < 2


def test_the_json_reader_refuses_a_fifo_and_a_big_file(tmp_path):
    from vllm_harness.core import safeio
    f = tmp_path / "s.json"
    os.mkfifo(f)
    with pytest.raises(UsageError, match="FIFO"):
        safeio.load_json(f, "Status file", "reset it")
    big = tmp_path / "b.json"
    with open(big, "wb") as fh:
        fh.truncate(safeio.JSON_MAX_BYTES + 1)
    with pytest.raises(UsageError, match="too large"):
        safeio.load_json(big, "Status file", "reset it")


# ------------------------------------------------------------------------------------------ 6. credentials

SECRET = "s3cr@t:pa/ss"


@pytest.mark.parametrize("url", [
    "https://alice:s3cr3t@pypi.corp.example/simple", "https://alice:p@ss@host.example/simple",
    "https://alice:p@ss:w@rd@host.example:8443/simple?x=1", "https://tok3n@host.example/x",
    "https://alice:pa/ss@host.example/simple", "HTTPS://ALICE:SECRET@HOST/X",
])
def test_every_credential_is_masked_however_it_is_spelled(url):
    from vllm_harness.core import masking
    masked = masking.mask(f"Looking in indexes: {url}, then more")
    user_info = url.split("://", 1)[1].rsplit("@", 1)[0]
    assert user_info not in masked and "***@" in masked and masked.endswith(", then more")


def test_diagnose_table_and_json_never_print_a_password(harness, tmp_path):
    log = tmp_path / "pip.log"
    log.write_text(f"Looking in indexes: https://bob:{SECRET}@pypi.corp.example/simple\n"
                   f"ERROR: HTTP error 418 while getting https://bob:{SECRET}@pypi.corp.example/simple/x/\n")
    known = tmp_path / "known.log"
    known.write_text(f"ERROR: Could not find a version that satisfies the requirement torch==2.6.0+cu118 (from "
                     f"https://bob:{SECRET}@pypi.corp.example/simple)\n"
                     "ERROR: No matching distribution found for torch==2.6.0+cu118\n")
    for f in (log, known):
        for extra in ([], ["--json"]):
            rc, out, err = harness("diagnose", "--log", f, *extra)
            assert "s3cr" not in out + err and "pa/ss" not in out + err
            assert f is known or "***@pypi.corp.example" in out  # shown, masked


def test_a_credentialed_git_url_reaches_neither_stderr_nor_the_status_file(harness, state, tmp_path):
    url = f"https://bob:{SECRET.replace('/', '%2F')}@127.0.0.1:9/vllm.git"
    v = tmp_path / "cred.toml"
    v.write_text(VARIANT.read_text().replace('mode = "wheel"', f'mode = "source"\nsource = "git"\ngit = "{url}"\n'
                                             'ref = "v0.8.5"'))
    rc, out, err = harness("fetch", "--variant", v)
    assert rc in (1, 2)
    texts = [out, err] + [p.read_text(errors="replace") for p in state.rglob("*") if p.is_file()
                          and p.suffix in (".json", ".log")]
    assert not any("s3cr" in t for t in texts)


class _AuthIndex(http.server.BaseHTTPRequestHandler):
    want = "Basic " + base64.b64encode(b"alice:p@ss").decode()

    def do_GET(self):  # http.server's name
        ok = self.headers.get("Authorization") == self.want
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(b"<html></html>" if ok else b"")

    def log_message(self, *a):
        pass


@pytest.fixture
def auth_index():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AuthIndex)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_an_index_with_credentials_is_checked_with_them(auth_index, tmp_path, monkeypatch):
    check_index(f"http://alice:p%40ss@{auth_index}/simple", "test")  # the URL's own credentials
    with pytest.raises(UsageError, match="refused the credentials"):
        check_index(f"http://alice:wrong@{auth_index}/simple", "test")
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login alice password p@ss\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    check_index(f"http://{auth_index}/simple", "test")  # ~/.netrc, as pip and uv read it


def test_the_guardian_is_one_process_per_harness():
    from vllm_harness.core import procs
    a, b = procs.Guardian.get(), procs.Guardian.get()
    assert a is b and a.proc is not None and a.proc.poll() is None
