"""One lock per variant env (and per shared cache), that says who holds it; and the state folder's gate.

The lock itself is an OS file lock (``filelock``): the kernel releases it when its process dies, so a lock
left by a killed run is taken over safely; beside it a small JSON file names the holder (pid, command,
since when, host).  A second run waits with a message naming the holder, or fails at once with
``--no-wait``.

The gate (``locks/.gate`` beside the locks): every :func:`held` lock is taken under a *shared* OS lock on it,
so :func:`everything` (``clean --all``) takes it *exclusively* and then no harness run is inside any lock,
including one that started (or created its lock file) while clean was waiting.  A process holds the gate
once, however many locks it nests (a bundle's lock around the fetch step's variant lock).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from vllm_harness.core import oserrors
from vllm_harness.core.errors import LOCK_HELD, StepFailed

GATE = ".gate"
BUNDLE_PREFIX = "bundle@"   # '@' is not in a variant name (layout.NAME_RE): no variant's lock is a bundle's


def bundle_lock(locks_dir: Path, variant: str) -> Path:
    """The lock `invoke bundle` holds for a variant (its source tree, the download and bundle caches); clean
    takes it before deleting the variant's tree, and every one of them with --all."""
    return Path(locks_dir) / f"{BUNDLE_PREFIX}{variant}.lock"


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


def holders(locks_dir: Path) -> list[str]:
    """Who holds a lock in ``locks_dir`` now (by the holder records of live processes on this host)."""
    out = []
    for p in sorted(Path(locks_dir).glob("*.holder.json")):
        info = holder(p.with_name(p.name[: -len(".holder.json")] + ".lock"))
        if not info:
            continue
        if info.get("host") == socket.gethostname():
            try:
                os.kill(int(info.get("pid")), 0)
            except (ProcessLookupError, ValueError, TypeError):
                continue  # a record left by a killed run: the kernel released its lock
            except PermissionError:
                pass
        out.append(f"{p.name[: -len('.holder.json')]}: {describe(info)}")
    return out


# ------------------------------------------------------------------------------------------ the gate

_gates: dict[str, list] = {}   # gate path -> [fd, mode, count]: one OS lock per process, nested uses counted
_gates_lock = threading.Lock()
_entering = threading.Lock()


def _gate_enter(gate: Path, exclusive: bool, wait: bool, say, what: str) -> None:
    with _entering:   # one thread of this process at a time opens the gate's OS lock; the others count on it
        _gate_enter1(gate, exclusive, wait, say, what)


def _gate_enter1(gate: Path, exclusive: bool, wait: bool, say, what: str) -> None:
    key = str(gate)
    with _gates_lock:
        g = _gates.get(key)
        if g is not None and (g[1] == fcntl.LOCK_EX or not exclusive):
            g[2] += 1
            return
        if g is not None:
            raise StepFailed(f"{what}: this process already holds the state folder's gate shared (a lock).",
                             "Run clean outside any other harness command.")
    gate.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(gate, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                who = "; ".join(holders(gate.parent)) or "another harness run"
                raise StepFailed(f"{what} is in use by {who}.",
                                 "Wait for that run to finish (or drop --no-wait to wait for it).",
                                 kind=LOCK_HELD) from None
            say(f"waiting for {what}: held by {'; '.join(holders(gate.parent)) or 'another harness run'}")
            fcntl.flock(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    with _gates_lock:
        _gates[key] = [fd, mode, 1]


def _gate_exit(gate: Path) -> None:
    key = str(gate)
    with _gates_lock:
        g = _gates.get(key)
        if g is None:
            return
        g[2] -= 1
        if g[2] > 0:
            return
        del _gates[key]
    try:
        fcntl.flock(g[0], fcntl.LOCK_UN)
    finally:
        os.close(g[0])


@contextmanager
def everything(locks_dir: Path, what: str, wait: bool = True, say=print):
    """No harness run inside any lock of ``locks_dir`` for the block, and none enters one until it ends
    (``clean --all``); waits for the runs inside, or fails at once (``wait=False``) naming them."""
    gate = Path(locks_dir) / GATE
    _gate_enter(gate, True, wait, say, what)
    try:
        with _recorded(Path(locks_dir) / "clean@all.lock"):   # names this run to those it keeps waiting
            yield
    finally:
        _gate_exit(gate)


# ------------------------------------------------------------------------------------------ one lock

@contextmanager
def held(lock: Path, what: str, wait: bool = True, say=print, poll: float = 10.0):
    """Hold ``lock`` for the block (under the gate, shared).  ``what`` names the thing locked, for the
    messages."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    gate = lock.parent / GATE
    _gate_enter(gate, False, wait, say, what)
    try:
        with _held(lock, what, wait, say, poll):
            yield
    finally:
        _gate_exit(gate)


@contextmanager
def _held(lock: Path, what: str, wait: bool, say, poll: float):
    fl = FileLock(str(lock))
    try:
        fl.acquire(timeout=0)
    except Timeout:
        info = holder(lock)
        if not wait:
            raise StepFailed(f"{what} is in use by {describe(info)}.",
                             "Wait for that run to finish (or drop --no-wait to wait for it).",
                                 kind=LOCK_HELD) from None
        say(f"waiting for {what}: held by {describe(info)}")
        while True:
            try:
                fl.acquire(timeout=poll)
                break
            except Timeout:
                continue
    try:
        with _recorded(lock):
            yield
    finally:
        fl.release()


@contextmanager
def _recorded(lock: Path):
    """The holder record beside ``lock`` for the block (who holds it, for the messages of those who wait)."""
    try:
        tmp = _holder_path(lock).with_suffix(f".tmp{os.getpid()}")
        try:
            tmp.write_text(
                json.dumps(
                    {
                        "pid": os.getpid(),
                        "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:300],
                        "since": time.time(),
                        "host": socket.gethostname(),
                    }
                )
            )
            os.replace(tmp, _holder_path(lock))
        except OSError as e:  # a full disk: no half-written record left behind, one message naming the file
            tmp.unlink(missing_ok=True)
            raise (oserrors.refusal(e, "Lock record", _holder_path(lock), "; nothing was run") or e) from None
        yield
    finally:
        try:
            _holder_path(lock).unlink()
        except OSError:
            pass
