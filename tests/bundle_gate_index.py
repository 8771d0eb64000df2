"""The tiny index (tiny_index.py) with a gate: a request the test names (by path and User-Agent) is held until
the test releases it, so a test can stop `invoke bundle` at a known point (uv resolving, a download) and kill
it, or run `clean` beside it."""
from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tiny_index import _Index, build_index


class Gate:
    def __init__(self) -> None:
        self.hold = None                     # (path, user agent) -> bool: hold this request
        self.reached = threading.Event()     # a held request arrived
        self.release = threading.Event()

    def close(self, path: str, agent: str = "") -> None:
        self.release.clear()
        self.reached.clear()
        self.hold = lambda p, ua: p.startswith(path) and ua.startswith(agent)

    def open(self) -> None:
        self.hold = None
        self.release.set()


@pytest.fixture
def gated_index(tmp_path):
    """(URL, Gate) of a PEP 503 index of the tiny wheels whose requests the gate can hold."""
    root = build_index(tmp_path / "gindex")
    gate = Gate()

    class Handler(_Index):
        def do_GET(self):  # http.server's name
            if gate.hold is not None and gate.hold(self.path, self.headers.get("User-Agent", "")):
                gate.reached.set()
                gate.release.wait(60)
            super().do_GET()

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):  # a killed client's broken pipe: not the test's output
            pass

    srv = Server(("127.0.0.1", 0), lambda *a, **k: Handler(*a, directory=str(root), **k))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _Index.hits = []
    yield f"http://127.0.0.1:{srv.server_address[1]}/simple", gate
    gate.open()
    srv.shutdown()


def harness_process(*args) -> subprocess.Popen:
    """`python -m vllm_harness ARGS` as its own process (the state folder of the test's environment)."""
    return subprocess.Popen([sys.executable, "-m", "vllm_harness", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for t in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(x) for x in (t / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def kill_hard(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_gone(pid: int, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return not alive(pid)
