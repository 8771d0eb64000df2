"""Every child the harness starts ends with it.

* :func:`popen` starts a command in its own process group (so the command and everything under it, a
  compiler driver's ``cc1plus`` included, can be ended together) with ``PR_SET_PDEATHSIG`` where Linux
  offers it (the direct child gets SIGKILL if the harness dies), and registers the group with the
  :class:`Guardian`;
* the :class:`Guardian` is one small watchdog process per harness process (``_watchdog.py``) holding the
  read end of a pipe that only the harness writes to: when the harness dies, even by SIGKILL, the kernel
  closes the pipe and the watchdog ends every group, process tree (a compiler-cache server and its
  compiles) and socket file still registered;
* :func:`end_group` ends a group at once (Ctrl-C, SIGTERM, SIGHUP, a timeout): SIGTERM, then SIGKILL, and
  with it every process the command started that left the group (a ``setsid`` daemon);
* descendants that detach (``setsid`` and a double fork, as a source tree's script may do) are still found:
  the harness makes itself a child subreaper (``PR_SET_CHILD_SUBREAPER``) when it starts its first child, so
  an orphaned descendant is re-parented to the harness, not to init, and every child carries
  ``VLLM_HARNESS_OWNER`` / ``VLLM_HARNESS_JOB`` in its environment (inherited by what it starts).  When the
  harness exits, :func:`end_all` ends every process left below it (bounded: SIGTERM, SIGKILL 2 s later); when
  it is killed, the watchdog ends every process carrying its owner tag.

Every child the harness starts goes through :func:`popen` / :func:`run` (``tests/test_procs.py`` checks the
source for any other ``subprocess``/``os.exec*``/``os.spawn*``/``os.system`` call).
"""

from __future__ import annotations

import atexit
import ctypes
import itertools
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
OWNER_VAR = "VLLM_HARNESS_OWNER"
JOB_VAR = "VLLM_HARNESS_JOB"
END_GRACE = 2.0  # seconds between SIGTERM and SIGKILL for what is left when the harness exits


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:  # not Linux, or no prctl: the Guardian still covers the child
        pass


class Guardian:
    """The watchdog of this harness process (started on first use, told ``bye`` at normal exit)."""

    _instance: Guardian | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.w = -1
        self.pid = os.getpid()
        r, w = os.pipe()
        try:
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_watchdog.py"))],
                                         stdin=r, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True, env={"PATH": os.environ.get("PATH", "")},
                                         close_fds=True)
            self.w = w
        except OSError:
            os.close(w)
        finally:
            os.close(r)
        atexit.register(self.close)
        if self.w >= 0:  # on SIGKILL: every process carrying this harness's tag ends too
            try:
                os.write(self.w, f"o {_owner()['tag']}\n".encode())
            except OSError:
                pass

    @classmethod
    def get(cls) -> Guardian:
        with cls._lock:
            if cls._instance is None or cls._instance.pid != os.getpid():  # a forked child gets its own
                cls._instance = Guardian()
            return cls._instance

    def _send(self, line: str) -> None:
        if self.w < 0:
            return
        try:
            with self._lock:
                os.write(self.w, (line + "\n").encode("utf-8", "surrogateescape"))
        except OSError:
            pass

    def track_group(self, pgid: int) -> None:
        self._send(f"g {pgid}")

    def untrack_group(self, pgid: int) -> None:
        self._send(f"-g {pgid}")

    def track_tree(self, pid: int) -> None:
        self._send(f"t {pid}")

    def untrack_tree(self, pid: int) -> None:
        self._send(f"-t {pid}")

    def track_file(self, path: str) -> None:
        self._send(f"f {path}")

    def untrack_file(self, path: str) -> None:
        self._send(f"-f {path}")

    def close(self) -> None:
        if self.w < 0 or self.pid != os.getpid():
            return
        self._send("bye")
        os.close(self.w)
        self.w = -1
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


_OWNER: dict = {}
_OWNER_LOCK = threading.Lock()


