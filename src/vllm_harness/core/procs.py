"""Every child the harness starts ends with it.

* :func:`popen` starts a command in its own process group (so the command and everything under it, a
  compiler driver's ``cc1plus`` included, can be ended together) with ``PR_SET_PDEATHSIG`` where Linux
  offers it (the direct child gets SIGKILL if the harness dies), and registers the group with the
  :class:`Guardian`;
* the :class:`Guardian` is one small watchdog process per harness process (``_watchdog.py``) holding the
  read end of a pipe that only the harness writes to: when the harness dies, even by SIGKILL, the kernel
  closes the pipe and the watchdog ends every group, process tree (a compiler-cache server and its
  compiles) and socket file still registered;
* :func:`end_group` ends a group at once (Ctrl-C, SIGTERM, SIGHUP, a timeout): SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:  # noqa: BLE001 - not Linux, or no prctl: the Guardian still covers the child
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


def popen(argv: list[str], **kw: Any) -> subprocess.Popen:
    """``subprocess.Popen`` in a new process group, guarded (see the module's text).  Pass the result to
    :func:`release` when it has ended, or :func:`end_group` to end it early."""
    guardian = Guardian.get()
    if threading.current_thread() is threading.main_thread():
        kw.setdefault("preexec_fn", _pdeathsig)  # the parent *thread* dying sends it: main thread only
    proc = subprocess.Popen(argv, start_new_session=True, **kw)
    guardian.track_group(proc.pid)
    return proc


def release(proc: subprocess.Popen) -> None:
    Guardian.get().untrack_group(proc.pid)


def end_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """End ``proc``'s whole process group now: SIGTERM, SIGKILL after ``grace`` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left (a grandchild that ignored TERM)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    release(proc)


def run(argv: list[str], timeout: float | None = None, input: bytes | None = None,
        **kw: Any) -> subprocess.CompletedProcess:
    """``subprocess.run`` whose child ends with the harness and whose whole group ends on a timeout or an
    interruption (``subprocess.run`` kills the direct child only)."""
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
    try:  # the command is done; a grandchild left in its group (a daemon) ends with it
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    release(proc)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)
