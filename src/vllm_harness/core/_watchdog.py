"""The harness's watchdog (a standalone script, standard library only; started by ``procs.Guardian``).

It reads a line protocol on stdin from the one harness process that holds the pipe's write end:

    g PGID / -g PGID   a process group to end if the harness dies (a build command, a compile probe)
    t PID  / -t PID    a process tree to end (a compiler-cache server and the compiles it runs)
    f PATH / -f PATH   a file to remove (the server's socket)
    o TAG              the harness's owner tag: every process whose environment holds VLLM_HARNESS_OWNER=TAG
                       (what the harness started, and what that started, a setsid daemon included)
    bye                the harness is exiting normally: leave everything as it is

End of file without ``bye`` means the harness died (SIGKILL, the OOM killer): every group gets SIGTERM and,
5 s later, SIGKILL; every tree is frozen (SIGSTOP, so no new child escapes) and killed; files are removed.
"""

import os
import signal
import sys
import time


def _children() -> dict:
    out: dict = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", "rb") as fh:
                    ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            out.setdefault(ppid, []).append(int(d))
    return out


def _end_tree(root: int) -> None:
    frozen = []
    todo = [root]
    for _ in range(50):
        new = [p for p in todo if p not in frozen]
        if not new:
            break
        for p in new:
            try:
                os.kill(p, signal.SIGSTOP)
                frozen.append(p)
            except OSError:
                pass
        kids = _children()
        todo = [c for p in frozen for c in kids.get(p, [])]
    for p in frozen:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def _tagged(tag: str) -> list:
    needle = f"VLLM_HARNESS_OWNER={tag}".encode()
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/environ", "rb") as fh:
                    if needle in fh.read().split(b"\0"):
                        out.append(int(d))
            except OSError:
                continue
    return out


def _end_groups(groups: set[int]) -> None:
    """SIGTERM every group, wait up to 5 s for them to go, then SIGKILL those left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = set()
        for g in groups:
            try:
                os.killpg(g, sig)
                alive.add(g)
            except OSError:
                pass
        if not alive or sig == signal.SIGKILL:
            break
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and alive:
            for g in list(alive):
                try:
                    os.killpg(g, 0)
                except OSError:
                    alive.discard(g)
            time.sleep(0.1)
        groups = alive


def main() -> None:
    groups, trees, files, owners = set(), set(), set(), set()
    sets = {"g": groups, "t": trees, "f": files, "o": owners}
    for raw in sys.stdin.buffer:
        line = raw.decode("utf-8", "surrogateescape").rstrip("\n")
        if line == "bye":
            return
        op, _, arg = line.partition(" ")
        kind = op.lstrip("-")
        if kind not in sets or not arg:
            continue
        value = arg if kind in ("f", "o") else int(arg)
        (sets[kind].discard if op.startswith("-") else sets[kind].add)(value)
    for root in trees:
        _end_tree(root)
    _end_groups(groups)
    for tag in owners:  # what left the groups (setsid daemons), after the groups had their SIGTERM
        for root in _tagged(tag):
            _end_tree(root)
    for f in files:
        try:
            os.unlink(f)
        except OSError:
            pass


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # a Ctrl-C to the terminal is the harness's to handle
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    main()