def _owner() -> dict:
    """This harness process's tag, job counter and live children; made (with the subreaper and the exit
    sweep) on first use in each process (a forked child gets its own)."""
    with _OWNER_LOCK:
        if _OWNER.get("pid") != os.getpid():
            _OWNER.clear()
            _OWNER.update(
                pid=os.getpid(),
                tag=f"{os.getpid()}.{secrets.token_hex(6)}",
                jobs=itertools.count(1),
                live={},
                subreaper=_become_subreaper(),
            )
            atexit.register(end_all)
        return _OWNER


def _become_subreaper() -> bool:
    """``PR_SET_CHILD_SUBREAPER``: an orphaned descendant (a daemon that detached with setsid and a double
    fork) is re-parented to this process, so :func:`end_all` finds it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except Exception:  # no prctl: the owner tag still finds them
        return False


def popen(argv: list[str], **kw: Any) -> subprocess.Popen:
    """``subprocess.Popen`` in a new process group, guarded (see the module's text).  Pass the result to
    :func:`release` when it has ended, or :func:`end_group` to end it early."""
    owner = _owner()
    guardian = Guardian.get()
    if threading.current_thread() is threading.main_thread():
        kw.setdefault("preexec_fn", _pdeathsig)  # the parent *thread* dying sends it: main thread only
    job = f"{owner['tag']}.{next(owner['jobs'])}"
    env = kw.pop("env", None)
    kw["env"] = {**(os.environ if env is None else env), OWNER_VAR: owner["tag"], JOB_VAR: job}
    proc = subprocess.Popen(argv, start_new_session=True, **kw)
    proc.harness_job = job  # type: ignore[attr-defined]
    owner["live"][proc.pid] = proc
    guardian.track_group(proc.pid)
    return proc


def release(proc: subprocess.Popen) -> None:
    _owner()["live"].pop(proc.pid, None)
    Guardian.get().untrack_group(proc.pid)


def end_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """End ``proc``'s whole process group now: SIGTERM, SIGKILL after ``grace`` seconds; and every process
    it started that left the group (its descendants, and whatever carries its job tag)."""
    job = getattr(proc, "harness_job", None)
    table = _table()
    strays = (_below(table, [proc.pid]) | (_tagged(JOB_VAR, job, table) if job else set())) - {proc.pid}
    strays = {p for p in strays if table[p][1] != proc.pid}  # the group itself: killpg below
    _signal(strays, signal.SIGTERM)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left (a grandchild that ignored TERM)
    except (ProcessLookupError, PermissionError):
        pass
    _signal(strays | (_tagged(JOB_VAR, job, _table()) if job else set()), signal.SIGKILL)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    _reap(strays | _members(table, proc.pid), time.monotonic() + min(grace, 2.0))
    release(proc)


# ---------------------------------------------------------------------------------- what is below us


PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def process_table() -> dict[int, tuple[int, int, int, str, str, int]]:
    """pid -> (ppid, pgrp, session, state, comm, rss bytes) of every process this user can read, from /proc
    (empty where there is none): the one reader of the process table (ending children here, the build's
    memory sampler and the compiler cache's server lookups)."""
    out: dict[int, tuple[int, int, int, str, str, int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for d in names:
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as fh:
                raw = fh.read().decode("utf-8", "replace")
            lp, rp = raw.index("("), raw.rindex(")")
            f = raw[rp + 2 :].split()
            out[int(d)] = (int(f[1]), int(f[2]), int(f[3]), f[0], raw[lp + 1 : rp], int(f[21]) * PAGE)
        except (OSError, ValueError, IndexError):
            continue
    return out


def rss_table() -> dict[int, tuple[int, str, int]]:
    """pid -> (ppid, comm, rss bytes): :func:`process_table` as the memory sampler reads it."""
    return {pid: (ppid, comm, rss) for pid, (ppid, _g, _s, _st, comm, rss) in process_table().items()}


def _table() -> dict[int, tuple[int, int, int, str]]:
    """pid -> (ppid, pgrp, session, state)."""
    return {pid: (ppid, pgrp, sid, st) for pid, (ppid, pgrp, sid, st, _c, _r) in process_table().items()}


def _below(table: dict, roots: list[int]) -> set[int]:
    kids: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in table.items():
        kids.setdefault(ppid, []).append(pid)
    out: set[int] = set()
    todo = list(roots)
    while todo:
        for c in kids.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _members(table: dict, pgid: int) -> set[int]:
    return {p for p, (_pp, pg, _sid, _st) in table.items() if pg == pgid}


def _tagged(var: str, value: str, table: dict) -> set[int]:
    """Processes (of this user) whose environment holds ``var=value``."""
    needle = f"{var}={value}".encode()
    out = set()
    for pid in table:
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    out.add(pid)
        except OSError:
            continue
    return out


def _signal(pids: set[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except OSError:
            pass


def _reap(pids: set[int], deadline: float) -> None:
    """Collect the exit of those of ``pids`` that are our children now (re-parented to the subreaper), so
    that none is left a zombie; never a child some ``Popen`` of ours still waits for."""
    live = _owner()["live"]
    todo = {p for p in pids if p not in live}
    while todo:
        for p in list(todo):
            try:
                done, _ = os.waitpid(p, os.WNOHANG)
            except ChildProcessError:  # not (or no longer) our child
                todo.discard(p)
                continue
            if done:
                todo.discard(p)
        if not todo or time.monotonic() > deadline:
            return
        time.sleep(0.02)


def end_all(grace: float = END_GRACE) -> list[int]:
    """End every process still below this harness (its children, the orphans re-parented to it as subreaper,
    and whatever carries its owner tag), bounded by ``grace`` seconds; the watchdog is left to its ``bye``.
    Runs at exit; returns the pids it signalled."""
    if _OWNER.get("pid") != os.getpid():
        return []
    me, tag = os.getpid(), _OWNER["tag"]
    keep = set()
    g = Guardian._instance
    if g is not None and g.proc is not None and g.pid == me:
        keep.add(g.proc.pid)
    table = _table()
    roots = {p for p, (ppid, *_r) in table.items() if ppid == me} | _tagged(OWNER_VAR, tag, table)
    roots -= keep
    doomed = (roots | _below(table, list(roots))) - keep - {me}
    if not doomed:
        return []
    _signal(doomed, signal.SIGTERM)
    _signal(doomed, signal.SIGCONT)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(doomed, 0)
        t = _table()
        if not any(p in t and t[p][3] not in "ZX" for p in doomed):
            break
        time.sleep(0.05)
    t = _table()
    _signal(doomed | (_below(t, list(roots)) - keep), signal.SIGKILL)
    _reap(doomed, time.monotonic() + 1.0)
    return sorted(doomed)


def run(
    argv: list[str],
    timeout: float | None = None,
    input: bytes | str | None = None,
    check: bool = False,
    leave_daemons: bool = False,
    **kw: Any,
) -> subprocess.CompletedProcess:
    """``subprocess.run`` whose child ends with the harness and whose whole group ends on a timeout or an
    interruption (``subprocess.run`` kills the direct child only).  What the command leaves in its group
    ends when it returns, unless ``leave_daemons`` (a server the caller tracks and stops itself)."""
    text = kw.pop("text", False)
    capture = kw.pop("capture_output", False)
    if capture:
        kw["stdout"] = kw["stderr"] = subprocess.PIPE
    if input is None:
        kw.setdefault("stdin", subprocess.DEVNULL)
    else:
        kw["stdin"] = subprocess.PIPE
    proc = popen(argv, text=text, **kw)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        end_group(proc, grace=2)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(argv, timeout, out, err) from None
    except BaseException:
        end_group(proc, grace=2)
        raise
    if not leave_daemons:
        try:  # the command is done; a grandchild left in its group (a daemon) ends with it
            os.killpg(proc.pid, 0)
            left = _members(_table(), proc.pid) - {proc.pid}
            os.killpg(proc.pid, signal.SIGKILL)
            _reap(left, time.monotonic() + 1.0)  # re-parented to us (subreaper): no zombie is left
        except (ProcessLookupError, PermissionError):
            pass
    release(proc)
    if check and proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, argv, out, err)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)
