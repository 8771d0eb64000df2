"""One lock per variant env (and per shared cache), that says who holds it.

The lock itself is an OS file lock (``filelock``): the kernel releases it when its process dies, so a lock
left by a killed run is taken over safely; beside it a small JSON file names the holder (pid, command,
since when, host).  A second run waits with a message naming the holder, or fails at once with
``--no-wait``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from vllm_harness.core.errors import StepFailed


def _holder_path(lock: Path) -> Path:
    return lock.with_suffix(".holder.json")


def holder(lock: Path) -> dict | None:
    try:
        return json.loads(_holder_path(lock).read_text())
    except (OSError, ValueError):
        return None


def describe(info: dict | None) -> str:
    if not info:
        return "another harness run"
    since = time.strftime("%H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info.get('pid')} (`{info.get('command', '?')}`) on {info.get('host', '?')} since {since}"


@contextmanager
def held(lock: Path, what: str, wait: bool = True, say=print, poll: float = 10.0):
    """Hold ``lock`` for the block.  ``what`` names the thing locked, for the messages."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fl = FileLock(str(lock))
    try:
        fl.acquire(timeout=0)
    except Timeout:
        info = holder(lock)
        if not wait:
            raise StepFailed(f"{what} is in use by {describe(info)}.",
                             "Wait for that run to finish (or drop --no-wait to wait for it).") from None
        say(f"waiting for {what}: held by {describe(info)}")
        while True:
            try:
                fl.acquire(timeout=poll)
                break
            except Timeout:
                continue
    try:
        tmp = _holder_path(lock).with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"pid": os.getpid(), "command": " ".join(Path(sys.argv[0]).name.split() +
                                                                          sys.argv[1:])[:300],
                                   "since": time.time(), "host": socket.gethostname()}))
        os.replace(tmp, _holder_path(lock))
        yield
    finally:
        try:
            _holder_path(lock).unlink()
        except OSError:
            pass
        fl.release()
